"""The store, on SQLite or PostgreSQL (storage/pg.py): job rows, quota reservations, the
usage ledger and the per-day counters. The only place job SQL lives, one implementation
for both databases.

Each public method is one function run on the database's writer or reader thread
(storage/database.py): one thread hop per transaction, however many statements. Every
change to a job updates the per-day counters (storage/tally.py) in the same transaction,
so admission reads a few counter rows instead of the day's history, and `stats` and
/metrics read the counters and partial indexes of active jobs instead of scanning.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time
from collections.abc import Iterable
from typing import Any

from bot.models import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    FailureKind,
    Job,
    JobState,
    Requester,
    SongResult,
)
from bot.requests import GenerationRequest
from storage.community import CommunityStore
from storage.database import Database
from storage.inbox import UpdateInbox
from storage.pg import PgDatabase
from storage.quota import (
    COMMUNITY_KEYS,
    USER_KEYS,
    Limits,
    QuotaRefusal,
    Usage,
    check_admission,
    day_start,
    next_reset,
)
from storage.store import Gauges, Stats, StatsRow
from storage.tally import COLUMNS, NO_COMMUNITY, NO_PROVIDER, JobFacts, Tally, changes, day_number

__all__ = [
    "COMMUNITY_KEYS",
    "USER_KEYS",
    "JobStore",
    "Limits",
    "QuotaRefusal",
    "Stats",
    "StatsRow",
    "Usage",
    "day_start",
    "next_reset",
]

# Spelled exactly as the partial indexes' WHERE clause (migration 0007): SQLite uses a
# partial index only for a query that states the same condition.
ACTIVE_SQL = "state IN (" + ", ".join(f"'{s}'" for s in ACTIVE_STATES) + ")"
_TERMINAL_SQL = "state IN (" + ", ".join(f"'{s}'" for s in TERMINAL_STATES) + ")"

# Columns a transition or update may set (names go into SQL: never from user input).
# Dollar amounts are rounded to the micro-dollar; below this they are zero.
MONEY_EPSILON = 1e-9

_SETTABLE = frozenset(
    {
        "provider",
        "handle",
        "attempts",
        "recoveries",
        "tried_providers",
        "cancel_requested",
        "charged_usd",
        "refunded",
        "result",
        "error",
        "failure",
        "reply_target",
        "started_at",
        "finished_at",
        "delivered_at",
        "owner",
        "lease_expires",
    }
)
_JSON_FIELDS = {"result", "reply_target", "tried_providers"}
_UPSERT_COUNTERS = (
    f"INSERT INTO usage_daily (scope, day, subject, {', '.join(COLUMNS)})"
    f" VALUES (?, ?, ?, {', '.join('?' * len(COLUMNS))})"
    " ON CONFLICT (scope, day, subject) DO UPDATE SET "
    + ", ".join(f"{c} = usage_daily.{c} + excluded.{c}" for c in COLUMNS)
)
_COUNTER_READ = (
    "SELECT quota_jobs, quota_seconds, spend_usd FROM usage_daily"
    " WHERE scope = ? AND day = ? AND subject = ?"
)
# LIMIT for "all rows" that both SQLite and PostgreSQL take.
_NO_LIMIT = 2**62
# SQLite limits bound parameters; chunk well below the lowest default (999).
_CHUNK = 500


class JobStore:
    """Jobs, quotas and the ledger on one SQLite or PostgreSQL database (implements
    storage.store.Store)."""

    def __init__(self, db: Database | PgDatabase) -> None:
        self.db = db
        self.community = CommunityStore(db)  # song defaults and ban lists, same database
        self.uploads = UploadStore(db)  # source files providers already hold
        self.inbox = UpdateInbox(db)  # platform updates received, not yet handled

    @property
    def shared(self) -> bool:
        """Whether several bot processes may work on this database at once (PostgreSQL;
        a SQLite file has one working process, bot/datalock.py)."""
        return self.db.dialect == "postgresql"

    async def close(self) -> None:
        await self.db.close()

    async def upgrade(self) -> list[str]:
        return await self.db.upgrade()

    async def schema_version(self) -> int:
        return await self.db.schema_version()

    async def check_writable(self, timeout_ms: int = 2000) -> None:
        await self.db.check_writable(timeout_ms)

    # ---- admission -------------------------------------------------------------------

    async def admit(
        self, job: Job, limits: Limits, *, bypass_quotas: bool, now: float | None = None
    ) -> str | None:
        """Check every quota and insert the job with its reservation, atomically.

        Raises QuotaRefusal naming the first limit that does not leave room. When the
        job's `source_key` was already admitted, nothing is written and the existing
        job's id is returned.
        """
        return await self.admit_takes([job], limits, bypass_quotas=bypass_quotas, now=now)

    async def admit_takes(
        self, jobs: list[Job], limits: Limits, *, bypass_quotas: bool, now: float | None = None
    ) -> str | None:
        """Admit the takes of one request (one job each) in one transaction: every limit
        is checked for all of them together, and either all are stored or none.

        Raises QuotaRefusal naming the first limit that does not leave room for them
        all. When the first job's `source_key` was already admitted, nothing is written
        and that job's id is returned.
        """
        if not jobs:
            raise ValueError("admit_takes needs at least one job")
        at = time.time() if now is None else now
        requester = jobs[0].requester
        first = jobs[0]

        def admit(conn: sqlite3.Connection) -> str | None:
            if first.source_key:
                row = conn.execute(
                    "SELECT id FROM jobs WHERE source_key = ?", (first.source_key,)
                ).fetchone()
                if row:
                    return str(row[0])
            effective = _effective_limits(conn, requester, limits)
            usage = _usage(conn, requester, at)
            check_admission(
                effective,
                usage,
                seconds=sum(job.request.duration for job in jobs),
                usd=sum(job.reserved_usd for job in jobs),
                in_community=requester.community_key is not None,
                bypass_quotas=bypass_quotas,
                jobs=len(jobs),
            )
            for job in jobs:
                source = job.request.source
                conn.execute(
                    "INSERT INTO jobs (id, platform, user_id, user_key, community_key,"
                    " display_name, reply_target, request, duration, seed, state,"
                    " reserved_usd, created_at, updated_at, source_key, task, source_job_id,"
                    " source_sha256, batch_id, take, takes)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        job.id,
                        requester.platform,
                        requester.user_id,
                        requester.key,
                        requester.community_key,
                        requester.display_name,
                        json.dumps(job.reply_target),
                        job.request.model_dump_json(),
                        job.request.duration,
                        job.seed,
                        "queued",
                        job.reserved_usd,
                        at,
                        at,
                        job.source_key,
                        job.request.task.value,
                        source.job_id if source else None,
                        source.sha256 if source else None,
                        job.batch_id,
                        job.take,
                        job.takes,
                    ),
                )
                after = _facts(conn, job.id)
                assert after is not None
                _ledger(conn, job.id, after, "reserve", job.reserved_usd, None, at)
                _count(conn, None, after)
            return None

        existing = await self.db.write(admit)
        if existing is None:
            for job in jobs:
                job.created_at = job.updated_at = at
        return existing

    async def source_in_use(self, sha256: str) -> bool:
        """Whether any job works on the source file with this hash."""

        def read(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT 1 FROM jobs WHERE source_sha256 = ? LIMIT 1", (sha256,)
            ).fetchone()
            return row is not None

        return await self.db.read(read)

    async def batch(self, batch_id: str) -> list[Job]:
        """The takes one request made, in take order."""
        return await self._select(
            "SELECT * FROM jobs WHERE batch_id = ? ORDER BY take", (batch_id,)
        )

    async def by_source_key(self, source_key: str) -> Job | None:
        """The job a platform event already created, if any."""

        def read(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute("SELECT * FROM jobs WHERE source_key = ?", (source_key,)).fetchone()
            return _job(row) if row else None

        return await self.db.read(read)

    async def usage(
        self, requester: Requester, limits: Limits, now: float | None = None
    ) -> tuple[Usage, Limits]:
        """Current usage and the limits that apply to this requester."""
        at = time.time() if now is None else now
        return await self.db.read(
            lambda conn: (_usage(conn, requester, at), _effective_limits(conn, requester, limits))
        )

    async def spend_since(self, since: float) -> float:
        """Spend (charged, or reserved while not refunded) of jobs admitted on the UTC
        day holding `since` and after."""

        def read(conn: sqlite3.Connection) -> float:
            row = conn.execute(
                "SELECT COALESCE(SUM(spend_usd), 0) FROM usage_daily"
                " WHERE scope = 'all' AND day >= ? AND subject = ''",
                (day_number(since),),
            ).fetchone()
            return float(row[0])

        return await self.db.read(read)

    # ---- transitions -----------------------------------------------------------------

    async def transition(
        self,
        job_id: str,
        from_states: tuple[str, ...],
        to_state: str,
        now: float | None = None,
        **fields: Any,
    ) -> bool:
        """Move a job to `to_state` if it is in one of `from_states`; False otherwise."""
        at = time.time() if now is None else now
        return await self.db.write(
            lambda conn: _transition(conn, job_id, from_states, to_state, at, fields) is not None
        )

    async def update(self, job_id: str, **fields: Any) -> None:
        """Change fields without changing state (reply target, cancel flag)."""
        if not fields:
            return
        _check_fields(fields)

        def update(conn: sqlite3.Connection) -> None:
            before = _facts(conn, job_id)
            if before is None:
                return
            sets = ", ".join(f"{name} = ?" for name in fields)
            values = [_encode(name, value) for name, value in fields.items()]
            conn.execute(
                f"UPDATE jobs SET {sets}, updated_at = ? WHERE id = ?",
                (*values, time.time(), job_id),
            )
            after = _facts(conn, job_id)
            assert after is not None
            _count(conn, before, after)

        await self.db.write(update)

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
    ) -> bool:
        """queued -> submitting, charging this run's price at once: from here on the
        provider may bill it, so the spend counts it until the provider confirms it did
        not (`credit_run`). A job's first run takes the place of its admission's
        reservation; a later one (after a billed failure, a crash mid-submit, a lost task)
        needs room under the day's spend cap, or QuotaRefusal is raised and nothing moves.
        False when the job is no longer queued, or when the provider already has
        `concurrency` jobs in flight (submitting or running) from every process on this
        database. The job becomes `owner`'s, its lease running `lease_seconds`."""
        at = time.time() if now is None else now

        def start(conn: sqlite3.Connection) -> bool:
            before = _facts(conn, job_id)
            if before is None or before.state != "queued":
                return False
            if concurrency is not None and _in_flight(conn, provider) >= concurrency:
                return False
            charged = before.charged_usd or 0.0
            if charged > MONEY_EPSILON:
                spend = _usage_spend(conn, at)
                if spend_cap_usd is not None and spend + usd > spend_cap_usd + MONEY_EPSILON:
                    raise QuotaRefusal("spend_cap_usd_per_day", spend_cap_usd, spend, usd)
            moved = _transition(
                conn,
                job_id,
                ("queued",),
                "submitting",
                at,
                {
                    **fields,
                    "provider": provider,
                    "charged_usd": round(charged + usd, 6),
                    **_lease(owner, lease_seconds, at),
                },
            )
            assert moved is not None
            _ledger(conn, job_id, moved, "charge", usd, provider, at)
            return True

        return await self.db.write(start)

    async def credit_run(
        self, job_id: str, usd: float, provider: str | None, now: float | None = None
    ) -> None:
        """Take back a run's charge: the provider confirmed it will not bill it (a refused
        submit, a cancel accepted before the run started, a failure it does not bill). A
        job with no charge left counts its reservation again while it waits."""
        at = time.time() if now is None else now

        def credit(conn: sqlite3.Connection) -> None:
            before = _facts(conn, job_id)
            if before is None or not before.charged_usd:
                return
            left = round(before.charged_usd - usd, 6)
            conn.execute(
                "UPDATE jobs SET charged_usd = ?, updated_at = ? WHERE id = ?",
                (left if left > MONEY_EPSILON else None, at, job_id),
            )
            after = _facts(conn, job_id)
            assert after is not None
            _count(conn, before, after)
            _ledger(conn, job_id, after, "credit", min(usd, before.charged_usd), provider, at)

        await self.db.write(credit)

    async def finish_success(
        self,
        job_id: str,
        provider: str,
        charged_usd: float,
        result: SongResult,
        now: float | None = None,
    ) -> bool:
        """running -> ready: the provider made the song. Its charge was recorded when the
        run started; `charged_usd` is used only for a job that started before charges
        were (an upgrade mid-run)."""
        at = time.time() if now is None else now

        def finish(conn: sqlite3.Connection) -> bool:
            before = _facts(conn, job_id)
            fields: dict[str, Any] = {"result": result, "finished_at": at, "provider": provider}
            uncharged = before is not None and before.charged_usd is None
            if uncharged:
                fields["charged_usd"] = charged_usd
            after = _transition(conn, job_id, ("running",), "ready", at, fields)
            if after is None:
                return False
            if uncharged:
                _ledger(conn, job_id, after, "charge", charged_usd, provider, at)
            return True

        return await self.db.write(finish)

    async def mark_delivered(self, job_id: str, now: float | None = None) -> bool:
        """ready -> delivered: the user has the song; the reservation is committed."""
        at = time.time() if now is None else now

        def deliver(conn: sqlite3.Connection) -> bool:
            after = _transition(conn, job_id, ("ready",), "delivered", at, {"delivered_at": at})
            if after is None:
                return False
            _ledger(conn, job_id, after, "commit", after.charged_usd or 0.0, after.provider, at)
            return True

        return await self.db.write(deliver)

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
    ) -> bool:
        """-> failed | cancelled. Charges made for runs the provider may bill stay in the
        spend (the operator pays them); the admission's reservation, if no run was
        charged, is released. `refund_quota` gives the user's and community's quota back
        (not for a song the user cancelled after the provider began making it).

        `error` is the operator's detail, `failure` the kind users are told.
        """
        at = time.time() if now is None else now
        fields: dict[str, Any] = {
            "error": error,
            "failure": failure,
            "refunded": 1 if refund_quota else 0,
            "finished_at": at,
        }

        def finish(conn: sqlite3.Connection) -> bool:
            after = _transition(conn, job_id, from_states, to_state, at, fields)
            if after is None:
                return False
            if refund_quota:
                released = after.reserved_usd if after.charged_usd is None else 0.0
                _ledger(conn, job_id, after, "refund", released, after.provider, at)
            return True

        return await self.db.write(finish)

    # ---- leases: which process works on a job, and singletons --------------------

    async def claim(
        self,
        job_id: str,
        owner: str,
        instance: str,
        states: tuple[str, ...],
        lease_seconds: float,
        now: float | None = None,
    ) -> Job | None:
        """Make the job `owner`'s for `lease_seconds` if it is in one of `states` and no
        other live process holds it: it has no owner, its lease ran out, it is already
        `owner`'s, or its owner was an earlier run of the same `instance` (the one data
        directory a single process works on at a time: that run is dead). The job as
        claimed, or None. A row another process is claiming right now is skipped, not
        waited for (PostgreSQL's FOR UPDATE SKIP LOCKED; SQLite's writer lock)."""
        at = time.time() if now is None else now
        lock = " FOR UPDATE SKIP LOCKED" if self.db.dialect == "postgresql" else ""

        def claim(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute(f"SELECT * FROM jobs WHERE id = ?{lock}", (job_id,)).fetchone()
            if row is None or row["state"] not in states:
                return None
            if not _claimable(row["owner"], row["lease_expires"], owner, instance, at):
                return None
            conn.execute(
                "UPDATE jobs SET owner = ?, lease_expires = ? WHERE id = ?",
                (owner, at + lease_seconds, job_id),
            )
            job = _job(row)
            job.owner, job.lease_expires = owner, at + lease_seconds
            return job

        return await self.db.write(claim, exclusive=False)

    async def renew_leases(
        self, owner: str, lease_seconds: float, now: float | None = None
    ) -> set[str]:
        """Extend every lease `owner` holds on an active job; the ids it still holds (a
        job missing was taken over after its lease ran out, or finished)."""
        at = time.time() if now is None else now

        def renew(conn: sqlite3.Connection) -> set[str]:
            return {
                str(row[0])
                for row in conn.execute(
                    f"UPDATE jobs SET lease_expires = ? WHERE owner = ? AND {ACTIVE_SQL}"
                    " RETURNING id",
                    (at + lease_seconds, owner),
                ).fetchall()
            }

        return await self.db.write(renew, exclusive=False)

    async def lapsed(
        self, states: tuple[str, ...], owner: str, instance: str, now: float | None = None
    ) -> list[Job]:
        """Jobs in these states that `owner` could claim (see `claim`) and does not hold,
        oldest first: left by a process that stopped renewing its leases (it died or lost
        the database), or by an earlier run of this instance."""
        at = time.time() if now is None else now
        return [
            j
            for j in await self.in_states(states)
            if j.owner != owner and _claimable(j.owner, j.lease_expires, owner, instance, at)
        ]

    async def in_flight(self, exclude_owner: str | None = None) -> dict[str, int]:
        """Jobs in flight (submitting or running) per provider across every process on
        this database; with `exclude_owner`, those other processes hold."""

        def read(conn: sqlite3.Connection) -> dict[str, int]:
            sql = (
                "SELECT provider, COUNT(*) FROM jobs INDEXED BY jobs_active"
                f" WHERE state IN ('submitting', 'running') AND {ACTIVE_SQL}"
            )
            params: tuple[Any, ...] = ()
            if exclude_owner is not None:
                sql += " AND (owner IS NULL OR owner <> ?)"
                params = (exclude_owner,)
            return {
                str(p): int(n)
                for p, n in conn.execute(sql + " GROUP BY provider", params)
                if p is not None
            }

        return await self.db.read(read)

    async def hold_singleton(
        self, name: str, owner: str, ttl: float, now: float | None = None
    ) -> bool:
        """Take or keep the hold called `name` for `ttl` seconds: True when `owner` has
        it now (it was free, had expired, or was already `owner`'s, and is renewed),
        False while another owner's hold lasts. Call again before `ttl` runs out to
        keep it."""
        at = time.time() if now is None else now

        def hold(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "INSERT INTO singletons (name, owner, expires) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,"
                " expires = excluded.expires"
                " WHERE singletons.owner = excluded.owner OR singletons.expires <= ?"
                " RETURNING owner",
                (name, owner, at + ttl, at),
            ).fetchone()
            return row is not None

        return await self.db.write(hold, exclusive=False)

    async def release_singleton(self, name: str, owner: str) -> bool:
        """Give the hold up (only `owner`'s own); True if it was held."""
        return await self.db.write(
            lambda conn: (
                conn.execute(
                    "DELETE FROM singletons WHERE name = ? AND owner = ?", (name, owner)
                ).rowcount
                == 1
            ),
            exclusive=False,
        )

    async def singleton_owner(self, name: str, now: float | None = None) -> str | None:
        """Who holds `name` now, or None."""
        at = time.time() if now is None else now

        def read(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT owner FROM singletons WHERE name = ? AND expires > ?", (name, at)
            ).fetchone()
            return str(row[0]) if row else None

        return await self.db.read(read)

    # ---- reads -----------------------------------------------------------------------

    async def get(self, job_id: str) -> Job | None:
        def read(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return _job(row) if row else None

        return await self.db.read(read)

    async def in_states(self, states: tuple[str, ...]) -> list[Job]:
        """Jobs in these states, oldest first."""
        source, where, params = _by_states(states, "jobs_active")
        return await self._select(
            f"SELECT * FROM {source} WHERE {where} ORDER BY created_at, id", tuple(params)
        )

    async def for_user(
        self, user_key: str, states: tuple[str, ...] | None = None, limit: int = 50
    ) -> list[Job]:
        """A user's jobs, newest first."""
        if states:
            source, where, params = _by_states(states, "jobs_active_user")
            return await self._select(
                f"SELECT * FROM {source} WHERE user_key = ? AND {where}"
                " ORDER BY created_at DESC LIMIT ?",
                (user_key, *params, limit),
            )
        return await self._select(
            "SELECT * FROM jobs WHERE user_key = ? ORDER BY created_at DESC LIMIT ?",
            (user_key, limit),
        )

    async def recent(self, limit: int = 50, states: tuple[str, ...] | None = None) -> list[Job]:
        if states:
            source, where, params = _by_states(states, "jobs_active")
            return await self._select(
                f"SELECT * FROM {source} WHERE {where} ORDER BY created_at DESC LIMIT ?",
                (*params, limit),
            )
        return await self._select("SELECT * FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,))

    async def search(
        self,
        text: str,
        limit: int = 50,
        states: tuple[str, ...] | None = None,
        user_key: str | None = None,
    ) -> list[Job]:
        """Jobs whose prompt, tags, lyrics or title contain `text` (any case), newest
        first: for operators finding who asked for what (it reads every row)."""
        pattern = "%" + re.sub(r"([\\%_])", r"\\\1", text.lower()) + "%"
        where = ["(lower(request) LIKE ? ESCAPE '\\' OR lower(result) LIKE ? ESCAPE '\\')"]
        params: list[Any] = [pattern, pattern]
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            params += states
        if user_key:
            where.append("user_key = ?")
            params.append(user_key)
        jobs = await self._select(
            f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY created_at DESC LIMIT ?",
            (*params, limit * 4),
        )
        # The LIKE above also matches JSON keys and escapes; keep the real text matches.
        needle = text.lower()
        return [job for job in jobs if needle in _searchable(job)][:limit]

    async def mark_deleted(self, job_id: str, by: str, now: float | None = None) -> bool:
        """Record that a posted song was removed (once); False if it already was."""
        at = time.time() if now is None else now
        return await self.db.write(
            lambda conn: (
                conn.execute(
                    "UPDATE jobs SET deleted_at = ?, deleted_by = ?, updated_at = ?"
                    " WHERE id = ? AND deleted_at IS NULL",
                    (at, by, at, job_id),
                ).rowcount
                == 1
            )
        )

    async def _select(self, sql: str, params: tuple[Any, ...]) -> list[Job]:
        return await self.db.read(lambda conn: [_job(r) for r in conn.execute(sql, params)])

    async def ledger(self, job_id: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM usage_ledger"
        params: tuple[Any, ...] = ()
        if job_id:
            sql += " WHERE job_id = ?"
            params = (job_id,)
        return await self.db.read(
            lambda conn: [dict(row) for row in conn.execute(sql + " ORDER BY id", params)]
        )

    # ---- overrides and community settings -------------------------------------------

    async def get_overrides(self, scope: str, subject: str) -> dict[str, float]:
        return await self.db.read(lambda conn: _overrides(conn, scope, subject))

    async def set_override(self, scope: str, subject: str, key: str, value: float | None) -> None:
        """Set (or with None, remove) one limit override."""
        allowed = USER_KEYS if scope == "user" else COMMUNITY_KEYS
        if scope not in ("user", "community") or key not in allowed:
            raise ValueError(
                f"unknown limit {scope}.{key}; {scope} limits are " + ", ".join(allowed)
            )

        def write(conn: sqlite3.Connection) -> None:
            if value is None:
                conn.execute(
                    "DELETE FROM limit_overrides WHERE scope = ? AND subject = ? AND key = ?",
                    (scope, subject, key),
                )
            else:
                conn.execute(
                    "INSERT INTO limit_overrides (scope, subject, key, value, updated_at)"
                    " VALUES (?,?,?,?,?) ON CONFLICT (scope, subject, key)"
                    " DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                    (scope, subject, key, float(value), time.time()),
                )

        await self.db.write(write)

    async def get_community_setting(self, community: str, name: str) -> Any:
        def read(conn: sqlite3.Connection) -> Any:
            row = conn.execute(
                "SELECT value FROM community_settings WHERE community = ? AND name = ?",
                (community, name),
            ).fetchone()
            return json.loads(row[0]) if row else None

        return await self.db.read(read)

    async def set_community_setting(self, community: str, name: str, value: Any) -> None:
        encoded = json.dumps(value)
        await self.db.write(
            lambda conn: conn.execute(
                "INSERT INTO community_settings (community, name, value, updated_at)"
                " VALUES (?,?,?,?) ON CONFLICT (community, name)"
                " DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (community, name, encoded, time.time()),
            )
        )

    # ---- operations (health, metrics, stats, retention, checks) ----------------------

    async def gauges(self, now: float | None = None) -> Gauges:
        """Jobs by state and provider, queue depth and today's spend, in one snapshot.

        Active states are counted from the partial index of active jobs; finished states
        come from the counters (every job ever finished, including rows retention has
        deleted): nothing here grows with the history but the number of days.
        """
        today = day_number(time.time() if now is None else now)

        def read(conn: sqlite3.Connection) -> Gauges:
            jobs = [
                (str(state), str(provider), int(n))
                for state, provider, n in conn.execute(
                    "SELECT state, COALESCE(provider, ''), COUNT(*)"
                    f" FROM jobs INDEXED BY jobs_active WHERE {ACTIVE_SQL} GROUP BY 1, 2"
                )
            ]
            for provider, delivered, failed, cancelled in conn.execute(
                "SELECT subject, SUM(delivered), SUM(failed), SUM(cancelled) FROM usage_daily"
                " WHERE scope = 'provider' GROUP BY subject"
            ):
                for state, n in (("delivered", delivered), ("failed", failed)):
                    if n:
                        jobs.append((state, str(provider), int(n)))
                if cancelled:
                    jobs.append(("cancelled", str(provider), int(cancelled)))
            depth = sum(n for state, _, n in jobs if state == "queued")
            row = conn.execute(_COUNTER_READ, ("all", today, "")).fetchone()
            return Gauges(jobs, depth, float(row["spend_usd"]) if row else 0.0)

        return await self.db.read(read)

    async def stats(self, since: float, top: int | None = None) -> Stats:
        """Songs delivered, their seconds and the spend of jobs admitted from the UTC day
        holding `since` on: in all, and by community, user and provider, biggest spender
        first (the `top` of each). Read from the per-day counters."""
        first_day = day_number(since)
        shown = {"community": NO_COMMUNITY, "user": "", "provider": NO_PROVIDER}
        sums = (
            "SUM(delivered), SUM(delivered_seconds), SUM(charged_usd), SUM(failed + cancelled),"
            " SUM(jobs)"
        )

        def read(conn: sqlite3.Connection) -> Stats:
            [row] = conn.execute(
                f"SELECT '', {sums} FROM usage_daily WHERE scope = 'all' AND day >= ?",
                (first_day,),
            ).fetchall()
            total = _stats_row(row, "")
            groups: dict[str, list[StatsRow]] = {}
            counts: dict[str, int] = {}
            for group, empty in shown.items():
                # COUNT(*) OVER () counts the groups before LIMIT keeps the top ones.
                rows = conn.execute(
                    f"SELECT CASE WHEN subject = '' THEN ? ELSE subject END AS name, {sums},"
                    " COUNT(*) OVER () FROM usage_daily WHERE scope = ? AND day >= ?"
                    " GROUP BY subject HAVING SUM(jobs) > 0"
                    " ORDER BY ROUND(CAST(SUM(charged_usd) AS NUMERIC), 9) DESC,"
                    " SUM(delivered) DESC, name"
                    " LIMIT ?",
                    (empty, group, first_day, _NO_LIMIT if top is None else top),
                ).fetchall()
                groups[group] = [_stats_row(r, empty) for r in rows]
                counts[group] = int(rows[0][-1]) if rows else 0
            return Stats(total, groups, counts)

        return await self.db.read(read)

    async def expired_jobs(self, job_ids: Iterable[str], cutoff: float) -> set[str]:
        """Those of `job_ids` whose job is finished for good (delivered, failed or
        cancelled) and was last touched before `cutoff`."""
        ids = sorted(set(job_ids))

        def read(conn: sqlite3.Connection) -> set[str]:
            expired: set[str] = set()
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                expired.update(
                    row[0]
                    for row in conn.execute(
                        f"SELECT id FROM jobs WHERE id IN ({marks}) AND {_TERMINAL_SQL}"
                        " AND COALESCE(delivered_at, finished_at, updated_at) < ?",
                        (*chunk, cutoff),
                    )
                )
            return expired

        return await self.db.read(read)

    async def finished_before(self, before: float, limit: int) -> list[str]:
        """Up to `limit` finished jobs (delivered, failed, cancelled) admitted before
        `before`, oldest first: what job-row retention deletes next."""
        return await self.db.read(
            lambda conn: [
                str(row[0])
                for row in conn.execute(
                    f"SELECT id FROM jobs WHERE created_at < ? AND {_TERMINAL_SQL}"
                    " ORDER BY created_at LIMIT ?",
                    (before, limit),
                )
            ]
        )

    async def delete_jobs(self, job_ids: list[str], before: float) -> int:
        """Delete these job rows and their ledger lines, if finished and admitted before
        `before`; the per-day counters keep their totals. Returns the rows deleted."""
        ids = sorted(set(job_ids))
        first_kept_day = day_number(before)

        def delete(conn: sqlite3.Connection) -> int:
            deleted = 0
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                gone = [
                    row[0]
                    for row in conn.execute(
                        f"SELECT id FROM jobs WHERE id IN ({marks}) AND {_TERMINAL_SQL}"
                        " AND created_at < ?",
                        (*chunk, before),
                    )
                ]
                if not gone:
                    continue
                marks = ",".join("?" * len(gone))
                conn.execute(f"DELETE FROM usage_ledger WHERE job_id IN ({marks})", gone)
                deleted += conn.execute(f"DELETE FROM jobs WHERE id IN ({marks})", gone).rowcount
            # Days before this one may have lost rows: the counters are their record now.
            conn.execute(
                "INSERT INTO storage_state (name, value) VALUES ('pruned_before_day', ?)"
                " ON CONFLICT (name) DO UPDATE SET value = CASE"
                " WHEN excluded.value > storage_state.value THEN excluded.value"
                " ELSE storage_state.value END",
                (first_kept_day,),
            )
            return deleted

        return await self.db.write(delete)

    async def usage_mismatches(self) -> list[str]:
        """Where the per-day counters differ from the totals of the job rows (the ledger
        of record), for every day whose rows retention has not thinned; [] when they
        agree. Reads every job row: an operator's check, not a hot path."""

        def read(conn: sqlite3.Connection) -> list[str]:
            row = conn.execute(
                "SELECT value FROM storage_state WHERE name = 'pruned_before_day'"
            ).fetchone()
            first_day = int(row[0]) if row else -(2**62)
            counted = _totals(conn, "usage_daily", first_day)
            ledger = _totals(conn, "usage_daily_from_jobs", first_day)
            problems = []
            for key in sorted(set(counted) | set(ledger)):
                have, want = counted.get(key, Tally()), ledger.get(key, Tally())
                if not _close(have, want):
                    scope, day, subject = key
                    problems.append(
                        f"{scope} {subject or '-'} on day {day}: counters {have}, job rows {want}"
                    )
            return problems

        return await self.db.read(read)


class UploadStore:
    """The providers' copies of source files, kept across restarts (an UploadCache)."""

    def __init__(self, db: Database | PgDatabase) -> None:
        self.db = db

    async def get(self, provider: str, sha256: str) -> str | None:
        at = time.time()

        def read(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT ref FROM source_uploads WHERE provider = ? AND sha256 = ?"
                " AND expires_at > ?",
                (provider, sha256, at),
            ).fetchone()
            return str(row[0]) if row else None

        return await self.db.read(read)

    async def put(self, provider: str, sha256: str, ref: str, expires_at: float) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO source_uploads (provider, sha256, ref, expires_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (provider, sha256) DO UPDATE SET"
                " ref = excluded.ref, expires_at = excluded.expires_at",
                (provider, sha256, ref, expires_at),
            )

        await self.db.write(write)


# ---- the functions run on the database threads ----------------------------------------


def _stats_row(row: Any, empty: str) -> StatsRow:
    name, songs, seconds, spend, unsuccessful, jobs = row[:6]
    return StatsRow(
        str(name) or empty,
        int(songs or 0),
        float(seconds or 0),
        float(spend or 0),
        int(unsuccessful or 0),
        int(jobs or 0),
    )


def _facts(conn: sqlite3.Connection, job_id: str) -> JobFacts | None:
    row = conn.execute(
        "SELECT created_at, user_key, community_key, provider, state, duration, refunded,"
        " reserved_usd, charged_usd, result FROM jobs WHERE id = ?",
        (job_id,),
    ).fetchone()
    return JobFacts.from_row(row) if row else None


def _count(conn: sqlite3.Connection, before: JobFacts | None, after: JobFacts) -> None:
    """Move the per-day counters by what the job's change moved."""
    moved = changes(before, after)
    if moved:
        conn.executemany(
            _UPSERT_COUNTERS,
            [(scope, day, subject, *delta) for scope, day, subject, delta in moved],
        )


def _transition(
    conn: sqlite3.Connection,
    job_id: str,
    from_states: tuple[str, ...],
    to_state: str,
    now: float,
    fields: dict[str, Any],
) -> JobFacts | None:
    """Move the job and its counters; its facts afterwards, or None if it was not in
    one of `from_states`."""
    _check_fields(fields)
    before = _facts(conn, job_id)
    if before is None or before.state not in from_states:
        return None
    sets = ["state = ?", "updated_at = ?"]
    values: list[Any] = [to_state, now]
    for name, value in fields.items():
        sets.append(f"{name} = ?")
        values.append(_encode(name, value))
    conn.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", (*values, job_id))
    after = _facts(conn, job_id)
    assert after is not None
    _count(conn, before, after)
    return after


def _lease(owner: str | None, lease_seconds: float | None, now: float) -> dict[str, Any]:
    if owner is None:
        return {}
    return {"owner": owner, "lease_expires": now + (lease_seconds or 0.0)}


def _claimable(
    held_by: str | None, expires: float | None, owner: str, instance: str, now: float
) -> bool:
    """Whether `owner` (a run of `instance`) may take a job held by `held_by` until
    `expires`: see JobStore.claim."""
    return (
        held_by is None
        or held_by == owner
        or held_by.startswith(instance + "/")
        or expires is None
        or expires <= now
    )


def _in_flight(conn: sqlite3.Connection, provider: str) -> int:
    [(n,)] = conn.execute(
        "SELECT COUNT(*) FROM jobs INDEXED BY jobs_active"
        f" WHERE state IN ('submitting', 'running') AND provider = ? AND {ACTIVE_SQL}",
        (provider,),
    ).fetchall()
    return int(n)


def _check_fields(fields: dict[str, Any]) -> None:
    unknown = sorted(set(fields) - _SETTABLE)
    if unknown:
        raise ValueError(f"cannot set job field(s) {', '.join(unknown)}")


def _effective_limits(conn: sqlite3.Connection, requester: Requester, limits: Limits) -> Limits:
    community = requester.community_key
    return limits.with_overrides(
        _overrides(conn, "user", requester.key),
        _overrides(conn, "community", community) if community else {},
    )


def _usage(conn: sqlite3.Connection, requester: Requester, now: float) -> Usage:
    day = day_number(now)
    user = conn.execute(_COUNTER_READ, ("user", day, requester.key)).fetchone()
    community = None
    if requester.community_key:
        community = conn.execute(
            _COUNTER_READ, ("community", day, requester.community_key)
        ).fetchone()
    everyone = conn.execute(_COUNTER_READ, ("all", day, "")).fetchone()
    # The partial index of active jobs: as many entries as the user has songs in progress.
    [(active,)] = conn.execute(
        "SELECT COUNT(*) FROM jobs INDEXED BY jobs_active_user"
        f" WHERE user_key = ? AND {ACTIVE_SQL}",
        (requester.key,),
    ).fetchall()
    return Usage(
        user_jobs=int(user["quota_jobs"]) if user else 0,
        user_seconds=float(user["quota_seconds"]) if user else 0.0,
        user_active=int(active),
        community_seconds=float(community["quota_seconds"]) if community else 0.0,
        spend_usd=max(0.0, float(everyone["spend_usd"])) if everyone else 0.0,
    )


def _usage_spend(conn: sqlite3.Connection, now: float) -> float:
    row = conn.execute(_COUNTER_READ, ("all", day_number(now), "")).fetchone()
    return max(0.0, float(row["spend_usd"])) if row else 0.0


def _overrides(conn: sqlite3.Connection, scope: str, subject: str | None) -> dict[str, float]:
    return {
        row[0]: float(row[1])
        for row in conn.execute(
            "SELECT key, value FROM limit_overrides WHERE scope = ? AND subject = ?",
            (scope, subject),
        )
    }


def _ledger(
    conn: sqlite3.Connection,
    job_id: str,
    job: JobFacts,
    kind: str,
    usd: float,
    provider: str | None,
    now: float,
) -> None:
    conn.execute(
        "INSERT INTO usage_ledger (job_id, user_key, community_key, kind, seconds, usd,"
        " provider, at) VALUES (?,?,?,?,?,?,?,?)",
        (job_id, job.user_key, job.community_key, kind, job.duration, usd, provider, now),
    )


def _by_states(states: tuple[str, ...], active_index: str) -> tuple[str, str, list[str]]:
    """The table, `state IN (...)` condition and parameters for jobs in these states.
    When they are all active, the partial index `active_index` answers: the condition
    then names ACTIVE_SQL too (SQLite requires it), and INDEXED BY keeps the planner from
    walking a user's whole history through the plain index instead."""
    where = f"state IN ({','.join('?' * len(states))})"
    if set(states) <= set(ACTIVE_STATES):
        return f"jobs INDEXED BY {active_index}", f"{where} AND {ACTIVE_SQL}", list(states)
    return "jobs", where, list(states)


def _totals(
    conn: sqlite3.Connection, table: str, first_day: int
) -> dict[tuple[str, int, str], Tally]:
    """Non-zero totals of `usage_daily` or its view from the job rows, by counter row."""
    out = {}
    sql = f"SELECT scope, day, subject, {', '.join(COLUMNS)} FROM {table} WHERE day >= ?"
    for row in conn.execute(sql, (first_day,)):
        tally = Tally(*(row[c] or 0 for c in COLUMNS))
        if not tally.is_zero():
            out[(str(row["scope"]), int(row["day"]), str(row["subject"]))] = tally
    return out


def _close(a: Tally, b: Tally) -> bool:
    # Money is summed in floating point in a different order on each side.
    return all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-6) for x, y in zip(a, b, strict=True))


def _encode(name: str, value: Any) -> Any:
    if isinstance(value, SongResult):
        return json.dumps(value.to_dict())
    if name in _JSON_FIELDS and value is not None:
        return json.dumps(value)
    if isinstance(value, bool):
        return int(value)
    return value


def _searchable(job: Job) -> str:
    """The words of a job an operator searches: what was asked and what was made."""
    req = job.request
    made = job.result
    parts = [req.prompt, req.tags, req.lyrics, job.title]
    if made is not None:
        parts += [made.tags or "", made.lyrics or ""]
    return "\n".join(parts).lower()


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        source_key=row["source_key"],
        requester=Requester(
            platform=row["platform"],
            user_id=row["user_id"],
            community_id=(row["community_key"].split(":", 1)[1] if row["community_key"] else None),
            display_name=row["display_name"],
        ),
        reply_target=json.loads(row["reply_target"]),
        request=GenerationRequest.model_validate_json(row["request"]),
        seed=row["seed"],
        state=JobState(row["state"]),
        provider=row["provider"],
        handle=row["handle"],
        attempts=row["attempts"],
        recoveries=row["recoveries"],
        tried_providers=json.loads(row["tried_providers"]),
        cancel_requested=bool(row["cancel_requested"]),
        reserved_usd=row["reserved_usd"],
        charged_usd=row["charged_usd"],
        refunded=bool(row["refunded"]),
        result=SongResult.from_dict(json.loads(row["result"]), row["seed"])
        if row["result"]
        else None,
        error=row["error"],
        failure=FailureKind(row["failure"]) if row["failure"] else None,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        delivered_at=row["delivered_at"],
        deleted_at=row["deleted_at"],
        deleted_by=row["deleted_by"],
        owner=row["owner"],
        lease_expires=row["lease_expires"],
        batch_id=row["batch_id"],
        take=row["take"],
        takes=row["takes"],
    )
