"""The `acestep-bot` command as a user runs it: a real subprocess, a fake fal server."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
from pathlib import Path

import av
import pytest

from storage.database import migrations
from tests.fakes.fal import FakeFal

ROOT = Path(__file__).resolve().parents[1]


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FAL_", "DISCORD_", "TELEGRAM_", "QUOTA_", "PROVIDERS"))
    }
    env.update(
        {"PYTHONPATH": str(ROOT), "DATA_DIR": str(tmp_path / "data"), "LOG_LEVEL": "WARNING"}
    )
    env.update(extra)
    return env


async def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        *args,
        env=env,
        cwd=str(cwd),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def duration_of(path: Path) -> tuple[str, float]:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return container.format.name, samples / stream.rate


@pytest.mark.parametrize(("suffix", "container"), [("mp3", "mp3"), ("flac", "flac")])
async def test_generate_end_to_end_writes_a_decodable_file(
    tmp_path: Path, suffix: str, container: str
) -> None:
    fake = FakeFal(queue_polls=1, progress_polls=1)
    out = tmp_path / f"song.{suffix}"
    async with fake.running() as url:
        env = cli_env(tmp_path, FAL_KEY=fake.key, FAL_QUEUE_URL=url, PROVIDERS="fal")
        code, _, err = await run_cli(
            [
                "generate",
                "--prompt",
                "lofi piano about rain",
                "--duration",
                "8",
                "--seed",
                "42",
                "--out",
                str(out),
            ],
            env,
            tmp_path,
        )
    assert code == 0, err
    assert fake.submit_count == 1
    assert fake.submits[0].body["seed"] == 42
    name, seconds = duration_of(out)
    assert name == container
    assert seconds == pytest.approx(8, abs=0.2)
    assert "admitted with seed 42" in err
    assert "generating" in err
    assert f"wrote {out} (seed 42" in err
    assert fake.key not in err


async def test_generate_song_mode_with_lyrics_file_and_jobs_commands(tmp_path: Path) -> None:
    fake = FakeFal(queue_polls=0, progress_polls=1)
    lyrics = tmp_path / "lyrics.txt"
    lyrics.write_text("[verse]\nrain on the window\n[chorus]\nstay inside\n", "utf-8")
    out = tmp_path / "song.wav"
    async with fake.running() as url:
        env = cli_env(tmp_path, FAL_KEY=fake.key, FAL_QUEUE_URL=url)
        code, _, err = await run_cli(
            [
                "generate",
                "--tags",
                "lofi, piano",
                "--lyrics-file",
                str(lyrics),
                "--duration",
                "5",
                "--option",
                "steps=12",
                "--out",
                str(out),
            ],
            env,
            tmp_path,
        )
        assert code == 0, err
        body = fake.submits[0].body
        assert fake.submits[0].path == "/fal-ai/ace-step"
        assert body["lyrics"] == "[verse]\nrain on the window\n[chorus]\nstay inside"
        assert body["number_of_steps"] == 12
        assert duration_of(out)[0] == "wav"
        code, listing, _ = await run_cli(["jobs", "list"], env, tmp_path)
    assert code == 0
    [row] = [line for line in listing.splitlines() if "delivered" in line]
    job_id = row.split()[0]
    code, shown, _ = await run_cli(["jobs", "show", job_id], env, tmp_path)
    assert code == 0
    assert f"job {job_id}: delivered" in shown
    assert "tags:      lofi, piano" in shown
    assert "ledger:" in shown and "commit" in shown


async def test_invalid_input_exits_2_and_stores_nothing(tmp_path: Path) -> None:
    fake = FakeFal()
    async with fake.running() as url:
        env = cli_env(tmp_path, FAL_KEY=fake.key, FAL_QUEUE_URL=url)
        code, _, err = await run_cli(
            ["generate", "--prompt", "x", "--duration", "300", "--out", str(tmp_path / "a.mp3")],
            env,
            tmp_path,
        )
        assert code == 2
        assert "duration: 300 is not valid; a whole number of seconds from 5 to 240." in err
        code, _, err = await run_cli(
            ["generate", "--prompt", "x", "--out", str(tmp_path / "a.aiff")], env, tmp_path
        )
        assert code == 2 and "out: " in err and ".mp3, .wav, .flac, .ogg" in err
        code, _, err = await run_cli(
            ["generate", "--prompt", "x", "--option", "steps=99", "--out", str(tmp_path / "a.mp3")],
            env,
            tmp_path,
        )
        # Valid for some provider (up to 200), but fal, the only one here, takes 3 to 60.
        assert code == 2 and "steps: 99 is not available here; fal takes from 3 to 60." in err
    assert fake.submit_count == 0
    db = tmp_path / "data" / "acestep-bot.sqlite3"
    if db.exists():
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 0


async def test_provider_failure_exits_1_with_the_reason(tmp_path: Path) -> None:
    fake = FakeFal(queue_polls=0)
    fake.content_policy = True
    async with fake.running() as url:
        env = cli_env(tmp_path, FAL_KEY=fake.key, FAL_QUEUE_URL=url)
        code, _, err = await run_cli(
            [
                "generate",
                "--prompt",
                "bad words",
                "--duration",
                "5",
                "--out",
                str(tmp_path / "a.mp3"),
            ],
            env,
            tmp_path,
        )
    assert code == 1
    assert "error: The music service refused this request" in err
    # The operator running the CLI also sees the provider's own reason.
    assert "content policy" in err
    assert "Your quota was refunded." in err
    assert not (tmp_path / "a.mp3").exists()


async def test_quota_set_and_show(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    code, out, err = await run_cli(
        ["quota", "set", "--user", "discord:42", "jobs_per_day", "3"], env, tmp_path
    )
    assert code == 0, err
    assert "user discord:42: jobs_per_day set to 3" in out
    code, out, _ = await run_cli(["quota", "show", "--user", "discord:42"], env, tmp_path)
    assert "Songs today: 0 used of 3 songs" in out
    assert "overrides: jobs_per_day=3" in out
    code, _, err = await run_cli(
        ["quota", "set", "--community", "discord:1", "jobs_per_day", "3"], env, tmp_path
    )
    assert code == 2 and "unknown limit community.jobs_per_day" in err
    code, out, _ = await run_cli(["db", "upgrade"], env, tmp_path)
    latest = migrations()[-1][0]
    assert code == 0 and f"schema version {latest}" in out


async def test_config_check_masks_secrets_and_run_explains_what_is_missing(tmp_path: Path) -> None:
    env = cli_env(tmp_path, FAL_KEY="fal-secret-value-987654", PROVIDERS="fal,replicate")
    code, out, _ = await run_cli(["config", "check"], env, tmp_path)
    assert code == 1
    assert "fal-secret-value-987654" not in out
    assert "FAL_KEY=******** (set, 23 characters)" in out
    assert "Provider replicate is listed in PROVIDERS but needs REPLICATE_API_TOKEN." in out
    assert "No chat front-end: set DISCORD_TOKEN and/or TELEGRAM_TOKEN." in out
    # Passwords inside URLs are masked too (a REST proxy or GPU box behind basic auth).
    env = cli_env(
        tmp_path,
        PROVIDERS="acestep",
        ACESTEP_SERVER_URLS="http://gpu:pw-in-url-4321@10.0.0.5:8001,http://10.0.0.6:8001",
        TELEGRAM_API_URL="https://tok-as-user-5678@tg.example.org",
    )
    code, out, _ = await run_cli(["config", "check"], env, tmp_path)
    assert "pw-in-url-4321" not in out and "tok-as-user-5678" not in out
    assert "ACESTEP_SERVER_URLS=http://gpu:********@10.0.0.5:8001,http://10.0.0.6:8001" in out
    assert "TELEGRAM_API_URL=https://********@tg.example.org" in out
    code, _, err = await run_cli(["run"], cli_env(tmp_path), tmp_path)
    assert code == 2
    assert "cannot start: nothing usable is configured" in err
    assert "DISCORD_TOKEN" in err and "FAL_KEY" in err


async def imported_by(args: list[str], tmp_path: Path) -> set[str]:
    """Every module `acestep-bot ARGS` imports, from Python's own import log."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-X",
        "importtime",
        "-m",
        "bot",
        *args,
        env=cli_env(tmp_path),
        cwd=str(tmp_path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    lines = [line for line in err.decode().splitlines() if line.startswith("import time:")]
    return {line.rsplit("|", 1)[1].strip() for line in lines[1:]}


# What makes a command slow to start (the engine brings PyAV, numpy and PIL; the chat
# libraries and HTTP stacks are large), none of which `--help` or `config check` uses.
HEAVY = {"bot.engine", "bot.audio", "av", "numpy", "PIL", "discord", "telegram", "httpx"}
HEAVY |= {"aiohttp", "prometheus_client", "providers.base", "storage.jobs", "sqlite3"}


async def test_help_and_config_check_import_only_what_they_use(tmp_path: Path) -> None:
    helped = await imported_by(["--help"], tmp_path)
    assert "argparse" in helped  # the log is read right
    assert not helped & (HEAVY | {"pydantic", "bot.settings"}), sorted(helped & HEAVY)
    checked = await imported_by(["config", "check"], tmp_path)
    assert "bot.settings" in checked
    assert not checked & HEAVY, sorted(checked & HEAVY)
    # A database command loads the store, still without the engine and its codecs.
    listed = await imported_by(["jobs", "list"], tmp_path)
    assert "storage.jobs" in listed
    assert not listed & {"bot.engine", "bot.audio", "av", "numpy", "PIL", "discord", "telegram"}


async def test_config_check_says_which_gpu_server_cannot_make_described_songs(
    tmp_path: Path,
) -> None:
    from tests.fakes.acestep import FakeAceStep

    small = FakeAceStep(lm=False, health_reports_lm=True)  # a GPU under 12 GB
    async with small.running() as url:
        env = cli_env(tmp_path, PROVIDERS="acestep", ACESTEP_SERVER_URLS=url)
        code, out, _ = await run_cli(["config", "check"], env, tmp_path)
    assert code == 1  # no chat front-end configured here
    assert "Providers say:" in out
    assert f"ACE-Step server {url} cannot be relied on for described songs" in out
    assert "ACESTEP_INIT_LLM=true" in out
    assert small.submit_count == 0  # it only asked /health
