"""`acestep-bot generate` working on a song (issue 14), as a user runs it: a real
subprocess against the fake WaveSpeed (edits, the source sent through its media upload)
and the fake fal (takes)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from bot import messages
from tests.fakes.audio import make_wav
from tests.fakes.fal import FakeFal
from tests.fakes.wavespeed import FakeWaveSpeed
from tests.test_cli import cli_env, duration_of, run_cli


def jobs_stored(tmp_path: Path) -> int:
    db = tmp_path / "data" / "acestep-bot.sqlite3"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])


def sources_stored(tmp_path: Path) -> list[str]:
    folder = tmp_path / "data" / "sources"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def wavespeed_env(tmp_path: Path, fake: FakeWaveSpeed, url: str, **extra: str) -> dict[str, str]:
    return cli_env(
        tmp_path,
        PROVIDERS="wavespeed",
        WAVESPEED_API_KEY=fake.api_key,
        WAVESPEED_BASE_URL=url,
        **extra,
    )


@pytest.mark.parametrize(
    ("flags", "model", "seconds"),
    [
        (["--extend", "{src}", "--after", "4"], "wavespeed-ai/ace-step/audio-outpaint", 12),
        (["--remix", "{src}", "--strength", "0.6"], "wavespeed-ai/ace-step/audio-to-audio", 8),
        (
            ["--repaint", "{src}", "--start", "2", "--end", "5"],
            "wavespeed-ai/ace-step/audio-inpaint",
            8,
        ),
    ],
    ids=["extend", "remix", "repaint"],
)
async def test_generate_edits_a_file_end_to_end(
    tmp_path: Path, flags: list[str], model: str, seconds: int
) -> None:
    src = tmp_path / "mine.wav"
    src.write_bytes(make_wav(8))
    fake = FakeWaveSpeed()
    out = tmp_path / "edited.mp3"
    async with fake.running() as url:
        code, _, err = await run_cli(
            [
                "generate",
                "--tags",
                "lofi, piano",
                *(f.format(src=src) for f in flags),
                "--out",
                str(out),
            ],
            wavespeed_env(tmp_path, fake, url),
            tmp_path,
        )
    assert code == 0, err
    assert f"wrote {out}" in err
    assert fake.submits[0]["model"] == model
    assert len(fake.uploads) == 1  # the source went through WaveSpeed's media upload
    fmt, length = duration_of(out)
    assert fmt == "mp3" and length == pytest.approx(seconds, abs=0.3)
    assert len(sources_stored(tmp_path)) == 1  # kept with the job for a restart
    job_id = err.rsplit("job ", 1)[1].split(")")[0]
    code, shown, _ = await run_cli(["jobs", "show", job_id], cli_env(tmp_path), tmp_path)
    verb = {"--extend": "extended", "--remix": "remixed", "--repaint": "repainted"}[flags[0]]
    assert code == 0
    assert f"{verb} from your file \N{LEFT DOUBLE QUOTATION MARK}mine.wav" in shown


async def test_takes_write_one_numbered_file_each(tmp_path: Path) -> None:
    fake = FakeFal(queue_polls=0, progress_polls=1)
    async with fake.running() as url:
        code, _, err = await run_cli(
            [
                "generate",
                "--prompt",
                "lofi piano",
                "--duration",
                "5",
                "--takes",
                "2",
                "--out",
                str(tmp_path / "song.mp3"),
            ],
            cli_env(tmp_path, FAL_KEY=fake.key, FAL_QUEUE_URL=url, QUOTA_USER_CONCURRENT_JOBS="4"),
            tmp_path,
        )
    assert code == 0, err
    assert not (tmp_path / "song.mp3").exists()
    for take in (1, 2):
        assert duration_of(tmp_path / f"song-{take}.mp3")[1] == pytest.approx(5, abs=0.3)
    seeds = {s.body["seed"] for s in fake.submits}
    assert len(seeds) == 2 and err.count("wrote ") == 2


@pytest.mark.parametrize(
    ("content", "flags", "expected"),
    [
        (b"", ["--extend", "{src}", "--after", "4"], messages.SOURCE_EMPTY),
        (b"not a song at all" * 50, ["--remix", "{src}"], messages.SOURCE_NOT_AUDIO),
        (None, ["--extend", "{src}", "--after", "4"], "files up to 1.9 MB are allowed"),
        (
            make_wav(8),
            ["--repaint", "{src}", "--start", "6", "--end", "12"],
            "repaint_start: '6-12' is not valid; a window inside the song",
        ),
        (
            make_wav(8),
            ["--extend", "{src}", "--after", "235"],
            "would make the song 243 seconds long",
        ),
        (make_wav(8), ["--after", "30"], "after: 30 is not valid; only with --extend SRC"),
    ],
    ids=["empty", "not-audio", "too-big", "window-outside", "past-240", "option-alone"],
)
async def test_bad_sources_exit_2_with_one_line_and_store_nothing(
    tmp_path: Path, content: bytes | None, flags: list[str], expected: str
) -> None:
    src = tmp_path / "mine.wav"
    src.write_bytes(make_wav(12) if content is None else content)  # None: 2.3 MB
    fake = FakeWaveSpeed()
    async with fake.running() as url:
        code, _, err = await run_cli(
            [
                "generate",
                "--tags",
                "lofi",
                *(f.format(src=src) for f in flags),
                "--out",
                str(tmp_path / "x.mp3"),
            ],
            wavespeed_env(tmp_path, fake, url, SOURCE_MAX_BYTES="2000000"),
            tmp_path,
        )
    assert code == 2, err
    [line] = [line for line in err.splitlines() if line.strip()]
    assert line.startswith("error: ") and expected in line
    assert fake.submit_attempts == 0 and fake.uploads == []
    assert jobs_stored(tmp_path) == 0 and sources_stored(tmp_path) == []
