"""readings.parse_body: the seed's exact body, clean JSON, and everything broken."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest

from bridge.errors import BodyError
from bridge.readings import parse_body

SEED = (Path(__file__).parent / "fixtures" / "seed_3phase_extended.body").read_bytes()


def test_seed_body_is_not_strict_json() -> None:
    # The fixture must keep the vendor's raw newlines, or the lenient path is untested.
    with pytest.raises(json.JSONDecodeError):
        json.loads(SEED)


def test_seed_body_parses() -> None:
    snap = parse_body(SEED)
    assert (snap.devid, snap.time, snap.pout) == ("1728053249", 1530607456, 0)
    keys = [r.key for r in snap.readings]
    assert keys[:7] == ["V1", "A1", "W1", "rW1", "Wh1", "rWh1", "PF1"]
    assert len(keys) == 22 and keys[-1] == "T"
    assert not any(k.startswith("br") for k in keys)
    assert snap.rejected == ()
    by_key = {r.key: r for r in snap.readings}
    assert by_key["V1"].text == "220.89" and by_key["V1"].value == pytest.approx(220.89)
    assert by_key["W1"].value == 586 and isinstance(by_key["W1"].value, int)
    assert by_key["Wh1"].value == 33549075
    assert by_key["PF3"].text == "0.60"  # as sent, not "0.6"
    assert (by_key["T"].name, by_key["T"].unit) == ("Temperature", "°C")
    assert (by_key["PF1"].unit, by_key["V2"].name) == ("", "Voltage 2")


def test_clean_json_parses_the_same() -> None:
    clean = json.dumps(json.loads(SEED, strict=False)).encode()
    assert parse_body(clean) == parse_body(SEED)


def test_numeric_envelope_from_clean_json_firmware() -> None:
    snap = parse_body(b'{"devid": 17, "time": 100, "pout": 1, "data": {}}')
    assert (snap.devid, snap.time, snap.pout) == ("17", 100, 1)


def test_str_and_bytes_agree() -> None:
    assert parse_body(SEED.decode()) == parse_body(SEED)


def _body(data: dict[str, object], **top: object) -> bytes:
    doc: dict[str, object] = {"devid": "17", "time": "100", "pout": "1", "data": data}
    doc.update(top)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("raw", "text", "value"),
    [
        ("220.89", "220.89", 220.89),
        (" 14 ", "14", 14),
        ("-3", "-3", -3),
        ("0.60", "0.60", 0.6),
        ("1e3", "1e3", 1000.0),
        (".5", ".5", 0.5),
        (7, "7", 7),
        (2.5, "2.5", 2.5),
    ],
)
def test_numbers(raw: object, text: str, value: float) -> None:
    (reading,) = parse_body(_body({"X": {"name": "x", "unit": "u", "value": raw}})).readings
    assert (reading.text, reading.value) == (text, value)


@pytest.mark.parametrize(
    "raw",
    ["", "n/a", "nan", "inf", "-Infinity", "1e999", "0x10", "1_000", "12,5", None, True, [], {}, "9" * 41],
)
def test_non_numbers_are_rejected_not_zeroed(raw: object) -> None:
    snap = parse_body(_body({"A1": {"value": raw}, "V1": {"value": "230"}}))
    assert [r.key for r in snap.readings] == ["V1"]
    assert snap.rejected == ("A1",)


def _raw_value(value: str) -> bytes:
    """A body whose A1 value is `value` as raw JSON text (json.dumps cannot write 4,000 digits)."""
    return (
        b'{"devid": "17", "time": "100", "pout": "1", "data": {"A1": {"value": %s}, "V1": {"value": "230"}}}'
        % (value.encode())
    )


# One rule for strings and JSON numbers (issue 12, item 6): ASCII only, at most 40 characters,
# and no float that is infinite or zero from a non-zero text; B/D/KEY and B/D/state agree.
@pytest.mark.parametrize(
    "raw",
    [
        "\u0661\u0662",
        "\uff11\uff12",
        "\u0662.5",
        "1e-400",
        "-1e-400",
        "0.1e-330",
        "1E999",
        "9" * 41,
        "1." + "0" * 39,
    ],
)
def test_number_rule_for_strings(raw: str) -> None:
    snap = parse_body(_body({"A1": {"value": json.loads(f'"{raw}"')}, "V1": {"value": "230"}}))
    assert [r.key for r in snap.readings] == ["V1"] and snap.rejected == ("A1",)


@pytest.mark.parametrize(
    "raw",
    [
        "9" * 4000,
        "9" * 41,
        "-" + "9" * 40,
        "1e-400",
        "-1e-400",
        "1e999",
        "-1e999",
        "NaN",
        "Infinity",
        "-Infinity",
    ],
)
def test_number_rule_for_json_numbers(raw: str) -> None:
    snap = parse_body(_raw_value(raw))
    assert [r.key for r in snap.readings] == ["V1"] and snap.rejected == ("A1",)


@pytest.mark.parametrize(
    ("raw", "text", "value"),
    [
        ("9" * 40, "9" * 40, int("9" * 40)),
        ("1E5", "1E5", 100000.0),  # as sent, not Python's "100000.0"
        ("1.0", "1.0", 1.0),
        ("-0", "-0", 0),
        ("0e-400", "0e-400", 0.0),  # a true zero is a number
        ("1e-300", "1e-300", 1e-300),
    ],
)
def test_json_numbers_keep_their_text(raw: str, text: str, value: float) -> None:
    (reading,) = [r for r in parse_body(_raw_value(raw)).readings if r.key == "A1"]
    assert (reading.text, reading.value) == (text, value)
    assert type(reading.text) is str  # not the decoder's str subclass


@pytest.mark.parametrize("raw", ["9" * 41, "1.5", "1e2", "NaN"])
def test_json_number_envelope_follows_the_rule(raw: str) -> None:
    with pytest.raises(BodyError, match="time"):
        parse_body(b'{"devid": 17, "time": %s, "pout": 1, "data": {}}' % raw.encode())


def test_unknown_keys_pass_through() -> None:
    snap = parse_body(
        _body({"Ch1": {"name": "Pulses", "unit": "imp", "value": "12"}, "Fr": {"value": "50.01"}})
    )
    assert [(r.key, r.name, r.unit) for r in snap.readings] == [("Ch1", "Pulses", "imp"), ("Fr", "Fr", "")]


def test_separator_with_value_is_a_reading() -> None:
    # Only value-less br* entries are separators; a firmware that puts a number there is heard.
    snap = parse_body(_body({"br0": {"name": "\n"}, "br1": {"value": "5"}}))
    assert [r.key for r in snap.readings] == ["br1"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty"),
        (b"<html><body>PIN</body></html>", "HTML"),
        (SEED[: len(SEED) // 2], "not valid JSON"),
        (b"[1, 2]", "not an object"),
        (json.dumps({"devid": "17", "time": "1", "pout": "0"}).encode(), "'data'"),
        (_body({}, devid="abc"), "devid"),
        (_body({}, devid=None), "devid"),
        (_body({}, time="soon"), "time"),
        (_body({}, pout="2"), "pout"),
        (_body({}, pout=None), "pout"),
        (json.dumps({"devid": "17", "time": "1", "pout": "0", "data": [1]}).encode(), "'data'"),
        (b"\xff\xfe{", "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),
    ],
)
def test_broken_bodies(body: bytes, reason: str) -> None:
    # Finalizers of earlier tests' objects (a socket's ResourceWarning, say) must not run
    # at the depth the nested body drives the parser to: reporting them would overflow.
    gc.collect()
    with pytest.raises(BodyError, match=reason):
        parse_body(body)


@pytest.mark.parametrize(
    "body",
    [
        b'{"devid": "17", "time": "1", "pout": "0", "data": {}, "devid": "18"}',
        b'{"devid": "18", "devid": "17", "time": "1", "pout": "0", "data": {}}',
        # The second one spelt with an escape: still the key "devid" once decoded.
        b'{"devid": "17", "time": "1", "pout": "0", "data": {}, "dev\\u0069d": 18}',
    ],
)
def test_two_devids_are_a_bad_body(body: bytes) -> None:
    # JSON's last duplicate wins: without this the last devid would pass for the meter's.
    with pytest.raises(BodyError, match="more than one devid: 17, 18"):
        parse_body(body)


def test_devid_text_elsewhere_is_no_duplicate() -> None:
    # A repeated devid that agrees, and "devid" as a data key or label, are fine.
    snap = parse_body(
        b'{"devid": "17", "time": "1", "pout": "0", "devid": 17,'
        b' "data": {"devid": {"name": "devid", "value": "5"}, "T": {"unit": "\\u00b0C", "value": "2"}}}'
    )
    assert snap.devid == "17"
    assert [(r.key, r.unit) for r in snap.readings] == [("devid", ""), ("T", "°C")]


def test_at_most_256_data_keys_separators_not_counted() -> None:
    data: dict[str, object] = {f"K{i}": {"value": str(i)} for i in range(256)}
    data.update({f"br{i}": {"name": "\n"} for i in range(50)})
    assert len(parse_body(_body(data)).readings) == 256
    data["K256"] = {"value": "n/a"}  # a key without a number counts too
    with pytest.raises(BodyError, match="more than 256 data keys"):
        parse_body(_body(data))
