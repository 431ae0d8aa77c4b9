"""Issue 3, case 4: a thousand random payloads to relay/set, retained commands and
commands for meters that cannot take them -- on one bridge, concurrently.

Meter `a` gets the flood; `hang` and `refuse` are offline when a command comes. A
retained ON sits on the broker (mosquitto with persistence, so it survives the restart
at the end) and must never be applied.
"""

from __future__ import annotations

import json
import random
import time

import pytest
from faultkit import FaultMosquitto, Watch, fault_meter
from shapes import json_object, present
from support import Rig, assert_rate_limit_kept, device

from bench.support import wait_until

pytestmark = [
    pytest.mark.mosquitto,
    pytest.mark.parametrize("mosquitto", [{"persistence": True}], indirect=True),
]

FLOOD = 1000
TIMEOUT = 2.0
COMMAND_TIME = 2 * 6.0 + 1.0  # README: 2 intervals plus 1 s, 13 s for an extended meter

_WORDS = {"ON": "ON", "OFF": "OFF", "TOGGLE": "TOGGLE", "1": "ON", "0": "OFF", "TRUE": "ON", "FALSE": "OFF"}
NEAR_MISSES = [
    b"ONN", b"OF", b"OFFF", b"TOGGLEE", b"TOGGL", b"2", b"-1", b"01", b"10", b"yes", b"no", b"null",
    b"true!", b"O N", b"ON OFF", b"", b"{}", b"[]", b'{"state":1}', b'{"state": true}', b'{"state": "DIM"}',
    b'{"State": "ON"}', b'["ON"]', b'"ON"', b'{"state": "ON"', b'{"state": ""}', b'{"state": null}',
    b"\x00ON", b"ON\x00", b"\xffON", b'{"state": {"state": "ON"}}', b"on\xc3", b"\xef\xbb\xbfON",
]  # fmt: skip


def meaning(payload: bytes) -> str | None:
    """The action README's "Relay commands" section gives a payload, else None.

    Written from the manual, not from bridge.topics: ON, OFF, TOGGLE (any case), 1/0,
    true/false, or {"state": "ON"|"OFF"|"TOGGLE"}. (Surrounding white space is allowed.)
    """
    if len(payload) > 256:
        return None
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if text.upper() in _WORDS:
        return _WORDS[text.upper()]
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    state = doc.get("state") if isinstance(doc, dict) else None
    if isinstance(state, str) and state.strip().upper() in ("ON", "OFF", "TOGGLE"):
        return state.strip().upper()
    return None


def random_payloads(count: int, seed: int = 3) -> list[bytes]:
    """Valid words in odd cases, JSON, near misses, binary, 300-byte payloads, text."""
    rng = random.Random(seed)

    def odd_case(word: str) -> str:
        return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in word)

    def one() -> bytes:
        kind = rng.choices(["word", "json", "near", "binary", "long", "text"], [25, 10, 25, 15, 10, 15])[0]
        if kind == "word":
            return odd_case(rng.choice(list(_WORDS))).encode()
        if kind == "json":
            spacing = rng.choice([(",", ":"), (", ", ": ")])
            return json.dumps(
                {"state": odd_case(rng.choice(["on", "off", "toggle"]))}, separators=spacing
            ).encode()
        if kind == "near":
            return rng.choice(NEAR_MISSES)
        if kind == "binary":
            return rng.randbytes(rng.randint(1, 64))
        if kind == "long":
            return rng.choice([rng.randbytes(300), b"{" * 300, bytes(rng.choices(b"ONOFFTOGGLE", k=300))])
        return "".join(
            rng.choices('abcdefghijklmnopqrstuvwxyzONFTGL{}[]":,. 0123456789', k=rng.randint(1, 20))
        ).encode()

    return [one() for _ in range(count)]


def test_random_payloads_retained_and_undeliverable_commands(
    rig: Rig, mosquitto: FaultMosquitto, watch: Watch
) -> None:
    a, hang, refuse = fault_meter(0, phases=3), fault_meter(1), fault_meter(2)
    sim = rig.simulator([a, hang, refuse])
    sim.set_fault(hang.devid, "hang")
    sim.set_fault(refuse.devid, "refuse")
    probe = rig.probe("#")
    # A stale ON left retained on the broker before the bridge starts.
    probe.publish("smartmac/a/relay/set", "ON", retain=True)
    bridge = rig.bridge([device(sim, m, topic=t, timeout=TIMEOUT)
                         for m, t in ((a, "a"), (hang, "hang"), (refuse, "refuse"))])  # fmt: skip
    probe.wait_for("smartmac/a/relay", lambda m: m.payload == b"OFF")
    start = probe.mark()

    # Commands for the two meters that cannot take them.
    sent_at = {}
    for segment in ("hang", "refuse"):
        probe.publish(f"smartmac/{segment}/relay/set", "ON")
        sent_at[segment] = time.monotonic()

    # The flood, published back to back (QoS 1, in order).
    payloads = random_payloads(FLOOD)
    for payload in payloads:
        last = probe.client.publish("smartmac/a/relay/set", payload, qos=1)
    last.wait_for_publish(30)

    def results(segment: str) -> list[dict[str, object]]:
        return [
            json_object(m.json())
            for m in probe.messages[start:]
            if m.topic == f"smartmac/{segment}/relay/result"
        ]

    wait_until(lambda: len(results("a")) >= FLOOD, 30, f"{FLOOD} results")

    # Exactly one result per command: invalid ones an error at once, valid ones
    # "superseded" by a later one or confirmed by the meter.
    meanings = [meaning(p) for p in payloads]
    valid = [m for m in meanings if m is not None]
    got = results("a")
    superseded = [r for r in got if r == {"ok": False, "error": "superseded"}]
    confirmed = [r for r in got if r.get("ok") is True]
    refused = [r for r in got if r.get("ok") is False and r not in superseded]
    assert len(got) == FLOOD and len(refused) == FLOOD - len(valid)
    assert len(confirmed) + len(superseded) == len(valid) and confirmed
    print(f"{FLOOD} payloads: {len(valid)} valid, {len(superseded)} superseded, {len(confirmed)} confirmed")

    # The relay went where the valid commands, in order, lead (TOGGLE flips the state
    # the relay is heading for); the requests that reached the meter were steps of that
    # path, and the flood coalesced into very few of them.
    path, relay = [], "OFF"
    for action in valid:
        relay = {"ON": "ON", "OFF": "OFF"}.get(action, "OFF" if relay == "ON" else "ON")
        path.append(1 if relay == "ON" else 0)
    sent = [pout for _, pout in a.pout_requests]
    steps = iter(path)
    assert all(any(pout == step for step in steps) for pout in sent), (sent, path[-5:])
    assert 1 <= len(sent) <= 2 and sent[-1] == path[-1] == a.pout
    assert confirmed[-1] == {"ok": True, "relay": "ON" if path[-1] else "OFF"}
    assert present(probe.last("smartmac/a/relay")).payload == (b"ON" if path[-1] else b"OFF")

    # Undeliverable: an error when the command's time is up, never replayed later.
    for segment, meter in (("hang", hang), ("refuse", refuse)):
        message = probe.wait_for(f"smartmac/{segment}/relay/result", after=start, timeout=COMMAND_TIME + 10)
        took = message.received - sent_at[segment]
        assert COMMAND_TIME - 0.5 <= took <= COMMAND_TIME + TIMEOUT + 2, (segment, took)
        result = json_object(message.json())
        error = result["error"]
        assert result["ok"] is False and f"not confirmed by the meter within {COMMAND_TIME:g} s" in error
        sim.set_fault(meter.devid, "ok")
    for segment, meter in (("hang", hang), ("refuse", refuse)):
        assert probe.wait_for(f"smartmac/{segment}/relay", after=start, timeout=15).payload == b"OFF"
        assert meter.pout_requests == [] and meter.pout == 0
        assert len(results(segment)) == 1

    # The retained ON was never applied: no result for it, and after a restart of the
    # broker (which kept it: persistence) the bridge gets it again and ignores it again.
    assert len(results("a")) == FLOOD
    pout_before = list(a.pout_requests)
    mosquitto.restart(graceful=True)
    fresh = rig.probe("#")
    stale = fresh.wait_for("smartmac/a/relay/set", lambda m: m.retain, timeout=5)
    assert stale.payload == b"ON"
    ignored = "ignored a retained command on smartmac/a/relay/set"
    wait_until(lambda: len(watch.logged(ignored)) == 2, 15, "the bridge got the retained command again")
    requests = a.requests
    wait_until(lambda: a.requests > requests, 10, "the next request to meter a")  # where it would go
    arrived = a.request_times[-1]
    fresh.wait_for("smartmac/a/state", lambda m: m.received > arrived, timeout=10)
    assert a.pout_requests == pout_before
    assert [m for m in fresh.messages if m.topic.endswith("/relay/result")] == []
    assert bridge.link.connected.is_set()
    assert a.rate_limited == 0
    assert_rate_limit_kept(sim)
