"""The SQLite database: connection settings, numbered migrations, transactions.

One aiosqlite connection per process, guarded by a lock so each transaction runs alone.
Writes use `BEGIN IMMEDIATE`, which takes SQLite's write lock up front: a quota check
and the reservation it allows can never interleave with another admission, in this
process or another one sharing the file (the CLI next to a running bot).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import aiosqlite

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000
# synchronous=FULL: in WAL mode every commit is on disk (fsync of the WAL) before COMMIT
# returns, so an admission a user was told about, or a song marked posted, survives a
# power cut. NORMAL would lose the last commits before a checkpoint. The cost, measured by
# bench/quota.py against NORMAL in the same run, is in the README ("Durability").
SYNCHRONOUS = "FULL"
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class StorageError(RuntimeError):
    """The database cannot be used (locked too long, disk full, corrupt): an operator issue."""


def migrations() -> list[tuple[int, str, str]]:
    """The numbered SQL migrations shipped in storage/migrations, in order."""
    found = []
    for entry in resources.files("storage.migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text("utf-8")))
    return sorted(found)


class Database:
    """An open SQLite file in WAL mode with migrations applied."""

    def __init__(self, path: Path, conn: aiosqlite.Connection) -> None:
        self.path = path
        self.conn = conn
        self._lock = asyncio.Lock()

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        migrate: bool = True,
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
        synchronous: str = SYNCHRONOUS,
    ) -> Database:
        """Open (creating) the file; a writer waits up to `busy_timeout_ms` for another
        process's write lock before StorageError. `synchronous` (FULL or NORMAL) is
        there for bench/quota.py to measure what FULL costs."""
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = await aiosqlite.connect(str(path), isolation_level=None)
            conn.row_factory = aiosqlite.Row
            await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute(f"PRAGMA synchronous = {synchronous}")
            await conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open database {path}: {exc}") from exc
        db = cls(path, conn)
        if migrate:
            await db.upgrade()
        return db

    async def close(self) -> None:
        await self.conn.close()

    async def schema_version(self) -> int:
        await self.conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
        )
        async with self.conn.execute(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations"
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def upgrade(self) -> list[str]:
        """Apply every migration newer than the database; returns the names applied."""
        applied = []
        async with self.transaction() as conn:
            current = await self.schema_version()
            for version, name, sql in migrations():
                if version <= current:
                    continue
                for statement in _statements(sql):
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (version, name, time.time()),
                )
                applied.append(name)
        if applied:
            log.info("database %s upgraded: %s", self.path, ", ".join(applied))
        return applied

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), rolled back on error."""
        async with self._lock:
            try:
                await self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StorageError(f"database is busy or unwritable: {exc}") from exc
            try:
                yield self.conn
            except BaseException:
                await self.conn.execute("ROLLBACK")
                raise
            try:
                await self.conn.execute("COMMIT")
            except sqlite3.Error as exc:
                await self.conn.execute("ROLLBACK")
                raise StorageError(f"could not save to the database: {exc}") from exc

    async def check_writable(self, timeout_ms: int = 2000) -> None:
        """Prove the database takes a write (not read-only, locked or out of disk): one
        committed no-op update, waiting at most `timeout_ms` for the write lock (a health
        check must answer quickly). Raises StorageError."""
        async with self._lock:
            conn = self.conn
            await conn.execute(f"PRAGMA busy_timeout = {int(timeout_ms)}")
            try:
                await conn.execute("BEGIN IMMEDIATE")
                try:
                    await conn.execute(
                        "UPDATE schema_migrations SET applied_at = applied_at"
                        " WHERE version = (SELECT MAX(version) FROM schema_migrations)"
                    )
                    await conn.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        await conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StorageError(f"database is not writable: {exc}") from exc
            finally:
                await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")

    @asynccontextmanager
    async def read(self) -> AsyncIterator[aiosqlite.Connection]:
        """Reads share the connection; the lock keeps them out of open transactions."""
        async with self._lock:
            yield self.conn


def _statements(sql: str) -> list[str]:
    """Split a migration into statements (no semicolons inside strings in our files)."""
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def backup(source: Path, dest: Path) -> BackupInfo:
    """Copy the database at `source` to `dest` with SQLite's online backup API.

    Blocking (run it in a thread). The copy is one consistent snapshot even while the bot
    writes: it is taken in a single step inside one read transaction, which WAL mode lets
    run beside writers. It is written next to `dest` and renamed into place only once
    complete and checked, as a self-contained file (rollback journal, not WAL).
    """
    if not source.exists():
        raise StorageError(f"no database at {source}")
    if dest.resolve() == source.resolve():
        raise StorageError("the backup path is the live database itself")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        src = sqlite3.connect(str(source), timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            out = sqlite3.connect(str(partial))
            try:
                src.backup(out)  # pages=-1: everything in one step, one snapshot
                out.execute("PRAGMA journal_mode = DELETE")
                check = out.execute("PRAGMA integrity_check").fetchone()[0]
                version = out.execute(
                    "SELECT COALESCE(MAX(version), 0) FROM schema_migrations"
                ).fetchone()[0]
                jobs = out.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
            finally:
                out.close()
        finally:
            src.close()
        if check != "ok":
            raise StorageError(f"the backup failed its integrity check: {check}")
        partial.replace(dest)
    except sqlite3.Error as exc:
        raise StorageError(f"backup of {source} failed: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)
    return BackupInfo(
        path=dest, size=dest.stat().st_size, schema_version=int(version), jobs=int(jobs)
    )


@dataclass(frozen=True)
class BackupInfo:
    """What `backup` wrote."""

    path: Path
    size: int
    schema_version: int
    jobs: int
