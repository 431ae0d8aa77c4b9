"""Test helpers: a recording MQTT subscriber, the rig, simulated devices, bridge processes.

Ports, waits, mosquitto and gaps are bench.support's, shared with the benchmarks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.support import LOOPBACK, gaps
from bridge.config import DeviceSettings
from bridge.service import Bridge
from bridge.simulator import SimMeter, Simulator

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class BrokerProcess:
    """Where a test broker listens, and how to restart it (mosquitto only)."""

    kind: str
    port: int
    restart: Callable[[], None] | None = None


@dataclass(frozen=True)
class Rig:
    """A real broker, and factories that start simulators, bridges and probes on it."""

    broker: BrokerProcess
    simulator: Callable[..., Simulator]
    bridge: Callable[..., Bridge]
    probe: Callable[..., Probe]


@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool
    received: float = field(default_factory=time.monotonic)
    """When the probe got it (monotonic), to compare with the simulator's request_times."""

    def json(self) -> object:
        return json.loads(self.payload)


@dataclass
class Probe:
    """A subscriber that records everything, with waits that end on an event or a timeout."""

    port: int
    topic: str = "#"
    messages: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        # A unique id each: amqtt treats two empty client ids as one session.
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:12]}", protocol=paho.MQTTv311
        )
        client.on_connect = lambda c, u, f, rc, p: c.subscribe(self.topic, qos=1)
        client.on_subscribe = lambda *a: self._subscribed.set()
        client.on_message = self._on_message
        self.client = client

    def start(self) -> Probe:
        self.client.connect(LOOPBACK, self.port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "probe could not subscribe"
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Message(msg.topic, bytes(msg.payload), bool(msg.retain), time.monotonic()))
            self._cond.notify_all()

    def last(self, topic: str) -> Message | None:
        with self._cond:
            for message in reversed(self.messages):
                if message.topic == topic:
                    return message
        return None

    def wait_for(
        self,
        topic: str,
        predicate: Callable[[Message], bool] = lambda m: True,
        timeout: float = 15.0,
        *,
        after: int = 0,
    ) -> Message:
        """The first message on `topic` (from index `after` on) that satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for message in self.messages[after:]:
                    if message.topic == topic and predicate(message):
                        return message
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [m.payload for m in self.messages if m.topic == topic][-5:]
                    raise AssertionError(f"no matching message on {topic} within {timeout} s; last: {seen}")
                self._cond.wait(left)

    def mark(self) -> int:
        with self._cond:
            return len(self.messages)

    def sync(self, under: str, timeout: float = 10.0) -> None:
        """Return once everything the broker sent this probe before now has arrived.

        Publishes a marker on a fresh topic under `under` (which the probe must match) and
        waits for it: the broker forwards in order, so what was queued before is here.
        """
        topic = f"{under}/probe-sync-{uuid.uuid4().hex[:8]}"
        self.publish(topic, b"sync")
        self.wait_for(topic, timeout=timeout)

    def publish(self, topic: str, payload: bytes | str, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)


def device(sim: Simulator, meter: SimMeter, **options: object) -> DeviceSettings:
    """The config entry that points the bridge at a simulated meter."""
    values: dict[str, object] = {
        "id": meter.devid,
        "pin": meter.pin,
        "host": f"{LOOPBACK}:{sim.port}",
        "extended": meter.extended,
        "timeout": 2.0,
    }
    values.update(options)
    return DeviceSettings(**values)  # type: ignore[arg-type]


def assert_rate_limit_kept(sim: Simulator) -> None:
    """No two requests to one meter *arrived* closer than its model allows.

    Stronger than counting 429s: the simulator only checks requests against the last
    accepted one, so a refused or faulted request is not checked there; here every one is.
    """
    for meter in sim.meters.values():
        between = gaps(meter.request_times)
        assert not between or min(between) >= meter.interval, (meter.devid, meter.interval, min(between))
    assert sim.total_rate_limited() == 0


class Process:
    """`python -m bridge ...` with its output in files (a pipe could fill up and block it)."""

    def __init__(
        self, tmp_path: Path, *args: str, env: dict[str, str] | None = None, stdin: bytes = b""
    ) -> None:
        self.stdout_path = tmp_path / "stdout.txt"
        self.stderr_path = tmp_path / "stderr.txt"
        stdin_path = tmp_path / "stdin.txt"
        stdin_path.write_bytes(stdin)  # never the test runner's own stdin: no process waits on it
        full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
        with (
            open(self.stdout_path, "wb") as out,
            open(self.stderr_path, "wb") as err,
            open(stdin_path, "rb") as inp,
        ):
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bridge", *args],
                cwd=ROOT,
                env=full_env,
                stdin=inp,
                stdout=out,
                stderr=err,
            )

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def terminate(self, timeout: float = 5.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)
            self.proc.wait(5)
            raise AssertionError("did not exit:\n" + self.stderr[-5000:]) from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path
