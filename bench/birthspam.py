"""Birth-spam benchmark (issue 12, item 3): polls under a flood of Home Assistant births.

One run starts, each as its own process on free loopback ports: mosquitto, the simulator
(--meters extended 3-phase meters) and the bridge (discovery on). After --warmup seconds
(long enough for the first polls, the ghost scan and the 10 s since its re-announce) it
publishes --births `online` messages to homeassistant/status, evenly over --spread
seconds, and watches --window seconds from the first birth. It prints a table and one
JSON line; no assertions:

- messages a subscriber on smartmac/# and homeassistant/# received from the first birth
  on: discovery configs (only a re-announce sends them), counted until none came for 3 s
  after the window, and when the last one came; and the rest, up to the window's end (the
  polls' own state included, the births themselves not);
- per meter, the gaps between the requests that reached the simulator in the window (the
  last one open until the window's end): max, p99 and p50 over all meters, and how many
  meters waited longer than the interval plus 1 s, or than 12 s;
- the bridge's schedule lag (``bridge.lags``) p99 and max over the window.

    python bench/birthspam.py                      # 300 meters, 300 births in 3 s
    python bench/birthspam.py --meters 100 --births 50 --spread 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench._simulator import fleet
from bench.fleet import (
    INTERVAL,
    bridge_config,
    spawn,
    start_mosquitto,
    start_simulator,
    started,
)
from bench.support import LOOPBACK, gaps, percentile

STATUS = "homeassistant/status"
SLIP = 1.0  # the promise: no poll starts more than this late
DRAIN_QUIET = 3.0  # seconds without a config after which the subscriber has them all
DRAIN_MAX = 90.0


class Subscriber:
    """Counts what arrives on smartmac/# and homeassistant/#, configs apart."""

    def __init__(self, port: int) -> None:
        self.configs = 0
        self.others = 0
        self.last = time.monotonic()
        self._lock = threading.Lock()
        subscribed = threading.Event()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-spam-sub-{uuid.uuid4().hex[:8]}")
        client.on_connect = lambda c, *a: c.subscribe([("smartmac/#", 0), ("homeassistant/#", 0)])
        client.on_subscribe = lambda *a: subscribed.set()
        client.on_message = self._on_message
        client.connect(LOOPBACK, port)
        client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("the subscriber could not subscribe")
        self._client = client

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        with self._lock:
            if msg.topic.endswith("/config"):
                self.last = time.monotonic()
                self.configs += 1
            elif msg.topic != STATUS:
                self.others += 1

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.configs, self.others

    def drained(self) -> float:
        """Wait until no config came for DRAIN_QUIET s (at most DRAIN_MAX); when the last did."""
        deadline = time.monotonic() + DRAIN_MAX
        while time.monotonic() < deadline:
            with self._lock:
                last = self.last
            if time.monotonic() - last >= DRAIN_QUIET:
                break
            time.sleep(0.2)  # a quiet spell has no event to wait on
        with self._lock:
            return self.last

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def births(port: int, count: int, spread: float) -> float:
    """Publish `count` births evenly over `spread` s; when the first went out."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-spam-ha-{uuid.uuid4().hex[:8]}")
    client.connect(LOOPBACK, port)
    client.loop_start()
    began = time.monotonic()
    try:
        for i in range(count):
            client.publish(STATUS, b"online", qos=1).wait_for_publish(5)
            time.sleep(max(0.0, began + (i + 1) * spread / count - time.monotonic()))  # the pace
    finally:
        client.disconnect()
        client.loop_stop()
    return began


def gap_figures(times: dict[str, list[float]], devids: list[str], start: float, end: float) -> dict[str, Any]:
    """Gaps between requests of each meter that end in [start, end]; the last one open."""
    all_gaps: list[float] = []
    worst: list[float] = []
    for devid in devids:
        arrivals = times.get(devid, [])
        before = [t for t in arrivals if t < start]
        inside = [t for t in arrivals if start <= t <= end]
        points = before[-1:] + inside
        meter_gaps = gaps(points)
        if points:
            meter_gaps.append(end - points[-1])  # still waiting at the window's end
        all_gaps += meter_gaps
        worst.append(max(meter_gaps, default=end - start))
    all_gaps.sort()
    return {
        "gap_p50_s": round(percentile(all_gaps, 50), 2),
        "gap_p99_s": round(percentile(all_gaps, 99), 2),
        "gap_max_s": round(max(all_gaps, default=float("nan")), 2),
        "meters_gap_over_interval_plus_1s": sum(1 for g in worst if g > INTERVAL + SLIP),
        "meters_gap_over_12s": sum(1 for g in worst if g > 12.0),
    }


def run(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="birthspam-"))
    figures: dict[str, Any] = {"meters": args.meters, "births": args.births, "spread_s": args.spread}
    with ExitStack() as stack:
        mosquitto, broker_port = start_mosquitto(tmp)
        stack.enter_context(started(mosquitto))
        times_file = tmp / "times.json"
        config_args = argparse.Namespace(
            meters=args.meters, delay=args.delay, commands=0, command_delay=0.0, qos=0, publish=None
        )
        simulator, sim_port = start_simulator(tmp, config_args, times=times_file)
        stack.enter_context(started(simulator))
        subscriber = Subscriber(broker_port)
        stack.callback(subscriber.stop)
        config = bridge_config(tmp, config_args, broker_port, sim_port)
        out = tmp / "bridge-result.json"
        bridge = spawn("bridge", [
            sys.executable, str(ROOT / "bench" / "_bridge.py"), "--config", str(config), "--out", str(out),
        ], tmp / "bridge.log")  # fmt: skip
        stack.enter_context(started(bridge))
        log(f"started {args.meters} meters; warming up {args.warmup:g} s")
        time.sleep(args.warmup)  # a window of time: nothing to wait on
        if bridge.popen.poll() is not None:
            raise RuntimeError(f"the bridge exited early; see {tmp}")

        before = subscriber.counts()
        bridge.popen.send_signal(signal.SIGUSR1)  # lags from here on
        log(f"publishing {args.births} births over {args.spread:g} s")
        began = births(broker_port, args.births, args.spread)
        time.sleep(max(0.0, began + args.window - time.monotonic()))
        window_end = time.monotonic()
        in_window = subscriber.counts()
        log("window over; waiting for the subscriber to drain")
        last = subscriber.drained()
        after = subscriber.counts()
        if bridge.stop() != 0:
            raise RuntimeError(f"the bridge did not exit cleanly; see {tmp / 'bridge.log'}")
        simulator.stop()
        lags = sorted(json.loads(out.read_text())["lags"])
        times = json.loads(times_file.read_text())

    devids = [m.devid for m in fleet(args.meters, 0, 0.0)[0]]
    figures["window_s"] = round(window_end - began, 1)
    figures["config_messages"] = after[0] - before[0]
    figures["other_messages"] = in_window[1] - before[1]
    figures["last_config_after_s"] = round(max(0.0, last - began), 1)
    figures.update(gap_figures(times, devids, began, window_end))
    figures["lag_p99_ms"] = round(percentile(lags, 99) * 1000, 1) if lags else None
    figures["lag_max_ms"] = round(lags[-1] * 1000, 1) if lags else None
    if args.keep:
        log(f"logs and results kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return figures


_LABELS = [
    ("config_messages", "discovery configs received"),
    ("other_messages", "other messages received in the window"),
    ("last_config_after_s", "last config after first birth, s"),
    ("gap_p50_s", "poll gap p50, s"),
    ("gap_p99_s", "poll gap p99, s"),
    ("gap_max_s", "poll gap max, s"),
    ("meters_gap_over_interval_plus_1s", f"meters with a gap > {INTERVAL + SLIP:g} s"),
    ("meters_gap_over_12s", "meters with a gap > 12 s"),
    ("lag_p99_ms", "schedule lag p99, ms"),
    ("lag_max_ms", "schedule lag max, ms"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meters", type=int, default=300, help="extended meters (default 300)")
    parser.add_argument("--births", type=int, default=300, help="birth messages (default 300)")
    parser.add_argument("--spread", type=float, default=3.0, help="seconds the births take (default 3)")
    parser.add_argument(
        "--window", type=float, default=20.0, help="seconds watched from the first birth (default 20)"
    )
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds before the births (default 15)")
    parser.add_argument(
        "--delay", type=float, default=100.0, metavar="MS", help="meter answer delay (default 100)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the run's directory (logs, times)")
    args = parser.parse_args(argv)
    if args.meters < 1 or args.births < 1 or args.spread <= 0 or args.window <= args.spread:
        parser.error("--meters and --births at least 1, --spread positive, --window longer than --spread")
    if shutil.which("mosquitto") is None:
        parser.error("mosquitto is not on PATH (apt-get install mosquitto)")

    def log(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    figures = run(args, log)
    print(
        f"{args.meters} extended meters (interval {INTERVAL:g} s), {args.births} births over "
        f"{args.spread:g} s, {figures['window_s']:g} s watched from the first birth; code at {ROOT}"
    )
    width = max(len(label) for _, label in _LABELS)
    for key, label in _LABELS:
        value = figures.get(key)
        print(f"{label.ljust(width)}  {'n/a' if value is None else value}")
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
