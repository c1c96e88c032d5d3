"""AIgateway adapter against a fake AIgateway server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import wave
from collections.abc import AsyncIterator, Callable

import av
import pytest
from aiohttp import web

from bot.requests import GenerationRequest, Mode
from providers.aigateway import AIGatewayProvider
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
from tests.fakes.aigateway import FakeAIGateway
from tests.fakes.http import serve

Factory = Callable[..., AIGatewayProvider]


class SleepLog:
    """Stands in for asyncio.sleep: records the waits instead of waiting."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.fixture
async def fake() -> AsyncIterator[FakeAIGateway]:
    server = FakeAIGateway()
    async with server.running():
        yield server


@pytest.fixture
def sleeps() -> SleepLog:
    return SleepLog()


@pytest.fixture
async def make(fake: FakeAIGateway, sleeps: SleepLog) -> AsyncIterator[Factory]:
    made: list[AIGatewayProvider] = []

    def factory(**kwargs: object) -> AIGatewayProvider:
        api_key = str(kwargs.pop("api_key", fake.api_key))
        base_url = str(kwargs.pop("base_url", fake.base_url))
        kwargs.setdefault("sleep", sleeps)
        provider = AIGatewayProvider(api_key, base_url, **kwargs)  # type: ignore[arg-type]
        made.append(provider)
        return provider

    yield factory
    for provider in made:
        await provider.aclose()


def prompt_request(**fields: object) -> GenerationRequest:
    return GenerationRequest.build(
        mode="prompt", prompt="synthwave drive at night", duration=5, **fields
    )


async def poll_until_done(
    provider: AIGatewayProvider, handle: Handle, limit: int = 10
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


# -- happy path -----------------------------------------------------------------------


async def test_prompt_mode_end_to_end(fake: FakeAIGateway, make: Factory) -> None:
    provider = make(audio_format="wav")
    handle = await provider.submit(prompt_request(), seed=1234)

    # No seed: the API does not document one and this fake refuses unknown fields.
    assert fake.submits == [
        {
            "prompt": "synthwave drive at night",
            "model": "ace-step/ace-step-prompt-to-audio",
            "duration": 5,
            "is_instrumental": False,
            "format": "wav",
        }
    ]
    seen = await poll_until_done(provider, handle)
    assert seen[:2] == [Queued(None), Running()]
    assert isinstance(seen[-1], Succeeded)
    result = seen[-1].result
    job_id = handle.data["id"]
    assert result.audio_url.startswith(f"{fake.base_url}/files/{job_id}.wav?")
    assert result.seed is None
    assert result.metadata["job_id"] == job_id
    assert result.metadata["cost"] == pytest.approx(0.001)
    assert result.metadata["duration"] == 5

    audio = await provider.fetch_audio(result)
    assert audio == fake.audio_for(job_id)
    assert audio[:4] == b"RIFF"
    assert wav_seconds(audio) == pytest.approx(5.0)


async def test_instrumental_and_mp3_format(fake: FakeAIGateway, make: Factory) -> None:
    fake.queued_polls = fake.running_polls = 0
    provider = make()  # MP3 unless configured or asked otherwise
    handle = await provider.submit(prompt_request(instrumental=True), seed=1)
    assert fake.submits[0]["is_instrumental"] is True
    assert fake.submits[0]["format"] == "mp3"
    status = await provider.poll(handle)
    assert isinstance(status, Succeeded)
    audio = await provider.fetch_audio(status.result)
    assert audio[:3] == b"ID3"
    with av.open(io.BytesIO(audio), "r") as container:
        assert container.duration is not None
        assert container.duration / 1_000_000 == pytest.approx(5.0, abs=0.1)


@pytest.mark.parametrize("url_field", ["result.url", "result.file_url", "result_url"])
async def test_audio_url_found_in_each_documented_place(
    fake: FakeAIGateway, make: Factory, url_field: str
) -> None:
    fake.url_field = url_field
    fake.queued_polls = fake.running_polls = 0
    provider = make()
    status = await provider.poll(await provider.submit(prompt_request(), seed=1))
    assert isinstance(status, Succeeded)
    assert "/files/" in status.result.audio_url
    assert (await provider.fetch_audio(status.result))[:3] == b"ID3"


async def test_docs_spelling_running_and_progress(fake: FakeAIGateway, make: Factory) -> None:
    fake.running_word = "running"
    fake.running_extra = {"progress": 40}
    fake.queued_polls = 0
    provider = make()
    handle = await provider.submit(prompt_request(), seed=1)
    assert await provider.poll(handle) == Running(progress=0.4)


async def test_capabilities(make: Factory) -> None:
    provider = make(concurrency=4, poll_interval=1.0)
    caps = provider.capabilities
    assert caps.modes == frozenset({Mode.PROMPT})
    assert not caps.can_serve(GenerationRequest.build(mode="song", tags="rock"))
    assert set(caps.options) == {"audio_format"}
    assert caps.price_per_second == pytest.approx(0.0002)
    assert caps.concurrency == 4
    assert provider.price_per_second_for(prompt_request()) == pytest.approx(0.0002)
    # Faster polls than every 3 s only earn 304s.
    assert provider.poll_interval() >= 3.0
    assert make(poll_interval=10.0).poll_interval() == 10.0


async def test_a_requested_audio_format_wins_and_others_are_not_served(
    fake: FakeAIGateway, make: Factory
) -> None:
    provider = make()
    await provider.submit(prompt_request(audio_format="wav"), seed=1)
    assert fake.submits[0]["format"] == "wav"
    assert provider.capabilities.ignored_options(prompt_request(audio_format="wav")) == []
    # FLAC is not among the formats AIgateway makes: routing skips it for such a request.
    assert not provider.capabilities.can_serve(prompt_request(audio_format="flac"))


async def test_unknown_audio_format_is_refused() -> None:
    with pytest.raises(ValueError, match="mp3"):
        AIGatewayProvider("key", audio_format="flac")


# -- 304 Not Modified ---------------------------------------------------------------


async def test_not_modified_keeps_the_last_known_status(fake: FakeAIGateway, make: Factory) -> None:
    fake.min_poll_interval = 60.0  # every poll after the first is "too soon"
    fake.queued_polls = 1
    provider = make()
    handle = await provider.submit(prompt_request(), seed=1)
    assert await provider.poll(handle) == Queued(None)
    assert await provider.poll(handle) == Queued(None)
    assert fake.polls == [200, 304]


async def test_not_modified_after_restart_means_running(fake: FakeAIGateway, make: Factory) -> None:
    provider = make()
    handle = await provider.submit(prompt_request(), seed=1)
    fake.fail_next("poll", 304)
    assert await provider.poll(handle) == Running()


async def test_polls_spaced_by_poll_interval_are_answered(
    fake: FakeAIGateway, make: Factory
) -> None:
    fake.min_poll_interval = 0.05
    provider = make()
    handle = await provider.submit(prompt_request(), seed=1)
    statuses = []
    for _ in range(3):
        statuses.append(await provider.poll(handle))
        await asyncio.sleep(0.06)
    assert fake.polls == [200, 200, 200]
    assert isinstance(statuses[-1], Succeeded)


# -- failures and cancel ------------------------------------------------------------


async def test_failed_job_reports_its_reason(fake: FakeAIGateway, make: Factory) -> None:
    fake.outcome = "failed"
    provider = make()
    seen = await poll_until_done(provider, await provider.submit(prompt_request(), seed=1))
    assert seen[-1] == Failed("Generation failed on the upstream model", rejected=False)


async def test_failed_job_with_plain_error_and_policy_code(
    fake: FakeAIGateway, make: Factory
) -> None:
    fake.outcome = "failed"
    fake.failure_error = {
        "message": "Your prompt was flagged",
        "type": "invalid_request_error",
        "code": "content_policy_violation",
    }
    provider = make()
    seen = await poll_until_done(provider, await provider.submit(prompt_request(), seed=1))
    assert isinstance(seen[-1], Failed) and seen[-1].rejected
    fake.failure_error = "model crashed"
    seen = await poll_until_done(provider, await provider.submit(prompt_request(), seed=2))
    assert seen[-1] == Failed("model crashed")


async def test_cancel_a_running_job(fake: FakeAIGateway, make: Factory) -> None:
    provider = make()
    handle = await provider.submit(prompt_request(), seed=1)
    assert await provider.poll(handle) == Queued(None)
    assert await provider.cancel(handle) is CancelOutcome.REQUESTED
    assert fake.cancels == [handle.data["id"]]
    fake.fail_next("poll", 304)  # polled too soon after the cancel: still cancelled
    assert await provider.poll(handle) == Cancelled()
    assert await provider.poll(handle) == Cancelled()
    assert fake.polls == [200, 304, 200]


async def test_cancel_too_late_or_unknown_is_false(fake: FakeAIGateway, make: Factory) -> None:
    fake.queued_polls = fake.running_polls = 0
    provider = make()
    handle = await provider.submit(prompt_request(), seed=1)
    assert isinstance(await provider.poll(handle), Succeeded)
    assert await provider.cancel(handle) is CancelOutcome.REFUSED  # 409: already completed
    fake.forget_jobs()
    assert await provider.cancel(handle) is CancelOutcome.REFUSED  # 404
    assert fake.cancels == []


async def test_cancel_with_refused_key_raises(fake: FakeAIGateway, make: Factory) -> None:
    provider = make()
    handle = await provider.submit(prompt_request(), seed=1)
    fake.fail_next("cancel", 401, "Invalid API key provided")
    with pytest.raises(AuthError):
        await provider.cancel(handle)


async def test_lost_job_is_task_lost(fake: FakeAIGateway, make: Factory) -> None:
    provider = make()
    handle = await provider.submit(prompt_request(), seed=1)
    fake.forget_jobs()
    with pytest.raises(TaskLost):
        await provider.poll(handle)


# -- error shapes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "message", "code", "error_type"),
    [
        (400, "duration must be between 5 and 240 seconds", "invalid_value", Rejected),
        (422, "Your prompt was flagged by moderation", "content_policy_violation", Rejected),
        (401, "Invalid API key provided", "invalid_api_key", AuthError),
        (403, "Your key cannot use this model", "model_forbidden", AuthError),
        (402, "Budget exceeded for this key", "budget_exceeded", BillingError),
        (429, "You exceeded your current quota", "insufficient_quota", BillingError),
        (429, "Rate limit reached", "rate_limit_exceeded", Busy),
        (503, "The engine is overloaded", None, Busy),
        (500, "The server had an error", None, Unavailable),
        (502, "Bad gateway", None, Unavailable),
    ],
)
async def test_submit_errors_map_to_typed_errors(
    fake: FakeAIGateway,
    make: Factory,
    status: int,
    message: str,
    code: str | None,
    error_type: type[ProviderError],
) -> None:
    fake.fail_next("submit", status, message, code=code)
    with pytest.raises(error_type) as caught:
        await make().submit(prompt_request(), seed=1)
    assert type(caught.value) is error_type
    assert message in caught.value.message
    assert caught.value.status_code == status
    assert fake.submit_attempts == 1  # submits are never retried


async def test_validation_error_names_the_parameter(fake: FakeAIGateway, make: Factory) -> None:
    fake.fail_next("submit", 400, "must be at most 240", code="invalid_value", param="duration")
    with pytest.raises(Rejected) as caught:
        await make().submit(prompt_request(), seed=1)
    assert caught.value.message == "duration: must be at most 240"


async def test_rate_limit_carries_retry_after(fake: FakeAIGateway, make: Factory) -> None:
    fake.fail_next("submit", 429, "Rate limit reached", code="rate_limit_exceeded", retry_after=20)
    with pytest.raises(Busy) as caught:
        await make().submit(prompt_request(), seed=1)
    assert caught.value.retry_after == 20.0


async def test_refused_key_never_appears_in_the_error(fake: FakeAIGateway, make: Factory) -> None:
    wrong = "sk-aig-WRONG-secret-555"
    with pytest.raises(AuthError) as caught:
        await make(api_key=wrong).submit(prompt_request(), seed=1)
    assert caught.value.status_code == 401
    assert wrong not in str(caught.value)
    # A server that echoes the key back: redacted.
    fake.fail_next("submit", 401, f"Incorrect API key provided: {fake.api_key}")
    with pytest.raises(AuthError) as caught:
        await make().submit(prompt_request(), seed=1)
    assert fake.api_key not in str(caught.value) and "***" in str(caught.value)


async def test_non_json_error_body(make: Factory) -> None:
    async def html_502(request: web.Request) -> web.Response:
        return web.Response(status=502, text="<html>Bad Gateway</html>", content_type="text/html")

    app = web.Application()
    app.router.add_post("/v1/audio/music", html_502)
    async with serve(app) as url:
        broken = make(base_url=url)
        with pytest.raises(Unavailable, match="Bad Gateway"):
            await broken.submit(prompt_request(), seed=1)


async def test_unreachable_server_is_unavailable(make: Factory) -> None:
    async with serve(web.Application()) as url:
        closed = url
    provider = make(base_url=closed, poll_retries=0)
    with pytest.raises(Unavailable, match="connection failed"):
        await provider.submit(prompt_request(), seed=1)
    with pytest.raises(Unavailable):
        await provider.poll(Handle("aigateway", {"id": "job_1"}))


async def test_slow_submit_times_out_as_unavailable(fake: FakeAIGateway, make: Factory) -> None:
    fake.stall_next("submit", 0.5)
    with pytest.raises(Unavailable, match="timed out"):
        await make(timeout=0.1).submit(prompt_request(), seed=1)


# -- poll retries ---------------------------------------------------------------------


async def test_poll_retries_with_backoff_of_at_least_three_seconds(
    fake: FakeAIGateway, make: Factory, sleeps: SleepLog
) -> None:
    provider = make()
    handle = await provider.submit(prompt_request(), seed=1)
    fake.fail_next("poll", 500, "The server had an error", times=2)
    assert await provider.poll(handle) == Queued(None)
    assert sleeps.waits == [3.0, 6.0]


async def test_poll_honours_retry_after(
    fake: FakeAIGateway, make: Factory, sleeps: SleepLog
) -> None:
    provider = make()
    handle = await provider.submit(prompt_request(), seed=1)
    fake.fail_next("poll", 429, "Rate limit reached", retry_after=9)
    assert await provider.poll(handle) == Queued(None)
    assert sleeps.waits == [9.0]


async def test_poll_gives_up_after_its_retries(
    fake: FakeAIGateway, make: Factory, sleeps: SleepLog
) -> None:
    provider = make(poll_retries=1)
    handle = await provider.submit(prompt_request(), seed=1)
    fake.fail_next("poll", 503, "overloaded", times=3)
    with pytest.raises(Busy):
        await provider.poll(handle)
    assert fake.polls == [503, 503] and len(sleeps.waits) == 1


async def test_poll_does_not_retry_billing_errors(
    fake: FakeAIGateway, make: Factory, sleeps: SleepLog
) -> None:
    provider = make()
    handle = await provider.submit(prompt_request(), seed=1)
    fake.fail_next("poll", 402, "Budget exceeded", code="budget_exceeded")
    with pytest.raises(BillingError):
        await provider.poll(handle)
    assert sleeps.waits == []


# -- restart and download ------------------------------------------------------------


async def test_resume_from_stored_handle_in_a_new_adapter(
    fake: FakeAIGateway, make: Factory
) -> None:
    first = make(audio_format="wav")
    handle = await first.submit(prompt_request(), seed=77)
    assert await first.poll(handle) == Queued(None)
    await first.aclose()

    restored = Handle.from_json(handle.to_json())
    second = make()
    seen = await poll_until_done(second, restored)
    assert seen[0] == Running()
    assert isinstance(seen[-1], Succeeded)
    audio = await second.fetch_audio(seen[-1].result)
    assert wav_seconds(audio) == pytest.approx(5.0)
    # A new instance can cancel a stored job too.
    third_handle = await second.submit(prompt_request(), seed=78)
    third = make()
    assert await third.cancel(Handle.from_json(third_handle.to_json())) is CancelOutcome.REQUESTED


async def test_key_is_not_sent_to_the_signed_url_host(fake: FakeAIGateway, make: Factory) -> None:
    fake.audio_host = "localhost"
    fake.queued_polls = fake.running_polls = 0
    provider = make()
    # The fake's "CDN" is another loopback origin: allowed here on purpose (a real bot
    # downloads from public addresses and the provider's own origin only).
    provider.address_policy = AddressPolicy.allowing("127.0.0.0/8")
    status = await provider.poll(await provider.submit(prompt_request(), seed=1))
    assert isinstance(status, Succeeded)
    assert status.result.audio_url.startswith("http://localhost:")
    assert (await provider.fetch_audio(status.result))[:3] == b"ID3"
    assert "Authorization" not in fake.audio_requests[-1]


async def test_expired_signed_url_is_a_failed_download(fake: FakeAIGateway, make: Factory) -> None:
    fake.queued_polls = fake.running_polls = 0
    provider = make()
    status = await provider.poll(await provider.submit(prompt_request(), seed=1))
    assert isinstance(status, Succeeded)
    fake.fail_next("audio", 403)
    with pytest.raises(ProviderFailedDownload):
        await provider.fetch_audio(status.result)
