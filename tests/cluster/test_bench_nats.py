"""A small run of `python -m bench.nats --rate`, so the rate bench cannot rot.

Its own 3-node cluster, 300 retained messages: the figure is printed, not judged (the
machine is shared; the bench exists to print it).
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from support import ROOT

from bench.nats import binary

pytestmark = pytest.mark.nats


def test_rate_prints_what_the_last_node_received() -> None:
    if binary() is None:
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    run = subprocess.run(
        [sys.executable, "-m", "bench.nats", "--rate", "--messages", "300"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"^3 nodes ready in [\d.]+ s:", run.stdout, re.M), run.stdout
    figure = re.search(r"(\d+) received on n2 within [\d.]+ s of the first = ([\d,]+)/s$", run.stdout, re.M)
    assert figure, run.stdout
    assert int(figure.group(1)) == 300  # QoS 0, yet nothing is lost at this size on loopback
