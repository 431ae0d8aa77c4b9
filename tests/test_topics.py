"""topics: topic mapping, state payloads, relay polarity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bridge.readings import parse_body
from bridge.topics import (
    MeterTopics,
    Relay,
    command_segment,
    pout_for,
    relay_from_pout,
    state_messages,
)

SEED = (Path(__file__).parent / "fixtures" / "seed_3phase_extended.body").read_bytes()


def test_state_messages_for_the_seed() -> None:
    topics = MeterTopics("smartmac", "garage")
    messages = dict(state_messages(topics, parse_body(SEED), Relay.OFF))
    assert messages["smartmac/garage/V1"] == b"220.89"
    assert messages["smartmac/garage/PF3"] == b"0.60"
    assert messages["smartmac/garage/T"] == b"14"
    assert messages["smartmac/garage/relay"] == b"OFF"
    assert not any(t.startswith("smartmac/garage/br") for t in messages)
    state = json.loads(messages["smartmac/garage/state"])
    assert state["devid"] == "1728053249" and state["time"] == 1530607456
    assert state["pout"] == 0 and state["relay"] == "OFF"
    assert state["V1"] == 220.89 and state["Wh1"] == 33549075 and state["PF3"] == 0.6
    assert len(messages) == 22 + 2


def test_envelope_wins_and_reserved_keys_get_no_topic() -> None:
    body = json.dumps(
        {
            "devid": "17",
            "time": "5",
            "pout": "1",
            "data": {
                "time": {"value": "9"},
                "state": {"value": "1"},
                "a/b": {"value": "2"},
                "V": {"value": "1"},
            },
        }
    )
    messages = dict(state_messages(MeterTopics("b", "d"), parse_body(body), Relay.ON))
    assert set(messages) == {"b/d/V", "b/d/time", "b/d/state", "b/d/relay"}
    state = json.loads(messages["b/d/state"])
    assert state["time"] == 5 and state["relay"] == "ON"


@pytest.mark.parametrize(
    "key",
    ["T\t1", "V1\n", "\x01h1", "A\x7f", "\u0085", "x\ufffe", "\ufdd0", "\U0001ffff", "\ud800", "k" * 257],
)
def test_keys_a_broker_would_refuse_get_no_topic(key: str) -> None:
    # mosquitto disconnects a client publishing such a topic; the value stays in the state.
    body = json.dumps(
        {"devid": "17", "time": "5", "pout": "1", "data": {key: {"value": "2"}, "V": {"value": "1"}}}
    )
    messages = dict(state_messages(MeterTopics("b", "d"), parse_body(body), Relay.ON))
    assert set(messages) == {"b/d/V", "b/d/state", "b/d/relay"}
    assert json.loads(messages["b/d/state"])[key] == 2


@pytest.mark.parametrize(
    ("pout", "inverted", "relay"),
    [(1, False, Relay.ON), (0, False, Relay.OFF), (1, True, Relay.OFF), (0, True, Relay.ON)],
)
def test_relay_polarity(pout: int, inverted: bool, relay: Relay) -> None:
    assert relay_from_pout(pout, inverted) is relay
    assert pout_for(relay, inverted) == pout


@pytest.mark.parametrize(
    ("topic", "segment"),
    [
        ("smartmac/garage/relay/set", "garage"),
        ("smartmac/bridge/relay/set", "bridge"),
        ("smartmac/a/b/relay/set", None),
        ("smartmac//relay/set", None),
        ("other/garage/relay/set", None),
        ("smartmac/garage/relay/result", None),
    ],
)
def test_command_segment(topic: str, segment: str | None) -> None:
    assert command_segment("smartmac", topic) == segment


def test_forget_drops_a_keys_cached_topic() -> None:
    topics = MeterTopics("b", "d")
    assert topics.key("W1") == "b/d/W1" and topics.key("a/b") is None
    assert (topics.forget("W1"), topics.forget("a/b")) == ("b/d/W1", None)
    assert topics._keys == {}
