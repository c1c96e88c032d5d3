"""What the bot says, as models every platform renders the same way: the status view of a
job, the song card, the failure notice, the job buttons, the lists, help and error
texts. Nothing here knows Discord or Telegram; the front-ends only render these."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from bot import messages
from bot.chat.markup import Bold, Code, Link, Mention, Muted, Span, Text, When, clip
from bot.engine.contract import Failure, Phase, Progress
from bot.engine.errors import EngineError
from bot.engine.facade import QuotaStatus
from bot.models import FailureKind, Job, JobState
from bot.requests import (
    ALL_OPTIONS,
    MAX_SEED,
    InvalidRequest,
    Mode,
    OptionSpec,
    is_instrumental_lyrics,
)

# Room for the cover image and the multipart envelope next to the MP3, on every platform.
UPLOAD_MARGIN = 512 * 1024
TITLE_LIMIT = 120
JOB_ID = re.compile(r"^[0-9a-f]{8}$")


# ---- buttons -----------------------------------------------------------------------------


class Action(StrEnum):
    """What a job button does; its value travels in the button's payload."""

    NEW = "new"  # the same request with a new random seed
    SAME = "same"  # the same request and seed: the same song again
    LYRICS = "lyrics"  # the full lyrics, shown only to whoever pressed
    CANCEL = "cancel"  # the requester, a community admin or a bot admin
    RETRY = "retry"  # a failed song, asked again with its seed


class Style(StrEnum):
    PRIMARY = "primary"
    SECONDARY = "secondary"
    DANGER = "danger"


_BUTTONS: dict[Action, tuple[str, str, Style]] = {
    Action.NEW: ("\N{GAME DIE}", "New take", Style.PRIMARY),
    Action.SAME: (
        "\N{CLOCKWISE RIGHTWARDS AND LEFTWARDS OPEN CIRCLE ARROWS}",
        "Same seed",
        Style.SECONDARY,
    ),
    Action.LYRICS: ("\N{MEMO}", "Lyrics", Style.SECONDARY),
    Action.CANCEL: ("\N{HEAVY MULTIPLICATION X}", "Cancel", Style.DANGER),
    Action.RETRY: (
        "\N{ANTICLOCKWISE DOWNWARDS AND UPWARDS OPEN CIRCLE ARROWS}",
        "Retry",
        Style.PRIMARY,
    ),
}
# Older Telegram messages carry these short names in their buttons.
LEGACY_ACTIONS = {"lyr": Action.LYRICS, "cxl": Action.CANCEL}


@dataclass(frozen=True)
class Button:
    action: Action
    job_id: str

    @property
    def emoji(self) -> str:
        return _BUTTONS[self.action][0]

    @property
    def label(self) -> str:
        return _BUTTONS[self.action][1]

    @property
    def style(self) -> Style:
        return _BUTTONS[self.action][2]

    @property
    def payload(self) -> str:
        """`<action>:<job id>`: all a button needs, so it works after a restart."""
        return f"{self.action}:{self.job_id}"


def parse_payload(payload: str) -> tuple[Action, str] | None:
    """A button payload from a platform (untrusted) -> (action, job id), or None."""
    kind, _, job_id = payload.partition(":")
    action = LEGACY_ACTIONS.get(kind)
    if action is None:
        try:
            action = Action(kind)
        except ValueError:
            return None
    return (action, job_id) if JOB_ID.match(job_id) else None


def song_buttons(job_id: str, has_lyrics: bool) -> tuple[Button, ...]:
    buttons = [Button(Action.NEW, job_id), Button(Action.SAME, job_id)]
    if has_lyrics:
        buttons.append(Button(Action.LYRICS, job_id))
    return tuple(buttons)


# ---- models ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """An answer to one person (Discord: ephemeral; Telegram: a reply or a popup)."""

    text: Text
    buttons: tuple[Button, ...] = ()

    @classmethod
    def say(cls, sentence: str) -> Reply:
        return cls(Text.of(sentence))


@dataclass(frozen=True)
class StatusView:
    """The one status message of a job. `rank` orders views: a board never shows a lower
    rank after a higher one; a `final` view ends the job's status."""

    job_id: str
    text: Text
    buttons: tuple[Button, ...] = ()
    rank: int = 0
    final: bool = False


FINAL_RANK = 100


@dataclass(frozen=True)
class SongCard:
    """A finished song as posted: file name, title, what it was made from, its numbers
    and buttons."""

    job_id: str
    title: str
    file_name: str
    label: str  # "Prompt" or "Tags"
    description: str
    duration: float
    seed: int
    provider: str
    requester_id: str
    buttons: tuple[Button, ...]
    notes: tuple[str, ...] = ()

    def numbers(self) -> tuple[Span, ...]:
        """Seed, length and provider: what it takes to make the same song again."""
        return (
            Bold("Seed"),
            " ",
            Code(str(self.seed)),
            f" \N{MIDDLE DOT} {messages.clock(self.duration)} \N{MIDDLE DOT} {self.provider}",
        )


# ---- status ------------------------------------------------------------------------------


def _header(job_id: str, title: str) -> tuple[Span, ...]:
    return (Bold(clip(title, TITLE_LIMIT)), " \N{MIDDLE DOT} job ", Code(job_id))


def status_view(
    job_id: str,
    title: str,
    progress: Progress,
    *,
    note: str | None = None,
    now: Callable[[], float] = time.time,
) -> StatusView:
    """What an active job's status message says: where it is, how far, how long."""
    line = _phase_line(progress, now())
    lines: list[tuple[Span, ...]] = [_header(job_id, title), (line,)]
    if note:
        lines.append((Muted(note),))
    buttons = () if progress.phase is Phase.UPLOADING else (Button(Action.CANCEL, job_id),)
    return StatusView(job_id, Text.from_lines(lines), buttons, rank=progress.phase.rank)


def _phase_line(progress: Progress, now: float) -> str:
    provider = progress.provider or "the music service"
    if progress.phase is Phase.WAITING:
        place = "next up" if (progress.position or 1) == 1 else f"position {progress.position}"
        return f"\N{HOURGLASS WITH FLOWING SAND} Queued \N{MIDDLE DOT} {place}"
    if progress.phase is Phase.STARTING:
        return f"\N{CONTROL KNOBS} Starting at {provider}"
    if progress.phase is Phase.PROVIDER_QUEUE:
        line = f"\N{HOURGLASS WITH FLOWING SAND} Waiting at {provider}"
        if progress.position:
            line += f", position {progress.position}"
        if progress.eta_seconds is not None:
            line += f" \N{MIDDLE DOT} {messages.about(progress.eta_seconds)}"
        return line
    if progress.phase is Phase.GENERATING:
        parts = ["\N{MULTIPLE MUSICAL NOTES} Generating"]
        if progress.fraction is not None:
            parts[0] += f" {round(max(0.0, min(1.0, progress.fraction)) * 100)} %"
        if progress.since is not None:
            parts.append(f"{messages.clock(now - progress.since)} elapsed")
        if progress.eta_seconds is not None:
            parts.append(f"{messages.about(progress.eta_seconds)} left")
        return " \N{MIDDLE DOT} ".join(parts)
    return "\N{OUTBOX TRAY} Uploading"


def provisional_view(title: str) -> StatusView:
    """The status message put up while a request is being admitted (no job id yet)."""
    text = Text.from_lines(
        [(Bold(clip(title, TITLE_LIMIT)),), ("\N{HOURGLASS WITH FLOWING SAND} Queued",)]
    )
    return StatusView("", text)


def failure_view(job: Job, failure: Failure) -> StatusView:
    """The lasting message of a job that ended without a song: short, public, with a
    Retry button (a cancel needs none)."""
    sentence = messages.failure_text(failure.kind, failure.quota_refunded, failure.timeout_seconds)
    cancelled = failure.kind is FailureKind.CANCELLED
    mark = "\N{NO ENTRY SIGN}" if cancelled else "\N{CROSS MARK}"
    buttons = () if cancelled else (Button(Action.RETRY, job.id),)
    text = Text.from_lines([_header(job.id, job.title), (f"{mark} {sentence}",)])
    return StatusView(job.id, text, buttons, rank=FINAL_RANK, final=True)


def posted_view(job: Job, link: str | None) -> StatusView:
    """A status message that could not be removed once the song was posted: a link."""
    where: tuple[Span, ...] = (
        ("\N{WHITE HEAVY CHECK MARK} Posted: ", Link("the song", link))
        if link
        else ("\N{WHITE HEAVY CHECK MARK} Posted.",)
    )
    text = Text.from_lines([_header(job.id, job.title), where])
    return StatusView(job.id, text, (), rank=FINAL_RANK, final=True)


# ---- the song ----------------------------------------------------------------------------


def has_lyrics(job: Job) -> bool:
    """Whether the song has words to show (not instrumental)."""
    return not job.request.instrumental and not is_instrumental_lyrics(job.lyrics)


def slug(text: str) -> str:
    """A file-name-safe form of a title."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "song"


def file_name(title: str, job_id: str, fmt: str = "mp3") -> str:
    return f"{slug(title)}-{job_id}.{fmt}"


def song_card(job: Job, *, title: str, duration: float, seed: int, provider: str) -> SongCard:
    prompt_mode = job.request.mode is Mode.PROMPT
    return SongCard(
        job_id=job.id,
        title=title,
        file_name=file_name(title, job.id),
        label="Prompt" if prompt_mode else "Tags",
        description=(job.request.prompt if prompt_mode else job.request.tags) or "",
        duration=duration,
        seed=seed,
        provider=provider,
        requester_id=job.requester.user_id,
        buttons=song_buttons(job.id, has_lyrics(job)),
    )


def lyrics_reply(job: Job) -> Reply:
    if not has_lyrics(job):
        return Reply.say("This song has no lyrics (it is instrumental).")
    lines: list[tuple[Span, ...]] = [(Bold(f"Lyrics: {clip(job.title, TITLE_LIMIT)}"),)]
    lines += [(line,) for line in job.lyrics.split("\n")]
    return Reply(Text.from_lines(lines))


# ---- answers -----------------------------------------------------------------------------

GENERIC_ERROR = "Something went wrong; the operator has been told."
NOT_YOURS = messages.NOT_YOURS
CANNOT_ATTACH = (
    "I can't post files in this channel. Ask an admin to let me attach files here, "
    "or use another channel."
)
LIMITS_COMMUNITY_ONLY = "/limits works in a server or group: it shows and sets its quotas."


def admins_only(admins: str) -> str:
    return f"Only {admins} can change this community's limits."


NOT_KNOWN = "I no longer know that song."
NOT_HERE_COMMAND = "You can't use this command here."
NOT_HERE = "That button belongs to a song made elsewhere; ask for your own with /song."
NOTHING_TO_CANCEL = "You have no songs in progress to cancel."


def error_reply(exc: BaseException) -> Reply:
    """What a user is told about a refusal: their mistake in one line, or ours briefly."""
    if isinstance(exc, InvalidRequest):
        return Reply.say(f"{exc} See /help for every option.")
    if isinstance(exc, EngineError):
        return Reply.say(str(exc))
    return Reply.say(GENERIC_ERROR)


def no_such_job(job_id: str) -> str:
    return messages.no_such_job(job_id)


def only_in_channels(channels: list[str]) -> Reply:
    return Reply(Text.of("I make songs in ", *_channel_list(channels), " here."))


def limit_changed(key: str, value: float | None) -> tuple[Span, ...]:
    if value is None:
        return (Code(key), " back to the default")
    return (Code(key), f" = {messages.num(value)}")


def channels_changed(channels: list[str]) -> tuple[Span, ...]:
    return ("channels: ", *_channel_list(channels))


def _channel_list(channels: list[str]) -> list[Span]:
    if not channels:
        return ["all"]
    spans: list[Span] = []
    for i, channel in enumerate(channels):
        spans += [", "] if i else []
        spans.append(Mention("channel", str(channel)))
    return spans


def cancelled_reply(job: Job) -> Reply:
    """The answer to whoever cancelled."""
    what = (Code(job.id), f" ({clip(job.title, 80)}).")
    if job.state == JobState.CANCELLED:
        refund = " Your quota was refunded." if job.refunded else ""
        return Reply(Text.of("Cancelled ", *what, refund))
    return Reply(Text.of("Cancelling ", *what, " It stops as soon as the music service answers."))


_STATE_WORDS = {
    JobState.QUEUED: "waiting",
    JobState.SUBMITTING: "starting",
    JobState.RUNNING: "generating",
    JobState.READY: "being posted",
    JobState.DELIVERED: "posted",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "cancelled",
}


def state_word(state: JobState) -> str:
    return _STATE_WORDS[state]


def queue_reply(items: Iterable[tuple[Job, int | None]]) -> Reply:
    lines: list[tuple[Span, ...]] = []
    for job, position in items:
        where = state_word(job.state)
        if job.state == JobState.QUEUED and position:
            where += f", position {position}"
        lines.append((Code(job.id), f" {clip(job.title, 80)} \N{EM DASH} {where}"))
    if not lines:
        return Reply.say("You have no songs in progress.")
    return Reply(Text.from_lines([(Bold("Your songs in progress"),), *lines]))


def history_reply(jobs: Iterable[Job]) -> Reply:
    lines: list[tuple[Span, ...]] = []
    for job in jobs:
        url = job.reply_target.get("result_url")
        title = clip(job.title, 60)
        shown: Span = Link(title, url) if url else title
        seed = job.result.seed if job.result else job.seed
        lines.append(
            (
                Code(job.id),
                " ",
                shown,
                f" \N{MIDDLE DOT} {state_word(job.state)} \N{MIDDLE DOT} seed ",
                Code(str(seed)),
                " \N{MIDDLE DOT} ",
                When(job.created_at),
            )
        )
    if not lines:
        return Reply.say("You have not made any songs yet. Try /song.")
    return Reply(Text.from_lines([(Bold("Your recent songs"),), *lines]))


def quota_reply(status: QuotaStatus) -> Reply:
    lines: list[tuple[Span, ...]] = [(Bold("Your quota today"),)]
    for line in status.lines:
        used = messages.num(line.used)
        if line.limit is None:
            lines.append(
                (Bold(line.label), f": {messages.plural(line.used, line.unit)} used, no limit")
            )
        else:
            left = messages.num(line.remaining or 0)
            lines.append(
                (
                    Bold(line.label),
                    f": {used} of {messages.plural(line.limit, line.unit)} used, {left} left",
                )
            )
    at = status.resets_at.timestamp()
    lines.append(("Resets ", When(at), " (", When(at, "full"), ")."))
    return Reply(Text.from_lines(lines))


def limits_reply(
    changed: list[tuple[Span, ...]],
    overrides: dict[str, float],
    channels: list[str] | None,
) -> Reply:
    """This community's limits; `channels` None = the platform has no channel switch."""
    head: list[Span] = ["This community's settings:"]
    if changed:
        head = ["Changed "]
        for i, change in enumerate(changed):
            head += ["; "] if i else []
            head += change
    lines: list[tuple[Span, ...]] = [tuple(head)]
    if overrides:
        lines += [
            (Code(key), f" = {messages.num(value)}") for key, value in sorted(overrides.items())
        ]
    else:
        lines.append(("No limits of its own: the bot's defaults apply.",))
    if channels is not None:
        lines.append(("Channels: ", *_channel_list(channels)))
    return Reply(Text.from_lines(lines))


# ---- help --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HelpStyle:
    """How a platform's users write a song request (the words stay shared)."""

    song: str  # how /song is typed
    compose: str
    option: Callable[[OptionSpec], str]  # how one option is written
    extras: tuple[str, ...] = field(default=())


def option_range(spec: OptionSpec) -> str:
    if spec.kind is bool:
        return "yes or no"
    if spec.choices:
        return " | ".join(spec.choices)
    high = MAX_SEED if spec.name == "seed" else spec.maximum
    return f"{messages.num(spec.minimum or 0)} to {messages.num(high or 0)}"


def help_reply(style: HelpStyle) -> Reply:
    """Every command once, every option once."""
    lines: list[tuple[Span, ...]] = [
        (Bold("Make a song"),),
        (Code(style.song), " \N{EM DASH} describe it in words, e.g. lofi piano about rain"),
        (
            Code(style.compose),
            " \N{EM DASH} style tags plus your own lyrics ([verse], [chorus]; "
            "empty = instrumental)",
        ),
        ("Under each song: New take (new seed), Same seed, Lyrics; Cancel while it is made.",),
        (Bold("Your songs"),),
        (
            "/queue in progress \N{MIDDLE DOT} /cancel [job] stop one (your latest by default) "
            "\N{MIDDLE DOT} /quota what is left today \N{MIDDLE DOT} /history your recent songs",
        ),
        (Bold("Community admins"),),
        ("/limits shows and lowers this community's daily seconds",),
        *((extra,) for extra in style.extras),
        (Bold("Options"),),
    ]
    for spec in ALL_OPTIONS.values():
        lines.append((Code(style.option(spec)), f" {spec.help} ({option_range(spec)})"))
    return Reply(Text.from_lines(lines))


def welcome_reply() -> Reply:
    return Reply(
        Text.from_lines(
            [
                ("\N{MUSICAL NOTE} I make songs with the ACE-Step music model.",),
                ("Try ", Code("/song lofi piano about rain"), "; see /help for everything else."),
            ]
        )
    )
