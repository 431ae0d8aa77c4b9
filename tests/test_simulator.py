"""Tests of the meter simulator, over real HTTP on 127.0.0.1.

Standard meters allow one request per 60 s, so "too soon" needs no sleeping; where
several accepted requests are needed, extended meters with tolerance=6 accept
back-to-back requests.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from bench.support import wait_until
from bridge.simulator import FAULTS, SimMeter, Simulator, make_fleet

# The vendor's sample answer (seed-api.txt), verbatim: note the raw newlines in br*.
SEED_BODY = (
    '{"devid":"1728053249","time":"1530607456","pout":"0","data":{"V1":{"name":"Voltage 1",'
    '"unit":"V","value":"220.89"},"A1":{"name":"Current 1","unit":"A","value":"2.78"},"W1":'
    '{"name":"Active Power 1","unit":"W","value":"586"},"rW1":{"name":"Rev. Active Power 1",'
    '"unit":"W","value":"0"},"Wh1":{"name":"Energy 1","unit":"Wh","value":"33549075"},"rWh1":'
    '{"name":"Rev. Energy 1","unit":"Wh","value":"0"},"PF1":{"name":"Power Factor 1","unit":"",'
    '"value":"0.94"},"br0":{"name":"\n"},"V2":{"name":"Voltage 2","unit":"V","value":"213.40"},'
    '"A2":{"name":"Current 2","unit":"A","value":"0.34"},"W2":{"name":"Active Power 2","unit":'
    '"W","value":"30"},"rW2":{"name":"Rev. Active Power 2","unit":"W","value":"0"},"Wh2":{"name":'
    '"Energy 2","unit":"Wh","value":"4831905"},"rWh2":{"name":"Rev. Energy 2","unit":"Wh",'
    '"value":"0"},"PF2":{"name":"Power Factor 2","unit":"","value":"0.42"},"br1":{"name":"\n"},'
    '"V3":{"name":"Voltage 3","unit":"V","value":"218.59"},"A3":{"name":"Current 3","unit":"A",'
    '"value":"0.28"},"W3":{"name":"Active Power 3","unit":"W","value":"37"},"rW3":{"name":'
    '"Rev. Active Power 3","unit":"W","value":"0"},"Wh3":{"name":"Energy 3","unit":"Wh","value":'
    '"6710742"},"rWh3":{"name":"Rev. Energy 3","unit":"Wh","value":"0"},"PF3":{"name":'
    '"Power Factor 3","unit":"","value":"0.60"},"br2":{"name":"\n"},"T":{"name":"Temperature",'
    '"unit":"°C","value":"14"}}}'
)

TIMEOUT = 5.0  # generous ceiling for requests that should answer at once


def _normalize(body: str) -> str:
    """The body with every value blanked: what is left is the shape."""
    body = re.sub(r'"value":"[^"]*"', '"value":"?"', body)
    body = re.sub(r'"devid":"\d+","time":"\d+","pout":"[01]"', '"devid":"?","time":"?","pout":"?"', body)
    return body


@pytest.fixture
def make_sim() -> Iterator[Callable[..., Simulator]]:
    """Start simulators on free ports; all are stopped at teardown."""
    started: list[Simulator] = []

    def factory(meters: list[SimMeter], **kwargs: float) -> Simulator:
        sim = Simulator(meters, host="127.0.0.1", port=0, **kwargs).start()
        started.append(sim)
        return sim

    yield factory
    for sim in started:
        sim.stop()


def get(
    sim: Simulator, m: SimMeter, *, pin: str | None = None, timeout: float = TIMEOUT, **extra: str
) -> requests.Response:
    params = {"page": "getdata", "devid": m.devid, "devpass": m.pin if pin is None else pin}
    params.update(extra)
    return requests.get(sim.url() + "/", params=params, timeout=timeout)


def first(sim: Simulator) -> SimMeter:
    return next(iter(sim.meters.values()))


def test_the_query_is_decoded_the_standard_way(make_sim: Callable[..., Simulator]) -> None:
    # requests encodes params as browsers do; parse_qs on the server side decodes them.
    pin = "a+b&c#d%e f"
    sim = make_sim([SimMeter(devid="17", pin=pin)], tolerance=60.0)
    m = first(sim)
    assert get(sim, m).status_code == 200
    raw = f"{sim.url()}/?page=getdata&devid=17&devpass={pin}"  # unencoded: not that PIN
    assert requests.get(raw, timeout=TIMEOUT).status_code == 403


# --- body shape -----------------------------------------------------------------------


def test_body_has_the_seed_shape_3phase_extended(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(1, phases=3, extended=True))
    m = first(sim)
    r = get(sim, m)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json; charset=utf-8"
    assert r.headers["Server"] == "smart-MAC"
    assert r.headers["Connection"] == "close"
    assert int(r.headers["Content-Length"]) == len(r.content)
    text = r.content.decode("utf-8")

    # Not strict JSON, exactly like the vendor's sample...
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    assert text.count("\n") == 3
    # ...byte-for-byte the same shape once the values are blanked...
    assert _normalize(text) == _normalize(SEED_BODY)
    # ...and readable the lenient way.
    doc = json.loads(text, strict=False)
    seed = json.loads(SEED_BODY, strict=False)
    assert list(doc) == ["devid", "time", "pout", "data"]
    assert list(doc["data"]) == list(seed["data"])
    for key, entry in seed["data"].items():
        assert set(doc["data"][key]) == set(entry)
        assert doc["data"][key]["name"] == entry["name"]
        assert doc["data"][key].get("unit") == entry.get("unit")
    assert doc["devid"] == m.devid
    assert abs(int(doc["time"]) - time.time()) < 5
    assert doc["pout"] == "0"


def test_1phase_standard_has_no_reverse_fields(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(1, phases=1, extended=False))
    r = get(sim, first(sim))
    assert r.status_code == 200
    doc = json.loads(r.text, strict=False)
    assert list(doc["data"]) == ["V1", "A1", "W1", "Wh1", "PF1", "br0", "T"]
    assert doc["data"]["br0"] == {"name": "\n"}


def test_values_are_plausible(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(20, phases=3, extended=True))
    for m in sim.meters.values():
        data = json.loads(get(sim, m).text, strict=False)["data"]
        for p in (1, 2, 3):
            v, a, pf = (float(data[f"{k}{p}"]["value"]) for k in ("V", "A", "PF"))
            assert 225 <= v <= 235 and 0 <= a <= 20 and 0.80 <= pf <= 0.99
            assert re.fullmatch(r"\d+\.\d\d", data[f"V{p}"]["value"])
            assert data[f"W{p}"]["value"] == str(round(v * a * pf))
            assert data[f"rW{p}"]["value"] == "0"
            assert re.fullmatch(r"\d+", data[f"Wh{p}"]["value"])
        assert 10 <= int(data["T"]["value"]) <= 40


def test_readings_are_reproducible(make_sim: Callable[..., Simulator]) -> None:
    a = make_sim(make_fleet(3, phases=3))
    b = make_sim(make_fleet(3, phases=3))
    for devid in a.meters:
        da = json.loads(get(a, a.meters[devid]).text, strict=False)["data"]
        db = json.loads(get(b, b.meters[devid]).text, strict=False)["data"]
        assert da == db


# --- PIN, rate limit, relay -------------------------------------------------------------


def test_wrong_pin_is_403_counted_and_switches_nothing(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(1))
    m = first(sim)
    r = get(sim, m, pin="999999", pout="1")
    assert r.status_code == 403
    assert "Access denied" in r.text and r.text.startswith("<html>")
    assert (m.bad_pin, m.ok, m.requests, m.pout, m.pout_requests) == (1, 0, 1, 0, [])
    # A refused request does not use up the meter's interval.
    assert get(sim, m).status_code == 200


def test_second_request_within_window_is_429_and_keeps_relay(
    make_sim: Callable[..., Simulator],
) -> None:
    sim = make_sim(make_fleet(2))
    m = first(sim)
    assert get(sim, m).status_code == 200
    r = get(sim, m, pout="1")
    assert r.status_code == 429
    assert r.text.strip()
    assert (m.rate_limited, m.ok, m.requests, m.pout, m.pout_requests) == (1, 1, 2, 0, [])
    assert sim.total_rate_limited() == 1
    assert len(m.request_times) == 2 and m.request_times[0] <= m.request_times[1]
    # The limit is per meter.
    other = list(sim.meters.values())[1]
    assert get(sim, other).status_code == 200


def test_tolerance_widens_the_window(make_sim: Callable[..., Simulator]) -> None:
    strict = make_sim(make_fleet(1, extended=True))
    loose = make_sim(make_fleet(1, extended=True), tolerance=6)
    for sim, second in ((strict, 429), (loose, 200)):
        m = first(sim)
        assert get(sim, m).status_code == 200
        assert get(sim, m).status_code == second


def test_pout_switches_and_is_reported_in_the_same_body(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(1, extended=True), tolerance=6)
    m = first(sim)
    r = get(sim, m, pout="1")
    assert r.status_code == 200
    assert json.loads(r.text, strict=False)["pout"] == "1"
    assert m.pout == 1
    assert [v for _, v in m.pout_requests] == [1]
    r = get(sim, m, pout="0")
    assert json.loads(r.text, strict=False)["pout"] == "0"
    assert [v for _, v in m.pout_requests] == [1, 0]
    # Without pout the relay stays where it is.
    assert json.loads(get(sim, m).text, strict=False)["pout"] == "0"
    assert len(m.pout_requests) == 2


def test_invalid_pout_is_400(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(1))
    m = first(sim)
    assert get(sim, m, pout="on").status_code == 400
    assert (m.pout, m.pout_requests, m.ok) == (0, [], 0)


def test_counters_never_decrease(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(3, phases=3, extended=True), tolerance=6)
    for m in sim.meters.values():
        last = [-1, -1, -1]
        for _ in range(6):
            r = get(sim, m)
            assert r.status_code == 200
            data = json.loads(r.text, strict=False)["data"]
            now = [int(data[f"Wh{p}"]["value"]) for p in (1, 2, 3)]
            assert all(n >= before for n, before in zip(now, last, strict=True))
            last = now
        assert m.ok == 6 and m.rate_limited == 0


def test_energy_integrates_power_over_time() -> None:
    m = SimMeter(devid="1", pin="123456", extended=True)
    m._advance(1000.0)
    wh0, w = m._wh[0], m._w[0]
    m._advance(1000.0 + 3600.0)  # one hour at w watts
    assert m._wh[0] == pytest.approx(wh0 + w)


# --- bad requests -----------------------------------------------------------------------


def test_unknown_devid_is_404(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(1))
    r = requests.get(sim.url() + "/?page=getdata&devid=42&devpass=123456", timeout=TIMEOUT)
    assert r.status_code == 404
    assert first(sim).requests == 0


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/other?page=getdata&devid=1728053249", 404),
        ("GET", "/?page=pout&devid=1728053249", 404),
        ("GET", "/?page=getdata", 400),
        ("POST", "/?page=getdata&devid=1728053249&devpass=012346", 400),
    ],
)
def test_other_requests_are_rejected(
    make_sim: Callable[..., Simulator], method: str, path: str, status: int
) -> None:
    sim = make_sim(make_fleet(1))
    r = requests.request(method, sim.url() + path, timeout=TIMEOUT)
    assert r.status_code == status
    assert r.headers["Server"] == "smart-MAC"
    assert r.headers["Connection"] == "close"
    assert first(sim).ok == 0


def test_raw_http10_exchange_and_close(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(1))
    m = first(sim)
    with socket.create_connection(("127.0.0.1", sim.port), timeout=TIMEOUT) as s:
        # Bare LF line ends, as typed into nc.
        s.sendall(f"GET /?page=getdata&devid={m.devid}&devpass={m.pin} HTTP/1.0\n\n".encode())
        data = b""
        while chunk := s.recv(65536):  # the server closes: recv ends with b""
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK\r\n")
    assert b"\r\nServer: smart-MAC\r\n" in head and b"\r\nConnection: close" in head
    assert json.loads(body.decode(), strict=False)["devid"] == m.devid


def test_oversized_head_is_rejected(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(1))
    r = requests.get(sim.url() + "/", headers={"X-Big": "x" * 9000}, timeout=TIMEOUT)
    assert r.status_code == 400


# --- faults ------------------------------------------------------------------------------


def test_set_fault_rejects_unknown_modes(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(1))
    with pytest.raises(ValueError):
        sim.set_fault(first(sim).devid, "on_fire")
    with pytest.raises(ValueError):
        SimMeter(devid="1", pin="123456", fault="on_fire")


def test_fault_refuse(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(1))
    m = first(sim)
    sim.set_fault(m.devid, "refuse")
    with pytest.raises(requests.ConnectionError):
        get(sim, m)
    assert m.requests == 1


def test_fault_hang(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(1))
    m = first(sim)
    sim.set_fault(m.devid, "hang")
    with pytest.raises((requests.Timeout, requests.ConnectionError)):
        get(sim, m, timeout=0.3)


def test_fault_drip(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(1))
    m = first(sim)
    sim.set_fault(m.devid, "drip")
    params = {"page": "getdata", "devid": m.devid, "devpass": m.pin}
    with requests.get(sim.url(), params=params, timeout=0.3, stream=True) as r:
        assert r.status_code == 200  # the head comes at once
        with pytest.raises((requests.Timeout, requests.ConnectionError)):
            r.content  # noqa: B018 - the body never does


def test_fault_drip_head(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(1))
    m = first(sim)
    sim.set_fault(m.devid, "drip_head")
    with socket.create_connection(("127.0.0.1", sim.port), timeout=5) as s:
        s.sendall(f"GET /?page=getdata&devid={m.devid}&devpass={m.pin} HTTP/1.0\r\n\r\n".encode())
        # Not even the status line comes at once: every read gets one byte.
        assert [s.recv(100) for _ in range(3)] == [b"H", b"T", b"T"]
    assert m.requests == 1


def test_fault_cut_head(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(1))
    m = first(sim)
    sim.set_fault(m.devid, "cut_head")
    with socket.create_connection(("127.0.0.1", sim.port), timeout=5) as s:
        s.sendall(f"GET /?page=getdata&devid={m.devid}&devpass={m.pin} HTTP/1.0\r\n\r\n".encode())
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.0 200 OK\r\n") and answer.endswith(b"\r\nConten")


@pytest.mark.parametrize(("fault", "status"), [("http500", 500), ("http429", 429)])
def test_fault_error_status(make_sim: Callable[..., Simulator], fault: str, status: int) -> None:
    sim = make_sim(make_fleet(1))
    m = first(sim)
    sim.set_fault(m.devid, fault)
    for _ in range(2):
        r = get(sim, m)
        assert r.status_code == status and r.text.strip()
    assert (m.rate_limited, m.ok) == (0, 0)  # fault 429s are not "too soon" 429s
    # Broken answers do not use up the meter's interval.
    sim.set_fault(m.devid, "ok")
    assert get(sim, m).status_code == 200


def test_fault_html(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(1))
    m = first(sim)
    sim.set_fault(m.devid, "html")
    r = get(sim, m)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/html")
    assert "<form" in r.text and "PIN" in r.text


def test_fault_truncated(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(1, phases=3, extended=True))
    m = first(sim)
    sim.set_fault(m.devid, "truncated")
    r = get(sim, m)
    assert r.status_code == 200
    assert int(r.headers["Content-Length"]) == len(r.content)
    assert 500 < len(r.content) < 800  # half of a ~1350-byte body
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.text, strict=False)


def test_fault_no_data(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(1))
    m = first(sim)
    sim.set_fault(m.devid, "no_data")
    doc = get(sim, m).json()
    assert set(doc) == {"devid", "time", "pout"} and doc["devid"] == m.devid


def test_fault_nonnumeric(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(1))
    m = first(sim)
    sim.set_fault(m.devid, "nonnumeric")
    data = json.loads(get(sim, m).text, strict=False)["data"]
    assert data["V1"]["value"] == "" and data["A1"]["value"] == "n/a"
    assert float(data["PF1"]["value"]) > 0
    assert m.ok == 1
    assert get(sim, m).status_code == 429  # a good answer: the rate limit applies


def test_fault_odd_numbers(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(1, phases=3))
    m = first(sim)
    sim.set_fault(m.devid, "odd_numbers")
    r = get(sim, m)
    assert re.search(rb'"W1":\{[^}]*"value":9{4000}\}', r.content)  # a raw JSON number
    assert b'"value":1e999}' in r.content
    data = json.loads(r.text, strict=False)["data"]
    assert (data["V1"]["value"], data["A1"]["value"]) == ("1e-400", "\u0661\u0662")
    assert 0 < data["PF3"]["value"] <= 1 and isinstance(data["PF3"]["value"], float)
    assert isinstance(data["V2"]["value"], str)  # the rest as usual
    assert get(sim, m).status_code == 429  # a good answer: the rate limit applies


def test_fault_odd_labels(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(1))
    m = first(sim)
    sim.set_fault(m.devid, "odd_labels")
    data = json.loads(get(sim, m).text, strict=False)["data"]
    assert data["V1"]["name"] == "Voltage\x07\n1 \ud800" + "x" * 100
    assert data["wh1"]["value"] == data["Wh1"]["value"] and list(data)[-1] == "T"
    assert get(sim, m).status_code == 429  # a good answer: the rate limit applies


def test_fault_clean_json(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(1, phases=3, extended=True))
    m = first(sim)
    sim.set_fault(m.devid, "clean_json")
    r = get(sim, m)
    assert b"\n" not in r.content
    doc = json.loads(r.text)  # strict
    assert doc["data"]["br2"] == {"name": "\n"}
    assert _normalize(r.text.replace("\\n", "\n")) == _normalize(SEED_BODY)


def test_faults_of_identity_and_keys(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(1, phases=3, extended=True), tolerance=6)
    m = first(sim)
    other = str(int(m.devid) + 1)
    sim.set_fault(m.devid, "wrong_devid")
    assert json.loads(get(sim, m).text, strict=False)["devid"] == other
    sim.set_fault(m.devid, "dup_devid")
    pairs = json.loads(get(sim, m).text, strict=False, object_pairs_hook=list)
    assert [v for k, v in pairs if k == "devid"] == [m.devid, other]
    sim.set_fault(m.devid, "churn")
    keys = [set(json.loads(get(sim, m).text, strict=False)["data"]) for _ in range(2)]
    assert len(keys[0] - keys[1]) == len(keys[1] - keys[0]) == 10  # 10 new names each read
    sim.set_fault(m.devid, "many_keys")
    assert len(json.loads(get(sim, m).text, strict=False)["data"]) > 257


def test_fault_drop_wh(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(1, phases=3, extended=True), tolerance=6)
    m = first(sim)
    before = json.loads(get(sim, m).text, strict=False)["data"]
    sim.set_fault(m.devid, "drop_wh")
    after = json.loads(get(sim, m).text, strict=False)["data"]
    for p in (1, 2, 3):
        assert re.fullmatch(r"\d+\.\d{3}", after[f"Wh{p}"]["value"])
        dropped = float(after[f"Wh{p}"]["value"])
        assert dropped == pytest.approx(int(before[f"Wh{p}"]["value"]) / 1000, abs=0.01)
    sim.set_fault(m.devid, "ok")
    back = json.loads(get(sim, m).text, strict=False)["data"]
    assert int(back["Wh1"]["value"]) >= int(before["Wh1"]["value"])


def test_fault_pout_error_switches_and_answers_500(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(1, extended=True))
    m = first(sim)
    sim.set_fault(m.devid, "pout_error")
    params = {"page": "getdata", "devid": m.devid, "devpass": m.pin, "pout": "1"}
    assert requests.get(sim.url(), params=params, timeout=TIMEOUT).status_code == 500
    assert m.pout == 1 and m.ok == 1
    params["pout"] = "0"  # and it counts as an accepted request for the rate limit
    assert requests.get(sim.url(), params=params, timeout=TIMEOUT).status_code == 429
    assert m.pout == 1


def test_fault_huge(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(1))
    m = first(sim)
    sim.set_fault(m.devid, "huge")
    params = {"page": "getdata", "devid": m.devid, "devpass": m.pin}
    got = 0
    with requests.get(sim.url(), params=params, timeout=TIMEOUT, stream=True) as r:
        assert r.status_code == 200 and "Content-Length" not in r.headers
        for chunk in r.iter_content(65536):
            got += len(chunk)
            if got > 1_500_000:
                break  # hang up early; the server must cope
    assert got > 1_000_000
    # Still serving others after the client hung up.
    sim.set_fault(m.devid, "ok")
    assert get(sim, m).status_code == 200


def test_every_fault_is_covered() -> None:
    covered = {
        "ok", "refuse", "hang", "drip", "drip_head", "cut_head", "http500", "http429", "html", "truncated",
        "no_data", "nonnumeric", "huge", "clean_json", "drop_wh", "pout_error", "odd_numbers",
        "odd_labels", "wrong_devid", "dup_devid", "churn", "many_keys",
    }  # fmt: skip
    assert set(FAULTS) == covered


# --- robustness and lifecycle -------------------------------------------------------------


def test_disconnects_log_nothing_above_debug(
    make_sim: Callable[..., Simulator], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sim = make_sim(make_fleet(2, phases=3))
    huge, plain = sim.meters.values()
    sim.set_fault(huge.devid, "huge")
    # Half a request, then gone.
    with socket.create_connection(("127.0.0.1", sim.port)) as s:
        s.sendall(b"GET /?page=getdata&devid=")
    # A full request, then gone before the answer is read (RST on close).
    for m in (huge, plain):
        s = socket.create_connection(("127.0.0.1", sim.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.sendall(f"GET /?page=getdata&devid={m.devid}&devpass={m.pin} HTTP/1.0\r\n\r\n".encode())
        s.close()
    wait_until(lambda: huge.requests == 1 and plain.requests == 1, TIMEOUT, "both requests counted")
    wait_until(lambda: not sim._tasks, TIMEOUT, "every handler finished")
    # And the server still answers.
    sim.set_fault(huge.devid, "ok")
    assert get(sim, huge).status_code == 200
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == []


def test_delay_postpones_the_answer(make_sim: Callable[..., Simulator]) -> None:
    sim = make_sim(make_fleet(1), delay=0.2)
    t0 = time.monotonic()
    assert get(sim, first(sim)).status_code == 200
    assert time.monotonic() - t0 >= 0.2


def test_stop_is_prompt_with_a_hanging_connection() -> None:
    sim = Simulator(make_fleet(1)).start()
    m = first(sim)
    sim.set_fault(m.devid, "hang")
    done = threading.Event()
    outcome: list[BaseException | int] = []

    def client() -> None:
        try:
            outcome.append(get(sim, m, timeout=30).status_code)
        except requests.RequestException as exc:
            outcome.append(exc)
        done.set()

    threading.Thread(target=client, daemon=True).start()
    wait_until(lambda: m.requests == 1, TIMEOUT, "the hanging request arrived")
    t0 = time.monotonic()
    sim.stop()
    assert time.monotonic() - t0 < 2.0
    assert done.wait(timeout=5.0)  # the hanging client was cut off, not left waiting 30 s
    assert isinstance(outcome[0], requests.ConnectionError)
    sim.stop()  # idempotent


def test_context_manager_port_and_restart() -> None:
    with Simulator(make_fleet(1)) as sim:
        port = sim.port
        assert port > 0
        assert sim.url() == f"http://127.0.0.1:{port}"
        assert get(sim, first(sim)).status_code == 200
    with pytest.raises(requests.ConnectionError):
        get(sim, first(sim))
    # A restart comes back on the same port, with the meter's state kept.
    with sim:
        assert sim.port == port
        assert get(sim, first(sim)).status_code == 429


def test_start_fails_loudly_when_the_port_is_taken() -> None:
    with Simulator(make_fleet(1)) as sim, pytest.raises(OSError):
        Simulator(make_fleet(1), port=sim.port).start()


def test_make_fleet() -> None:
    fleet = make_fleet(2000, phases=3, extended=True, first_id=100)
    assert [m.devid for m in fleet[:3]] == ["100", "101", "102"]
    pins = [m.pin for m in fleet]
    assert len(set(pins)) == len(pins)
    assert all(len(p) == 6 and p.isdigit() and p != "000000" for p in pins)
    assert pins == [m.pin for m in make_fleet(2000)]  # deterministic, id-independent
    assert all(m.phases == 3 and m.extended for m in fleet)
    with pytest.raises(ValueError):
        Simulator(make_fleet(1) + make_fleet(1))  # duplicate devid


def test_run_cli_prints_the_fleet_and_stops_on_sigterm() -> None:
    root = Path(__file__).resolve().parents[1]
    code = "from bridge.simulator import run_cli; raise SystemExit(run_cli(0, 3, 3, True))"
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=root, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        while not (lines and lines[-1].startswith("Serving")):
            line = proc.stdout.readline()
            assert line, "simulator exited before serving"
            lines.append(line.rstrip("\n"))
        assert lines[0].split() == ["devid", "PIN", "phases", "model"]
        assert lines[1].split() == ["1728053249", "012346", "3", "D103", "extended"]
        url = lines[-1].split()[-1]
        r = requests.get(
            url + "/?page=getdata&devid=1728053251&devpass=" + lines[3].split()[1], timeout=TIMEOUT
        )
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- fleet instruments: per-meter delay, the stats page ---------------------------------


def test_per_meter_delay_overrides_the_simulator_delay(make_sim: Callable[..., Simulator]) -> None:
    slow, fast = make_fleet(2)
    fast.delay = 0.0
    sim = make_sim([slow, fast], delay=0.3)
    t0 = time.monotonic()
    assert get(sim, fast).status_code == 200
    assert time.monotonic() - t0 < 0.3
    t0 = time.monotonic()
    assert get(sim, slow).status_code == 200
    assert time.monotonic() - t0 >= 0.3
    with pytest.raises(ValueError, match="delay"):
        SimMeter(devid="1", pin="123456", delay=-1.0)


def test_stats_page_counts_every_meter(make_sim: Callable[..., Simulator]) -> None:
    a, b = make_fleet(2, extended=True)
    sim = make_sim([a, b], delay=0.3)  # the page itself is never delayed
    assert get(sim, a, pout="1").status_code == 200
    assert get(sim, a).status_code == 429  # too soon: counted as rate_limited and early
    assert get(sim, b, pin="000001").status_code == 403
    t0 = time.monotonic()
    r = requests.get(sim.url() + "/stats", timeout=TIMEOUT)
    assert time.monotonic() - t0 < 0.3
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    stats = r.json()
    assert stats == sim.stats()
    assert {k: stats[k] for k in ("meters", "requests", "ok", "rate_limited", "bad_pin", "early")} == {
        "meters": 2, "requests": 3, "ok": 1, "rate_limited": 1, "bad_pin": 1, "early": 1,
    }  # fmt: skip
    assert stats["pout_requests"] == 1
    assert stats["per_meter"][a.devid] == {
        "requests": 2, "ok": 1, "rate_limited": 1, "bad_pin": 0, "early": 1, "pout_requests": 1, "pout": 1,
    }  # fmt: skip
    assert a.pin not in r.text and b.pin not in r.text


def test_early_counts_faulted_requests_too(make_sim: Callable[..., Simulator]) -> None:
    # A refused request is never checked against the rate limit (no 429), but it still
    # arrived at the meter: `early` sees it.
    m = make_fleet(1, extended=True)[0]
    sim = make_sim([m])
    sim.set_fault(m.devid, "http500")
    assert get(sim, m).status_code == 500
    assert get(sim, m).status_code == 500
    assert (m.rate_limited, m.early) == (0, 1)
