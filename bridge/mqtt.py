"""I/O: the paho-mqtt client: connect, last will, publish, subscribe, reconnect.

It remembers the last payload of every retained topic and publishes all of them again after
every (re)connect: a restarted broker without persistence has forgotten them. While the
broker is away, retained publishes only update that memory, so an outage costs a bounded
amount of RAM (one payload per topic) instead of a queue that grows with every poll.
A topic whose key the meter stopped sending is cleared (clear()) and forgotten here too.

At QoS 0 the retained state of a whole turn of the bridge's loop (dozens of messages per
meter, thousands a second for a large fleet) goes to paho as one buffer of ready-made
PUBLISH packets: paho's publish() costs tens of microseconds and a wake-up of its network
thread per message, more than everything else a poll costs. See _RawPublisher.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import ssl
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from .config import MqttSettings
from .errors import ConfigError

if TYPE_CHECKING:
    from paho.mqtt.client import SocketLike  # a Protocol paho declares for type checkers only

logger = logging.getLogger(__name__)

#: (topic, payload, retain flag) of every message on a subscribed topic.
MessageHandler = Callable[[str, bytes, bool], None]

_KEEPALIVE = 30  # seconds; paho also waits this long for the CONNACK


def host_port(host: str, port: int) -> str:
    """`host:port` as a user writes it: `[::1]:1883` for an IPv6 address, not `::1:1883`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MqttLink:
    """One connection to the broker, kept up for the life of the bridge.

    Given several brokers (the nodes of one cluster), it is on one of them at a time: the
    first that accepts, and after a failed connect or a lost connection the next, round
    robin; the back-off applies once a whole round failed (see _keep_connected).

    paho runs on the bridge's asyncio loop as paho documents for external loops: its
    socket's readiness calls loop_read / loop_write, a timer calls loop_misc (keepalive),
    and every callback (a message, a connect) runs on the loop. Only the connect itself
    (DNS, TCP, TLS handshake: all blocking inside paho) runs on a daemon thread; the
    socket callbacks it fires there hop to the loop. Every method is for the loop's
    thread, so the link needs no lock.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        brokers: Sequence[tuple[str, int]] = (),
        host: str | None = None,
        port: int = 1883,
        will_topic: str,
        subscriptions: list[str],
        on_message: MessageHandler,
        on_connect: Callable[[], None] | None = None,
        keepalive: int = _KEEPALIVE,
    ) -> None:
        if host is not None:  # one broker, the short way
            brokers = (*brokers, (host, port))
        if not brokers:
            raise ValueError("MqttLink needs at least one broker")
        self._brokers = tuple(brokers)
        self._node = 0  # index in _brokers of the broker connected to, or tried next
        self._last_node: int | None = None  # the broker of the last connection
        self.broker = host_port(*self._brokers[0])
        """`host:port` of the broker the link is on, or is trying (the status page's)."""
        self._keepalive = keepalive
        self._qos = settings.qos
        # The will topic too: a node the bridge left while it was still up (the network
        # between them broke) publishes the will when its keepalive runs out, through the
        # cluster, after the bridge's `online` on the node it is on now. Seen, it is undone.
        self._will_topic = will_topic
        self._subscriptions = [*subscriptions, will_topic]
        self._on_message = on_message
        self._on_connect = on_connect
        self._retained: dict[str, bytes] = {}
        # While the broker is away: topics first remembered since (they never reached it),
        # and remembered topics cleared since (they may still be retained there). Both hold
        # only topics of _retained, so they are bounded as it is.
        self._unsent: set[str] = set()
        self._clears: set[str] = set()
        self._connected = False
        self._stopped = False
        self._refused = False
        # Per broker: during an outage of several the warnings alternate, which must not
        # make each of them new again.
        self._last_problem: dict[int, str] = {}
        self.connected = threading.Event()
        """Set while connected to the broker (other threads may wait on it)."""
        self.messages_sent = 0
        """Messages handed to the broker's connection since start (smartmac_mqtt_messages_total)."""
        # The loop, its thread, paho's socket (and its fd: paho may close it before a
        # callback from the connect's thread reaches the loop), the task that keeps connecting.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0
        self._sock: SocketLike | None = None
        self._fd = -1
        self._writer = False  # a writer is registered for paho's socket
        self._write_queued = False  # _write_queued_packets is due
        self._down = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self._was_up = False  # the last connection got its CONNACK (the back-off restarts)
        self._misc: asyncio.TimerHandle | None = None
        self._published: dict[int, asyncio.Future[None]] = {}

        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=paho.MQTTv311,  # amqtt speaks no v5; v3.1.1 works everywhere
            clean_session=True,
        )
        if settings.username is not None:
            password = settings.password.get_secret_value() if settings.password else None
            client.username_pw_set(settings.username, password)
        if settings.tls.enabled:
            tls = settings.tls
            try:
                client.tls_set(
                    ca_certs=str(tls.ca_certs) if tls.ca_certs else None,
                    certfile=str(tls.certfile) if tls.certfile else None,
                    keyfile=str(tls.keyfile) if tls.keyfile else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (ssl.SSLError, OSError, ValueError) as exc:
                # A file that exists but is no certificate or key: a config error, named.
                raise ConfigError(
                    f"mqtt.tls: cannot load ca_certs/certfile/keyfile: {getattr(exc, 'reason', None) or exc}"
                ) from None
            client.tls_insecure_set(tls.insecure)
        client.will_set(will_topic, _WILL, qos=1, retain=True)
        # No in-flight window: with paho's default 20, close()'s final QoS 1 offline burst
        # (one per meter) takes a round trip per 20 meters and misses its 2 s.
        client.max_inflight_messages_set(0)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._socket_want_write
        client.on_socket_unregister_write = self._socket_done_writing
        self._client = client
        self._raw = _RawPublisher.attach(client) if self._qos == 0 else None

    # -- life cycle (on the loop) -------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Connect in the background, on `loop` (call this on its thread); paho's
        reconnects follow until close()."""
        self._loop = loop
        self._thread = threading.get_ident()
        if len(self._brokers) == 1:
            logger.info("connecting to MQTT broker %s", self.broker)
        else:
            logger.info(
                "connecting to MQTT brokers %s (the first that accepts, then round robin)",
                ", ".join(host_port(*broker) for broker in self._brokers),
            )
        self._keeper = loop.create_task(self._keep_connected(), name="mqtt-connect")
        self._misc = loop.call_later(1.0, self._tick)

    async def close(self, final: list[tuple[str, bytes]], timeout: float = 2.0) -> None:
        """Publish the `final` retained messages (offline states), disconnect, stop.

        Waits at most `timeout` in all for the broker to take them: a stalled broker must
        not hold up the exit (the last will says offline for the bridge then)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout
        last = None
        for topic, payload in final:
            self._retained[topic] = payload
            if self._connected:
                last = self._client.publish(topic, payload, qos=1, retain=True)
        self._connected = False  # nothing more goes out after the final words
        self._stopped = True
        if self._keeper is not None:
            self._keeper.cancel()
        taken = True
        if last is not None and last.rc == MQTTErrorCode.MQTT_ERR_SUCCESS and not last.is_published():
            # paho sends in order, so the last one acknowledged means all were sent.
            done = self._published.setdefault(last.mid, loop.create_future())
            try:
                await asyncio.wait_for(done, max(0.0, until - loop.time()))
            except TimeoutError:
                taken = False
        sock = self._sock
        if self._fd >= 0 and not taken and sock is not None:
            # Not all acknowledged: no DISCONNECT, which would discard the last will; a
            # dropped connection makes the broker publish it (offline).
            self._forget_socket()
            with contextlib.suppress(OSError):
                sock.close()
        if self._fd >= 0:
            self._down.clear()
            self._client.disconnect()  # written by the loop, then the socket closes
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._down.wait(), max(0.1, until - loop.time()))
        if self._misc is not None:
            self._misc.cancel()
        if self._fd >= 0:  # the broker did not take the DISCONNECT in time
            self._forget_socket()
        self.connected.clear()

    async def _keep_connected(self) -> None:
        """Connect, and again after every loss: to the next broker of the list each time
        (round robin), a moment apart; once every broker was tried since the last
        connection (one with one broker), 1 s later and doubling up to 30 s while they all
        fail (paho's own loop does the same for one broker; this one replaces it)."""
        loop = asyncio.get_running_loop()
        delay = _MIN_DELAY
        tried = 0  # brokers tried since the last connection, the one it was on included
        while not self._stopped:
            host, port = self._brokers[self._node]
            self.broker = host_port(host, port)
            # connect_async() only stores the address (and closes paho's socket, if one is
            # left): paho's public way to aim the next reconnect() elsewhere.
            self._client.connect_async(host, port, keepalive=self._keepalive)
            self._down.clear()
            try:
                # Blocking inside paho (lookup, TCP, TLS handshake): a thread's.
                await _in_daemon_thread(loop, self._reconnect)
            except (OSError, ssl.CertificateError, ValueError) as exc:
                logger.debug("connect to %s failed: %s", self.broker, type(exc).__name__)
                self._problem(f"cannot reach MQTT broker {self.broker}; retrying")
            except Exception:  # this task is the only one that reconnects: it must go on
                logger.exception("unexpected error connecting to MQTT broker %s; retrying", self.broker)
            else:
                await self._down.wait()  # until the connection is lost
                if self._stopped:
                    return
                if self._was_up:
                    delay, tried = _MIN_DELAY, 0
            self._was_up = False
            self._node = (self._node + 1) % len(self._brokers)
            tried += 1
            if tried < len(self._brokers):
                await asyncio.sleep(_NEXT_DELAY)  # the next broker of this round
                continue
            tried = 0
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_DELAY)

    def _reconnect(self) -> None:
        """On the connect's thread: paho's reconnect(). One that ends after close() (the
        loop may be gone by then) closes its socket here: nobody else would."""
        self._client.reconnect()
        sock = self._client.socket()
        if self._stopped and sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _tick(self) -> None:
        """paho's keepalive and CONNACK timeout, once a second."""
        assert self._loop is not None
        try:
            if self._fd >= 0:
                self._client.loop_misc()
        except Exception:
            logger.exception("error in the MQTT link's keepalive")
        if not self._stopped or self._fd >= 0:
            self._misc = self._loop.call_later(1.0, self._tick)

    # -- paho's socket, on the loop -------------------------------------------------------

    def _on_loop(self, call: Callable[..., None], *args: object) -> None:
        """Run `call` on the loop: now if this is its thread, else as its next callback
        (paho fires socket callbacks from the connect's thread)."""
        if threading.get_ident() == self._thread:
            call(*args)
        elif self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to do
                self._loop.call_soon_threadsafe(call, *args)

    def _socket_open(self, client: paho.Client, userdata: object, sock: SocketLike) -> None:
        self._on_loop(self._opened, sock)

    def _opened(self, sock: SocketLike) -> None:
        fd = sock.fileno()
        if fd < 0:
            return  # closed again before this reached the loop
        if self._stopped:
            # A reconnect() that was still running on its thread when close() came.
            with contextlib.suppress(OSError):
                sock.close()
            return
        assert self._loop is not None
        self._forget_socket()
        self._sock, self._fd = sock, fd
        self._loop.add_reader(fd, self._readable)
        if self._client.want_write():  # queued before the loop knew the socket
            self._want_write(sock)

    def _socket_close(self, client: paho.Client, userdata: object, sock: SocketLike) -> None:
        self._on_loop(self._closed, sock)

    def _closed(self, sock: SocketLike) -> None:
        if sock is self._sock:
            self._forget_socket()
            self._down.set()

    def _forget_socket(self) -> None:
        if self._fd >= 0 and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
        self._sock, self._fd, self._writer = None, -1, False

    def _socket_want_write(self, client: paho.Client, userdata: object, sock: SocketLike) -> None:
        self._on_loop(self._want_write, sock)

    def _want_write(self, sock: SocketLike) -> None:
        # Written at the end of this pass of the loop (or by write_now() sooner), not when
        # epoll says the socket is writable, which it nearly always is: that would cost a
        # pass of the loop and two epoll_ctl calls per batch. The writer is registered only
        # when the socket's buffer is full.
        if sock is self._sock and self._loop is not None and not self._write_queued:
            self._write_queued = True
            self._loop.call_soon(self._write_queued_packets)

    def _write_queued_packets(self) -> None:
        self._write_queued = False
        self.write_now()
        if self._fd >= 0 and self._client.want_write() and not self._writer and self._loop is not None:
            self._writer = True  # the socket is full: write when there is room again
            self._loop.add_writer(self._fd, self._writable)

    def write_now(self) -> None:
        """Write what paho holds for the broker, now (on the loop, outside paho's callbacks)."""
        if self._fd >= 0 and self._client.want_write():
            self._writable()

    def _socket_done_writing(self, client: paho.Client, userdata: object, sock: SocketLike) -> None:
        self._on_loop(self._done_writing, sock)

    def _done_writing(self, sock: SocketLike) -> None:
        if sock is self._sock and self._loop is not None and self._writer:
            self._writer = False
            self._loop.remove_writer(self._fd)

    def _readable(self) -> None:
        client, sock = self._client, self._sock
        try:
            client.loop_read()
            # TLS: a record may hold more than paho read; the socket will not say so again.
            while sock is self._sock and isinstance(sock, ssl.SSLSocket) and sock.pending():
                client.loop_read()
        except Exception:
            logger.exception("error reading from MQTT broker %s", self.broker)

    def _writable(self) -> None:
        try:
            self._client.loop_write()
        except Exception:
            logger.exception("error writing to MQTT broker %s", self.broker)

    # -- publishing -------------------------------------------------------------------------

    def publish_many(self, messages: list[tuple[str, bytes]]) -> None:
        """Publish retained messages and remember them for the replay after a reconnect."""
        if not self._connected:
            retained = self._retained
            self._unsent.update(topic for topic, _ in messages if topic not in retained)
            retained.update(messages)
            return
        self._retained.update(messages)
        self._send_retained(messages)

    def clear(self, topics: list[str]) -> None:
        """Clear retained topics on the broker (an empty retained payload) and forget them:
        they are not replayed, and their encoded form is dropped."""
        if not topics:
            return
        retained = self._retained
        for topic in topics:
            if retained.pop(topic, None) is not None and not self._connected:
                if topic in self._unsent:
                    self._unsent.discard(topic)  # never sent: nothing to clear
                else:
                    self._clears.add(topic)  # cleared on the next connect
        if self._raw is not None:
            self._raw.forget(topics)
        if self._connected:
            self._send_retained([(topic, b"") for topic in topics], cache=False)

    def _send_retained(self, messages: list[tuple[str, bytes]], *, cache: bool = True) -> None:
        """Connected: the messages, retained, at the link's QoS."""
        self.messages_sent += len(messages)
        if self._raw is not None:
            self._raw.publish_retained(messages, cache=cache)
            return
        publish, qos = self._client.publish, self._qos
        for topic, payload in messages:
            publish(topic, payload, qos=qos, retain=True)

    def publish_volatile(self, messages: list[tuple[str, bytes]]) -> None:
        """Retained messages the caller regenerates after every connect (see `on_connect`):
        not remembered here, and dropped while the broker is away."""
        if self._connected:
            self._send_retained(messages, cache=False)

    def subscribe(self, topics: list[str]) -> None:
        """Subscribe for this connection only (not renewed on reconnect)."""
        for topic in topics:
            self._client.subscribe(topic, qos=1)

    def unsubscribe(self, topics: list[str]) -> None:
        for topic in topics:
            self._client.unsubscribe(topic)

    def publish_event(self, topic: str, payload: bytes) -> None:
        """A not-retained message (command results, health), at QoS 1 at least: paho keeps
        one published while the broker is away and sends it on the next connection (after
        a failover, to the next node)."""
        result = self._client.publish(topic, payload, qos=max(self._qos, 1), retain=False)
        if result.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            logger.debug("could not publish %s now (%s)", topic, result.rc)
        else:
            self.messages_sent += 1

    # -- paho callbacks (on the loop) -----------------------------------------------------

    def _handle_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: object,
    ) -> None:
        try:
            self._connected_to_broker(client, reason)
        except Exception:  # paho would swallow it, and the replay with it: say so
            logger.exception("error after connecting to %s", self.broker)

    def _connected_to_broker(self, client: paho.Client, reason: ReasonCode) -> None:
        if reason.is_failure:
            # Typically bad credentials: say it once, name the broker (never the password).
            self._refused = True  # the disconnect that follows needs no words of its own
            self._problem(f"MQTT broker {self.broker} refused the connection: {reason}")
            return
        self._was_up = True
        for topic in self._subscriptions:
            client.subscribe(topic, qos=1)
        self._connected = True
        _drop_unsent_retained(client)
        # Everything retained, again: after a broker restart it is all gone. (Before any
        # newer value can go out; as one buffer at QoS 0, so 90,000 topics take 0.1 s
        # rather than 2 s of the loop.)
        if self._clears:
            self._send_retained([(topic, b"") for topic in self._clears], cache=False)
            self._clears.clear()
        self._unsent.clear()
        self._send_retained(list(self._retained.items()))
        self.connected.set()
        self._last_problem.pop(self._node, None)
        if self._node != self._last_node:
            # Once per change of broker, naming it; a reconnect to the same one does not.
            self._last_node = self._node
            where = f" ({self._node + 1} of {len(self._brokers)})" if len(self._brokers) > 1 else ""
            logger.info(
                "connected to MQTT broker %s%s; republished %d retained topics",
                self.broker,
                where,
                len(self._retained),
            )
        else:
            logger.info(
                "reconnected to the same MQTT broker; republished %d retained topics", len(self._retained)
            )
        if self._on_connect is not None:
            self._on_connect()

    def _handle_disconnect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: object,
    ) -> None:
        was_connected, self._connected = self._connected, False
        self.connected.clear()
        self._down.set()
        # paho gives up on a silent broker after the keepalive, before as after the CONNACK.
        silent = reason == _KEEPALIVE_TIMEOUT
        if was_connected and silent:
            self._problem(
                f"lost connection to MQTT broker {self.broker}: no answer within the"
                f" {self._keepalive} s keepalive; reconnecting"
            )
        elif was_connected:
            self._problem(f"lost connection to MQTT broker {self.broker} ({reason}); reconnecting")
        elif self._refused:
            self._refused = False
        elif silent and not self._stopped:
            # It took the TCP (and TLS) connection but never answered CONNECT: not an MQTT
            # listener, or a broker too busy to speak. Nothing to do with certificates.
            self._problem(f"no CONNACK from MQTT broker {self.broker} within {self._keepalive} s; retrying")
        elif not self._stopped:
            # Dropped before the broker accepted us: with TLS 1.3 a broker that requires a
            # client certificate says no only now, after the handshake.
            self._problem(
                f"MQTT broker {self.broker} closed the connection before accepting it"
                " (a TLS client certificate it requires, or a listener for another"
                " protocol?); retrying"
            )

    def _handle_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        if message.topic == self._will_topic:
            self._will_seen(bytes(message.payload), bool(message.retain))
            return
        try:
            self._on_message(message.topic, bytes(message.payload), bool(message.retain))
        except Exception:  # a bug in a handler must not cost the messages after it
            logger.exception("error handling a message on %s", message.topic)

    def _will_seen(self, payload: bytes, retain: bool) -> None:
        """A message on the will topic: an `offline` that arrives live while connected is
        a last will of an earlier connection (the retained one sent on subscribing is older
        than the replay that follows it): the remembered state goes out again."""
        remembered = self._retained.get(self._will_topic)
        if retain or payload != _WILL or not self._connected or self._stopped or remembered in (None, _WILL):
            return
        assert remembered is not None
        logger.info(
            "the last will of an earlier connection said offline on %s; published %r again",
            self._will_topic,
            remembered.decode(errors="replace"),
        )
        self._client.publish(self._will_topic, remembered, qos=max(self._qos, 1), retain=True)
        self.messages_sent += 1

    def _handle_publish(
        self, client: paho.Client, userdata: object, mid: int, reason: ReasonCode, properties: object
    ) -> None:
        done = self._published.pop(mid, None)
        if done is not None and not done.done():
            done.set_result(None)

    def _problem(self, text: str) -> None:
        # Once per change of state (per broker); repeats go to debug so a long outage does
        # not flood.
        if text != self._last_problem.get(self._node):
            logger.warning("%s", text)
            self._last_problem[self._node] = text
        else:
            logger.debug("%s", text)


async def _in_daemon_thread(loop: asyncio.AbstractEventLoop, call: Callable[[], object]) -> object:
    """`call()` on a daemon thread of its own: a connect that hangs (a stalled TLS
    handshake, a slow lookup) must not hold up the process's exit, which the loop's
    executor would (the interpreter joins its workers at exit, shutdown(wait=False) or not)."""
    future: asyncio.Future[object] = loop.create_future()

    def settle(result: object, error: BaseException | None) -> None:
        if not future.done():
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def run() -> None:
        try:
            result, error = call(), None
        except BaseException as exc:  # handed to the awaiting task
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="mqtt-connect", daemon=True).start()
    return await future


_WILL = b"offline"  # the last will's payload
_MIN_DELAY = 1.0  # seconds before the first reconnect attempt
# Seconds between two brokers of one round: failing over is at once, and a pair of nodes
# that both drop the bridge right after its CONNACK cannot make it spin.
_NEXT_DELAY = 0.2
_MAX_DELAY = 30.0  # the longest wait between attempts

# The reason paho gives on_disconnect when nothing came back within the keepalive.
_KEEPALIVE_TIMEOUT = ReasonCode(PacketTypes.DISCONNECT, "Keep alive timeout")


def _drop_unsent_retained(client: paho.Client) -> None:
    """Forget retained QoS 1/2 publishes paho still holds from the last connection.

    paho re-sends them right after on_connect returns, i.e. after our replay of the latest
    values, so an older payload would overwrite a newer one on the broker (seen with
    qos: 1 across a broker restart). The replay covers every retained topic. paho has no
    public call for this; its private queue is used with its own lock, and skipped if a
    future paho renames it.
    """
    lock = getattr(client, "_out_message_mutex", None)
    messages = getattr(client, "_out_messages", None)
    if lock is None or messages is None:
        return
    with lock:
        for mid in [mid for mid, message in messages.items() if message.retain]:
            del messages[mid]


class _RawPublisher:
    """Retained QoS 0 publishes, encoded here and handed to paho as one buffer.

    A QoS 0 PUBLISH has no packet id and no state: it is a fixed header, the topic and the
    payload (MQTT 3.1.1, 3.3). Several of them back to back are what paho would write
    anyway, so a buffer of them goes through paho's own output queue (`_packet_queue`,
    the call publish() ends in) and is written in order with paho's other packets, by
    paho's thread, on the current connection only (paho clears that queue on reconnect).
    `_packet_queue` is private: attach() returns None when a paho release lacks it or has
    changed its signature, and the link falls back to publish() per message.
    tests/test_mqtt_raw.py checks these bytes against paho's own encoding.
    """

    __slots__ = ("_queue", "_topics")

    def __init__(self, queue: Callable[..., object]) -> None:
        self._queue = queue
        self._topics: dict[str, bytes] = {}  # topic -> its length-prefixed UTF-8 form

    @classmethod
    def attach(cls, client: paho.Client) -> _RawPublisher | None:
        """The publisher, or None when this paho's `_packet_queue` is not the one we know
        (gone, or another signature): the link then uses publish() for every message."""
        queue = getattr(client, "_packet_queue", None)
        if not callable(queue):
            return None
        try:
            params = list(inspect.signature(queue).parameters)
        except (TypeError, ValueError):
            return None
        if params != _QUEUE_PARAMETERS:
            logger.debug("paho's _packet_queue%s is not known here: using publish()", params)
            return None
        return cls(queue)

    def publish_retained(self, messages: list[tuple[str, bytes]], *, cache: bool = True) -> None:
        """`cache`: keep the topics' encoded form (the state topics, sent every poll; not
        discovery configs, sent once per connect: 90,000 of them at 2,000 meters)."""
        topics = self._topics
        parts: list[bytes] = []
        for topic, payload in messages:
            encoded = topics.get(topic)
            if encoded is None:
                raw = topic.encode()
                encoded = len(raw).to_bytes(2, "big") + raw
                if cache:
                    topics[topic] = encoded
            parts += (_fixed_header(len(encoded) + len(payload)), encoded, payload)
            if len(parts) >= _CHUNK_PARTS:
                # A replay of 90,000 topics goes in pieces: paho slices its buffer after
                # every partial send, which would copy megabytes many times over.
                self._send(parts)
                parts = []
        if parts:
            self._send(parts)

    def forget(self, topics: list[str]) -> None:
        for topic in topics:
            self._topics.pop(topic, None)

    def _send(self, parts: list[bytes]) -> None:
        self._queue(paho.PUBLISH, b"".join(parts), 0, 0, paho.MQTTMessageInfo(0))


#: paho 2.x: _packet_queue(command, packet, mid, qos, info=None), bound to the client.
_QUEUE_PARAMETERS = ["command", "packet", "mid", "qos", "info"]
_CHUNK_PARTS = 3 * 1000  # 1,000 messages (three parts each), some 50 KB
_RETAINED_QOS0 = 0x31  # PUBLISH, DUP 0, QoS 0, RETAIN 1
_SHORT_HEADERS = [bytes((_RETAINED_QOS0, n)) for n in range(128)]


def _fixed_header(remaining: int) -> bytes:
    """Packet type and flags, then the remaining length as MQTT's variable-length integer."""
    if remaining < 128:
        return _SHORT_HEADERS[remaining]
    out = bytearray((_RETAINED_QOS0,))
    while True:
        remaining, digit = remaining >> 7, remaining & 0x7F
        out.append(digit | 0x80 if remaining else digit)
        if not remaining:
            return bytes(out)
