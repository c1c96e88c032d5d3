"""The storage API the engine, front-ends and CLI use, and `open_store()` to get one.

`Store` is what `storage.jobs.JobStore` implements, on SQLite (storage/database.py, the
embedded default) or PostgreSQL (storage/pg.py, DATABASE_URL): one implementation, the
same SQL, for both. Every method is
one transaction of the backend. Quota rules are shared (storage/quota.py), and so is what
a job counts in the per-day counters (storage/tally.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from bot.models import FailureKind, Job, Requester, SongResult
    from bot.settings import Settings
    from providers.base import UploadCache
    from storage.inbox import UpdateInbox
    from storage.quota import Limits, Usage


@dataclass(frozen=True)
class StatsRow:
    """One line of `acestep-bot stats`: what a community, user or provider used."""

    key: str
    songs: int  # delivered
    seconds: float  # of delivered audio
    spend_usd: float  # provider charges, delivered or not
    unsuccessful: int  # failed or cancelled
    jobs: int  # admitted


@dataclass(frozen=True)
class Stats:
    """`acestep-bot stats` for a period: the totals, and the biggest spenders first by
    community, user and provider (`groups`, at most `top` rows each) with how many there
    are in all (`counts`)."""

    total: StatsRow
    groups: dict[str, list[StatsRow]]
    counts: dict[str, int]


@dataclass(frozen=True)
class Gauges:
    """What /metrics reads from storage at each scrape."""

    jobs: list[tuple[str, str, int]]  # (state, provider or "", count)
    queue_depth: int  # admitted and waiting for a provider
    spend_today_usd: float  # charged or reserved since 00:00 UTC


class CommunityData(Protocol):
    """Song defaults per user and community (`/settings`) and community ban lists."""

    async def defaults(self, scope: str, subject: str) -> dict[str, Any]: ...
    async def set_defaults(self, scope: str, subject: str, values: dict[str, Any]) -> None: ...
    async def clear_defaults(self, scope: str, subject: str) -> None: ...
    async def banned(self, community: str) -> list[str]: ...
    async def ban(self, community: str, phrases: list[str], by: str) -> list[str]: ...
    async def unban(self, community: str, phrases: list[str]) -> list[str]: ...


class Store(Protocol):
    """Jobs, quotas, the ledger and the per-day counters; `community` holds song defaults
    and ban lists in the same database."""

    @property
    def community(self) -> CommunityData: ...
    @property
    def shared(self) -> bool: ...  # several processes may work on it (PostgreSQL)

    @property
    def uploads(self) -> UploadCache: ...
    @property
    def inbox(self) -> UpdateInbox: ...

    # admission and quota
    async def admit(
        self, job: Job, limits: Limits, *, bypass_quotas: bool, now: float | None = None
    ) -> str | None: ...
    async def admit_takes(
        self, jobs: list[Job], limits: Limits, *, bypass_quotas: bool, now: float | None = None
    ) -> str | None: ...
    async def batch(self, batch_id: str) -> list[Job]: ...
    async def source_in_use(self, sha256: str) -> bool: ...
    async def by_source_key(self, source_key: str) -> Job | None: ...
    async def usage(
        self, requester: Requester, limits: Limits, now: float | None = None
    ) -> tuple[Usage, Limits]: ...
    async def spend_since(self, since: float) -> float: ...

    # transitions
    async def transition(
        self,
        job_id: str,
        from_states: tuple[str, ...],
        to_state: str,
        now: float | None = None,
        **fields: Any,
    ) -> bool: ...
    async def update(self, job_id: str, **fields: Any) -> None: ...
    async def start_run(
        self,
        job_id: str,
        provider: str,
        usd: float,
        spend_cap_usd: float | None,
        now: float | None = None,
        *,
        owner: str | None = None,
        lease_seconds: float | None = None,
        concurrency: int | None = None,
        **fields: Any,
    ) -> bool: ...
    async def credit_run(
        self, job_id: str, usd: float, provider: str | None, now: float | None = None
    ) -> None: ...
    async def finish_success(
        self,
        job_id: str,
        provider: str,
        charged_usd: float,
        result: SongResult,
        now: float | None = None,
    ) -> bool: ...
    async def mark_delivered(self, job_id: str, now: float | None = None) -> bool: ...
    async def finish_unsuccessful(
        self,
        job_id: str,
        from_states: tuple[str, ...],
        to_state: str,
        error: str,
        now: float | None = None,
        *,
        failure: FailureKind | None = None,
        refund_quota: bool = True,
    ) -> bool: ...

    # leases (several processes on one database) and singletons
    async def claim(
        self,
        job_id: str,
        owner: str,
        instance: str,
        states: tuple[str, ...],
        lease_seconds: float,
        now: float | None = None,
    ) -> Job | None: ...
    async def renew_leases(
        self, owner: str, lease_seconds: float, now: float | None = None
    ) -> set[str]: ...
    async def lapsed(
        self, states: tuple[str, ...], owner: str, instance: str, now: float | None = None
    ) -> list[Job]: ...
    async def in_flight(self, exclude_owner: str | None = None) -> dict[str, int]: ...
    async def hold_singleton(
        self, name: str, owner: str, ttl: float, now: float | None = None
    ) -> bool: ...
    async def release_singleton(self, name: str, owner: str) -> bool: ...
    async def singleton_owner(self, name: str, now: float | None = None) -> str | None: ...

    # reads
    async def get(self, job_id: str) -> Job | None: ...
    async def in_states(self, states: tuple[str, ...]) -> list[Job]: ...
    async def for_user(
        self, user_key: str, states: tuple[str, ...] | None = None, limit: int = 50
    ) -> list[Job]: ...
    async def recent(self, limit: int = 50, states: tuple[str, ...] | None = None) -> list[Job]: ...
    async def search(
        self,
        text: str,
        limit: int = 50,
        states: tuple[str, ...] | None = None,
        user_key: str | None = None,
    ) -> list[Job]: ...
    async def mark_deleted(self, job_id: str, by: str, now: float | None = None) -> bool: ...
    async def ledger(self, job_id: str | None = None) -> list[dict[str, Any]]: ...

    # overrides and community settings
    async def get_overrides(self, scope: str, subject: str) -> dict[str, float]: ...
    async def set_override(
        self, scope: str, subject: str, key: str, value: float | None
    ) -> None: ...
    async def get_community_setting(self, community: str, name: str) -> Any: ...
    async def set_community_setting(self, community: str, name: str, value: Any) -> None: ...

    # operations: health, metrics, stats, retention, checks
    async def check_writable(self, timeout_ms: int = 2000) -> None: ...
    async def gauges(self, now: float | None = None) -> Gauges: ...
    async def stats(self, since: float, top: int | None = None) -> Stats: ...
    async def expired_jobs(self, job_ids: Iterable[str], cutoff: float) -> set[str]: ...
    async def finished_before(self, before: float, limit: int) -> list[str]: ...
    async def delete_jobs(self, job_ids: list[str], before: float) -> int: ...
    async def usage_mismatches(self) -> list[str]: ...
    async def upgrade(self) -> list[str]: ...
    async def schema_version(self) -> int: ...
    async def close(self) -> None: ...


async def connect_store(settings: Settings, *, migrate: bool = True) -> Store:
    """The configured store, open (and migrated unless `migrate` is False): PostgreSQL
    when DATABASE_URL is set, else the SQLite file under DATA_DIR. The caller closes it."""
    from storage.database import Database
    from storage.jobs import JobStore
    from storage.pg import PgDatabase

    url = settings.secret("database_url")
    if url:
        return JobStore(await PgDatabase.open(url, label=settings.database_label, migrate=migrate))
    return JobStore(await Database.open(settings.db_path, migrate=migrate))


@asynccontextmanager
async def open_store(settings: Settings, *, migrate: bool = True) -> AsyncIterator[Store]:
    """`async with open_store(settings) as store:` the configured store, closed after."""
    store = await connect_store(settings, migrate=migrate)
    try:
        yield store
    finally:
        await store.close()
