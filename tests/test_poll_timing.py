"""Poll pacing: a running song whose status never changes is still noticed promptly."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from bot.engine import Engine, EngineOptions
from bot.models import Requester
from bot.requests import GenerationRequest
from providers.fal import FalProvider
from tests.conftest import make_settings
from tests.enginekit import FAST, RecordingDelivery, wait_for_state
from tests.fakes.fal import FakeFal, FakeRequest
from tests.fakes.http import json_response


class SilentFal(FakeFal):
    """fal answering IN_PROGRESS with the same log for `silent_polls` polls, then done:
    a model that writes nothing while it generates."""

    def __init__(self, silent_polls: int) -> None:
        super().__init__(queue_polls=0, progress_polls=0)
        self.silent_polls = silent_polls
        self.poll_times: list[float] = []

    async def _status(self, request: web.Request) -> web.Response:
        found = self._lookup(request)
        if isinstance(found, FakeRequest) and self._gate(request) is None:
            self.poll_times.append(time.monotonic())
            if found.polls < self.silent_polls:
                found.polls += 1
                return json_response(
                    {
                        "request_id": found.request_id,
                        "status": "IN_PROGRESS",
                        "logs": [
                            {
                                "message": "Generating",
                                "level": "INFO",
                                "source": "user",
                                "timestamp": "2026-01-01T00:00:00.000000",
                            }
                        ],
                        **self._urls(request, found.request_id),
                    },
                    status=202,
                )
        return await super()._status(request)


async def one_song(tmp_path: Path, provider: FalProvider, options: EngineOptions) -> float:
    """One described song through the real engine; seconds until it was ready."""
    engine = await Engine.open(make_settings(tmp_path), [provider], options=options)
    engine.register_delivery(RecordingDelivery(byte_limit=None))
    await engine.start()
    try:
        started = time.monotonic()
        adm = await engine.submit(
            GenerationRequest.build(mode="prompt", prompt="rain on a tin roof", duration=5),
            Requester("discord", "1"),
            {},
        )
        await wait_for_state(engine, adm.job_id, ("ready", "delivered"), timeout=4)
        took = time.monotonic() - started
        await wait_for_state(engine, adm.job_id, ("delivered",), timeout=4)
        return took
    finally:
        await engine.close()


async def test_unchanged_running_status_is_polled_at_the_provider_interval(tmp_path: Path) -> None:
    fake = SilentFal(silent_polls=10)
    fake.streams = False  # a queue without the status stream: polling is the fallback
    # Backing off x3 up to 5 s, as a long-queued job may: ten silent polls would take over
    # ten seconds. While running, the cap (below fal's interval here) must hold them at
    # the provider's own interval instead, and never closer.
    options = replace(FAST, poll_max_interval=5.0, poll_backoff=3.0, running_poll_max_interval=0.01)
    async with fake.running() as url:
        provider = FalProvider(fake.key, url, poll_interval=0.05, retry_delays=(0.01,))
        await one_song(tmp_path, provider, options)
    assert len(fake.stream_paths) == 1  # tried once, then polled
    assert len(fake.poll_times) == 11  # ten silent answers, then COMPLETED
    gaps = [b - a for a, b in zip(fake.poll_times, fake.poll_times[1:], strict=False)]
    assert min(gaps) >= 0.045, gaps  # never faster than the provider asks
    assert max(gaps) < 0.5, gaps  # and no back-off while it runs


async def test_a_streamed_status_is_known_at_once_without_polling(tmp_path: Path) -> None:
    """fal's status stream says COMPLETED as soon as it is: no status GETs, and no
    back-off while the request waits in fal's queue (it reports its position)."""
    fake = FakeFal(queue_polls=6, progress_polls=6)
    fake.stream_interval = 0.02
    options = replace(FAST, poll_max_interval=10.0, poll_backoff=3.0)
    async with fake.running() as url:
        provider = FalProvider(fake.key, url, poll_interval=1.0, retry_delays=(0.01,))
        took = await one_song(tmp_path, provider, options)
    assert fake.status_paths == []  # every status came over the stream
    assert fake.stream_paths  # opened at least once
    # Twelve status steps 0.02 s apart: well under one poll interval (1 s) in all, where
    # polling would have taken 12 s or more.
    assert took < 1.5, took
