"""`acestep-bot run`: the engine and every configured front-end in one process, or one
role of a bot spread over several processes.

Roles (`acestep-bot run --role`):
- `all` (the default): receives commands, runs the jobs and delivers them.
- `chat`: receives commands (Discord gateway shards, Telegram updates) and admits jobs
  into the database; it never runs one. The status message it posts is stored on the job.
- `worker`: runs the jobs the database holds (whoever admitted them) and delivers them
  through the platforms' REST APIs alone, from the job's stored reply target: a Discord
  followup while the interaction token lives, else a channel post (or a DM); a Telegram
  sendAudio. It opens no gateway and asks for no updates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from enum import StrEnum
from typing import Any, Protocol

from bot.engine import Delivery, Engine
from bot.retention import retention_loop
from bot.settings import Settings, configured_frontends
from providers.registry import build_providers

log = logging.getLogger("acestep.app")


class Role(StrEnum):
    ALL = "all"
    CHAT = "chat"
    WORKER = "worker"

    @property
    def receives(self) -> bool:
        """Takes commands from the platforms."""
        return self is not Role.WORKER

    @property
    def runs_jobs(self) -> bool:
        """Runs the scheduler: submits, polls, delivers."""
        return self is not Role.CHAT


class Frontend(Delivery, Protocol):
    """A chat front-end: it delivers songs for its platform and runs alongside the engine."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def build_frontends(settings: Settings, engine: Engine, role: Role = Role.ALL) -> list[Frontend]:
    """The configured chat front-ends, each registered as the engine's delivery; a
    worker's only send (no gateway, no updates)."""
    frontends: list[Frontend] = []
    names = configured_frontends(settings)
    if "discord" in names:
        from bot.frontends.discord_frontend import DiscordFrontend

        frontends.append(DiscordFrontend(settings, engine, connect_gateway=role.receives))
    if "telegram" in names:
        from bot.frontends.telegram_frontend import TelegramFrontend

        frontends.append(TelegramFrontend(settings, engine, receive=role.receives))
    for frontend in frontends:
        engine.register_delivery(frontend)
    return frontends


async def run_bot(
    settings: Settings, stop: asyncio.Event | None = None, role: Role = Role.ALL
) -> int:
    """Run until SIGTERM/SIGINT (or `stop` is set); then shut down gracefully:
    stop admitting, let uploads finish within SHUTDOWN_GRACE_SECONDS, and leave every
    other job in a state the next start resumes. `role` is the share of the work this
    process does (see the module's docstring)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    engine = await Engine.open(
        settings, build_providers(settings), platforms=configured_frontends(settings)
    )
    frontends = build_frontends(settings, engine, role)
    health = None
    retention: asyncio.Task[None] | None = None
    started: list[Any] = []
    try:
        if role.runs_jobs:
            await engine.start()
            # AUDIO_RETENTION_DAYS and JOB_RETENTION_DAYS: prune now and daily (returns at
            # once when both are 0). The audio lives where the jobs run.
            retention = asyncio.create_task(
                retention_loop(settings, engine.store), name="retention"
            )
        for frontend in frontends:
            await frontend.start()
            started.append(frontend)
            log.info("%s front-end started", frontend.platform)
        if settings.health_port:
            from bot.health import start_health_server

            health = await start_health_server(settings, engine, frontends)
        log.info(
            "acestep-bot running (role %s): front-ends %s, providers %s",
            role.value,
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
