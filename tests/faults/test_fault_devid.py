"""Issue 12, item 1: an answer from another meter is a failure, in every path.

Two meters answer with a devid that is not the configured one: `wrong_devid` (another
meter at this meter's address) and `dup_devid` (the right devid, then a second, different
one: JSON's last duplicate wins). Both answer every request, switch their relay on
`&pout=` and report the new pout. Nothing may be published from those answers (no
readings, no `online`), each goes `offline` at the third request, the error is logged
once, and a relay command sent meanwhile is not confirmed by the wrong meter's pout.
"""

from __future__ import annotations

import logging

import pytest
from faultkit import Watch, arrivals_before, fault_meter
from shapes import json_object
from support import Rig, device

from bridge.config import HomeAssistantSettings

pytestmark = pytest.mark.mosquitto

COMMAND_TIME = 2 * 6.0 + 1.0  # README: 2 intervals plus 1 s for an extended meter
#: The read's own warning (not the command's, which quotes it in parentheses).
ERRORS = {"wrong_devid": r"^[^(]*answered as devid \d+, not \d+", "dup_devid": r"^[^(]*more than one devid"}


def test_an_answer_naming_another_devid_is_a_failure(rig: Rig, watch: Watch) -> None:
    meters = {fault: fault_meter(index, phases=3) for index, fault in ((0, "wrong_devid"), (2, "dup_devid"))}
    sim = rig.simulator(list(meters.values()))
    for fault, meter in meters.items():
        sim.set_fault(meter.devid, fault)
    probe = rig.probe("#")
    rig.bridge(
        [device(sim, meter, topic=fault) for fault, meter in meters.items()],
        homeassistant=HomeAssistantSettings(discovery=True),
    )
    # The bridge's own availability comes after its subscriptions: commands are heard now.
    probe.wait_for("smartmac/bridge/availability", lambda m: m.payload == b"online")
    for fault in meters:
        probe.publish(f"smartmac/{fault}/relay/set", b"ON")

    for fault, meter in meters.items():
        result = probe.wait_for(f"smartmac/{fault}/relay/result", timeout=COMMAND_TIME + 5)
        assert json_object(result.json())["ok"] is False, (fault, result.payload)
        assert "not confirmed" in json_object(result.json())["error"], (fault, result.payload)
        offline = probe.wait_for(f"smartmac/{fault}/availability", timeout=5)
        assert offline.payload == b"offline", fault
        # Offline at exactly the third request, and the command did reach the meter: its
        # answers reported the relay switched, and that confirmed nothing.
        assert arrivals_before(meter, offline.received) == 3, fault
        assert meter.pout == 1 and meter.pout_requests, fault
        assert len(watch.logged(ERRORS[fault], level=logging.WARNING)) == 1, fault

    probe.sync("smartmac")
    for fault in meters:
        published = {
            m.topic
            for m in probe.messages
            if m.topic.startswith(f"smartmac/{fault}/") or f"smartmac_{meters[fault].devid}" in m.topic
        }
        expected = {f"smartmac/{fault}/{t}" for t in ("availability", "relay/set", "relay/result")}
        assert published == expected, (fault, sorted(published - expected))
        assert [m.payload for m in probe.messages if m.topic == f"smartmac/{fault}/availability"] == [
            b"offline"
        ]
