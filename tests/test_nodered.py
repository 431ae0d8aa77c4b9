"""The shipped Node-RED flow (examples/node-red/flows.json) against the real bridge.

Node-RED 4 is installed from npm on first use (bench/nodered.py; about half a minute, then
cached) and run headless on loopback with a copy of the flow whose broker node points at
the test's mosquitto. Skipped, with the reason, where node or npm is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shapes import json_object
from support import Message, Rig, device

from bench import nodered
from bench.support import LOOPBACK, wait_until
from bridge.simulator import SimMeter

FLOW = Path(__file__).resolve().parent.parent / "examples" / "node-red" / "flows.json"

pytestmark = pytest.mark.nodered
_MISSING = nodered.missing_tools()


def _nodes(flow: list[dict[str, object]], type_: str) -> list[dict[str, object]]:
    return [node for node in flow if node.get("type") == type_]


def test_the_flow_is_importable_as_is() -> None:
    flow = json.loads(FLOW.read_text())
    (broker,) = _nodes(flow, "mqtt-broker")
    assert (broker["broker"], broker["port"]) == ("localhost", "1883")
    ids = [node["id"] for node in flow]
    assert len(ids) == len(set(ids))
    wired = {target for node in flow for output in node.get("wires", []) for target in output}
    assert wired <= set(ids)
    # Commands must never be retained: a retained command is ignored by the bridge.
    assert all(node["retain"] == "false" for node in _nodes(flow, "mqtt out"))


@pytest.mark.skipif(_MISSING is not None, reason=f"cannot run Node-RED: {_MISSING}")
@pytest.mark.parametrize("broker", ["mosquitto"], indirect=True)
def test_flow_shows_total_power_and_switches_the_relay(tmp_path: Path, rig: Rig) -> None:
    flow = json.loads(FLOW.read_text())
    # As shipped it switches meter demo3 (the demo's) on localhost:1883; only the broker
    # is moved to the test's port (and to 127.0.0.1, where the test broker listens).
    flow = nodered.with_broker(flow, LOOPBACK, rig.broker.port)
    (relay_on,) = [n for n in _nodes(flow, "inject") if n["payload"] == "ON"]
    assert relay_on["topic"] == "smartmac/demo3/relay/set"

    meter = SimMeter(devid="1728053249", pin="012345", phases=3, extended=True)
    sim = rig.simulator([meter])
    probe = rig.probe("#")
    rig.bridge([device(sim, meter, topic="demo3")])
    state = probe.wait_for("smartmac/demo3/state")

    with nodered.NodeRed(flow, tmp_path / "node-red") as red:
        # The retained state reaches the flow at once: its total is W1 + W2 + W3.
        total = probe.wait_for("nodered/smartmac/demo3/total_power", timeout=30)
        states = [json_object(m.json()) for m in probe.messages if m.topic == "smartmac/demo3/state"]
        sums = [sum(s[f"W{p}"] for p in (1, 2, 3)) for s in states]
        assert float(total.payload) in sums, (total.payload, sums)
        assert json_object(state.json())["relay"] == "OFF"

        assert meter.pout == 0 and meter.pout_requests == []
        mark = probe.mark()
        red.inject(str(relay_on["id"]))  # the inject node's button, via the admin API
        # The command waits for the meter's next free slot: up to 6 s after the first poll.
        wait_until(lambda: [p for _, p in meter.pout_requests] == [1], 15, "the relay switched on")
        probe.wait_for("smartmac/demo3/relay", lambda m: m.payload == b"ON", after=mark)
        result = probe.wait_for("smartmac/demo3/relay/result", after=mark)
        assert result.json() == {"ok": True, "relay": "ON"}
        assert all(not _is_retained_command(m) for m in probe.messages)


def _is_retained_command(message: Message) -> bool:
    return message.topic.endswith("/relay/set") and message.retain
