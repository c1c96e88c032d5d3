"""The engine's refusals and the wording helpers every front-end shares: one place for the
words users read about quotas, jobs and failures (the chat layer, bot/chat/, builds its
replies from these)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from bot.models import FailureKind


def plural(count: float, noun: str, plural_form: str | None = None) -> str:
    """'1 song', '2 songs', '1.5 s' (units such as "s" never take a plural)."""
    number = num(count)
    if noun == "s":
        return f"{number} s"
    word = noun if count == 1 else (plural_form or noun + "s")
    return f"{number} {word}"


def num(value: float) -> str:
    """A number as people write it: 3, 2.5, 0.25."""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.2f}".rstrip("0").rstrip(".")


def until(moment: datetime, now: datetime | None = None) -> str:
    """'in 5 h 12 min' style distance to a moment."""
    now = now or datetime.now(UTC)
    minutes = max(0, int((moment - now).total_seconds() // 60))
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"in {hours} h {minutes} min"
    return f"in {minutes} min" if minutes else "in less than a minute"


def reset_phrase(resets_at: datetime | None) -> str:
    if resets_at is None:
        return ""
    return f" It resets at {resets_at:%H:%M} UTC ({until(resets_at)})."


def seconds(value: float) -> str:
    value = max(0.0, value)
    return f"{int(value)} s" if float(value).is_integer() else f"{value:.1f} s"


def clock(total: float) -> str:
    """0:42, 3:05, 1:02:03."""
    total = max(0, round(total))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def about(eta: float) -> str:
    """A rough duration for an estimate: 'about 40 s', 'about 3 min'."""
    if eta < 5:
        return "a few seconds"
    if eta < 90:
        return f"about {int(round(eta / 5.0) * 5)} s"
    return f"about {round(eta / 60)} min"


def quota_refusal(
    limit: str, limit_value: float, remaining: float, needed: float, resets_at: datetime | None
) -> str:
    """Why a request was refused, what remains and when it resets."""
    reset = reset_phrase(resets_at)
    if limit == "user_jobs_per_day":
        return f"You have reached today's limit of {plural(limit_value, 'song')}.{reset}"
    if limit == "user_seconds_per_day":
        return (
            f"This {seconds(needed)} song needs more audio than you have left today: "
            f"{seconds(remaining)} of your {seconds(limit_value)}. Ask for a shorter "
            f"song, or wait.{reset}"
        )
    if limit == "user_concurrent_jobs":
        in_progress = limit_value - remaining
        return (
            f"You already have {plural(in_progress, 'song')} in progress "
            f"(at most {num(limit_value)} at once). Wait for one to finish or cancel one."
        )
    if limit == "community_seconds_per_day":
        return (
            f"This community has {seconds(remaining)} of its {seconds(limit_value)} "
            f"daily audio left, not enough for a {seconds(needed)} song.{reset}"
        )
    if limit == "spend_cap_usd_per_day":
        return (
            "The bot has reached today's budget set by its operator "
            f"(${remaining:.2f} of ${limit_value:.2f} left).{reset}"
        )
    return f"A usage limit ({limit}) has been reached.{reset}"


QUOTA_NAMES = {
    "user_jobs_per_day": "Songs today",
    "user_seconds_per_day": "Seconds of audio today",
    "user_concurrent_jobs": "Songs at once",
    "community_seconds_per_day": "Community seconds today",
    "spend_cap_usd_per_day": "Bot budget today (USD)",
}

# Neutral on purpose: it neither repeats the phrase nor says which list refused it.
REFUSED_BY_BAN_LIST = "I can't make a song from this request here. Please try other words."
RESTARTING = "The bot is restarting and not taking new songs right now; try again in a minute."
NOT_YOURS = "You can only cancel your own songs."

# What a user reads when a song ends without one, by kind (the provider's own words stay
# in the log and `acestep-bot jobs show`).
FAILURE_TEXTS = {
    FailureKind.CANCELLED: "Cancelled.",
    FailureKind.TIMED_OUT: "This song took too long to make (over {limit}) and was stopped.",
    FailureKind.REJECTED: "The music service refused this request; try other words or tags.",
    FailureKind.PROVIDER_FAILED: "The music service could not make this song.",
    FailureKind.UNAVAILABLE: "The music services are unavailable right now; try again later.",
    FailureKind.NOT_POSTED: "The song was made but could not be posted here.",
    FailureKind.INTERNAL: "Something went wrong on the bot's side; the operator has been told.",
    FailureKind.BUDGET: "The bot has reached today's budget set by its operator; try tomorrow.",
}


def failure_text(kind: FailureKind, quota_refunded: bool, timeout_seconds: int | None) -> str:
    """One or two sentences: what happened, and whether the quota came back."""
    text = FAILURE_TEXTS[kind].format(limit=span(timeout_seconds or 0))
    refund = (
        "Your quota was refunded."
        if quota_refunded
        else "It still counts against your quota, because the music service made it."
    )
    return f"{text} {refund}"


def span(total_seconds: int) -> str:
    """'15 min' or '45 s'."""
    return f"{total_seconds // 60} min" if total_seconds >= 120 else f"{total_seconds} s"


def no_such_job(job_id: str) -> str:
    return f"No song with id {job_id!r} was found."


def already_finished(job_id: str, state: str) -> str:
    word = {
        "delivered": "posted",
        "failed": "over (it failed)",
        "cancelled": "cancelled",
        "ready": "made and being posted",
    }.get(state, state)
    return f"Song {job_id} is already {word}."


def not_posted_yet(job_id: str) -> str:
    return f"Song {job_id} is not posted yet; cancel it instead."


def finished_before_cancel(job_id: str) -> str:
    return f"Song {job_id} finished before it could be cancelled."


MODE_KINDS = {"prompt": "a described song (/song)", "song": "a composed song (/compose)"}


def no_provider_for_mode(mode: str) -> str:
    return (
        f"This bot's music services cannot make {MODE_KINDS.get(mode, mode)}; "
        "try the other command."
    )


# Source audio for extend/remix/repaint (bot/sources.py): one line each, nothing stored.
SOURCE_EMPTY = "source: the file is empty (0 bytes); send an audio file (MP3, WAV, FLAC or OGG)."
SOURCE_NOT_AUDIO = "source: the file is not audio the bot can read; send MP3, WAV, FLAC or OGG."
SOURCE_SILENT = "source: the audio is silent; send a song with sound in it."
SOURCE_UNREACHABLE = "source: the file could not be fetched from the chat; send it again."
SOURCE_NO_SUCH_SONG = (
    "source: that song is not one this bot posted (or it was deleted); pick a posted song "
    "or send your own audio."
)
SOURCE_AUDIO_GONE = (
    "source: that song's audio is no longer kept here; send the file itself as audio."
)


def _megabytes(size: int) -> str:
    return f"{num(round(size / (1024 * 1024), 1))} MB"


def source_too_big(size: int, cap: int) -> str:
    return f"source: the file is {_megabytes(size)}; files up to {_megabytes(cap)} are allowed."


def source_too_long(seconds: float | None, longest: int) -> str:
    length = f"{num(round(seconds))} seconds long" if seconds is not None else "too long"
    return f"source: the audio is {length}; songs up to {longest} seconds can be worked on."


def source_missing(path: str) -> str:
    return f"source: {path} is not a file that can be read; give an audio file's path."


LINEAGE_VERBS = {"extend": "extended", "remix": "remixed", "repaint": "repainted"}


def lineage(request: Any) -> str:
    """Where an edit came from: 'extended from “Rain on Glass” (job 1a2b3c4d)', 'remixed
    from your file “demo.mp3”'; "" for a new song. `request` is a GenerationRequest."""
    source = request.source
    verb = LINEAGE_VERBS.get(request.task.value)
    if verb is None or source is None:
        return ""
    name = " ".join(source.name.split())[:80]
    quoted = f"\N{LEFT DOUBLE QUOTATION MARK}{name}\N{RIGHT DOUBLE QUOTATION MARK}"
    if source.job_id:
        return f"{verb} from {quoted + ' ' if name else ''}(job {source.job_id})"
    if name:
        return f"{verb} from your file {quoted}"
    return f"{verb} from your file"


def take_note(take: int, takes: int) -> str:
    """'take 2 of 3' for one of several takes, else ""."""
    return f"take {take} of {takes}" if takes > 1 else ""


TASK_KINDS = {
    "extend": "extend songs",
    "remix": "remix songs",
    "repaint": "repaint part of a song",
}


def no_provider_for_task(task: str) -> str:
    return (
        f"task: {task} is not available here; none of this bot's music services can "
        f"{TASK_KINDS.get(task, task)}. Ask for a new song instead."
    )


def no_provider_for_duration(duration: int, shortest: int, longest: int) -> str:
    return (
        f"duration: {duration} is not available here; this bot's music services make songs "
        f"from {shortest} to {longest} seconds."
    )


def no_provider_for_option(name: str, value: object, limits: list[tuple[str, str]]) -> str:
    """No provider here takes this option's value: which one takes what."""
    which = "; ".join(f"{provider} takes {allowed}" for provider, allowed in limits)
    return (
        f"{name}: {value} is not available here; {which}. "
        "Choose a value in one of those ranges, or leave it out."
    )


# Shown next to the seed of a song from a provider that ignored the seed it was sent.
SEED_NOT_HONOURED = "this server does not honour seeds, so it will not make this song again"


def seed_note(honoured: bool) -> str:
    return "" if honoured else SEED_NOT_HONOURED


def ignored_options(provider: str, names: list[str]) -> str:
    return (
        f"Note: {provider} ignores {', '.join(names)}; "
        "the song is made with its defaults for those."
    )
