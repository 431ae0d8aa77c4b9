"""The errors smartmac-bridge raises, and what the user should do about each.

    SmartmacError
     ├── ConfigError           the configuration is wrong; the message names the key
     ├── BrokerError           the embedded MQTT broker could not start
     ├── CommandError          a payload on a relay/set topic is not a command
     └── MeterError            one request to a meter failed (nothing is published from it)
          ├── MeterUnreachable  connection refused, reset, or no host
          │    └── MeterTimeout  no (complete) answer within the meter's `timeout`
          ├── MeterRateLimited  HTTP 429: asked sooner than the model allows
          ├── MeterAuthError    the meter refused the id/PIN
          ├── MeterHTTPError    any other non-200 answer
          └── BodyError         the answer is not a meter body we can read

No message ever contains the meter's PIN or an MQTT password: meter.py builds its
messages from the host and devid only, never from the request URL.
"""

from __future__ import annotations


class SmartmacError(Exception):
    """Base of every error smartmac-bridge raises on purpose."""


class ConfigError(SmartmacError):
    """The configuration is invalid. Fix the key named in the message and start again."""


class BrokerError(SmartmacError):
    """The embedded broker did not start (often: the port is taken). Pick another
    `embedded_broker.port`, or set `mqtt.host` to use an existing broker."""


class CommandError(SmartmacError):
    """A relay command payload was not understood. Send ON, OFF, TOGGLE, 1/0,
    true/false or {"state": "ON"|"OFF"|"TOGGLE"}."""


class MeterError(SmartmacError):
    """A request to a meter failed. The bridge retries at the next poll."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        """The HTTP status of the meter's answer, when the failure is one (429, 403, 500...)."""


class MeterUnreachable(MeterError):
    """No answer: check the meter's power, Wi-Fi and `host`."""


class MeterTimeout(MeterUnreachable):
    """The meter did not answer (completely) within its `timeout`: often weak Wi-Fi."""


class MeterRateLimited(MeterError):
    """HTTP 429. Another client is polling the same meter, or `extended` is set on a
    standard meter (standard meters allow one request per 60 s)."""


class MeterAuthError(MeterError):
    """The meter refused the devid/PIN: check `id` and `pin` against the meter's label."""


class MeterHTTPError(MeterError):
    """The meter answered with an unexpected HTTP status."""


class BodyError(MeterError):
    """The meter's answer could not be read as a meter body (wrong device, firmware
    sending something else, or a truncated answer)."""
