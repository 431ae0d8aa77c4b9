"""Page benchmark (issue 10): how long the status page takes in chromium at N meters.

Starts, each as its own process on free loopback ports: mosquitto, the simulator
(`python -m bridge simulate --devices N --phases 3 --extended`) and the bridge
(`python -m bridge run` with http.port), waits until the bridge has read every meter once,
then opens the page in headless chromium and prints a table and one JSON line:

- first full list: navigation start to N rows in the document (performance.now() when a
  MutationObserver sees the Nth row), and to the frame after it (style, layout and paint
  done), and the JavaScript cost of that first render (window.lastRenderMs);
- the update cost per refresh (every 2 s) over --refreshes refreshes: window.lastRenderMs
  (the page's own update, in place) median and max, and the same plus the frame that follows
  (the browser's style/layout/paint of what changed); and api/meters' size and fetch time;
- the filter box: one input event, filter applied and layout done (forced), for a term that
  matches one row, a prefix that matches up to 100 (m000), and clearing it (all rows back).

    python bench/page.py --meters 2000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bench.browser import chromium, missing
from bench.fleet import Proc, spawn, start_mosquitto, started
from bench.support import LOOPBACK, free_port, wait_for_port
from bridge.simulator import make_fleet

#: Installed before the page's own script runs (Chrome DevTools' addScriptToEvaluateOnNewDocument).
_INSTRUMENT = """
(() => {
  const want = %d;
  window.__renders = [];
  let value;
  Object.defineProperty(window, "lastRenderMs", {
    configurable: true,
    get() { return value; },
    set(ms) {
      value = ms;
      const entry = {ms: ms, at: performance.now(), frame: null};
      window.__renders.push(entry);
      // The first task after the next frame: style, layout and paint of the update are done.
      requestAnimationFrame(() => setTimeout(() => { entry.frame = performance.now() - entry.at; }));
    },
  });
  const watch = new MutationObserver(() => {
    if (document.querySelectorAll("[data-meter]").length < want) return;
    watch.disconnect();
    window.__fullAt = performance.now();
    requestAnimationFrame(() => setTimeout(() => { window.__paintedAt = performance.now(); }));
  });
  watch.observe(document, {childList: true, subtree: true});
})();
"""

_FILTER = """
const box = document.getElementById("filter");
const started = performance.now();
box.value = arguments[0];
box.dispatchEvent(new Event("input"));
const applied = performance.now();
void document.body.offsetHeight;  // force style and layout now
const laidOut = performance.now();
const shown = [...document.querySelectorAll("[data-meter]")].filter(r => !r.hidden).length;
return [applied - started, laidOut - started, shown];
"""


def bridge_config(tmp: Path, meters: int, broker_port: int, sim_port: int, http_port: int) -> Path:
    devices = [
        {"id": m.devid, "pin": m.pin, "host": f"{LOOPBACK}:{sim_port}", "extended": True,
         "topic": f"m{i:05d}", "name": f"Meter {i:05d}", "timeout": 5}
        for i, m in enumerate(make_fleet(meters, phases=3, extended=True))
    ]  # fmt: skip
    config = {
        "mqtt": {"host": LOOPBACK, "port": broker_port, "client_id": "bench-page"},
        "http": {"host": LOOPBACK, "port": http_port},
        "devices": devices,
    }
    path = tmp / "bridge.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def summary(http_port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{http_port}/api/bridge", timeout=30) as answer:
        found: dict[str, Any] = json.loads(answer.read())
        return found


def measure(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    from selenium.webdriver.support.ui import WebDriverWait

    tmp = Path(tempfile.mkdtemp(prefix="page-"))
    with ExitStack() as stack:
        mosquitto, broker_port = start_mosquitto(tmp)
        stack.enter_context(started(mosquitto))
        sim_port, http_port = free_port(), free_port()
        simulator = spawn(
            "simulator",
            [sys.executable, "-m", "bridge", "simulate", "--devices", str(args.meters), "--phases", "3",
             "--extended", "--port", str(sim_port)],
            tmp / "simulator.log",
        )  # fmt: skip
        stack.enter_context(started(simulator))
        wait_for_port(sim_port, timeout=60)
        config = bridge_config(tmp, args.meters, broker_port, sim_port, http_port)
        bridge: Proc = spawn(
            "bridge",
            [sys.executable, "-m", "bridge", "run", "--config", str(config), "--log-level", "WARNING"],
            tmp / "bridge.log",
        )
        stack.enter_context(started(bridge))
        wait_for_port(http_port, timeout=60)
        # Every meter read once (the first polls are spread over one interval, 6 s): the page
        # then shows what it shows in steady state, not N rows of "unknown".
        deadline = time.monotonic() + 60
        while (state := summary(http_port))["unknown"] and time.monotonic() < deadline:
            time.sleep(0.5)  # no event to wait on from another process
        log(f"bridge: {state['online']} of {state['meters']} meters online; opening the page")

        driver = chromium(args.width, args.height)
        stack.callback(driver.quit)
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": _INSTRUMENT % args.meters})
        driver.get(f"http://{LOOPBACK}:{http_port}/")
        wait = WebDriverWait(driver, args.refreshes * 2 + 60, poll_frequency=0.2)
        wait.until(lambda d: d.execute_script("return window.__paintedAt !== undefined"), "the full list")
        first = driver.execute_script(
            "return [window.__fullAt, window.__paintedAt, window.__renders[0].ms,"
            " document.querySelectorAll('[data-meter]').length]"
        )
        log(f"page: {first[3]} rows after {first[0]:.0f} ms; watching {args.refreshes} refreshes")
        wait.until(
            lambda d: d.execute_script(
                "const r = window.__renders;"
                " return r.length > arguments[0] && r[r.length - 1].frame !== null",
                args.refreshes,
            ),
            "the refreshes",
        )
        renders = driver.execute_script("return window.__renders")[1 : args.refreshes + 1]
        fetches = driver.execute_script(
            "return performance.getEntriesByType('resource')"
            ".filter(e => e.name.endsWith('/api/meters')).map(e => [e.duration, e.encodedBodySize])"
        )
        filters = {
            name: driver.execute_script(_FILTER, term)
            for name, term in (("one", f"m{args.meters - 1:05d}"), ("prefix", "m000"), ("clear", ""))
        }
    shutil.rmtree(tmp, ignore_errors=True)

    updates = [r["ms"] for r in renders]
    frames = [r["ms"] + r["frame"] for r in renders]
    durations = [f[0] for f in fetches[1:]] or [f[0] for f in fetches]
    return {
        "meters": args.meters,
        "rows": first[3],
        "first_list_ms": round(first[0]),
        "first_painted_ms": round(first[1]),
        "first_render_js_ms": round(first[2], 1),
        "refreshes": len(updates),
        "update_p50_ms": round(statistics.median(updates), 1),
        "update_max_ms": round(max(updates), 1),
        "update_frame_p50_ms": round(statistics.median(frames), 1),
        "update_frame_max_ms": round(max(frames), 1),
        "api_meters_kb": round(fetches[-1][1] / 1024),
        "api_meters_fetch_p50_ms": round(statistics.median(durations), 1),
        **{f"filter_{name}_ms": round(value[1], 1) for name, value in filters.items()},
        **{f"filter_{name}_rows": value[2] for name, value in filters.items()},
        "window": f"{args.width}x{args.height}",
        "cores": os.cpu_count(),
        "chromium": driver.capabilities.get("browserVersion"),
    }


_LABELS = [
    ("rows", "rows"),
    ("first_list_ms", "first full list, ms from navigation"),
    ("first_painted_ms", "first full list painted, ms"),
    ("first_render_js_ms", "first render, page JS ms"),
    ("update_p50_ms", "update per refresh p50 ms"),
    ("update_max_ms", "update per refresh max ms"),
    ("update_frame_p50_ms", "update + next frame p50 ms"),
    ("update_frame_max_ms", "update + next frame max ms"),
    ("api_meters_kb", "api/meters body KB"),
    ("api_meters_fetch_p50_ms", "api/meters fetch p50 ms"),
    ("filter_one_ms", "filter to 1 row, ms"),
    ("filter_prefix_ms", "filter to m000*, ms"),
    ("filter_clear_ms", "clear the filter, ms"),
]


def render(figures: dict[str, Any]) -> str:
    lines = [
        f"{figures['meters']} extended 3-phase meters, chromium {figures['chromium']} headless, "
        f"window {figures['window']}, {figures['refreshes']} refreshes, {figures['cores']} cores; "
        f"filter rows shown: {figures['filter_one_rows']}, {figures['filter_prefix_rows']}, "
        f"{figures['filter_clear_rows']}"
    ]
    width = max(len(label) for _, label in _LABELS)
    lines += [f"{label.ljust(width)}  {figures[key]}" for key, label in _LABELS]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meters", type=int, default=2000, help="default 2000")
    parser.add_argument("--refreshes", type=int, default=10, help="refreshes measured (default 10)")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    if args.meters < 1 or args.refreshes < 1:
        parser.error("--meters and --refreshes must be at least 1")
    if shutil.which("mosquitto") is None:
        parser.error("mosquitto is not on PATH (apt-get install mosquitto)")
    if (reason := missing()) is not None:
        parser.error(reason)

    def log(text: str) -> None:
        if not args.json_only:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    figures = measure(args, log)
    if not args.json_only:
        print(render(figures))
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
