"""Relay commands on their bad paths, end to end (bridge logic: run on the embedded amqtt)."""

from __future__ import annotations

import logging

import pytest
from shapes import json_object, present
from support import Rig, assert_rate_limit_kept, device

from bench.support import wait_until
from bridge.simulator import SimMeter, Simulator, make_fleet

# The logic under test does not depend on the broker; one real broker is enough here.
pytestmark = pytest.mark.parametrize("broker", ["amqtt"], indirect=True)


def extended_meter(rig: Rig) -> tuple[Simulator, SimMeter]:
    (meter,) = make_fleet(1, phases=1, extended=True)
    return rig.simulator([meter]), meter


def test_toggle_before_the_first_read_is_refused(rig: Rig) -> None:
    sim, meter = extended_meter(rig)
    sim.set_fault(meter.devid, "hang")  # no read ever completes
    probe = rig.probe("smartmac/#")
    rig.bridge([device(sim, meter, topic="m")])
    probe.wait_for("smartmac/bridge/availability")  # connected, so subscribed
    probe.publish("smartmac/m/relay/set", "TOGGLE")
    assert probe.wait_for("smartmac/m/relay/result").json() == {
        "ok": False,
        "error": "relay state not known yet; send ON or OFF",
    }
    assert meter.pout_requests == []


def test_a_command_not_confirmed_within_two_intervals_fails_and_is_never_replayed(rig: Rig) -> None:
    sim, meter = extended_meter(rig)
    probe = rig.probe("smartmac/#")
    rig.bridge([device(sim, meter, topic="m")])
    probe.wait_for("smartmac/m/relay", lambda m: m.payload == b"OFF")
    sim.set_fault(meter.devid, "http500")  # the meter stops answering usefully
    mark = probe.mark()
    probe.publish("smartmac/m/relay/set", "ON")
    result = json_object(probe.wait_for("smartmac/m/relay/result", after=mark, timeout=20).json())
    assert result["ok"] is False
    assert "not confirmed by the meter within 13 s" in result["error"] and "HTTP 500" in result["error"]
    # The meter comes back: the next request is a plain poll, the command is gone.
    sim.set_fault(meter.devid, "ok")
    mark = probe.mark()
    assert json_object(probe.wait_for("smartmac/m/state", after=mark, timeout=10).json())["relay"] == "OFF"
    assert meter.pout_requests == [] and meter.pout == 0
    assert len([m for m in probe.messages if m.topic == "smartmac/m/relay/result"]) == 1
    assert_rate_limit_kept(sim)


@pytest.mark.parametrize("heals", [True, False], ids=["fault-heals", "fault-stays"])
def test_the_result_follows_the_reported_pout_not_the_http_status(rig: Rig, heals: bool) -> None:
    # Real firmware has switched the relay and still answered with an error status; some
    # (homeassistant-smart-maic #27) does so for every switching request.
    sim, meter = extended_meter(rig)
    probe = rig.probe("smartmac/#")
    rig.bridge([device(sim, meter, topic="m")])
    probe.wait_for("smartmac/m/relay", lambda m: m.payload == b"OFF")
    sim.set_fault(meter.devid, "pout_error")
    mark = probe.mark()
    probe.publish("smartmac/m/relay/set", "ON")
    if heals:
        # The first request switches the relay but answers 500: not confirmed, no result yet.
        wait_until(lambda: meter.pout_requests != [], 10, "the command reached the meter")
        assert meter.pout == 1
        sim.set_fault(meter.devid, "ok")
    result = json_object(probe.wait_for("smartmac/m/relay/result", after=mark, timeout=20).json())
    assert result == {"ok": True, "relay": "ON"}
    # After an HTTP error the next slot reads the meter without pout first: the relay is
    # already ON, so that read confirms the command and nothing is switched twice.
    assert [v for _, v in meter.pout_requests] == [1]
    results = [m for m in probe.messages[mark:] if m.topic == "smartmac/m/relay/result"]
    assert len(results) == 1
    assert present(probe.last("smartmac/m/relay")).payload == b"ON"
    assert_rate_limit_kept(sim)


def test_a_meter_whose_request_cannot_start_does_not_stop_the_others(rig: Rig) -> None:
    # A scoped IPv6 address whose interface does not exist: connect() raises at once. It
    # must count as a failed request (offline after 3), and the others go on being polled.
    sim, meter = extended_meter(rig)
    probe = rig.probe("smartmac/#")
    bad = device(sim, meter, id="99", topic="bad", host="[fe80::1%25nosuchif]:80")
    rig.bridge([bad, device(sim, meter, topic="good")])
    probe.wait_for("smartmac/bad/availability", lambda m: m.payload == b"offline", timeout=20)
    wait_until(lambda: meter.ok >= 3, 20, "three polls of the good meter")
    assert present(probe.last("smartmac/good/availability")).payload == b"online"
    assert present(probe.last("smartmac/bridge/availability")).payload == b"online"


def test_a_command_waiting_for_its_slot_gets_an_error_on_shutdown(
    rig: Rig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    meter = SimMeter(devid="17", pin="135790", phases=1, extended=False)  # next slot in 60 s
    sim = rig.simulator([meter])
    probe = rig.probe("smartmac/#")
    bridge = rig.bridge([device(sim, meter, topic="m")])
    probe.wait_for("smartmac/m/relay")
    mark = probe.mark()
    probe.publish("smartmac/m/relay/set", "ON")
    wait_until(lambda: "relay command ON" in caplog.text, 5, "the bridge took the command")
    bridge.stop()
    assert probe.wait_for("smartmac/m/relay/result", after=mark, timeout=5).json() == {
        "ok": False,
        "error": "bridge shutting down",
    }
    probe.wait_for("smartmac/m/availability", lambda m: m.payload == b"offline", after=mark)
    assert meter.pout_requests == []


def test_a_command_on_its_way_is_judged_by_the_answer_not_superseded(rig: Rig) -> None:
    (meter,) = make_fleet(1, phases=1, extended=True)
    sim = rig.simulator([meter], delay=1.0)  # each answer takes 1 s: time to send another command
    probe = rig.probe("smartmac/#")
    rig.bridge([device(sim, meter, topic="m")])
    probe.wait_for("smartmac/m/relay", lambda m: m.payload == b"OFF")
    mark = probe.mark()
    probe.publish("smartmac/m/relay/set", "ON")
    wait_until(lambda: meter.pout_requests != [], 10, "ON reached the meter")
    probe.publish("smartmac/m/relay/set", "OFF")  # while ON's answer is still on its way
    first = probe.wait_for("smartmac/m/relay/result", after=mark, timeout=5)
    assert first.json() == {"ok": True, "relay": "ON"}
    second = probe.wait_for("smartmac/m/relay/result", after=probe.messages.index(first) + 1, timeout=15)
    assert second.json() == {"ok": True, "relay": "OFF"}
    assert [v for _, v in meter.pout_requests] == [1, 0]
    assert_rate_limit_kept(sim)
