"""Issue 3, case 5: no PIN or password in logs, payloads or exception text.

Logs and payloads are checked for every test of the suite by the autouse `watch` fixture
(tests/faults/conftest.py). Here: that the watch does catch a leak, and that no error
the meter client raises carries the PIN -- in its text, its traceback, or anything
chained to it -- whatever the meter does.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable

import pytest
from faultkit import PASSWORD, PINS, Watch, exception_texts, fault_meter, find_secret
from support import Message, Probe

from bench.support import LOOPBACK, free_port
from bridge.errors import BodyError, MeterError
from bridge.meter import MeterClient
from bridge.readings import parse_body
from bridge.simulator import Simulator

TIMEOUT = 1.0


def test_the_watch_catches_every_kind_of_leak(watch: Watch) -> None:
    # The suite's guard is only worth something if it can fail.
    suite_watch, watch = watch, Watch()
    with watch.capture():
        logging.getLogger("bridge.anything").debug("GET /?devid=1&devpass=%s&pout=1", PINS[3])
        try:
            raise ValueError(f"pin {PINS[4]}")
        except ValueError:
            logging.getLogger("elsewhere").exception("failed")  # only in the traceback
    probe = Probe(1)  # never started: only its record of messages is used
    probe.messages.append(Message("smartmac/x/state", f'{{"p": "{PASSWORD}"}}'.encode(), True))
    watch.add_probe(probe)
    watch.add_text("stderr", lambda: f"password={PASSWORD}")
    assert len(watch.leaks()) == 4, watch.leaks()
    # A PIN's digits inside a longer number are a reading, not a leak.
    assert find_secret(f"Wh1 1{PINS[0]}2, time 17{PINS[1]}") is None
    assert find_secret(f"devpass={PINS[0]}&") is not None
    suite_watch.records.clear()  # the leaks above were on purpose


@pytest.mark.parametrize(
    "fault",
    ["refuse", "closed_port", "hang", "drip", "drip_head", "cut_head", "http500", "http429",
     "html", "truncated", "no_data", "huge", "wrong_pin"],
)  # fmt: skip
def test_meter_errors_never_carry_the_pin(
    simulator: Callable[..., Simulator], watch: Watch, fault: str
) -> None:
    meter = fault_meter(0, phases=3)
    sim = simulator([meter], tolerance=6.0)  # tolerance: no rate limit between tests' requests
    url = f"http://{LOOPBACK}:{free_port() if fault == 'closed_port' else sim.port}"
    pin = PINS[1] if fault == "wrong_pin" else meter.pin
    if fault not in ("closed_port", "wrong_pin"):
        sim.set_fault(meter.devid, fault)

    outcome: list[object] = []

    def fetch() -> None:
        try:
            outcome.append(parse_body(MeterClient(url, meter.devid, pin, timeout=TIMEOUT).fetch()))
        except BaseException as exc:  # whatever it is, it is checked below
            outcome.append(exc)

    # On a thread, so a client that never gives up fails this test instead of hanging it.
    worker = threading.Thread(target=fetch, daemon=True)
    worker.start()
    worker.join(TIMEOUT + 3)
    assert not worker.is_alive(), f"{fault}: the request did not end within {TIMEOUT:g} s + 3 s"
    (error,) = outcome
    assert isinstance(error, MeterError), f"{fault}: {error!r}"
    if fault in ("html", "truncated", "no_data"):
        assert isinstance(error, BodyError)
    # Nor did anything on the way log it (urllib3 logs some failures with the URL).
    watch.assert_no_secret()
    # What any log or traceback shows (suppressed contexts are not printed):
    shown = "".join(traceback.format_exception(error))
    assert find_secret(shown) is None, f"{fault}: shown: {find_secret(shown)!r}"
    # What the exception keeps: a context suppressed with `from None` is still reachable
    # as __context__, and error reporters and debuggers do walk it.
    for text in exception_texts(error):
        assert find_secret(text) is None, f"{fault}: kept in the exception chain: {find_secret(text)!r}"
