"""The bot against a direct fal-client script, on the same fake fal, side by side.

A "peer" is what an operator could write instead of the bot: the official `fal-client`
package (its AsyncClient.subscribe: submit, poll the status every 0.1 s, fetch the result)
plus an httpx download of the audio to a file. The bot runs in this process: the real
engine and FalProvider with their production settings (status stream, polling as the
fallback), ending when the audio is checked and stored (the front-end's deliver() is
called). Both run against the fake fal queue (tests/fakes/fal.py, made time-based as in
bench/detect.py: each request finishes generating at a set moment), with the same
generation times, for 1, 20 and 100 songs at once.

Printed per level: per-song p50 from submit to audio on disk, and the makespan, for both,
and their ratios (bot / peer; targets: p50 <= 1.05x, makespan <= 1.0x). With rendering
(a front-end's MP3 for a 10 MiB upload limit): CPU seconds per delivered song over all
processes, and whether a provider MP3 that fits passes through untouched (its audio bytes
identical, only the tags new).

fal-client is not a dependency of the bot: `pip install -e '.[bench]'` installs it. It
talks https to fal's hosts; the script points its queue URL at the fake (the module's
QUEUE_URL_FORMAT), which is the only change to it.

    python bench/peer.py            # 1, 20 and 100 songs, generation 3-8 s (~2 min)
    python bench/peer.py --quick    # 1 and 5 songs, 1-2 s
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench._util import machine, median, table, write_results  # noqa: E402
from bench.detect import TimedFal  # noqa: E402
from bench.engine import NullDelivery  # noqa: E402
from bot import render as renderer  # noqa: E402
from bot.engine import Engine, EngineOptions, Song  # noqa: E402
from bot.models import Job, Requester  # noqa: E402
from bot.requests import GenerationRequest  # noqa: E402
from bot.settings import Settings  # noqa: E402
from providers.fal import FalProvider  # noqa: E402
from tests.fakes.audio import make_wav, transcode  # noqa: E402

ENDPOINT = "fal-ai/ace-step/prompt-to-audio"
SONG_SECONDS = 30
UPLOAD_LIMIT = 10 * 1024 * 1024


def settings_for(tmp: str) -> Settings:
    big = 10**9
    return Settings(
        _env_file=None,
        data_dir=Path(tmp) / "data",
        quota_user_jobs_per_day=big,
        quota_user_seconds_per_day=big,
        quota_user_concurrent_jobs=big,
        quota_community_seconds_per_day=big,
        spend_cap_usd_per_day=big,
    )


async def run_peer(times: list[float], audio: bytes | None) -> dict[str, Any]:
    """fal-client's subscribe, then an httpx download to disk, for every song at once."""
    import fal_client
    import fal_client.client

    fake = TimedFal(list(times), log_every=1.0)
    fake.audio = audio
    done: list[float] = []
    with tempfile.TemporaryDirectory(prefix="acestep-peer-") as tmp:
        async with fake.running() as url:
            fal_client.client.QUEUE_URL_FORMAT = f"{url}/"
            client = fal_client.AsyncClient(key=fake.key)
            async with httpx.AsyncClient() as http:

                async def one(n: int) -> None:
                    started = time.monotonic()
                    output = await client.subscribe(
                        ENDPOINT, {"prompt": f"peer song {n}", "duration": SONG_SECONDS}
                    )
                    async with http.stream("GET", output["audio"]["url"]) as resp:
                        with open(Path(tmp) / f"{n}.audio", "wb") as out:  # noqa: ASYNC230
                            async for chunk in resp.aiter_bytes():
                                out.write(chunk)
                    done.append(time.monotonic() - started)

                started = time.monotonic()
                await asyncio.gather(*(one(n) for n in range(len(times))))
                makespan = time.monotonic() - started
    return {"p50_s": median(done), "makespan_s": makespan, "songs": len(done)}


class RenderingDelivery(NullDelivery):
    """Renders each song for a 10 MiB upload limit, as a chat front-end does."""

    def __init__(self) -> None:
        super().__init__()
        self.rendered: dict[str, Path] = {}

    async def deliver(self, job: Job, song: Song) -> None:
        rendered = await song.render(UPLOAD_LIMIT)
        self.rendered[job.id] = rendered.path
        await super().deliver(job, song)


async def run_bot(times: list[float], audio: bytes | None, render: bool) -> dict[str, Any]:
    fake = TimedFal(list(times), log_every=1.0)
    fake.audio = audio
    done: list[float] = []
    passthrough: list[bool] = []
    cpu0 = _cpu()
    with tempfile.TemporaryDirectory(prefix="acestep-peer-bot-") as tmp:
        async with fake.running() as url:
            provider = FalProvider(fake.key, url, concurrency=len(times))
            engine = await Engine.open(settings_for(tmp), [provider], options=EngineOptions())
            delivery: NullDelivery = RenderingDelivery() if render else NullDelivery()
            engine.register_delivery(delivery)
            await engine.start()

            async def one(n: int) -> None:
                started = time.monotonic()
                request = GenerationRequest.build(
                    mode="prompt", prompt=f"bot song {n}", duration=SONG_SECONDS
                )
                admission = await engine.submit(request, Requester("bench", f"u{n}"), {})
                if await delivery.wait(admission.job_id) is None:
                    done.append(time.monotonic() - started)
                    if render and audio is not None:
                        assert isinstance(delivery, RenderingDelivery)
                        sent = delivery.rendered[admission.job_id].read_bytes()
                        passthrough.append(_audio_frames(sent) == _audio_frames(audio))

            try:
                started = time.monotonic()
                await asyncio.gather(*(one(n) for n in range(len(times))))
                makespan = time.monotonic() - started
            finally:
                await engine.close()
                renderer.shared().close()  # its workers exit, so their CPU time counts
    cpu = _cpu() - cpu0 - (STARTUP_CPU if render else 0.0)
    out: dict[str, Any] = {"p50_s": median(done), "makespan_s": makespan, "songs": len(done)}
    if render:
        out["cpu_per_song_s"] = max(0.0, cpu) / max(1, len(done))
    if passthrough:
        out["mp3_passed_through"] = all(passthrough)
    return out


# CPU seconds the renderer's worker processes take just to start (a fresh interpreter
# each), measured once and left out of the per-song figure.
STARTUP_CPU = 0.0


async def _startup_cpu() -> float:
    before = _cpu()
    pool = renderer.shared()
    pool.start()
    await asyncio.sleep(0)
    pool.close()
    return _cpu() - before


def _cpu() -> float:
    """CPU seconds of this process and of its worker processes (the renderer's workers
    count once they exit: run_bot closes the engine, which stops them)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _audio_frames(mp3: bytes) -> bytes:
    """An MP3 without its ID3v2 tag (the only part the bot may change)."""
    if mp3[:3] == b"ID3":
        size = 0
        for byte in mp3[6:10]:
            size = (size << 7) | (byte & 0x7F)
        mp3 = mp3[10 + size :]
    return mp3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    levels, generation = ([1, 5], (1.0, 2.0)) if args.quick else ([1, 20, 100], (3.0, 8.0))
    global STARTUP_CPU
    STARTUP_CPU = asyncio.run(_startup_cpu())
    rng = random.Random(5)
    mp3 = transcode(make_wav(SONG_SECONDS), "mp3")
    rows, results = [], []
    for songs in levels:
        times = [rng.uniform(*generation) for _ in range(songs)]
        peer = asyncio.run(run_peer(times, None))
        bot = asyncio.run(run_bot(times, None, render=False))
        rendered = asyncio.run(run_bot(times, None, render=True))
        passthrough = asyncio.run(run_bot(times, mp3, render=True))
        result = {
            "songs": songs,
            "generation_s": list(generation),
            "peer": peer,
            "bot": bot,
            "bot_rendering_wav": rendered,
            "bot_rendering_provider_mp3": passthrough,
            "p50_ratio": bot["p50_s"] / peer["p50_s"],
            "makespan_ratio": bot["makespan_s"] / peer["makespan_s"],
        }
        results.append(result)
        rows.append(
            [
                songs,
                peer["p50_s"],
                bot["p50_s"],
                result["p50_ratio"],
                peer["makespan_s"],
                bot["makespan_s"],
                result["makespan_ratio"],
                rendered["cpu_per_song_s"],
                passthrough["cpu_per_song_s"],
                "yes" if passthrough.get("mp3_passed_through") else "NO",
            ]
        )
        print(f"  {songs} songs done", flush=True)
    print()
    print(
        table(
            [
                "songs",
                "peer p50 s",
                "bot p50 s",
                "ratio",
                "peer makespan s",
                "bot makespan s",
                "ratio",
                "CPU s/song (WAV render)",
                "CPU s/song (MP3 in)",
                "MP3 untouched",
            ],
            rows,
        )
    )
    for r in results:
        ok = r["p50_ratio"] <= 1.05 and r["makespan_ratio"] <= 1.0
        print(
            f"{r['songs']} songs: p50 {r['p50_ratio']:.2f}x, makespan {r['makespan_ratio']:.2f}x "
            f"(targets 1.05x, 1.0x): {'met' if ok else 'MISSED'}"
        )
    print(f"(CPU per song leaves out the render workers' start: {STARTUP_CPU:.2f} s)")
    path = write_results(
        "peer", {"quick": args.quick, "results": results, "worker_start_cpu_s": STARTUP_CPU}
    )
    print(f"machine: {machine()}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
