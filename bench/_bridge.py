"""The benchmark's bridge process: `smartmac-bridge run` plus the schedule-lag record.

    python bench/_bridge.py --config CONFIG --out RESULT.json

Builds the bridge from the config file as `run` does (`build_bridge`; an external broker
is required; with `http.port` set, also the HTTP server on the bridge's loop, as `run`
serves it), sets ``bridge.lags = []`` (the bridge appends the start delay of every
request it starts, in seconds), and runs until SIGTERM or SIGINT. SIGUSR1 marks the end
of the warm-up: only lags recorded after it are written. Then writes JSON:
``{"lags": [...], "lags_before_mark": n, "threads": n}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bridge.__main__ import build_bridge
from bridge.config import load_settings
from bridge.service import Bridge

if TYPE_CHECKING:
    from bridge.web import WebServer


def on_loop(bridge: Bridge, work: Coroutine[object, object, None]) -> None:
    """Run `work` on the (running) bridge's loop and wait for it; its error raises here."""
    loop = bridge._loop  # set once start() returned; the bench reaches in, the bridge need not
    assert loop is not None
    asyncio.run_coroutine_threadsafe(work, loop).result(30)


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
    # The same path as `run`: every setting (publish, homeassistant, ...) reaches the bridge.
    bridge = build_bridge(settings, settings.devices)  # mqtt.host: one broker or a list
    bridge.lags = []
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: mark.append(len(bridge.lags or ())))
    bridge.start()
    web: WebServer | None = None
    if settings.http.port is not None:
        from bridge.web import WebServer  # (aiohttp only where served: the RSS figure)

        # The HTTP server on the bridge's own loop, as `run` serves it (a taken port raises
        # here, before the benchmark measures anything).
        web = WebServer(bridge, settings.http)
        on_loop(bridge, web.start())
    try:
        while not stop.wait(1.0):
            pass
        threads = threading.active_count()
    finally:
        if web is not None:
            on_loop(bridge, web.close())
        bridge.stop()
    lags = list(bridge.lags or ())
    start = mark[0] if mark else 0
    result = {"lags": lags[start:], "lags_before_mark": start, "threads": threads}
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
