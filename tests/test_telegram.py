"""The Telegram front-end: the real python-telegram-bot against a fake Bot API server.

Updates reach the bot through long-polled getUpdates; everything the bot sends is read
back from the fake server, as a user would see it. The engine is the real one on a temp
SQLite file, running songs on the fake fal queue server.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import av
import httpx
import pytest
from telegram import Update

from bot import logs
from bot.chat.markup import Text
from bot.chat.replies import FINAL_RANK, SongCard, StatusView
from bot.engine import Engine
from bot.frontends.telegram_frontend import (
    CLOUD_UPLOAD_BYTES,
    LOCAL_UPLOAD_BYTES,
    TelegramFrontend,
    upload_limit,
)
from bot.frontends.telegram_pacing import PacedSender
from bot.frontends.telegram_parse import parse_compose, parse_song
from bot.frontends.telegram_render import CAPTION_LIMIT, caption, split_message
from bot.models import FailureKind, Job, JobState, Requester
from bot.requests import GenerationRequest, InvalidRequest
from providers.fal import FalProvider
from storage.errors import StorageError
from storage.store import open_store
from tests.conftest import make_settings
from tests.enginekit import FAST
from tests.fakes.fal import FakeFal
from tests.fakes.http import serve
from tests.fakes.telegram_api import BOT_ID, FakeMessage, FakeTelegram

PRIVATE = 42
ANN = FakeTelegram.user(42, "Ann", "ann")
BOB = FakeTelegram.user(43, "Bob", "bob")
GROUP = -100500
FORUM = -100600


class Harness:
    """A running bot: the fake Telegram server, the front-end, the engine, fake fal."""

    def __init__(
        self,
        fake: FakeTelegram,
        frontend: TelegramFrontend,
        engine: Engine,
        fal: FakeFal,
        sleeps: list[float],
    ) -> None:
        self.fake = fake
        self.frontend = frontend
        self.engine = engine
        self.fal = fal
        self.sleeps = sleeps

    def submitted(self) -> list[dict[str, Any]]:
        """The input bodies fal received, in order."""
        return [s.body for s in self.fal.submits]

    async def song_message(self, chat_id: int, count: int = 1) -> FakeMessage:
        """Wait for the `count`-th audio message in a chat."""

        def audios() -> list[FakeMessage]:
            return [m for m in self.fake.bot_messages(chat_id) if m.kind == "audio"]

        found = await self.fake.wait_for(lambda: len(audios()) >= count and audios())
        song = found[count - 1]
        # ...and the engine has recorded it as delivered.
        job_id = song.button_data()[0].split(":")[1]
        for _ in range(500):
            job = await self.engine.get_job(job_id)
            if job is not None and job.state == "delivered":
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError(f"job {job_id} was posted but not marked delivered")
        return song

    async def reply_to(self, chat_id: int, message_id: int) -> FakeMessage:
        """Wait for the bot's (first) text reply to a message."""
        return await self.fake.wait_for(
            lambda: next(
                (
                    m
                    for m in self.fake.bot_messages(chat_id)
                    if m.kind == "text" and m.reply_to == message_id
                ),
                None,
            )
        )

    async def final_text(self, message: FakeMessage) -> str:
        """Wait until a status message leaves its working states; its text then."""
        working = ("Received", "Queued", "Starting", "Generating", "Uploading")
        return await self.fake.wait_for(
            lambda: message.text if not any(w in message.text for w in working) else None
        )


@asynccontextmanager
async def running_bot(
    tmp_path: Path,
    fal: FakeFal | None = None,
    fake: FakeTelegram | None = None,
    fal_url: str | None = None,
    **overrides: Any,
) -> AsyncIterator[Harness]:
    """The bot as `acestep-bot run` wires it, on the fake servers. Pass `fal_url` of an
    already running FakeFal to keep it (and its stored handles) across two bots."""
    fake = fake or FakeTelegram()
    fake.chat(PRIVATE, "private", "Ann")
    fake.chat(BOB["id"], "private", "Bob")
    fake.chat(GROUP, "supergroup", "Music club")
    fake.chat(FORUM, "supergroup", "Forum", is_forum=True)
    fal = fal or FakeFal(queue_polls=1, progress_polls=1)
    if fal_url is None:
        async with fal.running() as url, _bot(tmp_path, fal, url, fake, overrides) as h:
            yield h
    else:
        async with _bot(tmp_path, fal, fal_url, fake, overrides) as h:
            yield h


@asynccontextmanager
async def _bot(
    tmp_path: Path, fal: FakeFal, fal_url: str, fake: FakeTelegram, overrides: dict[str, Any]
) -> AsyncIterator[Harness]:
    sleeps: list[float] = []

    async def flood_sleep(delay: float) -> None:
        sleeps.append(delay)
        await asyncio.sleep(0.01)

    async with serve(fake.app) as url:
        settings = make_settings(
            tmp_path,
            telegram_token=fake.token,
            telegram_api_url=url,
            fal_key=fal.key,
            fal_queue_url=fal_url,
            **overrides,
        )
        provider = FalProvider(
            fal.key,
            fal_url,
            storage_url=fal_url,  # edits upload their source to the fake's storage
            concurrency=2,
            poll_interval=0.01,
            retry_delays=(0.01, 0.02),
        )
        engine = await Engine.open(settings, [provider], options=FAST)
        frontend = TelegramFrontend(
            settings,
            engine,
            edit_interval=0.05,
            action_interval=0.05,
            poll_timeout=1,
            # Telegram's chat limits at test speed (bench/telegram_overload.py runs the
            # real ones against a fake that enforces them).
            pacing=PacedSender(
                sleep=flood_sleep,
                private_per_second=100,
                group_budget=(100, 1.0),
                global_per_second=1000,
            ),
        )
        engine.register_delivery(frontend)
        await engine.start()
        await frontend.start()
        try:
            yield Harness(fake, frontend, engine, fal, sleeps)
        finally:
            await engine.stop()
            await frontend.stop()
            await engine.close()


def decode_mp3(data: bytes) -> tuple[str, float]:
    """Decode an uploaded file with PyAV: its format name and duration in seconds."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return container.format.name, samples / stream.rate


# --- parsing and text (no network) ---------------------------------------------------


def test_song_options_are_parsed_from_any_position() -> None:
    fields = parse_song(
        " lofi piano duration=30 about rain seed=7 instrumental steps=40 scheduler=heun"
    )
    assert fields["prompt"] == "lofi piano about rain"
    assert fields["duration"] == 30 and fields["seed"] == 7
    assert fields["instrumental"] is True
    assert fields["steps"] == 40 and fields["scheduler"] == "heun"


def test_unknown_option_names_the_valid_ones() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_song("rain tempo=fast")
    assert "tempo" in str(info.value) and "duration" in str(info.value)


def test_compose_keeps_lyrics_line_for_line() -> None:
    lyrics = "[verse]\nNeon rain\n\n  on the window\n[chorus]\nla & <la>"
    fields = parse_compose(" synthpop,  female vocals, duration=20\n" + lyrics, None)
    assert fields["tags"] == "synthpop, female vocals"
    assert fields["duration"] == 20
    assert fields["lyrics"] == lyrics
    assert parse_compose(" rock", "from the reply")["lyrics"] == "from the reply"


def test_caption_fits_and_is_escaped() -> None:
    long_prompt = "<b>&amp; rain</b> " * 200
    card = SongCard(
        job_id="0badf00d",
        title="rain",
        file_name="rain-0badf00d.mp3",
        label="Prompt",
        description=long_prompt,
        duration=65,
        seed=123,
        provider="fal",
        requester_id="42",
        buttons=(),
    )
    text = caption(card)
    assert len(text) <= CAPTION_LIMIT
    assert "<b>&amp;" not in text and "&lt;b&gt;&amp;amp;" in text
    assert text.endswith("<b>Seed</b> <code>123</code> · 1:05 · fal")


def test_split_message_respects_the_limit() -> None:
    text = "\n".join(f"line {i} " + "x" * 50 for i in range(300))
    chunks = split_message(text)
    assert len(chunks) > 1 and all(len(c) <= 4096 for c in chunks)
    assert "\n".join(chunks) == text


def test_upload_limit_depends_on_the_api_server() -> None:
    assert upload_limit("https://api.telegram.org") == CLOUD_UPLOAD_BYTES
    assert upload_limit("https://api.telegram.org/") == CLOUD_UPLOAD_BYTES
    assert upload_limit("http://127.0.0.1:8081") == LOCAL_UPLOAD_BYTES


# --- the bot end to end ----------------------------------------------------------------


async def test_song_goes_from_status_message_to_an_mp3(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        request_id = h.fake.send_text(
            PRIVATE, ANN, "/song lofi piano <about> rain duration=6 seed=7"
        )
        song = await h.song_message(PRIVATE)
        assert song.reply_to == request_id
        audio = song.files["audio"]
        assert audio.filename.endswith(".mp3")
        fmt, seconds = decode_mp3(audio.data)
        assert fmt == "mp3" and 5.5 < seconds < 6.5
        assert song.files["thumbnail"].data[:3] == b"\xff\xd8\xff"  # JPEG cover
        # Titled from the lyrics fal wrote ("[verse]" and the prompt): its first line.
        assert song.params["title"] == "Lofi piano <about> rain"
        assert song.params["performer"] == "ACE-Step" and song.params["duration"] == 6
        assert song.params["parse_mode"] == "HTML"
        # The tags fal wrote for the description are shown under it.
        assert song.caption == (
            "<b>Prompt</b> lofi piano &lt;about&gt; rain\n"
            "<b>Tags</b> lofi, piano, &lt;about&gt;, rain\n"
            "<b>Seed</b> <code>7</code> · 0:06 · fal"
        )
        job_id = song.button_data()[0].split(":")[1]
        # The same buttons as on Discord, three to a row.
        assert song.button_data() == [
            f"new:{job_id}",
            f"same:{job_id}",
            f"lyrics:{job_id}",
            f"tags:{job_id}",
            f"extend:{job_id}",
            f"remix:{job_id}",
            f"repaint:{job_id}",
            f"edit:{job_id}",
            f"delete:{job_id}",
        ]
        assert song.reply_markup is not None
        assert [len(row) for row in song.reply_markup["inline_keyboard"]] == [3, 3, 3]

        # A song costs one lasting message: the status message goes once it is posted.
        status = next(m for m in h.fake.sent if m.kind == "text")
        assert status.reply_to == request_id
        assert any("Queued" in t for t in status.texts)
        assert any("Generating" in t for t in status.texts)
        assert all(job_id in t for t in status.texts[1:])
        await h.fake.wait_for(lambda: (PRIVATE, status.message_id) not in h.fake.messages)
        assert h.fake.bot_messages(PRIVATE) == [song]
        assert h.fake.calls_of("sendChatAction")[0].params["action"] == "upload_voice"
        assert h.submitted()[0]["prompt"] == "lofi piano <about> rain"
        assert h.submitted()[0]["seed"] == 7
        job = await h.engine.get_job(job_id)
        assert job is not None and job.state == "delivered"
        # Rendered for a local Bot API server's 2000 MB limit (the fake is not the cloud).
        limit = h.frontend.upload_limit
        assert limit < upload_limit(h.frontend.api_url) == LOCAL_UPLOAD_BYTES
        assert (h.engine.settings.audio_dir / f"{job_id}.{limit}.mp3").exists()
        assert [c["command"] for c in h.fake.commands][:2] == ["song", "compose"]
        assert h.frontend.is_connected
    assert not h.frontend.is_connected


@pytest.mark.parametrize(
    "text, named",
    [
        ("/song rain tempo=fast", "tempo"),
        ("/song rain duration=abc", "duration"),
        ("/song rain duration=999", "duration"),
        ("/song rain scheduler=ddim", "scheduler"),
    ],
)
async def test_bad_options_are_answered_without_a_provider_call(
    tmp_path: Path, text: str, named: str
) -> None:
    async with running_bot(tmp_path) as h:
        request_id = h.fake.send_text(PRIVATE, ANN, text)
        reply = await h.reply_to(PRIVATE, request_id)
        # One line naming the field and what is allowed; the options are in /help.
        assert reply.text.startswith(f"{named}: ")
        assert reply.text.endswith("See /help for every option.")
        assert "\n" not in reply.text
        await asyncio.sleep(0.1)
        assert h.fal.submit_count == 0
        assert h.fake.calls_of("sendAudio") == []
        assert len(h.fake.bot_messages(PRIVATE)) == 1


async def test_quota_refusal_is_shown_and_nothing_is_generated(tmp_path: Path) -> None:
    async with running_bot(tmp_path, quota_user_jobs_per_day=1) as h:
        h.fake.send_text(PRIVATE, ANN, "/song first song duration=5")
        await h.song_message(PRIVATE)
        second = h.fake.send_text(PRIVATE, ANN, "/song second song duration=5")
        status = await h.reply_to(PRIVATE, second)
        refusal = await h.final_text(status)
        assert refusal.startswith("<b>Second Song</b>\nYou have reached today's limit of 1 song.")
        assert "It resets at 00:00 UTC" in refusal
        await asyncio.sleep(0.1)
        assert h.fal.submit_count == 1
        assert len(h.fake.calls_of("sendAudio")) == 1


async def test_compose_brings_multiline_lyrics_to_the_provider(tmp_path: Path) -> None:
    lyrics = "[verse]\nNeon rain on the window\nA & B <3\n\n[chorus]\nHold on, hold on"
    async with running_bot(tmp_path) as h:
        h.fake.send_text(PRIVATE, ANN, f"/compose synthpop, female vocals duration=8\n{lyrics}")
        song = await h.song_message(PRIVATE)
        body = h.submitted()[0]
        assert body["tags"] == "synthpop, female vocals" and body["duration"] == 8
        assert body["lyrics"] == lyrics
        assert song.caption is not None
        assert song.caption.startswith("<b>Tags</b> synthpop, female vocals\n")

        # Lyrics may also come from the message the command replies to.
        held = h.fake.send_text(PRIVATE, ANN, "line one\nline two")
        h.fake.send_text(PRIVATE, ANN, "/compose rock duration=5", reply_to=held)
        await h.song_message(PRIVATE, 2)
        assert h.submitted()[1]["lyrics"] == "line one\nline two"


async def test_group_command_addressed_to_the_bot(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        h.fake.send_text(GROUP, BOB, "/song@SomeOtherBot not for us")
        request_id = h.fake.send_text(GROUP, BOB, "/song@AceStepBot group anthem duration=5")
        song = await h.song_message(GROUP)
        assert song.reply_to == request_id
        assert [b["prompt"] for b in h.submitted()] == ["group anthem"]
        job = await h.engine.get_job(song.button_data()[0].split(":")[1])
        assert job is not None and job.requester.community_key == f"telegram:{GROUP}"

        # In a forum topic every message stays in the topic.
        topic_request = h.fake.send_text(
            FORUM, BOB, "/song@AceStepBot topic tune duration=5", thread_id=77
        )
        topic_song = await h.song_message(FORUM)
        assert topic_song.thread_id == 77 and topic_song.reply_to == topic_request
        assert all(m.thread_id == 77 for m in h.fake.bot_messages(FORUM))
        assert all(
            c.params.get("message_thread_id") == 77
            for c in h.fake.calls_of("sendChatAction")
            if c.params["chat_id"] == FORUM
        )


async def test_new_take_and_lyrics_buttons(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        h.fake.send_text(PRIVATE, ANN, "/song rainy day duration=5 seed=11")
        first = await h.song_message(PRIVATE)
        new_data, same_data, lyrics_data, *_rest = first.button_data()

        h.fake.press(PRIVATE, first.message_id, ANN, lyrics_data)
        lyrics = await h.reply_to(PRIVATE, first.message_id)
        # What fal wrote for the prompt, under a title.
        assert lyrics.text == "<b>Lyrics: Rainy day</b>\n[verse]\nrainy day"
        assert h.fake.calls_of("answerCallbackQuery")

        h.fake.press(PRIVATE, first.message_id, ANN, new_data)
        second = await h.song_message(PRIVATE, 2)
        assert second.reply_to == first.message_id
        first_body, second_body = h.submitted()
        assert second_body["prompt"] == first_body["prompt"] == "rainy day"
        assert second_body["duration"] == 5
        assert first_body["seed"] == 11 and second_body["seed"] != 11
        assert f"<code>{second_body['seed']}</code>" in (second.caption or "")

        # Same seed makes the first song again.
        h.fake.press(PRIVATE, first.message_id, ANN, same_data)
        await h.song_message(PRIVATE, 3)
        assert h.submitted()[2]["seed"] == 11


async def test_cancel_button_and_information_commands(tmp_path: Path) -> None:
    fal = FakeFal(queue_polls=0, progress_polls=10_000)  # runs until cancelled
    async with running_bot(tmp_path, fal) as h:
        h.fake.send_text(PRIVATE, ANN, "/song endless jam duration=5")
        status = await h.fake.wait_for(
            lambda: next(
                (m for m in h.fake.bot_messages(PRIVATE) if "cancel:" in str(m.reply_markup)),
                None,
            )
        )
        job_id = status.button_data()[0].split(":")[1]

        queue = h.fake.send_text(PRIVATE, ANN, "/queue")
        assert job_id in (await h.reply_to(PRIVATE, queue)).text

        h.fake.send_text(PRIVATE, BOB, f"/cancel {job_id}")  # not Bob's song
        await h.fake.wait_for(
            lambda: any("only cancel your own" in m.text for m in h.fake.bot_messages(PRIVATE))
        )

        # (`cxl:` is what buttons posted by older versions carry: still understood.)
        h.fake.press(PRIVATE, status.message_id, BOB, f"cxl:{job_id}")
        refused = await h.fake.wait_for(
            lambda: [
                c for c in h.fake.calls_of("answerCallbackQuery") if c.params.get("show_alert")
            ]
        )
        assert refused[0].params["text"] == "You can only cancel your own songs."

        # fal is already making it: first the bot says what a cancel costs.
        h.fake.press(PRIVATE, status.message_id, ANN, f"cancel:{job_id}")
        question = await h.fake.wait_for(
            lambda: next(
                (m for m in h.fake.bot_messages(PRIVATE) if f"stop:{job_id}" in m.button_data()),
                None,
            )
        )
        assert "It is already being made: cancelling will not give your quota back." in (
            question.text
        )
        h.fake.press(PRIVATE, question.message_id, ANN, f"stop:{job_id}")
        final = await h.final_text(status)
        assert (
            "Cancelled. It still counts against your quota, because the music service made it."
            in final
        )
        assert not status.reply_markup  # nothing to retry after a cancel
        assert h.fal.cancels
        job = await h.engine.get_job(job_id)
        assert job is not None and job.state == "cancelled"
        assert job.charged_usd == pytest.approx(h.fal.billed_usd())

        quota = h.fake.send_text(PRIVATE, ANN, "/quota")
        text = (await h.reply_to(PRIVATE, quota)).text
        assert "<b>Songs today</b>: 1 of 20 songs used, 19 left" in text  # kept

        history = h.fake.send_text(PRIVATE, ANN, "/history")
        assert "not made any songs yet" in (await h.reply_to(PRIVATE, history)).text


async def test_group_admins_set_the_group_limits(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        h.fake.admins[GROUP] = {ANN["id"]}
        denied = h.fake.send_text(GROUP, BOB, "/limits seconds_per_day=60")
        assert "administrators" in (await h.reply_to(GROUP, denied)).text
        assert await h.engine.get_limits("community", f"telegram:{GROUP}") == {}

        granted = h.fake.send_text(GROUP, ANN, "/limits seconds_per_day=60")
        assert "<code>seconds_per_day</code> = 60" in (await h.reply_to(GROUP, granted)).text
        assert await h.engine.get_limits("community", f"telegram:{GROUP}") == {
            "seconds_per_day": 60.0
        }

        # The group's limit now refuses a song longer than what is left.
        song = h.fake.send_text(GROUP, BOB, "/song too long duration=90")
        refusal = await h.final_text(await h.reply_to(GROUP, song))
        assert "This community has 60 s of its 60 s daily audio left" in refusal
        assert h.fal.submit_count == 0

        unknown = h.fake.send_text(GROUP, ANN, "/limits jobs=3")
        assert "seconds_per_day" in (await h.reply_to(GROUP, unknown)).text


async def test_buttons_work_after_a_restart(tmp_path: Path) -> None:
    fake = FakeTelegram()
    async with running_bot(tmp_path, fake=fake) as h:
        h.fake.send_text(PRIVATE, ANN, "/song before restart duration=5")
        song = await h.song_message(PRIVATE)
    # A new process: new front-end and engine on the same database and chat history.
    async with running_bot(tmp_path, fake=fake) as h2:
        h2.fake.press(PRIVATE, song.message_id, ANN, song.button_data()[2])
        reply = await h2.reply_to(PRIVATE, song.message_id)
        assert reply.text == "<b>Lyrics: Before restart</b>\n[verse]\nbefore restart"


# python-telegram-bot itself reads the deprecated int `retry_after` when it builds the error.
@pytest.mark.filterwarnings("ignore:.*retry_after.*")
async def test_flood_control_is_waited_out_and_nothing_is_lost(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        h.fake.fail_next("sendAudio", retry_after=3)
        h.fake.fail_next("sendMessage", retry_after=2)
        h.fake.fail_next("editMessageText", retry_after=1, times=2)
        h.fake.send_text(PRIVATE, ANN, "/song flood test duration=5")
        song = await h.song_message(PRIVATE)
        assert decode_mp3(song.files["audio"].data)[0] == "mp3"
        status = next(m for m in h.fake.sent if m.kind == "text")
        await h.fake.wait_for(lambda: status.deleted)
        refused = [c.method for c in h.fake.calls if c.answered_status == 429]
        assert sorted(refused) == ["editMessageText", "editMessageText", "sendAudio", "sendMessage"]
        assert sorted(h.sleeps) == [1, 1, 2, 3]
        assert len(h.fake.calls_of("sendAudio")) == 1  # sent once, not twice


async def test_two_users_run_concurrently(tmp_path: Path) -> None:
    fal = FakeFal(queue_polls=0, progress_polls=10_000)  # both run until released
    async with running_bot(tmp_path, fal) as h:
        # Ann's chat answers slowly: neither her song nor Bob's waits for it.
        slow = h.fake.hold("sendMessage", chat_id=PRIVATE)
        h.fake.send_text(PRIVATE, ANN, "/song ann's song duration=5")
        h.fake.send_text(BOB["id"], BOB, "/song bob's song duration=5")
        # Both songs are generating at the fake provider at the same time.
        await h.fake.wait_for(
            lambda: (
                (h.fal.submit_count == 2 and all(r.polls > 0 for r in h.fal.requests.values()))
                or None
            )
        )
        assert sorted(b["prompt"] for b in h.submitted()) == ["ann's song", "bob's song"]
        assert all(r.polls > 0 and not r.cancelled for r in h.fal.requests.values())
        h.fal.progress_polls = 1
        await h.song_message(BOB["id"])  # while Ann's chat still holds its status message
        slow.set()
        await h.song_message(PRIVATE)


async def test_status_edits_are_throttled_and_the_final_text_is_shown(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        bot = h.frontend.app.bot
        status = await bot.send_message(PRIVATE, "starting")
        target = {"chat_id": PRIVATE, "status_message_id": status.message_id}
        board = h.frontend.board
        board.interval = 0.3

        def view(text: str, rank: int, final: bool = False) -> StatusView:
            return StatusView("abcd0001", Text.of(text), rank=rank, final=final)

        loop = asyncio.get_running_loop()
        began = loop.time()
        for i in range(30):
            board.show(target, view(f"step {i}", 3))
            await asyncio.sleep(0.02)
        message = h.fake.messages[(PRIVATE, status.message_id)]
        await h.fake.wait_for(lambda: message.text == "step 29")
        elapsed = loop.time() - began
        # 30 updates over at least 0.6 s: an edit at most every 0.3 s (the first at once),
        # and the latest text wins.
        edits = len(h.fake.calls_of("editMessageText"))
        assert 2 <= edits <= 1 + elapsed / 0.3
        assert edits < 30
        board.show(target, view("back to queue", 0))
        assert await board.finish(target, view("all done", FINAL_RANK, final=True))
        assert message.text == "all done"
        board.show(target, view("late progress", 3))
        await asyncio.sleep(0.4)
        assert message.text == "all done" and "back to queue" not in message.texts


async def test_a_song_finished_while_the_bot_was_down_reaches_its_chat(tmp_path: Path) -> None:
    fal = FakeFal(queue_polls=0, progress_polls=10_000)
    fake = FakeTelegram()
    async with fal.running() as fal_url:
        async with running_bot(tmp_path, fal, fake, fal_url) as h:
            request_id = fake.send_text(
                FORUM, BOB, "/song survives restarts duration=5", thread_id=9
            )
            status = await fake.wait_for(
                lambda: next((m for m in fake.bot_messages(FORUM) if "Generating" in m.text), None)
            )
            await h.engine.abort()  # the process dies mid-generation
        fal.progress_polls = 1  # fal finishes while the bot is down
        async with running_bot(tmp_path, fal, fake, fal_url) as h2:
            song = await h2.song_message(FORUM)
            assert song.reply_to == request_id and song.thread_id == 9
            await fake.wait_for(lambda: status.deleted)  # one lasting message: the song
    assert fal.submit_count == 1
    assert len(fake.calls_of("sendAudio")) == 1


async def test_the_token_never_reaches_the_logs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Logging as `acestep-bot run` sets it up, at its most verbose.
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    token = FakeTelegram().token
    logs.setup(make_settings(tmp_path, telegram_token=token, log_level="DEBUG"))
    try:
        async with running_bot(tmp_path) as h:
            h.fake.send_text(PRIVATE, ANN, "/song quiet logs duration=5")
            await h.song_message(PRIVATE)
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    err = capsys.readouterr().err
    assert "sendAudio" in err  # the library did log its calls...
    assert "/bot[redacted]" in err  # ...and its base URL, redacted
    assert token not in err and token.split(":")[1] not in err


async def test_webhook_mode_takes_updates_only_with_the_secret(tmp_path: Path) -> None:
    async with running_bot(
        tmp_path,
        telegram_webhook_url="https://bot.example.org/tg/hook",
        telegram_webhook_listen="127.0.0.1:0",
    ) as h:
        assert h.fake.webhook is not None
        assert h.fake.webhook["url"] == "https://bot.example.org/tg/hook"
        secret = h.fake.webhook["secret_token"]
        assert secret and h.fake.token not in secret
        assert h.frontend.webhook is not None and h.frontend.is_connected
        hook = f"http://127.0.0.1:{h.frontend.webhook.bound_port}/tg/hook"
        async with httpx.AsyncClient() as client:
            forged = await client.post(
                hook, json=h.fake.message_update(PRIVATE, ANN, "/song forged duration=5")
            )
            assert forged.status_code == 403
            update = h.fake.message_update(PRIVATE, ANN, "/song via webhook duration=5")
            answer = await client.post(
                hook, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": secret}
            )
            assert answer.status_code == 200
        song = await h.song_message(PRIVATE)
        assert song.reply_to == update["message"]["message_id"]
        assert [b["prompt"] for b in h.submitted()] == ["via webhook"]


async def test_a_failure_found_before_the_front_end_started_is_still_told(tmp_path: Path) -> None:
    # Crash recovery may fail a job while the engine starts, before the front-end has.
    fake = FakeTelegram()
    fake.chat(GROUP, "supergroup", "Music club")
    async with serve(fake.app) as url:
        settings = make_settings(tmp_path, telegram_token=fake.token, telegram_api_url=url)
        engine = await Engine.open(settings, [], options=FAST)
        frontend = TelegramFrontend(settings, engine)
        request_id = fake.send_text(GROUP, BOB, "/song lost in a crash")
        job = Job(
            id="0badf00d",
            requester=Requester("telegram", str(BOB["id"]), str(GROUP)),
            reply_target={
                "chat_id": GROUP,
                "thread_id": None,
                "request_message_id": request_id,
                "status_message_id": 999,
            },
            request=GenerationRequest.build(mode="prompt", prompt="lost in a crash"),
            seed=1,
            state=JobState.FAILED,
            failure=FailureKind.INTERNAL,
        )
        try:
            await frontend.on_failed(job, engine.failure_of(job))
        finally:
            await frontend.stop()
            await engine.close()
    told = [m for m in fake.bot_messages(GROUP) if m.kind == "text"]
    assert len(told) == 1 and told[0].reply_to == request_id  # status 999 was gone
    assert "Something went wrong on the bot's side" in told[0].text
    assert "0badf00d" in told[0].text


async def test_an_update_offered_again_is_not_admitted_twice(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        update = h.fake.message_update(PRIVATE, ANN, "/song rain on tin roofs duration=5")
        h.fake.resend(update)
        await h.song_message(PRIVATE)
        # After a crash between fetching and confirming it, the next bot process is
        # offered the same update again: hand it to the application once more.
        app = h.frontend.app
        await app.process_update(Update.de_json(update, app.bot))
        await asyncio.sleep(0.3)
        jobs = await h.engine.store.recent()
        statuses = [m for m in h.fake.sent if m.kind == "text"]
    assert len(jobs) == 1
    assert len(h.submitted()) == 1
    assert len([m for m in h.fake.bot_messages(PRIVATE) if m.kind == "audio"]) == 1
    assert len(statuses) == 1


def _held_admissions(h: Harness) -> asyncio.Event:
    """Hold every /song in admission (storing it) until the event is set."""
    held = asyncio.Event()
    submit = h.engine.submit

    async def slow_submit(*args: Any, **kwargs: Any) -> Any:
        await held.wait()
        return await submit(*args, **kwargs)

    h.engine.submit = slow_submit  # type: ignore[method-assign]
    return held


async def test_a_confirmed_update_stays_kept_until_it_was_handled(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        held = _held_admissions(h)
        update = h.fake.message_update(PRIVATE, ANN, "/song slow start duration=5")
        h.fake.resend(update)
        source = f"telegram:{h.frontend.app.bot.id}"
        try:
            # Polling goes on (Telegram is told the batch arrived)...
            await h.fake.wait_for(
                lambda: max(h.fake.offsets, default=0) > update["update_id"], within=10
            )
            # ...because the update is on disk until its handler has run.
            kept = await h.engine.store.inbox.pending(source)
            assert [uid for uid, _ in kept] == [update["update_id"]]
        finally:
            held.set()
        await h.song_message(PRIVATE)
    async with running_bot(tmp_path, fake=h.fake) as again:
        assert await again.engine.store.inbox.pending(source) == []
        assert len(await again.engine.store.recent()) == 1


async def test_help_is_answered_while_songs_are_still_being_stored(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        held = _held_admissions(h)
        h.fake.send_text(PRIVATE, ANN, "/song stuck in admission duration=5")
        await asyncio.sleep(0.3)  # Ann's update is fetched and its handler is running
        asked = h.fake.send_text(BOB["id"], BOB, "/help")
        try:
            # Waiting for Ann's handler before fetching again held Bob's /help up to 5 s.
            answer = await h.fake.wait_for(
                lambda: next((m for m in h.fake.sent if m.reply_to == asked), None), within=3
            )
        finally:
            held.set()
        assert "/song" in answer.text
        await h.song_message(PRIVATE)


async def test_a_batch_that_cannot_be_kept_is_not_confirmed_and_comes_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_bot(tmp_path) as h:
        keep = h.engine.store.inbox.keep
        refused: list[int] = []

        async def full_disk(source: str, updates: Any, handled: Any = (), **kw: Any) -> None:
            updates = list(updates)
            if updates and not refused:
                refused.append(len(updates))
                raise StorageError("could not save to the database: database or disk is full")
            await keep(source, updates, handled, **kw)

        h.engine.store.inbox.keep = full_disk  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR, logger="acestep.telegram"):
            h.fake.send_text(PRIVATE, ANN, "/song survives a full disk duration=5")
            await h.song_message(PRIVATE)
        jobs = await h.engine.store.recent()
    assert refused == [1]  # the first answer holding it was not handed on...
    assert len(jobs) == 1  # ...so Telegram sent it again, and it was made once
    assert "could not keep received updates" in caplog.text


async def test_updates_a_crashed_bot_kept_are_handled_at_start_once(tmp_path: Path) -> None:
    fake = FakeTelegram()
    confirmed = fake.message_update(PRIVATE, ANN, "/song kept across a crash duration=5")
    offered = fake.message_update(PRIVATE, ANN, "/song kept and offered again duration=5")
    settings = make_settings(tmp_path, telegram_token=fake.token)
    async with open_store(settings) as store:
        # What a crash leaves: a batch kept (so confirmed to Telegram), not handled...
        await store.inbox.keep(
            f"telegram:{BOT_ID}",
            [(u["update_id"], json.dumps(u)) for u in (confirmed, offered)],
        )
    fake.resend(offered)  # ...where the last one was not confirmed yet: Telegram repeats it
    async with running_bot(tmp_path, fake=fake) as h:
        await h.song_message(PRIVATE, count=2)
        await asyncio.sleep(0.3)
        jobs = await h.engine.store.recent()
        statuses = [m for m in h.fake.sent if m.kind == "text"]
        left = await h.engine.store.inbox.pending(f"telegram:{BOT_ID}")
    assert sorted(j.request.prompt for j in jobs) == [
        "kept across a crash",
        "kept and offered again",
    ]
    assert {j.source_key for j in jobs} == {
        f"telegram:{BOT_ID}:{u['update_id']}" for u in (confirmed, offered)
    }
    assert len(h.submitted()) == 2
    assert len(statuses) == 2
    assert left == []


# --- community controls: defaults, ban list, delete, topics, titles --------------------


async def test_settings_defaults_apply_with_their_precedence(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        h.fake.admins[GROUP] = {ANN["id"]}
        denied = h.fake.send_text(GROUP, BOB, "/settings group duration=9")
        assert "administrators" in (await h.reply_to(GROUP, denied)).text
        group = h.fake.send_text(GROUP, ANN, '/settings group duration=9 style="dreamy, lo-fi"')
        shown = (await h.reply_to(GROUP, group)).text
        assert "Duration: <code>9 s</code> (community)" in shown
        assert "Style suffix: <code>dreamy, lo-fi</code> (community)" in shown

        mine = h.fake.send_text(GROUP, BOB, "/settings duration=6 instrumental=on")
        shown = (await h.reply_to(GROUP, mine)).text
        assert "Duration: <code>6 s</code> (yours)" in shown
        assert "Instrumental: <code>yes</code> (yours)" in shown

        h.fake.send_text(GROUP, BOB, "/song rain")
        await h.song_message(GROUP)
        h.fake.send_text(GROUP, ANN, "/song sun")
        await h.song_message(GROUP, 2)
        h.fake.send_text(GROUP, BOB, "/song snow duration=5")
        await h.song_message(GROUP, 3)
        bob, ann, snow = h.submitted()
        assert (bob["duration"], bob["instrumental"], bob["prompt"]) == (
            6,
            True,
            "rain, dreamy, lo-fi",
        )
        assert (ann["duration"], ann["instrumental"]) == (9, False)
        assert snow["duration"] == 5  # the command's own option wins

        bad = h.fake.send_text(PRIVATE, ANN, "/settings duration=999")
        assert (await h.reply_to(PRIVATE, bad)).text.startswith("duration: 999 is not valid")
        reset = h.fake.send_text(GROUP, BOB, "/settings reset=all")
        assert "Duration: <code>9 s</code> (community)" in (await h.reply_to(GROUP, reset)).text
        assert await h.engine.song_defaults("user", f"telegram:{BOB['id']}") == {}


async def test_banlist_refuses_at_admission_and_is_listed_privately(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        h.fake.admins[GROUP] = {ANN["id"]}
        denied = h.fake.send_text(GROUP, BOB, "/banlist add rude")
        assert "administrators" in (await h.reply_to(GROUP, denied)).text
        h.fake.send_text(GROUP, ANN, "/banlist add Rude, very bad")
        # The list goes to the admin's private chat, not to the group.
        listed = await h.fake.wait_for(
            lambda: next((m for m in h.fake.bot_messages(ANN["id"]) if "Banned" in m.text), None)
        )
        assert "Banned: rude, very bad" in listed.text

        refused = h.fake.send_text(GROUP, BOB, "/song a RÜDE song")
        assert (await h.reply_to(GROUP, refused)).text == (
            "I can't make a song from this request here. Please try other words."
        )
        # The bot never repeats the refused words where the group can read them.
        assert not any("rüde" in m.text.lower() for m in h.fake.bot_messages(GROUP))
        # In a private chat the group's list does not apply.
        h.fake.send_text(PRIVATE, ANN, "/song a rude song duration=5")
        await h.song_message(PRIVATE)
        assert [b["prompt"] for b in h.submitted()] == ["a rude song"]
        assert len(await h.engine.store.recent(10)) == 1  # nothing stored for the refusal
        assert 'list="community"} 1.0' in h.engine.metrics.render().decode()


async def test_delete_button_removes_the_posted_song(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        h.fake.admins[GROUP] = {ANN["id"]}
        h.fake.send_text(GROUP, BOB, "/song oops duration=5")
        song = await h.song_message(GROUP)
        job_id = song.button_data()[0].split(":")[1]
        assert list(h.engine.settings.audio_dir.glob(f"{job_id}.*"))

        h.fake.press(GROUP, song.message_id, FakeTelegram.user(44, "Cy"), f"delete:{job_id}")
        answer = await h.fake.wait_call("answerCallbackQuery")
        assert answer[-1].params["text"] == "You can only delete your own songs."
        assert not song.deleted

        h.fake.press(GROUP, song.message_id, ANN, f"delete:{job_id}")  # a group admin
        await h.fake.wait_for(lambda: song.deleted)
        answers = await h.fake.wait_call("answerCallbackQuery", 2)
        assert answers[-1].params["text"] == f"Deleted {job_id} (Oops)."
        assert h.fake.calls_of("deleteMessage")[-1].params["message_id"] == song.message_id
        assert list(h.engine.settings.audio_dir.glob(f"{job_id}.*")) == []
        job = await h.engine.get_job(job_id)
        assert job is not None and job.deleted and job.deleted_by == f"telegram:{ANN['id']}"
        history = h.fake.send_text(GROUP, BOB, "/history")
        assert "deleted" in (await h.reply_to(GROUP, history)).text


async def test_use_these_tags_goes_on_in_song_mode(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        await h.reply_to(PRIVATE, h.fake.send_text(PRIVATE, ANN, "/settings provider=fal"))
        h.fake.send_text(PRIVATE, ANN, "/song salty shanty duration=5")
        song = await h.song_message(PRIVATE)
        tags_button = next(d for d in song.button_data() if d.startswith("tags:"))
        h.fake.press(PRIVATE, song.message_id, ANN, tags_button)
        await h.song_message(PRIVATE, 2)
        described, composed = h.fal.submits
        assert described.path == "/fal-ai/ace-step/prompt-to-audio"
        assert composed.path == "/fal-ai/ace-step"
        assert composed.body["tags"] == "salty, shanty"
        assert composed.body["lyrics"] == "[verse]\nsalty shanty"
        assert composed.body["duration"] == 5


async def test_group_switches_songs_off_and_picks_forum_topics(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        h.fake.admins[GROUP] = {ANN["id"]}
        h.fake.admins[FORUM] = {ANN["id"]}
        off = h.fake.send_text(GROUP, ANN, "/limits songs=off")
        assert "songs <code>off</code>" in (await h.reply_to(GROUP, off)).text
        refused = h.fake.send_text(GROUP, BOB, "/song anything duration=5")
        assert "switched off" in (await h.reply_to(GROUP, refused)).text
        on = h.fake.send_text(GROUP, ANN, "/limits songs=on")
        await h.reply_to(GROUP, on)
        h.fake.send_text(GROUP, BOB, "/song anything duration=5")
        await h.song_message(GROUP)

        # In a forum, songs only in the topics the admins pick, from inside each.
        h.fake.topic(FORUM, 77, "Music")
        here = h.fake.send_text(FORUM, ANN, "/limits topics=here", thread_id=77)
        assert "topics: #Music" in (await h.reply_to(FORUM, here)).text
        elsewhere = h.fake.send_text(FORUM, BOB, "/song chat tune duration=5", thread_id=88)
        assert "I make songs in #Music here." in (await h.reply_to(FORUM, elsewhere)).text
        general = h.fake.send_text(FORUM, BOB, "/song general tune duration=5")
        assert "#Music" in (await h.reply_to(FORUM, general)).text
        h.fake.send_text(FORUM, BOB, "/song topic tune duration=5", thread_id=77)
        await h.song_message(FORUM)
        everywhere = h.fake.send_text(FORUM, ANN, "/limits topics=all")
        assert "topics: all" in (await h.reply_to(FORUM, everywhere)).text
        h.fake.send_text(FORUM, BOB, "/song general tune duration=5")
        await h.song_message(FORUM, 2)
        assert [b["prompt"] for b in h.submitted()] == ["anything", "topic tune", "general tune"]

        outside = h.fake.send_text(GROUP, ANN, "/limits topics=here")
        assert "forum" in (await h.reply_to(GROUP, outside)).text


async def test_title_option_names_the_audio_and_its_file(tmp_path: Path) -> None:
    from mutagen.id3 import ID3
    from PIL import Image

    async with running_bot(tmp_path) as h:
        h.fake.send_text(PRIVATE, ANN, '/song city lights title="Night Drive" duration=5')
        song = await h.song_message(PRIVATE)
        job_id = song.button_data()[0].split(":")[1]
        assert song.params["title"] == "Night Drive"
        audio = song.files["audio"]
        assert audio.filename == f"night-drive-{job_id}.mp3"
        id3 = ID3(io.BytesIO(audio.data))
        assert id3["TIT2"].text == ["Night Drive"]
        assert id3["TALB"].text == [h.frontend.app.bot.first_name]
        with Image.open(io.BytesIO(id3.getall("APIC")[0].data)) as cover:
            assert cover.size == (640, 640)
        with Image.open(io.BytesIO(song.files["thumbnail"].data)) as thumb:
            assert max(thumb.size) <= 320  # Telegram's thumbnail limit


async def test_settings_keyboard_sets_the_pressers_own_defaults(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        asked = h.fake.send_text(PRIVATE, ANN, "/settings")
        panel = await h.reply_to(PRIVATE, asked)
        assert "Instrumental: not set" in panel.text
        assert panel.button_data()[3:5] == ["set:instrumental=no", "set:instrumental=yes"]
        h.fake.press(PRIVATE, panel.message_id, ANN, "set:instrumental=yes")
        await h.fake.wait_for(lambda: "Instrumental: <code>yes</code> (yours)" in panel.text)
        assert panel.button_data()[3] == "set:instrumental=no"  # the keyboard stays
        saved = await h.fake.wait_call("answerCallbackQuery")
        assert saved[-1].params["text"] == "Saved."
        assert await h.engine.song_defaults("user", f"telegram:{ANN['id']}") == {
            "instrumental": True
        }
        # Telegram passes any callback data a client sends: a forged value is refused
        # like a typed one, and changes nothing.
        h.fake.press(PRIVATE, panel.message_id, ANN, "set:duration=999")
        refused = await h.fake.wait_call("answerCallbackQuery", 2)
        assert refused[-1].params["text"].startswith("duration: 999 is not valid")
        h.fake.press(PRIVATE, panel.message_id, ANN, "set:colour=red")
        refused = await h.fake.wait_call("answerCallbackQuery", 3)
        assert refused[-1].params["text"].startswith("setting: 'colour' is not valid")
        assert await h.engine.song_defaults("user", f"telegram:{ANN['id']}") == {
            "instrumental": True
        }
        h.fake.send_text(PRIVATE, ANN, "/song quiet night duration=5")
        await h.song_message(PRIVATE)
        assert h.submitted()[0]["instrumental"] is True


# --- hostile or unusual senders (issue 12) ---------------------------------------------

# Telegram's placeholder user for messages sent on behalf of a chat.
ANONYMOUS = FakeTelegram.user(1087968824, "Group", "GroupAnonymousBot")


async def test_a_button_from_another_chat_does_not_replay_someone_elses_prompt(
    tmp_path: Path,
) -> None:
    async with running_bot(tmp_path) as h:
        h.fake.send_text(PRIVATE, ANN, "/song my secret birthday song duration=5")
        song = await h.song_message(PRIVATE)
        job_id = song.button_data()[0].split(":")[1]
        # Bob presses a forged "new take" of Ann's private song from the group.
        group_message = h.fake.send_text(GROUP, BOB, "hello")
        h.fake.press(GROUP, group_message, BOB, f"new:{job_id}")
        refused = await h.fake.wait_for(
            lambda: [c for c in h.fake.calls_of("answerCallbackQuery") if c.params.get("text")]
        )
        assert "made elsewhere" in refused[-1].params["text"]
        await asyncio.sleep(0.2)
        assert len(h.submitted()) == 1  # nothing was made again
        assert all("birthday" not in m.text for m in h.fake.bot_messages(GROUP))


async def test_anonymous_admins_and_channels_each_get_their_own_quota(tmp_path: Path) -> None:
    async with running_bot(tmp_path, quota_user_jobs_per_day=1) as h:
        group_chat = h.fake.chats[GROUP]
        channel = {"id": -100900, "type": "channel", "title": "Our channel"}
        h.fake.send_text(
            GROUP, ANONYMOUS, "/song from the admins duration=5", sender_chat=group_chat
        )
        await h.song_message(GROUP)
        h.fake.send_text(GROUP, ANONYMOUS, "/song from the channel duration=5", sender_chat=channel)
        await h.song_message(GROUP, 2)
        jobs = await h.engine.store.recent()
        # Two senders with one song each: neither used the other's quota of one.
        assert sorted(j.requester.user_id for j in jobs) == ["-100500", "-100900"]
        assert {j.requester.display_name for j in jobs} == {"Music club", "Our channel"}


@pytest.mark.parametrize("value", ["nan", "inf", "-5", "1e300", "12.5", "7201"])
async def test_limits_take_whole_numbers_up_to_the_operators_default_only(
    tmp_path: Path, value: str
) -> None:
    async with running_bot(tmp_path) as h:
        h.fake.admins[GROUP] = {ANN["id"]}
        asked = h.fake.send_text(GROUP, ANN, f"/limits seconds_per_day={value}")
        reply = (await h.reply_to(GROUP, asked)).text
        assert reply.startswith("seconds_per_day: ")
        assert "a whole number of seconds from 0 to 7200" in reply
        assert "Something went wrong" not in reply
        assert await h.engine.get_limits("community", f"telegram:{GROUP}") == {}
