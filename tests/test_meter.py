"""meter.MeterClient over real HTTP against the simulator's fault modes."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import traceback
from collections.abc import Callable, Sequence

import pytest

from bench.support import LOOPBACK, free_port
from bridge.errors import (
    BodyError,
    MeterAuthError,
    MeterError,
    MeterHTTPError,
    MeterRateLimited,
    MeterUnreachable,
)
from bridge.meter import MAX_BODY, RESOLVE_TTL, MeterClient
from bridge.readings import parse_body
from bridge.simulator import SimMeter, Simulator

PIN = "918273"


@pytest.fixture
def setup(simulator: Callable[..., Simulator]) -> tuple[Simulator, SimMeter]:
    meter = SimMeter(devid="1728053249", pin=PIN, phases=3, extended=True)
    return simulator([meter], tolerance=6.0), meter  # tolerance: back-to-back requests allowed


def client(sim: Simulator, meter: SimMeter, *, pin: str = PIN, timeout: float = 1.0) -> MeterClient:
    return MeterClient(f"http://{LOOPBACK}:{sim.port}", meter.devid, pin, timeout=timeout)


def assert_no_pin(exc: BaseException, pin: str = PIN) -> None:
    # Neither the message nor anything chained to it may carry the PIN.
    text = "".join(traceback.format_exception(exc))
    assert pin not in text, text
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)


def test_good_answer(setup: tuple[Simulator, SimMeter]) -> None:
    sim, meter = setup
    snap = parse_body(client(sim, meter).fetch())
    assert snap.devid == meter.devid and len(snap.readings) == 22


def test_pout_switches(setup: tuple[Simulator, SimMeter]) -> None:
    sim, meter = setup
    assert parse_body(client(sim, meter).fetch(pout=1)).pout == 1
    assert meter.pout == 1


@pytest.mark.parametrize(
    ("fault", "error", "text", "status"),
    [
        ("refuse", MeterUnreachable, "connection closed without an answer", None),
        ("hang", MeterUnreachable, "no answer within 1 s", None),
        ("drip", MeterUnreachable, "not complete within 1 s", None),
        ("http500", MeterHTTPError, "HTTP 500", 500),
        ("http429", MeterRateLimited, "HTTP 429", 429),
        ("huge", BodyError, f"longer than {MAX_BODY} bytes", None),
    ],
)
def test_faults_are_meter_errors_without_the_pin(
    setup: tuple[Simulator, SimMeter], fault: str, error: type[MeterError], text: str, status: int | None
) -> None:
    sim, meter = setup
    sim.set_fault(meter.devid, fault)
    began = time.monotonic()
    with pytest.raises(error, match=text) as info:
        client(sim, meter).fetch()
    assert time.monotonic() - began < 3  # bounded by the 1 s timeout, whatever the fault
    assert str(info.value).startswith(f"meter {meter.devid} at http://{LOOPBACK}:{sim.port}")
    assert info.value.status == status  # the status is data: nothing parses it from the text
    assert_no_pin(info.value)


@pytest.mark.parametrize(
    ("fault", "text"), [("html", "HTML"), ("truncated", "not valid JSON"), ("no_data", "'data'")]
)
def test_broken_bodies_fail_in_the_parser(setup: tuple[Simulator, SimMeter], fault: str, text: str) -> None:
    sim, meter = setup
    sim.set_fault(meter.devid, fault)
    body = client(sim, meter).fetch()
    with pytest.raises(BodyError, match=text):
        parse_body(body)


def test_wrong_pin(setup: tuple[Simulator, SimMeter]) -> None:
    sim, meter = setup
    wrong = "404404"
    with pytest.raises(MeterAuthError, match="devid/PIN refused") as info:
        client(sim, meter, pin=wrong).fetch()
    assert_no_pin(info.value, wrong)


ODD_PIN = "a+b&c#d%e f"


def test_the_devid_and_pin_are_percent_encoded(simulator: Callable[..., Simulator]) -> None:
    # The simulator decodes the query as servers do (parse_qs: '+' is a space, '%XX' an
    # escape, '&' a separator); unencoded, this PIN could never match.
    meter = SimMeter(devid="17", pin=ODD_PIN, phases=1)
    sim = simulator([meter], tolerance=60.0)
    assert parse_body(MeterClient(sim.url(), "17", ODD_PIN, timeout=1).fetch()).devid == "17"
    wrong = ODD_PIN.replace(" ", "+")  # what the meter heard before: a different PIN
    with pytest.raises(MeterAuthError) as info:
        MeterClient(sim.url(), "17", wrong, timeout=1).fetch()
    assert_no_pin(info.value, wrong)
    assert "a%2Bb" not in str(info.value)  # nor its encoded form
    assert (meter.ok, meter.bad_pin) == (1, 1)


def test_real_rate_limit(simulator: Callable[..., Simulator]) -> None:
    meter = SimMeter(devid="17", pin=PIN, phases=1, extended=False)
    sim = simulator([meter])
    c = client(sim, meter)
    c.fetch()
    with pytest.raises(MeterRateLimited):
        c.fetch()
    assert meter.rate_limited == 1


def test_connection_refused_on_a_closed_port() -> None:
    c = MeterClient(f"http://{LOOPBACK}:{free_port()}", "17", PIN, timeout=1)
    with pytest.raises(MeterUnreachable, match="Connection refused") as info:
        c.fetch()
    assert_no_pin(info.value)


class OneShotServer:
    """A loopback server that answers each connection with the same raw bytes, then closes:
    for answers the simulator does not make (odd line ends, ...)."""

    def __init__(self, answer: bytes) -> None:
        self.sock = socket.create_server((LOOPBACK, 0))
        self.port = self.sock.getsockname()[1]
        self.answer = answer
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(self.answer)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("length", [True, False])
def test_an_answer_with_bare_lf_line_ends_is_read(length: bool) -> None:
    # Some embedded servers end header lines with LF only; http.client accepts that.
    body = b'{"devid":"17","time":"1","pout":"0","data":{"V1":{"name":"V","unit":"V","value":"230.1"}}}'
    head = b"HTTP/1.0 200 OK\nContent-Type: application/json\n"
    if length:
        head += b"Content-Length: %d\n" % len(body)
    server = OneShotServer(head + b"\n" + body)
    try:
        got = MeterClient(f"http://{LOOPBACK}:{server.port}", "17", PIN, timeout=2).fetch()
    finally:
        server.close()
    assert got == body
    assert parse_body(got).readings[0].text == "230.1"


def test_headers_longer_than_the_cap_are_refused_even_in_one_read() -> None:
    server = OneShotServer(b"HTTP/1.0 200 OK\r\nX-Pad: " + b"x" * 9000 + b"\r\n\r\n{}")
    try:
        with pytest.raises(BodyError, match="headers too long"):
            MeterClient(f"http://{LOOPBACK}:{server.port}", "17", PIN, timeout=2).fetch()
    finally:
        server.close()


def test_the_next_address_of_a_name_is_tried_after_a_failure(setup: tuple[Simulator, SimMeter]) -> None:
    # "localhost" may resolve to ::1 first while the meter listens on 127.0.0.1 only.
    sim, meter = setup
    c = MeterClient(f"http://localhost:{sim.port}", meter.devid, PIN, timeout=1)
    assert _resolve(c) is None
    dead = (socket.AF_INET, (LOOPBACK, free_port()))
    c._addresses = [dead, (socket.AF_INET, (LOOPBACK, sim.port))]  # the first one is dead
    with pytest.raises(MeterUnreachable, match="Connection refused"):
        c.fetch()
    c.forget_address()
    assert parse_body(c.fetch()).devid == meter.devid


def test_a_scoped_ipv6_address_without_its_interface_is_a_meter_error() -> None:
    c = MeterClient("http://[fe80::1%25nosuchif]:80", "17", PIN, timeout=1)
    with pytest.raises(MeterUnreachable) as info:
        c.fetch()
    assert_no_pin(info.value)


def _exchange(c: MeterClient, now: float) -> bytes:
    """One request at the hand-moved time `now` (which picks the address)."""
    return asyncio.run(c.request(None, now))


def _resolve(c: MeterClient, now: float | None = None) -> MeterError | None:
    return asyncio.run(c.resolve(now))


def test_re_resolution_keeps_the_address_that_worked(
    setup: tuple[Simulator, SimMeter], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A dual-stack name whose first address is ::1, the meter on 127.0.0.1 only. This
    # machine's localhost may give 127.0.0.1 alone, so the lookup's answer is injected at
    # the resolver; the requests are real HTTP to the simulator.
    sim, meter = setup
    name = "dual-stack.meter.test"
    answer = [(socket.AF_INET6, ("::1", sim.port, 0, 0)), (socket.AF_INET, (LOOPBACK, sim.port))]
    real = socket.getaddrinfo

    def resolver(
        host: bytes | str | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> Sequence[tuple[object, ...]]:
        # socket.getaddrinfo's own parameters, so everything else goes to the real one as given.
        if host != name:
            return real(host, port, family, type, proto, flags)
        return [(family, socket.SOCK_STREAM, 6, "", sockaddr) for family, sockaddr in answer]

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    c = MeterClient(f"http://{name}:{sim.port}", meter.devid, PIN, timeout=1)
    now = 1000.0
    assert c.address(now) is None and _resolve(c, now) is None
    with pytest.raises(MeterUnreachable):
        _exchange(c, now)  # ::1: nobody listens there
    c.forget_address()
    assert parse_body(_exchange(c, now)).devid == meter.devid
    assert meter.ok == 1

    now += RESOLVE_TTL + 1
    assert c.address(now) is None  # the name is looked up again...
    assert _resolve(c, now) is None
    assert c.address(now) == answer[1]  # ...and the working address kept
    assert parse_body(_exchange(c, now)).devid == meter.devid  # no failed request first
    assert (meter.requests, meter.ok) == (2, 2)

    # Once the name no longer resolves to it, the first address is tried again.
    answer.pop()
    now += RESOLVE_TTL + 1
    assert c.address(now) is None and _resolve(c, now) is None
    assert c.address(now) == answer[0]


@pytest.mark.parametrize(
    ("head", "text"),
    [
        # int() refuses more than 4,300 digits: such a head once escaped the loop's
        # callback, which then failed again on every pass until the deadline.
        (b"HTTP/1.0 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.0 " + b"2" * 5000 + b" OK\r\n\r\n", "not HTTP"),
    ],
)
def test_absurd_numbers_in_the_head_fail_at_once(head: bytes, text: str) -> None:
    server = OneShotServer(head)
    try:
        # The head's own error, not "answer not complete within 5 s" at the deadline.
        with pytest.raises(BodyError, match=text):
            MeterClient(f"http://{LOOPBACK}:{server.port}", "17", PIN, timeout=5).fetch()
    finally:
        server.close()
