"""MqttLink against brokers that go wrong in ways a real broker cannot be asked to (issue 12,
item 8): one that takes the TCP connection and never answers CONNECT, one that goes silent
after its CONNACK; and the broker's address as the log writes it, IPv6 included."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.support import LOOPBACK, Mosquitto, wait_until
from bridge.config import MqttSettings
from bridge.mqtt import MqttLink, host_port

KEEPALIVE = 1  # paho checks it about once a second: a silent broker is noticed in ~2 s
BOUND = 10.0  # generous for a loaded 2-core machine


class SilentBroker:
    """Accepts TCP connections, reads what comes, and answers only `reply` to the first
    packet (nothing at all by default): a wrong service on the port, or a hung broker."""

    def __init__(self, reply: bytes = b"") -> None:
        self.reply = reply
        self.sock = socket.create_server((LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        self.connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed by stop()
            self.connections.append(conn)
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        replied = False
        try:
            while conn.recv(4096):
                if self.reply and not replied:
                    conn.sendall(self.reply)
                    replied = True
        except OSError:
            pass

    def stop(self) -> None:
        self.sock.close()
        for conn in self.connections:
            conn.close()


class Links:
    """MqttLinks on one asyncio loop of their own, on a thread, as the bridge runs one."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.started: list[MqttLink] = []
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        for link in self.started:
            asyncio.run_coroutine_threadsafe(link.close([], timeout=0.5), self.loop).result(BOUND)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(BOUND)
        # Closed, not left to the garbage collector: its ResourceWarning would then come
        # at a random point of a later test (once deep inside the parser's recursion test).
        self.loop.close()


@pytest.fixture
def links() -> Iterator[Links]:
    started = Links()
    yield started
    started.close()


def start_link(links: Links, host: str, port: int, **options: object) -> MqttLink:
    link = MqttLink(
        MqttSettings(host=host, port=port, client_id=f"link-test-{port}"),
        host=host,
        port=port,
        will_topic="smartmac/bridge/availability",
        subscriptions=[],
        on_message=lambda topic, payload, retain: None,
        **options,  # type: ignore[arg-type]  # each test passes MqttLink keywords it knows fit
    )
    links.loop.call_soon_threadsafe(link.start, links.loop)
    links.started.append(link)
    return link


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in list(caplog.records) if r.levelno >= logging.WARNING]


def test_a_broker_that_never_answers_connect_is_named_as_such(
    links: Links, caplog: pytest.LogCaptureFixture
) -> None:
    server = SilentBroker()
    try:
        start_link(links, LOOPBACK, server.port, keepalive=KEEPALIVE)
        wanted = f"no CONNACK from MQTT broker {LOOPBACK}:{server.port} within {KEEPALIVE} s; retrying"
        wait_until(lambda: wanted in warnings(caplog), BOUND, "the no-CONNACK warning")
        # Not blamed on TLS or a certificate (today's message after 30 s of silence).
        assert not [w for w in warnings(caplog) if "TLS" in w or "certificate" in w]
    finally:
        server.stop()


def test_a_broker_silent_after_connack_is_a_keepalive_timeout(
    links: Links, caplog: pytest.LogCaptureFixture
) -> None:
    server = SilentBroker(reply=bytes((0x20, 2, 0, 0)))  # CONNACK, accepted; then nothing
    try:
        link = start_link(links, LOOPBACK, server.port, keepalive=KEEPALIVE)
        assert link.connected.wait(BOUND)
        wanted = (
            f"lost connection to MQTT broker {LOOPBACK}:{server.port}: no answer within the"
            f" {KEEPALIVE} s keepalive; reconnecting"
        )
        wait_until(lambda: wanted in warnings(caplog), BOUND, "the keepalive warning")
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("host", "port", "written"),
    [("::1", 1883, "[::1]:1883"), ("fe80::1%eth0", 8883, "[fe80::1%eth0]:8883"),
     ("127.0.0.1", 1883, "127.0.0.1:1883"), ("broker.lan", 1883, "broker.lan:1883")],
)  # fmt: skip
def test_host_port(host: str, port: int, written: str) -> None:
    assert host_port(host, port) == written


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.mosquitto
@pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto not installed")
@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
def test_an_ipv6_broker_is_logged_in_brackets(
    tmp_path: Path, links: Links, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bridge.mqtt")
    broker = Mosquitto(tmp_path, host="::1").start()
    port = broker.port
    try:
        link = start_link(links, "::1", port)
        assert link.connected.wait(BOUND)
        assert link.broker == f"[::1]:{port}"
        wanted = f"connected to MQTT broker [::1]:{port}; republished 0 retained topics"
        wait_until(lambda: wanted in caplog.messages, BOUND, "the connected line")  # logged after the event
        assert f"connecting to MQTT broker [::1]:{port}" in caplog.messages
    finally:
        broker.stop()
