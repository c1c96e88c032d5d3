"""Operator commands as run from a shell: `db backup`, `db prune`, `db check`, `audio prune`,
`stats`."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from bot.models import Requester
from bot.retention import prune_audio, prune_jobs
from storage.database import Database
from storage.jobs import JobStore
from tests.conftest import make_settings, open_db, pg_env
from tests.opskit import DAY, seed_job
from tests.test_cli import cli_env, run_cli

ALICE = Requester("discord", "100", "guild1", "alice")
BOB = Requester("telegram", "200", "chat7", "bob")
CAROL = Requester("discord", "300", None, "carol")


def write_audio(audio_dir: Path, *names: str) -> None:
    audio_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        (audio_dir / name).write_bytes(b"RIFF" + b"\0" * 100)


# ---- retention -------------------------------------------------------------------------


async def test_retention_removes_only_audio_of_jobs_finished_long_ago(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, audio_retention_days=30)
    now = time.time()
    db = await Database.open(settings.db_path)
    store = JobStore(db)
    try:
        old_delivered = await seed_job(store, ALICE, at=now - 40 * DAY, state="delivered")
        old_failed = await seed_job(store, BOB, at=now - 45 * DAY, state="failed")
        recent = await seed_job(store, ALICE, at=now - 10 * DAY, state="delivered")
        # Finished 40 days ago but never posted (its front-end was off): still needed.
        unposted = await seed_job(store, BOB, at=now - 40 * DAY, state="ready")
        stuck = await seed_job(store, CAROL, at=now - 50 * DAY, state="running")
        audio = settings.audio_dir
        write_audio(
            audio,
            f"{old_delivered.id}.wav",
            f"{old_delivered.id}.10485760.mp3",
            f"{old_delivered.id}.any.flac",
            f"{old_failed.id}.mp3.part",
            f"{recent.id}.wav",
            f"{recent.id}.any.mp3",
            f"{unposted.id}.wav",
            f"{stuck.id}.wav",
            "0badc0de.wav",
            "README.txt",
        )
        report = await prune_audio(settings, store, now=now)
        left = sorted(p.name for p in audio.iterdir())
        # With 0 days everything is kept, even what is years old.
        kept_all = await prune_audio(
            make_settings(tmp_path, audio_retention_days=0), store, now=now + 10_000 * DAY
        )
    finally:
        await db.close()
    assert (report.jobs, report.files) == (2, 4)
    assert report.bytes == 4 * 104
    assert left == sorted(
        [
            f"{recent.id}.wav",
            f"{recent.id}.any.mp3",
            f"{unposted.id}.wav",
            f"{stuck.id}.wav",
            "0badc0de.wav",
            "README.txt",
        ]
    )
    assert kept_all.files == 0


async def test_audio_prune_command(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    now = time.time()
    db = await Database.open(settings.db_path)
    try:
        store = JobStore(db)
        old = await seed_job(store, ALICE, at=now - 9 * DAY, state="delivered")
        new = await seed_job(store, ALICE, at=now - 2 * DAY, state="cancelled")
    finally:
        await db.close()
    write_audio(settings.audio_dir, f"{old.id}.wav", f"{old.id}.any.mp3", f"{new.id}.wav")
    env = cli_env(tmp_path, AUDIO_RETENTION_DAYS="30")
    code, out, err = await run_cli(["audio", "prune"], env, tmp_path)
    assert code == 0, err
    assert "removed 0 files" in out and "more than 30 days ago" in out
    code, out, err = await run_cli(["audio", "prune", "--days", "7"], env, tmp_path)
    assert code == 0, err
    assert "removed 2 files (0.0 MB) of 1 jobs finished more than 7 days ago" in out
    assert sorted(p.name for p in settings.audio_dir.iterdir()) == [f"{new.id}.wav"]
    code, out, _ = await run_cli(
        ["audio", "prune"], cli_env(tmp_path, AUDIO_RETENTION_DAYS="0"), tmp_path
    )
    assert code == 0 and "kept; nothing removed" in out
    code, _, err = await run_cli(["audio", "prune", "--days", "0"], env, tmp_path)
    assert code == 2 and "days: 0 is not valid" in err


# ---- backup ----------------------------------------------------------------------------


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def test_backup_of_a_busy_database_opens_and_matches(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    db = await Database.open(settings.db_path)
    store = JobStore(db)
    for i in range(200):
        await seed_job(store, ALICE if i % 2 else BOB, at=time.time(), state="queued")
    written = 200
    stop = asyncio.Event()

    async def writer() -> None:
        nonlocal written
        while not stop.is_set():  # admissions as fast as the database takes them
            await seed_job(store, CAROL, at=time.time(), state="queued")
            written += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(writer())
    try:
        await asyncio.sleep(0.05)
        before = written
        dest = tmp_path / "backups" / "bot.sqlite3"
        code, out, err = await run_cli(["db", "backup", str(dest)], cli_env(tmp_path), tmp_path)
        during = written - before
    finally:
        stop.set()
        await task
    assert code == 0, err
    assert during > 10, "the writer kept writing while the backup ran"
    assert out.startswith(f"backed up {settings.db_path} to {dest}:")
    assert "integrity ok" in out
    assert rows(dest, "PRAGMA integrity_check") == [("ok",)]
    assert rows(dest, "PRAGMA journal_mode") == [("delete",)]  # one self-contained file
    assert not list(dest.parent.glob("*.partial"))
    # One snapshot: exactly the first N admissions, each with its ledger row, unchanged.
    order = "SELECT * FROM jobs ORDER BY rowid"
    copied = rows(dest, order)
    live = rows(settings.db_path, order)
    assert 200 <= len(copied) <= len(live) == written
    assert copied == live[: len(copied)]
    assert f"{len(copied)} jobs" in out
    ledger = "SELECT job_id, kind FROM usage_ledger ORDER BY id"
    assert rows(dest, ledger) == rows(settings.db_path, ledger)[: len(copied)]
    # Quiet now: a second backup into a directory is the database exactly.
    code, out, err = await run_cli(["db", "backup", str(dest.parent)], cli_env(tmp_path), tmp_path)
    await db.close()
    assert code == 0, err
    [second] = [p for p in dest.parent.iterdir() if p.name.startswith("acestep-bot-")]
    assert rows(second, order) == rows(settings.db_path, order)
    assert rows(second, "SELECT MAX(version) FROM schema_migrations") == rows(
        settings.db_path, "SELECT MAX(version) FROM schema_migrations"
    )


async def test_backup_refuses_the_live_database_and_a_missing_one(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    code, _, err = await run_cli(["db", "backup", str(tmp_path / "b.sqlite3")], env, tmp_path)
    assert code == 1 and "no database at" in err
    db = await Database.open(make_settings(tmp_path).db_path)
    await db.close()
    live = tmp_path / "data" / "acestep-bot.sqlite3"
    code, _, err = await run_cli(["db", "backup", str(live)], env, tmp_path)
    assert code == 1 and "the live database itself" in err


# ---- stats -----------------------------------------------------------------------------


async def test_stats_by_community_user_and_provider(tmp_path: Path, db_url: str | None) -> None:
    settings = make_settings(tmp_path)
    now = time.time()
    db = await open_db(db_url, settings.db_path)
    try:
        store = JobStore(db)
        await seed_job(store, ALICE, at=now - DAY, state="delivered", duration=30, charged=0.05)
        await seed_job(
            store,
            ALICE,
            at=now - 2 * DAY,
            state="delivered",
            duration=60,
            provider="replicate",
            charged=0.5,
        )
        await seed_job(store, BOB, at=now - 3 * DAY, state="delivered", duration=20, charged=0.01)
        await seed_job(store, BOB, at=now - DAY, state="failed", provider=None)
        await seed_job(
            store,
            CAROL,
            at=now - 3600,
            state="delivered",
            duration=10,
            provider="acestep",
            charged=0.0,
        )
        await seed_job(
            store, CAROL, at=now - 20 * DAY, state="delivered", duration=240, charged=9.0
        )  # outside a 7-day window
    finally:
        await db.close()
    code, out, err = await run_cli(
        ["stats", "--days", "7"], cli_env(tmp_path, **pg_env(db_url)), tmp_path
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("Last 7 days (since ")
    assert lines[1] == (
        "Total: 4 songs, 2.0 minutes, $0.5600 spent, 1 failed or cancelled, 5 admitted"
    )

    def table(group: str) -> list[list[str]]:
        start = lines.index(next(line for line in lines if line.startswith(f"BY {group}")))
        body = []
        for line in lines[start + 1 :]:
            if not line:
                break
            body.append(line.split())
        return body

    assert table("COMMUNITY") == [
        ["discord:guild1", "2", "90", "0.5500", "0", "2"],
        ["telegram:chat7", "1", "20", "0.0100", "1", "2"],
        ["(direct", "messages)", "1", "10", "0.0000", "0", "1"],
    ]
    assert table("USER") == [
        ["discord:100", "2", "90", "0.5500", "0", "2"],
        ["telegram:200", "1", "20", "0.0100", "1", "2"],
        ["discord:300", "1", "10", "0.0000", "0", "1"],
    ]
    assert table("PROVIDER") == [
        ["replicate", "1", "60", "0.5000", "0", "1"],
        ["fal", "2", "50", "0.0600", "0", "2"],
        ["acestep", "1", "10", "0.0000", "0", "1"],
        ["(none)", "0", "0", "0.0000", "1", "1"],
    ]
    code, out, _ = await run_cli(
        ["stats", "--days", "30", "--top", "1"], cli_env(tmp_path, **pg_env(db_url)), tmp_path
    )
    assert code == 0
    assert "Total: 5 songs, 6.0 minutes, $9.5600 spent" in out
    assert "... and 2 more" in out
    code, _, err = await run_cli(
        ["stats", "--top", "0"], cli_env(tmp_path, **pg_env(db_url)), tmp_path
    )
    assert code == 2 and "top: 0 is not valid; 1 or more" in err


# ---- job rows: retention and the counters check --------------------------------------


def table_counts(path: Path) -> tuple[int, int]:
    """(job rows, ledger lines) in the file, as an operator's sqlite3 shell sees them."""
    [(jobs,)] = rows(path, "SELECT COUNT(*) FROM jobs")
    [(ledger,)] = rows(path, "SELECT COUNT(*) FROM usage_ledger")
    return int(str(jobs)), int(str(ledger))


async def test_db_prune_deletes_old_finished_rows_and_stats_still_count_them(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path)
    now = time.time()
    db = await Database.open(settings.db_path)
    try:
        store = JobStore(db)
        old = await seed_job(store, ALICE, at=now - 120 * DAY, state="delivered", duration=30)
        old_failed = await seed_job(store, BOB, at=now - 100 * DAY, state="failed")
        # Finished long ago but never posted (its front-end was off): still to deliver.
        unposted = await seed_job(store, BOB, at=now - 100 * DAY, state="ready")
        recent = await seed_job(store, CAROL, at=now - 10 * DAY, state="delivered")
    finally:
        await db.close()
    write_audio(settings.audio_dir, f"{old.id}.wav", f"{old.id}.any.mp3", f"{unposted.id}.wav")
    jobs_before, ledger_before = table_counts(settings.db_path)
    env = cli_env(tmp_path)  # JOB_RETENTION_DAYS defaults to 90

    code, out, err = await run_cli(["db", "prune"], env, tmp_path)
    assert code == 0, err
    assert out.strip() == (
        "removed 2 finished job rows admitted more than 90 days ago "
        "(and 2 audio files, 0.0 MB); their totals stay in stats"
    )
    # The rows and their ledger lines are gone, and so is their audio.
    jobs_after, ledger_after = table_counts(settings.db_path)
    assert jobs_after == jobs_before - 2 == 2
    assert ledger_after < ledger_before
    assert rows(settings.db_path, "SELECT id FROM jobs ORDER BY id") == sorted(
        [(unposted.id,), (recent.id,)]
    )
    assert sorted(p.name for p in settings.audio_dir.iterdir()) == [f"{unposted.id}.wav"]
    code, _, err = await run_cli(["jobs", "show", old.id], env, tmp_path)
    assert code == 1 and f"no job '{old.id}'" in err
    assert old_failed.id  # gone too, with its row

    # A year of stats still counts the deleted songs: the daily totals keep them.
    code, out, err = await run_cli(["stats", "--days", "365"], env, tmp_path)
    assert code == 0, err
    assert out.splitlines()[1] == (
        "Total: 2 songs, 0.7 minutes, $0.0100 spent, 1 failed or cancelled, 4 admitted"
    )
    # The counters still equal the rows for every day whose rows are all there.
    code, out, err = await run_cli(["db", "check"], env, tmp_path)
    assert (code, out.strip()) == (0, "usage counters match the job rows"), err

    code, out, _ = await run_cli(
        ["db", "prune"], cli_env(tmp_path, JOB_RETENTION_DAYS="0"), tmp_path
    )
    assert code == 0 and "JOB_RETENTION_DAYS is 0" in out and "nothing removed" in out
    code, _, err = await run_cli(["db", "prune", "--days", "0"], env, tmp_path)
    assert code == 2 and "days: 0 is not valid; 1 or more" in err
    assert table_counts(settings.db_path)[0] == 2


async def test_job_retention_runs_in_batches_and_keeps_active_and_recent_rows(
    tmp_path: Path, db_url: str | None
) -> None:
    settings = make_settings(tmp_path, job_retention_days=30)
    now = time.time()
    db = await open_db(db_url, settings.db_path)
    store = JobStore(db)
    try:
        for n in range(7):
            await seed_job(store, ALICE, at=now - (40 + n) * DAY, state="delivered")
        queued = await seed_job(store, BOB, at=now - 45 * DAY, state="queued")
        fresh = await seed_job(store, BOB, at=now - 29 * DAY, state="cancelled")
        report = await prune_jobs(settings, store, now=now, batch=3)
        left = {job.id for job in await store.recent(100)}
        mismatches = await store.usage_mismatches()
        stats = await store.stats(now - 60 * DAY)
    finally:
        await db.close()
    assert report.jobs == 7
    assert left == {queued.id, fresh.id}
    assert mismatches == []
    alice = next(row for row in stats.groups["user"] if row.key == ALICE.key)
    assert (alice.songs, alice.jobs) == (7, 7)


async def test_db_check_fails_naming_counters_that_differ_from_the_rows(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    db = await Database.open(settings.db_path)
    try:
        await seed_job(JobStore(db), ALICE, at=time.time(), state="delivered", duration=20)
    finally:
        await db.close()
    conn = sqlite3.connect(str(settings.db_path))
    conn.execute("UPDATE usage_daily SET quota_jobs = 3 WHERE scope = 'user'")
    conn.commit()
    conn.close()
    code, out, err = await run_cli(["db", "check"], cli_env(tmp_path), tmp_path)
    assert code == 1, err
    lines = out.splitlines()
    assert lines[0] == "usage counters differ from the job rows in 1 places:"
    assert lines[1].startswith("  user discord:100 on day ")
    assert "quota_jobs=3" in lines[1] and "quota_jobs=1" in lines[1]
