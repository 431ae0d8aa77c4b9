"""/metrics' per-meter families are written by hand (bridge/metrics.py, for speed): the text
must be exactly what prometheus-client's generate_latest writes for the same samples.

The reference below is the collector as it was before (prometheus-client's metric
families), fed the same bridge state: meters online, offline and never answered, relays
on, off and unknown, values that need an exponent, and label values with a backslash, a
double quote, a newline and non-ASCII text.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from bridge.__main__ import build_bridge
from bridge.config import Settings
from bridge.metrics import MeterFamilies, exposition
from bridge.readings import Reading, Snapshot
from bridge.service import Bridge
from bridge.status import RESULTS
from bridge.topics import Relay


class Reference(Collector):
    """The per-meter families through prometheus-client's objects (the code before)."""

    def __init__(self, bridge: Bridge) -> None:
        self._bridge = bridge

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("smartmac_meter_up", "1: the meter answers, 0: it does not", labels=["meter"])
        reading = GaugeMetricFamily(
            "smartmac_reading",
            "Every numeric reading of the last good read (energy counters guarded)",
            labels=["meter", "key", "unit"],
        )
        relay = GaugeMetricFamily("smartmac_relay_on", "1: the load relay is on", labels=["meter"])
        requests = CounterMetricFamily(
            "smartmac_requests", "Requests to the meter, by how they ended", labels=["meter", "result"]
        )
        for meter in self._bridge.meters:
            segment = meter.device.segment
            available = meter.api_available
            if available is not None:
                up.add_metric([segment], 1.0 if available else 0.0)
            if meter.last is not None and available is not False:
                for r in meter.last.readings:
                    reading.add_metric([segment, r.key, r.unit], float(r.value))
            if meter.relay is not None:
                relay.add_metric([segment], 1.0 if meter.relay.value == "ON" else 0.0)
            for result in RESULTS:
                requests.add_metric([segment, result], float(meter.requests[result]))
        yield from (up, reading, relay, requests)


ODD_KEYS = ['q"uote', "back\\slash", "new\nline", "T"]
VALUES: list[int | float] = [0, -3, 230.12, 1e-7, 12_345_678, 1.5e16, 2**53, 0.1 + 0.2, math.inf]


def bridge_with_state() -> Bridge:
    segments = ["plain", 'seg"quote', "seg\\back", "zähler-1", "never", "offline"]
    devices = [
        {"id": str(1000 + i), "pin": "000001", "host": "127.0.0.1:9", "topic": s}
        for i, s in enumerate(segments)
    ]
    settings = Settings.model_validate({"mqtt": {"host": "127.0.0.1"}, "devices": devices})
    bridge = build_bridge(settings, settings.devices, host="127.0.0.1", port=1883)
    for i, meter in enumerate(bridge.meters):
        segment = meter.device.segment
        if segment == "never":
            continue  # no request ended: no up line, no readings, no relay
        readings = tuple(
            Reading(key, key, unit, str(value), value)
            for key, unit, value in zip(
                [*ODD_KEYS, "V1", "Wh1", "W", "PF1", "A1"],
                ["°C", 'u"nit', "V\\", "", "V", "Wh", "W", "", "A"],
                VALUES,
                strict=True,
            )
        )
        meter.last = Snapshot(meter.device.id, 1_700_000_000, i % 2, readings)
        meter.relay = Relay.ON if i % 2 else Relay.OFF
        meter.requests.update({RESULTS[0]: 10**i, RESULTS[2]: i, RESULTS[-1]: 12_345_678})
        if segment == "offline":
            for _ in range(3):
                meter.health.failed("timeout")
        else:
            meter.health.good()
    return bridge


def test_meter_families_are_generate_latests_text() -> None:
    bridge = bridge_with_state()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Reference(bridge))
    want = generate_latest(registry).decode()
    families = MeterFamilies(bridge)
    assert families.text() == want
    # Again, from the kept label text; and after a key went away, without it.
    assert families.text() == want
    plain = bridge.meters[0]
    assert plain.last is not None
    plain.last = Snapshot(plain.device.id, 1, 0, plain.last.readings[1:])
    assert families.text() == generate_latest(registry).decode()
    assert all(label[1] != ODD_KEYS[0] or label[0] != "plain" for label in families._reading)


def test_in_turns_is_the_same_text() -> None:
    """What the endpoint serves, a few meters per turn of the loop, is the same text."""
    bridge = bridge_with_state()
    families = MeterFamilies(bridge)
    assert asyncio.run(families.text_in_turns(per_turn=2)) == families.text()
    page = exposition(bridge)
    whole, in_turns = page(), asyncio.run(page.in_turns())
    # (process_* figures move between the two: compare the smartmac_* lines)
    assert [x for x in whole.splitlines() if x.startswith(b"smartmac")] == [
        x for x in in_turns.splitlines() if x.startswith(b"smartmac")
    ]


def test_exposition_parses_and_keeps_every_family() -> None:
    bridge = bridge_with_state()
    text = exposition(bridge)().decode()
    names = [family.name for family in text_string_to_metric_families(text)]
    for name in ("smartmac_meter_up", "smartmac_reading", "smartmac_relay_on", "smartmac_requests"):
        assert name in names, names
    assert names.index("smartmac_requests") < names.index("smartmac_request_duration_seconds")
    assert any(name.startswith("process_") for name in names)
    up = next(f for f in text_string_to_metric_families(text) if f.name == "smartmac_meter_up")
    assert {s.labels["meter"]: s.value for s in up.samples} == {
        "plain": 1.0,
        'seg"quote': 1.0,
        "seg\\back": 1.0,
        "zähler-1": 1.0,
        "offline": 0.0,
    }
