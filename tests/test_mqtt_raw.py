"""The one-buffer QoS 0 publish (mqtt._RawPublisher) against paho's own encoding.

A real paho client connects over a real socket to a listener that answers CONNACK and
records every byte after the CONNECT. The same messages go once through paho's public
publish() and once through _RawPublisher: the two byte streams must be equal, for payloads
whose remaining length sits on each side of every boundary of MQTT's variable-length
integer (127/128, 16383/16384, 2097151/2097152).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.mqtt import _fixed_header, _RawPublisher

TOPIC = "smartmac/m1/Wh1"
_OVERHEAD = 2 + len(TOPIC.encode())  # the topic's length prefix and bytes
BOUNDARIES = [127, 128, 16383, 16384, 2097151, 2097152]


class Recorder:
    """A listener on 127.0.0.1 that plays broker just far enough: CONNACK, then records."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.data = bytearray()
        self._lock = threading.Condition()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._server.accept()
        with conn:
            connect = _read_packet(conn)
            assert connect[0] >> 4 == 1, "expected CONNECT"
            conn.sendall(b"\x20\x02\x00\x00")  # CONNACK, accepted
            while chunk := conn.recv(1 << 20):
                with self._lock:
                    self.data += chunk
                    self._lock.notify_all()

    def wait_for(self, size: int, timeout: float = 10.0) -> bytes:
        with self._lock:
            assert self._lock.wait_for(lambda: len(self.data) >= size, timeout), (len(self.data), size)
            return bytes(self.data)

    def close(self) -> None:
        self._server.close()


def _read_packet(conn: socket.socket) -> bytes:
    """One whole MQTT packet: fixed header byte, remaining length, then that many bytes."""
    raw = bytearray(conn.recv(1))
    length, shift = 0, 0
    while True:
        byte = conn.recv(1)[0]
        raw.append(byte)
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    total = len(raw) + length
    while len(raw) < total:
        raw += conn.recv(total - len(raw))
    return bytes(raw)


@pytest.fixture
def connected() -> Iterator[Callable[[], tuple[paho.Client, Recorder]]]:
    made: list[tuple[paho.Client, Recorder]] = []

    def make() -> tuple[paho.Client, Recorder]:
        recorder = Recorder()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="raw-test", protocol=paho.MQTTv311)
        up = threading.Event()
        client.on_connect = lambda *args: up.set()
        client.connect("127.0.0.1", recorder.port, keepalive=60)
        client.loop_start()
        assert up.wait(5), "no CONNACK handled"
        made.append((client, recorder))
        return client, recorder

    yield make
    for client, recorder in made:
        client.loop_stop()
        client.disconnect()
        recorder.close()


def _messages() -> list[tuple[str, bytes]]:
    """Payloads whose remaining length (topic + payload) is each boundary value."""
    return [(TOPIC, bytes([0x41 + i % 26]) * (n - _OVERHEAD)) for i, n in enumerate(BOUNDARIES)]


def test_raw_publishes_are_byte_for_byte_paho_publishes(
    connected: Callable[[], tuple[paho.Client, Recorder]],
) -> None:
    messages = _messages()
    theirs_client, theirs = connected()
    for topic, payload in messages:
        theirs_client.publish(topic, payload, qos=0, retain=True)
    expected = theirs.wait_for(sum(2 + len(TOPIC) + len(p) for _, p in messages))

    ours_client, ours = connected()
    raw = _RawPublisher.attach(ours_client)
    assert raw is not None, "paho's _packet_queue changed: the fallback would be used"
    raw.publish_retained(messages)
    got = ours.wait_for(len(expected))
    assert got == expected
    # Each remaining-length boundary really was crossed: 1, 2, 3 and 4 length bytes.
    assert {len(_fixed_header(n)) for n in BOUNDARIES} == {2, 3, 4, 5}


def test_an_unknown_packet_queue_means_publish() -> None:
    """A paho whose private call is gone or has another signature gets no raw publisher."""

    class Changed:
        def _packet_queue(self, command: int, packet: bytes, *, flags: int = 0) -> None: ...

    class Gone:
        pass

    assert _RawPublisher.attach(Changed()) is None  # type: ignore[arg-type]  # paho-shaped stand-ins
    assert _RawPublisher.attach(Gone()) is None  # type: ignore[arg-type]  # paho-shaped stand-in
    real = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    assert _RawPublisher.attach(real) is not None
