"""Plain data the engine, storage and front-ends pass around."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bot.requests import GenerationRequest

ACTIVE_STATES = ("queued", "submitting", "running", "ready")
TERMINAL_STATES = ("delivered", "failed", "cancelled")


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


@dataclass
class Job:
    """One admitted song request and where it stands."""

    id: str
    requester: Requester
    reply_target: dict[str, Any]
    request: GenerationRequest
    seed: int
    state: str
    provider: str | None = None
    handle: str | None = None
    attempts: int = 0
    recoveries: int = 0
    tried_providers: list[str] = field(default_factory=list)
    cancel_requested: bool = False
    reserved_usd: float = 0.0
    charged_usd: float | None = None
    refunded: bool = False
    result: dict[str, Any] | None = None
    error: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    delivered_at: float | None = None
    source_key: str | None = None  # the platform event that asked for it (idempotency)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def duration(self) -> int:
        return self.request.duration
