"""PURE: Home Assistant MQTT discovery messages for the meters.

For every meter the bridge announces one `sensor` per reading and one `switch` for the relay:

    <prefix>/sensor/smartmac_<devid>/<KEY>/config   state_topic B/D/KEY
    <prefix>/switch/smartmac_<devid>/relay/config   state_topic B/D/relay, command B/D/relay/set

With `publish.output: json` there is no B/D/KEY: each sensor reads B/D/state with
`value_template: "{{ value_json.KEY }}"` instead (same topics, ids and entities otherwise,
so switching modes only updates Home Assistant's configs).

Payloads are compact JSON, generated on demand from the keys of the meter's last good read
(nothing here is cached: a 2,000-meter fleet has ~50,000 configs, and they are only needed
at a meter's first read, when its keys change, and when Home Assistant restarts).

The rules are Home Assistant's, taken from its source (home-assistant/core):
- `components/sensor/const.py`, DEVICE_CLASS_UNITS and DEVICE_CLASS_STATE_CLASSES: the units
  each device class accepts (voltage: V, mV, µV, kV, MV; current: A, mA; power: mW, W, kW, MW,
  GW, TW, BTU/h; energy: J ... Wh, kWh ... TWh; power_factor: % or none; frequency: Hz, kHz,
  MHz, GHz; temperature: °C, °F, K) and the state classes each accepts (energy: total,
  total_increasing; the others here: measurement). A unit outside the set makes HA log an
  error for the entity, so such a reading is announced as a plain sensor instead.
- `components/mqtt/discovery.py`, TOPIC_MATCHER: node_id and object_id of a discovery topic
  match `[a-zA-Z0-9_-]+`, so a key with other characters gets no discovery config.
- `components/mqtt/schemas.py`, MQTT_ORIGIN_INFO_SCHEMA: origin needs `name`, may have
  `sw_version`; a device needs `identifiers` (or connections).
- `helpers/entity.py` / `core.py` VALID_ENTITY_ID: an entity id is `<domain>.<object_id>`,
  object_id `[a-z0-9_]` without a leading or trailing `_`. HA 2025.10 replaced the
  discovery option `object_id` with `default_entity_id` (the full entity id; `object_id`
  stops working in 2026.4), so that is what we send.
- Availability: a list of topics with `availability_mode: all` makes an entity available
  only while every topic says `online` (default payloads `online`/`offline`, ours).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from .topics import (
    ATTRIBUTE_AND_JSON,
    JSON,
    Output,
    bridge_availability,
    discovery_config,
    discovery_parts,
    discovery_status,
    discovery_wildcards,
    meter_topic,
    valid_key,
)

MANUFACTURER = "SMART MAIC"
ORIGIN_NAME = "smartmac-bridge"
NODE_PREFIX = "smartmac_"

# A key of the table below: the family letters, then the phase digits (V1, rWh3, TWh, T2).
_FAMILY = re.compile(r"([A-Za-z]+?)(\d*)")
# What a discovery topic level may hold (HA's TOPIC_MATCHER).
_TOPIC_LEVEL = re.compile(r"[a-zA-Z0-9_-]+")
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
# A key Jinja reads after a dot (its lexer's name token); others need value_json['KEY'].
_JINJA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Units each device class accepts: HA's DEVICE_CLASS_UNITS (None = no unit).
ACCEPTED_UNITS: dict[str, frozenset[str | None]] = {
    "voltage": frozenset({"V", "mV", "µV", "kV", "MV"}),
    "current": frozenset({"A", "mA"}),
    "power": frozenset({"mW", "W", "kW", "MW", "GW", "TW", "BTU/h"}),
    "energy": frozenset(
        {"J", "kJ", "MJ", "GJ", "mWh", "Wh", "kWh", "MWh", "GWh", "TWh", "cal", "kcal", "Mcal", "Gcal"}
    ),
    "power_factor": frozenset({None, "%"}),
    "frequency": frozenset({"Hz", "kHz", "MHz", "GHz"}),
    "temperature": frozenset({"°C", "°F", "K"}),
}


@dataclass(frozen=True, slots=True)
class SensorClass:
    device_class: str
    unit: str | None
    """Used when the meter reports no unit."""
    state_class: str


_MEASURE = "measurement"
_COUNTER = "total_increasing"
# By key family; the digit suffix is the phase. Anything else is a plain sensor.
CLASSES: dict[str, SensorClass] = {
    "V": SensorClass("voltage", "V", _MEASURE),
    "A": SensorClass("current", "A", _MEASURE),
    "W": SensorClass("power", "W", _MEASURE),
    "rW": SensorClass("power", "W", _MEASURE),
    "Wh": SensorClass("energy", "Wh", _COUNTER),
    "rWh": SensorClass("energy", "Wh", _COUNTER),
    "TWh": SensorClass("energy", "Wh", _COUNTER),
    "rTWh": SensorClass("energy", "Wh", _COUNTER),
    "PF": SensorClass("power_factor", None, _MEASURE),
    "Fr": SensorClass("frequency", "Hz", _MEASURE),
    "T": SensorClass("temperature", "°C", _MEASURE),
    "Temp": SensorClass("temperature", "°C", _MEASURE),
}
# Spellings of °C seen on cheap firmware (masculine ordinal, no degree sign).
_UNIT_ALIASES = {"ºC": "°C", "C": "°C", "*C": "°C", "ºF": "°F", "F": "°F"}


class KeyInfo(Protocol):
    """What discovery needs of a reading (readings.Reading fits)."""

    @property
    def key(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def unit(self) -> str: ...


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """One configured meter, as discovery sees it."""

    devid: str
    segment: str
    """The topic segment D of B/D/..."""
    name: str
    extended: bool


Signature = tuple[tuple[str, str, str], ...]
"""The (key, name, unit) of every reading: what the configs depend on."""


def signature(readings: Iterable[KeyInfo]) -> Signature:
    return tuple((r.key, r.name, r.unit) for r in readings)


def sensor_class(key: str, unit: str) -> tuple[SensorClass | None, str | None]:
    """(class, unit to announce) for a key and the unit the meter reported.

    A reported unit the class does not accept drops the class (a plain sensor with the
    meter's unit): announcing `device_class: voltage` with `VAC` would make HA reject it.
    """
    reported = _UNIT_ALIASES.get(unit, unit) or None
    match = _FAMILY.fullmatch(key)
    cls = CLASSES.get(match.group(1)) if match else None
    if cls is None:
        return None, reported
    if reported is None:
        return cls, cls.unit
    if reported in ACCEPTED_UNITS[cls.device_class]:
        return cls, reported
    return None, reported


def announced(key: str) -> bool:
    """Does this key get a sensor? It needs its own state topic and a legal discovery level."""
    return valid_key(key) and _TOPIC_LEVEL.fullmatch(key) is not None


def value_template(key: str) -> str:
    """The template that reads one key from B/D/state (json output)."""
    if _JINJA_NAME.fullmatch(key):
        return "{{ value_json." + key + " }}"
    return "{{ value_json['" + key + "'] }}"  # `a-b` or `1x` after a dot would not parse


def model(keys: Iterable[str], extended: bool) -> str:
    """What the keys tell of the model: how many phases, or the pulse/sensor module."""
    phases = 0
    unsuffixed = pulse = False
    for key in keys:
        match = _FAMILY.fullmatch(key)
        if match is None:
            continue
        family, phase = match.groups()
        if family in ("V", "Wh"):
            # V1..V3 / Wh1..Wh3 are per phase; some 1-phase firmware sends plain V and Wh.
            phases = max(phases, int(phase)) if phase else phases
            unsuffixed = unsuffixed or not phase
        elif family in ("Ch", "TCh", "ADC"):
            pulse = True
    if phases >= 2:
        text = "3-phase meter"
    elif phases == 1 or unsuffixed:
        text = "1-phase meter"
    elif pulse:
        text = "pulse/sensor module"
    else:
        text = "meter"
    return text + (" (extended)" if extended else "")


def _object_id(devid: str, key: str) -> str:
    # HA's VALID_ENTITY_ID: [a-z0-9_], no leading/trailing '_'. Keys here are [A-Za-z0-9_-].
    slug = re.sub(r"[^a-z0-9]+", "_", key.lower()).strip("_")
    return f"smartmac_{devid}_{slug}" if slug else f"smartmac_{devid}"


def object_ids(devid: str, keys: Iterable[str]) -> dict[str, str]:
    """The object id of every key of one meter, all distinct.

    `Wh1` and `wh1` (or `a-b` and `a_b`) slug to the same id. Of such a group, the key that
    sorts first (by code point: `Wh1` before `wh1`) keeps the plain id, so nothing changes
    where there is no collision; the others get `_2`, `_3`, ... in that order, skipping any
    id another key already has (HA's own way with a taken entity id)."""
    unique = sorted(set(keys))
    plain = {key: _object_id(devid, key) for key in unique}
    ids: dict[str, str] = {}
    for key in unique:
        ids.setdefault(plain[key], key)  # the first key of each plain id keeps it
    taken = set(ids)  # every plain id, before any suffix: a suffix never takes one
    result = {key: object_id for object_id, key in ids.items()}
    for key in unique:
        if key in result:
            continue
        n = 2
        while f"{plain[key]}_{n}" in taken:
            n += 1
        result[key] = f"{plain[key]}_{n}"
        taken.add(result[key])
    return result


_MAX_LABEL = 64
# C0, DEL and C1 controls, and lone surrogates (a JSON \ud800 escape): each run, with the
# spaces around it, becomes one space.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]+")


def clean_label(text: str) -> str:
    """A meter's label as HA shows it: no control characters, at most 64 characters.

    Labels go into the discovery payload as sent; a newline or tab would show in HA's UI, a
    lone surrogate cannot be encoded at all, and nothing bounds a firmware's label."""
    return " ".join(_UNPRINTABLE.sub(" ", text).split())[:_MAX_LABEL].rstrip()


@dataclass(frozen=True, slots=True)
class Discovery:
    """Discovery messages under `prefix` for meters whose topics live under `base`."""

    prefix: str
    base: str
    version: str
    configuration_url: str | None = None
    """The bridge's status page (http.public_url), linked from HA's device page."""
    output: Output = ATTRIBUTE_AND_JSON
    """publish.output: in `json` the sensors read B/D/state with a value_template."""
    bridge_node: str = "bridge"
    """The segment of the bridge's own topics: each meter's entities depend on the
    availability of the instance (the shard) that serves it."""

    @property
    def status_topic(self) -> str:
        """Home Assistant's birth/last-will topic: `online` means "send me everything"."""
        return discovery_status(self.prefix)

    def subscriptions(self) -> list[str]:
        """What to subscribe to, briefly, to find retained configs left by earlier runs."""
        return discovery_wildcards(self.prefix, ("sensor", "switch"))

    def node(self, devid: str) -> str:
        return NODE_PREFIX + devid

    def sensor_topic(self, devid: str, key: str) -> str:
        return discovery_config(self.prefix, "sensor", self.node(devid), key)

    def relay_topic(self, devid: str) -> str:
        return discovery_config(self.prefix, "switch", self.node(devid), "relay")

    def configs(self, device: DeviceInfo, readings: Iterable[KeyInfo]) -> Iterator[tuple[str, bytes]]:
        """Every retained config of one meter: a sensor per announced key, then the switch."""
        readings = list(readings)
        shared = self._shared(device, (r.key for r in readings))
        ids = object_ids(device.devid, (r.key for r in readings if announced(r.key)))
        for reading in readings:
            if announced(reading.key):
                yield (
                    self.sensor_topic(device.devid, reading.key),
                    self._sensor(device, reading, shared, ids[reading.key]),
                )
        yield self.relay_topic(device.devid), self._relay(device, shared)

    def clears(self, devid: str, keys: Iterable[str], *, relay: bool = False) -> Iterator[tuple[str, bytes]]:
        """Empty retained payloads: HA removes those entities, the broker forgets the topics."""
        for key in keys:
            if announced(key):
                yield self.sensor_topic(devid, key), b""
        if relay:
            yield self.relay_topic(devid), b""

    def announce(
        self, device: DeviceInfo, readings: Iterable[KeyInfo], previous: Signature | None
    ) -> tuple[Signature, list[tuple[str, bytes]]]:
        """After a good read: the new signature and the messages it calls for.

        Nothing when the keys, names and units are what was announced before; otherwise
        every config (and a clear for each key that went away)."""
        readings = list(readings)
        current = signature(readings)
        if current == previous:
            return current, []
        messages: list[tuple[str, bytes]] = []
        if previous:
            gone = {key for key, _, _ in previous} - {key for key, _, _ in current}
            messages.extend(self.clears(device.devid, sorted(gone)))
        messages.extend(self.configs(device, readings))
        return current, messages

    def owned_devid(self, topic: str, payload: bytes) -> str | None:
        """The devid of a retained config that this bridge (same prefix and base) published.

        Used to clear configs of meters that are no longer configured. The payload's state
        topic must lie under our base topic (B/D/KEY, or B/D/state in json output: either
        output's configs are ours): a second bridge on the same broker with another base
        topic keeps its entities.
        """
        parts = discovery_parts(self.prefix, topic)
        if parts is None:
            return None
        component, node, _ = parts
        if component not in ("sensor", "switch") or not node.startswith(NODE_PREFIX):
            return None
        devid = node[len(NODE_PREFIX) :]
        if not devid.isdigit() or not devid.isascii():
            return None
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):
            return None
        state = doc.get("state_topic") if isinstance(doc, dict) else None
        if not isinstance(state, str) or not state.startswith(self.base + "/"):
            return None
        return devid

    # -- payloads ----------------------------------------------------------------------

    def _shared(self, device: DeviceInfo, keys: Iterable[str]) -> dict[str, object]:
        """The fields every entity of one meter carries."""
        return {
            "availability": [
                {"topic": bridge_availability(self.base, self.bridge_node)},
                {"topic": meter_topic(self.base, device.segment, "availability")},
            ],
            "availability_mode": "all",
            "device": {
                "identifiers": [self.node(device.devid)],
                "name": device.name,
                "manufacturer": MANUFACTURER,
                "model": model(keys, device.extended),
                **({"configuration_url": self.configuration_url} if self.configuration_url else {}),
            },
            "origin": {"name": ORIGIN_NAME, "sw_version": self.version},
        }

    def _sensor(
        self, device: DeviceInfo, reading: KeyInfo, shared: dict[str, object], object_id: str
    ) -> bytes:
        cls, unit = sensor_class(reading.key, clean_label(reading.unit))
        config: dict[str, object] = {
            "name": clean_label(reading.name) or reading.key,
            "unique_id": f"smartmac_{device.devid}_{reading.key}",
            "default_entity_id": "sensor." + object_id,
        }
        if self.output == JSON:
            config["state_topic"] = meter_topic(self.base, device.segment, "state")
            config["value_template"] = value_template(reading.key)
        else:
            config["state_topic"] = meter_topic(self.base, device.segment, reading.key)
        if cls is not None:
            config["device_class"] = cls.device_class
            config["state_class"] = cls.state_class
        if unit is not None:
            config["unit_of_measurement"] = unit
        config.update(shared)
        return _JSON.encode(config).encode()

    def _relay(self, device: DeviceInfo, shared: dict[str, object]) -> bytes:
        relay = meter_topic(self.base, device.segment, "relay")
        config: dict[str, object] = {
            "name": "Relay",
            "unique_id": f"smartmac_{device.devid}_relay",
            "default_entity_id": f"switch.smartmac_{device.devid}_relay",
            "state_topic": relay,
            "command_topic": meter_topic(self.base, device.segment, "relay/set"),
            "payload_on": "ON",
            "payload_off": "OFF",
            # The bridge ignores retained commands; HA's default is not to retain, said anyway.
            "retain": False,
        }
        config.update(shared)
        return _JSON.encode(config).encode()
