"""I/O: one HTTP request to one meter, through one chokepoint.

Every transport fault becomes a MeterError whose text names the meter by host and devid.
requests puts the full URL -- devpass included -- into its exception messages, so those
messages are never passed on: we describe the fault ourselves and drop the chain.
"""

from __future__ import annotations

import http.client
import logging
import re
import threading
import time

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter

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

_local = threading.local()
_DEVPASS = re.compile(r"(devpass=)[^&\s\"']*")


class _RedactPin(logging.Filter):
    """urllib3 logs every request line at DEBUG, devpass included: mask it there."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "devpass=" in message:
            record.msg, record.args = _DEVPASS.sub(r"\1***", message), None
        return True


logging.getLogger("urllib3.connectionpool").addFilter(_RedactPin())


def _session() -> requests.Session:
    # One Session per worker thread: Sessions are not thread-safe, and one per meter would
    # cost memory across thousands of meters. Meters close every connection anyway.
    session = getattr(_local, "session", None)
    if session is None:
        session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=1, max_retries=0)
        session.mount("http://", adapter)
        session.headers.clear()
        session.headers["User-Agent"] = "smartmac-bridge"
        session.trust_env = False  # no proxies for devices on the LAN
        _local.session = session
    return session


class MeterClient:
    """Talks to one meter. Never called from two threads at once for the same meter."""

    def __init__(self, url: str, devid: str, pin: str, *, timeout: float = 5.0) -> None:
        self.label = f"meter {devid} at {url}"
        self._pin = pin
        self._query = f"{url}/?page=getdata&devid={devid}&devpass={pin}"
        self._timeout = timeout

    def fetch(self, pout: int | None = None) -> bytes:
        """GET getdata (switching the relay when `pout` is given); return the body.

        Raises a MeterError subclass for anything but a complete 200 answer."""
        url = self._query if pout is None else f"{self._query}&pout={pout}"
        deadline = time.monotonic() + self._timeout
        try:
            with _session().get(
                url, timeout=self._timeout, stream=True, allow_redirects=False
            ) as response:
                status = response.status_code
                if status != 200:
                    raise self._status_error(status)
                return self._read(response, deadline)
        except MeterError:
            raise
        except (requests.Timeout, urllib3.exceptions.TimeoutError):
            raise MeterUnreachable(
                f"{self.label}: no answer within {self._timeout:g} s"
            ) from None
        except (
            requests.RequestException,
            urllib3.exceptions.HTTPError,  # raised by the body read, outside requests
            http.client.HTTPException,
            OSError,
        ) as exc:
            raise MeterUnreachable(f"{self.label}: {self._describe(exc)}") from None

    def _read(self, response: requests.Response, deadline: float) -> bytes:
        body = bytearray()
        raw = response.raw
        while chunk := raw.read1(16384):
            body += chunk
            if len(body) > MAX_BODY:
                raise BodyError(f"{self.label}: answer longer than {MAX_BODY} bytes")
            # The read timeout applies per recv(); a meter dripping one byte at a time would
            # pass it forever, so the whole answer has a deadline too.
            if time.monotonic() > deadline:
                raise MeterUnreachable(
                    f"{self.label}: answer not complete within {self._timeout:g} s"
                )
        return bytes(body)

    def _status_error(self, status: int) -> MeterError:
        if status == 429:
            return MeterRateLimited(
                f"{self.label}: HTTP 429, asked too often (another client polling it, a"
                " standard meter configured as extended, or a restart within its limit)"
            )
        if status in (401, 403):
            return MeterAuthError(f"{self.label}: HTTP {status}, devid/PIN refused")
        return MeterHTTPError(f"{self.label}: HTTP {status}")

    def _describe(self, exc: BaseException) -> str:
        # Find the OS-level reason ("Connection refused") under urllib3's wrappers; their
        # own messages carry the URL and so the PIN.
        seen: set[int] = set()
        stack: list[BaseException] = [exc]
        fallback = type(exc).__name__
        while stack:
            current = stack.pop()
            if id(current) in seen:
                continue
            seen.add(id(current))
            # requests' own errors are OSErrors too, but their text is the URL: skip them.
            if isinstance(current, OSError) and not isinstance(current, requests.RequestException):
                if current.strerror:  # "Connection refused"
                    return current.strerror.replace(self._pin, "***")
                if fallback == type(exc).__name__ and str(current):
                    # e.g. RemoteDisconnected: "Remote end closed connection without response"
                    fallback = _DEVPASS.sub(r"\1***", str(current)).replace(self._pin, "***")
            stack.extend(a for a in current.args if isinstance(a, BaseException))
            for linked in (current.__cause__, current.__context__, getattr(current, "reason", None)):
                if isinstance(linked, BaseException):
                    stack.append(linked)
        return fallback
