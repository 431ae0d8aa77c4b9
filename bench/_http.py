"""The HTTP load of `bench/fleet.py --http` (issue 10): one status page open, one scraper.

- `Browser`: a real headless chromium (selenium, Debian's /usr/bin/chromium and
  /usr/bin/chromedriver) with the status page open. The page refreshes itself every 2 s
  (GET api/bridge and api/meters at once, then updates its rows); the answer times are the
  browser's own (Resource Timing: fetch start to the last byte of the body), and the CPU is
  that of chromedriver and every chromium process under it.
- `Poller`: where chromium or selenium is missing, a thread that does what the page's
  refresh does over the wire: GET api/bridge and api/meters every 2 s (one after the other,
  bodies read, JSON parsed: the page's parse stays out of the bridge's CPU either way).
- `Scraper`: GET /metrics at times given in advance (every 15 s over the window, as a
  Prometheus scrape_interval of 15 s would), each timed to the last byte.

Only the standard library but for selenium, imported where the browser is wanted.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from bench import browser
from bench.procstat import cpu_seconds

#: The page's refresh (bridge/page.html's REFRESH_MS).
REFRESH_S = 2.0
#: A Prometheus-style scrape interval.
SCRAPE_S = 15.0


@dataclass(frozen=True)
class Answer:
    """One HTTP answer as a client saw it: the path, seconds to the last byte, body bytes."""

    path: str
    seconds: float
    size: int


def browser_missing() -> str | None:
    """Why the real browser cannot be used here, or None."""
    return browser.missing()


class PageClient(Protocol):
    kind: str

    def mark(self) -> None:
        """From here on: the answers and the CPU counted."""

    def answers(self) -> list[Answer]:
        """The answers since mark()."""

    def cpu_seconds(self) -> float | None:
        """CPU of the client's own processes since mark(); None: it runs in this one."""

    def stop(self) -> None: ...


def _descendants(root: int) -> list[int]:
    """root and every process under it (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text(encoding="ascii", errors="replace")
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _tree_cpu(root: int) -> float:
    total = 0.0
    for pid in _descendants(root):
        with contextlib.suppress(OSError, ValueError):  # gone meanwhile
            total += cpu_seconds(pid)
    return total


class Browser:
    """Headless chromium with the status page at `url` open, its rows rendered."""

    kind = "chromium"

    def __init__(self, url: str, meters: int, *, load_timeout: float = 120.0) -> None:
        self._driver = browser.chromium(1280, 1000)
        self._root = self._driver.service.process.pid
        self._cpu_mark = 0.0
        self._stopped = False
        try:
            self._driver.get(url)
            deadline = time.monotonic() + load_timeout
            while self._rows() < meters:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the page showed {self._rows()} of {meters} rows in {load_timeout:g} s"
                    )
                time.sleep(0.2)  # the page has no event for "rendered" to wait on from here
        except BaseException:
            self.stop()
            raise

    def _rows(self) -> int:
        return int(self._driver.execute_script("return document.querySelectorAll('[data-meter]').length"))

    def mark(self) -> None:
        self._driver.execute_script(
            "performance.setResourceTimingBufferSize(100000); performance.clearResourceTimings();"
        )
        self._cpu_mark = _tree_cpu(self._root)

    def answers(self) -> list[Answer]:
        entries: list[dict[str, Any]] = self._driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => "
            "({name: e.name, duration: e.duration, size: e.encodedBodySize}))"
        )
        return [
            Answer(urlsplit(e["name"]).path, float(e["duration"]) / 1000, int(e["size"])) for e in entries
        ]

    def cpu_seconds(self) -> float | None:
        return _tree_cpu(self._root) - self._cpu_mark

    def render_ms(self) -> float | None:
        """How long the page's last update of its rows took (window.lastRenderMs)."""
        value = self._driver.execute_script("return window.lastRenderMs ?? null")
        return None if value is None else float(value)

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._driver.quit()


class _Fetcher:
    """A daemon thread that GETs and times URLs; its answers (and errors) kept."""

    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._lock = threading.Lock()
        self._answers: list[Answer] = []
        self.errors: list[str] = []

    def _run(self) -> None:
        raise NotImplementedError

    def _fetch(self, url: str, *, parse: bool = False) -> None:
        try:
            started = time.perf_counter()
            with urllib.request.urlopen(url, timeout=30) as answer:
                body = answer.read()
            seconds = time.perf_counter() - started
            if parse:
                json.loads(body)  # as the page does; after the timing, like the browser's
        except (OSError, ValueError) as exc:
            self.errors.append(f"{url}: {exc}")
            return
        with self._lock:
            self._answers.append(Answer(urlsplit(url).path, seconds, len(body)))

    def answers(self) -> list[Answer]:
        with self._lock:
            return list(self._answers)

    def mark(self) -> None:
        with self._lock:
            self._answers.clear()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


class Poller(_Fetcher):
    """What the page's refresh does over the wire, every 2 s, from a thread of this process."""

    kind = "poller"

    def __init__(self, url: str) -> None:
        super().__init__("bench-page-poller")
        self._urls = [url + "api/bridge", url + "api/meters"]
        self._thread.start()

    def _run(self) -> None:
        while True:
            for url in self._urls:
                self._fetch(url, parse=True)
            if self._stop.wait(REFRESH_S):
                return

    def cpu_seconds(self) -> float | None:
        return None


class Scraper(_Fetcher):
    """GET `url` at each of `offsets` (s) after `started_at` (monotonic)."""

    def __init__(self, url: str, started_at: float, offsets: list[float]) -> None:
        super().__init__("bench-scraper")
        self._url, self._at = url, [started_at + o for o in offsets]
        self._thread.start()

    def _run(self) -> None:
        for at in self._at:
            if self._stop.wait(max(0.0, at - time.monotonic())):
                return
            self._fetch(self._url)


def scrape_offsets(seconds: float, every: float = SCRAPE_S) -> list[float]:
    """When to scrape in a window of `seconds`: one every `every` s, each in the middle of
    its share (60 s: 7.5, 22.5, 37.5, 52.5), at least one (a short smoke run)."""
    count = max(1, round(seconds / every))
    return [(i + 0.5) * seconds / count for i in range(count)]
