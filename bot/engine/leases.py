"""Which process works on a job, when several share one database (PostgreSQL).

A job being worked on (submitting, running, ready) belongs to the process that claimed
it (storage JobStore.claim / start_run) for LEASE_SECONDS, and the process renews every
lease it holds every third of that. Another process takes a job over only once its
lease has run out: its owner stopped renewing because it died or lost the database.

The rule for a restart: an owner is "<instance>/<run>", the instance being this host
and this data directory (on SQLite, the data directory). `acestep-bot run` and
`generate` hold the data directory's lock (bot/datalock.py), so one process at a time
works as an instance; a new run of the same instance therefore knows every earlier run
of it is dead, and takes their jobs back at once, as a restarted single process always
has, without waiting for their leases. A process on another host or data directory is
another instance and waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import socket
from collections.abc import Callable

from bot.engine.tasks import JobTasks
from bot.models import Job, JobState
from bot.settings import Settings
from storage.database import StorageError
from storage.store import Store

log = logging.getLogger("acestep.engine")

S = JobState
HELD_STATES: tuple[str, ...] = (S.SUBMITTING, S.RUNNING, S.READY)


def instance_id(settings: Settings) -> str:
    """This host and data directory: one working process at a time (no "/" in it).

    On SQLite the data directory alone: every process that can open the file works on
    it one at a time, and a container recreated with a new host name must still take its
    jobs back at once, as it always has."""
    where = hashlib.sha256(str(settings.data_dir.resolve()).encode()).hexdigest()[:12]
    if not settings.secret("database_url"):
        return f"sqlite:{where}"
    return f"{socket.gethostname() or 'host'}:{where}"


def new_owner(instance: str) -> str:
    """This run of the instance."""
    return f"{instance}/{os.getpid()}-{secrets.token_hex(3)}"


class LeaseKeeper:
    """Renews this process's leases and takes over jobs whose lease ran out."""

    def __init__(
        self,
        store: Store,
        tasks: JobTasks,
        owner: str,
        instance: str,
        lease_seconds: float,
        take_over: Callable[[Job], object],
    ) -> None:
        self.store = store
        self.tasks = tasks
        self.owner = owner
        self.instance = instance
        self.lease_seconds = lease_seconds
        self.take_over = take_over  # awaitable-returning: resume a claimed job
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="engine-leases")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                await self.tick()
            except StorageError as exc:
                log.error("cannot renew job leases: %s", exc)
            except Exception:
                log.exception("lease keeper error")

    async def tick(self) -> None:
        """Renew; stop work on jobs another process took over; take over lapsed jobs."""
        held = await self.store.renew_leases(self.owner, self.lease_seconds)
        for job_id, task in list(self.tasks.tasks.items()):
            if job_id in held or task.done():
                continue
            job = await self.store.get(job_id)
            if (
                job is not None
                and job.state in HELD_STATES
                and job.owner is not None
                and job.owner != self.owner
            ):
                log.warning(
                    "job %s was taken over by %s after this process's lease ran out;"
                    " stopping work on it here",
                    job_id,
                    job.owner,
                )
                task.cancel()
        for job in await self.store.lapsed(HELD_STATES, self.owner, self.instance):
            if self.tasks.running(job.id):
                continue
            result = self.take_over(job)
            if asyncio.iscoroutine(result):
                await result
