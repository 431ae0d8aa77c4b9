"""PURE: `publish.mode: on_change`: send a retained topic only when it changed, or at heartbeat.

It runs on every poll of every meter, so it is one dict lookup and one comparison per topic.
A topic is sent when its value differs from the last one sent, or when `heartbeat` seconds
have passed since it was last sent (so a subscriber that missed nothing still sees the
value is alive). Everything retained stays on the broker either way (until its key is
forgotten, see keyset.py).

The meter state JSON carries the meter's own clock (`time`), which changes on every read;
comparing it byte for byte would send it every poll. So the caller may give a topic a
`compare` value instead of its payload: for B/D/state, `state_fingerprint(snapshot)`.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping

from .readings import Snapshot


def state_fingerprint(snap: Snapshot) -> Hashable:
    """What B/D/state depends on, less the meter's clock: every reading and the pout."""
    return snap.pout, tuple([(r.key, r.text) for r in snap.readings])


class ChangeFilter:
    """Remembers, per topic, what was last sent and when."""

    __slots__ = ("_sent", "heartbeat")

    def __init__(self, heartbeat: float) -> None:
        if not heartbeat > 0:
            raise ValueError("heartbeat must be > 0 seconds")
        self.heartbeat = heartbeat
        self._sent: dict[str, tuple[Hashable, float]] = {}

    def select(
        self,
        messages: Iterable[tuple[str, bytes]],
        now: float,
        compare: Mapping[str, Hashable] | None = None,
    ) -> list[tuple[str, bytes]]:
        """The messages to send now; those are recorded as sent at `now`."""
        chosen = []
        sent = self._sent
        heartbeat = self.heartbeat
        for message in messages:
            topic, payload = message
            value = payload if compare is None else compare.get(topic, payload)
            last = sent.get(topic)
            if last is None or last[0] != value or now - last[1] >= heartbeat:
                sent[topic] = (value, now)
                chosen.append(message)
        return chosen

    def forget(self, topics: Iterable[str]) -> None:
        """Topics of keys the meter stopped sending (see keyset.py): drop what was sent."""
        for topic in topics:
            self._sent.pop(topic, None)
