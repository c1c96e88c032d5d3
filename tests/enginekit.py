"""Helpers for engine tests: a recording Delivery, quick options, waiting for states."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from bot import messages
from bot.engine import Engine, EngineOptions, Failure, Progress, RenderedSong, Song
from bot.models import Job
from bot.settings import Settings
from providers.base import Provider

FAST = EngineOptions(
    poll_max_interval=0.05,
    poll_backoff=1.2,
    busy_cooldown=0.2,
    unavailable_cooldown=0.2,
    delivery_attempts=2,
    delivery_backoff=0.05,
    scheduler_idle=0.2,
    stop_grace=1.0,
)


@dataclass
class RecordingDelivery:
    """A platform that records what a user would see, and renders each song to MP3."""

    platform: str = "discord"
    byte_limit: int | None = 10 * 1024 * 1024
    progress: list[tuple[str, Progress]] = field(default_factory=list)
    delivered: list[tuple[str, RenderedSong]] = field(default_factory=list)
    # What the user would read: (job id, the failure text a front-end shows).
    failures: list[tuple[str, str]] = field(default_factory=list)
    fail_deliveries: int = 0  # raise on the next N deliveries

    async def on_progress(self, job: Job, progress: Progress) -> None:
        self.progress.append((job.id, progress))

    async def deliver(self, job: Job, song: Song) -> None:
        if self.fail_deliveries > 0:
            self.fail_deliveries -= 1
            raise RuntimeError("platform said 500")
        rendered = await song.render(self.byte_limit)
        self.delivered.append((job.id, rendered))

    async def on_failed(self, job: Job, failure: Failure) -> None:
        text = messages.failure_text(failure.kind, failure.quota_refunded, failure.timeout_seconds)
        self.failures.append((job.id, text))

    def delivered_ids(self) -> list[str]:
        return [jid for jid, _ in self.delivered]


async def wait_for_state(
    engine: Engine, job_id: str, states: tuple[str, ...], timeout: float = 10.0
) -> Job:
    deadline = time.monotonic() + timeout
    while True:
        job = await engine.get_job(job_id)
        if job is not None and job.state in states:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(
                f"job {job_id} is {job.state if job else None}, not one of {states}"
            )
        await asyncio.sleep(0.02)


async def open_engine(
    settings: Settings, providers: list[Provider], delivery: RecordingDelivery | None = None
) -> Engine:
    engine = await Engine.open(settings, providers, options=FAST)
    if delivery is not None:
        engine.register_delivery(delivery)
    await engine.start()
    return engine


def audio_files(settings: Settings) -> list[Path]:
    return sorted(settings.audio_dir.glob("*")) if settings.audio_dir.exists() else []
