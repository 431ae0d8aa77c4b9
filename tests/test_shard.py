"""Shards (issue 11): who owns which meter, the `shard` keys, and two shards on one broker.

The owner is recomputed here from the contract's formula, not taken from bridge.shard, so
the test fails if the bridge's hash drifts from what tools outside the repo compute.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
from pathlib import Path

import pytest
import requests
from shapes import json_object
from support import Rig, assert_rate_limit_kept, device
from test_config import write

from bench.support import free_port
from bridge import shard
from bridge.config import HttpSettings, ShardSettings, load_settings
from bridge.errors import ConfigError
from bridge.simulator import SimMeter
from bridge.web import WebServer


def contract_owner(devid: str, count: int) -> int:
    """README "Shards": the largest weight, ties to the smaller index."""
    weights = [
        int.from_bytes(hashlib.sha256(f"{devid}/{i}".encode()).digest()[:8], "big") for i in range(count)
    ]
    return weights.index(max(weights))


DEVIDS = [str(1728050000 + n) for n in range(3000)]


# -- the hash ---------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 5, 16])
def test_owner_is_the_contract_hash(count: int) -> None:
    owners = [shard.owner(devid, count) for devid in DEVIDS]
    assert owners == [contract_owner(devid, count) for devid in DEVIDS]
    # Spread: every shard within 15 % of its fair share.
    for index in range(count):
        assert abs(owners.count(index) - len(DEVIDS) / count) < 0.15 * len(DEVIDS) / count


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_one_more_shard_moves_only_what_it_wins(count: int) -> None:
    moved = 0
    for devid in DEVIDS:
        before, after = shard.owner(devid, count), shard.owner(devid, count + 1)
        if before != after:
            assert after == count, devid  # only to the new shard, never between the old ones
            moved += 1
    fair = len(DEVIDS) / (count + 1)
    assert 0.85 * fair < moved < 1.15 * fair


def test_ties_go_to_the_smaller_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shard, "weight", lambda devid, index: 7)
    assert shard.owner("1", 4) == 0


@pytest.mark.parametrize(
    ("hostname", "index"),
    [
        ("smartmac-bridge-2", 2),
        ("smartmac-bridge-0.smartmac-bridge.default.svc.cluster.local", 0),
        ("bridge-17", 17),
        ("SMARTMAC-BRIDGE-1", 1),
        ("bridge-\u0662", None),  # an Arabic-Indic 2 is not an ordinal
        ("smartmac-bridge", None),
        ("host2", None),
        ("", None),
    ],
)
def test_index_from_host(hostname: str, index: int | None) -> None:
    assert shard.index_from_host(hostname) == index


# -- the keys ---------------------------------------------------------------------------


DEVICE = 'devices: [{id: "1728053249", pin: "012345", host: "127.0.0.1:1"}]\n'


def test_shard_index_from_the_host_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "smartmac-bridge-2")
    monkeypatch.setenv("SMARTMAC_SHARD__COUNT", "3")
    settings = load_settings(write(tmp_path, DEVICE))
    assert (settings.shard.count, settings.shard.index, settings.shard.node) == (3, 2, "bridge-2")
    # An index given wins over the host name; an empty one is not given.
    monkeypatch.setenv("SMARTMAC_SHARD__INDEX", "0")
    assert load_settings(write(tmp_path, DEVICE)).shard.index == 0
    monkeypatch.setenv("SMARTMAC_SHARD__INDEX", "")
    assert load_settings(write(tmp_path, DEVICE)).shard.index == 2


def test_one_shard_ignores_the_host_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "server-5")
    settings = load_settings(write(tmp_path, DEVICE))
    assert settings.shard == ShardSettings()
    assert (settings.shard.index, settings.shard.node, settings.shard.sharded) == (None, "bridge", False)


@pytest.mark.parametrize(
    ("text", "env", "hostname", "message"),
    [
        ("shard: {count: 3}\n", {}, "myhost", "shard.index: not set, and the host name 'myhost'"),
        ("shard: {count: 3}\n", {}, "smartmac-bridge-3", "shard.index: 3 is not below shard.count 3"),
        ("shard: {count: 2, index: 2}\n", {}, "x", "shard.index: 2 is not below shard.count 2"),
        ("shard: {index: 1}\n", {}, "x", "shard.index: 1 is not below shard.count 1"),
        ("shard: {count: 0}\n", {}, "x", "shard.count: Input should be greater than or equal to 1"),
        (
            "shard: {count: 2, index: -1}\n",
            {},
            "x",
            "shard.index: Input should be greater than or equal to 0",
        ),
        ("shard: {count: 2, idx: 1}\n", {}, "x", "shard.idx: unknown key"),
        ("", {"SMARTMAC_SHARD__COUNT": "two"}, "x", "shard.count: Input should be a valid integer"),
        ("shard: {count: true}\n", {}, "x", "shard.count: must be a whole number, not true or false"),
        ("shard: {count: 2, index: true}\n", {}, "x", "shard.index: must be a whole number"),
    ],
)
def test_shard_errors_name_the_key(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    text: str,
    env: dict[str, str],
    hostname: str,
    message: str,
) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: hostname)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        load_settings(write(tmp_path, text + DEVICE))
    assert message in str(error.value)


@pytest.mark.parametrize("segment", ["bridge", "bridge-0", "bridge-12"])
def test_bridge_segments_are_reserved(tmp_path: Path, segment: str) -> None:
    text = f'devices: [{{id: "1", pin: "1", host: "127.0.0.1:1", topic: "{segment}"}}]\n'
    with pytest.raises(ConfigError) as error:
        load_settings(write(tmp_path, text))
    assert "devices.0.topic: 'bridge' and 'bridge-<digits>' are reserved" in str(error.value)


@pytest.mark.parametrize("segment", ["bridge-", "bridge-x", "bridges", "my-bridge-1"])
def test_other_bridge_like_segments_are_fine(tmp_path: Path, segment: str) -> None:
    text = f'devices: [{{id: "1", pin: "1", host: "127.0.0.1:1", topic: "{segment}"}}]\n'
    assert load_settings(write(tmp_path, text)).devices[0].segment == segment


# -- two shards, one device list, one broker ----------------------------------------------

GHOST = "1111111111"


@pytest.mark.parametrize("broker", ["mosquitto"], indirect=True)
def test_two_shards_share_one_list(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    meters = [SimMeter(devid=str(1728053300 + n), pin="4711", phases=1, extended=True) for n in range(8)]
    owners = {m.devid: contract_owner(m.devid, 2) for m in meters}
    assert set(owners.values()) == {0, 1}, "the list must give both shards meters"
    sim = rig.simulator(meters)
    devices = [device(sim, m, topic=f"m{m.devid[-2:]}") for m in meters]
    segment = {m.devid: f"m{m.devid[-2:]}" for m in meters}
    probe = rig.probe("#")
    ghost = f"homeassistant/sensor/smartmac_{GHOST}/V1/config"
    probe.publish(ghost, json.dumps({"state_topic": "smartmac/old/V1"}).encode(), retain=True)

    # Shard 0 first, with all its configs out before shard 1's ghost scan looks: shard 1
    # must keep them (their meters are on the shared list), and clear only the ghost.
    # Both are given the same client id: without the -<index> suffix each would throw the
    # other off the broker.
    first = rig.bridge(devices, shard=ShardSettings(count=2, index=0), client_id="shared")
    mine0 = [m for m in meters if owners[m.devid] == 0]
    for meter in mine0:
        probe.wait_for(
            f"homeassistant/switch/smartmac_{meter.devid}/relay/config", lambda m: m.payload != b""
        )
    second = rig.bridge(devices, shard=ShardSettings(count=2, index=1), client_id="shared")

    for index in (0, 1):
        info = json_object(probe.wait_for(f"smartmac/bridge-{index}/info").json())
        assert info["shard"] == {"index": index, "count": 2}
        listed = [json_object(d)["id"] for d in info["devices"]]
        assert listed == [m.devid for m in meters if owners[m.devid] == index]
        probe.wait_for(f"smartmac/bridge-{index}/availability", lambda m: m.payload == b"online")

    for meter in meters:
        state = json_object(probe.wait_for(f"smartmac/{segment[meter.devid]}/state").json())
        assert state["devid"] == meter.devid
        config = json_object(
            probe.wait_for(
                f"homeassistant/sensor/smartmac_{meter.devid}/V1/config", lambda m: m.payload != b""
            ).json()
        )
        assert config["availability"] == [
            {"topic": f"smartmac/bridge-{owners[meter.devid]}/availability"},
            {"topic": f"smartmac/{segment[meter.devid]}/availability"},
        ]
    probe.wait_for(ghost, lambda m: m.payload == b"")

    # A command for a meter of shard 0: one result, from its owner; shard 1 stays silent.
    target = mine0[0]
    topic = f"smartmac/{segment[target.devid]}/relay"
    mark = probe.mark()
    probe.publish(topic + "/set", "ON")
    result = json_object(probe.wait_for(topic + "/result", after=mark, timeout=20).json())
    assert result["ok"] is True
    probe.sync("smartmac")
    assert len([m for m in probe.messages[mark:] if m.topic == topic + "/result"]) == 1
    assert target.pout == 1

    # Home Assistant restarts: each shard resends the configs of its own meters.
    mark = probe.mark()
    probe.publish("homeassistant/status", "online")
    for meter in meters:
        probe.wait_for(f"homeassistant/switch/smartmac_{meter.devid}/relay/config", after=mark)
    probe.sync("homeassistant")
    resent = [m.topic for m in probe.messages[mark:] if m.topic.endswith("/relay/config")]
    assert sorted(resent) == sorted(f"homeassistant/switch/smartmac_{m.devid}/relay/config" for m in meters)

    # Shard 0's API: its own summary, and a 404 naming the owner for shard 1's meter.
    loop = first._loop
    assert loop is not None
    server = WebServer(first, HttpSettings(port=free_port()))
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        summary = requests.get(server.url + "api/bridge", timeout=5).json()
        assert (summary["shard"], summary["meters"]) == ({"index": 0, "count": 2}, len(mine0))
        other = next(m for m in meters if owners[m.devid] == 1)
        answer = requests.post(server.url + f"api/meters/{segment[other.devid]}/relay", data="ON", timeout=5)
        assert (answer.status_code, answer.json()["error"]) == (404, "served by bridge-1, not this instance")
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)

    # What Home Assistant finds later: every meter's configs, from both shards.
    late = rig.probe("homeassistant/#")
    late.sync("homeassistant")
    retained = {m.topic for m in late.messages if m.retain and m.payload}
    for meter in meters:
        assert f"homeassistant/switch/smartmac_{meter.devid}/relay/config" in retained
    assert ghost not in retained
    assert not [m for m in probe.messages if m.topic.startswith("smartmac/bridge/")]

    # Each meter was asked by one shard only: never early, and by its owner alone.
    assert_rate_limit_kept(sim)
    assert all(m.early == 0 for m in meters)
    served = {0: {m.device.id for m in first.meters}, 1: {m.device.id for m in second.meters}}
    assert served == {i: {d for d, o in owners.items() if o == i} for i in (0, 1)}
    # Both kept their connection (one client id each): one connect per shard.
    assert caplog.text.count("connected to MQTT broker") == 2
    probe.publish(ghost, b"", retain=True)
