"""commands: payload parsing, and RelayCommands with a hand-moved clock."""

from __future__ import annotations

import pytest

from bridge.commands import (
    COMMAND_SLACK,
    Action,
    Outcome,
    Received,
    RelayCommands,
    parse_command,
    result_error,
    result_ok,
)
from bridge.errors import CommandError
from bridge.topics import Relay, pout_for, relay_from_pout


@pytest.mark.parametrize(
    ("payload", "action"),
    [
        (b"ON", Action.ON),
        (b"on", Action.ON),
        (b" On \n", Action.ON),
        (b"1", Action.ON),
        (b"true", Action.ON),
        (b"TRUE", Action.ON),
        (b"OFF", Action.OFF),
        (b"0", Action.OFF),
        (b"false", Action.OFF),
        (b"toggle", Action.TOGGLE),
        (b'{"state": "ON"}', Action.ON),
        (b'{"state":"off"}', Action.OFF),
        (b'{"state": "TOGGLE"}', Action.TOGGLE),
    ],
)
def test_valid_commands(payload: bytes, action: Action) -> None:
    assert parse_command(payload) is action


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"2",
        b"yes",
        b"ONN",
        b"{}",
        b'{"state": 1}',
        b'{"state": "DIM"}',
        b"{bad",
        b"[1]",
        b'"ON"',
        b"\xff\xfe",
        b"O" * 300,
        b"{" * 5000,
        b"null",
        b"1.0",
    ],
)
def test_invalid_commands(payload: bytes) -> None:
    with pytest.raises(CommandError):
        parse_command(payload)


# -- RelayCommands: the rules of README "Relay commands", with a hand-moved clock -----------

EXTENDED = 6.0  # an extended meter's interval: window 2 * 6 + 1 = 13 s


ok, error = result_ok, result_error


def taken(
    commands: RelayCommands, action: Action, now: float = 0.0, reported: Relay | None = Relay.OFF
) -> Relay:
    """Take a command that must be accepted; its target."""
    received = commands.receive(action, now, reported)
    assert received.target is not None and received.hurry
    return received.target


def test_a_command_goes_at_the_next_slot_and_a_matching_read_confirms_it() -> None:
    commands = RelayCommands(EXTENDED)
    received = commands.receive(Action.ON, 0.0, Relay.OFF)
    assert received == Received((), Relay.ON) and received.hurry
    assert commands.waiting is Relay.ON and commands.carried is None
    assert commands.begin() is Relay.ON
    assert commands.carried is Relay.ON
    ended = commands.end(Relay.ON, http_error=False, now=0.5, last_error=None)
    assert ended == Outcome((ok(Relay.ON),), settled=True)
    assert commands.waiting is None and commands.carried is None
    assert commands.begin() is None  # the next request is a plain poll


def test_the_deadline_is_two_intervals_plus_the_slack_from_arrival() -> None:
    commands = RelayCommands(EXTENDED)
    taken(commands, Action.ON, now=100.0)
    assert commands.deadline(in_flight=False) == 100.0 + 2 * EXTENDED + COMMAND_SLACK == 113.0


@pytest.mark.parametrize(
    ("waiting", "reported", "target"),
    [
        (None, Relay.OFF, Relay.ON),  # nothing waits: against what the meter reported
        (None, Relay.ON, Relay.OFF),
        (Action.ON, Relay.ON, Relay.OFF),  # against the waiting target, not the report
        (Action.OFF, Relay.OFF, Relay.ON),
        (Action.ON, None, Relay.OFF),  # a waiting target is enough before any good read
    ],
)
def test_toggle_switches_away_from_where_the_relay_is_heading(
    waiting: Action | None, reported: Relay | None, target: Relay
) -> None:
    commands = RelayCommands(EXTENDED)
    if waiting is not None:
        taken(commands, waiting, reported=reported)
    assert taken(commands, Action.TOGGLE, now=1.0, reported=reported) is target
    assert commands.begin() is target


def test_toggle_against_the_command_in_flight_is_not_a_supersede() -> None:
    commands = RelayCommands(EXTENDED)
    taken(commands, Action.ON)
    commands.begin()
    assert commands.receive(Action.TOGGLE, 1.0, Relay.OFF) == Received((), Relay.OFF)


def test_toggle_with_no_state_known_is_refused_and_nothing_waits() -> None:
    commands = RelayCommands(EXTENDED)
    received = commands.receive(Action.TOGGLE, 0.0, None)
    assert received == Received((error("relay state not known yet; send ON or OFF"),), None)
    assert not received.hurry
    assert commands.waiting is None and commands.deadline(in_flight=False) is None
    assert commands.begin() is None


def test_several_commands_before_the_slot_the_last_wins() -> None:
    commands = RelayCommands(EXTENDED)
    assert commands.receive(Action.ON, 0.0, Relay.OFF).results == ()
    assert commands.receive(Action.OFF, 1.0, Relay.OFF).results == (error("superseded"),)
    assert commands.receive(Action.ON, 2.0, Relay.OFF).results == (error("superseded"),)
    assert commands.deadline(in_flight=False) == 2.0 + 13.0  # the last one's own time
    assert commands.begin() is Relay.ON
    assert commands.end(Relay.ON, http_error=False, now=3.0, last_error=None).results == (ok(Relay.ON),)


def test_a_command_in_flight_is_judged_by_the_answer_and_the_newer_goes_next() -> None:
    commands = RelayCommands(EXTENDED)
    taken(commands, Action.ON)
    assert commands.begin() is Relay.ON
    assert commands.receive(Action.OFF, 0.5, Relay.OFF).results == ()  # not superseded
    assert commands.carried is Relay.ON and commands.waiting is Relay.OFF
    ended = commands.end(Relay.ON, http_error=False, now=1.0, last_error=None)
    assert ended == Outcome((ok(Relay.ON),), settled=False)  # OFF still waits
    assert commands.begin() is Relay.OFF
    assert commands.end(Relay.OFF, http_error=False, now=7.0, last_error=None) == Outcome(
        (ok(Relay.OFF),), settled=True
    )


@pytest.mark.parametrize("http_error", [False, True])
def test_a_command_in_flight_that_fails_while_a_newer_waits_is_superseded(http_error: bool) -> None:
    commands = RelayCommands(EXTENDED)
    taken(commands, Action.ON)
    commands.begin()
    taken(commands, Action.OFF, now=0.5)
    ended = commands.end(None, http_error=http_error, now=1.0, last_error="m: HTTP 500")
    assert ended == Outcome((error("superseded"),), settled=False)
    # The newer one is sent as it is: an HTTP error of the older one asks for no verify-read.
    assert commands.begin() is Relay.OFF


@pytest.mark.parametrize("reported", [None, Relay.OFF])
def test_an_unconfirmed_command_goes_again_at_the_next_slot(reported: Relay | None) -> None:
    # A timeout (nothing reported), or a good read that does not show the new state.
    commands = RelayCommands(EXTENDED)
    taken(commands, Action.ON)
    commands.begin()
    assert commands.end(reported, http_error=False, now=1.0, last_error="m: timed out") == Outcome()
    assert commands.waiting is Relay.ON
    assert commands.begin() is Relay.ON


def test_after_an_http_error_the_next_slot_reads_and_that_read_confirms() -> None:
    commands = RelayCommands(EXTENDED)
    taken(commands, Action.ON)
    assert commands.begin() is Relay.ON
    assert commands.end(None, http_error=True, now=0.2, last_error="m: HTTP 500") == Outcome()
    assert commands.begin() is None  # a read without pout: the relay may have switched
    assert commands.carried is Relay.ON  # ... and still judged against the command
    assert commands.end(Relay.ON, http_error=False, now=6.3, last_error=None) == Outcome(
        (ok(Relay.ON),), settled=True
    )


def test_after_an_http_error_a_read_that_shows_no_switch_sends_again() -> None:
    commands = RelayCommands(EXTENDED)
    taken(commands, Action.ON)
    commands.begin()
    commands.end(None, http_error=True, now=0.2, last_error="m: HTTP 500")
    assert commands.begin() is None
    assert commands.end(Relay.OFF, http_error=False, now=6.3, last_error=None) == Outcome()
    assert commands.begin() is Relay.ON  # the verify is spent: the command goes again


def test_a_request_that_never_went_out_keeps_the_verify_read_pending() -> None:
    commands = RelayCommands(EXTENDED)
    taken(commands, Action.ON)
    commands.begin()
    commands.end(None, http_error=True, now=0.2, last_error="m: HTTP 500")
    assert commands.begin(sent=False) is None
    assert commands.carried is Relay.ON
    commands.end(None, http_error=False, now=6.3, last_error="m: cannot resolve")
    assert commands.begin() is None  # still the read first: the meter was not asked


def test_a_command_not_confirmed_in_time_fails_with_the_last_error_and_is_dropped() -> None:
    commands = RelayCommands(EXTENDED)
    taken(commands, Action.ON)
    commands.begin()
    assert commands.end(None, http_error=True, now=0.2, last_error="m: HTTP 500") == Outcome()
    assert commands.expire(12.99, "m: HTTP 500", in_flight=False) == Outcome()
    reason = "not confirmed by the meter within 13 s (last error: m: HTTP 500)"
    assert commands.expire(13.0, "m: HTTP 500", in_flight=False) == Outcome((error(reason),), True, reason)
    # Never replayed: the next request is a plain poll, and nothing is left to fail.
    assert commands.waiting is None and commands.deadline(in_flight=False) is None
    assert commands.begin() is None
    assert commands.end(Relay.ON, http_error=False, now=14.0, last_error=None) == Outcome()
    assert commands.shutdown().results == ()


@pytest.mark.parametrize(
    ("interval", "last_error", "reason"),
    [
        (60.0, None, "not confirmed by the meter within 121 s"),  # a standard meter
        (6.0, "", "not confirmed by the meter within 13 s"),
        (2.5, "m: timed out", "not confirmed by the meter within 6 s (last error: m: timed out)"),
    ],
)
def test_the_expiry_reason_names_the_window_and_any_last_error(
    interval: float, last_error: str | None, reason: str
) -> None:
    commands = RelayCommands(interval)
    taken(commands, Action.OFF, reported=Relay.ON)
    assert commands.expire(1e6, last_error, in_flight=False).expired == reason


def test_a_request_in_flight_at_the_deadline_is_awaited_and_may_still_confirm() -> None:
    commands = RelayCommands(EXTENDED)
    taken(commands, Action.ON)
    commands.begin()
    assert commands.expire(20.0, None, in_flight=True) == Outcome()
    assert commands.deadline(in_flight=True) is None  # the loop must not spin on a past deadline
    assert commands.deadline(in_flight=False) == 13.0
    assert commands.end(Relay.ON, http_error=False, now=20.0, last_error=None) == Outcome(
        (ok(Relay.ON),), settled=True
    )


def test_a_request_in_flight_at_the_deadline_that_fails_expires_the_command_at_its_end() -> None:
    commands = RelayCommands(EXTENDED)
    taken(commands, Action.ON)
    commands.begin()
    ended = commands.end(None, http_error=False, now=20.0, last_error="m: timed out")
    reason = "not confirmed by the meter within 13 s (last error: m: timed out)"
    assert ended == Outcome((error(reason),), settled=True, expired=reason)


def test_a_late_confirmation_comes_before_the_newer_commands_expiry() -> None:
    commands = RelayCommands(EXTENDED)
    taken(commands, Action.ON)
    commands.begin()
    taken(commands, Action.OFF, now=1.0)  # its deadline, 14 s, passes while ON is on its way
    ended = commands.end(Relay.ON, http_error=False, now=15.0, last_error=None)
    reason = "not confirmed by the meter within 13 s"
    assert ended == Outcome((ok(Relay.ON), error(reason)), settled=True, expired=reason)


def test_a_poll_without_a_command_decides_nothing_before_the_deadline() -> None:
    commands = RelayCommands(EXTENDED)
    assert commands.begin() is None
    assert commands.end(Relay.ON, http_error=False, now=1.0, last_error=None) == Outcome()
    assert commands.expire(1e6, None, in_flight=False) == Outcome()
    assert commands.deadline(in_flight=False) is None


@pytest.mark.parametrize(
    ("steps", "count"),
    [
        ([], 0),
        (["ON"], 1),  # waiting for its slot
        (["ON", "begin"], 1),  # in flight, and still the waiting one: one result, not two
        (["ON", "begin", "OFF"], 2),  # in flight, and a newer one waiting
        (["ON", "begin", "end-ok"], 0),  # confirmed: nothing is open
    ],
)
def test_shutdown_answers_every_open_command_once(steps: list[str], count: int) -> None:
    commands = RelayCommands(EXTENDED)
    for step in steps:
        if step == "begin":
            commands.begin()
        elif step == "end-ok":
            commands.end(Relay.ON, http_error=False, now=1.0, last_error=None)
        else:
            taken(commands, Action(step))
    assert commands.shutdown().results == (error("bridge shutting down"),) * count
    assert commands.waiting is None and commands.carried is None
    assert commands.shutdown().results == ()
    assert commands.end(Relay.ON, http_error=False, now=2.0, last_error=None) == Outcome()


@pytest.mark.parametrize(("inverted", "pout"), [(False, 1), (True, 0)])
def test_an_inverted_relay_sends_and_confirms_through_the_pout_mapping(inverted: bool, pout: int) -> None:
    commands = RelayCommands(EXTENDED)
    taken(commands, Action.ON)
    target = commands.begin()
    assert target is not None and pout_for(target, inverted) == pout
    # The answer reports the pout it was sent: with the mapping, that is ON, confirmed.
    ended = commands.end(relay_from_pout(pout, inverted), http_error=False, now=1.0, last_error=None)
    assert ended.results == (ok(Relay.ON),)


def test_a_reply_gets_its_own_commands_result_and_only_that() -> None:
    commands = RelayCommands(EXTENDED)
    assert commands.receive(Action.ON, 0.0, Relay.OFF, reply="a").replies == ()
    # b supersedes a while a waits for its slot: a's reply gets "superseded", at once.
    assert commands.receive(Action.OFF, 1.0, Relay.OFF, reply="b").replies == (("a", error("superseded")),)
    assert commands.begin() is Relay.OFF
    # c arrives while b is in flight; the meter confirms b: b's reply, not c's.
    assert commands.receive(Action.ON, 2.0, Relay.OFF, reply="c").replies == ()
    ended = commands.end(Relay.OFF, http_error=False, now=3.0, last_error=None)
    assert ended.replies == (("b", ok(Relay.OFF)),)
    # c expires unconfirmed; an MQTT command (no reply) then refused: no reply at all.
    expired = commands.expire(2.0 + commands.window, None, in_flight=False)
    assert expired.replies == (("c", expired.results[0]),)
    assert commands.receive(Action.TOGGLE, 30.0, None).replies == ()


def test_a_refused_toggle_and_a_shutdown_reach_their_replies() -> None:
    commands = RelayCommands(EXTENDED)
    refused = commands.receive(Action.TOGGLE, 0.0, None, reply="t")
    unknown = error("relay state not known yet; send ON or OFF")
    assert refused.target is None and refused.replies == (("t", unknown),)
    commands.receive(Action.ON, 1.0, Relay.OFF, reply="a")
    commands.begin()
    commands.receive(Action.OFF, 2.0, Relay.OFF, reply="b")
    stopping = error("bridge shutting down")
    assert set(commands.shutdown().replies) == {("a", stopping), ("b", stopping)}


@pytest.mark.parametrize("seed", range(200))
def test_every_reply_gets_exactly_one_result_whatever_happens(seed: int) -> None:
    import random

    rng = random.Random(seed)
    commands = RelayCommands(EXTENDED)
    now, in_flight, sent = 0.0, False, 0
    got: dict[int, list[bytes]] = {}

    def collect(replies: tuple[tuple[object, bytes], ...]) -> None:
        for reply, payload in replies:
            assert isinstance(reply, int)
            got.setdefault(reply, []).append(payload)

    for _ in range(40):
        now += rng.choice((0.1, 1.0, 7.0))
        step = rng.choice(("command", "command", "begin", "end", "expire"))
        if step == "command":
            sent += 1
            action = rng.choice((Action.ON, Action.OFF, Action.TOGGLE))
            collect(commands.receive(action, now, rng.choice((Relay.ON, None)), reply=sent).replies)
        elif step == "begin" and not in_flight:
            commands.begin()
            in_flight = True
        elif step == "end" and in_flight:
            reported = rng.choice((Relay.ON, Relay.OFF, None))
            outcome = commands.end(reported, http_error=rng.random() < 0.3, now=now, last_error=None)
            collect(outcome.replies)
            in_flight = False
        elif step == "expire":
            collect(commands.expire(now, None, in_flight=in_flight).replies)
    collect(commands.shutdown().replies)
    assert sorted(got) == list(range(1, sent + 1))
    assert all(len(results) == 1 for results in got.values()), got
