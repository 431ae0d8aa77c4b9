"""The benchmark's floor: the least a client can do to poll the fleet, and nothing more.

    python bench/_floor.py --port P --meters N [--interval S]

For each of the fleet's meters (bench/_simulator.py's ids and PINs) it sends the prebuilt
`getdata` request every interval and reads the answer to EOF: no parsing, no MQTT, no
logging, one selector and a heap of due times. It keeps the bridge's gap rule (the next
request starts a gap plus 50 ms after the answer, if that is later than the interval), so
the simulator accepts every request and both clients make the same polls. Its CPU per poll
is what this protocol (a new TCP connection and one HTTP/1.0 exchange per poll) costs on
this machine: bench/fleet.py --peer floor prints the bridge's CPU per poll as a multiple of
it. Runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import selectors
import signal
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from bench._simulator import fleet
from bench.support import LOOPBACK

GUARD = 0.05  # the bridge's margin on the meter's own gap (README, Polling and rate limits)
SPREAD = 0.005  # the bridge's start spread: at most 5 ms between two meters' first polls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--meters", type=int, required=True)
    parser.add_argument("--interval", type=float, default=6.0)
    args = parser.parse_args()
    meters, _ = fleet(args.meters, 0, 0.0)
    host = f"{LOOPBACK}:{args.port}".encode()
    requests = [
        b"GET /?page=getdata&devid=%s&devpass=%s HTTP/1.0\r\nHost: %s\r\n\r\n"
        % (m.devid.encode(), m.pin.encode(), host)
        for m in meters
    ]
    address = (LOOPBACK, args.port)
    interval = args.interval
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    selector = selectors.DefaultSelector()
    now = time.monotonic()
    spread = min(interval / len(meters), SPREAD)
    due = [(now + i * spread, i) for i in range(len(meters))]
    started = [0.0] * len(meters)
    while not stop:
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, i = heapq.heappop(due)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            started[i] = now
            if sock.connect_ex(address) not in (0, errno.EINPROGRESS):
                sock.close()
                heapq.heappush(due, (now + interval, i))
                continue
            selector.register(sock, selectors.EVENT_WRITE, i)
        timeout = max(0.0, due[0][0] - now) if due else 1.0
        for key, mask in selector.select(min(timeout, 1.0)):
            fileobj, i = key.fileobj, key.data
            assert isinstance(fileobj, socket.socket)
            sock = fileobj
            try:
                if mask & selectors.EVENT_WRITE:
                    sock.send(requests[i])  # ~100 bytes: one send on a fresh connection
                    selector.modify(sock, selectors.EVENT_READ, i)
                    continue
                if sock.recv(65536):
                    continue
            except OSError:
                pass
            selector.unregister(sock)
            sock.close()
            ended = time.monotonic()
            # The bridge's gap rule: a gap plus the guard after the later of (start,
            # answer - guard), and never sooner than the interval.
            begun = started[i]
            heapq.heappush(due, (max(begun + interval, max(begun, ended - GUARD) + interval + GUARD), i))
    return 0


if __name__ == "__main__":
    sys.exit(main())
