"""The wiring: one asyncio loop runs schedule -> meter -> readings -> topics -> MQTT.

Every request is a socket the loop watches (a slow or dead meter holds one socket until
its deadline, never the others), paho is driven from the same loop (mqtt.py), so commands and
Home Assistant's messages arrive on it too: all the bridge's state has one owner and needs
no lock. The rules live in pure modules: who is due (schedule.py), a meter's relay
commands (commands.py), its availability (availability.py), what configs go out when
(homeassistant.py). This module only connects them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from . import __version__
from .availability import Availability
from .changes import ChangeFilter, state_fingerprint
from .commands import (
    SHUTTING_DOWN,
    Outcome,
    RelayCommands,
    Reply,
    command_result,
    http_status,
    parse_command,
    result_error,
)
from .config import (
    DeviceSettings,
    HomeAssistantSettings,
    HttpSettings,
    MqttSettings,
    PublishSettings,
    ShardSettings,
    min_gap,
)
from .counters import CounterGuard
from .discovery import DeviceInfo, Discovery, Signature
from .errors import BodyError, CommandError, MeterError, MeterHTTPError, MeterUnreachable
from .homeassistant import HomeAssistant
from .keyset import KeyTracker
from .meter import Exchange, MeterClient
from .mqtt import MqttLink
from .readings import Snapshot, parse_body
from .schedule import Scheduler
from .shard import owner
from .stale import StaleScan, scan_subscription
from .status import Histogram, Rate, available, health_payload, request_result
from .topics import (
    OFFLINE,
    ONLINE,
    MeterTopics,
    Relay,
    bridge_availability,
    bridge_health,
    bridge_info,
    command_segment,
    command_subscription,
    info_payload,
    pout_for,
    relay_from_pout,
    state_messages,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Most seconds between the first polls of two meters at start. Without a spread every
#: meter would be due at the same instant, at start and then every interval, and the
#: last of 2,000 would always be served late; with it the first polls of 2,000 extended
#: meters spread evenly over one interval, and of a few meters over a few milliseconds.
START_SPREAD = 0.005
#: Seconds stop() waits for the loop to answer open commands and say offline.
STOP_TIMEOUT = 4.0
#: Seconds between two B/bridge/health messages.
HEALTH_INTERVAL = 60.0


@dataclass(slots=True, eq=False)
class Meter:
    """Runtime state of one configured meter. Touched on the loop only."""

    device: DeviceSettings
    client: MeterClient
    topics: MeterTopics
    commands: RelayCommands
    health: Availability = field(default_factory=Availability)
    relay: Relay | None = None
    """The relay as the last good read showed it."""
    exchange: Exchange | None = None
    """The request in flight, if any."""
    started: float = 0.0
    """When it started (monotonic)."""
    resolving: asyncio.Task[None] | None = None
    """The lookup of the meter's host name, if one runs; the request starts after it."""
    rejected_logged: set[str] = field(default_factory=set)
    keys: KeyTracker = field(default_factory=KeyTracker)
    """Which keys the meter stopped sending: forgotten everywhere (see keyset.py)."""
    guard: CounterGuard = field(default_factory=CounterGuard)
    """Energy counters never go down on MQTT (see counters.py)."""
    last: Snapshot | None = None
    """The last good read as published (counters guarded): resent when HA comes online."""
    announced: Signature | None = None
    """The (key, name, unit) set the discovery configs were last published for."""
    changes: ChangeFilter | None = None
    """publish.mode on_change: what was last sent per topic."""
    last_read: float | None = None
    """When the last good read ended (Unix seconds), for the API and the page."""
    requests: Counter[str] = field(default_factory=Counter)
    """Requests ended since start, by status.request_result."""
    ha: DeviceInfo = field(init=False)
    """The meter as discovery describes it."""

    def __post_init__(self) -> None:
        device = self.device
        self.ha = DeviceInfo(device.id, device.segment, device.display_name, device.extended)

    @property
    def available(self) -> bool | None:
        """As published on MQTT (None: not decided yet)."""
        return self.health.available

    @property
    def api_available(self) -> bool | None:
        """As the API and the page show it: false after a first failure (status.available)."""
        return available(self.health.available, self.health.failures)


class Bridge:
    """Polls every configured meter and keeps its MQTT topics true.

    start() runs the loop on a thread of its own (`bridge-loop`); stop() ends it from any
    thread. Everything else happens on the loop.
    """

    def __init__(
        self,
        devices: tuple[DeviceSettings, ...] | list[DeviceSettings],
        mqtt: MqttSettings,
        *,
        host: str | None = None,
        port: int | None = None,
        brokers: Sequence[tuple[str, int]] | None = None,
        homeassistant: HomeAssistantSettings | None = None,
        publish: PublishSettings | None = None,
        http: HttpSettings | None = None,
        shard: ShardSettings | None = None,
    ) -> None:
        """`devices`: the whole device list; with `shard`, the bridge serves the meters the
        hash gives its index (shard.py) and names its own topics B/bridge-<index>/."""
        self.base = mqtt.base_topic
        homeassistant = homeassistant or HomeAssistantSettings()
        publish = publish or PublishSettings()
        self.shard = shard = shard or ShardSettings()
        if shard.sharded:
            mqtt = mqtt.model_copy(update={"client_id": f"{mqtt.client_id}-{shard.index}"})
        mine, self.others = _split(devices, shard)
        self._meters: dict[str, Meter] = {}
        for device in mine:
            client = MeterClient(device.url, device.id, device.pin.get_secret_value(), timeout=device.timeout)
            meter = Meter(
                device,
                client,
                MeterTopics(self.base, device.segment, publish.output),
                RelayCommands(device.poll_interval),
            )
            if publish.mode == "on_change":
                meter.changes = ChangeFilter(publish.heartbeat)
            self._meters[device.segment] = meter
        self._availability = bridge_availability(self.base, shard.node)
        subscriptions = [command_subscription(self.base)]
        # Home Assistant's device page links to the status page, where one is served.
        page = http.public_url if http is not None and http.port is not None else None
        discovery = Discovery(
            homeassistant.prefix,
            self.base,
            __version__,
            page,
            output=publish.output,
            bridge_node=shard.node,
        )
        if homeassistant.discovery:
            subscriptions.append(discovery.status_topic)
        # One broker (host, port; the port defaults to mqtt.port), or the list to fail over
        # along, or else the ones `mqtt` names.
        if host is not None:
            if brokers is not None:
                raise TypeError("Bridge takes host (and port) or brokers, not both")
            brokers = ((host, mqtt.port if port is None else port),)
        self.link = MqttLink(
            mqtt,
            brokers=mqtt.brokers if brokers is None else brokers,
            will_topic=self._availability,
            subscriptions=subscriptions,
            on_message=self._on_message,
            on_connect=self._connected,
        )
        self._ha = (
            HomeAssistant(
                discovery,
                self.link,
                list(self._meters.values()),
                configured=(device.id for device in devices),
            )
            if homeassistant.discovery
            else None
        )
        self.health_topic = bridge_health(self.base, shard.node)
        self.output = publish.output
        # The other outputs' retained topics, looked for once, at the first connect (stale.py).
        self._stale_pending = scan_subscription(self.base, self.output) is not None
        self._stale: StaleScan | None = None
        self._stale_handle: asyncio.TimerHandle | None = None
        self.lags: list[float] | None = None
        """Set to a list to record, for every request, its start minus its planned time (s)."""
        self._schedule: Scheduler[str] = Scheduler()
        # Segments of the meters with a command: an index, so a turn does not scan them all.
        self._waiting: set[str] = set()
        # What the callbacks of one pass of the loop publish, sent together after them.
        self._out: list[tuple[str, bytes]] = []
        self._events: list[tuple[str, bytes]] = []
        self._flush_handle: asyncio.Handle | None = None
        self._wake: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stopping = False
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name="bridge-loop", daemon=True)
        # What the page, the API, the metrics and B/bridge/health read (see status.py).
        self.started_at = time.monotonic()
        self.beat = self.started_at
        """When the loop last turned (monotonic): /healthz wants one within 10 s."""
        self.durations = Histogram()
        """How long requests took, from start to the answer's end."""
        self.commands_total: Counter[str] = Counter()
        """Command results published, by commands.command_result."""
        self.polls_total = 0
        self.polls = Rate()
        self.messages = Rate()
        self._tick_handle: asyncio.TimerHandle | None = None
        self._health_at = self.started_at + HEALTH_INTERVAL

    @property
    def meters(self) -> list[Meter]:
        """Every configured meter, in config order (read on the loop)."""
        return list(self._meters.values())

    def requests_total(self) -> Counter[str]:
        """Requests ended since start, by result, over all meters."""
        total: Counter[str] = Counter()
        for meter in self._meters.values():
            total.update(meter.requests)
        return total

    def health(self) -> dict[str, object]:
        """What B/bridge/health says now."""
        return health_payload(
            uptime=time.monotonic() - self.started_at,
            availabilities=(m.api_available for m in self._meters.values()),
            polls_per_s=self.polls.per_second(),
            requests=self.requests_total(),
            mqtt_messages_per_s=self.messages.per_second(),
            rss_mb=rss_mb(),
        )

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop's thread; returns once the loop runs."""
        self._thread.start()
        self._started.wait()

    def stop(self) -> None:
        """Fail open commands, publish offline everywhere, disconnect. Returns promptly."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is gone already
                loop.call_soon_threadsafe(stop.set)
        if self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT)

    def _main(self) -> None:
        try:
            run_loop(self.run())
        finally:
            self._started.set()  # (if run() failed before it)

    def shutdown(self) -> None:
        """On the loop: make run() answer open commands, say offline and return."""
        if self._stop is not None:
            self._stop.set()

    async def run(self) -> None:
        """The bridge, until shutdown() (or stop()): on the running loop."""
        loop = self._loop = asyncio.get_running_loop()
        if self._stop is None:
            self._stop = asyncio.Event()
        info = info_payload(
            __version__,
            (
                {
                    "id": m.device.id,
                    "name": m.device.display_name,
                    "topic": m.device.segment,
                    "extended": m.device.extended,
                    "interval": m.device.poll_interval,
                }
                for m in self._meters.values()
            ),
            (self.shard.index or 0, self.shard.count) if self.shard.sharded else None,
        )
        # Published (and remembered for every reconnect) before the first connect. A meter's
        # availability is first published by its first read: online, or offline after 3
        # failures.
        self.link.publish_many(
            [(self._availability, ONLINE), (bridge_info(self.base, self.shard.node), info)]
        )
        now = time.monotonic()
        spread = (
            min(min(m.device.poll_interval for m in self._meters.values()) / len(self._meters), START_SPREAD)
            if self._meters
            else 0.0
        )
        for index, (segment, meter) in enumerate(self._meters.items()):
            self._schedule.add(
                segment,
                interval=meter.device.poll_interval,
                min_gap=min_gap(meter.device.extended),
                now=now + index * spread,
            )
        self.link.start(loop)
        if self.shard.sharded:
            logger.info(
                "bridge started as shard %d of %d with %d of %d meter(s) under %s/",
                self.shard.index,
                self.shard.count,
                len(self._meters),
                len(self._meters) + len(self.others),
                self.base,
            )
        else:
            logger.info("bridge started with %d meter(s) under %s/", len(self._meters), self.base)
        self.started_at = self.beat = now
        self._health_at = now + HEALTH_INTERVAL
        self._tick()
        self._turn()
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            await self._shutdown()
            logger.info("bridge stopped")

    async def _shutdown(self) -> None:
        """Answer every open command, abandon requests, say offline, disconnect."""
        self._stopping = True
        if self._wake is not None:
            self._wake.cancel()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        if self._stale_handle is not None:
            self._stale_handle.cancel()
        for meter in self._meters.values():
            if meter.exchange is not None:
                meter.exchange.abort()  # nothing waits for a dead meter
            if meter.resolving is not None:
                meter.resolving.cancel()
            self._settled(meter, meter.commands.shutdown())
        self._waiting.clear()
        self._flush()
        # The bridge's own first: it is what every Home Assistant entity depends on.
        final = [(self._availability, OFFLINE)]
        final += [(m.topics.availability, OFFLINE) for m in self._meters.values()]
        await self.link.close(final)

    def _tick(self) -> None:
        """Once a second: the heartbeat /healthz reads, the rates, B/bridge/health."""
        now = self.beat = time.monotonic()
        self.polls.sample(now, self.polls_total)
        self.messages.sample(now, self.link.messages_sent)
        if now >= self._health_at:
            self._health_at = now + HEALTH_INTERVAL
            try:
                self.link.publish_event(self.health_topic, json.dumps(self.health()).encode())
            except Exception:
                logger.exception("cannot publish %s", self.health_topic)
        assert self._loop is not None
        self._tick_handle = self._loop.call_later(1.0, self._tick)

    # -- the schedule ---------------------------------------------------------------------

    def _turn(self) -> None:
        """Expire commands, start the due requests, a slice of a re-announce; re-arm."""
        self._wake = None
        if self._stopping:
            return
        try:
            now = time.monotonic()
            self._expire_commands(now)
            assert self._loop is not None
            for segment, planned in self._schedule.pop_due(now):
                self._begin(self._meters[segment], planned)
            # After the due requests started: a slice of a re-announce delays none of them.
            announce_at = self._ha.turn(now) if self._ha is not None else None
            self._flush_soon()
        except Exception:
            # The loop is the bridge's heartbeat: a bug here must not stop all polling
            # while the bridge still says online. Log it and go on.
            logger.exception("error in the bridge loop; continuing")
            announce_at = time.monotonic() + 1.0
        self._arm(announce_at)

    def _arm(self, extra: float | None = None) -> None:
        """Make sure _turn runs by the next due time (or `extra`, if sooner)."""
        if self._stopping or self._loop is None:
            return
        times = [
            t for t in (self._schedule.next_due(), self._next_command_deadline(), extra) if t is not None
        ]
        if not times:
            return
        when = min(times)
        wake = self._wake
        if wake is not None:
            if wake.when() <= when:
                return
            wake.cancel()
        # loop.time() is time.monotonic() on asyncio's own loop, the scheduler's clock.
        self._wake = self._loop.call_at(when, self._turn)

    def _next_command_deadline(self) -> float | None:
        return min(
            (
                deadline
                for segment in self._waiting
                if (deadline := self._meters[segment].commands.deadline(in_flight=self._in_flight(segment)))
                is not None
            ),
            default=None,
        )

    def _in_flight(self, segment: str) -> bool:
        return self._schedule.timing(segment).in_flight

    def _expire_commands(self, now: float) -> None:
        """Commands past their deadline fail, unless their meter's request is running."""
        for segment in list(self._waiting):
            meter = self._meters[segment]
            outcome = meter.commands.expire(now, meter.health.last_error, in_flight=self._in_flight(segment))
            self._settled(meter, outcome)

    def _settled(self, meter: Meter, outcome: Outcome) -> None:
        """Act on what the command tracker decided."""
        segment = meter.device.segment
        if outcome.settled:
            self._waiting.discard(segment)
            self._schedule.settle(segment)
        if outcome.expired is not None:
            logger.warning("%s: relay command failed: %s", meter.client.label, outcome.expired)
        self._results(meter, outcome.results, outcome.replies)

    def _results(self, meter: Meter, results: tuple[bytes, ...], replies: tuple[Reply, ...]) -> None:
        """Command results: published on B/D/relay/result, counted, handed to who waits."""
        topic = meter.topics.relay_result
        for result in results:
            self._events.append((topic, result))
            self.commands_total[command_result(result)] += 1
        for reply, result in replies:
            _answer(reply, result)

    # -- one request --------------------------------------------------------------------

    def _begin(self, meter: Meter, planned: float) -> None:
        """Start the meter's request (it is due); a command rides along if one waits."""
        started = time.monotonic()
        client = meter.client
        try:
            if client.address(started) is None:
                # A lookup blocks: the loop's executor does it (the scheduler keeps the
                # meter "in flight" meanwhile), then the request starts.
                assert self._loop is not None
                meter.resolving = self._loop.create_task(self._resolve(meter))
                return
            if self.lags is not None:
                self.lags.append(started - planned)
            target = meter.commands.begin()
            pout = None if target is None else pout_for(target, meter.device.relay_inverted)
            meter.started = started
            assert self._loop is not None
            meter.exchange = client.exchange(pout, self._loop, partial(self._complete, meter), started)
        except Exception:
            # A meter popped by the scheduler is "in flight" until its request ends: one that
            # failed to start must still end, or it would never be polled again.
            logger.exception("%s: cannot start a request", client.label)
            meter.exchange = None
            self._finish(
                meter, None, MeterError(f"{client.label}: internal error"), started, time.monotonic()
            )

    async def _resolve(self, meter: Meter) -> None:
        error = await meter.client.resolve()
        meter.resolving = None
        if error is None:
            self._begin(meter, time.monotonic())  # its lag counts from here
            return
        # Counted as a failed request, with the same bookkeeping.
        meter.commands.begin(sent=False)
        now = time.monotonic()
        self._finish(meter, None, error, now, now)

    def _complete(self, meter: Meter) -> None:
        """The meter's request is over (answer, failure or deadline): handle its outcome."""
        # After the answer is in: no earlier than its arrival, which keeps the gap rule on
        # the safe side (see Scheduler.finished).
        ended = time.monotonic()
        exchange, meter.exchange = meter.exchange, None
        snap: Snapshot | None = None
        error: MeterError | None = None
        try:
            assert exchange is not None
            snap = self._check(meter, exchange.result())
        except MeterError as exc:
            error = exc
            if isinstance(exc, MeterUnreachable):
                meter.client.forget_address()
        except Exception:  # a bug must cost one read, never the meter's schedule
            logger.exception("%s: unexpected error", meter.client.label)
            error = MeterError(f"{meter.client.label}: internal error")
        self._finish(meter, snap, error, meter.started, ended)

    def _check(self, meter: Meter, body: bytes) -> Snapshot:
        label = meter.client.label
        try:
            parsed = parse_body(body)
        except BodyError as exc:  # the parser knows no meter: name it here
            raise BodyError(f"{label}: {exc}") from None
        if parsed.devid != meter.device.id:
            # Another meter's answer is a failure: it publishes nothing, confirms no command.
            raise BodyError(f"{label}: answered as devid {parsed.devid}, not {meter.device.id}")
        return parsed

    def _finish(
        self, meter: Meter, snap: Snapshot | None, error: MeterError | None, started: float, ended: float
    ) -> None:
        segment = meter.device.segment
        carried = meter.commands.carried is not None
        self._schedule.finished(segment, started, ended, command=carried)
        meter.requests[request_result(error)] += 1
        self.polls_total += 1
        self.durations.observe(ended - started)
        if snap is not None:
            meter.last_read = time.time()
        try:
            if snap is not None:
                self._out.extend(self._good_read(meter, snap))
            else:
                self._out.extend(self._failed_read(meter, error))
            outcome = meter.commands.end(
                meter.relay if snap is not None else None,
                http_error=isinstance(error, MeterHTTPError),
                now=time.monotonic(),
                last_error=meter.health.last_error,
            )
            self._settled(meter, outcome)
        except Exception:
            logger.exception("%s: unexpected error handling a read", meter.client.label)
        self._flush_soon()
        self._arm()

    def _good_read(self, meter: Meter, snap: Snapshot) -> list[tuple[str, bytes]]:
        label = meter.client.label
        relay = relay_from_pout(snap.pout, meter.device.relay_inverted)
        guarded = meter.guard.apply(snap)
        for level, text in guarded.log:
            logger.log(level, "%s: %s", label, text)
        snap = meter.last = guarded.snapshot
        forgotten = meter.keys.update([*(r.key for r in snap.readings), *snap.rejected])
        if forgotten:
            self._forget(meter, forgotten)
        topics = meter.topics
        messages = state_messages(topics, snap, relay)
        if meter.changes is not None:
            messages = meter.changes.select(
                messages,
                time.monotonic(),
                {topics.state: state_fingerprint(snap)} if topics.state_json else None,
            )
        if self._ha is not None:
            self._ha.read(meter, snap)
        good = meter.health.good()
        if good.back_online:
            logger.info("%s: back online", label)
        if good.publish_online:
            messages.append((meter.topics.availability, ONLINE))
        meter.relay = relay
        for key in snap.rejected:
            if key not in meter.rejected_logged:
                meter.rejected_logged.add(key)
                logger.warning("%s: key %s has no numeric value; left out", label, key)
        return messages

    def _forget(self, meter: Meter, keys: list[str]) -> None:
        """Keys absent from 3 good reads in a row: gone from every cache, and from the broker."""
        topics = []
        for key in keys:
            meter.guard.forget(key)
            meter.rejected_logged.discard(key)
            topic = meter.topics.forget(key)
            if topic is not None:
                topics.append(topic)
        if meter.changes is not None:
            meter.changes.forget(topics)
        # At once, not with this turn's state: an empty payload must not be remembered.
        self.link.clear(topics)
        logger.debug(
            "%s: forgot %d key(s) no longer sent: %s", meter.client.label, len(keys), ", ".join(keys)
        )

    def _failed_read(self, meter: Meter, error: MeterError | None) -> list[tuple[str, bytes]]:
        text = str(error)
        failed = meter.health.failed(text)
        # Once per change of state; the same error again goes to debug.
        logger.log(logging.WARNING if failed.new_error else logging.DEBUG, "%s", text)
        if failed.publish_offline:
            logger.warning("%s: offline after %d failed requests", meter.client.label, failed.failures)
            return [(meter.topics.availability, OFFLINE)]
        return []

    # -- publishing -------------------------------------------------------------------------

    def _flush_soon(self) -> None:
        """Publish after this pass of the loop: every answer that came in it, one batch."""
        if self._flush_handle is None and self._loop is not None and (self._out or self._events):
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Publish what the loop produced: the state, then the command results."""
        self._flush_handle = None
        if self._out:
            out, self._out = self._out, []
            self.link.publish_many(out)
        if self._events:
            # After the state, so whoever waits for a result finds the relay topic updated.
            events, self._events = self._events, []
            for topic, payload in events:
                self.link.publish_event(topic, payload)
        self.link.write_now()

    # -- messages from the broker (on the loop) ---------------------------------------------

    def _on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        if command_segment(self.base, topic) is not None:
            self._command(topic, payload, retain)
        elif self._stale is not None and self._stale.message(topic, payload, retain, time.monotonic()):
            pass  # the stale-topic scan's (B/+/+), nobody else's
        elif self._ha is not None and self._ha.wants(topic):
            self._ha.message(topic, payload, retain, time.monotonic())
            self._arm(time.monotonic())
        # else: not ours (some brokers push other clients' retained topics at us)

    def _connected(self) -> None:
        """The link (re)connected and replayed the remembered state: add the configs; at
        the first connect, look for the other outputs' retained topics."""
        if self._stale_pending:
            self._stale_pending = False
            now = time.monotonic()
            scan = self._stale = StaleScan(self.base, self.output, self._meters, now)
            self.link.subscribe([scan.subscription])
            assert self._loop is not None
            self._stale_handle = self._loop.call_at(scan.due(), self._stale_check)
        if self._ha is not None:
            self._ha.connected(time.monotonic())
            self._arm(time.monotonic())

    def _stale_check(self) -> None:
        """The stale-topic scan's time is up, unless retained messages still arrive: clear
        what it found (see stale.py)."""
        scan = self._stale
        assert scan is not None and self._loop is not None
        now = time.monotonic()
        if now < scan.due():
            self._stale_handle = self._loop.call_at(scan.due(), self._stale_check)
            return
        self._stale = self._stale_handle = None
        self.link.unsubscribe([scan.subscription])
        found = scan.end()
        if found:
            # Not remembered: nothing of this output lives on these topics.
            self.link.publish_volatile([(topic, b"") for topic in found])
            self.link.write_now()
        logger.log(
            logging.INFO if found else logging.DEBUG,
            "cleared %d retained topic(s) that publish.output %s does not publish"
            " (scanned %d retained message(s) in %.1f s)",
            len(found),
            self.output,
            scan.retained,
            scan.seconds(now),
        )

    def _command(self, topic: str, payload: bytes, retain: bool) -> None:
        """A command for a meter's relay."""
        segment = command_segment(self.base, topic)
        meter = self._meters.get(segment) if segment is not None else None
        if meter is None:
            # Another shard's meter: its owner answers. Silent, as for a topic no meter has.
            logger.debug("ignoring a command on %s: no meter of this instance has that topic", topic)
            return
        if retain:
            # Stale by definition: replaying it would switch the relay on every reconnect.
            logger.warning(
                "ignored a retained command on %s: publish commands without the retain flag", topic
            )
            return
        self._accept(meter, payload, None)

    async def command(self, segment: str, payload: bytes, *, refused: str | None = None) -> tuple[int, bytes]:
        """A relay command from the HTTP API, the same way as one from MQTT (its result is
        published on B/D/relay/result too): (HTTP status, the result payload) once it has
        one. See commands.http_status; 404 for a segment no meter has, 400 for a payload
        the parser refuses, or for `refused`: why a body the server did not read (too long)
        is refused, handled as the parser's refusal. On the loop."""
        meter = self._meters.get(segment)
        if meter is None:
            if segment in self.others:
                return 404, result_error(f"served by {self.others[segment]}, not this instance")
            return 404, result_error("no meter has this topic")
        if self._loop is None:  # the server starts first: a request may beat run()
            return 503, result_error("bridge starting")
        reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        refused_now = self._accept(meter, payload, reply, refused)
        # Always answered: a command ends confirmed, superseded, expired or at shutdown
        # (tests/test_relay_commands.py walks that at random); the timeout is a seatbelt.
        try:
            result = await asyncio.wait_for(reply, 2 * meter.commands.window + 30.0)
        except TimeoutError:
            logger.error("%s: a command from the API got no result", meter.client.label)
            return 504, result_error("no result")
        return (400 if refused_now else http_status(result)), result

    def _accept(
        self, meter: Meter, payload: bytes, reply: asyncio.Future[bytes] | None, refused: str | None = None
    ) -> bool:
        """A command for the meter's relay, from MQTT or (with `reply`) the API. True when
        the parser refused it (or `refused` said why, see command)."""
        topic = meter.topics.relay_result
        if self._stopping:
            stopping = result_error(SHUTTING_DOWN)
            self.commands_total[command_result(stopping)] += 1
            self.link.publish_event(topic, stopping)
            _answer(reply, stopping)
            return False
        try:
            if refused is not None:
                raise CommandError(refused)
            action = parse_command(payload)
        except CommandError as exc:
            logger.info("rejected command for %s: %s", meter.client.label, exc)
            self._results(meter, (result_error(str(exc)),), ())
            _answer(reply, result_error(str(exc)))
            self._flush_soon()
            return True
        now = time.monotonic()
        received = meter.commands.receive(action, now, meter.relay, reply)
        self._results(meter, received.results, received.replies)
        if received.target is not None:
            self._waiting.add(meter.device.segment)
            self._schedule.hurry(meter.device.segment, now)
            logger.info("relay command %s for %s", received.target.value, meter.client.label)
            self._arm()
        self._flush_soon()
        return False


def _split(
    devices: tuple[DeviceSettings, ...] | list[DeviceSettings], shard: ShardSettings
) -> tuple[list[DeviceSettings], dict[str, str]]:
    """The meters this instance serves, and of the others: segment -> their shard's node."""
    if not shard.sharded:
        return list(devices), {}
    mine: list[DeviceSettings] = []
    others: dict[str, str] = {}
    for device in devices:
        index = owner(device.id, shard.count)
        if index == shard.index:
            mine.append(device)
        else:
            others[device.segment] = f"bridge-{index}"
    return mine, others


def _answer(reply: object, result: bytes) -> None:
    """Hand a command's result to the API request waiting for it, if it still waits."""
    if isinstance(reply, asyncio.Future) and not reply.done():
        reply.set_result(result)


def rss_mb() -> float | None:
    """The process's resident memory (MB), from /proc; None where there is none."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def run_loop(main: Coroutine[object, object, T]) -> T:
    """Run `main` on a new asyncio loop, as the bridge runs: the standard loop (uvloop
    measured no faster here, README "Performance"), and an executor for what blocks.

    Lookups of meters' host names run in the executor; a few threads are plenty. Its
    shutdown does not wait for them (asyncio.run's would), though the interpreter still
    joins a lookup in progress at exit."""
    loop = asyncio.new_event_loop()
    executor = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="bridge-io")
    loop.set_default_executor(executor)
    try:
        return loop.run_until_complete(main)
    finally:
        for task in asyncio.all_tasks(loop):
            task.cancel()
        with contextlib.suppress(Exception):
            loop.run_until_complete(asyncio.sleep(0))
        executor.shutdown(wait=False, cancel_futures=True)
        loop.close()
