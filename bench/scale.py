"""Several `acestep-bot run` processes on one PostgreSQL: 10,000 simulated Discord guilds
sending songs at a steady rate through the fake Discord (gateway and REST) and fake fal.

Two runs, in this order, on fresh databases of one throw-away PostgreSQL cluster:

- reference: one `acestep-bot run` (`--role all`, every shard);
- scaled: three processes, two `--role chat` (shards 0 and 1 of 2) and one `--role worker`.

For each it prints admissions per second, the p50/p99 admission latency (INTERACTION_CREATE
sent on the gateway -> the status message naming the job), database transactions per job
(pg_stat_database's commits over the run; each storage call is one transaction), and the
lost and duplicated counts (target 0/0: every interaction admitted once and its song
posted once). Timing figures of the scaled run are also given as ratios to the
reference. `--kill` kills the worker (-9) twice during the scaled run: the soak version
of tests/test_scale_kill.py.

    python bench/scale.py                  # 100 songs/minute for 3 minutes (300 songs)
    python bench/scale.py --kill           # the same, the worker killed -9 twice
    python bench/scale.py --quick          # 30 songs

Needs PostgreSQL's server binaries (initdb, pg_ctl). CI never runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from aiohttp import web  # noqa: E402

from bench._util import percentile, table  # noqa: E402
from tests.fakes.discord_api import FakeDiscord  # noqa: E402
from tests.fakes.fal import FakeFal  # noqa: E402
from tests.fakes.http import serve  # noqa: E402
from tests.pgcluster import Cluster, find_bindir  # noqa: E402

GUILDS = 10_000
SHARDS = 2
HIGH_QUOTAS = {
    "QUOTA_USER_JOBS_PER_DAY": "100000",
    "QUOTA_USER_SECONDS_PER_DAY": "100000000",
    "QUOTA_USER_CONCURRENT_JOBS": "100000",
    "QUOTA_COMMUNITY_SECONDS_PER_DAY": "100000000",
    "SPEND_CAP_USD_PER_DAY": "100000",
}


class TimedDiscord(FakeDiscord):
    """The fake Discord, noting when each interaction's status first named its job."""

    def __init__(self) -> None:
        super().__init__(recommended_shards=SHARDS)
        self.admitted_at: dict[str, float] = {}

    def _note(self) -> None:
        for iid, inter in self.interactions.items():
            if iid in self.admitted_at or inter.original_id is None:
                continue
            msg = self.messages.get(inter.original_id)
            if msg is not None and "job `" in msg.content:
                self.admitted_at[iid] = time.monotonic()

    async def _callback(self, request: web.Request) -> web.Response:
        response = await super()._callback(request)
        self._note()
        return response

    async def _edit_webhook_message(self, request: web.Request) -> web.Response:
        response = await super()._edit_webhook_message(request)
        self._note()
        return response


@dataclass
class Result:
    name: str
    songs: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    transactions: int = 0
    jobs: int = 0
    lost: int = 0
    duplicated: int = 0

    @property
    def admissions_per_s(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0


def guild_id(n: int) -> str:
    return str((1 << 62) + (n << 22))


def commits(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0


async def run_shape(
    name: str,
    roles: list[tuple[str, dict[str, str]]],
    url: str,
    songs: int,
    per_minute: float,
    kill: bool,
    tmp: Path,
) -> Result:
    fake = TimedDiscord()
    fal = FakeFal(queue_polls=0, progress_polls=1)
    rng = random.Random(16)
    async with serve(fake.app()) as base, fal.running() as fal_url:
        env_base = {
            k: v for k, v in os.environ.items() if not k.startswith(("DISCORD_", "TELEGRAM_"))
        }
        env_base.update(
            PYTHONPATH=str(ROOT),
            DATABASE_URL=url,
            DISCORD_TOKEN=fake.token,
            DISCORD_API_URL=f"{base}/api/v10",
            DISCORD_GATEWAY_URL=base.replace("http://", "ws://") + "/gateway",
            FAL_KEY=fal.key,
            FAL_QUEUE_URL=fal_url,
            PROVIDERS="fal",
            FAL_CONCURRENCY="50",
            LOG_LEVEL="WARNING",
            LEASE_SECONDS="5",
            **HIGH_QUOTAS,
        )
        procs: list[asyncio.subprocess.Process] = []
        specs = []
        for n, (role, extra) in enumerate(roles):
            env = {**env_base, "DATA_DIR": str(tmp / f"{name}-{n}"), **extra}
            specs.append((role, env, tmp / f"{name}-{n}.log"))

        async def start(i: int) -> asyncio.subprocess.Process:
            role, env, log = specs[i]
            with log.open("ab") as out:
                return await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "bot", "run", "--role", role,
                    env=env, stdout=out, stderr=out,
                )  # fmt: skip

        for i in range(len(specs)):
            procs.append(await start(i))
        deadline = time.monotonic() + 60
        while len(fake.connected_shards()) < SHARDS:
            assert time.monotonic() < deadline, "the chat processes never connected"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # READY handled
        before = commits(url)
        sent: dict[str, float] = {}
        kills_at = {songs // 3, 2 * songs // 3} if kill else set()
        worker = next((i for i, (r, _, _) in enumerate(specs) if r == "worker"), None)
        started = time.monotonic()
        for n in range(songs):
            payload = fake.slash(
                "song",
                {"prompt": f"scale song {n}", "duration": 5},
                guild_id=guild_id(rng.randrange(GUILDS)),
                user_id=str(10**17 + rng.randrange(GUILDS * 3)),
                channel_id=str(3 * 10**17 + n % 997),
            )
            sent[payload["id"]] = time.monotonic()
            await fake.dispatch("INTERACTION_CREATE", payload)
            if n in kills_at and worker is not None:
                procs[worker].send_signal(signal.SIGKILL)
                await procs[worker].wait()
                procs[worker] = await start(worker)
            await asyncio.sleep(60.0 / per_minute)
        admitting = time.monotonic() - started
        # Every song posted (or the wait runs out: the rest count as lost).
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if len({m.interaction_id for m in fake.with_file()} & set(sent)) >= songs:
                break
            await asyncio.sleep(0.25)
        await asyncio.sleep(1.0)
        after = commits(url)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            await asyncio.wait_for(proc.wait(), 30)
    per_interaction = Counter(m.interaction_id for m in fake.with_file())
    with psycopg.connect(url) as conn:
        jobs = int(conn.execute("SELECT count(*) FROM jobs").fetchone()[0])  # type: ignore[index]
    result = Result(name, songs, admitting)
    result.latencies = [fake.admitted_at[i] - t for i, t in sent.items() if i in fake.admitted_at]
    result.jobs = jobs
    result.transactions = after - before
    result.lost = sum(1 for i in sent if per_interaction[i] == 0)
    result.duplicated = sum(c - 1 for c in per_interaction.values() if c > 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--songs", type=int, default=300)
    parser.add_argument("--per-minute", type=float, default=100.0)
    parser.add_argument("--kill", action="store_true", help="kill the worker -9 twice")
    parser.add_argument("--quick", action="store_true", help="30 songs")
    args = parser.parse_args()
    songs = 30 if args.quick else args.songs
    bindir = find_bindir()
    if bindir is None:
        print("bench/scale.py needs PostgreSQL's server binaries (initdb, pg_ctl)")
        return 2
    cluster = Cluster(bindir)
    cluster.start()
    try:
        cluster.admin("CREATE DATABASE template_acestep")

        async def migrate() -> None:
            from storage.pg import PgDatabase

            db = await PgDatabase.open(cluster.url("template_acestep"))
            await db.close()

        asyncio.run(migrate())
        cluster.template = "template_acestep"
        shard = {"DISCORD_SHARD_COUNT": str(SHARDS)}
        shapes = [
            ("1 process (all)", [("all", {})]),
            (
                "3 processes (2 chat + worker)",
                [
                    ("chat", {**shard, "DISCORD_SHARD_IDS": "0"}),
                    ("chat", {**shard, "DISCORD_SHARD_IDS": "1"}),
                    ("worker", {}),
                ],
            ),
        ]
        results = []
        with tempfile.TemporaryDirectory() as tmp:
            for i, (name, roles) in enumerate(shapes):
                kill = args.kill and i == 1
                results.append(
                    asyncio.run(
                        run_shape(
                            name,
                            roles,
                            cluster.new_database(),
                            songs,
                            args.per_minute,
                            kill,
                            Path(tmp),
                        )
                    )
                )
    finally:
        cluster.stop()
    ref = results[0]
    rows = []
    for r in results:
        p50 = percentile(r.latencies, 50) * 1000 if r.latencies else float("nan")
        p99 = percentile(r.latencies, 99) * 1000 if r.latencies else float("nan")
        ref_p99 = percentile(ref.latencies, 99) * 1000 if ref.latencies else float("nan")
        rows.append(
            [
                r.name,
                str(r.songs),
                f"{r.admissions_per_s:.2f}",
                f"{p50:.0f}",
                f"{p99:.0f} ({p99 / ref_p99:.2f}x)" if r is not ref else f"{p99:.0f}",
                f"{r.transactions / max(r.jobs, 1):.1f}",
                f"{r.lost}/{r.duplicated}",
            ]
        )
    print(
        f"{GUILDS} guilds, {args.per_minute:g} songs/minute"
        + (", worker killed -9 twice in the scaled run" if args.kill else "")
    )
    print(
        table(
            [
                "shape",
                "songs",
                "admissions/s",
                "p50 ms",
                "p99 ms (vs 1 process)",
                "db transactions/job",
                "lost/duplicated",
            ],
            rows,
        )
    )
    return 0 if all(r.lost == 0 and r.duplicated == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
