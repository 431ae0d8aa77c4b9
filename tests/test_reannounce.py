"""The re-announce coalescing rule (bridge/reannounce.py), with a hand-moved clock."""

from __future__ import annotations

from bridge.reannounce import SPACING, Reannounce


def test_first_goes_at_once_and_a_burst_merges_into_one_more_after_spacing() -> None:
    plan = Reannounce()
    assert SPACING == 10.0
    assert plan.due() is None and plan.start(0.0) is None
    plan.request(100.0, state=True)
    assert plan.due() == 100.0
    assert plan.start(100.0) is True
    # While it runs, births merge into it.
    for t in (100.1, 100.2, 100.3):
        plan.request(t, state=True)
    assert plan.due() is None
    plan.finish()
    # After it: deferred to 10 s after its start, and all of the burst merges into that one.
    for i in range(300):
        plan.request(101.0 + i * 0.01, state=True)
    assert plan.due() == 110.0
    assert plan.start(109.99) is None
    assert plan.start(110.0) is True
    plan.finish()
    assert plan.due() is None and plan.start(200.0) is None


def test_a_request_long_after_the_last_start_goes_at_once() -> None:
    plan = Reannounce()
    plan.request(0.0, state=True)
    plan.start(0.0)
    plan.finish()
    plan.request(10.5, state=True)
    assert plan.due() == 10.5


def test_a_pending_one_waits_for_the_running_one() -> None:
    plan = Reannounce()
    plan.request(0.0, state=False)
    assert plan.start(0.0) is False
    plan.request(1.0, state=True)  # the running one sends no state: not covered
    assert plan.due() == 10.0
    assert plan.start(12.0) is None  # still running (a slow fleet)
    plan.finish()
    assert plan.start(12.0) is True


def test_state_is_merged_into_a_pending_one() -> None:
    plan = Reannounce()
    plan.request(0.0, state=True)
    plan.start(0.0)
    plan.finish()
    plan.request(1.0, state=False)
    plan.request(2.0, state=True)
    plan.request(3.0, state=False)
    assert plan.due() == 10.0 and plan.start(10.0) is True


def test_a_new_connection_drops_the_running_one_and_starts_at_once() -> None:
    plan = Reannounce()
    plan.request(0.0, state=True)
    plan.start(0.0)
    plan.request(3.0, state=False, fresh=True)
    assert plan.running is None and plan.due() == 3.0
    # It inherits the state the dropped run owed, and counts as the last start.
    assert plan.start(3.0) is True
    plan.finish()
    plan.request(4.0, state=True)
    assert plan.due() == 13.0


def test_a_new_connection_takes_over_a_deferred_one() -> None:
    plan = Reannounce()
    plan.request(0.0, state=True)
    plan.start(0.0)
    plan.finish()
    plan.request(1.0, state=True)
    assert plan.due() == 10.0
    plan.request(2.0, state=False, fresh=True)
    assert plan.due() == 2.0 and plan.start(2.0) is True
