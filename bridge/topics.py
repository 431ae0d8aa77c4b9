"""PURE: the topic layout (all of it, Home Assistant's discovery topics too); the relay as
the meter reports it.

Topic strings are built once per meter (and once per key) and reused on every poll: at a
few hundred polls a second, string building is measurable.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from .readings import Snapshot

ONLINE = b"online"
OFFLINE = b"offline"

Output = Literal["attribute_and_json", "json", "attribute"]
"""`publish.output`, zigbee2mqtt's `output`: which of B/D/KEY... and B/D/state a read
publishes (B/D/relay and B/D/availability always)."""
ATTRIBUTE_AND_JSON: Output = "attribute_and_json"
JSON: Output = "json"
ATTRIBUTE: Output = "attribute"

#: Sub-topics of a meter that a data key must not shadow (B/D/<key> would land on them).
RESERVED_KEYS = frozenset({"state", "relay", "availability"})
#: The longest topic level (a data key, a meter's segment): no real key comes near this,
#: and with it base + segment + key stay far below MQTT's 65535 bytes per topic.
MAX_LEVEL = 256


class Relay(StrEnum):
    ON = "ON"
    OFF = "OFF"

    def inverse(self) -> Relay:
        return Relay.OFF if self is Relay.ON else Relay.ON


def relay_from_pout(pout: int, inverted: bool) -> Relay:
    """The relay as the meter reports it: pout 1 = ON, unless the wiring is inverted."""
    return Relay.ON if bool(pout) != inverted else Relay.OFF


def pout_for(relay: Relay, inverted: bool) -> int:
    """The pout value that switches the relay to `relay`."""
    return int((relay is Relay.ON) != inverted)


def valid_key(key: str) -> bool:
    """Can this data key be its own topic level under B/D/?

    A valid topic level (see valid_level) that is not a sub-topic of the meter."""
    return key not in RESERVED_KEYS and valid_level(key)


def valid_level(level: str) -> bool:
    """Is this one topic level a broker accepts, in a topic name we publish to?

    No level separator or wildcard, and nothing a broker refuses in a topic: mosquitto
    drops the connection of a client that publishes a control character or a
    non-character (MQTT 3.1.1 section 1.5.3), and a lone surrogate cannot be encoded at
    all. One such key in a firmware's answer would otherwise cost the whole connection,
    again at every reconnect's replay; the configured topic settings get the same rule."""
    return bool(level) and len(level) <= MAX_LEVEL and not any(c in "/+#" or _refused(ord(c)) for c in level)


def refused_text(text: str) -> bool:
    """Does the text hold a character a broker refuses in any MQTT string (a client id)?"""
    return any(_refused(ord(c)) for c in text)


def _refused(code: int) -> bool:
    return (
        code < 0x20  # C0 controls, U+0000 included
        or 0x7F <= code <= 0x9F  # DEL, C1 controls
        or 0xD800 <= code <= 0xDFFF  # surrogates: not UTF-8
        or 0xFDD0 <= code <= 0xFDEF  # non-characters
        or (code & 0xFFFE) == 0xFFFE  # U+FFFE, U+FFFF, U+1FFFE, ...
    )


@dataclass(slots=True)
class MeterTopics:
    """The topics of one meter under B/D/, as `output` lays them out."""

    base: str
    segment: str
    output: Output = ATTRIBUTE_AND_JSON
    per_key: bool = field(init=False)
    """B/D/KEY for each reading (not in `json`)."""
    state_json: bool = field(init=False)
    """B/D/state (not in `attribute`)."""
    prefix: str = field(init=False)
    availability: str = field(init=False)
    state: str = field(init=False)
    relay: str = field(init=False)
    relay_set: str = field(init=False)
    relay_result: str = field(init=False)
    _keys: dict[str, str | None] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.per_key = self.output != JSON
        self.state_json = self.output != ATTRIBUTE
        self.prefix = meter_topic(self.base, self.segment, "")
        self.availability = self.prefix + "availability"
        self.state = self.prefix + "state"
        self.relay = self.prefix + "relay"
        self.relay_set = self.prefix + "relay/set"
        self.relay_result = self.prefix + "relay/result"

    def key(self, key: str) -> str | None:
        """B/D/KEY, or None for a key that cannot be its own topic (see valid_key) and in
        `json` output, which publishes none (nothing is built or cached then)."""
        if not self.per_key:
            return None
        try:
            return self._keys[key]
        except KeyError:
            topic = self._keys[key] = self.prefix + key if valid_key(key) else None
            return topic

    def forget(self, key: str) -> str | None:
        """Drop the key's cached topic (see keyset.py); its topic, or None if it has none
        (in `json` output no key has one: there is nothing to clear)."""
        self._keys.pop(key, None)
        return self.prefix + key if self.per_key and valid_key(key) else None


def meter_topic(base: str, segment: str, leaf: str) -> str:
    """B/D/LEAF: a key, `availability`, `relay`, ... of one meter."""
    return f"{base}/{segment}/{leaf}"


def bridge_availability(base: str, node: str = "bridge") -> str:
    """The bridge's own topics are under B/bridge/, a shard's under B/bridge-<index>/."""
    return f"{base}/{node}/availability"


def bridge_info(base: str, node: str = "bridge") -> str:
    return f"{base}/{node}/info"


def bridge_health(base: str, node: str = "bridge") -> str:
    """Not retained, every minute (README "Topics")."""
    return f"{base}/{node}/health"


def command_subscription(base: str) -> str:
    """One wildcard subscription covers every meter's relay/set."""
    return f"{base}/+/relay/set"


def command_segment(base: str, topic: str) -> str | None:
    """The D of B/D/relay/set, or None if the topic is not a command topic."""
    head = base + "/"
    if not topic.startswith(head) or not topic.endswith("/relay/set"):
        return None
    segment = topic[len(head) : -len("/relay/set")]
    return segment if segment and "/" not in segment else None


def state_messages(topics: MeterTopics, snap: Snapshot, relay: Relay) -> list[tuple[str, bytes]]:
    """Every retained message one good read produces, as topics.output lays them out:
    B/D/KEY... (not in `json`), B/D/state (not in `attribute`), B/D/relay.

    The hot path (hundreds of polls a second): the default output runs the one loop it
    always ran; `json` builds no per-key topic, `attribute` no state object."""
    messages: list[tuple[str, bytes]] = []
    state: dict[str, object]
    if topics.per_key:
        key_topic = topics.key
        if not topics.state_json:
            for reading in snap.readings:
                topic = key_topic(reading.key)
                if topic is not None:
                    messages.append((topic, reading.text.encode()))
            messages.append((topics.relay, relay.value.encode()))
            return messages
        state = {}
        for reading in snap.readings:
            key = reading.key
            topic = key_topic(key)
            if topic is not None:
                messages.append((topic, reading.text.encode()))
            state[key] = reading.value
    else:
        state = {reading.key: reading.value for reading in snap.readings}
    # The envelope fields win over any data key of the same name.
    state["devid"] = snap.devid
    state["time"] = snap.time
    state["pout"] = snap.pout
    state["relay"] = relay.value
    messages.append((topics.state, json.dumps(state, separators=(",", ":")).encode()))
    messages.append((topics.relay, relay.value.encode()))
    return messages


def info_payload(
    version: str, devices: Iterable[dict[str, object]], shard: tuple[int, int] | None = None
) -> bytes:
    """B/bridge/info; a shard's (index, count) too, when the device list is sharded."""
    info: dict[str, object] = {"version": version, "devices": list(devices)}
    if shard is not None:
        info["shard"] = {"index": shard[0], "count": shard[1]}
    return json.dumps(info).encode()


# -- Home Assistant's discovery topics, under its prefix (default `homeassistant`) --------


def discovery_status(prefix: str) -> str:
    """Home Assistant's birth/last-will topic."""
    return f"{prefix}/status"


def discovery_config(prefix: str, component: str, node: str, object_id: str) -> str:
    """<prefix>/<component>/<node>/<object_id>/config."""
    return f"{prefix}/{component}/{node}/{object_id}/config"


def discovery_wildcards(prefix: str, components: Iterable[str]) -> list[str]:
    """Subscriptions matching every config of these components."""
    return [discovery_config(prefix, component, "+", "+") for component in components]


def discovery_parts(prefix: str, topic: str) -> tuple[str, str, str] | None:
    """(component, node, object_id) of a config topic under `prefix`, else None."""
    parts = topic.split("/")
    head = prefix.split("/")
    if len(parts) != len(head) + 4 or parts[: len(head)] != head or parts[-1] != "config":
        return None
    return parts[len(head)], parts[len(head) + 1], parts[len(head) + 2]
