"""The benchmark's simulator process: a fleet plus a few fast relay-command meters.

    python bench/_simulator.py --port P --meters N --delay S --commands M --command-delay S

Fleet meter i has devid FIRST_ID + i, command meter j has FIRST_ID + N + j; PINs follow
make_fleet's rule for the index within each group (so the benchmark can rebuild them). The
counters are served on GET /stats. Runs until SIGTERM or SIGINT; then, with --times FILE,
writes every meter's request arrival times (time.monotonic(), the same clock in every
process on Linux) as JSON ``{devid: [t, ...]}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bridge.simulator import SimMeter, Simulator, make_fleet

FIRST_ID = 1728053249


def fleet(meters: int, commands: int, command_delay: float) -> tuple[list[SimMeter], list[SimMeter]]:
    """The fleet's meters and the command meters: extended, 3-phase."""
    main = make_fleet(meters, phases=3, extended=True, first_id=FIRST_ID)
    fast = make_fleet(commands, phases=3, extended=True, first_id=FIRST_ID + meters)
    for meter in fast:
        meter.delay = command_delay
    return main, fast


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--meters", type=int, required=True)
    parser.add_argument("--delay", type=float, required=True, help="seconds")
    parser.add_argument("--commands", type=int, default=0)
    parser.add_argument("--command-delay", type=float, default=0.02, help="seconds")
    parser.add_argument("--times", type=Path, help="write request arrival times here at exit")
    args = parser.parse_args()
    main_meters, fast = fleet(args.meters, args.commands, args.command_delay)
    sim = Simulator(main_meters + fast, host="127.0.0.1", port=args.port, delay=args.delay)

    async def serve() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await sim.serve()

    asyncio.run(serve())
    if args.times is not None:
        times = {m.devid: list(m.request_times) for m in sim.meters.values()}
        args.times.write_text(json.dumps(times))
    return 0


if __name__ == "__main__":
    sys.exit(main())
