"""changes.ChangeFilter: publish.mode on_change, with a moved clock (no sleeps)."""

from __future__ import annotations

import pytest

from bridge.changes import ChangeFilter, state_fingerprint
from bridge.readings import Reading, Snapshot


def test_only_changes_and_heartbeats_pass() -> None:
    f = ChangeFilter(heartbeat=300)
    first = [("b/m/V1", b"230"), ("b/m/Wh1", b"5"), ("b/m/relay", b"OFF")]
    assert f.select(first, now=0.0) == first  # all new
    assert f.select([("b/m/V1", b"231"), ("b/m/Wh1", b"5"), ("b/m/relay", b"OFF")], now=60.0) == [
        ("b/m/V1", b"231")
    ]
    assert f.select([("b/m/V1", b"231"), ("b/m/Wh1", b"5"), ("b/m/relay", b"OFF")], now=120.0) == []
    # Wh1 and relay were last sent at 0, V1 at 60: at 300 the first two are due again.
    assert f.select([("b/m/V1", b"231"), ("b/m/Wh1", b"5"), ("b/m/relay", b"OFF")], now=300.0) == [
        ("b/m/Wh1", b"5"),
        ("b/m/relay", b"OFF"),
    ]
    assert f.select([("b/m/V1", b"231")], now=359.9) == []
    assert f.select([("b/m/V1", b"231")], now=360.0) == [("b/m/V1", b"231")]


def test_a_change_back_is_a_change() -> None:
    f = ChangeFilter(heartbeat=300)
    for now, payload, sent in ((0, b"ON", True), (6, b"OFF", True), (12, b"ON", True), (18, b"ON", False)):
        assert bool(f.select([("b/m/relay", payload)], now)) is sent


def test_compare_value_replaces_the_payload() -> None:
    f = ChangeFilter(heartbeat=300)
    assert f.select([("b/m/state", b'{"time":1}')], 0, {"b/m/state": "same"})
    assert f.select([("b/m/state", b'{"time":2}')], 6, {"b/m/state": "same"}) == []
    assert f.select([("b/m/state", b'{"time":3}')], 12, {"b/m/state": "other"}) == [
        ("b/m/state", b'{"time":3}')
    ]


def test_state_fingerprint_ignores_the_meter_clock() -> None:
    readings = (Reading("V1", "V", "V", "230.10", 230.1),)
    a = Snapshot("1", 1000, 0, readings)
    assert state_fingerprint(a) == state_fingerprint(Snapshot("1", 1006, 0, readings))
    assert state_fingerprint(a) != state_fingerprint(Snapshot("1", 1006, 1, readings))
    assert state_fingerprint(a) != state_fingerprint(
        Snapshot("1", 1006, 0, (Reading("V1", "V", "V", "230.1", 230.1),))
    )  # the text as sent


def test_forget_drops_only_the_given_topics() -> None:
    f = ChangeFilter(heartbeat=300)
    f.select([("t", b"1"), ("u", b"1")], 0)
    f.forget(["t"])
    assert f._sent.keys() == {"u"}
    assert f.select([("t", b"1"), ("u", b"1")], 1) == [("t", b"1")]


@pytest.mark.parametrize("heartbeat", [0, -1, float("nan")])
def test_heartbeat_must_be_positive(heartbeat: float) -> None:
    with pytest.raises(ValueError, match="heartbeat"):
        ChangeFilter(heartbeat)
