"""bot.audio against real codecs: every file here is made in the test and decoded back."""

from __future__ import annotations

import io
import shutil
import tracemalloc
from pathlib import Path

import av
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mutagen.flac import FLAC
from mutagen.id3 import ID3
from mutagen.oggopus import OggOpus
from PIL import Image

from bot import audio
from bot.audio import (
    FORMATS,
    STANDARD_BITRATES,
    AudioError,
    SongTags,
    check_audio,
    choose_bitrate,
    detect_format,
    encode,
    estimate_size,
    render_cover,
)
from bot.engine import Song
from tests.fakes.audio import (
    PROVIDER_CODECS,
    claim_flac_samples,
    claim_wav_frames,
    float_wav,
    make_flac,
    make_wav,
    transcode,
)

MiB = 1024 * 1024
LIMITS = {
    "Discord 10 MiB": 10 * MiB,
    "Discord boosted 25 MiB": 25 * MiB,
    "Telegram 50 MB": 50_000_000,
}

TAGS = SongTags(
    title="Café au lait, 雨の歌 (rain song)",
    lyrics="[verse]\nrain on the window\n[chorus]\nla la la",
    prompt="lofi piano about rain",
    tags="lofi, piano, 80 bpm",
    seed=1234567,
    provider="fal",
    job_id="job-42",
    genre="lofi, piano",
    date="2026-11-30",
)


def container_of(kind: str) -> str:
    return PROVIDER_CODECS[kind][0]


@pytest.fixture(scope="module")
def wav5() -> bytes:
    return make_wav(5)


@pytest.fixture(scope="module")
def song5(tmp_path_factory: pytest.TempPathFactory, wav5: bytes) -> Path:
    path = tmp_path_factory.mktemp("src") / "song5.wav"
    path.write_bytes(wav5)
    return path


@pytest.fixture(scope="module")
def song240(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("src") / "song240.wav"
    path.write_bytes(make_wav(240))
    return path


@pytest.fixture(scope="module")
def cover5(song5: Path) -> bytes:
    return render_cover(song5)


def decoded_layout(path: Path) -> tuple[int, int, str]:
    """Sample rate, channels and codec of a written file, as FFmpeg reads it."""
    with av.open(str(path)) as container:
        ctx = container.streams.audio[0].codec_context
        return ctx.sample_rate, ctx.channels, ctx.name


# --- detection and checking of what providers return ---------------------------------


@pytest.mark.parametrize("kind", sorted(PROVIDER_CODECS))
def test_provider_formats_are_detected_and_decoded(wav5: bytes, kind: str) -> None:
    data = transcode(wav5, kind)
    assert detect_format(data) == container_of(kind)
    info = check_audio(data, expected_duration=5)
    assert info.format == container_of(kind)
    assert info.duration == pytest.approx(5, abs=0.1)
    assert (info.sample_rate, info.channels) == (48000, 2)


def test_wav_is_detected_and_measured_exactly(wav5: bytes) -> None:
    assert detect_format(wav5) == "wav"
    info = check_audio(wav5, expected_duration=5)
    assert info == audio.AudioInfo(format="wav", duration=5.0, sample_rate=48000, channels=2)


def test_check_accepts_a_path(song5: Path) -> None:
    assert check_audio(song5, 5).duration == 5.0


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello world" * 100,
        b"<html><body><h1>502 Bad Gateway</h1></body></html>",
        b'{"detail": "Internal Server Error"}',
        b"RIFF\x24\x00\x00\x00WAVEjunkjunkjunkjunk" + bytes(200),
        b"ID3\x04\x00\x00\x00\x00\x00\x10" + bytes(16) + b"not an mp3 frame" * 50,
        b"\xff\xfb\x90\x00" + b"\x00" * 10,  # one plausible MP3 header, nothing behind it
    ],
    ids=[
        "empty",
        "text",
        "html-error-page",
        "json-error",
        "fake-riff",
        "id3-then-junk",
        "lone-mp3-header",
    ],
)
def test_garbage_is_rejected_as_not_audio(data: bytes) -> None:
    with pytest.raises(AudioError) as exc:
        check_audio(data, expected_duration=60)
    assert str(exc.value) == "The provider returned a file that is not audio."


@pytest.mark.parametrize("as_path", [False, True])
def test_mp3_behind_a_large_id3_picture_is_found(
    tmp_path: Path, song5: Path, as_path: bool
) -> None:
    big_picture = bytes(range(256)) * 600  # 150 kB: past any fixed-size header read
    tagged = encode(song5, tmp_path / "tagged.mp3", tags=TAGS, cover=big_picture).path
    data = tagged.read_bytes()
    assert data[:3] == b"ID3" and len(data) > 150_000
    assert detect_format(data) == "mp3"
    assert check_audio(tagged if as_path else data, 5).format == "mp3"


def test_a_jpeg_image_is_not_audio(cover5: bytes) -> None:
    assert detect_format(cover5) is None
    with pytest.raises(AudioError, match="not audio"):
        check_audio(cover5, None)


@pytest.mark.parametrize("kind", ["wav", "mp3", "ogg-opus"])
def test_silence_is_rejected(kind: str) -> None:
    data = make_wav(5, silent=True)
    if kind != "wav":
        data = transcode(data, kind)
    with pytest.raises(AudioError) as exc:
        check_audio(data, expected_duration=5)
    assert str(exc.value) == "The provider returned silent audio."


def test_wrong_duration_is_rejected_with_both_lengths() -> None:
    with pytest.raises(AudioError) as exc:
        check_audio(make_wav(31), expected_duration=60)
    assert str(exc.value) == "The provider returned 31.0 s of audio instead of 60 s."


@pytest.mark.parametrize(
    ("actual", "ok"), [(54.5, True), (65.5, True), (53.5, False), (66.5, False)]
)
def test_duration_tolerance_is_ten_percent(actual: float, ok: bool) -> None:
    data = make_wav(actual, sample_rate=8000, channels=1)
    if ok:
        assert check_audio(data, 60).duration == pytest.approx(actual)
    else:
        with pytest.raises(AudioError, match=r"instead of 60 s\."):
            check_audio(data, 60)


def test_a_truncated_download_is_caught_by_its_length(wav5: bytes) -> None:
    # The RIFF header still promises 5 s, but the connection dropped halfway.
    with pytest.raises(AudioError, match=r"^The provider returned 2\.\d s of audio instead"):
        check_audio(wav5[: len(wav5) // 2], 5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_any_bytes_end_in_audio_info_or_audio_error(data: bytes) -> None:
    try:
        check_audio(data, 10)
    except AudioError as exc:
        assert str(exc).startswith("The provider returned")


@settings(max_examples=40, deadline=None)
@given(
    prefix=st.sampled_from([b"RIFF", b"OggS", b"fLaC", b"ID3", b"\xff\xfb"]),
    rest=st.binary(max_size=2048),
)
def test_magic_bytes_followed_by_junk_raise_audio_error(prefix: bytes, rest: bytes) -> None:
    with pytest.raises(AudioError):
        check_audio(prefix + rest, 10)


# --- encoding and the fit rule ---------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_encode_writes_the_format_the_suffix_names(
    tmp_path: Path, song5: Path, fmt: str, cover5: bytes
) -> None:
    original = song5.read_bytes()
    result = encode(song5, tmp_path / f"song.{fmt}", tags=TAGS, cover=cover5)
    assert result.path == tmp_path / f"song.{fmt}"
    assert result.format == fmt
    assert result.size == result.path.stat().st_size
    assert result.duration == pytest.approx(5.0)
    data = result.path.read_bytes()
    assert detect_format(data) == fmt
    assert check_audio(data, 5).duration == pytest.approx(5, abs=0.06)
    assert decoded_layout(result.path)[:2] == (48000, 2)
    assert song5.read_bytes() == original  # the original stays as it was
    assert [p.name for p in tmp_path.iterdir()] == [f"song.{fmt}"]  # no part file left


@pytest.mark.parametrize("kind", sorted(set(PROVIDER_CODECS) - {"mp3"}))  # MP3: passed through
def test_every_provider_format_becomes_a_192k_mp3(tmp_path: Path, wav5: bytes, kind: str) -> None:
    src = tmp_path / f"original.{container_of(kind)}"
    src.write_bytes(transcode(wav5, kind))
    result = encode(src, tmp_path / "song.mp3")
    assert result.bitrate == 192
    assert check_audio(result.path.read_bytes(), 5).format == "mp3"
    assert decoded_layout(result.path) == (48000, 2, "mp3float")
    # 192 kbps CBR: 24 kB per second, give or take the encoder's delay frames.
    assert result.size == pytest.approx(5 * 24_000, rel=0.03)


def test_mono_44k_input_is_delivered_as_48k_stereo(tmp_path: Path) -> None:
    src = tmp_path / "mono.wav"
    src.write_bytes(make_wav(3, sample_rate=44100, channels=1))
    result = encode(src, tmp_path / "song.mp3")
    assert decoded_layout(result.path)[:2] == (48000, 2)
    assert check_audio(result.path.read_bytes(), 3).duration == pytest.approx(3, abs=0.06)


def test_encode_refuses_unknown_suffix_and_overwriting_the_original(
    tmp_path: Path, song5: Path
) -> None:
    with pytest.raises(ValueError, match=r"choose \.mp3, \.wav, \.flac or \.ogg"):
        encode(song5, tmp_path / "song.m4a")
    with pytest.raises(ValueError, match="original"):
        encode(song5, song5)
    assert check_audio(song5, 5).duration == 5.0


def test_encode_rejects_a_source_that_is_not_audio(tmp_path: Path) -> None:
    src = tmp_path / "error.wav"
    src.write_text("<html>Gateway Timeout</html>")
    with pytest.raises(AudioError, match="not audio"):
        encode(src, tmp_path / "song.mp3")
    assert not (tmp_path / "song.mp3").exists()


@pytest.mark.parametrize("limit_name", sorted(LIMITS))
@pytest.mark.parametrize("duration", [5, 60, 240])
@pytest.mark.parametrize("preferred", [320, 192])
def test_chosen_bitrate_is_the_highest_that_fits(
    limit_name: str, duration: int, preferred: int
) -> None:
    limit = LIMITS[limit_name]
    overhead = 60_000  # a cover and a page of lyrics
    rate = choose_bitrate(duration, limit, preferred, overhead=overhead)
    assert rate in STANDARD_BITRATES and rate <= preferred
    assert estimate_size(duration, rate, overhead) <= limit * (1 - audio.SIZE_MARGIN)
    higher = [r for r in STANDARD_BITRATES if rate < r <= preferred]
    if higher:  # the next step up would not have fitted
        assert estimate_size(duration, min(higher), overhead) > limit * (1 - audio.SIZE_MARGIN)


@pytest.mark.parametrize(
    ("duration", "limit", "preferred"),
    [
        (240, 8 * MiB, 320),  # the old Discord limit: a full-length song steps down
        (240, 4 * MiB, 192),
        (600, 10 * MiB, 320),
    ],
)
def test_long_songs_step_down_instead_of_failing(duration: int, limit: int, preferred: int) -> None:
    rate = choose_bitrate(duration, limit, preferred)
    assert rate < preferred
    assert rate * 125 * duration < limit


def test_without_a_limit_the_preferred_rate_is_kept() -> None:
    assert choose_bitrate(240, None) == 192
    assert choose_bitrate(240, None, 320) == 320
    assert choose_bitrate(240, None, 200) == 192  # not a standard rate: next one down


def test_a_song_that_cannot_fit_even_at_32k_is_refused_plainly() -> None:
    with pytest.raises(AudioError) as exc:
        choose_bitrate(240, 500_000)
    assert str(exc.value) == (
        "A 240 s song does not fit the 0.5 MB upload limit here, even at 32 kbps."
    )


@pytest.mark.parametrize("limit_name", sorted(LIMITS))
def test_real_5s_encodes_fit_each_limit(
    tmp_path: Path, song5: Path, cover5: bytes, limit_name: str
) -> None:
    result = encode(
        song5,
        tmp_path / "s.mp3",
        byte_limit=LIMITS[limit_name],
        bitrate=320,
        tags=TAGS,
        cover=cover5,
    )
    assert result.bitrate == 320
    assert result.size <= LIMITS[limit_name]


def test_full_length_song_fits_discord_10_mib_in_bounded_memory(
    tmp_path: Path, song240: Path
) -> None:
    pcm_bytes = 240 * 48000 * 2 * 2  # 46 MB: one copy of the decoded song
    tracemalloc.start()
    try:
        cover = render_cover(song240)
        result = encode(
            song240, tmp_path / "song.mp3", byte_limit=10 * MiB, bitrate=320, tags=TAGS, cover=cover
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < pcm_bytes / 4  # frames stream through; no whole-song array is built
    assert result.path.stat().st_size == result.size <= 10 * MiB
    assert result.bitrate == choose_bitrate(
        240, 10 * MiB, 320, overhead=audio.id3_tag_size(TAGS, cover)
    )
    info = check_audio(result.path.read_bytes(), 240)  # the whole song, not cut
    assert info.duration == pytest.approx(240, abs=0.06)
    assert ID3(result.path).getall("APIC")[0].data == cover


def test_60s_song_under_a_tight_limit_steps_down_and_stays_whole(tmp_path: Path) -> None:
    src = tmp_path / "song60.wav"
    src.write_bytes(make_wav(60))
    result = encode(src, tmp_path / "song.mp3", byte_limit=600_000, bitrate=320)
    assert result.bitrate is not None and result.bitrate <= 96
    assert result.size <= 600_000
    assert check_audio(result.path.read_bytes(), 60).duration == pytest.approx(60, abs=0.06)
    # Still 48 kHz stereo: only the bitrate went down.
    assert decoded_layout(result.path)[:2] == (48000, 2)


def test_an_mp3_over_the_limit_is_encoded_again_one_step_lower(
    tmp_path: Path, song5: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With no margin the estimate says 192 kbps fits exactly; the real file carries LAME's
    # delay and padding frames, so it comes out a little larger and must step down.
    monkeypatch.setattr(audio, "SIZE_MARGIN", 0.0)
    monkeypatch.setattr(audio, "STREAM_SLACK_BYTES", 0)
    limit = estimate_size(5, 192, audio.id3_tag_size(TAGS, None))
    result = encode(song5, tmp_path / "song.mp3", byte_limit=limit, tags=TAGS)
    assert result.bitrate == 160
    assert result.size <= limit
    assert ID3(result.path)["TIT2"].text == [TAGS.title]


def test_ogg_opus_output_also_fits_a_limit(tmp_path: Path, song5: Path) -> None:
    result = encode(song5, tmp_path / "song.ogg", byte_limit=60_000, tags=TAGS)
    assert result.bitrate is not None and result.bitrate < 192
    assert result.size <= 60_000
    assert check_audio(result.path.read_bytes(), 5).format == "ogg"


def test_an_mp3_that_cannot_fit_is_refused_before_encoding(tmp_path: Path, song240: Path) -> None:
    with pytest.raises(AudioError, match=r"^A 240 s song does not fit the 0\.5 MB upload"):
        encode(song240, tmp_path / "song.mp3", byte_limit=500_000)
    assert list(tmp_path.iterdir()) == []


def test_lossless_output_over_the_limit_is_refused(tmp_path: Path, song5: Path) -> None:
    with pytest.raises(AudioError, match=r"^The song comes to 1\.0 MB, over the 0\.5 MB"):
        encode(song5, tmp_path / "song.wav", byte_limit=500_000)
    assert list(tmp_path.iterdir()) == []


# --- tags and cover ------------------------------------------------------------------


def test_mp3_tags_read_back_with_mutagen(tmp_path: Path, song5: Path, cover5: bytes) -> None:
    result = encode(song5, tmp_path / "song.mp3", tags=TAGS, cover=cover5)
    id3 = ID3(result.path)
    assert id3.version[:2] == (2, 3)
    assert id3["TIT2"].text == [TAGS.title]
    assert id3["TPE1"].text == ["ACE-Step"]
    assert id3["TALB"].text == ["acestep-bot"]
    assert id3.getall("USLT")[0].text == TAGS.lyrics
    comment = id3.getall("COMM")[0].text[0]
    for fact in ("lofi piano about rain", "lofi, piano, 80 bpm", "1234567", "fal", "job-42"):
        assert fact in comment
    assert id3.getall("TXXX:SEED")[0].text == ["1234567"]
    # The link back to the job, the genre from the style tags, the day it was made.
    assert id3.getall("TXXX:JOB_ID")[0].text == ["job-42"]
    assert id3["TCON"].text == ["lofi, piano"]
    assert str(id3["TDRC"].text[0]).startswith("2026")
    picture = id3.getall("APIC")[0]
    assert (picture.mime, picture.type, picture.data) == ("image/jpeg", 3, cover5)


def test_flac_and_ogg_carry_vorbis_comments_and_the_cover(
    tmp_path: Path, song5: Path, cover5: bytes
) -> None:
    flac = FLAC(encode(song5, tmp_path / "s.flac", tags=TAGS, cover=cover5).path)
    assert flac["TITLE"] == [TAGS.title]
    assert flac["LYRICS"] == [TAGS.lyrics]
    assert flac["SEED"] == ["1234567"]
    assert flac.pictures[0].data == cover5
    assert (flac.pictures[0].width, flac.pictures[0].height) == (640, 640)
    assert flac["GENRE"] == ["lofi, piano"] and flac["DATE"] == ["2026-11-30"]
    opus = OggOpus(encode(song5, tmp_path / "s.ogg", tags=TAGS, cover=cover5).path)
    assert opus["TITLE"] == [TAGS.title]
    assert opus["ARTIST"] == ["ACE-Step"]
    assert "job-42" in opus["COMMENT"][0]
    assert "METADATA_BLOCK_PICTURE" in opus


async def test_album_is_the_bot_name(tmp_path: Path, song5: Path) -> None:
    # As a front-end renders a finished song: nobody passes an album.
    original = tmp_path / "0badf00d.wav"
    shutil.copyfile(song5, original)
    song = Song(
        job_id="0badf00d",
        title="rain",
        original_path=original,
        duration=5,
        seed=1,
        provider="fal",
        tags="lofi, 80 bpm, female vocals, piano",
        lyrics=None,
        prompt="rain",
        made_at=1_764_547_200.0,  # 2025-12-01 UTC
    )
    rendered = await song.render(None)
    id3 = ID3(rendered.path)
    assert id3["TALB"].text == ["acestep-bot"]
    assert id3["TCON"].text == ["lofi, piano"]  # tempo and vocals are no genre
    assert str(id3["TDRC"].text[0]) == "2025-12-01"
    assert id3.getall("TXXX:JOB_ID")[0].text == ["0badf00d"]
    with Image.open(io.BytesIO(id3.getall("APIC")[0].data)) as cover:
        assert cover.size == (640, 640)


@pytest.mark.parametrize("size", [640, 320, 160])
def test_cover_is_a_small_square_jpeg(song5: Path, size: int) -> None:
    data = render_cover(song5, size)
    assert len(data) < 200 * 1024
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        assert image.size == (size, size)


def test_cover_of_a_full_song_is_600_px_and_its_thumbnail_fits_telegram(song240: Path) -> None:
    data = render_cover(song240, title="Hold on, hold on tonight")
    assert len(data) < 200 * 1024
    assert Image.open(io.BytesIO(data)).size == (640, 640)
    small = audio.thumbnail(data)
    assert len(small) < 200 * 1024
    assert Image.open(io.BytesIO(small)).size == (320, 320)


def test_the_title_is_written_on_the_cover(song5: Path) -> None:
    def bottom(data: bytes) -> list[int]:
        with Image.open(io.BytesIO(data)) as image:
            grey = image.convert("L")
            return [grey.getpixel((x, y)) for y in range(560, 640, 2) for x in range(0, 640, 2)]

    plain, titled = bottom(render_cover(song5)), bottom(render_cover(song5, title="Night Drive"))
    # White letters on a dark band: many pixels near white where there were none.
    assert sum(v > 230 for v in titled) > 200
    assert sum(v > 230 for v in titled) > 5 * sum(v > 230 for v in plain)


def test_the_cover_font_ships_with_a_package_and_skips_what_it_cannot_draw() -> None:
    assert "site-packages" in str(audio._font_path()) or "dist-packages" in str(audio._font_path())
    assert audio.drawable("Café, Ночной дождь, 雨の歌 🌧") == "Café, Ночной дождь,"


def test_cover_is_drawn_from_the_song(tmp_path: Path) -> None:
    low, high = tmp_path / "low.wav", tmp_path / "high.wav"
    low.write_bytes(make_wav(5, freq=110))
    high.write_bytes(make_wav(5, freq=3520))

    def brightest_row(path: Path) -> int:
        with Image.open(io.BytesIO(render_cover(path))) as image:
            grey = image.convert("L")
            # Look at the left edge, outside the loudness veil in the middle.
            column = [grey.getpixel((2, y)) for y in range(grey.height)]
        return max(range(len(column)), key=column.__getitem__)

    # Rows count from the top: the high tone glows nearer the top than the low one.
    assert brightest_row(high) < brightest_row(low) - 40


def test_plain_wav_check_agrees_with_the_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    from bot import audio
    from tests.fakes.audio import make_wav

    data = make_wav(7.5, channels=2)
    fast = audio.check_audio(data, 7.5)
    monkeypatch.setattr(audio, "_check_pcm_wav", lambda *_args: None)
    decoded = audio.check_audio(data, 7.5)
    assert fast == decoded
    assert (fast.format, fast.sample_rate, fast.channels) == ("wav", 48000, 2)
    assert fast.duration == pytest.approx(7.5)


# --- bounded work on provider output (decode bombs, lying headers) ------------------------


class DecodeMeter:
    """Counts the seconds of audio bot.audio decodes (both of its decoding paths)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seconds = 0.0
        frames, blocks = audio._decoded_frames, audio._pcm_blocks

        def counted_frames(container):  # type: ignore[no-untyped-def]
            for frame in frames(container):
                self.seconds += frame.samples / frame.sample_rate
                yield frame

        def counted_blocks(reader):  # type: ignore[no-untyped-def]
            for block in blocks(reader):
                self.seconds += block.size / reader.getnchannels() / reader.getframerate()
                yield block

        monkeypatch.setattr(audio, "_decoded_frames", counted_frames)
        monkeypatch.setattr(audio, "_pcm_blocks", counted_blocks)


def test_decoding_stops_once_the_file_is_longer_than_the_song_could_be(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    meter = DecodeMeter(monkeypatch)
    with pytest.raises(AudioError, match=r"^The provider returned more than 5\.5 s of audio"):
        check_audio(make_flac(600), 5)
    assert meter.seconds < 5.5 + 1  # not the 600 s the file holds


def test_with_the_length_left_to_the_model_decoding_stops_past_240_s(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    meter = DecodeMeter(monkeypatch)
    for data in (make_flac(900), make_wav(900, sample_rate=8000, channels=1)):
        meter.seconds = 0.0
        with pytest.raises(AudioError, match=r"more than 264 s of audio; a song is at most 240 s"):
            check_audio(data, None)
        assert meter.seconds < 264 + 131  # at most one block past the limit, not 900 s
    assert check_audio(make_flac(200), None).duration == pytest.approx(200)


@pytest.mark.parametrize("kind", ["flac", "wav"])
def test_a_header_that_claims_10_hours_is_judged_by_the_6_s_it_holds(
    tmp_path: Path, kind: str
) -> None:
    ten_hours = 10 * 3600 * 8000
    if kind == "flac":
        data = claim_flac_samples(make_flac(6), ten_hours)
    else:
        data = claim_wav_frames(make_wav(6, sample_rate=8000, channels=1), ten_hours)
    info = check_audio(data, 6)
    assert info.duration == pytest.approx(6)
    src = tmp_path / f"original.{kind}"
    src.write_bytes(data)
    # Encoding for a 10 MiB upload limit works from the measured length...
    result = encode(src, tmp_path / "song.mp3", byte_limit=10 * MiB, duration=info.duration)
    assert result.bitrate == 192 and result.duration == pytest.approx(6, abs=0.05)
    # ...and without it, the unbelievable header is not trusted either.
    again = encode(src, tmp_path / "again.mp3", byte_limit=10 * MiB)
    assert again.bitrate == 192


def test_an_all_nan_float_wav_is_silence() -> None:
    import numpy as np

    with pytest.raises(AudioError, match="silent"):
        check_audio(float_wav(np.full(48000 * 2 * 5, np.nan)), 5)
    inf_and_nan = np.tile(np.array([np.inf, -np.inf, np.nan, 0.0]), 48000 * 5 // 2)
    with pytest.raises(AudioError, match="silent"):
        check_audio(float_wav(inf_and_nan), 5)


@pytest.mark.parametrize(("rate", "channels"), [(1, 1), (400_000, 2), (48000, 64)])
def test_impossible_sample_rates_and_channel_counts_are_not_audio(rate: int, channels: int) -> None:
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x10\x20" * channels * 1000)
    with pytest.raises(AudioError, match="not audio"):
        check_audio(buf.getvalue(), None)


def test_the_cover_of_an_overlong_file_is_drawn_from_its_first_minutes_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "long.flac"
    src.write_bytes(make_flac(900))
    meter = DecodeMeter(monkeypatch)
    assert render_cover(src)[:3] == b"\xff\xd8\xff"
    assert meter.seconds < audio.MAX_DECODE_SECONDS + 2


# --- no work the destination does not need -------------------------------------------


def mpeg_frames(data: bytes) -> bytes:
    """An MP3's audio: what lies between a leading ID3v2 tag and a trailing ID3v1 tag."""
    start = audio._id3_end(data)
    end = len(data) - (128 if data[-128:-125] == b"TAG" else 0)
    return data[start:end]


@pytest.fixture
def provider_mp3(tmp_path: Path, wav5: bytes) -> Path:
    """An MP3 as a provider returns it, with its own ID3v2 and ID3v1 tags."""
    from mutagen.id3 import TIT2, TXXX

    path = tmp_path / "original.mp3"
    path.write_bytes(transcode(wav5, "mp3"))
    tag = ID3()
    tag.add(TIT2(encoding=3, text="provider title"))
    tag.add(TXXX(encoding=3, desc="provider", text="internal job 77"))
    tag.save(path, v1=2)
    assert path.read_bytes()[-128:-125] == b"TAG"
    return path


def test_a_provider_mp3_that_fits_is_sent_as_it_is_with_only_its_tags_replaced(
    tmp_path: Path, provider_mp3: Path, cover5: bytes
) -> None:
    original = provider_mp3.read_bytes()
    result = encode(
        provider_mp3,
        tmp_path / "song.mp3",
        byte_limit=10 * MiB,
        tags=TAGS,
        cover=cover5,
        duration=5.0,
    )
    sent = result.path.read_bytes()
    assert mpeg_frames(sent) == mpeg_frames(original)  # not one audio byte re-encoded
    assert result.bitrate == 128 and result.duration == 5.0  # the provider's own 128 kbps
    assert result.size == len(sent) <= 10 * MiB
    tags = ID3(result.path)
    assert tags["TIT2"].text == [TAGS.title]
    assert not [f for f in tags.getall("TXXX") if f.desc == "provider"]
    assert tags.getall("APIC")[0].data == cover5
    assert sent[-128:-125] != b"TAG"  # the provider's ID3v1 is gone too
    assert provider_mp3.read_bytes() == original


def test_a_provider_mp3_over_the_limit_is_encoded_down_to_fit(
    tmp_path: Path, provider_mp3: Path
) -> None:
    limit = provider_mp3.stat().st_size // 2
    result = encode(provider_mp3, tmp_path / "song.mp3", byte_limit=limit, tags=TAGS)
    assert result.size <= limit and result.bitrate is not None and result.bitrate < 128
    assert check_audio(result.path.read_bytes(), 5).duration == pytest.approx(5, abs=0.1)


def test_a_flac_asked_for_as_flac_keeps_its_audio_and_gets_our_tags(
    tmp_path: Path, cover5: bytes
) -> None:
    src = tmp_path / "original.flac"
    src.write_bytes(make_flac(5, sample_rate=44100, channels=1))  # not what we would encode
    theirs = FLAC(src)
    theirs["COMMENT"] = "provider internals"
    theirs.save()
    result = encode(src, tmp_path / "song.flac", tags=TAGS, cover=cover5)
    ours = FLAC(result.path)
    assert ours["TITLE"] == [TAGS.title] and ours["COMMENT"] == [TAGS.comment()]
    assert len(ours.pictures) == 1
    with av.open(str(src)) as a, av.open(str(result.path)) as b:
        assert [bytes(p) for p in a.demux(audio=0)] == [bytes(p) for p in b.demux(audio=0)]
