"""The HTTP API, the probes and /metrics against the real bridge, simulator and broker.

The server runs on the bridge's own loop, as `run` starts it; every figure is checked
against what the simulator counted or what the bridge published on MQTT.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from support import Probe, Process, Rig, device, write_config

from bench.support import LOOPBACK, free_port, wait_for_port, wait_until
from bridge import service
from bridge.broker import EmbeddedBroker
from bridge.config import HttpSettings, MqttSettings
from bridge.service import Bridge
from bridge.simulator import SimMeter, Simulator
from bridge.web import WebServer

# One broker is enough here: the MQTT side is tested against both in test_e2e.py.
amqtt = pytest.mark.parametrize("broker", ["amqtt"], indirect=True)

PIN, OTHER_PIN, WRONG_PIN, PASSWORD = "Pin-4801x", "Pin-7331y", "Wrong-Pin-5z", "Pass-9Xq-77"
Serve = Callable[..., str]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Start a WebServer on a running bridge's loop, as `run` does; returns its base URL."""
    servers: list[tuple[WebServer, asyncio.AbstractEventLoop]] = []

    def start(bridge: Bridge, **http: Any) -> str:
        loop = bridge._loop
        assert loop is not None
        server = WebServer(bridge, HttpSettings(port=free_port(), **http))
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
        servers.append((server, loop))
        return server.url

    yield start
    for server, loop in servers:
        if loop.is_running():
            asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)


def metrics(url: str, **kwargs: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = requests.get(url + "metrics", timeout=5, **kwargs)
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def meters(url: str) -> dict[str, dict[str, Any]]:
    answer = requests.get(url + "api/meters", timeout=5)
    assert answer.status_code == 200
    return {row["topic"]: row for row in answer.json()}


@amqtt
def test_meters_and_metrics_say_what_mqtt_and_the_simulator_say(rig: Rig, serve: Serve) -> None:
    good = SimMeter(devid="1728053301", pin=PIN, phases=3, extended=True)
    wrong = SimMeter(devid="1728053302", pin=OTHER_PIN, extended=True)
    sim = rig.simulator([good, wrong])
    probe = rig.probe("smartmac/#")
    bridge = rig.bridge([device(sim, good, topic="good"), device(sim, wrong, pin=WRONG_PIN, topic="wrong")])
    url = serve(bridge)
    probe.wait_for("smartmac/good/state")

    rows = meters(url)
    assert list(rows) == ["good", "wrong"]
    row = rows["good"]
    assert set(row) == {
        *("id", "name", "topic", "extended", "available", "relay", "readings", "last_read", "last_error"),
        *("power", "energy"),
    }
    assert (row["id"], row["name"], row["extended"], row["available"]) == (good.devid, good.devid, True, True)
    assert row["relay"] == "OFF" and row["last_error"] is None and abs(row["last_read"] - time.time()) < 10
    # The readings are what B/D/KEY and B/D/state say.
    state = probe.wait_for("smartmac/good/state").json()
    assert isinstance(state, dict)
    for key, value in row["readings"].items():
        assert float(probe.wait_for(f"smartmac/good/{key}").payload) == value == state[key]
    assert row["power"] == row["readings"]["W"] if "W" in row["readings"] else True
    assert row["energy"] == sum(row["readings"][f"Wh{n}"] for n in (1, 2, 3))

    # The wrong PIN: false once its first request ended, with the error in words, no PIN.
    wait_until(lambda: meters(url)["wrong"]["available"] is False, 15, "the wrong PIN's meter unavailable")
    wrong_row = meters(url)["wrong"]
    assert "403" in wrong_row["last_error"] and wrong_row["readings"] == {} and wrong_row["relay"] is None
    assert wrong_row["power"] is None and wrong_row["last_read"] is None

    # What the simulator counted and what the bridge counted agree once no request is in
    # flight; the snapshot that agreed is the one checked.
    seen: list[dict[tuple[str, tuple[tuple[str, str], ...]], float]] = []

    def settled() -> bool:
        seen[:] = [metrics(url)]
        m = seen[0]
        return (
            m["smartmac_requests_total", (("meter", "good"), ("result", "ok"))] == good.ok
            and m["smartmac_requests_total", (("meter", "wrong"), ("result", "bad_pin"))] == wrong.bad_pin
        )

    wait_until(settled, 15, "the bridge's request counts equal the simulator's")
    m = seen[0]
    assert m["smartmac_requests_total", (("meter", "good"), ("result", "ok"))] == good.ok
    assert m["smartmac_requests_total", (("meter", "wrong"), ("result", "bad_pin"))] == wrong.bad_pin
    total = sum(v for (name, _), v in m.items() if name == "smartmac_requests_total")
    assert m["smartmac_request_duration_seconds_count", ()] == total == good.ok + wrong.bad_pin
    m = metrics(url)
    assert m["smartmac_meter_up", (("meter", "good"),)] == 1
    assert m["smartmac_meter_up", (("meter", "wrong"),)] == 0
    assert m["smartmac_relay_on", (("meter", "good"),)] == 0
    readings = {labels: v for (name, labels), v in m.items() if name == "smartmac_reading"}
    last = meters(url)["good"]["readings"]
    assert {dict(labels)["key"] for labels in readings} == set(last)
    assert readings[(("key", "V1"), ("meter", "good"), ("unit", "V"))] == last["V1"]
    assert not any(dict(labels)["meter"] == "wrong" for labels in readings)  # nothing read
    assert m["smartmac_mqtt_connected", ()] == 1 and m["smartmac_mqtt_messages_total", ()] > 0
    assert ("process_resident_memory_bytes", ()) in m
    for path in ("", "api/meters", "api/bridge", "metrics", "healthz", "readyz"):
        text = requests.get(url + path, timeout=5).text
        assert PIN not in text and OTHER_PIN not in text and WRONG_PIN not in text, path
    summary = requests.get(url + "api/bridge", timeout=5).json()
    assert (summary["meters"], summary["online"], summary["offline"], summary["mqtt_connected"]) == (
        2,
        1,
        1,
        True,
    )
    assert summary["shard"] is None  # not sharded (tests/test_shard.py has the shards)


def one_meter(
    rig: Rig, serve: Serve, devid: str, **options: object
) -> tuple[SimMeter, Simulator, Probe, Bridge, str]:
    """An extended simulated meter on topic `m`, a probe on smartmac/#, the bridge polling it
    and its server's URL."""
    meter = SimMeter(devid=devid, pin=PIN, extended=True)
    sim = rig.simulator([meter])
    probe = rig.probe("smartmac/#")
    bridge = rig.bridge([device(sim, meter, topic="m", **options)])
    return meter, sim, probe, bridge, serve(bridge)


def post(url: str, topic: str, body: bytes | str, **kwargs: Any) -> requests.Response:
    return requests.post(f"{url}api/meters/{topic}/relay", data=body, timeout=30, **kwargs)


@amqtt
def test_relay_commands_over_http_go_the_mqtt_way(rig: Rig, serve: Serve) -> None:
    meter, _, probe, bridge, url = one_meter(rig, serve, "1728053311")
    probe.wait_for("smartmac/m/relay", lambda m: m.payload == b"OFF")

    mark = probe.mark()
    answer = post(url, "m", "ON")
    assert (answer.status_code, answer.json()) == (200, {"ok": True, "relay": "ON"})
    assert meter.pout == 1
    published = probe.wait_for("smartmac/m/relay/result", after=mark)
    assert json.loads(published.payload) == answer.json() and not published.retain
    assert meters(url)["m"]["relay"] == "ON"

    mark = probe.mark()
    garbage = post(url, "m", "FLIP")
    assert garbage.status_code == 400 and "unknown command" in garbage.json()["error"]
    assert json.loads(probe.wait_for("smartmac/m/relay/result", after=mark).payload) == garbage.json()
    mark = probe.mark()
    too_long = post(url, "m", "ON" + " " * 2000)  # beyond what the server reads (1 KiB)
    assert too_long.status_code == 400 and too_long.json()["error"].startswith("payload too long")
    assert json.loads(probe.wait_for("smartmac/m/relay/result", after=mark).payload) == too_long.json()
    assert post(url, "nobody", "ON").status_code == 404
    assert post(url, "m", "ON", headers={"Origin": "http://evil.example"}).status_code == 403
    assert meter.pout == 1

    # Two commands before the next slot: the first is superseded, the second switches.
    answers: list[requests.Response] = []
    first = threading.Thread(target=lambda: answers.append(post(url, "m", "OFF")))
    first.start()
    wait_until(lambda: bridge.commands_total["superseded"] == 0 and "m" in bridge._waiting, 15, "OFF waiting")
    host = url.removeprefix("http://").rstrip("/")
    second = post(url, "m", "TOGGLE", headers={"Origin": f"http://{host}"})  # same origin: allowed
    first.join(30)
    assert answers[0].status_code == 409 and answers[0].json() == {"ok": False, "error": "superseded"}
    # TOGGLE of the waiting OFF: ON again, which the relay already is.
    assert (second.status_code, second.json()) == (200, {"ok": True, "relay": "ON"})

    read_only = serve(bridge, read_only=True)
    refused = post(read_only, "m", "OFF")
    assert refused.status_code == 403 and "read only" in refused.json()["error"]
    page = requests.get(read_only, timeout=5)
    assert page.status_code == 200 and "data-summary" in page.text
    assert meter.pout == 1
    m = metrics(url)
    assert m["smartmac_relay_on", (("meter", "m"),)] == 1
    assert {r: m["smartmac_commands_total", (("result", r),)] for r in ("ok", "superseded", "rejected")} == {
        "ok": 2,
        "superseded": 1,
        "rejected": 2,
    }


@amqtt
def test_a_command_the_meter_never_confirms_is_504(rig: Rig, serve: Serve) -> None:
    meter, sim, probe, _, url = one_meter(rig, serve, "1728053321", timeout=0.5)
    probe.wait_for("smartmac/m/state")
    sim.set_fault(meter.devid, "refuse")
    started = time.monotonic()
    answer = post(url, "m", "ON")
    assert answer.status_code == 504, answer.text
    assert answer.json()["error"].startswith("not confirmed by the meter within 13 s")
    assert time.monotonic() - started < 20 and meter.pout == 0
    assert metrics(url)["smartmac_commands_total", (("result", "failed"),)] == 1


@amqtt
def test_an_open_command_gets_503_when_the_bridge_stops(rig: Rig, serve: Serve) -> None:
    meter, sim, probe, bridge, url = one_meter(rig, serve, "1728053331")
    probe.wait_for("smartmac/m/state")
    sim.set_fault(meter.devid, "refuse")
    answers: list[requests.Response] = []
    waiting = threading.Thread(target=lambda: answers.append(post(url, "m", "ON")))
    waiting.start()
    wait_until(lambda: "m" in bridge._waiting, 15, "the command waiting")
    bridge.stop()
    waiting.join(10)
    assert answers and answers[0].status_code == 503
    assert answers[0].json() == {"ok": False, "error": "bridge shutting down"}


@amqtt
def test_basic_auth_everywhere_but_the_probes(rig: Rig, serve: Serve) -> None:
    meter = SimMeter(devid="1728053341", pin=PIN, extended=True)
    sim = rig.simulator([meter])
    bridge = rig.bridge([device(sim, meter, topic="m")])
    named = serve(bridge, username="admin", password=PASSWORD)
    anyone = serve(bridge, password=PASSWORD)
    for url in (named, anyone):
        for path in ("", "api/meters", "api/bridge", "metrics"):
            refused = requests.get(url + path, timeout=5)
            assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Basic")
            wrong = requests.get(url + path, auth=("admin", "guess"), timeout=5)
            assert wrong.status_code == 401
            good = requests.get(url + path, auth=("admin", PASSWORD), timeout=5)
            assert good.status_code == 200 and PASSWORD not in good.text
        assert post(url, "m", "ON").status_code == 401
        assert requests.get(url + "healthz", timeout=5).status_code == 200
        ready = url + "readyz"
        wait_until(lambda: requests.get(ready, timeout=5).status_code == 200, 15, "ready")  # noqa: B023
        broken = {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}
        assert requests.get(url + "api/meters", headers=broken, timeout=5).status_code == 401
        assert requests.get(url, headers={"Authorization": "Basic %%%"}, timeout=5).status_code == 401
    # A username is checked where one is configured; any one goes where none is.
    assert requests.get(named + "api/meters", auth=("root", PASSWORD), timeout=5).status_code == 401
    assert requests.get(anyone + "api/meters", auth=("root", PASSWORD), timeout=5).status_code == 200


def test_readiness_follows_the_broker_and_health_the_loop(tmp_path: Path, serve: Serve) -> None:
    port = free_port()
    broker = EmbeddedBroker(LOOPBACK, port).start()
    bridge = Bridge([], MqttSettings(host=LOOPBACK, port=port), host=LOOPBACK, port=port)
    bridge.start()
    try:
        url = serve(bridge)
        wait_until(lambda: requests.get(url + "readyz", timeout=5).status_code == 200, 15, "ready")
        healthy = requests.get(url + "healthz", timeout=5)
        assert (healthy.status_code, healthy.text) == (200, "ok\n")
        broker.stop()
        wait_until(lambda: requests.get(url + "readyz", timeout=5).status_code == 503, 15, "not ready")
        assert "not connected" in requests.get(url + "readyz", timeout=5).text
        assert metrics(url)["smartmac_mqtt_connected", ()] == 0
        assert requests.get(url + "healthz", timeout=5).status_code == 200  # the loop still turns
        broker = EmbeddedBroker(LOOPBACK, port).start()
        wait_until(lambda: requests.get(url + "readyz", timeout=5).status_code == 200, 40, "ready again")
        # The bridge's heartbeat stops (as when its loop stalls, or run() has ended while
        # the server still answers): 503 once the last beat is 10 s old.
        loop = bridge._loop
        assert loop is not None

        async def stall() -> None:
            assert bridge._tick_handle is not None
            bridge._tick_handle.cancel()
            bridge.beat -= 11

        asyncio.run_coroutine_threadsafe(stall(), loop).result(5)
        stalled = requests.get(url + "healthz", timeout=5)
        assert stalled.status_code == 503 and "last turned 11 s ago" in stalled.text
    finally:
        bridge.stop()
        broker.stop()


@amqtt
def test_bridge_health_every_interval_not_retained(
    rig: Rig, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "HEALTH_INTERVAL", 1.0)
    meter = SimMeter(devid="1728053351", pin=PIN, extended=True)
    sim = rig.simulator([meter])
    probe = rig.probe("smartmac/#")
    rig.bridge([device(sim, meter, topic="m")])
    probe.wait_for("smartmac/m/state")
    health = probe.wait_for("smartmac/bridge/health", lambda m: json.loads(m.payload)["requests"]["ok"] > 0)
    assert not health.retain
    doc = health.json()
    assert isinstance(doc, dict)
    assert set(doc) == {"uptime_s", "meters", "polls_per_s", "requests", "mqtt_messages_per_s", "rss_mb"}
    assert doc["meters"] == {"online": 1, "offline": 0, "unknown": 0}
    assert doc["requests"]["ok"] == meter.ok and doc["rss_mb"] > 1
    assert PIN not in health.payload.decode()


def test_run_stops_on_a_taken_http_port(tmp_path: Path, processes: list[Process]) -> None:
    taken = free_port()
    with socket.create_server((LOOPBACK, taken)):
        config = write_config(
            tmp_path,
            f"http: {{port: {taken}}}\nmqtt: {{host: 127.0.0.1, port: {free_port()}}}\n"
            "devices: [{id: '1', pin: 'x', host: '127.0.0.1:9'}]\n",
        )
        run = Process(tmp_path, "run", "--config", str(config))
        processes.append(run)
        assert run.proc.wait(20) == 1
    assert f"http.port: 127.0.0.1:{taken} is already in use" in run.stderr


def test_demo_runs_without_the_page_when_its_port_is_taken(tmp_path: Path, processes: list[Process]) -> None:
    taken, broker = free_port(), free_port()
    with socket.create_server((LOOPBACK, taken)):
        env = {"SMARTMAC_HTTP__PORT": str(taken), "SMARTMAC_EMBEDDED_BROKER__PORT": str(broker)}
        demo = Process(tmp_path, "demo", env=env)
        processes.append(demo)
        wait_for_port(broker)
        probe = Probe(broker, "smartmac/#").start()
        try:
            probe.wait_for("smartmac/demo3/state")
        finally:
            probe.stop()
        assert f"Status page: http://127.0.0.1:{taken}/" in demo.stdout
        assert "running without the status page" in demo.stderr
        assert demo.terminate() == 0
