"""Fleet benchmark (issue 5): the bridge polling N extended meters through mosquitto.

One run starts, each as its own process on free loopback ports: mosquitto, the simulator
(N extended 3-phase meters answering after --delay ms, plus --commands fast meters for the
relay round trip), a subscriber counting what arrives on B/#, and the bridge (or, with
--peer node-red, also the Node-RED flow, and with --peer floor a bare client that only polls,
one after the other on fresh processes). After
--warmup seconds it measures for --seconds and prints a table and one JSON line:

- polls/s achieved (accepted requests at the fleet's meters) vs expected (N / interval);
- CPU of the bridge per poll (user+sys from /proc, accepted requests of all meters);
- messages/s at the subscriber; schedule lag p50/p99/max (from ``bridge.lags``);
- rate-limit violations as the simulator saw them over the whole run (HTTP 429, and
  "early": any request arriving sooner than 6 s after the previous one to that meter);
- peak RSS (VmHWM) of the bridge, the simulator and mosquitto; CPU % of each;
- relay round trip (set -> B/D/relay updated) p50/p99 over --commands commands, each to
  its own command meter (interval 3600 s, so its slot is free; answer delay
  --command-delay ms), spread evenly over the measured window.

With --http (issue 10) the bridge then runs a second time on fresh processes, with
`http.port` set (row `bridge+http`): during its warm-up a headless chromium opens the
status page (it refreshes itself every 2 s: GET api/bridge and api/meters), or, where
chromium or selenium is missing (or with --http-client poller), a thread GETs the same two
every 2 s; in the window a scraper GETs /metrics every 15 s. The row adds the answer times
as the clients saw them (/api/meters and /metrics: median and max, to the last byte), the
body sizes, the page client's CPU and the page's last render; the HTTP cost is the
difference of the bridge's CPU between the two rows (`http_cpu_pct_delta`).

With --shards N (issue 11) the same fleet then runs over N bridge processes sharing one
device list (`shard: {count: N, index: i}`; row `N shards`, after the one-instance row
`bridge` on the same broker): the figures in total, and per shard in the JSON (`shards`).
`--broker nats` runs a 3-node nats-server cluster (JetStream, MQTT) instead of mosquitto:
shard i starts on node i (its `mqtt.host` the node list from there), the counting
subscriber and the relay commands use the last node, so every state and every command
crosses the cluster; `states_seen` counts the meters whose B/D/relay (sent in every
--output mode) reached that subscriber in the window. `shard_cpu_per_poll_ratio` is the
shards' summed CPU per poll over the one instance's.

    python bench/fleet.py --meters 2000 --seconds 60
    python bench/fleet.py --meters 2000 --seconds 60 --http
    python bench/fleet.py --meters 2000 --seconds 60 --shards 2 --broker nats --output json
    python bench/fleet.py --meters 2000 --seconds 60 --peer node-red
    python bench/fleet.py --meters 2000 --seconds 60 --peer floor
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench import _http, nodered
from bench._simulator import fleet
from bench.procstat import cpu_seconds, peak_rss_mb
from bench.support import LOOPBACK, Mosquitto, free_port, percentile, wait_for_port

BASE = "smartmac"
INTERVAL = 6.0  # extended meters, polled as often as they allow
COMMAND_INTERVAL = 3600.0  # command meters: polled once at start, then only for commands
MIN_WARMUP = 7.0  # the command meters' first poll must be more than 6 s old
COMMAND_TIMEOUT = 20.0
#: The bridge's rows: without, and (--http) with the HTTP server and its clients.
BRIDGES = ("bridge", "bridge+http")


def publish_supported() -> bool:
    """Does this bridge's config have the `publish: {mode: ...}` key (issue 4)?"""
    from bridge.config import Settings

    return "publish" in Settings.model_fields


# --- processes ------------------------------------------------------------------------------


@dataclass
class Proc:
    """A child process whose CPU and memory we read from /proc."""

    name: str
    popen: subprocess.Popen[bytes]
    cpu_mark: float = 0.0
    cpu_window: float = 0.0
    rss_mb: float = float("nan")

    @property
    def pid(self) -> int:
        return self.popen.pid

    def mark(self) -> None:
        self.cpu_mark = cpu_seconds(self.pid)

    def measure(self) -> None:
        """CPU since mark() and peak RSS so far (call before stopping)."""
        self.cpu_window = cpu_seconds(self.pid) - self.cpu_mark
        self.rss_mb = peak_rss_mb(self.pid)

    def stop(self, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode


@contextmanager
def started(proc: Proc) -> Iterator[Proc]:
    try:
        yield proc
    finally:
        proc.stop()


def spawn(name: str, command: list[str], log: Path) -> Proc:
    with open(log, "wb") as out:
        popen = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    return Proc(name, popen)


def start_mosquitto(tmp: Path) -> tuple[Proc, int]:
    """bench.support's mosquitto (config and output in tmp), as a Proc to measure and stop."""
    broker = Mosquitto(tmp).start()
    assert broker.process is not None
    return Proc("mosquitto", broker.process), broker.port


@dataclass
class Brokers:
    """The broker of one row: mosquitto, or the nodes of a nats cluster."""

    procs: list[Proc]
    ports: list[int]
    stop: Callable[[], object]

    def rotated(self, first: int) -> list[int]:
        """The node ports for a client that starts on node `first` (round robin from there)."""
        n = len(self.ports)
        return [self.ports[(first + k) % n] for k in range(n)]


def start_brokers(tmp: Path, kind: str) -> Brokers:
    if kind == "mosquitto":
        proc, port = start_mosquitto(tmp)
        return Brokers([proc], [port], proc.stop)
    from bench.nats import NatsCluster

    cluster = NatsCluster(tmp / "nats", 3).start()
    procs = []
    for node in cluster.nodes:
        assert node.process is not None
        procs.append(Proc(node.name, node.process))
    return Brokers(procs, [node.mqtt_port for node in cluster.nodes], cluster.stop)


def start_simulator(tmp: Path, args: argparse.Namespace, *, times: Path | None = None) -> tuple[Proc, int]:
    """bench/_simulator.py for args' fleet; with `times`, it writes arrival times there at exit."""
    port = free_port()
    command = [
        sys.executable, str(ROOT / "bench" / "_simulator.py"), "--port", str(port),
        "--meters", str(args.meters), "--delay", str(args.delay / 1000),
        "--commands", str(args.commands), "--command-delay", str(args.command_delay / 1000),
    ]  # fmt: skip
    if times is not None:
        command += ["--times", str(times)]
    proc = spawn("simulator", command, tmp / "simulator.log")
    try:
        wait_for_port(port, timeout=60)
    except TimeoutError:
        proc.stop()
        raise
    return proc, port


def simulator_stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/stats", timeout=30) as answer:
        stats: dict[str, Any] = json.loads(answer.read())
        return stats


# --- the subscriber that counts messages --------------------------------------------------


class Counter:
    """Counts messages on B/#: mosquitto_sub (C, newlines counted in big reads) or paho."""

    def __init__(self, port: int, qos: int) -> None:
        self.count = 0
        self._port, self._qos = port, qos
        self._sub: subprocess.Popen[bytes] | None = None
        self._client: paho.Client | None = None
        self._thread: threading.Thread | None = None
        self.kind = "mosquitto_sub" if shutil.which("mosquitto_sub") else "paho"

    def start(self) -> Counter:
        topic = f"{BASE}/#"
        if self.kind == "mosquitto_sub":
            # Every payload the bridge sends is one line (numbers, compact JSON, words), and
            # mosquitto_sub ends each with a newline: counting newlines counts messages.
            self._sub = subprocess.Popen(
                ["mosquitto_sub", "-h", LOOPBACK, "-p", str(self._port), "-t", topic,
                 "-q", str(self._qos), "-i", f"bench-count-{uuid.uuid4().hex[:8]}"],
                stdout=subprocess.PIPE,
            )  # fmt: skip
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        else:
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-count-{uuid.uuid4().hex[:8]}")
            client.on_connect = lambda c, *a: c.subscribe(topic, self._qos)
            client.on_message = self._on_message
            client.connect(LOOPBACK, self._port)
            client.loop_start()
            self._client = client
        return self

    def _read(self) -> None:
        assert self._sub is not None and self._sub.stdout is not None
        fd = self._sub.stdout.fileno()
        while chunk := os.read(fd, 1 << 20):
            self.count += chunk.count(b"\n")

    def _on_message(self, *args: object) -> None:
        self.count += 1

    @property
    def pid(self) -> int | None:
        return self._sub.pid if self._sub is not None else None

    def stop(self) -> None:
        if self._sub is not None:
            self._sub.terminate()
            self._sub.wait(5)
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()


# --- relay round trips --------------------------------------------------------------------


def subscribed(
    port: int,
    name: str,
    topics: list[tuple[str, int]],
    on_message: Callable[[paho.Client, object, paho.MQTTMessage], None],
) -> paho.Client:
    """A paho client on its own thread, returned once its (topic, qos) subscriptions are
    acknowledged (at once for none)."""
    done = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{uuid.uuid4().hex[:8]}")
    client.on_connect = lambda c, *a: c.subscribe(topics) if topics else done.set()
    client.on_subscribe = lambda *a: done.set()
    client.on_message = on_message
    client.connect(LOOPBACK, port)
    client.loop_start()
    if not done.wait(30):
        raise RuntimeError(f"{name} could not subscribe")
    return client


class Commander:
    """Sends ON to each command meter once and times set -> B/D/relay ON."""

    def __init__(self, port: int, segments: list[str], qos: int, *, sub_qos: int | None = None) -> None:
        """`sub_qos`: of the subscriptions to B/D/relay (default max(qos, 1)); nats makes
        a JetStream consumer per QoS 1 subscription, slow to set up for 50 of them."""
        self._segments = segments
        self._sent: dict[str, float] = {}
        self.round_trips: dict[str, float] = {}
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        topics = [(f"{BASE}/{s}/relay", max(qos, 1) if sub_qos is None else sub_qos) for s in segments]
        self._client = subscribed(port, "bench-cmd", topics, self._on_message)

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        now = time.monotonic()
        segment = msg.topic.split("/")[-2]
        with self._lock:
            sent = self._sent.get(segment)
            if sent is not None and segment not in self.round_trips and msg.payload == b"ON":
                self.round_trips[segment] = now - sent
                self._done.notify_all()

    def send(self, segment: str) -> None:
        with self._lock:
            self._sent[segment] = time.monotonic()
        self._client.publish(f"{BASE}/{segment}/relay/set", b"ON", qos=1)

    def wait_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.round_trips) < len(self._sent):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._done.wait(left)

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


# --- one row ------------------------------------------------------------------------------


@dataclass
class Row:
    peer: str
    figures: dict[str, Any] = field(default_factory=dict)


def _ms(values: list[float], pct: float) -> float | None:
    return round(percentile(values, pct) * 1000, 1) if values else None


def bridge_config(
    tmp: Path,
    args: argparse.Namespace,
    brokers: int | list[int],
    sim_port: int,
    *,
    http_port: int | None = None,
    shard: tuple[int, int] | None = None,
) -> Path:
    main, fast = fleet(args.meters, args.commands, args.command_delay / 1000)
    host = f"{LOOPBACK}:{sim_port}"
    # Command meters first: the bridge spreads its first polls over up to one interval in
    # config order, and a command meter's slot is free only 6 s after its first poll.
    devices = [
        {"id": m.devid, "pin": m.pin, "host": host, "topic": f"cmd{i:03d}", "extended": True,
         "interval": COMMAND_INTERVAL, "timeout": 5}
        for i, m in enumerate(fast)
    ] + [
        {"id": m.devid, "pin": m.pin, "host": host, "topic": f"m{i:05d}", "extended": True,
         "interval": INTERVAL, "timeout": 5}
        for i, m in enumerate(main)
    ]  # fmt: skip
    config: dict[str, Any] = {
        "mqtt": {"client_id": "bench-bridge", "base_topic": BASE, "qos": args.qos},
        "devices": devices,
    }  # fmt: skip
    ports = [brokers] if isinstance(brokers, int) else brokers
    if len(ports) == 1:
        config["mqtt"].update(host=LOOPBACK, port=ports[0])
    else:  # a cluster's nodes, mqtt.host as a list
        config["mqtt"]["host"] = [f"{LOOPBACK}:{port}" for port in ports]
    publish: dict[str, str] = {}
    if getattr(args, "publish", None) is not None:
        publish["mode"] = args.publish
    if getattr(args, "output", None) is not None:
        publish["output"] = args.output
    if publish:
        config["publish"] = publish
    if http_port is not None:
        config["http"] = {"port": http_port, "host": LOOPBACK}
    if shard is not None:
        config["shard"] = {"index": shard[0], "count": shard[1]}
    path = tmp / (f"bridge-{shard[0]}.yaml" if shard is not None else "bridge.yaml")
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def start_page_client(args: argparse.Namespace, url: str, *, wait_until: float) -> _http.PageClient:
    """The status page open in chromium, or the poller doing what it does (--http-client)."""
    if args.http_client != "poller" and _http.browser_missing() is None:
        # Every configured meter's row, the command meters' too, before the window opens.
        timeout = max(60.0, wait_until - time.monotonic())
        return _http.Browser(url, args.meters + args.commands, load_timeout=timeout)
    return _http.Poller(url)


def http_figures(f: dict[str, Any], page: _http.PageClient, scraper: _http.Scraper, elapsed: float) -> None:
    """The --http row's own figures: what its clients saw in the window."""
    answers = page.answers()
    meters = sorted(a.seconds for a in answers if a.path == "/api/meters")
    summary = sorted(a.seconds for a in answers if a.path == "/api/bridge")
    scrapes = scraper.answers()
    metrics = sorted(a.seconds for a in scrapes)
    f["http_client"] = page.kind
    f["api_meters_answers"] = len(meters)
    f["api_meters_ms_p50"] = _ms(meters, 50)
    f["api_meters_ms_max"] = _ms(meters, 100)
    f["api_meters_kb"] = _kb(max((a.size for a in answers if a.path == "/api/meters"), default=None))
    f["api_bridge_ms_p50"] = _ms(summary, 50)
    f["metrics_scrapes"] = len(metrics)
    f["metrics_ms_p50"] = _ms(metrics, 50)
    f["metrics_ms_max"] = _ms(metrics, 100)
    f["metrics_kb"] = _kb(max((a.size for a in scrapes), default=None))
    cpu = page.cpu_seconds()
    f["page_client_cpu_pct"] = round(100 * cpu / elapsed, 1) if cpu is not None else None
    render = page.render_ms() if isinstance(page, _http.Browser) else None
    f["page_render_ms"] = round(render, 1) if render is not None else None
    f["http_errors"] = len(scraper.errors) + len(getattr(page, "errors", ()))


def _kb(size: int | None) -> float | None:
    return round(size / 1024, 1) if size is not None else None


def row_shards(peer: str) -> int:
    """How many bridge processes a row runs: `N shards` runs N, every other row one."""
    return int(peer.split()[0]) if peer.endswith(" shards") else 1


class StateWatcher:
    """The meters whose B/D/relay (sent after every good read, in every output mode)
    reached this subscriber since mark(): every state crossed the broker to here."""

    def __init__(self, port: int, qos: int) -> None:
        self._seen: set[str] = set()
        self._marked = False
        self._client = subscribed(port, "bench-watch", [(f"{BASE}/+/relay", qos)], self._on_message)

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        if self._marked and not msg.retain:
            self._seen.add(msg.topic.split("/")[-2])

    def mark(self) -> None:
        self._marked = True

    def seen(self) -> set[str]:
        return set(self._seen)

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def run_peer(peer: str, args: argparse.Namespace, log: Callable[[str], None]) -> Row:
    """Start everything for one peer, measure, stop everything; the figures."""
    row = Row(peer)
    seconds = args.seconds
    if peer == "node-red":
        # The flow polls every meter at once, every interval: a window that is not a whole
        # number of intervals would count 4 bursts or 5 depending on where it falls.
        seconds = math.ceil(args.seconds / args.nr_interval - 1e-9) * args.nr_interval
    shards = row_shards(peer)
    bridge_row = peer in BRIDGES or shards > 1
    tmp = Path(tempfile.mkdtemp(prefix=f"fleet-{peer.replace(' ', '-')}-"))
    with ExitStack() as stack:
        brokers = start_brokers(tmp, args.broker)
        stack.callback(brokers.stop)
        # The clients that watch and command sit on the last node: with a cluster, every
        # state and every command crosses it (the shards start on nodes 0, 1, ...).
        watch_port = brokers.ports[-1]
        simulator, sim_port = start_simulator(tmp, args)
        stack.enter_context(started(simulator))
        counter = Counter(watch_port, args.qos).start()
        stack.callback(counter.stop)
        watcher = StateWatcher(watch_port, args.qos)
        stack.callback(watcher.stop)

        commander: Commander | None = None
        segments = [f"cmd{i:03d}" for i in range(args.commands)]
        http_port = free_port() if peer == "bridge+http" else None
        targets: list[Proc] = []
        outs: list[Path] = []
        if bridge_row:
            # Subscribed before the bridges start (and flood the broker with their configs).
            commander = Commander(
                watch_port, segments, args.qos, sub_qos=args.qos if args.broker == "nats" else None
            )
            stack.callback(commander.stop)
            for index in range(shards):
                config = bridge_config(
                    tmp,
                    args,
                    brokers.rotated(index % len(brokers.ports)),
                    sim_port,
                    http_port=http_port,
                    shard=(index, shards) if shards > 1 else None,
                )
                outs.append(tmp / f"bridge-result-{index}.json")
                command = [
                    sys.executable,
                    str(ROOT / "bench" / "_bridge.py"),
                    "--config",
                    str(config),
                    "--out",
                    str(outs[-1]),
                    "--log-level",
                    os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
                ]
                name = f"bridge-{index}" if shards > 1 else "bridge"
                targets.append(stack.enter_context(started(spawn(name, command, tmp / f"{name}.log"))))
            expected = args.meters / INTERVAL
        elif peer == "floor":
            command = [
                sys.executable,
                str(ROOT / "bench" / "_floor.py"),
                "--port",
                str(sim_port),
                "--meters",
                str(args.meters),
                "--interval",
                str(INTERVAL),
            ]
            targets.append(stack.enter_context(started(spawn("floor", command, tmp / "floor.log"))))
            expected = args.meters / INTERVAL
        else:
            main, _ = fleet(args.meters, 0, 0.0)
            flow = nodered.bench_flow(
                simulator_port=sim_port, meters=[(m.devid, m.pin) for m in main],
                broker_port=brokers.ports[0], interval=args.nr_interval, qos=args.qos,
            )  # fmt: skip
            red = nodered.NodeRed(flow, tmp / "node-red")
            red.start()
            assert red.process is not None  # start() returned: it runs
            targets.append(stack.enter_context(started(Proc("node-red", red.process))))
            expected = args.meters / args.nr_interval
        warm_until = time.monotonic() + args.warmup
        log(f"{peer}: started; warming up {args.warmup:g} s")

        page: _http.PageClient | None = None
        url = f"http://{LOOPBACK}:{http_port}/"
        if http_port is not None:
            wait_for_port(http_port, timeout=60)  # the bridge builds 2,000 meters first
            page = start_page_client(args, url, wait_until=warm_until)
            stack.callback(page.stop)
            log(f"{peer}: status page open in {page.kind}")
        pause = warm_until - time.monotonic()
        if pause > 0:
            time.sleep(pause)  # measuring a window of time: nothing to wait on
        else:
            log(f"{peer}: the page client took {-pause:.1f} s longer than the warm-up")
        for target in targets:
            if target.popen.poll() is not None:
                raise RuntimeError(f"{target.name} exited early; see {tmp}")
        stats_before = simulator_stats(sim_port)
        count_before = counter.count
        for proc in (*targets, simulator, *brokers.procs):
            proc.mark()
        watcher.mark()
        if bridge_row:
            for target in targets:
                target.popen.send_signal(signal.SIGUSR1)  # lags from here on
        started_at = time.monotonic()
        scraper: _http.Scraper | None = None
        if page is not None:
            page.mark()
            scraper = _http.Scraper(url + "metrics", started_at, _http.scrape_offsets(seconds))
            stack.callback(scraper.stop)
        log(f"{peer}: measuring {seconds:g} s")

        if commander is not None and segments:
            step = seconds / len(segments)
            for i, segment in enumerate(segments):
                pause = started_at + (i + 0.5) * step - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                commander.send(segment)
        pause = started_at + seconds - time.monotonic()
        if pause > 0:
            time.sleep(pause)

        elapsed = time.monotonic() - started_at
        count_after = counter.count
        seen = watcher.seen()
        for proc in (*targets, simulator, *brokers.procs):
            proc.measure()
        served: dict[str, Any] = {}  # (after the other figures in the row)
        if page is not None and scraper is not None:
            http_figures(served, page, scraper, elapsed)
        stats_after = simulator_stats(sim_port)
        if commander is not None:
            commander.wait_all(COMMAND_TIMEOUT)
        lags: list[float] = []
        per_shard_lags: list[list[float]] = []
        threads = None
        if bridge_row:
            if page is not None:
                page.stop()  # before the bridge: its page would only see it gone
            for target, out in zip(targets, outs, strict=True):
                if target.stop() != 0:
                    raise RuntimeError(f"{target.name} did not exit cleanly; see {tmp}")
                result = json.loads(out.read_text())
                per_shard_lags.append(sorted(result["lags"]))
                threads = result["threads"]
            lags = sorted(lag for shard_lags in per_shard_lags for lag in shard_lags)
        final = simulator_stats(sim_port)

    fleet_ids = {m.devid for m in fleet(args.meters, 0, 0.0)[0]}
    before, after = stats_before["per_meter"], stats_after["per_meter"]
    fleet_polls = sum(after[devid]["ok"] - before[devid]["ok"] for devid in fleet_ids)
    polls = stats_after["ok"] - stats_before["ok"]
    trips = sorted(commander.round_trips.values()) if commander is not None else []
    cpu = sum(target.cpu_window for target in targets)
    f = row.figures
    f["meters"] = args.meters
    f["seconds"] = round(elapsed, 1)
    f["polls_per_s"] = round(fleet_polls / elapsed, 1)
    f["expected_per_s"] = round(expected, 1)
    f["polls_pct_of_expected"] = round(100 * fleet_polls / elapsed / expected, 1) if expected else None
    f["cpu_ms_per_poll"] = round(1000 * cpu / polls, 3) if polls else None
    f["cpu_pct"] = round(100 * cpu / elapsed, 1)
    f["messages_per_s"] = round((count_after - count_before) / elapsed, 1)
    f["subscriber"] = counter.kind
    f["states_seen"] = len(seen & ({f"m{i:05d}" for i in range(args.meters)} if bridge_row else set()))
    f["lag_p50_ms"] = _ms(lags, 50) if lags else None
    f["lag_p99_ms"] = _ms(lags, 99) if lags else None
    f["lag_max_ms"] = round(lags[-1] * 1000, 1) if lags else None
    f["violations_429"] = final["rate_limited"]
    f["early_arrivals"] = final["early"]
    f["peak_rss_mb"] = round(sum(target.rss_mb for target in targets), 1)
    f["relay_commands"] = len(segments) if commander is not None else 0
    f["relay_confirmed"] = len(trips)
    f["relay_p50_ms"] = _ms(trips, 50)
    f["relay_p99_ms"] = _ms(trips, 99)
    f["command_delay_ms"] = args.command_delay if commander is not None else None
    f["simulator_cpu_pct"] = round(100 * simulator.cpu_window / elapsed, 1)
    f["simulator_rss_mb"] = round(simulator.rss_mb, 1)
    f["broker_cpu_pct"] = round(100 * sum(p.cpu_window for p in brokers.procs) / elapsed, 1)
    f["broker_rss_mb"] = round(sum(p.rss_mb for p in brokers.procs), 1)
    if threads is not None:
        f["bridge_threads"] = threads
    if shards > 1:
        f["shards"] = shard_figures(args, targets, per_shard_lags, before, after, elapsed)
    f.update(served)
    if peer == "node-red":
        f["inject_interval_s"] = args.nr_interval
    if args.keep:
        log(f"{peer}: logs and results kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return row


def shard_figures(
    args: argparse.Namespace,
    targets: list[Proc],
    lags: list[list[float]],
    before: dict[str, Any],
    after: dict[str, Any],
    elapsed: float,
) -> list[dict[str, Any]]:
    """Each shard's own figures: its meters (by the hash), their polls, its CPU and memory."""
    from bridge.shard import owner

    count = len(targets)
    main, fast = fleet(args.meters, args.commands, args.command_delay / 1000)
    rows: list[dict[str, Any]] = []
    for index, target in enumerate(targets):
        mine = [m.devid for m in main if owner(m.devid, count) == index]
        every = mine + [m.devid for m in fast if owner(m.devid, count) == index]
        polls = sum(after[d]["ok"] - before[d]["ok"] for d in every)
        fleet_polls = sum(after[d]["ok"] - before[d]["ok"] for d in mine)
        rows.append(
            {
                "index": index,
                "meters": len(mine),
                "polls_per_s": round(fleet_polls / elapsed, 1),
                "polls_pct_of_expected": round(100 * fleet_polls / elapsed / (len(mine) / INTERVAL), 1)
                if mine
                else None,
                "cpu_pct": round(100 * target.cpu_window / elapsed, 1),
                "cpu_ms_per_poll": round(1000 * target.cpu_window / polls, 3) if polls else None,
                "peak_rss_mb": round(target.rss_mb, 1),
                "lag_p99_ms": _ms(lags[index], 99) if lags[index] else None,
            }
        )
    return rows


# --- output -------------------------------------------------------------------------------

_LABELS = [
    ("polls_per_s", "polls/s achieved"),
    ("expected_per_s", "polls/s expected"),
    ("polls_pct_of_expected", "% of expected"),
    ("cpu_ms_per_poll", "CPU ms per poll"),
    ("cpu_pct", "CPU % (of one core)"),
    ("messages_per_s", "messages/s at subscriber"),
    ("states_seen", "meters whose state arrived"),
    ("lag_p50_ms", "schedule lag p50 ms"),
    ("lag_p99_ms", "schedule lag p99 ms"),
    ("lag_max_ms", "schedule lag max ms"),
    ("violations_429", "rate-limit violations (429)"),
    ("early_arrivals", "requests < 6 s apart"),
    ("peak_rss_mb", "peak RSS MB (bridge processes)"),
    ("relay_confirmed", "relay commands confirmed"),
    ("relay_p50_ms", "relay round trip p50 ms"),
    ("relay_p99_ms", "relay round trip p99 ms"),
    ("simulator_cpu_pct", "simulator CPU %"),
    ("simulator_rss_mb", "simulator peak RSS MB"),
    ("broker_cpu_pct", "broker CPU % (all nodes)"),
    ("broker_rss_mb", "broker peak RSS MB (all nodes)"),
]


#: The --http row's own figures, printed when it ran (n/a in the other columns).
_HTTP_LABELS = [
    ("api_meters_answers", "/api/meters answers"),
    ("api_meters_ms_p50", "/api/meters ms p50"),
    ("api_meters_ms_max", "/api/meters ms max"),
    ("api_meters_kb", "/api/meters body KiB"),
    ("api_bridge_ms_p50", "/api/bridge ms p50"),
    ("metrics_scrapes", "/metrics scrapes"),
    ("metrics_ms_p50", "/metrics ms p50"),
    ("metrics_ms_max", "/metrics ms max"),
    ("metrics_kb", "/metrics body KiB"),
    ("page_client_cpu_pct", "page client CPU %"),
    ("page_render_ms", "page render ms (last)"),
    ("http_errors", "HTTP errors"),
]


#: The JSON key of the bridge's CPU per poll as a multiple of each peer's.
_RATIOS = {"node-red": "cpu_per_poll_ratio", "floor": "cpu_per_poll_ratio_floor"}


def _cell(value: object) -> str:
    return "n/a" if value is None else str(value)


def render(rows: list[Row], args: argparse.Namespace, extra: dict[str, Any]) -> str:
    head = ["figure", *(row.peer for row in rows)]
    lines = [head]
    labels = _LABELS + (_HTTP_LABELS if any("http_client" in row.figures for row in rows) else [])
    for key, label in labels:
        lines.append([label, *(_cell(row.figures.get(key)) for row in rows)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = [
        (
            f"{args.meters} extended 3-phase meters, answer delay {args.delay:g} ms, "
            f"{rows[0].figures['seconds']:g} s measured after {args.warmup:g} s warm-up, QoS {args.qos}, "
            f"publish {extra['publish']}, output {extra['output']}; broker {args.broker}; "
            f"subscriber: {rows[0].figures['subscriber']}; "
            f"{args.commands} relay commands to command meters answering in {args.command_delay:g} ms"
        )
    ]
    for row in rows:
        if row.peer == "node-red":
            text.append(
                f"node-red: inject every {args.nr_interval:g} s (all meters at once); "
                f"{row.figures['seconds']:g} s measured (whole intervals)"
            )
    for line in lines:
        text.append(
            "  ".join(
                cell.rjust(w) if i else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            )
        )
    for row in rows:
        for shard in row.figures.get("shards", ()):
            text.append(
                f"{row.peer}, shard {shard['index']}: {shard['meters']} meters, "
                f"{_cell(shard['polls_per_s'])} polls/s ({_cell(shard['polls_pct_of_expected'])} %), "
                f"CPU {shard['cpu_pct']} %, {_cell(shard['cpu_ms_per_poll'])} ms per poll, "
                f"peak RSS {shard['peak_rss_mb']} MB, lag p99 {_cell(shard['lag_p99_ms'])} ms"
            )
    for peer, key in _RATIOS.items():
        if key in extra:
            text.append(f"CPU per poll, bridge / {peer}: {_cell(extra[key])}")
    if "shard_cpu_per_poll_ratio" in extra:
        text.append(
            f"CPU per poll, {args.shards} shards (summed) / one instance: "
            f"{_cell(extra['shard_cpu_per_poll_ratio'])}"
        )
    if "http_cpu_pct_delta" in extra:
        text.append(
            f"HTTP cost, bridge+http - bridge: {_cell(extra['http_cpu_pct_delta'])} % of one core "
            f"(page client: {extra['http_client']}; /metrics every {_http.SCRAPE_S:g} s)"
        )
    return "\n".join(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fleet benchmark: the bridge (and optionally Node-RED) polling N simulated meters.",
    )
    parser.add_argument("--meters", type=int, default=2000, help="extended meters (default 2000)")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured time (default 60)")
    parser.add_argument(
        "--warmup",
        type=float,
        default=10.0,
        help=f"seconds before measuring (default 10, at least {MIN_WARMUP:g})",
    )
    parser.add_argument(
        "--delay", type=float, default=100.0, metavar="MS", help="meter answer delay (default 100)"
    )
    parser.add_argument(
        "--publish", choices=["every_poll", "on_change"], help="bridge publish mode, if its config has one"
    )
    parser.add_argument(
        "--qos", type=int, choices=[0, 1, 2], default=0, help="MQTT QoS of state publishes (default 0)"
    )
    parser.add_argument(
        "--peer",
        choices=["node-red", "floor"],
        action="append",
        default=[],
        help="also run the same fleet through a Node-RED flow (node-red) or a bare "
        "client that only polls (floor); may be given twice",
    )
    parser.add_argument(
        "--nr-interval",
        type=float,
        default=6.5,
        metavar="S",
        help="Node-RED inject interval (default 6.5: at 6 it breaks the rate limit)",
    )
    parser.add_argument(
        "--http",
        action="store_true",
        help="also run the bridge with http.port set, the status page open in a headless "
        "chromium (refreshing every 2 s) and /metrics scraped every 15 s (row bridge+http)",
    )
    parser.add_argument(
        "--http-client",
        choices=["auto", "poller"],
        default="auto",
        help="with --http: chromium where it and selenium are present (auto), or a thread "
        "GETting api/bridge and api/meters every 2 s as the page does (poller)",
    )
    parser.add_argument(
        "--shards",
        type=int,
        default=1,
        metavar="N",
        help="also run the fleet over N bridge processes sharing the device list (row 'N shards')",
    )
    parser.add_argument(
        "--broker",
        choices=["mosquitto", "nats"],
        default="mosquitto",
        help="mosquitto (default) or a 3-node nats-server cluster with MQTT and JetStream",
    )
    parser.add_argument(
        "--output",
        choices=["attribute_and_json", "json", "attribute"],
        help="the bridge's publish.output (default: its default, attribute_and_json)",
    )
    parser.add_argument("--commands", type=int, default=50, help="relay commands (default 50)")
    parser.add_argument(
        "--command-delay",
        type=float,
        default=20.0,
        metavar="MS",
        help="answer delay of the command meters (default 20)",
    )
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory (logs, configs, lags)")
    args = parser.parse_args(argv)
    if args.meters < 1 or args.seconds <= 0 or args.commands < 0:
        parser.error("--meters must be at least 1, --seconds positive, --commands not negative")
    if args.warmup < MIN_WARMUP:
        parser.error(f"--warmup must be at least {MIN_WARMUP:g} s: each command meter's slot must be free")
    if args.publish is not None and not publish_supported():
        parser.error("--publish: this bridge's config has no publish key yet")
    if args.broker == "mosquitto" and shutil.which("mosquitto") is None:
        parser.error("mosquitto is not on PATH (apt-get install mosquitto)")
    if args.broker == "nats":
        from bench.nats import binary

        if binary() is None:
            parser.error("--broker nats: nats-server is not installed (apt-get install nats-server)")
        if "node-red" in args.peer:
            parser.error("--peer node-red runs against mosquitto only")
    if args.shards < 1:
        parser.error("--shards must be at least 1")
    if "node-red" in args.peer and (reason := nodered.missing_tools()):
        parser.error(f"--peer node-red: {reason}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(text: str) -> None:
        if not args.json_only:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    rows = [run_peer("bridge", args, log)]
    if args.shards > 1:
        rows.append(run_peer(f"{args.shards} shards", args, log))
    if args.http:
        rows.append(run_peer("bridge+http", args, log))
    for peer in dict.fromkeys(args.peer):  # in the order given, each once
        rows.append(run_peer(peer, args, log))
    extra: dict[str, Any] = {
        "publish": args.publish or "every_poll (default)",
        "output": args.output or "attribute_and_json (default)",
        "broker": args.broker,
    }
    mine = rows[0].figures["cpu_ms_per_poll"]
    for row in rows[1:]:
        if row_shards(row.peer) > 1:
            theirs = row.figures["cpu_ms_per_poll"]
            extra["shard_cpu_per_poll_ratio"] = round(theirs / mine, 2) if mine and theirs else None
            continue
        if row.peer in BRIDGES:
            plain, served = rows[0].figures["cpu_pct"], row.figures["cpu_pct"]
            extra["http_cpu_pct_delta"] = round(served - plain, 1)
            extra["http_client"] = row.figures["http_client"]
            continue
        theirs = row.figures["cpu_ms_per_poll"]
        # None (n/a) when the peer's CPU rounds to zero ticks, as in a few-second smoke run.
        ratio = round(mine / theirs, 2) if mine is not None and theirs else None
        extra[_RATIOS[row.peer]] = ratio
    if not args.json_only:
        print(render(rows, args, extra))
    record = {
        "meters": args.meters, "delay_ms": args.delay, "warmup_s": args.warmup, "qos": args.qos,
        "shards": args.shards,
        "cores": os.cpu_count(), **extra, "rows": {row.peer: row.figures for row in rows},
    }  # fmt: skip
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
