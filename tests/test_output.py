"""publish.output (issue 11): what each output publishes, what Home Assistant is told to read,
and the retained topics another output left behind, cleared at the first connect.

The pure parts with plain values; then the real bridge, the simulator and a real broker
(amqtt and mosquitto): which topics end up retained in each output, and a switch from the
default to `json` that clears the old B/D/KEY topics.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from shapes import json_object
from support import Rig, device

from bridge import __version__
from bridge.changes import ChangeFilter, state_fingerprint
from bridge.config import HomeAssistantSettings, PublishSettings
from bridge.discovery import DeviceInfo, Discovery, value_template
from bridge.errors import ConfigError
from bridge.readings import parse_body
from bridge.simulator import SimMeter
from bridge.stale import MAX_SCAN_SECONDS, QUIET_SECONDS, SCAN_SECONDS, StaleScan, scan_subscription, stale
from bridge.topics import MeterTopics, Relay, state_messages

SEED = (Path(__file__).parent / "fixtures" / "seed_3phase_extended.body").read_bytes()
SNAP = parse_body(SEED)
KEYS = [r.key for r in SNAP.readings]
DEVICE = DeviceInfo("1728053249", "garage", "Garage", True)


# -- state messages per output -------------------------------------------------------------


def test_default_output_publishes_both_kinds() -> None:
    messages = dict(state_messages(MeterTopics("b", "garage"), SNAP, Relay.OFF))
    assert set(messages) == {f"b/garage/{k}" for k in KEYS} | {"b/garage/state", "b/garage/relay"}
    explicit = state_messages(MeterTopics("b", "garage", "attribute_and_json"), SNAP, Relay.OFF)
    assert dict(explicit) == messages


def test_json_output_publishes_state_and_relay_only() -> None:
    topics = MeterTopics("b", "garage", "json")
    messages = state_messages(topics, SNAP, Relay.ON)
    assert [t for t, _ in messages] == ["b/garage/state", "b/garage/relay"]
    state = json_object(json.loads(dict(messages)["b/garage/state"]))
    default = json.loads(dict(state_messages(MeterTopics("b", "garage"), SNAP, Relay.ON))["b/garage/state"])
    assert state == default and state["V1"] == 220.89 and state["relay"] == "ON"
    # No per-key topic is built, cached or cleared.
    assert topics.key("V1") is None and topics.forget("V1") is None
    assert not topics._keys


def test_attribute_output_publishes_keys_and_relay_only() -> None:
    topics = MeterTopics("b", "garage", "attribute")
    messages = dict(state_messages(topics, SNAP, Relay.OFF))
    assert set(messages) == {f"b/garage/{k}" for k in KEYS} | {"b/garage/relay"}
    assert messages["b/garage/V1"] == b"220.89" and messages["b/garage/relay"] == b"OFF"
    assert topics.forget("V1") == "b/garage/V1"


def test_on_change_in_json_output_judges_the_state_by_its_readings() -> None:
    topics = MeterTopics("b", "d", "json")
    changes = ChangeFilter(300)
    compare = {topics.state: state_fingerprint(SNAP)}
    assert len(changes.select(state_messages(topics, SNAP, Relay.OFF), 0.0, compare)) == 2
    later = parse_body(SEED.replace(b'"time":"1530607456"', b'"time":"1530607466"'))
    assert later.time != SNAP.time
    assert changes.select(state_messages(topics, later, Relay.OFF), 10.0, compare) == []


def test_output_is_a_config_key() -> None:
    assert PublishSettings().output == "attribute_and_json"
    assert PublishSettings(output="json").output == "json"
    with pytest.raises((ValueError, ConfigError)):
        PublishSettings(output="jsonn")  # type: ignore[arg-type]


# -- discovery per output ------------------------------------------------------------------


def sensors(discovery: Discovery) -> dict[str, dict[str, object]]:
    return {
        topic.split("/")[-2]: json_object(json.loads(payload))
        for topic, payload in discovery.configs(DEVICE, SNAP.readings)
        if "/sensor/" in topic
    }


def test_json_output_sensors_read_the_state_with_a_template() -> None:
    default = sensors(Discovery("homeassistant", "smartmac", __version__))
    compact = sensors(Discovery("homeassistant", "smartmac", __version__, None, "json"))
    assert set(compact) == set(default) == set(KEYS)
    for key, config in compact.items():
        assert config["state_topic"] == "smartmac/garage/state"
        assert config["value_template"] == "{{ value_json." + key + " }}"
        # Everything else as in the default output: the same entities, only re-pointed.
        rest = {k: v for k, v in config.items() if k != "value_template"}
        assert rest == {**default[key], "state_topic": "smartmac/garage/state"}
    for key, config in default.items():
        assert config["state_topic"] == f"smartmac/garage/{key}" and "value_template" not in config
    attribute = sensors(Discovery("homeassistant", "smartmac", __version__, None, "attribute"))
    assert attribute == default


def test_the_switch_reads_the_relay_topic_in_every_output() -> None:
    for output in ("attribute_and_json", "json", "attribute"):
        discovery = Discovery("homeassistant", "smartmac", __version__, None, output)
        config = json_object(
            json.loads(dict(discovery.configs(DEVICE, SNAP.readings))[discovery.relay_topic(DEVICE.devid)])
        )
        assert config["state_topic"] == "smartmac/garage/relay"
        assert config["command_topic"] == "smartmac/garage/relay/set"
        assert "value_template" not in config


@pytest.mark.parametrize(
    ("key", "template"),
    [
        ("V1", "{{ value_json.V1 }}"),
        ("rTWh", "{{ value_json.rTWh }}"),
        ("_x", "{{ value_json._x }}"),
        # Not a name after a dot in Jinja: `a-b` is a subtraction, `1x` does not lex.
        ("a-b", "{{ value_json['a-b'] }}"),
        ("1x", "{{ value_json['1x'] }}"),
    ],
)
def test_value_template(key: str, template: str) -> None:
    assert value_template(key) == template


def test_ghost_scan_owns_configs_of_either_form() -> None:
    discovery = Discovery("homeassistant", "smartmac", __version__, None, "json")
    topic = "homeassistant/sensor/smartmac_5/V1/config"
    assert discovery.owned_devid(topic, b'{"state_topic":"smartmac/m/V1"}') == "5"
    assert discovery.owned_devid(topic, b'{"state_topic":"smartmac/m/state","value_template":"x"}') == "5"
    assert discovery.owned_devid(topic, b'{"state_topic":"other/m/state"}') is None
    default = Discovery("homeassistant", "smartmac", __version__)
    assert default.owned_devid(topic, b'{"state_topic":"smartmac/m/state"}') == "5"


# -- the stale-topic rule --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "leaf", "expected"),
    [
        ("json", "V1", True),
        ("json", "config", True),
        ("json", "state", False),
        ("json", "relay", False),
        ("json", "availability", False),
        ("attribute", "state", True),
        ("attribute", "V1", False),
        ("attribute", "relay", False),
        ("attribute", "availability", False),
        ("attribute_and_json", "V1", False),
        ("attribute_and_json", "state", False),
    ],
)
def test_stale(output: str, leaf: str, expected: bool) -> None:
    assert stale(output, leaf) is expected  # type: ignore[arg-type]


def test_no_scan_in_the_default_output() -> None:
    assert scan_subscription("smartmac", "attribute_and_json") is None
    assert scan_subscription("site/meters", "json") == "site/meters/+/+"
    assert scan_subscription("smartmac", "attribute") == "smartmac/+/+"
    with pytest.raises(ValueError, match="no scan"):
        StaleScan("smartmac", "attribute_and_json", ["a"], 0.0)


def test_scan_keeps_retained_stale_topics_of_configured_meters_only() -> None:
    scan = StaleScan("site/m", "json", ["garage", "shed"], 100.0)
    assert scan.subscription == "site/m/+/+"
    taken = [
        ("site/m/garage/V1", b"230", True),  # stale: cleared
        ("site/m/shed/Wh1", b"5", True),  # stale: cleared
        ("site/m/garage/state", b"{}", True),  # json publishes it
        ("site/m/garage/relay", b"ON", True),
        ("site/m/garage/availability", b"online", True),
        ("site/m/garage/A1", b"1.2", False),  # live, not retained: not from an earlier run
        ("site/m/garage/W1", b"", True),  # already clear
        ("site/m/other/V1", b"230", True),  # not a configured meter: someone else's
        ("site/m/bridge/info", b"{}", True),  # the bridge's own
    ]
    for topic, payload, retain in taken:
        assert scan.message(topic, payload, retain, 100.1) is True, topic
    # Not the scan's (not B/+/+): left for the other handlers.
    for topic in ("site/m/garage/relay/set", "site/m/garage/relay/result", "homeassistant/status", "site/x"):
        assert scan.message(topic, b"x", True, 100.1) is False, topic
    assert scan.end() == ["site/m/garage/V1", "site/m/shed/Wh1"]
    assert scan.retained == 8


def test_scan_in_attribute_output_clears_the_state_only() -> None:
    scan = StaleScan("b", "attribute", ["d"], 0.0)
    for topic in ("b/d/state", "b/d/V1", "b/d/relay", "b/e/state"):
        scan.message(topic, b"x", True, 0.5)
    assert scan.end() == ["b/d/state"]


def test_scan_lasts_while_retained_messages_arrive() -> None:
    scan = StaleScan("b", "json", ["d"], 10.0)
    assert scan.due() == 10.0 + SCAN_SECONDS
    scan.message("b/d/V1", b"1", True, 11.9)
    assert scan.due() == pytest.approx(11.9 + QUIET_SECONDS)
    scan.message("b/d/V2", b"1", False, 13.0)  # live messages do not hold it open
    assert scan.due() == pytest.approx(11.9 + QUIET_SECONDS)
    scan.message("b/d/V2", b"1", True, 10.0 + MAX_SCAN_SECONDS)
    assert scan.due() == 10.0 + MAX_SCAN_SECONDS
    assert scan.seconds(12.5) == pytest.approx(2.5)


# -- end to end: the real bridge, the simulator, a real broker -------------------------------


def retained(rig: Rig, under: str) -> dict[str, bytes]:
    """What the broker holds retained under `under` now: a fresh probe's retained messages."""
    probe = rig.probe(f"{under}/#")
    probe.sync(under)
    return {m.topic: m.payload for m in probe.messages if m.retain}


def meter() -> SimMeter:
    return SimMeter(devid="1728053249", pin="731902", phases=3, extended=True)


def test_json_output_retains_no_key_topics(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    three = meter()
    sim = rig.simulator([three])
    probe = rig.probe("#")
    rig.bridge(
        [device(sim, three, topic="garage")],
        homeassistant=HomeAssistantSettings(),
        publish=PublishSettings(output="json"),
    )
    state = json_object(probe.wait_for("smartmac/garage/state").json())
    assert state["V1"] and state["relay"] == "OFF"
    assert probe.wait_for("smartmac/garage/relay").payload == b"OFF"
    probe.wait_for("smartmac/garage/availability", lambda m: m.payload == b"online")
    config = json_object(probe.wait_for(f"homeassistant/sensor/smartmac_{three.devid}/V1/config").json())
    assert config["state_topic"] == "smartmac/garage/state"
    assert config["value_template"] == "{{ value_json.V1 }}"
    relay = json_object(probe.wait_for(f"homeassistant/switch/smartmac_{three.devid}/relay/config").json())
    assert relay["state_topic"] == "smartmac/garage/relay"

    assert set(retained(rig, "smartmac/garage")) == {
        "smartmac/garage/state",
        "smartmac/garage/relay",
        "smartmac/garage/availability",
    }
    assert not [m.topic for m in probe.messages if m.topic.startswith("smartmac/garage/V")]


def test_attribute_output_retains_no_state_and_clears_an_old_one(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    three = meter()
    sim = rig.simulator([three])
    probe = rig.probe("smartmac/#")
    # Left by an earlier run in the default output, and by someone else's meter.
    probe.publish("smartmac/garage/state", b'{"V1":1}', retain=True)
    probe.publish("smartmac/elsewhere/state", b'{"V1":2}', retain=True)
    rig.bridge([device(sim, three, topic="garage")], publish=PublishSettings(output="attribute"))
    probe.wait_for("smartmac/garage/V1")
    probe.wait_for("smartmac/garage/relay")
    probe.wait_for("smartmac/garage/state", lambda m: m.payload == b"", timeout=10)

    held = retained(rig, "smartmac")
    garage = {t for t in held if t.startswith("smartmac/garage/")}
    assert "smartmac/garage/state" not in garage
    assert {"smartmac/garage/V1", "smartmac/garage/T", "smartmac/garage/relay"} <= garage
    assert held["smartmac/elsewhere/state"] == b'{"V1":2}'  # not ours: kept
    assert "cleared 1 retained topic(s) that publish.output attribute does not publish" in caplog.text


def test_switch_to_json_clears_the_old_key_topics(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    three = meter()
    sim = rig.simulator([three])
    probe = rig.probe("smartmac/#")
    first = rig.bridge([device(sim, three, topic="garage")])
    probe.wait_for("smartmac/garage/state")
    keys = set(retained(rig, "smartmac/garage")) - {
        "smartmac/garage/state",
        "smartmac/garage/relay",
        "smartmac/garage/availability",
    }
    assert "smartmac/garage/V1" in keys and len(keys) == 22
    first.stop()

    mark = probe.mark()
    rig.bridge(
        [device(sim, three, topic="garage")],
        publish=PublishSettings(output="json"),
    )
    for topic in keys:
        probe.wait_for(topic, lambda m: m.payload == b"", after=mark)
    probe.wait_for("smartmac/garage/state", after=mark)
    assert set(retained(rig, "smartmac/garage")) == {
        "smartmac/garage/state",
        "smartmac/garage/relay",
        "smartmac/garage/availability",
    }
    assert f"cleared {len(keys)} retained topic(s) that publish.output json does not publish" in caplog.text
