"""The Home Assistant coordinator: when discovery configs go out, and what else with them.

- A meter's first good read announces it, and so does a read whose keys, names or units
  changed (Discovery.announce compares signatures).
- After the first connect, a ghost scan listens GHOST_SCAN_SECONDS for retained configs of
  this bridge whose meter is no longer configured, and clears them; the meters read
  meanwhile are announced at its end (configs sent during it would all come straight back
  through its subscription).
- A reconnect re-sends every config (the link does not remember them); Home Assistant's
  birth (`<prefix>/status` = online) re-sends configs and state. Requests merge while one
  is pending or running, births at most every 10 s (reannounce.py), and a re-announce goes
  out ANNOUNCE_SLICE meters per turn of the loop, so no poll waits for a fleet's worth.

It runs on the bridge's loop and publishes through the link; the clock is passed in.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .discovery import DeviceInfo, Discovery, Signature, signature
from .readings import Snapshot
from .reannounce import Reannounce
from .topics import OFFLINE, ONLINE, MeterTopics, Relay, state_messages

logger = logging.getLogger(__name__)

#: Seconds the bridge listens for retained discovery configs of meters no longer configured
#: (the broker sends retained messages right after the subscription is acknowledged).
GHOST_SCAN_SECONDS = 2.0
#: Meters a re-announce sends per turn of the loop. One meter's configs and state are some
#: 50 messages and 0.3 ms of CPU: 25 meters keep a turn near 10 ms, so the polls due
#: meanwhile start at most that late, however large the fleet.
ANNOUNCE_SLICE = 25


class Link(Protocol):
    """What the coordinator needs of the MQTT link (mqtt.MqttLink)."""

    def publish_many(self, messages: list[tuple[str, bytes]]) -> None: ...
    def publish_volatile(self, messages: list[tuple[str, bytes]]) -> None: ...
    def subscribe(self, topics: list[str]) -> None: ...
    def unsubscribe(self, topics: list[str]) -> None: ...


class Announced(Protocol):
    """What the coordinator reads of a meter (service.Meter)."""

    ha: DeviceInfo
    topics: MeterTopics
    last: Snapshot | None
    relay: Relay | None
    announced: Signature | None

    @property
    def available(self) -> bool | None: ...


@dataclass(slots=True, eq=False)
class _Run:
    """A re-announce going out, ANNOUNCE_SLICE meters per turn."""

    state: bool
    next: int = 0
    """Index of the first meter not sent yet."""
    configs: int = 0
    states: int = 0


class HomeAssistant:
    """Discovery for one bridge's meters: first announce, key changes, ghosts, re-announces."""

    def __init__(
        self,
        discovery: Discovery,
        link: Link,
        meters: Sequence[Announced],
        configured: Iterable[str] | None = None,
    ) -> None:
        """`meters`: the ones this instance serves; `configured`: the devids of the whole
        device list (default: the meters'), which the ghost scan keeps. Shards share one
        list, so no shard clears the entities of another's meters."""
        self.discovery = discovery
        self._link = link
        self._meters = meters
        self._configured = set(configured) if configured is not None else {m.ha.devid for m in meters}
        self._scan: dict[str, str] | None = None  # retained config topic -> its devid
        self._scan_until: float | None = None
        self._scanned = False
        self._plan = Reannounce()
        self._run: _Run | None = None

    @property
    def status_topic(self) -> str:
        return self.discovery.status_topic

    def wants(self, topic: str) -> bool:
        """Is this message (not a command) one for the coordinator?"""
        return topic == self.discovery.status_topic or topic.endswith("/config")

    # -- events ---------------------------------------------------------------------------

    def connected(self, now: float) -> None:
        """The link (re)connected and replayed the remembered state: add the configs."""
        if not self._scanned:
            self._scanned = True
            self._scan = {}
            self._scan_until = now + GHOST_SCAN_SECONDS
            self._link.subscribe(self.discovery.subscriptions())
        elif self._scan is None:
            # The configs are not remembered by the link: all of them again, at once.
            self._plan.request(now, state=False, fresh=True)

    def message(self, topic: str, payload: bytes, retain: bool, now: float) -> None:
        """HA's status, or a retained config seen during the ghost scan."""
        if topic == self.discovery.status_topic:
            if payload.strip().lower() == ONLINE:
                # Merged with any other re-announce pending or running (see reannounce.py):
                # a burst of births costs one, not one each.
                self._plan.request(now, state=True)
            return
        if self._scan is not None and retain:
            devid = self.discovery.owned_devid(topic, payload)
            if devid is not None:
                self._scan[topic] = devid

    def read(self, meter: Announced, snap: Snapshot) -> None:
        """A good read (counters guarded): announce the meter if it is new or changed."""
        if self._scan is not None:
            return  # the scan's end announces it
        meter.announced, configs = self.discovery.announce(meter.ha, snap.readings, meter.announced)
        if configs:
            # Before the read's state, so HA finds the state already retained when it
            # subscribes. Not remembered by the link: regenerated after every connect instead.
            self._link.publish_volatile(configs)

    def turn(self, now: float) -> float | None:
        """The loop's turn: end the ghost scan when due, send a re-announce's next slice.

        Returns when the loop must call again: at once while meters are left (after the
        answers due meanwhile), at the scan's end, or when a pending re-announce may start."""
        if self._scan_until is not None:
            if now < self._scan_until:
                return self._scan_until
            self._end_scan(now)
        plan = self._plan
        state = plan.start(now)
        if state is not None:
            self._run = _Run(state)
        run = self._run
        if run is None or plan.running is None:
            self._run = None  # none, or dropped by a new connection
            return plan.due()
        configs: list[tuple[str, bytes]] = []
        states: list[tuple[str, bytes]] = []
        # Moved on first: a slice that raises is skipped, not tried again on every turn.
        begin = run.next
        run.next = end = begin + ANNOUNCE_SLICE
        for meter in self._meters[begin:end]:
            last, relay = meter.last, meter.relay
            if last is None or relay is None:
                continue  # not read yet: its first read announces it
            configs.extend(self.discovery.configs(meter.ha, last.readings))
            meter.announced = signature(last.readings)
            if run.state:
                states.extend(state_messages(meter.topics, last, relay))
                if meter.available is not None:
                    states.append((meter.topics.availability, ONLINE if meter.available else OFFLINE))
        run.configs += len(configs)
        run.states += len(states)
        if configs:
            self._link.publish_volatile(configs)
        if states:
            self._link.publish_many(states)
        if end < len(self._meters):
            return now
        plan.finish()
        self._run = None
        if run.state:
            logger.info(
                "Home Assistant is online: resent %d discovery and %d state messages",
                run.configs,
                run.states,
            )
        return plan.due()

    def _end_scan(self, now: float) -> None:
        found, self._scan, self._scan_until = self._scan or {}, None, None
        self._link.unsubscribe(self.discovery.subscriptions())
        ghosts = sorted(topic for topic, devid in found.items() if devid not in self._configured)
        # The meters read during the scan (and any birth that came meanwhile).
        self._plan.request(now, state=False, fresh=True)
        if ghosts:
            self._link.publish_volatile([(topic, b"") for topic in ghosts])
            logger.info(
                "cleared %d discovery config(s) of meter(s) no longer configured: %s",
                len(ghosts),
                ", ".join(sorted({found[t] for t in ghosts})),
            )
