"""The one support module of the tests and the benchmarks: free loopback ports, waits,
a mosquitto process, request gaps and percentiles.

Here, not in tests/, because bench is a package: ``bench.support`` is one module under one
name both in pytest (``pythonpath = ["."]``) and in ``python bench/fleet.py`` (which puts
the repository root on sys.path). Only the standard library: the benchmark's bare floor
client imports it too, and must stay lean.
"""

from __future__ import annotations

import itertools
import math
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0, *, host: str = LOOPBACK) -> None:
    """Return once something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)  # a port has no event to wait on
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:g} s")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """For state with no event to wait on: check every 10 ms; AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.01)


def gaps(times: Iterable[float]) -> list[float]:
    """The gaps between consecutive times, e.g. a simulated meter's request_times."""
    return [later - earlier for earlier, later in itertools.pairwise(list(times))]


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list; NaN for an empty one."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


class Mosquitto:
    """A mosquitto process: its config, and its output (mosquitto.out), in `directory`.

    By default one anonymous listener on host:port, nothing persisted; `config` replaces
    those lines, and `listeners` are further ports start() waits for.
    """

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        host: str = LOOPBACK,
        config: Sequence[str] | None = None,
        listeners: Sequence[int] = (),
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.host = host
        self.port = free_port() if port is None else port
        self.ports = [self.port, *listeners]
        self.conf = directory / "mosquitto.conf"
        self.output = directory / "mosquitto.out"
        if config is None:
            config = [f"listener {self.port} {host}", "allow_anonymous true", "persistence false"]
        self.conf.write_text("\n".join(config) + "\n")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def start(self) -> Mosquitto:
        """Start, and return once every listener accepts connections."""
        binary = shutil.which("mosquitto")
        if binary is None:
            raise RuntimeError("mosquitto is not on PATH (apt-get install mosquitto)")
        with open(self.output, "ab") as out:
            self.process = subprocess.Popen([binary, "-c", str(self.conf)], stdout=out, stderr=out)
        try:
            for port in self.ports:
                wait_for_port(port, host=self.host)
        except TimeoutError:
            self.stop()
            raise RuntimeError(
                f"mosquitto did not start:\n{self.output.read_text(errors='replace')}"
            ) from None
        return self

    def stop(self) -> None:
        """Killed, as by a crash: with persistence, nothing is saved."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=5)
            self.process = None

    def terminate(self, timeout: float = 10.0) -> None:
        """Stopped as an administrator would (SIGTERM): with persistence, it saves first."""
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            finally:
                self.stop()  # killed only if SIGTERM did not end it; the timeout still raises

    def restart(self, *, graceful: bool = False) -> None:
        """Gone and back on the same ports: killed (nothing saved) unless `graceful`."""
        if graceful:
            self.terminate()
        else:
            self.stop()
        self.start()
