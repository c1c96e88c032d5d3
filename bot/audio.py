"""Decode, check, encode, tag and draw cover art for generated songs.

Providers hand back WAV, MP3, FLAC or Ogg. `check_audio` proves the bytes are the song we
asked for (real audio, not silent, the right length); `encode` turns the stored original
into what a chat platform accepts (MP3 that fits its upload limit, tagged, with cover art);
`render_cover` draws that cover from the song itself. Everything streams frame by frame
through PyAV (FFmpeg's codecs), so a 240 s song never sits in memory as one PCM array.

Provider files are untrusted, so the work each one can cause is bounded by what a song
can be, not by what its header claims: decoding stops as soon as a file runs past the
longest song that could be accepted (the expected length plus tolerance, or 240 s plus
tolerance when the model chose the length); sample rates and channel counts outside what
any music file uses are refused before decoding; a file is measured by the samples it
holds, never by the length its header states; NaN or infinite float samples count as
silence. All functions are synchronous and CPU-bound: async callers run them through
bot/render.py, in worker processes.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import io
import itertools
import math
import os
import shutil
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import lameenc
import numpy as np
from mutagen.flac import FLAC, Picture
from mutagen.id3 import APIC, COMM, ID3, TALB, TCON, TDRC, TIT2, TPE1, TXXX, USLT, PictureType
from mutagen.mp3 import MP3
from mutagen.oggopus import OggOpus
from PIL import Image, ImageDraw, ImageFont

FORMATS = ("mp3", "wav", "flac", "ogg")
STANDARD_BITRATES = (320, 256, 224, 192, 160, 128, 112, 96, 80, 64, 48, 32)  # kbps
DEFAULT_BITRATE = 192  # kbps: transparent for most listeners, 5.8 MB for 240 s
SAMPLE_RATE = 48000  # what ACE-Step generates; every output keeps it
CHANNELS = 2

# Share of the upload limit kept free when estimating whether a bitrate fits, plus a fixed
# allowance for what a CBR stream adds beyond bitrate x duration (the Xing/LAME info
# frame, encoder delay and padding frames, frame padding bits).
SIZE_MARGIN = 0.02
STREAM_SLACK_BYTES = 16 * 1024

# Mean level under which a decoded song counts as silence (-60 dBFS RMS): far below any
# real mix, far above the dither and rounding noise a codec leaves in digital silence.
SILENCE_RMS = 10 ** (-60 / 20)
# Share of undecodable packets tolerated before a file counts as damaged: codecs recover
# from a stray bad frame, but a file that is mostly errors is not the song.
MAX_BAD_PACKET_SHARE = 0.01

# The longest song any provider makes (bot.requests.MAX_DURATION), and how far a file may
# stray from the length asked for. Together they bound every decode (see the module doc).
MAX_SONG_SECONDS = 240
DURATION_TOLERANCE = 0.10
# Formats real music comes in; a header outside these is a malformed or hostile file.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 192000
MAX_CHANNELS = 8

MAX_COVER_BYTES = 200 * 1024  # Telegram's thumbnail limit (and plenty for a cover)
COVER_SIZE = 640  # the cover in the file and the Discord embed: at least 600 px
THUMBNAIL_SIZE = 320  # Telegram's thumbnail side limit

NOT_AUDIO = "The provider returned a file that is not audio."
DAMAGED = "The provider returned a damaged audio file."
SILENT = "The provider returned silent audio."

# MP3 goes through lameenc rather than PyAV's libmp3lame: the LAME inside PyAV's wheels is
# built without its optimisations and runs about three times slower than a distribution's.
_ENCODERS = {"wav": "pcm_s16le", "flac": "flac", "ogg": "libopus"}
LAME_QUALITY = 3  # LAME's own default and what ffmpeg uses: good quality, fast
# FFmpeg's native Vorbis encoder is experimental and libvorbis is not in PyAV's build, so
# .ogg output is Opus in Ogg: better quality per bit, and both chat apps play it.
_LOSSY = frozenset({"mp3", "ogg"})


class AudioError(Exception):
    """A song that cannot be delivered; str(e) is a sentence to show the user."""


@dataclass(frozen=True)
class AudioInfo:
    """What a full decode found in an audio file."""

    format: str
    duration: float
    sample_rate: int
    channels: int


@dataclass(frozen=True)
class SongTags:
    """The story a song carries in its tags."""

    title: str
    lyrics: str | None = None
    prompt: str | None = None
    tags: str | None = None
    seed: int | None = None
    provider: str | None = None
    job_id: str | None = None
    artist: str = "ACE-Step"
    album: str = "acestep-bot"
    genre: str | None = None  # from the style tags
    date: str | None = None  # "YYYY-MM-DD", when the song was made
    lineage: str | None = None  # e.g. 'extended from “Rain” (job 1a2b3c4d)' (issue 14)

    def comment(self) -> str:
        """One readable comment with everything needed to reproduce the song."""
        fields = [
            ("Prompt", self.prompt),
            ("Tags", self.tags),
            ("Seed", None if self.seed is None else str(self.seed)),
            ("Provider", self.provider),
            ("Job", self.job_id),
            ("Source", self.lineage),
        ]
        return "\n".join(f"{name}: {value}" for name, value in fields if value)

    def extra(self) -> dict[str, str]:
        """The same facts as separate machine-readable fields."""
        fields = {
            "PROMPT": self.prompt,
            "TAGS": self.tags,
            "SEED": None if self.seed is None else str(self.seed),
            "PROVIDER": self.provider,
            "JOB_ID": self.job_id,
            "SOURCE": self.lineage,
        }
        return {key: value for key, value in fields.items() if value}


@dataclass(frozen=True)
class EncodedAudio:
    """A file written by `encode`."""

    path: Path
    format: str
    bitrate: int | None  # kbps; None for lossless formats
    size: int
    duration: float


# --- format detection --------------------------------------------------------------

_MPEG1_L3_KBPS = (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)
_MPEG2_L3_KBPS = (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)
_MPEG_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
_ID3_SEARCH = 4096  # some taggers leave junk or extra padding between the tag and audio


def _mp3_frame_length(data: bytes, pos: int) -> int | None:
    """Length of the MPEG-1/2/2.5 Layer III frame whose header starts at `pos`, if valid."""
    if pos + 4 > len(data):
        return None
    b1, b2 = data[pos + 1], data[pos + 2]
    if data[pos] != 0xFF or b1 & 0xE0 != 0xE0:
        return None
    version, layer = (b1 >> 3) & 3, (b1 >> 1) & 3
    bitrate_index, rate_index = b2 >> 4, (b2 >> 2) & 3
    # version 1 and rate 3 are reserved; layer 1 is Layer III; free-format bitrate (0)
    # and the invalid index 15 never occur in files a service produces.
    if version == 1 or layer != 1 or rate_index == 3 or bitrate_index in (0, 15):
        return None
    rate = _MPEG_RATES[version][rate_index]
    padding = (b2 >> 1) & 1
    if version == 3:
        return 144_000 * _MPEG1_L3_KBPS[bitrate_index] // rate + padding
    return 72_000 * _MPEG2_L3_KBPS[bitrate_index] // rate + padding


def _mp3_starts_at(data: bytes, pos: int) -> bool:
    """True if an MP3 frame starts at `pos` and, when the bytes go on, another follows."""
    length = _mp3_frame_length(data, pos)
    if length is None:
        return False
    if pos + length + 4 > len(data):
        return True  # a lone short frame: nothing more to compare
    return _mp3_frame_length(data, pos + length) is not None


def _id3_end(data: bytes) -> int:
    """Offset just past a leading ID3v2 tag, or 0 when there is none."""
    if len(data) < 10 or data[:3] != b"ID3" or any(b & 0x80 for b in data[6:10]):
        return 0
    size = (data[6] << 21) | (data[7] << 14) | (data[8] << 7) | data[9]
    footer = 10 if data[5] & 0x10 else 0
    return 10 + size + footer


def detect_format(data: bytes) -> str | None:
    """The container format ("mp3", "wav", "flac", "ogg") from magic bytes, else None."""
    if len(data) >= 12 and data[:4] in (b"RIFF", b"RF64") and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"OggS":
        return "ogg"
    start = _id3_end(data)
    if data[start : start + 4] == b"fLaC":
        return "flac"
    if _mp3_starts_at(data, start):
        return "mp3"
    if start:
        for pos in range(start + 1, min(len(data), start + _ID3_SEARCH)):
            if data[pos] == 0xFF and _mp3_starts_at(data, pos):
                return "mp3"
    return None


def _read_head(path: Path) -> bytes:
    """Enough of a file's start for `detect_format`, including a large leading ID3 tag."""
    with path.open("rb") as f:
        head = f.read(64 * 1024)
        end = _id3_end(head)
        if end + _ID3_SEARCH > len(head):
            head += f.read(end + _ID3_SEARCH - len(head))
    return head


# --- decoding ------------------------------------------------------------------------

_INT_SCALE = {np.dtype(np.int16): 1 / 32768, np.dtype(np.int32): 1 / 2**31}


def _as_float(frame: av.AudioFrame) -> np.ndarray:
    """A decoded frame's samples as float32 in [-1, 1], all channels flattened. NaN and
    infinite float samples become 0: a file of them is silence, not a loud song."""
    raw = frame.to_ndarray().reshape(-1)
    if raw.dtype == np.uint8:
        return (raw.astype(np.float32) - 128) / 128
    scale = _INT_SCALE.get(raw.dtype)
    if scale:
        return raw.astype(np.float32) * scale
    samples = raw.astype(np.float32)  # a copy: never write into the decoder's buffer
    return np.nan_to_num(samples, copy=False, nan=0.0, posinf=0.0, neginf=0.0)


def longest_accepted(expected: float | None, tolerance: float = DURATION_TOLERANCE) -> float:
    """Seconds past which a file cannot be the song asked for: decoding stops there."""
    return (expected or MAX_SONG_SECONDS) * (1 + tolerance)


# Nothing past this is ever decoded: the check refuses longer files, so the stored
# originals that get encoded and drawn are never longer.
MAX_DECODE_SECONDS = longest_accepted(None)


def _too_long(limit: float, expected: float | None) -> AudioError:
    if expected:
        return AudioError(
            f"The provider returned more than {_seconds(limit)} s of audio instead of "
            f"{_seconds(expected)} s."
        )
    return AudioError(
        f"The provider returned more than {_seconds(limit)} s of audio; a song is at most "
        f"{MAX_SONG_SECONDS} s."
    )


def _check_layout(sample_rate: int, channels: int) -> None:
    if not (MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE and 1 <= channels <= MAX_CHANNELS):
        raise AudioError(NOT_AUDIO)


def _frames_within(container: Any, max_seconds: float) -> Iterator[av.AudioFrame]:
    """The decoded frames, ending quietly after `max_seconds` of audio (what the check
    let through is never longer; this only keeps a bad file from costing more)."""
    heard = 0.0
    for frame in _decoded_frames(container):
        heard += frame.samples / (frame.sample_rate or SAMPLE_RATE)
        if heard > max_seconds + 1:
            return
        yield frame


def _open_input(source: bytes | Path) -> tuple[str, Any]:
    """Detect the format and open a demuxer for it; raises AudioError if it is not audio."""
    # Whole bytes, not a prefix: a provider's MP3 may open with an ID3 tag holding a large
    # picture, and detect_format only ever looks at a few offsets.
    head = source if isinstance(source, bytes) else _read_head(source)
    fmt = detect_format(head)
    if fmt is None:
        raise AudioError(NOT_AUDIO)
    target: Any = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    try:
        container = av.open(target, format=fmt)
    except av.FFmpegError as exc:
        raise AudioError(NOT_AUDIO) from exc
    if not container.streams.audio:
        container.close()
        raise AudioError(NOT_AUDIO)
    return fmt, container


def _decoded_frames(container: Any) -> Iterator[av.AudioFrame]:
    """Every frame of the first audio stream, skipping a few bad packets like players do."""
    stream = container.streams.audio[0]
    packets = bad = 0
    try:
        for packet in container.demux(stream):
            packets += 1
            try:
                frames = packet.decode()
            except av.error.InvalidDataError:
                bad += 1
                continue
            # demux() ends with an empty packet whose decode flushes the decoder.
            yield from frames
    except av.FFmpegError as exc:
        raise AudioError(DAMAGED) from exc
    if packets and bad / packets > MAX_BAD_PACKET_SHARE:
        raise AudioError(DAMAGED)


def _seconds(value: float) -> str:
    """60.0 -> "60", 61.25 -> "61.2": durations as a person writes them."""
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def check_audio(
    data: bytes | Path, expected_duration: float | None, tolerance: float = DURATION_TOLERANCE
) -> AudioInfo:
    """Decode the file (streaming) and prove it is the requested song; raises AudioError.

    Decoding stops once the file is longer than any song it could be (`longest_accepted`).
    """
    limit = longest_accepted(expected_duration, tolerance)
    plain = _check_pcm_wav(data, limit, expected_duration)
    if plain is not None:
        duration, sample_rate, channels, rms = plain
        return _judge("wav", duration, sample_rate, channels, rms, expected_duration, tolerance)
    fmt, container = _open_input(data)
    with container:
        stream = container.streams.audio[0]
        sample_rate = stream.codec_context.sample_rate or stream.rate
        channels = stream.codec_context.channels
        _check_layout(sample_rate, channels)
        most = limit * sample_rate
        samples = 0  # per channel
        sum_squares = 0.0
        values = 0
        for frame in _decoded_frames(container):
            pcm = _as_float(frame)
            samples += frame.samples
            if samples > most:
                raise _too_long(limit, expected_duration)
            values += pcm.size
            sum_squares += float(np.dot(pcm, pcm))
    if samples == 0 or not values:
        raise AudioError(NOT_AUDIO)
    return _judge(
        fmt,
        samples / sample_rate,
        sample_rate,
        channels,
        math.sqrt(sum_squares / values),
        expected_duration,
        tolerance,
    )


def _judge(
    fmt: str,
    duration: float,
    sample_rate: int,
    channels: int,
    rms: float,
    expected_duration: float | None,
    tolerance: float,
) -> AudioInfo:
    if rms < SILENCE_RMS:
        raise AudioError(SILENT)
    if expected_duration and abs(duration - expected_duration) > tolerance * expected_duration:
        raise AudioError(
            f"The provider returned {duration:.1f} s of audio instead of "
            f"{_seconds(expected_duration)} s."
        )
    return AudioInfo(format=fmt, duration=duration, sample_rate=sample_rate, channels=channels)


_PCM_BLOCK = 1 << 20  # samples per step of the loudness sum: bounded extra memory


def _pcm_wav_reader(source: bytes | Path) -> wave.Wave_read | None:
    """A reader for a plain 16-bit PCM WAV within the accepted layouts, else None."""
    head = source[:64] if isinstance(source, bytes) else _read_head(source)[:64]
    if detect_format(head) != "wav":
        return None
    try:
        reader = wave.open(io.BytesIO(source) if isinstance(source, bytes) else str(source))
    except Exception:  # the stdlib reader raises several kinds on damage: PyAV decides
        return None
    ok = (
        reader.getsampwidth() == 2
        and reader.getcomptype() == "NONE"
        and MIN_SAMPLE_RATE <= reader.getframerate() <= MAX_SAMPLE_RATE
        and 1 <= reader.getnchannels() <= MAX_CHANNELS
    )
    if not ok:
        reader.close()
        return None
    return reader


def is_plain_wav(source: bytes | Path) -> bool:
    """True for the 16-bit PCM WAV `check_audio` reads with numpy, not a decoder: cheap
    and bounded enough to check in a thread (what ACE-Step providers return)."""
    reader = _pcm_wav_reader(source)
    if reader is None:
        return False
    reader.close()
    return True


def _pcm_blocks(reader: wave.Wave_read) -> Iterator[np.ndarray]:
    """Whole frames of interleaved int16 samples, a bounded block at a time, until the
    data ends (whatever length the header states)."""
    channels = reader.getnchannels()
    frame_bytes = 2 * channels
    while True:
        try:
            block = reader.readframes(max(1, _PCM_BLOCK // channels))
        except Exception:
            return
        usable = len(block) - len(block) % frame_bytes
        if usable <= 0:
            return
        yield np.frombuffer(block[:usable], dtype="<i2")


def _check_pcm_wav(
    source: bytes | Path, limit: float, expected: float | None
) -> tuple[float, int, int, float] | None:
    """Duration, rate, channels and RMS of a plain 16-bit PCM WAV without a decoder.

    ACE-Step's usual output; reading it with the standard library and numpy skips
    PyAV's set-up cost. Anything else (float, 24-bit, damaged) returns None and goes
    through PyAV. The length is what the file holds, not what its header says.
    """
    reader = _pcm_wav_reader(source)
    if reader is None:
        return None
    with reader:
        rate, channels = reader.getframerate(), reader.getnchannels()
        most = limit * rate * channels
        count = 0
        total = 0.0
        for samples in _pcm_blocks(reader):
            count += samples.size
            if count > most:
                raise _too_long(limit, expected)
            block = samples.astype(np.float32) / 32768.0
            total += float(np.dot(block, block))
    if count == 0:
        return None
    return count / channels / rate, rate, channels, math.sqrt(total / count)


def probe_duration(src: Path) -> float:
    """Duration in seconds: from a WAV or FLAC header when its claim is a plausible song
    length, else by decoding (what a header claims beyond that is not believed)."""
    fmt, container = _open_input(src)
    with container:
        stream = container.streams.audio[0]
        # WAV and FLAC headers state the sample count; MP3 and Ogg headers only estimate.
        if fmt in ("wav", "flac") and stream.duration and stream.time_base:
            claimed = float(stream.duration * stream.time_base)
            if claimed <= MAX_DECODE_SECONDS:
                return claimed
    return check_audio(src, None).duration


# --- bitrate choice ------------------------------------------------------------------


def estimate_size(duration: float, bitrate: int, overhead: int = 0) -> int:
    """Bytes of a CBR stream of `bitrate` kbps lasting `duration` s, plus tags/cover."""
    return math.ceil(bitrate * 125 * duration) + STREAM_SLACK_BYTES + overhead


def _size_text(size: int) -> str:
    return f"{size / 1_000_000:.1f} MB"


def choose_bitrate(
    duration: float, byte_limit: int | None, preferred: int = DEFAULT_BITRATE, *, overhead: int = 0
) -> int:
    """The highest standard bitrate <= preferred whose estimated size fits with margin.

    `overhead` is what the tags and cover add to the file. Raises AudioError when even the
    lowest standard bitrate cannot fit.
    """
    candidates = [rate for rate in STANDARD_BITRATES if rate <= preferred]
    if not candidates:
        raise ValueError(f"bitrate {preferred} kbps is below the lowest standard one")
    if byte_limit is None:
        return candidates[0]
    budget = byte_limit * (1 - SIZE_MARGIN)
    for rate in candidates:
        if estimate_size(duration, rate, overhead) <= budget:
            return rate
    raise AudioError(
        f"A {_seconds(duration)} s song does not fit the {_size_text(byte_limit)} "
        f"upload limit here, even at {STANDARD_BITRATES[-1]} kbps."
    )


def _lower_bitrate(rate: int) -> int | None:
    lower = [r for r in STANDARD_BITRATES if r < rate]
    return lower[0] if lower else None


# --- tags ----------------------------------------------------------------------------


def _id3(tags: SongTags | None, cover: bytes | None) -> ID3:
    id3 = ID3()
    if tags is not None:
        # UTF-8 here; mutagen stores UTF-16 when writing ID3v2.3, which has no UTF-8.
        id3.add(TIT2(encoding=3, text=tags.title))
        id3.add(TPE1(encoding=3, text=tags.artist))
        id3.add(TALB(encoding=3, text=tags.album))
        if tags.genre:
            id3.add(TCON(encoding=3, text=tags.genre))
        if tags.date:
            # Saved as ID3v2.3's TYER + TDAT (mutagen converts it).
            id3.add(TDRC(encoding=3, text=tags.date))
        if tags.lyrics:
            id3.add(USLT(encoding=3, lang="eng", desc="", text=tags.lyrics))
        if tags.comment():
            id3.add(COMM(encoding=3, lang="eng", desc="", text=tags.comment()))
        for key, value in tags.extra().items():
            id3.add(TXXX(encoding=3, desc=key, text=value))
    if cover:
        id3.add(
            APIC(
                encoding=3,
                mime="image/jpeg",
                type=PictureType.COVER_FRONT,
                desc="Cover",
                data=cover,
            )
        )
    return id3


def _save_id3(id3: ID3, target: Any) -> None:
    # ID3v2.3: the version Windows, older car stereos and Telegram's tag reader all know.
    id3.save(target, v2_version=3, padding=lambda info: 0)


def id3_tag_size(tags: SongTags | None, cover: bytes | None) -> int:
    """Bytes the ID3 tag `encode` writes for these tags and cover will take."""
    if tags is None and not cover:
        return 0
    buf = io.BytesIO()
    _save_id3(_id3(tags, cover), buf)
    return len(buf.getvalue())


def _vorbis_comments(tags: SongTags | None) -> dict[str, str]:
    if tags is None:
        return {}
    fields = {
        "TITLE": tags.title,
        "ARTIST": tags.artist,
        "ALBUM": tags.album,
        "GENRE": tags.genre,
        "DATE": tags.date,
        "LYRICS": tags.lyrics,
        "COMMENT": tags.comment(),
        **tags.extra(),
    }
    return {key: value for key, value in fields.items() if value}


def _flac_picture(cover: bytes) -> Picture:
    picture = Picture()
    picture.type = PictureType.COVER_FRONT
    picture.mime = "image/jpeg"
    picture.desc = "Cover"
    with Image.open(io.BytesIO(cover)) as image:
        picture.width, picture.height = image.size
    picture.depth = 24
    picture.data = cover
    return picture


def _write_tags(path: Path, fmt: str, tags: SongTags | None, cover: bytes | None) -> None:
    if fmt == "mp3":
        if tags is not None or cover:
            _save_id3(_id3(tags, cover), path)
    elif fmt == "flac":
        flac = FLAC(path)
        for key, value in _vorbis_comments(tags).items():
            flac[key] = value
        if cover:
            flac.add_picture(_flac_picture(cover))
        flac.save()
    elif fmt == "ogg":
        opus = OggOpus(path)
        for key, value in _vorbis_comments(tags).items():
            opus[key] = value
        if cover:
            picture = base64.b64encode(_flac_picture(cover).write()).decode("ascii")
            opus["METADATA_BLOCK_PICTURE"] = [picture]
        opus.save()
    # WAV stays untagged: players barely read RIFF INFO and nobody delivers WAV to chat.


def _tag_overhead(fmt: str, tags: SongTags | None, cover: bytes | None) -> int:
    if fmt == "mp3":
        return id3_tag_size(tags, cover)
    text = sum(len(k) + len(v.encode()) + 5 for k, v in _vorbis_comments(tags).items())
    # Ogg carries the picture base64-encoded; allow a few Ogg page headers on top.
    return text + (len(cover) * 4 // 3 + 4096 if cover else 0)


# --- encoding ------------------------------------------------------------------------


def _pcm_frames(container: Any) -> Iterator[av.AudioFrame]:
    """The song as 48 kHz stereo s16 frames, converted one decoded frame at a time."""
    resampler = av.AudioResampler(format="s16", layout="stereo", rate=SAMPLE_RATE)
    for frame in _frames_within(container, MAX_DECODE_SECONDS):
        frame.pts = None  # the resampler numbers its output; input timestamps may jump
        yield from resampler.resample(frame)
    yield from resampler.resample(None)  # what the resampler still holds


def _lame(bitrate: int) -> lameenc.Encoder:
    encoder = lameenc.Encoder()
    encoder.set_bit_rate(bitrate)
    encoder.set_in_sample_rate(SAMPLE_RATE)
    # LAME alone would drop to 44.1/32/24/16 kHz at 112 kbps and below; like ffmpeg, keep
    # the song's 48 kHz at every bitrate so a stepped-down file differs only in bitrate.
    encoder.set_out_sample_rate(SAMPLE_RATE)
    encoder.set_channels(CHANNELS)
    encoder.set_quality(LAME_QUALITY)
    return encoder


def _encode_mp3(container: Any, dest: Path, bitrate: int) -> int:
    """Stream PCM through LAME into dest; returns the samples encoded (per channel)."""
    encoder = _lame(bitrate)
    samples = 0
    with dest.open("wb") as out:
        for frame in _pcm_frames(container):
            samples += frame.samples
            out.write(encoder.encode(frame.to_ndarray().tobytes()))
        out.write(encoder.flush())
    return samples


def _encode_mp3_from_wav(reader: wave.Wave_read, dest: Path, bitrate: int) -> int:
    """A 48 kHz stereo 16-bit WAV is already what LAME takes: feed it large blocks
    straight from the file, with no decoder, resampler or per-frame copies between
    (ACE-Step's own output; bench/transcode.py measures the gain)."""
    encoder = _lame(bitrate)
    samples = 0
    most = MAX_DECODE_SECONDS * SAMPLE_RATE * CHANNELS
    with dest.open("wb") as out:
        for block in _pcm_blocks(reader):
            if samples * CHANNELS + block.size > most:
                block = block[: max(0, int(most) - samples * CHANNELS)]
            samples += block.size // CHANNELS
            out.write(encoder.encode(block.tobytes()))
            if samples * CHANNELS >= most:
                break
        out.write(encoder.flush())
    return samples


def _encode_av(container: Any, dest: Path, fmt: str, bitrate: int | None) -> int:
    """Stream PCM through FFmpeg's encoder for fmt into dest; returns samples encoded."""
    samples = 0
    with av.open(str(dest), "w", format=fmt) as out:
        stream: Any = out.add_stream(_ENCODERS[fmt], rate=SAMPLE_RATE)
        stream.layout = "stereo"
        stream.format = "s16"  # every encoder used here takes s16, so no second conversion
        if bitrate:
            stream.bit_rate = bitrate * 1000
        for frame in _pcm_frames(container):
            samples += frame.samples
            # PyAV cuts frames to the codec's frame size (Opus: 20 ms) as it encodes.
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return samples


def _transcode(src: Path, dest: Path, fmt: str, bitrate: int | None) -> float:
    """Stream src through the encoder for `fmt` into dest; returns the duration written."""
    if fmt == "mp3":
        assert bitrate is not None
        reader = _pcm_wav_reader(src)
        if reader is not None:
            with reader:
                native = (reader.getframerate(), reader.getnchannels()) == (SAMPLE_RATE, CHANNELS)
                samples = _encode_mp3_from_wav(reader, dest, bitrate) if native else 0
            if native and samples:
                return samples / SAMPLE_RATE
    _, container = _open_input(src)
    with container:
        if fmt == "mp3":
            assert bitrate is not None
            samples = _encode_mp3(container, dest, bitrate)
        else:
            samples = _encode_av(container, dest, fmt, bitrate)
    if samples == 0:
        raise AudioError(NOT_AUDIO)
    return samples / SAMPLE_RATE


# The formats a provider's own file can be sent in as it is, only its tags replaced.
# (Ogg is left out: a provider's Ogg may be Vorbis, which the Opus tagger cannot write.)
_PASS_THROUGH = frozenset({"mp3", "flac", "wav"})


def _pass_through(
    src: Path, dest: Path, fmt: str, tags: SongTags | None, cover: bytes | None
) -> int | None:
    """Write the provider's file to dest with our tags instead of its own: the audio
    bytes stay exactly as they were. Returns the MP3's bitrate in kbps, else None."""
    if fmt == "mp3":
        data = src.read_bytes()
        start, end = _id3_end(data), len(data)
        if data[-128:-125] == b"TAG":  # an ID3v1 tag at the end
            end -= 128
        dest.write_bytes(data[start:end])
    else:
        shutil.copyfile(src, dest)
        if fmt == "flac":
            flac = FLAC(dest)
            flac.clear_pictures()
            flac.save()
            flac.delete()  # the provider's Vorbis comments
    _write_tags(dest, fmt, tags, cover)
    if fmt != "mp3":
        return None
    info: Any = MP3(dest).info
    return round(info.bitrate / 1000)


def encode(
    src: Path,
    dest: Path,
    fmt: str | None = None,
    *,
    byte_limit: int | None = None,
    bitrate: int | None = None,
    tags: SongTags | None = None,
    cover: bytes | None = None,
    duration: float | None = None,
) -> EncodedAudio:
    """Encode the original at `src` into `dest` (48 kHz stereo), tagged, within byte_limit.

    `fmt` defaults to dest's suffix. An original already in `fmt` (MP3, FLAC, WAV) that
    fits is not encoded again: it is copied with its tags replaced. For MP3 and Ogg,
    `bitrate` (kbps, default 192) is the preferred rate; with a byte limit the highest
    standard rate that fits is used, and a file that still comes out too large is encoded
    again one step lower. `duration` is the length `check_audio` measured (else it is
    probed); a header's claim is never trusted over it. `src` is never modified; dest
    appears only once complete.
    """
    fmt = (fmt or dest.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise ValueError(f"Cannot write {dest.name!r}: choose .mp3, .wav, .flac or .ogg.")
    if bitrate is not None and bitrate not in STANDARD_BITRATES:
        raise ValueError(f"bitrate must be one of {STANDARD_BITRATES} kbps, not {bitrate}")
    if dest.exists() and dest.resolve() == src.resolve():
        raise ValueError("encode() would overwrite the original file")
    partial = dest.with_name(f".{dest.name}.part")
    try:
        if fmt in _PASS_THROUGH and bitrate is None and detect_format(_read_head(src)) == fmt:
            kept = _pass_through(src, partial, fmt, tags, cover)
            size = partial.stat().st_size
            if byte_limit is None or size <= byte_limit:
                os.replace(partial, dest)
                length = duration if duration is not None else probe_duration(src)
                return EncodedAudio(dest, fmt, kept, size, length)
        rate: int | None = None
        if fmt in _LOSSY:
            preferred = bitrate or DEFAULT_BITRATE
            if byte_limit is not None and duration is None:
                duration = probe_duration(src)
            rate = choose_bitrate(
                duration or 0.0, byte_limit, preferred, overhead=_tag_overhead(fmt, tags, cover)
            )
        while True:
            written = _transcode(src, partial, fmt, rate)
            _write_tags(partial, fmt, tags, cover)
            size = partial.stat().st_size
            if byte_limit is None or size <= byte_limit:
                break
            lower = _lower_bitrate(rate) if rate is not None else None
            if lower is None:
                raise AudioError(
                    f"The song comes to {_size_text(size)}, over the "
                    f"{_size_text(byte_limit)} upload limit here."
                )
            rate = lower
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)
    return EncodedAudio(path=dest, format=fmt, bitrate=rate, size=size, duration=written)


# --- cover art -----------------------------------------------------------------------

_BLOCK = 1024  # samples per spectrogram column before columns are merged to pixels
_BANDS = 96  # log-spaced frequency rows before scaling to the image
_LOW_HZ, _HIGH_HZ = 40.0, 16000.0
_DYNAMIC_RANGE_DB = 70.0
# Dark violet -> magenta -> orange -> pale yellow: quiet parts stay dark, loud ones glow.
_PALETTE = np.array(
    [(10, 6, 30), (60, 15, 95), (150, 35, 120), (230, 80, 80), (250, 170, 60), (252, 245, 190)],
    dtype=np.float32,
)


def _band_matrix(sample_rate: int) -> np.ndarray:
    """Weights that sum FFT bins into log-spaced bands (bins x bands)."""
    freqs = np.fft.rfftfreq(_BLOCK, 1 / sample_rate)
    high = min(_HIGH_HZ, sample_rate / 2)
    edges = np.geomspace(_LOW_HZ, high, _BANDS + 1)
    index = np.clip(np.searchsorted(edges, freqs, side="right") - 1, -1, _BANDS)
    matrix = np.zeros((freqs.size, _BANDS), dtype=np.float32)
    valid = (index >= 0) & (index < _BANDS)
    matrix[np.nonzero(valid)[0], index[valid]] = 1.0
    # Low bands hold fewer bins than an FFT bin is wide: borrow the nearest bin.
    for band in np.nonzero(matrix.sum(axis=0) == 0)[0]:
        centre = math.sqrt(edges[band] * edges[band + 1])
        matrix[int(np.argmin(np.abs(freqs - centre))), band] = 1.0
    return matrix


def _song_bands(src: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per block of _BLOCK mono samples: band levels in dB and total energy."""
    _, container = _open_input(src)
    resampler = av.AudioResampler(format="flt", layout="mono")
    window = np.hanning(_BLOCK).astype(np.float32)
    # float16 dB keeps 0.03 dB steps at a quarter of float64's memory (2 MB for 240 s).
    levels: list[np.ndarray] = []
    energies: list[np.ndarray] = []
    carry = np.zeros(0, dtype=np.float32)
    matrix: np.ndarray | None = None
    with container:
        for frame in _frames_within(container, MAX_DECODE_SECONDS):
            frame.pts = None
            if matrix is None:
                matrix = _band_matrix(frame.sample_rate)
            for mono in resampler.resample(frame):
                carry = np.concatenate([carry, mono.to_ndarray().reshape(-1)])
                whole = carry.size // _BLOCK * _BLOCK
                if whole:
                    blocks = carry[:whole].reshape(-1, _BLOCK) * window
                    power = np.abs(np.fft.rfft(blocks, axis=1)) ** 2
                    levels.append((10 * np.log10(power @ matrix + 1e-12)).astype(np.float16))
                    energies.append(power.sum(axis=1).astype(np.float32))
                    carry = carry[whole:]
    if not levels:
        raise AudioError(NOT_AUDIO)
    return np.concatenate(levels), np.concatenate(energies)


def _colorize(level: np.ndarray) -> np.ndarray:
    """Map levels in [0, 1] through the palette to RGB bytes."""
    position = np.clip(level, 0, 1) * (len(_PALETTE) - 1)
    low = np.floor(position).astype(int).clip(0, len(_PALETTE) - 2)
    mix = (position - low)[..., None]
    rgb = _PALETTE[low] * (1 - mix) + _PALETTE[low + 1] * mix
    return rgb.astype(np.uint8)


def render_cover(src: Path, size: int = COVER_SIZE, title: str | None = None) -> bytes:
    """A square JPEG (< 200 kB) of the song's spectrogram with its loudness outline and,
    when given, its title written across the bottom."""
    if not 16 <= size <= 2048:
        raise ValueError("cover size must be between 16 and 2048 pixels")
    bands, energies = _song_bands(src)
    columns = min(size, bands.shape[0])
    # Merge blocks into image columns: each column shows the mean level of its stretch.
    edges = np.linspace(0, bands.shape[0], columns + 1).astype(int)
    counts = np.diff(edges)
    # Column by column, so the float16 levels are never widened all at once.
    db = np.stack([bands[a:b].mean(axis=0, dtype=np.float32) for a, b in itertools.pairwise(edges)])
    top = float(np.percentile(db, 99.5))
    level = (db - (top - _DYNAMIC_RANGE_DB)) / _DYNAMIC_RANGE_DB
    pixels = _colorize(level.T[::-1])  # low frequencies at the bottom
    image = Image.fromarray(pixels, "RGB").resize((size, size), Image.Resampling.BICUBIC)
    _draw_outline(image, np.add.reduceat(energies, edges[:-1]) / counts)
    if title:
        _draw_title(image, title)
    return _jpeg(image)


def thumbnail(cover: bytes, size: int = THUMBNAIL_SIZE) -> bytes:
    """The cover made small, for a platform's thumbnail (Telegram: at most 320 px)."""
    with Image.open(io.BytesIO(cover)) as image:
        if max(image.size) <= size:
            return cover
        small = image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    return _jpeg(small)


def _jpeg(image: Image.Image) -> bytes:
    for quality in (90, 80, 70, 55, 40):
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=quality, optimize=True)
        if buf.tell() < MAX_COVER_BYTES:
            return buf.getvalue()
    raise AssertionError("a cover image could not be compressed under 200 kB")


# The title is drawn in DejaVu Sans Bold as matplotlib ships it (Latin, Greek, Cyrillic
# and more): no font installed on the host is assumed. Characters it lacks (CJK, emoji)
# are left out rather than drawn as boxes.
_FONT_FILE = "mpl-data/fonts/ttf/DejaVuSans-Bold.ttf"


@functools.lru_cache(maxsize=1)
def _font_path() -> Path:
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("matplotlib (the cover font) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / _FONT_FILE


@functools.lru_cache(maxsize=1)
def _font_chars() -> frozenset[int]:
    from fontTools.ttLib import TTFont

    with TTFont(_font_path(), lazy=True) as font:
        return frozenset(font.getBestCmap())


def drawable(text: str) -> str:
    """`text` without the characters the cover font cannot draw, spaces tidied."""
    chars = _font_chars()
    return " ".join("".join(ch for ch in text if ord(ch) in chars or ch.isspace()).split())


def _wrap(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont, width: int
) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def _draw_title(image: Image.Image, title: str) -> None:
    """The title in white on a dark band across the bottom: at most two lines, the font
    shrunk until they fit (a longer title is cut with an ellipsis)."""
    text = drawable(title)
    if not text:
        return
    width, height = image.size
    margin = width // 16
    room = width - 2 * margin
    draw = ImageDraw.Draw(image)
    size = max(12, width // 11)
    while True:
        font = ImageFont.truetype(str(_font_path()), size)
        lines = _wrap(draw, text, font, room)
        fits = all(draw.textlength(line, font=font) <= room for line in lines)
        if (len(lines) <= 2 and fits) or size <= max(12, width // 24):
            break
        size = int(size * 0.9)
    dropped = len(lines) > 2
    lines = lines[:2]
    for i, line in enumerate(lines):
        mark = "\N{HORIZONTAL ELLIPSIS}" if dropped and i == len(lines) - 1 else ""
        if draw.textlength(line + mark, font=font) > room:
            mark = "\N{HORIZONTAL ELLIPSIS}"
            while line and draw.textlength(line + mark, font=font) > room:
                line = line[:-1]
        lines[i] = line.rstrip() + mark
    line_height = int(size * 1.25)
    band = line_height * len(lines) + margin
    veil = Image.new("L", (width, band), 150)
    image.paste(Image.new("RGB", (width, band), (8, 4, 20)), (0, height - band), veil)
    y = height - band + margin // 2
    for line in lines:
        x = (width - draw.textlength(line, font=font)) / 2
        draw.text((x, y), line, font=font, fill=(255, 255, 255))
        y += line_height


def _draw_outline(image: Image.Image, loudness: np.ndarray) -> None:
    """Overlay a mirrored loudness envelope across the middle, lightly, in white."""
    width, height = image.size
    x_old = np.linspace(0, 1, loudness.size)
    db = 10 * np.log10(np.interp(np.linspace(0, 1, width), x_old, loudness) + 1e-12)
    top = float(db.max())
    level = np.clip((db - (top - 40)) / 40, 0, 1)  # the envelope of the last 40 dB
    half = (level * height * 0.42).astype(int)
    mask = np.zeros((height, width), dtype=np.uint8)
    rows = np.arange(height)[:, None]
    middle = height // 2
    inside = (rows >= middle - half[None, :]) & (rows <= middle + half[None, :])
    mask[inside] = 55  # alpha: a veil, so the spectrogram still shows through
    veil = Image.new("RGB", image.size, (255, 255, 255))
    image.paste(veil, (0, 0), Image.fromarray(mask, "L"))


__all__ = [
    "CHANNELS",
    "DEFAULT_BITRATE",
    "DURATION_TOLERANCE",
    "FORMATS",
    "MAX_DECODE_SECONDS",
    "MAX_SONG_SECONDS",
    "SAMPLE_RATE",
    "STANDARD_BITRATES",
    "AudioError",
    "AudioInfo",
    "EncodedAudio",
    "SongTags",
    "check_audio",
    "choose_bitrate",
    "detect_format",
    "encode",
    "estimate_size",
    "id3_tag_size",
    "is_plain_wav",
    "longest_accepted",
    "probe_duration",
    "render_cover",
    "thumbnail",
]
