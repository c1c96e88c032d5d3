"""Source intake for work on a song (issue 14): extend, remix, repaint.

A source is a song the bot posted (the job's stored audio) or a user's own audio, fetched
with the platform's file API (Telegram getFile, a Discord attachment URL). Either way it
is checked like provider output (bot/audio.py: decoded, not silent, at most 240 s) and
stored once as `DATA_DIR/sources/<sha256>.<ext>`, where a restart finds it to resubmit.

Every refusal is a `SourceRefused` whose text is one line naming what is wrong and what
is allowed; a refused source leaves nothing on disk and nothing in the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from bot import audio, messages
from bot.models import Job, JobState
from bot.requests import MAX_DURATION, MAX_TAGS_CHARS, SourceAudio

if TYPE_CHECKING:
    from storage.store import Store

CHUNK_BYTES = 256 * 1024
FETCH_TIMEOUT_S = 60.0


class SourceRefused(ValueError):
    """A source audio the bot will not work on; str(e) is the line to show the user."""


def _checked(path: Path) -> tuple[str, float]:
    """The format and length of the audio at `path`; raises SourceRefused. Decoding
    stops a little past the longest song (bot/audio.py), however long the file is."""
    if path.stat().st_size == 0:
        raise SourceRefused(messages.SOURCE_EMPTY)
    try:
        info = audio.check_audio(path, None)
    except audio.AudioError as exc:
        text = str(exc)
        if text == audio.SILENT:
            raise SourceRefused(messages.SOURCE_SILENT) from None
        if text in (audio.NOT_AUDIO, audio.DAMAGED):
            raise SourceRefused(messages.SOURCE_NOT_AUDIO) from None
        raise SourceRefused(messages.source_too_long(None, MAX_DURATION)) from None
    return info.format, info.duration


def _store(
    data_dir: Path,
    part: Path,
    name: str,
    job_id: str | None,
    tags: str = "",
    lyrics: str = "",
) -> SourceAudio:
    """Check the downloaded file `part` and move it to its content-hash name."""
    try:
        fmt, seconds = _checked(part)
        if seconds > MAX_DURATION:
            raise SourceRefused(messages.source_too_long(seconds, MAX_DURATION))
        digest = hashlib.sha256()
        with part.open("rb") as f:
            for block in iter(lambda: f.read(CHUNK_BYTES), b""):
                digest.update(block)
        sha = digest.hexdigest()
        file = f"{sha}.{fmt}"
        target = data_dir / "sources" / file
        if target.exists():  # the same audio was sent before: stored once
            part.unlink()
        else:
            os.replace(part, target)
        return SourceAudio(
            sha256=sha,
            seconds=round(seconds, 3),
            file=file,
            job_id=job_id,
            name=name,
            tags=tags,
            lyrics=lyrics,
        )
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()


def _part(data_dir: Path) -> Path:
    folder = data_dir / "sources"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f".{secrets.token_hex(8)}.part"


async def from_bytes(
    data_dir: Path, data: bytes, *, name: str = "", max_bytes: int, job_id: str | None = None
) -> SourceAudio:
    """Store audio a user handed over whole (the CLI's file); raises SourceRefused."""
    if len(data) > max_bytes:
        raise SourceRefused(messages.source_too_big(len(data), max_bytes))

    def store() -> SourceAudio:
        part = _part(data_dir)
        part.write_bytes(data)
        return _store(data_dir, part, name, job_id)

    return await asyncio.to_thread(store)


async def from_file(
    data_dir: Path, path: Path, *, max_bytes: int, job_id: str | None = None
) -> SourceAudio:
    """Store a file on this machine (the CLI's `--extend SRC.mp3`); raises SourceRefused."""
    return await asyncio.to_thread(_from_file, data_dir, path, max_bytes, job_id)


def _from_file(data_dir: Path, path: Path, max_bytes: int, job_id: str | None) -> SourceAudio:
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise OSError(path)
    except OSError:
        raise SourceRefused(messages.source_missing(str(path))) from None
    if size > max_bytes:
        raise SourceRefused(messages.source_too_big(size, max_bytes))
    part = _part(data_dir)
    _copy(path, part)
    return _store(data_dir, part, path.name, job_id)


async def from_url(
    data_dir: Path,
    client: httpx.AsyncClient,
    url: str,
    *,
    declared_size: int | None,
    max_bytes: int,
    name: str = "",
) -> SourceAudio:
    """Download a platform file (Telegram getFile's path, a Discord attachment URL).

    The platform's declared size is checked before anything is fetched, and the download
    stops past `max_bytes` whatever the platform declared. Raises SourceRefused."""
    if declared_size is not None and declared_size > max_bytes:
        raise SourceRefused(messages.source_too_big(declared_size, max_bytes))
    if declared_size == 0:
        raise SourceRefused(messages.SOURCE_EMPTY)
    part = await asyncio.to_thread(_part, data_dir)
    try:
        got = 0
        async with client.stream("GET", url, timeout=FETCH_TIMEOUT_S) as resp:
            if resp.status_code != 200:
                raise SourceRefused(messages.SOURCE_UNREACHABLE)
            with part.open("wb") as out:
                async for chunk in resp.aiter_bytes(CHUNK_BYTES):
                    got += len(chunk)
                    if got > max_bytes:
                        raise SourceRefused(messages.source_too_big(got, max_bytes))
                    out.write(chunk)
    except httpx.HTTPError:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        raise SourceRefused(messages.SOURCE_UNREACHABLE) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        raise
    return await asyncio.to_thread(_store, data_dir, part, name, None)


async def from_job(data_dir: Path, audio_dir: Path, job: Job | None) -> SourceAudio:
    """A song the bot posted, as a source (its stored original). Raises SourceRefused for
    a job that is not a posted song, was deleted, or whose audio retention removed."""
    if job is None or job.deleted or job.state is not JobState.DELIVERED or job.result is None:
        raise SourceRefused(messages.SOURCE_NO_SUCH_SONG)
    path = audio_dir / job.result.audio_file
    title, job_id = job.title, job.id
    # What the song is (fal's and WaveSpeed's remix take the source's tags and lyrics).
    tags = job.result.tags or job.request.tags or job.request.prompt
    lyrics = job.lyrics

    def store() -> SourceAudio:
        if not job.result or not job.result.audio_file or not path.is_file():
            raise SourceRefused(messages.SOURCE_AUDIO_GONE)
        part = _part(data_dir)
        _copy(path, part)
        return _store(data_dir, part, title, job_id, tags[:MAX_TAGS_CHARS], lyrics)

    return await asyncio.to_thread(store)


async def discard(data_dir: Path, source: SourceAudio, store: Store) -> bool:
    """Remove a stored source no job works on (its request was refused), so bad input
    leaves nothing behind. True when it was removed."""
    if await store.source_in_use(source.sha256):
        return False
    path = source.path(data_dir)
    try:
        await asyncio.to_thread(path.unlink)
    except FileNotFoundError:
        return False
    return True


def _copy(src: Path, dst: Path) -> None:
    with src.open("rb") as f, dst.open("wb") as out:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            out.write(block)
