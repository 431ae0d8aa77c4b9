"""Glue: schedule -> meter -> readings -> topics -> MQTT, plus commands and availability.

One thread, the loop, owns all the bridge's state: it decides who is due, drives every
HTTP request in flight on one selector (a slow or dead meter holds one socket until its
deadline, never the others), parses the answers and hands the messages to the MQTT link.
paho's network thread only queues incoming commands for the loop and wakes it. No
locks around the state, no thread per request: at 2,000 meters that is what keeps the
cost per poll small and the schedule on time.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import selectors
import threading
import time
from dataclasses import dataclass, field

from . import __version__
from .changes import ChangeFilter, state_fingerprint
from .commands import Action, parse_command, result_error, result_ok
from .config import (
    DeviceSettings,
    HomeAssistantSettings,
    MqttSettings,
    PublishSettings,
    min_gap,
)
from .counters import CounterGuard
from .discovery import DeviceInfo, Discovery, Signature, signature
from .errors import BodyError, CommandError, MeterError, MeterHTTPError, MeterUnreachable
from .keyset import KeyTracker
from .meter import Exchange, MeterClient
from .mqtt import MqttLink
from .readings import Snapshot, parse_body
from .reannounce import Reannounce
from .schedule import Scheduler
from .topics import (
    OFFLINE,
    ONLINE,
    MeterTopics,
    Relay,
    bridge_availability,
    bridge_info,
    command_segment,
    command_subscription,
    info_payload,
    pout_for,
    relay_from_pout,
    state_messages,
)

logger = logging.getLogger(__name__)

#: Consecutive failed requests after which a meter is published offline.
FAILURES_OFFLINE = 3
#: Seconds a command gets beyond its 2 intervals. The second slot after a command comes a
#: gap plus the 50 ms guard plus the meter's answer time after the first: without this,
#: a command arriving just after a poll would miss its one repeat by a few milliseconds.
COMMAND_SLACK = 1.0
#: Most seconds between the first polls of two meters at start. Without a spread every
#: meter would be due at the same instant, at start and then every interval, and the
#: last of 2,000 would always be served late; with it the first polls of 2,000 extended
#: meters spread evenly over one interval, and of a few meters over a few milliseconds.
START_SPREAD = 0.005
#: Seconds the bridge listens for retained discovery configs of meters no longer configured
#: (the broker sends retained messages right after the subscription is acknowledged).
GHOST_SCAN_SECONDS = 2.0
#: Meters a re-announce (see reannounce.py) sends per turn of the loop. One meter's configs
#: and state are some 50 messages and 0.3 ms of CPU: 25 meters keep a turn near 10 ms, so
#: the polls due meanwhile start at most that late, however large the fleet.
ANNOUNCE_SLICE = 25


@dataclass(slots=True, eq=False)
class Command:
    """A relay command: waiting for its slot, in flight, or waiting to be repeated."""

    target: Relay
    deadline: float


@dataclass(slots=True, eq=False)
class Meter:
    """Runtime state of one configured meter. Touched by the loop thread only."""

    device: DeviceSettings
    client: MeterClient
    topics: MeterTopics
    failures: int = 0
    available: bool | None = None
    relay: Relay | None = None
    last_error: str | None = None
    command: Command | None = None
    """The newest command not yet confirmed: what the next request carries."""
    sending: Command | None = None
    """The command carried by the request in flight, if any."""
    exchange: Exchange | None = None
    """The request in flight, if any."""
    started: float = 0.0
    """When that request started (monotonic)."""
    verify: bool = False
    """The last switching request got an HTTP error: read the relay before sending again."""
    resolving: bool = False
    """A thread is looking up the meter's host name; the request starts when it is done."""
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
    ha: DeviceInfo = field(init=False)
    """The meter as discovery describes it."""

    def __post_init__(self) -> None:
        device = self.device
        self.ha = DeviceInfo(device.id, device.segment, device.display_name, device.extended)


@dataclass(slots=True, eq=False)
class _Announcing:
    """A re-announce going out, ANNOUNCE_SLICE meters per turn of the loop."""

    state: bool
    meters: list[Meter]
    next: int = 0
    """Index of the first meter not sent yet."""
    configs: int = 0
    states: int = 0


class Bridge:
    """Polls every configured meter and keeps its MQTT topics true."""

    def __init__(
        self,
        devices: tuple[DeviceSettings, ...] | list[DeviceSettings],
        mqtt: MqttSettings,
        *,
        host: str,
        port: int,
        homeassistant: HomeAssistantSettings | None = None,
        publish: PublishSettings | None = None,
    ) -> None:
        self.base = mqtt.base_topic
        homeassistant = homeassistant or HomeAssistantSettings()
        publish = publish or PublishSettings()
        self._discovery = (
            Discovery(homeassistant.prefix, self.base, __version__)
            if homeassistant.discovery
            else None
        )
        self._meters: dict[str, Meter] = {}
        for device in devices:
            client = MeterClient(
                device.url, device.id, device.pin.get_secret_value(), timeout=device.timeout
            )
            topics = MeterTopics(self.base, device.segment)
            self._meters[device.segment] = meter = Meter(device, client, topics)
            if publish.mode == "on_change":
                meter.changes = ChangeFilter(publish.heartbeat)
        self._availability = bridge_availability(self.base)
        subscriptions = [command_subscription(self.base)]
        if self._discovery is not None:
            subscriptions.append(self._discovery.status_topic)
        self.link = MqttLink(
            mqtt,
            host=host,
            port=port,
            will_topic=self._availability,
            subscriptions=subscriptions,
            on_message=self._on_message,
            on_connect=lambda: self._post(("connected",)),
        )
        # The ghost scan (see _start_ghost_scan): retained configs seen, and when it ends.
        self._scan: dict[str, str] | None = None
        self._scan_until: float | None = None
        self._scanned = False
        # Re-announces (HA's birth, a reconnect, the scan's end): when, and the one going out.
        self._reannounce = Reannounce()
        self._announcing: _Announcing | None = None
        self.lags: list[float] | None = None
        """Set to a list to record, for every request, its start minus its planned time (s)."""
        self._schedule: Scheduler[str] = Scheduler()
        self._selector = selectors.DefaultSelector()
        self._deadlines: list[tuple[float, int, Meter, Exchange]] = []
        self._tiebreak = itertools.count()
        # Segments of the meters with a command: an index, so the loop does not scan every
        # meter on every wake-up.
        self._waiting: set[str] = set()
        # What one turn of the loop publishes, sent together at its end.
        self._out: list[tuple[str, bytes]] = []
        self._events: list[tuple[str, bytes]] = []
        # From other threads to the loop: the inbox, and a pipe byte to wake it.
        self._inbox_lock = threading.Lock()
        self._inbox: collections.deque[tuple[object, ...]] = collections.deque()
        self._wake_pending = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = False
        self._closed = False  # the loop is gone: commands are answered where they arrive
        self._thread = threading.Thread(target=self._run, name="bridge-loop", daemon=True)

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
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
        )
        # Published (and remembered for every reconnect) before the first connect. A meter's
        # availability is first published by its first read: online, or offline after 3
        # failures.
        self.link.publish_many([(self._availability, ONLINE), (bridge_info(self.base), info)])
        now = time.monotonic()
        spread = min(
            (min(m.device.poll_interval for m in self._meters.values()) / len(self._meters))
            if self._meters
            else 0.0,
            START_SPREAD,
        )
        for index, (segment, meter) in enumerate(self._meters.items()):
            self._schedule.add(
                segment,
                interval=meter.device.poll_interval,
                min_gap=min_gap(meter.device.extended),
                now=now + index * spread,
            )
        self.link.start()
        self._thread.start()
        logger.info("bridge started with %d meter(s) under %s/", len(self._meters), self.base)

    def stop(self) -> None:
        """Fail open commands, publish offline everywhere, disconnect. Returns promptly."""
        with self._inbox_lock:
            if self._stopping:
                return
            self._stopping = True
            if not self._closed:  # else the pipe is closed, and its fd may be reused
                self._wake()
        if self._thread.is_alive():
            # The loop answers open commands and abandons requests in flight: nothing
            # waits for a dead meter. It never blocks, so this join is short.
            self._thread.join(timeout=2)
        else:
            self._close()  # never started
        final = [(m.topics.availability, OFFLINE) for m in self._meters.values()]
        final.append((self._availability, OFFLINE))
        self.link.stop(final)
        logger.info("bridge stopped")

    # -- the loop -------------------------------------------------------------------------

    def _run(self) -> None:
        wake: float | None = time.monotonic()
        while not self._stopping:
            timeout = None if wake is None else max(0.0, wake - time.monotonic())
            try:
                events = self._selector.select(timeout)
                wake = self._turn(events)
            except Exception:
                # This thread is the bridge's heartbeat: a bug here must not stop all
                # polling while the bridge still says online. Log it and go on; what the
                # turn had to publish still goes out.
                logger.exception("error in the bridge loop; continuing")
                self._flush()
                wake = time.monotonic() + 1.0
        self._close()

    def _turn(self, events: list[tuple[selectors.SelectorKey, int]]) -> float | None:
        """One turn: progress requests, take commands, start due requests, publish.

        Returns the next time the loop must wake up by itself."""
        # Taken after select() returned: no earlier than any answer that woke us, which
        # keeps the gap rule on the safe side (see Scheduler.finished).
        now = time.monotonic()
        for key, mask in events:
            meter = key.data
            if meter is None:
                self._drain_wake()
                continue
            exchange = meter.exchange
            if exchange is None:
                continue
            try:
                exchange.on_event(mask)
                if exchange.done:
                    self._complete(meter, now)
            except Exception:
                logger.exception("%s: unexpected error in a request", meter.client.label)
                self._abandon(meter)
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, _, meter, exchange = heapq.heappop(deadlines)
            if meter.exchange is exchange:
                exchange.expire()
                self._complete(meter, now)
        if self._inbox:
            self._take_inbox()
        now = time.monotonic()
        if self._scan_until is not None and now >= self._scan_until:
            self._end_ghost_scan()
        self._expire_commands(now)
        for segment, planned in self._schedule.pop_due(now):
            meter = self._meters[segment]
            try:
                self._begin(meter, planned)
            except Exception:
                # Each meter popped here is "in flight" until its request ends: one that
                # failed to start must still end, or it would never be polled again.
                logger.exception("%s: cannot start a request", meter.client.label)
                self._abandon(meter)
        # After the due requests started: a slice of a re-announce delays none of them.
        announce_at = self._announce_slice(now) if self._discovery is not None else None
        self._flush()
        candidates = [
            t
            for t in (
                self._schedule.next_due(),
                self._next_command_deadline(),
                deadlines[0][0] if deadlines else None,
                self._scan_until,
                announce_at,
            )
            if t is not None
        ]
        return min(candidates, default=None)

    def _flush(self) -> None:
        """Publish what this turn produced: the state, then the command results."""
        if self._out:
            out, self._out = self._out, []
            self.link.publish_many(out)
        if self._events:
            # After the state, so whoever waits for a result finds the relay topic updated.
            events, self._events = self._events, []
            for topic, payload in events:
                self.link.publish_event(topic, payload)

    def _abandon(self, meter: Meter) -> None:
        """End the meter's request, whatever state it is in, as a failed one."""
        if meter.exchange is not None:
            meter.exchange.abort()
            meter.exchange = None
        meter.resolving = False
        if self._schedule.timing(meter.device.segment).in_flight:
            self._finish(meter, None, MeterError(f"{meter.client.label}: internal error"), time.monotonic())

    def _close(self) -> None:
        """The loop ends: answer every open command, abandon requests, refuse new work."""
        with self._inbox_lock:
            self._closed = True
            inbox, self._inbox = list(self._inbox), collections.deque()
        shutting_down = result_error("bridge shutting down")
        for item in inbox:
            if item[0] == "command":
                meter = self._command_meter(item[1], retain=item[3])  # type: ignore[arg-type]
                if meter is not None:
                    self.link.publish_event(meter.topics.relay_result, shutting_down)
        for meter in self._meters.values():
            # The waiting command and, if different, the one in flight: one result each.
            for _ in {meter.command, meter.sending} - {None}:
                self.link.publish_event(meter.topics.relay_result, shutting_down)
            meter.command = meter.sending = None
            if meter.exchange is not None:
                meter.exchange.abort()
                meter.exchange = None
        self._waiting.clear()
        self._selector.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (the loop wakes anyway) or already closed

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _take_inbox(self) -> None:
        with self._inbox_lock:
            inbox, self._inbox = self._inbox, collections.deque()
            self._wake_pending = False
        for item in inbox:
            try:
                self._take(item)
            except Exception:  # one bad item must not lose the ones after it
                logger.exception("error handling %s", item[0])
                if item[0] == "resolved":
                    self._abandon(item[1])  # type: ignore[arg-type]

    def _take(self, item: tuple[object, ...]) -> None:
        kind = item[0]
        if kind == "command":
            _, topic, payload, retain = item
            self._command(topic, payload, retain)  # type: ignore[arg-type]
        elif kind == "resolved":
            _, meter, error = item
            self._resolved(meter, error)  # type: ignore[arg-type]
        elif kind == "ha":
            _, topic, payload, retain = item
            self._home_assistant(topic, payload, retain)  # type: ignore[arg-type]
        elif kind == "connected":
            self._connected()

    def _next_command_deadline(self) -> float | None:
        # A meter in flight is left out: its command is decided when the request ends, and
        # a deadline already past would otherwise make this loop spin.
        return min(
            (
                command.deadline
                for segment in self._waiting
                if (command := self._meters[segment].command) is not None
                and not self._schedule.timing(segment).in_flight
            ),
            default=None,
        )

    def _expire_commands(self, now: float) -> None:
        """Commands past their deadline fail, unless their meter's request is running."""
        for segment in list(self._waiting):
            command = self._meters[segment].command
            if command is None or now < command.deadline:
                continue
            if self._schedule.timing(segment).in_flight:
                continue  # decided when that request ends
            self._events.append((self._meters[segment].topics.relay_result, self._expire(segment)))

    def _expire(self, segment: str) -> bytes:
        """Drop the meter's command as unconfirmed; the result payload."""
        meter = self._meters[segment]
        meter.command = None
        self._waiting.discard(segment)
        self._schedule.settle(segment)
        reason = (
            "not confirmed by the meter within "
            f"{2 * meter.device.poll_interval + COMMAND_SLACK:g} s"
        )
        if meter.last_error:
            reason += f" (last error: {meter.last_error})"
        logger.warning("%s: relay command failed: %s", meter.client.label, reason)
        return result_error(reason)

    # -- one request --------------------------------------------------------------------

    def _begin(self, meter: Meter, planned: float) -> None:
        """Start the meter's request (it is due); a command rides along if one waits."""
        started = time.monotonic()
        client = meter.client
        if client.address(started) is None:
            if not meter.resolving:
                # Name lookups block; a daemon thread does it, and the request starts when
                # it is done (the scheduler keeps the meter "in flight" meanwhile).
                meter.resolving = True
                threading.Thread(
                    target=self._resolve, args=(meter,), name="resolve", daemon=True
                ).start()
            return
        if self.lags is not None:
            self.lags.append(started - planned)
        command = meter.sending = meter.command
        if command is None or meter.verify:
            pout = None
        else:
            pout = pout_for(command.target, meter.device.relay_inverted)
        meter.verify = False
        exchange = client.exchange(pout, started)
        meter.exchange = exchange
        meter.started = started
        exchange.begin(self._selector, started, meter)
        if exchange.done:  # failed at once (no file descriptors left, say)
            self._complete(meter, time.monotonic())
            return
        heapq.heappush(
            self._deadlines, (exchange.deadline, next(self._tiebreak), meter, exchange)
        )

    def _resolve(self, meter: Meter) -> None:
        """Resolver thread: look the host up, hand the outcome to the loop."""
        error = meter.client.resolve()
        self._post(("resolved", meter, error))

    def _resolved(self, meter: Meter, error: MeterError | None) -> None:
        meter.resolving = False
        if self._stopping:
            return
        if error is None:
            self._begin(meter, time.monotonic())
            return
        # Counted as a failed request, with the same bookkeeping.
        meter.started = time.monotonic()
        meter.sending = meter.command
        self._finish(meter, None, error, meter.started)

    def _complete(self, meter: Meter, ended: float) -> None:
        """The meter's request is over (answer, failure or deadline): handle its outcome."""
        exchange = meter.exchange
        assert exchange is not None
        meter.exchange = None
        snap: Snapshot | None = None
        error: MeterError | None = None
        label = meter.client.label
        try:
            body = exchange.result()  # its errors (an oversized body too) name the meter
            try:
                parsed = parse_body(body)
            except BodyError as exc:  # the parser knows no meter: name it here
                raise BodyError(f"{label}: {exc}") from None
            if parsed.devid != meter.device.id:
                raise BodyError(f"{label}: answered as devid {parsed.devid}, not {meter.device.id}")
            # Only now: another meter's answer must count as a failure, publish nothing
            # and confirm no command.
            snap = parsed
        except MeterError as exc:
            error = exc
            if isinstance(exc, MeterUnreachable):
                meter.client.forget_address()
        except Exception:  # a bug must cost one read, never the meter's schedule
            logger.exception("%s: unexpected error", label)
            error = MeterError(f"{label}: internal error")
        self._finish(meter, snap, error, ended)

    def _finish(
        self, meter: Meter, snap: Snapshot | None, error: MeterError | None, ended: float
    ) -> None:
        segment = meter.device.segment
        command, meter.sending = meter.sending, None
        self._schedule.finished(segment, meter.started, ended, command=command is not None)
        try:
            if snap is not None:
                self._out.extend(self._good_read(meter, snap))
            else:
                self._out.extend(self._failed_read(meter, error))
            results = self._settle(meter, segment, command, error)
        except Exception:
            logger.exception("%s: unexpected error handling a read", meter.client.label)
            return
        for result in results:
            self._events.append((meter.topics.relay_result, result))

    def _good_read(self, meter: Meter, snap: Snapshot) -> list[tuple[str, bytes]]:
        relay = relay_from_pout(snap.pout, meter.device.relay_inverted)
        guarded = meter.guard.apply(snap)
        for level, text in guarded.log:
            logger.log(level, "%s: %s", meter.client.label, text)
        snap = meter.last = guarded.snapshot
        forgotten = meter.keys.update([*(r.key for r in snap.readings), *snap.rejected])
        if forgotten:
            self._forget(meter, forgotten)
        messages = state_messages(meter.topics, snap, relay)
        if meter.changes is not None:
            messages = meter.changes.select(
                messages, time.monotonic(), {meter.topics.state: state_fingerprint(snap)}
            )
        if self._discovery is not None and self._scan is None:
            # (During the ghost scan configs wait for its end: published now, every one
            # would come straight back to us through the scan's subscription.)
            announced = meter.announced
            meter.announced, configs = self._discovery.announce(meter.ha, snap.readings, announced)
            if configs:
                # Configs first, so HA finds the state already retained when it subscribes.
                # Not remembered by the link: regenerated after every connect instead.
                self.link.publish_volatile(configs)
        if meter.available is not True:
            if meter.available is False:
                logger.info("%s: back online", meter.client.label)
            messages.append((meter.topics.availability, ONLINE))
        meter.available = True
        meter.failures = 0
        meter.last_error = None
        meter.relay = relay
        for key in snap.rejected:
            if key not in meter.rejected_logged:
                meter.rejected_logged.add(key)
                logger.warning("%s: key %s has no numeric value; left out", meter.client.label, key)
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
        meter.failures += 1
        # Once per change of state; the same error again goes to debug.
        logger.log(logging.DEBUG if text == meter.last_error else logging.WARNING, "%s", text)
        meter.last_error = text
        if meter.failures >= FAILURES_OFFLINE and meter.available is not False:
            # "is not False": a meter that never answered since start goes offline here too.
            logger.warning(
                "%s: offline after %d failed requests", meter.client.label, meter.failures
            )
            meter.available = False
            return [(meter.topics.availability, OFFLINE)]
        return []

    def _settle(
        self, meter: Meter, segment: str, sent: Command | None, error: MeterError | None
    ) -> list[bytes]:
        """After a request: confirm, keep or fail commands; the results to publish."""
        results = []
        if sent is not None:
            # Judged by what the meter reports, not by the HTTP status of the request.
            confirmed = error is None and meter.relay is sent.target
            if confirmed:
                results.append(result_ok(sent.target))
                if meter.command is sent:
                    meter.command = None
                    self._waiting.discard(segment)
                    self._schedule.settle(segment)
            elif meter.command is not sent:
                # A newer command arrived while this one was on its way and failed: the
                # newer one is what goes next, this one will not be repeated.
                results.append(result_error("superseded"))
            elif isinstance(error, MeterHTTPError):
                # Some firmware switches and still answers the switching request with an
                # error (homeassistant-smart-maic #27): the next slot first reads the meter,
                # without pout, and that read confirms the command or sends it again.
                meter.verify = True
            # else: not confirmed yet; it stays urgent and goes again at the next slot.
        command = meter.command
        if command is not None and time.monotonic() >= command.deadline:
            results.append(self._expire(segment))
        return results

    # -- commands -----------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        """paho's thread: hand the message to the loop (or answer it, once the loop is gone)."""
        kind = "command"
        if command_segment(self.base, topic) is None:
            discovery = self._discovery
            if discovery is None or not (
                topic == discovery.status_topic or topic.endswith("/config")
            ):
                return  # not ours (some brokers push other clients' retained topics at us)
            kind = "ha"
        with self._inbox_lock:
            if not self._closed:
                self._inbox.append((kind, topic, payload, retain))
                wake, self._wake_pending = not self._wake_pending, True
                if wake:
                    self._wake()
                return
        meter = self._command_meter(topic, retain=retain) if kind == "command" else None
        if meter is not None:
            self.link.publish_event(meter.topics.relay_result, result_error("bridge shutting down"))

    def _post(self, item: tuple[object, ...]) -> None:
        with self._inbox_lock:
            if self._closed:
                return
            self._inbox.append(item)
            wake, self._wake_pending = not self._wake_pending, True
            if wake:
                self._wake()

    def _command_meter(self, topic: str, *, retain: bool) -> Meter | None:
        """The meter a command is for, or None (logged) if it is to be ignored."""
        segment = command_segment(self.base, topic)
        meter = self._meters.get(segment) if segment is not None else None
        if meter is None:
            logger.debug("ignoring a command on %s: no meter has that topic", topic)
            return None
        if retain:
            # Stale by definition: replaying it would switch the relay on every reconnect.
            logger.warning(
                "ignored a retained command on %s: publish commands without the retain flag",
                topic,
            )
            return None
        return meter

    def _command(self, topic: str, payload: bytes, retain: bool) -> None:
        """The loop: take a command for a meter's relay."""
        meter = self._command_meter(topic, retain=retain)
        if meter is None:
            return
        result = meter.topics.relay_result
        try:
            action = parse_command(payload)
        except CommandError as exc:
            logger.info("rejected command on %s: %s", topic, exc)
            self._events.append((result, result_error(str(exc))))
            return
        previous = meter.command
        if action is Action.TOGGLE:
            # Toggle the state the relay is heading for: a pending command's target if
            # there is one, else what the meter last reported.
            base = previous.target if previous is not None else meter.relay
            if base is None:
                self._events.append(
                    (result, result_error("relay state not known yet; send ON or OFF"))
                )
                return
            target = base.inverse()
        else:
            target = Relay(action.value)
        segment = meter.device.segment
        now = time.monotonic()
        meter.command = Command(
            target, deadline=now + 2 * meter.device.poll_interval + COMMAND_SLACK
        )
        self._waiting.add(segment)
        self._schedule.hurry(segment, now)
        if previous is not None and previous is not meter.sending:
            # Still waiting for its slot: the last command wins. (One already on its way
            # is judged by the meter's answer when the request ends.)
            self._events.append((result, result_error("superseded")))
        logger.info("relay command %s for %s", target.value, meter.client.label)

    # -- Home Assistant ---------------------------------------------------------------------

    def _connected(self) -> None:
        """The link (re)connected and replayed the remembered state: add the configs."""
        if self._discovery is None:
            return
        if not self._scanned:
            self._scanned = True
            self._start_ghost_scan()  # its end announces every meter read so far
        elif self._scan is None:
            # The configs are not remembered by the link: all of them again, at once.
            self._reannounce.request(time.monotonic(), state=False, fresh=True)

    def _announce_slice(self, now: float) -> float | None:
        """The loop: start a due re-announce, send its next ANNOUNCE_SLICE meters.

        Returns when the loop must wake for it: at once while meters are left (after a
        select() for the answers due meanwhile), or when the pending one may start."""
        plan = self._reannounce
        if self._scan is not None:
            # Its end asks for one: configs sent now would all come back through the scan.
            return None
        state = plan.start(now)
        if state is not None:
            self._announcing = _Announcing(state, list(self._meters.values()))
        run = self._announcing
        if run is None or plan.running is None:
            self._announcing = None  # none, or dropped by a new connection
            return plan.due()
        assert self._discovery is not None
        configs: list[tuple[str, bytes]] = []
        states: list[tuple[str, bytes]] = []
        # Moved on first: a slice that raises is skipped, not tried again on every turn.
        begin, end = run.next, run.next + ANNOUNCE_SLICE
        run.next = end
        for meter in run.meters[begin:end]:
            if meter.last is None or meter.relay is None:
                continue  # not read yet: its first read announces it
            configs.extend(self._discovery.configs(meter.ha, meter.last.readings))
            meter.announced = signature(meter.last.readings)
            if run.state:
                states.extend(state_messages(meter.topics, meter.last, meter.relay))
                if meter.available is not None:
                    states.append(
                        (meter.topics.availability, ONLINE if meter.available else OFFLINE)
                    )
        run.configs += len(configs)
        run.states += len(states)
        if configs:
            self.link.publish_volatile(configs)
        if states:
            self.link.publish_many(states)
        if end < len(run.meters):
            return now
        plan.finish()
        self._announcing = None
        if run.state:
            logger.info(
                "Home Assistant is online: resent %d discovery and %d state messages",
                run.configs,
                run.states,
            )
        return plan.due()

    def _home_assistant(self, topic: str, payload: bytes, retain: bool) -> None:
        """The loop: HA's status, or a retained config seen during the ghost scan."""
        assert self._discovery is not None
        if topic == self._discovery.status_topic:
            if payload.strip().lower() == ONLINE:
                # Merged with any other re-announce pending or running (see reannounce.py):
                # a burst of births costs one, not one each.
                self._reannounce.request(time.monotonic(), state=True)
            return
        scan = self._scan
        if scan is not None and retain:
            devid = self._discovery.owned_devid(topic, payload)
            if devid is not None:
                scan[topic] = devid

    def _start_ghost_scan(self) -> None:
        """On the first connect: listen a moment for configs that earlier runs left behind.

        Retained configs of this bridge (Discovery.owned_devid) whose devid is no longer
        configured get an empty retained payload when the scan ends: HA then removes those
        entities. Only the first connect: later ones have nothing new to find.
        """
        assert self._discovery is not None
        self._scan = {}
        self._scan_until = time.monotonic() + GHOST_SCAN_SECONDS
        self.link.subscribe(self._discovery.subscriptions())

    def _end_ghost_scan(self) -> None:
        assert self._discovery is not None
        found, self._scan, self._scan_until = self._scan or {}, None, None
        self.link.unsubscribe(self._discovery.subscriptions())
        configured = {meter.device.id for meter in self._meters.values()}
        ghosts = sorted(topic for topic, devid in found.items() if devid not in configured)
        # The meters read during the scan (and any birth that came meanwhile).
        self._reannounce.request(time.monotonic(), state=False, fresh=True)
        if ghosts:
            self.link.publish_volatile([(topic, b"") for topic in ghosts])
            logger.info(
                "cleared %d discovery config(s) of meter(s) no longer configured: %s",
                len(ghosts),
                ", ".join(sorted({found[t] for t in ghosts})),
            )
