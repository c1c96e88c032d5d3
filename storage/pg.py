"""The PostgreSQL database: the same `write`/`read` contract as storage/database.py.

Set DATABASE_URL=postgresql://... to use it: several bot processes (on several machines)
then share one database. The storage functions (storage/jobs.py, community.py) stay one
implementation for both backends: each is still one function run on a thread of its own
as one transaction, on a psycopg 3 connection wrapped to look like sqlite3's:

- `?` placeholders become psycopg's `%s` (a literal `%` is escaped), and SQLite's
  `INDEXED BY` planner hints are dropped (`translate`); everything else the storage
  functions write is SQL both databases accept.
- rows answer by position and by column name, like `sqlite3.Row`.

Writes keep SQLite's guarantee that a write transaction runs alone: each one first takes
one transaction-scoped advisory lock (`pg_advisory_xact_lock`), held until COMMIT, so an
admission's quota check and the reservation it allows never interleave with another
admission in any process. Claims, lease renewals and singleton holds (storage/leases.py)
skip that lock (`exclusive=False`) and lock only the rows they change, with
`FOR UPDATE SKIP LOCKED`. Reads run in a REPEATABLE READ, READ ONLY transaction: one
snapshot per call, never waiting for a writer.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Callable
from typing import Any, TypeVar

from storage.database import _ConnectionThread, apply_migrations, migrations
from storage.errors import StorageError

__all__ = ["PgDatabase", "translate"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# The advisory lock every exclusive write takes (an arbitrary 64-bit key: "acestep").
WRITE_LOCK_KEY = 0x61636573746570
LOCK_TIMEOUT_MS = 10_000
MIGRATIONS_PACKAGE = "storage.migrations.postgresql"

_INDEXED_BY = re.compile(r"\s+INDEXED BY \w+")


@functools.lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """SQLite-flavoured storage SQL as PostgreSQL takes it (no `?` inside string literals
    in our statements)."""
    return _INDEXED_BY.sub("", sql).replace("%", "%%").replace("?", "%s")


class Row(tuple[Any, ...]):
    """A result row by position (`row[0]`) or column name (`row["id"]`), `dict(row)`."""

    _index: dict[str, int] = {}

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


_ROW_TYPES: dict[tuple[str, ...], type[Row]] = {}


def _row_factory(cursor: Any) -> Callable[[Any], Row]:
    names = tuple(col.name for col in cursor.description or ())
    kind = _ROW_TYPES.get(names)
    if kind is None:
        kind = type("Row", (Row,), {"_index": {n: i for i, n in enumerate(names)}})
        _ROW_TYPES[names] = kind
    return kind


class PgConnection:
    """A psycopg connection that takes the storage functions' sqlite3-style calls."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Any = ()) -> Any:
        cursor = self.raw.cursor(row_factory=_row_factory)
        cursor.execute(translate(sql), tuple(params))
        return cursor

    def executemany(self, sql: str, rows: Any) -> Any:
        cursor = self.raw.cursor(row_factory=_row_factory)
        cursor.executemany(translate(sql), [tuple(r) for r in rows])
        return cursor


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise StorageError("DATABASE_URL needs the psycopg package (pip install psycopg)") from exc
    return psycopg


class PgDatabase:
    """An open PostgreSQL database with migrations applied: `write` and `read` each run
    one function on the writer's or the reader's connection."""

    dialect = "postgresql"

    def __init__(self, url: str, label: str, lock_timeout_ms: int = LOCK_TIMEOUT_MS) -> None:
        self.url = url
        self.path = label  # where it is, password masked: for messages
        self.lock_timeout_ms = lock_timeout_ms
        self._writer = _ConnectionThread("pg-writer")
        self._reader = _ConnectionThread("pg-reader")
        self._closed = False

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        label: str | None = None,
        migrate: bool = True,
        lock_timeout_ms: int = LOCK_TIMEOUT_MS,
    ) -> PgDatabase:
        from bot.settings import mask_url_passwords

        db = cls(url, label or mask_url_passwords(url), lock_timeout_ms)
        try:
            await db._writer.call(lambda: db._connect(db._writer, read_only=False))
            await db._reader.call(lambda: db._connect(db._reader, read_only=True))
            if migrate:
                await db.upgrade()
        except BaseException:
            await db.close()
            raise
        return db

    def _connect(self, worker: _ConnectionThread, *, read_only: bool) -> None:
        psycopg = _psycopg()
        try:
            raw = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            # psycopg's message names host and port, never the password.
            raise StorageError(f"cannot open database {self.path}: {_first_line(exc)}") from None
        raw.execute(f"SET lock_timeout = {int(self.lock_timeout_ms)}")
        if read_only:
            raw.execute("SET default_transaction_read_only = on")
        worker.conn = PgConnection(raw)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for worker in (self._reader, self._writer):

            def close_here(worker: _ConnectionThread = worker) -> None:
                if worker.conn is not None:
                    with contextlib.suppress(Exception):
                        worker.conn.raw.close()
                    worker.conn = None

            try:
                await worker.call(close_here)
            finally:
                worker.stop()

    def _conn(self, worker: _ConnectionThread, *, read_only: bool) -> PgConnection:
        if self._closed:
            raise StorageError(f"database {self.path} is closed")
        conn = worker.conn
        if conn is None or conn.raw.closed or conn.raw.broken:
            self._connect(worker, read_only=read_only)  # the server restarted: reconnect
            conn = worker.conn
        assert conn is not None
        return conn

    # ---- running work ----------------------------------------------------------------

    async def write(
        self, fn: Callable[[Any], T], *, exclusive: bool = True, urgent: bool = False
    ) -> T:
        """Run `fn(conn)` as one write transaction on the writer thread, rolled back if it
        raises. `exclusive` (the default): alone, as on SQLite (the advisory write lock);
        otherwise beside other writers, locking only the rows it touches. `urgent`:
        ahead of this process's writes already waiting."""
        psycopg = _psycopg()
        worker = self._writer

        def transaction() -> T:
            conn = self._conn(worker, read_only=False)
            try:
                conn.raw.execute("BEGIN")
                if exclusive:
                    conn.raw.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK_KEY,))
            except psycopg.Error as exc:
                with contextlib.suppress(psycopg.Error):
                    conn.raw.execute("ROLLBACK")
                if isinstance(exc, psycopg.errors.LockNotAvailable):
                    raise StorageError(
                        "database is busy: locked by another writer past the lock timeout"
                        f" ({self.lock_timeout_ms} ms)"
                    ) from None
                raise StorageError(f"database is busy or unwritable: {_first_line(exc)}") from None
            try:
                result = fn(conn)
            except BaseException as exc:
                with contextlib.suppress(psycopg.Error):
                    conn.raw.execute("ROLLBACK")
                if isinstance(exc, psycopg.OperationalError):
                    raise StorageError(
                        f"could not save to the database: {_first_line(exc)}"
                    ) from None
                raise
            try:
                conn.raw.execute("COMMIT")
            except psycopg.Error as exc:
                with contextlib.suppress(psycopg.Error):
                    conn.raw.execute("ROLLBACK")
                raise StorageError(f"could not save to the database: {_first_line(exc)}") from None
            return result

        return await worker.call(transaction, urgent=urgent)

    async def read(self, fn: Callable[[Any], T]) -> T:
        """Run `fn(conn)` on the reader thread in one snapshot (REPEATABLE READ)."""
        psycopg = _psycopg()
        worker = self._reader

        def snapshot() -> T:
            conn = self._conn(worker, read_only=True)
            try:
                conn.raw.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                try:
                    return fn(conn)
                finally:
                    with contextlib.suppress(psycopg.Error):
                        conn.raw.execute("COMMIT")
            except psycopg.OperationalError as exc:
                raise StorageError(f"cannot read the database: {_first_line(exc)}") from None

        return await worker.call(snapshot)

    @property
    def calls(self) -> int:
        return self._writer.calls + self._reader.calls

    @property
    def writer_busy_s(self) -> float:
        return self._writer.busy_s

    @property
    def cpu_s(self) -> float:
        return self._writer.cpu_s + self._reader.cpu_s

    # ---- schema ----------------------------------------------------------------------

    async def schema_version(self) -> int:
        return await self.write(_schema_version)

    async def upgrade(self) -> list[str]:
        """Apply every PostgreSQL migration newer than the database, in one transaction
        under the write lock (two processes starting at once apply them once)."""

        def apply(conn: PgConnection) -> list[str]:
            _schema_version(conn)
            return apply_migrations(conn, migrations(MIGRATIONS_PACKAGE), conn.raw.execute)

        applied = await self.write(apply)
        if applied:
            log.info("database %s upgraded: %s", self.path, ", ".join(applied))
        return applied

    async def check_writable(self, timeout_ms: int = 2000) -> None:
        """Prove the database takes a write, waiting at most `timeout_ms` for locks."""
        psycopg = _psycopg()
        worker = self._writer

        def probe() -> None:
            conn = self._conn(worker, read_only=False)
            try:
                conn.raw.execute("BEGIN")
                try:
                    conn.raw.execute(f"SET LOCAL lock_timeout = {int(timeout_ms)}")
                    conn.raw.execute(f"SET LOCAL statement_timeout = {int(timeout_ms)}")
                    conn.raw.execute(
                        "UPDATE schema_migrations SET applied_at = applied_at"
                        " WHERE version = (SELECT MAX(version) FROM schema_migrations)"
                    )
                    conn.raw.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(psycopg.Error):
                        conn.raw.execute("ROLLBACK")
                    raise
            except psycopg.Error as exc:
                raise StorageError(f"database is not writable: {_first_line(exc)}") from None

        await worker.call(probe)


def _schema_version(conn: PgConnection) -> int:
    conn.raw.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
        " name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
    )
    row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
    return int(row[0]) if row else 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
