"""The benchmark's bridge process: `smartmac-bridge run` plus the schedule-lag record.

    python bench/_bridge.py --config CONFIG --out RESULT.json

Builds the bridge from the config file as `run` does (an external broker is required),
sets ``bridge.lags = []`` (a bridge that records lag appends the start delay of every
request it starts, in seconds), and runs until SIGTERM or SIGINT. SIGUSR1 marks the end
of the warm-up: only lags recorded after it are written. Then writes JSON:
``{"lags": [...], "lags_before_mark": n, "threads": n}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bridge.config import load_settings
from bridge.service import Bridge


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    settings = load_settings(args.config)
    if settings.mqtt.host is None:
        raise SystemExit("the benchmark bridge needs mqtt.host (no embedded broker)")
    stop = threading.Event()
    mark: list[int] = []
    bridge = Bridge(settings.devices, settings.mqtt, host=settings.mqtt.host, port=settings.mqtt.port)
    bridge.lags = []  # type: ignore[attr-defined]  # filled by bridges that record lag
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: mark.append(len(bridge.lags)))  # type: ignore[attr-defined]
    bridge.start()
    try:
        while not stop.wait(1.0):
            pass
        threads = threading.active_count()
    finally:
        bridge.stop()
    lags = list(bridge.lags)  # type: ignore[attr-defined]
    start = mark[0] if mark else 0
    result = {"lags": lags[start:], "lags_before_mark": start, "threads": threads}
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
