"""Plain data the engine, storage and front-ends pass around."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any

from bot import titles
from bot.requests import GenerationRequest


class JobState(StrEnum):
    """Where a job stands. `queued -> submitting -> running -> ready -> delivered`, or it
    ends `failed` / `cancelled`. A StrEnum: stored in the database as its value."""

    QUEUED = "queued"  # admitted, waiting for a provider
    SUBMITTING = "submitting"  # being sent to a provider (may or may not have arrived)
    RUNNING = "running"  # the provider accepted it; polled with the stored handle
    READY = "ready"  # the audio is stored; waiting to be posted
    DELIVERED = "delivered"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STATES: tuple[JobState, ...] = (
    JobState.QUEUED,
    JobState.SUBMITTING,
    JobState.RUNNING,
    JobState.READY,
)
TERMINAL_STATES: tuple[JobState, ...] = (
    JobState.DELIVERED,
    JobState.FAILED,
    JobState.CANCELLED,
)


class FailureKind(StrEnum):
    """Why a job ended without a song, as a user is told it (the provider's own words go
    to the log and `acestep-bot jobs show`, never to a chat). Stored in `jobs.failure`."""

    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    REJECTED = "rejected"  # the provider refused the input (content policy, validation)
    PROVIDER_FAILED = "provider_failed"  # the provider could not make it
    UNAVAILABLE = "unavailable"  # no provider could take it (down, busy, keys)
    NOT_POSTED = "not_posted"  # made, but the platform would not take it
    INTERNAL = "internal"  # our own fault: disk, database, a crash
    BUDGET = "budget"  # another run would pass the operator's daily spend cap


@dataclass(frozen=True)
class Requester:
    """Who asked: platform, user and community (Discord guild / Telegram chat)."""

    platform: str
    user_id: str
    community_id: str | None = None
    display_name: str = ""

    @property
    def key(self) -> str:
        """`platform:user_id`, the form ADMIN_IDS and quota overrides use."""
        return f"{self.platform}:{self.user_id}"

    @property
    def community_key(self) -> str | None:
        return f"{self.platform}:{self.community_id}" if self.community_id else None


@dataclass(frozen=True)
class SongResult:
    """What a finished job made: the stored audio file and what the provider reported."""

    audio_file: str  # file name under DATA_DIR/audio
    format: str
    duration: float
    seed: int
    provider: str
    title: str
    sample_rate: int | None = None
    channels: int | None = None
    tags: str | None = None  # as the provider wrote or used them
    lyrics: str | None = None
    # False when the provider ignored the seed it was sent: `seed` is the one it used,
    # but asking for it again will not make the same song.
    seed_honoured: bool = True
    provider_metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], job_seed: int = 0) -> SongResult:
        """Tolerant of rows written by older versions (missing keys get defaults)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        values.setdefault("audio_file", "")
        values.setdefault("format", "")
        values["duration"] = float(values.get("duration") or 0.0)
        values["seed"] = int(values["seed"]) if values.get("seed") is not None else job_seed
        values["provider"] = str(values.get("provider") or "")
        values["title"] = str(values.get("title") or "")
        values["provider_metadata"] = dict(values.get("provider_metadata") or {})
        return cls(**values)


@dataclass
class Job:
    """One admitted song request and where it stands."""

    id: str
    requester: Requester
    reply_target: dict[str, Any]
    request: GenerationRequest
    seed: int
    state: JobState
    provider: str | None = None
    handle: str | None = None
    attempts: int = 0
    recoveries: int = 0
    tried_providers: list[str] = field(default_factory=list)
    cancel_requested: bool = False
    reserved_usd: float = 0.0
    charged_usd: float | None = None
    refunded: bool = False
    result: SongResult | None = None
    error: str | None = None  # the operator's detail of a failure (redacted), never shown in chats
    failure: FailureKind | None = None  # why it failed, as users are told
    created_at: float = 0.0
    updated_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    delivered_at: float | None = None
    source_key: str | None = None  # the platform event that asked for it (idempotency)
    # A posted song its requester or an admin removed: the row stays for the ledger.
    deleted_at: float | None = None
    deleted_by: str | None = None  # "platform:user_id"
    owner: str | None = None  # the process working on it (storage JobStore.claim)
    lease_expires: float | None = None  # until when, unless it renews
    # Takes (issue 14): the jobs one request made share a batch id; this is take `take`
    # of `takes`. Each has its own seed and a request with takes=1, reproducible alone.
    batch_id: str | None = None
    take: int = 1
    takes: int = 1

    @property
    def deleted(self) -> bool:
        return self.deleted_at is not None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def duration(self) -> int:
        return self.request.duration

    @property
    def title(self) -> str:
        """The song's title: the stored result's, else the one derived from the request."""
        if self.result is not None and self.result.title:
            return self.result.title
        return titles.song_title(self.request)

    @property
    def lyrics(self) -> str:
        """The lyrics the song was made with (the provider's, else the user's)."""
        if self.result is not None and self.result.lyrics:
            return self.result.lyrics
        return self.request.lyrics or ""
