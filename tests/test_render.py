"""The renderer (bot/render.py) and what it means for a song end to end: work in worker
processes with a CPU budget, a crashed worker replaced, no re-encode the destination does
not need, and a file judged by what it holds rather than by its header."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from mutagen.id3 import ID3

from bot import render
from bot.audio import AudioError, SongTags, check_audio
from bot.models import Job, Requester
from bot.render import Renderer
from bot.requests import GenerationRequest
from providers.fal import FalProvider
from tests.conftest import make_settings
from tests.enginekit import RecordingDelivery, open_engine, wait_for_state
from tests.fakes.audio import claim_flac_samples, make_flac, make_wav, transcode
from tests.fakes.fal import FakeFal

ALICE = Requester("discord", "100", "guild1", "alice")
TAGS = SongTags(title="rain", prompt="lofi piano about rain", seed=7, job_id="j1")


def prompt(duration: int) -> GenerationRequest:
    return GenerationRequest.build(mode="prompt", prompt="lofi piano about rain", duration=duration)


def fal(fake: FakeFal, url: str) -> FalProvider:
    return FalProvider(fake.key, url, poll_interval=0.01, retry_delays=(0.01,))


def mpeg_frames(data: bytes) -> bytes:
    from bot.audio import _id3_end

    end = len(data) - (128 if data[-128:-125] == b"TAG" else 0)
    return data[_id3_end(data) : end]


@pytest.fixture(scope="module")
def song240(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("render") / "song240.wav"
    path.write_bytes(make_wav(240))
    return path


async def test_work_runs_in_worker_processes_and_one_task_past_its_cpu_budget_stops(
    tmp_path: Path, song240: Path
) -> None:
    # A 240 s encode needs 1.6 to 5 s of CPU on the machines seen; this allows 0.1 to 1.1.
    renderer = Renderer(workers=1, cpu_seconds=0.1)
    try:
        with pytest.raises(AudioError, match="took too long to process"):
            await renderer.render(
                song240, tmp_path / "out.mp3", "mp3", byte_limit=None, tags=TAGS, duration=240
            )
        # The worker is fine afterwards.
        short = tmp_path / "short.wav"
        short.write_bytes(make_wav(2))
        assert (await renderer.cover(short))[:3] == b"\xff\xd8\xff"
    finally:
        renderer.close()
    assert not (tmp_path / "out.mp3").exists()


async def test_a_worker_that_dies_mid_render_is_replaced_and_the_song_still_renders(
    tmp_path: Path, song240: Path
) -> None:
    others = {p.pid for p in multiprocessing.active_children()}  # e.g. the shared pool
    renderer = Renderer(workers=1)
    try:
        renderer.start()
        ours = {p.pid for p in multiprocessing.active_children()} - others
        assert len(ours) == 1
        task = asyncio.ensure_future(
            renderer.render(
                song240, tmp_path / "out.mp3", "mp3", byte_limit=None, tags=TAGS, duration=240
            )
        )
        await asyncio.sleep(0.5)  # mid-encode: what a codec crash or the OOM killer does
        for pid in ours:
            os.kill(pid, signal.SIGKILL)
        cover, encoded = await task
    finally:
        renderer.close()
    assert cover[:3] == b"\xff\xd8\xff"
    assert check_audio(encoded.path, 240).duration == pytest.approx(240, abs=0.1)


async def deliver_from_fal(tmp_path: Path, audio: bytes, seconds: int) -> tuple[Job, Any]:
    """One song whose result file is `audio`, delivered for a 10 MiB upload limit: the
    job as it ended and the file the platform was handed (None when it failed)."""
    fake = FakeFal(queue_polls=0, progress_polls=0)
    fake.audio = audio
    delivery = RecordingDelivery(byte_limit=10 * 1024 * 1024)
    async with fake.running() as url:
        engine = await open_engine(make_settings(tmp_path), [fal(fake, url)], delivery)
        try:
            admission = await engine.submit(prompt(seconds), ALICE, {})
            job = await wait_for_state(engine, admission.job_id, ("delivered", "failed"))
        finally:
            await engine.close()
    return job, (delivery.delivered[0][1] if delivery.delivered else None)


async def test_a_provider_mp3_that_fits_reaches_the_user_with_its_audio_bytes_unchanged(
    tmp_path: Path,
) -> None:
    provider_file = transcode(make_wav(6), "mp3")
    job, rendered = await deliver_from_fal(tmp_path, provider_file, 6)
    assert job.state == "delivered", job.error
    sent = rendered.path.read_bytes()
    assert mpeg_frames(sent) == mpeg_frames(provider_file)  # tagged, not re-encoded
    assert job.result is not None and ID3(rendered.path)["TIT2"].text == [job.result.title]
    assert rendered.bitrate == 128 and rendered.cover[:3] == b"\xff\xd8\xff"


async def test_a_flac_whose_header_claims_10_hours_is_delivered_as_the_6_s_it_holds(
    tmp_path: Path,
) -> None:
    lying = claim_flac_samples(make_flac(6), 10 * 3600 * 8000)
    job, rendered = await deliver_from_fal(tmp_path, lying, 6)
    assert job.state == "delivered", job.error
    assert job.result is not None and job.result.duration == pytest.approx(6)
    assert rendered.bitrate == 192 and rendered.duration == pytest.approx(6, abs=0.05)


def test_the_shared_renderer_is_sized_to_the_cores_this_process_may_use() -> None:
    assert render.shared() is render.shared()
    assert render.shared().workers == len(os.sched_getaffinity(0))


ROOT = str(Path(__file__).resolve().parents[1])
BOT_DIES_AT_ONCE = """
import multiprocessing, os, sys
from bot import render
if __name__ == "__main__":
    render.shared().start()
    print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
    os.kill(os.getpid(), 9)  # killed while its workers are still starting up
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
async def test_workers_of_a_bot_killed_while_they_start_do_not_outlive_it(tmp_path: Path) -> None:
    script = tmp_path / "dying_bot.py"
    script.write_text(BOT_DIES_AT_ONCE)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        env={**os.environ, "PYTHONPATH": ROOT},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    # Not communicate(): workers inherit the pipe, and one left alive would hold it open.
    out = await asyncio.wait_for(proc.stdout.readline(), 60)
    await asyncio.wait_for(proc.wait(), 60)
    workers = [int(pid) for pid in out.split()]
    assert len(workers) == render.default_workers()
    for _ in range(200):  # they notice within a second of starting
        if not any(_alive(pid) for pid in workers):
            break
        await asyncio.sleep(0.05)
    assert not [pid for pid in workers if _alive(pid)]
