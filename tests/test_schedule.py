"""schedule.Scheduler with a hand-moved clock: cadence, minimum gaps, commands."""

from __future__ import annotations

import itertools

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
        (_item,) = sched.pop_due(now)
        starts.append(now)
        sched.finished("m", now, now)
        due = sched.next_due()
        assert due is not None
        now = due + 0.003  # a small dispatch lag every time
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= gap + GUARD
    assert max(gaps) <= max(interval, gap + GUARD) + 0.003 + 1e-9


@pytest.mark.parametrize("duration", [0.0, 0.02, 0.1, 1.2, 4.9])
def test_the_meter_never_sees_two_arrivals_closer_than_the_gap(duration: float) -> None:
    # Whenever within [start, end] a request arrived, the next one arrives a gap later.
    sched = make(interval=6.0, gap=6.0)
    ((_, _planned),) = sched.pop_due(0.0)
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
    (_item,) = sched.pop_due(6.1)
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
