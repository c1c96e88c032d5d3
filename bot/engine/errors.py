"""Refusals the engine raises to a front-end; `str()` of each is the sentence to show."""

from __future__ import annotations

from datetime import datetime


class EngineError(Exception):
    """A user-facing refusal; str() is the sentence to show."""


class QuotaExceeded(EngineError):
    def __init__(
        self,
        limit: str,
        remaining: float,
        limit_value: float,
        resets_at: datetime | None,
        message: str,
    ) -> None:
        self.limit = limit
        self.remaining = remaining
        self.limit_value = limit_value
        self.resets_at = resets_at
        super().__init__(message)


class JobNotFound(EngineError):
    pass


class NotAllowed(EngineError):
    pass


class AlreadyFinished(EngineError):
    pass


class EngineClosed(EngineError):
    pass


class NoProvider(EngineError):
    """No configured provider can serve this request (mode, duration or options)."""


class Refused(EngineError):
    """The request contains a word or phrase a ban list refuses (`listed_by`: which
    list, "operator" or "community"); the sentence shown is neutral."""

    def __init__(self, listed_by: str, message: str) -> None:
        self.listed_by = listed_by
        super().__init__(message)
