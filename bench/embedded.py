"""The embedded amqtt broker on its own thread, or on the bridge's loop: which costs less?

    python bench/embedded.py --meters 300 --seconds 30 --mode thread|shared

Starts the simulator (its own process) with N extended meters, then in this process the
embedded broker and the bridge: `thread` with EmbeddedBroker.start() (its own thread and
loop), `shared` with the broker on the bridge's loop, as `run` does. A subscriber to
'smartmac/#' in its own process (mosquitto_sub, else paho) makes the broker route every
message. Prints one JSON line: CPU of this process per poll, and the schedule lag (the
bridge's `lags`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bench._simulator import fleet
from bench.fleet import start_simulator
from bench.support import LOOPBACK, free_port, percentile, wait_for_port
from bridge.broker import EmbeddedBroker, amqtt_config
from bridge.config import DeviceSettings, MqttSettings
from bridge.service import Bridge


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meters", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=8.0)
    parser.add_argument("--mode", choices=("thread", "shared"), required=True)
    args = parser.parse_args()
    args.delay, args.commands, args.command_delay = 100.0, 0, 20.0
    with tempfile.TemporaryDirectory() as tmp:
        sim, sim_port = start_simulator(Path(tmp), args)
        try:
            print(json.dumps(run(args, sim_port)))
        finally:
            sim.stop()
    return 0


def run(args: argparse.Namespace, sim_port: int) -> dict[str, object]:
    port = free_port()
    main_meters, _ = fleet(args.meters, 0, 0.0)
    devices = [
        DeviceSettings.model_validate(
            {
                "id": m.devid,
                "pin": m.pin,
                "host": f"{LOOPBACK}:{sim_port}",
                "topic": f"m{i:05d}",
                "extended": True,
            }
        )
        for i, m in enumerate(main_meters)
    ]
    bridge = Bridge(devices, MqttSettings(), host=LOOPBACK, port=port)
    bridge.lags = []
    broker = None
    thread = None
    if args.mode == "thread":
        broker = EmbeddedBroker(LOOPBACK, port).start()
        bridge.start()
    else:
        thread = threading.Thread(target=asyncio.run, args=(shared(bridge, port),), daemon=True)
        thread.start()
        wait_for_port(port)
    # A subscriber in its own process, so the broker routes every message (and this
    # process's CPU is the bridge's and the broker's only).
    sub = subprocess.Popen(
        (["mosquitto_sub", "-h", LOOPBACK, "-p", str(port), "-t", "smartmac/#"]
         if shutil.which("mosquitto_sub") else [sys.executable, "-c", _PAHO_SUB, str(port)]),
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(args.warmup)  # a benchmark's window, not a test's wait
    start_cpu, start_polls = cpu(), len(bridge.lags)
    time.sleep(args.seconds)
    used, polls = cpu() - start_cpu, len(bridge.lags) - start_polls
    lags = sorted(bridge.lags[start_polls:])
    sub.terminate()
    bridge.stop()
    if broker is not None:
        broker.stop()
    return {
        "mode": args.mode,
        "meters": args.meters,
        "polls_per_s": round(polls / args.seconds, 1),
        "cpu_ms_per_poll": round(1000 * used / max(polls, 1), 3),
        "lag_p50_ms": round(1000 * percentile(lags, 50), 1),
        "lag_p99_ms": round(1000 * percentile(lags, 99), 1),
        "lag_max_ms": round(1000 * lags[-1], 1) if lags else None,
    }


async def shared(bridge: Bridge, port: int) -> None:
    """amqtt's broker and the bridge on one loop."""
    from amqtt.broker import Broker

    broker = Broker(amqtt_config(LOOPBACK, port))
    await broker.start()
    await bridge.run()


_PAHO_SUB = """
import sys
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
client = paho.Client(CallbackAPIVersion.VERSION2)
client.on_connect = lambda c, *a: c.subscribe("smartmac/#")
client.connect("127.0.0.1", int(sys.argv[1]))
client.loop_forever(retry_first_connection=True)
"""


def cpu() -> float:
    times = os.times()
    return times.user + times.system


if __name__ == "__main__":
    sys.exit(main())
