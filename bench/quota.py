"""Quota admissions per second: 200 concurrent requesters on one SQLite file.

Every attempt is a real admission (JobStore.admit: one BEGIN IMMEDIATE transaction on the
database's writer thread reading today's counters and the overrides, every limit checked,
the job row, its ledger line and the counters written). The limits are set so that both
the per-user and the per-community limits refuse part of the demand, which makes the
outcome exact whatever the interleaving: each community admits exactly its seconds
limit, no user passes their jobs limit, the ledger holds one reservation per admitted
job and nothing for a refused one, and the per-day counters equal the job rows. The
script checks all of that.

Two shapes: one process with 200 requesters on its one writer (the bot), and the
same 200 requesters split over 4 processes on the same file (what a CLI or a second bot
next to the first does: SQLite's file lock and busy timeout arbitrate).

    python bench/quota.py           # full run (each shape 3 times), under a minute
    python bench/quota.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sqlite3
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

from bench._util import machine, median, percentile, table, write_results  # noqa: E402
from bot.models import Job, Requester  # noqa: E402
from bot.requests import GenerationRequest  # noqa: E402
from storage.database import SYNCHRONOUS, Database  # noqa: E402
from storage.jobs import JobStore, Limits, QuotaRefusal  # noqa: E402

TARGET_PER_S = 1000.0
REQUESTERS = 200
COMMUNITIES = 4
SONG_SECONDS = 10
USD_PER_JOB = 0.002


@dataclass(frozen=True)
class Plan:
    """How many attempts each requester makes and the limits that must refuse some."""

    attempts: int

    @property
    def user_jobs(self) -> int:
        return math.ceil(self.attempts * 2 / 3)

    @property
    def community_seconds(self) -> int:
        # Below what the users of one community could take under their own limit, so the
        # community limit is the one that binds for most of them.
        users = REQUESTERS // (COMMUNITIES + 1)
        return int(0.6 * users * self.user_jobs) * SONG_SECONDS

    def limits(self) -> Limits:
        return Limits(
            user_jobs_per_day=self.user_jobs,
            user_seconds_per_day=10**9,
            user_concurrent_jobs=10**9,
            community_seconds_per_day=self.community_seconds,
            spend_cap_usd=10**9,
        )


def requester(index: int) -> Requester:
    """Users spread over the communities; every fourth writes from DMs (no community),
    where only the per-user limits apply."""
    group = index % (COMMUNITIES + 1)
    return Requester("bench", f"u{index}", f"g{group}" if group < COMMUNITIES else None)


async def admit_all(
    db_path: Path,
    users: list[int],
    plan: Plan,
    now: float,
    start_at: float | None = None,
    synchronous: str = SYNCHRONOUS,
) -> dict[str, Any]:
    """Each user in `users` makes `plan.attempts` admissions, all users concurrently."""
    db = await Database.open(db_path, synchronous=synchronous)
    store = JobStore(db)
    request = GenerationRequest.build(mode="prompt", prompt="quota bench", duration=SONG_SECONDS)
    limits = plan.limits()
    latencies: list[float] = []
    counts = {"admitted": 0, "refused": 0, "errors": 0}
    refusals: dict[str, int] = {}
    errors: list[str] = []

    async def one_user(index: int) -> None:
        who = requester(index)
        for n in range(plan.attempts):
            job = Job(
                id=f"{who.user_id}-{n}",
                requester=who,
                reply_target={},
                request=request,
                seed=n,
                state="queued",
                reserved_usd=USD_PER_JOB,
            )
            started = time.perf_counter()
            try:
                await store.admit(job, limits, bypass_quotas=False, now=now)
                counts["admitted"] += 1
            except QuotaRefusal as refusal:
                counts["refused"] += 1
                refusals[refusal.limit] = refusals.get(refusal.limit, 0) + 1
            except Exception as exc:  # counted and shown, never hidden
                counts["errors"] += 1
                errors.append(f"{type(exc).__name__}: {exc}")
            latencies.append(time.perf_counter() - started)

    if start_at is not None:  # processes start together
        await asyncio.sleep(max(0.0, start_at - time.time()))
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one_user(i) for i in users))
    wall = time.perf_counter() - wall_start
    cpu = time.process_time() - cpu_start
    await db.close()
    return {
        **counts,
        "refusals": refusals,
        "errors_sample": errors[:3],
        "wall_s": wall,
        "cpu_s": cpu,
        "latencies": latencies,
        "ended_at": time.time(),
    }


def check_ledger(db_path: Path, plan: Plan, attempts: int) -> list[str]:
    """Everything the final database must hold, exactly; returns the problems found."""
    problems: list[str] = []
    conn = sqlite3.connect(db_path)
    try:
        jobs = conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        reserves = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(seconds), 0), COALESCE(SUM(usd), 0)"
            " FROM usage_ledger WHERE kind = 'reserve'"
        ).fetchone()
        other = conn.execute(
            "SELECT COUNT(*) FROM usage_ledger WHERE kind != 'reserve'"
        ).fetchone()[0]
        orphans = conn.execute(
            "SELECT COUNT(*) FROM usage_ledger l LEFT JOIN jobs j ON j.id = l.job_id"
            " WHERE j.id IS NULL"
        ).fetchone()[0]
        unledgered = conn.execute(
            "SELECT COUNT(*) FROM jobs j WHERE NOT EXISTS (SELECT 1 FROM usage_ledger l"
            " WHERE l.job_id = j.id AND l.kind = 'reserve')"
        ).fetchone()[0]
        per_community = dict(
            conn.execute(
                "SELECT community_key, SUM(seconds) FROM usage_ledger WHERE kind = 'reserve'"
                " GROUP BY community_key"
            ).fetchall()
        )
        worst_user = conn.execute(
            "SELECT COALESCE(MAX(n), 0) FROM (SELECT COUNT(*) AS n FROM jobs GROUP BY user_key)"
        ).fetchone()[0]
        dm_users = conn.execute(
            "SELECT COUNT(*) AS n FROM jobs WHERE community_key IS NULL GROUP BY user_key"
        ).fetchall()
    finally:
        conn.close()
    expected_per_community = plan.community_seconds
    dm_count = sum(1 for i in range(REQUESTERS) if requester(i).community_id is None)
    expected_jobs = COMMUNITIES * expected_per_community // SONG_SECONDS + dm_count * plan.user_jobs
    if jobs != expected_jobs:
        problems.append(f"{jobs} jobs admitted, expected exactly {expected_jobs}")
    if reserves[0] != jobs or unledgered or orphans or other:
        problems.append(
            f"ledger: {reserves[0]} reservations for {jobs} jobs, "
            f"{unledgered} jobs without one, {orphans} orphan lines, "
            f"{other} other lines"
        )
    if abs(reserves[2] - jobs * USD_PER_JOB) > 1e-6:
        problems.append(f"ledger USD {reserves[2]} != {jobs} x {USD_PER_JOB}")
    for index in range(COMMUNITIES):
        key = f"bench:g{index}"
        got = per_community.get(key, 0)
        if got != expected_per_community:
            problems.append(
                f"community {key}: {got} s reserved, limit "
                f"{expected_per_community} s (must be exactly full)"
            )
    if worst_user > plan.user_jobs:
        problems.append(f"a user got {worst_user} jobs, limit {plan.user_jobs}")
    if len(dm_users) != dm_count or any(n != plan.user_jobs for (n,) in dm_users):
        problems.append(
            f"users without a community must each get exactly "
            f"{plan.user_jobs} jobs: {sorted(n for (n,) in dm_users)[:5]}..."
        )
    # The per-day counters admission read equal the job rows, whichever process wrote.
    mismatches = asyncio.run(_counter_mismatches(db_path))
    if mismatches:
        problems.append(f"counters differ from the job rows: {mismatches[:3]}")
    return problems


async def _counter_mismatches(path: Path) -> list[str]:
    db = await Database.open(path)
    try:
        return await JobStore(db).usage_mismatches()
    finally:
        await db.close()


def run_one_process(plan: Plan, synchronous: str = SYNCHRONOUS) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="acestep-quota-") as tmp:
        path = Path(tmp) / "quota.sqlite3"
        result = asyncio.run(
            admit_all(path, list(range(REQUESTERS)), plan, time.time(), synchronous=synchronous)
        )
        problems = check_ledger(path, plan, REQUESTERS * plan.attempts)
    return _summary(
        f"1 process x 200 requesters, synchronous={synchronous}",
        [result],
        result["wall_s"],
        problems,
    )


def run_processes(plan: Plan, processes: int, synchronous: str = SYNCHRONOUS) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="acestep-quota-") as tmp:
        path = Path(tmp) / "quota.sqlite3"
        asyncio.run(_migrate(path))  # once, before the processes race
        now = time.time()
        start_at = now + 2.0  # after every child has imported and opened the file
        children = []
        for p in range(processes):
            users = list(range(p, REQUESTERS, processes))
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                str(path),
                "--users",
                ",".join(map(str, users)),
                "--attempts",
                str(plan.attempts),
                "--now",
                repr(now),
                "--start-at",
                repr(start_at),
                "--synchronous",
                synchronous,
            ]
            children.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
        results = []
        for child in children:
            out, _ = child.communicate()
            if child.returncode != 0:
                raise SystemExit(f"a child process failed (exit {child.returncode})")
            results.append(json.loads(out.strip().splitlines()[-1]))
        wall = max(r["ended_at"] for r in results) - start_at
        problems = check_ledger(path, plan, REQUESTERS * plan.attempts)
    return _summary(
        f"{processes} processes x {REQUESTERS // processes} requesters, synchronous={synchronous}",
        results,
        wall,
        problems,
    )


async def _migrate(path: Path) -> None:
    db = await Database.open(path)
    await db.close()


def _summary(
    shape: str, results: list[dict[str, Any]], wall: float, problems: list[str]
) -> dict[str, Any]:
    latencies = [x for r in results for x in r["latencies"]]
    admitted = sum(r["admitted"] for r in results)
    refused = sum(r["refused"] for r in results)
    errors = sum(r["errors"] for r in results)
    refusals: dict[str, int] = {}
    for r in results:
        for limit, n in r["refusals"].items():
            refusals[limit] = refusals.get(limit, 0) + n
    decided = admitted + refused
    return {
        "shape": shape,
        "attempts": decided + errors,
        "admitted": admitted,
        "refused": refused,
        "refused_by": refusals,
        "errors": errors,
        "errors_sample": [e for r in results for e in r["errors_sample"]][:3],
        "wall_s": round(wall, 3),
        # Every attempt ends in a decision (admitted or refused) made in one transaction.
        "admissions_per_s": decided / wall if wall else 0.0,
        "cpu_ms_per_admission": sum(r["cpu_s"] for r in results) * 1000 / max(1, decided),
        "latency_ms": {"p50": median(latencies) * 1000, "p99": percentile(latencies, 99) * 1000},
        "ledger_exact": not problems,
        "ledger_problems": problems,
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate (figures on a shared machine vary run to run), with
    the range over all runs; the ledger must be exact in every run."""
    ordered = sorted(runs, key=lambda r: r["admissions_per_s"])
    chosen = dict(ordered[len(ordered) // 2])
    chosen["runs"] = len(runs)
    chosen["admissions_per_s_range"] = [
        ordered[0]["admissions_per_s"],
        ordered[-1]["admissions_per_s"],
    ]
    chosen["ledger_exact"] = all(r["ledger_exact"] for r in runs)
    chosen["ledger_problems"] = [p for r in runs for p in r["ledger_problems"]]
    return chosen


def _child(args: argparse.Namespace) -> None:
    plan = Plan(args.attempts)
    users = [int(x) for x in args.users.split(",")]
    result = asyncio.run(
        admit_all(Path(args.child), users, plan, args.now, args.start_at, args.synchronous)
    )
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument(
        "--runs",
        type=int,
        help="repeat each shape this many times and report the median (default 3, 1 with --quick)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=4,
        help="processes sharing the file in the second shape (default 4)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--users", help=argparse.SUPPRESS)
    parser.add_argument("--attempts", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--now", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--synchronous", default=SYNCHRONOUS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    plan = Plan(attempts=6 if args.quick else 30)
    print(
        f"{REQUESTERS} requesters x {plan.attempts} attempts; limits: {plan.user_jobs} "
        f"songs per user, {plan.community_seconds} s per community ({COMMUNITIES} "
        f"communities, and users in DMs), {SONG_SECONDS} s songs",
        flush=True,
    )
    runs = args.runs or (1 if args.quick else 3)
    # Each shape runs with the shipped synchronous=FULL and with NORMAL as the reference,
    # the two interleaved run by run so that load from other work hits both alike.
    shapes: list[tuple[str, Any]] = [("1 process", lambda sync: run_one_process(plan, sync))]
    if args.processes > 1:
        shapes.append(
            (f"{args.processes} processes", lambda sync: run_processes(plan, args.processes, sync))
        )
    modes = ("FULL", "NORMAL")
    results = []
    ratios = []
    for name, shape in shapes:
        by_mode: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
        for _ in range(runs):
            for mode in modes:
                by_mode[mode].append(shape(mode))
        chosen = {mode: _median_run(by_mode[mode]) for mode in modes}
        results.extend(chosen[mode] for mode in modes)
        full, normal = chosen["FULL"], chosen["NORMAL"]
        ratios.append(
            {
                "shape": name,
                "admissions_per_s_full_over_normal": full["admissions_per_s"]
                / normal["admissions_per_s"],
                "cpu_full_over_normal": full["cpu_ms_per_admission"]
                / normal["cpu_ms_per_admission"],
                "p50_full_over_normal": full["latency_ms"]["p50"] / normal["latency_ms"]["p50"],
                "p99_full_over_normal": full["latency_ms"]["p99"] / normal["latency_ms"]["p99"],
            }
        )
    headers = [
        "shape",
        "attempts",
        "admitted",
        "refused",
        "errors",
        "admissions/s",
        "(min-max)",
        "CPU ms each",
        "p50 ms",
        "p99 ms",
        "ledger",
    ]
    rows = [
        [
            r["shape"],
            r["attempts"],
            r["admitted"],
            r["refused"],
            r["errors"],
            r["admissions_per_s"],
            "{:.0f}-{:.0f}".format(*r["admissions_per_s_range"]),
            r["cpu_ms_per_admission"],
            r["latency_ms"]["p50"],
            r["latency_ms"]["p99"],
            "exact" if r["ledger_exact"] else "WRONG",
        ]
        for r in results
    ]
    print()
    print(table(headers, rows))
    for r in results:
        verdict = "OK" if r["admissions_per_s"] >= TARGET_PER_S else "MISSED"
        print(
            f"{r['shape']}: {r['admissions_per_s']:.0f} admissions/s (target >= "
            f"{TARGET_PER_S:g}) {verdict}; refused by {r['refused_by']}"
        )
        for problem in r["ledger_problems"]:
            print(f"  LEDGER PROBLEM: {problem}")
        for error in r["errors_sample"]:
            print(f"  error: {error}")
    print()
    for ratio in ratios:
        print(
            f"{ratio['shape']}: synchronous=FULL / NORMAL: admissions/s "
            f"{ratio['admissions_per_s_full_over_normal']:.2f}x, CPU per admission "
            f"{ratio['cpu_full_over_normal']:.2f}x, p50 {ratio['p50_full_over_normal']:.2f}x, "
            f"p99 {ratio['p99_full_over_normal']:.2f}x"
        )
    path = write_results(
        "quota",
        {
            "quick": args.quick,
            "requesters": REQUESTERS,
            "attempts_per_requester": plan.attempts,
            "results": results,
            "synchronous_ratios": ratios,
        },
    )
    print(f"machine: {machine()}")
    print(f"wrote {path}")
    if any(not r["ledger_exact"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
