"""`acestep-bot run --role chat|worker`: the real `run_bot` twice, on one database,
against the fake Discord and Telegram servers and the fake fal queue.

A chat-role bot receives the command (over the fake gateway, or getUpdates) and admits
the job without running it; a worker-role bot, which never connects a gateway nor asks
for updates, makes the song and posts it from what the database holds about the job.

Both run in this one test process on one SQLite file: the CLI refuses the split on
SQLite (one process per data directory), so this is the split's wiring, proved on the
embedded database; several processes on PostgreSQL are the point of it in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot import app
from bot.app import Role
from bot.datalock import SingletonHeld
from bot.engine import Engine
from bot.engine.leases import instance_id
from bot.settings import Settings
from providers.fal import FalProvider
from storage.store import connect_store
from tests.conftest import make_settings
from tests.enginekit import FAST
from tests.fakes.discord_api import FakeDiscord
from tests.fakes.fal import FakeFal
from tests.fakes.http import serve
from tests.fakes.telegram_api import BOT_ID, FakeTelegram
from tests.test_cli import cli_env, run_cli
from tests.test_discord import _restore_discord_endpoints as _restore  # noqa: F401
from tests.test_discord import job_id_in

PRIVATE = 42
ANN = FakeTelegram.user(42, "Ann", "ann")


@pytest.fixture(autouse=True)
def _fast_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_bot as shipped, with the engine's and fal's waits at test speed."""

    class FastEngine(Engine):
        @classmethod
        async def open(cls, settings: Settings, providers: Any, **kwargs: Any) -> Engine:
            return await Engine.open(settings, providers, options=FAST, **kwargs)

    def providers(settings: Settings) -> list[FalProvider]:
        key = settings.secret("fal_key")
        assert key
        return [FalProvider(key, settings.fal_queue_url, poll_interval=0.01)]

    monkeypatch.setattr(app, "Engine", FastEngine)
    monkeypatch.setattr(app, "build_providers", providers)


@contextlib.asynccontextmanager
async def role(settings: Settings, which: Role) -> AsyncIterator[asyncio.Task[int]]:
    stop = asyncio.Event()
    task = asyncio.create_task(app.run_bot(settings, stop, role=which), name=f"bot-{which}")
    try:
        yield task
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0


def job_rows(settings: Settings) -> list[tuple[str, str]]:
    conn = sqlite3.connect(str(settings.db_path))
    try:
        return [(str(r[0]), str(r[1])) for r in conn.execute("SELECT id, state FROM jobs")]
    finally:
        conn.close()


async def until(check: Any, what: str, timeout: float = 20) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (value := check()):
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return value


# ---- Discord ----------------------------------------------------------------------------


@pytest.fixture
async def discord_fakes() -> AsyncIterator[tuple[FakeDiscord, str, FakeFal, str]]:
    fake = FakeDiscord()
    fal = FakeFal(queue_polls=1, progress_polls=1)
    async with serve(fake.app()) as base, fal.running() as fal_url:
        yield fake, base, fal, fal_url


def discord_settings(tmp_path: Path, fakes: tuple[FakeDiscord, str, FakeFal, str]) -> Settings:
    fake, base, fal, fal_url = fakes
    return make_settings(
        tmp_path,
        discord_token=fake.token,
        discord_api_url=f"{base}/api/v10",
        fal_key=fal.key,
        fal_queue_url=fal_url,
    )


async def admit_over_the_gateway(fake: FakeDiscord, settings: Settings) -> tuple[dict, str]:
    """/song arrives at a chat-role bot; it is admitted and waits in the queue."""
    payload = fake.slash("song", {"prompt": "split roles", "duration": 5})
    await fake.dispatch("INTERACTION_CREATE", payload)
    inter = await fake.wait_until(
        lambda: (i := fake.interactions.get(payload["id"])) and i.original_id and i
    )
    original = await fake.wait_until(
        lambda: (m := fake.messages.get(inter.original_id)) and "job `" in m.content and m
    )
    job_id = job_id_in(original.content)
    assert job_rows(settings) == [(job_id, "queued")]
    return payload, job_id


async def test_discord_chat_admits_and_a_worker_posts_the_followup(
    tmp_path: Path, discord_fakes: tuple[FakeDiscord, str, FakeFal, str]
) -> None:
    fake, _, fal, _ = discord_fakes
    settings = discord_settings(tmp_path, discord_fakes)
    async with role(settings, Role.CHAT):
        await until(fake.connected_shards, "the chat bot's gateway")
        payload, job_id = await admit_over_the_gateway(fake, settings)
        await asyncio.sleep(0.5)  # FAST schedules every 0.2 s: a runner would have begun
        assert fal.submits == [] and job_rows(settings) == [(job_id, "queued")]

        async with role(settings, Role.WORKER):
            song = await fake.wait_until(
                lambda: [m for m in fake.with_file() if m.interaction_id == payload["id"]],
                within=20,
            )
            await until(lambda: job_rows(settings) == [(job_id, "delivered")], "delivered")
    [message] = song
    assert message.origin == "followup"  # through the interaction's token
    assert len(fal.submits) == 1
    # The worker never opened a gateway: the only IDENTIFY is the chat bot's.
    assert len(fake.identifies) == 1
    # The status message the chat bot posted was removed once the song was up.
    assert fake.messages[fake.interactions[payload["id"]].original_id].deleted


async def test_discord_worker_posts_to_the_channel_once_the_token_is_dead(
    tmp_path: Path, discord_fakes: tuple[FakeDiscord, str, FakeFal, str]
) -> None:
    fake, _, fal, _ = discord_fakes
    settings = discord_settings(tmp_path, discord_fakes)
    async with role(settings, Role.CHAT):
        await until(fake.connected_shards, "the chat bot's gateway")
        payload, job_id = await admit_over_the_gateway(fake, settings)
    # The chat bot is gone and the interaction's 15 minutes are over when a worker comes.
    fake.expire_tokens()
    async with role(settings, Role.WORKER):
        posted = await fake.wait_until(lambda: fake.with_file(), within=20)
        await until(lambda: job_rows(settings) == [(job_id, "delivered")], "delivered")
    [message] = posted
    assert message.origin == "channel" and message.channel_id == payload["channel_id"]
    assert len(fal.submits) == 1
    assert f"<@{payload['member']['user']['id']}>" in message.content


# ---- Telegram ---------------------------------------------------------------------------


async def test_telegram_chat_admits_and_a_worker_sends_the_audio(tmp_path: Path) -> None:
    fake = FakeTelegram()
    fake.chat(PRIVATE, "private", "Ann")
    fal = FakeFal(queue_polls=1, progress_polls=1)
    async with serve(fake.app) as url, fal.running() as fal_url:
        settings = make_settings(
            tmp_path,
            telegram_token=fake.token,
            telegram_api_url=url,
            fal_key=fal.key,
            fal_queue_url=fal_url,
        )
        async with role(settings, Role.WORKER) as worker:
            # The worker alone: it connects (getMe) but never asks for updates.
            await until(lambda: fake.calls_of("getMe") or worker.done(), "getMe")
            assert not worker.done(), worker.exception()
            await asyncio.sleep(0.5)
            assert {c.method for c in fake.calls} == {"getMe"}
            assert fake.offsets == [] and fake.webhook is None
            async with role(settings, Role.CHAT):
                await until(lambda: fake.offsets, "the chat bot's first getUpdates")
                request_id = fake.send_text(PRIVATE, ANN, "/song rain on a window duration=5")
                await fake.wait_call("sendAudio", within=20)
                [(job_id, _)] = job_rows(settings)
                await until(lambda: job_rows(settings) == [(job_id, "delivered")], "delivered")
    [song] = [m for m in fake.bot_messages(PRIVATE) if m.kind == "audio"]
    assert song.reply_to == request_id
    assert len(fal.submits) == 1
    assert len(fake.calls_of("setMyCommands")) == 1  # the chat bot's menu only
    # The status message the chat bot posted is gone now the song is up.
    [status] = [m for m in fake.sent if m.kind == "text"]
    assert any("Queued" in t for t in status.texts)
    assert (PRIVATE, status.message_id) not in fake.messages


# ---- the command line -------------------------------------------------------------------


@pytest.mark.parametrize("which", ["chat", "worker"])
async def test_split_roles_on_sqlite_are_refused_with_one_line(tmp_path: Path, which: str) -> None:
    env = cli_env(tmp_path, DISCORD_TOKEN="t", FAL_KEY="k")
    code, out, err = await run_cli(["run", "--role", which], env, tmp_path)
    assert code == 2, (out, err)
    [line] = err.strip().splitlines()
    assert line.startswith(f"error: --role {which} ") and "DATABASE_URL" in line
    assert "--role all" in line
    assert not (tmp_path / "data").exists()  # nothing opened, nothing stored


async def test_an_unknown_role_is_refused(tmp_path: Path) -> None:
    code, _, err = await run_cli(["run", "--role", "both"], cli_env(tmp_path), tmp_path)
    assert code == 2
    assert "invalid choice: 'both' (choose from 'all', 'chat', 'worker')" in err


# ---- one Telegram poller ----------------------------------------------------------------


async def test_a_second_telegram_poller_is_refused_and_a_restart_takes_its_hold_back(
    tmp_path: Path,
) -> None:
    fake = FakeTelegram()
    fal = FakeFal()
    async with serve(fake.app) as url, fal.running() as fal_url:
        settings = make_settings(
            tmp_path,
            telegram_token=fake.token,
            telegram_api_url=url,
            fal_key=fal.key,
            fal_queue_url=fal_url,
        )
        bot_id = BOT_ID  # what getMe answers
        store = await connect_store(settings)
        try:
            # Another machine's chat process polls this bot (its hold is in the database).
            assert await store.hold_singleton(f"telegram-poller:{bot_id}", "elsewhere:/d", 60)
            stop = asyncio.Event()
            with pytest.raises(SingletonHeld) as refused:
                await asyncio.wait_for(app.run_bot(settings, stop, role=Role.CHAT), 20)
            text = str(refused.value)
            assert "Telegram long polling (getUpdates)" in text and "elsewhere:/d" in text
            assert "TELEGRAM_WEBHOOK_URL" in text
            assert fake.offsets == []  # it never polled
            # A hold left by this instance's own earlier run (killed -9) is taken back.
            await store.release_singleton(f"telegram-poller:{bot_id}", "elsewhere:/d")
            await store.hold_singleton(f"telegram-poller:{bot_id}", instance_id(settings), 60)
            async with role(settings, Role.CHAT):
                await until(lambda: fake.offsets, "getUpdates")
                assert await store.singleton_owner(f"telegram-poller:{bot_id}") == (
                    instance_id(settings)
                )
            # Stopped: the hold is given up for the next poller.
            assert await store.singleton_owner(f"telegram-poller:{bot_id}") is None
        finally:
            await store.close()
