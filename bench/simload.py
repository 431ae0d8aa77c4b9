"""The simulator alone under fleet load: is it fast enough not to be the bottleneck?

Starts `smartmac-bridge simulate` for N extended 3-phase meters as its own process and
asks every meter once per period (default 6.1 s: the 6 s limit plus room for this client's
own jitter), the meters spread evenly over the period, as the bridge would. Prints the
rate achieved, the answer times, the status codes and the simulator's CPU per request.

    python bench/simload.py --meters 2000 --seconds 30 --delay 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bench.procstat import cpu_seconds, peak_rss_mb
from bench.support import free_port, percentile, wait_for_port
from bridge.simulator import make_fleet


async def _get(port: int, request: bytes) -> tuple[int, float]:
    """One HTTP/1.0 exchange: (status, seconds from connect to the last byte)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        answer = await reader.read()  # HTTP/1.0 with Connection: close: read to EOF
    finally:
        writer.close()
    return int(answer[9:12]), time.monotonic() - started


async def _load(port: int, meters: int, period: float, seconds: float, warmup: float) -> dict[str, object]:
    fleet = make_fleet(meters, phases=3, extended=True)
    requests = [
        f"GET /?page=getdata&devid={m.devid}&devpass={m.pin} HTTP/1.0\r\n\r\n".encode() for m in fleet
    ]
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    lateness: list[float] = []
    start = time.monotonic() + 0.2
    measure_from = start + warmup
    end = measure_from + seconds
    tasks: set[asyncio.Task[None]] = set()

    async def one(index: int, planned: float) -> None:
        lateness.append(time.monotonic() - planned)
        try:
            status, took = await _get(port, requests[index])
        except OSError as exc:
            statuses[type(exc).__name__] += 1
            return
        if planned >= measure_from:
            statuses[str(status)] += 1
            latencies.append(took)

    # One timeline for the whole fleet: request k goes to meter k % N at start + k * step.
    step = period / meters
    k = 0
    while True:
        planned = start + k * step
        if planned >= end:
            break
        delay = planned - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(k % meters, planned))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        k += 1
    await asyncio.gather(*tasks)
    latencies.sort()
    lateness.sort()
    return {
        "requests": sum(statuses.values()),
        "statuses": dict(statuses),
        "answer_p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "answer_p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "client_late_p99_ms": round(percentile(lateness, 99) * 1000, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--meters", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=7.0)
    parser.add_argument("--delay", type=float, default=100.0, metavar="MS", help="answer delay")
    parser.add_argument("--period", type=float, default=6.1, help="seconds between requests to one meter")
    args = parser.parse_args(argv)

    port = free_port()
    command = [
        sys.executable, "-m", "bridge", "simulate", "--port", str(port),
        "--devices", str(args.meters), "--phases", "3", "--extended",
        "--delay", str(args.delay / 1000), "--log-level", "WARNING",
    ]  # fmt: skip
    sim = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout=30)
        cpu_before: list[float] = []

        async def run() -> dict[str, object]:
            async def mark() -> None:
                await asyncio.sleep(0.2 + args.warmup)
                cpu_before.append(cpu_seconds(sim.pid))

            marker = asyncio.create_task(mark())
            result = await _load(port, args.meters, args.period, args.seconds, args.warmup)
            await marker
            return result

        result = asyncio.run(run())
        # Requests still answering at the end were started in the window: count their CPU.
        cpu = cpu_seconds(sim.pid) - cpu_before[0]
        rss = peak_rss_mb(sim.pid)
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(10)
    requests = result["requests"]  # a count: sum() of the statuses' counts
    assert isinstance(requests, int)
    result.update(
        meters=args.meters,
        delay_ms=args.delay,
        expected_rps=round(args.meters / args.period, 1),
        achieved_rps=round(requests / args.seconds, 1),
        simulator_cpu_pct=round(100 * cpu / args.seconds, 1),
        simulator_us_per_request=round(1e6 * cpu / max(1, requests)),
        simulator_peak_rss_mb=round(rss, 1),
        cores=os.cpu_count(),
    )
    for key, value in result.items():
        print(f"{key:<26} {value}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
