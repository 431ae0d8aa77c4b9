"""PURE: which data keys a meter stopped sending, so every per-key cache can forget them.

Every per-key structure (topic encodings, the retained memory, the counter guard, the
on_change filter, ...) would otherwise grow with every key name a meter ever sent: a
firmware bug or a man in the middle that invents names on each read would grow the bridge
(and, through the retained topics, the broker) without limit. A key absent from
FORGET_AFTER good reads in a row is forgotten; with at most MAX_KEYS keys per answer
(readings.py) the memory per meter is then bounded.

A one-read gap (one answer without a key) forgets nothing: firmware has been seen to drop
a value from single answers.
"""

from __future__ import annotations

from collections.abc import Iterable

#: Consecutive good reads without a key after which it is forgotten.
FORGET_AFTER = 3


class KeyTracker:
    """The keys of one meter's recent good reads, and how long each one has been missing."""

    __slots__ = ("_after", "_known", "_last", "_missing")

    def __init__(self, after: int = FORGET_AFTER) -> None:
        if after < 1:
            raise ValueError("after must be at least 1 read")
        self._after = after
        self._last: tuple[str, ...] | None = None
        self._known: set[str] = set()
        self._missing: dict[str, int] = {}  # known key -> good reads in a row without it

    def update(self, keys: Iterable[str]) -> list[str]:
        """One good read with these keys: the keys to forget now (absent `after` reads)."""
        keys = tuple(keys)
        if keys == self._last and not self._missing:
            return []  # the common case: the same keys as last time, nothing pending
        self._last = keys
        present = set(keys)
        missing = self._missing
        forgotten: list[str] = []
        for key in self._known - present:
            count = missing.get(key, 0) + 1
            if count >= self._after:
                forgotten.append(key)
                del missing[key]
            else:
                missing[key] = count
        for key in present:
            missing.pop(key, None)  # back before its time: its count starts again
        self._known = present | missing.keys()
        return sorted(forgotten)
