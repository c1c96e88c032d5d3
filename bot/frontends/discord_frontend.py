"""The Discord front-end: the discord.py client's lifecycle, command sync, and the glue
between Discord events and the shared conversation layer.

- discord_commands.py: the slash commands (one method each) and `DiscordPlace`.
- discord_render.py: the shared reply models as markdown, embeds and buttons.
- discord_outlet.py: sending, editing and deleting messages for the engine's jobs.

The front-end is the engine's Delivery for platform "discord" (the caller registers it:
`engine.register_delivery(frontend)`, as bot.app does).

Endpoints: `DISCORD_API_URL` replaces `discord.http.Route.BASE` and `DISCORD_GATEWAY_URL`
replaces discord.py's default gateway. Both are class-level settings in discord.py, so
they apply process-wide: one bot per process.

Shards: the client is discord.py's `AutoShardedClient`. Without DISCORD_SHARD_COUNT it asks
`/gateway/bot` for Discord's recommended count (and gateway URL) and runs every shard;
with DISCORD_SHARD_COUNT (and DISCORD_SHARD_IDS, this process's share) it runs those on
DISCORD_GATEWAY_URL or Discord's default gateway. A front-end that does not receive
(`--role worker`) never connects a gateway: it only logs in for the REST API.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import discord
import yarl
from discord import app_commands

from bot.chat import replies
from bot.chat.conversation import Conversation
from bot.chat.delivery import ChatDelivery
from bot.chat.replies import EditForm, Reply
from bot.engine.errors import EngineError
from bot.frontends import discord_render as render
from bot.frontends.discord_commands import DiscordCommands, DiscordPlace
from bot.frontends.discord_outlet import DiscordOutlet, http_text
from bot.requests import InvalidRequest

if TYPE_CHECKING:
    from bot.engine import Engine
    from bot.settings import Settings

log = logging.getLogger("acestep.discord")

DEFAULT_EDIT_INTERVAL_S = 3.0
# One global community-settings entry per sync target: the hash of the commands synced.
SYNC_COMMUNITY = "discord:*"


class SongCommandTree(app_commands.CommandTree["DiscordClient"]):
    """The command tree; its errors go to the front-end's one error mapping."""

    async def on_error(
        self,
        interaction: discord.Interaction[DiscordClient],
        error: app_commands.AppCommandError,
        /,
    ) -> None:
        await self.client.frontend.report_error(interaction, error)


class DiscordClient(discord.AutoShardedClient):
    """The discord.py client: one command tree and the persistent job buttons."""

    def __init__(self, frontend: DiscordFrontend) -> None:
        settings = frontend.settings
        # Slash commands and buttons arrive without any privileged intent.
        shards: dict[str, Any] = {"shard_count": settings.discord_shard_count}
        if settings.discord_shard_ids:
            shards["shard_ids"] = list(settings.discord_shard_ids)
        super().__init__(intents=discord.Intents(guilds=True), **shards)
        self.frontend = frontend
        self.tree = SongCommandTree(
            self,
            allowed_contexts=app_commands.AppCommandContext(
                guild=True, dm_channel=True, private_channel=True
            ),
            allowed_installs=app_commands.AppInstallationType(guild=True, user=True),
        )

    # Seconds between two shards' IDENTIFY (Discord allows one per 5 s per bucket).
    identify_spacing = 5.0

    async def setup_hook(self) -> None:
        self.add_dynamic_items(*render.PERSISTENT_ITEMS)

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        if not initial:
            await asyncio.sleep(self.identify_spacing)


class DiscordFrontend(ChatDelivery):
    """Discord commands in; status, songs and failures out (the shared ChatDelivery)."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        edit_interval: float = DEFAULT_EDIT_INTERVAL_S,
        connect_gateway: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.connect_gateway = connect_gateway
        self.client = DiscordClient(self)
        self.tree = self.client.tree
        self.discord = DiscordOutlet(self.client, clock)
        super().__init__(engine, self.discord, edit_interval=edit_interval)
        self.conversation = Conversation(engine, self)
        self.commands = DiscordCommands(engine, self.conversation)
        self.commands.register(self.tree)
        self._gateway_task: asyncio.Task[None] | None = None

    # ---- lifetime ----

    async def start(self) -> None:
        """Log in, sync commands if they changed, then connect the gateway."""
        token = self.settings.secret("discord_token")
        if not token:
            raise RuntimeError("DISCORD_TOKEN is not set")
        apply_endpoints(self.settings)
        for name in URL_LOGGERS:
            if TOKEN_FILTER not in logging.getLogger(name).filters:
                logging.getLogger(name).addFilter(TOKEN_FILTER)
        await self.client.login(token)
        self.discord.logged_in.set()
        await self.sync_commands()
        if self.connect_gateway:
            await self._choose_shard_count()
            self._gateway_task = asyncio.create_task(self._run_gateway(), name="discord-gateway")

    async def _choose_shard_count(self) -> None:
        """Without DISCORD_SHARD_COUNT, run Discord's recommended count (`/gateway/bot`),
        still connecting to DISCORD_GATEWAY_URL when one is set (a gateway proxy)."""
        if self.client.shard_count is not None:
            return
        shards, url, _limits = await self.client.http.get_bot_gateway()
        self.client.shard_count = int(shards)
        if not self.settings.discord_gateway_url:
            discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(url)
        log.info("Discord recommends %s shard(s); running them all here", shards)

    async def _run_gateway(self) -> None:
        try:
            await self.client.connect(reconnect=True)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("Discord gateway connection ended with an error")

    async def stop(self) -> None:
        """Close the gateway and the HTTP session; pending status edits are dropped."""
        await self.close()
        await self.client.close()
        if self._gateway_task is not None:
            self._gateway_task.cancel()
            await asyncio.gather(self._gateway_task, return_exceptions=True)
            self._gateway_task = None
        self.discord.logged_in.clear()

    def is_connected(self) -> bool:
        """Logged in, and (when it runs the gateway) its websocket is open (for /health)."""
        if not self.discord.logged_in.is_set() or self.client.is_closed():
            return False
        if not self.connect_gateway:
            return True
        shards = self.client.shards
        return bool(shards) and not any(shard.is_closed() for shard in shards.values())

    # ---- command sync ----

    def command_payload(self) -> list[dict[str, Any]]:
        """What a sync would send, in a stable order (hashed to sync only on change)."""
        commands = sorted(self.tree.get_commands(), key=lambda c: c.name)
        return [c.to_dict(self.tree) for c in commands]

    async def sync_commands(self) -> list[str]:
        """Sync commands where their definition changed; returns the targets synced.

        With DISCORD_GUILD_IDS the commands go to those guilds (visible at once) instead
        of globally, so a test server never shows every command twice.
        """
        payload = json.dumps(self.command_payload(), sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(payload.encode()).hexdigest()
        app_id = self.client.application_id
        guilds = [discord.Object(int(g)) for g in self.settings.discord_guild_ids]
        targets: list[discord.Object | None] = list(guilds) if guilds else [None]
        synced = []
        for guild in targets:
            where = f"guild:{guild.id}" if guild else "global"
            key = f"command_hash:{app_id}:{where}"
            if await self.engine.get_community_setting(SYNC_COMMUNITY, key) == digest:
                continue
            if guild is not None:
                self.tree.copy_global_to(guild=guild)
            await self.tree.sync(guild=guild)
            await self.engine.set_community_setting(SYNC_COMMUNITY, key, digest)
            log.info("Synced Discord commands (%s)", where)
            synced.append(where)
        return synced

    # ---- buttons and the modal (render.JobActions) ----

    async def on_button(self, interaction: discord.Interaction, payload: str) -> None:
        place = DiscordPlace(interaction)
        await self.conversation.run(
            place, f"button {payload}", lambda: self.conversation.press(place, payload)
        )

    async def on_compose_submit(
        self, interaction: discord.Interaction, fields: dict[str, Any]
    ) -> None:
        place = DiscordPlace(interaction)

        await self.conversation.run(
            place, "/compose", lambda: self.conversation.make(place, fields)
        )

    async def on_form_submit(
        self, interaction: discord.Interaction, form: EditForm, values: dict[str, str]
    ) -> None:
        place = DiscordPlace(interaction)
        await self.conversation.run(
            place,
            f"{form.task} form",
            lambda: self.conversation.submit_form(place, form.task, form.job_id, values),
        )

    # ---- errors discord.py reports (checks, transformers) ----

    async def report_error(self, interaction: discord.Interaction, error: Exception) -> None:
        """Answer a command error ephemerally; log what the user cannot fix."""
        original = error.original if isinstance(error, app_commands.CommandInvokeError) else error
        if isinstance(original, app_commands.TransformerError):
            reply = Reply.say(str(original))  # discord.py names the option and the value
        elif isinstance(original, InvalidRequest | EngineError):
            reply = replies.error_reply(original)
        elif isinstance(original, app_commands.CheckFailure):
            reply = Reply.say(replies.NOT_HERE_COMMAND)
        else:
            action = interaction.command.name if interaction.command else interaction.type.name
            log.error("Discord %s failed: %s", action, type(original).__name__, exc_info=original)
            reply = replies.error_reply(original)
        try:
            await DiscordPlace(interaction).answer(reply)
        except discord.HTTPException as exc:
            log.warning("Could not answer a Discord interaction: %s", http_text(exc))


# ---- endpoints and log hygiene ----


class InteractionTokenFilter(logging.Filter):
    """Masks interaction tokens in discord.py's request logs (they sit in webhook URLs)."""

    _pattern = re.compile(r"(/(?:webhooks|interactions)/\d+/)[^/?\s'\"]+")

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        masked = self._pattern.sub(r"\1[token]", text)
        if masked != text:
            record.msg, record.args = masked, ()
        return True


TOKEN_FILTER = InteractionTokenFilter()
# The discord.py loggers that print request URLs.
URL_LOGGERS = ("discord.http", "discord.webhook.async_")


def apply_endpoints(settings: Settings) -> None:
    """Point discord.py at DISCORD_API_URL and DISCORD_GATEWAY_URL (process-wide)."""
    discord.http.Route.BASE = settings.discord_api_url.rstrip("/")
    if settings.discord_gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)
