"""PostgreSQL as the bot's database (DATABASE_URL): what differs from SQLite or only
PostgreSQL can show. The storage behaviour tests shared with SQLite run on both backends
through the `db_url` fixture (tests/test_quota.py, test_storage.py, test_community.py).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings

from bot.engine import Engine
from bot.settings import describe
from providers.fal import FalProvider
from storage.database import Database, StorageError, migrations
from storage.jobs import JobStore
from storage.pg import MIGRATIONS_PACKAGE, WRITE_LOCK_KEY, PgDatabase
from tests.conftest import make_settings
from tests.pgcluster import Cluster
from tests.test_cli import cli_env, run_cli
from tests.test_storage import NOON, STEPS, WHO, apply_steps, usage_from_counters
from tests.test_storage_failures import ALICE, prompt


def pg_counts(url: str) -> tuple[int, int]:
    with psycopg.connect(url) as conn:
        jobs = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()
        ledger = conn.execute("SELECT COUNT(*) FROM usage_ledger").fetchone()
    assert jobs is not None and ledger is not None
    return int(jobs[0]), int(ledger[0])


def test_migrations_are_numbered_alike_on_both_backends() -> None:
    """A migration added for one database and forgotten for the other would leave them
    at different schema versions."""
    sqlite = [(v, name) for v, name, _ in migrations()]
    postgresql = [(v, name) for v, name, _ in migrations(MIGRATIONS_PACKAGE)]
    assert sqlite == postgresql


def test_database_url_is_masked_and_checked() -> None:
    settings = make_settings(Path("/tmp"), database_url="postgresql://bot:s3cret-pw@db:5432/bot")
    shown = "\n".join(describe(settings))
    assert "s3cret-pw" not in shown
    assert "DATABASE_URL=********" in shown
    assert "s3cret-pw" in "".join(settings.secrets())  # redacted from logs too
    with pytest.raises(ValueError, match=r"DATABASE_URL must start with postgresql://"):
        make_settings(Path("/tmp"), database_url="mysql://db/bot")
    assert make_settings(Path("/tmp"), database_url="").secret("database_url") is None


async def test_locked_database_refuses_admission_clearly_and_writes_nothing(
    tmp_path: Path, pg_cluster: Cluster
) -> None:
    url = pg_cluster.new_database()
    settings = make_settings(tmp_path)
    db = await PgDatabase.open(url, lock_timeout_ms=200)
    engine = Engine(settings, JobStore(db), [FalProvider("k:secret-123456", "http://127.0.0.1:9")])
    # Another process holds the write lock and does not let go.
    blocker = psycopg.connect(url, autocommit=True)
    blocker.execute("BEGIN")
    blocker.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK_KEY,))
    try:
        started = time.monotonic()
        with pytest.raises(StorageError) as err:
            await engine.submit(prompt(), ALICE, {"channel_id": "1"})
        waited = time.monotonic() - started
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert "busy" in str(err.value) and "locked" in str(err.value), err.value
    assert 0.15 <= waited < 5, waited
    assert pg_counts(url) == (0, 0)
    # The same connection admits again once the other writer is gone.
    admission = await engine.submit(prompt(), ALICE, {"channel_id": "1"})
    job = await engine.get_job(admission.job_id)
    assert job is not None and job.state == "queued"
    assert pg_counts(url) == (1, 1)
    await db.close()


async def test_an_unreachable_server_is_one_clear_line_without_the_password() -> None:
    with pytest.raises(StorageError) as err:
        await PgDatabase.open("postgresql://bot:pw-123456@127.0.0.1:9/bot")
    message = str(err.value)
    assert "pw-123456" not in message and "\n" not in message
    assert message.startswith("cannot open database postgresql://bot:********@127.0.0.1:9/bot")


async def test_reconnects_after_the_server_drops_the_connection(pg_cluster: Cluster) -> None:
    url = pg_cluster.new_database()
    db = await PgDatabase.open(url)
    store = JobStore(db)
    try:
        pg_cluster.admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            f" WHERE datname = '{url.rsplit('/', 1)[1]}'"
        )
        await asyncio.sleep(0.1)
        # The first call after the drop may fail (the connection is found dead then);
        # the next one reconnects.
        with pytest.raises(StorageError):
            await store.schema_version()
        assert await store.schema_version() == migrations()[-1][0]
        await store.check_writable()  # what the health check asks
        assert store.shared  # several processes may work on it
    finally:
        await db.close()


async def test_db_upgrade_and_stats_from_the_cli(tmp_path: Path, pg_cluster: Cluster) -> None:
    pg_cluster.admin("CREATE DATABASE fresh_cli")
    url = pg_cluster.url("fresh_cli")
    env = cli_env(tmp_path, DATABASE_URL=url)
    code, out, err = await run_cli(["db", "upgrade"], env, tmp_path)
    assert code == 0, err
    assert "applied: 0001_initial.sql" in out
    assert f"at schema version {migrations()[-1][0]}" in out
    code, out, err = await run_cli(["db", "upgrade"], env, tmp_path)
    assert code == 0 and "applied" not in out, out
    code, out, err = await run_cli(["db", "check"], env, tmp_path)
    assert code == 0, out + err
    code, out, err = await run_cli(["db", "backup", str(tmp_path)], env, tmp_path)
    assert code != 0 and "pg_dump" in err
    assert not (Path(tmp_path) / "data" / "acestep-bot.sqlite3").exists()  # never SQLite


@hsettings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=STEPS)
def test_both_backends_count_any_sequence_of_changes_alike(
    tmp_path: Path, pg_cluster: Cluster, steps: list[tuple[int, str, int]]
) -> None:
    """The same changes on SQLite and PostgreSQL: the same usage read by admission, and
    on PostgreSQL too the counters equal the job rows (its own view of them)."""
    url = pg_cluster.new_database()

    async def run() -> list[str]:
        lite = await Database.open(tmp_path / f"db-{time.monotonic_ns()}.sqlite3")
        pg = await PgDatabase.open(url)
        a, b = JobStore(lite), JobStore(pg)
        try:
            await apply_steps(a, steps)
            await apply_steps(b, steps)
            for who in WHO:
                for now in (NOON - 86400 + 1, NOON + 3600):
                    assert await usage_from_counters(b, who, now) == pytest.approx(
                        await usage_from_counters(a, who, now)
                    ), (who.key, now)
            assert (await b.stats(0)).total == (await a.stats(0)).total
            return await b.usage_mismatches()
        finally:
            await lite.close()
            await pg.close()

    assert asyncio.run(run()) == []
