"""A fake fleet of SMART MAIC meters behind one loopback HTTP port.

The simulator speaks the meter's HTTP/1.0 API (``GET /?page=getdata&devid=..&devpass=..``)
for any number of meters at once, told apart by ``devid``. It copies the behaviour the
bridge has to cope with: the vendor's not-quite-JSON body (a raw newline inside the
``br*`` strings), the per-model rate limit answered with 429, the relay switched by
``&pout=``, and a set of per-meter faults (see ``FAULTS``) settable at runtime.

It runs either in its own thread and event loop (``Simulator.start()``, used by tests
and the benchmark) or in the caller's loop (``await Simulator.serve()``, used by the
``smartmac-bridge simulate`` command through ``run_cli``). One asyncio server handles all
connections, so thousands of meters cost no threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Final
from urllib.parse import parse_qs, urlsplit

logger = logging.getLogger(__name__)

FAULTS: Final = (
    "ok",
    "refuse",
    "hang",
    "drip",
    "drip_head",
    "cut_head",
    "http500",
    "http429",
    "html",
    "truncated",
    "no_data",
    "nonnumeric",
    "huge",
    "clean_json",
    "drop_wh",
    "pout_error",
    "odd_numbers",
    "odd_labels",
    "wrong_devid",
    "dup_devid",
    "churn",
    "many_keys",
)

# Faults that still produce a real reading: they go through the PIN and rate-limit
# checks and count as accepted. Every other fault replaces the answer outright.
_GOOD_FAULTS: Final = frozenset(
    {
        "ok", "clean_json", "nonnumeric", "drop_wh", "pout_error", "odd_numbers", "odd_labels",
        "wrong_devid", "dup_devid", "churn", "many_keys",
    }
)  # fmt: skip

STANDARD_INTERVAL: Final = 60.0  # seconds between accepted requests (vendor page)
EXTENDED_INTERVAL: Final = 6.0

_MAX_HEAD: Final = 8 * 1024  # request line + headers; a real meter has far less room
_HEAD_TIMEOUT: Final = 10.0  # a client that never finishes its request is dropped
_DRIP_INTERVAL: Final = 0.5
_HUGE_SIZE: Final = 10 * 1024 * 1024
_HUGE_CHUNK: Final = b" " * (64 * 1024)
_CHURN_KEYS: Final = 10  # fresh keys per read with fault "churn"

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
}
_JSON: Final = "application/json; charset=utf-8"
_TEXT: Final = "text/plain; charset=utf-8"
_HTML: Final = "text/html; charset=utf-8"

_DENIED_PAGE: Final = b"<html><head><title>smart-MAC</title></head><body><h1>Access denied</h1></body></html>"
_LOGIN_PAGE: Final = (
    b'<html><head><title>smart-MAC</title></head><body><form method="post">'
    b'PIN: <input type="password" name="devpass"><input type="submit" value="Login">'
    b"</form></body></html>"
)


@dataclass
class SimMeter:
    """One simulated meter: its identity, its fault mode and what the server saw.

    The counters are written by the server's event loop and may be read from any thread.
    """

    devid: str
    pin: str
    phases: int = 1
    extended: bool = False
    pout: int = 0
    fault: str = "ok"
    delay: float | None = None
    """Seconds this meter waits before answering; None: the simulator's delay."""
    requests: int = 0
    ok: int = 0
    rate_limited: int = 0
    bad_pin: int = 0
    early: int = 0
    """Requests that arrived sooner than the model allows after the previous request,
    whatever was answered: stricter than rate_limited, which counts only those refused
    for coming too soon after an accepted one."""
    pout_requests: list[tuple[float, int]] = field(default_factory=list)
    request_times: list[float] = field(default_factory=list)

    # Private state. Readings are kept per phase; W is derived from V, A and PF at each
    # step so that the energy integral uses the power the meter last reported.
    _rng: random.Random = field(init=False, repr=False, compare=False)
    _v: list[float] = field(init=False, repr=False, compare=False)
    _a: list[float] = field(init=False, repr=False, compare=False)
    _pf: list[float] = field(init=False, repr=False, compare=False)
    _w: list[int] = field(init=False, repr=False, compare=False)
    _wh: list[float] = field(init=False, repr=False, compare=False)
    _t: int = field(init=False, repr=False, compare=False)
    _last_accepted: float | None = field(default=None, init=False, repr=False, compare=False)
    _churn: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.devid.isdigit():
            raise ValueError(f"devid must be digits, got {self.devid!r}")
        if not self.pin:
            # Any text: a PIN such as "a+b&c#d%e f" tests a client's query encoding.
            raise ValueError(f"pin of meter {self.devid} must not be empty")
        if self.phases not in (1, 3):
            raise ValueError(f"phases must be 1 or 3, got {self.phases!r}")
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; expected one of {FAULTS}")
        if self.delay is not None and not 0 <= self.delay < 3600:
            raise ValueError(f"delay of meter {self.devid} must be 0 to 3600 s")
        # Seeded by devid so a given fleet produces the same readings on every run.
        rng = random.Random(int(self.devid))
        self._rng = rng
        self._v = [round(rng.uniform(226.0, 234.0), 2) for _ in range(self.phases)]
        self._a = [round(rng.uniform(0.0, 8.0), 2) for _ in range(self.phases)]
        self._pf = [round(rng.uniform(0.80, 0.99), 2) for _ in range(self.phases)]
        self._w = [round(v * a * pf) for v, a, pf in zip(self._v, self._a, self._pf, strict=True)]
        self._wh = [float(rng.randint(10_000, 40_000_000)) for _ in range(self.phases)]
        self._t = rng.randint(15, 30)

    @property
    def interval(self) -> float:
        """Seconds the meter wants between two requests (60 standard, 6 extended)."""
        return EXTENDED_INTERVAL if self.extended else STANDARD_INTERVAL

    @property
    def model(self) -> str:
        """Vendor model name: D103 for 3-phase, D101 for 1-phase."""
        return "D103" if self.phases == 3 else "D101"

    def _advance(self, now: float) -> None:
        """Integrate energy since the last accepted request, then drift the readings."""
        if self._last_accepted is not None:
            dt = max(0.0, now - self._last_accepted)
            for i, w in enumerate(self._w):
                self._wh[i] += w * dt / 3600.0
        rng = self._rng
        for i in range(self.phases):
            self._v[i] = _clamp(self._v[i] + rng.uniform(-1.0, 1.0), 225.0, 235.0)
            self._a[i] = _clamp(self._a[i] + rng.uniform(-0.5, 0.5), 0.0, 20.0)
            self._pf[i] = _clamp(self._pf[i] + rng.uniform(-0.02, 0.02), 0.80, 0.99)
            # Round first so W matches the printed V, A and PF.
            self._v[i] = round(self._v[i], 2)
            self._a[i] = round(self._a[i], 2)
            self._pf[i] = round(self._pf[i], 2)
            self._w[i] = round(self._v[i] * self._a[i] * self._pf[i])
        self._t = int(_clamp(self._t + rng.choice((-1, 0, 0, 1)), 10, 40))
        self._last_accepted = now


def _clamp(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x


def make_fleet(
    n: int, *, phases: int = 1, extended: bool = False, first_id: int = 1728053249
) -> list[SimMeter]:
    """n meters with ids str(first_id + i) and deterministic distinct 6-digit PINs.

    PIN i is ``(i * 7919 + 12345) % 999999 + 1`` zero-padded: 7919 is prime and does not
    divide 999999, so the first 999999 PINs are distinct, and none is '000000'. The
    first one is '012346', so PINs with a leading zero get exercised too.
    """
    if not 0 <= n <= 999_999:
        raise ValueError(f"n must be between 0 and 999999, got {n}")
    return [
        SimMeter(
            devid=str(first_id + i),
            pin=f"{(i * 7919 + 12345) % 999_999 + 1:06d}",
            phases=phases,
            extended=extended,
        )
        for i in range(n)
    ]


# --- body templates --------------------------------------------------------------------
# Built once per (phases, extended, newline) and filled with %-formatting per request:
# the body is produced at hundreds of requests per second, so no json.dumps here.


def _template(phases: int, extended: bool, br: str) -> str:
    items: list[str] = []

    def item(key: str, name: str, unit: str) -> None:
        items.append(f'"{key}":{{"name":"{name}","unit":"{unit}","value":"%s"}}')

    for p in range(1, phases + 1):
        item(f"V{p}", f"Voltage {p}", "V")
        item(f"A{p}", f"Current {p}", "A")
        item(f"W{p}", f"Active Power {p}", "W")
        if extended:
            item(f"rW{p}", f"Rev. Active Power {p}", "W")
        item(f"Wh{p}", f"Energy {p}", "Wh")
        if extended:
            item(f"rWh{p}", f"Rev. Energy {p}", "Wh")
        item(f"PF{p}", f"Power Factor {p}", "")
        items.append(f'"br{p - 1}":{{"name":"{br}"}}')
    item("T", "Temperature", "°C")
    return '{"devid":"%s","time":"%s","pout":"%s","data":{' + ",".join(items) + "}}"


_RAW_NL: Final = "\n"  # the vendor's raw newline: not strict JSON, on purpose
_ESC_NL: Final = "\\n"  # what json.dumps would write
_TEMPLATES: Final = {
    (ph, ext, br): _template(ph, ext, br)
    for ph in (1, 3)
    for ext in (False, True)
    for br in (_RAW_NL, _ESC_NL)
}
_RAW: Final = "\x00%s\x00"  # odd_numbers: a value sent as a JSON number, not a string
_NO_DATA: Final = '{"devid":"%s","time":"%s","pout":"%s"}'


def _render(m: SimMeter, fault: str) -> bytes:
    """The 200 body of meter m with its current readings, shaped by a good fault."""
    drop_wh = fault == "drop_wh"
    vals: list[str] = [m.devid, str(int(time.time())), str(m.pout)]
    for i in range(m.phases):
        vals.append(f"{m._v[i]:.2f}")
        vals.append(f"{m._a[i]:.2f}")
        vals.append(str(m._w[i]))
        if m.extended:
            vals.append("0")
        # The power-cut glitch seen in the field: the counter reads 1000 times too small.
        vals.append(f"{int(m._wh[i]) / 1000:.3f}" if drop_wh else str(int(m._wh[i])))
        if m.extended:
            vals.append("0.000" if drop_wh else "0")
        vals.append(f"{m._pf[i]:.2f}")
    vals.append(str(m._t))
    if fault == "nonnumeric":
        vals[3] = ""  # V1
        vals[4] = "n/a"  # A1
    elif fault == "odd_numbers":
        # Values the bridge must leave out (issue 12): an underflow, Arabic-Indic digits, a
        # 4,000-digit JSON number, an overflowing one; and PF1 as a good JSON number.
        vals[3] = "1e-400"  # V1
        vals[4] = "\u0661\u0662"  # A1
        vals[5] = _RAW % ("9" * 4000)  # W1
        vals[-2] = _RAW % vals[-2]  # PF of the last phase
        vals[-1] = _RAW % "1e999"  # T
    elif fault == "wrong_devid":
        vals[0] = _other_devid(m.devid)  # another meter answering at this meter's address
    br = _ESC_NL if fault == "clean_json" else _RAW_NL
    body = _TEMPLATES[(m.phases, m.extended, br)] % tuple(vals)
    if fault == "odd_numbers":
        body = body.replace('"\x00', "").replace('\x00"', "")
    elif fault == "odd_labels":
        # Home Assistant discovery's edge cases (issue 12): a label with control characters,
        # a lone surrogate and 100 characters; a second counter wh1 beside Wh1.
        body = body.replace('"name":"Voltage 1"', '"name":"Voltage\\u0007\\n1 \\ud800%s"' % ("x" * 100), 1)
        body = body.replace(
            '"T":{', f'"wh1":{{"name":"Energy 1 again","unit":"Wh","value":"{int(m._wh[0])}"}},"T":{{', 1
        )
    elif fault == "dup_devid":
        # A second devid at the end of the envelope: JSON's last duplicate wins.
        body = body[:-1] + f',"devid":"{_other_devid(m.devid)}"}}'
    elif fault == "churn":
        # Key names never seen before on every read (a firmware bug or a man in the middle).
        m._churn += 1
        fresh = ",".join(
            f'"X{m._churn}_{i}":{{"name":"Churn {i}","unit":"","value":"{i}"}}' for i in range(_CHURN_KEYS)
        )
        body = body[:-2] + "," + fresh + "}}"
    elif fault == "many_keys":
        # More data keys than a bridge keeps per meter (README: 256).
        extra = ",".join(f'"N{i}":{{"value":"{i}"}}' for i in range(257))
        body = body[:-2] + "," + extra + "}}"
    return body.encode()


def _other_devid(devid: str) -> str:
    """A devid that is not `devid`, of the same length."""
    return str(int(devid) + 1).zfill(len(devid))[-len(devid) :]


def _head(code: int, ctype: str, length: int | None) -> bytes:
    lines = [f"HTTP/1.0 {code} {_REASONS[code]}", "Server: smart-MAC", f"Content-Type: {ctype}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _simple(code: int, ctype: str, body: bytes) -> bytes:
    return _head(code, ctype, len(body)) + body


def _text(code: int, message: str) -> bytes:
    return _simple(code, _TEXT, (message + "\n").encode())


# --- what to do with a request ----------------------------------------------------------
# _decide() is synchronous and does all the bookkeeping; the connection handler only
# carries out the plan. Kinds: "send" (write payload, close), "refuse", "hang",
# "drip" (payload at once, then extra one byte per _DRIP_INTERVAL), "huge" (payload =
# head, extra = JSON prefix).


@dataclass(slots=True)
class _Plan:
    kind: str
    payload: bytes = b""
    extra: bytes = b""
    delay: float | None = None  # None: the simulator's delay


_BAD_REQUEST: Final = _Plan("send", _text(400, "bad request"))
_NOT_FOUND: Final = _Plan("send", _text(404, "not found"))


class Simulator:
    """Serve a fleet of SimMeters over HTTP on one port (see the module docstring)."""

    def __init__(
        self,
        meters: list[SimMeter],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        delay: float = 0.0,
        tolerance: float = 0.0,
    ) -> None:
        self.meters: dict[str, SimMeter] = {}
        for m in meters:
            if m.devid in self.meters:
                raise ValueError(f"duplicate devid {m.devid}")
            self.meters[m.devid] = m
        self.host = host
        # Until start() this is the requested port; afterwards the bound one, so a
        # stopped simulator restarts on the same port (a meter "coming back").
        self.port = port
        self.delay = delay
        self.tolerance = tolerance
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task[None] | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    # --- public control -----------------------------------------------------------

    def url(self) -> str:
        """Base URL of the simulator, e.g. "http://127.0.0.1:8080"."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def set_fault(self, devid: str, fault: str) -> None:
        """Switch meter devid to a fault mode (one of FAULTS); takes effect at once."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {FAULTS}")
        self.meters[devid].fault = fault  # a plain attribute store: safe across threads

    def total_rate_limited(self) -> int:
        """Requests answered 429 for coming too soon, over all meters."""
        return sum(m.rate_limited for m in self.meters.values())

    def stats(self) -> dict[str, object]:
        """The counters, summed over the fleet and per meter, as JSON-ready data.

        Also served as ``GET /stats``, for a benchmark or a user in another process.
        """
        keys = ("requests", "ok", "rate_limited", "bad_pin", "early")
        meters = {
            m.devid: {
                **{key: getattr(m, key) for key in keys},
                "pout_requests": len(m.pout_requests),
                "pout": m.pout,
            }
            for m in list(self.meters.values())
        }
        totals = {key: sum(c[key] for c in meters.values()) for key in (*keys, "pout_requests")}
        return {"meters": len(meters), **totals, "per_meter": meters}

    def start(self) -> Simulator:
        """Serve in a new thread with its own event loop; return once listening."""
        if self._thread is not None:
            return self
        self._ready.clear()
        self._start_error = None
        thread = threading.Thread(target=self._thread_main, name="smartmac-simulator", daemon=True)
        self._thread = thread
        thread.start()
        self._ready.wait()
        if self._start_error is not None:
            thread.join()
            self._thread = None
            raise self._start_error
        return self

    def stop(self) -> None:
        """Close the listener and every connection (hanging ones too), join the thread."""
        thread, loop, main = self._thread, self._loop, self._main
        if thread is None:
            return
        if loop is not None and main is not None:
            with contextlib.suppress(RuntimeError):  # the loop already closed on its own
                loop.call_soon_threadsafe(main.cancel)
        thread.join(timeout=10.0)
        if thread.is_alive():
            logger.warning("simulator thread did not stop within 10 s")
        self._thread = None

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def serve(self) -> None:
        """Serve in the current event loop until cancelled, then close every connection."""
        server = await self._listen()
        await self._serve_until_cancelled(server)

    # --- lifecycle internals ------------------------------------------------------

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._main = loop.create_task(self.serve())
            loop.run_until_complete(self._main)
        except asyncio.CancelledError:
            pass  # the normal way stop() ends us
        except BaseException as exc:  # anything at all: handed to start() to re-raise
            self._start_error = exc
        finally:
            self._ready.set()  # also on failure, so start() never waits forever
            self._main = None
            self._loop = None
            loop.close()

    async def _listen(self) -> asyncio.Server:
        server = await asyncio.start_server(self._handle, self.host, self.port, limit=_MAX_HEAD, backlog=1024)
        self.port = server.sockets[0].getsockname()[1]
        logger.info("simulator: %d meters at %s", len(self.meters), self.url())
        self._ready.set()
        return server

    async def _serve_until_cancelled(self, server: asyncio.Server) -> None:
        try:
            await asyncio.get_running_loop().create_future()  # never completes
        finally:
            server.close()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.wait_closed()
            # Let the aborted transports run their connection_lost callbacks before the
            # loop may be closed.
            await asyncio.sleep(0)
            logger.info("simulator: stopped")

    # --- per connection -----------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._converse(reader, writer)
        except asyncio.CancelledError:
            # stop() is closing everything. Not re-raised: in 3.11 the streams machinery
            # calls task.exception() on our task, which would log a spurious error.
            writer.transport.abort()
        except (OSError, EOFError, asyncio.IncompleteReadError) as exc:
            # The client went away mid-way; that is its right.
            logger.debug("simulator: connection dropped: %r", exc)
        except Exception:
            logger.exception("simulator: unexpected error while answering a request")
        finally:
            self._tasks.discard(task)
            if not writer.transport.is_closing():
                writer.close()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_HEAD_TIMEOUT):
                head = await _read_head(reader)
        except TimeoutError:
            logger.debug("simulator: request head not finished in %.0f s", _HEAD_TIMEOUT)
            return
        except ValueError:  # the head is larger than _MAX_HEAD
            plan = _BAD_REQUEST
        else:
            if head is None:
                return  # closed before finishing the request
            plan = self._decide(head[0])

        kind = plan.kind
        if kind == "refuse":
            return  # the finally of _handle closes without a word
        if kind == "hang":
            # Keep the connection open, reading whatever comes, until the client gives
            # up or stop() cancels us.
            while await reader.read(4096):
                pass
            return
        delay = self.delay if plan.delay is None else plan.delay
        if delay > 0:
            await asyncio.sleep(delay)
        writer.write(plan.payload)
        await writer.drain()
        if kind == "drip":
            for i in range(len(plan.extra)):
                await asyncio.sleep(_DRIP_INTERVAL)
                writer.write(plan.extra[i : i + 1])
                await writer.drain()  # raises once the client has gone
        elif kind == "huge":
            writer.write(plan.extra)
            sent = len(plan.extra)
            while sent < _HUGE_SIZE:
                # drain() after each chunk both paces us and notices a closed client;
                # checking is_closing() keeps asyncio from warning about writes to a
                # dead socket.
                if writer.transport.is_closing():
                    return
                writer.write(_HUGE_CHUNK)
                sent += len(_HUGE_CHUNK)
                await writer.drain()

    def _decide(self, request_line: bytes) -> _Plan:
        """Parse the request line, do the bookkeeping, and choose the answer."""
        parts = request_line.decode("latin-1").split()
        if len(parts) != 3 or parts[0] != "GET" or not parts[2].startswith("HTTP/"):
            return _BAD_REQUEST
        target = urlsplit(parts[1])
        if target.path == "/stats":
            # Not a meter page: the counters, for a benchmark in another process. Never
            # delayed, so reading them does not wait behind the meters.
            body = json.dumps(self.stats(), separators=(",", ":")).encode()
            return _Plan("send", _simple(200, _JSON, body), delay=0.0)
        if target.path not in ("/", ""):
            return _NOT_FOUND
        query = parse_qs(target.query, keep_blank_values=True)
        if query.get("page", [""])[0] != "getdata":
            return _NOT_FOUND
        devid = query.get("devid", [""])[0]
        if not devid:
            return _BAD_REQUEST
        m = self.meters.get(devid)
        if m is None:
            return _NOT_FOUND

        now = time.monotonic()
        m.requests += 1
        if m.request_times and now - m.request_times[-1] < m.interval:
            m.early += 1
        m.request_times.append(now)
        plan = self._answer(m, query, now)
        if m.delay is not None:
            plan = replace(plan, delay=m.delay)
        return plan

    def _answer(self, m: SimMeter, query: dict[str, list[str]], now: float) -> _Plan:
        """The answer of meter m to a getdata request that arrived at now."""
        fault = m.fault
        if fault not in _GOOD_FAULTS:
            return self._broken(m, fault)

        if query.get("devpass", [""])[0] != m.pin:
            m.bad_pin += 1
            return _Plan("send", _simple(403, _HTML, _DENIED_PAGE))

        last = m._last_accepted
        if last is not None and now - last < m.interval - self.tolerance:
            m.rate_limited += 1
            return _Plan("send", _text(429, "too many requests"))

        pout: int | None = None
        if "pout" in query:
            raw = query["pout"][0]
            if raw not in ("0", "1"):
                return _Plan("send", _text(400, "pout must be 0 or 1"))
            pout = int(raw)

        if pout is not None:
            m.pout = pout
            m.pout_requests.append((now, pout))
        m._advance(now)
        m.ok += 1
        if fault == "pout_error" and pout is not None:
            # Seen on real firmware (homeassistant-smart-maic #27): the relay switches, yet
            # the answer to the switching request is an error status.
            return _Plan("send", _text(500, "internal error"))
        body = _render(m, fault)
        return _Plan("send", _simple(200, _JSON, body))

    def _broken(self, m: SimMeter, fault: str) -> _Plan:
        """The answer of a fault that replaces the reading (no PIN or rate-limit check)."""
        if fault in ("refuse", "hang"):
            return _Plan(fault)
        if fault == "http500":
            return _Plan("send", _text(500, "internal error"))
        if fault == "http429":
            return _Plan("send", _text(429, "too many requests"))
        if fault == "html":
            return _Plan("send", _simple(200, _HTML, _LOGIN_PAGE))
        if fault == "no_data":
            body = (_NO_DATA % (m.devid, int(time.time()), m.pout)).encode()
            return _Plan("send", _simple(200, _JSON, body))
        body = _render(m, "ok")
        if fault == "truncated":
            half = body[: len(body) // 2]
            return _Plan("send", _simple(200, _JSON, half))
        if fault == "drip":
            return _Plan("drip", _head(200, _JSON, len(body)), body)
        if fault == "drip_head":
            # Even the status line and headers come one byte at a time: a client whose
            # timeout is per read (requests, http.client) never times out on it.
            return _Plan("drip", b"", _head(200, _JSON, len(body)) + body)
        if fault == "cut_head":
            # Power lost mid-answer: the connection closes inside a header line.
            head = _head(200, _JSON, len(body))
            return _Plan("send", head[: head.index(b"Content-Type") + 6])
        if fault == "huge":
            # A valid start of a meter body whose last string never ends: the padding
            # that follows is "inside" it, so only a size cap saves the client.
            prefix = body[: body.index(b'"data":{') + 8] + b'"pad":{"name":"'
            return _Plan("huge", _head(200, _JSON, None), prefix)
        raise AssertionError(f"unhandled fault {fault!r}")


async def _read_head(reader: asyncio.StreamReader) -> list[bytes] | None:
    """Request line and header lines (without the blank line), or None on early EOF.

    Raises ValueError when the head exceeds _MAX_HEAD. Bare LF line ends are accepted,
    for people typing requests into nc.
    """
    lines: list[bytes] = []
    size = 0
    while True:
        line = await reader.readline()
        if not line.endswith(b"\n"):
            return None
        size += len(line)
        if size > _MAX_HEAD:
            raise ValueError("request head too large")
        if line in (b"\r\n", b"\n"):
            if not lines:
                continue  # stray blank lines before the request line (RFC 9112 2.2)
            return lines
        lines.append(line.rstrip(b"\r\n"))


def run_cli(
    port: int,
    devices: int,
    phases: int,
    extended: bool,
    host: str = "127.0.0.1",
    delay: float = 0.0,
) -> int:
    """Foreground simulator for `smartmac-bridge simulate`.

    Prints a table of devid/PIN/phases/model and the base URL to stdout (flushed), then
    serves until SIGINT/SIGTERM and returns 0. Returns 1 if the port cannot be bound.
    """
    meters = make_fleet(devices, phases=phases, extended=extended)
    sim = Simulator(meters, host=host, port=port, delay=delay)

    async def main() -> int:
        try:
            server = await sim._listen()
        except OSError as exc:
            reason = exc.strerror or exc
            print(f"cannot listen on {host}:{port}: {reason}", file=sys.stderr, flush=True)
            return 1
        kind = "extended" if extended else "standard"
        lines = [f"{'devid':<12} {'PIN':<6} {'phases':>6}  model"]
        lines += [f"{m.devid:<12} {m.pin:<6} {m.phases:>6}  {m.model} {kind}" for m in meters]
        lines += ["", f"Serving {len(meters)} meters at {sim.url()}"]
        if meters:
            first = meters[0]
            query = f"?page=getdata&devid={first.devid}&devpass={first.pin}"
            lines.append(f"Example: {sim.url()}/{query}")
        lines.append("Press Ctrl+C to stop.")
        print("\n".join(lines), flush=True)

        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows: Ctrl+C raises instead
                loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await sim._serve_until_cancelled(server)
        return 0

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 0
