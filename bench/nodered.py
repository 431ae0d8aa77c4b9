"""Node-RED for the benchmark and the tests: installed from npm on first use, run headless.

Node-RED 4.x (which runs on Node 18+) is installed with npm into a cache directory,
``$NODERED_INSTALL_DIR`` or ``~/.cache/smartmac-bridge/node-red-4``, once; later runs
reuse it. (Not NODE_RED_HOME: Node-RED sets and reads that one itself.) Each run gets
its own user directory with the flow and a settings file: editor off, admin HTTP API on
127.0.0.1 only, so a test can press an inject node with ``POST /inject/<id>``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Self

from bench.support import LOOPBACK, free_port

PACKAGE = "node-red@4"
INSTALL_ENV = "NODERED_INSTALL_DIR"
MIN_NODE_MAJOR = 18  # Node-RED 4's floor
_INSTALL_TIMEOUT = 600.0
_READY_LINE = "Started flows"

Flow = list[dict[str, Any]]


def install_dir() -> Path:
    """Where Node-RED is (or will be) installed."""
    configured = os.environ.get(INSTALL_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "smartmac-bridge" / "node-red-4"


def missing_tools() -> str | None:
    """Why Node-RED cannot be run here (node or npm missing or too old), or None."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing = " and ".join(name for name, path in (("node", node), ("npm", npm)) if path is None)
        return f"{missing} not on PATH (Node-RED 4 needs Node.js {MIN_NODE_MAJOR}+ and npm)"
    version = subprocess.run(
        [node, "--version"], check=False, capture_output=True, text=True, timeout=30
    ).stdout
    try:
        major = int(version.strip().lstrip("v").split(".")[0])
    except ValueError:
        return f"cannot read the version of node ({version.strip()!r})"
    if major < MIN_NODE_MAJOR:
        return f"node {version.strip()} is too old: Node-RED 4 needs {MIN_NODE_MAJOR}+"
    return None


def ensure_installed() -> Path:
    """Install Node-RED 4 on first use; return the path of its red.js.

    A lock file makes a second process (a test next to a benchmark) wait for the first
    one's install instead of racing it; a marker file written last tells a finished
    install from one that was interrupted.
    """
    directory = install_dir()
    red = directory / "node_modules" / "node-red" / "red.js"
    marker = directory / ".installed"
    if marker.is_file() and red.is_file():
        return red
    reason = missing_tools()
    if reason is not None:
        raise RuntimeError(reason)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / (directory.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and red.is_file():
            return red  # another process installed it while we waited
        command = [
            "npm", "install", "--prefix", str(directory), "--no-audit", "--no-fund",
            "--no-update-notifier", "--omit=dev", "--loglevel=error", PACKAGE,
        ]  # fmt: skip
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=_INSTALL_TIMEOUT)
        if done.returncode != 0 or not red.is_file():
            raise RuntimeError(f"npm install {PACKAGE} failed:\n{done.stderr[-3000:]}")
        marker.write_text(PACKAGE + "\n")
    return red


_SETTINGS = """\
// Written by bench/nodered.py: headless, loopback only, nothing stored beside the flow.
module.exports = {
    uiHost: "%(host)s",
    uiPort: %(port)d,
    flowFile: "flows.json",
    credentialSecret: false,
    disableEditor: true,
    logging: { console: { level: "info", metrics: false, audit: false } },
    editorTheme: { projects: { enabled: false } },
    diagnostics: { enabled: false },
    telemetry: { enabled: false },
    functionExternalModules: false,
};
"""


class NodeRed:
    """One headless Node-RED process running a given flow, in its own user directory."""

    def __init__(self, flow: Flow, directory: Path, *, port: int | None = None) -> None:
        self.flow = flow
        self.directory = directory
        self.port = port or free_port()
        self.log_path = directory / "node-red.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 60.0) -> Self:
        """Install if needed, start, and return once the flow runs."""
        red = ensure_installed()
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "flows.json").write_text(json.dumps(self.flow, indent=1))
        settings = self.directory / "settings.js"
        settings.write_text(_SETTINGS % {"host": LOOPBACK, "port": self.port})
        env = {k: v for k, v in os.environ.items() if k != "NODE_RED_HOME"}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                ["node", str(red), "--userDir", str(self.directory), "--settings", str(settings)],
                cwd=self.directory, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while _READY_LINE not in self.log():
            if self.process.poll() is not None:
                raise RuntimeError(f"Node-RED exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"Node-RED did not start its flows in {timeout:g} s:\n{self.log()[-3000:]}"
                )
            time.sleep(0.1)  # a log file has no event to wait on
        return self

    def inject(self, node_id: str) -> None:
        """Press inject node node_id, as the editor's button does (admin API)."""
        url = f"http://{LOOPBACK}:{self.port}/inject/{node_id}"
        request = urllib.request.Request(url, data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=10) as answer:
            if answer.status != 200:
                raise RuntimeError(f"inject {node_id}: HTTP {answer.status}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def with_broker(flow: Flow, host: str, port: int) -> Flow:
    """A copy of flow whose MQTT broker config nodes point at host:port."""
    copy: Flow = json.loads(json.dumps(flow))
    for node in copy:
        if node.get("type") == "mqtt-broker":
            node["broker"] = host
            node["port"] = str(port)
    return copy


# --- the benchmark's flow -----------------------------------------------------------------
# What installers build by hand (issue 5): inject -> function fanning out one message per
# meter -> http request -> function split -> mqtt out (retained). The split publishes what
# the bridge publishes for a poll (every reading, the state JSON and the relay), so the two
# do the same work per poll.

_FAN_OUT = """\
const meters = %(meters)s;
for (const [id, pin] of meters) {
    node.send({url: "%(base)s/?page=getdata&devid=" + id + "&devpass=" + pin, meter: id});
}
return null;
"""

_SPLIT = """\
if (msg.statusCode !== 200) { return null; }
let body;
try {
    // The meter's raw newlines inside strings are not JSON: blank control characters.
    body = JSON.parse(msg.payload.replace(/[\\u0000-\\u001f]/g, " "));
} catch (e) {
    return null;
}
const base = "%(base_topic)s/" + msg.meter + "/";
const state = {};
const out = [];
for (const [key, item] of Object.entries(body.data || {})) {
    if (item.value === undefined) { continue; }
    state[key] = Number(item.value);
    out.push({topic: base + key, payload: item.value});
}
state.devid = body.devid;
state.time = Number(body.time);
state.pout = Number(body.pout);
state.relay = body.pout === "1" ? "ON" : "OFF";
out.push({topic: base + "state", payload: JSON.stringify(state)});
out.push({topic: base + "relay", payload: state.relay});
return [out];
"""


def bench_flow(
    *,
    simulator_port: int,
    meters: list[tuple[str, str]],
    broker_port: int,
    interval: float,
    qos: int = 0,
    base_topic: str = "smartmac",
) -> Flow:
    """The benchmark flow polling meters [(devid, pin)] every interval seconds, all at once."""
    fan = _FAN_OUT % {"meters": json.dumps(meters), "base": f"http://{LOOPBACK}:{simulator_port}"}
    split = _SPLIT % {"base_topic": base_topic}
    return [
        {"id": "bench-tab", "type": "tab", "label": "fleet benchmark"},
        {
            "id": "bench-broker", "type": "mqtt-broker", "name": "bench", "broker": LOOPBACK,
            "port": str(broker_port), "clientid": "nodered-bench", "autoConnect": True,
            "usetls": False, "protocolVersion": "4", "keepalive": "60", "cleansession": True,
        },
        {
            "id": "bench-tick", "type": "inject", "z": "bench-tab", "name": "every interval",
            "repeat": f"{interval:g}", "once": True, "onceDelay": "0.5", "topic": "",
            "payload": "", "payloadType": "date", "props": [{"p": "payload"}],
            "wires": [["bench-fan"]],
        },
        {
            "id": "bench-fan", "type": "function", "z": "bench-tab", "name": "one message per meter",
            "func": fan, "outputs": 1, "wires": [["bench-http"]],
        },
        {
            "id": "bench-http", "type": "http request", "z": "bench-tab", "name": "getdata",
            "method": "GET", "ret": "txt", "paytoqs": "ignore", "url": "", "tls": "",
            "persist": False, "proxy": "", "authType": "", "senderr": False, "headers": [],
            "wires": [["bench-split"]],
        },
        {
            "id": "bench-split", "type": "function", "z": "bench-tab", "name": "split",
            "func": split, "outputs": 1, "wires": [["bench-out"]],
        },
        {
            "id": "bench-out", "type": "mqtt out", "z": "bench-tab", "name": "retained",
            "topic": "", "qos": str(qos), "retain": "true", "broker": "bench-broker", "wires": [],
        },
    ]  # fmt: skip
