"""The operator's HTTP endpoints: `/healthz` (is the bot able to work) and `/metrics`.

Off unless HEALTH_PORT is set; binds HEALTH_HOST (loopback by default: metrics name
users and communities only in aggregate, but nothing here needs to be public).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from bot.engine import Engine
from bot.metrics import CONTENT_TYPE
from bot.settings import Settings
from storage.database import StorageError

log = logging.getLogger("acestep.health")


def frontend_state(frontend: Any) -> str:
    """connected | disconnected | unknown, from the front-end's `is_connected`."""
    value = getattr(frontend, "is_connected", None)
    if value is None:
        return "unknown"
    try:
        connected = value() if callable(value) else value
    except Exception:
        log.warning(
            "%s front-end: is_connected raised", getattr(frontend, "platform", "?"), exc_info=True
        )
        return "unknown"
    return "connected" if connected else "disconnected"


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else None


class HealthServer:
    """The running health/metrics server; `url` is its base address."""

    def __init__(self, settings: Settings, engine: Engine, frontends: Iterable[Any]) -> None:
        self.settings = settings
        self.engine = engine
        self.frontends = list(frontends)
        self.url = ""
        self.db_check_timeout_ms = 2000  # under a typical healthcheck timeout
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.health_host, self.settings.health_port)
        await site.start()
        server = site._server  # the bound port, when HEALTH_PORT asked for any free one
        sockets = getattr(server, "sockets", None) or []
        port = sockets[0].getsockname()[1] if sockets else self.settings.health_port
        host = self.settings.health_host
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        log.info("health and metrics on %s/healthz and %s/metrics", self.url, self.url)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- handlers --------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        """200 when the database takes writes and no front-end is disconnected, else
        503; the body says what is wrong. Providers are reported but never fail it: the
        bot still queues songs while a provider cools down, and a restart would not help."""
        report = await self.report()
        return web.json_response(report, status=200 if report["status"] == "ok" else 503)

    async def report(self) -> dict[str, Any]:
        problems: list[str] = []
        try:
            await self.engine.store.check_writable(self.db_check_timeout_ms)
            database: dict[str, Any] = {"writable": True}
        except StorageError as exc:
            database = {"writable": False, "error": str(exc)}
            problems.append("database is not writable")
        fronts = {}
        for frontend in self.frontends:
            state = frontend_state(frontend)
            fronts[frontend.platform] = state
            if state == "disconnected":
                problems.append(f"{frontend.platform} is disconnected")
        return {
            "status": "ok" if not problems else "unhealthy",
            "problems": problems,
            "database": database,
            "frontends": fronts,
            "providers": await self.provider_details(),
        }

    async def provider_details(self) -> dict[str, dict[str, Any]]:
        """`providers()` plus what each provider says about itself (e.g. ACE-Step
        servers that cannot make described songs, and why)."""
        out = self.providers()
        for name, entry in out.items():
            provider = self.engine.router.get(name)
            if provider is None:
                continue
            try:
                entry.update(await provider.health())
            except Exception:  # a report must never fail because a provider did
                log.warning("health: %s could not describe itself", name, exc_info=True)
        return out

    def providers(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()  # the router's clock for cool-downs
        out = {}
        for name, st in self.engine.router.state.items():
            cooling = max(0.0, st.cooldown_until - now)
            if cooling > 0:
                state = "cooling_down"
            elif st.last_error_kind:
                state = "error"
            elif st.last_ok:
                state = "ok"
            else:
                state = "unknown"  # nothing sent to it since the bot started
            out[name] = {
                "state": state,
                "in_flight": st.in_flight,
                "cooldown_seconds_left": round(cooling, 1),
                "last_error_kind": st.last_error_kind,
                "last_error": self.engine.redact(st.last_error) if st.last_error else None,
                "last_ok": _iso(st.last_ok),
            }
        return out

    async def metrics(self, request: web.Request) -> web.Response:
        try:
            # One read on the reader connection: counters and the partial index of
            # active jobs, never a scan of the history, never waiting for the writer.
            gauges = await self.engine.store.gauges()
        except StorageError as exc:
            log.error("metrics: cannot read the database: %s", exc)
            return web.Response(status=503, text=f"database unavailable: {exc}\n")
        m = self.engine.metrics
        m.refresh(
            gauges.jobs,
            gauges.queue_depth,
            gauges.spend_today_usd,
            self.engine.router.state,
            time.monotonic(),
        )
        return web.Response(body=m.render(), headers={"Content-Type": CONTENT_TYPE})


async def start_health_server(
    settings: Settings, engine: Engine, frontends: Iterable[Any]
) -> HealthServer:
    """Serve /healthz and /metrics on HEALTH_HOST:HEALTH_PORT until `stop()`."""
    server = HealthServer(settings, engine, frontends)
    await server.start()
    return server
