"""discovery: Home Assistant MQTT discovery configs, checked against Home Assistant's rules.

The rule tables below are copied by hand from Home Assistant's documentation and source
(home-assistant/core `components/sensor/const.py`: DEVICE_CLASS_UNITS and
DEVICE_CLASS_STATE_CLASSES; `components/mqtt/discovery.py`: TOPIC_MATCHER;
`components/mqtt/schemas.py`: origin and device schemas; `core.py`: VALID_ENTITY_ID), NOT
imported from bridge.discovery, so a wrong table in the code cannot pass its own test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from shapes import json_object

from bridge import __version__
from bridge.discovery import DeviceInfo, Discovery, model, sensor_class, signature
from bridge.readings import Reading, parse_body
from bridge.simulator import SimMeter, _render

FIXTURES = Path(__file__).parent / "fixtures"

# HA sensor device classes -> the units each accepts (None: no unit). From the HA MQTT sensor
# / sensor docs ("Device class") and DEVICE_CLASS_UNITS.
HA_UNITS: dict[str, set[str | None]] = {
    "voltage": {"V", "mV", "µV", "kV", "MV"},
    "current": {"A", "mA"},
    "power": {"mW", "W", "kW", "MW", "GW", "TW", "BTU/h"},
    "energy": {"J", "kJ", "MJ", "GJ", "mWh", "Wh", "kWh", "MWh", "GWh", "TWh", "cal", "kcal", "Mcal", "Gcal"},
    "power_factor": {None, "%"},
    "frequency": {"Hz", "kHz", "MHz", "GHz"},
    "temperature": {"°C", "°F", "K"},
}
# DEVICE_CLASS_STATE_CLASSES for the same classes.
HA_STATE_CLASSES: dict[str, set[str]] = {
    "voltage": {"measurement"},
    "current": {"measurement"},
    "power": {"measurement"},
    "energy": {"total", "total_increasing"},
    "power_factor": {"measurement"},
    "frequency": {"measurement"},
    "temperature": {"measurement"},
}
# HA strips "<discovery prefix>/" off the topic, then matches the rest with this.
HA_TOPIC = re.compile(
    r"(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?(?P<object_id>[a-zA-Z0-9_-]+)/config"
)
HA_ENTITY_ID = re.compile(r"(?!.+__)(?!_)[\da-z_]+(?<!_)\.(?!_)[\da-z_]+(?<!_)")
# Keys of the sensor and switch configs we send (full names; HA also knows abbreviations).
SENSOR_KEYS = {
    "name",
    "unique_id",
    "default_entity_id",
    "state_topic",
    "device_class",
    "state_class",
    "unit_of_measurement",
    "availability",
    "availability_mode",
    "device",
    "origin",
}
SWITCH_KEYS = {
    "name",
    "unique_id",
    "default_entity_id",
    "state_topic",
    "command_topic",
    "payload_on",
    "payload_off",
    "retain",
    "availability",
    "availability_mode",
    "device",
    "origin",
}
DEVICE_KEYS = {"identifiers", "name", "manufacturer", "model"}
COUNTERS = re.compile(r"r?T?Wh\d*")

DISCOVERY = Discovery("homeassistant", "smartmac", __version__)


def readings_of(phases: int, extended: bool, devid: str = "1728053249") -> tuple[Reading, ...]:
    meter = SimMeter(devid=devid, pin="012345", phases=phases, extended=extended)
    return parse_body(_render(meter, "ok")).readings


def configs(device: DeviceInfo, readings: tuple[Reading, ...]) -> dict[str, dict[str, object]]:
    out = {}
    for topic, payload in DISCOVERY.configs(device, readings):
        assert payload == json.dumps(json.loads(payload), separators=(",", ":"), ensure_ascii=False).encode()
        out[topic] = json.loads(payload)
    return out


def check_ha_rules(topic: str, config: dict[str, object]) -> None:
    """One config against the HA rules above."""
    assert topic.startswith("homeassistant/")
    match = HA_TOPIC.fullmatch(topic.replace("homeassistant/", "", 1))
    assert match, topic
    component = match["component"]
    assert component in ("sensor", "switch")
    assert set(config) <= (SENSOR_KEYS if component == "sensor" else SWITCH_KEYS), set(config)
    entity_id = config["default_entity_id"]
    assert isinstance(entity_id, str) and HA_ENTITY_ID.fullmatch(entity_id), entity_id
    assert entity_id.split(".")[0] == component
    device = config["device"]
    assert isinstance(device, dict) and set(device) == DEVICE_KEYS and device["identifiers"]
    assert config["origin"] == {"name": "smartmac-bridge", "sw_version": __version__}
    assert config["availability_mode"] == "all"
    if component == "switch":
        return
    key = match["object_id"]
    device_class = config.get("device_class")
    unit = config.get("unit_of_measurement")
    if device_class is not None:
        assert isinstance(device_class, str), (key, device_class)
        assert unit in HA_UNITS[device_class], (key, device_class, unit)
        assert config["state_class"] in HA_STATE_CLASSES[device_class], key
    if config.get("state_class") == "total_increasing":
        assert COUNTERS.fullmatch(key), f"total_increasing on {key}, not a counter"
    if COUNTERS.fullmatch(key) and device_class == "energy":
        assert config["state_class"] == "total_increasing", key


@pytest.mark.parametrize(("phases", "extended"), [(3, True), (3, False), (1, True), (1, False)])
def test_every_config_keeps_the_ha_rules(phases: int, extended: bool) -> None:
    device = DeviceInfo("1728053249", "garage", "Garage", extended)
    readings = readings_of(phases, extended)
    found = configs(device, readings)
    for topic, config in found.items():
        check_ha_rules(topic, config)
    # A sensor per reading plus the relay switch; every state topic is one the bridge uses.
    assert len(found) == len(readings) + 1
    for reading in readings:
        config = found[f"homeassistant/sensor/smartmac_1728053249/{reading.key}/config"]
        assert config["state_topic"] == f"smartmac/garage/{reading.key}"
        assert config["unique_id"] == f"smartmac_1728053249_{reading.key}"
        assert config["name"] == reading.name  # the meter's own label
        assert config["availability"] == [
            {"topic": "smartmac/bridge/availability"},
            {"topic": "smartmac/garage/availability"},
        ]
        assert json_object(config["device"])["name"] == "Garage"
    relay = found["homeassistant/switch/smartmac_1728053249/relay/config"]
    assert relay["unique_id"] == "smartmac_1728053249_relay"
    assert relay["default_entity_id"] == "switch.smartmac_1728053249_relay"
    assert (relay["state_topic"], relay["command_topic"]) == (
        "smartmac/garage/relay",
        "smartmac/garage/relay/set",
    )
    assert (relay["payload_on"], relay["payload_off"]) == ("ON", "OFF")


def test_classes_by_key_family() -> None:
    device = DeviceInfo("1", "m", "M", True)
    keys = {
        "V1": ("voltage", "V", "measurement"),
        "V": ("voltage", "V", "measurement"),
        "A2": ("current", "A", "measurement"),
        "A": ("current", "A", "measurement"),
        "W3": ("power", "W", "measurement"),
        "rW1": ("power", "W", "measurement"),
        "Wh1": ("energy", "Wh", "total_increasing"),
        "rWh2": ("energy", "Wh", "total_increasing"),
        "TWh": ("energy", "Wh", "total_increasing"),
        "rTWh": ("energy", "Wh", "total_increasing"),
        "PF1": ("power_factor", None, "measurement"),
        "Fr1": ("frequency", "Hz", "measurement"),
        "T": ("temperature", "°C", "measurement"),
        "T3": ("temperature", "°C", "measurement"),
        "Temp": ("temperature", "°C", "measurement"),
        "Ch1": (None, "imp", None),
        "TCh1": (None, None, None),
        "ADC": (None, "mV", None),
    }
    units = {"PF1": "", "TCh1": "", "Ch1": "imp", "ADC": "mV", "V": "", "A": ""}
    readings = tuple(
        Reading(key, f"name {key}", units.get(key, unit or ""), "1", 1) for key, (_, unit, _) in keys.items()
    )
    found = configs(device, readings)
    for key, (device_class, unit, state_class) in keys.items():
        config = found[f"homeassistant/sensor/smartmac_1/{key}/config"]
        check_ha_rules(f"homeassistant/sensor/smartmac_1/{key}/config", config)
        assert (config.get("device_class"), config.get("unit_of_measurement"), config.get("state_class")) == (
            device_class,
            unit,
            state_class,
        ), key


@pytest.mark.parametrize(
    ("key", "unit", "expected"),
    [
        ("Wh1", "kWh", ("energy", "kWh")),  # another unit the class accepts: kept
        ("V1", "VAC", (None, "VAC")),  # a unit HA would reject: a plain sensor, the meter's unit
        ("T", "ºC", ("temperature", "°C")),  # masculine ordinal instead of the degree sign
        ("T1", "C", ("temperature", "°C")),
        ("PF1", "%", ("power_factor", "%")),
        ("Fr", "", ("frequency", "Hz")),  # no unit reported: the family's
        ("X9", "", (None, None)),
    ],
)
def test_reported_units(key: str, unit: str, expected: tuple[str | None, str | None]) -> None:
    cls, announced = sensor_class(key, unit)
    assert ((cls.device_class if cls else None), announced) == expected


def test_unique_ids_unique_across_two_meters() -> None:
    ids: list[str] = []
    entity_ids: list[str] = []
    topics: list[str] = []
    for devid, segment in (("1728053249", "a"), ("1728053250", "b")):
        found = configs(DeviceInfo(devid, segment, segment, True), readings_of(3, True, devid))
        topics += found
        ids += [str(c["unique_id"]) for c in found.values()]
        entity_ids += [str(c["default_entity_id"]) for c in found.values()]
    assert len(ids) == len(set(ids)) == len(topics) == len(set(topics)) == 2 * 23
    assert len(entity_ids) == len(set(entity_ids))


def test_keys_that_cannot_be_announced_are_left_out() -> None:
    readings = (
        Reading("V1", "Voltage 1", "V", "230", 230),
        Reading("a/b", "slash", "", "1", 1),  # no topic of its own
        Reading("state", "state", "", "1", 1),  # reserved sub-topic
        Reading("T.1", "dot", "°C", "1", 1),  # a discovery topic level may not hold '.'
    )
    found = configs(DeviceInfo("7", "m", "M", False), readings)
    assert sorted(found) == [
        "homeassistant/sensor/smartmac_7/V1/config",
        "homeassistant/switch/smartmac_7/relay/config",
    ]


def test_default_entity_id_is_a_valid_slug() -> None:
    readings = (Reading("Ab-c_", "odd", "", "1", 1), Reading("X_Y", "odd", "", "1", 1))
    found = configs(DeviceInfo("7", "m", "M", False), readings)
    assert (
        found["homeassistant/sensor/smartmac_7/Ab-c_/config"]["default_entity_id"] == "sensor.smartmac_7_ab_c"
    )
    assert found["homeassistant/sensor/smartmac_7/X_Y/config"]["default_entity_id"] == "sensor.smartmac_7_x_y"


@pytest.mark.parametrize(
    ("keys", "extended", "text"),
    [
        (["V1", "V2", "V3", "A", "W"], False, "3-phase meter"),
        (["V1", "A1", "Wh1"], True, "1-phase meter (extended)"),
        (["V", "A", "Wh"], False, "1-phase meter"),
        (["Ch1", "Ch2", "TCh1", "ADC", "T1"], False, "pulse/sensor module"),
        (["X"], False, "meter"),
    ],
)
def test_model_from_keys(keys: list[str], extended: bool, text: str) -> None:
    assert model(keys, extended) == text


def test_model_of_the_vendor_sample() -> None:
    snap = parse_body((FIXTURES / "seed_3phase_extended.body").read_bytes())
    assert model((r.key for r in snap.readings), True) == "3-phase meter (extended)"
    for topic, config in configs(DeviceInfo(snap.devid, "s", "S", True), snap.readings).items():
        check_ha_rules(topic, config)


def test_announce_only_when_the_keys_change() -> None:
    device = DeviceInfo("7", "m", "M", False)
    first = (Reading("V1", "Voltage 1", "V", "230", 230), Reading("Wh1", "Energy 1", "Wh", "5", 5))
    sig, messages = DISCOVERY.announce(device, first, None)
    assert sig == signature(first) and len(messages) == 3
    # Same keys, other values: nothing to announce.
    again = (Reading("V1", "Voltage 1", "V", "231", 231), Reading("Wh1", "Energy 1", "Wh", "6", 6))
    assert DISCOVERY.announce(device, again, sig) == (sig, [])
    # A key gone, a name changed: its config cleared, every config again.
    changed = (Reading("V1", "Spannung 1", "V", "231", 231),)
    sig2, messages = DISCOVERY.announce(device, changed, sig)
    assert messages[0] == ("homeassistant/sensor/smartmac_7/Wh1/config", b"")
    assert [t for t, _ in messages[1:]] == [
        "homeassistant/sensor/smartmac_7/V1/config",
        "homeassistant/switch/smartmac_7/relay/config",
    ]
    assert json.loads(messages[1][1])["name"] == "Spannung 1"
    assert sig2 == signature(changed)


def test_clears_are_empty_retained_payloads() -> None:
    assert list(DISCOVERY.clears("7", ["V1", "a/b"], relay=True)) == [
        ("homeassistant/sensor/smartmac_7/V1/config", b""),
        ("homeassistant/switch/smartmac_7/relay/config", b""),
    ]


@pytest.mark.parametrize(
    ("topic", "payload", "devid"),
    [
        ("homeassistant/sensor/smartmac_99/V1/config", b'{"state_topic":"smartmac/x/V1"}', "99"),
        ("homeassistant/switch/smartmac_99/relay/config", b'{"state_topic":"smartmac/x/relay"}', "99"),
        # Another bridge on the same broker with another base topic: not ours.
        ("homeassistant/sensor/smartmac_99/V1/config", b'{"state_topic":"other/x/V1"}', None),
        ("homeassistant/sensor/smartmac_99/V1/config", b'{"state_topic":"smartmacx/x/V1"}', None),
        ("homeassistant/sensor/zigbee2mqtt_0x12/temp/config", b'{"state_topic":"smartmac/x"}', None),
        ("homeassistant/sensor/smartmac_abc/V1/config", b'{"state_topic":"smartmac/x/V1"}', None),
        ("homeassistant/light/smartmac_99/V1/config", b'{"state_topic":"smartmac/x/V1"}', None),
        ("homeassistant/sensor/smartmac_99/V1/config", b"not json", None),
        ("homeassistant/sensor/smartmac_99/V1/config", b"[1]", None),
        ("homeassistant/sensor/smartmac_99/V1/state", b'{"state_topic":"smartmac/x/V1"}', None),
        ("other/sensor/smartmac_99/V1/config", b'{"state_topic":"smartmac/x/V1"}', None),
        ("homeassistant/sensor/smartmac_99/config", b'{"state_topic":"smartmac/x/V1"}', None),
    ],
)
def test_owned_devid(topic: str, payload: bytes, devid: str | None) -> None:
    assert DISCOVERY.owned_devid(topic, payload) == devid


def test_owned_devid_with_a_multi_level_prefix() -> None:
    discovery = Discovery("ha/disc", "site/meters", "1")
    assert (
        discovery.owned_devid("ha/disc/sensor/smartmac_5/W/config", b'{"state_topic":"site/meters/m/W"}')
        == "5"
    )
    assert discovery.subscriptions() == ["ha/disc/sensor/+/+/config", "ha/disc/switch/+/+/config"]
    assert discovery.status_topic == "ha/disc/status"


def test_payloads_are_generated_not_kept() -> None:
    # configs() is a generator: a fleet's configs are produced one at a time on demand.
    device = DeviceInfo("7", "m", "M", False)
    gen = DISCOVERY.configs(device, readings_of(1, False))
    assert iter(gen) is gen


def test_readme_example_is_what_the_demo_meter_gets() -> None:
    # README "Home Assistant" shows the config of the demo's 3-phase meter's Wh1.
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Home Assistant", 1)[1]
    example = json.loads(section.split("```json\n", 1)[1].split("```", 1)[0])
    demo = DeviceInfo("1728053249", "demo3", "Demo 3-phase", True)  # as `smartmac-bridge demo`
    found = configs(demo, readings_of(3, True))
    config = found["homeassistant/sensor/smartmac_1728053249/Wh1/config"]
    example["origin"]["sw_version"] = __version__
    assert config == example
    assert list(config) == list(example)  # the order it is printed in, too


def test_keys_that_differ_in_case_or_punctuation_get_distinct_entity_ids() -> None:
    # Issue 12, item 8: Wh1 and wh1 (and a-b / a_b) slug alike; HA would get one entity id
    # twice. The key that sorts first keeps today's id; the others are numbered, skipping ids
    # another key already has; keys without a collision are untouched, in any order.
    keys = ["wh1", "V1", "a-b", "Wh1", "a_b", "a_b_2", "WH1"]
    device = DeviceInfo("5", "m", "M", False)
    for order in (keys, sorted(keys), keys[::-1]):
        readings = tuple(Reading(k, k, "", "1", 1) for k in order)
        ids = {
            t.split("/")[3]: c["default_entity_id"]
            for t, c in configs(device, readings).items()
            if "/sensor/" in t
        }
        assert ids == {
            "V1": "sensor.smartmac_5_v1",
            "WH1": "sensor.smartmac_5_wh1",  # 'W' 'H' sorts before 'W' 'h' and 'w'
            "Wh1": "sensor.smartmac_5_wh1_2",
            "wh1": "sensor.smartmac_5_wh1_3",
            "a-b": "sensor.smartmac_5_a_b",
            "a_b_2": "sensor.smartmac_5_a_b_2",  # its own id: a_b below skips it
            "a_b": "sensor.smartmac_5_a_b_3",
        }
        for topic, config in configs(device, readings).items():
            check_ha_rules(topic, config)
    # The seed meter's ids are what they always were.
    seed = configs(DeviceInfo("1728053249", "g", "G", True), readings_of(3, True))
    wh1 = seed["homeassistant/sensor/smartmac_1728053249/Wh1/config"]
    assert wh1["default_entity_id"] == "sensor.smartmac_1728053249_wh1"


@pytest.mark.parametrize(
    ("label", "name"),
    [
        ("Voltage 1", "Voltage 1"),
        ("Volt\nage\t1", "Volt age 1"),  # each run of controls is one space
        ("\x00\x1b[31mRed\x7f\x85", "[31mRed"),
        ("a\ud800b", "a b"),  # a lone surrogate (a JSON \ud800 escape) cannot be encoded
        ("x" * 65, "x" * 64),
        ("\n\t", "V1"),  # nothing left: the key
    ],
)
def test_a_label_is_cleaned_and_capped(label: str, name: str) -> None:
    device = DeviceInfo("5", "m", "M", False)
    (sensor,) = [
        c for t, c in configs(device, (Reading("V1", label, "V\n", "1", 1),)).items() if "/sensor/" in t
    ]
    assert sensor["name"] == name
    assert sensor["unit_of_measurement"] == "V" and sensor["device_class"] == "voltage"


def test_a_label_from_a_real_body_with_escapes() -> None:
    body = (
        b'{"devid":"5","time":"1","pout":"0",'
        b'"data":{"V1":{"name":"Volt\\u0007\\ud800 1","unit":"V","value":"1"}}}'
    )
    found = configs(DeviceInfo("5", "m", "M", False), parse_body(body).readings)
    assert found["homeassistant/sensor/smartmac_5/V1/config"]["name"] == "Volt 1"


def test_configuration_url_links_the_status_page_only_where_one_is_configured() -> None:
    from bridge.config import HttpSettings, MqttSettings
    from bridge.service import Bridge

    page = "https://bridge.example/meters/"
    linked = Discovery("homeassistant", "smartmac", __version__, page)
    device = DeviceInfo("1728053249", "1728053249", "Garage", True)
    for payload in (p for _, p in linked.configs(device, readings_of(3, True))):
        assert json_object(json.loads(payload)["device"])["configuration_url"] == page
    plain = [
        json_object(json.loads(p)["device"]) for _, p in DISCOVERY.configs(device, readings_of(1, False))
    ]
    assert plain and all("configuration_url" not in d for d in plain)

    # The bridge links it when the page is served (http.port) and its address is known.
    def discovery(**http: object) -> Discovery:
        bridge = Bridge([], MqttSettings(), host="127.0.0.1", port=1, http=HttpSettings(**http))  # type: ignore[arg-type]
        assert bridge._ha is not None
        return bridge._ha.discovery

    assert discovery(port=8099, public_url=page).configuration_url == page
    assert discovery(public_url=page).configuration_url is None  # no server, no link
    assert discovery(port=8099).configuration_url is None
