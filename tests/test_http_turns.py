"""/api/meters is written a few hundred meters per turn of the loop (bridge/web.py): the
body must be the one json.dumps of the whole list gives, at any number of meters."""

from __future__ import annotations

import asyncio
import json

import pytest

from bench.httpcost import loaded_bridge
from bridge.config import Settings
from bridge.status import TURN_METERS
from bridge.web import WebServer, _row


@pytest.mark.parametrize("meters", [1, TURN_METERS, TURN_METERS + 1, 2 * TURN_METERS + 7])
def test_api_meters_in_turns_is_one_json_list(meters: int) -> None:
    bridge = loaded_bridge(meters)
    server = WebServer(bridge, Settings.model_validate({"mqtt": {"host": "127.0.0.1"}}).http)
    answer = asyncio.run(server._meters(None))  # type: ignore[arg-type]  # (the request is unused)
    assert isinstance(answer.body, bytes)
    whole = json.dumps([_row(m) for m in bridge.meters], separators=(",", ":")).encode()
    assert answer.body == whole
    assert [row["topic"] for row in json.loads(answer.body)] == [m.device.segment for m in bridge.meters]
