"""How soon the bot knows a song is done: polling the fake fal queue through the engine.

The real engine and FalProvider (production poll settings) run against the fake fal
queue server (tests/fakes/fal.py) over real HTTP on 127.0.0.1. The fake is made
time-based here: each request finishes generating at a set moment. Measured per job:
from that moment to the status poll that first answers COMPLETED (the bot knows), and to
the front-end's deliver() (result fetched, audio downloaded, checked and stored), plus
how many status polls the job cost. fal also offers status streaming and webhooks;
our adapter does not use them yet, so polling is what is measured.

Two shapes of generation, since the engine backs off while a status stays the same:
fal writing a new log line every second (the status changes at each poll), and a silent
generation (the status never changes until it is done).

    python bench/detect.py           # full run, about a minute
    python bench/detect.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aiohttp import web  # noqa: E402

from bench._util import machine, median, percentile, table, write_results  # noqa: E402
from bench.engine import NullDelivery  # noqa: E402
from bot.engine import Engine, EngineOptions  # noqa: E402
from bot.models import Requester  # noqa: E402
from bot.requests import GenerationRequest  # noqa: E402
from bot.settings import Settings  # noqa: E402
from providers.fal import FalProvider  # noqa: E402
from tests.fakes.fal import FakeFal, FakeRequest  # noqa: E402

TARGET_MEDIAN_S = 1.0
SONG_SECONDS = 5  # audio length; generation time is set separately


def _log(message: str) -> dict[str, str]:
    """One entry of fal's `logs` list."""
    return {
        "message": message,
        "level": "INFO",
        "source": "user",
        "timestamp": "2026-01-01T00:00:00.000000",
    }


class TimedFal(FakeFal):
    """The fake fal queue, but a request is IN_PROGRESS until a set moment, then done."""

    def __init__(self, generation_times: list[float], log_every: float | None) -> None:
        super().__init__(queue_polls=0, progress_polls=0)  # the parent answers COMPLETED
        self._times = list(generation_times)
        self.log_every = log_every
        self.finish_at: dict[str, float] = {}
        self.known_at: dict[str, float] = {}  # first status answer that said COMPLETED
        self.generation: dict[str, float] = {}
        self.status_polls: Counter[str] = Counter()

    async def _submit(self, request: web.Request) -> web.Response:
        response = await super()._submit(request)
        if response.status == 200 and isinstance(response.body, bytes):
            request_id = json.loads(response.body)["request_id"]
            took = self._times.pop(0)
            self.generation[request_id] = took
            self.finish_at[request_id] = time.monotonic() + took
        return response

    def _status_body(self, request: web.Request, found: FakeRequest) -> tuple[dict[str, Any], int]:
        # Both the status GET and the status stream ask here, so both are timed.
        now = time.monotonic()
        self.status_polls[found.request_id] += 1
        finish = self.finish_at[found.request_id]
        if now < finish:
            return self._in_progress(request, found, now, finish), 202
        self.known_at.setdefault(found.request_id, now)
        return super()._status_body(request, found)

    def _in_progress(
        self, request: web.Request, found: FakeRequest, now: float, finish: float
    ) -> dict[str, Any]:
        took = self.generation[found.request_id]
        started = finish - took
        logs = [_log("Loading ACE-Step model")]
        if self.log_every:
            lines = int((now - started) / self.log_every)
            logs += [
                _log(f"Generating: {min(99, round(100 * (i + 1) * self.log_every / took))}%")
                for i in range(lines)
            ]
        return {
            "request_id": found.request_id,
            "status": "IN_PROGRESS",
            "logs": logs,
            **self._urls(request, found.request_id),
        }


@dataclass(frozen=True)
class Scenario:
    name: str
    log_every: float | None
    jobs: int
    generation: tuple[float, float]  # seconds, uniform


async def run_scenario(scenario: Scenario, seed: int = 3) -> dict[str, Any]:
    rng = random.Random(seed)
    times = [rng.uniform(*scenario.generation) for _ in range(scenario.jobs)]
    fake = TimedFal(times, scenario.log_every)
    delivered_at: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="acestep-detect-") as tmp:
        big = 10**9
        settings = Settings(
            _env_file=None,
            data_dir=Path(tmp) / "data",
            quota_user_jobs_per_day=big,
            quota_user_seconds_per_day=big,
            quota_user_concurrent_jobs=big,
            quota_community_seconds_per_day=big,
            spend_cap_usd_per_day=big,
        )
        async with fake.running() as url:
            # What providers/registry.py builds: production poll interval and retries.
            provider = FalProvider(fake.key, url, concurrency=scenario.jobs)
            engine = await Engine.open(settings, [provider], options=EngineOptions())
            delivery = NullDelivery()
            engine.register_delivery(delivery)
            await engine.start()

            async def one(index: int) -> None:
                request = GenerationRequest.build(
                    mode="prompt", prompt=f"detect {index}", duration=SONG_SECONDS
                )
                admission = await engine.submit(request, Requester("bench", f"u{index}"), {})
                failed = await delivery.wait(admission.job_id)
                if failed is None:
                    delivered_at[admission.job_id] = time.monotonic()

            try:
                await asyncio.gather(*(one(i) for i in range(scenario.jobs)))
                jobs = {job.id: job for job in await engine.store.recent(limit=10**6)}
            finally:
                await engine.close()
    known, to_delivery, polls, per_minute = [], [], [], []
    for job_id, job in jobs.items():
        request_id = json.loads(job.handle)["data"]["request_id"] if job.handle else None
        if request_id not in fake.known_at or job_id not in delivered_at:
            continue
        finish = fake.finish_at[request_id]
        known.append(fake.known_at[request_id] - finish)
        to_delivery.append(delivered_at[job_id] - finish)
        polls.append(fake.status_polls[request_id])
        per_minute.append(fake.status_polls[request_id] * 60 / fake.generation[request_id])
    return {
        "scenario": scenario.name,
        "jobs": scenario.jobs,
        "completed": len(known),
        "generation_s": list(scenario.generation),
        "known_s": {
            "p50": median(known),
            "p90": percentile(known, 90),
            "max": max(known, default=0.0),
        },
        "delivered_s": {"p50": median(to_delivery), "p90": percentile(to_delivery, 90)},
        "status_polls_per_job": {
            "mean": sum(polls) / max(1, len(polls)),
            "max": max(polls, default=0),
        },
        "status_polls_per_generation_minute": sum(per_minute) / max(1, len(per_minute)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    jobs, generation = (4, (1.0, 4.0)) if args.quick else (20, (4.0, 30.0))
    scenarios = [
        Scenario("fal logs every 1 s", 1.0, jobs, generation),
        Scenario("silent generation", None, jobs, generation),
    ]
    options = EngineOptions()
    print(
        f"{jobs} jobs at once per scenario, generation {generation[0]:g}-{generation[1]:g} s;"
        f" engine polls from the provider's interval (fal: 1 s), x{options.poll_backoff:g}"
        f" while the status is unchanged, at most every {options.poll_max_interval:g} s",
        flush=True,
    )
    results = [asyncio.run(run_scenario(s)) for s in scenarios]
    headers = [
        "scenario",
        "jobs",
        "knows p50 s",
        "p90",
        "max",
        "delivered p50 s",
        "polls/job",
        "polls/min",
    ]
    rows = [
        [
            r["scenario"],
            r["completed"],
            r["known_s"]["p50"],
            r["known_s"]["p90"],
            r["known_s"]["max"],
            r["delivered_s"]["p50"],
            r["status_polls_per_job"]["mean"],
            r["status_polls_per_generation_minute"],
        ]
        for r in results
    ]
    print()
    print(table(headers, rows))
    print(
        "(seconds from the provider finishing; polls = status requests per job, and per "
        "minute of generation)"
    )
    for r in results:
        p50 = r["known_s"]["p50"]
        verdict = "OK" if p50 <= TARGET_MEDIAN_S else "MISSED"
        print(f"{r['scenario']}: median {p50:.2f} s (target <= {TARGET_MEDIAN_S:g}) {verdict}")
    path = write_results(
        "detect", {"quick": args.quick, "results": results, "engine_options": options.__dict__}
    )
    print(f"machine: {machine()}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
