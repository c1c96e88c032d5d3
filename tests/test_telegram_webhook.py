"""Webhook mode against a crash: the real `acestep-bot run` killed while it handles a /song.

The fake Bot API POSTs updates to the bot's webhook and repeats any POST that got no 2xx,
as Telegram does. The bot answers only once an update is handled, so an update whose
handling a kill -9 cut off is sent again to the next process, and admitted once.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
from pathlib import Path

import pytest

from tests.fakes.fal import FakeFal
from tests.fakes.http import serve
from tests.fakes.telegram_api import FakeTelegram
from tests.test_chaos_kill import BotProcess
from tests.test_cli import cli_env

ANN = FakeTelegram.user(42, "Ann", "ann")
PRIVATE = 42


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def jobs_of(db_path: Path) -> list[sqlite3.Row]:
    conn = sqlite3.connect(str(db_path), timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        return list(conn.execute("SELECT * FROM jobs"))
    finally:
        conn.close()


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
async def test_a_song_whose_webhook_handling_a_crash_cut_off_is_admitted_once(
    tmp_path: Path,
) -> None:
    telegram = FakeTelegram()
    telegram.chat(PRIVATE, "private", "Ann")
    fal = FakeFal(queue_polls=0, progress_polls=1)
    port = free_port()
    db_path = tmp_path / "data" / "acestep-bot.sqlite3"
    async with serve(telegram.app) as tg_url, fal.running() as fal_url:
        env = cli_env(
            tmp_path,
            TELEGRAM_TOKEN=telegram.token,
            TELEGRAM_API_URL=tg_url,
            TELEGRAM_WEBHOOK_URL="https://bot.example.org/tg/hook",
            TELEGRAM_WEBHOOK_LISTEN=f"127.0.0.1:{port}",
            FAL_KEY=fal.key,
            FAL_QUEUE_URL=fal_url,
            PROVIDERS="fal",
            LOG_LEVEL="INFO",
        )
        bot = BotProcess(tmp_path, env)
        try:
            await bot.start()
            await telegram.wait_for(lambda: telegram.webhook is not None, within=30)
            # Another process holds the database's write lock (an operator's command, a
            # slow disk): the /song handler cannot admit until it is released...
            blocker = sqlite3.connect(str(db_path), isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")
            async with telegram.deliver_webhooks(f"http://127.0.0.1:{port}/tg/hook"):
                request_id = telegram.send_text(PRIVATE, ANN, "/song rain on a webhook duration=5")
                await telegram.wait_for(lambda: telegram.webhook_sending is not None)
                await asyncio.sleep(1.0)  # the handler is in there, waiting for the lock
                # ...when the process is killed: the update is neither admitted nor answered.
                await bot.kill9()
                await telegram.wait_for(lambda: len(telegram.webhook_posts) >= 2)
                blocker.rollback()
                blocker.close()
                await bot.start()
                await telegram.wait_for(
                    lambda: any(m.kind == "audio" for m in telegram.bot_messages(PRIVATE)),
                    within=60,
                )
                assert await bot.sigterm() == 0, bot.logs()[-3000:]
        finally:
            bot.ensure_dead()
    jobs = jobs_of(db_path)
    [update_id] = {uid for uid, _ in telegram.webhook_posts}
    outcomes = [outcome for _, outcome in telegram.webhook_posts]
    # The POST cut off by the kill, then the repeats while no bot listened, then the
    # repeat that the restarted bot handled and answered 200 only after that.
    assert outcomes[0] != 200 and outcomes[-1] == 200 and outcomes.count(200) == 1, outcomes
    assert len(jobs) == 1 and jobs[0]["state"] == "delivered"
    assert json.loads(jobs[0]["reply_target"])["request_message_id"] == request_id
    assert jobs[0]["source_key"].endswith(f":{update_id}")
    assert fal.submit_count == 1
    assert len([m for m in telegram.bot_messages(PRIVATE) if m.kind == "audio"]) == 1
    assert "Traceback" not in bot.logs()
