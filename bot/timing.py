"""Waiting with a timeout without losing a cancellation.

Python 3.11's `asyncio.wait_for` returns normally when the task is cancelled at the
moment the awaited thing completes, so the cancellation is lost and a task being stopped
runs on (seen as a shutdown that hangs). `asyncio.timeout` has no such gap.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until `event` is set or `timeout` seconds pass; True when it is set."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


async def within(awaitable: Awaitable[T], timeout: float) -> T:
    """`awaitable`'s result, or TimeoutError after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        return await awaitable
