"""PURE: what the status page, the API, the metrics and `check` say about a request.

No I/O here: the outcome of a request as one word, from the error it ended with.
"""

from __future__ import annotations

from typing import Final

from .errors import (
    BodyError,
    MeterAuthError,
    MeterError,
    MeterHTTPError,
    MeterRateLimited,
    MeterTimeout,
)

#: Every value of the `result` label of smartmac_requests_total, in this order.
RESULTS: Final = ("ok", "rate_limited", "timeout", "unreachable", "http_error", "bad_pin", "bad_body")


def request_result(error: MeterError | None) -> str:
    """One of RESULTS: how a request ended (None: a good read)."""
    if error is None:
        return "ok"
    if isinstance(error, MeterRateLimited):
        return "rate_limited"
    if isinstance(error, MeterAuthError):
        return "bad_pin"
    if isinstance(error, MeterHTTPError):
        return "http_error"
    if isinstance(error, BodyError):
        return "bad_body"
    if isinstance(error, MeterTimeout):
        return "timeout"
    return "unreachable"  # MeterUnreachable, and a bug's "internal error"
