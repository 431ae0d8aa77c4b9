"""/metrics: the bridge's state in Prometheus' text format, read when scraped.

A collector, not metric objects updated on every poll: the bridge already keeps every
figure (readings, counts, the durations' histogram, see status.py), so a scrape reads them
once, and polling pays nothing for metrics nobody scrapes. prometheus-client writes the
format; its own registry, so nothing else in the process adds to it. The metric names are
a contract (README "Metrics").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .commands import COMMAND_RESULTS
from .status import RESULTS

if TYPE_CHECKING:
    from .service import Bridge


class BridgeCollector(Collector):
    """Every smartmac_* metric, from the bridge's state at the moment of the scrape."""

    def __init__(self, bridge: Bridge) -> None:
        self._bridge = bridge

    def collect(self) -> Iterator[Metric]:
        bridge = self._bridge
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
        for meter in bridge.meters:
            segment = meter.device.segment
            available = meter.api_available
            if available is not None:
                up.add_metric([segment], 1.0 if available else 0.0)
            if meter.last is not None and available is not False:
                # An offline meter's last values are not current ones: left out until it answers.
                for r in meter.last.readings:
                    reading.add_metric([segment, r.key, r.unit], float(r.value))
            if meter.relay is not None:
                relay.add_metric([segment], 1.0 if meter.relay.value == "ON" else 0.0)
            counts = meter.requests
            for result in RESULTS:
                requests.add_metric([segment, result], float(counts[result]))
        yield from (up, reading, relay, requests)

        durations = bridge.durations
        yield HistogramMetricFamily(
            "smartmac_request_duration_seconds",
            "How long a request to a meter took, to the end of its answer",
            buckets=[(_le(bound), float(n)) for bound, n in durations.cumulative()],
            sum_value=durations.total,
        )
        commands = CounterMetricFamily(
            "smartmac_commands", "Relay command results, by what became of the command", labels=["result"]
        )
        for result in COMMAND_RESULTS:
            commands.add_metric([result], float(bridge.commands_total[result]))
        yield commands
        yield GaugeMetricFamily(
            "smartmac_mqtt_connected",
            "1: connected to the MQTT broker",
            value=1.0 if bridge.link.connected.is_set() else 0.0,
        )
        yield CounterMetricFamily(
            "smartmac_mqtt_messages", "MQTT messages published", value=float(bridge.link.messages_sent)
        )


def exposition(bridge: Bridge) -> Callable[[], bytes]:
    """A function that returns the text /metrics answers with."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BridgeCollector(bridge))
    ProcessCollector(registry=registry)
    return lambda: generate_latest(registry)


def _le(bound: float) -> str:
    """A bucket's `le` label as Prometheus writes it: 0.25, 1.0, +Inf."""
    return "+Inf" if math.isinf(bound) else repr(bound)
