"""500 users at once on Telegram, against a fake Bot API that enforces Telegram's limits.

470 users each ask for a song in their private chat and 30 more in one group, all within
a few seconds; meanwhile other users keep asking /help. The fake Bot API server
(tests/fakes/telegram_api.py with `BotApiLimits`: about 30 messages a second overall, a
short burst per chat, 20 a minute per group) answers 429 with `retry_after` past a limit,
as Telegram does. The real engine, TelegramFrontend and fal adapter (as shipped, its
poll interval included) run in this process; the fake Bot API, the fake fal queue and
the users run in a child process, so their work is not counted in the bot's event loop.

Two runs side by side on the same machine: the bot as shipped (bot/frontends/
telegram_pacing.py paces to Telegram's limits), and the same bot with pacing switched off
(budgets so high that only 429s slow it down: what the bot did before). Printed per run:
songs asked, admitted, delivered, lost; 429s by Bot API method; time to answer /help
(p50, p99); the peak number of messages the bot tried to send into the group in a minute.
Targets: nothing lost, no 429 for any reply to a command, /help p99 under 2 s.

    python bench/telegram_overload.py           # ~10 min: 500 users, both runs
    python bench/telegram_overload.py --quick   # ~2 min: 60 users
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import random
import sys
import tempfile
import time
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._util import LoopLag, machine, percentile, table, write_results  # noqa: E402
from bot.engine import Engine, EngineOptions  # noqa: E402
from bot.frontends.telegram_frontend import TelegramFrontend  # noqa: E402
from bot.frontends.telegram_pacing import PacedSender  # noqa: E402
from bot.settings import Settings  # noqa: E402
from providers.fal import FalProvider  # noqa: E402
from tests.fakes.fal import FakeFal  # noqa: E402
from tests.fakes.http import serve  # noqa: E402
from tests.fakes.telegram_api import BotApiLimits, FakeTelegram  # noqa: E402

GROUP = -100777
HELP_EVERY_S = 0.5


def _world(conn: Connection, private_users: int, group_users: int, deadline_s: float) -> None:
    """The child process: Telegram's Bot API, fal's queue and every user. It serves the
    fakes, sends the parent their addresses, posts the /song burst and a /help every
    HELP_EVERY_S until the parent says every song is done, then measures what the bot
    did from the fake's record of calls and sends that back."""
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(_world_run(conn, private_users, group_users, deadline_s))


async def _world_run(
    conn: Connection, private_users: int, group_users: int, deadline_s: float
) -> None:
    fake = FakeTelegram()
    fake.limits = BotApiLimits()
    fake.chat(GROUP, "supergroup", "Big group")
    users = []
    for i in range(private_users + group_users):
        user = FakeTelegram.user(10_000 + i, f"User{i}", f"user{i}")
        if i < private_users:
            fake.chat(user["id"], "private", user["first_name"])
        users.append(user)
    helpers = [FakeTelegram.user(90_000 + i, f"Helper{i}") for i in range(20)]
    for helper in helpers:
        fake.chat(helper["id"], "private", helper["first_name"])
    fal = FakeFal(queue_polls=1, progress_polls=3)
    loop = asyncio.get_running_loop()
    async with serve(fake.app) as tg_url, fal.running() as fal_url:
        conn.send({"tg_url": tg_url, "token": fake.token, "fal_url": fal_url, "fal_key": fal.key})
        await loop.run_in_executor(None, conn.recv)  # the bot is up
        started = time.monotonic()
        asked: dict[int, int] = {}  # request message id -> chat
        help_asked: dict[int, tuple[int, float]] = {}
        rng = random.Random(7)
        for i, user in enumerate(users):
            chat = user["id"] if i < private_users else GROUP
            mid = fake.send_text(chat, user, f"/song overload song {i} duration=5")
            asked[mid] = chat
            if i % 50 == 49:
                await asyncio.sleep(0.2)
        while time.monotonic() - started < deadline_s and not conn.poll():
            helper = rng.choice(helpers)
            mid = fake.send_text(helper["id"], helper, "/help")
            help_asked[mid] = (helper["id"], time.monotonic())
            await asyncio.sleep(HELP_EVERY_S)
        await asyncio.sleep(2)  # the last /help answers
        conn.send(_measure(fake, asked, help_asked))
        while await loop.run_in_executor(None, conn.recv) != "bye":
            pass  # "done" (the parent's word that ended the /help loop); then the bot stops


def _measure(
    fake: FakeTelegram, asked: dict[int, int], help_asked: dict[int, tuple[int, float]]
) -> dict[str, Any]:
    """What the bot did, from the fake Bot API's record of its calls."""
    assert fake.limits is not None
    replies_at: dict[int, float] = {}
    for call in fake.calls:
        if call.method != "sendMessage" or call.answered_status != 200:
            continue
        reply = call.params.get("reply_parameters")
        mid = reply.get("message_id") if isinstance(reply, dict) else None
        if mid in help_asked and mid not in replies_at:
            replies_at[mid] = call.at
    waits = [replies_at[m] - t for m, (_, t) in help_asked.items() if m in replies_at]
    refused = Counter(c.method for c in fake.calls if c.answered_status == 429)
    answered_to = [
        c.params["reply_parameters"].get("message_id")
        for c in fake.calls
        if c.answered_status == 429
        and c.method == "sendMessage"
        and isinstance(c.params.get("reply_parameters"), dict)
    ]
    group_attempts = sorted(
        c.at
        for c in fake.calls
        if _chat(c.params.get("chat_id")) == GROUP and c.method in BotApiLimits.COUNTED
    )
    return {
        "asked": len(asked),
        "429_by_method": dict(refused),
        "429_by_limit": dict(fake.limits.refused),
        "429_on_help": sum(1 for m in answered_to if m in help_asked),
        "429_on_status_posts": sum(1 for m in answered_to if m in asked),
        "help_asked": len(help_asked),
        "help_unanswered": len(help_asked) - len(waits),
        "help_p50_s": percentile(waits, 50),
        "help_p99_s": percentile(waits, 99),
        "help_waits_s": sorted(round(w, 3) for w in waits),
        # (message id, asked, answered or None), in monotonic seconds: where a slow one sat.
        "help_timeline": [(m, t, replies_at.get(m)) for m, (_, t) in sorted(help_asked.items())],
        "group_peak_attempts_per_minute": max(
            (
                sum(1 for t in group_attempts[i:] if t - start < 60)
                for i, start in enumerate(group_attempts)
            ),
            default=0,
        ),
    }


async def run(
    paced: bool, private_users: int, group_users: int, deadline_s: float
) -> dict[str, Any]:
    """The bot as `acestep-bot run` wires it (fal with its shipped poll interval), in
    this process; Telegram, fal and the users in a child process, as they are elsewhere
    in life: their work is not counted in the bot's loop."""
    parent, child = multiprocessing.get_context("spawn").Pipe()
    world = multiprocessing.get_context("spawn").Process(
        target=_world, args=(child, private_users, group_users, deadline_s), daemon=True
    )
    world.start()
    loop = asyncio.get_running_loop()
    addresses = await loop.run_in_executor(None, parent.recv)
    asked = private_users + group_users
    big = 10**9
    with tempfile.TemporaryDirectory(prefix="acestep-tg-overload-") as tmp:
        settings = Settings(
            _env_file=None,
            data_dir=Path(tmp) / "data",
            telegram_token=addresses["token"],
            telegram_api_url=addresses["tg_url"],
            fal_key=addresses["fal_key"],
            fal_queue_url=addresses["fal_url"],
            quota_user_jobs_per_day=big,
            quota_user_seconds_per_day=big,
            quota_user_concurrent_jobs=big,
            quota_community_seconds_per_day=big,
            spend_cap_usd_per_day=big,
        )
        provider = FalProvider(addresses["fal_key"], addresses["fal_url"], concurrency=100)
        engine = await Engine.open(settings, [provider], options=EngineOptions())
        pacing = (
            None
            if paced
            else PacedSender(
                private_per_second=10_000, group_budget=(10_000, 1.0), global_per_second=10_000
            )
        )
        frontend = TelegramFrontend(settings, engine, pacing=pacing, poll_timeout=1)
        engine.register_delivery(frontend)
        await engine.start()
        await frontend.start()
        lag = LoopLag()
        lag.start()
        started = time.monotonic()
        songs_done_at = None
        try:
            parent.send("go")
            while time.monotonic() - started < deadline_s:
                await asyncio.sleep(HELP_EVERY_S)
                states = Counter(j.state for j in await engine.store.recent(limit=10**6))
                active = sum(states[s] for s in ("queued", "submitting", "running", "ready"))
                if sum(states.values()) == asked and active == 0:
                    songs_done_at = time.monotonic()
                    break
            parent.send("done")
            measured = await loop.run_in_executor(None, parent.recv)
            jobs = await engine.store.recent(limit=10**6)
        finally:
            await lag.stop()
            await frontend.stop()
            await engine.close()
            parent.send("bye")
            world.join(10)
            if world.is_alive():
                world.kill()
    states = Counter(str(j.state) for j in jobs)
    return {
        "run": "paced (as shipped)" if paced else "unpaced (429 retry only)",
        **measured,
        "admitted": len(jobs),
        "delivered": states.get("delivered", 0),
        "lost": asked - states.get("delivered", 0) - states.get("failed", 0),
        "failed": states.get("failed", 0),
        "seconds": round((songs_done_at or time.monotonic()) - started, 1),
        "finished": songs_done_at is not None,
        "429_on_replies": measured["429_on_help"] + measured["429_on_status_posts"],
        "loop_lag_p99_ms": lag.p99_ms(),
        "loop_lag_max_ms": lag.max_ms(),
        "sent_by_method": dict(frontend.pacing.sent),
        "dropped_by_method": dict(frontend.pacing.dropped),
    }


def _chat(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="60 users instead of 500")
    args = parser.parse_args()
    # CRITICAL: the unpaced run's /help answers that ran out of 429 retries log errors.
    logging.basicConfig(level=logging.CRITICAL)
    private, group, deadline = (50, 10, 150.0) if args.quick else (470, 30, 420.0)
    print(
        f"{private + group} users ({private} private chats, {group} in one group), "
        f"/help every 0.5 s meanwhile; runs end when every song is done or after {deadline:g} s",
        flush=True,
    )
    results = []
    for paced in (True, False):
        result = asyncio.run(run(paced, private, group, deadline))
        print(f"  {result['run']}: done in {result['seconds']} s", flush=True)
        results.append(result)
    headers = [
        "run",
        "asked",
        "admitted",
        "delivered",
        "lost",
        "429s",
        "429 on /help",
        "429 on status posts",
        "/help p50 s",
        "p99 s",
        "group peak/min",
        "loop lag p99 ms",
        "time s",
    ]
    rows = [
        [
            r["run"],
            r["asked"],
            r["admitted"],
            r["delivered"],
            r["lost"],
            sum(r["429_by_method"].values()),
            r["429_on_help"],
            r["429_on_status_posts"],
            r["help_p50_s"],
            r["help_p99_s"],
            r["group_peak_attempts_per_minute"],
            r["loop_lag_p99_ms"],
            r["seconds"] if r["finished"] else f">{r['seconds']}",
        ]
        for r in results
    ]
    print()
    print(table(headers, rows))
    for r in results:
        print(
            f"{r['run']}: 429s by method {r['429_by_method']}, by limit {r['429_by_limit']}; "
            f"sent {r['sent_by_method']}; "
            f"dropped (coalesced or stale) {r['dropped_by_method']}"
        )
    paced = results[0]
    checks = {
        "nothing lost": paced["lost"] == 0 and paced["admitted"] == paced["asked"],
        "no 429 on a reply": paced["429_on_replies"] == 0,
        "/help p99 < 2 s": paced["help_p99_s"] < 2.0 and paced["help_unanswered"] == 0,
    }
    for name, ok in checks.items():
        print(f"target {name}: {'met' if ok else 'MISSED'}")
    path = write_results("telegram_overload", {"quick": args.quick, "results": results})
    print(f"machine: {machine()}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
