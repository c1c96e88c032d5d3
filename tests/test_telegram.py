"""The Telegram front-end: the real python-telegram-bot against a fake Bot API server.

Updates reach the bot through long-polled getUpdates; everything the bot sends is read
back from the fake server, as a user would see it. The engine is the real one on a temp
SQLite file, with a small in-test provider that serves a real WAV.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import av
import httpx
import pytest
from bot.engine import Engine

from bot.frontends.telegram_frontend import (
    CLOUD_UPLOAD_BYTES,
    LOCAL_UPLOAD_BYTES,
    TelegramFrontend,
    upload_limit,
)
from bot.frontends.telegram_text import (
    CAPTION_LIMIT,
    caption_html,
    parse_compose,
    parse_song,
    split_message,
)
from bot.requests import ADVANCED_OPTIONS, GenerationRequest, InvalidRequest, Mode
from bot.settings import Settings
from providers.base import Capabilities, Handle, Provider, Result, Running, Status, Succeeded
from tests.fakes.audio import make_wav
from tests.fakes.http import serve
from tests.fakes.telegram_api import FakeMessage, FakeTelegram

PRIVATE = 42
ANN = FakeTelegram.user(42, "Ann", "ann")
BOB = FakeTelegram.user(43, "Bob", "bob")
GROUP = -100500
FORUM = -100600


class ToneProvider(Provider):
    """A provider that makes a short real WAV; records what it was asked for."""

    name = "fal"
    capabilities = Capabilities(modes=frozenset(Mode), options=frozenset(ADVANCED_OPTIONS),
                                concurrency=4)

    def __init__(self, lyrics: str | None = None) -> None:
        super().__init__(httpx.AsyncClient())
        self.requests: list[tuple[GenerationRequest, int]] = []
        self.lyrics = lyrics
        self.gate: asyncio.Event | None = None  # when set, jobs wait for it while running
        self.running = 0
        self.max_running = 0

    async def submit(self, request: GenerationRequest, seed: int) -> Handle:
        self.requests.append((request, seed))
        return Handle(self.name, {"n": len(self.requests) - 1})

    async def poll(self, handle: Handle) -> Status:
        request, seed = self.requests[handle.data["n"]]
        if self.gate is not None and not self.gate.is_set():
            if not handle.data.get("counted"):
                self.running += 1
                self.max_running = max(self.max_running, self.running)
                handle.data["counted"] = True
            return Running(progress=0.5)
        lyrics = request.lyrics or self.lyrics
        return Succeeded(Result(audio_url=f"https://files.invalid/{handle.data['n']}.wav",
                                seed=seed, tags=request.tags or "lofi, piano", lyrics=lyrics,
                                content_type="audio/wav"))

    async def fetch_audio(self, result: Result) -> bytes:
        return make_wav(2.0, sample_rate=24000)

    def poll_interval(self) -> float:
        return 0.01


def make_settings(tmp_path: Path, api_url: str, token: str, **overrides: Any) -> Settings:
    return Settings(_env_file=None, telegram_token=token, telegram_api_url=api_url,  # type: ignore[call-arg]
                    data_dir=tmp_path, providers=["fal"], fal_key="k", **overrides)


def make_engine(settings: Settings, provider: Provider) -> Engine:
    return Engine(settings, None, [provider])


class Harness:
    def __init__(self, fake: FakeTelegram, frontend: TelegramFrontend, engine: Engine,
                 provider: ToneProvider, sleeps: list[float]) -> None:
        self.fake = fake
        self.frontend = frontend
        self.engine = engine
        self.provider = provider
        self.sleeps = sleeps

    async def song_message(self, chat_id: int, count: int = 1) -> FakeMessage:
        """Wait for the `count`-th audio message in a chat."""
        def audios() -> list[FakeMessage]:
            return [m for m in self.fake.bot_messages(chat_id) if m.kind == "audio"]
        found = await self.fake.wait_for(lambda: len(audios()) >= count and audios())
        return found[count - 1]

    async def reply_to(self, chat_id: int, message_id: int) -> FakeMessage:
        """Wait for the bot's text reply to one of the user's messages."""
        return await self.fake.wait_for(lambda: next(
            (m for m in self.fake.bot_messages(chat_id)
             if m.kind == "text" and m.reply_to == message_id), None))


@asynccontextmanager
async def running_bot(tmp_path: Path, provider: ToneProvider | None = None,
                      **overrides: Any) -> AsyncIterator[Harness]:
    fake = FakeTelegram()
    fake.chat(PRIVATE, "private", "Ann")
    fake.chat(GROUP, "supergroup", "Music club")
    fake.chat(FORUM, "supergroup", "Forum", is_forum=True)
    provider = provider or ToneProvider()
    sleeps: list[float] = []

    async def flood_sleep(delay: float) -> None:
        sleeps.append(delay)
        await asyncio.sleep(0.01)

    async with serve(fake.app) as url:
        settings = make_settings(tmp_path, url, fake.token, **overrides)
        engine = make_engine(settings, provider)
        frontend = TelegramFrontend(settings, engine, edit_interval=0.05, action_interval=0.05,
                                    poll_timeout=1, flood_sleep=flood_sleep)
        await engine.start()
        await frontend.start()
        try:
            yield Harness(fake, frontend, engine, provider, sleeps)
        finally:
            await frontend.stop()
            await engine.stop()


def decode_mp3(data: bytes) -> tuple[str, float]:
    """Decode an uploaded file with PyAV: its format name and duration in seconds."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return container.format.name, samples / stream.rate


# --- parsing and text (no network) ---------------------------------------------------

def test_song_options_are_parsed_from_any_position() -> None:
    fields = parse_song(" lofi piano duration=30 about rain seed=7 instrumental steps=40 "
                        "scheduler=heun")
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
    caption = caption_html(text=long_prompt, seed=123, duration=65, provider="fal")
    assert len(caption) <= CAPTION_LIMIT
    assert "<b>&amp;" not in caption and "&lt;b&gt;&amp;amp;" in caption
    assert caption.endswith("<code>123</code> · 1:05 · fal")


def test_split_message_respects_the_limit() -> None:
    text = "\n".join(f"line {i} " + "x" * 50 for i in range(300))
    chunks = split_message(text)
    assert len(chunks) > 1 and all(len(c) <= 4096 for c in chunks)
    assert "\n".join(chunks) == text


def test_upload_limit_depends_on_the_api_server() -> None:
    assert upload_limit("https://api.telegram.org") < CLOUD_UPLOAD_BYTES
    assert upload_limit("https://api.telegram.org/") < CLOUD_UPLOAD_BYTES
    assert CLOUD_UPLOAD_BYTES < upload_limit("http://127.0.0.1:8081") < LOCAL_UPLOAD_BYTES


# --- the bot end to end ----------------------------------------------------------------

async def test_song_goes_from_status_message_to_an_mp3(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        request_id = h.fake.send_text(PRIVATE, ANN, "/song lofi piano <about> rain "
                                                    "duration=10 seed=7")
        song = await h.song_message(PRIVATE)
        assert song.reply_to == request_id
        audio = song.files["audio"]
        assert audio.filename.endswith(".mp3")
        fmt, seconds = decode_mp3(audio.data)
        assert fmt == "mp3" and 1.5 < seconds < 2.5
        assert song.files["thumbnail"].data[:3] == b"\xff\xd8\xff"  # JPEG cover
        assert song.params["title"] == "lofi piano <about> rain"
        assert song.params["performer"] and song.params["duration"] >= 1
        assert song.params["parse_mode"] == "HTML"
        assert song.caption is not None
        assert "lofi piano &lt;about&gt; rain" in song.caption
        assert "<code>7</code>" in song.caption and "fal" in song.caption
        job_id = song.button_data()[0].split(":")[1]
        assert song.button_data()[0] == f"new:{job_id}"
        assert all(len(d.encode()) <= 64 for d in song.button_data())

        status = next(m for m in h.fake.bot_messages(PRIVATE) if m.kind == "text")
        assert status.reply_to == request_id
        await h.fake.wait_for(lambda: "Sent" in status.text)
        assert any("Queued" in t or "Generating" in t for t in status.texts)
        assert job_id in status.text and not status.reply_markup
        assert h.fake.calls_of("sendChatAction")[0].params["action"] == "upload_voice"
        request, seed = h.provider.requests[0]
        assert request.prompt == "lofi piano <about> rain" and seed == 7


@pytest.mark.parametrize("text, named", [
    ("/song rain tempo=fast", "tempo"),
    ("/song rain duration=abc", "duration"),
    ("/song rain duration=999", "duration"),
])
async def test_bad_options_are_answered_without_a_provider_call(
        tmp_path: Path, text: str, named: str) -> None:
    async with running_bot(tmp_path) as h:
        request_id = h.fake.send_text(PRIVATE, ANN, text)
        reply = await h.reply_to(PRIVATE, request_id)
        assert named in reply.text
        assert "Valid options" in reply.text and "duration=5..240" in reply.text
        assert "scheduler=euler|heun" in reply.text
        assert h.provider.requests == []
        assert h.fake.calls_of("sendAudio") == []


async def test_quota_refusal_is_shown_and_nothing_is_generated(tmp_path: Path) -> None:
    async with running_bot(tmp_path, quota_user_jobs_per_day=1) as h:
        h.fake.send_text(PRIVATE, ANN, "/song first song duration=5")
        await h.song_message(PRIVATE)
        second = h.fake.send_text(PRIVATE, ANN, "/song second song duration=5")
        status = await h.reply_to(PRIVATE, second)
        refusal = await h.fake.wait_for(
            lambda: status.text if "Received" not in status.text else None)
        assert "second song" in refusal
        assert "1" in refusal and "day" in refusal.lower()
        assert len(h.provider.requests) == 1
        assert len(h.fake.calls_of("sendAudio")) == 1


async def test_compose_brings_multiline_lyrics_to_the_provider(tmp_path: Path) -> None:
    lyrics = "[verse]\nNeon rain on the window\nA & B <3\n\n[chorus]\nHold on, hold on"
    async with running_bot(tmp_path) as h:
        h.fake.send_text(PRIVATE, ANN, f"/compose synthpop, female vocals duration=8\n{lyrics}")
        song = await h.song_message(PRIVATE)
        request, _ = h.provider.requests[0]
        assert request.mode is Mode.SONG
        assert request.tags == "synthpop, female vocals" and request.duration == 8
        assert request.lyrics == lyrics
        assert song.caption is not None and "synthpop, female vocals" in song.caption

        # Lyrics may also come from the message the command replies to.
        held = h.fake.send_text(PRIVATE, ANN, "line one\nline two")
        h.fake.send_text(PRIVATE, ANN, "/compose rock", reply_to=held)
        await h.song_message(PRIVATE, 2)
        assert h.provider.requests[1][0].lyrics == "line one\nline two"


async def test_group_command_addressed_to_the_bot(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        h.fake.send_text(GROUP, BOB, "/song@SomeOtherBot not for us")
        request_id = h.fake.send_text(GROUP, BOB, "/song@AceStepBot group anthem duration=5")
        song = await h.song_message(GROUP)
        assert song.reply_to == request_id
        assert [r.prompt for r, _ in h.provider.requests] == ["group anthem"]

        # In a forum topic every message stays in the topic.
        topic_request = h.fake.send_text(FORUM, BOB, "/song@AceStepBot topic tune duration=5",
                                         thread_id=77)
        topic_song = await h.song_message(FORUM)
        assert topic_song.thread_id == 77 and topic_song.reply_to == topic_request
        assert all(m.thread_id == 77 for m in h.fake.bot_messages(FORUM))


async def test_new_take_and_lyrics_buttons(tmp_path: Path) -> None:
    long_lyrics = "\n".join(f"line {i}: " + "la " * 30 for i in range(60))  # > 4096 chars
    async with running_bot(tmp_path, ToneProvider(lyrics=long_lyrics)) as h:
        h.fake.send_text(PRIVATE, ANN, "/song rainy day duration=5 seed=11")
        first = await h.song_message(PRIVATE)
        new_data, lyrics_data = first.button_data()
        assert lyrics_data.startswith("lyr:")

        h.fake.press(PRIVATE, first.message_id, ANN, lyrics_data)
        parts = await h.fake.wait_for(lambda: [
            m for m in h.fake.bot_messages(PRIVATE)
            if m.kind == "text" and m.reply_to == first.message_id] or None)
        await h.fake.wait_for(lambda: len(h.fake.calls_of("sendMessage")) >= 3)
        parts = [m for m in h.fake.bot_messages(PRIVATE)
                 if m.kind == "text" and m.reply_to == first.message_id]
        assert len(parts) == 2 and all(len(p.text) <= 4096 for p in parts)
        assert "\n".join(p.text for p in parts) == long_lyrics

        h.fake.press(PRIVATE, first.message_id, ANN, new_data)
        second = await h.song_message(PRIVATE, 2)
        assert second.reply_to == first.message_id
        (req1, seed1), (req2, seed2) = h.provider.requests
        assert req2.prompt == req1.prompt and req2.duration == 5
        assert seed1 == 11 and seed2 != 11
        assert f"<code>{seed2}</code>" in (second.caption or "")


async def test_buttons_work_after_a_restart(tmp_path: Path) -> None:
    async with running_bot(tmp_path, ToneProvider(lyrics="[verse]\nstill here")) as h:
        h.fake.send_text(PRIVATE, ANN, "/song before restart duration=5")
        song = await h.song_message(PRIVATE)
        fake = h.fake
    async with running_bot(tmp_path) as h2:
        h2.fake.chats.update(fake.chats)
        h2.fake.messages.update(fake.messages)
        h2.fake.press(PRIVATE, song.message_id, ANN, song.button_data()[1])
        reply = await h2.fake.wait_for(lambda: next(
            (m for m in h2.fake.bot_messages(PRIVATE) if m.text == "[verse]\nstill here"), None))
        assert reply.reply_to == song.message_id


async def test_flood_control_is_waited_out_and_nothing_is_lost(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        h.fake.fail_next("sendAudio", retry_after=3)
        h.fake.fail_next("sendMessage", retry_after=2)
        h.fake.fail_next("editMessageText", retry_after=1, times=2)
        h.fake.send_text(PRIVATE, ANN, "/song flood test duration=5")
        song = await h.song_message(PRIVATE)
        assert decode_mp3(song.files["audio"].data)[0] == "mp3"
        status = next(m for m in h.fake.bot_messages(PRIVATE) if m.kind == "text")
        await h.fake.wait_for(lambda: "Sent" in status.text)
        refused = [c.method for c in h.fake.calls if c.answered_status == 429]
        assert sorted(refused) == ["editMessageText", "editMessageText", "sendAudio",
                                   "sendMessage"]
        assert sorted(h.sleeps) == [1, 1, 2, 3]


async def test_two_users_run_concurrently(tmp_path: Path) -> None:
    provider = ToneProvider()
    provider.gate = asyncio.Event()
    async with running_bot(tmp_path, provider) as h:
        # Ann's chat answers slowly; Bob must not wait behind her.
        slow = h.fake.hold("sendMessage", chat_id=PRIVATE)
        h.fake.chat(BOB["id"], "private", "Bob")
        h.fake.send_text(PRIVATE, ANN, "/song ann's song duration=5")
        h.fake.send_text(BOB["id"], BOB, "/song bob's song duration=5")
        await h.fake.wait_for(lambda: len(h.provider.requests) == 1)
        assert h.provider.requests[0][0].prompt == "bob's song"
        slow.set()
        # Both jobs are now inside the provider at the same time.
        await h.fake.wait_for(lambda: h.provider.running == 2 or None, within=10)
        provider.gate.set()
        await h.song_message(PRIVATE)
        await h.song_message(BOB["id"])
        assert h.provider.max_running == 2


async def test_status_edits_are_throttled_and_the_final_text_is_shown(
        tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        bot = h.frontend.app.bot
        status = await bot.send_message(PRIVATE, "starting")
        board = h.frontend.status
        board.interval = 0.3
        for i in range(30):
            board.show("abcd0001", PRIVATE, status.message_id, f"step {i}", "running")
            await asyncio.sleep(0.02)
        message = h.fake.messages[(PRIVATE, status.message_id)]
        await h.fake.wait_for(lambda: message.text == "step 29")
        # 30 updates over ~0.6 s: an edit at most every 0.3 s, the latest text wins.
        assert 2 <= len(h.fake.calls_of("editMessageText")) <= 4
        board.show("abcd0001", PRIVATE, status.message_id, "back to queue", "queued")
        assert await board.finish("abcd0001", PRIVATE, status.message_id, "all done")
        assert message.text == "all done"
        board.show("abcd0001", PRIVATE, status.message_id, "late progress", "running")
        await asyncio.sleep(0.4)
        assert message.text == "all done" and "back to queue" not in message.texts
