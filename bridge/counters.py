"""PURE: energy counters never go down on MQTT.

Meters have been seen to report a counter 1000 times too small after a power cut and then
come back (Wh1 467556 -> 467.555 -> 467556; homeassistant-smart-maic issue #30). Home
Assistant's `total_increasing` reads such a dip as a meter reset and the return as a huge
consumption. So a counter value lower than the last one published is held back (the last
good reading is published in its place) until the meter reports a lower value in
CONFIRM_READS consecutive reads: then it is a real reset (a replaced meter, a cleared
counter) and is published.

One CounterGuard per meter; it sees only good reads. It returns what to log instead of
logging, so it stays pure: one WARNING when a drop is first seen (per read, naming every
key that dropped), INFO when the drop is accepted as a reset or turns out a glitch.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace

from .readings import Reading, Snapshot

#: Consecutive lower reads after which a drop is accepted as a real reset.
CONFIRM_READS = 3

# Wh, rWh, TWh, rTWh and their phase digits (Wh1, rWh3, TWh).
_COUNTER = re.compile(r"r?T?Wh\d*")


def is_counter(key: str) -> bool:
    return _COUNTER.fullmatch(key) is not None


@dataclass(slots=True)
class _Hold:
    seen: int
    """Consecutive reads lower than the last good value, this one included."""


@dataclass(frozen=True, slots=True)
class Guarded:
    """The readings to publish, and what to log about them."""

    snapshot: Snapshot
    log: tuple[tuple[int, str], ...] = ()
    """(logging level, message) pairs, without the meter's name."""
    held: tuple[str, ...] = ()
    """Keys whose published value is the last good one instead of what the meter said."""


@dataclass(slots=True)
class CounterGuard:
    """Holds back counter drops of one meter until CONFIRM_READS reads in a row agree."""

    confirm: int = CONFIRM_READS
    _good: dict[str, Reading] = field(default_factory=dict)
    _holds: dict[str, _Hold] = field(default_factory=dict)
    # Counter-ness per key: the regex once per key, not once per key per poll.
    _kinds: dict[str, bool] = field(default_factory=dict)

    def apply(self, snap: Snapshot) -> Guarded:
        readings: list[Reading] | None = None  # copied only when something is held
        started: list[str] = []
        log: list[tuple[int, str]] = []
        held: list[str] = []
        for index, reading in enumerate(snap.readings):
            key = reading.key
            counter = self._kinds.get(key)
            if counter is None:
                counter = self._kinds[key] = is_counter(key)
            if not counter:
                continue
            good = self._good.get(key)
            if good is None or reading.value >= good.value:
                self._good[key] = reading
                if self._holds.pop(key, None) is not None:
                    text = f"{key} is back at {reading.text}: the drop was a glitch"
                    log.append((logging.INFO, text))
                continue
            hold = self._holds.get(key)
            if hold is None:
                hold = self._holds[key] = _Hold(0)
                started.append(f"{key} {good.text} -> {reading.text}")
            hold.seen += 1
            if hold.seen >= self.confirm:
                del self._holds[key]
                self._good[key] = reading
                text = (
                    f"{key} reported {reading.text} in {hold.seen} reads in a row: "
                    f"accepted as a counter reset (was {good.text})"
                )
                log.append((logging.INFO, text))
                continue
            if readings is None:
                readings = list(snap.readings)
            readings[index] = good
            held.append(key)
        if started:
            log.insert(
                0,
                (
                    logging.WARNING,
                    "energy counter went down: " + ", ".join(started) + "; publishing the last "
                    f"good value until {self.confirm} reads in a row agree",
                ),
            )
        if readings is not None:
            snap = replace(snap, readings=tuple(readings))
        return Guarded(snap, tuple(log), tuple(held))

    def forget(self, key: str) -> None:
        """The meter stopped sending the key (see keyset.py): drop all it knows of it."""
        self._good.pop(key, None)
        self._holds.pop(key, None)
        self._kinds.pop(key, None)
