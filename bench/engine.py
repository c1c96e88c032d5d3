"""Engine overhead: jobs through the real engine and SQLite at 1, 100 and 1000 in flight.

The provider is an in-process Provider subclass that takes a fixed time per job and
serves a small WAV from memory; the front-end is a Delivery that returns at once. What
is left is the engine's own cost: admission with its quota transaction, fair scheduling,
every state transition, the audio check and store, and delivery bookkeeping.

    python bench/engine.py            # full run, about a minute and a half
    python bench/engine.py --quick    # smoke run, a few seconds
    python bench/engine.py --database-url postgresql://...   # the same on PostgreSQL

Each in-flight level runs in its own subprocess (fresh event loop, its own peak RSS).
Figures: added latency (end to end minus the provider's own time) p50/p99, CPU ms per
job, event-loop lag p99, peak RSS. Results go to bench/results/engine.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench._util import (  # noqa: E402
    LoopLag,
    current_rss_mb,
    machine,
    median,
    peak_rss_mb,
    percentile,
    table,
    write_results,
)
from bot.engine import Engine, EngineOptions, Failure, Progress, Song  # noqa: E402
from bot.models import Job, Requester  # noqa: E402
from bot.requests import GenerationRequest, Mode  # noqa: E402
from bot.settings import Settings  # noqa: E402
from providers.base import (  # noqa: E402
    Capabilities,
    Handle,
    Provider,
    Result,
    Status,
    Succeeded,
)
from tests.fakes.audio import make_wav  # noqa: E402

# Full run: (jobs in flight, provider latency ms, total jobs). The provider latency grows
# with the level so that offered load stays within one core (real songs take 10-60 s at
# a provider; these are far shorter, so the load is still many times a real bot's).
FULL_LEVELS = [(1, 100, 100), (100, 2000, 800), (1000, 20000, 2000)]
QUICK_LEVELS = [(1, 50, 10), (100, 500, 200), (1000, 5000, 1000)]

# Targets from the issue.
TARGET_P50_MS_AT_100 = 10.0
TARGET_P99_MS_AT_100 = 50.0
TARGET_LAG_P99_MS_AT_1000 = 20.0
TARGET_RSS_MB_AT_1000 = 200.0

SONG_SECONDS = 5  # the shortest song a request may ask for
# A small but real WAV (8 kHz mono): the engine decodes it fully to check its duration.
AUDIO = make_wav(SONG_SECONDS, sample_rate=8000, channels=1)


@dataclass
class Timing:
    """When one job passed each point, perf_counter seconds."""

    asked: float = 0.0
    admitted: float = 0.0
    provider_submit: float = 0.0
    provider_done: float = 0.0
    provider_time: float = 0.0  # what the provider took for this job, seconds
    delivered: float = 0.0
    failed: str | None = None


class FixedLatencyProvider(Provider):
    """Accepts every job and 'succeeds' about `latency` seconds after the submit.

    Each job's time is drawn within +-20 % of `latency`: with one fixed time, jobs that
    started together would finish together forever and the bench would measure bursts
    of simultaneous finishes instead of a steady load.
    """

    name = "bench"

    def __init__(self, latency: float, concurrency: int, timings: dict[int, Timing]) -> None:
        super().__init__(httpx.AsyncClient())  # never used: save_audio serves memory
        self.latency = latency
        self.timings = timings  # keyed by seed, which the bench makes unique per job
        self.in_flight = 0
        self.max_in_flight = 0
        self._random = random.Random(8)
        self.capabilities = Capabilities(
            modes=frozenset({Mode.PROMPT, Mode.SONG}), price_per_second=0.0, concurrency=concurrency
        )

    async def submit(self, request: GenerationRequest, seed: int) -> Handle:
        now = time.perf_counter()
        took = self.latency * self._random.uniform(0.8, 1.2)
        timing = self.timings[seed]
        timing.provider_submit, timing.provider_time = now, took
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return Handle(self.name, {"seed": seed, "done_at": now + took})

    async def poll(self, handle: Handle) -> Status:
        # Waits out the job instead of answering "running": the engine's poll interval
        # would otherwise add its own quantisation to the figure being measured.
        remaining = float(handle.data["done_at"]) - time.perf_counter()
        if remaining > 0:
            await asyncio.sleep(remaining)
        self.in_flight -= 1
        self.timings[int(handle.data["seed"])].provider_done = time.perf_counter()
        return Succeeded(
            Result(audio_url=f"memory://{handle.data['seed']}.wav", content_type="audio/wav")
        )

    async def save_audio(self, result: Result, dest: Path, *, deadline: float | None = None) -> int:
        await asyncio.to_thread(dest.write_bytes, AUDIO)
        return len(AUDIO)

    def poll_interval(self) -> float:
        return 0.0


class NullDelivery:
    """A front-end that 'posts' at once, without rendering; wakes the waiting worker."""

    platform = "bench"

    def __init__(self) -> None:
        self._waiters: dict[str, asyncio.Future[str | None]] = {}

    def _waiter(self, job_id: str) -> asyncio.Future[str | None]:
        if job_id not in self._waiters:
            self._waiters[job_id] = asyncio.get_running_loop().create_future()
        return self._waiters[job_id]

    async def wait(self, job_id: str) -> str | None:
        """None once delivered, or the failure message."""
        try:
            return await self._waiter(job_id)
        finally:
            self._waiters.pop(job_id, None)

    async def on_progress(self, job: Job, progress: Progress) -> None:
        return None

    async def deliver(self, job: Job, song: Song) -> None:
        waiter = self._waiter(job.id)
        if not waiter.done():
            waiter.set_result(None)

    async def on_failed(self, job: Job, failure: Failure) -> None:
        waiter = self._waiter(job.id)
        if not waiter.done():
            waiter.set_result(str(failure.kind))


async def run_level(in_flight: int, latency_ms: float, total: int) -> dict[str, Any]:
    """Keep `in_flight` jobs going (one user each) until `total` jobs have finished."""
    timings: dict[int, Timing] = {}
    with tempfile.TemporaryDirectory(prefix="acestep-bench-") as tmp:
        big = 10**9  # quotas are checked on every admission but never refuse
        settings = Settings(
            _env_file=None,
            data_dir=Path(tmp) / "data",
            quota_user_jobs_per_day=big,
            quota_user_seconds_per_day=big,
            quota_user_concurrent_jobs=big,
            quota_community_seconds_per_day=big,
            spend_cap_usd_per_day=big,
            # --database-url: the same run on PostgreSQL (passed in the environment, off
            # the command line, as it may hold a password).
            database_url=os.environ.get("BENCH_DATABASE_URL") or None,
        )
        provider = FixedLatencyProvider(latency_ms / 1000, in_flight, timings)
        delivery = NullDelivery()
        engine = await Engine.open(settings, [provider], options=EngineOptions())
        engine.register_delivery(delivery)
        await engine.start()
        # Thread hand-offs to the database (one per transaction or read) and the time
        # its writer thread is busy, from here on (storage/database.py counts them).
        db = engine.store.db  # type: ignore[attr-defined]
        calls_start, busy_start, db_cpu_start = db.calls, db.writer_busy_s, db.cpu_s
        rss_before = current_rss_mb()
        lag = LoopLag()
        lag.start()
        next_seed = 0
        errors: list[str] = []

        async def worker(index: int) -> None:
            nonlocal next_seed
            requester = Requester("bench", f"user{index}", "guild1", f"user {index}")
            # Spread the first submits over one provider time, as users would arrive.
            await asyncio.sleep(index * latency_ms / 1000 / in_flight)
            while next_seed < total:
                seed = next_seed
                next_seed += 1
                request = GenerationRequest.build(
                    mode="prompt", prompt=f"bench song {seed}", duration=SONG_SECONDS, seed=seed
                )
                timing = timings[seed] = Timing(asked=time.perf_counter())
                try:
                    admission = await engine.submit(request, requester, {"chat": index})
                except Exception as exc:  # a refusal would make the figures meaningless
                    errors.append(f"{type(exc).__name__}: {exc}")
                    timing.failed = str(exc)
                    return
                timing.admitted = time.perf_counter()
                timing.failed = await delivery.wait(admission.job_id)
                timing.delivered = time.perf_counter()

        load_start = os.getloadavg()[0]
        cpu_start = time.process_time()
        wall_start = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(in_flight)))
        wall = time.perf_counter() - wall_start
        cpu = time.process_time() - cpu_start
        db_trips, db_busy = db.calls - calls_start, db.writer_busy_s - busy_start
        db_cpu = db.cpu_s - db_cpu_start
        await lag.stop()
        await engine.close()

    done = [t for t in timings.values() if t.failed is None and t.delivered]
    overhead = [(t.delivered - t.asked - t.provider_time) * 1000 for t in done]
    return {
        "in_flight": in_flight,
        "provider_latency_ms": latency_ms,
        "jobs": total,
        "delivered": len(done),
        "failed": len(timings) - len(done),
        "errors": errors[:5],
        "max_in_flight_at_provider": provider.max_in_flight,
        "wall_s": round(wall, 2),
        "load_average_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "jobs_per_s": round(len(done) / wall, 1) if wall else 0.0,
        "overhead_ms": {
            "p50": median(overhead),
            "p99": percentile(overhead, 99),
            "max": max(overhead, default=0.0),
        },
        # Where the added time goes: admission (Engine.submit), waiting to be sent to the
        # provider, and from the provider's answer to the front-end's deliver().
        "admission_ms": _spread([(t.admitted - t.asked) * 1000 for t in done]),
        "to_provider_ms": _spread([(t.provider_submit - t.admitted) * 1000 for t in done]),
        "finish_to_delivery_ms": _spread([(t.delivered - t.provider_done) * 1000 for t in done]),
        "cpu_ms_per_job": cpu * 1000 / max(1, len(done)),
        # The writer thread serialises every write (storage/database.py); reads run
        # beside it on their own connection.
        "db": {
            "round_trips_per_job": db_trips / max(1, len(done)),
            "writer_busy_ms_per_job": db_busy * 1000 / max(1, len(done)),
            "writer_busy_pct": 100 * db_busy / wall if wall else 0.0,
            # CPU of the database threads (included in cpu_ms_per_job).
            "cpu_ms_per_job": db_cpu * 1000 / max(1, len(done)),
        },
        "loop_lag_ms": {"p99": lag.p99_ms(), "max": lag.max_ms(), "samples": len(lag.samples)},
        "rss_mb": {"after_start": rss_before, "peak": peak_rss_mb()},
    }


def audio_check_cost(seconds: float = 60.0, runs: int = 3) -> dict[str, float]:
    """What the engine's full-decode check costs for a real-size song (48 kHz stereo WAV);
    the levels above use a tiny file so that they measure the engine, not the codec."""
    from bot import audio

    data = make_wav(seconds)
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(runs):
        audio.check_audio(data, seconds)
    return {
        "song_seconds": seconds,
        "bytes": len(data),
        "wall_ms": (time.perf_counter() - wall_start) * 1000 / runs,
        "cpu_ms": (time.process_time() - cpu_start) * 1000 / runs,
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {"p50": median(values), "p99": percentile(values, 99)}


def _child(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    if args.cores and hasattr(os, "sched_setaffinity"):
        # The targets are for one core: the event loop, the database threads and the audio
        # check threads all share it.
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    result = asyncio.run(run_level(args.level, args.latency_ms, args.jobs))
    print(json.dumps(result))


def _run_in_subprocess(in_flight: int, latency_ms: float, total: int, cores: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--level",
        str(in_flight),
        "--latency-ms",
        str(latency_ms),
        "--jobs",
        str(total),
        "--cores",
        str(cores),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"level {in_flight} failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _verdicts(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in results:
        if r["in_flight"] == 100:
            p50, p99 = r["overhead_ms"]["p50"], r["overhead_ms"]["p99"]
            lines.append(
                f"100 in flight: overhead p50 {p50:.1f} ms (target <= "
                f"{TARGET_P50_MS_AT_100:g}) {_ok(p50 <= TARGET_P50_MS_AT_100)}, "
                f"p99 {p99:.1f} ms (target <= {TARGET_P99_MS_AT_100:g}) "
                f"{_ok(p99 <= TARGET_P99_MS_AT_100)}"
            )
        if r["in_flight"] == 1000:
            lag, rss = r["loop_lag_ms"]["p99"], r["rss_mb"]["peak"]
            lines.append(
                f"1000 in flight: loop lag p99 {lag:.1f} ms (target <= "
                f"{TARGET_LAG_P99_MS_AT_1000:g}) "
                f"{_ok(lag <= TARGET_LAG_P99_MS_AT_1000)}, peak RSS {rss:.0f} MB "
                f"(target <= {TARGET_RSS_MB_AT_1000:g}) "
                f"{_ok(rss <= TARGET_RSS_MB_AT_1000)}"
            )
    return lines


def _ok(passed: bool) -> str:
    return "OK" if passed else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--levels", help="comma-separated in-flight levels (default 1,100,1000)")
    parser.add_argument(
        "--cores",
        type=int,
        default=1,
        help="CPU cores each level may use (default 1, as the targets say; 0 = all)",
    )
    parser.add_argument(
        "--database-url",
        help="run on this PostgreSQL database (postgresql://...) instead of a SQLite file",
    )
    # One level inside this process (what the parent runs in a subprocess).
    parser.add_argument("--level", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--latency-ms", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.level:
        _child(args)
        return
    if args.database_url:
        os.environ["BENCH_DATABASE_URL"] = args.database_url
    plan = QUICK_LEVELS if args.quick else FULL_LEVELS
    if args.levels:
        wanted = {int(x) for x in args.levels.split(",")}
        plan = [p for p in plan if p[0] in wanted]
    results = []
    for in_flight, latency_ms, total in plan:
        print(
            f"running {total} jobs at {in_flight} in flight, provider {latency_ms:g} ms ...",
            flush=True,
        )
        results.append(_run_in_subprocess(in_flight, latency_ms, total, args.cores))
    audio_cost = audio_check_cost(20.0 if args.quick else 60.0, 1 if args.quick else 3)
    headers = [
        "in flight",
        "provider ms",
        "jobs",
        "failed",
        "jobs/s",
        "overhead p50",
        "p99",
        "admit p50",
        "to prov p50",
        "finish p50",
        "CPU ms/job",
        "DB trips/job",
        "DB writer ms/job",
        "DB CPU ms/job",
        "lag p99",
        "lag max",
        "RSS MB",
        "load",
    ]
    rows = [
        [
            r["in_flight"],
            r["provider_latency_ms"],
            r["delivered"],
            r["failed"],
            r["jobs_per_s"],
            r["overhead_ms"]["p50"],
            r["overhead_ms"]["p99"],
            r["admission_ms"]["p50"],
            r["to_provider_ms"]["p50"],
            r["finish_to_delivery_ms"]["p50"],
            r["cpu_ms_per_job"],
            r["db"]["round_trips_per_job"],
            r["db"]["writer_busy_ms_per_job"],
            r["db"]["cpu_ms_per_job"],
            r["loop_lag_ms"]["p99"],
            r["loop_lag_ms"]["max"],
            r["rss_mb"]["peak"],
            r["load_average_1m"][0],
        ]
        for r in results
    ]
    print()
    print(table(headers, rows))
    print(
        "(times in ms; overhead = end to end minus the provider's own time; load = the "
        "machine's 1-minute load average when the level started)"
    )
    print(
        f"audio check of a {audio_cost['song_seconds']:g} s 48 kHz stereo WAV (done once "
        f"per job, in a renderer worker process): {audio_cost['wall_ms']:.0f} ms, "
        f"{audio_cost['cpu_ms']:.0f} ms CPU"
    )
    if args.quick:
        print("quick smoke run: loads far above a full run's, not comparable with the targets")
    else:
        for line in _verdicts(results):
            print(line)
    for r in results:
        for error in r["errors"]:
            print(f"error at {r['in_flight']} in flight: {error}")
    path = write_results(
        "engine-postgresql" if args.database_url else "engine",
        {
            "database": "postgresql" if args.database_url else "sqlite",
            "quick": args.quick,
            "cores": args.cores or "all",
            "levels": results,
            "audio_check": audio_cost,
        },
    )
    print(f"machine: {machine()}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
