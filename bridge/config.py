"""Settings: a YAML file plus `SMARTMAC_*` environment variables (the environment wins).

Everything is validated before anything starts; a bad value is a ConfigError whose message
names the key (`devices.0.interval: ...`) and never echoes the value, because the value
may be a PIN or a password.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from .errors import ConfigError
from .shard import index_from_host
from .topics import MAX_LEVEL, Output, refused_text, valid_level

ENV_PREFIX = "SMARTMAC_"
CONFIG_ENV = "SMARTMAC_CONFIG"

#: The vendor's minimum time between two requests to one meter, in seconds.
STANDARD_MIN_GAP = 60.0
EXTENDED_MIN_GAP = 6.0

#: The topic segment the bridge keeps for itself (B/bridge/availability, B/bridge/info).
RESERVED_SEGMENT = "bridge"
#: ... and the segments of the shards' own topics (B/bridge-2/availability).
_SHARD_SEGMENT = re.compile(r"bridge-[0-9]+")
#: The most shards one device list may be split into.
MAX_SHARDS = 1024

#: What the topic rule (topics.valid_level) refuses besides separators and wildcards.
_REFUSED = "control characters, Unicode non-characters or lone surrogates"


def min_gap(extended: bool) -> float:
    """The shortest time the meter model allows between two requests."""
    return EXTENDED_MIN_GAP if extended else STANDARD_MIN_GAP


class _Model(BaseModel):
    # Unknown keys are typos until proven otherwise: refuse them.
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSettings(_Model):
    enabled: bool = False
    """Connect to the broker over TLS."""
    ca_certs: Path | None = None
    """CA bundle that signed the broker's certificate (None: the system's CAs)."""
    certfile: Path | None = None
    """Client certificate, for brokers that require one."""
    keyfile: Path | None = None
    """Private key of the client certificate."""
    insecure: bool = False
    """Skip the broker host name check (self-signed lab setups only)."""

    @field_validator("ca_certs", "certfile", "keyfile")
    @classmethod
    def _exists(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"file not found: {path}")
        return path


class MqttSettings(_Model):
    host: str | tuple[str, ...] | None = None
    """Broker host, `host:port`, or several of them (a list, or `a,b:1884`): the nodes of
    one cluster, tried in turn (see `brokers`). Absent, null or empty: start the embedded
    broker and use it."""
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    """Never logged or published."""
    client_id: str = Field("smartmac-bridge", min_length=1, max_length=128)
    base_topic: str = "smartmac"
    """First topic level of everything the bridge publishes."""
    qos: int = Field(0, ge=0, le=2)
    """QoS of state publishes; everything retained is republished on reconnect anyway."""
    tls: TlsSettings = TlsSettings()

    @field_validator("host", mode="before")
    @classmethod
    def _hosts(cls, value: Any) -> Any:
        # Before pydantic's own check: its errors for a union would be named
        # `mqtt.host.str` and `mqtt.host.tuple[str, ...]`, and this one names the entry.
        if value is None:
            return None
        if isinstance(value, str):
            text = value.strip()
            if not text:
                return None  # SMARTMAC_MQTT__HOST= (empty) reads as "no broker configured"
            if "," not in text:
                broker_address(text, 1)  # raises ValueError with the reason
                return text
            items: list[Any] = text.split(",")  # the environment's short form: a,b:1884
        elif isinstance(value, list | tuple):
            items = list(value)
            if not items:
                return None
        else:
            raise ValueError("must be a host, host:port, or a list of them")
        for number, item in enumerate(items, 1):
            try:
                if not isinstance(item, str):
                    raise ValueError("must be text: a host or host:port")
                broker_address(item, 1)
            except ValueError as exc:
                raise ValueError(f"entry {number} of {len(items)}: {exc}") from None
        return tuple(item.strip() for item in items)

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, client_id: str) -> str:
        # mosquitto 2.0 drops a CONNECT whose id has such a character ("protocol error",
        # checked); it accepts '+' and '#', but they would be wildcards in ACL patterns
        # that use %c, so they are refused too.
        if "+" in client_id or "#" in client_id or refused_text(client_id):
            raise ValueError(f"must not contain '+', '#', {_REFUSED}")
        return client_id

    @field_validator("base_topic")
    @classmethod
    def _topic_prefix(cls, base: str) -> str:
        return topic_prefix(base)

    @property
    def brokers(self) -> tuple[tuple[str, int], ...]:
        """(host, port) of every configured broker, in the order they are tried; an entry
        without a port has `port`. Empty: no broker configured (the embedded one runs)."""
        hosts = (self.host,) if isinstance(self.host, str) else self.host or ()
        return tuple(broker_address(host, self.port) for host in hosts)


def broker_address(entry: str, port: int) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]:port`, `[v6]` or a bare IPv6 address (which has no port:
    `::1`) -> (host, port), `port` where none is given. Raises ValueError with the reason,
    never the text (config errors do not echo values)."""
    text = entry.strip()
    if not text:
        raise ValueError("empty entry")
    if refused_text(text) or any(c.isspace() for c in text):
        raise ValueError(f"must not contain spaces, {_REFUSED}")
    if any(c in text for c in "/@?#"):
        raise ValueError("give host or host:port only, no scheme, path or user")
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not _is_ipv6(host):
            raise ValueError("brackets hold an IPv6 address: [::1] or [::1]:1883")
        if not rest:
            return host, port
        if not rest.startswith(":"):
            raise ValueError("give [address]:port")
        return host, _port_number(rest[1:])
    if text.count(":") > 1:
        # Without brackets the colons are the address's own: `fe80::1:1884` is an address.
        if not _is_ipv6(text):
            raise ValueError("an IPv6 address with a port is written [address]:port")
        return text, port
    host, colon, rest = text.partition(":")
    if not host:
        raise ValueError("no host name")
    return (host, _port_number(rest)) if colon else (host, port)


def _port_number(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 5 and 1 <= int(text) <= 65535):
        raise ValueError("port must be a number from 1 to 65535")
    return int(text)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)  # a zone (`fe80::1%eth0`) included
    except ValueError:
        return False
    return True


def topic_prefix(base: str) -> str:
    """Check a topic prefix (one or more levels); raises ValueError with the reason."""
    if not base or base.startswith("/") or base.endswith("/") or "//" in base:
        raise ValueError("must be non-empty, without leading, trailing or double '/'")
    if len(base) > MAX_LEVEL:
        raise ValueError(f"must be at most {MAX_LEVEL} characters")
    # Each level gets the rule data keys get: a broker drops a client that publishes to
    # (or subscribes to) a topic with a refused character, at every reconnect again.
    if base.startswith("$") or not all(valid_level(level) for level in base.split("/")):
        raise ValueError(f"must not contain '+', '#', {_REFUSED}, nor start with '$'")
    return base


class HomeAssistantSettings(_Model):
    discovery: bool = True
    """Publish Home Assistant MQTT discovery configs for every meter (sensors and relay)."""
    prefix: str = "homeassistant"
    """Home Assistant's discovery prefix (its MQTT integration setting, default homeassistant)."""

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, prefix: str) -> str:
        return topic_prefix(prefix)


class PublishSettings(_Model):
    mode: Literal["every_poll", "on_change"] = "every_poll"
    """every_poll: every reading after every poll. on_change: a topic only when its value
    changed or `heartbeat` seconds after it was last sent."""
    heartbeat: float = Field(300.0, ge=1, le=86400, allow_inf_nan=False)
    """Seconds after which an unchanged value is sent again (on_change only)."""
    output: Output = "attribute_and_json"
    """zigbee2mqtt's `output`. attribute_and_json: B/D/KEY for every reading and B/D/state.
    json: B/D/state only (Home Assistant's sensors read it with a value_template).
    attribute: B/D/KEY only. B/D/relay and B/D/availability in every mode; at the first
    connect the other modes' retained topics of the configured meters are cleared."""


class EmbeddedBrokerSettings(_Model):
    host: str = "127.0.0.1"
    """Address the embedded broker listens on (used only when mqtt.host is not set)."""
    port: int = Field(1883, ge=1, le=65535)


class HttpSettings(_Model):
    port: int | None = Field(None, ge=1, le=65535)
    """None: no HTTP server. A port: the status page, /api, /metrics, /healthz, /readyz."""
    host: str = "127.0.0.1"
    """Address the HTTP server listens on. Not a loopback one: needs password or read_only."""
    username: str | None = None
    """With password: HTTP basic auth on everything but /healthz and /readyz. None with a
    password: any user name is accepted."""
    password: SecretStr | None = None
    """Never logged, published or answered."""
    read_only: bool = False
    """True: no relay switching from the page or the API (403)."""
    public_url: str | None = None
    """The page's address as a browser elsewhere reaches it (e.g. behind a proxy): Home
    Assistant's device page links to it (configuration_url). None: no link."""

    @field_validator("public_url")
    @classmethod
    def _url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or refused_text(url):
            raise ValueError("must be an http:// or https:// URL")
        return url

    @property
    def loopback(self) -> bool:
        """The server is reachable from this machine only."""
        return is_loopback(self.host)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: not reachable from another machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class DeviceSettings(_Model):
    id: str
    """The meter's devid: digits only."""
    pin: SecretStr
    """The meter's devpass. Quote it in YAML: 012345 unquoted is a number."""
    host: str
    """`192.168.4.1`, `host:port` or `http://host:port`."""
    name: str | None = None
    """Display name; default: the id."""
    topic: str | None = None
    """Topic segment; default: the id."""
    extended: bool = False
    """Extended model: one request per 6 s is allowed instead of one per 60 s."""
    interval: float | None = Field(None, allow_inf_nan=False, le=86400)
    """Seconds between polls; default 60 (standard) or 6 (extended); at most a day."""
    relay_inverted: bool = False
    """False: pout 1 means relay ON, both reported and sent."""
    timeout: float = Field(5.0, gt=0, le=30, allow_inf_nan=False)
    """Seconds one HTTP request may take in all, from connect to the last byte."""

    @field_validator("id", mode="before")
    @classmethod
    def _id_digits(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.isdigit() or not value.isascii():
            raise ValueError("must be the meter's devid, digits only")
        return value

    @field_validator("pin", mode="before")
    @classmethod
    def _pin_text(cls, value: Any) -> Any:
        if not isinstance(value, str):
            # YAML turns 012345 into an octal number and 123456 into an int: either way the
            # digits the meter expects are gone, so insist on quotes rather than guess.
            raise ValueError('must be a quoted string, e.g. pin: "012345"')
        # Any other character is fine: meter.py percent-encodes the PIN in the query.
        if not value or refused_text(value):
            raise ValueError(f"must be non-empty, without {_REFUSED}")
        return value

    @field_validator("host")
    @classmethod
    def _host_url(cls, value: str) -> str:
        base_url(value)  # raises ValueError with the reason
        return value

    @field_validator("topic")
    @classmethod
    def _segment(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not valid_level(value):
            raise ValueError(
                f"must be one topic level of 1 to {MAX_LEVEL} characters, without '/', '+', '#', {_REFUSED}"
            )
        if reserved_segment(value):
            raise ValueError("'bridge' and 'bridge-<digits>' are reserved for the bridge's own topics")
        return value

    @field_validator("interval")
    @classmethod
    def _interval_allowed(cls, interval: float | None, info: ValidationInfo) -> float | None:
        # `extended` is declared before `interval`, so it is validated and here already.
        extended = bool(info.data.get("extended", False))
        gap = min_gap(extended)
        if interval is not None and interval < gap:
            model = "an extended" if extended else "a standard"
            raise ValueError(
                f"{interval:g} s is below the {gap:g} s {model} meter allows"
                + ("" if extended else " (set extended: true for extended meters)")
            )
        return interval

    @property
    def display_name(self) -> str:
        return self.name or self.id

    @property
    def segment(self) -> str:
        return self.topic or self.id

    @property
    def poll_interval(self) -> float:
        return self.interval if self.interval is not None else min_gap(self.extended)

    @property
    def url(self) -> str:
        return base_url(self.host)


def reserved_segment(segment: str) -> bool:
    """`bridge` and `bridge-<digits>`: the topics of the bridge itself, of any shard."""
    return segment == RESERVED_SEGMENT or _SHARD_SEGMENT.fullmatch(segment) is not None


class ShardSettings(_Model):
    count: int = Field(1, ge=1, le=MAX_SHARDS)
    """Instances sharing one device list; each serves the meters the hash gives it."""
    index: int | None = Field(None, ge=0)
    """This instance, 0..count-1. None with count > 1: the host name's trailing -<n> (a
    StatefulSet's pod smartmac-bridge-2 is 2)."""

    @field_validator("count", "index", mode="before")
    @classmethod
    def _not_bool(cls, value: Any) -> Any:
        # YAML's `true` would otherwise count as 1.
        if isinstance(value, bool):
            raise ValueError("must be a whole number, not true or false")
        return value

    @model_validator(mode="before")
    @classmethod
    def _index_from_host(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("index"), str) and not data["index"].strip():
            data = {**data, "index": None}  # SMARTMAC_SHARD__INDEX= (empty): not set
        if not isinstance(data, dict) or data.get("index") is not None:
            return data
        try:
            count = int(data.get("count", 1))
        except (TypeError, ValueError):
            return data  # the field's own check names it
        if count > 1:
            index = index_from_host(socket.gethostname())
            if index is not None:
                return {**data, "index": index}
        return data

    @property
    def sharded(self) -> bool:
        return self.count > 1

    @property
    def node(self) -> str:
        """The segment of this instance's own topics: bridge, or bridge-<index> when sharded."""
        return f"bridge-{self.index}" if self.sharded else RESERVED_SEGMENT


def base_url(host: str) -> str:
    """`192.168.4.1`, `host:8080`, `[::1]:8080` or `http://host:8080` -> `http://host[:port]`."""
    text = host.strip()
    if not text:
        raise ValueError("must not be empty")
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme != "http":
        raise ValueError("the meter speaks plain http only")
    # "@" and not parts.username: `http://:pw@host` has an empty user name.
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError("give host or host:port only, no path, query or user")
    bad_port = ValueError("port must be a number from 1 to 65535")
    try:
        port = parts.port
    except ValueError:
        raise bad_port from None
    # `host:0` and `host:` would otherwise silently mean port 80.
    if port == 0 or parts.netloc.endswith(":"):
        raise bad_port
    if not parts.hostname:
        raise ValueError("no host name")
    netloc = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"http://{netloc}" + (f":{port}" if port else "")


class Settings(BaseSettings):
    """The whole configuration. See README.md for every key."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    mqtt: MqttSettings = MqttSettings()
    embedded_broker: EmbeddedBrokerSettings = EmbeddedBrokerSettings()
    homeassistant: HomeAssistantSettings = HomeAssistantSettings()
    publish: PublishSettings = PublishSettings()
    http: HttpSettings = HttpSettings()
    shard: ShardSettings = ShardSettings()
    devices: tuple[DeviceSettings, ...] = ()

    @model_validator(mode="after")
    def _unique(self) -> Settings:
        # Here, not on HttpSettings: an error there would be named "http", not the key.
        http = self.http
        if http.username is not None and http.password is None:
            raise ValueError("http.password: http.username needs a password")
        if not http.loopback and http.password is None and not http.read_only:
            # Anyone who reaches the page could switch the relays.
            raise ValueError(
                "http.host: not a loopback address; set http.password (and http.username) "
                "or http.read_only: true"
            )
        seen_broker: dict[tuple[str, int], int] = {}
        for number, broker in enumerate(self.mqtt.brokers, 1):
            if broker in seen_broker:
                # Failing over to the same broker would be logged as a change of node.
                raise ValueError(
                    f"mqtt.host: entry {number} of {len(self.mqtt.brokers)} is the same broker"
                    f" as entry {seen_broker[broker]}"
                )
            seen_broker[broker] = number
        shard = self.shard
        if shard.sharded and shard.index is None:
            raise ValueError(
                f"shard.index: not set, and the host name {socket.gethostname()!r} does not end in"
                " -<n> (shard.count > 1 needs the index of this instance)"
            )
        if shard.index is not None and shard.index >= shard.count:
            raise ValueError(
                f"shard.index: {shard.index} is not below shard.count {shard.count} (when not set,"
                " it is the host name's trailing -<n>)"
            )
        for field, label in (("id", "id"), ("segment", "topic")):
            seen: dict[str, int] = {}
            for index, device in enumerate(self.devices):
                value = getattr(device, field)
                if value in seen:
                    raise ValueError(
                        f"devices.{index}.{label} {value!r} is also used by devices.{seen[value]}"
                    )
                seen[value] = index
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init_settings carries the YAML file (see load_settings); env beats it.
        return (env_settings, init_settings)


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read the YAML file (argument, else $SMARTMAC_CONFIG, else none) and the environment."""
    if path is None:
        path = os.environ.get(CONFIG_ENV) or None
    data = _read_yaml(Path(path)) if path is not None else {}
    unknown = sorted(
        name
        for name in os.environ
        if name.upper().startswith(ENV_PREFIX)
        and name.upper() != CONFIG_ENV
        and name[len(ENV_PREFIX) :].split("__")[0].lower() not in Settings.model_fields
    )
    if unknown:
        # pydantic-settings ignores unknown variables; a typo there would silently do nothing.
        raise ConfigError(f"unknown environment variable(s): {', '.join(unknown)}")
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except SettingsError as exc:
        # e.g. SMARTMAC_DEVICES that is not valid JSON. pydantic-settings' text names the
        # field; the value is not in it (checked in test_config).
        raise ConfigError(f"invalid configuration from the environment: {exc}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        # Where, not what: the bytes may be part of a PIN.
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError(f"config file {path} line {line}: not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path}{where}: not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of keys")
    return data


def _describe(exc: ValidationError) -> str:
    # Built by hand: str(ValidationError) includes input values, and an input may be a PIN.
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{where}: {message}" if where else message)
    return "invalid configuration:\n  " + "\n  ".join(lines)
