"""Telling front-ends about their jobs: the registered `Delivery` of each platform, and
the calls that must never let a front-end's trouble stop a job."""

from __future__ import annotations

import asyncio
import logging

from bot.engine.contract import Delivery, Failure, Progress
from bot.models import Job

log = logging.getLogger("acestep.engine")


class Notifier:
    """The platforms' deliveries; progress and failure notices are best effort."""

    def __init__(self) -> None:
        self.deliveries: dict[str, Delivery] = {}

    def register(self, delivery: Delivery) -> None:
        self.deliveries[delivery.platform] = delivery

    def get(self, platform: str) -> Delivery | None:
        return self.deliveries.get(platform)

    async def progress(self, job: Job, progress: Progress) -> None:
        delivery = self.deliveries.get(job.requester.platform)
        if delivery is None:
            return
        try:
            await delivery.on_progress(job, progress)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("job %s: progress update failed", job.id, exc_info=True)

    async def failed(self, job: Job, failure: Failure) -> None:
        delivery = self.deliveries.get(job.requester.platform)
        if delivery is None:
            return
        try:
            await delivery.on_failed(job, failure)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("job %s: failure notice could not be posted", job.id, exc_info=True)
