"""PURE: when may each meter be asked next?

Two rules, both per meter:
- polls follow the meter's interval;
- no two requests (polls and commands alike) start closer than the model's minimum gap plus
  GUARD, and a request never starts while the previous one is still running.

A pending command asks for the earliest moment the gap allows, and that request stands in
for the next poll. Time is passed in (`now`), never read here, so tests move the clock.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

#: Seconds added to every minimum gap. The meter measures the gap between *arrivals*;
#: network jitter may shorten it by a few ms, and a 429 costs a whole slot.
GUARD = 0.05

K = TypeVar("K", bound=Hashable)


@dataclass(slots=True)
class Timing:
    """The scheduling state of one meter."""

    interval: float
    gap: float
    """The model's minimum gap plus GUARD."""
    planned: float
    """When the next poll is planned (lag is measured against this)."""
    last_start: float = float("-inf")
    """When the last request counts as started for the gap (see Scheduler.finished)."""
    in_flight: bool = False
    urgent: bool = False
    """A command waits: go at the earliest moment the gap allows."""
    hurried: float = float("-inf")
    """When the waiting command arrived: an urgent request is not due before it."""
    version: int = 0
    """Bumped whenever the due time changes, so older heap entries are recognised as stale."""

    def due(self) -> float:
        earliest = self.last_start + self.gap
        # An urgent request is due when its command arrived, or when the gap allows: that,
        # not the long-past poll plan, is what its lag is measured against.
        return max(earliest, self.hurried) if self.urgent else max(self.planned, earliest)


class Scheduler(Generic[K]):
    """A heap of meters ordered by the time their next request is due."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, K]] = []
        self._timing: dict[K, Timing] = {}
        self._tiebreak = itertools.count()

    def add(self, key: K, *, interval: float, min_gap: float, now: float) -> None:
        """Register a meter; its first poll is due at once."""
        timing = Timing(interval=interval, gap=min_gap + GUARD, planned=now)
        self._timing[key] = timing
        self._push(key, timing)

    def timing(self, key: K) -> Timing:
        return self._timing[key]

    def next_due(self) -> float | None:
        """The earliest due time of any meter not in flight, or None."""
        heap = self._heap
        while heap:
            due, _, version, key = heap[0]
            timing = self._timing[key]
            if version == timing.version and not timing.in_flight:
                return due
            heapq.heappop(heap)  # stale: superseded by a newer entry
        return None

    def pop_due(self, now: float) -> list[tuple[K, float]]:
        """Meters due at `now`, marked in flight, with their planned start time."""
        ready: list[tuple[K, float]] = []
        while (due := self.next_due()) is not None and due <= now:
            _, _, _, key = heapq.heappop(self._heap)
            timing = self._timing[key]
            timing.in_flight = True
            ready.append((key, due))
        return ready

    def finished(self, key: K, started: float, ended: float, *, command: bool = False) -> None:
        """The request that ran from `started` to `ended` (monotonic) is over; plan the next.

        The meter counts its gap from when a request *arrives*, which is somewhere between
        our start and the answer (later than the start if a SYN was lost, say). Counting
        ours from max(started, ended - GUARD), and starting the next one a gap plus GUARD
        after that, puts the next arrival at least a full gap after this one whatever the
        network did; a fast answer costs nothing, a slow one shifts that meter's cadence.

        `command`: the request carried a relay command. It stands in for the next poll, so
        the cadence restarts from it."""
        timing = self._timing[key]
        timing.in_flight = False
        timing.last_start = max(started, ended - GUARD)
        if command:
            timing.planned = started + timing.interval
        else:
            # Keep the cadence when on time; when late, never plan inside the gap (the lag
            # would otherwise grow by GUARD every cycle on a meter polled at its minimum).
            timing.planned = max(timing.planned + timing.interval, timing.last_start + timing.gap)
        self._push(key, timing)

    def hurry(self, key: K, now: float) -> None:
        """A command arrived at `now`: make the meter due at the earliest allowed moment."""
        timing = self._timing[key]
        if timing.urgent:
            return
        timing.urgent = True
        timing.hurried = now
        if not timing.in_flight:
            self._push(key, timing)

    def settle(self, key: K) -> None:
        """No command waits any more: back to the poll cadence."""
        timing = self._timing[key]
        if timing.urgent:
            timing.urgent = False
            if not timing.in_flight:
                self._push(key, timing)

    def _push(self, key: K, timing: Timing) -> None:
        timing.version += 1
        heapq.heappush(self._heap, (timing.due(), next(self._tiebreak), timing.version, key))
