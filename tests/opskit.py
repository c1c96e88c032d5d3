"""Helpers for operations tests: jobs seeded through the real JobStore at chosen times."""

from __future__ import annotations

import secrets
from typing import Any

from bot.models import Job, Requester
from bot.requests import GenerationRequest
from storage.jobs import JobStore, Limits

UNLIMITED = Limits(None, None, None, None, None)
DAY = 86_400.0


async def seed_job(
    store: JobStore,
    requester: Requester,
    *,
    at: float,
    state: str,
    duration: int = 10,
    provider: str | None = "fal",
    charged: float | None = None,
    job_id: str | None = None,
    finished_after: float = 60.0,
) -> Job:
    """Admit a job at `at` and walk it to `state` the way the engine does."""
    request = GenerationRequest.build(
        mode="prompt", prompt=f"seeded {state} song", duration=duration, seed=1
    )
    job = Job(
        id=job_id or secrets.token_hex(4),
        requester=requester,
        reply_target={},
        request=request,
        seed=1,
        state="queued",
        reserved_usd=0.0002 * duration,
    )
    await store.admit(job, UNLIMITED, bypass_quotas=True, now=at)
    done = at + finished_after
    if state == "queued":
        return job
    if state in ("failed", "cancelled") and provider is None:
        await store.finish_unsuccessful(job.id, ("queued",), state, "seeded", now=done)
        return job
    await store.transition(
        job.id, ("queued",), "submitting", at + 1, provider=provider, attempts=1, started_at=at + 1
    )
    await store.transition(job.id, ("submitting",), "running", at + 2, handle="{}")
    if state == "running":
        return job
    if state in ("failed", "cancelled"):
        await store.finish_unsuccessful(job.id, ("running",), state, "seeded", now=done)
        return job
    result: dict[str, Any] = {
        "duration": float(duration),
        "audio_file": f"{job.id}.wav",
        "seed": 1,
        "provider": provider,
    }
    await store.finish_success(
        job.id,
        provider or "fal",
        0.0002 * duration if charged is None else charged,
        result,
        now=done,
    )
    if state == "delivered":
        await store.mark_delivered(job.id, now=done + 5)
    return job
