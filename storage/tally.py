"""What one job counts in the per-day usage counters, and how a change to it moves them.

Backend-neutral: a store reads a job's ledger fields before and after a change, in the
same transaction, and adds `changes(before, after)` to its counters. The definitions
mirror the view `usage_daily_from_jobs` (storage/migrations/0007_usage_daily.sql), which
computes the same totals from the job rows; `acestep-bot db check` compares the two.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NamedTuple

DAY_SECONDS = 86_400

# Scopes of the counters, and the subject a job counts under in each.
SCOPES = ("user", "community", "provider", "all")
# Subjects shown for '' in `stats`.
NO_COMMUNITY = "(direct messages)"
NO_PROVIDER = "(none)"


def day_number(ts: float) -> int:
    """The UTC day holding `ts`, as days since 1970-01-01 (the counters' key)."""
    return int(ts // DAY_SECONDS)


class Tally(NamedTuple):
    """One job's share of a day's totals, or a sum of them. Field order is the column
    order of `usage_daily`. (A tuple: this runs in every transaction, and a dataclass's
    astuple made a transition 20x slower.)"""

    jobs: int = 0  # admitted
    quota_jobs: int = 0  # admitted and not refunded: QUOTA_USER_JOBS_PER_DAY
    quota_seconds: float = 0.0  # their seconds: QUOTA_USER_/COMMUNITY_SECONDS_PER_DAY
    spend_usd: float = 0.0  # charged, or reserved while not refunded: SPEND_CAP_USD_PER_DAY
    charged_usd: float = 0.0  # what providers charged (`stats` spend)
    delivered: int = 0
    delivered_seconds: float = 0.0
    failed: int = 0
    cancelled: int = 0

    def plus(self, other: Tally) -> Tally:
        return Tally._make(a + b for a, b in zip(self, other, strict=True))

    def minus(self, other: Tally) -> Tally:
        return Tally._make(a - b for a, b in zip(self, other, strict=True))

    def is_zero(self) -> bool:
        return not any(self)


COLUMNS = Tally._fields


@dataclass(frozen=True)
class JobFacts:
    """The fields of a job row that its tally depends on."""

    created_at: float
    user_key: str
    community_key: str | None
    provider: str | None
    state: str
    duration: int
    refunded: bool
    reserved_usd: float
    charged_usd: float | None
    result_duration: float | None  # the stored song's length, once there is one

    @classmethod
    def from_row(cls, row: Any) -> JobFacts:
        """From a row (mapping) with the jobs table's columns."""
        result_duration = None
        if row["result"]:
            value = json.loads(row["result"]).get("duration")
            result_duration = None if value is None else float(value)
        return cls(
            created_at=float(row["created_at"]),
            user_key=str(row["user_key"]),
            community_key=row["community_key"],
            provider=row["provider"],
            state=str(row["state"]),
            duration=int(row["duration"]),
            refunded=bool(row["refunded"]),
            reserved_usd=float(row["reserved_usd"]),
            charged_usd=None if row["charged_usd"] is None else float(row["charged_usd"]),
            result_duration=result_duration,
        )

    def tally(self) -> Tally:
        kept = not self.refunded
        delivered = self.state == "delivered"
        if self.charged_usd is not None:
            spend = self.charged_usd
        else:
            spend = self.reserved_usd if kept else 0.0
        return Tally(
            jobs=1,
            quota_jobs=int(kept),
            quota_seconds=float(self.duration) if kept else 0.0,
            spend_usd=spend,
            charged_usd=self.charged_usd or 0.0,
            delivered=int(delivered),
            delivered_seconds=(
                (self.result_duration if self.result_duration is not None else self.duration)
                if delivered
                else 0.0
            ),
            failed=int(self.state == "failed"),
            cancelled=int(self.state == "cancelled"),
        )

    def keys(self) -> list[tuple[str, int, str]]:
        """The (scope, day, subject) rows this job counts in."""
        day = day_number(self.created_at)
        return [
            ("user", day, self.user_key),
            ("community", day, self.community_key or ""),
            ("provider", day, self.provider or ""),
            ("all", day, ""),
        ]


def changes(before: JobFacts | None, after: JobFacts) -> list[tuple[str, int, str, Tally]]:
    """What to add to each counter row when a job goes from `before` (None: it is new)
    to `after`; rows that do not change are left out. (A job row deleted by retention
    changes nothing: the counters keep its day's totals.)"""
    moved: dict[tuple[str, int, str], Tally] = {}
    if before is not None:
        old = Tally().minus(before.tally())
        for key in before.keys():
            moved[key] = old
    new = after.tally()
    for key in after.keys():
        moved[key] = moved[key].plus(new) if key in moved else new
    return [(*key, delta) for key, delta in moved.items() if not delta.is_zero()]
