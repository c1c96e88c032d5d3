"""Costs that must not grow with history: the same figures at 0, 10k, 100k and 1M job rows.

One SQLite database, made by the project's own migrations, is filled in steps with
finished job rows and their ledger lines shaped like the bot's own (bulk inserts straight
into the schema; the per-day counters are then built by migration 0007's own statement,
which times the upgrade of a database that size), beside the same 30 songs in progress
at every level. At each step, against the real store, engine and
/metrics server:

- admission (Engine.submit, then cancelled) p50/p99 for a typical user, and for a heavy
  user whose community has many jobs today (a fifth of all history is theirs);
- a /metrics scrape over HTTP, and the same admission with a scrape fired beside it;
- `stats` for 7 days;
- event-loop lag p99 over a window with a scrape every second and admissions between;
- the database file's size, and the counters' build (migration 0007) time.

Each level has its own database. They are measured in turn, three rounds of them
(`--repeat`), so that other work on the machine weighs on every level alike; each figure
shown is the median of the three, also as a ratio to the empty database's.

    python bench/growth.py                      # 0, 10k, 100k, 1M rows (several minutes)
    python bench/growth.py --levels 0,10000,100000
    python bench/growth.py --quick              # 0, 2k, 20k rows, a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench._util import LoopLag, machine, median, percentile, table, write_results  # noqa: E402
from bot.engine import Engine  # noqa: E402
from bot.health import HealthServer  # noqa: E402
from bot.models import Requester  # noqa: E402
from bot.requests import GenerationRequest  # noqa: E402
from bot.settings import Settings  # noqa: E402
from providers.fal import FalProvider  # noqa: E402
from storage.database import Database, _statements, migrations  # noqa: E402
from storage.jobs import JobStore  # noqa: E402

FULL_LEVELS = [0, 10_000, 100_000, 1_000_000]
QUICK_LEVELS = [0, 2_000, 20_000]

DAY = 86_400.0
HISTORY_DAYS = 90  # JOB_RETENTION_DAYS' default: what a bot with retention holds
TODAY_SHARE = 0.05  # of all rows, admitted today
HEAVY_SHARE = 0.20  # of all rows (and of today's), the heavy user's
TYPICAL_USERS = 5000
COMMUNITIES = 200
PROVIDERS = [("fal", 0.6), ("wavespeed", 0.25), ("replicate", 0.15)]
# Songs in progress (half queued, half running) at every level, the empty one included:
# Engine.submit reads the queue for the new job's position, and that cost belongs to the
# queue, not to the history.
ACTIVE_ROWS = 30

# Targets from the issue.
TARGET_ADMISSION_RATIO = 1.5
TARGET_SCRAPE_MS = 20.0
TARGET_STATS_MS = 200.0
TARGET_LAG_MS = 20.0

HEAVY = Requester("telegram", "999999", "-100999", "heavy")


def typical(n: int) -> Requester:
    community = None if n % 5 == 0 else f"-100{n % COMMUNITIES}"
    return Requester("telegram", str(100_000 + n), community, f"user {n}")


# ---- filling the database -------------------------------------------------------------


def _counters_statement() -> str:
    """The usage-counters migration's statement that builds them from the job rows."""
    for _, name, sql in migrations():
        if name.endswith("_usage_daily.sql"):
            return next(s for s in _statements(sql) if s.startswith("INSERT INTO usage_daily"))
    raise SystemExit("the usage_daily migration was not found")


class Filler:
    """Adds history to the database in steps, as the bot would have written it."""

    def __init__(self, path: Path, now: float) -> None:
        self.path = path
        self.now = now
        self.rows = 0
        self.rng = random.Random(17)
        request = GenerationRequest.build(
            mode="prompt",
            prompt="lofi piano about rain on a tin roof, slow and warm, for studying late",
            duration=60,
            seed=1234,
        )
        self.request_json = request.model_dump_json()

    def _row(self, n: int) -> tuple[list[Any], list[tuple[Any, ...]]]:
        rng = self.rng
        who = HEAVY if rng.random() < HEAVY_SHARE else typical(rng.randrange(TYPICAL_USERS))
        if n < ACTIVE_ROWS:
            state = "queued" if n % 2 else "running"
            created = self.now - rng.uniform(0, 600)
        else:
            draw = rng.random()
            state = "delivered" if draw < 0.9 else "failed" if draw < 0.97 else "cancelled"
            if rng.random() < TODAY_SHARE:
                created = self.now - rng.uniform(0, self.now % DAY)
            else:
                created = self.now - self.now % DAY - rng.uniform(0, HISTORY_DAYS * DAY)
        provider = None
        if state != "queued":
            draw, acc = rng.random(), 0.0
            for name, share in PROVIDERS:
                acc += share
                if draw < acc:
                    provider = name
                    break
            provider = provider or PROVIDERS[-1][0]
        # Unique and scattered like the engine's random ids, but never one of them: the
        # engine's are 8 hex digits, these start with a "g".
        job_id = f"g{(n * 2_654_435_761) % 2**28:07x}"
        duration = 60
        reserved = round(0.0002 * duration, 6)
        refunded = int(state in ("failed", "cancelled"))
        made = state == "delivered" or (state == "failed" and n % 3 == 0)
        charged = reserved if made else None
        result = None
        if state == "delivered":
            result = json.dumps(
                {
                    "seed": 1234,
                    "tags": "lofi, piano, rain, warm, slow",
                    "lyrics": "[verse]\nrain on the roof\n[chorus]\nstay a while",
                    "duration": 60.0,
                    "format": "wav",
                    "sample_rate": 48000,
                    "channels": 2,
                    "audio_file": f"{job_id}.wav",
                    "provider": provider,
                    "title": "lofi piano about rain on a tin roof",
                    "provider_metadata": {"request_id": f"{job_id}-req", "timings": {"x": 1}},
                }
            )
        finished = created + rng.uniform(20, 120) if state not in ("queued", "running") else None
        reply = json.dumps({"chat_id": int(who.community_id or who.user_id), "message_id": n})
        row = [
            job_id,
            who.platform,
            who.user_id,
            who.key,
            who.community_key,
            who.display_name,
            reply,
            self.request_json,
            duration,
            1234,
            state,
            provider,
            json.dumps({"provider": provider, "data": {"request_id": f"{job_id}-req"}}),
            1,
            reserved,
            charged,
            refunded,
            result,
            "The music service could not make this song." if state == "failed" else None,
            created,
            finished or created,
            created + 1,
            finished,
            finished + 3 if finished and state == "delivered" else None,
        ]
        line = (job_id, who.key, who.community_key)
        ledger = [(*line, "reserve", duration, reserved, None, created)]
        if charged is not None:
            ledger.append((*line, "charge", duration, charged, provider, finished))
        if state == "delivered":
            ledger.append((*line, "commit", duration, charged, provider, finished))
        elif refunded:
            refund = 0.0 if charged is not None else reserved
            ledger.append((*line, "refund", duration, refund, provider, finished))
        return row, ledger

    def grow_to(self, history: int) -> dict[str, float]:
        """Insert finished rows until there are `history` (beside the songs in
        progress), then rebuild the counters as migration 0007 builds them; returns the
        seconds each took."""
        total = ACTIVE_ROWS + history
        started = time.perf_counter()
        conn = sqlite3.connect(str(self.path), isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous = OFF")
            batch = 20_000
            while self.rows < total:
                jobs, ledger = [], []
                for n in range(self.rows, min(total, self.rows + batch)):
                    row, lines = self._row(n)
                    jobs.append(row)
                    ledger.extend(lines)
                conn.execute("BEGIN")
                conn.executemany(
                    "INSERT INTO jobs (id, platform, user_id, user_key, community_key,"
                    " display_name, reply_target, request, duration, seed, state, provider,"
                    " handle, attempts, reserved_usd, charged_usd, refunded, result, error,"
                    " created_at, updated_at, started_at, finished_at, delivered_at)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    jobs,
                )
                conn.executemany(
                    "INSERT INTO usage_ledger (job_id, user_key, community_key, kind, seconds,"
                    " usd, provider, at) VALUES (?,?,?,?,?,?,?,?)",
                    ledger,
                )
                conn.execute("COMMIT")
                self.rows += len(jobs)
            filled = time.perf_counter() - started
            started = time.perf_counter()
            conn.execute("BEGIN")
            conn.execute("DELETE FROM usage_daily")
            conn.execute(_counters_statement())
            conn.execute("COMMIT")
            counters = time.perf_counter() - started
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        return {"fill_s": filled, "counters_s": counters}


# ---- measuring --------------------------------------------------------------------------


async def timed(coro: Any) -> float:
    started = time.perf_counter()
    await coro
    return (time.perf_counter() - started) * 1000


async def admission_ms(engine: Engine, who: Requester, n: int) -> float:
    request = GenerationRequest.build(mode="prompt", prompt=f"growth bench {n}", duration=30)
    started = time.perf_counter()
    admission = await engine.submit(request, who, {"chat_id": 1})
    took = (time.perf_counter() - started) * 1000
    await engine.cancel(admission.job_id, who)  # keeps the user under the concurrency cap
    return took


async def measure(
    engine: Engine, server: HealthServer, store: JobStore, rounds: int, lag_window: float
) -> dict[str, Any]:
    counter = iter(range(10**9))
    users = [typical(n) for n in range(TYPICAL_USERS)]
    rng = random.Random(5)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:

        async def scrape() -> float:
            started = time.perf_counter()
            response = await client.get("/metrics")
            response.raise_for_status()
            return (time.perf_counter() - started) * 1000

        for _ in range(5):  # warm the caches as a running bot has them
            await admission_ms(engine, rng.choice(users), next(counter))
            await admission_ms(engine, HEAVY, next(counter))
            await scrape()
            await store.stats(time.time() - 6 * DAY, top=20)
        admit_typical = [
            await admission_ms(engine, rng.choice(users), next(counter)) for _ in range(rounds)
        ]
        admit_heavy = [await admission_ms(engine, HEAVY, next(counter)) for _ in range(rounds)]
        scrapes = [await scrape() for _ in range(rounds)]
        # As `acestep-bot stats` asks: today and the 6 days before, the top 20 of each.
        stats = [await timed(store.stats(time.time() - 6 * DAY, top=20)) for _ in range(5)]

        # An admission with a scrape fired at the same moment.
        beside = []
        for _ in range(rounds):
            scraping = asyncio.create_task(scrape())
            beside.append(await admission_ms(engine, HEAVY, next(counter)))
            await scraping

        # Loop lag with a scrape every second and admissions in between.
        lag = LoopLag()
        lag.start()
        stop_at = time.perf_counter() + lag_window
        during: list[float] = []

        async def scraper() -> None:
            while time.perf_counter() < stop_at:
                await scrape()
                await asyncio.sleep(1.0)

        scraping = asyncio.create_task(scraper())
        while time.perf_counter() < stop_at:
            during.append(await admission_ms(engine, rng.choice(users), next(counter)))
            await asyncio.sleep(0.05)
        await scraping
        await lag.stop()
    return {
        "admission_typical_ms": _spread(admit_typical),
        "admission_heavy_ms": _spread(admit_heavy),
        "admission_beside_scrape_ms": _spread(beside),
        "admission_while_scraping_every_s_ms": _spread(during),
        "scrape_ms": _spread(scrapes),
        "stats_7d_ms": _spread(stats),
        "loop_lag_ms": {"p99": lag.p99_ms(), "max": lag.max_ms(), "samples": len(lag.samples)},
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {"p50": median(values), "p99": percentile(values, 99), "n": len(values)}


def db_size_mb(path: Path) -> float:
    total = sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())
    return total / 1e6


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over repeated measurements of one level (a p99 of a few
    hundred samples on a shared VM is mostly its worst hiccup; the median of three is
    what the issue's own table used)."""
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, dict):
            out[key] = {k: median([r[key][k] for r in runs]) for k in value}
        else:
            out[key] = value
    return out


def bench_settings(data: Path) -> Settings:
    big = 10**9  # quotas are read and checked at every admission but never refuse
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=data,
        providers=["fal"],
        fal_key="bench-key",
        quota_user_jobs_per_day=big,
        quota_user_seconds_per_day=big,
        quota_user_concurrent_jobs=big,
        quota_community_seconds_per_day=big,
        spend_cap_usd_per_day=big,
        health_port=0,
    )


async def measure_level(settings: Settings, rounds: int, lag_window: float) -> dict[str, Any]:
    db = await Database.open(settings.db_path)
    store = JobStore(db)
    # Never called: the engine is not started, so nothing is submitted.
    engine = Engine(settings, store, [FalProvider("bench-key", "http://127.0.0.1:9")])
    server = HealthServer(settings, engine, [])
    await server.start()
    try:
        return await measure(engine, server, store, rounds, lag_window)
    finally:
        await server.stop()
        await engine.close()


async def run(
    levels: list[int], rounds: int, lag_window: float, repeat: int, keep: Path | None
) -> list[Any]:
    """One database per level, filled first; then every level measured in turn, `repeat`
    rounds of them, so that the load other work puts on the machine falls on each level
    alike."""
    tmp = tempfile.TemporaryDirectory(prefix="acestep-growth-", dir=keep)
    now = time.time()
    per_level: dict[int, dict[str, Any]] = {}
    try:
        for level in levels:
            settings = bench_settings(Path(tmp.name) / f"data-{level}")
            db = await Database.open(settings.db_path)  # the project's migrations
            await db.close()
            print(f"filling a database to {level:,} rows ...", flush=True)
            build = await asyncio.to_thread(Filler(settings.db_path, now).grow_to, level)
            per_level[level] = {"settings": settings, "build": build, "runs": []}
        for n in range(repeat):
            for level in levels:
                print(f"measuring {level:,} rows ({n + 1} of {repeat}) ...", flush=True)
                found = per_level[level]
                found["runs"].append(await measure_level(found["settings"], rounds, lag_window))
                found["load"] = round(os.getloadavg()[0], 2)
        return [
            {
                "rows": level,
                "db_mb": db_size_mb(per_level[level]["settings"].db_path),
                **per_level[level]["build"],
                **median_of(per_level[level]["runs"]),
                "load_average_1m": per_level[level]["load"],
            }
            for level in levels
        ]
    finally:
        tmp.cleanup()


def report(results: list[dict[str, Any]]) -> list[str]:
    base = results[0]

    def ratio(r: dict[str, Any], key: str, pct: str = "p99") -> str:
        value, ref = r[key][pct], base[key][pct]
        return f"{value:.2f} ({value / ref:.2f}x)" if ref else f"{value:.2f}"

    headers = [
        "rows",
        "DB MB",
        "admit typical p99",
        "admit heavy p99",
        "admit + scrape p99",
        "scrape p50",
        "scrape p99",
        "stats 7d p50",
        "lag p99 (1 scrape/s)",
        "counters build s",
        "load",
    ]
    rows = [
        [
            f"{r['rows']:,}",
            f"{r['db_mb']:.1f}",
            ratio(r, "admission_typical_ms"),
            ratio(r, "admission_heavy_ms"),
            ratio(r, "admission_beside_scrape_ms"),
            ratio(r, "scrape_ms", "p50"),
            ratio(r, "scrape_ms"),
            ratio(r, "stats_7d_ms", "p50"),
            f"{r['loop_lag_ms']['p99']:.2f}",
            f"{r['counters_s']:.1f}",
            r["load_average_1m"],
        ]
        for r in results
    ]
    print()
    print(table(headers, rows))
    print("(ms unless said; (Nx) = ratio to the empty database in this run)")
    last = results[-1]
    verdicts = []
    for key, label in (
        ("admission_typical_ms", "typical user"),
        ("admission_heavy_ms", "heavy user"),
    ):
        got = last[key]["p99"] / base[key]["p99"] if base[key]["p99"] else 0.0
        verdicts.append(
            f"admission p99 at {last['rows']:,} rows, {label}: {got:.2f}x the empty database "
            f"(target <= {TARGET_ADMISSION_RATIO:g}x) {_ok(got <= TARGET_ADMISSION_RATIO)}"
        )
    scrape, stats = last["scrape_ms"]["p99"], last["stats_7d_ms"]["p50"]
    lag = max(r["loop_lag_ms"]["p99"] for r in results)
    verdicts += [
        f"scrape p99 at {last['rows']:,} rows: {scrape:.1f} ms (target < "
        f"{TARGET_SCRAPE_MS:g}) {_ok(scrape < TARGET_SCRAPE_MS)}",
        f"stats 7 days at {last['rows']:,} rows: {stats:.1f} ms (target < "
        f"{TARGET_STATS_MS:g}) {_ok(stats < TARGET_STATS_MS)}",
        f"loop lag p99 while scraping every second, worst level: {lag:.1f} ms (target < "
        f"{TARGET_LAG_MS:g}) {_ok(lag < TARGET_LAG_MS)}",
    ]
    beside = last["admission_beside_scrape_ms"]["p50"] - last["admission_heavy_ms"]["p50"]
    verdicts.append(
        f"a scrape beside an admission adds {beside:.2f} ms to it (p50, {last['rows']:,} rows)"
    )
    return verdicts


def _ok(passed: bool) -> str:
    return "OK" if passed else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="0, 2k and 20k rows, fewer rounds")
    parser.add_argument("--levels", help="comma-separated row counts (default 0,10k,100k,1M)")
    parser.add_argument("--rounds", type=int, help="admissions per measurement (default 200)")
    parser.add_argument(
        "--repeat", type=int, help="measurements per level, medians shown (default 3)"
    )
    parser.add_argument("--tmp", type=Path, help="directory for the database (default: system)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    levels = QUICK_LEVELS if args.quick else FULL_LEVELS
    if args.levels:
        levels = [int(x) for x in args.levels.split(",")]
    if levels[0] != 0:
        levels = [0, *levels]  # every figure is compared with the empty database
    rounds = args.rounds or (40 if args.quick else 200)
    repeat = args.repeat or (1 if args.quick else 3)
    results = asyncio.run(run(levels, rounds, 3.0 if args.quick else 10.0, repeat, args.tmp))
    for line in report(results):
        print(line)
    path = write_results(
        "growth", {"quick": args.quick, "rounds": rounds, "repeat": repeat, "levels": results}
    )
    print(f"machine: {machine()}, SQLite {sqlite3.sqlite_version}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
