"""Issue 12, item 2: memory does not grow with every new key name.

Meter `churn` sends 10 key names never seen before on every read (simulator fault
`churn`); meter `wide` sends more than 256 data keys (`many_keys`). A key absent from 3
good reads in a row is forgotten: its retained `B/D/KEY` is cleared with an empty retained
payload, its discovery config was cleared when it went away, and it is not replayed when
the broker comes back empty. The 257-key answer is a bad body: nothing is published from
it, and the meter goes offline at its third request.
"""

from __future__ import annotations

import logging
import re

import pytest
from faultkit import FaultMosquitto, Watch, arrivals_before, fault_meter
from support import Rig, device

from bridge.config import HomeAssistantSettings

pytestmark = pytest.mark.mosquitto

_CHURNED = re.compile(r"smartmac/churn/X(\d+)_\d+")


def _churn_indices(topics: set[str]) -> set[int]:
    return {int(m.group(1)) for t in topics if (m := _CHURNED.fullmatch(t))}


def test_vanished_keys_are_cleared_and_wide_answers_refused(
    rig: Rig, mosquitto: FaultMosquitto, watch: Watch
) -> None:
    churn, wide = fault_meter(0, phases=3), fault_meter(1)
    sim = rig.simulator([churn, wide])
    sim.set_fault(churn.devid, "churn")
    sim.set_fault(wide.devid, "many_keys")
    probe = rig.probe("#")
    rig.bridge(
        [device(sim, churn, topic="churn"), device(sim, wide, topic="wide")],
        homeassistant=HomeAssistantSettings(discovery=True),
    )

    # Read 1 brings X1_*; reads 2, 3 and 4 lack them: cleared at read 4, not before.
    first = probe.wait_for("smartmac/churn/X1_0", lambda m: m.payload == b"0")
    config = f"homeassistant/sensor/smartmac_{churn.devid}/X1_0/config"
    probe.wait_for(config, lambda m: m.payload != b"")
    probe.wait_for(config, lambda m: m.payload == b"", timeout=10)  # discovery: at read 2
    cleared = probe.wait_for("smartmac/churn/X1_0", lambda m: m.payload == b"", timeout=25)
    assert arrivals_before(churn, cleared.received) == 4
    assert [m.payload for m in probe.messages if m.topic == "smartmac/churn/X1_0"] == [b"0", b""]
    assert first.received < cleared.received

    # The wide meter: refused at every read, offline at the third, nothing else published.
    offline = probe.wait_for("smartmac/wide/availability", timeout=10)
    assert offline.payload == b"offline"
    assert arrivals_before(wide, offline.received) == 3
    assert {m.topic for m in probe.messages if m.topic.startswith("smartmac/wide/")} == {
        "smartmac/wide/availability"
    }
    assert not [m for m in probe.messages if f"smartmac_{wide.devid}" in m.topic]
    refused = watch.logged(r"^[^(]*more than 256 data keys", level=logging.WARNING)
    assert len(refused) == 1

    # A broker that lost everything gets the replay: no forgotten key comes back.
    mosquitto.restart()
    fresh = rig.probe("#")
    since = churn._churn  # reads with new keys so far
    # A read after the reconnect: the replay went out before it, on the same connection.
    fresh.wait_for(f"smartmac/churn/X{since + 1}_0", timeout=30)
    replayed = {m.topic for m in fresh.messages if m.payload}
    indices = _churn_indices(replayed)
    assert indices and min(indices) >= since - 2, sorted(indices)
    assert "smartmac/churn/V1" in replayed and "smartmac/churn/X1_0" not in replayed
