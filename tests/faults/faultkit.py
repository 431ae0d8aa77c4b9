"""What the fault suite shares: distinctive secrets and a watch proving none leaks, a
mosquitto with a password file (and TLS listeners, persistence) on demand, certificates
from the openssl CLI, and counters over what the simulator saw.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import hashlib
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import Probe

from bench.support import LOOPBACK, Mosquitto, free_port
from bridge.simulator import SimMeter

# --- secrets ------------------------------------------------------------------------------
# Every meter and every bridge in the fault suite uses these, so that whatever a test
# does, the watch below can prove none of them reached a log, a payload or an exception.

USERNAME = "smartmac-faults"
PASSWORD = "q7Fault-Suite_Pa55word.x"
WRONG_PASSWORD = "z4Wrong-Suite_Pa55word.k"
#: Six digits (the simulator insists), distinct, some with a leading zero.
PINS = (
    "739164", "582917", "046381", "917253", "364870", "803159", "251746", "690423",
    "128957", "475302", "936814", "017469", "548291", "783605", "362918", "859034",
    "204687", "671539", "093852", "415726", "827140", "356081", "740293", "612478",
)  # fmt: skip
FIRST_ID = 1728060000

# A PIN is digits, so it only counts where it is not part of a longer number (a counter
# value or a timestamp may contain six digits by chance); a leaked PIN sits in
# "devpass=739164&" or between spaces or quotes, never inside a longer number.
_LEAK = re.compile(
    "|".join(
        [rf"(?<![0-9]){pin}(?![0-9])" for pin in PINS] + [re.escape(PASSWORD), re.escape(WRONG_PASSWORD)]
    )
)


def fault_meter(index: int, **options: object) -> SimMeter:
    """Meter number `index` of the suite: devid FIRST_ID + index, PIN PINS[index]."""
    values: dict[str, object] = {"devid": str(FIRST_ID + index), "pin": PINS[index], "extended": True}
    values.update(options)
    return SimMeter(**values)  # type: ignore[arg-type]


def find_secret(text: str) -> str | None:
    """The text around the first secret in `text`, the secret itself masked; or None."""
    match = _LEAK.search(text)
    if match is None:
        return None
    start, end = match.span()
    return text[max(0, start - 80) : start] + "<SECRET>" + text[end : end + 80]


def exception_texts(exc: BaseException) -> Iterator[str]:
    """Everything an exception can show: str, repr, args, attributes, the whole chain."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield str(current)
        yield repr(current)
        yield repr(current.args)
        yield repr(vars(current)) if hasattr(current, "__dict__") else ""
        stack += [e for e in (current.__cause__, current.__context__) if e is not None]
        stack += [a for a in current.args if isinstance(a, BaseException)]


class _Collector(logging.Handler):
    def __init__(self, watch: Watch) -> None:
        super().__init__(logging.DEBUG)
        # Formatted as a user's log would show it, traceback included.
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self._watch = watch

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)  # also fills record.exc_text
        self._watch.records.append(Logged(time.monotonic(), record, text))


@dataclass(frozen=True)
class Logged:
    at: float
    """time.monotonic() when it was logged, comparable with Message.received."""
    record: logging.LogRecord
    text: str
    """Formatted, with any traceback."""

    @property
    def level(self) -> int:
        return self.record.levelno

    @property
    def message(self) -> str:
        return self.record.getMessage()


class Watch:
    """Every log record (DEBUG and up, every logger), payloads and texts, checked for secrets."""

    def __init__(self) -> None:
        self.records: list[Logged] = []
        self._probes: list[Probe] = []
        self._texts: list[tuple[str, Callable[[], str]]] = []
        self._reported: set[str] = set()

    @contextlib.contextmanager
    def capture(self) -> Iterator[Watch]:
        root = logging.getLogger()
        handler = _Collector(self)
        level = root.level
        root.addHandler(handler)
        root.setLevel(logging.DEBUG)
        try:
            yield self
        finally:
            root.removeHandler(handler)
            root.setLevel(level)

    def add_probe(self, probe: Probe) -> None:
        self._probes.append(probe)

    def add_text(self, name: str, text: Callable[[], str]) -> None:
        """A text read at check time, e.g. a process's stderr."""
        self._texts.append((name, text))

    def logged(self, pattern: str, *, level: int | None = None, since: float = 0.0) -> list[Logged]:
        """Records whose message matches `pattern` (re.search), at exactly `level` if given."""
        regex = re.compile(pattern)
        return [
            r
            for r in list(self.records)
            if r.at >= since and (level is None or r.level == level) and regex.search(r.message)
        ]

    def leaks(self) -> list[str]:
        found = []
        for logged in list(self.records):
            if (where := find_secret(logged.text)) is not None:
                record = logged.record
                found.append(f"log record ({record.levelname} from {record.name}): {where!r}")
        for probe in self._probes:
            for message in list(probe.messages):
                text = message.topic + " " + message.payload.decode("utf-8", "replace")
                if (where := find_secret(text)) is not None:
                    found.append(f"MQTT message: {where!r}")
        for name, read in self._texts:
            if (where := find_secret(read())) is not None:
                found.append(f"{name}: {where!r}")
        return found

    def assert_no_secret(self) -> None:
        """Fails on leaks not reported by an earlier call (a test may check mid-way)."""
        leaks = [leak for leak in self.leaks() if leak not in self._reported]
        self._reported.update(leaks)
        assert not leaks, f"{len(leaks)} secret(s) leaked, first ones:\n" + "\n".join(leaks[:5])


# --- mosquitto ----------------------------------------------------------------------------


def require(binary: str) -> str:
    """The binary's path; skips the test where it is not installed."""
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not on PATH (apt-get install {binary})")
    return path


def write_password_file(path: Path, users: dict[str, str]) -> None:
    """mosquitto's own format ($7$: PBKDF2-SHA512, 101 rounds, 12-byte salt), written
    here so no mosquitto_passwd is needed (not every distribution ships it)."""
    lines = []
    for user, password in users.items():
        salt = os.urandom(12)
        digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101, 64)
        b64 = base64.b64encode
        lines.append(f"{user}:$7$101${b64(salt).decode()}${b64(digest).decode()}")
    path.write_text("\n".join(lines) + "\n")


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certs(directory: Path) -> Certs:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (openssl CLI)."""
    openssl = require("openssl")
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True, timeout=30)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=smartmac fault suite CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    for name, usage, extra in (
        ("server", "serverAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"),
        ("client", "clientAuth", ""),
    ):
        (directory / f"{name}.ext").write_text(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
            f"extendedKeyUsage={usage}\nsubjectKeyIdentifier=hash\n"
            f"authorityKeyIdentifier=keyid,issuer\n{extra}"
        )
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=smartmac {name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")  # fmt: skip
    return Certs(
        directory / "ca.crt",
        directory / "server.crt",
        directory / "server.key",
        directory / "client.crt",
        directory / "client.key",
    )


class FaultMosquitto(Mosquitto):
    """mosquitto with the suite's password file, its log in a file, and optionally
    persistence and TLS listeners (one with a password, one also requiring a client
    certificate). Anonymous clients (the probes) may use the plain listener; a client
    that gives a user name must give its password."""

    def __init__(self, directory: Path, port: int, *, persistence: bool = False, tls: bool = False) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.log = directory / "mosquitto.log"
        passwords = directory / "passwords"
        write_password_file(passwords, {USERNAME: PASSWORD})
        lines = [
            # Stay the user we are: as root, mosquitto would switch to "mosquitto", which
            # cannot read the password file in pytest's private tmp directory.
            f"user {getpass.getuser()}",
            "per_listener_settings true",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {directory}/",
            # The command flood sends 1000 results at once: the default queue (1000 per
            # subscriber) could drop some, and the test would blame the bridge.
            "max_queued_messages 100000",
            f"log_dest file {self.log}",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            f"listener {port} {LOOPBACK}",
            "allow_anonymous true",
            f"password_file {passwords}",
        ]  # fmt: skip
        self.certs: Certs | None = None
        self.tls_port = self.mtls_port = 0
        if tls:
            self.certs = certs = make_certs(directory / "pki")
            self.tls_port, self.mtls_port = free_port(), free_port()
            for tls_port, require_certificate in ((self.tls_port, False), (self.mtls_port, True)):
                lines += [
                    f"listener {tls_port} {LOOPBACK}",
                    "allow_anonymous false",
                    f"password_file {passwords}",
                    f"cafile {certs.ca}",
                    f"certfile {certs.server_cert}",
                    f"keyfile {certs.server_key}",
                    f"require_certificate {'true' if require_certificate else 'false'}",
                ]
        listeners = [self.tls_port, self.mtls_port] if tls else []
        super().__init__(directory, port, config=lines, listeners=listeners)

    def start(self) -> FaultMosquitto:
        require("mosquitto")
        super().start()
        return self

    def log_lines(self, pattern: str) -> list[str]:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [line for line in text.splitlines() if re.search(pattern, line)]


# --- what the simulator saw ---------------------------------------------------------------


def arrivals_before(meter: SimMeter, moment: float) -> int:
    """How many requests reached `meter` before `moment` (time.monotonic())."""
    return sum(1 for t in list(meter.request_times) if t < moment)
