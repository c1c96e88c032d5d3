"""Renders under load: N songs finishing at once, each needing a cover and an MP3.

Three ways, in one run so the ratios compare like with like:

- reference: what the engine did before bot/render.py: each song's cover, then its encode,
  in the event loop's default thread pool (`asyncio.to_thread`);
- renderer: bot/render.py's worker processes, one task per song (cover + encode);
- renderer, provider MP3: the same, when the provider's file is already an MP3 that fits
  (it is tagged and sent as it is: no decode, no re-encode).

Printed per way: makespan, when the first song was ready, the median song, the event
loop's lag (p99 of how late a 10 ms timer fires while rendering: what admissions, polls
and deliveries wait), and CPU seconds per song over all processes.

    python bench/render.py            # 20 songs of 60 s
    python bench/render.py --quick    # 4 songs of 20 s
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._util import machine, median, percentile, table, write_results  # noqa: E402
from bot import audio  # noqa: E402
from bot.render import Renderer  # noqa: E402
from tests.fakes.audio import make_wav, transcode  # noqa: E402

LIMIT = 10 * 1024 * 1024  # Discord's 10 MiB


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


async def loop_lag(stop: asyncio.Event, lags: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        before = loop.time()
        await asyncio.sleep(0.01)
        lags.append(loop.time() - before - 0.01)


async def by_threads(src: Path, dest: Path, tags: audio.SongTags, duration: float) -> None:
    cover = await asyncio.to_thread(audio.render_cover, src)
    await asyncio.to_thread(
        audio.encode, src, dest, "mp3", byte_limit=LIMIT, tags=tags, cover=cover, duration=duration
    )


async def measure(name: str, sources: list[Path], out: Path, job: Any, duration: float) -> dict:
    lags: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(loop_lag(stop, lags))
    cpu0, started = cpu_seconds(), time.perf_counter()
    done: list[float] = []

    async def one(index: int, src: Path) -> None:
        tags = audio.SongTags(title=f"song {index}", seed=index, job_id=f"j{index}")
        await job(src, out / f"{name}-{index}.mp3", tags, duration)
        done.append(time.perf_counter() - started)

    await asyncio.gather(*(one(i, src) for i, src in enumerate(sources)))
    stop.set()
    await ticker
    # Workers' CPU shows in RUSAGE_CHILDREN only once they exit: `run` closes the
    # renderer before reading the CPU figure.
    return {
        "way": name,
        "makespan_s": max(done),
        "first_ready_s": min(done),
        "median_ready_s": median(done),
        "loop_lag_p99_ms": percentile(lags, 99) * 1000,
        "cpu0": cpu0,
    }


async def warm_up(renderer: Renderer, song: Path) -> None:
    """One cover per worker: every worker has started and imported bot.audio."""
    await asyncio.gather(*(renderer.cover(song) for _ in range(renderer.workers)))


async def run(songs: int, duration: float) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="acestep-render-") as tmp:
        base = Path(tmp)
        wav = make_wav(duration)
        mp3 = transcode(wav, "mp3")
        wavs, mp3s = [], []
        for i in range(songs):
            (base / f"{i}.wav").write_bytes(wav)
            (base / f"{i}.mp3").write_bytes(mp3)
            wavs.append(base / f"{i}.wav")
            mp3s.append(base / f"{i}.mp3")
        results = []
        threads = await measure("reference: threads", wavs, base, by_threads, duration)
        threads["cpu_per_song_s"] = (cpu_seconds() - threads.pop("cpu0")) / songs
        results.append(threads)
        # What starting and stopping the workers costs (their imports), so that it is not
        # counted as rendering: workers' CPU shows only once they exit.
        before = cpu_seconds()
        idle = Renderer()
        await warm_up(idle, wavs[0])
        idle.close()
        startup = cpu_seconds() - before
        for name, sources in (("renderer", wavs), ("renderer, provider MP3", mp3s)):
            renderer = Renderer()

            async def by_renderer(
                src: Path, dest: Path, tags: audio.SongTags, d: float, r: Renderer = renderer
            ) -> None:
                await r.render(src, dest, "mp3", byte_limit=LIMIT, tags=tags, duration=d)

            await warm_up(renderer, wavs[0])  # the workers are up before the clock starts
            cpu_started = cpu_seconds()
            figures = await measure(name, sources, base, by_renderer, duration)
            renderer.close()  # workers exit: their CPU time now counts
            figures.pop("cpu0")
            # The warm-up counts in `startup` too, so it cancels out.
            figures["cpu_per_song_s"] = (cpu_seconds() - cpu_started - startup) / songs
            results.append(figures)
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 songs of 20 s")
    parser.add_argument("--songs", type=int)
    parser.add_argument("--duration", type=float)
    args = parser.parse_args()
    songs = args.songs or (4 if args.quick else 20)
    duration = args.duration or (20.0 if args.quick else 60.0)
    print(f"{songs} songs of {duration:g} s (48 kHz stereo WAV) rendered at once, MP3 for 10 MiB")
    results = asyncio.run(run(songs, duration))
    reference = results[0]
    rows = []
    for r in results:
        rows.append(
            [
                r["way"],
                r["makespan_s"],
                r["first_ready_s"],
                r["median_ready_s"],
                r["loop_lag_p99_ms"],
                r["cpu_per_song_s"],
                r["makespan_s"] / reference["makespan_s"],
                r["first_ready_s"] / reference["first_ready_s"],
                r["loop_lag_p99_ms"] / max(reference["loop_lag_p99_ms"], 1e-9),
            ]
        )
    headers = [
        "way",
        "makespan s",
        "first ready s",
        "median s",
        "loop lag p99 ms",
        "CPU s/song",
        "makespan / ref",
        "first / ref",
        "lag / ref",
    ]
    print(table(headers, rows))
    path = write_results("render", {"songs": songs, "duration_s": duration, "results": results})
    print(f"machine: {machine()}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
