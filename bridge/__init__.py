"""smartmac-bridge: SMART MAIC Wi-Fi energy meters to MQTT."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("smartmac-bridge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
