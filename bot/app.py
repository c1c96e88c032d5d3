"""`acestep-bot run`: the engine and every configured front-end in one process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any, Protocol

from bot.engine import Delivery, Engine
from bot.retention import retention_loop
from bot.settings import Settings, configured_frontends
from providers.registry import build_providers

log = logging.getLogger("acestep.app")


class Frontend(Delivery, Protocol):
    """A chat front-end: it delivers songs for its platform and runs alongside the engine."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def build_frontends(settings: Settings, engine: Engine) -> list[Frontend]:
    """The configured chat front-ends, each registered as the engine's delivery."""
    frontends: list[Frontend] = []
    names = configured_frontends(settings)
    if "discord" in names:
        from bot.frontends.discord_frontend import DiscordFrontend

        frontends.append(DiscordFrontend(settings, engine))
    if "telegram" in names:
        from bot.frontends.telegram_frontend import TelegramFrontend

        frontends.append(TelegramFrontend(settings, engine))
    for frontend in frontends:
        engine.register_delivery(frontend)
    return frontends


async def run_bot(settings: Settings, stop: asyncio.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT (or `stop` is set); then shut down gracefully:
    stop admitting, let uploads finish within SHUTDOWN_GRACE_SECONDS, and leave every
    other job in a state the next start resumes."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    engine = await Engine.open(
        settings, build_providers(settings), platforms=configured_frontends(settings)
    )
    frontends = build_frontends(settings, engine)
    health = None
    retention: asyncio.Task[None] | None = None
    started: list[Any] = []
    try:
        await engine.start()
        # AUDIO_RETENTION_DAYS and JOB_RETENTION_DAYS: prune now and daily (returns at
        # once when both are 0).
        retention = asyncio.create_task(retention_loop(settings, engine.store), name="retention")
        for frontend in frontends:
            await frontend.start()
            started.append(frontend)
            log.info("%s front-end started", frontend.platform)
        if settings.health_port:
            from bot.health import start_health_server

            health = await start_health_server(settings, engine, frontends)
        log.info(
            "acestep-bot running: front-ends %s, providers %s",
            ", ".join(f.platform for f in frontends),
            ", ".join(engine.router.providers),
        )
        await stop.wait()
        log.info(
            "shutting down: no new songs; waiting up to %ss for uploads",
            settings.shutdown_grace_seconds,
        )
    finally:
        if retention is not None:
            retention.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retention
        await engine.stop(grace=settings.shutdown_grace_seconds)
        for frontend in reversed(started):
            try:
                await frontend.stop()
            except Exception:
                log.warning("%s front-end did not stop cleanly", frontend.platform, exc_info=True)
        if health is not None:
            await health.stop()
        await engine.close()
        log.info("stopped")
    return 0
