"""The SQLite store's costs and records: per-day counters kept with every change and equal
to the job rows, indexes under every hot query, reads that never wait for a write, and
an upgrade that keeps a live database's usage exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.models import Job, Requester
from bot.requests import GenerationRequest
from storage.database import Database, _statements, migrations
from storage.jobs import JobStore, Limits, QuotaRefusal, day_start
from tests.conftest import open_db
from tests.opskit import DAY, UNLIMITED, seed_job

NOON = 1_790_000_000.0 - (1_790_000_000.0 % 86400) + 12 * 3600  # a UTC noon
ALICE = Requester("discord", "100", "guild1", "alice")
BOB = Requester("discord", "200", "guild1", "bob")
CAROL = Requester("telegram", "300", None, "carol")


def new_job(job_id: str, who: Requester, duration: int = 10, usd: float = 0.002) -> Job:
    request = GenerationRequest.build(mode="prompt", prompt="test", duration=duration)
    return Job(
        id=job_id,
        requester=who,
        reply_target={},
        request=request,
        seed=1,
        state="queued",
        reserved_usd=usd,
    )


def usage_from_rows(path: Path, who: Requester, now: float) -> tuple[int, float, int, float, float]:
    """What the schema before the counters summed over the job rows at every admission
    (storage/jobs.py before them), for the UTC day holding `now`: the definition the
    counters must keep. (It summed from the day's start on: the same at the present.)"""
    since = day_start(now)
    today = "created_at >= :since AND created_at < :until AND refunded = 0"
    spent = (
        "CASE WHEN charged_usd IS NOT NULL THEN charged_usd"
        " WHEN refunded = 0 THEN reserved_usd ELSE 0 END"
    )
    conn = sqlite3.connect(str(path))
    try:
        sums = conn.execute(
            "SELECT"
            f" (SELECT COUNT(*) FROM jobs WHERE user_key = :user AND {today}),"
            f" (SELECT COALESCE(SUM(duration), 0) FROM jobs WHERE user_key = :user AND {today}),"
            " (SELECT COUNT(*) FROM jobs WHERE user_key = :user"
            "   AND state IN ('queued','submitting','running','ready')),"
            " (SELECT COALESCE(SUM(duration), 0) FROM jobs"
            f"   WHERE community_key = :community AND {today}),"
            f" (SELECT COALESCE(SUM({spent}), 0) FROM jobs"
            "   WHERE created_at >= :since AND created_at < :until)",
            {"user": who.key, "community": who.community_key, "since": since, "until": since + DAY},
        ).fetchone()
    finally:
        conn.close()
    return int(sums[0]), float(sums[1]), int(sums[2]), float(sums[3]), float(sums[4])


async def usage_from_counters(
    store: JobStore, who: Requester, now: float
) -> tuple[int, float, int, float, float]:
    usage, _ = await store.usage(who, UNLIMITED, now=now)
    return (
        usage.user_jobs,
        usage.user_seconds,
        usage.user_active,
        usage.community_seconds,
        usage.spend_usd,
    )


# ---- counters == ledger, whatever happens to the jobs --------------------------------

# One step: (job number, what happens to it, hours after NOON-1 day it happens).
STEPS = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=7),
        st.sampled_from(
            [
                "admit",
                "submit",
                "run",
                "finish",
                "deliver",
                "fail",
                "cancel",
                "requeue",
                "lose",
                "credit",
                "cancel_late",
            ]
        ),
        st.integers(min_value=0, max_value=40),
    ),
    min_size=1,
    max_size=40,
)
WHO = [ALICE, BOB, CAROL]


async def apply_steps(store: JobStore, steps: list[tuple[int, str, int]]) -> None:
    """Drive jobs through the store the way the engine does, in any order; a step a job
    is not ready for changes nothing (as in the engine)."""
    for number, action, hours in steps:
        job_id = f"job{number}"
        at = NOON - DAY + hours * 3600
        who = WHO[number % len(WHO)]
        if action == "admit":
            try:
                await store.admit(
                    new_job(job_id, who, duration=5 + number, usd=0.001 * (number + 1)),
                    Limits(None, 60, 3, 90, None),
                    bypass_quotas=False,
                    now=at,
                )
            except (QuotaRefusal, sqlite3.IntegrityError, psycopg.IntegrityError):
                pass  # refused, or that job number was admitted already
        elif action == "submit":  # a run starts, charged at once (under a spend cap)
            with contextlib.suppress(QuotaRefusal):
                await store.start_run(job_id, "fal", 0.0005 * (number + 1), 0.02, at, attempts=1)
        elif action == "run":
            await store.transition(job_id, ("submitting",), "running", at, handle="{}")
        elif action == "finish":
            result = {"duration": 4.5 + number, "audio_file": f"{job_id}.wav"}
            await store.finish_success(job_id, "fal", 0.0005 * (number + 1), result, now=at)
        elif action == "deliver":
            await store.mark_delivered(job_id, now=at)
        elif action == "fail":
            await store.finish_unsuccessful(
                job_id, ("queued", "submitting", "running", "ready"), "failed", "boom", now=at
            )
        elif action == "cancel":
            await store.finish_unsuccessful(
                job_id, ("queued", "running"), "cancelled", "Cancelled.", now=at
            )
        elif action == "requeue":  # failover: back to the queue, provider forgotten
            await store.transition(
                job_id, ("submitting", "running"), "queued", at, provider=None, handle=None
            )
        elif action == "lose":  # the song was made and billed, but could not be kept
            await store.finish_unsuccessful(
                job_id, ("running",), "failed", "audio not stored", now=at
            )
        elif action == "credit":  # the provider confirmed it will not bill the run
            await store.credit_run(job_id, 0.0005 * (number + 1), "fal", now=at)
        elif action == "cancel_late":  # cancelled after the provider began: quota kept
            await store.finish_unsuccessful(
                job_id, ("running",), "cancelled", "cancelled", now=at, refund_quota=False
            )


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=STEPS)
def test_counters_equal_the_job_rows_after_any_sequence_of_changes(
    tmp_path: Path, steps: list[tuple[int, str, int]]
) -> None:
    async def run() -> list[str]:
        path = tmp_path / f"db-{time.monotonic_ns()}.sqlite3"
        db = await Database.open(path)
        store = JobStore(db)
        try:
            await apply_steps(store, steps)
            # What admission reads equals what was summed from the rows before, for
            # each user, their community and the spend, on both days.
            for who in WHO:
                for now in (NOON - DAY + 1, NOON + 3600):
                    assert await usage_from_counters(store, who, now) == pytest.approx(
                        usage_from_rows(path, who, now)
                    ), (who.key, now)
            return await store.usage_mismatches()
        finally:
            await db.close()

    assert asyncio.run(run()) == []


async def test_db_check_names_a_counter_that_differs_from_the_rows(
    tmp_path: Path, db_url: str | None
) -> None:
    path = tmp_path / "bot.sqlite3"
    db = await open_db(db_url, path)
    store = JobStore(db)
    try:
        await seed_job(store, ALICE, at=NOON, state="delivered", duration=30)
        assert await store.usage_mismatches() == []
        # Someone edits the counters by hand (or a bug skips one).
        edit = (
            "UPDATE usage_daily SET quota_seconds = quota_seconds + 5"
            " WHERE scope = 'user' AND subject = 'discord:100'"
        )
        if db_url:
            import psycopg

            with psycopg.connect(db_url, autocommit=True) as pg:
                pg.execute(edit)
        else:
            conn = sqlite3.connect(str(path))
            conn.execute(edit)
            conn.commit()
            conn.close()
        problems = await store.usage_mismatches()
    finally:
        await db.close()
    assert len(problems) == 1
    assert problems[0].startswith(f"user discord:100 on day {int(NOON // DAY)}:")
    assert "quota_seconds=35" in problems[0] and "quota_seconds=30" in problems[0]


# ---- indexes under every hot query ---------------------------------------------------


async def test_every_hot_query_is_answered_from_an_index(tmp_path: Path) -> None:
    """Every statement admission, the engine's transitions and reads, /metrics, /queue,
    /history and `stats` run is a keyed search, never a scan of a table (an ordered walk
    of an index that a LIMIT stops is fine): their cost does not grow with the history."""
    path = tmp_path / "bot.sqlite3"
    db = await Database.open(path)
    store = JobStore(db)
    statements: list[str] = []
    await db.write(lambda conn: conn.set_trace_callback(statements.append))
    await db.read(lambda conn: conn.set_trace_callback(statements.append))
    now = time.time()
    try:
        for state in ("delivered", "failed", "cancelled", "queued", "running", "ready"):
            await seed_job(store, ALICE, at=now - 3600, state=state)
        await store.admit(new_job("fresh1", BOB), Limits(9, 999, 9, 999, 9), bypass_quotas=False)
        await store.admit(new_job("fresh2", CAROL), UNLIMITED, bypass_quotas=True)
        await store.update("fresh1", reply_target={"chat": 1})
        await store.finish_unsuccessful("fresh2", ("queued",), "cancelled", "Cancelled.")
        await store.usage(ALICE, UNLIMITED)
        await store.by_source_key("telegram:update:1")
        await store.get("fresh1")
        await store.in_states(("queued",))
        await store.in_states(("submitting", "running", "ready"))
        await store.for_user(ALICE.key, ("queued", "submitting", "running", "ready"))
        await store.for_user(ALICE.key, ("delivered",), limit=10)
        await store.recent(20)
        await store.gauges()
        await store.stats(now - 7 * DAY, top=20)
        await store.expired_jobs(["fresh1", "fresh2"], now)
        await store.check_writable()
    finally:
        await db.close()
    conn = sqlite3.connect(str(path))
    scans = {}
    checked = 0
    try:
        for sql in set(statements):
            if not sql.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE", "INSERT")):
                continue
            checked += 1
            plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql)]
            # A scan of a table is a walk over all of it or of an index; one in index
            # order that a LIMIT stops (the newest jobs) is the one kind allowed. (A scan
            # of "(subquery-N)" walks an intermediate result, not stored rows.)
            full = [
                step
                for step in plan
                if step.startswith("SCAN ")
                and not step.startswith("SCAN (")
                and not ("USING" in step and "LIMIT" in sql)
            ]
            if full:
                scans[sql] = plan
    finally:
        conn.close()
    assert checked >= 20, statements
    assert scans == {}


# ---- reads beside writes --------------------------------------------------------------


async def test_reads_answer_while_an_admission_waits_for_the_write_lock(tmp_path: Path) -> None:
    """Another process (the CLI, a backup tool) holds the write lock: an admission waits
    for it, but /metrics, /queue, /quota and `stats` reads answer meanwhile."""
    path = tmp_path / "bot.sqlite3"
    db = await Database.open(path, busy_timeout_ms=10_000)
    store = JobStore(db)
    await seed_job(store, ALICE, at=time.time() - 60, state="running")
    blocker = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        admission = asyncio.create_task(
            store.admit(new_job("waiting", BOB), UNLIMITED, bypass_quotas=False)
        )
        await asyncio.sleep(0.2)  # the admission is in SQLite's busy wait now
        gauges = await store.gauges()
        queue = await store.for_user(ALICE.key, ("queued", "submitting", "running", "ready"))
        usage, _ = await store.usage(ALICE, UNLIMITED)
        stats = await store.stats(time.time() - DAY)
        answered_while_waiting = not admission.done()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert await admission is None
    await db.close()
    assert answered_while_waiting
    assert ("running", "fal", 1) in gauges.jobs
    assert [j.state for j in queue] == ["running"]
    assert usage.user_active == 1
    assert [row.key for row in stats.groups["user"]] == [ALICE.key]


# ---- upgrading a live database --------------------------------------------------------


# The migration that adds the counters, and so the schema version just before it.
COUNTERS_VERSION = next(v for v, name, _ in migrations() if name.endswith("_usage_daily.sql"))


def database_before_counters(path: Path, rows: list[dict[str, Any]]) -> None:
    """A database as the schema version before the counters left it, with these job rows."""
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute(
        "CREATE TABLE schema_migrations "
        "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    for version, name, sql in migrations():
        if version >= COUNTERS_VERSION:
            break
        for statement in _statements(sql):
            conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (version, name, NOON))
    for row in rows:
        names = ", ".join(row)
        conn.execute(
            f"INSERT INTO jobs ({names}) VALUES ({', '.join('?' * len(row))})", tuple(row.values())
        )
    conn.close()


def old_row(job_id: str, who: Requester, at: float, state: str, **extra: Any) -> dict[str, Any]:
    request = GenerationRequest.build(
        mode="prompt", prompt="old", duration=extra.get("duration", 20)
    )
    row: dict[str, Any] = {
        "id": job_id,
        "platform": who.platform,
        "user_id": who.user_id,
        "user_key": who.key,
        "community_key": who.community_key,
        "reply_target": "{}",
        "request": request.model_dump_json(),
        "duration": request.duration,
        "seed": 1,
        "state": state,
        "reserved_usd": 0.004,
        "created_at": at,
        "updated_at": at,
    }
    row.update({k: v for k, v in extra.items() if k != "duration"})
    return row


async def test_upgrade_builds_the_counters_so_todays_usage_stays_exact(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    result = json.dumps({"duration": 19.5, "audio_file": "x.wav"})
    database_before_counters(
        path,
        [
            # today: two songs of Alice's, one refunded failure, one in progress
            old_row(
                "a1",
                ALICE,
                NOON - 3600,
                "delivered",
                provider="fal",
                charged_usd=0.0039,
                result=result,
            ),
            old_row("a2", ALICE, NOON - 1800, "failed", refunded=1, provider="fal"),
            old_row("a3", ALICE, NOON - 60, "running", provider="fal", duration=30),
            old_row("b1", BOB, NOON - 600, "queued", duration=40),
            # a song made and billed that could not be posted: refunded, charge kept
            old_row(
                "b2", BOB, NOON - 500, "failed", refunded=1, provider="fal", charged_usd=0.0041
            ),
            old_row("c1", CAROL, NOON - 100, "cancelled", refunded=1),
            # yesterday: counts in stats, not in today's quotas
            old_row(
                "y1",
                ALICE,
                NOON - DAY,
                "delivered",
                provider="replicate",
                charged_usd=0.5,
                result=result,
            ),
        ],
    )
    before = {who.key: usage_from_rows(path, who, NOON) for who in WHO}
    db = await Database.open(path)  # applies the counters' migration as the bot does at start
    store = JobStore(db)
    try:
        assert await db.schema_version() == migrations()[-1][0]
        after = {who.key: await usage_from_counters(store, who, NOON) for who in WHO}
        for key, used in before.items():
            assert after[key] == pytest.approx(used), key
        assert after[ALICE.key][:2] == (2, 50)  # a1 and a3; a2 was refunded
        assert await store.usage_mismatches() == []
        # Alice's seconds are where the old schema had them: 10 more fit 60 s, 11 do not.
        limits = Limits(None, 60, None, None, None)
        with pytest.raises(QuotaRefusal) as refused:
            await store.admit(
                new_job("a4", ALICE, duration=11), limits, bypass_quotas=False, now=NOON
            )
        assert (refused.value.limit, refused.value.remaining) == ("user_seconds_per_day", 10)
        await store.admit(new_job("a5", ALICE, duration=10), limits, bypass_quotas=False, now=NOON)
        stats = await store.stats(NOON - DAY)
        gauges = await store.gauges(now=NOON)
    finally:
        await db.close()
    by_provider = {row.key: row for row in stats.groups["provider"]}
    assert (by_provider["replicate"].songs, by_provider["fal"].songs) == (1, 1)
    assert by_provider["fal"].seconds == 19.5 and by_provider["fal"].spend_usd == pytest.approx(
        0.008
    )
    assert ("delivered", "fal", 1) in gauges.jobs and ("queued", "", 2) in gauges.jobs


async def test_the_log_is_copied_into_the_database_file_beside_the_writes(
    tmp_path: Path,
) -> None:
    """WAL checkpoints run on their own thread every hundred writes, never inside an
    admission's commit (where they cost tens of ms): the database file takes the new
    pages while the writer's own checkpoint threshold is far from reached."""
    path = tmp_path / "bot.sqlite3"
    db = await Database.open(path)
    store = JobStore(db)
    empty = path.stat().st_size
    try:
        for n in range(300):
            await store.admit(new_job(f"job{n:03d}", ALICE), UNLIMITED, bypass_quotas=True)
        if db._checkpoint is not None:  # the last one may still be copying
            await db._checkpoint
        [(threshold,)] = await db.write(
            lambda conn: conn.execute("PRAGMA wal_autocheckpoint").fetchall()
        )
        [(pages,)] = await db.read(lambda conn: conn.execute("PRAGMA page_count").fetchall())
        size = path.stat().st_size  # before closing, which checkpoints anyway
    finally:
        await db.close()
    # The writer alone would not have checkpointed: the whole database is far smaller than
    # its threshold. Yet the file holds the pages.
    assert threshold > 4 * pages
    assert size > max(10 * empty, pages * 4096 // 2)


async def test_the_update_inbox_keeps_each_update_until_it_was_handled(
    tmp_path: Path, db_url: str | None
) -> None:
    store = JobStore(await open_db(db_url, tmp_path / "bot.db"))
    try:
        tg, other = "telegram:7", "telegram:8"
        await store.inbox.keep(tg, [(5, '{"update_id": 5}'), (4, '{"update_id": 4}')])
        await store.inbox.keep(other, [(5, '{"other": true}')])
        # Kept again (Telegram repeated an unconfirmed batch): stays as first kept.
        await store.inbox.keep(tg, [(5, '{"update_id": 5, "again": true}')])
        assert await store.inbox.pending(tg) == [(4, '{"update_id": 4}'), (5, '{"update_id": 5}')]
        # One transaction: the handled ones go, the new batch comes.
        await store.inbox.keep(tg, [(6, '{"update_id": 6}')], handled=[4, 5])
        assert await store.inbox.pending(tg) == [(6, '{"update_id": 6}')]
        assert await store.inbox.pending(other) == [(5, '{"other": true}')]
        await store.inbox.keep(tg, [], handled=[6])
        assert await store.inbox.pending(tg) == []
    finally:
        await store.close()


async def test_an_urgent_write_goes_ahead_of_the_writes_already_waiting(
    tmp_path: Path, db_url: str | None
) -> None:
    # A Telegram batch is kept with an urgent write: polling must not wait behind the
    # admissions the last batch queued.
    db = await open_db(db_url, tmp_path / "bot.db")
    try:
        done: list[str] = []

        def slow(name: str) -> Any:
            def fn(conn: Any) -> None:
                time.sleep(0.05)
                done.append(name)

            return fn

        queued = [asyncio.ensure_future(db.write(slow(f"queued {i}"))) for i in range(10)]
        await asyncio.sleep(0.01)  # the first is running
        await db.write(slow("urgent"), exclusive=False, urgent=True)
        await asyncio.gather(*queued)
        assert done.index("urgent") <= 2  # after the one running, before the rest
        assert len(done) == 11
    finally:
        await db.close()
