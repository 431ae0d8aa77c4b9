"""I/O: the HTTP client for the meters. One request chokepoint, no threads.

The meter speaks plain HTTP and closes the connection after every answer, so there is
nothing to pool or keep alive; what a request costs is the client's own work. A general
client (requests: ~1 ms of CPU per request here) and a thread per request in flight
would cost more than everything else the bridge does, and its per-read timeout lets a
meter that drips its headers hold a request forever. So a request is an `Exchange`: a
non-blocking socket that the bridge's event loop drives beside hundreds of others, with
one deadline for the whole request (connect to last byte). `MeterClient.fetch()` runs
one exchange on a private selector for one-off use (`probe`).

Every fault becomes a MeterError here, whose text names the meter by host and devid. We
build requests and error messages ourselves, so the PIN (it travels in the query string)
can never reach an exception text or a log line.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import selectors
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
_RECV = MAX_HEAD + MAX_BODY + 1
#: Seconds a resolved host name is reused. Meters are usually given by IP address, and
#: name resolution blocks, so it happens off the loop (see service.py) and not per poll.
RESOLVE_TTL = 300.0

_IN_PROGRESS = (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN)


class MeterClient:
    """How to reach one meter: its address and its prebuilt requests."""

    __slots__ = (
        "label", "host", "port", "timeout", "_requests", "_addresses", "_current", "_resolved_at",
        "_working",
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
                + b"Host: " + host_header + b"\r\nUser-Agent: smartmac-bridge\r\n\r\n"
            )
            for pout in (None, 0, 1)
        }
        literal = _literal(self.host, self.port)
        self._addresses: list[tuple[int, tuple[object, ...]]] = [literal] if literal else []
        self._current = 0
        self._resolved_at = float("inf") if literal else float("-inf")
        #: The address the meter last answered on; None after a failure.
        self._working: tuple[int, tuple[object, ...]] | None = None

    # -- addresses ------------------------------------------------------------------------

    def address(self, now: float) -> tuple[int, tuple[object, ...]] | None:
        """(family, sockaddr), or None when the host name must be resolved (again) first."""
        if now - self._resolved_at > RESOLVE_TTL:
            return None
        return self._addresses[self._current]

    def resolve(self, now: float | None = None) -> MeterError | None:
        """Look the host name up (blocking: call it off the event loop). None on success.

        The address that last worked is kept while the name still resolves to it: going
        back to the first (::1, say, with a meter on IPv4 only) would cost a failed poll
        and a warning at every lookup. `now`: the time of the lookup (default: the clock)."""
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            return MeterUnreachable(f"{self.label}: cannot resolve host ({_reason(exc)})")
        addresses: list[tuple[int, tuple[object, ...]]] = []
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

    def exchange(self, pout: int | None, now: float) -> Exchange:
        """A request ready to start: `pout` None polls, 0/1 also switches the relay."""
        return Exchange(self, self._requests[pout], now + self.timeout)

    def fetch(self, pout: int | None = None) -> bytes:
        """One blocking request (for `probe`); the body, or a MeterError."""
        now = time.monotonic()
        if self.address(now) is None and (error := self.resolve()) is not None:
            raise error
        exchange = self.exchange(pout, now)
        with selectors.DefaultSelector() as selector:
            exchange.begin(selector, now)
            while not exchange.done:
                remaining = exchange.deadline - time.monotonic()
                if remaining <= 0:
                    exchange.expire()
                    break
                for _key, mask in selector.select(remaining):
                    exchange.on_event(mask)
        return exchange.result()


class Exchange:
    """One HTTP request on a non-blocking socket, registered with the caller's selector.

    Call begin(), then on_event() for every selector event until `done`, or expire() at
    the deadline; result() gives the body or raises the MeterError. The socket is closed
    and unregistered as soon as the exchange is done.
    """

    __slots__ = (
        "client", "deadline", "done", "_request", "_sock", "_selector", "_buf", "_error",
        "_length", "_head_end", "_writing", "_tag", "_address",
    )

    def __init__(self, client: MeterClient, request: bytes, deadline: float) -> None:
        self.client = client
        self.deadline = deadline
        self.done = False
        self._request = request
        self._sock: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._buf = bytearray()
        self._error: MeterError | None = None
        self._head_end = -1
        self._length: int | None = None
        self._writing = True
        self._tag: object = None
        self._address: tuple[int, tuple[object, ...]] | None = None

    def begin(self, selector: selectors.BaseSelector, now: float, tag: object = None) -> None:
        """Start connecting; the socket is registered with `tag` as its data (default: self)."""
        address = self.client.address(now)
        if address is None:
            self._fail(MeterUnreachable(f"{self.client.label}: host name not resolved"))
            return
        self._address = address
        family, sockaddr = address
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:  # out of file descriptors, typically
            self._fail(MeterUnreachable(f"{self.client.label}: {_reason(exc)}"))
            return
        sock.setblocking(False)
        self._sock = sock
        try:
            code = sock.connect_ex(sockaddr)
            if code and code not in _IN_PROGRESS:
                self._fail(MeterUnreachable(f"{self.client.label}: {os.strerror(code)}"))
                return
            self._tag = self if tag is None else tag
            selector.register(sock, selectors.EVENT_WRITE, self._tag)
        except OSError as exc:
            # e.g. a scoped IPv6 address whose interface is gone (gaierror), or the
            # selector out of room: this request fails, the loop goes on.
            self._fail(MeterUnreachable(f"{self.client.label}: {_reason(exc)}"))
            return
        self._selector = selector

    def on_event(self, mask: int) -> None:
        """The socket is ready: connect done, request out, or answer bytes in."""
        sock = self._sock
        if sock is None or self.done:
            return
        if self._writing:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._fail(MeterUnreachable(f"{self.client.label}: {os.strerror(code)}"))
                return
            # Connected: the meter listens here (a later failure forgets it again).
            self.client._working = self._address
            try:
                sent = sock.send(self._request)
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(MeterUnreachable(f"{self.client.label}: {_reason(exc)}"))
                return
            self._request = self._request[sent:]
            if self._request:
                return  # never for a request this small, but a partial send is legal
            self._writing = False
            assert self._selector is not None
            self._selector.modify(sock, selectors.EVENT_READ, self._tag)
            return
        try:
            chunk = sock.recv(_RECV)
        except BlockingIOError:
            return
        except OSError as exc:  # reset by the meter, typically
            self._fail(MeterUnreachable(f"{self.client.label}: {_reason(exc)}"))
            return
        if not chunk:
            self._finish(eof=True)
            return
        self._buf += chunk
        self._finish(eof=False)

    def expire(self) -> None:
        """The deadline passed: give up on this request."""
        if self.done:
            return
        timeout = f"{self.client.timeout:g} s"
        if self._writing:
            text = f"no connection within {timeout}"
        elif not self._buf:
            text = f"no answer within {timeout}"
        else:
            text = f"answer not complete within {timeout}"
        self._fail(MeterUnreachable(f"{self.client.label}: {text}"))

    def abort(self) -> None:
        """Drop the request without a result (shutdown)."""
        if not self.done:
            self._fail(MeterUnreachable(f"{self.client.label}: request abandoned"))

    def result(self) -> bytes:
        """The body of a complete 200 answer; else raises the MeterError."""
        if self._error is not None:
            raise self._error
        if not self.done:
            raise RuntimeError("exchange still running")
        return bytes(self._buf[self._head_end :])

    # -- internals ------------------------------------------------------------------------

    def _finish(self, *, eof: bool) -> None:
        """Check what has arrived; close when the answer is complete or cannot be."""
        buf = self._buf
        if self._head_end < 0:
            end, gap = _head_end(buf)
            if end < 0 or end > MAX_HEAD:
                if len(buf) > MAX_HEAD:
                    self._fail(BodyError(f"{self.client.label}: answer headers too long"))
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
            self._fail(BodyError(f"{self.client.label}: answer longer than {MAX_BODY} bytes"))
            return
        length = self._length
        if length is not None and body >= length:
            del buf[self._head_end + length :]
        elif not eof:
            return  # more to come
        elif length is not None:
            self._fail(BodyError(f"{self.client.label}: answer cut short"))
            return
        self._close()

    def _parse_head(self, head: bytes) -> MeterError | None:
        lines = [line.rstrip(b"\r") for line in head.split(b"\n")]
        status = lines[0].split(None, 2)
        if len(status) < 2 or not status[0].startswith(b"HTTP/") or not status[1].isdigit():
            return BodyError(f"{self.client.label}: answer is not HTTP")
        code = int(status[1])
        if code != 200:
            return _status_error(self.client.label, code)
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                text = value.strip()
                if not text.isdigit():
                    return BodyError(f"{self.client.label}: answer has a bad Content-Length")
                self._length = int(text)
            elif name == b"transfer-encoding" and value.strip().lower() != b"identity":
                # Not allowed in an answer to HTTP/1.0; no meter has been seen to do it.
                return BodyError(f"{self.client.label}: answer uses a transfer encoding")
        return None

    def _cut_short(self) -> MeterError:
        if not self._buf:
            return MeterUnreachable(f"{self.client.label}: connection closed without an answer")
        return BodyError(f"{self.client.label}: answer cut short")

    def _fail(self, error: MeterError) -> None:
        self._error = error
        self._close()

    def _close(self) -> None:
        self.done = True
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._selector is not None:
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
        sock.close()


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


def _literal(host: str, port: int) -> tuple[int, tuple[object, ...]] | None:
    """(family, sockaddr) for an IP address literal; None for a host name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 6:
        return socket.AF_INET6, (host, port, 0, 0)
    return socket.AF_INET, (host, port)


def _reason(exc: BaseException) -> str:
    # The OS's own words ("Connection reset by peer"); our requests never carry a URL
    # into an OSError, but the strerror is all we pass on anyway.
    return getattr(exc, "strerror", None) or type(exc).__name__
