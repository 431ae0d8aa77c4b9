"""What one /metrics scrape and one /api/meters answer cost the bridge's loop, in isolation.

    python bench/httpcost.py --meters 2000 --repeat 20

Builds the bridge as `run` does for N extended 3-phase meters (nothing started: no loop,
no broker), gives every meter a good read of a simulated meter's body (22 readings, a
relay, request counts), then times what the HTTP handlers do on the loop: the /metrics
text (the collector and prometheus-client's generate_latest) and the /api/meters JSON (the
rows and json.dumps), each `--repeat` times, as CPU time of this process (the handlers run
on the bridge's one loop: for that long, no meter is polled). Prints one line per answer:
median, min and max ms, and the body size, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bench._simulator import fleet
from bridge.__main__ import build_bridge
from bridge.config import Settings
from bridge.metrics import exposition
from bridge.readings import parse_body
from bridge.service import Bridge
from bridge.simulator import _render
from bridge.status import RESULTS
from bridge.topics import Relay
from bridge.web import WebServer


def loaded_bridge(meters: int) -> Bridge:
    """A bridge of `meters` extended meters, each with a good read as the fleet's send."""
    sims, _ = fleet(meters, 0, 0.0)
    devices = [
        {"id": m.devid, "pin": m.pin, "host": "127.0.0.1:9", "topic": f"m{i:05d}", "extended": True}
        for i, m in enumerate(sims)
    ]
    settings = Settings.model_validate(
        {"mqtt": {"host": "127.0.0.1", "port": 1883}, "devices": devices, "http": {"port": 8099}}
    )
    bridge = build_bridge(settings, settings.devices, host="127.0.0.1", port=1883)
    now = time.time()
    for i, (meter, sim) in enumerate(zip(bridge.meters, sims, strict=True)):
        meter.last = parse_body(_render(sim, ""))
        meter.health.good()
        meter.relay = Relay.ON if i % 2 else Relay.OFF
        meter.last_read = now
        meter.requests.update({RESULTS[0]: 100 + i, RESULTS[1]: i % 3})
    return bridge


def timed(work: Callable[[], bytes], repeat: int) -> tuple[list[float], int]:
    """CPU ms of each call of `work`, and the size of what it returned."""
    times, size = [], 0
    for _ in range(repeat):
        started = time.process_time()
        body = work()
        times.append((time.process_time() - started) * 1000)
        size = len(body)
    return times, size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meters", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)
    bridge = loaded_bridge(args.meters)
    settings = Settings.model_validate({"mqtt": {"host": "127.0.0.1"}, "http": {"port": 8099}})
    server = WebServer(bridge, settings.http)
    loop = asyncio.new_event_loop()

    metrics = exposition(bridge)  # what WebServer.start() builds

    def api_meters() -> bytes:
        answer = loop.run_until_complete(server._meters(None))  # type: ignore[arg-type]
        assert answer.body is not None and isinstance(answer.body, bytes)
        return answer.body

    record: dict[str, object] = {"meters": args.meters, "repeat": args.repeat}
    for name, work in (("/metrics", metrics), ("/api/meters", api_meters)):
        times, size = timed(work, args.repeat)
        figures = {
            "ms_median": round(statistics.median(times), 1),
            "ms_min": round(min(times), 1),
            "ms_max": round(max(times), 1),
            "kb": round(size / 1024, 1),
        }
        record[name] = figures
        print(
            f"{name}: {figures['ms_median']} ms CPU median ({figures['ms_min']}-{figures['ms_max']}), "
            f"{figures['kb']} KiB, at {args.meters} meters",
            file=sys.stderr,
        )
    loop.close()
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
