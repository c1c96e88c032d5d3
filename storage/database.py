"""The SQLite database: connection settings, numbered migrations, transactions.

One aiosqlite connection per process, guarded by a lock so each transaction runs alone.
Writes use `BEGIN IMMEDIATE`, which takes SQLite's write lock up front: a quota check
and the reservation it allows can never interleave with another admission, in this
process or another one sharing the file (the CLI next to a running bot).
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

import aiosqlite

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000
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
    async def open(cls, path: Path, *, migrate: bool = True,
                   busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> Database:
        """Open (creating) the file; a writer waits up to `busy_timeout_ms` for another
        process's write lock before StorageError."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = await aiosqlite.connect(str(path), isolation_level=None)
            conn.row_factory = aiosqlite.Row
            await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute("PRAGMA synchronous = NORMAL")
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
            "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)")
        async with self.conn.execute(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations") as cur:
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
                    (version, name, time.time()))
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

    @asynccontextmanager
    async def read(self) -> AsyncIterator[aiosqlite.Connection]:
        """Reads share the connection; the lock keeps them out of open transactions."""
        async with self._lock:
            yield self.conn


def _statements(sql: str) -> list[str]:
    """Split a migration into statements (no semicolons inside strings in our files)."""
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
