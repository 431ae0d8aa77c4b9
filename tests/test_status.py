"""status.py and the command results' classes: pure, with plain values and a hand-moved clock."""

from __future__ import annotations

import math

import pytest

from bridge.commands import (
    COMMAND_RESULTS,
    STATE_UNKNOWN,
    SUPERSEDED,
    command_result,
    http_status,
    result_error,
    result_ok,
)
from bridge.errors import (
    BodyError,
    MeterAuthError,
    MeterError,
    MeterHTTPError,
    MeterRateLimited,
    MeterTimeout,
    MeterUnreachable,
)
from bridge.readings import parse_body
from bridge.status import (
    RESULTS,
    Histogram,
    Rate,
    availability_word,
    available,
    health_payload,
    meter_row,
    request_result,
    total_energy,
    total_power,
)
from bridge.topics import Relay


def test_every_request_outcome_has_its_word() -> None:
    errors: list[tuple[MeterError | None, str]] = [
        (None, "ok"),
        (MeterRateLimited("m: HTTP 429", status=429), "rate_limited"),
        (MeterAuthError("m: HTTP 403", status=403), "bad_pin"),
        (MeterHTTPError("m: HTTP 500", status=500), "http_error"),
        (BodyError("m: not JSON"), "bad_body"),
        (MeterTimeout("m: no answer within 5 s"), "timeout"),
        (MeterUnreachable("m: refused"), "unreachable"),
        (MeterError("m: internal error"), "unreachable"),
    ]
    assert [request_result(e) for e, _ in errors] == [word for _, word in errors]
    assert {word for _, word in errors} == set(RESULTS)


def test_the_histogram_is_cumulative_with_an_infinite_last_bucket() -> None:
    h = Histogram((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 3.0):
        h.observe(seconds)
    assert h.cumulative() == [(0.1, 2), (1.0, 3), (math.inf, 4)]
    assert h.total == pytest.approx(3.65)


def test_rate_over_the_window_with_a_hand_moved_clock() -> None:
    rate = Rate(window=10.0)
    assert rate.per_second() == 0.0
    for second in range(31):
        rate.sample(float(second), second * 5)  # 5 a second
    assert rate.per_second() == pytest.approx(5.0)
    rate.sample(31.0, 150)  # nothing for a second: the window still spans 10 s
    assert rate.per_second() == pytest.approx(4.5)
    for second in range(32, 50):
        rate.sample(float(second), 150)
    assert rate.per_second() == 0.0


def test_available_is_null_only_until_a_request_ended() -> None:
    assert available(None, 0) is None
    assert available(None, 1) is False  # MQTT waits for 3; the API does not
    assert available(True, 2) is True
    assert available(False, 3) is False
    assert [availability_word(v) for v in (None, True, False)] == ["unknown", "online", "offline"]


def test_totals_prefer_the_meters_own() -> None:
    assert total_power({"W": 10, "W1": 3}) == 10
    assert total_power({"W1": 3, "W2": 4.5, "W3": 1}) == 8.5
    assert total_power({"V1": 230}) is None
    assert total_energy({"Wh": 7, "TWh": 9, "Wh1": 1}) == 7
    assert total_energy({"TWh": 9, "Wh1": 1}) == 9
    assert total_energy({"Wh1": 1, "Wh3": 2, "rWh1": 50}) == 3
    assert total_energy({}) is None


def test_a_meter_row() -> None:
    snap = parse_body(
        '{"devid": "17", "time": "1", "pout": "1", "data": {"W1": {"name": "Power 1", "unit": "W", '
        '"value": "120"}, "Wh1": {"name": "Energy 1", "unit": "Wh", "value": "5"}}}'
    )
    row = meter_row(
        devid="17",
        name="Garage",
        topic="garage",
        extended=False,
        available=True,
        relay="ON",
        last=snap,
        last_read=1.5,
        last_error=None,
    )
    assert row["readings"] == {"W1": 120, "Wh1": 5} and (row["power"], row["energy"]) == (120, 5)
    empty = meter_row(
        devid="17",
        name="x",
        topic="x",
        extended=True,
        available=None,
        relay=None,
        last=None,
        last_read=None,
        last_error="m: refused",
    )
    assert (empty["readings"], empty["power"], empty["energy"]) == ({}, None, None)


def test_health_payload() -> None:
    doc = health_payload(
        uptime=61.7,
        availabilities=[True, True, False, None],
        polls_per_s=0.333,
        requests={"ok": 9, "timeout": 1},
        mqtt_messages_per_s=12.345,
        rss_mb=None,
    )
    assert doc == {
        "uptime_s": 62,
        "meters": {"online": 2, "offline": 1, "unknown": 1},
        "polls_per_s": 0.33,
        "requests": {r: {"ok": 9, "timeout": 1}.get(r, 0) for r in RESULTS},
        "mqtt_messages_per_s": 12.35,
        "rss_mb": None,
    }


@pytest.mark.parametrize(
    ("result", "kind", "status"),
    [
        (result_ok(Relay.ON), "ok", 200),
        (result_error(SUPERSEDED), "superseded", 409),
        (result_error(STATE_UNKNOWN), "rejected", 409),
        (result_error("bridge shutting down"), "failed", 503),
        (result_error("not confirmed by the meter within 13 s (last error: x)"), "failed", 504),
    ],
)
def test_command_results_classified(result: bytes, kind: str, status: int) -> None:
    assert command_result(result) == kind and http_status(result) == status
    assert kind in COMMAND_RESULTS


def test_a_parser_refusal_is_rejected() -> None:
    assert command_result(result_error("unknown command 'X': use ON, OFF or TOGGLE")) == "rejected"
