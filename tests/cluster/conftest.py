"""Three nats-server nodes, three shards as real processes, and the simulator: one fleet per module.

See natskit.py for the parts. tests/cluster/ is a package (an __init__.py), so this conftest
is `cluster.conftest` to mypy and pytest, not a second top-level `conftest` beside
tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.nats import NatsCluster, binary
from bench.support import LOOPBACK
from bridge.simulator import Simulator, make_fleet
from cluster.natskit import (
    METERS,
    SHARDS,
    Fleet,
    Shard,
    availability,
    contract_owner,
    online,
    shard_environment,
    write_shard_config,
)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if binary() is None:
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    directory = tmp_path_factory.mktemp("cluster")
    cluster = NatsCluster(directory / "nats", 3).start()
    meters = make_fleet(METERS, extended=True, first_id=1728070000)
    sim = Simulator(meters, host=LOOPBACK, port=0).start()
    owners = {m.devid: contract_owner(m.devid, SHARDS) for m in meters}
    # The test needs every shard to own a meter; the ids above are chosen so (and fixed).
    assert sorted(set(owners.values())) == list(range(SHARDS)), owners
    config = directory / "shared.yaml"
    write_shard_config(config, cluster, sim, meters)
    shards = [Shard(directory, config, i, shard_environment(cluster, i)) for i in range(SHARDS)]
    fleet = Fleet(cluster, sim, shards, meters, owners)
    watcher = fleet.probe(SHARDS - 1)
    try:
        for shard in shards:
            shard.start()
        for index in range(SHARDS):
            watcher.wait_for(availability(index), online, timeout=30)
        fleet.wait_states(watcher, meters, timeout=30)
    except BaseException:
        print(fleet.output())
        fleet_stop(fleet)
        raise
    yield fleet
    print(fleet.output())  # shown by pytest only for a failing test
    fleet_stop(fleet)


def fleet_stop(fleet: Fleet) -> None:
    for shard in fleet.shards:
        shard.kill()
    for probe in fleet.probes:
        probe.stop()
    fleet.sim.stop()
    fleet.cluster.stop()
