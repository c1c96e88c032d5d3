"""The Discord front-end: slash commands in, status edits and finished songs out.

A thin adapter over the engine. Commands become `GenerationRequest`s and
`engine.submit(...)`; the engine calls back through the Delivery protocol
(`on_progress`, `deliver`, `on_failed`) with the job, whose stored `reply_target` holds
everything needed to answer even after a restart: the interaction's application id and
token (valid 15 minutes), the channel, the requester and the upload limit Discord reported.

Endpoints: `DISCORD_API_URL` replaces `discord.http.Route.BASE` and `DISCORD_GATEWAY_URL`
replaces discord.py's default gateway (its plain Client never asks `/gateway/bot`). Both
are class-level settings in discord.py, so they apply process-wide: one bot per process.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import io
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Optional

import aiohttp
import discord
import yarl
from discord import app_commands

from bot import messages
from bot.engine import DeliveryError, EngineError
from bot.frontends import discord_views as ui
from bot.models import Requester
from bot.requests import (
    ADVANCED_OPTIONS,
    BASIC_OPTIONS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_TAGS_CHARS,
    GenerationRequest,
    InvalidRequest,
    Mode,
    OptionSpec,
    is_instrumental_lyrics,
)
from storage.jobs import COMMUNITY_KEYS

if TYPE_CHECKING:
    from bot.engine import Engine, Failure, Progress, Song
    from bot.models import Job
    from bot.settings import Settings

log = logging.getLogger("acestep.discord")

PLATFORM = "discord"
TOKEN_LIFETIME_S = 15 * 60
# A followup started just before expiry may still be uploading when the token dies.
TOKEN_SAFETY_S = 90
DEFAULT_EDIT_INTERVAL_S = 3.0
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024
# Room for the cover image and the multipart envelope next to the MP3.
UPLOAD_MARGIN = 256 * 1024
LOGIN_WAIT_S = 60.0

# Community settings: per guild, the channels the bot answers in; one global entry per
# sync target for the hash of the last command payload synced.
CHANNELS_SETTING = "discord_channels"
SYNC_COMMUNITY = "discord:*"

# The per-community limits /limits can set (the store's names for community overrides).
LIMIT_KEYS: tuple[str, ...] = COMMUNITY_KEYS

SOMETHING_WRONG = "Something went wrong; the operator has been told."

HELP_TEXT = (
    "**Make a song**\n"
    "`/song prompt:` describe it in words, e.g. *lofi piano about rain*. Options: "
    "`instrumental`, `duration` (5-240 s), `seed` (-1 random; reuse one to repeat a song) "
    "and the advanced ones (`steps`, `scheduler`, `guidance_*` ...).\n"
    "`/compose` style tags + lyrics in a form (`[verse]`, `[chorus]`; empty = instrumental).\n"
    "**Your jobs**\n"
    "`/queue` your jobs and their positions, `/cancel` stop one, `/quota` what you have "
    "left today, `/history` your last songs.\n"
    "Under each song: **New take** (same request, new seed), **Same seed**, **Lyrics**.\n"
    "**Server admins**: `/limits` shows and sets this server's quotas and channels."
)


class SongCommandTree(app_commands.CommandTree["DiscordClient"]):
    """The command tree; its errors go to the front-end's one error mapping."""

    async def on_error(
        self,
        interaction: discord.Interaction[DiscordClient],
        error: app_commands.AppCommandError,
        /,
    ) -> None:
        await self.client.report_error(interaction, error)


class DiscordClient(discord.Client):
    """The discord.py client: one command tree, persistent buttons, our error mapping."""

    def __init__(self, frontend: DiscordFrontend) -> None:
        # Slash commands and buttons arrive without any privileged intent.
        super().__init__(intents=discord.Intents(guilds=True))
        self.frontend = frontend
        self.tree = SongCommandTree(
            self,
            allowed_contexts=app_commands.AppCommandContext(
                guild=True, dm_channel=True, private_channel=True
            ),
            allowed_installs=app_commands.AppInstallationType(guild=True, user=True),
        )

    async def setup_hook(self) -> None:
        self.add_dynamic_items(*ui.PERSISTENT_ITEMS)

    async def report_error(self, interaction: discord.Interaction, error: Exception) -> None:
        """Answer an error ephemerally: user-fixable text as is, anything else logged."""
        await self.frontend.report_error(interaction, error)


@dataclass
class _StatusSlot:
    """Throttle state of one job's status message."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_edit: float = 0.0
    last_text: str | None = None
    pending: tuple[dict[str, Any], str, bool] | None = None
    flush: asyncio.Task[None] | None = None


class StatusBoard:
    """One status message per job, edited at most once per `interval`; finals always shown."""

    def __init__(
        self,
        edit: Callable[[dict[str, Any], str, discord.ui.View | None], Awaitable[None]],
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._edit = edit
        self.interval = interval
        self._clock = clock
        self._slots: dict[str, _StatusSlot] = {}
        # Jobs already shown in their final state: later progress must not overwrite it.
        self._finished: OrderedDict[str, None] = OrderedDict()

    async def update(
        self,
        job_id: str,
        reply_target: dict[str, Any],
        text: str,
        *,
        cancellable: bool = True,
        initial: bool = False,
        final: bool = False,
    ) -> None:
        if job_id in self._finished:
            return
        if initial and job_id in self._slots:
            return  # progress got there first; the admission text is already stale
        slot = self._slots.setdefault(job_id, _StatusSlot())
        if final:
            self._finished[job_id] = None
            while len(self._finished) > 2000:
                self._finished.popitem(last=False)
            if slot.flush is not None:
                slot.flush.cancel()
            async with slot.lock:
                await self._do_edit(job_id, slot, reply_target, text, False)
            self._slots.pop(job_id, None)
            return
        # Decide under the lock, so two updates never both see "due" and edit back to back.
        async with slot.lock:
            if job_id in self._finished or text == slot.last_text:
                return
            wait = slot.last_edit + self.interval - self._clock()
            if wait <= 0 and slot.flush is None:
                await self._do_edit(job_id, slot, reply_target, text, cancellable)
                return
            slot.pending = (reply_target, text, cancellable)
            if slot.flush is None:
                slot.flush = asyncio.create_task(
                    self._flush_later(job_id, slot, max(wait, 0.0)), name=f"discord-status-{job_id}"
                )

    async def _flush_later(self, job_id: str, slot: _StatusSlot, wait: float) -> None:
        await asyncio.sleep(wait)
        async with slot.lock:
            slot.flush = None
            if slot.pending is not None and job_id not in self._finished:
                reply_target, text, cancellable = slot.pending
                slot.pending = None
                await self._do_edit(job_id, slot, reply_target, text, cancellable)

    async def _do_edit(
        self,
        job_id: str,
        slot: _StatusSlot,
        reply_target: dict[str, Any],
        text: str,
        cancellable: bool,
    ) -> None:
        view = ui.running_view(job_id) if cancellable else None
        slot.last_edit = self._clock()
        slot.last_text = text
        await self._edit(reply_target, text, view)

    async def close(self) -> None:
        tasks = [s.flush for s in self._slots.values() if s.flush is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._slots.clear()


class DiscordFrontend:
    """Discord adapter over the engine; also the engine's Delivery for platform "discord"
    (the caller registers it: `engine.register_delivery(frontend)`, as bot.app does)."""

    platform = PLATFORM

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
        self.engine = engine
        self.connect_gateway = connect_gateway
        self._clock = clock
        self.client = DiscordClient(self)
        self.tree = self.client.tree
        self.status = StatusBoard(self._edit_status, edit_interval)
        self._logged_in = asyncio.Event()
        self._gateway_task: asyncio.Task[None] | None = None
        self._register_commands()

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
        self._logged_in.set()
        await self.sync_commands()
        if self.connect_gateway:
            self._gateway_task = asyncio.create_task(self._run_gateway(), name="discord-gateway")

    async def _run_gateway(self) -> None:
        try:
            await self.client.connect(reconnect=True)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("Discord gateway connection ended with an error")

    async def stop(self) -> None:
        """Close the gateway and the HTTP session; pending status edits are dropped."""
        await self.status.close()
        await self.client.close()
        if self._gateway_task is not None:
            self._gateway_task.cancel()
            await asyncio.gather(self._gateway_task, return_exceptions=True)
            self._gateway_task = None
        self._logged_in.clear()

    def is_connected(self) -> bool:
        """Logged in, and (when it runs the gateway) its websocket is open (for /health)."""
        if not self._logged_in.is_set() or self.client.is_closed():
            return False
        if not self.connect_gateway:
            return True
        ws = self.client.ws
        return ws is not None and ws.open

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

    # ---- commands ----

    def _register_commands(self) -> None:
        tree = self.tree

        song: app_commands.Command[Any, ..., None] = app_commands.Command(
            name="song",
            description="Make a song from a description",
            callback=_options_callback(
                self._song,
                first=(
                    "prompt",
                    app_commands.Range[str, 1, MAX_PROMPT_CHARS],
                    "what the song is like, e.g. lofi piano about rain",
                ),
            ),
        )
        tree.add_command(song)

        compose: app_commands.Command[Any, ..., None] = app_commands.Command(
            name="compose",
            description="Write lyrics and style tags for a song (opens a form)",
            callback=_options_callback(
                self._compose,
                first=(
                    "tags",
                    Optional[app_commands.Range[str, 1, MAX_TAGS_CHARS]],  # noqa: UP045
                    "style tags, e.g. lofi, piano, 80 bpm (editable in the form)",
                ),
            ),
        )
        tree.add_command(compose)

        @tree.command(name="queue", description="Your songs in the queue and their positions")
        async def queue(interaction: discord.Interaction) -> None:
            await self._queue(interaction)

        @tree.command(name="cancel", description="Cancel one of your songs")
        @app_commands.describe(job="the job id (default: your latest active job)")
        async def cancel(
            interaction: discord.Interaction, job: app_commands.Range[str, 1, 16] | None = None
        ) -> None:
            await self._cancel(interaction, job)

        @cancel.autocomplete("job")
        async def cancel_job_choices(
            interaction: discord.Interaction, current: str
        ) -> list[app_commands.Choice[str]]:
            active = await self.engine.queue_for(requester_of(interaction))
            return [
                app_commands.Choice(name=ui.clip(f"{j.id} {j.request.title()}", 100), value=j.id)
                for j, _ in active
                if j.id.startswith(current.lower())
            ][:25]

        @tree.command(name="quota", description="What you have left and when it resets")
        async def quota(interaction: discord.Interaction) -> None:
            await self._quota(interaction)

        @tree.command(name="history", description="Your last songs")
        async def history(interaction: discord.Interaction) -> None:
            await self._history(interaction)

        @tree.command(name="help", description="How to use the song bot")
        async def help_(interaction: discord.Interaction) -> None:
            await interaction.response.send_message(HELP_TEXT, ephemeral=True)

        @tree.command(name="limits", description="View or set this server's quotas and channels")
        @app_commands.guild_only()
        @app_commands.allowed_installs(guilds=True, users=False)
        @app_commands.default_permissions(manage_guild=True)
        @app_commands.describe(
            setting="the quota to set",
            value="new value (with setting)",
            reset="drop this server's override of the setting",
            channels="channels the bot answers in: mention them, or 'all'",
        )
        async def limits(
            interaction: discord.Interaction,
            setting: Literal[LIMIT_KEYS] | None = None,  # type: ignore[valid-type]
            value: app_commands.Range[float, 0, 1000000] | None = None,
            reset: bool = False,
            channels: str | None = None,
        ) -> None:
            await self._limits(interaction, setting, value, reset, channels)

    async def _song(self, interaction: discord.Interaction, **options: Any) -> None:
        fields = {k: v for k, v in options.items() if v is not None}
        await self.submit_from_interaction(interaction, {"mode": Mode.PROMPT.value, **fields})

    async def _compose(self, interaction: discord.Interaction, **options: Any) -> None:
        tags = options.pop("tags", None) or ""
        fields = {k: v for k, v in options.items() if v is not None}
        fields["mode"] = Mode.SONG.value
        await interaction.response.send_modal(ui.ComposeModal(fields, tags=tags))

    async def _queue(self, interaction: discord.Interaction) -> None:
        active = await self.engine.queue_for(requester_of(interaction))
        if not active:
            await interaction.response.send_message(
                "You have no songs in the queue.", ephemeral=True
            )
            return
        lines = []
        for job, position in active:
            where = (
                f"queued, position {position}" if job.state == "queued" and position else job.state
            )
            lines.append(f"`{job.id}` {ui.clip(job.request.title(), 80)} \N{EM DASH} {where}")
        await interaction.response.send_message(
            ui.clip("\n".join(lines), ui.MESSAGE_LIMIT), ephemeral=True
        )

    async def _cancel(self, interaction: discord.Interaction, job_id: str | None) -> None:
        requester = requester_of(interaction)
        if not job_id:
            active = await self.engine.queue_for(requester)
            if not active:
                await interaction.response.send_message(
                    "You have no active songs to cancel.", ephemeral=True
                )
                return
            job_id = max(active, key=lambda pair: pair[0].created_at)[0].id
        await self._cancel_job(interaction, job_id.strip().lower())

    async def _quota(self, interaction: discord.Interaction) -> None:
        requester = requester_of(interaction)
        status = await self.engine.quota_status(requester)
        lines = []
        for line in status.lines:
            if line.limit is None:
                lines.append(f"**{line.label}**: {_num(line.used)} {line.unit} used, no limit")
            else:
                lines.append(
                    f"**{line.label}**: {_num(line.used)} of "
                    f"{messages.plural(line.limit, line.unit)} used, {_num(line.remaining)} left"
                )
        lines.append(
            f"Resets {ui.timestamp(status.resets_at)} ({ui.timestamp(status.resets_at, 'f')})."
        )
        await interaction.response.send_message("\n".join(lines), ephemeral=True)

    async def _history(self, interaction: discord.Interaction) -> None:
        jobs = await self.engine.history(requester_of(interaction), limit=10)
        if not jobs:
            await interaction.response.send_message(
                "You have not made any songs yet.", ephemeral=True
            )
            return
        lines = []
        for job in jobs:
            url = job.reply_target.get("result_url")
            title = ui.clip(job.request.title(), 60)
            shown = f"[{title}](<{url}>)" if url else title
            lines.append(
                f"`{job.id}` {shown} \N{MIDDLE DOT} {job.state} \N{MIDDLE DOT} "
                f"seed `{job.seed}` \N{MIDDLE DOT} {ui.timestamp(job.created_at)}"
            )
        await interaction.response.send_message(
            ui.clip("\n".join(lines), ui.MESSAGE_LIMIT), ephemeral=True
        )

    async def _limits(
        self,
        interaction: discord.Interaction,
        setting: str | None,
        value: float | None,
        reset: bool,
        channels: str | None,
    ) -> None:
        requester = requester_of(interaction)
        if interaction.guild_id is None:
            await interaction.response.send_message("`/limits` works in a server.", ephemeral=True)
            return
        if not (self.engine.is_admin(requester) or interaction.permissions.manage_guild):
            await interaction.response.send_message(
                "Only members with the Manage Server permission can change limits.", ephemeral=True
            )
            return
        community = f"discord:{interaction.guild_id}"
        changed = []
        if setting is not None:
            if setting not in LIMIT_KEYS:
                raise InvalidRequest("setting", setting, "one of " + ", ".join(LIMIT_KEYS))
            if reset:
                await self.engine.set_limit("community", community, setting, None)
                changed.append(f"{setting} back to the default")
            elif value is not None:
                await self.engine.set_limit("community", community, setting, float(value))
                changed.append(f"{setting} = {_num(value)}")
            else:
                raise InvalidRequest("value", None, "give a value, or reset:True")
        if channels is not None:
            ids = parse_channel_list(channels)
            await self.engine.set_community_setting(community, CHANNELS_SETTING, ids)
            changed.append("channels: " + (", ".join(f"<#{c}>" for c in ids) if ids else "all"))
        limits = await self.engine.get_limits("community", community)
        allowed = await self.engine.get_community_setting(community, CHANNELS_SETTING)
        lines = [("Changed " + "; ".join(changed)) if changed else "This server's settings:"]
        lines += [f"**{k}**: {_num(v)}" for k, v in sorted(limits.items())] or [
            "No server-specific quotas (the bot's defaults apply)."
        ]
        lines.append(
            "Channels: "
            + (
                ", ".join(f"<#{c}>" for c in allowed)
                if isinstance(allowed, list) and allowed
                else "all"
            )
        )
        await interaction.response.send_message("\n".join(lines), ephemeral=True)

    # ---- submitting ----

    async def submit_from_interaction(
        self, interaction: discord.Interaction, fields: dict[str, Any]
    ) -> None:
        """Validate the fields, then admit the job; errors are answered ephemerally."""
        request = GenerationRequest.build(**fields)
        await self.submit_request(interaction, request)

    async def submit_request(
        self, interaction: discord.Interaction, request: GenerationRequest
    ) -> None:
        requester = requester_of(interaction)
        refusal = await self._refusal(interaction, requester)
        if refusal:
            await send_ephemeral(interaction, refusal)
            return
        # Admission touches the database: acknowledge first, within Discord's 3 seconds.
        deferred = await interaction.response.defer(thinking=True)
        interaction.extras["public_defer"] = True
        reply_target = self._reply_target(interaction)
        if deferred is not None and deferred.message_id is not None:
            # The status message, editable through the channel once the token expires.
            reply_target["status_message_id"] = str(deferred.message_id)
        # An interaction is answered once (a second response fails at Discord), so one
        # interaction never needs a second job either.
        admission = await self.engine.submit(
            request, requester, reply_target, source_key=f"discord:{interaction.id}"
        )
        interaction.extras["job_id"] = admission.job_id
        note = (
            messages.ignored_options(
                admission.provider or "the music service", admission.ignored_options
            )
            if admission.ignored_options
            else None
        )
        text = ui.status_text(
            admission.job_id, request.title(), "queued", position=admission.position, note=note
        )
        await self.status.update(admission.job_id, reply_target, text, initial=True)

    async def _refusal(self, interaction: discord.Interaction, requester: Requester) -> str | None:
        """Why songs cannot be made here, or None."""
        if interaction.guild_id is None:
            return None
        allowed = await self.engine.get_community_setting(
            f"discord:{interaction.guild_id}", CHANNELS_SETTING
        )
        if (
            isinstance(allowed, list)
            and allowed
            and str(interaction.channel_id) not in allowed
            and not self.engine.is_admin(requester)
        ):
            return "I make songs in " + ", ".join(f"<#{c}>" for c in allowed) + " here."
        perms = interaction.app_permissions
        if not perms.attach_files:
            return (
                "I can't attach files in this channel. Ask a server admin to give me the "
                "Attach Files permission here, or use another channel."
            )
        return None

    def _reply_target(self, interaction: discord.Interaction) -> dict[str, Any]:
        created = interaction.created_at.timestamp()
        return {
            "application_id": str(interaction.application_id),
            "interaction_id": str(interaction.id),
            "interaction_token": interaction.token,
            "token_expires_at": created + TOKEN_LIFETIME_S,
            "channel_id": str(interaction.channel_id) if interaction.channel_id else None,
            "guild_id": str(interaction.guild_id) if interaction.guild_id else None,
            "user_id": str(interaction.user.id),
            "upload_limit": int(interaction.filesize_limit or DEFAULT_UPLOAD_LIMIT),
        }

    # ---- button and modal actions (ui.JobActions) ----

    async def new_take(
        self, interaction: discord.Interaction, job_id: str, same_seed: bool
    ) -> None:
        job = await self.engine.get_job(job_id)
        if job is None:
            await send_ephemeral(interaction, f"Job `{job_id}` is no longer known.")
            return
        seed = job.seed if same_seed else -1
        await self.submit_request(interaction, job.request.with_seed(seed))

    async def show_lyrics(self, interaction: discord.Interaction, job_id: str) -> None:
        job = await self.engine.get_job(job_id)
        lyrics = ""
        if job is not None:
            lyrics = job.lyrics
        if is_instrumental_lyrics(lyrics):
            await send_ephemeral(interaction, "This song has no lyrics (instrumental).")
            return
        assert job is not None
        await interaction.response.send_message(
            embed=ui.lyrics_embed(job.request.title(), lyrics), ephemeral=True
        )

    async def cancel_from_button(self, interaction: discord.Interaction, job_id: str) -> None:
        await self._cancel_job(interaction, job_id)

    async def _cancel_job(self, interaction: discord.Interaction, job_id: str) -> None:
        # Stopping a running job waits for the provider: longer than Discord's 3 seconds.
        await interaction.response.defer(ephemeral=True, thinking=True)
        requester = requester_of(interaction)
        is_admin = self.engine.is_admin(requester)
        if (
            not is_admin
            and interaction.guild_id is not None
            and interaction.permissions.manage_guild
        ):
            # Server managers may cancel songs made in their own server.
            job = await self.engine.get_job(job_id)
            is_admin = job is not None and job.requester.community_id == str(interaction.guild_id)
        job = await self.engine.cancel(job_id, requester, is_admin=is_admin)
        await send_ephemeral(
            interaction, f"Cancelled `{job.id}` ({ui.clip(job.request.title(), 80)})."
        )

    # ---- errors ----

    async def report_error(self, interaction: discord.Interaction, error: Exception) -> None:
        """Map an error to an ephemeral answer; log what the user cannot fix."""
        original = error.original if isinstance(error, app_commands.CommandInvokeError) else error
        if isinstance(original, (InvalidRequest, EngineError, app_commands.TransformerError)):
            text = str(original)
        elif isinstance(original, app_commands.CheckFailure):
            text = "You can't use this command here."
        else:
            job_id = interaction.extras.get("job_id") or "-"
            action = interaction.command.name if interaction.command else interaction.type.name
            log.error(
                "job %s: Discord %s failed: %s",
                job_id,
                action,
                type(original).__name__,
                exc_info=original,
            )
            text = SOMETHING_WRONG
        try:
            await send_ephemeral(interaction, text)
        except discord.HTTPException as exc:
            log.warning("Could not answer a Discord interaction: %s", _http_text(exc))

    # ---- Delivery protocol ----

    async def on_progress(self, job: Job, progress: Progress) -> None:
        text = ui.status_text(
            job.id,
            job.request.title(),
            progress.phase,
            position=progress.position,
            progress=progress.fraction,
        )
        await self.status.update(
            job.id, job.reply_target, text, cancellable=progress.phase != "uploading"
        )

    async def deliver(self, job: Job, song: Song) -> None:
        await self._wait_logged_in()
        target = job.reply_target
        limit = int(target.get("upload_limit") or DEFAULT_UPLOAD_LIMIT)
        rendered = await song.render(max(limit - UPLOAD_MARGIN, limit // 2))
        audio_name = f"{slug(song.title or job.request.title())}-{job.id}.mp3"
        cover_name = "cover.jpg" if rendered.cover else None
        description = song.prompt or song.tags or job.request.prompt or job.request.tags
        embed = ui.song_embed(
            title=song.title or job.request.title(),
            description=description or "",
            duration=rendered.duration,
            seed=song.seed,
            seed_note=messages.seed_note(song.seed_honoured),
            provider=song.provider,
            job_id=job.id,
            cover_name=cover_name,
            requester_id=target.get("user_id"),
        )
        has_lyrics = not (job.request.instrumental or is_instrumental_lyrics(song.lyrics or ""))
        view = ui.result_view(job.id, has_lyrics)

        def files() -> list[discord.File]:
            out = [discord.File(rendered.path, filename=audio_name)]
            if rendered.cover:
                out.append(discord.File(io.BytesIO(rendered.cover), filename="cover.jpg"))
            return out

        message: discord.Message | None = None
        if self._token_usable(target):
            try:
                message = await self._webhook(target).send(
                    embed=embed, files=files(), view=view, wait=True
                )
            except discord.HTTPException as exc:
                if not _token_dead(exc):
                    raise _delivery_error("Discord refused the song", exc) from None
                log.info("job %s: interaction token expired; posting to the channel", job.id)
        if message is None:
            message = await self._post_later(
                target,
                f"<@{target.get('user_id')}> your song is ready.",
                files,
                embed=embed,
                view=view,
            )
        # Posted: nothing below may raise, or the engine would retry and post it twice.
        in_place = str(message.channel.id) == str(target.get("channel_id"))  # else a DM
        url = jump_url(target.get("guild_id") if in_place else None, message.channel.id, message.id)
        try:
            await self.engine.update_reply_target(
                job.id, result_url=url, result_message_id=str(message.id)
            )
        except Exception:
            log.warning("job %s: could not store the Discord result link", job.id, exc_info=True)
        try:
            await self.status.update(
                job.id,
                target,
                ui.final_status_text(
                    job.id, job.request.title(), f"\N{WHITE HEAVY CHECK MARK} Done: {url}"
                ),
                final=True,
            )
        except Exception:
            log.warning("job %s: could not show the final Discord status", job.id, exc_info=True)

    async def on_failed(self, job: Job, failure: Failure) -> None:
        message = messages.failure_text(
            failure.kind, failure.quota_refunded, failure.timeout_seconds
        )
        await self._wait_logged_in()
        target = job.reply_target
        cancelled = job.state == "cancelled"
        outcome = (
            "\N{NO ENTRY SIGN} Cancelled." if cancelled else f"\N{CROSS MARK} Failed: {message}"
        )
        await self.status.update(
            job.id, target, ui.final_status_text(job.id, job.request.title(), outcome), final=True
        )
        if cancelled:
            return  # whoever cancelled was answered; the status message shows it
        text = f"Your song `{job.id}` ({ui.clip(job.request.title(), 80)}) failed: {message}"
        if self._token_usable(target):
            try:
                await self._webhook(target).send(text, ephemeral=True)
                return
            except discord.HTTPException as exc:
                if not _token_dead(exc):
                    raise _delivery_error("Discord refused the message", exc) from None
        await self._post_later(target, f"<@{target.get('user_id')}> {text}", list)

    # ---- Discord I/O ----

    async def _wait_logged_in(self) -> None:
        try:
            await asyncio.wait_for(self._logged_in.wait(), LOGIN_WAIT_S)
        except TimeoutError:
            raise DeliveryError("the Discord front-end is not connected") from None

    def _token_usable(self, target: dict[str, Any]) -> bool:
        expires = float(target.get("token_expires_at") or 0)
        return bool(target.get("interaction_token")) and self._clock() < expires - TOKEN_SAFETY_S

    def _webhook(self, target: dict[str, Any]) -> discord.Webhook:
        """The interaction's followup webhook, rebuilt from the stored reply target."""
        return discord.Webhook.from_state(
            data={
                "id": int(target["application_id"]),
                "type": 3,
                "token": target["interaction_token"],
            },
            state=self.client._connection,
        )

    async def _edit_status(
        self, target: dict[str, Any], text: str, view: discord.ui.View | None
    ) -> None:
        """Edit the status message: via the interaction while it lives, else the channel."""
        if not self.client.is_closed() and self._logged_in.is_set():
            try:
                if self._token_usable(target):
                    # The status message is the interaction's original response.
                    original: Any = "@original"  # the route accepts it in place of an id
                    await self._webhook(target).edit_message(original, content=text, view=view)
                    return
                if target.get("status_message_id") and target.get("channel_id"):
                    channel = self.client.get_partial_messageable(int(target["channel_id"]))
                    await channel.get_partial_message(int(target["status_message_id"])).edit(
                        content=text, view=view
                    )
            except discord.HTTPException as exc:
                # Status edits are best effort: the result or failure is posted anyway.
                log.info("Could not edit a Discord status message: %s", _http_text(exc))
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.info("Could not edit a Discord status message: %s", type(exc).__name__)

    async def _post_later(
        self,
        target: dict[str, Any],
        content: str,
        files: Callable[[], list[discord.File]],
        **kwargs: Any,
    ) -> discord.Message:
        """Post without the interaction: in its channel, else (a user-installed app in a
        server it is not in, a private chat) to the requester's DMs."""
        mentions = discord.AllowedMentions(everyone=False, roles=False, users=True)
        channel_id = target.get("channel_id")
        failure: discord.HTTPException | None = None
        if channel_id:
            channel = self.client.get_partial_messageable(int(channel_id))
            try:
                return await channel.send(
                    content, files=files(), allowed_mentions=mentions, **kwargs
                )
            except (discord.Forbidden, discord.NotFound) as exc:
                failure = exc
            except discord.HTTPException as exc:
                raise _delivery_error(f"cannot post in Discord channel {channel_id}", exc) from None
        user_id = target.get("user_id")
        if not user_id:
            raise DeliveryError("the job has nowhere on Discord to post to", permanent=True)
        try:
            dm = await self.client.create_dm(discord.Object(int(user_id)))
            return await dm.send(content, files=files(), allowed_mentions=mentions, **kwargs)
        except discord.HTTPException as exc:
            raise _delivery_error(
                f"cannot post in channel {channel_id} "
                f"({_http_text(failure) if failure else 'none'}) nor in the requester's DMs",
                exc,
            ) from None


# ---- helpers ----


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


def requester_of(interaction: discord.Interaction) -> Requester:
    """Who is asking, in the engine's terms (community = guild; None in DMs)."""
    user = interaction.user
    return Requester(
        platform=PLATFORM,
        user_id=str(user.id),
        community_id=str(interaction.guild_id) if interaction.guild_id else None,
        display_name=user.display_name,
    )


async def send_ephemeral(interaction: discord.Interaction, text: str) -> None:
    """Answer only the user, whatever state the interaction is in."""
    text = ui.clip(text, ui.MESSAGE_LIMIT)
    if not interaction.response.is_done():
        await interaction.response.send_message(text, ephemeral=True)
        return
    if interaction.extras.pop("public_defer", False):
        # A public "thinking..." message cannot turn ephemeral: replace it.
        try:
            await interaction.delete_original_response()
        except discord.HTTPException:
            pass
    await interaction.followup.send(text, ephemeral=True)


def parse_channel_list(text: str) -> list[str]:
    """Channel ids from mentions (`<#123>`) or bare ids; 'all' or nothing = every channel."""
    if text.strip().lower() in ("", "all", "any", "*"):
        return []
    ids = re.findall(r"\d{15,22}", text)
    if not ids:
        raise InvalidRequest("channels", text, "mention channels like #music, or write 'all'")
    return list(dict.fromkeys(ids))


def slug(text: str) -> str:
    """A file-name-safe form of a title."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "song"


def jump_url(guild_id: str | None, channel_id: int, message_id: int) -> str:
    return f"https://discord.com/channels/{guild_id or '@me'}/{channel_id}/{message_id}"


def _num(value: float | None) -> str:
    if value is None:
        return "unlimited"
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}"


def _token_dead(exc: discord.HTTPException) -> bool:
    """Discord's answer to an expired or unknown interaction token."""
    return exc.status in (401, 404) or exc.code in (10015, 50027)


def _delivery_error(what: str, exc: discord.HTTPException) -> DeliveryError:
    # A 4xx (missing access, file too large) will not change on retry; 5xx might.
    return DeliveryError(f"{what}: {_http_text(exc)}", permanent=400 <= exc.status < 500)


def _http_text(exc: discord.HTTPException) -> str:
    return f"HTTP {exc.status} ({exc.code}) {ui.clip(exc.text or '', 200)}"


def _option_annotation(spec: OptionSpec) -> Any:
    """The discord.py annotation that makes Discord enforce the option's range or choices."""
    # typing.Optional: discord.py's Range is no type, so `Range[...] | None` fails.
    if spec.kind is bool:
        return Optional[bool]  # noqa: UP045
    if spec.choices:
        return Optional[Literal[spec.choices]]  # noqa: UP045
    if spec.kind is str:  # free text the engine normalizes and checks (e.g. key_scale)
        return Optional[str]  # noqa: UP045
    kind: Any = int if spec.kind is int else float
    return Optional[app_commands.Range[kind, spec.minimum, spec.maximum]]  # noqa: UP045


def _options_callback(handler: Callable[..., Awaitable[None]], first: tuple[str, Any, str]) -> Any:
    """A command callback whose signature lists the shared request options.

    discord.py reads the options from the callback's signature; building it from
    bot.requests keeps names, ranges and choices in one place.
    """

    async def callback(interaction: discord.Interaction, **options: Any) -> None:
        await handler(interaction, **options)

    name, annotation, description = first
    required = not _is_optional(annotation)
    params = [
        inspect.Parameter(
            "interaction", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=discord.Interaction
        ),
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=annotation,
            default=inspect.Parameter.empty if required else None,
        ),
    ]
    descriptions = {name: description}
    specs: dict[str, OptionSpec] = {**BASIC_OPTIONS, **ADVANCED_OPTIONS}
    for spec in specs.values():
        params.append(
            inspect.Parameter(
                spec.name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=_option_annotation(spec),
                default=None,
            )
        )
        descriptions[spec.name] = _describe(spec)
    callback.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    callback.__discord_app_commands_param_description__ = descriptions  # type: ignore[attr-defined]
    return callback


def _is_optional(annotation: Any) -> bool:
    return type(None) in getattr(annotation, "__args__", ())


def _describe(spec: OptionSpec) -> str:
    text = spec.help
    if spec.name == "seed":
        text = f"{spec.help} (-1 to {MAX_SEED})"
    elif spec.default is not None and spec.kind is not bool:
        text = f"{spec.help} (default {spec.default})"
    return ui.clip(text, 100)
