"""Shared fixtures: a clean environment for every test."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # pydantic-settings reads os.environ: a SMARTMAC_* left over from the shell or another
    # test would change what every test sees.
    for name in list(os.environ):
        if name.upper().startswith("SMARTMAC_"):
            monkeypatch.delenv(name)
