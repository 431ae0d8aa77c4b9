"""availability: online after a good read, offline after 3 failed requests in a row."""

from __future__ import annotations

import pytest

from bridge.availability import FAILURES_OFFLINE, Availability, Failed, Good


def failed_times(state: Availability, count: int, text: str = "m: timed out") -> list[Failed]:
    return [state.failed(text) for _ in range(count)]


def test_nothing_is_decided_before_the_first_outcome() -> None:
    state = Availability()
    assert (state.available, state.failures, state.last_error) == (None, 0, None)


def test_the_first_good_read_publishes_online_without_a_back_online() -> None:
    state = Availability()
    assert state.good() == Good(publish_online=True, back_online=False)
    assert state.available is True


def test_good_reads_while_online_publish_nothing() -> None:
    state = Availability()
    state.good()
    assert state.good() == Good(publish_online=False, back_online=False)


def test_three_failures_in_a_row_publish_offline_once() -> None:
    state = Availability()
    state.good()
    assert FAILURES_OFFLINE == 3
    first, second, third, fourth = failed_times(state, 4)
    assert not first.publish_offline and not second.publish_offline
    assert third == Failed(new_error=False, publish_offline=True, failures=3)
    assert fourth == Failed(new_error=False, publish_offline=False, failures=4)  # already offline
    assert state.available is False


def test_a_meter_that_never_answered_goes_offline_at_three_too() -> None:
    state = Availability()
    assert [f.publish_offline for f in failed_times(state, 3)] == [False, False, True]
    assert state.available is False


def test_a_good_read_resets_the_count() -> None:
    state = Availability()
    failed_times(state, 2)
    state.good()
    assert [f.failures for f in failed_times(state, 2)] == [1, 2]
    assert state.available is True  # 2 in a row, not 4


def test_back_online_only_after_offline() -> None:
    state = Availability()
    failed_times(state, 3)
    assert state.good() == Good(publish_online=True, back_online=True)
    assert (state.available, state.failures, state.last_error) == (True, 0, None)


@pytest.mark.parametrize(
    ("texts", "new"),
    [
        (["a"], [True]),
        (["a", "a", "a"], [True, False, False]),  # the same error again goes to debug
        (["a", "b", "a"], [True, True, True]),  # every change of error is a warning
    ],
)
def test_a_warning_once_per_change_of_error(texts: list[str], new: list[bool]) -> None:
    state = Availability()
    assert [state.failed(t).new_error for t in texts] == new
    assert state.last_error == texts[-1]


def test_the_same_error_after_a_good_read_is_new_again() -> None:
    state = Availability()
    state.failed("a")
    state.good()
    assert state.failed("a").new_error
