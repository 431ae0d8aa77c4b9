"""RSS of the bridge and of mosquitto while every meter invents new key names (issue 12).

Starts mosquitto, a churning meter server of its own (not bridge.simulator, so the same
script measures older versions of the bridge too) and the bridge as a process
(`python -m bridge run`), then prints both processes' RSS every 10 s. Loopback only;
ends after --seconds. Prints figures, asserts nothing.

    python bench/keychurn.py [--seconds 60] [--meters 50] [--keys 50]

The server answers every `getdata` request with a valid extended meter body, told apart
by devid, whose data holds a few usual keys and --keys names never sent before.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bench.procstat import peak_rss_mb, rss_mb
from bench.support import LOOPBACK, Mosquitto, free_port

FIRST_ID = 1728100000
SAMPLE_EVERY = 10.0
# mosquitto's own counts, refreshed every 10 s (its sys_interval); heap only when built with it.
SYS_TOPICS = ("$SYS/broker/retained messages/count", "$SYS/broker/heap/current")


class BrokerStats:
    """The latest of mosquitto's $SYS figures above."""

    def __init__(self, port: int) -> None:
        self.values: dict[str, str] = {}
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="keychurn-sys")

        def subscribe(
            client: paho.Client,
            userdata: object,
            flags: paho.ConnectFlags,
            reason: ReasonCode,
            properties: Properties | None,
        ) -> None:
            for topic in SYS_TOPICS:
                client.subscribe(topic)

        client.on_connect = subscribe
        client.on_message = lambda c, u, m: self.values.__setitem__(m.topic, m.payload.decode())
        client.connect(LOOPBACK, port)
        client.loop_start()
        self._client = client

    def get(self, topic: str) -> str:
        return self.values.get(topic, "-")

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class ChurningMeters:
    """Many meters on one port; every answer carries `keys` key names never seen before."""

    def __init__(self, meters: int, keys: int) -> None:
        self.ids = {str(FIRST_ID + i) for i in range(meters)}
        self.keys = keys
        self.port = free_port()
        self.requests = 0
        self._serial = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def start(self) -> ChurningMeters:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("churning server did not start")
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, LOOPBACK, self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    def body(self, devid: str) -> bytes:
        self._serial += 1
        n = self._serial
        data = {
            "V1": {"name": "Voltage 1", "unit": "V", "value": "230.10"},
            "W1": {"name": "Active Power 1", "unit": "W", "value": "1200"},
            "Wh1": {"name": "Energy 1", "unit": "Wh", "value": str(1_000_000 + n)},
            "br0": {"name": "\n"},
        }
        for i in range(self.keys):
            data[f"C{n}_{i}"] = {"name": f"Churn {i}", "unit": "W", "value": str(i)}
        doc = {"devid": devid, "time": str(int(time.time())), "pout": "0", "data": data}
        return json.dumps(doc, separators=(",", ":")).encode()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            while (await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            query = parse_qs(urlsplit(parts[1]).query) if len(parts) == 3 else {}
            devid = query.get("devid", [""])[0]
            if devid in self.ids:
                self.requests += 1
                body, status = self.body(devid), "200 OK"
            else:
                body, status = b"not found\n", "404 Not Found"
            head = (
                f"HTTP/1.0 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, OSError, IndexError):
            pass
        finally:
            writer.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to measure (default 60)")
    parser.add_argument("--meters", type=int, default=50, help="extended meters, 6 s interval (default 50)")
    parser.add_argument("--keys", type=int, default=50, help="new key names per answer (default 50)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="keychurn-") as tmp_name:
        tmp = Path(tmp_name)
        mosquitto = Mosquitto(tmp)
        broker_port = mosquitto.port
        meters = ChurningMeters(args.meters, args.keys)
        config = {
            "mqtt": {"host": LOOPBACK, "port": broker_port, "client_id": "keychurn-bridge"},
            "devices": [
                {"id": devid, "pin": f"{100000 + i:06d}", "host": f"{LOOPBACK}:{meters.port}",
                 "topic": f"m{i:03d}", "extended": True, "interval": 6, "timeout": 5}
                for i, devid in enumerate(sorted(meters.ids))
            ],
        }  # fmt: skip
        (tmp / "bridge.yaml").write_text(json.dumps(config))  # JSON is YAML
        procs: list[subprocess.Popen[bytes]] = []
        try:
            mosquitto.start()
            meters.start()
            stats = BrokerStats(broker_port)
            with open(tmp / "bridge.log", "wb") as log:
                bridge = subprocess.Popen(
                    [sys.executable, "-m", "bridge", "run", "--config", str(tmp / "bridge.yaml"),
                     "--log-level", "WARNING"],
                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
            procs.append(bridge)
            print(f"code: {ROOT}; {args.meters} meters, {args.keys} new keys per answer, {args.seconds:g} s")
            print(f"{'t (s)':>6} {'answers':>8} {'bridge RSS MB':>14} {'mosquitto RSS MB':>17}"
                  f" {'retained':>9} {'mosq. heap MB':>14}")  # fmt: skip
            start = time.monotonic()
            t = 0.0
            while True:
                heap = stats.get(SYS_TOPICS[1])
                heap = f"{int(heap) / 2**20:.1f}" if heap.isdigit() else heap
                print(f"{t:6.0f} {meters.requests:8d} {rss_mb(bridge.pid):14.1f}"
                      f" {rss_mb(mosquitto.pid):17.1f} {stats.get(SYS_TOPICS[0]):>9} {heap:>14}",
                      flush=True)  # fmt: skip
                if bridge.poll() is not None:
                    print(
                        f"the bridge exited with {bridge.returncode}:\n"
                        + (tmp / "bridge.log").read_text()[-2000:]
                    )
                    return 1
                if t >= args.seconds:
                    break
                t = min(t + SAMPLE_EVERY, args.seconds)
                time.sleep(max(0.0, start + t - time.monotonic()))
            print(
                f"peak RSS MB: bridge {peak_rss_mb(bridge.pid):.1f},"
                f" mosquitto {peak_rss_mb(mosquitto.pid):.1f}"
            )
            stats.stop()
        finally:
            for proc in procs:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            mosquitto.stop()  # nothing persisted: killing loses nothing
            meters.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
