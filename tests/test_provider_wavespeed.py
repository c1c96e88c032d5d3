"""WaveSpeed adapter against a fake WaveSpeed v3 server on 127.0.0.1."""

from __future__ import annotations

import io
import wave
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web

from bot.requests import GenerationRequest, Mode
from providers.base import (
    AuthError,
    BillingError,
    Busy,
    Cancelled,
    CancelOutcome,
    Failed,
    Handle,
    ProviderError,
    ProviderFailedDownload,
    Queued,
    Rejected,
    Running,
    Status,
    Succeeded,
    TaskLost,
    Unavailable,
)
from providers.download import AddressPolicy
from providers.wavespeed import WaveSpeedProvider
from tests.fakes.http import serve
from tests.fakes.wavespeed import FakeWaveSpeed

Factory = Callable[..., WaveSpeedProvider]


class SleepLog:
    """Stands in for asyncio.sleep: records the waits instead of waiting."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.fixture
async def fake() -> AsyncIterator[FakeWaveSpeed]:
    server = FakeWaveSpeed()
    async with server.running():
        yield server


@pytest.fixture
def sleeps() -> SleepLog:
    return SleepLog()


@pytest.fixture
async def make(fake: FakeWaveSpeed, sleeps: SleepLog) -> AsyncIterator[Factory]:
    made: list[WaveSpeedProvider] = []

    def factory(**kwargs: object) -> WaveSpeedProvider:
        api_key = str(kwargs.pop("api_key", fake.api_key))
        base_url = str(kwargs.pop("base_url", fake.base_url))
        kwargs.setdefault("sleep", sleeps)
        provider = WaveSpeedProvider(api_key, base_url, **kwargs)  # type: ignore[arg-type]
        made.append(provider)
        return provider

    yield factory
    for provider in made:
        await provider.aclose()


def prompt_request(**fields: object) -> GenerationRequest:
    return GenerationRequest.build(
        mode="prompt", prompt="lofi piano about rain", duration=5, **fields
    )


def song_request(**fields: object) -> GenerationRequest:
    fields.setdefault("lyrics", "[verse]\nrain on the window\n[chorus]\nstay inside")
    return GenerationRequest.build(mode="song", tags="lofi, piano, rain", duration=6, **fields)


async def poll_until_done(
    provider: WaveSpeedProvider, handle: Handle, limit: int = 10
) -> list[Status]:
    seen: list[Status] = []
    for _ in range(limit):
        status = await provider.poll(handle)
        seen.append(status)
        if not isinstance(status, Queued | Running):
            return seen
    raise AssertionError(f"job never finished: {seen}")


def wav_seconds(data: bytes) -> float:
    with wave.open(io.BytesIO(data)) as w:
        return w.getnframes() / w.getframerate()


# -- happy paths ----------------------------------------------------------------------


async def test_prompt_mode_end_to_end(fake: FakeWaveSpeed, make: Factory) -> None:
    provider = make()
    handle = await provider.submit(prompt_request(), seed=1234)

    assert fake.submits == [
        {
            "model": "wavespeed-ai/ace-step/prompt-to-audio",
            "body": {
                "prompt": "lofi piano about rain",
                "instrumental": False,
                "duration": 5,
                "seed": 1234,
            },
        }
    ]
    seen = await poll_until_done(provider, handle)
    assert seen[:2] == [Queued(None), Running()]
    assert isinstance(seen[-1], Succeeded)
    result = seen[-1].result
    job_id = handle.data["id"]
    assert result.audio_url == f"{fake.base_url}/files/{job_id}.wav"
    assert result.seed == 1234
    assert result.metadata["inference_time_s"] == pytest.approx(4.321)
    assert result.metadata["nsfw"] is False
    assert result.metadata["model"] == "wavespeed-ai/ace-step/prompt-to-audio"

    audio = await provider.fetch_audio(result)
    assert audio == fake.audio_for(job_id)
    assert audio[:4] == b"RIFF"
    assert wav_seconds(audio) == pytest.approx(5.0)


async def test_prompt_mode_instrumental_flag(fake: FakeWaveSpeed, make: Factory) -> None:
    await make().submit(prompt_request(instrumental=True), seed=7)
    assert fake.bodies[0]["instrumental"] is True


async def test_song_mode_ace_step_sends_tags_and_lyrics(fake: FakeWaveSpeed, make: Factory) -> None:
    provider = make()
    handle = await provider.submit(song_request(), seed=99)

    assert fake.submits == [
        {
            "model": "wavespeed-ai/ace-step",
            "body": {
                "tags": "lofi, piano, rain",
                "lyrics": "[verse]\nrain on the window\n[chorus]\nstay inside",
                "duration": 6,
                "seed": 99,
            },
        }
    ]
    seen = await poll_until_done(provider, handle)
    assert isinstance(seen[-1], Succeeded)
    assert wav_seconds(await provider.fetch_audio(seen[-1].result)) == pytest.approx(6.0)


async def test_song_mode_ace_step_15(fake: FakeWaveSpeed, make: Factory) -> None:
    provider = make(song_model="wavespeed-ai/ace-step-1.5")
    handle = await provider.submit(song_request(), seed=5)

    assert fake.submits[0]["model"] == "wavespeed-ai/ace-step-1.5"
    assert fake.bodies[0] == {
        "tags": "lofi, piano, rain",
        "lyrics": "[verse]\nrain on the window\n[chorus]\nstay inside",
        "duration": 6,
        "seed": 5,
    }
    seen = await poll_until_done(provider, handle)
    assert isinstance(seen[-1], Succeeded)
    assert seen[-1].result.metadata["model"] == "wavespeed-ai/ace-step-1.5"


@pytest.mark.parametrize(
    ("song_model", "fields", "sent_lyrics"),
    [
        ("wavespeed-ai/ace-step", {"instrumental": True}, "[inst]"),
        ("wavespeed-ai/ace-step", {"lyrics": ""}, "[inst]"),
        ("wavespeed-ai/ace-step", {"lyrics": "[instrumental]"}, "[inst]"),
        ("wavespeed-ai/ace-step-1.5", {"instrumental": True}, ""),
        ("wavespeed-ai/ace-step-1.5", {"lyrics": "[inst]"}, ""),
    ],
)
async def test_song_mode_no_vocals_uses_each_models_marker(
    fake: FakeWaveSpeed, make: Factory, song_model: str, fields: dict[str, object], sent_lyrics: str
) -> None:
    await make(song_model=song_model).submit(song_request(**fields), seed=1)
    assert fake.bodies[0]["lyrics"] == sent_lyrics


async def test_nsfw_flag_is_surfaced(fake: FakeWaveSpeed, make: Factory) -> None:
    fake.nsfw = True
    provider = make()
    seen = await poll_until_done(provider, await provider.submit(prompt_request(), seed=1))
    assert isinstance(seen[-1], Succeeded)
    assert seen[-1].result.metadata["has_nsfw_contents"] == [True]
    assert seen[-1].result.metadata["nsfw"] is True


# -- capabilities and prices ----------------------------------------------------------


async def test_capabilities_follow_the_song_model(make: Factory) -> None:
    plain = make(concurrency=3)
    assert plain.capabilities.modes == frozenset({Mode.PROMPT, Mode.SONG})
    assert plain.capabilities.options == {}
    assert plain.capabilities.concurrency == 3
    assert plain.capabilities.price_per_second == pytest.approx(0.0002)
    assert plain.price_per_second_for(song_request()) == pytest.approx(0.0002)

    v15 = make(song_model="wavespeed-ai/ace-step-1.5")
    assert v15.capabilities.price_per_second == pytest.approx(0.0003)
    assert v15.price_per_second_for(song_request()) == pytest.approx(0.0003)
    assert v15.price_per_second_for(prompt_request()) == pytest.approx(0.0002)


async def test_advanced_options_are_reported_as_ignored(make: Factory, fake: FakeWaveSpeed) -> None:
    provider = make()
    request = prompt_request(steps=40, scheduler="heun")
    assert provider.capabilities.ignored_options(request) == ["scheduler", "steps"]
    await provider.submit(request, seed=3)
    # Exactly the documented fields: no option under its own name or a wire name.
    assert fake.bodies == [
        {"prompt": "lofi piano about rain", "instrumental": False, "duration": 5, "seed": 3}
    ]


async def test_unknown_song_model_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match=r"ace-step-1\.5"):
        WaveSpeedProvider("key", song_model="wavespeed-ai/ace-step-2")


# -- failures reported in a 200 answer -----------------------------------------------


async def test_failed_run_is_reported_with_its_reason(fake: FakeWaveSpeed, make: Factory) -> None:
    fake.outcome = "failed"
    provider = make()
    seen = await poll_until_done(provider, await provider.submit(prompt_request(), seed=1))
    assert seen[-1] == Failed("Inference failed: CUDA out of memory", rejected=False)


async def test_content_policy_failure_is_a_rejection(fake: FakeWaveSpeed, make: Factory) -> None:
    fake.outcome = "failed"
    fake.failure_error = "Prompt flagged as NSFW content"
    provider = make()
    seen = await poll_until_done(provider, await provider.submit(prompt_request(), seed=1))
    assert isinstance(seen[-1], Failed) and seen[-1].rejected


async def test_timeout_and_cancelled_outcomes(fake: FakeWaveSpeed, make: Factory) -> None:
    provider = make()
    fake.outcome = "timeout"
    timed_out = await provider.submit(prompt_request(), seed=1)
    fake.outcome = "cancelled"
    cancelled = await provider.submit(prompt_request(), seed=2)
    last = (await poll_until_done(provider, timed_out))[-1]
    assert isinstance(last, Failed) and "timed out" in last.reason
    assert (await poll_until_done(provider, cancelled))[-1] == Cancelled()


async def test_cancel_is_not_supported_and_sends_nothing(
    fake: FakeWaveSpeed, make: Factory
) -> None:
    provider = make()
    handle = await provider.submit(prompt_request(), seed=1)
    assert await provider.cancel(handle) is CancelOutcome.REFUSED
    assert fake.poll_paths == []


# -- result paths ---------------------------------------------------------------------


async def test_falls_back_to_plain_prediction_path_on_404(
    fake: FakeWaveSpeed, make: Factory
) -> None:
    fake.result_path = False
    fake.queued_polls = fake.running_polls = 0
    provider = make()
    first = await provider.submit(prompt_request(), seed=1)
    second = await provider.submit(prompt_request(), seed=2)
    assert isinstance(await provider.poll(first), Succeeded)
    assert isinstance(await provider.poll(second), Succeeded)
    ids = first.data["id"], second.data["id"]
    # Tries /result once, then remembers that this server only has the plain path.
    assert fake.poll_paths == [
        f"/api/v3/predictions/{ids[0]}/result",
        f"/api/v3/predictions/{ids[0]}",
        f"/api/v3/predictions/{ids[1]}",
    ]


async def test_lost_prediction_is_task_lost(fake: FakeWaveSpeed, make: Factory) -> None:
    provider = make()
    handle = await provider.submit(prompt_request(), seed=1)
    fake.forget_jobs()
    with pytest.raises(TaskLost):
        await provider.poll(handle)


# -- error shapes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "message", "code", "error_type"),
    [
        (400, "prompt is required", None, Rejected),
        (200, "duration must be between 5 and 240", 400, Rejected),  # error inside a 200
        (401, "Unauthorized", None, AuthError),
        (403, "Forbidden", None, AuthError),
        (402, "Insufficient balance", None, BillingError),
        (403, "Insufficient balance, please top up", None, BillingError),
        (200, "Insufficient balance", 402, BillingError),
        (429, "Too many requests", None, Busy),
        (503, "Service busy", None, Busy),
        (500, "Internal server error", None, Unavailable),
        (502, "Bad gateway", None, Unavailable),
    ],
)
async def test_submit_errors_map_to_typed_errors(
    fake: FakeWaveSpeed,
    make: Factory,
    status: int,
    message: str,
    code: int | None,
    error_type: type[ProviderError],
) -> None:
    fake.fail_next("submit", status, message, code=code)
    with pytest.raises(error_type) as caught:
        await make().submit(prompt_request(), seed=1)
    assert type(caught.value) is error_type
    assert message in caught.value.message
    assert caught.value.status_code == (code or status)
    # Submits are never retried: the fake saw exactly one attempt (which it refused).
    assert fake.submit_attempts == 1 and fake.jobs == {}


async def test_rate_limit_carries_retry_after(fake: FakeWaveSpeed, make: Factory) -> None:
    fake.fail_next("submit", 429, "Too many requests", retry_after=12)
    with pytest.raises(Busy) as caught:
        await make().submit(prompt_request(), seed=1)
    assert caught.value.retry_after == 12.0


async def test_wrong_key_is_auth_error_without_the_key(fake: FakeWaveSpeed, make: Factory) -> None:
    # Some servers echo the key they refused; it must not reach our message.
    secret = fake.api_key
    fake.fail_next("submit", 401, f"Invalid API key {secret}")
    with pytest.raises(AuthError) as caught:
        await make().submit(prompt_request(), seed=1)
    assert secret not in str(caught.value)
    assert "***" in str(caught.value)


async def test_refused_key_sent_by_the_adapter(fake: FakeWaveSpeed, make: Factory) -> None:
    with pytest.raises(AuthError) as caught:
        await make(api_key="not-the-key").submit(prompt_request(), seed=1)
    assert caught.value.status_code == 401
    assert "not-the-key" not in str(caught.value)


async def test_unreachable_server_is_unavailable(make: Factory) -> None:
    async with serve(web.Application()) as url:
        closed = url
    provider = make(base_url=closed, poll_retries=0)
    with pytest.raises(Unavailable, match="connection failed"):
        await provider.submit(prompt_request(), seed=1)
    with pytest.raises(Unavailable):
        await provider.poll(Handle("wavespeed", {"id": "abc", "model": "m", "seed": 1}))


async def test_slow_submit_times_out_as_unavailable(fake: FakeWaveSpeed, make: Factory) -> None:
    fake.stall_next("submit", 0.5)
    with pytest.raises(Unavailable, match="timed out"):
        await make(timeout=0.1).submit(prompt_request(), seed=1)


# -- poll retries ---------------------------------------------------------------------


async def test_poll_retries_server_errors_with_backoff(
    fake: FakeWaveSpeed, make: Factory, sleeps: SleepLog
) -> None:
    provider = make(retry_backoff=0.5)
    handle = await provider.submit(prompt_request(), seed=1)
    fake.fail_next("poll", 500, "Internal error", times=2)
    assert await provider.poll(handle) == Queued(None)
    assert sleeps.waits == [0.5, 1.0]


async def test_poll_honours_retry_after(
    fake: FakeWaveSpeed, make: Factory, sleeps: SleepLog
) -> None:
    provider = make(retry_backoff=0.5)
    handle = await provider.submit(prompt_request(), seed=1)
    fake.fail_next("poll", 429, "slow down", retry_after=7)
    assert await provider.poll(handle) == Queued(None)
    assert sleeps.waits == [7.0]


async def test_poll_gives_up_after_its_retries(
    fake: FakeWaveSpeed, make: Factory, sleeps: SleepLog
) -> None:
    provider = make(poll_retries=2)
    handle = await provider.submit(prompt_request(), seed=1)
    fake.fail_next("poll", 502, "Bad gateway", times=5)
    with pytest.raises(Unavailable):
        await provider.poll(handle)
    assert len(fake.poll_paths) == 3 and len(sleeps.waits) == 2


async def test_poll_does_not_retry_auth_errors(
    fake: FakeWaveSpeed, make: Factory, sleeps: SleepLog
) -> None:
    provider = make()
    handle = await provider.submit(prompt_request(), seed=1)
    fake.fail_next("poll", 401, "Unauthorized")
    with pytest.raises(AuthError):
        await provider.poll(handle)
    assert sleeps.waits == []


# -- restart and download ------------------------------------------------------------


async def test_resume_from_stored_handle_in_a_new_adapter(
    fake: FakeWaveSpeed, make: Factory
) -> None:
    first = make(song_model="wavespeed-ai/ace-step-1.5")
    handle = await first.submit(song_request(), seed=4242)
    assert await first.poll(handle) == Queued(None)
    await first.aclose()

    stored = handle.to_json()
    restored = Handle.from_json(stored)
    second = make(song_model="wavespeed-ai/ace-step-1.5")
    seen = await poll_until_done(second, restored)
    assert seen[0] == Running()
    assert isinstance(seen[-1], Succeeded)
    assert seen[-1].result.seed == 4242
    audio = await second.fetch_audio(seen[-1].result)
    assert wav_seconds(audio) == pytest.approx(6.0)


async def test_key_is_not_sent_to_another_host(fake: FakeWaveSpeed, make: Factory) -> None:
    fake.audio_host = "localhost"  # same server, different origin: like a CDN
    fake.queued_polls = fake.running_polls = 0
    provider = make()
    # The fake's "CDN" is another loopback origin: allowed here on purpose (a real bot
    # downloads from public addresses and the provider's own origin only).
    provider.address_policy = AddressPolicy.allowing("127.0.0.0/8")
    status = await provider.poll(await provider.submit(prompt_request(), seed=1))
    assert isinstance(status, Succeeded)
    assert status.result.audio_url.startswith("http://localhost:")
    audio = await provider.fetch_audio(status.result)
    assert audio[:4] == b"RIFF"
    assert "Authorization" not in fake.audio_requests[-1]


async def test_expired_audio_is_a_failed_download(fake: FakeWaveSpeed, make: Factory) -> None:
    fake.queued_polls = fake.running_polls = 0
    provider = make()
    status = await provider.poll(await provider.submit(prompt_request(), seed=1))
    assert isinstance(status, Succeeded)
    fake.fail_next("audio", 404)
    with pytest.raises(ProviderFailedDownload):
        await provider.fetch_audio(status.result)
