"""The Discord front-end end to end: the real discord.py client against a fake Discord
server, a real engine on a temp SQLite file, the real fal adapter against the fake fal
queue (which serves real WAV audio).

Interactions are fed to the client's connection state as the gateway would
(`parse_interaction_create`); the test then waits for the tasks discord.py spawned
(`CommandTree-invoker`, `discord-ui-*`) and for what the fake server received.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import discord
import pytest

from bot.engine import Engine, EngineOptions
from bot.frontends.discord_frontend import DiscordFrontend
from bot.requests import ADVANCED_OPTIONS, BASIC_OPTIONS
from providers.fal import FalProvider
from tests.conftest import make_settings
from tests.enginekit import wait_for_state
from tests.fakes.discord_api import (
    BOT_PERMISSIONS,
    EPHEMERAL,
    MANAGE_GUILD,
    MEMBER_PERMISSIONS,
    FakeDiscord,
    FakeMessage,
)
from tests.fakes.fal import FakeFal
from tests.fakes.http import serve

USER = "100000000000000001"
OTHER_USER = "100000000000000002"
GUILD = "200000000000000001"
CHANNEL = "300000000000000001"
OTHER_CHANNEL = "300000000000000002"


@dataclass
class Bot:
    """One running bot: fake Discord, engine, front-end, provider."""

    fake: FakeDiscord
    engine: Engine
    frontend: DiscordFrontend
    fal: FakeFal

    def submitted(self) -> list[dict[str, Any]]:
        """The inputs fal received, in order."""
        return [s.body for s in self.fal.submits]

    async def feed(self, payload: dict[str, Any]) -> None:
        """Hand an INTERACTION_CREATE to discord.py and wait for the handlers it starts."""
        before = asyncio.all_tasks()
        self.frontend.client._connection.parse_interaction_create(payload)  # type: ignore[arg-type]
        await asyncio.sleep(0)
        spawned = [
            t
            for t in asyncio.all_tasks() - before
            if t.get_name().startswith(("CommandTree-invoker", "discord-ui-"))
        ]
        await asyncio.wait_for(asyncio.gather(*spawned), timeout=10)

    def messages_of(self, payload: dict[str, Any]) -> list[FakeMessage]:
        return [m for m in self.fake.visible() if m.interaction_id == payload["id"]]

    def original(self, payload: dict[str, Any]) -> FakeMessage:
        inter = self.fake.interactions[payload["id"]]
        assert inter.original_id is not None
        return self.fake.messages[inter.original_id]

    async def song_message(self, payload: dict[str, Any]) -> FakeMessage:
        """Wait for the finished song posted for this interaction."""
        found = await self.fake.wait_until(
            lambda: [m for m in self.messages_of(payload) if m.attachments]
        )
        assert len(found) == 1
        return found[0]

    async def posted(self, payload: dict[str, Any]) -> tuple[FakeMessage, str]:
        """Wait for the song of this interaction to be posted and recorded delivered;
        the song's message and its job id."""
        song = await self.song_message(payload)
        job_id = job_id_in(self.original(payload).content)
        await self.job_state(job_id, "delivered")
        return song, job_id

    async def job_state(self, job_id: str, *states: str) -> None:
        async def reached() -> bool:
            job = await self.engine.get_job(job_id)
            return job is not None and job.state in states

        for _ in range(500):
            if await reached():
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"job {job_id} never reached {states}")


OPTIONS = EngineOptions(
    poll_max_interval=0.05,
    poll_backoff=1.0,
    scheduler_idle=0.05,
    delivery_backoff=0.01,
    stop_grace=2.0,
    busy_cooldown=0.1,
    unavailable_cooldown=0.1,
)


@pytest.fixture(autouse=True)
def _restore_discord_endpoints() -> Any:
    base = discord.http.Route.BASE
    gateway = discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    yield
    discord.http.Route.BASE = base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = gateway


async def start_bot(
    tmp_path: Path,
    servers: Servers,
    *,
    edit_interval: float = 0.05,
    clock: Any = None,
    connect_gateway: bool = False,
    **settings: Any,
) -> Bot:
    values: dict[str, Any] = {
        "discord_token": servers.discord.token,
        "discord_api_url": f"{servers.discord_url}/api/v10",
        "quota_user_concurrent_jobs": 5,
    }
    values.update(settings)
    config = make_settings(tmp_path, **values)
    provider = FalProvider(
        servers.fal.key,
        servers.fal_url,
        storage_url=servers.fal_url,  # edits upload their source to the fake's storage
        concurrency=4,
        poll_interval=0.01,
        retry_delays=(0.01, 0.02),
    )
    engine = await Engine.open(config, [provider], options=OPTIONS)
    kwargs: dict[str, Any] = {"connect_gateway": connect_gateway, "edit_interval": edit_interval}
    if clock is not None:
        kwargs["clock"] = clock
    frontend = DiscordFrontend(config, engine, **kwargs)
    engine.register_delivery(frontend)  # as bot.app does
    await engine.start()
    await frontend.start()
    return Bot(servers.discord, engine, frontend, servers.fal)


async def stop_bot(bot: Bot) -> None:
    await bot.frontend.stop()
    await bot.engine.close()


@dataclass
class Servers:
    discord: FakeDiscord
    discord_url: str
    fal: FakeFal
    fal_url: str


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    discord_api = FakeDiscord()
    fal = FakeFal(queue_polls=1, progress_polls=1)
    async with serve(discord_api.app()) as base, fal.running() as fal_url:
        yield Servers(discord_api, base, fal, fal_url)


@pytest.fixture
async def bot(tmp_path: Path, servers: Servers) -> AsyncIterator[Bot]:
    running = await start_bot(tmp_path, servers)
    yield running
    await stop_bot(running)


def hold(fal: FakeFal) -> None:
    """fal keeps the request running until `release`."""
    fal.progress_polls = 10_000


def release(fal: FakeFal) -> None:
    fal.progress_polls = 0


def decode_mp3(data: bytes) -> float:
    """Decode every frame with PyAV; returns the duration in seconds."""
    with av.open(io.BytesIO(data), mode="r") as container:
        assert container.format.name == "mp3"
        stream = container.streams.audio[0]
        samples = sum(int(frame.samples) for frame in container.decode(stream))
        return samples / stream.codec_context.sample_rate


def job_id_in(text: str) -> str:
    import re

    match = re.search(r"job `([0-9a-f]{8})`", text)
    assert match, text
    return match.group(1)


def ephemeral_texts(bot: Bot, payload: dict[str, Any]) -> list[str]:
    """What only the user saw: ephemeral replies to this interaction."""
    return [m.content for m in bot.messages_of(payload) if m.ephemeral]


# ---- /song ------------------------------------------------------------------------------


async def test_song_defers_then_posts_an_mp3_with_embed_and_buttons(bot: Bot) -> None:
    fake = bot.fake
    payload = fake.slash("song", {"prompt": "lofi piano about rain", "duration": 6, "seed": 42})
    await bot.feed(payload)

    # Acknowledged by a public deferral, then the status message names the job.
    assert fake.callbacks[0]["type"] == 5
    assert not (fake.callbacks[0].get("data") or {}).get("flags", 0) & EPHEMERAL
    job_id = job_id_in(bot.original(payload).content)

    song = await bot.song_message(payload)
    assert not song.ephemeral
    mp3 = next(a for a in song.attachments if a.filename.endswith(".mp3"))
    assert mp3.filename == f"lofi-piano-about-rain-{job_id}.mp3"  # from the title
    assert len(mp3.data) <= payload["attachment_size_limit"]
    assert decode_mp3(mp3.data) == pytest.approx(6, abs=0.2)
    cover = next(a for a in song.attachments if a.filename == "cover.jpg")
    assert cover.data[:3] == b"\xff\xd8\xff"  # a JPEG

    embed = song.embeds[0]
    # Titled from the first line of the lyrics fal wrote; its tags shown too.
    assert embed["title"] == "Lofi piano about rain"
    assert "lofi piano about rain" in embed["description"]
    fields = {f["name"]: f["value"] for f in embed["fields"]}
    assert fields["Tags"] == "lofi, piano, about, rain"
    assert fields["Duration"] == "0:06"
    assert fields["Seed"] == "`42`"
    assert fields["Provider"] == "fal"
    assert embed["thumbnail"]["url"] == "attachment://cover.jpg"
    # fal wrote lyrics for the prompt, so the lyrics button is there too.
    assert song.custom_ids == [
        f"acestep:new:{job_id}",
        f"acestep:same:{job_id}",
        f"acestep:lyrics:{job_id}",
        f"acestep:tags:{job_id}",
        f"acestep:extend:{job_id}",
        f"acestep:remix:{job_id}",
        f"acestep:repaint:{job_id}",
        f"acestep:edit:{job_id}",
        f"acestep:delete:{job_id}",
    ]

    # The provider got the user's seed. A song costs one lasting message: the status
    # message goes once the song is posted, and the job keeps the link to the song.
    assert bot.submitted()[0]["seed"] == 42
    status = await fake.wait_until(lambda: (m := bot.original(payload)) and m.deleted and m)
    assert any("Queued" in text for text in status.history)
    # The job is marked delivered once the post has returned (reads do not queue behind
    # that write, so wait for it rather than race it).
    job = await wait_for_state(bot.engine, job_id, ("delivered",))
    assert job.reply_target["result_url"].endswith(f"/channels/{GUILD}/{CHANNEL}/{song.id}")


async def test_song_fits_the_upload_limit_the_interaction_reports(bot: Bot) -> None:
    limit = 300_000  # a 20 s song at the default bitrate would not fit
    payload = bot.fake.slash(
        "song", {"prompt": "long ambient drone", "duration": 20}, attachment_size_limit=limit
    )
    await bot.feed(payload)
    song = await bot.song_message(payload)
    mp3 = next(a for a in song.attachments if a.filename.endswith(".mp3"))
    assert len(mp3.data) <= limit
    assert decode_mp3(mp3.data) == pytest.approx(20, abs=0.3)


async def test_song_in_a_dm_works_without_a_guild(bot: Bot) -> None:
    payload = bot.fake.slash(
        "song", {"prompt": "a lullaby", "duration": 5, "instrumental": True}, guild_id=None
    )
    await bot.feed(payload)
    song = await bot.song_message(payload)
    assert song.attachments and song.channel_id == CHANNEL
    job_id = job_id_in(bot.original(payload).content)
    assert bot.submitted()[0]["instrumental"] is True
    assert f"acestep:lyrics:{job_id}" not in song.custom_ids  # nothing to show
    await bot.job_state(job_id, "delivered")
    job = await bot.engine.get_job(job_id)
    assert job is not None and job.requester.community_id is None
    assert job.reply_target["result_url"].startswith("https://discord.com/channels/@me/")


async def test_status_edits_are_throttled_and_end_in_the_final_state(
    tmp_path: Path, servers: Servers
) -> None:
    server = servers.discord
    servers.fal.progress_polls = 12  # 12 progress reports, about 10 ms apart
    bot = await start_bot(tmp_path, servers, edit_interval=0.15)
    try:
        payload = server.slash("song", {"prompt": "busy drums", "duration": 5})
        await bot.feed(payload)
        await bot.song_message(payload)
        status = await server.wait_until(lambda: (m := bot.original(payload)) and m.deleted and m)
        assert any("Generating" in text for text in status.history)
        # The first edit shows the queue; every later one waits out the interval.
        gaps = [b - a for a, b in zip(status.edits[:-1], status.edits[1:], strict=True)]
        assert all(gap >= 0.12 for gap in gaps), gaps
        assert len(status.edits) < servers.fal.progress_polls + 3
    finally:
        await stop_bot(bot)


async def test_out_of_range_option_is_answered_ephemerally_naming_the_field(bot: Bot) -> None:
    # Discord enforces min/max, but a payload can carry anything: the engine's rules decide.
    payload = bot.fake.slash("song", {"prompt": "x", "duration": 999})
    await bot.feed(payload)
    assert bot.fake.callbacks[-1]["type"] == 4
    texts = ephemeral_texts(bot, payload)
    assert texts == [
        "duration: 999 is not valid; a whole number of seconds from 5 to 240. "
        "See /help for every option."
    ]
    assert bot.submitted() == []

    payload = bot.fake.slash("song", {"prompt": "x", "guidance_scale": 500.0})
    await bot.feed(payload)
    # What the user reads (underscores are escaped in Discord markdown).
    assert [t.replace("\\_", "_") for t in ephemeral_texts(bot, payload)] == [
        "guidance_scale: 500.0 is not valid; a number from 0 to 200. See /help for every option."
    ]


async def test_quota_refusal_is_ephemeral_with_what_remains_and_the_reset(
    tmp_path: Path, servers: Servers
) -> None:
    server = servers.discord
    bot = await start_bot(tmp_path, servers, quota_user_jobs_per_day=1)
    try:
        first = server.slash("song", {"prompt": "one", "duration": 5})
        await bot.feed(first)
        await bot.song_message(first)
        second = server.slash("song", {"prompt": "two", "duration": 5})
        await bot.feed(second)
        # The public "thinking" message is replaced by a message only the user sees.
        visible = bot.messages_of(second)
        assert len(visible) == 1 and visible[0].ephemeral
        assert "You have reached today's limit of 1 song." in visible[0].content
        assert "It resets at 00:00 UTC" in visible[0].content
        assert len(bot.submitted()) == 1
    finally:
        await stop_bot(bot)


async def test_missing_attach_files_permission_is_explained(bot: Bot) -> None:
    payload = bot.fake.slash(
        "song", {"prompt": "x", "duration": 5}, app_permissions=BOT_PERMISSIONS & ~(1 << 15)
    )
    await bot.feed(payload)
    texts = ephemeral_texts(bot, payload)
    assert len(texts) == 1 and "can't post files in this channel" in texts[0]
    assert bot.submitted() == []


async def test_failed_provider_is_told_once_briefly_with_a_retry_button(bot: Bot) -> None:
    from bot.models import Requester

    bot.fal.run_error = ("the model ran out of memory", "internal_server_error")
    payload = bot.fake.slash("song", {"prompt": "doomed", "duration": 5, "seed": 77})
    await bot.feed(payload)
    job_id = job_id_in(bot.original(payload).content)
    # The status message itself becomes the failure notice: one message, in public.
    status = await bot.fake.wait_until(
        lambda: (m := bot.original(payload)) and "could not make" in m.content and m
    )
    assert status.content == (
        f"**Doomed** \N{MIDDLE DOT} job `{job_id}`\n\N{CROSS MARK} The music service could "
        "not make this song. Your quota was refunded."
    )
    # The provider's raw error is for the operator (`jobs show`), never for the channel.
    assert all("out of memory" not in m.content for m in bot.fake.visible())
    job = await bot.engine.get_job(job_id)
    assert job is not None and "out of memory" in (job.error or "")
    assert status.custom_ids == [f"acestep:retry:{job_id}"]
    assert ephemeral_texts(bot, payload) == []  # not told twice
    quota = await bot.engine.quota_status(Requester("discord", USER, GUILD))
    used = {line.name: line.used for line in quota.lines}
    assert used["user_jobs_per_day"] == 0
    assert used["user_seconds_per_day"] == 0

    # Retry asks again with the same request and seed.
    bot.fal.run_error = None
    retry = bot.fake.button(f"acestep:retry:{job_id}", status)
    await bot.feed(retry)
    await bot.song_message(retry)
    assert [s["seed"] for s in bot.submitted()] == [77, 77]


# ---- /compose ---------------------------------------------------------------------------


async def test_compose_opens_a_modal_whose_submit_starts_a_song(bot: Bot) -> None:
    fake = bot.fake
    await bot.feed(fake.slash("compose", {"tags": "synthwave", "duration": 5, "seed": 7}))
    assert fake.callbacks[-1]["type"] == 9
    modal = fake.modals[-1]
    inputs = {c["component"]["custom_id"]: c["component"] for c in modal["components"]}
    assert inputs["tags"]["value"] == "synthwave"  # prefilled from the option
    assert inputs["lyrics"]["style"] == 2  # paragraph: line breaks allowed

    lyrics = "[verse]\nneon lights on the highway\n[chorus]\nwe ride"
    submit = fake.modal_submit(modal["custom_id"], {"tags": "synthwave, 80s", "lyrics": lyrics})
    await bot.feed(submit)
    song = await bot.song_message(submit)
    [sent] = bot.fal.submits
    assert sent.path == "/fal-ai/ace-step"  # the tags + lyrics endpoint
    assert sent.body["tags"] == "synthwave, 80s" and sent.body["lyrics"] == lyrics
    assert sent.body["seed"] == 7
    assert song.embeds[0]["description"] == "synthwave, 80s"
    job_id = job_id_in(bot.original(submit).content)
    assert f"acestep:lyrics:{job_id}" in song.custom_ids

    # The lyrics button shows the full text to whoever clicks, and only to them.
    click = fake.button(f"acestep:lyrics:{job_id}", song, user_id=OTHER_USER)
    await bot.feed(click)
    answer = bot.messages_of(click)
    assert len(answer) == 1 and answer[0].ephemeral
    assert answer[0].embeds[0]["description"] == lyrics


async def test_compose_modal_with_empty_tags_is_refused(bot: Bot) -> None:
    fake = bot.fake
    await bot.feed(fake.slash("compose", {"duration": 5}))
    modal = fake.modals[-1]
    submit = fake.modal_submit(modal["custom_id"], {"tags": " , ", "lyrics": ""})
    await bot.feed(submit)
    texts = ephemeral_texts(bot, submit)
    assert len(texts) == 1 and texts[0].startswith("tags:")
    assert bot.submitted() == []


# ---- buttons ----------------------------------------------------------------------------


async def test_new_take_and_same_seed_buttons_start_new_jobs(bot: Bot) -> None:
    fake = bot.fake
    first = fake.slash("song", {"prompt": "city pop", "duration": 5, "seed": 42})
    await bot.feed(first)
    song = await bot.song_message(first)
    job_id = job_id_in(bot.original(first).content)

    new_take = fake.button(f"acestep:new:{job_id}", song, user_id=OTHER_USER)
    await bot.feed(new_take)
    assert fake.callbacks[-1]["type"] == 5  # a new public status message
    await bot.song_message(new_take)
    sent = bot.submitted()[1]
    assert sent["prompt"] == "city pop" and sent["duration"] == 5
    assert sent["seed"] != 42
    new_job = await bot.engine.get_job(job_id_in(bot.original(new_take).content))
    assert new_job is not None and new_job.id != job_id
    assert new_job.requester.user_id == OTHER_USER  # the clicker's quota, not the author's

    same = fake.button(f"acestep:same:{job_id}", song)
    await bot.feed(same)
    await bot.song_message(same)
    assert bot.submitted()[2]["seed"] == 42


async def test_buttons_keep_working_after_a_restart(tmp_path: Path, servers: Servers) -> None:
    server = servers.discord
    bot = await start_bot(tmp_path, servers)
    first = server.slash("song", {"prompt": "persistent", "duration": 5, "seed": 3})
    await bot.feed(first)
    song = await bot.song_message(first)
    job_id = job_id_in(bot.original(first).content)
    await stop_bot(bot)

    bot = await start_bot(tmp_path, servers)  # same database, fresh client
    try:
        click = server.button(f"acestep:same:{job_id}", song)
        await bot.feed(click)
        await bot.song_message(click)
        assert bot.submitted()[-1]["seed"] == 3
    finally:
        await stop_bot(bot)


async def test_cancel_button_and_command(bot: Bot) -> None:
    fake = bot.fake
    hold(bot.fal)  # fal keeps "generating"
    payload = fake.slash("song", {"prompt": "never ending", "duration": 5})
    await bot.feed(payload)
    job_id = job_id_in(bot.original(payload).content)
    await bot.job_state(job_id, "running")
    status = await fake.wait_until(
        lambda: (m := bot.original(payload)) and "Generating" in m.content and m
    )
    assert status.custom_ids == [f"acestep:cancel:{job_id}"]

    # Someone else cannot cancel it.
    other = fake.button(f"acestep:cancel:{job_id}", status, user_id=OTHER_USER)
    await bot.feed(other)
    assert ephemeral_texts(bot, other) == ["You can only cancel your own songs."]

    # fal is already making it: the user is told what a cancel costs before it happens.
    click = fake.button(f"acestep:cancel:{job_id}", status)
    await bot.feed(click)
    [question] = [m for m in bot.messages_of(click) if m.ephemeral]
    assert question.content == (
        f"`{job_id}` (Never Ending). It is already being made: cancelling will not give "
        "your quota back."
    )
    assert question.custom_ids == [f"acestep:stop:{job_id}"]
    assert (await bot.engine.get_job(job_id)).state == "running"  # type: ignore[union-attr]
    confirm = fake.button(f"acestep:stop:{job_id}", question)
    await bot.feed(confirm)
    assert ephemeral_texts(bot, confirm) == [
        f"Cancelled `{job_id}` (Never Ending). It still counts against your quota, because "
        "the music service made it."
    ]
    await bot.job_state(job_id, "cancelled")
    status = await fake.wait_until(
        lambda: (m := bot.original(payload)) and "Cancelled" in m.content and m
    )
    assert status.custom_ids == []

    # /cancel without a job id takes the user's latest active job.
    second = fake.slash("song", {"prompt": "second", "duration": 5})
    await bot.feed(second)
    second_id = job_id_in(bot.original(second).content)
    await bot.job_state(second_id, "running")
    command = fake.slash("cancel", {})
    await bot.feed(command)
    [question] = [m for m in bot.messages_of(command) if m.ephemeral]
    assert question.custom_ids == [f"acestep:stop:{second_id}"]
    confirm = fake.button(f"acestep:stop:{second_id}", question)
    await bot.feed(confirm)
    assert ephemeral_texts(bot, confirm)[0].startswith(f"Cancelled `{second_id}` (Second).")
    await bot.job_state(second_id, "cancelled")
    assert not [m for m in fake.visible() if m.attachments]


# ---- restarts, expiry, rate limits --------------------------------------------------------


async def test_song_finished_after_a_restart_is_posted_to_the_channel_once(
    tmp_path: Path, servers: Servers
) -> None:
    server = servers.discord
    hold(servers.fal)
    bot = await start_bot(tmp_path, servers)
    payload = server.slash("song", {"prompt": "slow burner", "duration": 5})
    await bot.feed(payload)
    job_id = job_id_in(bot.original(payload).content)
    await bot.job_state(job_id, "running")
    await bot.frontend.stop()
    await bot.engine.stop()
    await bot.engine.store.close()

    # 20 minutes later: the interaction token is dead; the provider has finished.
    server.expire_tokens()
    later = time.time() + 20 * 60
    release(servers.fal)
    bot = await start_bot(tmp_path, servers, clock=lambda: later)
    try:
        posted = await server.wait_until(lambda: [m for m in server.visible() if m.attachments])
        await asyncio.sleep(0.3)  # nothing else arrives
        posted = [m for m in server.visible() if m.attachments]
        assert len(posted) == 1
        song = posted[0]
        assert song.origin == "channel" and song.channel_id == CHANNEL
        assert song.content == f"<@{USER}> your song is ready."
        assert decode_mp3(
            next(a.data for a in song.attachments if a.filename.endswith(".mp3"))
        ) == pytest.approx(5, abs=0.2)
        assert song.custom_ids[0] == f"acestep:new:{job_id}"
        await bot.job_state(job_id, "delivered")
        job = await bot.engine.get_job(job_id)
        assert job is not None
        assert job.reply_target["result_url"].endswith(f"/{CHANNEL}/{song.id}")
        # The status message is removed through the channel now that the token is dead.
        status = server.messages[job.reply_target["status_message_id"]]
        await server.wait_until(lambda: status.deleted)
    finally:
        await stop_bot(bot)


async def test_expired_token_falls_back_to_the_channel(bot: Bot) -> None:
    fake = bot.fake
    hold(bot.fal)
    payload = fake.slash("song", {"prompt": "late", "duration": 5})
    await bot.feed(payload)
    job_id = job_id_in(bot.original(payload).content)
    await bot.job_state(job_id, "running")
    fake.expire_tokens()  # Discord says the token is dead although our clock disagrees
    release(bot.fal)
    await bot.job_state(job_id, "delivered")
    posted = [m for m in fake.visible() if m.attachments]
    assert len(posted) == 1 and posted[0].origin == "channel"
    assert posted[0].content.startswith(f"<@{USER}>")


async def test_late_song_goes_to_dms_when_the_channel_is_closed_to_the_bot(bot: Bot) -> None:
    # A user-installed app used in a server it is not a member of cannot post there.
    fake = bot.fake
    hold(bot.fal)
    payload = fake.slash("song", {"prompt": "private", "duration": 5})
    await bot.feed(payload)
    job_id = job_id_in(bot.original(payload).content)
    await bot.job_state(job_id, "running")
    fake.expire_tokens()
    fake.forbidden_channels.add(CHANNEL)
    release(bot.fal)
    await bot.job_state(job_id, "delivered")
    [song] = fake.with_file()
    assert fake.dm_channels == {song.channel_id: USER}
    assert song.content == f"<@{USER}> your song is ready."
    job = await bot.engine.get_job(job_id)
    assert job is not None
    assert job.reply_target["result_url"].endswith(f"/@me/{song.channel_id}/{song.id}")


async def test_rate_limited_followup_is_retried(bot: Bot) -> None:
    fake = bot.fake
    fake.rate_limit_next("POST", r"^/api/v10/webhooks/\d+/[^/]+$", retry_after=0.05)
    payload = fake.slash("song", {"prompt": "patience", "duration": 5})
    await bot.feed(payload)
    await bot.song_message(payload)
    assert len(fake.rate_limited) == 1
    followups = [r for r in fake.requests if r == fake.rate_limited[0]]
    assert len(followups) == 2  # the 429, then the retry that posted the song
    assert len(fake.with_file()) == 1


async def test_unexpected_error_is_answered_briefly_and_logged_without_the_token(
    bot: Bot, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="discord")  # another test may have raised it
    first = bot.fake.slash("song", {"prompt": "fine", "duration": 5})
    await bot.feed(first)
    song = await bot.song_message(first)
    job_id = job_id_in(bot.original(first).content)

    async def broken(job_id: str) -> None:
        raise RuntimeError("database on fire")

    monkeypatch.setattr(bot.engine, "get_job", broken)
    click = bot.fake.button(f"acestep:new:{job_id}", song)
    await bot.feed(click)
    assert ephemeral_texts(bot, click) == ["Something went wrong; the operator has been told."]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(job_id in r.getMessage() and "RuntimeError" in r.getMessage() for r in errors)
    # discord.py logs webhook URLs at debug level; the interaction tokens are masked.
    ours = "\n".join(
        r.getMessage() for r in caplog.records if r.name.startswith(("discord", "bot."))
    )
    assert "/webhooks/" in ours
    for payload in (first, click):
        assert payload["token"] not in ours


# ---- other commands -------------------------------------------------------------------


async def test_queue_quota_history_and_help(bot: Bot) -> None:
    fake = bot.fake
    done = fake.slash("song", {"prompt": "finished tune", "duration": 5})
    await bot.feed(done)
    song, done_id = await bot.posted(done)
    hold(bot.fal)
    waiting = fake.slash("song", {"prompt": "waiting tune", "duration": 5})
    await bot.feed(waiting)
    waiting_id = job_id_in(bot.original(waiting).content)
    await bot.job_state(waiting_id, "running")

    queue = fake.slash("queue")
    await bot.feed(queue)
    [text] = ephemeral_texts(bot, queue)
    assert f"`{waiting_id}` Waiting Tune \N{EM DASH} generating" in text
    assert done_id not in text

    # /cancel suggests the user's active jobs as they type.
    await bot.feed(fake.autocomplete("cancel", "job", waiting_id[:3]))
    assert fake.callbacks[-1] == {
        "type": 8,
        "data": {"choices": [{"name": f"{waiting_id} Waiting Tune", "value": waiting_id}]},
    }

    quota = fake.slash("quota")
    await bot.feed(quota)
    [text] = ephemeral_texts(bot, quota)
    assert "**Songs today**: 2 of 20 songs used, 18 left" in text
    assert "Resets <t:" in text

    history = fake.slash("history")
    await bot.feed(history)
    [text] = ephemeral_texts(bot, history)
    assert (
        f"`{done_id}` [Finished tune](<https://discord.com/channels/{GUILD}/{CHANNEL}/"
        f"{song.id}>)" in text
    )

    help_ = fake.slash("help")
    await bot.feed(help_)
    [text] = ephemeral_texts(bot, help_)
    assert "/song" in text and "/compose" in text


async def test_limits_needs_manage_server_and_sets_quotas_and_channels(bot: Bot) -> None:
    fake = bot.fake
    denied = fake.slash("limits", {"setting": "seconds_per_day", "value": 60.0})
    await bot.feed(denied)
    assert "Manage Server" in ephemeral_texts(bot, denied)[0]
    assert await bot.engine.get_limits("community", f"discord:{GUILD}") == {}

    admin = MEMBER_PERMISSIONS | MANAGE_GUILD
    change = fake.slash(
        "limits",
        {"setting": "seconds_per_day", "value": 60.0, "channels": f"<#{OTHER_CHANNEL}>"},
        member_permissions=admin,
    )
    await bot.feed(change)
    [text] = ephemeral_texts(bot, change)
    assert "`seconds_per_day` = 60" in text and f"<#{OTHER_CHANNEL}>" in text
    assert await bot.engine.get_limits("community", f"discord:{GUILD}") == {"seconds_per_day": 60.0}

    elsewhere = fake.slash("song", {"prompt": "x", "duration": 5})
    await bot.feed(elsewhere)
    assert ephemeral_texts(bot, elsewhere) == [f"I make songs in <#{OTHER_CHANNEL}> here."]

    allowed = fake.slash("song", {"prompt": "x", "duration": 5}, channel_id=OTHER_CHANNEL)
    await bot.feed(allowed)
    await bot.song_message(allowed)

    # Back to the defaults: no override, every channel.
    undo = fake.slash(
        "limits",
        {"setting": "seconds_per_day", "reset": True, "channels": "all"},
        member_permissions=admin,
    )
    await bot.feed(undo)
    [text] = ephemeral_texts(bot, undo)
    assert "`seconds_per_day` back to the default" in text and "Channels: all" in text
    assert await bot.engine.get_limits("community", f"discord:{GUILD}") == {}
    anywhere = fake.slash("song", {"prompt": "y", "duration": 5})
    await bot.feed(anywhere)
    await bot.song_message(anywhere)


# ---- command sync -----------------------------------------------------------------------


async def test_commands_sync_once_and_only_when_changed(tmp_path: Path, servers: Servers) -> None:
    server = servers.discord
    bot = await start_bot(tmp_path, servers)
    await stop_bot(bot)
    assert len(server.syncs) == 1
    path, commands = server.syncs[0]
    assert path == f"/api/v10/applications/{server.app_id}/commands"
    by_name = {c["name"]: c for c in commands}
    assert set(by_name) == {
        "song",
        "compose",
        "queue",
        "cancel",
        "quota",
        "history",
        "help",
        "limits",
        "settings",
        "banlist",
        "extend",
        "remix",
        "repaint",
        "Remix this song",
    }
    assert by_name["Remix this song"]["type"] == 3  # a message context menu
    song = {o["name"]: o for o in by_name["song"]["options"]}
    assert set(song) == {"prompt", "takes", *BASIC_OPTIONS, *ADVANCED_OPTIONS}
    assert (song["takes"]["min_value"], song["takes"]["max_value"]) == (1, 4)
    extend = {o["name"]: o for o in by_name["extend"]["options"]}
    assert set(extend) == {"audio", "song", "after", "before", "tags", "takes"}
    assert extend["audio"]["type"] == 11  # an attachment
    assert {o["name"] for o in by_name["repaint"]["options"]} >= {"start", "end"}
    assert song["prompt"]["required"] is True
    assert (song["duration"]["min_value"], song["duration"]["max_value"]) == (5, 240)
    assert [c["value"] for c in song["scheduler"]["choices"]] == ["euler", "heun"]
    assert song["guidance_scale"]["type"] == 10
    assert by_name["song"]["contexts"] == [0, 1, 2]
    assert by_name["song"]["integration_types"] == [0, 1]
    assert int(by_name["limits"]["default_member_permissions"]) == MANAGE_GUILD
    compose = {o["name"] for o in by_name["compose"]["options"]}
    assert compose == {"tags", "takes", *BASIC_OPTIONS, *ADVANCED_OPTIONS}

    # A restart with the same commands does not sync again.
    bot = await start_bot(tmp_path, servers)
    await stop_bot(bot)
    assert len(server.syncs) == 1

    # DISCORD_GUILD_IDS: those guilds get the commands at once.
    bot = await start_bot(tmp_path, servers, discord_guild_ids=[GUILD])
    await stop_bot(bot)
    assert [p for p, _ in server.syncs[1:]] == [
        f"/api/v10/applications/{server.app_id}/guilds/{GUILD}/commands"
    ]


async def test_rate_limited_sync_is_retried(tmp_path: Path, servers: Servers) -> None:
    server = servers.discord
    server.rate_limit_next("PUT", r"/commands$", retry_after=0.05)
    bot = await start_bot(tmp_path, servers)
    await stop_bot(bot)
    assert len(server.rate_limited) == 1
    assert len(server.syncs) == 1


async def test_gateway_and_rest_urls_come_from_settings(tmp_path: Path, servers: Servers) -> None:
    # DISCORD_GATEWAY_URL is where the shards connect (a gateway proxy), even though the
    # shard count comes from /gateway/bot. The interaction arrives over that websocket.
    server = servers.discord
    gateway = servers.discord_url.replace("http://", "ws://") + "/gateway"
    bot = await start_bot(tmp_path, servers, connect_gateway=True, discord_gateway_url=gateway)
    try:
        await asyncio.wait_for(bot.frontend.client.wait_until_ready(), timeout=10)
        assert bot.frontend.is_connected()  # what /health reports
        assert server.identifies[0]["token"] == server.token
        assert server.gateway_queries[0]["v"] == "10"
        assert server.identifies[0]["shard"] == [0, 1]  # the recommended count: one
        payload = server.slash("song", {"prompt": "over the wire", "duration": 5})
        await server.dispatch("INTERACTION_CREATE", payload)
        song = await bot.song_message(payload)
        assert song.attachments
    finally:
        await stop_bot(bot)
    assert not bot.frontend.is_connected()


# ---- community controls: defaults, ban list, delete, titles -----------------------------

ADMIN = MEMBER_PERMISSIONS | MANAGE_GUILD


async def test_settings_defaults_apply_to_new_songs_with_their_precedence(bot: Bot) -> None:
    fake = bot.fake
    # The server's admins set a community default; a member may not.
    denied = fake.slash("settings", {"scope": "server", "duration": 9})
    await bot.feed(denied)
    assert "Manage Server" in ephemeral_texts(bot, denied)[0]
    server = fake.slash(
        "settings", {"scope": "server", "duration": 9, "style": "dreamy"}, member_permissions=ADMIN
    )
    await bot.feed(server)
    assert "Duration: `9 s` (community)" in ephemeral_texts(bot, server)[0]

    # Alice's own default wins over the community's; Bob gets the community's.
    mine = fake.slash("settings", {"duration": 6, "instrumental": True})
    await bot.feed(mine)
    [shown] = ephemeral_texts(bot, mine)
    assert "Duration: `6 s` (yours)" in shown and "Instrumental: `yes` (yours)" in shown
    assert "Style suffix: `dreamy` (community)" in shown

    first = fake.slash("song", {"prompt": "rain"})
    await bot.feed(first)
    await bot.song_message(first)
    bobs = fake.slash("song", {"prompt": "sun"}, user_id=OTHER_USER)
    await bot.feed(bobs)
    await bot.song_message(bobs)
    # An option in the command wins over every default.
    explicit = fake.slash("song", {"prompt": "snow", "duration": 5, "instrumental": False})
    await bot.feed(explicit)
    song = await bot.song_message(explicit)
    alice, bob, snow = bot.submitted()
    assert (alice["duration"], alice["instrumental"], alice["prompt"]) == (6, True, "rain, dreamy")
    assert (bob["duration"], bob["instrumental"], bob["prompt"]) == (9, False, "sun, dreamy")
    assert (snow["duration"], snow["instrumental"]) == (5, False)

    # Buttons make new songs from the stored request: New take is the same request.
    job_id = job_id_in(bot.original(explicit).content)
    again = fake.button(f"acestep:new:{job_id}", song)
    await bot.feed(again)
    await bot.fake.wait_until(lambda: len(bot.submitted()) == 4)
    assert bot.submitted()[3]["duration"] == 5

    # A bad value is named and nothing is stored; reset clears one default.
    bad = fake.slash("settings", {"provider": "nowhere"})
    await bot.feed(bad)
    assert ephemeral_texts(bot, bad)[0].startswith("provider: 'nowhere' is not valid; one of fal")
    reset = fake.slash("settings", {"reset": "duration"})
    await bot.feed(reset)
    assert "Duration: `9 s` (community)" in ephemeral_texts(bot, reset)[0]
    assert await bot.engine.song_defaults("user", f"discord:{USER}") == {"instrumental": True}


async def test_banned_words_are_refused_at_admission_and_counted(
    tmp_path: Path, servers: Servers
) -> None:
    bot = await start_bot(tmp_path, servers, banned_words=["forbidden tune"])
    try:
        fake = bot.fake
        member = fake.slash("banlist", {"add": "bad word"})
        await bot.feed(member)
        assert "Manage Server" in ephemeral_texts(bot, member)[0]
        add = fake.slash("banlist", {"add": "Bad Word, Spam"}, member_permissions=ADMIN)
        await bot.feed(add)
        # The list is shown to the admin alone.
        [listed] = [m for m in bot.messages_of(add) if m.ephemeral]
        assert listed.embeds[0]["title"] == "Banned: bad word, spam"
        assert "bad word, spam" in listed.embeds[0]["description"]

        for prompt in ("a song with a B.A.D   w o r d in it", "the forbidden tune"):
            refused = fake.slash("song", {"prompt": prompt, "duration": 5})
            await bot.feed(refused)
            assert ephemeral_texts(bot, refused) == [
                "I can't make a song from this request here. Please try other words."
            ]
        # Whole words only: "spammy" is not "spam".
        fine = fake.slash("song", {"prompt": "spammy disco", "duration": 5})
        await bot.feed(fine)
        await bot.song_message(fine)
        assert [s["prompt"] for s in bot.submitted()] == ["spammy disco"]
        jobs = await bot.engine.store.recent(10)
        assert len(jobs) == 1 and len(await bot.engine.store.ledger()) <= 3
        metrics = bot.engine.metrics.render().decode()
        assert 'acestep_moderation_refusals_total{list="community"} 1.0' in metrics
        assert 'acestep_moderation_refusals_total{list="operator"} 1.0' in metrics

        remove = fake.slash("banlist", {"remove": "bad word"}, member_permissions=ADMIN)
        await bot.feed(remove)
        [listed] = [m for m in bot.messages_of(remove) if m.ephemeral]
        assert listed.embeds[0]["title"] == "No longer banned: bad word"
        assert await bot.engine.banned(f"discord:{GUILD}") == ["spam"]
    finally:
        await stop_bot(bot)


async def test_delete_button_removes_the_song_for_its_requester_or_an_admin(bot: Bot) -> None:
    fake = bot.fake
    payload = fake.slash("song", {"prompt": "oops", "duration": 5})
    await bot.feed(payload)
    song, job_id = await bot.posted(payload)
    audio_dir = bot.engine.settings.audio_dir
    assert list(audio_dir.glob(f"{job_id}.*"))

    stranger = fake.button(f"acestep:delete:{job_id}", song, user_id=OTHER_USER)
    await bot.feed(stranger)
    assert ephemeral_texts(bot, stranger) == ["You can only delete your own songs."]
    assert not song.deleted

    click = fake.button(f"acestep:delete:{job_id}", song)
    await bot.feed(click)
    assert ephemeral_texts(bot, click) == [f"Deleted `{job_id}` (Oops)."]
    assert song.deleted  # the posted message, through the stored interaction
    assert list(audio_dir.glob(f"{job_id}.*")) == []
    job = await bot.engine.get_job(job_id)
    assert job is not None and job.state == "delivered" and job.deleted
    assert job.deleted_by == f"discord:{USER}"
    assert [e["kind"] for e in await bot.engine.store.ledger(job_id)] == [
        "reserve",
        "charge",
        "commit",
    ]  # the ledger stays as it was: the song was made and paid for
    replay = fake.button(f"acestep:same:{job_id}", song)
    await bot.feed(replay)
    assert ephemeral_texts(bot, replay) == ["That song was deleted."]

    # After the interaction token expired, an admin deletes another's song via the channel.
    other = fake.slash("song", {"prompt": "bobs", "duration": 5}, user_id=OTHER_USER)
    await bot.feed(other)
    bobs_song, bobs_id = await bot.posted(other)
    fake.expire_tokens()
    bot.frontend.discord._clock = lambda: time.time() + 3600
    by_admin = fake.button(f"acestep:delete:{bobs_id}", bobs_song, member_permissions=ADMIN)
    await bot.feed(by_admin)
    assert ephemeral_texts(bot, by_admin) == [f"Deleted `{bobs_id}` (Bobs)."]
    assert bobs_song.deleted


async def test_title_option_names_the_embed_the_file_and_the_tags(bot: Bot) -> None:
    from mutagen.id3 import ID3
    from PIL import Image

    fake = bot.fake
    payload = fake.slash(
        "song", {"prompt": "city lights at night", "duration": 5, "title": "Night Drive"}
    )
    await bot.feed(payload)
    song, job_id = await bot.posted(payload)
    assert song.embeds[0]["title"] == "Night Drive"
    mp3 = next(a for a in song.attachments if a.filename.endswith(".mp3"))
    assert mp3.filename == f"night-drive-{job_id}.mp3"
    id3 = ID3(io.BytesIO(mp3.data))
    assert id3["TIT2"].text == ["Night Drive"]
    assert id3["TALB"].text == [bot.frontend.client.user.name]  # type: ignore[union-attr]
    assert id3["TCON"].text == ["city, lights"]  # the first tags fal wrote
    assert id3.getall("TXXX:JOB_ID")[0].text == [job_id]
    assert str(id3["TDRC"].text[0])[:4] == time.strftime("%Y", time.gmtime())
    with Image.open(io.BytesIO(id3.getall("APIC")[0].data)) as cover:
        assert cover.size[0] >= 600


async def test_use_these_tags_opens_the_compose_form_filled_in(bot: Bot) -> None:
    fake = bot.fake
    payload = fake.slash("song", {"prompt": "salty shanty", "duration": 5})
    await bot.feed(payload)
    song, job_id = await bot.posted(payload)
    assert song.embeds[0]["fields"][0] == {
        "name": "Tags",
        "value": "salty, shanty",
        "inline": False,
    }
    await bot.feed(fake.button(f"acestep:tags:{job_id}", song))
    assert fake.callbacks[-1]["type"] == 9
    modal = fake.modals[-1]
    inputs = {c["component"]["custom_id"]: c["component"] for c in modal["components"]}
    assert inputs["tags"]["value"] == "salty, shanty"
    assert inputs["lyrics"]["value"] == "[verse]\nsalty shanty"
    submit = fake.modal_submit(
        modal["custom_id"], {"tags": "salty, shanty, accordion", "lyrics": ""}
    )
    await bot.feed(submit)
    await bot.song_message(submit)
    sent = bot.fal.submits[-1]
    assert sent.path == "/fal-ai/ace-step"  # song mode now
    assert sent.body["tags"] == "salty, shanty, accordion" and sent.body["duration"] == 5


async def test_settings_quick_picks_set_the_pressers_own_defaults(bot: Bot) -> None:
    fake = bot.fake
    show = fake.slash("settings")
    await bot.feed(show)
    [panel] = [m for m in bot.messages_of(show) if m.ephemeral]
    assert "Duration: not set" in panel.content
    assert panel.custom_ids[:5] == [
        "acestep:set:duration=30",
        "acestep:set:duration=60",
        "acestep:set:duration=120",
        "acestep:set:instrumental=no",
        "acestep:set:instrumental=yes",
    ]
    press = fake.button("acestep:set:duration=120", panel)
    await bot.feed(press)
    assert fake.callbacks[-1]["type"] == 7  # the panel itself is updated
    assert "Duration: `120 s` (yours)" in panel.content
    assert await bot.engine.song_defaults("user", f"discord:{USER}") == {"duration": 120}
