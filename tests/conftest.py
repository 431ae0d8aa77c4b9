"""Shared fixtures: a clean environment, brokers, simulators, probes and bridges."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import BrokerProcess, Probe, Process, Rig

from bench.support import LOOPBACK, Mosquitto, free_port
from bridge.broker import EmbeddedBroker
from bridge.config import (
    DeviceSettings,
    HomeAssistantSettings,
    MqttSettings,
    PublishSettings,
    ShardSettings,
)
from bridge.service import Bridge
from bridge.simulator import SimMeter, Simulator


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # pydantic-settings reads os.environ: a SMARTMAC_* left over from the shell or another
    # test would change what every test sees.
    for name in list(os.environ):
        if name.upper().startswith("SMARTMAC_"):
            monkeypatch.delenv(name)


@pytest.fixture(params=["amqtt", "mosquitto"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerProcess]:
    """A real broker on a free loopback port: embedded amqtt, and mosquitto where installed."""
    port = free_port()
    if request.param == "amqtt":
        embedded = EmbeddedBroker(LOOPBACK, port).start()
        yield BrokerProcess("amqtt", port)
        embedded.stop()
        return
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not on PATH (apt-get install mosquitto)")
    mosquitto = Mosquitto(tmp_path / "mosquitto", port).start()
    yield BrokerProcess("mosquitto", port, mosquitto.restart)
    mosquitto.stop()


@pytest.fixture
def probe_factory(broker: BrokerProcess) -> Iterator[Callable[..., Probe]]:
    probes: list[Probe] = []

    def make(topic: str = "#") -> Probe:
        probe = Probe(broker.port, topic).start()
        probes.append(probe)
        return probe

    yield make
    for probe in probes:
        probe.stop()


@pytest.fixture
def simulator() -> Iterator[Callable[..., Simulator]]:
    """Start a Simulator over the given meters on a free loopback port."""
    started: list[Simulator] = []

    def make(meters: list[SimMeter], **options: object) -> Simulator:
        sim = Simulator(meters, host=LOOPBACK, port=0, **options).start()  # type: ignore[arg-type]
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.stop()


@pytest.fixture
def bridge_factory(broker: BrokerProcess) -> Iterator[Callable[..., Bridge]]:
    """Start the real bridge, in this process, against the test broker."""
    bridges: list[Bridge] = []

    def make(
        devices: list[DeviceSettings],
        *,
        homeassistant: HomeAssistantSettings | None = None,
        publish: PublishSettings | None = None,
        shard: ShardSettings | None = None,
        **mqtt: object,
    ) -> Bridge:
        options: dict[str, object] = {
            "host": LOOPBACK,
            "port": broker.port,
            "client_id": f"bridge-{len(bridges)}",
        }
        options.update(mqtt)
        settings = MqttSettings(**options)  # type: ignore[arg-type]
        bridge = Bridge(
            devices,
            settings,
            host=LOOPBACK,
            port=broker.port,
            homeassistant=homeassistant,
            publish=publish,
            shard=shard,
        )
        bridge.start()
        bridges.append(bridge)
        return bridge

    yield make
    for bridge in bridges:
        bridge.stop()


@pytest.fixture
def rig(
    broker: BrokerProcess,
    simulator: Callable[..., Simulator],
    bridge_factory: Callable[..., Bridge],
    probe_factory: Callable[..., Probe],
) -> Rig:
    """Everything an end-to-end test needs, on one real broker."""
    return Rig(broker, simulator, bridge_factory, probe_factory)


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """`python -m bridge` processes a test started; killed at the end if still running."""
    started: list[Process] = []
    yield started
    for process in started:
        process.kill()
