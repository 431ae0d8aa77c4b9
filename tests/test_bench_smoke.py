"""Small runs of the fleet benchmark (bench/fleet.py) and the page benchmark (bench/page.py),
so they cannot rot.

A few meters for a few seconds, through the real command line: every figure is printed
(and, for the fleet, no request broke a meter's rate limit). No figure is judged for speed here: the
machine is shared, and the benchmark exists to print figures, not to pass or fail.
With node and npm present it also runs the Node-RED row (`--peer node-red`). With --http
(issue 10): the second bridge row, its page client (chromium where present, and the poller)
and its scrapes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import _http, browser, nats, nodered
from bench.fleet import _HTTP_LABELS, _LABELS
from bench.page import _LABELS as page_labels

ROOT = Path(__file__).resolve().parent.parent
#: Figures only the bridge has: its schedule lags and the relay commands (sent to it alone).
NOT_FOR_PEERS = {"lag_p50_ms", "lag_p99_ms", "lag_max_ms", "relay_p50_ms", "relay_p99_ms"}

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto is not on PATH")


def run_fleet(*options: str) -> tuple[str, dict[str, Any]]:
    """A few meters for a few seconds: the printed table and the JSON record."""
    command = [
        sys.executable, str(ROOT / "bench" / "fleet.py"), "--meters", "5", "--seconds", "6.5",
        "--warmup", "7", "--commands", "3", *options,
    ]  # fmt: skip
    done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table, _, last = done.stdout.rstrip("\n").rpartition("\n")
    record: dict[str, Any] = json.loads(last)
    return table, record


def table_cells(table: str, label: str) -> list[str]:
    """The cells of the table's line for `label`, one per column."""
    line = next((line for line in table.splitlines() if line.startswith(label + " ")), None)
    assert line is not None, label
    return line[len(label) :].split()


def test_fleet_benchmark_smoke_run() -> None:
    with_node_red = nodered.missing_tools() is None
    table, record = run_fleet("--peer", "floor", *(["--peer", "node-red"] if with_node_red else []))
    assert "CPU per poll, bridge / floor:" in table
    rows = record["rows"]
    assert set(rows) == ({"bridge", "floor", "node-red"} if with_node_red else {"bridge", "floor"})
    # The printed table: one column per peer, each cell the JSON figure, and every cell a
    # number but where a figure does not apply to a peer (n/a).
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("figure "))
    peers = header.split()[1:]
    assert set(peers) == set(rows), header
    for key, label in _LABELS:
        line = next((line for line in lines if line.startswith(label + " ")), None)
        assert line is not None, label
        cells = line[len(label) :].split()
        assert len(cells) == len(peers), line
        for peer, cell in zip(peers, cells, strict=True):
            value = rows[peer][key]
            assert cell == ("n/a" if value is None else str(value)), (peer, label, cell, value)
            if cell == "n/a":
                assert peer != "bridge" and key in NOT_FOR_PEERS, (peer, label)
            else:
                float(cell)
    for peer, row in rows.items():
        assert set(row) >= {key for key, _ in _LABELS}, peer
        assert row["violations_429"] == 0 and row["early_arrivals"] == 0, (peer, row)
        assert row["polls_per_s"] > 0, (peer, row)
        # CPU comes from /proc in 10 ms clock ticks: a handful of lean polls may cost less
        # than one, so 0.0 is a valid figure here.
        assert row["cpu_ms_per_poll"] >= 0 and row["peak_rss_mb"] > 0, (peer, row)
        assert row["subscriber"] in ("mosquitto_sub", "paho")
    bridge = rows["bridge"]
    # Every figure of the bridge's row is a number: a figure that went missing (n/a) is a
    # broken benchmark, not a slow bridge.
    numbers = {key: bridge[key] for key, _ in _LABELS}
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers.values()), numbers
    assert bridge["messages_per_s"] > 0
    assert (bridge["relay_commands"], bridge["relay_confirmed"]) == (3, 3)
    assert 0 < bridge["relay_p50_ms"] <= bridge["relay_p99_ms"]
    # The lags were recorded (a number, not n/a: not empty), and only from the measured window.
    assert 0 <= bridge["lag_p50_ms"] <= bridge["lag_p99_ms"] <= bridge["lag_max_ms"]
    assert all(rows[peer][key] is None for peer in rows if peer != "bridge" for key in NOT_FOR_PEERS), rows
    # The floor only polls: nothing reaches the subscriber from it, and it keeps the gaps.
    assert rows["floor"]["messages_per_s"] == 0
    assert "cpu_per_poll_ratio_floor" in record
    if with_node_red:
        # Printed; n/a when a handful of polls cost less than one 10 ms clock tick.
        ratio = record["cpu_per_poll_ratio"]
        assert ratio is None or ratio >= 0


@pytest.mark.skipif(browser.missing() is not None, reason=str(browser.missing()))
def test_page_benchmark_smoke_run() -> None:
    """bench/page.py on a handful of meters: every figure printed, the table the JSON's."""
    command = [sys.executable, str(ROOT / "bench" / "page.py"), "--meters", "5", "--refreshes", "2"]
    done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    table, _, last = done.stdout.rstrip("\n").rpartition("\n")
    figures = json.loads(last)
    assert figures["rows"] == 5 and figures["refreshes"] == 2
    assert (figures["filter_one_rows"], figures["filter_prefix_rows"], figures["filter_clear_rows"]) == (
        1,
        5,
        5,
    )
    assert 0 < figures["first_list_ms"] <= figures["first_painted_ms"]
    assert 0 <= figures["update_p50_ms"] <= figures["update_max_ms"]
    assert figures["update_p50_ms"] <= figures["update_frame_p50_ms"]
    lines = table.splitlines()
    for key, label in page_labels:
        line = next((line for line in lines if line.startswith(label + "  ")), None)
        assert line is not None, label
        assert line[len(label) :].strip() == str(figures[key]), (label, line)


@pytest.mark.parametrize("client", ["auto", "poller"])
def test_fleet_benchmark_http_smoke_run(client: str) -> None:
    """--http: a second bridge row with the page open and /metrics scraped; its figures
    printed in the table (n/a in the plain bridge's column) and in the JSON line."""
    table, record = run_fleet("--http", "--http-client", client)
    rows = record["rows"]
    assert list(rows) == ["bridge", "bridge+http"]
    served = rows["bridge+http"]
    kind = "chromium" if client == "auto" and _http.browser_missing() is None else "poller"
    assert served["http_client"] == record["http_client"] == kind
    assert f"(page client: {kind};" in table
    assert isinstance(record["http_cpu_pct_delta"], float)
    for key, label in [*_LABELS, *_HTTP_LABELS]:
        cells = table_cells(table, label)
        assert len(cells) == 2, (label, cells)
        for peer, cell in zip(rows, cells, strict=True):
            value = rows[peer].get(key)
            assert cell == ("n/a" if value is None else str(value)), (peer, label, cell, value)
    assert all(key not in rows["bridge"] for key, _ in _HTTP_LABELS), rows["bridge"]
    # The page refreshes every 2 s: about 3 answers in 6.5 s; one scrape in a short window.
    assert served["api_meters_answers"] >= 2 and served["metrics_scrapes"] == 1, served
    assert served["http_errors"] == 0, served
    assert 0 < served["api_meters_ms_p50"] <= served["api_meters_ms_max"], served
    assert 0 < served["metrics_ms_p50"] <= served["metrics_ms_max"], served
    assert served["api_meters_kb"] > 0 and served["metrics_kb"] > served["api_meters_kb"], served
    if kind == "chromium":
        assert served["page_client_cpu_pct"] >= 0 and served["page_render_ms"] is not None, served
    else:
        assert served["page_client_cpu_pct"] is None and served["page_render_ms"] is None, served
    assert served["violations_429"] == 0 and served["relay_confirmed"] == 3, served


@pytest.mark.skipif(
    nats.binary() is None, reason="nats-server is not installed (apt-get install nats-server)"
)
def test_fleet_benchmark_shards_smoke_run() -> None:
    """--shards 2 --broker nats (issue 11): a row of two shards after the one-instance row,
    with each shard's own figures, on a 3-node cluster whose last node carries the
    subscriber and the commands (on mosquitto the same code has one node)."""
    broker = "nats"
    table, record = run_fleet("--shards", "2", "--broker", broker, "--output", "json")
    rows = record["rows"]
    assert list(rows) == ["bridge", "2 shards"]
    assert (record["broker"], record["output"], record["shards"]) == (broker, "json", 2)
    for peer, row in rows.items():
        assert row["violations_429"] == 0 and row["early_arrivals"] == 0, (peer, row)
        assert row["states_seen"] == 5, (peer, row)  # every meter's state crossed the broker
        assert row["relay_confirmed"] == 3, (peer, row)
    shards = rows["2 shards"]["shards"]
    assert [shard["index"] for shard in shards] == [0, 1]
    assert sum(shard["meters"] for shard in shards) == 5
    for shard in shards:
        assert f"2 shards, shard {shard['index']}: {shard['meters']} meters" in table
    ratio = record["shard_cpu_per_poll_ratio"]
    assert ratio is None or ratio > 0  # n/a when a handful of polls cost less than a clock tick
    assert "CPU per poll, 2 shards (summed) / one instance:" in table
