"""Shared fixtures: settings on a temp data dir, a real SQLite database, and (for the
storage tests that run on both backends) a throw-away PostgreSQL cluster."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bot.settings import Settings
from storage.database import Database
from storage.jobs import JobStore
from storage.pg import PgDatabase
from tests.pgcluster import Cluster, find_bindir


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    """Settings that ignore the developer's environment and .env file."""
    values: dict[str, object] = {
        "data_dir": tmp_path / "data",
        "providers": ["fal"],
        "fal_key": "test-fal-key-123456",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[JobStore]:
    db = await Database.open(settings.db_path)
    yield JobStore(db)
    await db.close()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """One PostgreSQL cluster for the session, with a migrated template database. Where
    the server binaries are missing the PostgreSQL tests are skipped, except in CI
    (CI=true), where that is a failure."""
    bindir = find_bindir()
    if bindir is None:
        reason = (
            "PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's"
            " postgresql package to run the PostgreSQL storage tests"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        print(f"skipping PostgreSQL tests: {reason}")
        pytest.skip(reason)
    cluster = Cluster(bindir)
    try:
        cluster.start()
        cluster.admin("CREATE DATABASE template_acestep")

        async def migrate() -> None:
            db = await PgDatabase.open(cluster.url("template_acestep"))
            await db.close()

        asyncio.run(migrate())
        cluster.template = "template_acestep"
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """Which database a both-backends test runs on."""
    return str(request.param)


@pytest.fixture
def db_url(backend: str, request: pytest.FixtureRequest) -> str | None:
    """None for SQLite; for PostgreSQL the URL of a fresh, migrated database."""
    if backend == "sqlite":
        return None
    cluster: Cluster = request.getfixturevalue("pg_cluster")
    return cluster.new_database()


async def open_db(
    db_url: str | None, path: Path, **sqlite_options: object
) -> Database | PgDatabase:
    """The test's database: SQLite at `path`, or the PostgreSQL one at `db_url`."""
    if db_url:
        return await PgDatabase.open(db_url)
    return await Database.open(path, **sqlite_options)  # type: ignore[arg-type]


def pg_env(db_url: str | None) -> dict[str, str]:
    """The environment a CLI subprocess needs to use the test's database."""
    return {"DATABASE_URL": db_url} if db_url else {}
