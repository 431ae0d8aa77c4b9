"""keyset.KeyTracker: a key absent from 3 good reads in a row is forgotten, and only then."""

from __future__ import annotations

import pytest

from bridge.keyset import FORGET_AFTER, KeyTracker


def test_a_key_is_forgotten_at_its_third_absent_read() -> None:
    tracker = KeyTracker()
    assert FORGET_AFTER == 3
    assert tracker.update(["V1", "W1", "T"]) == []
    assert tracker.update(["V1", "T"]) == []
    assert tracker.update(["V1", "T"]) == []
    assert tracker.update(["V1", "T"]) == ["W1"]
    assert tracker.update(["V1", "T"]) == []  # once


def test_a_key_back_before_its_time_starts_counting_again() -> None:
    tracker = KeyTracker()
    tracker.update(["V1", "W1"])
    tracker.update(["V1"])
    tracker.update(["V1"])
    tracker.update(["V1", "W1"])  # back at the third read: kept
    assert [tracker.update(["V1"]) for _ in range(3)] == [[], [], ["W1"]]


def test_the_same_keys_forget_nothing() -> None:
    tracker = KeyTracker()
    keys = ["V1", "A1", "Wh1"]
    assert all(tracker.update(keys) == [] for _ in range(10))
    assert tracker.update(list(reversed(keys))) == []  # order is no change


def test_churn_forgets_every_read_and_stays_bounded() -> None:
    tracker = KeyTracker()
    forgotten = [tracker.update([f"X{n}_0", f"X{n}_1"]) for n in range(10)]
    assert forgotten[:3] == [[], [], []]
    assert forgotten[3] == ["X0_0", "X0_1"] and forgotten[9] == ["X6_0", "X6_1"]
    # Remembered: the keys of this read and of the two before it, nothing older.
    assert len(tracker._known) == 6


def test_several_keys_vanishing_at_different_reads() -> None:
    tracker = KeyTracker(after=2)
    tracker.update(["a", "b", "c"])
    assert tracker.update(["b", "c"]) == []
    assert tracker.update(["c"]) == ["a"]
    assert tracker.update(["c"]) == ["b"]
    assert tracker.update([]) == []
    assert tracker.update([]) == ["c"]


def test_after_must_be_positive() -> None:
    with pytest.raises(ValueError, match="after"):
        KeyTracker(after=0)
