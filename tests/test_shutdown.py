"""SIGTERM the running bot (a real process), start it again: each song is posted once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path

import av
import httpx
import pytest

from bot.engine import Engine
from bot.models import Requester
from storage.database import Database
from storage.jobs import JobStore
from tests.conftest import make_settings
from tests.fakes.fal import FakeFal
from tests.opskit import DAY, seed_job
from tests.test_cli import cli_env
from tests.test_engine import fal, prompt

USER = Requester("file", "42", "room1", "dora")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Bot:
    """One `run_bot` process with a file front-end; its log goes to a file."""

    def __init__(
        self, tmp_path: Path, fake: FakeFal, url: str, name: str, upload_seconds: float = 0.0
    ) -> None:
        self.port = free_port()
        self.log = tmp_path / f"{name}.log"
        self.deliveries = tmp_path / "deliveries.txt"
        self.env = cli_env(
            tmp_path,
            FAL_KEY=fake.key,
            FAL_QUEUE_URL=url,
            PROVIDERS="fal",
            HEALTH_PORT=str(self.port),
            LOG_FORMAT="json",
            LOG_LEVEL="INFO",
            OPS_DELIVERIES=str(self.deliveries),
            SHUTDOWN_GRACE_SECONDS="10",
            OPS_UPLOAD_SECONDS=str(upload_seconds),
            AUDIO_RETENTION_DAYS="30",
        )
        self.cwd = tmp_path
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.run_bot_script",
                env=self.env,
                cwd=str(self.cwd),
                stdout=out,
                stderr=out,
            )

    async def get(self, path: str) -> httpx.Response:
        async with httpx.AsyncClient(timeout=5) as client:
            return await client.get(f"http://127.0.0.1:{self.port}{path}")

    async def sigterm(self, timeout: float = 20) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    def messages(self) -> list[str]:
        out = []
        for line in self.log.read_text("utf-8").splitlines():
            try:
                out.append(json.loads(line)["message"])
            except ValueError:  # a line being written, or not ours
                continue
        return out

    def running(self) -> bool:
        return any(m.startswith("acestep-bot running") for m in self.messages())

    def delivered_lines(self) -> list[str]:
        if not self.deliveries.exists():
            return []
        return self.deliveries.read_text("utf-8").splitlines()


async def until(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def state_of(db_path: Path, job_id: str) -> str | None:
    conn = sqlite3.connect(str(db_path))
    try:
        row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
    finally:
        conn.close()
    return row[0] if row else None


async def admit(tmp_path: Path, fake: FakeFal, url: str, duration: int) -> str:
    """Admit a song the way a front-end does, through the engine API."""
    settings = make_settings(tmp_path, fal_key=fake.key, fal_queue_url=url)
    engine = await Engine.open(settings, [fal(fake, url)], platforms=set())
    try:
        admission = await engine.submit(prompt(duration=duration), USER, {"room": "1"})
    finally:
        await engine.close()
    return admission.job_id


def mp3_seconds(path: Path) -> float:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return sum(f.samples for f in container.decode(stream)) / stream.rate


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX")
async def test_sigterm_while_generating_then_restart_delivers_once(tmp_path: Path) -> None:
    fake = FakeFal(queue_polls=0, progress_polls=10**6)  # generating until released
    settings = make_settings(tmp_path)
    db = await Database.open(settings.db_path)
    old = await seed_job(JobStore(db), USER, at=time.time() - 60 * DAY, state="delivered")
    await db.close()
    settings.audio_dir.mkdir(parents=True)
    (settings.audio_dir / f"{old.id}.wav").write_bytes(b"old song")
    async with fake.running() as url:
        job_id = await admit(tmp_path, fake, url, duration=6)
        first = Bot(tmp_path, fake, url, "first")
        second = Bot(tmp_path, fake, url, "second")
        try:
            await first.start()
            await until(
                lambda: (
                    state_of(settings.db_path, job_id) == "running"
                    and len(fake.status_paths) + len(fake.stream_paths) > 0
                ),
                "the job to run at fal",
            )
            health = await first.get("/healthz")
            metrics = await first.get("/metrics")
            code = await first.sigterm()
            assert code == 0, first.log.read_text()
            assert state_of(settings.db_path, job_id) == "running"  # left to resume
            assert first.delivered_lines() == []

            fake.progress_polls = 0  # fal finishes the song while the bot is down
            await second.start()
            await until(
                lambda: state_of(settings.db_path, job_id) == "delivered",
                "the restarted bot to deliver",
            )
            assert await second.sigterm() == 0, second.log.read_text()
        finally:
            first.kill()
            second.kill()
    assert health.status_code == 200
    assert health.json()["frontends"] == {"file": "connected"}
    assert health.json()["providers"]["fal"]["in_flight"] == 1
    assert 'acestep_jobs{provider="fal",state="running"} 1.0' in metrics.text
    assert fake.submit_count == 1  # resumed with the stored handle, not resubmitted
    [line] = [x for x in second.delivered_lines() if x.startswith("delivered")]
    _, delivered_id, path = line.split(" ", 2)
    assert delivered_id == job_id
    assert mp3_seconds(Path(path)) == pytest.approx(6, abs=0.2)
    assert first.delivered_lines() == second.delivered_lines() == [f"uploading {job_id}", line]
    logged = first.messages()
    assert any(m.startswith("shutting down") for m in logged) and logged[-1] == "stopped"
    assert any(m == f"job {job_id} resumes polling fal" for m in second.messages())
    # Retention ran at start: the 60-day-old song is gone, the new one stays.
    assert not (settings.audio_dir / f"{old.id}.wav").exists()
    assert (settings.audio_dir / f"{job_id}.wav").exists()
    assert fake.key not in first.log.read_text() + second.log.read_text()


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
async def test_sigterm_during_upload_finishes_it_within_grace_and_never_reposts(
    tmp_path: Path,
) -> None:
    fake = FakeFal(queue_polls=0, progress_polls=0)
    settings = make_settings(tmp_path)
    async with fake.running() as url:
        job_id = await admit(tmp_path, fake, url, duration=5)
        first = Bot(tmp_path, fake, url, "first", upload_seconds=1.5)
        second = Bot(tmp_path, fake, url, "second")
        try:
            await first.start()
            await until(
                lambda: f"uploading {job_id}" in first.delivered_lines(), "the upload to start"
            )
            started = time.monotonic()
            assert await first.sigterm() == 0, first.log.read_text()
            waited = time.monotonic() - started
            assert state_of(settings.db_path, job_id) == "delivered"
            await second.start()
            await until(second.running, "the second bot to start")
            assert await second.sigterm() == 0
        finally:
            first.kill()
            second.kill()
    assert 0.5 < waited < 10  # it waited for the upload, not the whole grace period
    lines = second.delivered_lines()
    assert [x.split(" ")[:2] for x in lines] == [["uploading", job_id], ["delivered", job_id]]
    assert fake.submit_count == 1
