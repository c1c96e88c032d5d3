"""Discord: /extend, /remix, /repaint with an attachment or a posted song's job id, and
takes on /song, with the real discord.py against the fake Discord API and the fake fal
(its edit endpoints and storage upload)."""

from __future__ import annotations

import pytest

from bot import messages
from tests.fakes.audio import make_wav
from tests.test_discord import Bot, bot, ephemeral_texts, job_id_in, servers  # noqa: F401


async def test_extend_an_attached_file_posts_the_longer_song(bot: Bot) -> None:  # noqa: F811
    fake = bot.fake
    payload = fake.slash_with_file(
        "extend",
        {"after": 4, "tags": "lofi, piano"},
        base_url=bot.frontend.settings.discord_api_url.removesuffix("/api/v10"),
        data=make_wav(8),
        filename="mine.wav",
        content_type="audio/wav",
    )
    await bot.feed(payload)
    song, job_id = await bot.posted(payload)
    assert bot.fal.submits[0].path == "/fal-ai/ace-step/audio-outpaint"
    assert len(fake.downloads) == 1
    job = await bot.engine.get_job(job_id)
    assert job is not None and job.duration == 12
    embed_text = str(song.embeds[0])
    assert "extended from your file \u201cmine.wav\u201d" in embed_text


async def test_remix_a_posted_song_by_its_job_id(bot: Bot) -> None:  # noqa: F811
    first = bot.fake.slash("song", {"prompt": "lofi piano about rain", "duration": 6})
    await bot.feed(first)
    _, first_id = await bot.posted(first)
    payload = bot.fake.slash("remix", {"song": first_id, "tags": "jazz, upright bass"})
    await bot.feed(payload)
    song, _ = await bot.posted(payload)
    assert bot.fal.submits[1].path == "/fal-ai/ace-step/audio-to-audio"
    assert f"(job {first_id})" in str(song.embeds[0])
    assert bot.fake.downloads == []


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"song": "deadbeef", "tags": "jazz"}, messages.SOURCE_NO_SUCH_SONG),
        ({"tags": "jazz"}, "Attach an audio file (audio:)"),
    ],
    ids=["forged-job", "no-source"],
)
async def test_a_bad_source_is_one_ephemeral_line(
    bot: Bot,  # noqa: F811
    options: dict[str, str],
    expected: str,
) -> None:
    payload = bot.fake.slash("remix", options)
    await bot.feed(payload)
    [said] = ephemeral_texts(bot, payload)
    assert expected in said
    assert bot.fal.submits == [] and await bot.engine.store.recent(10) == []


async def test_an_attachment_over_the_cap_is_refused_before_download(bot: Bot) -> None:  # noqa: F811
    payload = bot.fake.slash_with_file(
        "remix",
        {"tags": "jazz"},
        base_url=bot.frontend.settings.discord_api_url.removesuffix("/api/v10"),
        data=make_wav(8),
        declared_size=50 * 1024 * 1024,
    )
    await bot.feed(payload)
    [said] = ephemeral_texts(bot, payload)
    assert "files up to 20 MB are allowed" in said
    assert bot.fake.downloads == [] and bot.fal.submits == []


async def test_takes_on_song_make_two_songs(bot: Bot) -> None:  # noqa: F811
    payload = bot.fake.slash("song", {"prompt": "lofi piano", "duration": 6, "takes": 2})
    await bot.feed(payload)
    job_id = job_id_in(bot.original(payload).content)
    job = await bot.engine.get_job(job_id)
    assert job is not None and job.takes == 2 and job.batch_id
    takes = await bot.engine.store.batch(job.batch_id)
    for take in takes:
        await bot.job_state(take.id, "delivered")
    assert len({take.seed for take in takes}) == 2


async def test_the_remix_button_opens_a_prefilled_form_that_makes_the_remix(
    bot: Bot,  # noqa: F811
) -> None:
    fake = bot.fake
    first = fake.slash("song", {"prompt": "lofi piano about rain", "duration": 6})
    await bot.feed(first)
    song, job_id = await bot.posted(first)
    assert f"acestep:remix:{job_id}" in song.custom_ids
    await bot.feed(fake.button(f"acestep:remix:{job_id}", song))
    assert fake.callbacks[-1]["type"] == 9  # a modal
    modal = fake.modals[-1]
    inputs = {c["component"]["custom_id"]: c["component"] for c in modal["components"]}
    assert inputs["tags"]["value"] == "lofi, piano, about, rain"  # from the song
    assert inputs["strength"]["value"] == "0.5"
    submit = fake.modal_submit(
        modal["custom_id"], {"tags": "jazz", "strength": "0.7", "lyrics": ""}
    )
    await bot.feed(submit)
    remix = await bot.song_message(submit)
    assert bot.fal.submits[1].path == "/fal-ai/ace-step/audio-to-audio"
    assert f"(job {job_id})" in str(remix.embeds[0])


async def test_a_form_with_a_bad_number_is_one_line_and_nothing_runs(
    bot: Bot,  # noqa: F811
) -> None:
    fake = bot.fake
    first = fake.slash("song", {"prompt": "lofi piano", "duration": 6})
    await bot.feed(first)
    song, job_id = await bot.posted(first)
    await bot.feed(fake.button(f"acestep:extend:{job_id}", song))
    modal = fake.modals[-1]
    submit = fake.modal_submit(modal["custom_id"], {"after": "lots", "before": "0", "tags": ""})
    await bot.feed(submit)
    [said] = ephemeral_texts(bot, submit)
    assert "after: 'lots' is not valid; a whole number" in said
    assert len(await bot.engine.store.recent(10)) == 1


async def test_remix_this_song_on_a_users_audio_message(bot: Bot) -> None:  # noqa: F811
    fake = bot.fake
    base = bot.frontend.settings.discord_api_url.removesuffix("/api/v10")
    message = fake.user_message_with_file(
        base_url=base, data=make_wav(8), filename="demo.wav", content_type="audio/wav"
    )
    await bot.feed(fake.message_command("Remix this song", message))
    assert fake.callbacks[-1]["type"] == 9  # the remix form
    modal = fake.modals[-1]
    submit = fake.modal_submit(modal["custom_id"], {"tags": "jazz", "strength": "", "lyrics": ""})
    await bot.feed(submit)
    remix = await bot.song_message(submit)
    assert bot.fal.submits[0].path == "/fal-ai/ace-step/audio-to-audio"
    assert "remixed from your file \u201cdemo.wav\u201d" in str(remix.embeds[0])
    assert len(fake.downloads) == 1


async def test_remix_this_song_on_a_message_without_audio_says_so(bot: Bot) -> None:  # noqa: F811
    fake = bot.fake
    base = bot.frontend.settings.discord_api_url.removesuffix("/api/v10")
    message = fake.user_message_with_file(
        base_url=base, data=b"notes", filename="notes.txt", content_type="text/plain"
    )
    payload = fake.message_command("Remix this song", message)
    await bot.feed(payload)
    [said] = ephemeral_texts(bot, payload)
    assert said == "That message has no audio file to remix; use it on a song or an audio file."
    assert bot.fal.submits == []
