"""Broker failover (issue 11): mqtt.host lists several brokers; the bridge is on the first
that accepts and moves on, round robin, when the one it is on goes away, republishing
everything retained there. Real brokers on free loopback ports; a free port nobody
listens on stands for a node that is down. (The brokers here are not clustered: that each
one gets everything retained from the bridge itself is what is proven.)"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import Probe, device

from bench.support import LOOPBACK, Mosquitto, free_port, wait_until
from bridge.__main__ import build_bridge
from bridge.broker import EmbeddedBroker
from bridge.config import MqttSettings, load_settings
from bridge.service import Bridge
from bridge.simulator import SimMeter, Simulator

BOUND = 15.0  # generous for a loaded 2-core machine
PIN = "012345"

needs_mosquitto = pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto is not on PATH")


@pytest.fixture(autouse=True)
def link_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bridge.mqtt")


@pytest.fixture
def sim() -> Iterator[Simulator]:
    simulator = Simulator(
        [SimMeter(devid="1728053249", pin=PIN, phases=3, extended=True)], host=LOOPBACK, port=0
    ).start()
    yield simulator
    simulator.stop()


@pytest.fixture
def start_bridge(sim: Simulator) -> Iterator[Callable[[list[tuple[str, int]]], Bridge]]:
    started: list[Bridge] = []

    def make(brokers: list[tuple[str, int]]) -> Bridge:
        meter = next(iter(sim.meters.values()))
        bridge = Bridge(
            [device(sim, meter, topic="garage", interval=6)],
            MqttSettings(client_id=f"failover-{len(started)}"),
            brokers=brokers,
        )
        bridge.start()
        started.append(bridge)
        return bridge

    yield make
    for bridge in started:
        bridge.stop()


@pytest.fixture
def probes() -> Iterator[Callable[[int], Probe]]:
    started: list[Probe] = []

    def make(port: int) -> Probe:
        probe = Probe(port, "smartmac/#").start()
        started.append(probe)
        return probe

    yield make
    for probe in started:
        probe.stop()


def infos(caplog: pytest.LogCaptureFixture, pattern: str) -> list[str]:
    return [r.getMessage() for r in list(caplog.records) if re.search(pattern, r.getMessage())]


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The MQTT link's."""
    return [
        r.getMessage()
        for r in list(caplog.records)
        if r.levelno >= logging.WARNING and r.name == "bridge.mqtt"
    ]


#: What the bridge keeps retained for one meter and itself (a subset: enough to compare).
TOPICS = (
    "smartmac/bridge/availability",
    "smartmac/bridge/info",
    "smartmac/garage/availability",
    "smartmac/garage/state",
    "smartmac/garage/relay",
    "smartmac/garage/V1",
)


def test_the_first_broker_that_accepts_is_used(
    start_bridge: Callable[[list[tuple[str, int]]], Bridge],
    probes: Callable[[int], Probe],
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = free_port()  # nobody listens: refused
    port = free_port()
    broker = EmbeddedBroker(LOOPBACK, port).start()
    try:
        probe = probes(port)
        bridge = start_bridge([(LOOPBACK, down), (LOOPBACK, port)])
        assert bridge.link.connected.wait(BOUND)
        assert bridge.link.broker == f"{LOOPBACK}:{port}"
        for topic in TOPICS:
            probe.wait_for(topic, timeout=BOUND)
        assert f"cannot reach MQTT broker {LOOPBACK}:{down}; retrying" in warnings(caplog)
        assert [line.split(";")[0] for line in infos(caplog, r"^connected to MQTT broker")] == [
            f"connected to MQTT broker {LOOPBACK}:{port} (2 of 2)"
        ]
    finally:
        broker.stop()


@needs_mosquitto
def test_a_lost_broker_moves_the_bridge_to_the_next_with_everything_retained(
    tmp_path: Path,
    start_bridge: Callable[[list[tuple[str, int]]], Bridge],
    probes: Callable[[int], Probe],
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = Mosquitto(tmp_path / "a").start()
    second = Mosquitto(tmp_path / "b").start()
    try:
        bridge = start_bridge([(LOOPBACK, first.port), (LOOPBACK, second.port)])
        on_first = probes(first.port)
        for topic in TOPICS:
            on_first.wait_for(topic, timeout=BOUND)
        assert bridge.link.broker == f"{LOOPBACK}:{first.port}"
        on_second = probes(second.port)
        on_second.sync("smartmac")
        assert all("probe-sync" in m.topic for m in on_second.messages)  # on one broker at a time
        on_first.stop()

        first.stop()  # killed: the bridge loses its connection
        for topic in TOPICS:  # (live, so without the retain flag: MQTT 3.3.1.3)
            on_second.wait_for(topic, timeout=BOUND)
        assert bridge.link.broker == f"{LOOPBACK}:{second.port}"
        # Retained there now, for a subscriber that comes later too...
        later = probes(second.port)
        for topic in TOPICS:
            later.wait_for(topic, lambda m: m.retain, timeout=BOUND)
        assert later.wait_for("smartmac/bridge/availability").payload == b"online"
        # ...the states go on (the meter is polled every 6 s), and commands reach it there.
        mark = later.mark()
        later.wait_for("smartmac/garage/state", after=mark, timeout=BOUND)
        later.publish("smartmac/garage/relay/set", "ON")
        assert later.wait_for("smartmac/garage/relay/result", after=mark, timeout=BOUND).json() == {
            "ok": True,
            "relay": "ON",
        }

        # Round robin: the second one gone too, back to the first.
        first.start()
        second.stop()
        back = probes(first.port)
        back.wait_for("smartmac/garage/relay", lambda m: m.payload == b"ON", timeout=BOUND)
        probes(first.port).wait_for("smartmac/garage/relay", lambda m: m.retain and m.payload == b"ON")
        assert bridge.link.broker == f"{LOOPBACK}:{first.port}"
        # Logged once per change of broker, naming it.
        assert [line.split(";")[0] for line in infos(caplog, r"^connected to MQTT broker")] == [
            f"connected to MQTT broker {LOOPBACK}:{first.port} (1 of 2)",
            f"connected to MQTT broker {LOOPBACK}:{second.port} (2 of 2)",
            f"connected to MQTT broker {LOOPBACK}:{first.port} (1 of 2)",
        ]
        lost = f"lost connection to MQTT broker {LOOPBACK}:{first.port} "
        assert [w for w in warnings(caplog) if w.startswith(lost)]
    finally:
        first.stop()
        second.stop()


@needs_mosquitto
def test_a_reconnect_to_the_same_broker_is_no_change(
    tmp_path: Path,
    start_bridge: Callable[[list[tuple[str, int]]], Bridge],
    probes: Callable[[int], Probe],
    caplog: pytest.LogCaptureFixture,
) -> None:
    only = Mosquitto(tmp_path / "a").start()
    down = free_port()
    try:
        bridge = start_bridge([(LOOPBACK, only.port), (LOOPBACK, down)])
        before = probes(only.port)
        for topic in TOPICS:
            before.wait_for(topic, timeout=BOUND)
        only.restart()  # the other one is down: after a round the bridge is back here
        wait_until(lambda: bool(infos(caplog, "^reconnected")), BOUND, "the reconnect line")
        probe = probes(only.port)  # after the replay: every topic retained there again
        for topic in TOPICS:
            probe.wait_for(topic, lambda m: m.retain, timeout=BOUND)
        assert len(infos(caplog, r"^connected to MQTT broker")) == 1
        (line,) = infos(caplog, "^reconnected")
        assert re.fullmatch(r"reconnected to the same MQTT broker; republished \d+ retained topics", line)
        assert bridge.link.broker == f"{LOOPBACK}:{only.port}"
    finally:
        only.stop()


def test_an_outage_of_every_broker_is_logged_once_per_broker_and_retried(
    start_bridge: Callable[[list[tuple[str, int]]], Bridge],
    probes: Callable[[int], Probe],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="bridge.mqtt")
    ports = [free_port(), free_port(), free_port()]
    bridge = start_bridge([(LOOPBACK, port) for port in ports])
    wanted = [f"cannot reach MQTT broker {LOOPBACK}:{port}; retrying" for port in ports]

    def repeated() -> bool:  # the second round, after the back-off, at debug
        lines = [r.getMessage() for r in list(caplog.records) if r.levelno == logging.DEBUG]
        return lines.count(wanted[-1]) >= 1

    wait_until(repeated, BOUND, "a second round")
    assert warnings(caplog) == wanted  # each broker once, in the list's order
    # One of them comes up: a later round finds it.
    broker = EmbeddedBroker(LOOPBACK, ports[1]).start()
    try:
        probe = probes(ports[1])
        probe.wait_for("smartmac/garage/state", timeout=BOUND)
        assert bridge.link.broker == f"{LOOPBACK}:{ports[1]}"
        assert infos(caplog, r"^connected to MQTT broker")[0].startswith(
            f"connected to MQTT broker {LOOPBACK}:{ports[1]} (2 of 3)"
        )
    finally:
        broker.stop()


def test_run_builds_the_bridge_on_the_configured_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMARTMAC_MQTT__HOST", "[::1]:1884, broker.lan")
    monkeypatch.setenv("SMARTMAC_MQTT__PORT", "1999")
    settings = load_settings()
    bridge = build_bridge(settings, ())
    assert bridge.link._brokers == (("::1", 1884), ("broker.lan", 1999))
    assert bridge.link.broker == "[::1]:1884"  # the first, until it is tried
    # The old keywords still name one broker.
    assert build_bridge(settings, (), host=LOOPBACK, port=1).link._brokers == ((LOOPBACK, 1),)


def test_host_and_brokers_together_are_refused() -> None:
    with pytest.raises(TypeError, match="not both"):
        Bridge([], MqttSettings(), host=LOOPBACK, port=1, brokers=[(LOOPBACK, 2)])


@pytest.mark.parametrize("kind", ["amqtt", "mosquitto"])
def test_a_late_last_will_from_a_node_left_behind_is_undone(
    tmp_path: Path,
    kind: str,
    start_bridge: Callable[[list[tuple[str, int]]], Bridge],
    probes: Callable[[int], Probe],
) -> None:
    # A node the bridge left while it was still up publishes the will when its keepalive
    # runs out, through the cluster, after the bridge's `online` on its new node: this
    # probe plays that node's part.
    if kind == "mosquitto" and shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not on PATH")
    port = free_port()
    stop: Callable[[], None]
    if kind == "amqtt":
        embedded = EmbeddedBroker(LOOPBACK, port).start()
        stop = embedded.stop
    else:
        mosquitto = Mosquitto(tmp_path / "m", port).start()
        stop = mosquitto.stop
    try:
        start_bridge([(LOOPBACK, port)])
        cluster = probes(port)
        availability = "smartmac/bridge/availability"
        cluster.wait_for(availability, lambda m: m.payload == b"online", timeout=BOUND)
        mark = cluster.mark()
        cluster.publish(availability, b"offline", retain=True)
        cluster.wait_for(availability, lambda m: m.payload == b"online", after=mark, timeout=BOUND)
        later = probes(port)
        assert later.wait_for(availability, lambda m: m.retain, timeout=BOUND).payload == b"online"
    finally:
        stop()
