"""PURE: relay commands: what a payload means, and what becomes of each command.

RelayCommands holds one meter's commands from arrival to result; the caller owns the clock,
the Scheduler and the log, and passes the time in (`now`), so tests move the clock by hand.
What it decides comes back as values: result payloads to publish on B/D/relay/result,
whether the meter must be hurried or may settle back to its cadence, and the reason a
command failed, for the caller to log.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum

from .errors import CommandError
from .topics import Relay

_MAX_COMMAND = 256
#: Seconds a command gets beyond its 2 intervals. The second slot after a command comes a
#: gap plus the 50 ms guard plus the meter's answer time after the first: without this,
#: a command arriving just after a poll would miss its one repeat by a few milliseconds.
COMMAND_SLACK = 1.0

SUPERSEDED = "superseded"
STATE_UNKNOWN = "relay state not known yet; send ON or OFF"
SHUTTING_DOWN = "bridge shutting down"
NOT_CONFIRMED = "not confirmed by the meter within"


class Action(StrEnum):
    ON = "ON"
    OFF = "OFF"
    TOGGLE = "TOGGLE"


def result_ok(relay: Relay) -> bytes:
    return json.dumps({"ok": True, "relay": relay.value}).encode()


def result_error(error: str) -> bytes:
    return json.dumps({"ok": False, "error": error}).encode()


#: Every value of the `result` label of smartmac_commands_total.
COMMAND_RESULTS = ("ok", "failed", "superseded", "rejected")


def command_result(result: bytes) -> str:
    """One of COMMAND_RESULTS: what became of a command, from its result payload.
    rejected: refused on arrival (the parser, or a TOGGLE while the relay state is unknown);
    failed: accepted but not confirmed in time, or the bridge stopped first."""
    doc = json.loads(result)
    if doc.get("ok"):
        return "ok"
    error = str(doc.get("error", ""))
    if error == SUPERSEDED:
        return "superseded"
    if error == SHUTTING_DOWN or error.startswith(NOT_CONFIRMED):
        return "failed"
    return "rejected"


def http_status(result: bytes) -> int:
    """The HTTP status the API answers a command's result with (README "HTTP API"): 200 ok,
    409 superseded (or a TOGGLE while the relay state is unknown: a conflict with the
    meter's state, not a malformed request), 504 not confirmed in time, 503 shutting down.
    A payload the parser refuses is answered 400 before it gets here."""
    kind = command_result(result)
    if kind == "ok":
        return 200
    if kind == "failed":
        return 503 if json.loads(result).get("error") == SHUTTING_DOWN else 504
    return 409


_WORDS = {
    "ON": Action.ON,
    "OFF": Action.OFF,
    "TOGGLE": Action.TOGGLE,
    "1": Action.ON,
    "0": Action.OFF,
    "TRUE": Action.ON,
    "FALSE": Action.OFF,
}


def parse_command(payload: bytes) -> Action:
    """ON/OFF/TOGGLE (any case), 1/0, true/false, or {"state": "ON"|"OFF"|"TOGGLE"}."""
    if len(payload) > _MAX_COMMAND:
        raise CommandError(f"payload too long ({len(payload)} bytes)")
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CommandError("payload is not UTF-8 text") from None
    action = _WORDS.get(text.upper())
    if action is not None:
        return action
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):
            raise CommandError("payload is not valid JSON") from None
        state = doc.get("state") if isinstance(doc, dict) else None
        if isinstance(state, str) and state.strip().upper() in ("ON", "OFF", "TOGGLE"):
            return Action(state.strip().upper())
        raise CommandError('JSON command needs {"state": "ON"|"OFF"|"TOGGLE"}')
    shown = text if len(text) <= 32 else text[:32] + "..."
    raise CommandError(f"unknown command {shown!r}: use ON, OFF or TOGGLE")


@dataclass(slots=True, eq=False)
class Command:
    """A relay command: waiting for its slot, in flight, or waiting to be repeated.

    Told apart by identity (eq=False): two ON commands in a row are two commands, each
    owed its own result."""

    target: Relay
    deadline: float
    reply: object = None
    """Whoever waits for this command's result besides MQTT (the HTTP API's future), or
    None. Opaque here: it comes back in `replies` with the result."""


#: A result for someone waiting on it: (the command's `reply`, the result payload).
Reply = tuple[object, bytes]


@dataclass(frozen=True, slots=True)
class Received:
    """What taking a command decided."""

    results: tuple[bytes, ...]
    """To publish at once: "superseded" for the command it replaced, or its own refusal."""
    target: Relay | None
    """The state the relay is to go to; None if the command was refused."""
    replies: tuple[Reply, ...] = ()
    """Those of `results` whose command has a `reply`, paired with it."""

    @property
    def hurry(self) -> bool:
        """A command waits: the caller asks the Scheduler for the earliest slot."""
        return self.target is not None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the end of a request, or a look at the deadline, decided."""

    results: tuple[bytes, ...] = ()
    """To publish, in this order (after the read's state, so the relay topic is current)."""
    settled: bool = False
    """No command waits any more: the caller tells the Scheduler (back to the cadence)."""
    expired: str | None = None
    """Why a command failed unconfirmed, for the caller's log ("relay command failed: ...")."""
    replies: tuple[Reply, ...] = ()
    """Those of `results` whose command has a `reply`, paired with it."""


_NOTHING = Outcome()


class RelayCommands:
    """The relay commands of one meter, from arrival to result.

    At most two are open: the newest one not confirmed yet (`waiting`: what the next request
    carries, kept while that request is on its way) and the one the request in flight
    carries (`carried`), which a newer command may have replaced meanwhile. Each open
    command gets exactly one result.
    """

    __slots__ = ("_sending", "_verify", "_waiting", "window")

    def __init__(self, interval: float) -> None:
        self.window = 2 * interval + COMMAND_SLACK
        """Seconds from a command's arrival to its deadline: room for one repeat."""
        self._waiting: Command | None = None
        self._sending: Command | None = None
        self._verify = False

    @property
    def waiting(self) -> Relay | None:
        """The target of the newest command not confirmed yet (it may be in flight)."""
        return self._waiting.target if self._waiting is not None else None

    @property
    def carried(self) -> Relay | None:
        """The target of the command the request in flight carries (before `end`)."""
        return self._sending.target if self._sending is not None else None

    def receive(self, action: Action, now: float, reported: Relay | None, reply: object = None) -> Received:
        """A command arrives at `now`; `reported` is the relay as the last good read showed.
        `reply`, if not None, comes back with the command's result (see Command.reply)."""
        previous = self._waiting
        if action is Action.TOGGLE:
            # Toggle the state the relay is heading for: a waiting command's target if there
            # is one, else what the meter last reported.
            base = previous.target if previous is not None else reported
            if base is None:
                refused = result_error(STATE_UNKNOWN)
                return Received((refused,), None, _replies((reply, refused)))
            target = base.inverse()
        else:
            target = Relay(action.value)
        self._waiting = Command(target, now + self.window, reply)
        if previous is not None and previous is not self._sending:
            # Still waiting for its slot: the last command wins. (One already on its way is
            # judged by the meter's answer when the request ends.)
            superseded = result_error(SUPERSEDED)
            return Received((superseded,), target, _replies((previous.reply, superseded)))
        return Received((), target)

    def begin(self, *, sent: bool = True) -> Relay | None:
        """A request starts and carries the waiting command, if any: the target to send
        (as `&pout=topics.pout_for(target, relay_inverted)`).

        None: nothing to switch, or the last switching request got an HTTP error and this
        one only reads the relay (see end). `sent=False`: the request failed before it went
        out (its host name did not resolve); it counts as carrying the command, but a
        pending verify-by-read is kept for a request that reaches the meter."""
        command = self._sending = self._waiting
        if not sent:
            return None
        verify, self._verify = self._verify, False
        return None if command is None or verify else command.target

    def end(self, reported: Relay | None, *, http_error: bool, now: float, last_error: str | None) -> Outcome:
        """The request ended at `now`: judge the command it carried, then the deadline.

        `reported`: the relay the answer shows, None unless it was a good read (an answer
        from another devid is not one). `http_error`: the request failed with an HTTP
        status. `last_error`: the meter's last error after this request, for the reason."""
        sent, self._sending = self._sending, None
        results: list[bytes] = []
        settled = False
        if sent is not None:
            # Judged by what the meter reports, not by the HTTP status of the request.
            if reported is sent.target:
                results.append(result_ok(sent.target))
                if self._waiting is sent:
                    self._waiting = None
                    settled = True
            elif self._waiting is not sent:
                # A newer command arrived while this one was on its way and failed: the
                # newer one is what goes next, this one will not be repeated.
                results.append(result_error(SUPERSEDED))
            elif http_error:
                # Some firmware switches and still answers the switching request with an
                # error (homeassistant-smart-maic #27): the next slot first reads the meter,
                # without pout, and that read confirms the command or sends it again.
                self._verify = True
            # else: not confirmed yet; it stays waiting and goes again at the next slot.
        # At most one result above, and it is `sent`'s.
        own = _replies((sent.reply, results[0])) if sent is not None and results else ()
        expired = self.expire(now, last_error, in_flight=False)
        if not results:
            return expired
        return Outcome(
            (*results, *expired.results),
            settled=settled or expired.settled,
            expired=expired.expired,
            replies=(*own, *expired.replies),
        )

    def expire(self, now: float, last_error: str | None, *, in_flight: bool) -> Outcome:
        """Fail the waiting command if its deadline has passed, unless a request is in
        flight: that one may still confirm it, and `end` decides."""
        command = self._waiting
        if command is None or in_flight or now < command.deadline:
            return _NOTHING
        self._waiting = None
        reason = f"{NOT_CONFIRMED} {self.window:g} s"
        if last_error:
            reason += f" (last error: {last_error})"
        failed = result_error(reason)
        return Outcome((failed,), settled=True, expired=reason, replies=_replies((command.reply, failed)))

    def deadline(self, *, in_flight: bool) -> float | None:
        """When `expire` must next look, or None.

        None while a request is in flight: its end decides, and a deadline already past
        would otherwise make the caller's loop spin."""
        command = self._waiting
        return None if command is None or in_flight else command.deadline

    def shutdown(self) -> Outcome:
        """The bridge stops: one "bridge shutting down" result per open command."""
        # The waiting one and, if a different one is in flight, that one too (Command
        # compares by identity).
        open_commands = [c for c in (self._waiting, self._sending) if c is not None]
        if len(open_commands) == 2 and open_commands[0] is open_commands[1]:
            del open_commands[1]
        self._waiting = self._sending = None
        stopping = result_error(SHUTTING_DOWN)
        return Outcome(
            (stopping,) * len(open_commands),
            settled=bool(open_commands),
            replies=_replies(*((c.reply, stopping) for c in open_commands)),
        )


def _replies(*pairs: Reply) -> tuple[Reply, ...]:
    """The pairs whose command has someone waiting (a reply that is not None)."""
    return tuple(pair for pair in pairs if pair[0] is not None)
