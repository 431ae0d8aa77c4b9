"""The fault suite runs on mosquitto with a password file, and proves that no secret leaks.

Fixtures here override tests/conftest.py's for every test under tests/faults/: `broker`
is always mosquitto (a test may ask for options with
`@pytest.mark.parametrize("mosquitto", [{...}], indirect=True)`), every bridge logs in
with the suite's user and password, and every probe's messages are checked for secrets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from faultkit import PASSWORD, USERNAME, FaultMosquitto, Watch
from support import BrokerProcess, Probe

from bench.support import free_port
from bridge.service import Bridge


@pytest.fixture(autouse=True)
def watch() -> Iterator[Watch]:
    """Captures every log record; at the end no PIN or password may appear anywhere."""
    watcher = Watch()
    with watcher.capture():
        yield watcher
    watcher.assert_no_secret()


@pytest.fixture
def mosquitto(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FaultMosquitto]:
    options = getattr(request, "param", None) or {}
    broker = FaultMosquitto(tmp_path / "mosquitto", free_port(), **options)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def broker(mosquitto: FaultMosquitto) -> BrokerProcess:
    return BrokerProcess("mosquitto", mosquitto.port, mosquitto.restart)


@pytest.fixture
def bridge_factory(bridge_factory: Callable[..., Bridge]) -> Callable[..., Bridge]:
    def make(devices: list[object], **mqtt: object) -> Bridge:
        mqtt.setdefault("username", USERNAME)
        mqtt.setdefault("password", PASSWORD)
        return bridge_factory(devices, **mqtt)

    return make


@pytest.fixture
def probe_factory(probe_factory: Callable[..., Probe], watch: Watch) -> Callable[..., Probe]:
    def make(topic: str = "#") -> Probe:
        probe = probe_factory(topic)
        watch.add_probe(probe)
        return probe

    return make
