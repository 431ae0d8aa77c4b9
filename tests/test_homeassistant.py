"""End to end, issue 4: Home Assistant discovery, the energy-counter guard and on_change.

The real bridge against the simulator over HTTP and a real broker (amqtt and mosquitto);
everything is judged by what arrives over MQTT. Slow cases (several reads of one meter)
run side by side under two bridges in one test, so the suite pays their 6 s gaps once.
"""

from __future__ import annotations

import itertools
import json
import logging

import pytest
from shapes import json_object
from support import Message, Rig, assert_rate_limit_kept, device
from test_discovery import check_ha_rules

from bridge import __version__
from bridge.config import HomeAssistantSettings, PublishSettings
from bridge.simulator import SimMeter

THREE = SimMeter(devid="1728053249", pin="731902", phases=3, extended=True)
ONE = SimMeter(devid="1728053250", pin="582064", phases=1, extended=False)
GHOST = "1111111111"  # a meter an earlier run announced, no longer configured


def fresh(meter: SimMeter) -> SimMeter:
    # SimMeter keeps counters and state; every test gets its own.
    return SimMeter(devid=meter.devid, pin=meter.pin, phases=meter.phases, extended=meter.extended)


def ghost_config(state_topic: str) -> bytes:
    return json.dumps({"name": "Voltage 1", "state_topic": state_topic, "unique_id": "x"}).encode()


def test_discovery_configs_resend_and_ghost_cleanup(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    three, one = fresh(THREE), fresh(ONE)
    sim = rig.simulator([three, one])
    probe = rig.probe("#")
    # Left on the broker by earlier runs (and by others): only our ghost must go.
    ours = {
        f"homeassistant/sensor/smartmac_{GHOST}/V1/config": ghost_config("smartmac/old/V1"),
        f"homeassistant/switch/smartmac_{GHOST}/relay/config": ghost_config("smartmac/old/relay"),
    }
    foreign = {
        # Another smartmac-bridge on this broker, with another base topic.
        "homeassistant/sensor/smartmac_2222222222/V1/config": ghost_config("elsewhere/x/V1"),
        # Another integration altogether.
        "homeassistant/sensor/zigbee_0x1234/temperature/config": ghost_config("smartmac/z"),
    }
    for topic, payload in {**ours, **foreign}.items():
        probe.publish(topic, payload, retain=True)

    rig.bridge([device(sim, three, topic="garage", name="Garage"), device(sim, one, name="Workshop")])

    for topic in ours:
        probe.wait_for(topic, lambda m: m.payload == b"", timeout=15)
    expected: dict[str, SimMeter] = {}
    for segment, meter, keys in (("garage", three, 22), (one.devid, one, 6)):
        state = json_object(probe.wait_for(f"smartmac/{segment}/state").json())
        readings = [k for k in state if k not in ("devid", "time", "pout", "relay")]
        assert len(readings) == keys
        for key in readings:
            expected[f"homeassistant/sensor/smartmac_{meter.devid}/{key}/config"] = meter
        expected[f"homeassistant/switch/smartmac_{meter.devid}/relay/config"] = meter

    configs: dict[str, dict[str, object]] = {}
    for topic in expected:
        configs[topic] = json_object(probe.wait_for(topic).json())
        check_ha_rules(topic, configs[topic])
    unique_ids = [c["unique_id"] for c in configs.values()]
    assert len(unique_ids) == len(set(unique_ids)) == 22 + 6 + 2
    for topic, config in configs.items():
        meter = expected[topic]
        segment = "garage" if meter is three else one.devid
        assert config["device"] == {
            "identifiers": [f"smartmac_{meter.devid}"],
            "name": "Garage" if meter is three else "Workshop",
            "manufacturer": "SMART MAIC",
            "model": "3-phase meter (extended)" if meter is three else "1-phase meter",
        }
        assert config["origin"] == {"name": "smartmac-bridge", "sw_version": __version__}
        assert config["availability"] == [
            {"topic": "smartmac/bridge/availability"},
            {"topic": f"smartmac/{segment}/availability"},
        ]
        # The state topic each config names carries the value, retained.
        value = probe.wait_for(str(config["state_topic"]))
        assert value.payload in (b"ON", b"OFF") if "switch" in topic else float(value.payload) >= 0
    garage_wh = configs["homeassistant/sensor/smartmac_1728053249/Wh1/config"]
    assert (garage_wh["device_class"], garage_wh["state_class"], garage_wh["unit_of_measurement"]) == (
        "energy",
        "total_increasing",
        "Wh",
    )
    relay = configs["homeassistant/switch/smartmac_1728053249/relay/config"]
    assert relay["command_topic"] == "smartmac/garage/relay/set"

    # Retained for Home Assistant when it connects later: ours there, the ghost gone, the
    # foreign configs untouched.
    late = rig.probe("homeassistant/#")
    late.sync("homeassistant")
    retained = {m.topic for m in late.messages if m.retain}
    assert set(expected) <= retained
    assert set(foreign) <= retained
    assert not set(ours) & retained
    assert f"cleared 2 discovery config(s) of meter(s) no longer configured: {GHOST}" in caplog.text

    # Home Assistant restarts: its birth message brings every config and state again. The
    # standard meter is not polled again within 60 s, so what comes is the resend.
    polls = one.ok
    mark = probe.mark()
    probe.publish("homeassistant/status", "online")
    for topic in expected:
        assert (
            probe.wait_for(topic, after=mark).payload
            == json.dumps(configs[topic], separators=(",", ":"), ensure_ascii=False).encode()
        )
    for segment in ("garage", one.devid):
        for sub in ("state", "relay", "availability", "V1"):
            probe.wait_for(f"smartmac/{segment}/{sub}", after=mark)
    assert one.ok == polls
    # Other payloads on the status topic change nothing.
    mark = probe.mark()
    probe.publish("homeassistant/status", "offline")
    probe.sync("homeassistant")
    assert not [m for m in probe.messages[mark:] if m.topic.endswith("/config")]
    assert_rate_limit_kept(sim)
    for topic in foreign:  # tidy the shared broker
        probe.publish(topic, b"", retain=True)


def test_discovery_off_announces_nothing(rig: Rig) -> None:
    one = fresh(ONE)
    sim = rig.simulator([one])
    probe = rig.probe("#")
    ghost = f"homeassistant/sensor/smartmac_{GHOST}/V1/config"
    probe.publish(ghost, ghost_config("smartmac/old/V1"), retain=True)
    rig.bridge([device(sim, one, topic="one")], homeassistant=HomeAssistantSettings(discovery=False))
    probe.wait_for("smartmac/one/state")
    probe.publish("homeassistant/status", "online")
    probe.sync("homeassistant")
    ha = [m for m in probe.messages if m.topic.startswith("homeassistant/") and "probe-sync" not in m.topic]
    assert [(m.topic, m.payload) for m in ha] == [
        (ghost, ghost_config("smartmac/old/V1")),
        ("homeassistant/status", b"online"),
    ]
    probe.publish(ghost, b"", retain=True)


def _changed(previous: Message, message: Message) -> bool:
    if message.topic.endswith("/state"):
        # The state JSON always differs in the meter's clock; on_change ignores that.
        drop = ("time",)
        a = {k: v for k, v in json_object(previous.json()).items() if k not in drop}
        b = {k: v for k, v in json_object(message.json()).items() if k not in drop}
        return a != b
    return previous.payload != message.payload


def test_energy_guard_and_on_change(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """Two bridges side by side: `smartmac` polls every time and guards a meter whose
    counter drops; `onchange` publishes only changes plus a 10 s heartbeat."""
    caplog.set_level(logging.INFO)
    guarded = SimMeter(devid="1728053260", pin="402913", phases=1, extended=True)
    quiet = SimMeter(devid="1728053261", pin="402914", phases=1, extended=True)
    sim = rig.simulator([guarded, quiet])
    probe = rig.probe("#")
    rig.bridge([device(sim, guarded, topic="g")])
    heartbeat = 10.0
    rig.bridge(
        [device(sim, quiet, topic="q")],
        base_topic="onchange",
        publish=PublishSettings(mode="on_change", heartbeat=heartbeat),
    )

    # Guard: a good read, then the meter's counter drops 1000x for good.
    first = probe.wait_for("smartmac/g/state")
    good = json_object(first.json())["Wh1"]
    good_text = probe.wait_for("smartmac/g/Wh1").payload
    sim.set_fault(guarded.devid, "drop_wh")  # 6 s before the next read
    states = [first]
    for _ in range(3):
        states.append(
            probe.wait_for("smartmac/g/state", after=probe.messages.index(states[-1]) + 1, timeout=20)
        )
    held, low = states[1:3], states[3]
    assert [json_object(s.json())["Wh1"] for s in held] == [good, good]
    assert json_object(low.json())["Wh1"] < good / 100
    # B/g/Wh1 (published just before each state): the held value twice, then the drop.
    wh1 = [m.payload for m in probe.messages[: probe.messages.index(low)] if m.topic == "smartmac/g/Wh1"]
    assert wh1[:3] == [good_text] * 3 and len(wh1) == 4
    assert float(wh1[3]) == json_object(low.json())["Wh1"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and guarded.devid in r.getMessage()]
    assert len(warnings) == 1 and "energy counter went down: Wh1" in warnings[0].getMessage()
    assert "accepted as a counter reset" in caplog.text

    # on_change, over the same four reads of the other meter.
    probe.wait_for(
        "onchange/q/rW1", after=probe.messages.index(probe.wait_for("onchange/q/rW1")) + 1, timeout=20
    )  # the heartbeat resend of "0"
    polls = quiet.ok
    messages = [
        m
        for m in probe.messages
        if m.topic.startswith("onchange/q/") and not m.topic.endswith("availability")
    ]
    by_topic: dict[str, list[Message]] = {}
    for message in messages:
        by_topic.setdefault(message.topic, []).append(message)
    assert len(by_topic["onchange/q/rW1"]) < polls  # unchanged: not sent every poll
    for topic, sent in by_topic.items():
        for previous, message in itertools.pairwise(sent):
            # Sent again only changed, or a heartbeat later (1 s slack for delivery).
            assert _changed(previous, message) or message.received - previous.received >= heartbeat - 1, topic
    # Each bridge's ghost cleanup left the other's configs alone.
    cleared = [m.topic for m in probe.messages if m.topic.startswith("homeassistant/") and m.payload == b""]
    assert cleared == []
    assert probe.last(f"homeassistant/sensor/smartmac_{quiet.devid}/V1/config") is not None
    assert_rate_limit_kept(sim)


def test_odd_labels_and_keys_that_differ_in_case(rig: Rig) -> None:
    # Issue 12, item 8: the simulator's odd_labels fault labels V1 with a bell, a newline, a
    # lone surrogate and 100 more characters, and sends wh1 beside Wh1. Before, the label
    # could not be encoded (no config of the meter went out at all) and wh1 took Wh1's
    # entity id.
    meter = SimMeter(devid="1728053251", pin="582064", phases=1, extended=False, fault="odd_labels")
    sim = rig.simulator([meter])
    probe = rig.probe("#")
    rig.bridge([device(sim, meter, topic="odd")])
    state = json_object(probe.wait_for("smartmac/odd/state").json())
    assert state["Wh1"] == state["wh1"]
    node = f"homeassistant/sensor/smartmac_{meter.devid}"
    configs = {
        key: json_object(probe.wait_for(f"{node}/{key}/config").json()) for key in ("V1", "Wh1", "wh1")
    }
    for key, config in configs.items():
        check_ha_rules(f"{node}/{key}/config", config)
    assert configs["V1"]["name"] == "Voltage 1 " + "x" * 54
    assert configs["Wh1"]["default_entity_id"] == f"sensor.smartmac_{meter.devid}_wh1"
    assert configs["wh1"]["default_entity_id"] == f"sensor.smartmac_{meter.devid}_wh1_2"
