"""Telegram transport for the shared delivery: edits, posts and deletes messages from a
job's stored reply target (chat, forum topic, the request message, the status message),
and keeps the `upload_voice` chat action going while a job works."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from telegram import InputFile, ReplyParameters
from telegram.constants import ChatAction, ParseMode
from telegram.error import BadRequest, Forbidden, TelegramError
from telegram.ext import ExtBot

from bot import audio
from bot.chat.markup import clip
from bot.chat.replies import SongCard, StatusView
from bot.engine.contract import DeliveryError, RenderedSong
from bot.frontends import telegram_render as render
from bot.frontends.telegram_pacing import Priority

log = logging.getLogger("acestep.telegram")

DEFAULT_API_URL = "https://api.telegram.org"
# Telegram's upload limits for bots (cloud Bot API / a local Bot API server).
CLOUD_UPLOAD_BYTES = 50 * 1000 * 1000
LOCAL_UPLOAD_BYTES = 2000 * 1000 * 1000


def upload_limit(api_url: str) -> int:
    """Bytes a song may have: 50 MB, or 2000 MB through a local Bot API server."""
    local = api_url.rstrip("/") != DEFAULT_API_URL
    return LOCAL_UPLOAD_BYTES if local else CLOUD_UPLOAD_BYTES


def reply_to(message_id: int | None) -> ReplyParameters | None:
    if message_id is None:
        return None
    return ReplyParameters(message_id=int(message_id), allow_sending_without_reply=True)


def _not_modified(exc: BadRequest) -> bool:
    return "not modified" in str(exc).lower()


class TelegramOutlet:
    """Sends the shared models to Telegram for the engine's jobs."""

    platform = "telegram"

    def __init__(
        self,
        bot: Callable[[], ExtBot[Any]],
        ready: Callable[[], Any],
        api_url: str,
        *,
        action_interval: float,
        action_max_seconds: float,
    ) -> None:
        self._bot = bot
        self._ready = ready
        self.limit = upload_limit(api_url)
        self.actions = ChatActions(bot, action_interval, action_max_seconds)

    async def ready(self) -> None:
        await self._ready()

    def upload_limit(self, target: dict[str, Any]) -> int:
        return self.limit

    def bot_name(self) -> str | None:
        try:
            return self._bot().first_name
        except RuntimeError:  # not initialised yet
            return None

    def working(self, target: dict[str, Any], job_id: str, active: bool) -> None:
        if active:
            self.actions.start(job_id, int(target["chat_id"]), target.get("thread_id"))
        else:
            self.actions.stop(job_id)

    async def edit_status(self, target: dict[str, Any], view: StatusView) -> bool:
        status_id = target.get("status_message_id")
        if status_id is None:
            return False
        chat_id = int(target["chat_id"])
        try:
            await self._bot().edit_message_text(
                render.html(view.text),
                chat_id=chat_id,
                message_id=int(status_id),
                parse_mode=ParseMode.HTML,
                reply_markup=render.keyboard(view.buttons),
                # A progress edit may be coalesced or dropped; a final one never.
                rate_limit_args={"priority": Priority.NOTICE if view.final else Priority.STATUS},
            )
        except BadRequest as exc:
            if _not_modified(exc):
                return True
            log.info("status message %s in chat %s not edited: %s", status_id, chat_id, exc)
            return False
        except TelegramError as exc:
            log.warning("status message %s in chat %s not edited: %s", status_id, chat_id, exc)
            return False
        return True

    async def remove_status(self, target: dict[str, Any]) -> bool:
        status_id = target.get("status_message_id")
        if status_id is None:
            return True
        try:
            # Bots may delete their own messages for 48 hours; after that, edit instead.
            return bool(await self._bot().delete_message(int(target["chat_id"]), int(status_id)))
        except TelegramError as exc:
            log.info("status message %s not removed: %s", status_id, exc)
            return False

    async def post_song(
        self, target: dict[str, Any], card: SongCard, song: RenderedSong
    ) -> dict[str, Any]:
        chat_id = int(target["chat_id"])
        audio_bytes = await asyncio.to_thread(song.path.read_bytes)
        thumb = await asyncio.to_thread(audio.thumbnail, song.cover) if song.cover else None
        try:
            message = await self._bot().send_audio(
                chat_id,
                InputFile(audio_bytes, filename=card.file_name),
                title=clip(card.title, 64),
                performer="ACE-Step",
                duration=round(song.duration or card.duration),
                thumbnail=InputFile(thumb, filename="cover.jpg") if thumb else None,
                caption=render.caption(card),
                parse_mode=ParseMode.HTML,
                reply_markup=render.keyboard(card.buttons),
                message_thread_id=target.get("thread_id"),
                reply_parameters=reply_to(target.get("request_message_id")),
            )
        except TelegramError as exc:
            log.warning("sending a song to chat %s failed: %s", chat_id, exc)
            # A chat that is gone or has blocked the bot will not take a retry either.
            permanent = isinstance(exc, Forbidden | BadRequest)
            raise DeliveryError(
                f"Telegram did not take the song: {exc}", permanent=permanent
            ) from exc
        kept: dict[str, Any] = {"result_message_id": message.message_id}
        if message.link:
            kept["result_url"] = message.link
        return kept

    async def remove_song(self, target: dict[str, Any]) -> bool:
        message_id = target.get("result_message_id")
        if message_id is None:
            return False
        chat_id = int(target["chat_id"])
        try:
            # Telegram lets a bot delete its messages for 48 hours only.
            return bool(await self._bot().delete_message(chat_id, int(message_id)))
        except BadRequest as exc:
            if "not found" in str(exc).lower():
                return True  # already gone
            log.warning("song message %s in chat %s not deleted: %s", message_id, chat_id, exc)
        except TelegramError as exc:
            log.warning("song message %s in chat %s not deleted: %s", message_id, chat_id, exc)
        return False

    async def post_notice(self, target: dict[str, Any], view: StatusView) -> None:
        await self._bot().send_message(
            int(target["chat_id"]),
            render.html(view.text),
            parse_mode=ParseMode.HTML,
            reply_markup=render.keyboard(view.buttons),
            message_thread_id=target.get("thread_id"),
            reply_parameters=reply_to(target.get("request_message_id")),
            rate_limit_args={"priority": Priority.NOTICE},
        )

    async def close(self) -> None:
        await self.actions.close()


class ChatActions:
    """Repeat the `upload_voice` chat action for each working job until it ends."""

    def __init__(self, bot: Callable[[], ExtBot[Any]], interval: float, max_seconds: float) -> None:
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

    def stop(self, job_id: str) -> None:
        task = self._tasks.pop(job_id, None)
        if task is not None:
            task.cancel()

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
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
