"""One status message per job, edited with a throttle, never going backwards.

Progress can arrive many times a second; platforms allow only a few edits per message per
second (Telegram: about 20 messages a minute in a group). Each job's message is edited at
most once per `interval` (the latest view wins), a view of a lower rank never replaces a
higher one (a late "queued" cannot overwrite "generating"), and a final view is shown at
once. The platform's edit is passed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bot.chat.replies import StatusView

log = logging.getLogger("acestep.chat")

# (reply target, view) -> True when shown, False when the message is gone.
Edit = Callable[[dict[str, Any], StatusView], Awaitable[bool]]


@dataclass
class _Entry:
    target: dict[str, Any]
    rank: int = -1
    pending: StatusView | None = None
    shown: StatusView | None = None
    last_edit: float = float("-inf")
    flusher: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class StatusBoard:
    """Throttled, ordered edits of the jobs' status messages."""

    def __init__(
        self, edit: Edit, interval: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._edit = edit
        self.interval = interval
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        # Jobs already shown final (or whose status was removed): later views are ignored.
        self._finished: OrderedDict[str, None] = OrderedDict()

    def show(self, target: dict[str, Any], view: StatusView, *, initial: bool = False) -> None:
        """Queue an in-progress view; it is edited in when the throttle allows.
        `initial`: the view of the admission, stale once any progress got there first."""
        job_id = view.job_id
        if job_id in self._finished:
            return
        entry = self._entries.get(job_id)
        if entry is not None and initial:
            return
        if entry is None:
            entry = self._entries[job_id] = _Entry(target)
        if view.rank < entry.rank:
            return
        entry.rank = view.rank
        entry.target = target
        entry.pending = view
        if entry.flusher is None or entry.flusher.done():
            entry.flusher = asyncio.get_running_loop().create_task(
                self._flush_later(entry), name=f"status-{job_id}"
            )

    async def show_now(self, target: dict[str, Any], view: StatusView) -> None:
        """Like show(), but edit before returning when the throttle allows (the answer to
        a command should be visible when the command returns)."""
        job_id = view.job_id
        entry = self._entries.get(job_id)
        if job_id in self._finished or entry is not None:
            self.show(target, view, initial=True)
            return
        entry = self._entries[job_id] = _Entry(target, rank=view.rank)
        async with entry.lock:
            await self._do_edit(entry, target, view)

    async def finish(self, target: dict[str, Any], view: StatusView) -> bool:
        """Show a final view now. False if the message is gone (the caller posts anew)."""
        entry = await self.forget(view.job_id) or _Entry(target)
        async with entry.lock:
            return await self._do_edit(entry, target, view)

    def is_finished(self, job_id: str) -> bool:
        """Whether the job's status is over (a final view shown, or removed)."""
        return job_id in self._finished

    async def forget(self, job_id: str) -> _Entry | None:
        """Stop showing anything more for this job (its status is final or removed)."""
        self._finished[job_id] = None
        while len(self._finished) > 5000:
            self._finished.popitem(last=False)
        entry = self._entries.pop(job_id, None)
        if entry is not None and entry.flusher is not None and not entry.flusher.done():
            entry.flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await entry.flusher
        return entry

    async def _flush_later(self, entry: _Entry) -> None:
        # Loop until nothing is pending: a view queued while an edit was in flight is
        # picked up here (show() starts no second flusher while this one runs).
        while entry.pending is not None:
            wait = entry.last_edit + self.interval - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
            async with entry.lock:
                view, entry.pending = entry.pending, None
                if view is None:
                    return
                await self._do_edit(entry, entry.target, view)

    async def _do_edit(self, entry: _Entry, target: dict[str, Any], view: StatusView) -> bool:
        if entry.shown == view:
            return True
        entry.last_edit = self._clock()
        try:
            shown = await self._edit(target, view)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Status edits are best effort: the song or the failure is posted anyway.
            log.warning("job %s: status edit failed", view.job_id, exc_info=True)
            return False
        if shown:
            entry.shown = view
        return shown

    async def close(self) -> None:
        tasks = [e.flusher for e in self._entries.values() if e.flusher and not e.flusher.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._entries.clear()
