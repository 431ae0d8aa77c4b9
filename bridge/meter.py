"""I/O: the HTTP client for the meters, on the bridge's asyncio loop.

The meter speaks plain HTTP and closes the connection after every answer, so there is
nothing to pool or keep alive; what a request costs is the client's own work. A general
client (requests: ~1 ms of CPU per request here, aiohttp's client more again) would cost
more than everything else the bridge does, and a per-read timeout lets a meter that drips
its headers hold a request forever. So a request is one `_Answer` protocol on an asyncio
transport with one deadline for the whole request (connect to last byte), and caps on
what the meter may send. `MeterClient.fetch()` runs one request on a loop of its own for
one-off use (`probe`).

Every fault becomes a MeterError here, whose text names the meter by host and devid. We
build requests and error messages ourselves, so the PIN (it travels in the query string)
can never reach an exception text or a log line.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import time
from urllib.parse import quote, urlsplit

from .errors import (
    BodyError,
    MeterAuthError,
    MeterError,
    MeterHTTPError,
    MeterRateLimited,
    MeterUnreachable,
)

#: A meter body is about 2 KB; anything past this is not a meter talking.
MAX_BODY = 64 * 1024
#: Status line and headers; a meter sends a few hundred bytes.
MAX_HEAD = 8 * 1024
#: Seconds a resolved host name is reused. Meters are usually given by IP address, and a
#: lookup is a thread's work (loop.getaddrinfo), so it is not done per poll.
RESOLVE_TTL = 300.0

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

    async def request(self, pout: int | None = None, now: float | None = None) -> bytes:
        """One request: `pout` None polls, 0/1 also switches the relay. The body of a
        complete 200 answer, or raises a MeterError; `timeout` from connect to last byte.

        The host must be resolved (`address(now)`, `now` default the clock)."""
        address = self.address(time.monotonic() if now is None else now)
        if address is None:
            raise MeterUnreachable(f"{self.label}: host name not resolved")
        loop = asyncio.get_running_loop()
        answer = _Answer(self.label, self._requests[pout], loop.create_future())
        transport: asyncio.Transport | None = None
        family, sockaddr = address
        try:
            async with asyncio.timeout(self.timeout):
                sock = socket.socket(family, socket.SOCK_STREAM)
                try:
                    sock.setblocking(False)
                    await loop.sock_connect(sock, sockaddr)
                    # Connected: the meter listens here (a later failure forgets it again).
                    self._working = address
                    answer.connected = True
                    transport, _ = await loop.create_connection(lambda: answer, sock=sock)
                except BaseException:
                    if transport is None:
                        sock.close()
                    raise
                return await answer.body
        except TimeoutError:
            raise MeterUnreachable(f"{self.label}: {answer.late(self.timeout)}") from None
        except OSError as exc:  # refused, unreachable, out of file descriptors, a gone interface
            raise MeterUnreachable(f"{self.label}: {_reason(exc)}") from None
        finally:
            if transport is not None:
                transport.abort()  # no-op once closed; else the deadline or a cap hit

    def fetch(self, pout: int | None = None) -> bytes:
        """One request on a loop of its own (for `probe`); the body, or a MeterError."""

        async def run() -> bytes:
            if self.address(time.monotonic()) is None and (error := await self.resolve()) is not None:
                raise error
            return await self.request(pout)

        return asyncio.run(run())


class _Answer(asyncio.Protocol):
    """Collects one answer: the head (8 KiB cap) and the body to EOF (64 KiB cap).

    `body` resolves to the body of a 200 answer, or to the MeterError."""

    __slots__ = ("_buf", "_head_end", "_label", "_length", "_request", "_transport", "body", "connected")

    def __init__(self, label: str, request: bytes, body: asyncio.Future[bytes]) -> None:
        self.body = body
        self.connected = False
        self._label = label
        self._request = request
        self._buf = bytearray()
        self._head_end = -1
        self._length: int | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        if self.body.done():
            return
        self._buf += data
        self._check(eof=False)

    def eof_received(self) -> bool:
        if not self.body.done():
            self._check(eof=True)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.body.done():
            return
        if exc is not None:  # reset by the meter, typically
            self._fail(MeterUnreachable(f"{self._label}: {_reason(exc)}"))
        else:
            self._check(eof=True)

    def late(self, timeout: float) -> str:
        """What the deadline cut off, in words."""
        if not self.connected:
            return f"no connection within {timeout:g} s"
        if not self._buf:
            return f"no answer within {timeout:g} s"
        return f"answer not complete within {timeout:g} s"

    # -- internals ------------------------------------------------------------------------

    def _check(self, *, eof: bool) -> None:
        """Check what has arrived; resolve `body` when the answer is complete or cannot be."""
        buf = self._buf
        if self._head_end < 0:
            end, gap = _head_end(buf)
            if end < 0 or end > MAX_HEAD:
                if len(buf) > MAX_HEAD:
                    self._fail(BodyError(f"{self._label}: answer headers too long"))
                elif eof:
                    self._fail(self._cut_short())
                return
            error = self._parse_head(bytes(buf[:end]))
            if error is not None:
                self._fail(error)
                return
            self._head_end = end + gap
        body = len(buf) - self._head_end
        if body > MAX_BODY:
            self._fail(BodyError(f"{self._label}: answer longer than {MAX_BODY} bytes"))
            return
        length = self._length
        if length is not None and body >= length:
            del buf[self._head_end + length :]
        elif not eof:
            return  # more to come
        elif length is not None:
            self._fail(BodyError(f"{self._label}: answer cut short"))
            return
        self.body.set_result(bytes(buf[self._head_end :]))
        self._close()

    def _parse_head(self, head: bytes) -> MeterError | None:
        lines = [line.rstrip(b"\r") for line in head.split(b"\n")]
        status = lines[0].split(None, 2)
        if len(status) < 2 or not status[0].startswith(b"HTTP/") or not status[1].isdigit():
            return BodyError(f"{self._label}: answer is not HTTP")
        code = int(status[1])
        if code != 200:
            return _status_error(self._label, code)
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                text = value.strip()
                if not text.isdigit():
                    return BodyError(f"{self._label}: answer has a bad Content-Length")
                self._length = int(text)
            elif name == b"transfer-encoding" and value.strip().lower() != b"identity":
                # Not allowed in an answer to HTTP/1.0; no meter has been seen to do it.
                return BodyError(f"{self._label}: answer uses a transfer encoding")
        return None

    def _cut_short(self) -> MeterError:
        if not self._buf:
            return MeterUnreachable(f"{self._label}: connection closed without an answer")
        return BodyError(f"{self._label}: answer cut short")

    def _fail(self, error: MeterError) -> None:
        self.body.set_exception(error)
        self._close()

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.abort()  # at once: nothing more is read, nothing is sent


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
