"""Discord UI pieces: persistent job buttons, the /compose modal and message formatting.

The buttons are `DynamicItem`s whose custom_id carries the job id (`acestep:new:<job_id>`),
so they keep working after a restart: discord.py matches the template and rebuilds the
item without any in-memory view. Every callback hands the work to the front-end found on
the client (`interaction.client.frontend`), so this module holds no engine logic.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Protocol

import discord

from bot.requests import MAX_LYRICS_CHARS, MAX_TAGS_CHARS

JOB_ID = r"(?P<job_id>[0-9a-f]{8})"
EMBED_DESCRIPTION_LIMIT = 4096
MESSAGE_LIMIT = 2000


class JobActions(Protocol):
    """What the buttons and the modal ask of the front-end."""

    async def new_take(
        self, interaction: discord.Interaction, job_id: str, same_seed: bool
    ) -> None: ...

    async def show_lyrics(self, interaction: discord.Interaction, job_id: str) -> None: ...

    async def cancel_from_button(self, interaction: discord.Interaction, job_id: str) -> None: ...

    async def submit_from_interaction(
        self, interaction: discord.Interaction, fields: dict[str, Any]
    ) -> None: ...


def actions_of(interaction: discord.Interaction) -> JobActions:
    """The front-end that owns this client (set by DiscordFrontend on its client)."""
    frontend: JobActions = interaction.client.frontend  # type: ignore[attr-defined]
    return frontend


async def report(interaction: discord.Interaction, error: Exception) -> None:
    """Answer an error from a button or modal the way the command tree's handler does."""
    # Component and modal errors never reach the tree's on_error; route them to it.
    await interaction.client.report_error(interaction, error)  # type: ignore[attr-defined]


# Each job button: its label, its style and what it asks of the front-end.
_BUTTONS: dict[str, tuple[str, discord.ButtonStyle]] = {
    "new": ("New take", discord.ButtonStyle.primary),  # same request, new random seed
    "same": ("Same seed", discord.ButtonStyle.secondary),  # reproduces the song
    "lyrics": ("Lyrics", discord.ButtonStyle.secondary),  # full lyrics, ephemerally
    "cancel": ("Cancel", discord.ButtonStyle.danger),  # the requester or an admin
}


class JobButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=rf"acestep:(?P<action>{'|'.join(_BUTTONS)}):{JOB_ID}",
):
    """A button on a job's message; its custom_id `acestep:<action>:<job_id>` is all it
    needs, so it works for whoever clicks, even after a restart."""

    def __init__(self, action: str, job_id: str) -> None:
        label, style = _BUTTONS[action]
        super().__init__(
            discord.ui.Button(label=label, style=style, custom_id=f"acestep:{action}:{job_id}")
        )
        self.action = action
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> JobButton:
        return cls(match["action"], match["job_id"])

    async def callback(self, interaction: discord.Interaction) -> None:
        interaction.extras["job_id"] = self.job_id  # for the error log line
        actions = actions_of(interaction)
        try:
            if self.action == "lyrics":
                await actions.show_lyrics(interaction, self.job_id)
            elif self.action == "cancel":
                await actions.cancel_from_button(interaction, self.job_id)
            else:
                await actions.new_take(interaction, self.job_id, same_seed=self.action == "same")
        except Exception as exc:
            await report(interaction, exc)


PERSISTENT_ITEMS: tuple[type[discord.ui.DynamicItem[Any]], ...] = (JobButton,)


def running_view(job_id: str) -> discord.ui.View:
    """The status message's buttons while the job is active."""
    view = discord.ui.View(timeout=None)
    view.add_item(JobButton("cancel", job_id))
    return view


def result_view(job_id: str, has_lyrics: bool) -> discord.ui.View:
    """The finished song's buttons."""
    view = discord.ui.View(timeout=None)
    view.add_item(JobButton("new", job_id))
    view.add_item(JobButton("same", job_id))
    if has_lyrics:
        view.add_item(JobButton("lyrics", job_id))
    return view


class ComposeModal(discord.ui.Modal, title="Compose a song"):
    """Style tags and a lyrics paragraph (slash options cannot hold line breaks)."""

    def __init__(self, fields: dict[str, Any], tags: str = "") -> None:
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
        await actions_of(interaction).submit_from_interaction(interaction, fields)

    async def on_error(  # type: ignore[override]
        self, interaction: discord.Interaction, error: Exception, /
    ) -> None:
        await report(interaction, error)


# ---- formatting: the one place that words job states for Discord ----


def clip(text: str, limit: int) -> str:
    """Shorten text to `limit` characters, marking the cut."""
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "\N{HORIZONTAL ELLIPSIS}"


def timestamp(when: datetime | float, style: str = "R") -> str:
    """A Discord timestamp that every user sees in their own time zone."""
    seconds = when.timestamp() if isinstance(when, datetime) else when
    return f"<t:{int(seconds)}:{style}>"


def status_text(
    job_id: str,
    title: str,
    state: str,
    *,
    position: int | None = None,
    progress: float | None = None,
    message: str | None = None,
    note: str | None = None,
) -> str:
    """The status message of an active job."""
    head = f"**{clip(title, 120)}** \N{MIDDLE DOT} job `{job_id}`\n"
    if state == "waiting":
        line = "\N{HOURGLASS WITH FLOWING SAND} Queued"
        if position:
            line += " (next up)" if position == 1 else f", position {position}"
    elif state in ("starting", "provider_queue"):
        line = "\N{HOURGLASS WITH FLOWING SAND} Starting the generation"
    elif state == "generating":
        line = "\N{MUSICAL NOTE} Generating"
        if progress is not None:
            line += f" {round(max(0.0, min(1.0, progress)) * 100)}%"
        if message:
            line += f" \N{EM DASH} {clip(' '.join(message.split()), 200)}"
    elif state == "uploading":
        line = "\N{OUTBOX TRAY} Uploading"
    else:
        line = state
    if note:
        line += "\n-# " + note
    return head + line


def final_status_text(job_id: str, title: str, outcome: str) -> str:
    """The status message once the job is over (done, failed, cancelled)."""
    return f"**{clip(title, 120)}** \N{MIDDLE DOT} job `{job_id}`\n{clip(outcome, 1500)}"


def song_embed(
    *,
    title: str,
    description: str,
    duration: float,
    seed: int,
    provider: str,
    job_id: str,
    cover_name: str | None,
    requester_id: str | None = None,
    seed_note: str = "",
) -> discord.Embed:
    """The result embed: title, prompt or tags, duration, seed, provider and cover art."""
    embed = discord.Embed(
        title=clip(title or "Untitled", 256),
        description=clip(description, EMBED_DESCRIPTION_LIMIT),
        colour=discord.Colour.blurple(),
        timestamp=datetime.now(UTC),
    )
    embed.add_field(name="Duration", value=f"{duration:.0f} s")
    embed.add_field(name="Seed", value=f"`{seed}`" + (f" ({seed_note})" if seed_note else ""))
    embed.add_field(name="Provider", value=provider or "?")
    if requester_id:
        embed.add_field(name="Requested by", value=f"<@{requester_id}>")
    embed.set_footer(text=f"job {job_id}")
    if cover_name:
        embed.set_thumbnail(url=f"attachment://{cover_name}")
    return embed


def lyrics_embed(title: str, lyrics: str) -> discord.Embed:
    """Full lyrics for an ephemeral answer (an embed holds 4096 characters, lyrics 3000)."""
    return discord.Embed(
        title=clip(f"Lyrics: {title}", 256), description=clip(lyrics, EMBED_DESCRIPTION_LIMIT)
    )
