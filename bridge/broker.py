"""The embedded MQTT broker: amqtt, on the bridge's loop or on a thread of its own.

Used only when the user configures no MQTT broker. `run` starts it on the bridge's own
asyncio loop (`open()` / `aclose()`): measured with bench/embedded.py, a broker thread
beside the loop's thread costs the same CPU and makes the polls wait for the GIL (at 300
meters with a subscriber: schedule lag p99 48-60 ms and 3 % of the polls missing, against
1.1 ms and none on one loop). `start()` / `stop()` run it
on a private thread and loop instead, for callers without a loop (tests, scripts). Either
way the bridge talks to it over TCP like any other broker.

Known amqtt 0.12.1 behaviours the rest of the bridge has to live with:

- Retained messages live in memory only and are dropped by ``shutdown()``: after a
  restart the bridge must publish its retained state again.
- A message is delivered at the *subscriber's* QoS, not min(publish, subscribe): a QoS 0
  publish reaches a QoS 1 subscriber as QoS 1 (live messages and retained ones).
- On every CONNECT, amqtt replays to the newcomer (at QoS 0, retain=1) the retained
  messages matching *any* client's subscriptions, even with no subscription of its
  own: a client must ignore topics it did not subscribe to.
- MQTT 3.1.1 only: no MQTT v5, no ``$share`` subscriptions.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

from bridge.errors import BrokerError
from bridge.mqtt import host_port

if TYPE_CHECKING:
    # Imported where used instead: most users run an external broker and should not pay
    # for amqtt (~80-250 ms) at startup.
    import asyncio

    from amqtt.broker import Broker
    from amqtt.session import Session

logger = logging.getLogger(__name__)

_THREAD_NAME = "embedded-mqtt-broker"


def amqtt_config(host: str, port: int) -> dict[str, Any]:
    """The amqtt 0.12.1 broker configuration: one plain TCP listener, anonymous access.

    Giving ``plugins`` explicitly replaces amqtt's defaults (EventLogger, PacketLogger,
    AnonymousAuth, BrokerSys): the two loggers only log at DEBUG, and BrokerSys publishes
    ``$SYS`` topics every 20 s and imports psutil. AnonymousAuthPlugin must stay: with no
    auth plugin amqtt refuses every CONNECT ("no plugin responded with a boolean").
    No topic plugin means every topic is allowed.
    """
    return {
        # amqtt splits "bind" on the last ':', so an unbracketed IPv6 host works too.
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


class EmbeddedBroker:
    """amqtt on its own thread and event loop (the rest of the program is threaded).

    ``start()`` returns once the listener accepts connections; ``stop()`` shuts amqtt
    down, closes the loop and joins the thread. Also a context manager::

        with EmbeddedBroker(port=1883) as broker:
            ...
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        if not 0 < port < 65536:
            # Port 0 would bind somewhere we could not report back to the MQTT client.
            raise ValueError(f"port must be 1-65535, not {port}")
        self.host = host
        self.port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._serve_task: asyncio.Task[Any] | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._broker: Broker | None = None  # open() on the caller's loop

    # --- on the caller's loop -----------------------------------------------------------

    async def open(self) -> None:
        """Start amqtt on the running loop; returns once it listens. Raises BrokerError."""
        _quiet_amqtt_loggers()
        _probe_bind(self.host, self.port)  # the common fault, without amqtt's traceback
        from amqtt.broker import Broker

        try:
            self._broker = await _start_amqtt(Broker, self.host, self.port)
        except Exception as exc:
            raise BrokerError(_describe(self.host, self.port, exc)) from exc
        logger.info("embedded MQTT broker listening on %s", host_port(self.host, self.port))

    async def aclose(self) -> None:
        """Shut amqtt down (at most _SHUTDOWN_TIMEOUT s; the loop's end cancels the rest)."""
        broker, self._broker = self._broker, None
        if broker is not None:
            await _shutdown(broker)

    # --- on a thread of its own ---------------------------------------------------------

    @property
    def running(self) -> bool:
        """True between a successful start() and stop()."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        """Start listening on host:port and return once the listener accepts connections.

        Raises BrokerError if the broker cannot start (the port is taken, the address
        does not exist, amqtt fails); no thread is left behind in that case.
        """
        if self._thread is not None:
            raise RuntimeError("embedded MQTT broker already started")
        began = time.perf_counter()
        _quiet_amqtt_loggers()
        # Fail fast, before paying for the amqtt import and a thread, in the common case
        # of a taken port; amqtt's own bind below remains the authority (and would log a
        # traceback at ERROR for the same fault).
        _probe_bind(self.host, self.port)

        import asyncio

        from amqtt.broker import Broker

        self._ready.clear()
        self._error = None
        # The loop is made here, not in the thread, so stop() can always reach it.
        self._loop = asyncio.new_event_loop()
        self._stop_requested = asyncio.Event()
        self._thread = threading.Thread(
            target=self._run,
            args=(Broker, self._loop, self._stop_requested),
            name=_THREAD_NAME,
            daemon=True,
        )
        self._thread.start()

        if not self._ready.wait(timeout):
            # Stuck inside amqtt's start: cancel it rather than wait for it to finish.
            self._loop.call_soon_threadsafe(self._cancel_serve)
            self.stop()
            raise BrokerError(
                f"cannot listen on {host_port(self.host, self.port)}: "
                f"the embedded broker did not start within {timeout:g} s"
            )
        if self._error is not None:
            error = self._error
            self.stop()
            raise BrokerError(_describe(self.host, self.port, error)) from error

        logger.info("embedded MQTT broker listening on %s", host_port(self.host, self.port))
        logger.debug("embedded MQTT broker started in %.3f s", time.perf_counter() - began)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Shut amqtt down, close its loop and join its thread.

        Idempotent, and safe after a failed start(). Retained messages are lost.
        """
        thread, loop, stop_requested = self._thread, self._loop, self._stop_requested
        if thread is None or loop is None or stop_requested is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: its thread has finished
            loop.call_soon_threadsafe(stop_requested.set)
        thread.join(timeout)
        if thread.is_alive():
            # Daemon thread: it will not hold up the process's exit.
            logger.warning("embedded MQTT broker did not stop within %g s", timeout)
            return
        self._thread = self._loop = self._stop_requested = self._serve_task = None

    def __enter__(self) -> EmbeddedBroker:
        return self if self.running else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- on the broker thread -------------------------------------------------------

    def _run(
        self,
        broker_class: type[Broker],
        loop: asyncio.AbstractEventLoop,
        stop_requested: asyncio.Event,
    ) -> None:
        """Thread body: run the broker until stop(); hand any start failure to start()."""
        import asyncio

        try:
            # Runner.close() does what asyncio.run() does: cancels leftover client tasks,
            # shuts down async generators and the executor, and closes the loop.
            with asyncio.Runner(loop_factory=lambda: loop) as runner:
                runner.run(self._serve(broker_class, stop_requested))
        except BaseException as exc:
            if self._ready.is_set():
                logger.exception("embedded MQTT broker failed")
            else:
                self._error = exc
        finally:
            self._ready.set()

    async def _serve(self, broker_class: type[Broker], stop_requested: asyncio.Event) -> None:
        import asyncio

        self._serve_task = asyncio.current_task()
        broker = await _start_amqtt(broker_class, self.host, self.port)
        self._ready.set()
        try:
            await stop_requested.wait()
        finally:
            await _shutdown(broker)

    def _cancel_serve(self) -> None:
        if self._serve_task is not None:
            self._serve_task.cancel()


#: Seconds amqtt's own shutdown may take before the rest is cancelled.
_SHUTDOWN_TIMEOUT = 1.5


async def _start_amqtt(broker_class: type[Broker], host: str, port: int) -> Broker:
    """amqtt, patched (see below) and listening, on the running loop."""
    broker = broker_class(amqtt_config(host, port))  # needs the running loop
    _end_connections_quietly(broker)
    _replay_only_own_subscriptions(broker)
    await broker.start()
    return broker


async def _shutdown(broker: Broker) -> None:
    # amqtt's shutdown can wait forever on a client that is mid-handshake or has QoS 1
    # acks in flight; the bridge must still exit promptly. Whatever is left is cancelled
    # when the loop closes.
    import asyncio

    try:
        await asyncio.wait_for(broker.shutdown(), _SHUTDOWN_TIMEOUT)
    except TimeoutError:
        logger.debug("embedded MQTT broker shutdown cut short after %g s", _SHUTDOWN_TIMEOUT)


def _end_connections_quietly(broker: Broker) -> None:
    """Make every connection end cleanly when the loop closes under it.

    amqtt's shutdown() leaves some connection tasks running (one still waiting for its
    CONNECT, a session still winding down) and closing the loop cancels them. Python
    3.11's start_server then logs "Exception in callback ... CancelledError" with a
    traceback for each, and never closes its socket (3.12 checks task.cancelled()).
    amqtt builds its listener from ``broker.stream_connected``, so wrapping that
    attribute before ``broker.start()`` reaches every TCP connection.
    """
    import asyncio

    serve = broker.stream_connected

    async def serve_until_cut(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        try:
            await serve(reader, writer, listener_name=listener_name)
        except asyncio.CancelledError:
            pass  # the top of a connection's own task: nothing else waits on it
        finally:
            writer.close()

    broker.stream_connected = serve_until_cut


def _replay_only_own_subscriptions(broker: Broker) -> None:
    """Send a connecting client the retained messages of its own subscriptions only.

    amqtt 0.12.1, on every CONNECT, replays the retained messages matching *every* client's
    subscriptions to the newcomer. With a `mosquitto_sub -t 'smartmac/#'` running, each
    `mosquitto_pub` of a relay command got the whole retained state pushed at it and
    disconnected before its own PUBLISH was read: the command was lost. The replay method
    is also what answers a real SUBSCRIBE, after the subscription is recorded, so keeping
    the calls whose session holds that subscription keeps the correct behaviour.
    """
    replay = broker._publish_retained_messages_for_subscription

    async def replay_if_subscribed(subscription: tuple[str, int], session: Session) -> None:
        holders = broker._subscriptions.get(subscription[0], ())
        if any(holder.client_id == session.client_id for holder, _ in holders):
            await replay(subscription, session)

    broker._publish_retained_messages_for_subscription = replay_if_subscribed


def _quiet_amqtt_loggers() -> None:
    """Keep amqtt's INFO chatter (every connection, every listener) out of the bridge log.

    Left alone when the root logger is at DEBUG, or when the user has already set a level
    on the "amqtt" logger. "transitions" is the state-machine library only amqtt uses; it
    logs each executed callback at INFO.
    """
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        return
    for name in ("amqtt", "transitions"):
        named = logging.getLogger(name)
        if named.level == logging.NOTSET:
            named.setLevel(logging.WARNING)


def _probe_bind(host: str, port: int) -> None:
    """Raise BrokerError at once if host:port cannot be bound, the way asyncio binds it.

    Every address the host resolves to is tried (asyncio listens on all of them), with
    SO_REUSEADDR as asyncio sets it on POSIX, so a port in TIME_WAIT passes and a port
    with a listener fails with EADDRINUSE.
    """
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in addresses:
            with socket.socket(family, kind, proto) as probe:
                if os.name == "posix":
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
    except OSError as exc:
        raise BrokerError(_describe(host, port, exc)) from exc


def _describe(host: str, port: int, error: BaseException) -> str:
    """One line for the user, from the OSError at the root of the failure if there is one."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError):
        if cause.errno == errno.EADDRINUSE:
            reason = "address already in use"
        else:
            reason = (cause.strerror or str(cause)).lower()
        return f"cannot listen on {host_port(host, port)}: {reason}"
    return f"embedded MQTT broker on {host_port(host, port)} failed to start: {error}"
