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
    STOP = "stop"  # cancel, confirmed after being told the quota will not come back
    RETRY = "retry"  # a failed song, asked again with its seed
    TAGS = "tags"  # a prompt-mode song's tags (and lyrics) as a new song-mode request
    DELETE = "delete"  # remove a posted song: its requester, a community or bot admin
    SET = "set"  # one of the presser's own /settings defaults: `set:<name>=<value>`
    # Work on a posted song (issue 14): a form (Discord) or the command to copy (Telegram)
    EXTEND = "extend"
    REMIX = "remix"
    REPAINT = "repaint"
    EDIT = "edit"  # the request itself, prefilled, seed included


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
    Action.STOP: ("\N{HEAVY MULTIPLICATION X}", "Cancel anyway", Style.DANGER),
    Action.RETRY: (
        "\N{ANTICLOCKWISE DOWNWARDS AND UPWARDS OPEN CIRCLE ARROWS}",
        "Retry",
        Style.PRIMARY,
    ),
    Action.TAGS: ("\N{LABEL}", "Use these tags", Style.SECONDARY),
    Action.DELETE: ("\N{WASTEBASKET}", "Delete", Style.DANGER),
    Action.SET: ("", "", Style.SECONDARY),
    Action.EXTEND: ("\N{BLACK RIGHT-POINTING DOUBLE TRIANGLE}", "Extend", Style.SECONDARY),
    Action.REMIX: ("\N{CYCLONE}", "Remix", Style.SECONDARY),
    Action.REPAINT: ("\N{ARTIST PALETTE}", "Repaint", Style.SECONDARY),
    Action.EDIT: ("\N{PENCIL}", "Edit", Style.SECONDARY),
}
EDIT_ACTIONS = (Action.EXTEND, Action.REMIX, Action.REPAINT, Action.EDIT)
# What a SET button carries instead of a job id: one default and the value it picks.
CHOICE = re.compile(r"^(?P<name>[a-z_]{1,20})=(?P<value>[a-z0-9_-]{1,24})$")
# Older Telegram messages carry these short names in their buttons.
LEGACY_ACTIONS = {"lyr": Action.LYRICS, "cxl": Action.CANCEL}


@dataclass(frozen=True)
class Button:
    """A button: what it does and the job it does it to (a SET button: the choice,
    `name=value`, with its own `text`)."""

    action: Action
    job_id: str
    text: str = ""

    @classmethod
    def choice(cls, name: str, value: str, text: str) -> Button:
        return cls(Action.SET, f"{name}={value}", text)

    @property
    def emoji(self) -> str:
        return _BUTTONS[self.action][0]

    @property
    def label(self) -> str:
        return self.text or _BUTTONS[self.action][1]

    @property
    def style(self) -> Style:
        return _BUTTONS[self.action][2]

    @property
    def payload(self) -> str:
        """`<action>:<job id>`: all a button needs, so it works after a restart."""
        return f"{self.action}:{self.job_id}"


def parse_payload(payload: str) -> tuple[Action, str] | None:
    """A button payload from a platform (untrusted) -> (action, job id or, for SET, the
    choice), or None."""
    kind, _, job_id = payload.partition(":")
    action = LEGACY_ACTIONS.get(kind)
    if action is None:
        try:
            action = Action(kind)
        except ValueError:
            return None
    shape = CHOICE if action is Action.SET else JOB_ID
    return (action, job_id) if shape.match(job_id) else None


def song_buttons(job_id: str, has_lyrics: bool, offers_tags: bool = False) -> tuple[Button, ...]:
    buttons = [Button(Action.NEW, job_id), Button(Action.SAME, job_id)]
    if has_lyrics:
        buttons.append(Button(Action.LYRICS, job_id))
    if offers_tags:
        buttons.append(Button(Action.TAGS, job_id))
    buttons.extend(Button(action, job_id) for action in EDIT_ACTIONS)
    buttons.append(Button(Action.DELETE, job_id))
    return tuple(buttons)


@dataclass(frozen=True)
class FormField:
    """One field of an edit form: its request name, label, prefilled value."""

    name: str
    label: str
    value: str
    paragraph: bool = False  # lyrics: several lines
    required: bool = False


@dataclass(frozen=True)
class EditForm:
    """The few fields an edit of a posted song needs, prefilled from its job; where the
    platform has no forms, `command` is the same request as a command to copy."""

    task: str  # extend | remix | repaint | edit
    job_id: str
    title: str
    fields: tuple[FormField, ...]
    command: str


FORM_TITLES = {
    "extend": "Extend this song",
    "remix": "Remix this song",
    "repaint": "Repaint part of this song",
    "edit": "Edit and make again",
}


def _num_text(value: float) -> str:
    return messages.num(round(value, 1))


def edit_form(job: Job, task: str) -> EditForm:
    """The form of an edit button, prefilled from the song it was pressed on."""
    req = job.request
    made = job.result
    tags = " ".join(((made.tags if made else None) or req.tags or "").split())[:MAX_TAGS_SHOWN]
    lyrics = job.lyrics if has_lyrics(job) else ""
    seconds = float(made.duration if made and made.duration else req.duration)
    fields: list[FormField]
    if task == "extend":
        fields = [
            FormField("after", "Seconds of new music after it", "30"),
            FormField("before", "Seconds of new music before it", "0"),
            FormField("tags", "Style tags of the new music", tags),
        ]
        command = f"/extend after=30 {tags}"
    elif task == "remix":
        fields = [
            FormField("tags", "Style tags of the remix", tags, required=True),
            FormField("strength", "Strength: 0 keeps the song, 1 ignores it", "0.5"),
            FormField("lyrics", "Lyrics", lyrics, paragraph=True),
        ]
        command = f"/remix {tags} strength=0.5"
    elif task == "repaint":
        end = min(seconds, 10.0)
        fields = [
            FormField("start", "From second", "0"),
            FormField("end", "To second", _num_text(end)),
            FormField("tags", "Style tags of the new part", tags),
            FormField("lyrics", "Lyrics", lyrics, paragraph=True),
        ]
        command = f"/repaint start=0 end={_num_text(end)} {tags}"
    else:
        seed = made.seed if made else job.seed
        words = req.prompt if req.mode is Mode.PROMPT else req.tags
        main = "prompt" if req.mode is Mode.PROMPT else "tags"
        fields = [
            FormField(main, main.capitalize(), words, required=True),
            FormField("duration", "Seconds", str(req.duration)),
            FormField("seed", "Seed (-1: a new one)", str(seed)),
        ]
        if req.mode is not Mode.PROMPT:
            fields.append(FormField("lyrics", "Lyrics", req.lyrics, paragraph=True))
        verb = "/song" if req.mode is Mode.PROMPT else "/compose"
        flags = " instrumental" if req.instrumental else ""
        command = f"{verb} {words} duration={req.duration} seed={seed}{flags}"
        if req.mode is not Mode.PROMPT and req.lyrics:
            command += "\n" + req.lyrics
    if task in ("remix", "repaint") and lyrics:
        command += "\n" + lyrics
    return EditForm(task, job.id, FORM_TITLES[task], tuple(fields), command)


def form_as_command(form: EditForm, how: str) -> Reply:
    """Where a platform has no forms: the exact command to copy, edit and send."""
    return Reply(
        Text.from_lines(
            [(Bold(form.title),), (how,), *((Code(line),) for line in form.command.split("\n"))]
        )
    )


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
TAGS_LABEL = "Tags"
MAX_TAGS_SHOWN = 300


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
    seed_note: str = ""  # e.g. the provider ignored the seed, so it will not repeat
    tags: str = ""  # the tags the provider wrote for a described song ("" = none)

    def tags_line(self) -> tuple[Span, ...]:
        return (Bold(TAGS_LABEL), " ", clip(self.tags, MAX_TAGS_SHOWN))

    def numbers(self) -> tuple[Span, ...]:
        """Seed, length and provider: what it takes to make the same song again."""
        note = f" ({self.seed_note})" if self.seed_note else ""
        return (
            Bold("Seed"),
            " ",
            Code(str(self.seed)),
            f"{note} \N{MIDDLE DOT} {messages.clock(self.duration)} \N{MIDDLE DOT} {self.provider}",
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


def written_tags(job: Job) -> str:
    """The tags the provider wrote for a described (prompt mode) song, or ""."""
    if job.request.mode is not Mode.PROMPT or job.result is None:
        return ""
    return " ".join((job.result.tags or "").split())


def song_card(
    job: Job,
    *,
    title: str,
    duration: float,
    seed: int,
    provider: str,
    seed_honoured: bool = True,
) -> SongCard:
    prompt_mode = job.request.mode is Mode.PROMPT
    tags = written_tags(job)
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
        buttons=song_buttons(job.id, has_lyrics(job), offers_tags=bool(tags)),
        tags=tags,
        seed_note=messages.seed_note(seed_honoured),
        notes=tuple(
            note
            for note in (messages.lineage(job.request), messages.take_note(job.take, job.takes))
            if note
        ),
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


EDIT_EXAMPLES = {
    "extend": "/extend after=30 (new music after the song; before=10 adds an intro)",
    "remix": "/remix jazz, upright bass strength=0.6 (the song in a new style)",
    "repaint": "/repaint start=10 end=20 (those seconds made again)",
}


def edit_usage(task: str, how: str) -> str:
    """How to ask for an edit on a platform: `how` says where the source comes from."""
    return f"{how}, e.g. {EDIT_EXAMPLES[task]}. Tags and lyrics (next lines) are optional."


def edit_usage_refusal() -> str:
    return (
        "source: that message has no audio; reply to a song I posted, or to an audio, "
        "voice or file message."
    )


def admins_only(admins: str, what: str = "this community's limits") -> str:
    return f"Only {admins} can change {what}."


NOT_KNOWN = "I no longer know that song."
NOT_HERE_COMMAND = "You can't use this command here."
MENU_NO_AUDIO = "That message has no audio file to remix; use it on a song or an audio file."
SOURCE_NOT_HERE = (
    "That song was made in another chat; work on a song posted here or send your own audio."
)
NOT_HERE = "That button belongs to a song made elsewhere; ask for your own with /song."
ON_ITS_WAY = "On its way\N{HORIZONTAL ELLIPSIS}"
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


def only_in_channels(channels: list[str], names: dict[str, str] | None = None) -> Reply:
    return Reply(Text.of("I make songs in ", *_channel_list(channels, names), " here."))


def limit_changed(key: str, value: float | None) -> tuple[Span, ...]:
    if value is None:
        return (Code(key), " back to the default")
    return (Code(key), f" = {messages.num(value)}")


def channels_changed(
    channels: list[str], word: str = "channels", names: dict[str, str] | None = None
) -> tuple[Span, ...]:
    return (f"{word}: ", *_channel_list(channels, names))


def _channel_list(channels: list[str], names: dict[str, str] | None = None) -> list[Span]:
    if not channels:
        return ["all"]
    spans: list[Span] = []
    for i, channel in enumerate(channels):
        spans += [", "] if i else []
        spans.append(Mention("channel", str(channel), (names or {}).get(str(channel), "")))
    return spans


ALREADY_BEING_MADE = "It is already being made: cancelling will not give your quota back."


def confirm_cancel_reply(job: Job) -> Reply:
    """Asked before a song the music service is already making is cancelled."""
    text = Text.of(Code(job.id), f" ({clip(job.title, 80)}). {ALREADY_BEING_MADE}")
    return Reply(text, (Button(Action.STOP, job.id),))


def cancelled_reply(job: Job) -> Reply:
    """The answer to whoever cancelled."""
    what = (Code(job.id), f" ({clip(job.title, 80)}).")
    if job.state == JobState.CANCELLED:
        refund = (
            " Your quota was refunded."
            if job.refunded
            else " It still counts against your quota, because the music service made it."
        )
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
        url = None if job.deleted else job.reply_target.get("result_url")
        title = clip(job.title, 60)
        shown: Span = Link(title, url) if url else title
        seed = job.result.seed if job.result else job.seed
        state = "deleted" if job.deleted else state_word(job.state)
        lines.append(
            (
                Code(job.id),
                " ",
                shown,
                f" \N{MIDDLE DOT} {state} \N{MIDDLE DOT} seed ",
                Code(str(seed)),
                " \N{MIDDLE DOT} ",
                When(job.created_at),
                *(
                    (f" \N{MIDDLE DOT} {source}",)
                    if (source := messages.lineage(job.request))
                    else ()
                ),
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
    *,
    channel_word: str = "Channels",
    names: dict[str, str] | None = None,
    songs_on: bool = True,
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
    if not songs_on:
        lines.append((SONGS_OFF,))
    if channels is not None:
        lines.append((f"{channel_word}: ", *_channel_list(channels, names)))
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
    if spec.kind is str:
        if spec.usage:
            return spec.usage
        return f"up to {messages.num(spec.maximum)} characters" if spec.maximum else "text"
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
        (
            "Under each song: New take (new seed), Same seed, Lyrics, Use these tags (for a "
            "described song), Delete; Cancel while it is made.",
        ),
        (Bold("Your songs"),),
        (
            "/queue in progress \N{MIDDLE DOT} /cancel [job] stop one (your latest by default) "
            "\N{MIDDLE DOT} /quota what is left today \N{MIDDLE DOT} /history your recent songs "
            "\N{MIDDLE DOT} /settings your defaults (duration, instrumental, style, provider)",
        ),
        (Bold("Community admins"),),
        ("/limits shows and lowers this community's daily seconds and picks where songs are made",),
        (
            "/banlist keeps words out of this community's songs \N{MIDDLE DOT} /settings for the "
            "community's defaults \N{MIDDLE DOT} Delete under any song of the community",
        ),
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


# ---- community controls: settings, ban list, deleting songs ------------------------------

SONG_DELETED = "That song was deleted."
ONLY_POSTED = "Only a posted song can be deleted; cancel one in progress instead."
NOT_YOURS_TO_DELETE = "You can only delete your own songs."
SETTINGS_COMMUNITY_ONLY = "Community defaults are set in a server or group."
BANLIST_COMMUNITY_ONLY = "/banlist works in a server or group: it keeps words out of its songs."
SONGS_OFF = "Songs are switched off here by this community's admins."
TOPICS_ONLY_IN_FORUMS = "topics: works in a forum group; write it in the topic to switch."
NOTHING_CHANGED = "Nothing to change."


def song_deleted(job: Job, message_removed: bool) -> Reply:
    what = (Code(job.id), f" ({clip(job.title, 80)})")
    if message_removed:
        return Reply(Text.of("Deleted ", *what, "."))
    return Reply(
        Text.of(
            "Deleted ",
            *what,
            ": its audio is gone, but the message could not be removed "
            "(Telegram allows that for 48 hours); an admin can delete it.",
        )
    )


_DEFAULT_WORDS = {
    "duration": "Duration",
    "instrumental": "Instrumental",
    "vocal_language": "Vocal language",
    "style": "Style suffix",
    "provider": "Provider first",
}


def _shown(name: str, value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if name == "duration":
        return f"{value} s"
    return str(value)


QUICK_DURATIONS = (30, 60, 120)


def settings_buttons(providers: list[str]) -> tuple[Button, ...]:
    """One press sets one of the presser's own defaults."""
    buttons = [Button.choice("duration", str(s), f"{s} s") for s in QUICK_DURATIONS]
    buttons += [
        Button.choice("instrumental", "no", "With vocals"),
        Button.choice("instrumental", "yes", "Instrumental"),
    ]
    if len(providers) > 1:
        buttons += [Button.choice("provider", p, p) for p in providers]
        buttons.append(Button.choice("provider", "any", "Any provider"))
    return tuple(buttons)


def settings_reply(
    scope_words: str,
    changed: list[str],
    rows: list[tuple[str, object, str | None]],
    extras: tuple[str, ...] = (),
    buttons: tuple[Button, ...] = (),
) -> Reply:
    """Defaults for new songs: (name, value or None, "yours" | "community" | None)."""
    head: list[Span] = [Bold(f"Defaults for new songs ({scope_words})")]
    if changed:
        head += [" \N{EM DASH} changed ", ", ".join(changed)]
    lines: list[tuple[Span, ...]] = [tuple(head)]
    for name, value, source in rows:
        word = _DEFAULT_WORDS.get(name, name)
        if value is None:
            lines.append((f"{word}: not set",))
        else:
            where = f" ({source})" if source else ""
            lines.append((f"{word}: ", Code(_shown(name, value)), where))
    lines.append(
        ("An option in the command wins, then your default, then the community's, then the bot's.",)
    )
    lines += [(extra,) for extra in extras]
    return Reply(Text.from_lines(lines), buttons)


def banlist_reply(phrases: list[str], added: list[str], removed: list[str]) -> Reply:
    lines: list[tuple[Span, ...]] = []
    if added:
        lines.append(("Banned: ", ", ".join(added)))
    if removed:
        lines.append(("No longer banned: ", ", ".join(removed)))
    if phrases:
        lines.append((Bold(f"Banned in this community ({len(phrases)})"),))
        lines.append((", ".join(phrases),))
    else:
        lines.append(("Nothing is banned in this community.",))
    return Reply(Text.from_lines(lines))


def songs_switched(on: bool) -> tuple[Span, ...]:
    return ("songs ", Code("on" if on else "off"))
