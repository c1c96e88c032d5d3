"""Retention: stored audio after AUDIO_RETENTION_DAYS, finished job rows after
JOB_RETENTION_DAYS.

Every file of a job lives under DATA_DIR/audio as `<job_id>.*` (the provider's original
and each rendered copy). Only files whose job is finished for good (delivered, failed,
cancelled) and old enough go; a job still waiting to be posted keeps its audio however
old, and files that belong to no job are left for the operator.

A finished job's row (and its ledger lines) goes once it was admitted more than
JOB_RETENTION_DAYS whole UTC days ago, together with any audio it still has, so the
database stops growing with the history. The per-day counters keep its totals:
`stats` and /metrics count it still.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from bot.settings import Settings
from storage.database import StorageError
from storage.quota import day_start
from storage.store import Store

log = logging.getLogger("acestep.retention")

DAY = 86_400.0
# Job rows deleted per transaction: each batch holds the writer for a few milliseconds,
# so admissions keep going while a large backlog is pruned.
JOB_BATCH = 500


@dataclass(frozen=True)
class PruneReport:
    jobs: int  # jobs whose audio (or row) was removed
    files: int
    bytes: int


def _files_by_job(audio_dir: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = defaultdict(list)
    if not audio_dir.is_dir():
        return found
    for path in audio_dir.iterdir():
        job_id, dot, _ = path.name.partition(".")
        if dot and job_id and path.is_file():
            found[job_id].append(path)
    return found


def _remove(paths: list[Path]) -> tuple[int, int]:
    files = size = 0
    for path in paths:
        try:
            length = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        files += 1
        size += length
    return files, size


async def prune_audio(
    settings: Settings, store: Store, now: float | None = None, days: int | None = None
) -> PruneReport:
    """Delete the audio of jobs finished more than `days` (AUDIO_RETENTION_DAYS) ago;
    0 keeps everything."""
    days = settings.audio_retention_days if days is None else days
    if days <= 0:
        return PruneReport(0, 0, 0)
    now = time.time() if now is None else now
    by_job = await asyncio.to_thread(_files_by_job, settings.audio_dir)
    expired = await store.expired_jobs(by_job, now - days * DAY)
    files, size = await asyncio.to_thread(
        _remove, [path for job_id in sorted(expired) for path in by_job[job_id]]
    )
    if expired:
        log.info(
            "retention: removed %d audio files (%.1f MB) of %d jobs finished more than %d days ago",
            files,
            size / 1e6,
            len(expired),
            days,
        )
    return PruneReport(len(expired), files, size)


async def prune_jobs(
    settings: Settings,
    store: Store,
    now: float | None = None,
    days: int | None = None,
    batch: int = JOB_BATCH,
) -> PruneReport:
    """Delete the rows of finished jobs admitted before the UTC day `days`
    (JOB_RETENTION_DAYS) days before today, with their ledger lines and audio files;
    0 keeps everything."""
    days = settings.job_retention_days if days is None else days
    if days <= 0:
        return PruneReport(0, 0, 0)
    now = time.time() if now is None else now
    before = day_start(now) - days * DAY
    by_job = await asyncio.to_thread(_files_by_job, settings.audio_dir)
    jobs = files = size = 0
    while True:
        ids = await store.finished_before(before, batch)
        # The audio first: a crash in between leaves a row without audio (shown as
        # removed), never audio that belongs to no job.
        removed, length = await asyncio.to_thread(
            _remove, [path for job_id in ids for path in by_job.get(job_id, [])]
        )
        files, size = files + removed, size + length
        deleted = await store.delete_jobs(ids, before) if ids else 0
        jobs += deleted
        if len(ids) < batch or not deleted:
            break
    if jobs:
        log.info(
            "retention: removed %d finished job rows (and %d audio files, %.1f MB) admitted "
            "more than %d days ago; their totals stay in stats",
            jobs,
            files,
            size / 1e6,
            days,
        )
    return PruneReport(jobs, files, size)


async def retention_loop(settings: Settings, store: Store, interval: float = DAY) -> None:
    """Prune at once, then every `interval` seconds, until cancelled."""
    if settings.audio_retention_days <= 0 and settings.job_retention_days <= 0:
        return
    while True:
        try:
            await prune_audio(settings, store)
            await prune_jobs(settings, store)
        except (StorageError, OSError) as exc:
            log.error("retention: pruning failed (will retry): %s", exc)
        await asyncio.sleep(interval)
