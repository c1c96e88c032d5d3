"""When storage fails: a database locked by another process, a full or unwritable disk.

What the user and the operator see, and that nothing is left half-written: no job row
without its ledger line, no quota kept for a song that was not made, no partial files.
"""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from bot.engine import Engine
from bot.messages import failure_text
from bot.models import FailureKind, Requester
from bot.requests import GenerationRequest
from providers.fal import FalProvider
from storage.database import Database, StorageError
from storage.jobs import JobStore
from tests.conftest import make_settings
from tests.enginekit import RecordingDelivery, audio_files, open_engine, wait_for_state
from tests.fakes.fal import FakeFal

ALICE = Requester("discord", "100", "guild1", "alice")


def prompt(duration: int = 5) -> GenerationRequest:
    return GenerationRequest.build(mode="prompt", prompt="lofi piano about rain", duration=duration)


def fal(fake: FakeFal, url: str) -> FalProvider:
    return FalProvider(fake.key, url, poll_interval=0.01, retry_delays=(0.01,))


def table_counts(path: Path) -> tuple[int, int]:
    """(job rows, ledger lines), read by a separate connection as an operator would."""
    conn = sqlite3.connect(path)
    try:
        jobs = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        ledger = conn.execute("SELECT COUNT(*) FROM usage_ledger").fetchone()[0]
    finally:
        conn.close()
    return jobs, ledger


# ---- a database locked by another process --------------------------------------------


async def test_locked_database_refuses_admission_clearly_and_writes_nothing(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    db = await Database.open(settings.db_path, busy_timeout_ms=200)
    engine = Engine(settings, JobStore(db), [FalProvider("k:secret-123456", "http://127.0.0.1:9")])
    # Another process (the CLI, a second bot) holds the write lock and does not let go.
    blocker = sqlite3.connect(settings.db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(StorageError) as err:
            await engine.submit(prompt(), ALICE, {"channel_id": "1"})
        waited = time.monotonic() - started
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    message = str(err.value)
    assert "busy" in message and "locked" in message, message
    assert 0.15 <= waited < 5, waited  # gave up after the busy timeout, not 10 s default
    assert table_counts(settings.db_path) == (0, 0)  # nothing half-written
    # Once the other writer is gone the same connection admits again: no transaction was
    # left open by the failed one.
    admission = await engine.submit(prompt(), ALICE, {"channel_id": "1"})
    job = await engine.get_job(admission.job_id)
    assert job is not None and job.state == "queued"
    assert [e["kind"] for e in await engine.store.ledger(job.id)] == ["reserve"]
    assert table_counts(settings.db_path) == (1, 1)
    await db.close()


async def test_a_writer_shorter_than_the_busy_timeout_only_delays_admission(tmp_path: Path) -> None:
    # A writer that holds the lock for less than the busy timeout only delays admission.
    settings = make_settings(tmp_path)
    db = await Database.open(settings.db_path, busy_timeout_ms=5_000)
    store = JobStore(db)
    engine = Engine(settings, store, [FalProvider("k:secret-123456", "http://127.0.0.1:9")])
    blocker = sqlite3.connect(settings.db_path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")

    async def release_soon() -> None:
        await asyncio.sleep(0.3)
        blocker.execute("ROLLBACK")

    releaser = asyncio.create_task(release_soon())
    admission = await engine.submit(prompt(), ALICE, {})
    await releaser
    blocker.close()
    assert (await engine.get_job(admission.job_id)) is not None
    await db.close()


# ---- a full or unwritable disk while storing the audio --------------------------------


async def run_until_failed(
    settings_path: Path, delivery: RecordingDelivery, fake: FakeFal, url: str
) -> tuple[Engine, str]:
    settings = make_settings(settings_path)
    engine = await open_engine(settings, [fal(fake, url)], delivery)
    admission = await engine.submit(prompt(), ALICE, {"channel_id": "1"})
    await wait_for_state(engine, admission.job_id, ("failed",))
    return engine, admission.job_id


async def test_disk_full_while_writing_audio_fails_job_with_refund_and_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_open = Path.open

    class FillingDisk(io.FileIO):
        """What a full disk does: the first writes land, then ENOSPC."""

        room = 64 * 1024

        def write(self, data: Any) -> int:
            if self.tell() + len(data) > self.room:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
            return super().write(data)

    def full_disk(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if self.parent.name == "audio" and "w" in mode:
            return FillingDisk(str(self), "w")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full_disk)
    caplog.set_level(logging.INFO)
    fake = FakeFal(queue_polls=0, progress_polls=1)
    delivery = RecordingDelivery()
    settings = make_settings(tmp_path)
    async with fake.running() as url:
        engine, job_id = await run_until_failed(tmp_path, delivery, fake, url)
        try:
            job = await engine.get_job(job_id)
            ledger = await engine.store.ledger(job_id)
            usage, _ = await engine.store.usage(ALICE, engine.limits())
            # The disk has room again: the next song goes through.
            monkeypatch.setattr(Path, "open", real_open)
            again = await engine.submit(prompt(), ALICE, {"channel_id": "1"})
            await wait_for_state(engine, again.job_id, ("delivered",))
        finally:
            await engine.close()
    assert job is not None and job.state == "failed" and job.refunded
    assert job.result is None and job.failure == FailureKind.INTERNAL
    assert delivery.failures == [(job_id, failure_text(FailureKind.INTERNAL, True, None))]
    # The user's quota is back; fal was paid for the song, so the spend keeps the charge.
    assert (usage.user_jobs, usage.user_seconds) == (0, 0)
    kinds = [e["kind"] for e in ledger]
    assert kinds[0] == "reserve" and kinds[-1] == "refund" and "commit" not in kinds
    assert job.charged_usd == pytest.approx(5 * 0.0002)
    assert usage.spend_usd == pytest.approx(5 * 0.0002)
    # No partial file is left to fill the disk further; the second song's file is there.
    names = [p.name for p in audio_files(settings)]
    assert not [n for n in names if n.startswith(job_id) or n.endswith(".part")], names
    assert f"{again.job_id}.wav" in names
    operator = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(
        job_id in r.getMessage()
        and "No space left on device" in r.getMessage()
        and "DATA_DIR" in r.getMessage()
        for r in operator
    ), [r.getMessage() for r in operator]


async def test_unwritable_audio_dir_fails_job_with_refund(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path)
    # A file where DATA_DIR/audio should be: no directory can be made there, even as root
    # (permission bits alone would not stop a root test run).
    settings.data_dir.mkdir(parents=True)
    settings.audio_dir.write_bytes(b"not a directory")
    caplog.set_level(logging.INFO)
    fake = FakeFal(queue_polls=0, progress_polls=1)
    delivery = RecordingDelivery()
    async with fake.running() as url:
        engine, job_id = await run_until_failed(tmp_path, delivery, fake, url)
        try:
            job = await engine.get_job(job_id)
            usage, _ = await engine.store.usage(ALICE, engine.limits())
        finally:
            await engine.close()
    assert job is not None and job.state == "failed" and job.refunded
    assert delivery.failures == [(job_id, failure_text(FailureKind.INTERNAL, True, None))]
    assert (usage.user_jobs, usage.user_seconds) == (0, 0)
    assert settings.audio_dir.read_bytes() == b"not a directory"
    operator = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(job_id in line and "cannot store audio" in line for line in operator), operator


async def test_every_commit_is_synced_to_disk_before_the_user_is_told(tmp_path: Path) -> None:
    # synchronous=FULL (README "Durability"): an admission the user was told about and a
    # song marked posted survive a power cut; NORMAL in WAL mode may lose the last commits.
    settings = make_settings(tmp_path)
    db = await Database.open(settings.db_path)
    try:
        writer = await db.write(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
        reader = await db.read(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
        mode = await db.read(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0])
    finally:
        await db.close()
    assert (writer, reader, mode) == (2, 2, "wal")  # 2 is FULL
    with pytest.raises(ValueError, match="synchronous must be FULL or NORMAL"):
        await Database.open(tmp_path / "x.sqlite3", synchronous="OFF")
