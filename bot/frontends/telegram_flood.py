"""Flood control for the Telegram bot: wait out a 429 (RetryAfter) and send again.

Plugged into python-telegram-bot as its rate limiter, so every Bot API call the front-end
makes (sendAudio, sendMessage, editMessageText...) is retried after the delay Telegram
gives instead of being lost. getUpdates never passes through here (the library's
polling loop has its own back-off).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from datetime import timedelta
from typing import Any

from telegram.error import RetryAfter
from telegram.ext import BaseRateLimiter

log = logging.getLogger(__name__)

# A chat action only matters for the next few seconds: after a 429 it is stale.
NOT_RETRIED = frozenset({"sendChatAction"})


def retry_after_seconds(exc: RetryAfter) -> float:
    """The wait Telegram asked for, in seconds (PTB gives int or timedelta)."""
    value = exc._retry_after  # the timedelta behind the deprecated int property
    if isinstance(value, timedelta):
        return max(0.0, value.total_seconds())
    return max(0.0, float(value))


class RetryAfterLimiter(BaseRateLimiter[None]):
    """Reacts only when needed: on RetryAfter, sleep the given delay and call again."""

    def __init__(
        self,
        max_retries: int = 5,
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        not_retried: frozenset[str] = NOT_RETRIED,
    ) -> None:
        self.max_retries = max_retries
        self._sleep = sleep
        self._not_retried = not_retried

    async def initialize(self) -> None:
        """Nothing to open."""

    async def shutdown(self) -> None:
        """Nothing to close."""

    async def process_request(
        self,
        callback: Callable[..., Coroutine[Any, Any, bool | dict[str, Any] | list[dict[str, Any]]]],
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        data: dict[str, Any],
        rate_limit_args: None,
    ) -> bool | dict[str, Any] | list[dict[str, Any]]:
        attempt = 0
        while True:
            try:
                return await callback(*args, **kwargs)
            except RetryAfter as exc:
                attempt += 1
                if endpoint in self._not_retried or attempt > self.max_retries:
                    raise
                delay = retry_after_seconds(exc)
                log.warning(
                    "Telegram flood control on %s: waiting %.1f s (retry %d of %d)",
                    endpoint,
                    delay,
                    attempt,
                    self.max_retries,
                )
                await self._sleep(delay)
