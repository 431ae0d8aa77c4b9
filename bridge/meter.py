"""I/O: the HTTP client for the meters, on the bridge's asyncio loop.

The meter speaks plain HTTP and closes the connection after every answer, so there is
nothing to pool or keep alive; what a request costs is the client's own work. A general
client (requests: ~1 ms of CPU per request here, aiohttp's client more again) would cost
more than everything else the bridge does, and a per-read timeout lets a meter that drips
its headers hold a request forever. So a request is an `Exchange`: a non-blocking socket
that the bridge's asyncio loop watches beside hundreds of others, with one deadline for
the whole request (connect to last byte) and caps on what the meter may send.
`MeterClient.request()` awaits one; `fetch()` runs one on a loop of its own (`probe`).

Every fault becomes a MeterError here, whose text names the meter by host and devid. We
build requests and error messages ourselves, so the PIN (it travels in the query string)
can never reach an exception text or a log line.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from urllib.parse import quote, urlsplit

from .errors import (
    BodyError,
    MeterAuthError,
    MeterError,
    MeterHTTPError,
    MeterRateLimited,
    MeterTimeout,
    MeterUnreachable,
)

logger = logging.getLogger(__name__)

#: A meter body is about 2 KB; anything past this is not a meter talking.
MAX_BODY = 64 * 1024
#: Status line and headers; a meter sends a few hundred bytes.
MAX_HEAD = 8 * 1024
#: Seconds a resolved host name is reused. Meters are usually given by IP address, and a
#: lookup is a thread's work (loop.getaddrinfo), so it is not done per poll.
RESOLVE_TTL = 300.0

_RECV = MAX_HEAD + MAX_BODY + 1
_IN_PROGRESS = (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN)

Address = tuple[int, tuple[object, ...]]
"""(family, sockaddr) as getaddrinfo gives it."""


class MeterClient:
    """How to reach one meter: its address and its prebuilt requests."""

    __slots__ = (
        "_addresses",
        "_current",
        "_requests",
        "_resolved_at",
        "_working",
        "host",
        "label",
        "port",
        "timeout",
    )

    def __init__(self, url: str, devid: str, pin: str, *, timeout: float = 5.0) -> None:
        parts = urlsplit(url)
        if parts.hostname is None:
            raise ValueError("meter url has no host")
        self.label = f"meter {devid} at {url}"
        self.host = parts.hostname
        self.port = parts.port or 80
        self.timeout = timeout
        host_header = parts.netloc.encode("idna" if not parts.netloc.isascii() else "ascii")
        # Percent-encoded (UTF-8), as a server decodes a query: a bare '+' reads as a
        # space, '&' and '#' would end the value, '%' would start an escape.
        query = f"/?page=getdata&devid={quote(devid, safe='')}&devpass={quote(pin, safe='')}"
        # HTTP/1.0: the answer is never chunked, and ends when the meter closes.
        self._requests = {
            pout: (
                f"GET {query}{'' if pout is None else f'&pout={pout}'} HTTP/1.0\r\n".encode()
                + b"Host: "
                + host_header
                + b"\r\nUser-Agent: smartmac-bridge\r\n\r\n"
            )
            for pout in (None, 0, 1)
        }
        literal = _literal(self.host, self.port)
        self._addresses: list[Address] = [literal] if literal else []
        self._current = 0
        self._resolved_at = float("inf") if literal else float("-inf")
        #: The address the meter last answered on; None after a failure.
        self._working: Address | None = None

    # -- addresses ------------------------------------------------------------------------

    def address(self, now: float) -> Address | None:
        """(family, sockaddr), or None when the host name must be resolved (again) first."""
        if now - self._resolved_at > RESOLVE_TTL:
            return None
        return self._addresses[self._current]

    async def resolve(self, now: float | None = None) -> MeterError | None:
        """Look the host name up, off the loop (loop.getaddrinfo). None on success.

        The address that last worked is kept while the name still resolves to it: going
        back to the first (::1, say, with a meter on IPv4 only) would cost a failed poll
        and a warning at every lookup. `now`: the time of the lookup (default: the clock)."""
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            return MeterUnreachable(f"{self.label}: cannot resolve host ({_reason(exc)})")
        addresses: list[Address] = []
        for family, _, _, _, sockaddr in infos:
            if (family, sockaddr) not in addresses:
                addresses.append((family, sockaddr))
        if not addresses:
            return MeterUnreachable(f"{self.label}: cannot resolve host (no address)")
        working = self._working
        self._addresses = addresses
        self._current = addresses.index(working) if working in addresses else 0
        self._resolved_at = time.monotonic() if now is None else now
        return None

    def forget_address(self) -> None:
        """After a failure: try the name's next address, or, after the last, look it up
        again (the meter may have a new one). `localhost` gives ::1 first, say, and a
        dual-stack name an IPv6 address that an IPv4-only meter does not answer on."""
        self._working = None
        if self._resolved_at == float("inf"):
            return  # an IP address: nothing else to try
        if self._current + 1 < len(self._addresses):
            self._current += 1
        else:
            self._resolved_at = float("-inf")

    # -- requests -----------------------------------------------------------------------

    def exchange(
        self, pout: int | None, loop: asyncio.AbstractEventLoop, on_done: Callable[[], None], now: float
    ) -> Exchange:
        """Start a request on `loop`: `pout` None polls, 0/1 also switches the relay.

        `on_done()` is called once, from a callback of the loop (never from here), when the
        exchange is over; then `result()` gives the body or raises the MeterError. `now`
        picks the address (see address()); the deadline is `timeout` from now on the loop's
        clock."""
        exchange = Exchange(self, self._requests[pout], on_done)
        exchange.start(loop, self.address(now))
        return exchange

    async def request(self, pout: int | None = None, now: float | None = None) -> bytes:
        """One request, awaited: the body of a complete 200 answer, or raises a MeterError."""
        loop = asyncio.get_running_loop()
        over: asyncio.Future[None] = loop.create_future()

        def ended() -> None:
            if not over.done():  # (cancelled meanwhile)
                over.set_result(None)

        exchange = self.exchange(pout, loop, ended, time.monotonic() if now is None else now)
        try:
            await over
        except asyncio.CancelledError:
            exchange.abort()
            raise
        return exchange.result()

    def fetch(self, pout: int | None = None) -> bytes:
        """One request on a loop of its own (for `probe`); the body, or a MeterError."""

        async def run() -> bytes:
            if self.address(time.monotonic()) is None and (error := await self.resolve()) is not None:
                raise error
            return await self.request(pout)

        return asyncio.run(run())


class Exchange:
    """One HTTP request on a non-blocking socket that the asyncio loop watches.

    The loop's own file-descriptor callbacks (`add_writer` until the request is out,
    `add_reader` until EOF) and one timer at the deadline drive it: no task, no transport,
    no future per request. Measured beside an asyncio Protocol on a transport (README,
    "Performance"), this costs a third of the CPU per request, which at 333 requests a
    second is most of what the rewrite onto asyncio would otherwise have added.
    """

    __slots__ = (
        "_address",
        "_buf",
        "_client",
        "_error",
        "_fd",
        "_head_end",
        "_length",
        "_loop",
        "_on_done",
        "_request",
        "_sock",
        "_timer",
        "_writing",
        "done",
    )

    def __init__(self, client: MeterClient, request: bytes, on_done: Callable[[], None]) -> None:
        self._client = client
        self._request = request
        self._on_done = on_done
        self.done = False
        self._sock: socket.socket | None = None
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._buf = bytearray()
        self._error: MeterError | None = None
        self._head_end = -1
        self._length: int | None = None
        self._writing = True
        self._address: Address | None = None

    def start(self, loop: asyncio.AbstractEventLoop, address: Address | None) -> None:
        self._loop = loop
        label = self._client.label
        if address is None:
            self._fail(MeterUnreachable(f"{label}: host name not resolved"))
            return
        self._address = address
        family, sockaddr = address
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:  # out of file descriptors, typically
            self._fail(MeterUnreachable(f"{label}: {_reason(exc)}"))
            return
        sock.setblocking(False)
        self._sock = sock
        try:
            code = sock.connect_ex(sockaddr)
            if code and code not in _IN_PROGRESS:
                self._fail(MeterUnreachable(f"{label}: {os.strerror(code)}"))
                return
            self._fd = sock.fileno()
            loop.add_writer(self._fd, self._writable)
        except OSError as exc:
            # e.g. a scoped IPv6 address whose interface is gone (gaierror): this request
            # fails, the loop goes on.
            self._fail(MeterUnreachable(f"{label}: {_reason(exc)}"))
            return
        self._timer = loop.call_at(loop.time() + self._client.timeout, self._expire)

    def result(self) -> bytes:
        """The body of a complete 200 answer; else raises the MeterError."""
        if self._error is not None:
            raise self._error
        if not self.done:
            raise RuntimeError("exchange still running")
        return bytes(self._buf[self._head_end :])

    def abort(self) -> None:
        """Drop the request (shutdown); on_done is not called."""
        if not self.done:
            self._on_done = _nothing
            self._fail(MeterUnreachable(f"{self._client.label}: request abandoned"))

    # -- the loop's callbacks ---------------------------------------------------------------

    def _writable(self) -> None:
        """Connected (or failed to), then the request goes out."""
        self._guarded(self._write)

    def _readable(self) -> None:
        self._guarded(self._read)

    def _guarded(self, step: Callable[[], None]) -> None:
        # A bug here must end this request, not escape into the loop: the callback would
        # stay registered and fail again on every pass until the deadline.
        try:
            step()
        except Exception:
            logger.exception("%s: unexpected error in a request", self._client.label)
            if not self.done:
                self._fail(MeterError(f"{self._client.label}: internal error"))

    def _write(self) -> None:
        sock = self._sock
        if sock is None:
            return
        label = self._client.label
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._fail(MeterUnreachable(f"{label}: {os.strerror(code)}"))
            return
        # Connected: the meter listens here (a later failure forgets it again).
        self._client._working = self._address
        try:
            sent = sock.send(self._request)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(MeterUnreachable(f"{label}: {_reason(exc)}"))
            return
        self._request = self._request[sent:]
        if self._request:
            return  # never for a request this small, but a partial send is legal
        self._writing = False
        assert self._loop is not None
        self._loop.remove_writer(self._fd)
        self._loop.add_reader(self._fd, self._readable)

    def _read(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            chunk = sock.recv(_RECV)
        except BlockingIOError:
            return
        except OSError as exc:  # reset by the meter, typically
            self._fail(MeterUnreachable(f"{self._client.label}: {_reason(exc)}"))
            return
        if not chunk:
            self._check(eof=True)
            return
        self._buf += chunk
        self._check(eof=False)

    def _expire(self) -> None:
        """The deadline passed: give up on this request."""
        self._timer = None
        if self.done:
            return
        timeout = f"{self._client.timeout:g} s"
        if self._writing:
            text = f"no connection within {timeout}"
        elif not self._buf:
            text = f"no answer within {timeout}"
        else:
            text = f"answer not complete within {timeout}"
        self._fail(MeterTimeout(f"{self._client.label}: {text}"))

    # -- internals ------------------------------------------------------------------------

    def _check(self, *, eof: bool) -> None:
        """Check what has arrived; end when the answer is complete or cannot be."""
        buf = self._buf
        label = self._client.label
        if self._head_end < 0:
            end, gap = _head_end(buf)
            if end < 0 or end > MAX_HEAD:
                if len(buf) > MAX_HEAD:
                    self._fail(BodyError(f"{label}: answer headers too long"))
                elif eof:
                    self._fail(self._cut_short())
                return
            error = _parse_head(label, bytes(buf[:end]))
            if isinstance(error, MeterError):
                self._fail(error)
                return
            self._length = error
            self._head_end = end + gap
        body = len(buf) - self._head_end
        if body > MAX_BODY:
            self._fail(BodyError(f"{label}: answer longer than {MAX_BODY} bytes"))
            return
        length = self._length
        if length is not None and body >= length:
            del buf[self._head_end + length :]
        elif not eof:
            return  # more to come
        elif length is not None:
            self._fail(BodyError(f"{label}: answer cut short"))
            return
        self._end()

    def _cut_short(self) -> MeterError:
        if not self._buf:
            return MeterUnreachable(f"{self._client.label}: connection closed without an answer")
        return BodyError(f"{self._client.label}: answer cut short")

    def _fail(self, error: MeterError) -> None:
        self._error = error
        self._end()

    def _end(self) -> None:
        self.done = True
        loop, sock = self._loop, self._sock
        self._sock = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if sock is not None:
            if loop is not None and self._fd >= 0:
                if self._writing:
                    loop.remove_writer(self._fd)
                else:
                    loop.remove_reader(self._fd)
            sock.close()
        if loop is not None:
            loop.call_soon(self._on_done)  # never from inside start(): the caller is not ready


def _nothing() -> None:
    pass


def _parse_head(label: str, head: bytes) -> MeterError | int | None:
    """The head's error, or the Content-Length (None without one)."""
    lines = [line.rstrip(b"\r") for line in head.split(b"\n")]
    status = lines[0].split(None, 2)
    if (
        len(status) < 2
        or not status[0].startswith(b"HTTP/")
        or not (status[1].isdigit() and len(status[1]) == 3)
    ):
        return BodyError(f"{label}: answer is not HTTP")
    code = int(status[1])
    if code != 200:
        return _status_error(label, code)
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            text = value.strip()
            if not text.isdigit() or len(text) > 12:  # int() refuses > 4300 digits
                return BodyError(f"{label}: answer has a bad Content-Length")
            length = int(text)
        elif name == b"transfer-encoding" and value.strip().lower() != b"identity":
            # Not allowed in an answer to HTTP/1.0; no meter has been seen to do it.
            return BodyError(f"{label}: answer uses a transfer encoding")
    return length


def _head_end(buf: bytearray) -> tuple[int, int]:
    """(where the head ends, length of the blank line after it), or (-1, 0) if not yet.

    CRLF as HTTP says, or bare LF as some embedded servers send (http.client accepts both)."""
    crlf = buf.find(b"\r\n\r\n")
    lf = buf.find(b"\n\n")
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf, 2
    return (crlf, 4) if crlf >= 0 else (-1, 0)


def _status_error(label: str, status: int) -> MeterError:
    if status == 429:
        return MeterRateLimited(
            f"{label}: HTTP 429, asked too often (another client polling it, a"
            " standard meter configured as extended, or a restart within its limit)",
            status=status,
        )
    if status in (401, 403):
        return MeterAuthError(f"{label}: HTTP {status}, devid/PIN refused", status=status)
    return MeterHTTPError(f"{label}: HTTP {status}", status=status)


def _literal(host: str, port: int) -> Address | None:
    """(family, sockaddr) for an IP address literal; None for a host name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 6:
        return socket.AF_INET6, (host, port, 0, 0)
    return socket.AF_INET, (host, port)


def _reason(exc: BaseException) -> str:
    # The OS's own words for the error number ("Connection refused"): asyncio's connect
    # errors put the address in strerror ("Connect call failed ('127.0.0.1', 80)").
    # Nothing else of an exception is passed on, so no request (and no PIN) ever is.
    number = getattr(exc, "errno", None)
    if isinstance(number, int) and number > 0:
        return os.strerror(number)
    return getattr(exc, "strerror", None) or type(exc).__name__
