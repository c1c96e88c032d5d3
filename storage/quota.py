"""Quota rules every storage backend applies the same way: limits, usage, refusals, windows.

Quota windows are UTC days: a user's songs and seconds, a community's seconds and the
global spend count what was admitted since 00:00 UTC and not refunded. Concurrency counts
jobs still active, whenever they were admitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from storage.tally import DAY_SECONDS, day_number

USER_KEYS = ("jobs_per_day", "seconds_per_day", "concurrent_jobs")
COMMUNITY_KEYS = ("seconds_per_day",)


@dataclass(frozen=True)
class Limits:
    """Quota limits (None = unlimited): the settings' defaults, or those with a user's
    and community's overrides applied."""

    user_jobs_per_day: float | None
    user_seconds_per_day: float | None
    user_concurrent_jobs: float | None
    community_seconds_per_day: float | None
    spend_cap_usd: float | None

    def with_overrides(self, user: dict[str, float], community: dict[str, float]) -> Limits:
        """These limits with a user's and a community's overrides applied."""
        return Limits(
            user_jobs_per_day=user.get("jobs_per_day", self.user_jobs_per_day),
            user_seconds_per_day=user.get("seconds_per_day", self.user_seconds_per_day),
            user_concurrent_jobs=user.get("concurrent_jobs", self.user_concurrent_jobs),
            community_seconds_per_day=community.get(
                "seconds_per_day", self.community_seconds_per_day
            ),
            spend_cap_usd=self.spend_cap_usd,
        )


@dataclass(frozen=True)
class Usage:
    """What a user, their community and the whole bot have used in the current window."""

    user_jobs: int
    user_seconds: float
    user_active: int
    community_seconds: float
    spend_usd: float


class QuotaRefusal(Exception):
    """Admission refused: which limit, its value, what is used and what remains."""

    def __init__(self, limit: str, limit_value: float, used: float, needed: float) -> None:
        self.limit = limit
        self.limit_value = limit_value
        self.used = used
        self.needed = needed
        self.remaining = max(0.0, limit_value - used)
        super().__init__(f"{limit}: used {used} of {limit_value}, needed {needed}")


def check_admission(
    limits: Limits,
    usage: Usage,
    *,
    seconds: float,
    usd: float,
    in_community: bool,
    bypass_quotas: bool,
    jobs: int = 1,
) -> None:
    """Raise QuotaRefusal naming the first limit that leaves no room for `jobs` jobs
    (the takes of one request) of `seconds` in all reserving `usd` in all. Admins bypass
    every limit but the spend cap."""
    if not bypass_quotas:
        _check("user_concurrent_jobs", limits.user_concurrent_jobs, usage.user_active, jobs)
        _check("user_jobs_per_day", limits.user_jobs_per_day, usage.user_jobs, jobs)
        _check("user_seconds_per_day", limits.user_seconds_per_day, usage.user_seconds, seconds)
        if in_community:
            _check(
                "community_seconds_per_day",
                limits.community_seconds_per_day,
                usage.community_seconds,
                seconds,
            )
    _check("spend_cap_usd_per_day", limits.spend_cap_usd, usage.spend_usd, usd)


def _check(limit: str, value: float | None, used: float, needed: float) -> None:
    if value is not None and used + needed > value + 1e-9:
        raise QuotaRefusal(limit, value, used, needed)


def day_start(now: float) -> float:
    """The start of the UTC day holding `now`."""
    return float(day_number(now) * DAY_SECONDS)


def next_reset(now: float) -> datetime:
    """When the current quota window ends (next 00:00 UTC)."""
    return datetime.fromtimestamp(day_start(now), UTC) + timedelta(days=1)
