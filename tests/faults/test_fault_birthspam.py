"""Issue 12, item 3: a flood of Home Assistant birth messages (`homeassistant/status`
`online`) costs one re-announce now and at most one more 10 s later, and no meter's poll
slips meanwhile. Judged by what a subscriber receives and when the simulator was asked.
"""

from __future__ import annotations

import time

import pytest
from support import Probe, Rig, assert_rate_limit_kept, device

from bench.support import gaps
from bridge.reannounce import SPACING
from bridge.simulator import make_fleet

pytestmark = pytest.mark.mosquitto

METERS = 40
BIRTHS = 50  # in one second
SLIP = 1.0  # most seconds a poll may start late


def relay_configs(probe: Probe, topics: set[str], after: int) -> list[float]:
    """When each relay config after index `after` arrived."""
    return [m.received for m in probe.messages[after:] if m.topic in topics]


def test_birth_burst_costs_one_reannounce_and_no_poll_slips(rig: Rig) -> None:
    meters = make_fleet(METERS, phases=3, extended=True, first_id=1728070000)
    sim = rig.simulator(meters)
    probe = rig.probe("#")
    bridge = rig.bridge([device(sim, m, topic=f"m{i:02d}") for i, m in enumerate(meters)])
    relays = {f"homeassistant/switch/smartmac_{m.devid}/relay/config" for m in meters}
    # The ghost scan's end announces every meter read by then (later ones announce
    # themselves); the 10 s count from that start, so a birth now would be deferred.
    announced = max(probe.wait_for(topic, timeout=20).received for topic in relays)
    time.sleep(max(0.0, announced + SPACING + 0.5 - time.monotonic()))  # only time to wait for

    bridge.lags = []
    mark = probe.mark()
    began = time.monotonic()
    for i in range(BIRTHS):
        probe.publish("homeassistant/status", "online")
        time.sleep(max(0.0, began + (i + 1) / BIRTHS - time.monotonic()))  # the burst's pace
    ended = time.monotonic()

    # The first birth: every meter at once. The births after that run: one more, deferred.
    for topic in relays:
        probe.wait_for(topic, after=mark, timeout=5)
    first = relay_configs(probe, relays, mark)
    assert len(first) == METERS and max(first) - began < SLIP
    assert max(first) < ended, "the burst outlasted the first re-announce"
    later = probe.mark()
    for topic in relays:
        probe.wait_for(topic, after=later, timeout=SPACING + 5)
    second = relay_configs(probe, relays, later)
    assert min(second) - min(first) >= SPACING - 0.2
    # Then nothing more: a third would have come by now with one re-announce per birth.
    probe.sync("homeassistant")

    spam = probe.messages[mark:]
    for topic in relays:
        assert sum(1 for m in spam if m.topic == topic) == 2, topic
    configs = [m for m in spam if m.topic.endswith("/config")]
    assert len(configs) == 2 * METERS * (22 + 1)  # 22 sensors and the relay, twice
    # The state goes with each re-announce: availability is sent on nothing else here.
    assert sum(1 for m in spam if m.topic == "smartmac/m00/availability") == 2

    # Polls kept their schedule throughout.
    assert bridge.lags and max(bridge.lags) < SLIP, max(bridge.lags or [0.0])
    for meter in meters:
        times = list(meter.request_times)
        window = [g for g, t in zip(gaps(times), times[1:], strict=False) if t > began]
        assert window and max(window) < meter.interval + SLIP, (meter.devid, max(window))
    assert_rate_limit_kept(sim)
