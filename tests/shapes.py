"""Narrowing for the tests' assertions, so mypy --strict reads what a test expects.

`json_object(message.json())` is a payload's JSON as the object the test expects it to be,
typed as json.loads types its values (Any: str, number, bool, None, list or dict).
`present(probe.last(topic))` is a message that must have arrived. Each fails the test,
showing what it got, when the expectation does not hold.
"""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


def json_object(value: object) -> dict[str, Any]:
    assert isinstance(value, dict), f"expected a JSON object, got {value!r}"
    return value


def present(value: T | None) -> T:
    assert value is not None, "expected a message, got none"
    return value
