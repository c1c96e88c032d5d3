"""The SQLite database: connection settings, numbered migrations, one thread hop per call.

Plain `sqlite3` connections to one file in WAL mode, each owned by a thread of its own:

- the writer runs each write as one function inside `BEGIN IMMEDIATE ... COMMIT`. The
  transaction takes SQLite's write lock up front, so a quota check and the reservation it
  allows never interleave with another admission, in this process or another one sharing
  the file (the CLI next to a running bot). Writes queue on the thread in call order;
  no asyncio lock is needed.
- the reader runs reads (one snapshot per call), beside the writer: WAL lets a reader see
  the last commit while a write is in progress, so a metrics scrape or `stats` never waits
  for an admission and an admission never waits for them.
- a third connection checkpoints the write-ahead log in the background.

A whole transaction is one hand-off to its thread (about 25 microseconds here) instead of
one per statement: aiosqlite, used before, handed off every execute, fetch and close, and
an admission made ten of them under one lock (bench/engine.py, "DB round trips per job").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from storage.errors import StorageError

__all__ = ["BackupInfo", "Database", "StorageError", "backup", "migrations"]

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000
# synchronous=FULL: in WAL mode every commit is on disk (fsync of the WAL) before COMMIT
# returns, so an admission a user was told about, or a song marked posted, survives a
# power cut. NORMAL would lose the last commits before a checkpoint. The cost, measured by
# bench/quota.py against NORMAL in the same run, is in the README ("Durability").
SYNCHRONOUS = "FULL"
# WAL checkpoints (copying the log back into the database file, with an fsync) run on a
# thread of their own every this many writes, instead of inside whichever commit passes
# SQLite's 1000-page mark: there they took 10-60 ms out of one admission in a hundred
# (bench/growth.py's p99). The writer still checkpoints by itself past a 64 MB log, should
# the checkpoint thread fall behind.
CHECKPOINT_EVERY_WRITES = 100
WRITER_AUTOCHECKPOINT_PAGES = 16_000
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

T = TypeVar("T")


def migrations(package: str = "storage.migrations") -> list[tuple[int, str, str]]:
    """The numbered SQL migrations shipped in storage/migrations (PostgreSQL's in
    storage/migrations/postgresql, numbered to match), in order."""
    found = []
    for entry in resources.files(package).iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text("utf-8")))
    return sorted(found)


# Wakes a connection thread waiting on its queue when an urgent call arrives.
_WAKE = object()


class _ConnectionThread:
    """One sqlite3 connection and the one thread that uses it.

    A thread with a queue rather than a ThreadPoolExecutor: the executor's hand-off costs
    about 2.5x as much (60-75 against 25 microseconds on the benchmark machine), and there
    is only ever one thread to keep.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0  # hand-offs so far (bench/engine.py reports them per job)
        self.busy_s = 0.0  # wall time spent running calls (waits for the GIL included)
        self.cpu_s = 0.0  # CPU time of the thread
        self.conn: Any = None  # sqlite3.Connection, or storage.pg.PgConnection
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._urgent: collections.deque[Any] = collections.deque()  # run before the queue
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._urgent.popleft() if self._urgent else self._queue.get()
            if item is _WAKE:
                continue  # an urgent call came in while the queue was empty
            if item is None:
                return
            fn, future, loop = item
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                result = fn()
            except BaseException as exc:
                self._reply(loop, future, None, exc)
            else:
                self._reply(loop, future, result, None)
            self.busy_s += time.perf_counter() - started
            self.cpu_s += time.thread_time() - cpu

    @staticmethod
    def _reply(
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        result: Any,
        error: BaseException | None,
    ) -> None:
        def settle() -> None:
            if future.done():  # the caller was cancelled; the work is done all the same
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        # The loop may be gone when a caller abandoned the database without closing it.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle)

    def call(self, fn: Callable[[], T], *, urgent: bool = False) -> asyncio.Future[T]:
        """Run `fn` on the thread; the future resolves on the caller's event loop. A
        call whose caller is cancelled still runs to the end (a transaction is never
        cut in half), its result dropped. An `urgent` call runs before the calls
        already queued (after the one running)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self.calls += 1
        if urgent:
            self._urgent.append((fn, future, loop))
            self._queue.put(_WAKE)
        else:
            self._queue.put((fn, future, loop))
        return future

    def stop(self) -> None:
        self._queue.put(None)


def _connect(
    path: Path, busy_timeout_ms: int, *, role: str, synchronous: str = SYNCHRONOUS
) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=busy_timeout_ms / 1000)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    if role == "writer":
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA wal_autocheckpoint = {WRITER_AUTOCHECKPOINT_PAGES}")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute("PRAGMA foreign_keys = ON")
    if role == "reader":
        conn.execute("PRAGMA query_only = ON")
    return conn


class Database:
    """An open SQLite file in WAL mode with migrations applied: `write` and `read` each
    run one function on the writer's or the reader's connection."""

    dialect = "sqlite"

    def __init__(
        self, path: Path, busy_timeout_ms: int = BUSY_TIMEOUT_MS, synchronous: str = SYNCHRONOUS
    ) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self.synchronous = synchronous
        self._writer = _ConnectionThread("sqlite-writer")
        self._reader = _ConnectionThread("sqlite-reader")
        self._checkpointer = _ConnectionThread("sqlite-checkpoint")
        self._writes_since_checkpoint = 0
        self._checkpoint: asyncio.Future[Any] | None = None
        self._closed = False

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
        db = cls(path, busy_timeout_ms, synchronous)
        try:
            await db._open_connections()
            if migrate:
                await db.upgrade()
        except BaseException:
            await db.close()
            raise
        return db

    async def _open_connections(self) -> None:
        def opener(worker: _ConnectionThread, role: str) -> Callable[[], None]:
            def open_here() -> None:
                worker.conn = _connect(
                    self.path, self.busy_timeout_ms, role=role, synchronous=self.synchronous
                )

            return open_here

        try:
            # The writer first: it switches a new file to WAL before the others open it.
            await self._writer.call(opener(self._writer, "writer"))
            await self._reader.call(opener(self._reader, "reader"))
            await self._checkpointer.call(opener(self._checkpointer, "checkpointer"))
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open database {self.path}: {exc}") from exc

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._checkpoint is not None:
            with contextlib.suppress(Exception):
                await self._checkpoint
        for worker in (self._checkpointer, self._reader, self._writer):

            def close_here(worker: _ConnectionThread = worker) -> None:
                if worker.conn is not None:
                    worker.conn.close()
                    worker.conn = None

            try:
                await worker.call(close_here)
            finally:
                worker.stop()

    # ---- running work ----------------------------------------------------------------

    async def write(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        exclusive: bool = True,
        urgent: bool = False,
    ) -> T:
        """Run `fn(conn)` as one write transaction (BEGIN IMMEDIATE ... COMMIT) on the
        writer thread, rolled back if it raises. StorageError when the database is
        locked by another process past the busy timeout, full or unwritable. Every
        SQLite write is exclusive (`exclusive` is for PostgreSQL, storage/pg.py).
        `urgent`: ahead of the writes already waiting (a short one that others wait on)."""
        worker = self._writer

        def transaction() -> T:
            conn = self._conn(worker)
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StorageError(f"database is busy or unwritable: {exc}") from exc
            try:
                result = fn(conn)
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError):  # disk full, I/O error
                    raise StorageError(f"could not save to the database: {exc}") from exc
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise StorageError(f"could not save to the database: {exc}") from exc
            return result

        result = await worker.call(transaction, urgent=urgent)
        self._writes_since_checkpoint += 1
        if self._writes_since_checkpoint >= CHECKPOINT_EVERY_WRITES:
            self._start_checkpoint()
        return result

    def _start_checkpoint(self) -> None:
        """Copy the log into the database file on the checkpoint thread, unless one is
        already under way. PASSIVE: it never waits for, or blocks, readers or the writer."""
        if self._checkpoint is not None or self._closed:
            return
        self._writes_since_checkpoint = 0
        worker = self._checkpointer

        def checkpoint() -> None:
            self._conn(worker).execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

        def done(future: asyncio.Future[Any]) -> None:
            self._checkpoint = None
            if not future.cancelled() and future.exception() is not None:
                log.warning("database checkpoint failed (will retry): %s", future.exception())

        self._checkpoint = worker.call(checkpoint)
        self._checkpoint.add_done_callback(done)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` on the reader thread, in one read transaction: every statement
        of `fn` sees the same snapshot, the last commit before it began."""
        worker = self._reader

        def snapshot() -> T:
            conn = self._conn(worker)
            try:
                conn.execute("BEGIN")
                try:
                    return fn(conn)
                finally:
                    conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                raise StorageError(f"cannot read the database: {exc}") from exc

        return await worker.call(snapshot)

    def _conn(self, worker: _ConnectionThread) -> sqlite3.Connection:
        if worker.conn is None:
            raise StorageError(f"database {self.path} is closed")
        return worker.conn

    @property
    def calls(self) -> int:
        """Thread hand-offs so far, reads and writes (each is one transaction)."""
        return self._writer.calls + self._reader.calls

    @property
    def writer_busy_s(self) -> float:
        """Wall time the writer thread has spent in transactions (it serialises all
        writes; waiting for the GIL counts)."""
        return self._writer.busy_s

    @property
    def cpu_s(self) -> float:
        """CPU time of the writer and reader threads so far."""
        return self._writer.cpu_s + self._reader.cpu_s

    # ---- schema ----------------------------------------------------------------------

    async def schema_version(self) -> int:
        return await self.write(_schema_version)

    async def upgrade(self) -> list[str]:
        """Apply every migration newer than the database, all in one transaction;
        returns the names applied."""

        def apply(conn: sqlite3.Connection) -> list[str]:
            _schema_version(conn)
            return apply_migrations(conn, migrations(), conn.execute)

        applied = await self.write(apply)
        if applied:
            log.info("database %s upgraded: %s", self.path, ", ".join(applied))
        return applied

    async def check_writable(self, timeout_ms: int = 2000) -> None:
        """Prove the database takes a write (not read-only, locked or out of disk): one
        committed no-op update, waiting at most `timeout_ms` for the write lock (a health
        check must answer quickly). Raises StorageError."""
        worker = self._writer

        def probe() -> None:
            conn = self._conn(worker)
            conn.execute(f"PRAGMA busy_timeout = {int(timeout_ms)}")
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.execute(
                        "UPDATE schema_migrations SET applied_at = applied_at"
                        " WHERE version = (SELECT MAX(version) FROM schema_migrations)"
                    )
                    conn.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StorageError(f"database is not writable: {exc}") from exc
            finally:
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")

        await worker.call(probe)


def apply_migrations(
    conn: Any, found: list[tuple[int, str, str]], run: Callable[[str], object]
) -> list[str]:
    """Apply the migrations in `found` that the database lacks (any number missing, not
    only those above the last) and record each; `run` executes one raw statement. Both
    backends call this inside their upgrade transaction. Returns the names applied."""
    done = _applied_versions(conn)
    applied = []
    for version, name, sql in found:
        if version in done:
            continue
        for statement in _statements(sql):
            run(statement)
        conn.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
            (version, name, time.time()),
        )
        applied.append(name)
    return applied


def _applied_versions(conn: Any) -> set[int]:
    return {int(row[0]) for row in conn.execute("SELECT version FROM schema_migrations")}


def _schema_version(conn: sqlite3.Connection) -> int:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()
    return int(row[0]) if row else 0


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
