"""The Telegram front-end: python-telegram-bot's lifecycle (long polling or a webhook),
and the glue between its updates and the shared conversation layer.

- telegram_commands.py: the command and button handlers, and `TelegramPlace`.
- telegram_render.py: the shared reply models as HTML and inline keyboards.
- telegram_outlet.py: sending, editing and deleting messages for the engine's jobs.
- telegram_parse.py: `/song` and `/compose` text -> request fields.

The front-end is the engine's Delivery for platform "telegram". Everything a job needs
is read from its stored `reply_target`, so a song finished after a restart still reaches
its chat; buttons carry only `<action>:<job id>`, so they too work after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from telegram import BotCommand
from telegram.error import TelegramError
from telegram.ext import (
    Application,
    ApplicationBuilder,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
)

from bot.chat.conversation import Conversation
from bot.chat.delivery import ChatDelivery
from bot.chat.replies import LEGACY_ACTIONS, UPLOAD_MARGIN, Action
from bot.datalock import SingletonHeld
from bot.engine import DeliveryError, Engine
from bot.engine.leases import instance_id
from bot.frontends.telegram_commands import TelegramCommands
from bot.frontends.telegram_outlet import (
    CLOUD_UPLOAD_BYTES,
    LOCAL_UPLOAD_BYTES,
    TelegramOutlet,
    upload_limit,
)
from bot.frontends.telegram_pacing import PacedSender
from bot.frontends.telegram_updates import HandleOnce, KeptUpdates, replay
from bot.frontends.telegram_webhook import WebhookReceiver, webhook_secret
from bot.settings import Settings

__all__ = ["CLOUD_UPLOAD_BYTES", "LOCAL_UPLOAD_BYTES", "TelegramFrontend", "upload_limit"]

log = logging.getLogger("acestep.telegram")

ALLOWED_UPDATES = ["message", "callback_query"]
# Button payloads this bot reads: `<action>:<job id>`, and older messages' short names.
BUTTON_PATTERN = r"^(" + "|".join([*(a.value for a in Action), *LEGACY_ACTIONS]) + "):"
# The command menu Telegram shows users.
MENU = [
    BotCommand("song", "a song from a description"),
    BotCommand("compose", "a song from style tags and your lyrics"),
    BotCommand("extend", "reply to a song or audio: more music before or after it"),
    BotCommand("remix", "reply to a song or audio: it in another style"),
    BotCommand("repaint", "reply to a song or audio: some seconds of it made again"),
    BotCommand("queue", "your songs in progress"),
    BotCommand("cancel", "stop a song"),
    BotCommand("quota", "what you have left today"),
    BotCommand("history", "your recent songs"),
    BotCommand("settings", "your defaults for new songs"),
    BotCommand("limits", "this group's quotas, topics and songs switch (admins)"),
    BotCommand("banlist", "words this group's songs may not contain (admins)"),
    BotCommand("help", "how to use the bot"),
]

TgApp = Application[Any, Any, Any, Any, Any, Any]
# Updates handled at once (PTB's default for concurrent updates).
UPDATES_AT_ONCE = 1024


class TelegramFrontend(ChatDelivery):
    """Telegram commands in; status, songs and failures out (the shared ChatDelivery)."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        edit_interval: float = 3.0,
        action_interval: float = 4.5,
        poll_timeout: int = 30,
        flood_sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        pacing: PacedSender | None = None,
        receive: bool = True,
    ) -> None:
        token = settings.secret("telegram_token")
        if not token:
            raise ValueError("TELEGRAM_TOKEN is not set")
        self.settings = settings
        self.api_url = settings.telegram_api_url.rstrip("/")
        self.poll_timeout = poll_timeout
        # A worker (`--role worker`) only sends: no getUpdates, no webhook, no menu.
        self.receive = receive
        # This host and data directory: a restart after a crash takes its hold back.
        self._poller_owner = instance_id(settings)
        self._poller_hold: asyncio.Task[None] | None = None
        self._webhook_url = settings.telegram_webhook_url if receive else None
        self._updates_request = KeptUpdates()
        self.pacing = pacing or PacedSender(
            sleep=flood_sleep,
            global_per_second=settings.telegram_messages_per_second,
            private_per_second=settings.telegram_chat_messages_per_second,
            group_budget=(settings.telegram_group_messages_per_minute, 60.0),
        )
        builder = (
            ApplicationBuilder()
            .token(token)
            .get_updates_request(self._updates_request)
            .base_url(f"{self.api_url}/bot")
            .base_file_url(f"{self.api_url}/file/bot")
            .concurrent_updates(HandleOnce(UPDATES_AT_ONCE, self._updates_request))
            .rate_limiter(self.pacing)
            .read_timeout(30.0)
            .write_timeout(30.0)
            .media_write_timeout(300.0)
        )
        if self._webhook_url or not receive:
            builder = builder.updater(None)
        self.app: TgApp = builder.build()
        self.webhook: WebhookReceiver | None = None
        if self._webhook_url:
            self.webhook = WebhookReceiver(
                self.app,
                self._webhook_url,
                settings.telegram_webhook_listen,
                webhook_secret(token),
                ALLOWED_UPDATES,
            )
        self._bot_lock = asyncio.Lock()
        self.telegram = TelegramOutlet(
            lambda: self.app.bot,
            self._ready,
            self.api_url,
            action_interval=action_interval,
            action_max_seconds=settings.job_timeout_seconds + 300,
        )
        super().__init__(engine, self.telegram, edit_interval=edit_interval)
        # Bytes a rendered song may have here (the platform's limit less the envelope).
        self.upload_limit = self.telegram.limit - UPLOAD_MARGIN
        self.conversation = Conversation(engine, self)
        self.commands = TelegramCommands(lambda: self.app.bot, self.conversation)
        for name, handler in self.commands.handlers().items():
            self.app.add_handler(CommandHandler(name, handler))
        self.app.add_handler(CallbackQueryHandler(self.commands.button, pattern=BUTTON_PATTERN))
        self.app.add_error_handler(self._on_error)

    # --- lifetime -------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (getMe), start processing updates, then poll or open the webhook."""
        # httpx logs request URLs at INFO, and Telegram URLs hold the bot token.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("httpcore").setLevel(logging.WARNING)
        await self.app.initialize()
        polling = self.webhook is None and self.app.updater is not None
        if polling:
            try:
                await self._hold_poller()
            except BaseException:
                await self.app.shutdown()
                raise
            self._updates_request.track(self.engine.store.inbox, self._inbox_source())
        if self.receive:
            try:
                await self.app.bot.set_my_commands(MENU)
            except TelegramError as exc:  # only the menu is missing; commands still work
                log.warning("telegram: could not set the command menu: %s", exc)
        await self.app.start()
        if self.webhook is not None:
            await self.webhook.start()
        elif self.app.updater is not None:
            await replay(
                self.engine.store.inbox, self._inbox_source(), self._updates_request, self.app
            )
            await self.app.updater.start_polling(
                poll_interval=0.0,
                timeout=self.poll_timeout,
                allowed_updates=ALLOWED_UPDATES,
                drop_pending_updates=False,
            )
        log.info(
            "telegram: running as @%s (%s)",
            self.app.bot.username,
            "webhook" if self.webhook else "long polling" if self.receive else "sending only",
        )

    # --- the one getUpdates poller ---------------------------------------------------

    def _inbox_source(self) -> str:
        return f"telegram:{self.app.bot.id}"

    def _poller_name(self) -> str:
        return f"telegram-poller:{self.app.bot.id}"

    async def _hold_poller(self) -> None:
        """Take the database-wide hold on this bot's getUpdates (Telegram serves one
        poller; a second would take turns with the first and lose updates), and keep it
        while polling. Raises SingletonHeld when another process polls."""
        store = self.engine.store
        name, ttl = self._poller_name(), float(self.settings.lease_seconds)
        if not await store.hold_singleton(name, self._poller_owner, ttl):
            holder = await store.singleton_owner(name) or "another process"
            raise SingletonHeld(
                "Telegram long polling (getUpdates) for this bot",
                holder,
                "Telegram allows one poller. To receive in several chat processes set "
                "TELEGRAM_WEBHOOK_URL (webhook mode: any of them may receive); or leave "
                "TELEGRAM_TOKEN empty on all but one.",
            )
        self._poller_hold = asyncio.create_task(self._keep_poller(name, ttl), name="tg-poller")

    async def _keep_poller(self, name: str, ttl: float) -> None:
        while True:
            await asyncio.sleep(ttl / 3)
            try:
                held = await self.engine.store.hold_singleton(name, self._poller_owner, ttl)
            except Exception:
                log.warning("telegram: could not renew the poller hold", exc_info=True)
                continue
            if not held:
                # Another process polls now (this one stalled past the hold): stop, so
                # the two do not take turns with Telegram's updates.
                log.error("telegram: another process took over getUpdates; polling stops")
                if self.app.updater is not None and self.app.updater.running:
                    await self.app.updater.stop()
                return

    async def _release_poller(self) -> None:
        task, self._poller_hold = self._poller_hold, None
        if task is None:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.engine.store.release_singleton(self._poller_name(), self._poller_owner)

    @property
    def is_connected(self) -> bool:
        """Receiving updates (polling or the webhook receiver), for the health check."""
        if not self.app.running:
            return False
        if not self.receive:
            return True
        if self.webhook is not None:
            return self.webhook.running
        return self.app.updater is not None and self.app.updater.running

    async def stop(self) -> None:
        """Stop receiving, finish handlers in flight, close the HTTP clients."""
        if self.webhook is not None:
            await self.webhook.stop()
        if self.app.updater is not None and self.app.updater.running:
            await self.app.updater.stop()
        await self._release_poller()
        await self.close()  # status edits after uploads: short, let them land
        if self.app.running:
            await self.app.stop()
        await self._updates_request.flush()  # what is still unhandled runs at next start
        await self.telegram.close()
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

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        uid = getattr(update, "update_id", None)
        log.error(
            "telegram: error on update %s: %s",
            uid,
            type(context.error).__name__,
            exc_info=context.error,
        )
