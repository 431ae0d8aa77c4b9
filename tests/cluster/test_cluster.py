"""Shards on a 3-node NATS cluster (issue 11): one owner per meter, states everywhere, failover.

The fleet (conftest.py) is three nats-server nodes, three shards started on nodes 0, 1 and 2,
and one simulator with 12 extended meters polled every 6 s. The tests run in file order on
the one fleet; each one that kills a shard or a node brings it back before it ends.

"Exactly one poller" is read off the simulator: a meter asked twice within its 6 s gap counts
an `early` request, which two shards polling it would cause within a few seconds; none is
allowed in any test, restarts included.
"""

from __future__ import annotations

import pytest

from bench.support import gaps, wait_until
from bridge.simulator import SimMeter
from cluster.natskit import (
    BASE,
    SHARDS,
    Fleet,
    availability,
    info_topic,
    offline,
    online,
    state_topic,
)

pytestmark = pytest.mark.nats


def requested(meters: list[SimMeter], times: int) -> bool:
    return all(len(m.request_times) >= times for m in meters)


def test_each_meter_is_polled_by_exactly_one_shard(fleet: Fleet) -> None:
    # Three requests each: two full gaps in which a second poller would have shown up.
    wait_until(lambda: requested(fleet.meters, 3), 30, "three requests to every meter")
    fleet.assert_no_early_request()
    for meter in fleet.meters:
        # One shard's rate: its interval between requests, never less (two shards: half).
        assert min(gaps(meter.request_times)) >= meter.interval, meter.devid

    probe = fleet.probe(1)  # a late subscriber: the retained info, from JetStream
    for index in range(SHARDS):
        info = probe.wait_for(info_topic(index)).json()
        assert isinstance(info, dict)
        assert info["shard"] == {"index": index, "count": SHARDS}
        listed = sorted(device["id"] for device in info["devices"])
        assert listed == sorted(m.devid for m in fleet.owned(index)), index
        assert all(device["extended"] and device["interval"] == 6 for device in info["devices"])


def test_every_meter_state_is_readable_on_every_node(fleet: Fleet) -> None:
    for node in range(len(fleet.cluster.nodes)):
        probe = fleet.probe(node)  # subscribed after the states were published: retained ones
        for meter in fleet.meters:
            message = probe.wait_for(state_topic(meter), lambda m: m.retain)
            state = message.json()
            assert isinstance(state, dict) and state["devid"] == meter.devid, (node, meter.devid)
            assert isinstance(state["V1"], float) and state["relay"] in ("ON", "OFF")
        # publish.output json: no B/D/KEY retained anywhere in the cluster, only these.
        probe.sync(BASE)
        kinds = {m.topic.split("/", 2)[2] for m in probe.messages if m.retain and "/bridge" not in m.topic}
        assert kinds == {"state", "relay", "availability"}, (node, kinds)
        probe.stop()


def test_relay_command_on_one_node_reaches_the_owner_on_another(fleet: Fleet) -> None:
    # One meter of each shard, each command published on a node its shard is not on.
    targets = [fleet.owned(index)[0] for index in range(SHARDS)]
    nodes = {index: fleet.node_of(index) for index in range(SHARDS)}
    assert None not in nodes.values(), nodes
    watcher = fleet.probe(0)
    mark = watcher.mark()
    for index, meter in enumerate(targets):
        assert meter.pout == 0
        other = next(n for n in range(len(fleet.cluster.nodes)) if n != nodes[index])
        fleet.publish(other, f"{state_topic(meter).rsplit('/', 1)[0]}/relay/set", b"ON")

    for meter in targets:
        result = watcher.wait_for(f"ct/{meter.devid}/relay/result", after=mark, timeout=20)
        assert result.json() == {"ok": True, "relay": "ON"}
        assert not result.retain
    wait_until(lambda: all(m.pout == 1 for m in targets), 5, "every relay switched on")
    # A state after the switch from each, then everything the cluster sent before it: still
    # one result each, and one switching request each.
    after = watcher.mark()
    fleet.wait_states(watcher, targets, after=after)
    watcher.sync("ct")
    for meter in targets:
        results = [m for m in watcher.messages[mark:] if m.topic == f"ct/{meter.devid}/relay/result"]
        assert len(results) == 1, (meter.devid, results)
        assert [pout for _, pout in meter.pout_requests] == [1]
    fleet.assert_no_early_request()


def test_killed_shard_goes_offline_and_comes_back(fleet: Fleet) -> None:
    victim = 1
    _, elsewhere = fleet.node_and_next(victim)
    watcher = fleet.probe(elsewhere)  # the last will crosses the cluster to reach it
    others = [m for m in fleet.meters if fleet.owners[m.devid] != victim]
    mark = watcher.mark()

    fleet.shards[victim].kill()
    try:
        watcher.wait_for(availability(victim), offline, after=mark, timeout=15)
        killed_at = watcher.mark()
        fleet.wait_states(watcher, others, after=killed_at)
        went_offline = [m.topic for m in watcher.messages[mark:] if offline(m) and "/bridge-" in m.topic]
        assert went_offline == [availability(victim)]
        # Back after the meters' gap (README's procedure), so no meter is asked too soon.
        fleet.wait_gap_passed(fleet.owned(victim))
    finally:
        restarted = watcher.mark()
        fleet.shards[victim].start()
    watcher.wait_for(availability(victim), online, after=restarted, timeout=20)
    fleet.wait_states(watcher, fleet.owned(victim), after=restarted)
    fleet.assert_no_early_request()


def test_killing_a_node_moves_its_shard_and_states_go_on(fleet: Fleet) -> None:
    mover = 0
    node, elsewhere = fleet.node_and_next(mover)
    watcher = fleet.probe(elsewhere)
    mark = watcher.mark()

    fleet.cluster.kill(node)
    try:
        wait_until(
            lambda: fleet.node_of(mover) not in (None, node), 30, f"shard {mover} connected to another node"
        )
        moved = watcher.mark()
        fleet.wait_states(watcher, fleet.meters, after=moved, timeout=30)
        watcher.wait_for(availability(mover), online, after=mark, timeout=15)
    finally:
        fleet.cluster.restart(node)  # for the tests after this one, whatever happened
    fleet.wait_states(watcher, fleet.meters, after=watcher.mark(), timeout=30)
    fleet.assert_no_early_request()
    assert "Traceback" not in fleet.output()
