"""Receiving Telegram updates by long polling without losing one or holding one up.

Asking getUpdates for the next batch confirms the previous one to Telegram, and PTB asks
as soon as it has queued a batch. So each batch is written to the store's inbox
(storage/inbox.py) before PTB sees it: confirming it then loses nothing. A handled
update leaves the inbox with the next batch's transaction; what is left after a crash is
handled again at start (admission is idempotent per update, `source_key`).

Polling never waits for handlers: a /help is fetched and answered while a burst of
/song admissions is still being stored (waiting for each batch made every /help queue
behind up to 100 of them, bench/telegram_overload.py).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable
from typing import Any

from telegram import Update
from telegram.error import NetworkError
from telegram.ext import SimpleUpdateProcessor
from telegram.request import HTTPXRequest

from storage.inbox import UpdateInbox

log = logging.getLogger("acestep.telegram")

# Updates handled lately, so one Telegram sends again (its batch was kept but not yet
# confirmed when the bot stopped) is not handled a second time beside its replay.
REMEMBERED = 10_000


class KeptUpdates(HTTPXRequest):
    """The getUpdates connection: every batch is in the inbox before PTB gets it."""

    def __init__(self) -> None:
        super().__init__(connection_pool_size=1)
        self.inbox: UpdateInbox | None = None
        self.source = ""  # "telegram:<bot id>", set once the bot knows its id
        self.handled: list[int] = []  # kept, handled, not yet taken out of the inbox
        self._kept: set[int] = set()

    def track(self, inbox: UpdateInbox, source: str) -> None:
        self.inbox, self.source = inbox, source

    async def do_request(
        self, url: str, method: str, *args: Any, **kwargs: Any
    ) -> tuple[int, bytes]:
        status, body = await super().do_request(url, method, *args, **kwargs)
        if self.inbox is not None and url.endswith("/getUpdates") and status == 200:
            updates = _updates(body)
            handled, self.handled = self.handled, []
            try:
                await self.inbox.keep(self.source, updates, handled)
            except Exception as exc:
                self.handled = handled + self.handled
                # Not handed to PTB, so not confirmed: Telegram sends them again.
                log.error("telegram: could not keep received updates: %s", exc)
                raise NetworkError(f"received updates could not be kept: {exc}") from exc
            self._kept.update(uid for uid, _ in updates)
        return status, body

    def done(self, update_id: int) -> None:
        """Its handler has run: out of the inbox with the next transaction."""
        if update_id in self._kept:
            self._kept.discard(update_id)
            self.handled.append(update_id)

    def replaying(self, update_ids: list[int]) -> None:
        self._kept.update(update_ids)

    async def flush(self) -> None:
        """Take the handled updates out of the inbox now (at stop)."""
        if self.inbox is None or not self.handled:
            return
        handled, self.handled = self.handled, []
        try:
            await self.inbox.keep(self.source, [], handled)
        except Exception as exc:  # they are handled again at the next start
            log.warning("telegram: could not clear %d handled updates: %s", len(handled), exc)


class HandleOnce(SimpleUpdateProcessor):
    """Up to `limit` updates at once; each handled once by this process (a kept update
    replayed at start and the same update sent again by Telegram are one), and reported
    to `KeptUpdates` when done."""

    def __init__(self, limit: int, kept: KeptUpdates) -> None:
        super().__init__(limit)
        self.kept = kept
        self._seen: OrderedDict[int, None] = OrderedDict()

    async def do_process_update(self, update: object, coroutine: Awaitable[Any]) -> None:
        uid = update.update_id if isinstance(update, Update) else None
        if uid is not None:
            if uid in self._seen:
                _close(coroutine)
                log.info("telegram: update %s arrived again; handled once", uid)
                return
            self._seen[uid] = None
            while len(self._seen) > REMEMBERED:
                self._seen.popitem(last=False)
        try:
            await coroutine
        finally:
            if uid is not None:
                self.kept.done(uid)


async def replay(inbox: UpdateInbox, source: str, kept: KeptUpdates, app: Any) -> int:
    """Queue the updates a previous run received and did not finish; how many."""
    pending = await inbox.pending(source)
    updates = []
    for uid, payload in pending:
        try:
            update = Update.de_json(json.loads(payload), app.bot)
        except Exception:  # not readable: handling it again is impossible
            log.warning("telegram: kept update %s is not readable; dropped", uid)
            kept.replaying([uid])
            kept.done(uid)
            continue
        if update is not None:
            updates.append(update)
    kept.replaying([u.update_id for u in updates])
    for update in updates:
        await app.update_queue.put(update)
    if updates:
        log.info("telegram: handling %d updates received before a restart", len(updates))
    return len(updates)


def _updates(body: bytes) -> list[tuple[int, str]]:
    """(update id, update JSON) for each update in a getUpdates answer."""
    try:
        answer = json.loads(body)
    except ValueError:
        return []
    result = answer.get("result") if isinstance(answer, dict) and answer.get("ok") else None
    if not isinstance(result, list):
        return []
    return [
        (u["update_id"], json.dumps(u, separators=(",", ":")))
        for u in result
        if isinstance(u, dict) and isinstance(u.get("update_id"), int)
    ]


def _close(coroutine: Awaitable[Any]) -> None:
    close = getattr(coroutine, "close", None)
    if close is not None:
        close()
