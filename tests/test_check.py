"""`smartmac-bridge check`: one request to every configured meter, a table of the outcomes.

The command runs as a user runs it (a real process) against the simulator over real HTTP on
loopback; the words of the table are tested without I/O (check.py is pure)."""

from __future__ import annotations

import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from support import Process, write_config

from bench.support import LOOPBACK, free_port
from bridge.check import Answer, model, note, report, result_text, warning
from bridge.errors import (
    BodyError,
    MeterAuthError,
    MeterError,
    MeterHTTPError,
    MeterRateLimited,
    MeterTimeout,
    MeterUnreachable,
)
from bridge.readings import Reading, Snapshot
from bridge.simulator import SimMeter, Simulator, make_fleet

# '+' reads as a space in a query, '&' and '#' end the value, '%' starts an escape.
ODD_PIN = "a+b&c#d%e f"
PIN = "470193"


def check(tmp_path: Path, config: str, *, timeout: float = 30) -> tuple[int, str, str]:
    process = Process(tmp_path, "check", "--config", str(write_config(tmp_path, config)))
    try:
        code = process.proc.wait(timeout)
    finally:
        process.kill()
    return code, process.stdout, process.stderr


def rows(stdout: str) -> dict[str, tuple[str, str, str, float]]:
    """topic -> (id, host, result, seconds), from the table's rows."""
    lines = stdout.splitlines()
    assert lines[0].split() == ["topic", "id", "host", "result", "time"]
    table: dict[str, tuple[str, str, str, float]] = {}
    for line in lines[1:]:
        if (" of " in line and line.endswith("answered")) or ": configured " in line:
            continue  # the summary and the notes
        topic, devid, host, rest = line.split(None, 3)
        result, seconds, unit = rest.rsplit(None, 2)
        assert unit == "s"
        table[topic] = (devid, host, result, float(seconds))
    return table


def entry(sim: Simulator, meter: SimMeter, topic: str, **options: object) -> str:
    pin = options.pop("pin", meter.pin)
    extra = "".join(f", {key}: {value}" for key, value in options.items())
    return (
        f'  - {{id: "{meter.devid}", pin: "{pin}", host: "{LOOPBACK}:{sim.port}", topic: {topic}{extra}}}\n'
    )


def test_all_ok_with_the_model_the_keys_tell(tmp_path: Path, simulator: Callable[..., Simulator]) -> None:
    three = SimMeter(devid="1728053249", pin=ODD_PIN, phases=3, extended=True)
    one = SimMeter(devid="1728053250", pin=PIN, phases=1)
    one_ext = SimMeter(devid="1728053251", pin=PIN, phases=1, extended=True)
    misconfigured = SimMeter(devid="1728053252", pin=PIN, phases=1)  # standard, configured extended
    sim = simulator([three, one, one_ext, misconfigured])
    config = "devices:\n" + "".join(
        (
            entry(sim, three, "garage", extended="true"),
            entry(sim, one, "kitchen"),
            entry(sim, one_ext, "shed", extended="true"),
            entry(sim, misconfigured, "attic", extended="true"),
        )
    )
    code, out, err = check(tmp_path, config)
    assert code == 0, out + err
    table = rows(out)
    assert table["garage"][:3] == (three.devid, f"{LOOPBACK}:{sim.port}", "ok: 3-phase extended, 22 readings")
    assert table["kitchen"][2] == "ok: 1-phase standard, 6 readings"
    assert table["shed"][2] == "ok: 1-phase extended, 8 readings"
    assert table["attic"][2] == "ok: 1-phase standard, 6 readings"
    assert "attic: configured extended, but the keys tell a standard meter" in out
    assert "garage: configured" not in out and "shed: configured" not in out
    assert out.splitlines()[-1] == "4 of 4 meters answered"
    # The warning, before anything was asked, and one request per meter.
    assert "will see one 429" in err and "one request per 60 s" in err
    assert all(m.requests == 1 and m.ok == 1 for m in (three, one, one_ext, misconfigured))
    encoded = urllib.parse.quote(ODD_PIN, safe="")
    for secret in (ODD_PIN, encoded, PIN):
        assert secret not in out + err
    assert "Traceback" not in err


def test_every_failure_in_words(tmp_path: Path, simulator: Callable[..., Simulator]) -> None:
    good = SimMeter(devid="11", pin=PIN)
    wrong_pin = SimMeter(devid="12", pin=ODD_PIN)
    silent = SimMeter(devid="13", pin=PIN, fault="hang")
    html = SimMeter(devid="14", pin=PIN, fault="html")
    limited = SimMeter(devid="15", pin=PIN)
    other = SimMeter(devid="16", pin=PIN, fault="wrong_devid")
    broken = SimMeter(devid="17", pin=PIN, fault="http500")
    sim = simulator([good, wrong_pin, silent, html, limited, other, broken])
    # A bridge (here: this test) asked `limited` a moment ago: a standard meter allows
    # one request per 60 s, so check's request is answered 429.
    query = urllib.parse.urlencode({"page": "getdata", "devid": limited.devid, "devpass": PIN})
    with urllib.request.urlopen(f"{sim.url()}/?{query}", timeout=5) as answer:
        assert answer.status == 200
    closed = free_port()
    config = (
        "devices:\n"
        + entry(sim, good, "good")
        + entry(sim, wrong_pin, "wrongpin", pin="a+b&c#d%e g")  # one character off
        + entry(sim, silent, "silent", timeout=0.5)
        + entry(sim, html, "html")
        + entry(sim, limited, "limited")
        + entry(sim, other, "other")
        + entry(sim, broken, "broken")
        + f'  - {{id: "18", pin: "{PIN}", host: "{LOOPBACK}:{closed}", topic: closed}}\n'
    )
    code, out, err = check(tmp_path, config)
    assert code == 1, out + err
    table = rows(out)
    assert table["good"][2] == "ok: 1-phase standard, 6 readings"
    assert table["wrongpin"][2] == "wrong PIN" and wrong_pin.bad_pin == 1
    assert table["silent"][2] == "timeout: no answer within 0.5 s"
    assert table["silent"][3] >= 0.5  # the deadline's own lower bound: not a timing race
    assert table["html"][2] == "not a meter: answer is HTML, not JSON (a login or error page?)"
    assert table["limited"][2] == "rate-limited" and limited.rate_limited == 1
    assert table["other"][2] == "wrong meter: answered as devid 17"
    assert table["broken"][2] == "HTTP 500"
    assert table["closed"][:3] == ("18", f"{LOOPBACK}:{closed}", "refused: Connection refused")
    assert out.splitlines()[-1] == "1 of 8 meters answered"
    for secret in (ODD_PIN, "a+b&c#d%e g", urllib.parse.quote("a+b&c#d%e g", safe=""), PIN):
        assert secret not in out + err
    assert "Traceback" not in err


def test_a_host_name_is_looked_up(tmp_path: Path, simulator: Callable[..., Simulator]) -> None:
    meter = SimMeter(devid="21", pin=PIN)
    sim = simulator([meter])
    config = f'devices: [{{id: "21", pin: "{PIN}", host: "localhost:{sim.port}", topic: named}}]\n'
    code, out, err = check(tmp_path, config)
    assert code == 0, out + err
    assert rows(out)["named"][1:3] == (f"localhost:{sim.port}", "ok: 1-phase standard, 6 readings")


def test_the_requests_go_at_once(tmp_path: Path, simulator: Callable[..., Simulator]) -> None:
    """Each meter waits 2 s before it answers: if every request arrived within 2 s of the
    first, none waited for another's answer (one after another, they would be 2 s apart)."""
    meters = [SimMeter(devid=str(31 + i), pin=PIN, delay=2.0) for i in range(5)]
    sim = simulator(meters)
    config = "devices:\n" + "".join(entry(sim, m, f"m{m.devid}") for m in meters)
    code, out, err = check(tmp_path, config)
    assert code == 0, out + err
    arrivals = [m.request_times[0] for m in meters]
    assert all(len(m.request_times) == 1 for m in meters)
    assert max(arrivals) - min(arrivals) < 2.0
    assert all(seconds >= 2.0 for *_, seconds in rows(out).values())


def test_three_hundred_meters(tmp_path: Path, simulator: Callable[..., Simulator]) -> None:
    fleet = make_fleet(300, phases=3, extended=True)
    sim = simulator(fleet)
    config = "devices:\n" + "".join(entry(sim, m, f"m{m.devid}", extended="true") for m in fleet)
    code, out, err = check(tmp_path, config, timeout=60)
    assert code == 0, out[-2000:] + err
    table = rows(out)
    assert len(table) == 300
    assert {result for _, _, result, _ in table.values()} == {"ok: 3-phase extended, 22 readings"}
    assert out.splitlines()[-1] == "300 of 300 meters answered"
    assert sum(m.requests for m in fleet) == 300


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("devices: [{id: '1', pin: 12345, host: h}]", "devices.0.pin"),
        ("devices: [{id: '1', pin: 'x', host: 'ftp://h'}]", "devices.0.host"),
        ("mqtt: {port: 1883}\n", "devices: no meters configured"),
    ],
)
def test_an_invalid_config_exits_2_naming_the_key(tmp_path: Path, config: str, message: str) -> None:
    code, out, err = check(tmp_path, config)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert "429" not in err and not out  # nothing asked


def test_the_config_comes_from_the_environment_as_for_run(
    tmp_path: Path, simulator: Callable[..., Simulator]
) -> None:
    meter = SimMeter(devid="41", pin=PIN)
    sim = simulator([meter])
    path = write_config(tmp_path, "devices:\n" + entry(sim, meter, "env"))
    process = Process(tmp_path, "check", env={"SMARTMAC_CONFIG": str(path)})
    assert process.proc.wait(30) == 0, process.stderr
    assert rows(process.stdout)["env"][2] == "ok: 1-phase standard, 6 readings"


# -- the words, without I/O ---------------------------------------------------------------------


def snapshot(devid: str, *keys: str, rejected: tuple[str, ...] = ()) -> Snapshot:
    return Snapshot(devid, 1700000000, 0, tuple(Reading(k, k, "", "1", 1) for k in keys), rejected)


def answer(
    *,
    snapshot: Snapshot | None = None,
    error: MeterError | None = None,
    detail: str = "",
    lookup: bool = False,
    topic: str = "garage",
    devid: str = "17",
    host: str = "10.0.0.7",
    extended: bool = False,
    seconds: float = 0.0123,
) -> Answer:
    return Answer(topic, devid, host, extended, seconds, snapshot, error, detail, lookup)


@pytest.mark.parametrize(
    ("keys", "told"),
    [
        (("V1", "A1", "W1", "Wh1", "PF1", "T"), ("1-phase", False)),
        (("V", "A", "W", "Wh", "rW", "rWh"), ("1-phase", True)),  # firmware without suffixes
        (("V1", "V2", "V3", "W1", "W2", "W3", "TWh"), ("3-phase", False)),
        (("W1", "W2", "W3", "rW1", "rW2", "rW3", "rTWh"), ("3-phase", True)),
        (("Ch1", "Ch2", "TCh1", "ADC", "T1"), None),  # D105, pulse/sensor: no phases
        ((), None),
    ],
)
def test_model_from_the_keys(keys: tuple[str, ...], told: tuple[str, bool] | None) -> None:
    assert model(keys) == told


@pytest.mark.parametrize(
    ("error", "detail", "lookup", "words"),
    [
        (
            MeterAuthError("m: HTTP 403, devid/PIN refused", status=403),
            "HTTP 403, devid/PIN refused",
            False,
            "wrong PIN",
        ),
        (
            MeterUnreachable("m: Connection refused"),
            "Connection refused",
            False,
            "refused: Connection refused",
        ),
        (
            MeterTimeout("m: no answer within 2 s"),
            "no answer within 2 s",
            False,
            "timeout: no answer within 2 s",
        ),
        (BodyError("answer is empty"), "answer is empty", False, "not a meter: answer is empty"),
        (MeterRateLimited("m: HTTP 429, asked too often", status=429), "HTTP 429", False, "rate-limited"),
        (MeterHTTPError("m: HTTP 500", status=500), "HTTP 500", False, "HTTP 500"),
        (MeterError("m: internal error"), "internal error", False, "refused: internal error"),
        (
            MeterUnreachable("m: cannot resolve host (Name or service not known)"),
            "cannot resolve host (Name or service not known)",
            True,
            "unreachable: cannot resolve host (Name or service not known)",
        ),
        (
            MeterTimeout("m: cannot resolve host within 5 s"),
            "cannot resolve host within 5 s",
            True,
            "unreachable: cannot resolve host within 5 s",
        ),
    ],
)
def test_errors_in_words(error: MeterError, detail: str, lookup: bool, words: str) -> None:
    failed = answer(error=error, detail=detail, lookup=lookup)
    assert result_text(failed) == words
    assert not failed.ok and note(failed) is None


def test_ok_rows_and_their_counts() -> None:
    good = answer(snapshot=snapshot("17", "V1", "W1", rejected=("A1",)))
    assert result_text(good) == "ok: 1-phase standard, 2 readings" and good.ok
    assert result_text(answer(snapshot=snapshot("17", "T"))) == "ok: unknown model, 1 reading"
    other = answer(snapshot=snapshot("18", "V1"))
    assert result_text(other) == "wrong meter: answered as devid 18" and not other.ok


def test_a_note_when_extended_disagrees_with_the_keys() -> None:
    standard = snapshot("17", "V1", "W1")
    extended = snapshot("17", "V1", "W1", "rW1")
    assert note(answer(snapshot=standard)) is None
    assert note(answer(snapshot=extended, extended=True)) is None
    assert "configured extended, but the keys tell a standard meter" in str(
        note(answer(snapshot=standard, extended=True))
    )
    assert "configured standard, but the keys tell an extended meter" in str(note(answer(snapshot=extended)))
    assert note(answer(snapshot=snapshot("17", "Ch1"), extended=True)) is None  # the keys tell no model


def test_report_aligns_the_columns_and_sums_up() -> None:
    answers = [
        answer(snapshot=snapshot("17", "V1", "W1"), seconds=0.0123),
        answer(
            topic="a-much-longer-topic",
            devid="1728053249",
            host="192.168.100.200:8080",
            error=MeterAuthError("m: HTTP 403", status=403),
            seconds=1.5,
        ),
    ]
    lines = report(answers)
    assert lines[0].split() == ["topic", "id", "host", "result", "time"]
    assert lines[1].split()[-2:] == ["0.012", "s"] and lines[2].endswith("1.500 s")
    for column in ("id", "host", "result", "time"):
        start = lines[0].index(column)
        assert lines[1][start - 2 : start] == "  " and lines[1][start] != " "
        assert lines[2][start - 2 : start] == "  " and lines[2][start] != " "
    assert lines[-1] == "1 of 2 meters answered"
    assert report([answers[0]])[-1] == "1 of 1 meter answered"


def test_the_warning_names_the_cost() -> None:
    text = warning(300)
    assert "300 meters" in text and "one 429" in text and "60 s" in text
    assert "1 meter once" in warning(1)
