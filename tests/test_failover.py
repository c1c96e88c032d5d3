"""Routing and failover through the real engine, with two fake provider servers."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest

from bot.engine import NoProvider
from bot.models import Requester
from bot.requests import GenerationRequest
from providers.acestep import AceStepProvider
from providers.fal import FalProvider
from providers.replicate import ReplicateProvider
from providers.wavespeed import WaveSpeedProvider
from tests.conftest import make_settings
from tests.enginekit import RecordingDelivery, open_engine, wait_for_state
from tests.fakes.acestep import FakeAceStep
from tests.fakes.fal import FakeFal
from tests.fakes.wavespeed import FakeWaveSpeed

USER = Requester("telegram", "7", "-100")


def prompt(**kw: object) -> GenerationRequest:
    return GenerationRequest.build(
        mode="prompt", prompt="synthwave night drive", duration=kw.pop("duration", 6), **kw
    )


def fal(fake: FakeFal, url: str) -> FalProvider:
    return FalProvider(fake.key, url, poll_interval=0.01, retry_delays=(0.01,))


def wavespeed(fake: FakeWaveSpeed, url: str) -> WaveSpeedProvider:
    return WaveSpeedProvider(fake.api_key, url, poll_interval=0.01, retry_backoff=0.01)


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def test_busy_first_provider_falls_through_to_the_second(tmp_path: Path) -> None:
    first, second = FakeFal(), FakeWaveSpeed()
    first.rate_limited = 100
    first.retry_after = 30
    delivery = RecordingDelivery(platform="telegram")
    async with first.running() as f_url, second.running() as w_url:
        engine = await open_engine(
            make_settings(tmp_path), [fal(first, f_url), wavespeed(second, w_url)], delivery
        )
        try:
            adm = await engine.submit(prompt(), USER, {})
            job = await wait_for_state(engine, adm.job_id, ("delivered",))
        finally:
            await engine.close()
    assert first.submit_count == 1 and second.submit_count == 1
    assert job.provider == "wavespeed" and job.result and job.result.provider == "wavespeed"
    assert delivery.delivered_ids() == [adm.job_id]


async def test_unreachable_first_provider_falls_through(tmp_path: Path) -> None:
    second = FakeWaveSpeed()
    delivery = RecordingDelivery(platform="telegram")
    async with second.running() as w_url:
        down = FalProvider("fal-key-0000000000", closed_port(), poll_interval=0.01)
        engine = await open_engine(
            make_settings(tmp_path), [down, wavespeed(second, w_url)], delivery
        )
        try:
            adm = await engine.submit(prompt(), USER, {})
            job = await wait_for_state(engine, adm.job_id, ("delivered",))
        finally:
            await engine.close()
    assert job.provider == "wavespeed"
    assert job.tried_providers == ["fal"]  # an unanswered submit is never resent there


async def test_rejection_is_not_failed_over_and_the_user_is_told(tmp_path: Path) -> None:
    first, second = FakeFal(), FakeWaveSpeed()
    first.content_policy = True
    delivery = RecordingDelivery(platform="telegram")
    async with first.running() as f_url, second.running() as w_url:
        engine = await open_engine(
            make_settings(tmp_path), [fal(first, f_url), wavespeed(second, w_url)], delivery
        )
        try:
            adm = await engine.submit(prompt(), USER, {})
            job = await wait_for_state(engine, adm.job_id, ("failed",))
        finally:
            await engine.close()
    assert second.submit_count == 0
    assert job.refunded
    [(_, message)] = delivery.failures
    assert message.startswith("The music service refused this request")
    assert message.endswith("Your quota was refunded.")


async def test_auth_failure_cools_the_provider_down_for_later_jobs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = FakeFal(), FakeWaveSpeed()
    first.unauthorized = True
    caplog.set_level(logging.INFO)
    delivery = RecordingDelivery(platform="telegram")
    async with first.running() as f_url, second.running() as w_url:
        engine = await open_engine(
            make_settings(tmp_path), [fal(first, f_url), wavespeed(second, w_url)], delivery
        )
        try:
            one = await engine.submit(prompt(), USER, {})
            await wait_for_state(engine, one.job_id, ("delivered",))
            two = await engine.submit(prompt(), USER, {})
            await wait_for_state(engine, two.job_id, ("delivered",))
        finally:
            await engine.close()
    assert first.submit_count == 1  # the second job did not try fal while it cooled down
    assert second.submit_count == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("fal AuthError" in line and "check the key" in line for line in errors)
    assert all(first.key not in r.getMessage() for r in caplog.records)


async def test_remote_failure_after_acceptance_is_retried_once_elsewhere(tmp_path: Path) -> None:
    first, second = FakeFal(queue_polls=0), FakeWaveSpeed()
    first.run_error = ("GPU fell over", "internal_error")
    delivery = RecordingDelivery(platform="telegram")
    async with first.running() as f_url, second.running() as w_url:
        engine = await open_engine(
            make_settings(tmp_path), [fal(first, f_url), wavespeed(second, w_url)], delivery
        )
        try:
            adm = await engine.submit(prompt(seed=99), USER, {})
            job = await wait_for_state(engine, adm.job_id, ("delivered",))
        finally:
            await engine.close()
    assert (first.submit_count, second.submit_count) == (1, 1)
    assert second.bodies[0]["seed"] == 99  # the same seed, so the song is the same request
    assert job.attempts == 2


async def test_router_respects_modes_and_says_which_options_are_ignored(tmp_path: Path) -> None:
    song_only = ReplicateProvider("r8_test_token_000000", "http://127.0.0.1:9")
    ws = FakeWaveSpeed()
    async with ws.running() as w_url:
        engine = await open_engine(
            make_settings(tmp_path),
            [song_only, wavespeed(ws, w_url)],
            RecordingDelivery(platform="telegram"),
        )
        try:
            adm = await engine.submit(prompt(steps=40, scheduler="heun"), USER, {})
            assert adm.provider == "wavespeed"
            assert adm.ignored_options == ["scheduler", "steps"]
            await wait_for_state(engine, adm.job_id, ("delivered",))
        finally:
            await engine.close()
    assert ws.submit_count == 1


async def test_no_capable_provider_is_refused_before_anything_is_stored(tmp_path: Path) -> None:
    song_only = ReplicateProvider("r8_test_token_000000", "http://127.0.0.1:9")
    engine = await open_engine(
        make_settings(tmp_path), [song_only], RecordingDelivery(platform="telegram")
    )
    try:
        with pytest.raises(NoProvider, match="cannot make a described song"):
            await engine.submit(prompt(), USER, {})
        assert await engine.store.recent() == []
    finally:
        await engine.close()


async def test_local_gpu_restart_losing_the_task_is_resubmitted_and_delivered(
    tmp_path: Path,
) -> None:
    gpu = FakeAceStep(polls_queued=0, polls_running=10_000)
    delivery = RecordingDelivery(platform="telegram")
    async with gpu.running() as url:
        provider = AceStepProvider([url], poll_interval=0.01, recheck_after=0.0)
        engine = await open_engine(make_settings(tmp_path), [provider], delivery)
        try:
            adm = await engine.submit(
                GenerationRequest.build(mode="song", tags="ambient, piano", duration=12, seed=5),
                USER,
                {},
            )
            await wait_for_state(engine, adm.job_id, ("running",))
            await asyncio.sleep(0.1)
            await gpu.restart()  # its in-memory queue is gone
            # Only now may a task finish at once: set before the restart, a poll during
            # it could find the first task done, and nothing would be lost to resubmit.
            gpu.polls_running = 1
            job = await wait_for_state(engine, adm.job_id, ("delivered",), timeout=20)
        finally:
            await engine.close()
    assert gpu.submit_count == 2
    assert [s["seed"] for s in gpu.submits] == [5, 5]
    assert delivery.delivered_ids() == [adm.job_id]
    assert job.provider == "acestep"


# -- issue 13: the local GPU as the real server behaves --------------------------------------


async def test_prompt_songs_fall_back_from_a_gpu_server_without_its_language_model(
    tmp_path: Path,
) -> None:
    gpu = FakeAceStep(lm=False)  # f30aee4: /health does not say; the first song finds out
    cloud = FakeFal(queue_polls=0, progress_polls=0)
    delivery = RecordingDelivery(platform="telegram")
    async with gpu.running() as g_url, cloud.running() as f_url:
        local = AceStepProvider([g_url], poll_interval=0.01, recheck_after=0.0)
        engine = await open_engine(make_settings(tmp_path), [local, fal(cloud, f_url)], delivery)
        try:
            first = await engine.submit(prompt(duration=10), USER, {})
            job = await wait_for_state(engine, first.job_id, ("delivered", "failed"), timeout=20)
            # Now known: the next described song goes straight to fal; composed ones
            # still go to the GPU.
            second = await engine.submit(prompt(duration=10), USER, {})
            await wait_for_state(engine, second.job_id, ("delivered",), timeout=20)
            composed = await engine.submit(
                GenerationRequest.build(mode="song", tags="ambient", duration=10), USER, {}
            )
            done = await wait_for_state(engine, composed.job_id, ("delivered",), timeout=20)
        finally:
            await engine.close()
    assert job.state == "delivered" and job.provider == "fal"
    assert delivery.failures == []  # the user never saw the GPU's failure
    assert [b.get("analysis_only") for b in gpu.submits] == [True, None]
    assert cloud.submit_count == 2
    assert done.provider == "acestep"


async def test_option_ranges_route_and_say_which_provider_limits_applied(
    tmp_path: Path,
) -> None:
    gpu = FakeAceStep(polls_queued=0, polls_running=0)
    cloud = FakeFal(queue_polls=0, progress_polls=0)
    delivery = RecordingDelivery(platform="telegram")
    async with gpu.running() as g_url, cloud.running() as f_url:
        local = AceStepProvider([g_url], poll_interval=0.01)
        engine = await open_engine(make_settings(tmp_path), [local, fal(cloud, f_url)], delivery)
        try:
            song = {"mode": "song", "tags": "ambient", "duration": 10}
            # 40 steps: more than ACE-Step 1.5 turbo takes (1-20), within fal's 3-60.
            adm = await engine.submit(GenerationRequest.build(**song, steps=40), USER, {})
            job = await wait_for_state(engine, adm.job_id, ("delivered",), timeout=20)
            with pytest.raises(NoProvider) as refused:
                await engine.submit(GenerationRequest.build(**song, steps=100), USER, {})
            stored = await engine.store.recent()
        finally:
            await engine.close()
    assert job.provider == "fal" and cloud.submits[0].body["number_of_steps"] == 40
    assert gpu.submit_count == 0
    assert str(refused.value) == (
        "steps: 100 is not available here; acestep takes from 1 to 20; fal takes from 3 to 60. "
        "Choose a value in one of those ranges, or leave it out."
    )
    assert [j.id for j in stored] == [adm.job_id]  # the refused one stored nothing


async def test_a_gpu_server_that_ignores_seeds_is_not_shown_with_a_wrong_seed(
    tmp_path: Path,
) -> None:
    gpu = FakeAceStep(polls_queued=0, polls_running=0, honours_seeds=False)
    delivery = RecordingDelivery(platform="telegram")
    async with gpu.running() as url:
        engine = await open_engine(
            make_settings(tmp_path), [AceStepProvider([url], poll_interval=0.01)], delivery
        )
        try:
            adm = await engine.submit(
                GenerationRequest.build(mode="song", tags="ambient", duration=10, seed=42),
                USER,
                {},
            )
            job = await wait_for_state(engine, adm.job_id, ("delivered",), timeout=20)
            song = engine.song_for(job)
        finally:
            await engine.close()
    assert gpu.submits[0]["seed"] == 42
    assert song.seed != 42 and song.seed_honoured is False
