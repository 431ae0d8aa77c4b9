"""PURE: relay commands: what a payload means, and what the result payloads look like."""

from __future__ import annotations

import json
from enum import StrEnum

from .errors import CommandError
from .topics import Relay

_MAX_COMMAND = 256


class Action(StrEnum):
    ON = "ON"
    OFF = "OFF"
    TOGGLE = "TOGGLE"


def result_ok(relay: Relay) -> bytes:
    return json.dumps({"ok": True, "relay": relay.value}).encode()


def result_error(error: str) -> bytes:
    return json.dumps({"ok": False, "error": error}).encode()


_WORDS = {
    "ON": Action.ON,
    "OFF": Action.OFF,
    "TOGGLE": Action.TOGGLE,
    "1": Action.ON,
    "0": Action.OFF,
    "TRUE": Action.ON,
    "FALSE": Action.OFF,
}


def parse_command(payload: bytes) -> Action:
    """ON/OFF/TOGGLE (any case), 1/0, true/false, or {"state": "ON"|"OFF"|"TOGGLE"}."""
    if len(payload) > _MAX_COMMAND:
        raise CommandError(f"payload too long ({len(payload)} bytes)")
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CommandError("payload is not UTF-8 text") from None
    action = _WORDS.get(text.upper())
    if action is not None:
        return action
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError):
            raise CommandError("payload is not valid JSON") from None
        state = doc.get("state") if isinstance(doc, dict) else None
        if isinstance(state, str) and state.strip().upper() in ("ON", "OFF", "TOGGLE"):
            return Action(state.strip().upper())
        raise CommandError('JSON command needs {"state": "ON"|"OFF"|"TOGGLE"}')
    shown = text if len(text) <= 32 else text[:32] + "..."
    raise CommandError(f"unknown command {shown!r}: use ON, OFF or TOGGLE")
