"""The shared reply models as Discord sees them: markdown text, embeds, persistent
buttons and the /compose modal. No wording lives here (bot/chat/replies.py has it).

The buttons are `DynamicItem`s whose custom_id carries the job (`acestep:<action>:<id>`),
so they keep working after a restart: discord.py matches the template and rebuilds the
item without any in-memory view. Every callback hands the press to the front-end found
on the client (`interaction.client.frontend`).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import discord

from bot import messages
from bot.chat.markup import Bold, Code, Link, Mention, Muted, Span, Text, When, clip
from bot.chat.replies import (
    TAGS_LABEL,
    Action,
    Button,
    EditForm,
    Reply,
    SongCard,
    StatusView,
    Style,
)
from bot.requests import MAX_LYRICS_CHARS, MAX_TAGS_CHARS

EMBED_DESCRIPTION_LIMIT = 4096
MESSAGE_LIMIT = 2000
# A job id, or what a /settings quick pick sets (replies.CHOICE).
JOB_ID = r"(?P<job_id>[0-9a-f]{8}|[a-z_]{1,20}=[a-z0-9_-]{1,24})"


# ---- text ----------------------------------------------------------------------------


def _plain(text: str) -> str:
    return discord.utils.escape_markdown(text)


def _span(span: Span, first: bool) -> str:
    if isinstance(span, str):
        return _plain(span)
    if isinstance(span, Bold):
        return f"**{_plain(span.text)}**"
    if isinstance(span, Code):
        return "`" + span.text.replace("`", "'") + "`"
    if isinstance(span, Link):
        return f"[{_plain(span.text)}](<{span.url}>)"
    if isinstance(span, When):
        return f"<t:{int(span.at)}:{'R' if span.style == 'relative' else 'f'}>"
    if isinstance(span, Mention):
        return f"<@{span.id}>" if span.kind == "user" else f"<#{span.id}>"
    if isinstance(span, Muted):
        return f"-# {_plain(span.text)}" if first else f"*{_plain(span.text)}*"
    raise TypeError(span)


def markdown(text: Text, limit: int = MESSAGE_LIMIT) -> str:
    """A Text as Discord markdown, at most `limit` characters."""
    lines = ["".join(_span(s, i == 0) for i, s in enumerate(line)) for line in text.lines]
    return clip_lines("\n".join(lines), limit)


def clip_lines(text: str, limit: int) -> str:
    """Shorten a multi-line text to `limit` characters, keeping its line breaks."""
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "\N{HORIZONTAL ELLIPSIS}"


# ---- buttons -------------------------------------------------------------------------


class JobActions(Protocol):
    """What the buttons and the modal ask of the front-end."""

    async def on_button(self, interaction: discord.Interaction, payload: str) -> None: ...

    async def on_compose_submit(
        self, interaction: discord.Interaction, fields: dict[str, Any]
    ) -> None: ...

    async def on_form_submit(
        self, interaction: discord.Interaction, form: EditForm, values: dict[str, str]
    ) -> None: ...


def actions_of(interaction: discord.Interaction) -> JobActions:
    """The front-end that owns this client (set by the front-end on its client)."""
    frontend: JobActions = interaction.client.frontend  # type: ignore[attr-defined]
    return frontend


_STYLES = {
    Style.PRIMARY: discord.ButtonStyle.primary,
    Style.SECONDARY: discord.ButtonStyle.secondary,
    Style.DANGER: discord.ButtonStyle.danger,
}


class JobButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=rf"acestep:(?P<action>{'|'.join(a.value for a in Action)}):{JOB_ID}",
):
    """A job button; its custom_id `acestep:<action>:<job_id>` is all it needs, so it works
    for whoever clicks, even after a restart."""

    def __init__(self, button: Button) -> None:
        super().__init__(
            discord.ui.Button(
                label=button.label,
                emoji=button.emoji or None,
                style=_STYLES[button.style],
                custom_id=f"acestep:{button.payload}",
            )
        )
        self.button = button

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> JobButton:
        return cls(Button(Action(match["action"]), match["job_id"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        interaction.extras["job_id"] = self.button.job_id  # for the error log line
        await actions_of(interaction).on_button(interaction, self.button.payload)


PERSISTENT_ITEMS: tuple[type[discord.ui.DynamicItem[Any]], ...] = (JobButton,)


def view_of(buttons: tuple[Button, ...]) -> discord.ui.View | None:
    if not buttons:
        return None
    view = discord.ui.View(timeout=None)
    for button in buttons:
        view.add_item(JobButton(button))
    return view


def empty_view() -> discord.ui.View:
    """Removes every button from an edited message."""
    return discord.ui.View(timeout=None)


# ---- the models ----------------------------------------------------------------------


def status_content(view: StatusView) -> tuple[str, discord.ui.View]:
    """A status message: its text and buttons (none left on a final view)."""
    return markdown(view.text), view_of(view.buttons) or empty_view()


def reply_content(reply: Reply) -> str:
    return markdown(reply.text)


def song_embed(card: SongCard, cover_name: str | None) -> discord.Embed:
    """The posted song: title, what it was made from, duration, seed, provider, cover."""
    embed = discord.Embed(
        title=clip(card.title or "Untitled", 256),
        description=clip_lines(card.description, EMBED_DESCRIPTION_LIMIT),
        colour=discord.Colour.blurple(),
        timestamp=datetime.now(UTC),
    )
    if card.tags:
        embed.add_field(name=TAGS_LABEL, value=clip(card.tags, 1024), inline=False)
    embed.add_field(name="Duration", value=messages.clock(card.duration))
    note = f" ({card.seed_note})" if card.seed_note else ""
    embed.add_field(name="Seed", value=f"`{card.seed}`{note}")
    embed.add_field(name="Provider", value=card.provider or "?")
    embed.add_field(name="Requested by", value=f"<@{card.requester_id}>")
    for note in card.notes:
        embed.add_field(name="Note", value=clip(note, 1024), inline=False)
    embed.set_footer(text=f"job {card.job_id}")
    if cover_name:
        embed.set_thumbnail(url=f"attachment://{cover_name}")
    return embed


def long_embed(reply: Reply) -> discord.Embed:
    """A long private text (lyrics) as an embed: its first line is the title."""
    first, *rest = reply.text.lines or ((),)
    return discord.Embed(
        title=clip(Text((first,)).plain(), 256),
        description=markdown(Text(tuple(rest)), EMBED_DESCRIPTION_LIMIT),
    )


class ComposeModal(discord.ui.Modal, title="Compose a song"):
    """Style tags and a lyrics paragraph (slash options cannot hold line breaks)."""

    def __init__(self, fields: dict[str, Any], tags: str = "", lyrics: str = "") -> None:
        super().__init__(timeout=15 * 60)
        self.fields = fields
        self.tags: discord.ui.TextInput[ComposeModal] = discord.ui.TextInput(
            custom_id="tags",
            default=tags or None,
            max_length=MAX_TAGS_CHARS,
            placeholder="lofi, piano, rain, 80 bpm",
            style=discord.TextStyle.short,
        )
        self.lyrics: discord.ui.TextInput[ComposeModal] = discord.ui.TextInput(
            custom_id="lyrics",
            default=lyrics or None,
            required=False,
            max_length=MAX_LYRICS_CHARS,
            style=discord.TextStyle.paragraph,
            placeholder="[verse]\nfirst line\n[chorus]\n...   (empty = instrumental)",
        )
        self.add_item(
            discord.ui.Label(
                text="Style tags",
                component=self.tags,
                description="comma-separated genres, instruments, mood",
            )
        )
        self.add_item(
            discord.ui.Label(
                text="Lyrics",
                component=self.lyrics,
                description="[verse], [chorus] ... or empty / [inst]",
            )
        )

    async def on_submit(self, interaction: discord.Interaction) -> None:
        fields = {**self.fields, "tags": self.tags.value, "lyrics": self.lyrics.value or ""}
        await actions_of(interaction).on_compose_submit(interaction, fields)


class EditModal(discord.ui.Modal):
    """An edit button's form (Extend, Remix, Repaint, Edit), prefilled from the song."""

    def __init__(self, form: EditForm) -> None:
        super().__init__(title=form.title, timeout=15 * 60)
        self.form = form
        self.inputs: dict[str, discord.ui.TextInput[EditModal]] = {}
        for spec in form.fields[:5]:  # Discord: at most five inputs
            box: discord.ui.TextInput[EditModal] = discord.ui.TextInput(
                custom_id=spec.name,
                default=spec.value or None,
                required=spec.required,
                max_length=MAX_LYRICS_CHARS if spec.paragraph else MAX_TAGS_CHARS,
                style=discord.TextStyle.paragraph if spec.paragraph else discord.TextStyle.short,
            )
            self.inputs[spec.name] = box
            self.add_item(discord.ui.Label(text=spec.label[:45], component=box))

    async def on_submit(self, interaction: discord.Interaction) -> None:
        values = {name: box.value or "" for name, box in self.inputs.items()}
        await actions_of(interaction).on_form_submit(interaction, self.form, values)


class FileRemixModal(discord.ui.Modal, title="Remix this song"):
    """ "Remix this song" on a user's audio file: the remix's tags, strength and lyrics."""

    def __init__(
        self,
        audio: discord.Attachment,
        submit: Callable[[discord.Interaction, dict[str, str]], Awaitable[None]],
    ) -> None:
        super().__init__(timeout=15 * 60)
        self.audio = audio
        self.submit = submit
        self.inputs: dict[str, discord.ui.TextInput[FileRemixModal]] = {}
        for name, label, default, paragraph in (
            ("tags", "Style tags of the remix", None, False),
            ("strength", "Strength: 0 keeps the song, 1 ignores it", "0.5", False),
            ("lyrics", "Lyrics", None, True),
        ):
            box: discord.ui.TextInput[FileRemixModal] = discord.ui.TextInput(
                custom_id=name,
                default=default,
                required=name == "tags",
                max_length=MAX_LYRICS_CHARS if paragraph else MAX_TAGS_CHARS,
                style=discord.TextStyle.paragraph if paragraph else discord.TextStyle.short,
            )
            self.inputs[name] = box
            self.add_item(discord.ui.Label(text=label, component=box))

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await self.submit(interaction, {n: b.value or "" for n, b in self.inputs.items()})
