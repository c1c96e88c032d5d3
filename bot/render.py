"""The renderer: every CPU-heavy audio job (checks, covers, encodes) in worker processes.

bot/audio.py is synchronous and CPU-bound. Run in the event loop's thread pool, 100 songs
finishing at once would hold the GIL for minutes and starve admissions, polls and
deliveries; here they run in a pool of worker processes, one per core this process may
use, so the event loop only waits on futures. Work is queued first come, first served and
one song's cover and encode are one task, so the first song to finish is the first one
ready to post (not every cover before any encode).

What a hostile provider file can cost is bounded twice:
- by bot/audio.py itself: decoding stops at the longest song the file could be, sample
  rates and channel counts are sanity-checked, so CPU time and memory are proportional to
  at most 264 s of audio, in frames of bounded size;
- by a CPU-time budget per task in the worker (RLIMIT_CPU, reset around each task): a task
  past it stops with AudioError instead of holding a core. A worker that dies (a codec
  crash on a malformed file) is replaced and its task tried once more, so one bad file
  cannot take down the others' renders.

Workers are spawned (a fresh interpreter: never a fork of this threaded process) when
the first task comes, and each exits when the bot does, even after a kill -9: it watches
its parent. (A forkserver would start them faster, but its children hold it alive, and so
a killed bot would leave the whole tree running.)
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import resource
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from bot import audio

T = TypeVar("T")

# CPU seconds one task may use: a 240 s song's cover and MP3 encode take about 6 s here.
CPU_SECONDS_PER_TASK = 60
TOO_SLOW = "The provider's file took too long to process."
CRASHED = "The provider's file could not be processed."


def default_workers() -> int:
    """One worker per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# ---- in the worker process ------------------------------------------------------------


class _OverBudget(Exception):
    pass


_budget_active = False


def _on_sigxcpu(signum: int, frame: FrameType | None) -> None:
    if _budget_active:
        raise _OverBudget


def _exit_with_parent(bot: int) -> None:
    """A worker outlives a killed bot otherwise (it waits on its task queue forever):
    once the bot is gone, the worker is re-parented. The bot's pid comes from the bot,
    not from getppid() here: a bot killed while this worker was still starting up has
    already re-parented it."""
    while os.getppid() == bot:
        time.sleep(1.0)
    os._exit(0)


def _worker_start(bot: int) -> None:
    signal.signal(signal.SIGXCPU, _on_sigxcpu)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the bot's to handle
    threading.Thread(target=_exit_with_parent, args=(bot,), daemon=True).start()


def _within_budget(cpu_seconds: float, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `work` with at most `cpu_seconds` more CPU time for this process (RLIMIT_CPU
    counts whole seconds: up to one second less when the process is mid-second)."""
    global _budget_active
    used = resource.getrusage(resource.RUSAGE_SELF)
    spent = used.ru_utime + used.ru_stime
    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    limit = max(int(spent) + 1, math.ceil(spent + cpu_seconds))
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (limit, hard))
    _budget_active = True
    try:
        return work(*args, **kwargs)
    except _OverBudget:
        raise audio.AudioError(TOO_SLOW) from None
    finally:
        _budget_active = False
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _check(cpu: float, path: Path, expected: float | None) -> audio.AudioInfo:
    return _within_budget(cpu, audio.check_audio, path, expected)


def _cover(cpu: float, path: Path, title: str | None) -> bytes:
    return _within_budget(cpu, audio.render_cover, path, audio.COVER_SIZE, title)


def _render(
    cpu: float,
    src: Path,
    dest: Path,
    fmt: str,
    byte_limit: int | None,
    tags: audio.SongTags | None,
    cover: bytes | None,
    duration: float | None,
) -> tuple[bytes, audio.EncodedAudio]:
    def both() -> tuple[bytes, audio.EncodedAudio]:
        title = tags.title if tags is not None else None
        art = cover if cover is not None else audio.render_cover(src, audio.COVER_SIZE, title)
        encoded = audio.encode(
            src, dest, fmt, byte_limit=byte_limit, tags=tags, cover=art, duration=duration
        )
        return art, encoded

    return _within_budget(cpu, both)


# ---- in the bot -----------------------------------------------------------------------


class Renderer:
    """A pool of worker processes for bot/audio.py's CPU-bound functions."""

    def __init__(
        self, workers: int | None = None, *, cpu_seconds: float = CPU_SECONDS_PER_TASK
    ) -> None:
        self.workers = workers or default_workers()
        self.cpu_seconds = cpu_seconds
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                context = multiprocessing.get_context("spawn")
                self._pool = ProcessPoolExecutor(
                    self.workers,
                    mp_context=context,
                    initializer=_worker_start,
                    initargs=(os.getpid(),),
                )
            return self._pool

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                self._pool = None
        broken.shutdown(wait=False, cancel_futures=True)

    async def _run(self, work: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            pool = self._executor()
            try:
                return await loop.run_in_executor(pool, work, self.cpu_seconds, *args)
            except BrokenProcessPool:
                # A worker died (a codec crash, the OOM killer): every task in flight
                # fails with this. A fresh pool gets each of them once more.
                self._replace(pool)
                if attempt:
                    raise audio.AudioError(CRASHED) from None
        raise AssertionError("unreachable")

    async def check(self, path: Path, expected: float | None) -> audio.AudioInfo:
        """audio.check_audio: in a worker, except for a plain 16-bit PCM WAV, which is
        read with numpy in bounded blocks (no decoder, at most 264 s of samples) and is
        quicker in a thread than the two process hops (bench/engine.py)."""
        if await asyncio.to_thread(audio.is_plain_wav, path):
            return await asyncio.to_thread(audio.check_audio, path, expected)
        return await self._run(_check, path, expected)

    def start(self) -> None:
        """Spawn the workers now (a fresh interpreter each: about a second), so that the
        first song does not wait for them. Returns at once."""
        pool = self._executor()
        for _ in range(self.workers):
            pool.submit(os.getpid)

    async def cover(self, path: Path, title: str | None = None) -> bytes:
        """audio.render_cover (with the title drawn on it, when given) in a worker."""
        return await self._run(_cover, path, title)

    async def render(
        self,
        src: Path,
        dest: Path,
        fmt: str,
        *,
        byte_limit: int | None,
        tags: audio.SongTags | None,
        duration: float | None,
        cover: bytes | None = None,
    ) -> tuple[bytes, audio.EncodedAudio]:
        """One song's cover (unless given) and encode, as one task: (cover, encoded)."""
        return await self._run(_render, src, dest, fmt, byte_limit, tags, cover, duration)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


_shared: Renderer | None = None


def shared() -> Renderer:
    """The process's renderer (started on first use, one pool for every engine)."""
    global _shared
    if _shared is None:
        _shared = Renderer()
    return _shared
