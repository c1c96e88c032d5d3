"""Job rows, quota reservations and the usage ledger. The only place job SQL lives.

Quota windows are UTC days: a user's songs and seconds, a community's seconds and the
global spend count what was admitted since 00:00 UTC and not refunded. Concurrency counts
jobs still active, whenever they were admitted.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiosqlite

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
from storage.database import Database

_ACTIVE = "('" + "','".join(ACTIVE_STATES) + "')"

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


@dataclass(frozen=True)
class Usage:
    """What a user, their community and the whole bot have used in the current window."""

    user_jobs: int
    user_seconds: float
    user_active: int
    community_seconds: float
    spend_usd: float


@dataclass(frozen=True)
class StatsRow:
    """One line of `acestep-bot stats`: what a community, user or provider used."""

    key: str
    songs: int  # delivered
    seconds: float  # of delivered audio
    spend_usd: float  # provider charges, delivered or not
    unsuccessful: int  # failed or cancelled
    jobs: int  # admitted


class QuotaRefusal(Exception):
    """Admission refused: which limit, its value, what is used and what remains."""

    def __init__(self, limit: str, limit_value: float, used: float, needed: float) -> None:
        self.limit = limit
        self.limit_value = limit_value
        self.used = used
        self.needed = needed
        self.remaining = max(0.0, limit_value - used)
        super().__init__(f"{limit}: used {used} of {limit_value}, needed {needed}")


def day_start(now: float) -> float:
    """The start of the UTC day holding `now`."""
    moment = datetime.fromtimestamp(now, UTC)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def next_reset(now: float) -> datetime:
    """When the current quota window ends (next 00:00 UTC)."""
    return datetime.fromtimestamp(day_start(now), UTC) + timedelta(days=1)


class JobStore:
    """Jobs, quotas and the ledger on one Database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # ---- admission -------------------------------------------------------------------

    async def admit(
        self, job: Job, limits: Limits, *, bypass_quotas: bool, now: float | None = None
    ) -> str | None:
        """Check every quota and insert the job with its reservation, atomically.

        Raises QuotaRefusal naming the first limit that does not leave room. When the
        job's `source_key` was already admitted, nothing is written and the existing
        job's id is returned.
        """
        now = time.time() if now is None else now
        requester = job.requester
        async with self.db.transaction() as conn:
            if job.source_key:
                rows = await _rows(
                    conn, "SELECT id FROM jobs WHERE source_key = ?", (job.source_key,)
                )
                if rows:
                    return str(rows[0][0])
            eff = await self._effective_limits(conn, requester, limits)
            usage = await self._usage(conn, requester, now)
            needed = job.request.duration
            if not bypass_quotas:
                _check("user_concurrent_jobs", eff.user_concurrent_jobs, usage.user_active, 1)
                _check("user_jobs_per_day", eff.user_jobs_per_day, usage.user_jobs, 1)
                _check("user_seconds_per_day", eff.user_seconds_per_day, usage.user_seconds, needed)
                if requester.community_key:
                    _check(
                        "community_seconds_per_day",
                        eff.community_seconds_per_day,
                        usage.community_seconds,
                        needed,
                    )
            _check("spend_cap_usd_per_day", eff.spend_cap_usd, usage.spend_usd, job.reserved_usd)
            await conn.execute(
                "INSERT INTO jobs (id, platform, user_id, user_key, community_key, display_name,"
                " reply_target, request, duration, seed, state, reserved_usd, created_at,"
                " updated_at, source_key) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
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
                    now,
                    now,
                    job.source_key,
                ),
            )
            await self._ledger(
                conn, job.id, requester, "reserve", needed, job.reserved_usd, None, now
            )
        job.created_at = job.updated_at = now
        return None

    async def by_source_key(self, source_key: str) -> Job | None:
        """The job a platform event already created, if any."""
        async with self.db.read() as conn:
            rows = await _rows(conn, "SELECT * FROM jobs WHERE source_key = ?", (source_key,))
        return _job(rows[0]) if rows else None

    async def _effective_limits(
        self, conn: aiosqlite.Connection, requester: Requester, limits: Limits
    ) -> Limits:
        user = await _overrides(conn, "user", requester.key)
        community = (
            await _overrides(conn, "community", requester.community_key)
            if requester.community_key
            else {}
        )
        return Limits(
            user_jobs_per_day=user.get("jobs_per_day", limits.user_jobs_per_day),
            user_seconds_per_day=user.get("seconds_per_day", limits.user_seconds_per_day),
            user_concurrent_jobs=user.get("concurrent_jobs", limits.user_concurrent_jobs),
            community_seconds_per_day=community.get(
                "seconds_per_day", limits.community_seconds_per_day
            ),
            spend_cap_usd=limits.spend_cap_usd,
        )

    async def _usage(self, conn: aiosqlite.Connection, requester: Requester, now: float) -> Usage:
        since = day_start(now)
        [(user_jobs, user_seconds)] = await _rows(
            conn,
            "SELECT COUNT(*), COALESCE(SUM(duration), 0) FROM jobs"
            " WHERE user_key = ? AND created_at >= ? AND refunded = 0",
            (requester.key, since),
        )
        [(user_active,)] = await _rows(
            conn,
            f"SELECT COUNT(*) FROM jobs WHERE user_key = ? AND state IN {_ACTIVE}",
            (requester.key,),
        )
        community_seconds = 0.0
        if requester.community_key:
            [(community_seconds,)] = await _rows(
                conn,
                "SELECT COALESCE(SUM(duration), 0) FROM jobs"
                " WHERE community_key = ? AND created_at >= ? AND refunded = 0",
                (requester.community_key, since),
            )
        spend = await _spend(conn, since)
        return Usage(
            int(user_jobs), float(user_seconds), int(user_active), float(community_seconds), spend
        )

    async def usage(
        self, requester: Requester, limits: Limits, now: float | None = None
    ) -> tuple[Usage, Limits]:
        """Current usage and the limits that apply to this requester."""
        now = time.time() if now is None else now
        async with self.db.read() as conn:
            return (
                await self._usage(conn, requester, now),
                await self._effective_limits(conn, requester, limits),
            )

    async def spend_since(self, since: float) -> float:
        async with self.db.read() as conn:
            return await _spend(conn, since)

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
        now = time.time() if now is None else now
        async with self.db.transaction() as conn:
            return await self._transition(conn, job_id, from_states, to_state, now, fields)

    async def _transition(
        self,
        conn: aiosqlite.Connection,
        job_id: str,
        from_states: tuple[str, ...],
        to_state: str,
        now: float,
        fields: dict[str, Any],
    ) -> bool:
        sets = ["state = ?", "updated_at = ?"]
        values: list[Any] = [to_state, now]
        for name, value in fields.items():
            sets.append(f"{name} = ?")
            values.append(_encode(name, value))
        marks = ",".join("?" * len(from_states))
        cur = await conn.execute(
            f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND state IN ({marks})",
            (*values, job_id, *from_states),
        )
        return cur.rowcount == 1

    async def update(self, job_id: str, **fields: Any) -> None:
        """Change fields without changing state (reply target, cancel flag)."""
        if not fields:
            return
        sets = ", ".join(f"{name} = ?" for name in fields)
        values = [_encode(name, value) for name, value in fields.items()]
        async with self.db.transaction() as conn:
            await conn.execute(
                f"UPDATE jobs SET {sets}, updated_at = ? WHERE id = ?",
                (*values, time.time(), job_id),
            )

    async def finish_success(
        self,
        job_id: str,
        provider: str,
        charged_usd: float,
        result: SongResult,
        now: float | None = None,
    ) -> bool:
        """running -> ready: the provider made the song; record the charge."""
        now = time.time() if now is None else now
        async with self.db.transaction() as conn:
            moved = await self._transition(
                conn,
                job_id,
                ("running",),
                "ready",
                now,
                {
                    "charged_usd": charged_usd,
                    "result": result,
                    "finished_at": now,
                    "provider": provider,
                },
            )
            if moved:
                job = await self._get(conn, job_id)
                assert job is not None
                await self._ledger(
                    conn, job_id, job.requester, "charge", job.duration, charged_usd, provider, now
                )
            return moved

    async def mark_delivered(self, job_id: str, now: float | None = None) -> bool:
        """ready -> delivered: the user has the song; the reservation is committed."""
        now = time.time() if now is None else now
        async with self.db.transaction() as conn:
            moved = await self._transition(
                conn, job_id, ("ready",), "delivered", now, {"delivered_at": now}
            )
            if moved:
                job = await self._get(conn, job_id)
                assert job is not None
                await self._ledger(
                    conn,
                    job_id,
                    job.requester,
                    "commit",
                    job.duration,
                    job.charged_usd or 0.0,
                    job.provider,
                    now,
                )
            return moved

    async def finish_unsuccessful(
        self,
        job_id: str,
        from_states: tuple[str, ...],
        to_state: str,
        error: str,
        now: float | None = None,
        *,
        failure: FailureKind | None = None,
        charged_usd: float | None = None,
    ) -> bool:
        """-> failed | cancelled with a refund of the user's and community's quota.

        `error` is the operator's detail, `failure` the kind users are told. A charge
        already made by a provider stays in the spend (the operator paid it);
        `charged_usd` records one made for a song the bot then could not keep.
        """
        now = time.time() if now is None else now
        fields: dict[str, Any] = {
            "error": error,
            "failure": failure,
            "refunded": 1,
            "finished_at": now,
        }
        if charged_usd is not None:
            fields["charged_usd"] = charged_usd
        async with self.db.transaction() as conn:
            moved = await self._transition(conn, job_id, from_states, to_state, now, fields)
            if moved:
                job = await self._get(conn, job_id)
                assert job is not None
                if charged_usd is not None:
                    await self._ledger(
                        conn,
                        job_id,
                        job.requester,
                        "charge",
                        job.duration,
                        charged_usd,
                        job.provider,
                        now,
                    )
                refund_usd = job.reserved_usd if job.charged_usd is None else 0.0
                await self._ledger(
                    conn,
                    job_id,
                    job.requester,
                    "refund",
                    job.duration,
                    refund_usd,
                    job.provider,
                    now,
                )
            return moved

    # ---- reads -----------------------------------------------------------------------

    async def get(self, job_id: str) -> Job | None:
        async with self.db.read() as conn:
            return await self._get(conn, job_id)

    async def _get(self, conn: aiosqlite.Connection, job_id: str) -> Job | None:
        rows = await _rows(conn, "SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    async def exists(self, job_id: str) -> bool:
        async with (
            self.db.read() as conn,
            conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)) as cur,
        ):
            return await cur.fetchone() is not None

    async def in_states(self, states: tuple[str, ...]) -> list[Job]:
        """Jobs in these states, oldest first."""
        marks = ",".join("?" * len(states))
        return await self._select(
            f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY created_at, id", states
        )

    async def for_user(
        self, user_key: str, states: tuple[str, ...] | None = None, limit: int = 50
    ) -> list[Job]:
        """A user's jobs, newest first."""
        if states:
            marks = ",".join("?" * len(states))
            return await self._select(
                f"SELECT * FROM jobs WHERE user_key = ? AND state IN ({marks})"
                " ORDER BY created_at DESC LIMIT ?",
                (user_key, *states, limit),
            )
        return await self._select(
            "SELECT * FROM jobs WHERE user_key = ? ORDER BY created_at DESC LIMIT ?",
            (user_key, limit),
        )

    async def recent(self, limit: int = 50, states: tuple[str, ...] | None = None) -> list[Job]:
        if states:
            marks = ",".join("?" * len(states))
            return await self._select(
                f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY created_at DESC LIMIT ?",
                (*states, limit),
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
        first: for operators finding who asked for what."""
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
        now = time.time() if now is None else now
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "UPDATE jobs SET deleted_at = ?, deleted_by = ?, updated_at = ?"
                " WHERE id = ? AND deleted_at IS NULL",
                (now, by, now, job_id),
            )
            return cur.rowcount == 1

    async def _select(self, sql: str, params: tuple[Any, ...]) -> list[Job]:
        async with self.db.read() as conn:
            rows = await _rows(conn, sql, params)
        return [_job(row) for row in rows]

    async def ledger(self, job_id: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM usage_ledger"
        params: tuple[Any, ...] = ()
        if job_id:
            sql += " WHERE job_id = ?"
            params = (job_id,)
        async with self.db.read() as conn, conn.execute(sql + " ORDER BY id", params) as cur:
            return [dict(row) for row in await cur.fetchall()]

    # ---- overrides and community settings -------------------------------------------

    async def get_overrides(self, scope: str, subject: str) -> dict[str, float]:
        async with self.db.read() as conn:
            return await _overrides(conn, scope, subject)

    async def set_override(self, scope: str, subject: str, key: str, value: float | None) -> None:
        """Set (or with None, remove) one limit override."""
        allowed = USER_KEYS if scope == "user" else COMMUNITY_KEYS
        if scope not in ("user", "community") or key not in allowed:
            raise ValueError(
                f"unknown limit {scope}.{key}; {scope} limits are " + ", ".join(allowed)
            )
        async with self.db.transaction() as conn:
            if value is None:
                await conn.execute(
                    "DELETE FROM limit_overrides WHERE scope = ? AND subject = ? AND key = ?",
                    (scope, subject, key),
                )
            else:
                await conn.execute(
                    "INSERT INTO limit_overrides (scope, subject, key, value, updated_at)"
                    " VALUES (?,?,?,?,?) ON CONFLICT (scope, subject, key)"
                    " DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                    (scope, subject, key, float(value), time.time()),
                )

    async def get_community_setting(self, community: str, name: str) -> Any:
        async with (
            self.db.read() as conn,
            conn.execute(
                "SELECT value FROM community_settings WHERE community = ? AND name = ?",
                (community, name),
            ) as cur,
        ):
            row = await cur.fetchone()
        return json.loads(row[0]) if row else None

    async def set_community_setting(self, community: str, name: str, value: Any) -> None:
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT INTO community_settings (community, name, value, updated_at)"
                " VALUES (?,?,?,?) ON CONFLICT (community, name)"
                " DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (community, name, json.dumps(value), time.time()),
            )

    # ---- operations (health, metrics, stats, retention): read-only -------------------

    async def count_by_state(self) -> list[tuple[str, str, int]]:
        """(state, provider or "", count) for every job in the database."""
        async with (
            self.db.read() as conn,
            conn.execute(
                "SELECT state, COALESCE(provider, ''), COUNT(*) FROM jobs"
                " GROUP BY state, COALESCE(provider, '')"
            ) as cur,
        ):
            return [(row[0], row[1], int(row[2])) for row in await cur.fetchall()]

    async def queue_depth(self) -> int:
        """Jobs admitted and waiting for a provider."""
        async with (
            self.db.read() as conn,
            conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'") as cur,
        ):
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def expired_jobs(self, job_ids: Iterable[str], cutoff: float) -> set[str]:
        """Those of `job_ids` whose job is finished for good (delivered, failed or
        cancelled) and was last touched before `cutoff`."""
        ids = sorted(set(job_ids))
        expired: set[str] = set()
        terminal = "('" + "','".join(TERMINAL_STATES) + "')"
        # SQLite limits bound parameters; chunk well below the lowest default (999).
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            async with (
                self.db.read() as conn,
                conn.execute(
                    f"SELECT id FROM jobs WHERE id IN ({marks}) AND state IN {terminal}"
                    " AND COALESCE(delivered_at, finished_at, updated_at) < ?",
                    (*chunk, cutoff),
                ) as cur,
            ):
                expired.update(row[0] for row in await cur.fetchall())
        return expired

    async def stats(self, since: float) -> dict[str, list[StatsRow]]:
        """Songs delivered, their seconds and the spend since `since`, grouped by
        community, user and provider (each list biggest spender first)."""
        out: dict[str, list[StatsRow]] = {}
        columns = {
            "community": "COALESCE(community_key, '(direct messages)')",
            "user": "user_key",
            "provider": "COALESCE(provider, '(none)')",
        }
        for group, column in columns.items():
            async with (
                self.db.read() as conn,
                conn.execute(
                    f"SELECT {column} AS k,"
                    " SUM(state = 'delivered'),"
                    " COALESCE(SUM(CASE WHEN state = 'delivered' THEN"
                    "   COALESCE(json_extract(result, '$.duration'), duration) END), 0),"
                    " COALESCE(SUM(charged_usd), 0),"
                    " SUM(state IN ('failed', 'cancelled')),"
                    " COUNT(*)"
                    f" FROM jobs WHERE created_at >= ? GROUP BY k"
                    " ORDER BY 4 DESC, 2 DESC, k",
                    (since,),
                ) as cur,
            ):
                out[group] = [
                    StatsRow(
                        str(r[0]),
                        int(r[1] or 0),
                        float(r[2]),
                        float(r[3]),
                        int(r[4] or 0),
                        int(r[5]),
                    )
                    for r in await cur.fetchall()
                ]
        return out

    # ---- internals -------------------------------------------------------------------

    async def _ledger(
        self,
        conn: aiosqlite.Connection,
        job_id: str,
        requester: Requester,
        kind: str,
        seconds: float,
        usd: float,
        provider: str | None,
        now: float,
    ) -> None:
        await conn.execute(
            "INSERT INTO usage_ledger (job_id, user_key, community_key, kind, seconds, usd,"
            " provider, at) VALUES (?,?,?,?,?,?,?,?)",
            (job_id, requester.key, requester.community_key, kind, seconds, usd, provider, now),
        )


def _check(limit: str, value: float | None, used: float, needed: float) -> None:
    if value is not None and used + needed > value + 1e-9:
        raise QuotaRefusal(limit, value, used, needed)


async def _spend(conn: aiosqlite.Connection, since: float) -> float:
    # A provider's charge counts once made; an active job counts its reservation.
    rows = await _rows(
        conn,
        "SELECT COALESCE(SUM(CASE WHEN charged_usd IS NOT NULL THEN charged_usd"
        " WHEN refunded = 0 THEN reserved_usd ELSE 0 END), 0)"
        " FROM jobs WHERE created_at >= ?",
        (since,),
    )
    return float(rows[0][0]) if rows else 0.0


async def _overrides(
    conn: aiosqlite.Connection, scope: str, subject: str | None
) -> dict[str, float]:
    rows = await _rows(
        conn,
        "SELECT key, value FROM limit_overrides WHERE scope = ? AND subject = ?",
        (scope, subject),
    )
    return {row[0]: float(row[1]) for row in rows}


async def _rows(
    conn: aiosqlite.Connection, sql: str, params: tuple[Any, ...] = ()
) -> list[aiosqlite.Row]:
    """Execute and fetch in one trip to aiosqlite's thread (a cursor costs three: execute,
    fetch, close). Every trip waits for a thread hand-off, under the database lock."""
    return list(await conn.execute_fetchall(sql, params))


_JSON_FIELDS = {"result", "reply_target", "tried_providers"}


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


def _job(row: aiosqlite.Row) -> Job:
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
    )
