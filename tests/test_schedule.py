"""schedule.Scheduler with a hand-moved clock: cadence, minimum gaps, commands."""

from __future__ import annotations

from itertools import pairwise

import pytest

from bridge.schedule import GUARD, Scheduler


def make(interval: float = 6.0, gap: float = 6.0) -> Scheduler[str]:
    sched: Scheduler[str] = Scheduler()
    sched.add("m", interval=interval, min_gap=gap, now=0.0)
    return sched


def test_first_poll_is_due_at_once_and_only_once() -> None:
    sched = make()
    assert sched.pop_due(0.0) == [("m", 0.0)]
    assert sched.pop_due(100.0) == []  # in flight: never twice
    assert sched.next_due() is None


@pytest.mark.parametrize(("interval", "gap"), [(6.0, 6.0), (60.0, 60.0), (10.0, 6.0)])
def test_cadence_keeps_interval_and_gap(interval: float, gap: float) -> None:
    sched = make(interval, gap)
    starts = []
    now = 0.0
    for _ in range(20):
        (_,) = sched.pop_due(now)
        starts.append(now)
        sched.finished("m", now, now)
        due = sched.next_due()
        assert due is not None
        now = due + 0.003  # a small dispatch lag every time
    gaps = [b - a for a, b in pairwise(starts)]
    assert min(gaps) >= gap + GUARD
    assert max(gaps) <= max(interval, gap + GUARD) + 0.003 + 1e-9


@pytest.mark.parametrize("duration", [0.0, 0.02, 0.1, 1.2, 4.9])
def test_the_meter_never_sees_two_arrivals_closer_than_the_gap(duration: float) -> None:
    # Whenever within [start, end] a request arrived, the next one arrives a gap later.
    sched = make(interval=6.0, gap=6.0)
    sched.pop_due(0.0)
    sched.finished("m", 0.0, duration)
    next_start = sched.next_due()
    assert next_start is not None
    worst_arrival = duration  # the first arrived as late as possible, the next at once
    assert next_start - worst_arrival >= 6.0 - 1e-9
    if duration <= GUARD:
        assert next_start == pytest.approx(6.0 + GUARD)  # a fast answer costs nothing


def test_late_start_never_plans_inside_the_gap() -> None:
    sched = make()
    sched.pop_due(0.0)
    sched.finished("m", 2.0, 2.0)  # started 2 s late
    assert sched.next_due() == pytest.approx(2.0 + 6.0 + GUARD)


def test_command_goes_at_the_earliest_slot_and_restarts_cadence() -> None:
    sched = make(interval=60.0, gap=6.0)
    sched.pop_due(0.0)
    sched.finished("m", 0.0, 0.0)
    assert sched.next_due() == 60.0
    sched.hurry("m", 1.0)
    assert sched.next_due() == pytest.approx(6.0 + GUARD)
    assert sched.pop_due(6.0) == []
    (_,) = sched.pop_due(6.1)
    sched.finished("m", 6.1, 6.1, command=True)
    sched.settle("m")
    assert sched.next_due() == pytest.approx(66.1)


def test_command_while_in_flight_waits_for_the_gap() -> None:
    sched = make(interval=60.0, gap=60.0)
    sched.pop_due(0.0)
    sched.hurry("m", 0.5)
    assert sched.next_due() is None  # still in flight
    sched.finished("m", 0.0, 0.0)
    assert sched.next_due() == pytest.approx(60.0 + GUARD)


def test_a_command_long_after_the_gap_is_due_when_it_arrived() -> None:
    # Its lag is measured against its arrival, not against a poll plan an hour old.
    sched = make(interval=3600.0, gap=6.0)
    sched.pop_due(0.0)
    sched.finished("m", 0.0, 0.1)
    sched.hurry("m", 30.0)
    assert sched.next_due() == 30.0
    assert sched.pop_due(30.002) == [("m", 30.0)]


def test_settle_returns_to_the_cadence() -> None:
    sched = make(interval=60.0, gap=6.0)
    sched.pop_due(0.0)
    sched.finished("m", 0.0, 0.0)
    sched.hurry("m", 1.0)
    sched.settle("m")
    assert sched.next_due() == 60.0


def test_many_meters_are_independent() -> None:
    sched: Scheduler[int] = Scheduler()
    for key in range(100):
        sched.add(key, interval=6.0, min_gap=6.0, now=0.0)
    ready = sched.pop_due(0.0)
    assert sorted(k for k, _ in ready) == list(range(100))
    for key in range(50):
        sched.finished(key, 0.0, 0.0)
    assert [k for k, _ in sched.pop_due(6.0 + GUARD)] == list(range(50))


# -- README "Polling and rate limits", rule by rule --------------------------------------


@pytest.mark.parametrize(
    ("started", "ended", "counted"),
    [
        (10.0, 10.0, 10.0),  # an instant answer: counted from the start
        (10.0, 10.04, 10.0),  # within the guard: still the start
        (10.0, 11.2, 11.15),  # a slow answer: answer - 50 ms, the latest the meter saw it
        (10.0, 15.0, 14.95),
    ],
)
def test_the_next_request_starts_a_gap_plus_50_ms_after_the_later_of_start_and_answer_minus_50_ms(
    started: float, ended: float, counted: float
) -> None:
    sched = make(interval=6.0, gap=6.0)
    sched.pop_due(0.0)
    sched.finished("m", started, ended)
    assert GUARD == 0.05
    assert sched.next_due() == pytest.approx(counted + 6.0 + 0.05)


def test_a_meter_that_takes_1_s_to_answer_is_polled_every_7_s() -> None:
    sched = make(interval=6.0, gap=6.0)
    starts = []
    now = 0.0
    for _ in range(10):
        assert [key for key, _ in sched.pop_due(now)] == ["m"]
        starts.append(now)
        sched.finished("m", now, now + 1.0)
        due = sched.next_due()
        assert due is not None
        now = due
    assert [round(b - a, 9) for a, b in pairwise(starts)] == [7.0] * 9


def test_never_two_requests_at_once_however_long_the_first_runs() -> None:
    sched = make(interval=6.0, gap=6.0)
    sched.pop_due(0.0)
    sched.hurry("m", 1.0)  # a command does not jump the running request either
    for now in (6.05, 13.0, 19.9):
        assert sched.pop_due(now) == []
    sched.finished("m", 0.0, 20.0)  # a 20 s timeout
    assert sched.pop_due(25.99) == []
    assert [key for key, _ in sched.pop_due(26.0)] == ["m"]  # 19.95 + 6.05


def test_a_command_replaces_the_next_poll_and_restarts_the_cadence() -> None:
    # A standard meter polled every 60 s, a command at 30 s: polls at 0, the command at 30,
    # then polls every 60 s counted from the command; the poll planned for 60 never comes.
    sched = make(interval=60.0, gap=6.0)
    sched.pop_due(0.0)
    sched.finished("m", 0.0, 0.0)
    sched.hurry("m", 30.0)
    assert sched.pop_due(30.0) == [("m", 30.0)]
    sched.finished("m", 30.0, 30.2, command=True)
    sched.settle("m")  # confirmed
    assert sched.pop_due(89.99) == []  # nothing at 60
    assert sched.pop_due(90.0) == [("m", 90.0)]
    sched.finished("m", 90.0, 90.2)
    assert sched.next_due() == 150.0


def test_an_unconfirmed_command_repeats_at_the_next_slot_the_gap_allows() -> None:
    sched = make(interval=60.0, gap=6.0)
    sched.pop_due(0.0)
    sched.finished("m", 0.0, 0.0)
    sched.hurry("m", 10.0)
    assert [key for key, _ in sched.pop_due(10.0)] == ["m"]
    sched.finished("m", 10.0, 10.3, command=True)  # not confirmed: it stays urgent
    assert sched.next_due() == pytest.approx(10.25 + 6.05)
