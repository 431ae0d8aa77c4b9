"""counters.CounterGuard: energy counters never go down on MQTT, unless a drop is confirmed."""

from __future__ import annotations

import logging

import pytest

from bridge.counters import CONFIRM_READS, CounterGuard, is_counter
from bridge.readings import Reading, Snapshot


def snap(**values: str) -> Snapshot:
    readings = tuple(
        Reading(key, key, "Wh", text, float(text) if "." in text else int(text))
        for key, text in values.items()
    )
    return Snapshot("1", 0, 0, readings)


def texts(s: Snapshot) -> dict[str, str]:
    return {r.key: r.text for r in s.readings}


@pytest.mark.parametrize(
    ("key", "counter"),
    [
        ("Wh", True),
        ("Wh1", True),
        ("rWh3", True),
        ("TWh", True),
        ("rTWh", True),
        ("Wh12", True),
        ("W1", False),
        ("rW1", False),
        ("V1", False),
        ("T", False),
        ("wh1", False),
        ("TWh1x", False),
        ("Ch1", False),
    ],
)
def test_counter_keys(key: str, counter: bool) -> None:
    assert is_counter(key) is counter


def test_the_power_cut_glitch_is_held_back() -> None:
    guard = CounterGuard()
    assert texts(guard.apply(snap(Wh1="467556", V1="230")).snapshot) == {"Wh1": "467556", "V1": "230"}
    first = guard.apply(snap(Wh1="467.555", V1="231"))
    # The counter keeps its last good reading; other keys pass through.
    assert texts(first.snapshot) == {"Wh1": "467556", "V1": "231"}
    assert first.held == ("Wh1",)
    assert first.snapshot.readings[0].value == 467556
    [(level, text)] = first.log
    assert level == logging.WARNING and "Wh1 467556 -> 467.555" in text
    # The meter comes back: published, no second warning, one INFO.
    back = guard.apply(snap(Wh1="467560", V1="231"))
    assert texts(back.snapshot)["Wh1"] == "467560" and back.held == ()
    assert [level for level, _ in back.log] == [logging.INFO]


def test_a_drop_reported_three_reads_in_a_row_is_a_real_reset() -> None:
    guard = CounterGuard()
    guard.apply(snap(Wh1="1000"))
    results = [guard.apply(snap(Wh1=v)) for v in ("5", "6", "7", "8")]
    assert [texts(r.snapshot)["Wh1"] for r in results] == ["1000", "1000", "7", "8"]
    levels = [[level for level, _ in r.log] for r in results]
    # One warning per event, when it starts; INFO when it is accepted; then quiet.
    assert levels == [[logging.WARNING], [], [logging.INFO], []]
    assert "accepted as a counter reset" in results[2].log[0][1]
    assert CONFIRM_READS == 3


def test_lower_reads_must_be_consecutive() -> None:
    guard = CounterGuard()
    guard.apply(snap(Wh1="1000"))
    published = [texts(guard.apply(snap(Wh1=v)).snapshot)["Wh1"] for v in ("5", "6", "1000", "7", "8", "9")]
    # The return to 1000 ends the first hold; the next drop starts counting from one again.
    assert published == ["1000", "1000", "1000", "1000", "1000", "9"]


def test_each_counter_is_guarded_on_its_own_and_one_warning_names_them_all() -> None:
    guard = CounterGuard()
    guard.apply(snap(Wh1="100", Wh2="200", rWh1="0", TWh="300"))
    result = guard.apply(snap(Wh1="0.100", Wh2="201", rWh1="0.000", TWh="0.300"))
    assert texts(result.snapshot) == {"Wh1": "100", "Wh2": "201", "rWh1": "0.000", "TWh": "300"}
    assert result.held == ("Wh1", "TWh")
    [(level, text)] = result.log
    assert level == logging.WARNING and "Wh1 100 -> 0.100" in text and "TWh 300 -> 0.300" in text


def test_nothing_is_copied_when_nothing_is_held() -> None:
    guard = CounterGuard()
    s = snap(Wh1="1", V1="2")
    assert guard.apply(s).snapshot is s
    later = snap(Wh1="2", V1="1")
    assert guard.apply(later).snapshot is later


def test_a_key_missing_from_a_read_keeps_its_state() -> None:
    guard = CounterGuard()
    guard.apply(snap(Wh1="100"))
    guard.apply(snap(V1="1"))
    assert texts(guard.apply(snap(Wh1="50")).snapshot) == {"Wh1": "100"}


def test_confirm_is_configurable() -> None:
    guard = CounterGuard(confirm=1)
    guard.apply(snap(Wh1="100"))
    result = guard.apply(snap(Wh1="50"))
    assert texts(result.snapshot) == {"Wh1": "50"}
    assert [level for level, _ in result.log] == [logging.WARNING, logging.INFO]


def test_forget_drops_what_the_guard_knew_of_a_key() -> None:
    guard = CounterGuard()
    guard.apply(Snapshot("1", 0, 0, (Reading("Wh1", "E", "Wh", "500", 500),)))
    guard.forget("Wh1")
    assert (guard._good, guard._holds, guard._kinds) == ({}, {}, {})
    # Back later, a lower value is a new start, not a drop to hold back.
    later = guard.apply(Snapshot("1", 9, 0, (Reading("Wh1", "E", "Wh", "5", 5),)))
    assert later.held == ()
