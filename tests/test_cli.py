"""The command line, run as a user runs it: a real process, real signals, real ports."""

from __future__ import annotations

import signal
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from shapes import json_object
from support import Probe, Process, Rig, write_config

from bench.support import LOOPBACK, free_port, wait_for_port
from bridge.simulator import SimMeter, Simulator

PIN = "470193"


def test_run_publishes_and_sigterm_publishes_offline(
    tmp_path: Path, rig: Rig, processes: list[Process]
) -> None:
    meter = SimMeter(devid="1728053249", pin=PIN, phases=3, extended=True)
    sim = rig.simulator([meter])
    config = write_config(
        tmp_path,
        f"""
mqtt: {{host: {LOOPBACK}, port: {rig.broker.port}, client_id: cli-test}}
devices:
  - {{id: "{meter.devid}", pin: "{PIN}", host: "{LOOPBACK}:{sim.port}", topic: garage, extended: true}}
""",
    )
    probe = rig.probe("smartmac/#")
    bridge = Process(tmp_path, "run", "--config", str(config), "--log-level", "debug")
    processes.append(bridge)
    probe.wait_for("smartmac/garage/state")
    probe.wait_for("smartmac/garage/availability", lambda m: m.payload == b"online")
    mark = probe.mark()

    assert bridge.terminate() == 0
    probe.wait_for("smartmac/garage/availability", lambda m: m.payload == b"offline", after=mark, timeout=1)
    probe.wait_for("smartmac/bridge/availability", lambda m: m.payload == b"offline", after=mark, timeout=1)
    assert PIN not in bridge.stderr and PIN not in bridge.stdout
    assert all(PIN.encode() not in m.payload for m in probe.messages)
    assert "Traceback" not in bridge.stderr


def test_config_via_environment_and_sigint(tmp_path: Path, rig: Rig, processes: list[Process]) -> None:
    meter = SimMeter(devid="17", pin=PIN, phases=1, extended=False)
    sim = rig.simulator([meter])
    env = {
        "SMARTMAC_MQTT__HOST": LOOPBACK,
        "SMARTMAC_MQTT__PORT": str(rig.broker.port),
        "SMARTMAC_MQTT__BASE_TOPIC": "env/base",
        "SMARTMAC_DEVICES": f'[{{"id": "17", "pin": "{PIN}", "host": "{LOOPBACK}:{sim.port}"}}]',
    }
    probe = rig.probe("env/#")
    bridge = Process(tmp_path, env=env)  # no subcommand: run
    processes.append(bridge)
    probe.wait_for("env/base/17/state")
    mark = probe.mark()
    bridge.proc.send_signal(signal.SIGINT)
    assert bridge.proc.wait(5) == 0
    probe.wait_for("env/base/bridge/availability", lambda m: m.payload == b"offline", after=mark, timeout=1)


def test_embedded_broker_when_no_host_is_configured(
    tmp_path: Path, simulator: Callable[..., Simulator], processes: list[Process]
) -> None:
    meter = SimMeter(devid="17", pin=PIN, phases=1, extended=True)
    sim = simulator([meter])
    port = free_port()
    config = write_config(
        tmp_path,
        f"""
embedded_broker: {{host: {LOOPBACK}, port: {port}}}
devices: [{{id: "17", pin: "{PIN}", host: "{LOOPBACK}:{sim.port}", extended: true}}]
""",
    )
    bridge = Process(tmp_path, "run", "--config", str(config))
    processes.append(bridge)
    wait_for_port(port)
    probe = Probe(port, "smartmac/#").start()
    try:
        assert json_object(probe.wait_for("smartmac/17/state").json())["devid"] == "17"
        late = Probe(port, "smartmac/17/state").start()
        late.wait_for("smartmac/17/state", lambda m: m.retain, timeout=5)
        late.stop()
        assert bridge.terminate() == 0
    finally:
        probe.stop()
    assert f"using the embedded broker on {LOOPBACK}:{port}" in bridge.stderr
    with pytest.raises(OSError):  # the broker went away with the bridge
        wait_for_port(port, timeout=0.5)


def test_embedded_port_taken_is_a_clear_error(tmp_path: Path, processes: list[Process]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(
            tmp_path,
            f'embedded_broker: {{port: {port}}}\ndevices: [{{id: "1", pin: "{PIN}", host: {LOOPBACK}}}]\n',
        )
        bridge = Process(tmp_path, "run", "--config", str(config))
        processes.append(bridge)
        assert bridge.proc.wait(10) == 1
    assert f"{port}" in bridge.stderr and "already in use" in bridge.stderr
    assert "Traceback" not in bridge.stderr


def test_demo_runs_on_embedded_defaults(tmp_path: Path, processes: list[Process]) -> None:
    port = free_port()
    # Its page on a free port too: 8099 may be taken by a demo someone is running.
    env = {"SMARTMAC_EMBEDDED_BROKER__PORT": str(port), "SMARTMAC_HTTP__PORT": str(free_port())}
    demo = Process(tmp_path, "demo", env=env)
    processes.append(demo)
    wait_for_port(port)
    probe = Probe(port, "smartmac/#").start()
    try:
        three = json_object(probe.wait_for("smartmac/demo3/state").json())
        one = json_object(probe.wait_for("smartmac/demo1/state").json())
        assert {"V3", "Wh3", "rWh3"} <= set(three) and "V1" in one and "V2" not in one
        assert f"mosquitto_sub -h 127.0.0.1 -p {port} -t 'smartmac/#' -v" in demo.stdout
        assert demo.terminate() == 0
    finally:
        probe.stop()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("devices: [{id: '1', pin: 12, host: h}]", "devices.0.pin: must be a quoted string"),
        ("mqtt: {hots: x}", "mqtt.hots: unknown key"),
        ("", "no meters configured"),
        # Topic settings a broker refuses: refused before anything starts (issue 12).
        (r'mqtt: {base_topic: "smart\tmac"}', "mqtt.base_topic: must not contain"),
        (r'homeassistant: {prefix: "ha\uFFFF"}', "homeassistant.prefix: must not contain"),
        (
            r'devices: [{id: "1", pin: "x", host: h, topic: "gar\x07age"}]',
            "devices.0.topic: must be one topic level",
        ),
        (r'mqtt: {client_id: "bridge\x00"}', "mqtt.client_id: must not contain"),
        (
            "devices: [{id: '1', pin: 'x', host: '127.0.0.1:0'}]",
            "devices.0.host: port must be a number from 1 to 65535",
        ),
        (
            "devices: [{id: '1', pin: 'x', host: 'http://:pw@h'}]",
            "devices.0.host: give host or host:port only",
        ),
    ],
)
def test_config_errors_exit_2_with_the_key(
    tmp_path: Path, processes: list[Process], config: str, message: str
) -> None:
    process = Process(tmp_path, "run", "--config", str(write_config(tmp_path, config)))
    processes.append(process)
    assert process.proc.wait(10) == 2
    assert message in process.stderr and "Traceback" not in process.stderr


def test_a_config_file_that_is_not_utf8_exits_2(tmp_path: Path, processes: list[Process]) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"devices: [{id: '1', pin: '\xe9t\xe9', host: h}]\n")  # latin-1
    process = Process(tmp_path, "run", "--config", str(path))
    processes.append(process)
    assert process.proc.wait(10) == 2
    assert "line 1: not UTF-8 text" in process.stderr and "Traceback" not in process.stderr


# '+' reads as a space in a query, '&' and '#' end the value, '%' starts an escape: only
# percent-encoded does this PIN reach the simulator (which decodes with parse_qs) intact.
ODD_PIN = "a+b&c#d%e f"


def test_run_and_probe_with_a_pin_that_needs_encoding(
    tmp_path: Path, rig: Rig, processes: list[Process]
) -> None:
    meter = SimMeter(devid="17", pin=ODD_PIN, phases=1, extended=True)
    sim = rig.simulator([meter], tolerance=6.0)
    probe = Process(tmp_path, "probe", "--host", f"{LOOPBACK}:{sim.port}", "--id", "17", "--pin", ODD_PIN)
    processes.append(probe)
    assert probe.proc.wait(10) == 0, probe.stderr
    assert any(line.startswith("V1") for line in probe.stdout.splitlines())

    config = write_config(
        tmp_path,
        f"""
mqtt: {{host: {LOOPBACK}, port: {rig.broker.port}, client_id: cli-odd-pin}}
devices:
  - {{id: "17", pin: "{ODD_PIN}", host: "{LOOPBACK}:{sim.port}", extended: true}}
""",
    )
    messages = rig.probe("smartmac/#")
    bridge = Process(tmp_path, "run", "--config", str(config), "--log-level", "debug")
    processes.append(bridge)
    messages.wait_for("smartmac/17/state")
    messages.wait_for("smartmac/17/availability", lambda m: m.payload == b"online")
    assert bridge.terminate() == 0
    assert meter.bad_pin == 0 and meter.ok == 2
    encoded = urllib.parse.quote(ODD_PIN, safe="")
    for text in (ODD_PIN, encoded):
        assert text not in bridge.stderr + bridge.stdout + probe.stderr + probe.stdout
        assert all(text.encode() not in m.payload for m in messages.messages)


def test_probe_prints_a_table(
    tmp_path: Path, simulator: Callable[..., Simulator], processes: list[Process]
) -> None:
    meter = SimMeter(devid="1728053249", pin=PIN, phases=3, extended=True)
    sim = simulator([meter])
    probe = Process(
        tmp_path,
        "probe",
        "--host",
        f"{LOOPBACK}:{sim.port}",
        "--id",
        meter.devid,
        "--pin",
        PIN,
        "--relay",
        "on",
    )
    processes.append(probe)
    assert probe.proc.wait(10) == 0, probe.stderr
    lines = probe.stdout.splitlines()
    assert lines[1].split() == ["key", "name", "value", "unit"]
    assert any(line.split()[:3] == ["V1", "Voltage", "1"] and line.endswith("V") for line in lines)
    assert any(line.startswith("relay") and "ON" in line for line in lines)
    assert meter.pout == 1


def test_probe_wrong_pin_is_a_clear_error(
    tmp_path: Path, simulator: Callable[..., Simulator], processes: list[Process]
) -> None:
    meter = SimMeter(devid="17", pin=PIN, phases=1)
    sim = simulator([meter])
    wrong = "555123"
    probe = Process(tmp_path, "probe", "--host", f"{LOOPBACK}:{sim.port}", "--id", "17", "--pin", wrong)
    processes.append(probe)
    assert probe.proc.wait(10) == 1
    assert "devid/PIN refused" in probe.stderr and wrong not in probe.stderr


@pytest.mark.parametrize("how", ["environment", "stdin"])
def test_probe_takes_the_pin_from_outside_argv(
    tmp_path: Path, simulator: Callable[..., Simulator], processes: list[Process], how: str
) -> None:
    """argv is visible to every user in ps: the PIN can come from SMARTMAC_PIN or be typed."""
    meter = SimMeter(devid="17", pin=PIN, phases=1)
    sim = simulator([meter])
    args = ("probe", "--host", f"{LOOPBACK}:{sim.port}", "--id", "17")
    if how == "environment":
        probe = Process(tmp_path, *args, env={"SMARTMAC_PIN": PIN})
    else:
        probe = Process(tmp_path, *args, stdin=f"{PIN}\n".encode())
    processes.append(probe)
    assert probe.proc.wait(10) == 0, probe.stderr
    assert "meter 17 at" in probe.stdout and PIN not in probe.stdout + probe.stderr


def test_probe_without_any_pin_is_a_config_error(
    tmp_path: Path, processes: list[Process], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SMARTMAC_PIN", raising=False)
    probe = Process(tmp_path, "probe", "--host", f"{LOOPBACK}:1", "--id", "17")
    processes.append(probe)
    assert probe.proc.wait(10) == 2
    assert "--pin: no PIN given" in probe.stderr


def test_probe_pin_that_is_not_text_is_a_config_error(tmp_path: Path, processes: list[Process]) -> None:
    probe = Process(
        tmp_path, "probe", "--host", f"{LOOPBACK}:1", "--id", "17", env={"SMARTMAC_PIN": "12\t34"}
    )
    processes.append(probe)
    assert probe.proc.wait(10) == 2
    assert "--pin: holds a control character" in probe.stderr and "Traceback" not in probe.stderr


def test_simulate_serves_and_lists_meters(tmp_path: Path, processes: list[Process]) -> None:
    port = free_port()
    sim = Process(tmp_path, "simulate", "--port", str(port), "--devices", "2", "--phases", "3", "--extended")
    processes.append(sim)
    wait_for_port(port)
    listed = [line.split() for line in sim.stdout.splitlines() if line[:1].isdigit()]
    assert len(listed) == 2
    devid, pin = listed[0][0], listed[0][1]
    query = urllib.parse.urlencode({"page": "getdata", "devid": devid, "devpass": pin})
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/?{query}", timeout=5) as answer:
        assert answer.status == 200 and b'"V3"' in answer.read()
    assert sim.terminate() == 0
