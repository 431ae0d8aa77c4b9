"""PURE: a meter's answer body -> a frozen, typed Snapshot.

This is the only place that touches the meter's raw JSON. It is lenient where the device is
known to be odd (raw newlines inside strings, unknown keys, values as strings) and strict
about the envelope (devid, time, pout, data), so a login page or a truncated answer is an
error instead of a half-read state. It raises nothing but BodyError.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

from .errors import BodyError

# A decimal number as a meter prints it: "220.89", "586", "-3", "0.60", "1e3".
# Deliberately excludes "nan", "inf", "", "0x10" and "1_000", which float()/int() accept,
# and non-ASCII digits (Arabic-Indic "\u0661\u0662", fullwidth "\uff11\uff12"), which int()
# accepts but Node-RED's Number() reads as NaN.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_SEPARATOR = re.compile(r"br\d*")
# No meter value is this long; the cap also keeps int() clear of Python's 4300-digit limit.
_MAX_DIGITS = 40
_NONZERO = frozenset("123456789")


class _JsonNumber(str):
    """A JSON number (not a string) in the body, kept as the text the meter sent.

    json.loads would turn a 4,000-digit number into a huge int, 1e-400 into 0.0 and 1e999
    into inf, and the text published under B/D/KEY would no longer be what was sent. With
    this as the decoder's number hook, both forms of a value meet the one rule in _number.
    A str subclass, so `type(raw) is str` keeps the fast path for the usual string values."""

    __slots__ = ()


# One decoder for every body: json.loads(..., strict=False) would build a new one per call.
# strict=False admits the raw newline the vendor puts inside the br* names.
_DECODER = json.JSONDecoder(
    strict=False, parse_int=_JsonNumber, parse_float=_JsonNumber, parse_constant=_JsonNumber
)
#: Most data keys (br* separators not counted) in a good answer. A real meter sends a few
#: dozen; the cap bounds every per-key structure downstream (see keyset.py).
MAX_KEYS = 256


class Reading(NamedTuple):
    """One value from the body's `data` object.

    A NamedTuple rather than a frozen dataclass: as immutable and as typed, and about three
    times cheaper to build, which counts at two dozen readings per poll times hundreds of
    polls a second."""

    key: str
    """The meter's key, e.g. `V1`, `Wh3`, `T`, or anything a firmware adds."""
    name: str
    """The meter's own label, e.g. `Voltage 1`."""
    unit: str
    text: str
    """The value exactly as sent, trimmed: `0.60` stays `0.60`."""
    value: int | float
    """The value as a number: int when the text has no fraction or exponent."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one good answer said."""

    devid: str
    time: int
    """The meter's own clock, Unix seconds."""
    pout: int
    """The relay output as reported (0/1), before any inversion."""
    readings: tuple[Reading, ...]
    rejected: tuple[str, ...] = ()
    """Keys whose value was not a number: left out, never published as 0."""


def parse_body(body: bytes | str) -> Snapshot:
    """Parse one answer. Raises BodyError when it is not a meter body."""
    # Values and keys are ASCII; a firmware with odd bytes in a label must not cost
    # us the readings, so undecodable bytes become U+FFFD instead of an error.
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    try:
        doc = _DECODER.decode(text)
    except (ValueError, RecursionError):
        raise BodyError(_not_json(text)) from None
    if not isinstance(doc, dict):
        raise BodyError("answer is JSON but not an object")
    data = doc.get("data")
    if not isinstance(data, dict):
        raise BodyError("answer has no 'data' object")
    devid = _devid(doc.get("devid"))
    # JSON's last duplicate wins: a body naming two devids must not pass as the last one.
    # Only a body that could hold a second top-level "devid" (the literal twice, or a key
    # spelt with a \u escape) pays for the second, exact parse.
    if text.count('"devid"') > 1 or "\\u" in text:
        named = {_devid(value) for value in _top_level_values(text, "devid")}
        if len(named) > 1:
            raise BodyError("answer names more than one devid: " + ", ".join(sorted(named)))
    time = _integer(doc.get("time"), "time")
    pout = _integer(doc.get("pout"), "pout")
    if pout not in (0, 1):
        raise BodyError("answer has a 'pout' other than 0 or 1")

    if len(data) > MAX_KEYS and _data_keys(data) > MAX_KEYS:
        raise BodyError(f"answer has more than {MAX_KEYS} data keys")

    readings: list[Reading] = []
    rejected: list[str] = []
    for key, entry in data.items():
        if type(entry) is not dict:
            rejected.append(key)
            continue
        raw = entry.get("value")
        if type(raw) is str:
            # The common case, inline: every meter value is a string.
            text = raw.strip()
            if text.isdigit() and text.isascii() and len(text) <= _MAX_DIGITS:
                value: int | float = int(text)
            else:
                number = _number(text)
                if number is None:
                    rejected.append(key)
                    continue
                value = number[1]
        elif raw is None and _SEPARATOR.fullmatch(key):
            continue  # br0, br1, ...: layout separators, not readings
        else:
            number = _number(raw)
            if number is None:
                rejected.append(key)
                continue
            text, value = number
        name = entry.get("name")
        unit = entry.get("unit")
        readings.append(
            Reading(
                key,
                (name.strip() if type(name) is str else "") or key,
                unit.strip() if type(unit) is str else "",
                text,
                value,
            )
        )
    return Snapshot(devid, time, pout, tuple(readings), tuple(rejected))


def _data_keys(data: dict[str, Any]) -> int:
    """The keys of `data` less the value-less br* separators (as the loop below skips them)."""
    return sum(
        1
        for key, entry in data.items()
        if not (type(entry) is dict and entry.get("value") is None and _SEPARATOR.fullmatch(key))
    )


def _devid(raw: Any) -> str:
    devid = str(_integer(raw, "devid"))
    if isinstance(raw, str):
        devid = raw.strip()  # keep leading zeros as the meter sent them
    return devid


def _top_level_values(text: str, key: str) -> list[Any]:
    """Every value of `key` in the top-level object, duplicates included (text parses)."""
    found: list[list[Any]] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        found.append([value for name, value in pairs if name == key])
        return dict(pairs)

    json.JSONDecoder(
        strict=False,
        object_pairs_hook=pairs_hook,
        parse_int=_JsonNumber,
        parse_float=_JsonNumber,
        parse_constant=_JsonNumber,
    ).decode(text)
    # Objects end inside out: the top-level object is the last one the hook sees.
    return found[-1] if found else []


def _integer(value: Any, field: str) -> int:
    if type(value) is _JsonNumber:
        number = _number(value)
        if number is not None and type(number[1]) is int:
            return number[1]
        raise BodyError(f"answer has no valid {field!r}")
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit() and text.isascii() and len(text) <= _MAX_DIGITS:
            return int(text)
    raise BodyError(f"answer has no valid {field!r}")


def _number(value: Any) -> tuple[str, int | float] | None:
    """('220.89', 220.89) for a numeric string or a JSON number; None otherwise.

    The one rule for both forms: ASCII digits, sign, point and exponent, at most 40
    characters, and a float that is neither infinite nor zero from a non-zero text. The
    text goes out under B/D/KEY and the number in B/D/state, so they must say the same."""
    if not isinstance(value, str):
        return None  # null, true/false, a list or an object
    text = value.strip()  # a plain str, also from a _JsonNumber
    if len(text) > _MAX_DIGITS or not _NUMBER.fullmatch(text):
        return None
    if "." in text or "e" in text or "E" in text:
        number = float(text)
        if number in (float("inf"), float("-inf")):
            return None  # "1e999": not representable in JSON
        if number == 0.0 and not _NONZERO.isdisjoint(text.partition("e")[0].partition("E")[0]):
            return None  # "1e-400": below the smallest float, B/D/state would say 0.0
        return text, number
    return text, int(text)


def _not_json(text: str) -> str:
    head = text.lstrip()[:1]
    if head == "<":
        return "answer is HTML, not JSON (a login or error page?)"
    if not head:
        return "answer is empty"
    return "answer is not valid JSON (truncated or garbled)"
