"""The engine's in-memory bookkeeping: one asyncio task per job it is working on, each
job's cancel event, and the event that wakes the scheduler. All of it can be rebuilt
from the database after a restart."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any


class JobTasks:
    """Which jobs this process is working on, and how to stop or wait for them."""

    def __init__(self) -> None:
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.cancel_events: dict[str, asyncio.Event] = {}
        self.wake = asyncio.Event()

    def spawn(self, job_id: str, coro: Coroutine[Any, Any, None], kind: str) -> None:
        """Run `coro` as the job's task (`kind`-<job id>); the scheduler wakes when it ends."""
        task = asyncio.create_task(coro, name=f"{kind}-{job_id}")
        self.tasks[job_id] = task

        def _done(t: asyncio.Task[None], job_id: str = job_id) -> None:
            if self.tasks.get(job_id) is t:
                del self.tasks[job_id]
                self.cancel_events.pop(job_id, None)
            self.wake.set()

        task.add_done_callback(_done)

    def running(self, job_id: str) -> bool:
        return job_id in self.tasks

    def cancel_event(self, job_id: str) -> asyncio.Event:
        return self.cancel_events.setdefault(job_id, asyncio.Event())

    def signal_cancel(self, job_id: str) -> None:
        event = self.cancel_events.get(job_id)
        if event is not None:
            event.set()

    def mark_uploading(self, job_id: str) -> None:
        """Rename the job's task so stop() lets its upload finish."""
        task = asyncio.current_task()
        if task is not None and task is self.tasks.get(job_id):
            task.set_name(f"deliver-{job_id}")

    def uploading(self) -> list[asyncio.Task[None]]:
        return [t for t in self.tasks.values() if t.get_name().startswith("deliver")]

    async def wait_for(self, job_id: str, timeout: float) -> None:
        task = self.tasks.get(job_id)
        if task is not None:
            await asyncio.wait({task}, timeout=timeout)

    async def cancel_all(self) -> None:
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.tasks.clear()
