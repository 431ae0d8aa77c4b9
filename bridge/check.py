"""PURE: what `smartmac-bridge check` prints about one request to every configured meter.

The requests themselves are made in __main__.py (`_check`); here each one's outcome, an
`Answer`, becomes a row of words an installer can act on: `ok` with the model the keys
tell, or the error in words (wrong PIN, refused, timeout, not a meter, rate-limited).
No I/O here, so the words are tested with plain values (tests/test_check.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from .errors import MeterError
from .readings import Snapshot
from .status import request_result


@dataclass(frozen=True, slots=True)
class Answer:
    """How one meter's request ended. Exactly one of `snapshot` and `error` is set."""

    topic: str
    devid: str
    """The configured id, which the answer's devid must match."""
    host: str
    """As configured (`192.168.4.1`, `host:port`...): what the installer typed."""
    extended: bool
    """As configured."""
    seconds: float
    """From the start of the request to its end (the host's lookup alone, if that failed)."""
    snapshot: Snapshot | None = None
    error: MeterError | None = None
    detail: str = ""
    """The error's text without the meter's label (its host and devid are on the row)."""
    lookup: bool = False
    """The error came from looking the host name up: no request was made."""

    @property
    def ok(self) -> bool:
        return self.snapshot is not None and self.snapshot.devid == self.devid


#: request_result() -> the words on the row; True: the error's own text follows them
#: (which OS error, which deadline, what the answer was instead). http_error: `HTTP <status>`.
WORDS: Final = {
    "bad_pin": ("wrong PIN", False),
    "unreachable": ("refused", True),
    "timeout": ("timeout", True),
    "bad_body": ("not a meter", True),
    "rate_limited": ("rate-limited", False),
}

# Per phase 2 or 3 (DEVICE_NOTES.md, "Fields by model and firmware"): only a 3-phase meter
# sends them. A 1-phase one sends V1.. or, on some firmware, V.. without a suffix.
_THREE_PHASE: Final = re.compile(r"(?:V|A|W|Wh|PF)[23]")
_ONE_PHASE: Final = re.compile(r"(?:V|A|W|Wh|PF)1?")
# Reverse power and energy (rW, rW1, rWh2, rTWh): extended meters only.
_EXTENDED: Final = re.compile(r"r(?:W|Wh|TWh)\d*")

HEADER: Final = ("topic", "id", "host", "result", "time")


def warning(count: int) -> str:
    """What `check` says on stderr before it asks: the cost to a bridge already running."""
    meters = "1 meter" if count == 1 else f"{count} meters"
    return (
        f"Asking {meters} once each, all at once. A running bridge polling the same meters "
        "will see one 429 (rate-limited) each: standard meters allow one request per 60 s, "
        "extended ones one per 6 s. A meter polled that recently answers rate-limited here."
    )


def model(keys: Iterable[str]) -> tuple[str, bool] | None:
    """(`3-phase` or `1-phase`, extended?) as the keys tell it; None if they tell no phases
    (a pulse/sensor D105, or a firmware we do not know)."""
    names = list(keys)
    if any(_THREE_PHASE.fullmatch(key) for key in names):
        phases = "3-phase"
    elif any(_ONE_PHASE.fullmatch(key) for key in names):
        phases = "1-phase"
    else:
        return None
    return phases, any(_EXTENDED.fullmatch(key) for key in names)


def _keys(snap: Snapshot) -> list[str]:
    # A key whose value was not a number still tells the model.
    return [reading.key for reading in snap.readings] + list(snap.rejected)


def result_text(answer: Answer) -> str:
    """The row's result: `ok: 3-phase extended, 31 readings`, or the error in words."""
    snap = answer.snapshot
    if snap is not None:
        if snap.devid != answer.devid:
            return f"wrong meter: answered as devid {snap.devid}"
        told = model(_keys(snap))
        kind = "unknown model" if told is None else f"{told[0]} {'extended' if told[1] else 'standard'}"
        count = len(snap.readings)
        return f"ok: {kind}, {count} reading{'' if count == 1 else 's'}"
    if answer.lookup:
        words, with_detail = "unreachable", True  # no connection was even tried
    else:
        result = request_result(answer.error)
        if result == "http_error":
            status = answer.error.status if answer.error is not None else None
            return "HTTP error" if status is None else f"HTTP {status}"
        words, with_detail = WORDS.get(result, ("failed", True))
    return f"{words}: {answer.detail}" if with_detail and answer.detail else words


def note(answer: Answer) -> str | None:
    """A line under the table when the config's `extended` disagrees with the keys."""
    if not answer.ok or answer.snapshot is None:
        return None
    told = model(_keys(answer.snapshot))
    if told is None or told[1] == answer.extended:
        return None
    if answer.extended:
        return (
            f"{answer.topic}: configured extended, but the keys tell a standard meter: polls "
            "faster than one per 60 s will be answered 429 (set extended: false)"
        )
    return (
        f"{answer.topic}: configured standard, but the keys tell an extended meter: "
        "extended: true allows a poll every 6 s"
    )


def report(answers: Sequence[Answer]) -> list[str]:
    """The table (columns aligned), any notes, and the summary line."""
    rows = [(a.topic, a.devid, a.host, result_text(a), f"{a.seconds:.3f} s") for a in answers]
    table = [HEADER, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]
    lines.extend(text for text in map(note, answers) if text is not None)
    good = sum(a.ok for a in answers)
    lines.append(f"{good} of {len(answers)} meter{'' if len(answers) == 1 else 's'} answered")
    return lines
