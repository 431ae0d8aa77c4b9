"""/metrics: the bridge's state in Prometheus' text format, read when scraped.

A collector, not metric objects updated on every poll: the bridge already keeps every
figure (readings, counts, the durations' histogram, see status.py), so a scrape reads them
once, and polling pays nothing for metrics nobody scrapes. prometheus-client writes the
format of the bridge-wide families and the process_* ones; its own registry, so nothing
else in the process adds to it. The metric names are a contract (README "Metrics").

The four per-meter families (about 31 samples a meter: 62,000 at 2,000 meters) are written
here, line by line, in exactly the text generate_latest() writes for them (labels sorted by
name, escaped as it escapes them, values as its floatToGoString writes them; a test holds
the two equal). Through prometheus-client's metric objects a scrape at 2,000 meters took
330-345 ms of CPU on the bridge's loop, polling nothing meanwhile; this way 65-78 ms
(bench/httpcost.py). The label text of each meter, key and unit is kept between scrapes,
so a scrape mostly formats the values.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from .commands import COMMAND_RESULTS
from .status import RESULTS, TURN_METERS

if TYPE_CHECKING:
    from .service import Bridge, Meter

#: A scrape's lines of the four per-meter families, in METER_FAMILIES' order.
_Lines = tuple[list[str], list[str], list[str], list[str]]


#: (name, type, help) of the per-meter families, in the order they are written.
METER_FAMILIES: Final = (
    ("smartmac_meter_up", "gauge", "1: the meter answers, 0: it does not"),
    ("smartmac_reading", "gauge", "Every numeric reading of the last good read (energy counters guarded)"),
    ("smartmac_relay_on", "gauge", "1: the load relay is on"),
    ("smartmac_requests_total", "counter", "Requests to the meter, by how they ended"),
)


#: prometheus-client's value text (untyped there): repr of the float, Go's exponents, +Inf.
_go: Callable[[float], str] = floatToGoString


def _escape(value: str) -> str:
    """A label value as prometheus-client escapes it (backslash, newline, double quote)."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class MeterFamilies:
    """The per-meter families' text, from the bridge's state at the moment of the scrape."""

    def __init__(self, bridge: Bridge) -> None:
        self._bridge = bridge
        # Per meter (by segment): the start of its up, relay and requests lines.
        self._meter: dict[str, tuple[str, str, tuple[str, ...]]] = {}
        # Per (segment, key, unit): the start of a reading's line. Only what the last
        # scrape wrote is kept, so keys a meter no longer sends are forgotten here too.
        self._reading: dict[tuple[str, str, str], str] = {}

    def _prefixes(self, segment: str) -> tuple[str, str, tuple[str, ...]]:
        seg = _escape(segment)
        prefixes = (
            f'smartmac_meter_up{{meter="{seg}"}} ',
            f'smartmac_relay_on{{meter="{seg}"}} ',
            tuple(f'smartmac_requests_total{{meter="{seg}",result="{result}"}} ' for result in RESULTS),
        )
        self._meter[segment] = prefixes
        return prefixes

    def text(self) -> str:
        """All of it at once (what a test or a benchmark wants)."""
        lines: _Lines = ([], [], [], [])
        seen: dict[tuple[str, str, str], str] = {}
        self._write(self._bridge.meters, lines, seen)
        return self._end(lines, seen)

    async def text_in_turns(self, per_turn: int = TURN_METERS) -> str:
        """The same text, `per_turn` meters per turn of the loop: the loop polls meters and
        relays commands in between, where a scrape of 2,000 meters at once would hold it for
        60-80 ms. Each meter's lines are from one moment; the scrape spans a few turns."""
        meters = self._bridge.meters
        lines: _Lines = ([], [], [], [])
        seen: dict[tuple[str, str, str], str] = {}
        for start in range(0, len(meters), per_turn):
            if start:
                await asyncio.sleep(0)
            self._write(meters[start : start + per_turn], lines, seen)
        return self._end(lines, seen)

    def _write(self, meters: list[Meter], lines: _Lines, seen: dict[tuple[str, str, str], str]) -> None:
        up, reading, relay, requests = lines
        known = self._reading
        go = _go
        for meter in meters:
            segment = meter.device.segment
            up_at, relay_at, requests_at = self._meter.get(segment) or self._prefixes(segment)
            available = meter.api_available
            if available is not None:
                up.append(f"{up_at}{'1.0' if available else '0.0'}\n")
            if meter.last is not None and available is not False:
                # An offline meter's last values are not current ones: left out until it answers.
                for r in meter.last.readings:
                    label = (segment, r.key, r.unit)
                    start = known.get(label)
                    if start is None:
                        start = (
                            f'smartmac_reading{{key="{_escape(r.key)}",meter="{_escape(segment)}",'
                            f'unit="{_escape(r.unit)}"}} '
                        )
                    seen[label] = start
                    reading.append(f"{start}{go(r.value)}\n")
            if meter.relay is not None:
                relay.append(f"{relay_at}{'1.0' if meter.relay.value == 'ON' else '0.0'}\n")
            counts = meter.requests
            for at, result in zip(requests_at, RESULTS, strict=True):
                requests.append(f"{at}{go(counts[result])}\n")

    def _end(self, lines: _Lines, seen: dict[tuple[str, str, str], str]) -> str:
        self._reading = seen
        out: list[str] = []
        for (name, kind, doc), family in zip(METER_FAMILIES, lines, strict=True):
            out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
            out.extend(family)
        return "".join(out)


class BridgeCollector(Collector):
    """The bridge-wide smartmac_* metrics, from the bridge's state at the moment of the scrape."""

    def __init__(self, bridge: Bridge) -> None:
        self._bridge = bridge

    def collect(self) -> Iterator[Metric]:
        bridge = self._bridge
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


class Exposition:
    """The text /metrics answers with: the per-meter families, then the bridge-wide ones,
    then process_* (the order a single registry had them in)."""

    def __init__(self, bridge: Bridge) -> None:
        self._meters = MeterFamilies(bridge)
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(BridgeCollector(bridge))
        ProcessCollector(registry=self._registry)

    def __call__(self) -> bytes:
        """All at once."""
        return self._meters.text().encode() + generate_latest(self._registry)

    async def in_turns(self) -> bytes:
        """On the bridge's loop, a few hundred meters per turn (what the endpoint does)."""
        text = await self._meters.text_in_turns()
        return text.encode() + generate_latest(self._registry)


def exposition(bridge: Bridge) -> Exposition:
    """What /metrics answers with, for `bridge`."""
    return Exposition(bridge)


def _le(bound: float) -> str:
    """A bucket's `le` label as Prometheus writes it: 0.25, 1.0, +Inf."""
    return "+Inf" if math.isinf(bound) else repr(bound)
