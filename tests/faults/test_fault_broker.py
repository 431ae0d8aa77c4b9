"""Issue 3, cases 1 and 2: the broker goes away (killed, no persistence) or is not there
at all when the bridge starts. Each time it returns, everything retained is back within
5 s with current values, and commands work.
"""

from __future__ import annotations

import itertools
import json
import logging
import time

import pytest
from faultkit import FaultMosquitto, Watch, fault_meter
from shapes import json_object, present
from support import Probe, Rig, assert_rate_limit_kept, device

from bench.support import wait_until

pytestmark = pytest.mark.mosquitto

RESTARTS = 10
BACK_WITHIN = 5.0


def bridge_topics(probe: Probe) -> set[str]:
    """Every topic the bridge publishes retained, as far as `probe` has seen them."""
    return {m.topic for m in list(probe.messages) if not m.topic.endswith(("/relay/set", "/relay/result"))}


def test_ten_broker_restarts_lose_nothing(rig: Rig, mosquitto: FaultMosquitto) -> None:
    # Polled every 60 s, so the values stand still between restarts and "current" can be
    # checked exactly; commands still go out within the extended meters' 6 s.
    meters = [fault_meter(0, phases=3), fault_meter(1), fault_meter(2)]
    segments = ["three", "one", "inverted"]
    sim = rig.simulator(meters)
    devices = [device(sim, m, topic=s, interval=60) for m, s in zip(meters, segments, strict=True)]
    devices[2] = device(sim, meters[2], topic="inverted", interval=60, relay_inverted=True)
    first = rig.probe("#")
    bridge = rig.bridge(devices)
    for segment in segments:
        first.wait_for(f"smartmac/{segment}/availability", lambda m: m.payload == b"online")
    first.wait_for("smartmac/bridge/info")
    for meter in meters:  # discovery is on by default: configs come after the first reads
        first.wait_for(f"homeassistant/switch/smartmac_{meter.devid}/relay/config")
        first.wait_for(f"homeassistant/sensor/smartmac_{meter.devid}/V1/config")
    expected = bridge_topics(first)
    assert len([t for t in expected if t.startswith("homeassistant/")]) >= 3 * 5
    # The bridge's own two, and per meter availability, state, relay and every reading.
    wanted = {"smartmac/bridge/availability", "smartmac/bridge/info"}
    for segment in segments:
        state = json_object(first.wait_for(f"smartmac/{segment}/state").json())
        keys = set(state) - {"devid", "time", "pout", "relay"}
        wanted |= {f"smartmac/{segment}/{k}" for k in {"availability", "state", "relay", *keys}}
    # Anything else (Home Assistant discovery, where enabled) must come back just the same.
    assert wanted <= expected and not {t for t in expected - wanted if t.startswith("smartmac/")}
    current = {topic: present(first.last(topic)).payload for topic in expected}
    owner = dict(zip(segments, meters, strict=True))
    backs: list[float] = []

    for cycle in range(RESTARTS):
        requests = {m.devid: m.requests for m in meters}
        mosquitto.restart()  # SIGKILL, then the same port again: every retained message is gone
        returned = time.monotonic()
        fresh = rig.probe("#")
        for topic in expected:
            fresh.wait_for(topic, timeout=BACK_WITHIN + 10)
        back = max(fresh.wait_for(topic).received for topic in expected) - returned
        backs.append(round(back, 2))
        assert back <= BACK_WITHIN, f"restart {cycle + 1}: everything back after {back:.1f} s"

        # What is retained now is what was current before the restart (unless a meter
        # was polled meanwhile; its new values are then the current ones).
        retained = rig.probe("#")
        for topic in expected:
            message = retained.wait_for(topic, lambda m: m.retain, timeout=5)
            polled = owner.get(topic.split("/")[1])
            if polled is None or polled.requests == requests[polled.devid]:
                assert message.payload == current[topic], (cycle, topic)
        assert present(retained.last("smartmac/bridge/availability")).payload == b"online"

        # Commands work again: each restart switches another meter.
        segment = segments[cycle % 3]
        relay = current[f"smartmac/{segment}/relay"]
        mark = retained.mark()
        retained.publish(f"smartmac/{segment}/relay/set", "TOGGLE")
        result = retained.wait_for(f"smartmac/{segment}/relay/result", after=mark, timeout=15).json()
        assert result == {"ok": True, "relay": "OFF" if relay == b"ON" else "ON"}, (cycle, result)
        assert bridge.link.connected.is_set()
        current = {topic: present(retained.last(topic)).payload for topic in expected}
        fresh.stop()
        retained.stop()

    # Each command reached its meter once, none was replayed by a reconnect.
    assert [json.loads(current[f"smartmac/{s}/state"])["relay"] for s in segments] == [
        current[f"smartmac/{s}/relay"].decode() for s in segments
    ]
    assert sum(len(m.pout_requests) for m in meters) == RESTARTS
    assert_rate_limit_kept(sim)
    print(f"{RESTARTS} restarts: every retained topic back after {backs} s")


def test_broker_absent_at_start(rig: Rig, mosquitto: FaultMosquitto, watch: Watch) -> None:
    mosquitto.stop()  # not there when the bridge starts
    meters = [fault_meter(0, phases=3), fault_meter(1)]
    sim = rig.simulator(meters)
    bridge = rig.bridge([device(sim, meters[0], topic="three"), device(sim, meters[1], topic="one")])
    address = f"127.0.0.1:{mosquitto.port}"
    # It keeps trying: the second failed attempt comes after a back-off, at debug level.
    wait_until(lambda: len(watch.logged(f"cannot reach MQTT broker {address}")) >= 2, 10, "a retry")
    wait_until(lambda: all(m.ok for m in meters), 10, "both meters polled meanwhile")
    mosquitto.start()
    probe = rig.probe("#")
    assert bridge.link.connected.wait(35), "did not connect once the broker was there"

    # Everything, from the polls made while the broker was away.
    for segment in ("three", "one"):
        state = probe.wait_for(f"smartmac/{segment}/state", timeout=10).json()
        assert isinstance(state, dict)
        for key, value in state.items():
            if key not in ("devid", "time", "pout", "relay"):
                assert float(probe.wait_for(f"smartmac/{segment}/{key}").payload) == pytest.approx(value)
        assert probe.wait_for(f"smartmac/{segment}/relay").payload == b"OFF"
        probe.wait_for(f"smartmac/{segment}/availability", lambda m: m.payload == b"online")
    probe.wait_for("smartmac/bridge/availability", lambda m: m.payload == b"online")
    probe.wait_for("smartmac/bridge/info")

    # Said so once, at warning level; the retries went to debug, with a growing back-off.
    about_broker = watch.logged(f"MQTT broker {address}")
    warnings = [r for r in about_broker if r.level >= logging.WARNING]
    assert [r.message for r in warnings] == [f"cannot reach MQTT broker {address}; retrying"]
    # (paho 2 tries at 0, 3, 7, 15 ... s: its 1 s retry does not reach on_connect_fail.)
    attempts = watch.logged(f"(cannot reach|connected to) MQTT broker {address}")
    waits = [b.at - a.at for a, b in itertools.pairwise(attempts)]
    assert len(waits) >= 2 and waits == sorted(waits) and waits[-1] - waits[0] > 0.5, waits
    print(f"broker absent at start: attempts {waits} s apart")
    assert_rate_limit_kept(sim)
