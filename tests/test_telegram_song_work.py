"""Telegram: /extend, /remix, /repaint on a user's audio or a song the bot posted, and
takes, with the real python-telegram-bot against the fake Bot API (getFile and file
downloads included) and the fake fal (its edit endpoints and storage upload)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bot import messages
from tests.fakes.audio import make_wav
from tests.test_telegram import ANN, PRIVATE, decode_mp3, running_bot


async def jobs(h) -> int:  # type: ignore[no-untyped-def]
    return len(await h.engine.store.recent(100))


async def sources_emptied(tmp_path: Path) -> None:
    """The refused request's source file is removed (right after the refusal is sent)."""
    folder = tmp_path / "data" / "sources"
    for _ in range(200):
        if not list(folder.iterdir()):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"still stored: {list(folder.iterdir())}")


async def test_extend_a_users_audio_posts_the_longer_song_with_its_lineage(
    tmp_path: Path,
) -> None:
    async with running_bot(tmp_path) as h:
        audio_id = h.fake.send_file(
            PRIVATE, ANN, make_wav(8), file_name="mine.wav", mime_type="audio/wav"
        )
        h.fake.send_text(PRIVATE, ANN, "/extend lofi, piano after=4", reply_to=audio_id)
        song = await h.song_message(PRIVATE)
        fmt, seconds = decode_mp3(song.files["audio"].data)
        assert fmt == "mp3" and 11.5 < seconds < 12.5
        assert h.fal.submits[0].path == "/fal-ai/ace-step/audio-outpaint"
        assert h.fake.downloads == [f"music/UF{audio_id}.bin"]
        assert "extended from your file \u201cmine.wav\u201d" in (song.caption or "")


async def test_remix_a_posted_song_names_the_song_it_came_from(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        h.fake.send_text(PRIVATE, ANN, "/song lofi piano about rain duration=6")
        first = await h.song_message(PRIVATE)
        first_job = first.button_data()[0].split(":")[1]
        h.fake.send_text(PRIVATE, ANN, "/remix jazz, upright bass", reply_to=first.message_id)
        second = await h.song_message(PRIVATE, count=2)
        assert h.fal.submits[1].path == "/fal-ai/ace-step/audio-to-audio"
        assert f"(job {first_job})" in (second.caption or "")
        assert "remixed from" in (second.caption or "")
        assert h.fake.downloads == []  # the bot's own song is read from its data dir


async def test_a_file_over_the_cap_is_refused_before_it_is_fetched(tmp_path: Path) -> None:
    async with running_bot(tmp_path, source_max_bytes=100_000) as h:
        audio_id = h.fake.send_file(PRIVATE, ANN, make_wav(8), file_name="big.wav")
        asked = h.fake.send_text(PRIVATE, ANN, "/remix jazz", reply_to=audio_id)
        reply = await h.reply_to(PRIVATE, asked)
        size = messages.source_too_big(len(make_wav(8)), 100_000)
        assert size in reply.text
        assert "0.1 MB" in reply.text
        assert not any(c.method == "getFile" for c in h.fake.calls)
        assert h.fake.downloads == [] and h.fal.submits == []
        assert await jobs(h) == 0


async def test_an_edit_not_in_reply_or_on_a_text_is_told_what_to_do(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        asked = h.fake.send_text(PRIVATE, ANN, "/extend after=10")
        usage = await h.reply_to(PRIVATE, asked)
        assert "Reply with this to a song I posted" in usage.text
        text_id = h.fake.send_text(PRIVATE, ANN, "just words")
        asked = h.fake.send_text(PRIVATE, ANN, "/repaint start=1 end=2", reply_to=text_id)
        refusal = await h.reply_to(PRIVATE, asked)
        assert "that message has no audio" in refusal.text
        # a user's text that is not audio at all
        junk = h.fake.send_file(PRIVATE, ANN, b"plain text, not audio" * 40, kind="document")
        asked = h.fake.send_text(PRIVATE, ANN, "/remix jazz", reply_to=junk)
        assert (await h.reply_to(PRIVATE, asked)).text == messages.SOURCE_NOT_AUDIO
        assert await jobs(h) == 0 and h.fal.submits == []


async def test_a_repaint_window_outside_the_song_is_one_line_and_nothing_runs(
    tmp_path: Path,
) -> None:
    async with running_bot(tmp_path) as h:
        audio_id = h.fake.send_file(PRIVATE, ANN, make_wav(8), kind="voice")
        asked = h.fake.send_text(PRIVATE, ANN, "/repaint lofi start=6 end=20", reply_to=audio_id)
        reply = await h.reply_to(PRIVATE, asked)
        assert "a window inside the song" in reply.text
        assert await jobs(h) == 0 and h.fal.submits == []
        await sources_emptied(tmp_path)  # the file fetched for the refused request goes


async def test_an_edit_over_quota_keeps_nothing(tmp_path: Path) -> None:
    async with running_bot(tmp_path, quota_user_jobs_per_day=0) as h:
        audio_id = h.fake.send_file(PRIVATE, ANN, make_wav(8), file_name="mine.wav")
        asked = h.fake.send_text(PRIVATE, ANN, "/extend lofi after=4", reply_to=audio_id)
        reply = await h.reply_to(PRIVATE, asked)
        assert "songs" in reply.text.lower()
        assert await jobs(h) == 0 and h.fal.submits == []
        await sources_emptied(tmp_path)


async def test_takes_on_song_make_that_many_songs(tmp_path: Path) -> None:
    async with running_bot(tmp_path, quota_user_concurrent_jobs=4) as h:
        h.fake.send_text(PRIVATE, ANN, "/song lofi piano duration=6 takes=2")
        second = await h.song_message(PRIVATE, count=2)
        first = await h.song_message(PRIVATE, count=1)
        seeds = {s.body["seed"] for s in h.fal.submits}
        assert len(seeds) == 2
        notes = sorted([first.caption or "", second.caption or ""])
        assert "take 1 of 2" in notes[0] + notes[1] and "take 2 of 2" in notes[0] + notes[1]


async def test_the_extend_button_gives_the_command_to_send_in_reply(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        h.fake.send_text(PRIVATE, ANN, "/song lofi piano about rain duration=6")
        song = await h.song_message(PRIVATE)
        job_id = song.button_data()[0].split(":")[1]
        assert f"extend:{job_id}" in song.button_data()
        h.fake.press(PRIVATE, song.message_id, ANN, f"extend:{job_id}")
        offer = await h.reply_to(PRIVATE, song.message_id)
        assert "send it as a reply to the song" in offer.text
        assert "<code>/extend after=30 lofi, piano, about, rain</code>" in offer.text
        # the command, sent back in reply to the song, makes the longer song
        h.fake.send_text(PRIVATE, ANN, "/extend after=4 lofi, piano", reply_to=song.message_id)
        longer = await h.song_message(PRIVATE, count=2)
        _, seconds = decode_mp3(longer.files["audio"].data)
        assert 9.5 < seconds < 10.5
        assert f"(job {job_id})" in (longer.caption or "")


async def test_the_edit_button_gives_the_request_with_its_seed(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        h.fake.send_text(PRIVATE, ANN, "/song lofi piano duration=6 seed=77")
        song = await h.song_message(PRIVATE)
        job_id = song.button_data()[0].split(":")[1]
        h.fake.press(PRIVATE, song.message_id, ANN, f"edit:{job_id}")
        offer = await h.reply_to(PRIVATE, song.message_id)
        assert "<code>/song lofi piano duration=6 seed=77</code>" in offer.text


async def test_a_forged_edit_button_changes_nothing(tmp_path: Path) -> None:
    async with running_bot(tmp_path) as h:
        h.fake.send_text(PRIVATE, ANN, "/song lofi piano duration=6")
        song = await h.song_message(PRIVATE)
        h.fake.press(PRIVATE, song.message_id, ANN, "remix:deadbeef")
        answer = await h.fake.wait_for(
            lambda: next(iter(h.fake.calls_of("answerCallbackQuery")), None)
        )
        assert answer.params.get("text") == "I no longer know that song."
        assert len(await h.engine.store.recent(10)) == 1
