"""End to end: the real bridge, the simulator over HTTP, a real broker (amqtt and mosquitto).

Extended meters allow one request per 6 s, so a test that needs a second request to the
same meter waits about 6 s: that is the device's rule, not a sleep.
"""

from __future__ import annotations

import logging
import re

import pytest
from paho.mqtt.client import topic_matches_sub
from shapes import json_object, present
from support import Rig, assert_rate_limit_kept, device

from bridge.service import Bridge
from bridge.simulator import SimMeter, make_fleet

PIN_3 = "731902"
PIN_1 = "582064"


@pytest.fixture(params=[0, 1], ids=["qos0", "qos1"])
def rig(request: pytest.FixtureRequest, rig: Rig) -> Rig:
    """Every test here also runs once with `mqtt.qos: 1`, on mosquitto: that is paho's
    publish() for every message (no one-buffer publish) and the dropped stale resends."""
    qos = request.param
    if qos == 1 and rig.broker.kind != "mosquitto":
        pytest.skip("qos 1 runs once, against mosquitto")
    bridge = rig.bridge

    def with_qos(*args: object, **options: object) -> Bridge:
        options.setdefault("qos", qos)
        return bridge(*args, **options)

    return Rig(rig.broker, rig.simulator, with_qos, rig.probe)


@pytest.fixture
def meters() -> tuple[SimMeter, SimMeter]:
    return (
        SimMeter(devid="1728053249", pin=PIN_3, phases=3, extended=True),
        SimMeter(devid="1728053250", pin=PIN_1, phases=1, extended=False),
    )


def test_every_topic_carries_the_meter_values(
    rig: Rig,
    meters: tuple[SimMeter, SimMeter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    three, one = meters
    sim = rig.simulator([three, one])
    probe = rig.probe("smartmac/#")
    rig.bridge([device(sim, three, topic="garage", name="Garage"), device(sim, one)])

    probe.wait_for("smartmac/bridge/availability", lambda m: m.payload == b"online")
    info = json_object(probe.wait_for("smartmac/bridge/info").json())
    assert info["version"]
    assert info["devices"] == [
        {"id": three.devid, "name": "Garage", "topic": "garage", "extended": True, "interval": 6.0},
        {"id": one.devid, "name": one.devid, "topic": one.devid, "extended": False, "interval": 60.0},
    ]
    for segment, meter, keys in (("garage", three, 21 + 1), (one.devid, one, 5 + 1)):
        state = json_object(probe.wait_for(f"smartmac/{segment}/state").json())
        assert state["devid"] == meter.devid and isinstance(state["time"], int)
        assert state["pout"] == 0 and state["relay"] == "OFF"
        readings = {k: v for k, v in state.items() if k not in ("devid", "time", "pout", "relay")}
        assert len(readings) == keys, readings
        for key, value in readings.items():
            msg = probe.wait_for(f"smartmac/{segment}/{key}")
            assert float(msg.payload) == pytest.approx(value), key
            assert msg.payload == msg.payload.strip()
        assert probe.wait_for(f"smartmac/{segment}/relay").payload == b"OFF"
        probe.wait_for(f"smartmac/{segment}/availability", lambda m: m.payload == b"online")
    assert not [m.topic for m in probe.messages if re.search(r"/br\d", m.topic)]
    assert set(json_object(present(probe.last("smartmac/garage/state")).json())) >= {"V1", "V3", "rWh3", "T"}

    # A subscriber that comes later gets every topic retained, with its latest payload.
    latest = {m.topic: m.payload for m in probe.messages}
    late = rig.probe("smartmac/#")
    for topic in latest:
        assert (
            late.wait_for(topic, lambda m: m.retain, timeout=5).payload == present(probe.last(topic)).payload
        )
    # B/+/state matches meter states only: checked on every topic the bridge published.
    assert {t for t in latest if topic_matches_sub("smartmac/+/state", t)} == {
        "smartmac/garage/state",
        f"smartmac/{one.devid}/state",
    }

    assert_rate_limit_kept(sim)
    assert PIN_3 not in caplog.text and PIN_1 not in caplog.text


def test_relay_commands_switch_the_meter(rig: Rig, meters: tuple[SimMeter, SimMeter]) -> None:
    three, _ = meters
    sim = rig.simulator([three])
    probe = rig.probe("smartmac/#")
    rig.bridge([device(sim, three, topic="garage")])
    probe.wait_for("smartmac/garage/relay", lambda m: m.payload == b"OFF")

    mark = probe.mark()
    probe.publish("smartmac/garage/relay/set", "on")
    result = probe.wait_for("smartmac/garage/relay/result", after=mark, timeout=15)
    assert result.json() == {"ok": True, "relay": "ON"} and not result.retain
    assert three.pout == 1 and [v for _, v in three.pout_requests] == [1]
    # The relay topic was already updated when the result arrived.
    assert present(probe.last("smartmac/garage/relay")).payload == b"ON"
    assert json_object(present(probe.last("smartmac/garage/state")).json())["relay"] == "ON"

    mark = probe.mark()
    probe.publish("smartmac/garage/relay/set", '{"state": "TOGGLE"}')
    assert probe.wait_for("smartmac/garage/relay/result", after=mark, timeout=15).json() == {
        "ok": True,
        "relay": "OFF",
    }
    assert three.pout == 0
    assert_rate_limit_kept(sim)


def test_inverted_relay_sends_and_reports_the_other_way(
    rig: Rig,
    meters: tuple[SimMeter, SimMeter],
) -> None:
    three, _ = meters
    sim = rig.simulator([three])
    probe = rig.probe("smartmac/#")
    rig.bridge([device(sim, three, topic="garage", relay_inverted=True)])
    probe.wait_for("smartmac/garage/relay", lambda m: m.payload == b"ON")  # pout 0, inverted
    mark = probe.mark()
    probe.publish("smartmac/garage/relay/set", "OFF")
    assert probe.wait_for("smartmac/garage/relay/result", after=mark).json() == {"ok": True, "relay": "OFF"}
    assert [v for _, v in three.pout_requests] == [1]


def test_bad_and_retained_commands_never_switch(
    rig: Rig,
    meters: tuple[SimMeter, SimMeter],
    caplog: pytest.LogCaptureFixture,
) -> None:
    three, _ = meters
    sim = rig.simulator([three])
    probe = rig.probe("smartmac/#")
    # A stale command left retained on the broker before the bridge starts.
    probe.publish("smartmac/garage/relay/set", "ON", retain=True)
    rig.bridge([device(sim, three, topic="garage")])
    probe.wait_for("smartmac/garage/state")

    garbage = [b"", b"ONN", b"2", b'{"state": "DIM"}', b"\xff", b"{" * 1000]
    for payload in garbage:
        mark = probe.mark()
        probe.publish("smartmac/garage/relay/set", payload)
        result = json_object(probe.wait_for("smartmac/garage/relay/result", after=mark).json())
        assert result["ok"] is False and result["error"], payload

    # The retained ON was ignored: no result for it, and the meter saw no pout at all,
    # even at its next slot (the state published after it still says OFF).
    first_state = probe.wait_for("smartmac/garage/state")
    second_state = probe.wait_for(
        "smartmac/garage/state", after=probe.messages.index(first_state) + 1, timeout=15
    )
    assert json_object(second_state.json())["relay"] == "OFF"
    assert three.pout_requests == [] and three.pout == 0
    results = [m for m in probe.messages if m.topic == "smartmac/garage/relay/result"]
    assert len(results) == len(garbage)
    assert "ignored a retained command on smartmac/garage/relay/set" in caplog.text
    assert_rate_limit_kept(sim)
    probe.publish("smartmac/garage/relay/set", b"", retain=True)  # clear it on the broker


def test_commands_before_the_slot_coalesce(rig: Rig, meters: tuple[SimMeter, SimMeter]) -> None:
    three, _ = meters
    sim = rig.simulator([three])
    probe = rig.probe("smartmac/#")
    rig.bridge([device(sim, three, topic="garage")])
    probe.wait_for("smartmac/garage/relay", lambda m: m.payload == b"OFF")
    mark = probe.mark()
    for payload in ("ON", "OFF", "ON"):
        probe.publish("smartmac/garage/relay/set", payload)
    probe.wait_for(
        "smartmac/garage/relay/result", lambda m: json_object(m.json()).get("ok") is True, after=mark
    )
    results = [m.json() for m in probe.messages[mark:] if m.topic == "smartmac/garage/relay/result"]
    assert results == [
        {"ok": False, "error": "superseded"},
        {"ok": False, "error": "superseded"},
        {"ok": True, "relay": "ON"},
    ]
    assert [v for _, v in three.pout_requests] == [1]
    assert_rate_limit_kept(sim)


def test_availability_goes_offline_after_three_failures_and_back(
    rig: Rig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    (meter,) = make_fleet(1, phases=1, extended=True)
    sim = rig.simulator([meter])
    sim.set_fault(meter.devid, "http500")
    probe = rig.probe("smartmac/#")
    rig.bridge([device(sim, meter, topic="m")])

    probe.wait_for("smartmac/m/availability", lambda m: m.payload == b"offline", timeout=20)
    assert meter.requests == 3  # the third failure, not before (the next is 6 s away)
    mark = probe.mark()
    # Nothing from a failed read is published.
    assert probe.last("smartmac/m/state") is None
    sim.set_fault(meter.devid, "ok")
    probe.wait_for("smartmac/m/availability", lambda m: m.payload == b"online", after=mark, timeout=20)
    assert probe.last("smartmac/m/state") is not None
    # Logged once per change of state: the repeats went to debug.
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "HTTP 500" in r.getMessage()]
    assert len(warnings) == 1 and caplog.text.count("HTTP 500") == 3
    assert "back online" in caplog.text
    assert meter.pin not in caplog.text
    assert_rate_limit_kept(sim)


def test_offline_after_three_failures_of_a_meter_that_was_online(rig: Rig) -> None:
    (meter,) = make_fleet(1, phases=1, extended=True)
    sim = rig.simulator([meter])
    probe = rig.probe("smartmac/#")
    rig.bridge([device(sim, meter, topic="m")])
    probe.wait_for("smartmac/m/availability", lambda m: m.payload == b"online")
    # Break it just after a fresh poll, so no request is in flight across the switch.
    probe.wait_for("smartmac/m/relay", after=probe.mark())
    sim.set_fault(meter.devid, "truncated")
    mark = probe.mark()
    before = meter.requests
    probe.wait_for("smartmac/m/availability", lambda m: m.payload == b"offline", after=mark, timeout=25)
    assert meter.requests - before == 3
    states = [m for m in probe.messages[mark:] if m.topic == "smartmac/m/state"]
    assert states == []


def test_wrong_pin_is_an_error_and_never_logged(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    (meter,) = make_fleet(1, phases=1, extended=True)
    sim = rig.simulator([meter])
    probe = rig.probe("smartmac/#")
    wrong = "864209"
    rig.bridge([device(sim, meter, topic="m", pin=wrong)])
    probe.wait_for("smartmac/m/availability", lambda m: m.payload == b"offline", timeout=20)
    assert meter.bad_pin == 3 and meter.ok == 0
    assert "devid/PIN refused" in caplog.text
    assert wrong not in caplog.text
    assert all(wrong.encode() not in m.payload for m in probe.messages)


def test_republishes_everything_after_a_broker_restart(
    rig: Rig,
    meters: tuple[SimMeter, SimMeter],
) -> None:
    if rig.broker.restart is None:
        pytest.skip("only the mosquitto fixture can be restarted")
    three, one = meters
    sim = rig.simulator([three, one])
    probe = rig.probe("smartmac/#")
    bridge = rig.bridge([device(sim, three, topic="garage"), device(sim, one, topic="one")])
    topics = (
        "smartmac/bridge/availability",
        "smartmac/bridge/info",
        "smartmac/one/state",
        "smartmac/one/V1",
        "smartmac/one/relay",
        "smartmac/one/availability",
        "smartmac/garage/state",
        "smartmac/garage/availability",
    )
    for topic in topics:
        probe.wait_for(topic)
    before = {m.topic: m.payload for m in probe.messages}
    probe.stop()

    rig.broker.restart()  # no persistence: every retained message is gone
    # Whether this probe connects before or after the bridge's replay, it sees every topic.
    fresh = rig.probe("smartmac/#")
    for topic in topics:
        fresh.wait_for(topic, timeout=5)
    # ...and what it saw is retained on the new broker again.
    again = rig.probe("smartmac/#")
    for topic in topics:
        message = again.wait_for(topic, lambda m: m.retain, timeout=5)
        if topic.startswith("smartmac/one/"):
            assert message.payload == before[topic]  # the standard meter has not been polled again
    assert bridge.link.connected.is_set()
    # Commands work again after the restart.
    mark = fresh.mark()
    fresh.publish("smartmac/garage/relay/set", "ON")
    assert fresh.wait_for("smartmac/garage/relay/result", after=mark).json() == {"ok": True, "relay": "ON"}
    assert_rate_limit_kept(sim)


def test_odd_numbers_are_left_out_and_key_topics_agree_with_state(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    # Issue 12, item 6: the simulator's odd_numbers fault sends V1 "1e-400" (underflows to
    # 0.0), A1 in Arabic-Indic digits, W1 as a 4,000-digit JSON number, T as JSON 1e999, and
    # PF1 as a good JSON number. One rule for both forms: the four are left out of B/D/KEY
    # and B/D/state alike; PF1 goes out as sent; every B/D/KEY says what B/D/state says.
    meter = SimMeter(devid="1728053251", pin=PIN_1, phases=1, extended=False, fault="odd_numbers")
    sim = rig.simulator([meter])
    probe = rig.probe("smartmac/#")
    rig.bridge([device(sim, meter, topic="odd")])
    state = probe.wait_for("smartmac/odd/state").json()
    assert isinstance(state, dict)
    probe.sync("smartmac")
    readings = {k: v for k, v in state.items() if k not in ("devid", "time", "pout", "relay")}
    assert set(readings) == {"Wh1", "PF1"}
    keys = {m.topic.rsplit("/", 1)[1]: m.payload for m in probe.messages if m.topic.count("/") == 2}
    assert not {"V1", "A1", "W1", "T"} & set(keys)
    assert re.fullmatch(rb"0\.\d\d", keys["PF1"])  # the JSON number's own text
    for key, value in readings.items():
        assert float(keys[key]) == value, key
    for key in ("V1", "A1", "W1", "T"):
        assert f"key {key} has no numeric value" in caplog.text
