"""bot/timing.py: a task stopped while the event it waits for is being set stops (with
Python 3.11's asyncio.wait_for it ran on: a shutdown then hung)."""

from __future__ import annotations

import asyncio

import pytest

from bot.timing import wait_event, within


async def test_a_cancel_that_meets_a_set_event_is_not_lost() -> None:
    event = asyncio.Event()
    ran_on = asyncio.Event()

    async def worker() -> None:
        await wait_event(event, 30)
        ran_on.set()
        await asyncio.sleep(30)

    task = asyncio.create_task(worker())
    await asyncio.sleep(0)
    event.set()  # the wait completes...
    task.cancel()  # ...in the same step as the stop
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    assert not ran_on.is_set()


async def test_wait_event_says_whether_the_event_came() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    event.set()
    assert await wait_event(event, 0.01) is True
    with pytest.raises(TimeoutError):
        await within(asyncio.sleep(1), 0.01)
