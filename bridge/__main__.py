"""CLI: `smartmac-bridge [run|simulate|demo|probe|check]`. The only place that exits the process."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import __version__
from .config import DeviceSettings, HttpSettings, Settings, load_settings
from .errors import ConfigError, MeterError, MeterTimeout, MeterUnreachable, SmartmacError
from .topics import refused_text

if TYPE_CHECKING:  # imported when used: `simulate` and `probe` need no MQTT stack
    from .check import Answer
    from .service import Bridge

logger = logging.getLogger("bridge")

_COMMANDS = ("run", "simulate", "demo", "probe", "check")
#: Where `demo` serves the status page unless http.port says otherwise.
DEMO_HTTP_PORT = 8099
#: Addresses of one host name `check` tries before it reports the meter refused.
_MAX_ADDRESSES = 4


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(_default_command(list(sys.argv[1:] if argv is None else argv)))
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"smartmac-bridge: {exc}", file=sys.stderr)
        return 2
    except SmartmacError as exc:
        print(f"smartmac-bridge: {exc}", file=sys.stderr)
        return 1


def _default_command(argv: list[str]) -> list[str]:
    # `smartmac-bridge --config x.yaml` means `smartmac-bridge run --config x.yaml`.
    if not argv or (argv[0] not in _COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        return ["run", *argv]
    return argv


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smartmac-bridge", description="SMART MAIC Wi-Fi energy meters to MQTT."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument(
            "--log-level",
            default="INFO",
            type=str.upper,
            choices=["DEBUG", "INFO", "WARNING", "ERROR"],
            help="default: INFO",
        )
        return sub

    run = command("run", "Run the bridge (the default command).")
    run.add_argument("--config", metavar="PATH", help="YAML file (default: $SMARTMAC_CONFIG)")
    run.set_defaults(handler=_run)

    sim = command("simulate", "Serve simulated meters over HTTP, for tests and flows.")
    sim.add_argument("--port", type=int, required=True)
    sim.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    sim.add_argument("--devices", type=int, default=1, metavar="N", help="default: 1")
    sim.add_argument("--phases", type=int, choices=[1, 3], default=1, help="default: 1")
    sim.add_argument("--extended", action="store_true", help="extended model (6 s limit)")
    sim.add_argument("--delay", type=float, default=0.0, metavar="S", help="answer delay in seconds")
    sim.set_defaults(handler=_simulate)

    demo = command("demo", "Embedded broker + two simulated meters + the bridge.")
    demo.add_argument("--config", metavar="PATH", help="optional YAML file (its devices are ignored)")
    demo.set_defaults(handler=_demo)

    probe = command("probe", "Ask one meter once and print what it says.")
    probe.add_argument("--host", required=True, help="host, host:port or http://host:port")
    probe.add_argument("--id", required=True, help="the meter's devid")
    probe.add_argument(
        "--pin",
        help="the meter's PIN (devpass); left out: $SMARTMAC_PIN, else asked for (a command "
        "line is visible to every user in ps)",
    )
    probe.add_argument("--relay", choices=["on", "off"], type=str.lower, help="also switch the relay")
    probe.add_argument("--timeout", type=float, default=5.0, help="seconds, default 5")
    probe.add_argument("--inverted", action="store_true", help="relay wired inverted (pout 0 = on)")
    probe.set_defaults(handler=_probe)

    check = command("check", "Ask every configured meter once, all at once, and print a table.")
    check.add_argument("--config", metavar="PATH", help="YAML file (default: $SMARTMAC_CONFIG)")
    check.set_defaults(handler=_check)
    return parser


def _run(args: argparse.Namespace) -> int:
    return serve(*_configured(args.config))


def _configured(path: str | None) -> tuple[Settings, tuple[DeviceSettings, ...]]:
    settings = load_settings(path)
    if not settings.devices:
        raise ConfigError("devices: no meters configured (see README.md, Configuration)")
    return settings, tuple(settings.devices)


def _simulate(args: argparse.Namespace) -> int:
    from .simulator import run_cli

    return run_cli(args.port, args.devices, args.phases, args.extended, host=args.host, delay=args.delay)


def _demo(args: argparse.Namespace) -> int:
    from .simulator import SimMeter, Simulator

    settings = load_settings(args.config)
    if settings.http.port is None:
        settings = settings.model_copy(
            update={"http": settings.http.model_copy(update={"port": DEMO_HTTP_PORT})}
        )
    three = SimMeter(devid="1728053249", pin="012345", phases=3, extended=True)
    one = SimMeter(devid="1728053250", pin="246810", phases=1, extended=False)
    with Simulator([three, one]) as sim:
        host = f"127.0.0.1:{sim.port}"
        # As a config file gives them: the PIN a quoted string, which the model keeps secret.
        devices = (
            DeviceSettings.model_validate(
                {
                    "id": three.devid,
                    "pin": three.pin,
                    "host": host,
                    "name": "Demo 3-phase",
                    "topic": "demo3",
                    "extended": True,
                }
            ),
            DeviceSettings.model_validate(
                {"id": one.devid, "pin": one.pin, "host": host, "name": "Demo 1-phase", "topic": "demo1"}
            ),
        )
        broker_host, broker_port = _broker_address(settings)
        base = settings.mqtt.base_topic
        print(
            f"Simulated meters at http://{host}/ (ids {three.devid}, {one.devid}).\n"
            f"Watch:  mosquitto_sub -h {broker_host} -p {broker_port} -t '{base}/#' -v\n"
            f"Switch: mosquitto_pub -h {broker_host} -p {broker_port} "
            f"-t '{base}/demo3/relay/set' -m TOGGLE\n"
            f"Status page: {_page_url(settings.http)}\n"
            "Stop with Ctrl-C.",
            flush=True,
        )
        return serve(settings, devices, page_optional=True)


def _broker_address(settings: Settings) -> tuple[str, int]:
    """The broker to name in hints: the first configured, else the embedded one."""
    return _brokers(settings)[0]


def _brokers(settings: Settings) -> tuple[tuple[str, int], ...]:
    """The brokers the bridge connects to, in order: mqtt.host's, else the embedded one."""
    return settings.mqtt.brokers or ((settings.embedded_broker.host, settings.embedded_broker.port),)


def _page_url(http: HttpSettings) -> str:
    from .mqtt import host_port

    return f"http://{host_port(http.host, http.port or 0)}/"


def build_bridge(
    settings: Settings,
    devices: Sequence[DeviceSettings],
    *,
    host: str | None = None,
    port: int | None = None,
    brokers: Sequence[tuple[str, int]] | None = None,
) -> Bridge:
    """The bridge as `run` builds it, every setting passed on (the benchmark uses it too).
    The broker: `host` and `port`, or the `brokers` to fail over along, or else the
    configured ones (mqtt.host, else the embedded broker's address)."""
    from .service import Bridge

    if host is None and brokers is None:
        brokers = _brokers(settings)
    return Bridge(
        tuple(devices),
        settings.mqtt,
        host=host,
        port=port,
        brokers=brokers,
        homeassistant=settings.homeassistant,
        publish=settings.publish,
        http=settings.http,
        shard=settings.shard,
    )


def serve(settings: Settings, devices: Sequence[DeviceSettings], *, page_optional: bool = False) -> int:
    """Run the bridge (and the embedded broker if no broker is configured, and the HTTP
    server if http.port is set) until a signal. `page_optional`: a taken http.port is a
    warning and the bridge runs without the page (the demo), not an error."""
    from .service import run_loop

    return run_loop(_serve(settings, devices, page_optional))


async def _serve(settings: Settings, devices: Sequence[DeviceSettings], page_optional: bool) -> int:
    """On the loop: the embedded broker if wanted, the bridge and its page, until SIGTERM
    or SIGINT."""
    import asyncio

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    broker = None
    if not settings.mqtt.brokers:
        host, port = _broker_address(settings)
        from .broker import EmbeddedBroker
        from .mqtt import host_port

        # On this loop, not a thread of its own: see broker.py.
        broker = EmbeddedBroker(host, port)
        await broker.open()
        logger.info("no mqtt.host configured: using the embedded broker on %s", host_port(host, port))
    web = None
    try:
        bridge = build_bridge(settings, devices, brokers=_brokers(settings))
        if settings.http.port is not None:
            from .web import WebServer

            web = WebServer(bridge, settings.http)
            try:
                await web.start()  # before the bridge: a taken port stops nothing half-started
            except SmartmacError as exc:
                if not page_optional:
                    raise
                print(f"smartmac-bridge: {exc}: running without the status page", file=sys.stderr)
                web = None
        running = loop.create_task(bridge.run())
        stopping = loop.create_task(stop.wait())
        await asyncio.wait((running, stopping), return_when=asyncio.FIRST_COMPLETED)
        if not running.done():
            logger.info("stopping")
            bridge.shutdown()
        stopping.cancel()
        await running
    finally:
        if web is not None:
            await web.close()
        if broker is not None:
            await broker.aclose()
    return 0


def _probe(args: argparse.Namespace) -> int:
    from .config import base_url
    from .meter import MeterClient
    from .readings import parse_body
    from .topics import Relay, pout_for, relay_from_pout

    try:
        url = base_url(args.host)
    except ValueError as exc:
        raise ConfigError(f"--host: {exc}") from None
    pout = None if args.relay is None else pout_for(Relay(args.relay.upper()), args.inverted)
    client = MeterClient(url, args.id, _probe_pin(args.pin), timeout=args.timeout)
    try:
        snap = parse_body(client.fetch(pout))
    except MeterError as exc:
        print(f"smartmac-bridge: {exc}", file=sys.stderr)
        return 1
    rows = [(r.key, r.name, r.text, r.unit) for r in snap.readings]
    rows.append(("relay", "pout " + str(snap.pout), relay_from_pout(snap.pout, args.inverted).value, ""))
    widths = [max(len(row[i]) for row in [("key", "name", "value", "unit"), *rows]) for i in range(4)]
    print(f"meter {snap.devid} at {url}, meter time {snap.time}")
    for row in [("key", "name", "value", "unit"), *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    for key in snap.rejected:
        print(f"{key}: no numeric value (left out)")
    return 0


def _check(args: argparse.Namespace) -> int:
    from .check import report, warning
    from .service import run_loop

    _, devices = _configured(args.config)
    # Before asking: an installer may run this beside a bridge already polling the meters.
    print(warning(len(devices)), file=sys.stderr, flush=True)
    try:
        answers = run_loop(_ask_all(devices))
    except KeyboardInterrupt:
        print("smartmac-bridge: check interrupted", file=sys.stderr)
        return 1
    print("\n".join(report(answers)))
    return 0 if all(answer.ok for answer in answers) else 1


async def _ask_all(devices: Sequence[DeviceSettings]) -> list[Answer]:
    """One request to every meter, all at once on this loop (each with its own deadline)."""
    import asyncio

    return list(await asyncio.gather(*map(_ask, devices)))


async def _ask(device: DeviceSettings) -> Answer:
    """One request to one meter, its outcome as check.py reads it. Raises nothing."""
    import asyncio
    import time

    from .check import Answer
    from .meter import MeterClient
    from .readings import Snapshot, parse_body

    client = MeterClient(device.url, device.id, device.pin.get_secret_value(), timeout=device.timeout)
    error: MeterError | None = None
    snap: Snapshot | None = None
    body = b""
    start = time.monotonic()
    named = client.address(start) is None  # a host name, not an IP address
    lookup = False
    if named:
        # Bounded like the request: a resolver that hangs must not hold the whole table.
        try:
            error = await asyncio.wait_for(client.resolve(start), device.timeout)
        except TimeoutError:
            error = MeterTimeout(f"{client.label}: cannot resolve host within {device.timeout:g} s")
        lookup = error is not None
        if not lookup:
            start = time.monotonic()  # the answer time is the request's, not the lookup's
    tries = _MAX_ADDRESSES if named else 1
    while error is None:
        try:
            body = await client.request()
            break
        except MeterError as exc:
            error = exc
        tries -= 1
        # As the bridge would at its next poll: a name's next address (localhost gives ::1
        # first, say, and an IPv4-only meter refuses it). Not after a timeout: the deadline
        # is the whole request's. forget_address() after the last one leaves none.
        if tries and isinstance(error, MeterUnreachable) and not isinstance(error, MeterTimeout):
            client.forget_address()
            if client.address(time.monotonic()) is not None:
                error = None
    ended = time.monotonic()
    if error is None:
        try:
            snap = parse_body(body)
        except MeterError as exc:  # BodyError
            error = exc
    logger.debug("%s: over in %.3f s", client.label, ended - start)
    return Answer(
        topic=device.segment,
        devid=device.id,
        host=device.host,
        extended=device.extended,
        seconds=ended - start,
        snapshot=snap,
        error=error,
        # The label (host and devid, never the PIN) starts meter.py's texts: the row shows
        # both already. The parser's own texts name no meter.
        detail="" if error is None else str(error).removeprefix(client.label + ": "),
        lookup=lookup,
    )


def _probe_pin(given: str | None) -> str:
    """--pin, else $SMARTMAC_PIN, else asked for: at a terminal without echo, else one line
    of standard input (`smartmac-bridge probe ... < pinfile`)."""
    pin = given if given is not None else os.environ.get("SMARTMAC_PIN")
    if pin is None:
        if sys.stdin.isatty():
            pin = getpass.getpass("PIN (devpass) of the meter: ")
        else:
            pin = sys.stdin.readline().rstrip("\r\n")
    if not pin:
        raise ConfigError("--pin: no PIN given (use --pin, SMARTMAC_PIN or type it when asked)")
    if refused_text(pin):  # e.g. bytes that are not UTF-8, which argv turns into surrogates
        raise ConfigError("--pin: holds a control character or bytes that are not UTF-8 text")
    return pin


if __name__ == "__main__":
    sys.exit(main())
