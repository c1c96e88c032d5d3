"""Job status messages on Telegram: one message per job, edited with a throttle.

Progress can arrive many times a second; Telegram allows only a few edits per chat per
minute. Each job's message is edited at most once per `interval` seconds (the latest
text wins), a state never goes backwards (a late "queued" cannot overwrite
"generating"), and the final text is always shown at once. A "typing"-style chat action
(`upload_voice`) is repeated while a job works.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from telegram import Bot, InlineKeyboardMarkup
from telegram.constants import ChatAction, ParseMode
from telegram.error import BadRequest, TelegramError

log = logging.getLogger(__name__)

# Order of the states a status message shows; an update of a lower rank is stale.
RANKS = {"waiting": 0, "starting": 1, "provider_queue": 2, "generating": 3, "uploading": 4}


@dataclass
class _Entry:
    chat_id: int
    message_id: int
    rank: int = -1
    pending: tuple[str, InlineKeyboardMarkup | None] | None = None
    shown: tuple[str, InlineKeyboardMarkup | None] | None = None
    last_edit: float = float("-inf")
    flusher: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _not_modified(exc: BadRequest) -> bool:
    return "not modified" in str(exc).lower()


class StatusBoard:
    """Throttled, ordered edits of the jobs' status messages."""

    def __init__(
        self,
        bot: Callable[[], Bot],
        interval: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._bot = bot
        self.interval = interval
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        # Jobs already shown final: late progress for them is ignored (bounded memory).
        self._finished: OrderedDict[str, None] = OrderedDict()

    def show(
        self,
        job_id: str,
        chat_id: int,
        message_id: int,
        text: str,
        state: str,
        markup: InlineKeyboardMarkup | None = None,
    ) -> None:
        """Queue an in-progress text; it is edited in when the throttle allows."""
        if job_id in self._finished:
            return
        entry = self._entries.get(job_id)
        if entry is None or entry.message_id != message_id:
            entry = self._entries[job_id] = _Entry(chat_id, message_id)
        rank = RANKS.get(state, 0)
        if rank < entry.rank:
            return
        entry.rank = rank
        entry.pending = (text, markup)
        if entry.flusher is None or entry.flusher.done():
            entry.flusher = asyncio.get_running_loop().create_task(self._flush_later(entry))

    async def finish(self, job_id: str, chat_id: int, message_id: int, text: str) -> bool:
        """Show the final text now, without buttons. False if the message is gone."""
        self._finished[job_id] = None
        while len(self._finished) > 2000:
            self._finished.popitem(last=False)
        entry = self._entries.pop(job_id, None) or _Entry(chat_id, message_id)
        if entry.flusher is not None and not entry.flusher.done():
            entry.flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await entry.flusher
        async with entry.lock:
            return await self._edit(entry, text, None)

    async def _flush_later(self, entry: _Entry) -> None:
        # Loop until nothing is pending: a text queued while an edit was in flight is
        # picked up here (show() starts no second flusher while this one runs).
        while entry.pending is not None:
            wait = entry.last_edit + self.interval - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
            async with entry.lock:
                if entry.pending is None:
                    return
                text, markup = entry.pending
                entry.pending = None
                await self._edit(entry, text, markup)

    async def _edit(self, entry: _Entry, text: str, markup: InlineKeyboardMarkup | None) -> bool:
        if entry.shown == (text, markup):
            return True
        entry.last_edit = self._clock()
        try:
            await self._bot().edit_message_text(
                text,
                chat_id=entry.chat_id,
                message_id=entry.message_id,
                parse_mode=ParseMode.HTML,
                reply_markup=markup,
            )
        except BadRequest as exc:
            if _not_modified(exc):
                return True
            log.info(
                "status message %s in chat %s not edited: %s", entry.message_id, entry.chat_id, exc
            )
            return False
        except TelegramError as exc:
            log.warning(
                "status message %s in chat %s not edited: %s", entry.message_id, entry.chat_id, exc
            )
            return False
        entry.shown = (text, markup)
        return True

    async def close(self) -> None:
        tasks = [e.flusher for e in self._entries.values() if e.flusher and not e.flusher.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._entries.clear()


class ChatActions:
    """Repeat the `upload_voice` chat action for each working job until it ends."""

    def __init__(
        self, bot: Callable[[], Bot], interval: float = 4.5, max_seconds: float = 1800.0
    ) -> None:
        self._bot = bot
        self.interval = interval
        # A job always ends in deliver or on_failed; this only bounds a loop whose end
        # was never reported (e.g. the engine stopped mid-job).
        self.max_seconds = max_seconds
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, job_id: str, chat_id: int, thread_id: int | None) -> None:
        task = self._tasks.get(job_id)
        if task is None or task.done():
            self._tasks[job_id] = asyncio.get_running_loop().create_task(
                self._loop(chat_id, thread_id)
            )

    async def stop(self, job_id: str) -> None:
        task = self._tasks.pop(job_id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self, chat_id: int, thread_id: int | None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_seconds
        while loop.time() < deadline:
            try:
                await self._bot().send_chat_action(
                    chat_id, ChatAction.UPLOAD_VOICE, message_thread_id=thread_id
                )
            except TelegramError as exc:
                log.debug("chat action in %s failed: %s", chat_id, exc)
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        for job_id in list(self._tasks):
            await self.stop(job_id)
