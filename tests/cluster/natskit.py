"""The cluster tests' kit: the shards as processes, the fleet, and the contract's owner.

The nodes (bench/nats.py) are clustered on loopback with JetStream and MQTT on; each shard is
`python -m bridge run` with one shared config file and its own SMARTMAC_SHARD__INDEX, and a
broker list rotated so shard i starts on node i. Starting all that takes several seconds,
so the fleet lives for the module: a test that kills something brings it back before it
ends, and the next test finds the fleet as it was.

conftest.py builds the fleet from these; the tests import them as `cluster.natskit`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from support import ROOT, Message, Probe

from bench.nats import NatsCluster
from bench.support import LOOPBACK, wait_until
from bridge.simulator import SimMeter, Simulator

BASE = "ct"
CLIENT_ID = "cluster-test"
SHARDS = 3
METERS = 12


def contract_owner(devid: str, count: int) -> int:
    """README "Shards", computed here and not taken from bridge.shard: the largest weight,
    ties to the smaller index (list.index finds the first maximum)."""
    weights = [
        int.from_bytes(hashlib.sha256(f"{devid}/{i}".encode()).digest()[:8], "big") for i in range(count)
    ]
    return weights.index(max(weights))


class Shard:
    """`python -m bridge run` as shard `index`; output appended to files in `directory`."""

    def __init__(self, directory: Path, config: Path, index: int, env: dict[str, str]) -> None:
        self.index = index
        self.env = env
        self.client_id = f"{CLIENT_ID}-{index}"
        self.config = config
        self.output = directory / f"shard-{index}.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Shard:
        # Nothing of the runner's SMARTMAC_* environment: only the file and this shard's own.
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SMARTMAC_")}
        env.update(
            self.env,
            PYTHONUNBUFFERED="1",
            PYTHONFAULTHANDLER="1",
            # The worktree's bridge, whatever the venv has installed.
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        )
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridge", "run", "--config", str(self.config)],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        return self

    def kill(self) -> None:
        """SIGKILL: no final offline from the shard itself, only its last will."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""


@dataclass
class Fleet:
    """The cluster, the simulator, the shards, and who owns what by the contract."""

    cluster: NatsCluster
    sim: Simulator
    shards: list[Shard]
    meters: list[SimMeter]
    owners: dict[str, int]
    probes: list[Probe] = field(default_factory=list)

    def owned(self, index: int) -> list[SimMeter]:
        return [m for m in self.meters if self.owners[m.devid] == index]

    def probe(self, node: int, topic: str = f"{BASE}/#") -> Probe:
        """A QoS 1 subscriber on node `node` (retained messages come from JetStream), which
        the other running nodes know of: a SUBACK comes before the subscription has reached
        the other nodes over the routes, and until it has, what is published there (a last
        will, say) is not sent to it. So a marker is published on each other node until it
        arrives."""
        probe = Probe(self.cluster.nodes[node].mqtt_port, topic).start()
        self.probes.append(probe)
        for other in self.cluster.nodes:
            if other.index != node and other.running:
                self._reaches(probe, other.index)
        return probe

    def _reaches(self, probe: Probe, node: int, timeout: float = 10) -> None:
        marker = f"{BASE}/probe-sync-{uuid.uuid4().hex[:8]}"
        sender = Probe(self.cluster.nodes[node].mqtt_port, marker).start()
        deadline = time.monotonic() + timeout
        try:
            while True:
                mark = probe.mark()
                sender.publish(marker, b"sync")
                try:
                    probe.wait_for(marker, timeout=0.5, after=mark)
                    return
                except AssertionError:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"a subscriber's interest not on node {node}") from None
        finally:
            sender.stop()

    def publish(self, node: int, topic: str, payload: bytes) -> None:
        """One QoS 1 message, not retained, from a client of its own on node `node`."""
        probe = Probe(self.cluster.nodes[node].mqtt_port, f"{BASE}/probe-{uuid.uuid4().hex[:8]}").start()
        try:
            probe.publish(topic, payload)
        finally:
            probe.stop()

    def node_of(self, shard: int) -> int | None:
        """The node shard `shard` is connected to now, by the nodes' own /connz."""
        return self.cluster.node_of(self.shards[shard].client_id)

    def node_and_next(self, shard: int) -> tuple[int, int]:
        """The node shard `shard` is on, and the next one: a probe there sees only what
        crossed the cluster."""
        node = self.node_of(shard)
        assert node is not None, f"shard {shard} is on no node"
        return node, (node + 1) % len(self.cluster.nodes)

    def wait_states(
        self, probe: Probe, meters: list[SimMeter], *, after: int = 0, timeout: float = 20
    ) -> None:
        """A state of every one of `meters` on `probe`, from message index `after` on."""
        for meter in meters:
            probe.wait_for(state_topic(meter), timeout=timeout, after=after)

    def assert_no_early_request(self) -> None:
        """No meter ever asked sooner than its model allows: no two pollers, ever."""
        early = {m.devid: m.early for m in self.meters if m.early}
        assert not early, f"requests sooner than the meters allow: {early}"
        assert self.sim.total_rate_limited() == 0

    def wait_gap_passed(self, meters: list[SimMeter], timeout: float = 15) -> None:
        """Until each meter's last request is a full interval ago (README's step 2 of a restart)."""
        wait_until(
            lambda: all(
                not m.request_times or time.monotonic() - m.request_times[-1] > m.interval for m in meters
            ),
            timeout,
            "every meter's gap since its last request",
        )

    def output(self) -> str:
        return "\n".join(f"--- shard {s.index}\n{s.text()[-4000:]}" for s in self.shards)


def state_topic(meter: SimMeter) -> str:
    return f"{BASE}/{meter.devid}/state"


def availability(shard: int) -> str:
    return f"{BASE}/bridge-{shard}/availability"


def info_topic(shard: int) -> str:
    return f"{BASE}/bridge-{shard}/info"


def online(message: Message) -> bool:
    return message.payload == b"online"


def offline(message: Message) -> bool:
    return message.payload == b"offline"


def write_shard_config(path: Path, cluster: NatsCluster, sim: Simulator, meters: list[SimMeter]) -> None:
    """The one config file every shard reads, in YAML; the broker list is every node, n0 first."""
    devices = [
        {
            "id": m.devid,
            "pin": m.pin,
            "host": f"{LOOPBACK}:{sim.port}",
            "extended": True,
            "interval": 6,
            "timeout": 2.0,
        }
        for m in meters
    ]
    mqtt = {"host": cluster.addresses(), "client_id": CLIENT_ID, "base_topic": BASE, "qos": 1}
    config = {
        "mqtt": mqtt,
        "homeassistant": {"discovery": False},
        # README's mode for a cluster: a tenth of the retained messages, each a JetStream write.
        "publish": {"output": "json"},
        "shard": {"count": SHARDS},
        "devices": devices,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def shard_environment(cluster: NatsCluster, index: int) -> dict[str, str]:
    """What shard `index` gets beyond the shared file: its index, and its broker list rotated
    to start at node `index`, each in one of the forms README gives (shard 0 keeps the file's
    YAML list, shard 1 gets a JSON list, shard 2 the comma-separated one)."""
    env = {"SMARTMAC_SHARD__INDEX": str(index)}
    addresses = cluster.addresses(first=index)
    if index % 3 == 1:
        env["SMARTMAC_MQTT__HOST"] = json.dumps(addresses)
    elif index % 3 == 2:
        env["SMARTMAC_MQTT__HOST"] = ",".join(addresses)
    return env
