"""Issue 3, case 8: the parsers on arbitrary input (hypothesis, a few thousand examples).

parse_body raises nothing but BodyError, and what it accepts is safe to publish: every
topic it leads to is one a broker accepts, every payload a number or valid JSON.
parse_command raises nothing but CommandError. Runs are derandomized (the same examples
on every run and machine) and use no example database, so CI is repeatable.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.commands import Action, parse_command
from bridge.errors import BodyError, CommandError
from bridge.readings import Snapshot, parse_body
from bridge.topics import MeterTopics, relay_from_pout, state_messages

SEED = (Path(__file__).resolve().parent.parent / "fixtures" / "seed_3phase_extended.body").read_bytes()
SEED_DOC: dict[str, Any] = json.loads(SEED, strict=False)

FUZZ = settings(
    max_examples=1500,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def topic_problem(topic: str) -> str | None:
    """Why a broker would refuse `topic` in a PUBLISH, or None.

    MQTT 3.1.1 section 1.5.3: well-formed UTF-8 (no surrogates), no U+0000; control
    characters and non-characters SHOULD NOT appear, and mosquitto 2 drops the
    connection of a client that publishes one (measured: tab, newline, DEL, U+0085,
    U+FFFF). A publish topic has no wildcards and at most 65535 bytes.
    """
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        return "not encodable as UTF-8 (a lone surrogate)"
    if not topic or size > 65535:
        return f"{size} bytes"
    if "+" in topic or "#" in topic:
        return "a wildcard"
    for char in topic:
        code = ord(char)
        if code < 0x20 or 0x7F <= code <= 0x9F:
            return f"control character U+{code:04X}"
        if 0xFDD0 <= code <= 0xFDEF or (code & 0xFFFE) == 0xFFFE:
            return f"non-character U+{code:04X}"
    return None


ENVELOPE = frozenset({"devid", "time", "pout", "relay"})


def check_number_rule(text: str) -> None:
    """README's number rule, stated independently of the parser's regex (issue 12, item 6)."""
    assert 0 < len(text) <= 40 and all(c in "0123456789+-.eE" for c in text), text
    number = float(text)
    assert math.isfinite(number), text
    mantissa = text.lower().partition("e")[0]
    assert number != 0.0 or not any(c in "123456789" for c in mantissa), f"{text} rounds to 0"


def check_accepted(snap: Snapshot) -> None:
    """What a body that parses promises to the rest of the bridge."""
    assert isinstance(snap.devid, str) and isinstance(snap.time, int) and snap.pout in (0, 1)
    for reading in snap.readings:
        assert isinstance(reading.value, int | float) and not isinstance(reading.value, bool)
        assert math.isfinite(reading.value), reading
        assert reading.text == reading.text.strip() and reading.text
        assert float(reading.text) == float(reading.value) or math.isclose(float(reading.text), reading.value)
    assert not {r.key for r in snap.readings} & set(snap.rejected)
    topics = MeterTopics("smartmac", "m")
    relay = relay_from_pout(snap.pout, False)
    messages = list(state_messages(topics, snap, relay))
    for topic, payload in messages:
        assert topic.startswith("smartmac/m/"), topic
        problem = topic_problem(topic)
        assert problem is None, f"topic {topic!r}: {problem}"
        assert isinstance(payload, bytes)
    state = json.loads(dict(messages)[topics.state])
    for reading in snap.readings:
        check_number_rule(reading.text)
        if reading.key not in ENVELOPE:
            # What a consumer reads from B/D/KEY (Node-RED: Number(text)) is what B/D/state says.
            assert float(reading.text) == float(state[reading.key]), reading
    assert state["devid"] == snap.devid and state["pout"] == snap.pout and state["relay"] == relay.value


def parse(body: bytes | str) -> None:
    try:
        snap = parse_body(body)
    except BodyError:
        return
    check_accepted(snap)


# --- strategies ---------------------------------------------------------------------------

# Pieces that move a mutation past the JSON decoder into the envelope and data checks.
TOKENS = [b'"', b"{", b"}", b"[", b"]", b",", b":", b"null", b"true", b"1e999", b"NaN", b"-",
          b".", b"0", b"\\u0000", b"\\ud800", b"\n", b"\t", b"\xff", b"\xc3", b"/", b"#", b"+"]  # fmt: skip


@st.composite
def mutated_seed(draw: st.DrawFn) -> bytes:
    """The vendor's body with a few byte-level edits: flips, insertions, cuts, splices."""
    body = bytearray(SEED)
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(body)))
        edit = draw(st.sampled_from(["set", "insert", "token", "delete", "truncate", "splice"]))
        if edit == "set" and at < len(body):
            body[at] = draw(st.integers(0, 255))
        elif edit == "insert":
            body[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif edit == "token":
            body[at:at] = draw(st.sampled_from(TOKENS))
        elif edit == "delete":
            del body[at : at + draw(st.integers(1, 40))]
        elif edit == "truncate":
            del body[at:]
        elif edit == "splice":
            start = draw(st.integers(0, len(SEED) - 1))
            body[at:at] = SEED[start : start + draw(st.integers(1, 60))]
    return bytes(body)


ODD_TEXT = st.sampled_from(
    ["", " ", "1", " 220.5 ", "0", "-3", "+1", "1e3", "1e999", "-1e999", "nan", "inf", "0x10",
     "1_000", "1,5", "\u0661\u0662", "\uff11\uff12", "\u00b2", "12abc", "9" * 41, "9" * 5000,
     "0.60", ".5", "5.", "e5", "1e-400", "-1e-400", "0e-400", "1e-320", "٣.5", "9" * 40]
)  # fmt: skip
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | ODD_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
KEYS = st.text(max_size=10) | st.sampled_from(
    ["state", "relay", "availability", "relay/set", "a/b", "+", "#", "br0", "br", "br12", "V1\n", "T\t1",
     "\x7f", "\u0085", "\ufffe", "\ud800", "", " ", "\x00"]
)  # fmt: skip


@st.composite
def mutated_document(draw: st.DrawFn) -> bytes:
    """The vendor's body parsed, with envelope fields, data keys and entries replaced."""
    doc = json.loads(json.dumps(SEED_DOC))
    data = doc["data"]
    for _ in range(draw(st.integers(1, 5))):
        where = draw(st.sampled_from(["envelope", "entry", "field", "key", "data"]))
        if where == "envelope":
            doc[draw(st.sampled_from(["devid", "time", "pout", "data", "extra"]))] = draw(JSON_VALUES)
        elif where == "data" or not isinstance(data, dict) or not data:
            doc["data"] = data = draw(st.dictionaries(KEYS, JSON_VALUES, max_size=4))
        else:
            key = draw(st.sampled_from(sorted(data)))
            if where == "entry":
                data[key] = draw(JSON_VALUES)
            elif where == "field" and isinstance(data[key], dict):
                data[key][draw(st.sampled_from(["name", "unit", "value"]))] = draw(JSON_VALUES)
            elif where == "key":
                data[draw(KEYS)] = data.pop(key)
    # ensure_ascii: surrogates and control characters travel as \u escapes, as a
    # firmware could send them.
    return json.dumps(doc, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


# Number-like text: valid and invalid JSON numbers, over- and underflows, non-ASCII digits.
NUMBER_TEXT = st.text(alphabet="0123456789+-.eE\u0661\uff11", min_size=1, max_size=45) | st.sampled_from(
    ["9" * 4000, "1e-400", "-1e-400", "1e999", "1E-330", "0.0e-999", "5e-324", "NaN", "-Infinity", "9" * 40]
)


@st.composite
def numbers_in_seed(draw: st.DrawFn) -> bytes:
    """The vendor's body with some values replaced by number-like text, raw or quoted."""
    body = SEED.decode()
    for _ in range(draw(st.integers(1, 4))):
        parts = body.split('"value":', 1 + draw(st.integers(0, 20)))
        if len(parts) < 2:
            break
        head, tail = '"value":'.join(parts[:-1]), parts[-1]
        old_end = tail.index("}")
        number = draw(NUMBER_TEXT)
        new = f'"{number}"' if draw(st.booleans()) else number
        body = f'{head}"value":{new}{tail[old_end:]}'
    return body.encode()


# --- the properties -----------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=2048))
def test_parse_body_on_arbitrary_bytes(body: bytes) -> None:
    parse(body)


@FUZZ
@given(st.text(max_size=512))
def test_parse_body_on_arbitrary_text(body: str) -> None:
    parse(body)


@FUZZ
@given(mutated_seed())
def test_parse_body_on_mutated_vendor_bodies(body: bytes) -> None:
    parse(body)


@FUZZ
@given(mutated_document())
def test_parse_body_on_mutated_vendor_documents(body: bytes) -> None:
    parse(body)


@FUZZ
@given(numbers_in_seed())
def test_parse_body_number_rule(body: bytes) -> None:
    parse(body)


def test_the_mutations_reach_past_the_json_decoder() -> None:
    # Sanity of the strategies: a good share of mutated documents must parse, or the
    # envelope and data checks would never be exercised.
    parsed = []

    @settings(max_examples=300, derandomize=True, database=None, deadline=None)
    @given(mutated_document())
    def sample(body: bytes) -> None:
        with contextlib.suppress(BodyError):
            parsed.append(parse_body(body))

    sample()
    assert len(parsed) > 50


COMMANDS = st.binary(max_size=400) | st.text(max_size=300).map(str.encode) | st.sampled_from(
    [b"ON", b"on", b"oN", b" off ", b"TOGGLE", b"1", b"0", b"true", b"FALSE", b"ONN", b"2", b"",
     b'{"state":1}', b'{"state": "on"}', b'{"state": "DIM"}', b'["ON"]', b"{" * 1000, b"\xff",
     b"ON" + b" " * 300, b"null", b'{"state": null}', b'"ON"']
)  # fmt: skip


@FUZZ
@given(COMMANDS)
def test_parse_command_raises_only_command_error(payload: bytes) -> None:
    try:
        action = parse_command(payload)
    except CommandError as exc:
        assert str(exc)  # the result payload carries this text: never empty
        return
    assert isinstance(action, Action)
    # Whatever was accepted names the action plainly, as a word or as JSON's "state".
    text = payload.decode("utf-8").strip()
    word = text.upper() if not text.startswith("{") else str(json.loads(text)["state"]).strip().upper()
    assert {"1": "ON", "TRUE": "ON", "0": "OFF", "FALSE": "OFF"}.get(word, word) == action.value
