"""What the stale-topic scan of `publish.output` costs at start (issue 11).

    python bench/outputscan.py --meters 2000

Starts mosquitto and the simulator (N extended 3-phase meters, each its own process), then
runs the bridge in this process three times against them:

1. `attribute_and_json` (the default) until every meter was read once: the broker then
   holds what today's bridge leaves retained (22 keys + state + relay + availability each);
2. `json`, as after a user switched: the scan at the first connect finds the old B/D/KEY
   topics and clears them;
3. `json` again, as at every later start: the scan finds only what json publishes.

For runs 2 and 3 it prints the scan's retained messages, its seconds, the topics it
cleared, the bridge process's CPU seconds over the scan, the largest schedule lag of the
polls started meanwhile, and what a fresh subscriber then finds retained under B/.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench._simulator import FIRST_ID
from bench.support import LOOPBACK, Mosquitto, free_port, wait_for_port
from bridge.config import DeviceSettings, HomeAssistantSettings, MqttSettings, PublishSettings
from bridge.service import Bridge
from bridge.simulator import make_fleet
from bridge.topics import RESERVED_KEYS, Output

BASE = "smartmac"


class ScanRecord(logging.Handler):
    """The bridge's one log line at the scan's end (service.Bridge._stale_check)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.done = threading.Event()
        self.args: tuple[object, ...] = ()
        self.at = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("cleared %d retained topic"):
            self.args, self.at = tuple(record.args or ()), time.monotonic()
            self.done.set()


def retained_under(port: int) -> tuple[int, int]:
    """(retained messages under B/+/+, of them B/D/KEY) a fresh subscriber gets.

    It ends 2 s after the last message: a marker published after the subscription can be
    dropped, as can retained messages, when mosquitto's queue for a slow reader is full."""
    got: dict[str, bytes] = {}
    last = [time.monotonic()]

    def on_message(client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        last[0] = time.monotonic()
        if msg.retain and msg.payload:
            got[msg.topic] = bytes(msg.payload)

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-count", protocol=paho.MQTTv311)
    client.on_message = on_message
    subscribed = threading.Event()
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect(LOOPBACK, port)
    client.loop_start()
    client.subscribe(f"{BASE}/+/+", qos=1)
    assert subscribed.wait(10)
    last[0] = time.monotonic()
    while time.monotonic() - last[0] < 2.0:
        time.sleep(0.1)
    client.disconnect()
    client.loop_stop()
    keys = sum(1 for t in got if t.split("/")[-1] not in RESERVED_KEYS and "/bridge/" not in t)
    return len(got), keys


def run(
    devices: list[DeviceSettings], port: int, output: Output, ha: bool, until: float | None
) -> dict[str, object]:
    record = ScanRecord()
    service_log = logging.getLogger("bridge.service")
    service_log.addHandler(record)
    service_log.setLevel(logging.DEBUG)
    service_log.propagate = False  # (the restarts within 6 s make every meter say 429 once)
    bridge = Bridge(
        devices,
        MqttSettings(host=LOOPBACK, port=port, base_topic=BASE, client_id=f"bench-{output}"),
        host=LOOPBACK,
        port=port,
        homeassistant=HomeAssistantSettings(discovery=ha),
        publish=PublishSettings(output=output),
    )
    bridge.lags = []
    cpu0, t0 = time.process_time(), time.monotonic()
    bridge.start()
    result: dict[str, object] = {"output": output}
    try:
        if until is not None:  # the default output: one read of every meter
            while bridge.polls_total < len(devices):
                time.sleep(0.2)
            return result
        assert record.done.wait(60), "no scan end"
        cpu = time.process_time() - cpu0
        cleared, _, scanned, seconds = record.args
        lags = sorted(bridge.lags)
        result.update(
            scan_retained_messages=scanned,
            scan_seconds=round(float(str(seconds)), 2),
            cleared=cleared,
            cpu_s_start_to_scan_end=round(cpu, 2),
            wall_s_start_to_scan_end=round(record.at - t0, 2),
            polls_during=len(lags),
            lag_max_ms=round(lags[-1] * 1000, 1) if lags else None,
        )
    finally:
        bridge.stop()
        service_log.removeHandler(record)
    total, keys = retained_under(port)
    result.update(retained_after=total, key_topics_after=keys)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meters", type=int, default=2000)
    parser.add_argument("--delay", type=float, default=100.0, help="meter answer delay, ms")
    parser.add_argument("--homeassistant", action="store_true", help="discovery on (its ghost scan too)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp) / "mosquitto").start()
        sim_port = free_port()
        sim = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "_simulator.py"),
                "--port",
                str(sim_port),
                "--meters",
                str(args.meters),
                "--delay",
                str(args.delay / 1000),
            ]
        )
        try:
            wait_for_port(sim_port)
            devices = [
                DeviceSettings.model_validate(
                    {
                        "id": m.devid,
                        "pin": m.pin,
                        "host": f"{LOOPBACK}:{sim_port}",
                        "extended": True,
                        "topic": f"m{i}",
                    }
                )
                for i, m in enumerate(make_fleet(args.meters, phases=3, extended=True, first_id=FIRST_ID))
            ]
            run(devices, broker.port, "attribute_and_json", args.homeassistant, until=1.0)
            total, keys = retained_under(broker.port)
            print(f"after the default output: {total} retained under {BASE}/+/+, {keys} of them B/D/KEY")
            for label in ("switch", "steady"):
                result = run(devices, broker.port, "json", args.homeassistant, until=None)
                print(f"json start ({label}):", json.dumps(result))
        finally:
            sim.terminate()
            sim.wait(10)
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
