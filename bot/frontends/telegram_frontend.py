"""The Telegram front-end: commands in, songs out, over python-telegram-bot (v22).

A thin adapter over the engine. Commands become `GenerationRequest`s submitted to the
engine; the engine calls back through the `Delivery` protocol (on_progress, deliver,
on_failed), and everything those need is read from the job's stored `reply_target`, so a
song finished after a restart still reaches its chat. Buttons carry only `<kind>:<job id>`
and look the job up, so they too work after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from telegram import (
    Bot,
    BotCommand,
    Chat,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputFile,
    Message,
    ReplyParameters,
    Update,
    User,
)
from telegram.constants import ChatMemberStatus, ChatType, ParseMode
from telegram.error import BadRequest, Forbidden, TelegramError
from telegram.ext import (
    Application,
    ApplicationBuilder,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
)
from telegram.request import HTTPXRequest

from bot import messages
from bot.engine import (
    DeliveryError,
    Engine,
    EngineError,
    Failure,
    Job,
    Progress,
    Requester,
    Song,
)
from bot.frontends.telegram_flood import RetryAfterLimiter
from bot.frontends.telegram_status import ChatActions, StatusBoard
from bot.frontends.telegram_text import (
    STATE_LABELS,
    escape,
    final_html,
    help_text,
    invalid_request_text,
    parse_compose,
    parse_song,
    split_message,
    status_html,
    when,
)
from bot.frontends.telegram_text import caption_html as make_caption
from bot.frontends.telegram_webhook import WebhookReceiver, webhook_secret
from bot.requests import GenerationRequest, InvalidRequest, Mode, is_instrumental_lyrics
from bot.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_API_URL = "https://api.telegram.org"
# Telegram's upload limits for bots (cloud Bot API / a local Bot API server); keep room
# for the thumbnail and the multipart envelope.
CLOUD_UPLOAD_BYTES = 50 * 1000 * 1000
LOCAL_UPLOAD_BYTES = 2000 * 1000 * 1000
UPLOAD_MARGIN = 512 * 1024
ALLOWED_UPDATES = ["message", "callback_query"]
GENERIC_ERROR = "Something went wrong, the operator has been told."
LIMITS_GROUP_ONLY = "Use /limits in a group: it shows and sets that group's quotas."
NOT_CHAT_ADMIN = "Only this group's administrators can change its limits."
NO_LYRICS = "This song has no lyrics (it is instrumental)."
NOT_YOURS = "You can only cancel your own songs."
JOB_ID = re.compile(r"^[0-9a-f]{8}$")
# The command menu Telegram shows users.
MENU = [
    BotCommand("song", "a song from a description"),
    BotCommand("compose", "a song from style tags and your lyrics"),
    BotCommand("queue", "your songs in progress"),
    BotCommand("cancel", "stop a song"),
    BotCommand("quota", "what you have left today"),
    BotCommand("history", "your recent songs"),
    BotCommand("limits", "this group's quotas (admins)"),
    BotCommand("help", "how to use the bot"),
]

Handler = Callable[[Update, ContextTypes.DEFAULT_TYPE], Coroutine[Any, Any, None]]
TgApp = Application[Any, Any, Any, Any, Any, Any]


def upload_limit(api_url: str) -> int:
    """Bytes a song may have: 50 MB, or 2000 MB through a local Bot API server."""
    local = api_url.rstrip("/") != DEFAULT_API_URL
    return (LOCAL_UPLOAD_BYTES if local else CLOUD_UPLOAD_BYTES) - UPLOAD_MARGIN


def _thread_of(message: Message) -> int | None:
    """The forum topic a message is in; non-forum reply threads must not be targeted."""
    return message.message_thread_id if message.is_topic_message else None


def _command_args(message: Message) -> str:
    text = message.text or ""
    for entity in message.entities:
        if entity.type == "bot_command" and entity.offset == 0:
            return text[entity.length :]
    return text.partition(" ")[2]


def _cancel_markup(job_id: str) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup([[InlineKeyboardButton("✖ Cancel", callback_data=f"cxl:{job_id}")]])


def _song_markup(job_id: str, has_lyrics: bool) -> InlineKeyboardMarkup:
    row = [InlineKeyboardButton("🎲 New take", callback_data=f"new:{job_id}")]
    if has_lyrics:
        row.append(InlineKeyboardButton("📝 Lyrics", callback_data=f"lyr:{job_id}"))
    return InlineKeyboardMarkup([row])


def _file_name(title: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", title).strip("-").lower()[:48]
    return (slug or "song") + ".mp3"


def _reply_to(message_id: int | None) -> ReplyParameters | None:
    if message_id is None:
        return None
    return ReplyParameters(message_id=message_id, allow_sending_without_reply=True)


class ConfirmAfterHandling(HTTPXRequest):
    """The getUpdates connection, which confirms a batch only once it has been handled.

    Asking for the next batch confirms the previous one to Telegram. PTB asks as soon as
    it has queued a batch, so a crash before the handlers ran would lose a /song for
    good. Waiting (up to `max_wait`) until the queued updates are handled closes that
    gap; Telegram then re-sends an unconfirmed batch after a restart, and admission is
    idempotent per update (`source_key`).
    """

    def __init__(self, max_wait: float = 5.0) -> None:
        super().__init__(connection_pool_size=1)
        self.max_wait = max_wait
        self.update_queue: asyncio.Queue[Any] | None = None

    async def do_request(
        self, url: str, method: str, *args: Any, **kwargs: Any
    ) -> tuple[int, bytes]:
        if self.update_queue is not None and url.endswith("/getUpdates"):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.update_queue.join(), self.max_wait)
        return await super().do_request(url, method, *args, **kwargs)


class TelegramFrontend:
    """Telegram commands and the engine's Delivery for platform "telegram"."""

    platform = "telegram"

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        edit_interval: float = 3.0,
        action_interval: float = 4.5,
        poll_timeout: int = 30,
        flood_sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        token = settings.secret("telegram_token")
        if not token:
            raise ValueError("TELEGRAM_TOKEN is not set")
        self.settings = settings
        self.engine = engine
        self.api_url = settings.telegram_api_url.rstrip("/")
        self.upload_limit = upload_limit(self.api_url)
        self.poll_timeout = poll_timeout
        self._webhook_url = settings.telegram_webhook_url
        self._updates_request = ConfirmAfterHandling()
        builder = (
            ApplicationBuilder()
            .token(token)
            .get_updates_request(self._updates_request)
            .base_url(f"{self.api_url}/bot")
            .base_file_url(f"{self.api_url}/file/bot")
            .concurrent_updates(True)
            .rate_limiter(RetryAfterLimiter(sleep=flood_sleep))
            .read_timeout(30.0)
            .write_timeout(30.0)
            .media_write_timeout(300.0)
        )
        if self._webhook_url:
            builder = builder.updater(None)
        self.app: TgApp = builder.build()
        self._updates_request.update_queue = self.app.update_queue
        self.webhook: WebhookReceiver | None = None
        if self._webhook_url:
            self.webhook = WebhookReceiver(
                self.app,
                self._webhook_url,
                settings.telegram_webhook_listen,
                webhook_secret(token),
                ALLOWED_UPDATES,
            )
        self.status = StatusBoard(self._bot, edit_interval)
        self.actions = ChatActions(
            self._bot, action_interval, max_seconds=settings.job_timeout_seconds + 300
        )
        self._bot_lock = asyncio.Lock()
        self._notes: dict[str, str] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._add_handlers()

    def _bot(self) -> Bot:
        return self.app.bot

    # --- lifetime -------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (getMe), start processing updates, then poll or open the webhook."""
        # httpx logs request URLs at INFO, and Telegram URLs hold the bot token.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("httpcore").setLevel(logging.WARNING)
        await self.app.initialize()
        try:
            await self.app.bot.set_my_commands(MENU)
        except TelegramError as exc:  # only the menu is missing; commands still work
            log.warning("telegram: could not set the command menu: %s", exc)
        await self.app.start()
        if self.webhook is not None:
            await self.webhook.start()
        elif self.app.updater is not None:
            await self.app.updater.start_polling(
                poll_interval=0.0,
                timeout=self.poll_timeout,
                allowed_updates=ALLOWED_UPDATES,
                drop_pending_updates=False,
            )
        log.info(
            "telegram: running as @%s (%s)",
            self.app.bot.username,
            "webhook" if self.webhook else "long polling",
        )

    @property
    def is_connected(self) -> bool:
        """Receiving updates (polling or the webhook receiver), for the health check."""
        if not self.app.running:
            return False
        if self.webhook is not None:
            return self.webhook.running
        return self.app.updater is not None and self.app.updater.running

    async def stop(self) -> None:
        """Stop receiving, finish handlers in flight, close the HTTP clients."""
        if self.webhook is not None:
            await self.webhook.stop()
        if self.app.updater is not None and self.app.updater.running:
            await self.app.updater.stop()
        if self._background:  # final status edits after uploads: short, let them land
            await asyncio.wait(set(self._background), timeout=5)
        if self.app.running:
            await self.app.stop()
        await self.status.close()
        await self.actions.close()
        await self.app.shutdown()
        await self.app.bot.shutdown()  # if only a delivery ever opened it

    async def _ready(self) -> None:
        """Make the bot able to send even before start(): the engine's crash recovery
        may report a failed job while it starts, before the front-ends do."""
        async with self._bot_lock:
            try:
                await self.app.bot.initialize()
            except TelegramError as exc:
                raise DeliveryError(f"Telegram is not reachable: {exc}") from exc

    # --- handlers -------------------------------------------------------------------

    def _add_handlers(self) -> None:
        commands: dict[str, Handler] = {
            "song": self._cmd_song,
            "compose": self._cmd_compose,
            "queue": self._cmd_queue,
            "cancel": self._cmd_cancel,
            "quota": self._cmd_quota,
            "history": self._cmd_history,
            "help": self._cmd_help,
            "start": self._cmd_help,
            "limits": self._cmd_limits,
        }
        for name, handler in commands.items():
            self.app.add_handler(CommandHandler(name, self._guarded(handler)))
        self.app.add_handler(
            CallbackQueryHandler(self._guarded(self._on_button), pattern=r"^(new|lyr|cxl):")
        )
        self.app.add_error_handler(self._on_error)

    def _guarded(self, handler: Handler) -> Handler:
        """Answer user-fixable errors as they are; log the rest without details to users."""

        async def run(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
            try:
                await handler(update, context)
            except InvalidRequest as exc:
                await self._answer(update, invalid_request_text(exc))
            except EngineError as exc:
                await self._answer(update, str(exc))
            except Exception:
                log.exception(
                    "telegram: %s failed on update %s", handler.__name__, update.update_id
                )
                await self._answer(update, GENERIC_ERROR)

        return run

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        uid = update.update_id if isinstance(update, Update) else None
        log.error(
            "telegram: error on update %s: %s",
            uid,
            type(context.error).__name__,
            exc_info=context.error,
        )

    async def _answer(self, update: Update, text: str) -> None:
        """Tell the user: a popup for a button press, else a reply to their message."""
        try:
            if update.callback_query is not None:
                await update.callback_query.answer(text[:200], show_alert=True)
            elif update.effective_message is not None:
                await self._reply(update.effective_message, text, html=False)
        except TelegramError as exc:
            log.warning("telegram: could not answer update %s: %s", update.update_id, exc)

    async def _reply(self, message: Message, text: str, *, html: bool = True) -> None:
        for chunk in split_message(text):
            await self.app.bot.send_message(
                message.chat_id,
                chunk,
                parse_mode=ParseMode.HTML if html else None,
                message_thread_id=_thread_of(message),
                reply_parameters=_reply_to(message.message_id),
            )

    def _requester(self, user: User, chat: Chat) -> Requester:
        community = None if chat.type == ChatType.PRIVATE else str(chat.id)
        name = user.full_name or user.username or str(user.id)
        return Requester(
            platform="telegram", user_id=str(user.id), community_id=community, display_name=name
        )

    async def _is_chat_admin(self, chat: Chat, user: User) -> bool:
        if chat.type == ChatType.PRIVATE:
            return False
        member = await self.app.bot.get_chat_member(chat.id, user.id)
        return member.status in (ChatMemberStatus.ADMINISTRATOR, ChatMemberStatus.OWNER)

    @staticmethod
    def _origin(update: Update) -> tuple[Message, User, Chat]:
        message, user, chat = update.effective_message, update.effective_user, update.effective_chat
        if message is None or user is None or chat is None:
            raise RuntimeError("update without message, user or chat")
        return message, user, chat

    # --- songs ------------------------------------------------------------------------

    async def _cmd_song(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, user, chat = self._origin(update)
        args = _command_args(message)
        if not args.strip():
            await self._reply(
                message,
                "Describe the song, e.g. /song lofi piano about rain duration=30\n\n" + help_text(),
                html=False,
            )
            return
        request = GenerationRequest.build(**parse_song(args))
        await self._start_job(
            request,
            self._requester(user, chat),
            chat.id,
            _thread_of(message),
            message.message_id,
            self._source_key(update),
        )

    async def _cmd_compose(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, user, chat = self._origin(update)
        args = _command_args(message)
        replied = message.reply_to_message
        replied_text = (replied.text or replied.caption) if replied is not None else None
        if not args.strip():
            await self._reply(
                message,
                "Give style tags on the first line and lyrics on the "
                "next lines, e.g.\n/compose synthpop, female vocals\n"
                "[verse]\nNeon rain on the window",
                html=False,
            )
            return
        request = GenerationRequest.build(**parse_compose(args, replied_text))
        await self._start_job(
            request,
            self._requester(user, chat),
            chat.id,
            _thread_of(message),
            message.message_id,
            self._source_key(update),
        )

    def _source_key(self, update: Update) -> str:
        """Names the update that asks for a song, so a re-sent update is not admitted twice."""
        return f"telegram:{self.app.bot.id}:{update.update_id}"

    async def _start_job(
        self,
        request: GenerationRequest,
        requester: Requester,
        chat_id: int,
        thread_id: int | None,
        reply_to: int | None,
        source_key: str | None = None,
    ) -> None:
        """Post the job's status message, then submit with it in the reply target."""
        if source_key and await self.engine.admitted_for(source_key) is not None:
            log.info("telegram: update %s was already admitted; ignoring the repeat", source_key)
            return
        title = request.title()
        # The status message exists before the job does, so the stored reply target is
        # complete from the start and progress can never race ahead of it.
        status = await self.app.bot.send_message(
            chat_id,
            f"<b>{escape(title)}</b>\n⏳ Received…",
            parse_mode=ParseMode.HTML,
            message_thread_id=thread_id,
            reply_parameters=_reply_to(reply_to),
        )
        target = {
            "chat_id": chat_id,
            "thread_id": thread_id,
            "request_message_id": reply_to,
            "status_message_id": status.message_id,
        }
        try:
            admission = await self.engine.submit(request, requester, target, source_key=source_key)
        except EngineError as exc:
            await self._final_or_reply(None, target, f"<b>{escape(title)}</b>\n{escape(str(exc))}")
            return
        except Exception:
            log.exception("telegram: submit failed for chat %s", chat_id)
            await self._final_or_reply(None, target, escape(GENERIC_ERROR))
            return
        if admission.duplicate:  # the same update raced in twice: one status message is enough
            try:
                await self.app.bot.delete_message(chat_id, status.message_id)
            except TelegramError:
                log.info("telegram: could not remove a repeated status message in %s", chat_id)
            return
        note = None
        if admission.ignored_options:
            note = messages.ignored_options(
                admission.provider or "the music service", admission.ignored_options
            )
            self._notes[admission.job_id] = note
            await self.engine.update_reply_target(admission.job_id, note=note)
        self.status.show(
            admission.job_id,
            chat_id,
            status.message_id,
            status_html(admission.job_id, title, "queued", position=admission.position, note=note),
            "queued",
            _cancel_markup(admission.job_id),
        )

    async def _final_or_reply(
        self, job_id: str | None, target: dict[str, Any], html_text: str
    ) -> None:
        """Show a final text in the status message, or as a new reply if that is gone."""
        chat_id = int(target["chat_id"])
        status_id = target.get("status_message_id")
        shown = False
        if status_id is not None:
            shown = await self.status.finish(
                job_id or f"msg:{status_id}", chat_id, int(status_id), html_text
            )
        if not shown:
            await self.app.bot.send_message(
                chat_id,
                html_text,
                parse_mode=ParseMode.HTML,
                message_thread_id=target.get("thread_id"),
                reply_parameters=_reply_to(target.get("request_message_id")),
            )

    # --- Delivery protocol ------------------------------------------------------------

    async def on_progress(self, job: Job, progress: Progress) -> None:
        """Edit the job's status message (throttled) and keep the chat action going."""
        await self._ready()
        target = job.reply_target
        chat_id = int(target["chat_id"])
        if progress.phase != "waiting":
            self.actions.start(job.id, chat_id, target.get("thread_id"))
        status_id = target.get("status_message_id")
        if status_id is None:
            return
        markup = None if progress.phase == "uploading" else _cancel_markup(job.id)
        note = self._notes.get(job.id) or target.get("note")
        text = status_html(
            job.id,
            job.request.title(),
            {
                "waiting": "queued",
                "starting": "submitting",
                "provider_queue": "running",
                "generating": "running",
                "uploading": "uploading",
            }[progress.phase],
            position=progress.position,
            progress=progress.fraction,
            note=note,
        )
        self.status.show(job.id, chat_id, int(status_id), text, str(progress.phase), markup)

    async def deliver(self, job: Job, song: Song) -> None:
        """Send the song with sendAudio (MP3, cover thumbnail, caption, buttons)."""
        await self._ready()
        target = job.reply_target
        chat_id = int(target["chat_id"])
        title = job.request.title()
        try:
            rendered = await song.render(self.upload_limit)
            audio = await asyncio.to_thread(rendered.path.read_bytes)
            prompt_mode = job.request.mode is Mode.PROMPT
            caption = make_caption(
                text=(song.prompt or job.request.prompt)
                if prompt_mode
                else (song.tags or job.request.tags),
                label="Prompt" if prompt_mode else "Tags",
                seed=song.seed,
                seed_note=messages.seed_note(song.seed_honoured),
                duration=rendered.duration or song.duration,
                provider=song.provider,
            )
            lyrics = song.lyrics or ""
            has_lyrics = bool(lyrics.strip()) and not is_instrumental_lyrics(lyrics)
            cover = rendered.cover
            await self.app.bot.send_audio(
                chat_id,
                InputFile(audio, filename=_file_name(song.title or title)),
                title=(song.title or title)[:64],
                performer="ACE-Step",
                duration=round(rendered.duration or song.duration),
                thumbnail=InputFile(cover, filename="cover.jpg") if cover else None,
                caption=caption,
                parse_mode=ParseMode.HTML,
                reply_markup=_song_markup(job.id, has_lyrics),
                message_thread_id=target.get("thread_id"),
                reply_parameters=_reply_to(target.get("request_message_id")),
            )
        except TelegramError as exc:
            log.warning("telegram: sending job %s to chat %s failed: %s", job.id, chat_id, exc)
            # A chat that is gone or has blocked the bot will not take a retry either.
            permanent = isinstance(exc, Forbidden | BadRequest)
            raise DeliveryError(
                f"Telegram did not take the song: {exc}", permanent=permanent
            ) from exc
        finally:
            await self.actions.stop(job.id)
        # The song is posted: return now so the engine records it delivered at once (a
        # delivery cut short after this point would be posted twice); the status message
        # shows the final state in the background.
        status_id = target.get("status_message_id")
        if status_id is not None:
            self._spawn(
                self.status.finish(
                    job.id, chat_id, int(status_id), final_html(job.id, title, "delivered")
                )
            )
        self._notes.pop(job.id, None)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def on_failed(self, job: Job, failure: Failure) -> None:
        message = messages.failure_text(
            failure.kind, failure.quota_refunded, failure.timeout_seconds
        )
        """Failure or cancel: the status message shows why (or a new reply does)."""
        await self._ready()
        await self.actions.stop(job.id)
        state = "cancelled" if job.state == "cancelled" else "failed"
        self._notes.pop(job.id, None)
        await self._final_or_reply(
            job.id, job.reply_target, final_html(job.id, job.request.title(), state, message)
        )

    # --- buttons ----------------------------------------------------------------------

    async def _on_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        user, chat = update.effective_user, update.effective_chat
        if query is None or user is None or chat is None:
            return
        kind, _, job_id = (query.data or "").partition(":")
        job = await self.engine.get_job(job_id) if JOB_ID.match(job_id) else None
        if job is None:
            await query.answer("I no longer know that song.", show_alert=True)
            return
        requester = self._requester(user, chat)
        source = query.message
        if kind == "cxl":
            is_admin = await self._may_cancel_any(requester, chat, job)
            if job.requester.key != requester.key and not is_admin:
                await query.answer(NOT_YOURS, show_alert=True)
                return
            # Answer at once: stopping a running job can take longer than Telegram waits
            # for a button's answer. The status message shows the outcome.
            await query.answer("Cancelling…")
            try:
                await self.engine.cancel(job_id, requester, is_admin=is_admin)
            except EngineError as exc:  # e.g. it finished meanwhile: the status says so
                log.info("telegram: cancel of job %s from a button: %s", job_id, exc)
        elif kind == "new":
            await query.answer("A new take is on its way.")
            await self._start_job(
                job.request.with_seed(-1),
                requester,
                chat.id,
                job.reply_target.get("thread_id"),
                source.message_id if source is not None else None,
                self._source_key(update),
            )
        elif kind == "lyr":
            lyrics = job.lyrics
            if not lyrics.strip() or is_instrumental_lyrics(lyrics):
                await query.answer(NO_LYRICS, show_alert=True)
                return
            await query.answer()
            for chunk in split_message(lyrics):
                await self.app.bot.send_message(
                    chat.id,
                    chunk,
                    message_thread_id=job.reply_target.get("thread_id"),
                    reply_parameters=_reply_to(source.message_id if source else None),
                )

    async def _may_cancel_any(self, requester: Requester, chat: Chat, job: Job) -> bool:
        """Bot admins may cancel any job; group admins the jobs posted in their group."""
        if self.engine.is_admin(requester):
            return True
        same_chat = int(job.reply_target.get("chat_id", 0)) == chat.id
        if not same_chat or job.requester.user_id == requester.user_id:
            return False
        user = await self.app.bot.get_chat_member(chat.id, int(requester.user_id))
        return user.status in (ChatMemberStatus.ADMINISTRATOR, ChatMemberStatus.OWNER)

    # --- information commands ---------------------------------------------------------

    async def _cmd_help(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, _, _ = self._origin(update)
        await self._reply(message, help_text(), html=False)

    async def _cmd_queue(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, user, chat = self._origin(update)
        items = await self.engine.queue_for(self._requester(user, chat))
        if not items:
            await self._reply(message, "You have no songs in progress.", html=False)
            return
        lines = ["<b>Your songs in progress</b>"]
        for job, position in items:
            where = f" - position {position}" if position else ""
            state = STATE_LABELS.get(job.state, job.state)
            lines.append(
                f"• <code>{job.id}</code> {escape(job.request.title())}: {escape(state)}{where}"
            )
        await self._reply(message, "\n".join(lines))

    async def _cmd_cancel(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, user, chat = self._origin(update)
        requester = self._requester(user, chat)
        args = context.args or []
        if args:
            job_id = args[0].strip().lower()
        else:
            items = await self.engine.queue_for(requester)
            if not items:
                await self._reply(message, "You have nothing to cancel.", html=False)
                return
            job_id = max(items, key=lambda item: item[0].created_at)[0].id
        job = await self.engine.get_job(job_id) if JOB_ID.match(job_id) else None
        is_admin = (
            await self._may_cancel_any(requester, chat, job)
            if job is not None
            else self.engine.is_admin(requester)
        )
        cancelled = await self.engine.cancel(job_id, requester, is_admin=is_admin)
        done = cancelled.state == "cancelled"
        await self._reply(
            message,
            f"{'Cancelled' if done else 'Cancelling'} job <code>{escape(cancelled.id)}</code>.",
        )

    async def _cmd_quota(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, user, chat = self._origin(update)
        requester = self._requester(user, chat)
        status = await self.engine.quota_status(requester)
        lines = ["<b>Your quota today</b>"]
        for line in status.lines:
            unit = f" {line.unit}" if line.unit else ""
            if line.limit is None or line.remaining is None:
                lines.append(f"• {escape(line.label)}: {line.used:g}{unit} used (no limit)")
            else:
                lines.append(
                    f"• {escape(line.label)}: {line.used:g} of "
                    f"{messages.plural(line.limit, line.unit)} used, {line.remaining:g} left"
                )
        lines.append(f"Daily limits reset {when(status.resets_at)}.")
        await self._reply(message, "\n".join(lines))

    async def _cmd_history(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, user, chat = self._origin(update)
        jobs = await self.engine.history(self._requester(user, chat), limit=10)
        if not jobs:
            await self._reply(message, "You have made no songs yet. Try /song.", html=False)
            return
        lines = ["<b>Your recent songs</b>"]
        for job in jobs:
            lines.append(
                f"• <code>{job.id}</code> {escape(job.request.title())} - "
                f"{escape(job.state)}, seed {job.seed}, {when(job.created_at)}"
            )
        await self._reply(message, "\n".join(lines))

    async def _cmd_limits(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, user, chat = self._origin(update)
        if chat.type == ChatType.PRIVATE:
            await self._reply(message, LIMITS_GROUP_ONLY, html=False)
            return
        requester = self._requester(user, chat)
        if not (self.engine.is_admin(requester) or await self._is_chat_admin(chat, user)):
            await self._reply(message, NOT_CHAT_ADMIN, html=False)
            return
        subject = f"telegram:{chat.id}"
        for arg in context.args or []:
            key, sep, raw = arg.partition("=")
            if not sep or not key:
                await self._reply(
                    message,
                    "Write limits as name=value (or name=default), "
                    "e.g. /limits seconds_per_day=3600",
                    html=False,
                )
                return
            value: float | None
            if raw.lower() in ("default", "none", "reset"):
                value = None
            else:
                try:
                    value = float(raw)
                except ValueError:
                    await self._reply(message, f"{key}: {raw!r} is not a number.", html=False)
                    return
            try:
                await self.engine.set_limit("community", subject, key.lower(), value)
            except ValueError as exc:  # an unknown limit name; the text lists the known
                await self._reply(message, str(exc), html=False)
                return
        limits = await self.engine.get_limits("community", subject)
        lines = ["<b>This group's limits</b>"]
        if not limits:
            lines.append("No limits of its own: the bot's defaults apply.")
        for key, val in sorted(limits.items()):
            lines.append(f"• {escape(key)} = {val:g}")
        await self._reply(message, "\n".join(lines))
