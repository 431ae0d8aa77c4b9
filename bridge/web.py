"""The HTTP edge: the status page, /api, /metrics, /healthz and /readyz on the bridge's loop.

aiohttp.web (what Home Assistant itself runs on) serves them on the same asyncio loop as
the bridge, so every answer reads the bridge's state directly, without a lock or a copy:
a handler runs between two of the loop's callbacks, never inside one. The two answers
about every meter (/metrics, /api/meters) take a few hundred meters per turn of the loop,
so polling goes on while they are written; each meter's part is from one moment. What
the answers say is built in status.py (pure); the exposition format is metrics.py's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from . import __version__
from .config import HttpSettings
from .errors import SmartmacError
from .metrics import exposition
from .mqtt import host_port
from .status import TURN_METERS, availability_word, meter_row

if TYPE_CHECKING:
    from .service import Bridge, Meter

logger = logging.getLogger(__name__)

#: /healthz: the loop must have turned within this many seconds.
HEALTHY_WITHIN = 10.0
#: The longest relay command body read (the parser refuses longer ones anyway).
_MAX_BODY = 1024
_OPEN = frozenset({"/healthz", "/readyz"})  # no basic auth: probes carry no password
_JSON = "application/json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class WebServer:
    """Serves the bridge's page and API on `settings.host`:`port`, on the running loop."""

    def __init__(self, bridge: Bridge, settings: HttpSettings, *, port: int | None = None) -> None:
        self._bridge = bridge
        self._settings = settings
        self.port = port if port is not None else settings.port
        self._runner: web.AppRunner | None = None
        self._page = resources.files(__package__).joinpath("page.html").read_bytes()
        self._metrics = exposition(bridge)

    @property
    def url(self) -> str:
        return f"http://{host_port(self._settings.host, self.port or 0)}/"

    async def start(self) -> None:
        """Listen; a taken port is a SmartmacError naming it (exit 1, like the broker's)."""
        app = web.Application(middlewares=[self._guard], client_max_size=_MAX_BODY)
        app.add_routes(
            [
                web.get("/", self._index),
                web.get("/api/meters", self._meters),
                web.get("/api/bridge", self._summary),
                web.post("/api/meters/{topic}/relay", self._relay),
                web.get("/healthz", self._healthz),
                web.get("/readyz", self._readyz),
                web.get("/metrics", self._metrics_page),
            ]
        )
        # No access log: a browser asks every 2 s, a scraper every 15 s.
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self._settings.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            where = host_port(self._settings.host, self.port or 0)
            if exc.errno == errno.EADDRINUSE:
                raise SmartmacError(f"http.port: {where} is already in use (another bridge?)") from None
            raise SmartmacError(f"http: cannot listen on {where}: {exc.strerror or exc}") from None
        self._runner = runner
        logger.info("status page on %s", self.url)

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # -- basic auth, and no relay switching from another site -----------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        password = self._settings.password
        if (
            password is not None
            and request.path not in _OPEN
            and not _authorized(request, self._settings.username, password.get_secret_value())
        ):
            return web.Response(
                status=401,
                text="authentication required\n",
                headers={"WWW-Authenticate": 'Basic realm="smartmac-bridge", charset="UTF-8"'},
            )
        if request.method == "POST" and not _same_origin(request):
            # A page on another site can POST a form here (a simple request needs no CORS
            # consent) and would switch a relay with the browser's credentials.
            return _json({"ok": False, "error": "cross-origin request refused"}, status=403)
        return await handler(request)

    # -- the endpoints ---------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._page,
            content_type="text/html",
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    async def _meters(self, request: web.Request) -> web.Response:
        # TURN_METERS rows built and written per turn of the loop (at 2,000 meters the whole
        # answer is ~23 ms of CPU, 60 % of it json.dumps), so the loop polls in between.
        meters = self._bridge.meters
        parts: list[bytes] = []
        for start in range(0, len(meters), TURN_METERS):
            if start:
                await asyncio.sleep(0)
            rows = [_row(m) for m in meters[start : start + TURN_METERS]]
            parts.append(json.dumps(rows, separators=(",", ":")).encode()[1:-1])  # without [ ]
        return web.Response(body=b"[" + b",".join(parts) + b"]", content_type=_JSON)

    async def _summary(self, request: web.Request) -> web.Response:
        """What the page's summary line says (not part of the contract in README)."""
        bridge = self._bridge
        words = [availability_word(m.api_available) for m in bridge.meters]
        return _json(
            {
                "version": __version__,
                "meters": len(words),
                "online": words.count("online"),
                "offline": words.count("offline"),
                "unknown": words.count("unknown"),
                "polls_per_s": round(bridge.polls.per_second(), 2),
                "mqtt_connected": bridge.link.connected.is_set(),
                "broker": bridge.link.broker,
                "read_only": self._settings.read_only,
                "shard": (
                    {"index": bridge.shard.index, "count": bridge.shard.count}
                    if bridge.shard.sharded
                    else None
                ),
                "uptime_s": round(time.monotonic() - bridge.started_at),
                # The bridge's clock: the page's ages of last_read are not off by the
                # browser's (a phone's clock may be minutes away).
                "time": time.time(),
            }
        )

    async def _relay(self, request: web.Request) -> web.Response:
        if self._settings.read_only:
            return _json({"ok": False, "error": "read only: http.read_only is set"}, status=403)
        topic = request.match_info["topic"]
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            # Refused like any body the parser refuses: published on B/D/relay/result and
            # counted, as the same payload on MQTT would be (only its bytes are not read).
            size = request.content_length
            reason = "payload too long" + (f" ({size} bytes)" if size is not None else "")
            status, result = await self._bridge.command(topic, b"", refused=reason)
        else:
            status, result = await self._bridge.command(topic, body)
        return web.Response(body=result, status=status, content_type=_JSON)

    async def _healthz(self, request: web.Request) -> web.Response:
        age = time.monotonic() - self._bridge.beat
        if age <= HEALTHY_WITHIN:
            return web.Response(text="ok\n")
        return web.Response(status=503, text=f"the bridge's loop last turned {age:.0f} s ago\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self._bridge.link.connected.is_set():
            return web.Response(text="ok\n")
        return web.Response(status=503, text=f"not connected to MQTT broker {self._bridge.link.broker}\n")

    async def _metrics_page(self, request: web.Request) -> web.Response:
        body = await self._metrics.in_turns()  # the loop polls between its turns
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _row(m: Meter) -> dict[str, object]:
    return meter_row(
        devid=m.device.id,
        name=m.device.display_name,
        topic=m.device.segment,
        extended=m.device.extended,
        available=m.api_available,
        relay=m.relay.value if m.relay is not None else None,
        last=m.last,
        last_read=m.last_read,
        last_error=m.health.last_error,
    )


def _json(value: object, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(value, separators=(",", ":")).encode(), status=status, content_type=_JSON
    )


def _authorized(request: web.Request, username: str | None, password: str) -> bool:
    """Basic auth; compared in constant time. No username configured: any is accepted."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, sep, given = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    good = hmac.compare_digest(given.encode(), password.encode()) and bool(sep)
    if username is not None:
        good = hmac.compare_digest(user.encode(), username.encode()) and good
    return good


def _same_origin(request: web.Request) -> bool:
    """No Origin (curl, scripts) or the page's own: the request's Host."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc.lower() == request.host.lower()
