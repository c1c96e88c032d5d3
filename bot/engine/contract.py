"""The contract between the engine and the front-ends: how a platform is told about its
jobs (`Delivery`), what it is told (`Progress`, `Failure`) and what it posts (`Song`).

The engine knows no platform: Discord, Telegram and the CLI each implement `Delivery`
once, and the engine calls it with the job, whose stored `reply_target` says where to
answer, even after a restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from bot import audio, render, titles
from bot.models import FailureKind, Job


class DeliveryError(Exception):
    """A front-end could not post a result. `permanent` = retrying will not help."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        self.permanent = permanent
        super().__init__(message)


class Phase(StrEnum):
    """What a user is told an active job is doing, in the order it happens."""

    WAITING = "waiting"  # in this bot's queue
    STARTING = "starting"  # being sent to a provider
    PROVIDER_QUEUE = "provider_queue"  # accepted, waiting in the provider's own queue
    GENERATING = "generating"  # the provider is making it
    UPLOADING = "uploading"  # made and stored; being posted

    @property
    def rank(self) -> int:
        """A status never goes back to a lower rank (a late "waiting" after "generating")."""
        return _PHASE_ORDER.index(self)


_PHASE_ORDER = list(Phase)


@dataclass(frozen=True)
class Progress:
    """One status update. Provider log text never reaches this: only numbers do."""

    phase: Phase
    position: int | None = None  # in this bot's queue, or in the provider's
    provider: str | None = None
    fraction: float | None = None  # 0..1 when the provider reports it
    eta_seconds: float | None = None  # from the provider's progress or its recent runs
    since: float | None = None  # wall-clock time the generation started (for "elapsed")


@dataclass(frozen=True)
class Failure:
    """How a job ended unsuccessfully: the kind, whether the user's quota came back, and
    the operator's detail (redacted; for logs and `jobs show` only)."""

    kind: FailureKind
    quota_refunded: bool = True
    detail: str = ""
    timeout_seconds: int | None = None  # for TIMED_OUT: the limit that stopped it


@dataclass(frozen=True)
class RenderedSong:
    path: Path
    size: int
    bitrate: int | None
    duration: float
    format: str
    cover: bytes


@dataclass
class Song:
    """A finished song, its original file under DATA_DIR/audio, ready to be rendered."""

    job_id: str
    title: str
    original_path: Path
    duration: float
    seed: int
    provider: str
    tags: str | None
    lyrics: str | None
    prompt: str | None
    album: str = "acestep-bot"  # a chat platform puts the bot's own name here
    made_at: float | None = None  # epoch seconds; the tags' date
    # False when the provider ignored the seed it was sent: `seed` is what it used, but
    # asking for it again will not make the same song (front-ends say so).
    seed_honoured: bool = True
    lineage: str = ""  # where an edit came from ("extended from ..."), "" for a new song
    _cover: bytes | None = field(default=None, repr=False)

    async def cover(self) -> bytes:
        cover = self._cover
        if cover is None:
            cover = self._cover = await render.shared().cover(self.original_path, self.title)
        return cover

    async def render(self, byte_limit: int | None, fmt: str = "mp3") -> RenderedSong:
        """Encode for delivery to fit `byte_limit`, tagged, with cover: one task for the
        renderer's worker processes (bot/render.py). An original already in `fmt` that
        fits is sent as it is, only its tags replaced."""
        limit_tag = f"{byte_limit}" if byte_limit else "any"
        dest = self.original_path.with_name(f"{self.job_id}.{limit_tag}.{fmt}")
        tags = audio.SongTags(
            title=self.title,
            lyrics=self.lyrics,
            prompt=self.prompt,
            tags=self.tags,
            seed=self.seed,
            provider=self.provider,
            job_id=self.job_id,
            lineage=self.lineage or None,
            album=self.album,
            genre=", ".join(titles.style_tags(self.tags or "")[:2]) or None,
            date=(
                datetime.fromtimestamp(self.made_at, UTC).strftime("%Y-%m-%d")
                if self.made_at
                else None
            ),
        )
        cover, encoded = await render.shared().render(
            self.original_path,
            dest,
            fmt,
            byte_limit=byte_limit,
            tags=tags,
            duration=self.duration,  # as the check measured it, whatever a header claims
            cover=self._cover,
        )
        self._cover = cover
        return RenderedSong(
            path=encoded.path,
            size=encoded.size,
            bitrate=encoded.bitrate,
            duration=encoded.duration,
            format=encoded.format,
            cover=cover,
        )


class Delivery(Protocol):
    """How a platform shows progress and posts results; one per platform."""

    platform: str

    async def on_progress(self, job: Job, progress: Progress) -> None: ...

    async def deliver(self, job: Job, song: Song) -> None: ...

    async def on_failed(self, job: Job, failure: Failure) -> None: ...
