"""commands: payload parsing, and RelayCommands with a hand-moved clock."""

from __future__ import annotations

import pytest

from bridge.commands import Action, parse_command
from bridge.errors import CommandError


@pytest.mark.parametrize(
    ("payload", "action"),
    [
        (b"ON", Action.ON), (b"on", Action.ON), (b" On \n", Action.ON), (b"1", Action.ON),
        (b"true", Action.ON), (b"TRUE", Action.ON), (b"OFF", Action.OFF), (b"0", Action.OFF),
        (b"false", Action.OFF), (b"toggle", Action.TOGGLE), (b'{"state": "ON"}', Action.ON),
        (b'{"state":"off"}', Action.OFF), (b'{"state": "TOGGLE"}', Action.TOGGLE),
    ],
)
def test_valid_commands(payload: bytes, action: Action) -> None:
    assert parse_command(payload) is action


@pytest.mark.parametrize(
    "payload",
    [b"", b"2", b"yes", b"ONN", b"{}", b'{"state": 1}', b'{"state": "DIM"}', b"{bad", b"[1]",
     b'"ON"', b"\xff\xfe", b"O" * 300, b"{" * 5000, b"null", b"1.0"],
)
def test_invalid_commands(payload: bytes) -> None:
    with pytest.raises(CommandError):
        parse_command(payload)
