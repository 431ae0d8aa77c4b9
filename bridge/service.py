"""Glue: schedule -> meter -> readings -> topics -> MQTT, plus commands and availability.

Threads: one scheduler thread decides who is due; a pool of workers does the HTTP (a slow
or dead meter holds one worker, never the others); paho's network thread delivers commands.
Shared state lives under one Condition; no HTTP or MQTT I/O is done while holding it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import __version__
from .config import DeviceSettings, MqttSettings, min_gap
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
#: Upper bound on concurrent requests. Requests are short; only dead meters hold a worker
#: for their whole timeout, so this leaves room for many of them before others wait.
MAX_WORKERS = 64


@dataclass(slots=True, eq=False)
class Command:
    """A relay command waiting for, or being confirmed by, the meter."""

    target: Relay
    deadline: float
    sent: bool = False


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
    rejected_logged: set[str] = field(default_factory=set)


class Bridge:
    """Polls every configured meter and keeps its MQTT topics true."""

    def __init__(
        self,
        devices: tuple[DeviceSettings, ...] | list[DeviceSettings],
        mqtt: MqttSettings,
        *,
        host: str,
        port: int,
    ) -> None:
        self.base = mqtt.base_topic
        self._meters: dict[str, Meter] = {}
        for device in devices:
            client = MeterClient(
                device.url, device.id, device.pin.get_secret_value(), timeout=device.timeout
            )
            self._meters[device.segment] = Meter(device, client, MeterTopics(self.base, device.segment))
        self._availability = bridge_availability(self.base)
        self.link = MqttLink(
            mqtt,
            host=host,
            port=port,
            will_topic=self._availability,
            subscriptions=[command_subscription(self.base)],
            on_message=self._on_message,
        )
        self._cond = threading.Condition()
        self._schedule: Scheduler[str] = Scheduler()
        self._stopping = False
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, min(MAX_WORKERS, len(self._meters))),
            thread_name_prefix="meter",
        )
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._waiting: set[str] = set()
        """Segments of the meters that have a command pending."""
        self.lags: deque[float] = deque(maxlen=100_000)
        """Start minus planned time of recent requests, seconds (for the benchmark)."""

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
        # Published (and remembered for every reconnect) before the first connect.
        self.link.publish_many(
            [(self._availability, ONLINE), (bridge_info(self.base), info)]
            + [(m.topics.availability, OFFLINE) for m in self._meters.values()]
        )
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
        logger.info("bridge started with %d meter(s) under %s/", len(self._meters), self.base)

    def stop(self) -> None:
        """Fail waiting commands, publish offline everywhere, disconnect. Returns promptly."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            waiting = [self._meters[segment] for segment in self._waiting]
            for meter in waiting:
                meter.command = None
            self._waiting.clear()
            self._cond.notify_all()
        for meter in waiting:
            self.link.publish_event(meter.topics.relay_result, result_error("bridge shutting down"))
        # Requests in flight are abandoned (each ends by its own timeout); their results are
        # dropped because _stopping is set.
        self._pool.shutdown(wait=False, cancel_futures=True)
        final = [(m.topics.availability, OFFLINE) for m in self._meters.values()]
        final.append((self._availability, OFFLINE))
        self.link.stop(final)
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        logger.info("bridge stopped")

    # -- scheduling ---------------------------------------------------------------------

    def _run(self) -> None:
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                self._expire_commands(now)
                for segment, planned in self._schedule.pop_due(now):
                    self._pool.submit(self._request, self._meters[segment], planned)
                wake = min(
                    (t for t in (self._schedule.next_due(), self._next_command_deadline()) if t is not None),
                    default=None,
                )
                self._cond.wait(timeout=None if wake is None else max(0.0, wake - time.monotonic()))

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
        """Commands past their deadline fail, unless their request is still running."""
        for segment in list(self._waiting):
            meter = self._meters[segment]
            command = meter.command
            if command is None or now < command.deadline:
                continue
            if self._schedule.timing(segment).in_flight:
                continue  # decided when that request ends
            self._fail_command(meter, segment)

    def _fail_command(self, meter: Meter, segment: str) -> None:
        """Call with the lock held."""
        meter.command = None
        self._waiting.discard(segment)
        self._schedule.settle(segment)
        interval = meter.device.poll_interval
        reason = f"not confirmed by the meter within {2 * interval:g} s"
        if meter.last_error:
            reason += f" (last error: {meter.last_error})"
        self._cond.notify()
        # paho's publish only queues: safe under our lock.
        self.link.publish_event(meter.topics.relay_result, result_error(reason))

    # -- one request (worker thread) ----------------------------------------------------

    def _request(self, meter: Meter, planned: float) -> None:
        segment = meter.device.segment
        with self._cond:
            command = meter.command
            if command is not None:
                command.sent = True
        pout = None if command is None else pout_for(command.target, meter.device.relay_inverted)
        started = time.monotonic()
        self.lags.append(started - planned)
        snap: Snapshot | None = None
        error: MeterError | None = None
        try:
            body = meter.client.fetch(pout)
            try:
                snap = parse_body(body)
            except BodyError as exc:
                raise BodyError(f"{meter.client.label}: {exc}") from None
            if snap.devid != meter.device.id:
                raise MeterError(
                    f"{meter.client.label}: answered as devid {snap.devid}, not {meter.device.id}"
                )
        except MeterError as exc:
            error, snap = exc, None
        except Exception:  # a bug must cost one read, not the worker or the meter
            logger.exception("%s: unexpected error", meter.client.label)
            error = MeterError(f"{meter.client.label}: internal error")
        with self._cond:
            if self._stopping:
                return
            self._schedule.finished(segment, started, command=command is not None)
            if snap is not None:
                messages = self._good_read(meter, snap)
            else:
                messages = self._failed_read(meter, error)
            result = self._settle_command(meter, segment, command)
            self._cond.notify()
        # MQTT publishing outside our lock: the link has its own. The result goes last, so
        # whoever waits for it finds the relay topic already updated.
        if messages:
            self.link.publish_many(messages)
        if result is not None:
            self.link.publish_event(meter.topics.relay_result, result)

    def _good_read(self, meter: Meter, snap: Snapshot) -> list[tuple[str, bytes]]:
        device = meter.device
        relay = relay_from_pout(snap.pout, device.relay_inverted)
        messages = list(state_messages(meter.topics, snap, relay))
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
        if text != meter.last_error:
            logger.warning("%s", text)
        else:
            logger.debug("%s", text)
        meter.last_error = text
        if meter.failures >= FAILURES_OFFLINE and meter.available is not False:
            # "not False": also a meter that never answered since start goes offline here.
            logger.warning(
                "%s: offline after %d failed requests", meter.client.label, meter.failures
            )
            meter.available = False
            return [(meter.topics.availability, OFFLINE)]
        return []

    def _settle_command(self, meter: Meter, segment: str, sent: Command | None) -> bytes | None:
        """After a request: confirm, keep or fail the pending command. Lock held.

        Returns the result payload when the command is confirmed."""
        command = meter.command
        if command is None:
            return None
        if command is sent and meter.relay is command.target and meter.last_error is None:
            # Judged by what the meter reports, not by the HTTP status of the request.
            meter.command = None
            self._waiting.discard(segment)
            self._schedule.settle(segment)
            return result_ok(command.target)
        if time.monotonic() >= command.deadline:
            self._fail_command(meter, segment)
        # else: not confirmed yet; it stays urgent and goes again at the next slot.
        return None

    # -- commands (paho thread) ---------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        segment = command_segment(self.base, topic)
        if segment is None:
            return  # not a command (some brokers push other clients' retained topics at us)
        meter = self._meters.get(segment)
        if meter is None:
            logger.debug("ignoring a command on %s: no meter has that topic", topic)
            return
        if retain:
            # A retained command is stale by definition: replaying it would switch the
            # relay on every reconnect ("ghost switching").
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
                return
            if action is Action.TOGGLE:
                # Toggle the state the relay is heading for: a pending command's target if
                # there is one, else what the meter last reported.
                base = meter.command.target if meter.command is not None else meter.relay
                if base is None:
                    self.link.publish_event(
                        meter.topics.relay_result,
                        result_error("relay state not known yet; send ON or OFF"),
                    )
                    return
                target = base.inverse()
            else:
                target = Relay(action.value)
            previous = meter.command
            meter.command = Command(
                target, deadline=time.monotonic() + 2 * meter.device.poll_interval
            )
            self._waiting.add(segment)
            self._schedule.hurry(segment)
            self._cond.notify()
            if previous is not None:
                self.link.publish_event(meter.topics.relay_result, result_error("superseded"))
        logger.info("relay command %s for %s", target.value, meter.client.label)


