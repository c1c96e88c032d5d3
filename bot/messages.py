"""User-facing sentences shared by every front-end: one place for the wording."""

from __future__ import annotations

from datetime import UTC, datetime


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


def quota_refusal(
    limit: str, limit_value: float, remaining: float, needed: float, resets_at: datetime | None
) -> str:
    """Why a request was refused, what remains and when it resets."""
    reset = reset_phrase(resets_at)
    if limit == "user_jobs_per_day":
        return (
            f"You have used your {int(limit_value)} songs for today ({int(remaining)} left).{reset}"
        )
    if limit == "user_seconds_per_day":
        return (
            f"This {seconds(needed)} song needs more audio than you have left today: "
            f"{seconds(remaining)} of your {seconds(limit_value)}. Ask for a shorter "
            f"song, or wait.{reset}"
        )
    if limit == "user_concurrent_jobs":
        return (
            f"You already have {int(limit_value - remaining)} songs in progress "
            f"(limit {int(limit_value)}). Wait for one to finish or cancel one."
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

FAILED_GENERIC = (
    "Something went wrong while making your song; the operator has been "
    "told. Your quota was refunded."
)
UNAVAILABLE = (
    "The music service is temporarily unavailable. Your quota was refunded; please try again later."
)
TIMED_OUT = (
    "Your song took too long to make (over {limit}) and was stopped. Your quota was refunded."
)
CANCELLED = "Cancelled. Your quota was refunded."
DELIVERY_FAILED = "Your song was made but could not be posted here. Your quota was refunded."


def span(total_seconds: int) -> str:
    """'15 min' or '45 s'."""
    return f"{total_seconds // 60} min" if total_seconds >= 120 else f"{total_seconds} s"


def sentence(text: str) -> str:
    """Trimmed text ending with a full stop."""
    text = " ".join(text.split()) or "no reason given"
    return text if text[-1] in ".!?" else text + "."


def provider_failed(reason: str) -> str:
    return (
        f"The music service could not make this song: {sentence(reason)} Your quota was refunded."
    )


def rejected(reason: str) -> str:
    return f"The music service refused this request: {sentence(reason)} Your quota was refunded."


# Shown next to the seed of a song from a provider that ignored the seed it was sent.
SEED_NOT_HONOURED = "this server does not honour seeds, so it will not make this song again"


def seed_note(honoured: bool) -> str:
    return "" if honoured else SEED_NOT_HONOURED


def ignored_options(provider: str, names: list[str]) -> str:
    return (
        f"Note: {provider} ignores {', '.join(names)}; "
        "the song is made with its defaults for those."
    )
