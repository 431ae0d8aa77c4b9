"""PURE: what the status page, the API, the metrics and `check` say about a request.

No I/O here: the outcome of a request as one word, the counters and rates the bridge keeps,
and the objects the HTTP API and B/bridge/health answer with, built from plain values.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from typing import Final

from .errors import (
    BodyError,
    MeterAuthError,
    MeterError,
    MeterHTTPError,
    MeterRateLimited,
    MeterTimeout,
)
from .readings import Snapshot

#: Meters an HTTP answer about every meter (/metrics, /api/meters) writes per turn of the
#: bridge's loop, which polls in between: about 9 ms of CPU for /metrics, 3 ms for
#: /api/meters (bench/httpcost.py), where 2,000 at once held the loop for 70 and 23 ms.
TURN_METERS: Final = 250

#: Every value of the `result` label of smartmac_requests_total, in this order.
RESULTS: Final = ("ok", "rate_limited", "timeout", "unreachable", "http_error", "bad_pin", "bad_body")


def request_result(error: MeterError | None) -> str:
    """One of RESULTS: how a request ended (None: a good read)."""
    if error is None:
        return "ok"
    if isinstance(error, MeterRateLimited):
        return "rate_limited"
    if isinstance(error, MeterAuthError):
        return "bad_pin"
    if isinstance(error, MeterHTTPError):
        return "http_error"
    if isinstance(error, BodyError):
        return "bad_body"
    if isinstance(error, MeterTimeout):
        return "timeout"
    return "unreachable"  # MeterUnreachable, and a bug's "internal error"


#: Upper bounds (s) of smartmac_request_duration_seconds' buckets: a LAN meter answers in
#: tens of milliseconds, a struggling one in seconds, and the default deadline is 5 s.
DURATION_BUCKETS: Final = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Request durations in buckets, as Prometheus wants them (cumulative at read time)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), the last bound +inf."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class Rate:
    """Events per second over the last `window` seconds, from samples of a running total
    (one a second is plenty)."""

    __slots__ = ("_samples", "window")

    def __init__(self, window: float = 60.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def sample(self, now: float, total: int) -> None:
        samples = self._samples
        samples.append((now, total))
        # Keep one sample at or before the window's start, so the rate spans all of it.
        while len(samples) > 2 and samples[1][0] <= now - self.window:
            samples.popleft()

    def per_second(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


def available(published: bool | None, failures: int) -> bool | None:
    """The API's `available`: as published on MQTT once decided; before that false after a
    failed request (MQTT waits for 3), null only while no request has ended."""
    if published is not None:
        return published
    return False if failures else None


def availability_word(value: bool | None) -> str:
    """The page's and `check`'s word for `available`."""
    return "unknown" if value is None else "online" if value else "offline"


def total_power(readings: Mapping[str, float]) -> float | None:
    """Total active power (W): the meter's `W`, else the sum of `W1`..`W3` it sent."""
    if "W" in readings:
        return readings["W"]
    phases = [readings[key] for key in ("W1", "W2", "W3") if key in readings]
    return sum(phases) if phases else None


def total_energy(readings: Mapping[str, float]) -> float | None:
    """Total active energy (Wh): the meter's `Wh` or its total `TWh` (the 3-phase model's
    name for it), else the sum of the phase counters `Wh1`..`Wh3` it sent."""
    for key in ("Wh", "TWh"):
        if key in readings:
            return readings[key]
    phases = [readings[key] for key in ("Wh1", "Wh2", "Wh3") if key in readings]
    return sum(phases) if phases else None


def meter_row(
    *,
    devid: str,
    name: str,
    topic: str,
    extended: bool,
    available: bool | None,
    relay: str | None,
    last: Snapshot | None,
    last_read: float | None,
    last_error: str | None,
) -> dict[str, object]:
    """One object of GET /api/meters (README "HTTP API"), plus `power` and `energy` as
    the page shows them. `last` is the last good read as published: counters guarded."""
    readings = {r.key: r.value for r in last.readings} if last is not None else {}
    return {
        "id": devid,
        "name": name,
        "topic": topic,
        "extended": extended,
        "available": available,
        "relay": relay,
        "readings": readings,
        "last_read": last_read,
        "last_error": last_error,
        "power": total_power(readings),
        "energy": total_energy(readings),
    }


def health_payload(
    *,
    uptime: float,
    availabilities: Iterable[bool | None],
    polls_per_s: float,
    requests: Mapping[str, int],
    mqtt_messages_per_s: float,
    rss_mb: float | None,
) -> dict[str, object]:
    """B/bridge/health (README "Topics"); zigbee2mqtt's bridge/health is the model."""
    counts = Counter(availability_word(a) for a in availabilities)
    return {
        "uptime_s": round(uptime),
        "meters": {word: counts[word] for word in ("online", "offline", "unknown")},
        "polls_per_s": round(polls_per_s, 2),
        "requests": {result: requests.get(result, 0) for result in RESULTS},
        "mqtt_messages_per_s": round(mqtt_messages_per_s, 2),
        "rss_mb": None if rss_mb is None else round(rss_mb, 1),
    }
