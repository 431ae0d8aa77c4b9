"""Glue: schedule -> meter -> readings -> topics -> MQTT, plus commands and availability.

Threads: one scheduler thread decides who is due; daemon workers do the HTTP (a slow or
dead meter holds one worker, never the others); paho's network thread delivers commands.
Shared state lives under one Condition. HTTP is never done while holding it; MQTT
publishes under it only queue into paho.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import __version__
from .changes import ChangeFilter, state_fingerprint
from .config import (
    DeviceSettings,
    HomeAssistantSettings,
    MqttSettings,
    PublishSettings,
    min_gap,
)
from .counters import CounterGuard
from .discovery import DeviceInfo, Discovery, Signature
from .errors import BodyError, CommandError, MeterError
from .meter import MeterClient
from .mqtt import MqttLink
from .readings import Snapshot, parse_body
from .schedule import Scheduler
from .topics import (
    OFFLINE,
    ONLINE,
    Action,
    MeterTopics,
    Relay,
    bridge_availability,
    bridge_info,
    command_segment,
    command_subscription,
    info_payload,
    parse_command,
    pout_for,
    relay_from_pout,
    result_error,
    result_ok,
    state_messages,
)

logger = logging.getLogger(__name__)

#: Consecutive failed requests after which a meter is published offline.
FAILURES_OFFLINE = 3
#: Most requests in flight at once. Healthy requests take milliseconds; only dead meters
#: hold a worker for their whole timeout, so this leaves room for hundreds of them.
MAX_WORKERS = 256
#: Seconds the bridge listens for retained discovery configs of meters no longer configured
#: (the broker sends retained messages right after the subscription is acknowledged).
GHOST_SCAN_SECONDS = 2.0
#: Seconds a command gets beyond its 2 intervals. The second slot after a command comes a
#: gap plus the 50 ms guard plus the meter's answer time after the first: without this,
#: a command arriving just after a poll would miss its one repeat by a few milliseconds.
COMMAND_SLACK = 1.0


@dataclass(slots=True, eq=False)
class Command:
    """A relay command: waiting for its slot, in flight, or waiting to be repeated."""

    target: Relay
    deadline: float


@dataclass(slots=True, eq=False)
class Meter:
    """Runtime state of one configured meter."""

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
    rejected_logged: set[str] = field(default_factory=set)
    # -- issue 4 (Home Assistant, counters, on_change) --
    guard: CounterGuard = field(default_factory=CounterGuard)
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


class Workers:
    """Daemon worker threads, started as needed up to a limit.

    Not ThreadPoolExecutor: its threads are joined at interpreter exit, so a request
    hanging on a dead meter would hold up the bridge's exit for the whole timeout.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._queue: queue.SimpleQueue[tuple[Callable[..., None], tuple[object, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._pending = 0

    def submit(self, job: Callable[..., None], *args: object) -> None:
        # Queued first: if no thread can be started, a running worker still takes it.
        self._queue.put((job, args))
        with self._lock:
            self._pending += 1
            spawn = self._pending > self._idle and self._threads < self._limit
            if spawn:
                self._threads += 1
        if spawn:
            try:
                threading.Thread(target=self._work, name="meter", daemon=True).start()
            except RuntimeError:  # "can't start new thread": the OS is out of them
                with self._lock:
                    self._threads -= 1
                logger.warning("cannot start another worker thread; requests will queue")

    def shutdown(self) -> None:
        """Idle workers exit; busy ones exit after their request (or with the process)."""
        with self._lock:
            count = self._threads
        for _ in range(count):
            self._queue.put(None)

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            item = self._queue.get()
            with self._lock:
                self._idle -= 1
                if item is not None:
                    self._pending -= 1
            if item is None:
                return
            job, args = item
            try:
                job(*args)
            except Exception:  # a bug must cost one request, not the worker
                logger.exception("unexpected error in a meter request")


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
        # Issue 4: None when discovery is off.
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
        # Retained configs seen during the ghost scan: topic -> devid (paho thread writes).
        self._scan: dict[str, str] | None = None
        self.link = MqttLink(
            mqtt,
            host=host,
            port=port,
            will_topic=self._availability,
            subscriptions=subscriptions,
            on_message=self._on_message,
        )
        self._cond = threading.Condition()
        self._schedule: Scheduler[str] = Scheduler()
        self._stopping = False
        self._workers = Workers(MAX_WORKERS)
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        # Segments of the meters with a command: an index, so the scheduler loop does not
        # scan every meter on every wake-up.
        self._waiting: set[str] = set()

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
        with self._cond:
            for segment, meter in self._meters.items():
                self._schedule.add(
                    segment,
                    interval=meter.device.poll_interval,
                    min_gap=min_gap(meter.device.extended),
                    now=now,
                )
        self.link.start()
        self._thread.start()
        if self._discovery is not None:
            threading.Thread(target=self._clear_ghosts, name="ghost-scan", daemon=True).start()
        logger.info("bridge started with %d meter(s) under %s/", len(self._meters), self.base)

    def stop(self) -> None:
        """Fail open commands, publish offline everywhere, disconnect. Returns promptly."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            open_results = []
            for meter in self._meters.values():
                # The waiting command and, if different, the one in flight: one result each.
                open_commands = len({meter.command, meter.sending} - {None})
                open_results += [meter.topics.relay_result] * open_commands
                meter.command = meter.sending = None
            self._waiting.clear()
            self._cond.notify_all()
        for topic in open_results:
            self.link.publish_event(topic, result_error("bridge shutting down"))
        # Requests in flight are abandoned (each ends by its own timeout, or with the
        # process); their results are dropped because _stopping is set.
        self._workers.shutdown()
        final = [(m.topics.availability, OFFLINE) for m in self._meters.values()]
        final.append((self._availability, OFFLINE))
        self.link.stop(final)
        self._thread.join(timeout=2)
        logger.info("bridge stopped")

    # -- scheduling (scheduler thread) --------------------------------------------------

    def _run(self) -> None:
        with self._cond:
            while not self._stopping:
                try:
                    wake = self._dispatch(time.monotonic())
                except Exception:
                    # This thread is the bridge's heartbeat: a bug here must not stop all
                    # polling while the bridge still says online. Log it and go on.
                    logger.exception("scheduler error; continuing")
                    wake = time.monotonic() + 1.0
                self._cond.wait(None if wake is None else max(0.0, wake - time.monotonic()))

    def _dispatch(self, now: float) -> float | None:
        """Fail expired commands, start due requests; the next time to wake. Lock held."""
        self._expire_commands(now)
        for segment, _planned in self._schedule.pop_due(now):
            self._workers.submit(self._request, self._meters[segment])
        return min(
            (t for t in (self._schedule.next_due(), self._next_command_deadline()) if t is not None),
            default=None,
        )

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
            self.link.publish_event(
                self._meters[segment].topics.relay_result, self._expire(segment)
            )

    def _expire(self, segment: str) -> bytes:
        """Drop the meter's command as unconfirmed; the result payload. Lock held."""
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

    # -- one request (worker thread) ----------------------------------------------------

    def _request(self, meter: Meter) -> None:
        segment = meter.device.segment
        with self._cond:
            if self._stopping:
                return
            command = meter.sending = meter.command
        pout = None if command is None else pout_for(command.target, meter.device.relay_inverted)
        started = time.monotonic()
        snap: Snapshot | None = None
        error: MeterError | None = None
        try:
            body = meter.client.fetch(pout)
            try:
                snap = parse_body(body)
            except BodyError as exc:
                raise BodyError(f"{meter.client.label}: {exc}") from None
            if snap.devid != meter.device.id:
                raise BodyError(
                    f"{meter.client.label}: answered as devid {snap.devid}, not {meter.device.id}"
                )
        except MeterError as exc:
            error, snap = exc, None
        except Exception:  # a bug must cost one read, never the meter's schedule
            logger.exception("%s: unexpected error", meter.client.label)
            error, snap = MeterError(f"{meter.client.label}: internal error"), None
        ended = time.monotonic()
        with self._cond:
            if self._stopping:
                return
            meter.sending = None
            self._schedule.finished(segment, started, ended, command=command is not None)
            try:
                if snap is not None:
                    messages = self._good_read(meter, snap)
                else:
                    messages = self._failed_read(meter, error)
                results = self._settle(meter, segment, command, good=snap is not None)
            except Exception:
                logger.exception("%s: unexpected error handling a read", meter.client.label)
                messages, results = [], []
            self._cond.notify()
        # Results go after the state, so whoever waits for one finds the relay topic updated.
        if messages:
            self.link.publish_many(messages)
        for result in results:
            self.link.publish_event(meter.topics.relay_result, result)

    def _good_read(self, meter: Meter, snap: Snapshot) -> list[tuple[str, bytes]]:
        relay = relay_from_pout(snap.pout, meter.device.relay_inverted)
        # Issue 4: counters never go down; discovery when the keys change; on_change.
        guarded = meter.guard.apply(snap)
        for level, text in guarded.log:
            logger.log(level, "%s: %s", meter.client.label, text)
        snap = meter.last = guarded.snapshot
        messages = list(state_messages(meter.topics, snap, relay))
        if meter.changes is not None:
            messages = meter.changes.select(
                messages, time.monotonic(), {meter.topics.state: state_fingerprint(snap)}
            )
        if self._discovery is not None:
            meter.announced, configs = self._discovery.announce(
                meter.ha, snap.readings, meter.announced
            )
            messages[:0] = configs  # configs first: HA then finds the state retained
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
        self, meter: Meter, segment: str, sent: Command | None, *, good: bool
    ) -> list[bytes]:
        """After a request: confirm, keep or fail commands. Lock held; returns results."""
        results = []
        if sent is not None:
            # Judged by what the meter reports, not by the HTTP status of the request.
            confirmed = good and meter.relay is sent.target
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
            # else: not confirmed yet; it stays urgent and goes again at the next slot.
        command = meter.command
        if command is not None and time.monotonic() >= command.deadline:
            results.append(self._expire(segment))
        return results

    # -- Home Assistant (issue 4) ------------------------------------------------------

    def _resend_for_home_assistant(self) -> None:
        """HA said `online` (it restarted): every config and the current state, again.

        Under the lock, so a read finishing meanwhile cannot be overtaken by an older state.
        """
        assert self._discovery is not None
        with self._cond:
            messages: list[tuple[str, bytes]] = []
            for meter in self._meters.values():
                if meter.last is None or meter.relay is None:
                    continue  # not read yet: its first read announces it
                messages.extend(self._discovery.configs(meter.ha, meter.last.readings))
                messages.extend(state_messages(meter.topics, meter.last, meter.relay))
                if meter.available is not None:
                    messages.append((meter.topics.availability, ONLINE if meter.available else OFFLINE))
            self.link.publish_many(messages)
        logger.info("Home Assistant is online: resent %d discovery and state messages", len(messages))

    def _clear_ghosts(self) -> None:
        """On the first connect: clear retained configs of meters no longer configured.

        Subscribes to the discovery config topics, collects the retained configs this
        bridge published in earlier runs (see Discovery.owned_devid) for GHOST_SCAN_SECONDS,
        unsubscribes, and publishes an empty retained payload on each one whose devid is no
        longer configured: HA then removes those entities.
        """
        assert self._discovery is not None
        while not self.link.connected.wait(1.0):
            if self._stopping:
                return
        topics = self._discovery.subscriptions()
        self._scan = {}
        # PORT: MqttLink has no public subscribe/unsubscribe yet; paho's are thread-safe.
        client = self.link._client
        for topic in topics:
            client.subscribe(topic, qos=1)
        time.sleep(GHOST_SCAN_SECONDS)  # the retained configs arrive within this window
        for topic in topics:
            client.unsubscribe(topic)
        found, self._scan = self._scan, None
        configured = {meter.device.id for meter in self._meters.values()}
        ghosts = sorted(topic for topic, devid in found.items() if devid not in configured)
        if ghosts and not self._stopping:
            self.link.publish_many([(topic, b"") for topic in ghosts])
            logger.info(
                "cleared %d discovery config(s) of meter(s) no longer configured: %s",
                len(ghosts),
                ", ".join(sorted({found[t] for t in ghosts})),
            )

    def _on_home_assistant(self, topic: str, payload: bytes, retain: bool) -> bool:
        """Handle a discovery-related message; False if the topic is not one."""
        assert self._discovery is not None
        if topic == self._discovery.status_topic:
            if payload.strip().lower() == ONLINE:
                self._resend_for_home_assistant()
            return True
        scan = self._scan
        if scan is not None and retain and topic.endswith("/config"):
            devid = self._discovery.owned_devid(topic, payload)
            if devid is not None:
                scan[topic] = devid
            return True
        return False

    # -- commands (paho thread) ---------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        if self._discovery is not None and self._on_home_assistant(topic, payload, retain):
            return
        segment = command_segment(self.base, topic)
        if segment is None:
            return  # not a command (some brokers push other clients' retained topics at us)
        meter = self._meters.get(segment)
        if meter is None:
            logger.debug("ignoring a command on %s: no meter has that topic", topic)
            return
        if retain:
            # Stale by definition: replaying it would switch the relay on every reconnect.
            logger.warning(
                "ignored a retained command on %s: publish commands without the retain flag",
                topic,
            )
            return
        try:
            action = parse_command(payload)
        except CommandError as exc:
            logger.info("rejected command on %s: %s", topic, exc)
            self.link.publish_event(meter.topics.relay_result, result_error(str(exc)))
            return
        with self._cond:
            if self._stopping:
                self.link.publish_event(meter.topics.relay_result, result_error("bridge shutting down"))
                return
            previous = meter.command
            if action is Action.TOGGLE:
                # Toggle the state the relay is heading for: a pending command's target if
                # there is one, else what the meter last reported.
                base = previous.target if previous is not None else meter.relay
                if base is None:
                    self.link.publish_event(
                        meter.topics.relay_result,
                        result_error("relay state not known yet; send ON or OFF"),
                    )
                    return
                target = base.inverse()
            else:
                target = Relay(action.value)
            meter.command = Command(
                target, deadline=time.monotonic() + 2 * meter.device.poll_interval + COMMAND_SLACK
            )
            self._waiting.add(segment)
            self._schedule.hurry(segment)
            self._cond.notify()
            if previous is not None and previous is not meter.sending:
                # Still waiting for its slot: the last command wins. (One already on its
                # way is judged by the meter's answer when the request ends.)
                self.link.publish_event(meter.topics.relay_result, result_error("superseded"))
        logger.info("relay command %s for %s", target.value, meter.client.label)

