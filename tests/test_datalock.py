"""One working bot per data directory, checked with real `acestep-bot` processes.

A `generate` holds DATA_DIR's lock while its song waits at the fake fal queue; a second
`generate` or a `run` on the same directory exits at once naming the holder's pid, while
the operator commands keep working beside it. A kill -9 leaves no stale lock behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from bot.datalock import LOCK_NAME, DataDirLocked, hold
from tests.fakes.fal import FakeFal
from tests.test_cli import cli_env, run_cli

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX file locks and signals")


async def start_generate(env: dict[str, str], cwd: Path, out: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "generate",
        "--prompt",
        "lofi piano about rain",
        "--duration",
        "5",
        "--out",
        str(out),
        env=env,
        cwd=str(cwd),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def until(check, what: str, within: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def job_rows(db_path: Path) -> list[tuple[str, str]]:
    if not db_path.exists():
        return []
    conn = sqlite3.connect(str(db_path), timeout=5)
    try:
        return list(conn.execute("SELECT id, state FROM jobs ORDER BY created_at"))
    except sqlite3.OperationalError:  # tables not created yet
        return []
    finally:
        conn.close()


async def test_a_second_instance_is_refused_while_operator_commands_keep_working(
    tmp_path: Path,
) -> None:
    fake = FakeFal(queue_polls=100_000, progress_polls=0)  # the song waits at fal for good
    data_dir = tmp_path / "data"
    lock = data_dir / LOCK_NAME
    async with fake.running() as url:
        env = cli_env(tmp_path, FAL_KEY=fake.key, FAL_QUEUE_URL=url, PROVIDERS="fal")
        first = await start_generate(env, tmp_path, tmp_path / "first.mp3")
        try:
            db = data_dir / "acestep-bot.sqlite3"
            await until(lambda: [s for _, s in job_rows(db)] == ["running"], "the song at fal")
            assert lock.read_text().split()[0] == str(first.pid)
            [(job_id, _)] = job_rows(db)

            code, out, err = await run_cli(
                ["generate", "--prompt", "second", "--duration", "5", "--out", "x.mp3"],
                env,
                tmp_path,
            )
            assert code == 2, (out, err)
            assert f"another acestep-bot (pid {first.pid}, `acestep-bot generate`)" in err
            assert str(data_dir) in err and "DATA_DIR" in err
            code, _, err = await run_cli(
                ["run"], {**env, "TELEGRAM_TOKEN": "123:abc", "TELEGRAM_API_URL": url}, tmp_path
            )
            assert code == 2 and f"pid {first.pid}" in err, err
            assert fake.submit_count == 1  # neither touched the first one's job

            # What an operator runs beside the bot still works.
            for args in (
                ["jobs", "list"],
                ["jobs", "show", job_id],
                ["stats"],
                ["quota", "show", "--user", "cli"],
                ["quota", "set", "--user", "cli", "jobs_per_day", "30"],
                ["db", "backup", str(tmp_path / "backup.sqlite3")],
            ):
                code, out, err = await run_cli(args, env, tmp_path)
                assert code == 0, (args, out, err)
                assert "another acestep-bot" not in err
            code, out, err = await run_cli(["config", "check"], env, tmp_path)
            assert "another acestep-bot" not in out + err and "FAL_KEY=****" in out
            code, out, err = await run_cli(["jobs", "cancel", job_id], env, tmp_path)
            assert code == 0 and "cancel requested" in out, (out, err)
            # The working instance reads the flag and stops the song at fal.
            _, first_err = await asyncio.wait_for(first.communicate(), 30)
            assert first.returncode == 1, first_err.decode()
            assert "cancelled" in first_err.decode().lower()
        finally:
            if first.returncode is None:
                first.kill()
                await first.wait()
    assert fake.cancels and job_rows(data_dir / "acestep-bot.sqlite3") == [(job_id, "cancelled")]


async def test_a_killed_instance_leaves_no_stale_lock(tmp_path: Path) -> None:
    fake = FakeFal(queue_polls=100_000, progress_polls=0)
    async with fake.running() as url:
        env = cli_env(tmp_path, FAL_KEY=fake.key, FAL_QUEUE_URL=url, PROVIDERS="fal")
        first = await start_generate(env, tmp_path, tmp_path / "first.mp3")
        try:
            await until(lambda: fake.submit_count == 1, "the first song to reach fal")
        finally:
            first.send_signal(signal.SIGKILL)
            await first.wait()
        fake.queue_polls = 0  # from now on fal finishes songs at once
        code, _, err = await run_cli(
            ["generate", "--prompt", "after the crash", "--duration", "5", "--out", "b.mp3"],
            env,
            tmp_path,
        )
    assert code == 0, err
    assert (tmp_path / "b.mp3").stat().st_size > 0


def test_the_lock_is_exclusive_and_released_on_exit(tmp_path: Path) -> None:
    with hold(tmp_path, "run") as path:
        assert path.read_text() == f"{os.getpid()} acestep-bot run\n"
        # flock locks belong to an open file: a second open in this process conflicts too.
        with pytest.raises(DataDirLocked, match=rf"pid {os.getpid()}, `acestep-bot run`"):
            with hold(tmp_path, "generate"):
                pass
    with hold(tmp_path, "generate"):
        pass
