"""The generation engine: admit -> persist -> schedule -> run -> deliver, and recovery.

- `facade`: `Engine`, what front-ends and the CLI call (admission, queries, cancel).
- `scheduler`: which queued job runs next, fairly across users.
- `runner`: one job end to end (submit, poll, fail over, store, deliver).
- `contract`: what the engine tells front-ends (`Delivery`, `Progress`, `Failure`, `Song`).
"""

from bot.engine.contract import (
    Delivery,
    DeliveryError,
    Failure,
    Phase,
    Progress,
    RenderedSong,
    Song,
)
from bot.engine.errors import (
    AlreadyFinished,
    EngineClosed,
    EngineError,
    JobNotFound,
    NoProvider,
    NotAllowed,
    QuotaExceeded,
    Refused,
)
from bot.engine.facade import Admission, Engine, QuotaLine, QuotaStatus
from bot.engine.runner import EngineOptions
from bot.models import FailureKind, Job, JobState, Requester

__all__ = [
    "Admission",
    "AlreadyFinished",
    "Delivery",
    "DeliveryError",
    "Engine",
    "EngineClosed",
    "EngineError",
    "EngineOptions",
    "Failure",
    "FailureKind",
    "Job",
    "JobNotFound",
    "JobState",
    "NoProvider",
    "NotAllowed",
    "Phase",
    "Progress",
    "QuotaExceeded",
    "QuotaLine",
    "QuotaStatus",
    "Refused",
    "RenderedSong",
    "Requester",
    "Song",
]
