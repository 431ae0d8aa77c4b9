"""A cluster of nats-server nodes on loopback, with MQTT on each: tests/cluster/ and a rate bench.

Each node gets a config file of its own in `directory`/n<i>/ (server_name n<i>, JetStream
stored there, an MQTT listener, a cluster route to every node, a monitoring port) and its
output beside it. start() returns once every node's MQTT port accepts, every node sees the
other nodes' routes, the JetStream meta group has a leader, and a retained message published
on the first node can be read on the last: the moment a client can rely on the cluster.

NATS's MQTT gateway keeps what MQTT needs in JetStream streams (sessions, retained messages,
QoS 1 messages), replicated across the cluster (stream_replicas, 3 here), so a node can be
killed and a client carries on through another. What MQTT clients must know of it: QoS 0 and 1
only; a client id is unique cluster-wide (a second connection with the same id, on any node,
takes the session over); a retained message is a JetStream write, slower than mosquitto's.

    python -m bench.nats --rate [--messages 10000] [--nodes 3]

prints how many retained QoS 0 messages a second the cluster takes from one paho client (a
figure, not a test): 1,800/s for 10,000 messages and 2,600/s for 20,000 on 2 shared cores
with nats-server 2.9.10 (mosquitto takes ~25,000/s), as the issue's 2,300/s on a 3-node 2.9
cluster; each retained message is a replicated JetStream write. Only the standard library
and paho (bench.support must stay lean, so this is a module of its own).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from subprocess import Popen

if __package__ in (None, ""):  # `python bench/nats.py`: the repository root first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.support import LOOPBACK, free_port, wait_for_port, wait_until

STARTUP_TIMEOUT = 30.0


def binary() -> str | None:
    """nats-server's path (Debian puts it in /usr/sbin, often not on a user's PATH), or None."""
    found = shutil.which("nats-server")
    if found is None and Path("/usr/sbin/nats-server").is_file():
        found = "/usr/sbin/nats-server"
    return found


class NatsNode:
    """One nats-server process: its ports, its config and store in `directory`, its output."""

    def __init__(self, directory: Path, index: int) -> None:
        self.index = index
        self.name = f"n{index}"
        self.directory = directory
        self.store = directory / "jetstream"
        self.conf = directory / "nats.conf"
        self.output = directory / "nats.out"
        self.client_port = free_port()
        self.cluster_port = free_port()
        self.mqtt_port = free_port()
        self.monitor_port = free_port()
        self.process: Popen[bytes] | None = None

    @property
    def mqtt_address(self) -> str:
        """host:port, as mqtt.host takes it."""
        return f"{LOOPBACK}:{self.mqtt_port}"

    def write_config(self, routes: Sequence[int], replicas: int) -> None:
        route_urls = ", ".join(f"nats://{LOOPBACK}:{port}" for port in routes)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            f"""server_name: {self.name}
listen: {LOOPBACK}:{self.client_port}
http: {LOOPBACK}:{self.monitor_port}
jetstream {{
  store_dir: "{self.store}"
}}
cluster {{
  name: c
  listen: {LOOPBACK}:{self.cluster_port}
  routes: [{route_urls}]
}}
mqtt {{
  listen: {LOOPBACK}:{self.mqtt_port}
  # Sessions, retained and QoS 1 messages on every node, so one can die.
  stream_replicas: {replicas}
  # Redelivery of an unacknowledged QoS 1 message: the default is 30 s.
  ack_wait: "5s"
  # Per subscription; a `#` subscription counts twice (NATS makes it two).
  max_ack_pending: 1000
}}
"""
        )

    def start(self) -> None:
        """The process, on the ports and store it had before if it ran already."""
        path = binary()
        if path is None:
            raise RuntimeError("nats-server is not installed (apt-get install nats-server)")
        with open(self.output, "ab") as out:
            self.process = Popen([path, "-c", str(self.conf)], stdout=out, stderr=out)

    def kill(self) -> None:
        """SIGKILL, as a crash or a lost machine: nothing flushed, no goodbye to the routes."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def monitor(self, endpoint: str) -> dict[str, object]:
        """One of the monitoring port's JSON pages: "routez", "jsz", "connz?mqtt_client=x"."""
        url = f"http://{LOOPBACK}:{self.monitor_port}/{endpoint}"
        with urllib.request.urlopen(url, timeout=2) as answer:
            page: dict[str, object] = json.load(answer)
            return page

    def routes(self) -> int:
        """How many routes this node has (2.9's /routez names no remote server)."""
        count = self.monitor("routez").get("num_routes")
        return count if isinstance(count, int) else 0

    def mqtt_clients(self) -> set[str]:
        """The MQTT client ids connected to this node now."""
        connections = self.monitor("connz?limit=1024").get("connections") or []
        assert isinstance(connections, list)
        return {str(c["mqtt_client"]) for c in connections if c.get("mqtt_client")}

    def output_text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""


class NatsCluster:
    """`count` clustered nodes n0..n<count-1> under `directory`, each with MQTT on."""

    def __init__(self, directory: Path, count: int = 3) -> None:
        self.directory = directory
        self.nodes = [NatsNode(directory / f"n{i}", i) for i in range(count)]
        routes = [node.cluster_port for node in self.nodes]
        for node in self.nodes:
            node.write_config(routes, replicas=min(3, count))

    def start(self, timeout: float = STARTUP_TIMEOUT) -> NatsCluster:
        """Every node started; returns once the cluster is ready for MQTT clients."""
        for node in self.nodes:
            node.start()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    def kill(self, index: int) -> None:
        """Node `index` killed with SIGKILL; the others carry on without it."""
        self.nodes[index].kill()

    def restart(self, index: int, timeout: float = STARTUP_TIMEOUT) -> None:
        """Node `index` back on its ports and store; returns once it has rejoined."""
        node = self.nodes[index]
        node.kill()
        node.start()
        self.wait_ready(timeout)

    def addresses(self, first: int = 0) -> list[str]:
        """Every running node's MQTT host:port, starting at node `first` (for mqtt.host lists)."""
        rotated = self.nodes[first:] + self.nodes[:first]
        return [node.mqtt_address for node in rotated if node.running]

    def node_of(self, client_id: str) -> int | None:
        """The index of the running node `client_id` is connected to over MQTT, if any."""
        for node in self.nodes:
            if node.running and client_id in node.mqtt_clients():
                return node.index
        return None

    def wait_ready(self, timeout: float) -> None:
        """Ports, routes, a JetStream leader, and a retained message across the cluster."""
        deadline = time.monotonic() + timeout
        up = [node for node in self.nodes if node.running]
        try:
            for node in up:
                wait_for_port(node.mqtt_port, max(0.1, deadline - time.monotonic()))
            wait_until(
                lambda: all(self._routes(node) >= len(up) - 1 for node in up),
                max(0.1, deadline - time.monotonic()),
                "every running node routed to every other",
            )
            wait_until(
                lambda: all(self._has_leader(node) for node in up),
                max(0.1, deadline - time.monotonic()),
                "a JetStream meta leader known to every running node",
            )
            retained_across(up[0].mqtt_port, up[-1].mqtt_port, max(1.0, deadline - time.monotonic()))
        except (AssertionError, TimeoutError) as failure:
            tails = "\n".join(f"--- {node.name}\n{node.output_text()[-3000:]}" for node in self.nodes)
            raise RuntimeError(f"nats cluster not ready: {failure}\n{tails}") from None

    @staticmethod
    def _routes(node: NatsNode) -> int:
        try:
            return node.routes()
        except OSError:
            return -1

    @staticmethod
    def _has_leader(node: NatsNode) -> bool:
        try:
            meta = node.monitor("jsz").get("meta_cluster") or {}
        except OSError:
            return False
        return isinstance(meta, dict) and bool(meta.get("leader"))


def client(port: int, name: str) -> paho.Client:
    """A connected paho client (its network loop running), with a cluster-wide unique id."""
    connected = threading.Event()
    mqtt = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"{name}-{uuid.uuid4().hex[:10]}", protocol=paho.MQTTv311
    )
    mqtt.on_connect = lambda c, u, f, rc, p: connected.set() if not rc.is_failure else None
    mqtt.connect(LOOPBACK, port)
    mqtt.loop_start()
    if not connected.wait(15):
        mqtt.loop_stop()
        raise TimeoutError(f"MQTT connect to {LOOPBACK}:{port} refused or not answered")
    return mqtt


def retained_across(publish_port: int, read_port: int, timeout: float) -> None:
    """Publish a retained message on one node and read it on another: the cluster works.

    Retried within `timeout`: JetStream may still be electing the leaders of the MQTT
    streams, and until then a connect or a retained publish is refused.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            _retained_once(publish_port, read_port, min(5.0, deadline - time.monotonic()))
            return
        except (OSError, TimeoutError) as failure:
            last = failure
            time.sleep(0.2)  # the JetStream election has no event to wait on from here
    raise TimeoutError(f"no retained message across the cluster within {timeout:.0f} s: {last}")


def _retained_once(publish_port: int, read_port: int, timeout: float) -> None:
    topic = f"bench-nats/ready/{uuid.uuid4().hex[:8]}"
    payload = uuid.uuid4().hex.encode()
    got = threading.Event()
    writer = client(publish_port, "ready-pub")
    try:
        writer.publish(topic, payload, qos=1, retain=True).wait_for_publish(timeout)
    finally:
        writer.disconnect()
        writer.loop_stop()
    reader = client(read_port, "ready-sub")
    reader.on_message = lambda c, u, m: got.set() if m.payload == payload else None
    try:
        reader.subscribe(topic, qos=1)
        if not got.wait(timeout):
            raise TimeoutError(f"retained {topic} not seen on port {read_port}")
        # Cleared again, so a cluster that lives long does not gather them.
        reader.publish(topic, b"", qos=1, retain=True).wait_for_publish(timeout)
    finally:
        reader.disconnect()
        reader.loop_stop()


def rate(cluster: NatsCluster, messages: int) -> None:
    """Retained QoS 0 messages a second from one paho client on node 0, as read on the last.

    The client hands paho `messages` retained publishes at once, on one topic per message
    among 1,000 (as a bridge publishes a state per meter); paho queues what the socket does
    not take. The figure is how many a subscriber on the last node had received a second,
    from the first publish to the last message's arrival: what the cluster takes in.
    """
    first, last = cluster.nodes[0], cluster.nodes[-1]
    received = 0
    last_at = 0.0
    everything = threading.Event()
    lock = threading.Lock()

    def count(c: paho.Client, u: object, m: paho.MQTTMessage) -> None:
        nonlocal received, last_at
        if m.topic == "rate/ready":
            ready.set()
            return
        with lock:
            received += 1
            last_at = time.monotonic()
            if received == messages:
                everything.set()

    reader = client(last.mqtt_port, "rate-sub")
    reader.on_message = count
    subscribed = threading.Event()
    reader.on_subscribe = lambda *a: subscribed.set()
    ready = threading.Event()
    reader.subscribe("rate/#", qos=0)
    if not subscribed.wait(10):
        raise TimeoutError(f"no SUBACK from {last.name}")
    writer = client(first.mqtt_port, "rate-pub")
    # The SUBACK comes before the subscription has reached the first node over the routes;
    # until then what is published there is not forwarded. A marker until one arrives.
    deadline = time.monotonic() + 10
    while not ready.is_set():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{last.name}'s subscription never reached {first.name}")
        writer.publish("rate/ready", b"", qos=0)
        ready.wait(0.2)
    payload = json.dumps({"V1": 230.1, "A1": 1.234, "W1": 284.0, "Wh1": 123456}).encode()
    start = last_at = time.monotonic()
    for sent in range(messages):
        writer.publish(f"rate/m{sent % 1000}/state", payload, qos=0, retain=True)
    handed = time.monotonic() - start
    # Ends when all have arrived, or when none has arrived for 5 s (QoS 0 may be dropped).
    while not everything.wait(1.0):
        with lock:
            if time.monotonic() - last_at > 5.0:
                break
    took = max(last_at - start, 1e-9)  # none received: 0/s, not a negative time
    writer.disconnect()
    writer.loop_stop()
    reader.disconnect()
    reader.loop_stop()
    print(
        f"{len(cluster.nodes)}-node nats cluster ({version()}), one paho client on {first.name}: "
        f"{messages} retained QoS 0 handed to paho in {handed:.2f} s; {received} received on "
        f"{last.name} within {took:.1f} s of the first = {received / took:,.0f}/s"
    )


def version() -> str:
    path = binary()
    if path is None:
        return "nats-server missing"
    return subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", action="store_true", help="measure retained QoS 0 messages a second")
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--nodes", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-nats-") as tmp:
        started = time.monotonic()
        cluster = NatsCluster(Path(tmp), args.nodes).start()
        print(f"{args.nodes} nodes ready in {time.monotonic() - started:.1f} s:", cluster.addresses())
        try:
            if args.rate:
                rate(cluster, args.messages)
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
