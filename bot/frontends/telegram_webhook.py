"""Webhook mode for the Telegram bot: a small aiohttp receiver feeding the Application.

Used instead of long polling when TELEGRAM_WEBHOOK_URL is set. aiohttp is already a
dependency, so this avoids python-telegram-bot's tornado-based webhook extra. Telegram
proves each POST with the secret token we registered in setWebhook.

An update is answered only once it has been handled (long polling instead keeps each
batch in the store's inbox before confirming it, telegram_updates.py): a 2xx tells
Telegram to forget it, and Telegram repeats a POST that got no 2xx. So a crash mid-handling costs
nothing: the next process is sent the update again, and admission is idempotent per
update (`source_key`), so a /song whose first handling already admitted it is not
admitted twice.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from telegram import Update
from telegram.ext import Application

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"


def webhook_secret(token: str) -> str:
    """A stable secret derived from the bot token (never the token itself)."""
    return hmac.new(token.encode(), b"acestep-bot webhook", hashlib.sha256).hexdigest()[:48]


def parse_listen(listen: str) -> tuple[str, int]:
    """`host:port` (TELEGRAM_WEBHOOK_LISTEN) -> (host, port)."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"TELEGRAM_WEBHOOK_LISTEN must be host:port, not {listen!r}")
    return host.strip("[]"), int(port)


class WebhookReceiver:
    """Receives Telegram's update POSTs and hands each to the Application's handlers."""

    def __init__(
        self,
        application: Application[Any, Any, Any, Any, Any, Any],
        url: str,
        listen: str,
        secret: str,
        allowed_updates: list[str],
    ) -> None:
        self.application = application
        self.url = url
        self.host, self.port = parse_listen(listen)
        self.path = urlsplit(url).path or "/"
        self._secret = secret
        self._allowed = allowed_updates
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(self.path, self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        await self.application.bot.set_webhook(
            self.url, secret_token=self._secret, allowed_updates=self._allowed
        )
        log.info("telegram: webhook receiver listening on %s:%s", self.host, self.port)

    @property
    def running(self) -> bool:
        return self._runner is not None

    @property
    def bound_port(self) -> int:
        """The port actually bound (useful when configured with port 0)."""
        if self._runner is None:
            return self.port
        for site in self._runner.sites:
            server = getattr(site, "_server", None)
            if server is not None and server.sockets:
                return int(server.sockets[0].getsockname()[1])
        return self.port

    async def _receive(self, request: web.Request) -> web.Response:
        given = request.headers.get(SECRET_HEADER, "")
        if not hmac.compare_digest(given, self._secret):
            return web.Response(status=403)
        try:
            data = await request.json()
            update = Update.de_json(data, self.application.bot)
        except Exception:
            log.warning("telegram: webhook received a body that is not an update")
            return web.Response(status=400)
        app = self.application
        # Through the update processor, like updates from the queue: the same bound on
        # updates handled at once. Handler errors go to the error handler, not here.
        await app.update_processor.process_update(update, app.process_update(update))
        return web.Response(status=200)

    async def stop(self) -> None:
        # The webhook stays registered: Telegram keeps updates until we are back.
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
