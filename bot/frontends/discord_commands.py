"""Discord's slash commands, one method each, over the shared conversation layer.

Each interaction becomes a `DiscordPlace` (the shared layer's `Place`): who asked, where,
and the Discord ways to answer there (a public deferral that becomes the status message,
ephemeral answers). Commands parse Discord's typed options and call `Conversation`; the
rules and the words are not here.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, Optional

import discord
import httpx
from discord import app_commands

from bot import messages, sources
from bot.chat import defaults, replies
from bot.chat.conversation import Conversation, LimitChange, form_fields
from bot.chat.markup import clip
from bot.chat.replies import EditForm, HelpStyle, Reply, StatusView, edit_usage
from bot.frontends import discord_render as render
from bot.frontends.discord_outlet import DEFAULT_UPLOAD_LIMIT, TOKEN_LIFETIME_S
from bot.models import Requester
from bot.requests import (
    ALL_OPTIONS,
    MAX_DURATION,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_TAGS_CHARS,
    MAX_TAKES,
    MIN_DURATION,
    InvalidRequest,
    Mode,
    OptionSpec,
    SourceAudio,
)
from bot.sources import SourceRefused
from storage.jobs import COMMUNITY_KEYS

if TYPE_CHECKING:
    from bot.engine import Engine

log = logging.getLogger("acestep.discord")

PLATFORM = "discord"
LIMIT_KEYS: tuple[str, ...] = COMMUNITY_KEYS


def _discord_option(spec: OptionSpec) -> str:
    return f"{spec.name}:"


HELP_STYLE = HelpStyle(
    song="/song prompt:",
    compose="/compose (a form for tags and lyrics)",
    option=_discord_option,
)


def requester_of(interaction: discord.Interaction) -> Requester:
    """Who is asking, in the engine's terms (community = guild; None in DMs)."""
    user = interaction.user
    return Requester(
        platform=PLATFORM,
        user_id=str(user.id),
        community_id=str(interaction.guild_id) if interaction.guild_id else None,
        display_name=user.display_name,
    )


async def send_ephemeral(interaction: discord.Interaction, content: str, **kwargs: Any) -> None:
    """Answer only the user, whatever state the interaction is in."""
    if not interaction.response.is_done():
        await interaction.response.send_message(content, ephemeral=True, **kwargs)
        return
    if interaction.extras.pop("public_defer", False):
        # A public "thinking..." message cannot turn ephemeral: replace it.
        try:
            await interaction.delete_original_response()
        except discord.HTTPException:
            pass
    await interaction.followup.send(content, ephemeral=True, **kwargs)


class DiscordPlace:
    """One interaction, as the shared layer's Place."""

    def __init__(self, interaction: discord.Interaction) -> None:
        self.interaction = interaction
        self.requester = requester_of(interaction)
        self.source_key: str | None = f"discord:{interaction.id}"
        self.channel_id = str(interaction.channel_id) if interaction.channel_id else None
        self.channel_name = ""  # Discord shows a channel by its id
        self.admins = "members with the Manage Server permission"
        self.status_first = True
        self.settings_usage = SETTINGS_USAGE

    def reply_target(self) -> dict[str, Any]:
        i = self.interaction
        return {
            "application_id": str(i.application_id),
            "interaction_id": str(i.id),
            "interaction_token": i.token,
            "token_expires_at": i.created_at.timestamp() + TOKEN_LIFETIME_S,
            "channel_id": self.channel_id,
            "guild_id": str(i.guild_id) if i.guild_id else None,
            "user_id": str(i.user.id),
            "upload_limit": int(i.filesize_limit or DEFAULT_UPLOAD_LIMIT),
        }

    async def can_post_songs(self) -> bool:
        return self.interaction.guild_id is None or self.interaction.app_permissions.attach_files

    async def is_community_admin(self) -> bool:
        return self.interaction.guild_id is not None and self.interaction.permissions.manage_guild

    async def open_status(self, view: StatusView) -> dict[str, Any]:
        # Admission touches the database: acknowledge first, within Discord's 3 seconds.
        # The public "thinking" response becomes the status message.
        deferred = await self.interaction.response.defer(thinking=True)
        self.interaction.extras["public_defer"] = True
        if deferred is not None and deferred.message_id is not None:
            # Editable through the channel once the token expires.
            return {"status_message_id": str(deferred.message_id)}
        return {}

    async def retract_status(self, reply: Reply, view: StatusView) -> None:
        await self.answer(reply)

    async def drop_status(self) -> None:
        try:
            await self.interaction.delete_original_response()
        except discord.HTTPException:
            log.info("Could not remove a repeated Discord status message")

    async def answer(self, reply: Reply) -> None:
        await send_ephemeral(self.interaction, render.reply_content(reply))

    async def answer_long(self, reply: Reply) -> None:
        await send_ephemeral(self.interaction, "", embed=render.long_embed(reply))

    async def working(self, note: str) -> None:
        if not self.interaction.response.is_done():
            await self.interaction.response.defer(ephemeral=True, thinking=True)

    async def answer_choice(self, reply: Reply) -> None:
        view = render.view_of(reply.buttons)
        await send_ephemeral(
            self.interaction, render.reply_content(reply), **({"view": view} if view else {})
        )

    async def answer_panel(self, reply: Reply) -> None:
        content, view = render.reply_content(reply), render.view_of(reply.buttons)
        i = self.interaction
        if i.type is discord.InteractionType.component and not i.response.is_done():
            await i.response.edit_message(content=content, view=view)  # the panel pressed
            return
        await send_ephemeral(i, content, **({"view": view} if view else {}))

    form_how = "Send this command:"

    async def offer_form(self, form: EditForm) -> bool:
        if self.interaction.response.is_done():
            return False
        await self.interaction.response.send_modal(render.EditModal(form))
        return True

    async def offer_compose(self, fields: dict[str, Any]) -> bool:
        if self.interaction.response.is_done():
            return False
        rest = {k: v for k, v in fields.items() if k not in ("tags", "lyrics")}
        modal = render.ComposeModal(
            rest, tags=fields.get("tags", ""), lyrics=fields.get("lyrics", "")
        )
        await self.interaction.response.send_modal(modal)
        return True


class DiscordCommands:
    """The slash commands; `register` puts them on the command tree."""

    def __init__(self, engine: Engine, conversation: Conversation) -> None:
        self.engine = engine
        self.conversation = conversation

    def register(self, tree: app_commands.CommandTree[Any]) -> None:
        tree.add_command(
            app_commands.Command(
                name="song",
                description="Make a song from a description",
                callback=_options_callback(
                    self.song,
                    first=(
                        "prompt",
                        app_commands.Range[str, 1, MAX_PROMPT_CHARS],
                        "what the song is like, e.g. lofi piano about rain",
                    ),
                ),
            )
        )
        tree.add_command(
            app_commands.Command(
                name="compose",
                description="Write lyrics and style tags for a song (opens a form)",
                callback=_options_callback(
                    self.compose,
                    first=(
                        "tags",
                        Optional[app_commands.Range[str, 1, MAX_TAGS_CHARS]],  # noqa: UP045
                        "style tags, e.g. lofi, piano, 80 bpm (editable in the form)",
                    ),
                ),
            )
        )
        for task, description in EDIT_COMMANDS.items():
            tree.add_command(
                app_commands.Command(
                    name=task, description=description, callback=_edit_callback(self.edit, task)
                )
            )
        tree.add_command(app_commands.ContextMenu(name=REMIX_MENU, callback=self._remix_menu))
        for name, description, method in (
            ("queue", "Your songs in the queue and their positions", self.queue),
            ("quota", "What you have left and when it resets", self.quota),
            ("history", "Your last songs", self.history),
            ("help", "How to use the song bot", self.help),
        ):
            tree.add_command(
                app_commands.Command(name=name, description=description, callback=_plain(method))
            )
        suggesting: list[tuple[str, str, Any, str, Any]] = [
            ("cancel", "Cancel one of your songs", _plain(self.cancel), "job", self.cancel_choices),
            (
                "settings",
                "Your defaults for new songs (or, for admins, the server's)",
                _settings_callback(self.settings),
                "provider",
                self.provider_choices,
            ),
        ]
        for name, description, callback, option, choices in suggesting:
            command: app_commands.Command[Any, ..., None] = app_commands.Command(
                name=name, description=description, callback=callback
            )
            command.autocomplete(option)(choices)
            tree.add_command(command)
        tree.add_command(
            _for_server_admins(
                name="limits",
                description="View or set this server's quotas and channels",
                callback=_plain(self.limits),
            )
        )
        tree.add_command(
            _for_server_admins(
                name="banlist",
                description="Words and phrases songs may not contain in this server",
                callback=_plain(self.banlist),
            )
        )

    async def _run(
        self, interaction: discord.Interaction, what: str, step: Callable[[DiscordPlace], Any]
    ) -> None:
        place = DiscordPlace(interaction)
        await self.conversation.run(place, what, lambda: step(place))

    # ---- songs ----

    async def song(self, interaction: discord.Interaction, **options: Any) -> None:
        fields = {k: v for k, v in options.items() if v is not None}
        await self.submit(interaction, {"mode": Mode.PROMPT.value, **fields})

    async def compose(self, interaction: discord.Interaction, **options: Any) -> None:
        tags = options.pop("tags", None) or ""
        fields = {k: v for k, v in options.items() if v is not None}
        fields["mode"] = Mode.SONG.value
        await interaction.response.send_modal(render.ComposeModal(fields, tags=tags))

    async def submit(self, interaction: discord.Interaction, fields: dict[str, Any]) -> None:
        """Validate the fields, then admit the job; refusals are answered ephemerally."""

        async def step(place: DiscordPlace) -> None:
            await self.conversation.make(place, fields)

        await self._run(interaction, "/song", step)

    # ---- work on a song (issue 14) ----

    async def edit(
        self,
        interaction: discord.Interaction,
        task: str,
        audio: discord.Attachment | None = None,
        song: str | None = None,
        **options: Any,
    ) -> None:
        """`/extend`, `/remix`, `/repaint` on an attached file or a posted song's job id."""
        fields = {EDIT_FIELDS.get(k, k): v for k, v in options.items() if v is not None}

        async def step(place: DiscordPlace) -> None:
            if audio is None and not song:
                await place.answer(Reply.say(edit_usage(task, EDIT_HOW)))
                return
            if song:
                job_id = song.strip().lower()

                async def load() -> SourceAudio:
                    return await self.conversation.posted_source(place, job_id)

            else:
                assert audio is not None

                async def load() -> SourceAudio:
                    return await self._attachment_source(audio)

            await self.conversation.work_on(place, task, fields, load)

        await self._run(interaction, f"/{task}", step)

    async def _remix_menu(self, interaction: discord.Interaction, message: discord.Message) -> None:
        """ "Remix this song" on a message: the bot's own song (its job, from the message's
        buttons) opens the Remix form; a message with an audio attachment opens a form
        for that file."""
        me = interaction.client.user
        posted = _posted_job(message) if me is not None and message.author.id == me.id else None
        audio = next(
            (a for a in message.attachments if (a.content_type or "").startswith("audio/")),
            None,
        )
        if audio is None:
            audio = next(
                (a for a in message.attachments if a.filename.lower().endswith(AUDIO_SUFFIXES)),
                None,
            )

        async def step(place: DiscordPlace) -> None:
            if posted is not None:
                job = await self.engine.get_job(posted)
                if job is not None:
                    await self.conversation.press(place, f"remix:{job.id}")
                    return
            if audio is None:
                await place.answer(Reply.say(replies.MENU_NO_AUDIO))
                return
            await interaction.response.send_modal(
                render.FileRemixModal(audio, lambda i, v: self._file_remix(i, audio, v))
            )

        await self._run(interaction, REMIX_MENU, step)

    async def _file_remix(
        self, interaction: discord.Interaction, audio: discord.Attachment, values: dict[str, str]
    ) -> None:
        fields = form_fields("remix", values)

        async def step(place: DiscordPlace) -> None:
            async def load() -> SourceAudio:
                return await self._attachment_source(audio)

            await self.conversation.work_on(place, "remix", fields, load)

        await self._run(interaction, REMIX_MENU, step)

    async def _attachment_source(self, attachment: discord.Attachment) -> SourceAudio:
        """A Discord attachment as a source: its declared size checked against
        SOURCE_MAX_BYTES first, then fetched from its URL with the same cap."""
        settings = self.engine.settings
        cap = settings.source_max_bytes
        if attachment.size > cap:
            raise SourceRefused(messages.source_too_big(attachment.size, cap))
        async with httpx.AsyncClient() as client:
            return await sources.from_url(
                settings.data_dir,
                client,
                attachment.url,
                declared_size=attachment.size,
                max_bytes=cap,
                name=attachment.filename,
            )

    # ---- your jobs ----

    @app_commands.describe(job="the job id (default: your latest active job)")
    async def cancel(
        self, interaction: discord.Interaction, job: app_commands.Range[str, 1, 16] | None = None
    ) -> None:
        await self._run(interaction, "/cancel", lambda p: self.conversation.cancel(p, job))

    async def cancel_choices(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        active = await self.engine.queue_for(requester_of(interaction))
        return [
            app_commands.Choice(name=clip(f"{j.id} {j.title}", 100), value=j.id)
            for j, _ in active
            if j.id.startswith(current.lower())
        ][:25]

    async def queue(self, interaction: discord.Interaction) -> None:
        await self._run(interaction, "/queue", self.conversation.queue)

    async def quota(self, interaction: discord.Interaction) -> None:
        await self._run(interaction, "/quota", self.conversation.quota)

    async def history(self, interaction: discord.Interaction) -> None:
        await self._run(interaction, "/history", self.conversation.history)

    async def help(self, interaction: discord.Interaction) -> None:
        await self._run(interaction, "/help", lambda p: self.conversation.help(p, HELP_STYLE))

    # ---- server admins ----

    @app_commands.describe(
        setting="the quota to set",
        value="new value (with setting): at most the bot's default",
        reset="drop this server's override of the setting",
        channels="channels the bot answers in: mention them, or 'all'",
    )
    async def limits(
        self,
        interaction: discord.Interaction,
        setting: Literal[LIMIT_KEYS] | None = None,  # type: ignore[valid-type]
        value: app_commands.Range[int, 0, 1000000] | None = None,
        reset: bool = False,
        channels: str | None = None,
    ) -> None:
        async def step(place: DiscordPlace) -> None:
            changes = []
            if setting is not None:
                if not reset and value is None:
                    raise InvalidRequest("value", None, "give a value, or reset:True")
                changes.append(LimitChange(setting, None if reset else float(value or 0)))
            ids = parse_channel_list(channels) if channels is not None else None
            await self.conversation.limits(place, changes, ids, has_channels=True)

        await self._run(interaction, "/limits", step)

    # ---- defaults and the ban list ----

    async def settings(self, interaction: discord.Interaction, **options: Any) -> None:
        scope = options.pop("scope", None) or "mine"
        reset = options.pop("reset", None)
        changes = {k: v for k, v in options.items() if v is not None}
        if reset and reset != "all":
            changes[reset] = "default"

        async def step(place: DiscordPlace) -> None:
            await self.conversation.settings(
                place,
                changes,
                community=scope == "server",
                reset_all=reset == "all",
            )

        await self._run(interaction, "/settings", step)

    async def provider_choices(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        names = [*self.engine.router.providers, "any"]
        return [app_commands.Choice(name=n, value=n) for n in names if n.startswith(current)][:25]

    @app_commands.describe(
        add="words or phrases to ban, separated by commas",
        remove="words or phrases to allow again, separated by commas",
    )
    async def banlist(
        self,
        interaction: discord.Interaction,
        add: app_commands.Range[str, 1, 1000] | None = None,
        remove: app_commands.Range[str, 1, 1000] | None = None,
    ) -> None:
        await self._run(
            interaction,
            "/banlist",
            lambda p: self.conversation.banlist(p, split_phrases(add), split_phrases(remove)),
        )


SETTINGS_USAGE = (
    "Change one with /settings duration: instrumental: style: provider: "
    "(scope:server for the server's, by its admins; reset: to clear)."
)


def _for_server_admins(**kwargs: Any) -> app_commands.Command[Any, ..., None]:
    """A command of servers only, shown to members with Manage Server (Discord hides it
    from others; the shared layer checks again, since a payload can claim anything)."""
    command: app_commands.Command[Any, ..., None] = app_commands.Command(**kwargs)
    command = app_commands.guild_only()(command)
    command = app_commands.allowed_installs(guilds=True, users=False)(command)
    return app_commands.default_permissions(manage_guild=True)(command)


def split_phrases(text: str | None) -> list[str]:
    """Comma-separated words and phrases."""
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def _settings_callback(handler: Callable[..., Awaitable[None]]) -> Any:
    """/settings' callback: one option per default this build offers, plus scope and
    reset (built from bot.chat.defaults, so a new default appears here by itself)."""

    async def callback(interaction: discord.Interaction, **options: Any) -> None:
        await handler(interaction, **options)

    kinds: dict[str, tuple[Any, str]] = {
        "duration": (
            Optional[app_commands.Range[int, MIN_DURATION, MAX_DURATION]],  # noqa: UP045
            f"length in seconds ({MIN_DURATION} to {MAX_DURATION})",
        ),
        "instrumental": (Optional[bool], "no vocals"),  # noqa: UP045
        "vocal_language": (
            Optional[app_commands.Range[str, 1, 16]],  # noqa: UP045
            "language of the lyrics, e.g. en",
        ),
        "style": (
            Optional[app_commands.Range[str, 1, defaults.MAX_STYLE_CHARS]],  # noqa: UP045
            "tags added to every song, e.g. dreamy, lo-fi ('none' to clear)",
        ),
        "provider": (Optional[str], "the music service tried first"),  # noqa: UP045
    }
    offered = [n for n in defaults.offered() if n in kinds]
    params = [
        inspect.Parameter(
            "interaction", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=discord.Interaction
        ),
        inspect.Parameter(
            "scope",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Optional[Literal["mine", "server"]],  # noqa: UP045
            default=None,
        ),
    ]
    descriptions = {"scope": "mine (default) or the server's (admins)"}
    for name in offered:
        annotation, description = kinds[name]
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=None
            )
        )
        descriptions[name] = description
    params.append(
        inspect.Parameter(
            "reset",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Optional[Literal[(*offered, "all")]],  # noqa: UP045
            default=None,
        )
    )
    descriptions["reset"] = "clear one default, or all"
    callback.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    callback.__discord_app_commands_param_description__ = descriptions  # type: ignore[attr-defined]
    return callback


def parse_channel_list(text: str) -> list[str]:
    """Channel ids from mentions (`<#123>`) or bare ids; 'all' or nothing = every channel."""
    if text.strip().lower() in ("", "all", "any", "*"):
        return []
    ids = re.findall(r"\d{15,22}", text)
    if not ids:
        raise InvalidRequest("channels", text, "mention channels like #music, or write 'all'")
    return list(dict.fromkeys(ids))


# ---- building callbacks discord.py accepts from methods ----


def _plain(method: Callable[..., Awaitable[None]]) -> Any:
    """A free function with the method's signature (discord.py reads a callback's
    parameters, and takes a method defined in a class for one needing `self`)."""

    async def callback(interaction: discord.Interaction, **kwargs: Any) -> None:
        await method(interaction, **kwargs)

    callback.__signature__ = inspect.signature(method)  # type: ignore[attr-defined]
    callback.__name__ = callback.__qualname__ = method.__name__
    described = getattr(method, "__discord_app_commands_param_description__", None)
    if described:
        callback.__discord_app_commands_param_description__ = described  # type: ignore[attr-defined]
    return callback


EDIT_COMMANDS = {
    "extend": "Add new music before or after a song (attach audio or give a song's job id)",
    "remix": "Make a song again in another style (attach audio or give a song's job id)",
    "repaint": "Make some seconds of a song again (attach audio or give a song's job id)",
}
REMIX_MENU = "Remix this song"
AUDIO_SUFFIXES = (".mp3", ".wav", ".flac", ".ogg", ".m4a")


def _posted_job(message: discord.Message) -> str | None:
    """The job id in a bot song message's buttons (`acestep:<action>:<job id>`)."""
    for row in message.components:
        for item in getattr(row, "children", []):
            custom_id = getattr(item, "custom_id", None) or ""
            parts = custom_id.split(":")
            if len(parts) == 3 and parts[0] == "acestep" and replies.JOB_ID.match(parts[2]):
                return parts[2]
    return None


EDIT_HOW = "Attach an audio file (audio:) or give a posted song's job id (song:)"
# Discord option name -> request field
EDIT_FIELDS = {
    "before": "extend_before",
    "after": "extend_after",
    "start": "repaint_start",
    "end": "repaint_end",
}
TAKES_OPTION = (
    "takes",
    Optional[app_commands.Range[int, 1, MAX_TAKES]],  # noqa: UP045
    f"how many songs to make, each with its own seed (1-{MAX_TAKES})",
)


def _edit_callback(handler: Callable[..., Awaitable[None]], task: str) -> Any:
    """The callback of `/extend`, `/remix` or `/repaint`: the source (an attachment or a
    posted song's job id), the few fields the task needs, tags, lyrics and takes."""

    async def callback(interaction: discord.Interaction, **options: Any) -> None:
        await handler(interaction, task, **options)

    seconds = app_commands.Range[int, 0, MAX_DURATION]
    at = app_commands.Range[float, 0.0, float(MAX_DURATION)]
    extra: dict[str, list[tuple[str, Any, str]]] = {
        "extend": [
            ("after", Optional[seconds], "seconds of new music after the song"),  # noqa: UP045
            ("before", Optional[seconds], "seconds of new music before it"),  # noqa: UP045
        ],
        "remix": [
            (
                "strength",
                Optional[app_commands.Range[float, 0.0, 1.0]],  # noqa: UP045
                "0 keeps the song, 1 ignores it",
            )
        ],
        "repaint": [
            ("start", Optional[at], "where the part made again starts, in seconds"),  # noqa: UP045
            ("end", Optional[at], "where it ends, in seconds"),  # noqa: UP045
        ],
    }
    named: list[tuple[str, Any, str]] = [
        ("audio", Optional[discord.Attachment], "an audio file to work on"),  # noqa: UP045
        ("song", Optional[app_commands.Range[str, 8, 8]], "or a posted song's job id"),  # noqa: UP045
        *extra[task],
        (
            "tags",
            Optional[app_commands.Range[str, 1, MAX_TAGS_CHARS]],  # noqa: UP045
            "style tags of the new music (default: the song's own)",
        ),
        TAKES_OPTION,
    ]
    params = [
        inspect.Parameter(
            "interaction", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=discord.Interaction
        )
    ]
    for name, annotation, _ in named:
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=None
            )
        )
    callback.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    callback.__discord_app_commands_param_description__ = {  # type: ignore[attr-defined]
        name: description for name, _, description in named
    }
    callback.__name__ = callback.__qualname__ = task
    return callback


def _option_annotation(spec: OptionSpec) -> Any:
    """The discord.py annotation that makes Discord enforce the option's range or choices."""
    # typing.Optional: discord.py's Range is no type, so `Range[...] | None` fails.
    if spec.kind is bool:
        return Optional[bool]  # noqa: UP045
    if spec.choices:
        return Optional[Literal[spec.choices]]  # noqa: UP045
    if spec.kind is str:  # free text the engine normalizes and checks (e.g. key_scale)
        return Optional[app_commands.Range[str, 1, int(spec.maximum or 100)]]  # noqa: UP045
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
    required = type(None) not in getattr(annotation, "__args__", ())
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
    takes_name, takes_annotation, takes_description = TAKES_OPTION
    params.append(
        inspect.Parameter(
            takes_name, inspect.Parameter.KEYWORD_ONLY, annotation=takes_annotation, default=None
        )
    )
    descriptions[takes_name] = takes_description
    for spec in ALL_OPTIONS.values():
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


def _describe(spec: OptionSpec) -> str:
    text = spec.help
    if spec.name == "seed":
        text = f"{spec.help} (-1 to {MAX_SEED})"
    elif spec.default is not None and spec.kind is not bool:
        text = f"{spec.help} (default {spec.default})"
    return clip(text, 100)
