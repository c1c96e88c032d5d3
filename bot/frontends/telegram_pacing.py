"""Pacing of everything the bot sends to Telegram, so it stays inside the Bot API limits
instead of running into 429s: about 30 messages a second overall, one a second in a
private chat, 20 a minute in a group (core.telegram.org/bots/faq, "My bot is hitting
limits, how do I avoid this?").

Plugged into python-telegram-bot as its rate limiter, so every Bot API call passes here.
One scheduler for the whole bot:
- each chat has a queue; a chat's budget (aiolimiter leaky buckets) decides when its next
  message may go, and the global budget (`CallWindow`: a call counts from when it is
  sent until Telegram answers it) is handed out by priority across chats;
- priorities: replies to commands first, then the first status message of an admitted
  song, then songs, then final notices, then status edits; a final song or notice is
  never dropped;
- status edits are coalesced: a newer edit of the same message replaces one still
  waiting (only the latest state is sent), and an edit that waited too long is dropped;
- chat actions ("uploading a voice message...") are sent only when the chat is idle;
- a 429 that still happens (RetryAfter) holds that chat for the time Telegram asks and
  retries, up to `max_retries` (a chat action is not retried: it would be stale).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from enum import IntEnum
from typing import Any

from aiolimiter import AsyncLimiter
from telegram.error import RetryAfter
from telegram.ext import BaseRateLimiter

from bot.timing import wait_event

log = logging.getLogger("acestep.telegram")

Result = bool | dict[str, Any] | list[dict[str, Any]]
Callback = Callable[..., Coroutine[Any, Any, Result]]

# Telegram's limits for bots.
GLOBAL_PER_SECOND = 30
PRIVATE_PER_SECOND = 1
GROUP_PER_MINUTE = 20
# Messages that may go together into one private chat, within its one a second.
PRIVATE_BURST = 2
# A status edit older than this is stale: a newer state will follow, or the song.
STATUS_MAX_WAIT_S = 60.0


class Priority(IntEnum):
    """Lower goes first."""

    REPLY = 0  # an answer to a command or a button press
    # The first status message of a song already admitted: after the answers, so 500
    # /song acknowledgements at once do not hold up everyone else's /help (never dropped).
    OPEN = 1
    SONG = 2  # a finished song (never dropped)
    NOTICE = 3  # a final status, a failure notice (never dropped)
    STATUS = 4  # a progress edit (coalesced, dropped when stale)
    ACTION = 5  # a chat action (only when the chat is idle)


# Calls that are not messages in a chat: Telegram's chat limits do not apply.
UNPACED = frozenset(
    {
        "answerCallbackQuery",
        "deleteMessage",
        "getMe",
        "getChatMember",
        "setMyCommands",
        "setWebhook",
        "deleteWebhook",
        "getFile",
        "getChat",
        "logOut",
        "close",
    }
)
# Calls that change a message the bot sent before.
MESSAGE_CHANGES = frozenset({"editMessageText", "editMessageReplyMarkup", "deleteMessage"})
_DEFAULTS = {
    "sendAudio": Priority.SONG,
    "sendDocument": Priority.SONG,
    "editMessageText": Priority.STATUS,
    "editMessageReplyMarkup": Priority.STATUS,
    "deleteMessage": Priority.NOTICE,
    "sendChatAction": Priority.ACTION,
}


def retry_after_seconds(exc: RetryAfter) -> float:
    """The wait Telegram asked for, in seconds (PTB gives int or timedelta)."""
    value = exc._retry_after  # the timedelta behind the deprecated int property
    if isinstance(value, timedelta):
        return max(0.0, value.total_seconds())
    return max(0.0, float(value))


@dataclass(order=True)
class _Item:
    priority: int
    seq: int
    callback: Callback = field(compare=False)
    args: Any = field(compare=False)
    kwargs: dict[str, Any] = field(compare=False)
    endpoint: str = field(compare=False)
    queued_at: float = field(compare=False)
    done: asyncio.Future[Result] = field(compare=False)
    key: tuple[Any, ...] | None = field(compare=False, default=None)  # an edited message


class _Chat:
    """One chat's queue and budget."""

    def __init__(self, limiter: AsyncLimiter) -> None:
        self.limiter = limiter
        self.queue: list[_Item] = []
        self.edits: dict[tuple[Any, ...], _Item] = {}
        self.wake = asyncio.Event()
        self.worker: asyncio.Task[None] | None = None


class PacedSender(BaseRateLimiter[dict[str, Any]]):
    """python-telegram-bot's rate limiter: one paced, prioritised queue per chat."""

    def __init__(
        self,
        max_retries: int = 5,
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        global_per_second: float = GLOBAL_PER_SECOND,
        private_per_second: float = PRIVATE_PER_SECOND,
        group_budget: tuple[float, float] = (GROUP_PER_MINUTE, 60.0),  # (messages, seconds)
        status_max_wait: float = STATUS_MAX_WAIT_S,
    ) -> None:
        self.max_retries = max_retries
        self._sleep = sleep
        self._global_rate = global_per_second
        self._private_rate = private_per_second
        self._group_budget = group_budget  # (messages, per seconds): a burst, then steady
        self.status_max_wait = status_max_wait
        self._global: CallWindow | None = None
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._pump: asyncio.Task[None] | None = None
        self._pump_wake: asyncio.Event | None = None
        self._chats: dict[int, _Chat] = {}
        self._seq = itertools.count()
        self.sent: dict[str, int] = defaultdict(int)  # by endpoint, for benchmarks
        self.dropped: dict[str, int] = defaultdict(int)

    async def initialize(self) -> None:
        """Nothing to open: queues start on first use."""

    async def shutdown(self) -> None:
        tasks = [c.worker for c in self._chats.values() if c.worker] + (
            [self._pump] if self._pump else []
        )
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._chats.clear()
        self._pump = None

    async def process_request(
        self,
        callback: Callback,
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        data: dict[str, Any],
        rate_limit_args: dict[str, Any] | None,
    ) -> Result:
        chat_id = _chat_id(data.get("chat_id"))
        if chat_id is not None and endpoint in MESSAGE_CHANGES:
            self._supersede(self._chat(chat_id), data.get("message_id"))
        if endpoint in UNPACED or chat_id is None:
            return await self._call_with_retries(callback, args, kwargs, endpoint)
        wanted = (rate_limit_args or {}).get("priority")
        priority = (
            Priority(wanted) if wanted is not None else _DEFAULTS.get(endpoint, Priority.REPLY)
        )
        chat = self._chat(chat_id)
        if priority is Priority.ACTION and (chat.queue or not chat.limiter.has_capacity()):
            self.dropped[endpoint] += 1
            return True  # a chat action only matters now; the chat is busy anyway
        loop = asyncio.get_running_loop()
        item = _Item(
            int(priority),
            next(self._seq),
            callback,
            args,
            kwargs,
            endpoint,
            loop.time(),
            loop.create_future(),
        )
        if priority is Priority.STATUS and endpoint in MESSAGE_CHANGES:
            item.key = (data.get("message_id"),)
            chat.edits[item.key] = item
        heapq.heappush(chat.queue, item)
        chat.wake.set()
        if chat.worker is None or chat.worker.done():
            chat.worker = loop.create_task(self._serve(chat_id, chat), name=f"tg-pace-{chat_id}")
        return await item.done

    def _supersede(self, chat: _Chat, message_id: Any) -> None:
        """Only the latest state of a message is worth sending: a newer edit (or its final
        state, or its deletion) replaces a progress edit of it still waiting."""
        older = chat.edits.pop((message_id,), None)
        if older is not None and not older.done.done():
            chat.queue.remove(older)
            heapq.heapify(chat.queue)
            older.done.set_result(True)
            self.dropped[older.endpoint] += 1

    # ---- one chat ----

    def _chat(self, chat_id: int) -> _Chat:
        chat = self._chats.get(chat_id)
        if chat is None:
            group = chat_id < 0  # groups and channels have negative ids
            if group:
                limiter = window_limiter(*self._group_budget)
            else:
                # One a second on average; two may go together (Telegram allows short
                # bursts), so a second /help right after the first is not held a second.
                rate = self._private_rate * HEADROOM
                limiter = AsyncLimiter(PRIVATE_BURST, PRIVATE_BURST / rate)
            chat = self._chats[chat_id] = _Chat(limiter)
        return chat

    async def _serve(self, chat_id: int, chat: _Chat) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not chat.queue:
                chat.wake.clear()
                if not await wait_event(chat.wake, 30) and not chat.queue:
                    self._chats.pop(chat_id, None)
                    return
                continue
            await chat.limiter.acquire()
            if not chat.queue:
                continue
            item = heapq.heappop(chat.queue)
            if item.key is not None and chat.edits.get(item.key) is item:
                del chat.edits[item.key]
            if item.done.done():
                continue  # its caller gave up (cancelled)
            if item.priority == Priority.STATUS and (
                loop.time() - item.queued_at > self.status_max_wait
            ):
                self.dropped[item.endpoint] += 1
                item.done.set_result(True)
                continue
            try:
                # A 429 is waited out here, holding this chat's queue meanwhile.
                result = await self._call_with_retries(
                    item.callback, item.args, item.kwargs, item.endpoint, item.priority
                )
            except BaseException as exc:  # the caller gets the error, the chat goes on
                if not item.done.done():
                    item.done.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            if not item.done.done():
                item.done.set_result(result)

    async def _call_with_retries(
        self,
        callback: Callback,
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        priority: int | None = None,
    ) -> Result:
        """Call, waiting out Telegram's `retry_after` on a 429. A paced call (`priority`
        given) takes a permit from the global budget for each attempt, retries too:
        retries that skipped it piled on top of the budget and drew more 429s for every
        chat. The permit is given back when Telegram has answered."""
        attempt = 0
        while True:
            if priority is not None:
                await self._global_permit(priority)
            try:
                result = await callback(*args, **kwargs)
                self.sent[endpoint] += 1
                return result
            except RetryAfter as exc:
                attempt += 1
                if endpoint == "sendChatAction" or attempt > self.max_retries:
                    raise
                delay = retry_after_seconds(exc)
                log.warning(
                    "Telegram flood control on %s: waiting %.1f s (retry %d of %d)",
                    endpoint,
                    delay,
                    attempt,
                    self.max_retries,
                )
                await self._sleep(delay)
            finally:
                if priority is not None:
                    self._global_done()

    # ---- the global budget, handed out by priority ----

    async def _global_permit(self, priority: int) -> None:
        """Wait for a place in the global budget (by priority); `_global_done` after."""
        loop = asyncio.get_running_loop()
        if self._global is None:
            self._global = CallWindow(self._global_rate * HEADROOM, 1.0)
            self._pump_wake = asyncio.Event()
        future: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self._waiters, (priority, next(self._seq), future))
        assert self._pump_wake is not None
        self._pump_wake.set()
        if self._pump is None or self._pump.done():
            self._pump = loop.create_task(self._pump_permits(), name="tg-pace-global")
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._global_done()  # granted as its caller gave up
            raise

    def _global_done(self) -> None:
        assert self._global is not None and self._pump_wake is not None
        self._global.finished(asyncio.get_running_loop().time())
        self._pump_wake.set()

    async def _pump_permits(self) -> None:
        assert self._global is not None and self._pump_wake is not None
        loop = asyncio.get_running_loop()
        while True:
            self._pump_wake.clear()
            while self._waiters and self._waiters[0][2].done():
                heapq.heappop(self._waiters)  # its caller gave up
            if not self._waiters:
                await self._pump_wake.wait()
                continue
            wait = self._global.wait(loop.time(), reserved=self._waiters[0][0] == Priority.REPLY)
            if wait == math.inf:
                await self._pump_wake.wait()  # until a call in flight is answered
                continue
            if wait > 0:
                # Until a place frees: a call is answered, or one leaves the window.
                await wait_event(self._pump_wake, wait)
                continue
            _, _, future = heapq.heappop(self._waiters)
            self._global.started()
            future.set_result(None)


# The share of the global budget kept for answers to commands.
RESERVED_SHARE = 0.2


class CallWindow:
    """At most `limit` calls in any `window` seconds, counting a call from when it is
    sent until Telegram has answered it.

    Telegram counts a message when it takes it in, which can be any time between the
    bot starting to send it and receiving the answer: an upload still in transit, or
    calls held up in a busy event loop, arrive together. A budget counted only when
    calls start let uploads started over 1.5 s land in one second (bench/
    telegram_overload.py saw 429s on /help answers that way). Counting each call over
    its whole span keeps every window Telegram can see within the limit.
    """

    def __init__(self, limit: float, window: float, reserve: float = RESERVED_SHARE) -> None:
        self.limit = max(1, int(limit))
        self.window = window
        # Places only answers to commands may take, so a /help never waits behind a
        # window full of uploads and status edits.
        self.reserved = int(self.limit * reserve) if self.limit > 1 else 0
        self.in_flight = 0
        self._ends: deque[float] = deque()

    def wait(self, now: float, *, reserved: bool = False) -> float:
        """0 when a call may start now (`reserved`: an answer, which may take the
        reserved places); else the seconds until a place may free (inf when only an
        answer from Telegram can free one)."""
        while self._ends and self._ends[0] <= now - self.window:
            self._ends.popleft()
        limit = self.limit if reserved else self.limit - self.reserved
        used = self.in_flight + len(self._ends)
        if used < limit:
            return 0.0
        # The oldest answers leave the window first; enough of them must go.
        need = used - limit + 1
        if need <= len(self._ends):
            return self._ends[need - 1] + self.window - now
        return math.inf

    def started(self) -> None:
        self.in_flight += 1

    def finished(self, now: float) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        self._ends.append(now)


# The share of each Telegram limit the bot plans to use. A bucket sized to exactly the
# limit fills every window to the brim, and requests that leave together arrive in
# whatever order the network gives them: bench/telegram_overload.py saw hundreds of 429s
# at 100 %.
HEADROOM = 0.85


def window_limiter(messages: float, window: float) -> AsyncLimiter:
    """A leaky bucket that lets at most about `messages` (times HEADROOM) through in any
    `window` seconds.

    A bucket of capacity C leaking at r per second passes C + r * window in a window, so
    a quarter of the budget is the burst and the rest drips; a budget under 4 keeps a
    burst of one (aiolimiter needs room for one) and drips at messages / window.
    """
    messages *= HEADROOM
    burst = max(1.0, messages / 4)
    rest = messages - burst
    rate = rest / window if rest > 0 else messages / window
    return AsyncLimiter(burst, burst / rate)


def _chat_id(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None  # a channel username or nothing: not paced per chat
