"""Issue 3, case 7: SIGTERM to the real `python -m bridge run` while a command waits.

A standard meter was just polled, so its command waits ~60 s for its slot; a hanging
meter has a request in flight with a 30 s timeout. Neither may hold up the exit.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from faultkit import PASSWORD, USERNAME, Watch, fault_meter
from support import Process, Rig, write_config

from bench.support import LOOPBACK, wait_until

pytestmark = pytest.mark.mosquitto


def test_sigterm_while_a_command_waits_for_its_slot(
    tmp_path: Path, rig: Rig, processes: list[Process], watch: Watch
) -> None:
    standard, dead = fault_meter(0, extended=False), fault_meter(1)
    sim = rig.simulator([standard, dead])
    sim.set_fault(dead.devid, "hang")
    config = write_config(
        tmp_path,
        f"""
mqtt: {{host: {LOOPBACK}, port: {rig.broker.port}, client_id: shutdown,
       username: {USERNAME}, password: "{PASSWORD}"}}
devices:
  - {{id: "{standard.devid}", pin: "{standard.pin}", host: "{LOOPBACK}:{sim.port}", topic: std}}
  - {{id: "{dead.devid}", pin: "{dead.pin}", host: "{LOOPBACK}:{sim.port}", topic: dead,
      extended: true, timeout: 30}}
""",
    )
    probe = rig.probe("#")
    bridge = Process(tmp_path, "run", "--config", str(config), "--log-level", "debug")
    processes.append(bridge)
    watch.add_text("the bridge's stderr", lambda: bridge.stderr)
    watch.add_text("the bridge's stdout", lambda: bridge.stdout)
    probe.wait_for("smartmac/std/relay", lambda m: m.payload == b"OFF")
    wait_until(lambda: dead.requests == 1, 5, "a request to the hanging meter in flight")

    mark = probe.mark()
    probe.publish("smartmac/std/relay/set", "ON")
    wait_until(lambda: "relay command ON" in bridge.stderr, 5, "the bridge took the command")
    began = time.monotonic()
    assert bridge.terminate(timeout=5) == 0  # fails the test if it takes longer
    took = time.monotonic() - began

    result = probe.wait_for("smartmac/std/relay/result", after=mark, timeout=2)
    assert result.json() == {"ok": False, "error": "bridge shutting down"}
    assert len([m for m in probe.messages[mark:] if m.topic.endswith("/relay/result")]) == 1
    # offline for the bridge and every meter, retained for whoever comes later.
    late = rig.probe("smartmac/+/availability")
    for segment in ("bridge", "std", "dead"):
        assert (
            late.wait_for(f"smartmac/{segment}/availability", lambda m: m.retain, timeout=5).payload
            == b"offline"
        )
    assert standard.pout_requests == [] and standard.requests == 1
    assert "Traceback" not in bridge.stderr
    print(f"SIGTERM to exit 0: {took:.2f} s")
