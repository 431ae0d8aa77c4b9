"""PURE: the retained topics another `publish.output` left behind, found at the first connect.

A bridge switched from `attribute_and_json` to `json` publishes no B/D/KEY any more, but the
broker keeps the old retained values for ever: a Node-RED flow on B/D/V1 would read a frozen
value as if it were live. So, like the Home Assistant ghost scan (homeassistant.py), on its
first connection the bridge subscribes to B/+/+ for a moment, keeps the retained messages of
configured meters on topics the current output does not publish, and clears them:

- `json`: B/D/KEY, anything but state, relay and availability;
- `attribute`: B/D/state;
- `attribute_and_json` publishes both kinds: no scan at all (today's start, today's cost).

Only retained messages count: the bridge's own publishes during the scan come back through
the subscription without the retain flag. B/+/+ matches exactly three levels under the base,
so B/D/relay/set and B/D/relay/result are never seen, nor touched.

The scan lasts SCAN_SECONDS, longer while retained messages are still arriving (a fleet
switched from the default holds some 25 retained topics per meter; see README
"Performance" for what 2,000 meters cost), never more than MAX_SCAN_SECONDS. Time is passed
in, never read here.
"""

from __future__ import annotations

from collections.abc import Iterable

from .topics import ATTRIBUTE, ATTRIBUTE_AND_JSON, JSON, RESERVED_KEYS, Output

#: Least seconds the scan listens (the Home Assistant ghost scan's GHOST_SCAN_SECONDS).
SCAN_SECONDS = 2.0
#: The scan goes on while retained messages came within this many seconds...
QUIET_SECONDS = 0.5
#: ...but never longer than this in all: whatever comes later stays for the next start.
MAX_SCAN_SECONDS = 30.0


def stale(output: Output, leaf: str) -> bool:
    """Is a retained B/D/<leaf> of a configured meter one this output does not publish?"""
    if output == JSON:
        return leaf not in RESERVED_KEYS
    if output == ATTRIBUTE:
        return leaf == "state"
    return False


def scan_subscription(base: str, output: Output) -> str | None:
    """What to subscribe to at the first connect, or None: this output needs no scan."""
    return None if output == ATTRIBUTE_AND_JSON else f"{base}/+/+"


class StaleScan:
    """One scan: the stale retained topics seen since `now`, and when it may end."""

    __slots__ = ("_found", "_head", "_last", "_output", "_segments", "_start", "retained", "subscription")

    def __init__(self, base: str, output: Output, segments: Iterable[str], now: float) -> None:
        subscription = scan_subscription(base, output)
        if subscription is None:
            raise ValueError(f"output {output!r} leaves no stale topics: no scan")
        self.subscription = subscription
        self._head = base + "/"
        self._output = output
        self._segments = frozenset(segments)
        self._start = self._last = now
        self._found: set[str] = set()
        self.retained = 0
        """Retained messages the scan received (what it cost)."""

    def message(self, topic: str, payload: bytes, retain: bool, now: float) -> bool:
        """A message from the broker: True if it is one of the scan's (B/+/+), so nobody
        else needs it; a retained stale one is kept for end()."""
        if not topic.startswith(self._head):
            return False
        parts = topic[len(self._head) :].split("/")
        if len(parts) != 2:
            return False
        if retain:
            self.retained += 1
            self._last = now  # retained delivery still going on: wait for the rest
            segment, leaf = parts
            # An empty payload is a clear, not a value (a broker should not send one).
            if payload and segment in self._segments and stale(self._output, leaf):
                self._found.add(topic)
        return True

    def due(self) -> float:
        """When the scan may end: SCAN_SECONDS after its start, later while retained
        messages keep coming, at most MAX_SCAN_SECONDS after its start."""
        return min(
            max(self._start + SCAN_SECONDS, self._last + QUIET_SECONDS), self._start + MAX_SCAN_SECONDS
        )

    def seconds(self, now: float) -> float:
        """How long the scan has listened."""
        return now - self._start

    def end(self) -> list[str]:
        """The stale topics found, sorted: to clear with an empty retained payload."""
        return sorted(self._found)
