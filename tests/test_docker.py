"""Docker: the compose file and Dockerfile say what the README says, and the demo works.

No Docker daemon is needed: the demo bridge's device list (from docker-compose.yml) is run
against the simulator the demo's `simulate` command would start, on loopback.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from shapes import json_object
from support import Rig

from bench.support import LOOPBACK
from bridge.config import DeviceSettings, load_settings
from bridge.simulator import Simulator, make_fleet

ROOT = Path(__file__).parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_services_and_profiles() -> None:
    assert set(SERVICES) == {"mosquitto", "bridge", "simulator", "demo-bridge"}
    assert "profiles" not in SERVICES["mosquitto"] and "profiles" not in SERVICES["bridge"]
    assert SERVICES["simulator"]["profiles"] == SERVICES["demo-bridge"]["profiles"] == ["demo"]
    assert SERVICES["mosquitto"]["image"].startswith("eclipse-mosquitto:")
    # The anonymous broker is published on this host only.
    assert all(port.startswith("127.0.0.1:") for port in SERVICES["mosquitto"]["ports"])
    bridge = SERVICES["bridge"]
    assert bridge["environment"]["SMARTMAC_CONFIG"] == "/config/config.yaml"
    assert "./config.yaml:/config/config.yaml:ro" in bridge["volumes"]
    # Two bridges on one broker need their own client id and base topic.
    demo = SERVICES["demo-bridge"]["environment"]
    assert demo["SMARTMAC_MQTT__BASE_TOPIC"] != "smartmac"
    assert demo["SMARTMAC_MQTT__CLIENT_ID"] != "smartmac-bridge"
    # Its status page is published on this host only, on the port the image exposes.
    assert SERVICES["demo-bridge"]["ports"] == [f"127.0.0.1:{demo['SMARTMAC_HTTP__PORT']}:8099"]
    assert "EXPOSE 8099" in (ROOT / "Dockerfile").read_text()


def test_dockerfile_runs_as_non_root_from_a_slim_image() -> None:
    lines = [line.split() for line in (ROOT / "Dockerfile").read_text().splitlines() if line.strip()]
    instructions = [(words[0], words[1:]) for words in lines if not words[0].startswith("#")]
    (base,) = [args[0] for op, args in instructions if op == "FROM"]
    assert base.startswith("python:") and base.endswith("-slim")
    users = [args[0] for op, args in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ("ENTRYPOINT", ['["smartmac-bridge"]']) in instructions
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "config.yaml" in ignored  # a config with PINs never goes into an image


def _demo_settings(monkeypatch: pytest.MonkeyPatch) -> tuple[DeviceSettings, ...]:
    for name, value in SERVICES["demo-bridge"]["environment"].items():
        monkeypatch.setenv(name, str(value))
    settings = load_settings()
    assert settings.mqtt.host == "mosquitto" and settings.mqtt.base_topic == "smartmac-demo"
    assert settings.http.port == 8099 and settings.http.password is not None
    return settings.devices


def _simulate_args() -> dict[str, str | bool]:
    command = SERVICES["simulator"]["command"]
    assert command[0] == "simulate"
    args: dict[str, str | bool] = {}
    words = iter(command[1:])
    for word in words:
        args[word] = True if word == "--extended" else next(words)
    return args


def test_demo_bridge_polls_the_demo_simulator(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    devices = _demo_settings(monkeypatch)
    args = _simulate_args()
    assert args["--host"] == "0.0.0.0" and args["--port"] == "8080"  # inside the container
    fleet = make_fleet(
        int(args["--devices"]), phases=int(args["--phases"]), extended=bool(args.get("--extended"))
    )
    assert [(d.id, d.pin.get_secret_value()) for d in devices] == [(m.devid, m.pin) for m in fleet]
    assert {d.host for d in devices} == {"simulator:8080"}
    # The same devices, pointed at the simulator here instead of the container's name.
    sim: Simulator = rig.simulator(fleet)
    local = [d.model_copy(update={"host": f"{LOOPBACK}:{sim.port}"}) for d in devices]
    monkeypatch.undo()  # the bridge under test gets the test broker, not "mosquitto"
    probe = rig.probe("smartmac-demo/#")
    rig.bridge(local, base_topic="smartmac-demo")
    for device in devices:
        state = json_object(probe.wait_for(f"smartmac-demo/{device.segment}/state").json())
        assert state["devid"] == device.id
    assert sim.total_rate_limited() == 0 and all(m.bad_pin == 0 for m in fleet)


@pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="docker-compose not installed (CI installs it)"
)
def test_compose_file_is_valid() -> None:
    # What CI runs (`docker-compose config -q`), here with the demo profile's services too.
    result = subprocess.run(
        ["docker-compose", "--profile", "demo", "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert set(yaml.safe_load(result.stdout)["services"]) == set(SERVICES)
