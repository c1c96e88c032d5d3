"""Three `acestep-bot run` processes on one PostgreSQL database, one killed -9 twice.

One `--role chat` process polls the fake Telegram Bot API and admits songs; two `--role
worker` processes run them against the fake fal queue and post them (sendAudio). One
worker is killed (SIGKILL, no cleanup) twice while songs are in flight and started again.
In the end every admitted job was delivered or failed with its quota refunded, a job was
submitted to fal twice only where a kill caught it mid-submit, each song was posted once
(again only after a kill caught its upload in flight), and the dollars balance.

Sized for CI (about a minute); bench/scale.py is the bigger run. Marked `scale`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.fakes.fal import FakeFal
from tests.fakes.http import serve
from tests.pgcluster import Cluster
from tests.test_chaos_kill import HIGH_QUOTAS, LATE_READ_S, BotProcess, TimedTelegram
from tests.test_cli import cli_env

pytestmark = [
    pytest.mark.scale,
    pytest.mark.skipif(os.name != "posix", reason="POSIX signals"),
]

SONGS = 16
PTB_CLEANUP = re.compile(
    r"ERROR +telegram\.ext\.Updater: Error while calling `get_updates` one more time.*?"
    r"(?=^\d{4}-\d\d-\d\d |\Z)",
    re.S | re.M,
)
USERS = [TimedTelegram.user(600 + n, f"U{n}", f"u{n}") for n in range(4)]


def rows(url: str, sql: str) -> list[dict[str, Any]]:
    with psycopg.connect(url, row_factory=dict_row) as conn:
        return list(conn.execute(sql).fetchall())


async def until_one_holds_a_job(
    url: str, procs: list[BotProcess], within: float = 30
) -> BotProcess:
    """The first of `procs` seen working on a song (its lease is on a job), to kill it.
    Whichever worker wakes first may take every queued job, so either may be the one."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        held = rows(url, "SELECT owner FROM jobs WHERE state IN ('submitting', 'running', 'ready')")
        for proc in procs:
            assert proc.proc is not None
            if any(f"/{proc.proc.pid}-" in (r["owner"] or "") for r in held):
                return proc
        await asyncio.sleep(0.02)
    raise AssertionError("no worker ever took a job")


def states(url: str) -> Counter[str]:
    return Counter(r["state"] for r in rows(url, "SELECT state FROM jobs"))


async def test_three_processes_on_postgresql_one_killed_twice(
    tmp_path: Path, pg_cluster: Cluster
) -> None:
    url = pg_cluster.new_database()
    telegram = TimedTelegram()
    for user in USERS:
        telegram.chat(user["id"], "private", user["first_name"])
    fal = FakeFal(queue_polls=0, progress_polls=4)
    fal.submit_delay = 0.2
    started = time.monotonic()
    async with serve(telegram.app) as tg_url, fal.running() as fal_url:

        def env(name: str) -> dict[str, str]:
            return cli_env(
                tmp_path,
                DATA_DIR=str(tmp_path / f"data-{name}"),
                DATABASE_URL=url,
                LEASE_SECONDS="3",
                TELEGRAM_TOKEN=telegram.token,
                TELEGRAM_API_URL=tg_url,
                FAL_KEY=fal.key,
                FAL_QUEUE_URL=fal_url,
                PROVIDERS="fal",
                FAL_CONCURRENCY="4",
                LOG_LEVEL="INFO",
                SHUTDOWN_GRACE_SECONDS="5",
                AUDIO_RETENTION_DAYS="0",
                TELEGRAM_CHAT_MESSAGES_PER_SECOND="50",
                **HIGH_QUOTAS,
            )

        def proc(name: str, role: str) -> BotProcess:
            return BotProcess(tmp_path, env(name), name=name, args=("--role", role))

        chat = proc("chat", "chat")
        workers = [proc(f"worker{n}", "worker") for n in (1, 2)]
        procs = [chat, *workers]
        sent: dict[int, int] = {}  # request message id -> chat
        try:
            for proc in procs:
                await proc.start()

            async def users_post_songs() -> None:
                for n in range(SONGS):
                    user = USERS[n % len(USERS)]
                    text = f"/song scale song {n} duration=5"
                    sent[telegram.send_text(user["id"], user, text)] = user["id"]
                    await asyncio.sleep(0.3)

            posting = asyncio.create_task(users_post_songs())
            for _ in range(2):  # kill a worker while it works on a song; start it again
                victim = await until_one_holds_a_job(url, workers)
                await victim.kill9()
                await victim.start()
            await posting
            deadline = time.monotonic() + 90
            while True:
                now = states(url)
                active = sum(now[s] for s in ("queued", "submitting", "running", "ready"))
                if active == 0 and telegram.pending_updates == 0 and sum(now.values()):
                    break
                logs = "\n".join(p.logs()[-2000:] for p in procs)
                assert time.monotonic() < deadline, f"not settled: {dict(now)}\n{logs}"
                await asyncio.sleep(0.2)
            for proc in procs:
                assert await proc.sigterm() == 0, proc.logs()[-3000:]
        finally:
            for proc in procs:
                proc.ensure_dead()
    elapsed = time.monotonic() - started

    jobs = rows(url, "SELECT * FROM jobs ORDER BY created_at")
    ledger = rows(url, "SELECT * FROM usage_ledger ORDER BY id")
    logs = "\n".join(p.logs() for p in procs)
    final = Counter(j["state"] for j in jobs)
    print(f"{SONGS} songs, {len(jobs)} admitted, 2 kills, {elapsed:.1f}s: {dict(final)}")
    # python-telegram-bot's own shutdown step may time out on its one getUpdates
    # connection while the cancelled long poll still holds it; it logs that with a
    # traceback and says it suppressed it (it is not ours, and nothing is lost: the
    # unconfirmed updates come again). Any other traceback fails the test.
    ours = PTB_CLEANUP.sub("", logs)
    assert "Traceback" not in ours, ours[-5000:]
    assert fal.key not in logs and telegram.token not in logs
    assert sum(w.runs for w in workers) == 4 and sum(len(w.kills) for w in workers) == 2
    # Every /song became exactly one job (nothing lost, nothing admitted twice).
    of_message = Counter(json.loads(j["reply_target"])["request_message_id"] for j in jobs)
    assert set(of_message) == set(sent) and max(of_message.values()) == 1
    assert final["delivered"] > 0

    job_of_prompt = {json.loads(j["request"])["prompt"]: j["id"] for j in jobs}
    fal_runs = Counter(job_of_prompt[r.body["prompt"]] for r in fal.requests.values())
    fal_billed = Counter(job_of_prompt[r.body["prompt"]] for r in fal.billed())
    fal_arrived = Counter(job_of_prompt[s.body["prompt"]] for s in fal.submits)
    kills = sorted(at for w in workers for at in w.kills)
    entries: dict[str, list[dict[str, Any]]] = {}
    for entry in ledger:
        entries.setdefault(entry["job_id"], []).append(entry)
    for job in jobs:
        job_id, what = job["id"], f"job {job['id']}"
        kinds = Counter(e["kind"] for e in entries[job_id])
        # Quota: reserved once, then committed or refunded once.
        assert kinds["reserve"] == 1 and kinds["commit"] + kinds["refund"] == 1, what
        # Dollars: the charges less the credits are the job's charge, which is fal's bill
        # plus any run a kill cut off before its submit reached fal.
        usd = {k: sum(e["usd"] for e in entries[job_id] if e["kind"] == k) for k in kinds}
        net = usd.get("charge", 0.0) - usd.get("credit", 0.0)
        assert net == pytest.approx(job["charged_usd"] or 0.0), what
        never_arrived = kinds["charge"] - fal_arrived[job_id]
        # Kills mid-submit: each one resubmitted (recoveries), and a second one ends the
        # job failed (refunded) without a further resubmit.
        cut_off = job["recoveries"] + ("interrupted twice" in (job["error"] or ""))
        assert 0 <= never_arrived <= cut_off, (what, kinds, fal_arrived[job_id])
        assert (job["charged_usd"] or 0.0) == pytest.approx(
            0.001 * (fal_billed[job_id] + never_arrived)
        ), what
        # Submitted twice only after a kill caught it mid-submit.
        assert fal_runs[job_id] <= 1 + job["recoveries"], (what, fal_runs[job_id])
        posted = sorted(at for at, jid in telegram.audio_at if jid == job_id)
        if job["state"] == "delivered":
            assert kinds["commit"] == 1 and posted, what
            for before, after in itertools.pairwise(posted):
                assert any(before - LATE_READ_S <= k <= after for k in kills), (
                    f"{what} posted twice with no kill in between"
                )
        else:
            assert job["state"] == "failed" and job["refunded"], what
            assert kinds["refund"] == 1 and not posted, what
