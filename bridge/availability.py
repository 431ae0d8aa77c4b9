"""PURE: is a meter online? Counted from the outcomes of its requests.

A meter is published online after a good read and offline after FAILURES_OFFLINE failed
requests in a row; before either it has no availability of its own (None). Only changes
are worth a warning or an info line; the caller logs and publishes what comes back here.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Consecutive failed requests after which a meter is published offline. One lost answer
#: (a 429 after a restart, a dropped packet) must not flap the meter's availability.
FAILURES_OFFLINE = 3


@dataclass(frozen=True, slots=True)
class Good:
    """What a good read changes."""

    publish_online: bool
    """Publish `online`: the meter was offline, or never decided since start."""
    back_online: bool
    """Log "back online": it had been published offline."""


@dataclass(frozen=True, slots=True)
class Failed:
    """What a failed request changes."""

    new_error: bool
    """Not the same text as the last failure: log at WARNING, else at DEBUG."""
    publish_offline: bool
    """Publish `offline` now (log "offline after `failures` failed requests")."""
    failures: int
    """Failed requests in a row, this one included."""


class Availability:
    """The availability of one meter."""

    __slots__ = ("available", "failures", "last_error")

    def __init__(self) -> None:
        self.available: bool | None = None
        """As last published; None: nothing published since start."""
        self.failures = 0
        """Failed requests in a row."""
        self.last_error: str | None = None
        """The text of the last failure, None after a good read."""

    def good(self) -> Good:
        """A good read."""
        was = self.available
        self.available = True
        self.failures = 0
        self.last_error = None
        return Good(publish_online=was is not True, back_online=was is False)

    def failed(self, text: str) -> Failed:
        """A failed request, described by `text` (the error, naming the meter)."""
        self.failures += 1
        new_error = text != self.last_error
        self.last_error = text
        # "is not False": a meter that never answered since start goes offline here too.
        offline = self.failures >= FAILURES_OFFLINE and self.available is not False
        if offline:
            self.available = False
        return Failed(new_error=new_error, publish_offline=offline, failures=self.failures)
