"""The embedded amqtt broker, exercised with real paho-mqtt 2.x clients over TCP.

Every test gets its own free port and its own topics; waits are threading.Events with
a timeout, never sleeps.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

import bridge.broker
from bench.support import LOOPBACK as HOST
from bench.support import free_port
from bridge.broker import EmbeddedBroker
from bridge.errors import BrokerError

WAIT = 5.0  # seconds; generous, only reached when something is broken


def topic(name: str) -> str:
    return f"test/{uuid.uuid4().hex[:8]}/{name}"


def broker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == bridge.broker._THREAD_NAME]


class Probe:
    """A paho client on its own loop thread that records what it receives."""

    def __init__(self, port: int) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"probe-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv311,
        )
        self.client.on_connect = lambda c, u, f, rc, p: self.connected.set()
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.client.on_message = lambda c, u, msg: self.messages.put(msg)
        self.port = port

    def start(self) -> Probe:
        self.client.connect(HOST, self.port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(WAIT), "paho client did not connect"
        return self

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic_filter, qos)
        assert self.subscribed.wait(WAIT), "no SUBACK"

    def publish(self, name: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(name, payload, qos=qos, retain=retain)
        info.wait_for_publish(WAIT)
        assert info.is_published(), "publish not acknowledged"

    def next_message(self) -> mqtt.MQTTMessage:
        try:
            return self.messages.get(timeout=WAIT)
        except queue.Empty:
            pytest.fail(f"no message within {WAIT} s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(autouse=True)
def restore_amqtt_log_levels() -> Iterator[None]:
    """start() may set the level of the amqtt loggers; give each test a clean slate."""
    names = ("amqtt", "transitions")
    saved = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture
def embedded(port: int) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(HOST, port) as running:
        yield running


@pytest.fixture
def probes(port: int) -> Iterator[Callable[[], Probe]]:
    """Connected clients for the test's broker, closed before the broker stops."""
    made: list[Probe] = []

    def make() -> Probe:
        probe = Probe(port).start()
        made.append(probe)
        return probe

    yield make
    for probe in made:
        probe.close()


def test_retained_message_reaches_a_later_subscriber_with_retain_set(
    embedded: EmbeddedBroker, probes: Callable[[], Probe]
) -> None:
    state = topic("state")
    probes().publish(state, b"ON", retain=True)

    subscriber = probes()
    subscriber.subscribe(state)
    message = subscriber.next_message()

    assert (message.topic, message.payload, message.retain) == (state, b"ON", True)


def test_live_message_is_delivered_without_retain(
    embedded: EmbeddedBroker, probes: Callable[[], Probe]
) -> None:
    power = topic("power")
    subscriber = probes()
    subscriber.subscribe(power)
    probes().publish(power, b"42.0", retain=True)

    message = subscriber.next_message()

    # MQTT 3.1.1 3.3.1.3: a message forwarded to an existing subscription has retain=0.
    assert (message.payload, message.retain) == (b"42.0", False)


def test_last_will_is_delivered_when_a_client_drops_without_disconnect(
    embedded: EmbeddedBroker, probes: Callable[[], Probe], port: int
) -> None:
    availability = topic("availability")
    watcher = probes()
    watcher.subscribe(availability)

    doomed = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="doomed", protocol=mqtt.MQTTv311)
    doomed.will_set(availability, b"offline", qos=1)
    connected = threading.Event()
    doomed.on_connect = lambda c, u, f, rc, p: connected.set()
    doomed.connect(HOST, port, keepalive=30)
    # Driven by hand (no loop_start) so nothing reconnects once its socket is gone.
    deadline = time.monotonic() + WAIT
    while not connected.is_set() and time.monotonic() < deadline:
        doomed.loop(timeout=0.05)
    assert connected.is_set()

    sock = doomed.socket()
    assert isinstance(sock, socket.socket)
    sock.close()  # vanish without DISCONNECT, as a crashed bridge would

    message = watcher.next_message()
    assert (message.topic, message.payload) == (availability, b"offline")


def test_second_broker_on_the_same_port_fails_fast(embedded: EmbeddedBroker, port: int) -> None:
    began = time.monotonic()
    with pytest.raises(BrokerError, match=f"cannot listen on {HOST}:{port}: address already in use"):
        EmbeddedBroker(HOST, port).start()

    assert time.monotonic() - began < 1.0
    assert len(broker_threads()) == 1  # only the first broker's


def test_failure_inside_the_broker_thread_reaches_start(
    embedded: EmbeddedBroker, port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the fast pre-check, amqtt itself hits the taken port on its own thread.
    monkeypatch.setattr(bridge.broker, "_probe_bind", lambda host, port: None)
    second = EmbeddedBroker(HOST, port)
    began = time.monotonic()

    with pytest.raises(BrokerError, match="address already in use") as raised:
        second.start()

    assert time.monotonic() - began < 2.0
    assert isinstance(raised.value.__cause__, Exception)  # amqtt's error is chained
    assert not second.running
    assert len(broker_threads()) == 1
    second.stop()  # safe after a failed start


def test_stop_leaves_no_thread_and_frees_the_port(port: int) -> None:
    before = set(threading.enumerate())
    broker = EmbeddedBroker(HOST, port).start()
    client = Probe(port).start()
    client.close()

    broker.stop()

    assert set(threading.enumerate()) == before
    assert not broker.running
    # SO_REUSEADDR, as every server sets it: connections the broker closed may sit in
    # TIME_WAIT, which is the OS's business and not a leaked listener.
    with socket.create_server((HOST, port)):
        pass


def test_stop_with_clients_still_connected_is_clean(port: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    broker = EmbeddedBroker(HOST, port).start()
    silent = socket.create_connection((HOST, port))  # TCP only, never sends CONNECT
    client = Probe(port).start()  # accepted after `silent`, so both are in the broker
    dropped = threading.Event()
    client.client.on_disconnect = lambda c, u, f, rc, p: dropped.set()

    broker.stop()

    assert dropped.wait(WAIT)
    client.client.loop_stop()
    silent.close()
    assert broker_threads() == []
    assert [r.getMessage() for r in caplog.records] == []


def test_stop_is_idempotent_and_safe_before_start(port: int) -> None:
    broker = EmbeddedBroker(HOST, port)
    broker.stop()
    broker.start()
    broker.stop()
    broker.stop()
    assert broker_threads() == []


def test_start_stop_twice_in_a_row(port: int) -> None:
    same = EmbeddedBroker(HOST, port)
    for _ in range(2):
        same.start()
        Probe(port).start().close()
        same.stop()
    for _ in range(2):
        with EmbeddedBroker(HOST, port):
            Probe(port).start().close()
    assert broker_threads() == []


def test_logs_one_info_line_and_quiets_amqtt(port: int, caplog: pytest.LogCaptureFixture) -> None:
    logging.getLogger("amqtt").setLevel(logging.NOTSET)
    caplog.set_level(logging.INFO)

    with EmbeddedBroker(HOST, port):
        Probe(port).start().close()

    assert logging.getLogger("amqtt").level == logging.WARNING
    assert [r.getMessage() for r in caplog.records if r.name == "bridge.broker"] == [
        f"embedded MQTT broker listening on {HOST}:{port}"
    ]
    # (asyncio's own "is serving" line appears only in asyncio debug mode, python -X dev.)
    assert [r for r in caplog.records if r.name.split(".")[0] in ("amqtt", "transitions")] == []


def test_amqtt_logs_are_left_alone_when_root_is_at_debug(port: int, caplog: pytest.LogCaptureFixture) -> None:
    logging.getLogger("amqtt").setLevel(logging.NOTSET)
    caplog.set_level(logging.DEBUG)

    with EmbeddedBroker(HOST, port):
        pass

    assert logging.getLogger("amqtt").level == logging.NOTSET


def test_port_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="port"):
        EmbeddedBroker(HOST, 0)


def test_start_that_hangs_times_out_without_leaving_a_thread(
    port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from amqtt.broker import Broker

    async def hang(self: Broker) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(Broker, "start", hang)
    broker = EmbeddedBroker(HOST, port)

    with pytest.raises(BrokerError, match=r"did not start within 0\.3 s"):
        broker.start(timeout=0.3)

    assert broker_threads() == []
    assert not broker.running


# --- amqtt 0.12.1 behaviours, pinned so an upgrade that changes them is noticed --------


def test_amqtt_delivers_at_the_subscription_qos(
    embedded: EmbeddedBroker, probes: Callable[[], Probe]
) -> None:
    reading = topic("reading")
    subscriber = probes()
    subscriber.subscribe(reading, qos=1)
    probes().publish(reading, b"1", qos=0)

    assert subscriber.next_message().qos == 1  # MQTT says min(0, 1) == 0


def test_amqtt_forgets_retained_messages_on_stop(port: int) -> None:
    state, marker = topic("state"), topic("marker")
    with EmbeddedBroker(HOST, port):
        publisher = Probe(port).start()
        publisher.publish(state, b"ON", retain=True)
        publisher.close()

    with EmbeddedBroker(HOST, port):
        subscriber = Probe(port).start()
        subscriber.subscribe(state)
        subscriber.subscribe(marker)
        # amqtt sends retained messages right after the SUBACK; a live marker published
        # afterwards arriving first proves none was kept.
        publisher = Probe(port).start()
        publisher.publish(marker, b"x")
        first = subscriber.next_message()
        publisher.close()
        subscriber.close()

    assert first.topic == marker


def test_a_new_client_gets_no_retained_messages_it_did_not_subscribe_to(
    embedded: EmbeddedBroker, probes: Callable[[], Probe]
) -> None:
    # amqtt 0.12.1 replays the retained messages of *every* client's subscriptions to each
    # newcomer; broker.py limits the replay to the newcomer's own subscriptions.
    state = topic("state")
    probes().publish(state, b"ON", retain=True)
    probes().subscribe(state)

    newcomer = probes()
    newcomer.subscribe(topic("nothing-here"))  # a round trip: anything queued before has arrived
    assert newcomer.messages.empty()
    newcomer.subscribe(state)  # its own subscription still gets the retained message
    message = newcomer.next_message()
    assert (message.topic, message.payload, message.retain) == (state, b"ON", True)


def test_publish_and_disconnect_is_not_lost_while_a_wildcard_subscriber_exists(
    embedded: EmbeddedBroker, probes: Callable[[], Probe]
) -> None:
    # The mosquitto_pub pattern: connect, publish QoS 0, disconnect at once. With the replay
    # above unpatched, a `#` subscriber made the broker drop these publishes.
    base = topic("x")
    owner = probes()
    for index in range(50):
        owner.publish(f"{base}/retained/{index}", b"r", retain=True)
    watcher = probes()
    watcher.subscribe(f"{base}/#")
    commands = probes()
    commands.subscribe(f"{base}/cmd")
    for index in range(5):
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{index}", protocol=mqtt.MQTTv311)
        client.connect(HOST, embedded.port)
        client.loop_start()
        client.publish(f"{base}/cmd", str(index).encode(), qos=0).wait_for_publish(WAIT)
        client.disconnect()
        client.loop_stop()
    received = sorted(commands.next_message().payload for _ in range(5))
    assert received == [b"0", b"1", b"2", b"3", b"4"]


def test_an_ipv6_address_is_written_in_brackets() -> None:
    # Issue 12, item 8: `::1:1883` reads as a host `::1:1883`, or as port 1 of `::1`.
    _describe = bridge.broker._describe
    taken = OSError(errno.EADDRINUSE, "Address already in use")
    assert _describe("::1", 1883, taken) == "cannot listen on [::1]:1883: address already in use"
    assert (
        _describe("127.0.0.1", 1883, RuntimeError("x"))
        == "embedded MQTT broker on 127.0.0.1:1883 failed to start: x"
    )
