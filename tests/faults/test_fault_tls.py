"""Issue 3, case 6: TLS and passwords against mosquitto, certificates made by openssl.

The broker has three listeners: plain (anonymous, for the probe that watches), TLS with
a password file, and TLS that also requires a client certificate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest
from faultkit import (
    PASSWORD,
    USERNAME,
    WRONG_PASSWORD,
    FaultMosquitto,
    Watch,
    fault_meter,
)
from support import Rig, device

from bench.support import LOOPBACK, wait_until
from bridge.config import DeviceSettings, MqttSettings
from bridge.service import Bridge

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.parametrize("mosquitto", [{"tls": True}], indirect=True, ids=["tls"]),
]


@pytest.fixture
def tls_bridge(mosquitto: FaultMosquitto) -> Iterator[Callable[..., Bridge]]:
    """Start a bridge on one of the TLS listeners, trusting the test CA."""
    bridges: list[Bridge] = []

    def make(devices: list[DeviceSettings], port: int, **options: object) -> Bridge:
        assert mosquitto.certs is not None
        tls: dict[str, object] = {"enabled": True, "ca_certs": mosquitto.certs.ca}
        extra = options.pop("tls", {})
        assert isinstance(extra, dict)
        tls.update(extra)
        values: dict[str, object] = {"host": LOOPBACK, "port": port, "client_id": f"tls-{len(bridges)}",
                                     "username": USERNAME, "password": PASSWORD, "tls": tls}  # fmt: skip
        values.update(options)
        bridge = Bridge(devices, MqttSettings(**values), host=LOOPBACK, port=port)  # type: ignore[arg-type]  # pydantic checks the values
        bridge.start()
        bridges.append(bridge)
        return bridge

    yield make
    for bridge in bridges:
        bridge.stop()


def test_password_over_tls_with_a_ca_file(
    rig: Rig, mosquitto: FaultMosquitto, tls_bridge: Callable[..., Bridge]
) -> None:
    meter = fault_meter(0)
    sim = rig.simulator([meter])
    probe = rig.probe("smartmac/#")  # on the plain listener: sees what the bridge published over TLS
    bridge = tls_bridge([device(sim, meter, topic="m")], mosquitto.tls_port)
    probe.wait_for("smartmac/m/state")
    probe.wait_for("smartmac/m/availability", lambda m: m.payload == b"online")
    assert bridge.link.connected.is_set()
    # Commands come in over the same TLS connection.
    mark = probe.mark()
    probe.publish("smartmac/m/relay/set", "ON")
    assert probe.wait_for("smartmac/m/relay/result", after=mark).json() == {"ok": True, "relay": "ON"}
    assert mosquitto.log_lines(f"New client connected from {LOOPBACK}:\\d+ as tls-0 .*u'{USERNAME}'")


def test_wrong_password_one_clear_line_and_retries(
    rig: Rig, mosquitto: FaultMosquitto, tls_bridge: Callable[..., Bridge], watch: Watch
) -> None:
    meter = fault_meter(0)
    sim = rig.simulator([meter])
    bridge = tls_bridge([device(sim, meter, topic="m")], mosquitto.tls_port, password=WRONG_PASSWORD)
    broker = f"{LOOPBACK}:{mosquitto.tls_port}"
    refused = f"MQTT broker {broker} refused the connection: Not authorized"
    # It keeps retrying: the repeats of the refusal are logged at debug...
    wait_until(lambda: bool(watch.logged(refused, level=logging.DEBUG)), 15, "a second attempt")
    # ...and mosquitto turned it away each time (it names no client id for these).
    assert len(mosquitto.log_lines("disconnected, not authorised")) >= 2
    assert not bridge.link.connected.is_set()
    # One clear line, naming the broker; the password is nowhere (the autouse watch).
    warnings = [r.message for r in watch.records if r.level >= logging.WARNING and "MQTT" in r.message]
    assert warnings == [refused]


def test_client_certificate(rig: Rig, mosquitto: FaultMosquitto, tls_bridge: Callable[..., Bridge]) -> None:
    assert mosquitto.certs is not None
    with_cert, without = fault_meter(0), fault_meter(1)
    sim = rig.simulator([with_cert, without])
    probe = rig.probe("#")
    certificate = {"certfile": mosquitto.certs.client_cert, "keyfile": mosquitto.certs.client_key}
    accepted = tls_bridge([device(sim, with_cert, topic="m")], mosquitto.mtls_port, tls=certificate,
                          base_topic="cert")  # fmt: skip
    probe.wait_for("cert/m/state")
    probe.wait_for("cert/bridge/availability", lambda m: m.payload == b"online")
    assert accepted.link.connected.is_set()
    # The listener does require it: the same bridge without a certificate gets nowhere.
    refused = tls_bridge([device(sim, without, topic="m")], mosquitto.mtls_port, base_topic="nocert")
    wait_until(lambda: bool(mosquitto.log_lines("peer did not return a certificate")), 10, "the refusal")
    assert not refused.link.connected.is_set()
    assert [m.topic for m in probe.messages if m.topic.startswith("nocert/")] == []


def test_a_refused_client_certificate_is_logged_once(
    rig: Rig, mosquitto: FaultMosquitto, tls_bridge: Callable[..., Bridge], watch: Watch
) -> None:
    # README: connection problems are logged once per change. A broker that requires a
    # client certificate turns a bridge without one away (with TLS 1.3 only after the
    # handshake, when the first MQTT packet goes out), again at every retry.
    meter = fault_meter(0)
    sim = rig.simulator([meter])
    bridge = tls_bridge([device(sim, meter, topic="m")], mosquitto.mtls_port)
    wait_until(lambda: len(mosquitto.log_lines("peer did not return a certificate")) >= 2, 15, "a retry")
    assert not bridge.link.connected.is_set()
    broker = f"{LOOPBACK}:{mosquitto.mtls_port}"
    problems = [r.message for r in watch.records if r.level >= logging.WARNING and broker in r.message]
    assert len(problems) == 1, f"expected one warning naming the broker {broker}, got {problems}"
