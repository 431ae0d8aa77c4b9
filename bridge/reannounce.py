"""PURE: when to send every meter's discovery configs (and state) again; requests merged.

A re-announce is tens of messages per meter, so a burst of requests must not become a
burst of re-announces (300 Home Assistant birth messages in 3 s once made the bridge send
860,000 messages and stalled polling for 12 s). The rules:

- a request that arrives while a re-announce is pending or running is merged into it
  (one that wants the state merges into a running one only if that one sends the state);
- re-announces start at least SPACING seconds apart: the first at once, a later one
  SPACING after the last start, and every request in between merges into that one;
- a new connection to the broker cannot wait (`fresh`): what went out on the old one may
  be lost, so the run in progress is dropped and a new one starts at once.

Time is passed in (`now`), never read here, so tests move the clock.
"""

from __future__ import annotations

#: Least seconds between the starts of two re-announces asked for by Home Assistant.
SPACING = 10.0


class Reannounce:
    """The pending and the running re-announce; each is None or whether it sends the state."""

    def __init__(self, spacing: float = SPACING) -> None:
        self.spacing = spacing
        self.running: bool | None = None
        self.pending: bool | None = None
        self._due = 0.0
        self._last_start = float("-inf")

    def request(self, now: float, *, state: bool, fresh: bool = False) -> None:
        """Ask for a re-announce; `state`: the meters' current state goes out too."""
        if fresh:
            # Whatever the dropped run or the pending one still owed goes out with the new one.
            self.pending = state or bool(self.pending) or bool(self.running)
            self.running = None
            self._due = now
            return
        if self.running is not None and (self.running or not state):
            return  # the run going out now covers it
        if self.pending is not None:
            self.pending = self.pending or state
            return
        self.pending = state
        self._due = max(now, self._last_start + self.spacing)

    def due(self) -> float | None:
        """When the pending re-announce may start (it waits for a running one), or None."""
        return None if self.pending is None else self._due

    def start(self, now: float) -> bool | None:
        """Start the pending re-announce if its time has come: whether it sends the state."""
        if self.pending is None or self.running is not None or now < self._due:
            return None
        self.running, self.pending = self.pending, None
        self._last_start = now
        return self.running

    def finish(self) -> None:
        """The running re-announce has sent its last meter."""
        self.running = None
