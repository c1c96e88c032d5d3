"""The Replicate adapter against a fake predictions API on 127.0.0.1."""

from __future__ import annotations

import io
import wave
from collections.abc import AsyncIterator

import pytest

from bot.requests import GenerationRequest, Mode
from providers.base import (
    AuthError,
    BillingError,
    Busy,
    Cancelled,
    CancelOutcome,
    Failed,
    Handle,
    Queued,
    Rejected,
    Running,
    Succeeded,
    TaskLost,
    Unavailable,
)
from providers.download import AddressPolicy
from providers.replicate import ACE_STEP_VERSION, ReplicateProvider
from tests.fakes.replicate import FakeReplicate

TOKEN = "r8_fake_token_123"


class Sleeps:
    """Records the pauses the adapter asks for instead of sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.fixture
async def fake() -> AsyncIterator[FakeReplicate]:
    server = FakeReplicate(TOKEN)
    async with server.running():
        yield server


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
async def provider(fake: FakeReplicate, sleeps: Sleeps) -> AsyncIterator[ReplicateProvider]:
    adapter = ReplicateProvider(TOKEN, fake.base_url, sleep=sleeps, poll_interval=0.01)
    yield adapter
    await adapter.aclose()


def song(**fields: object) -> GenerationRequest:
    values: dict[str, object] = {
        "mode": "song",
        "tags": "lofi, piano, rain",
        "lyrics": "[verse]\nrain on the window",
        "duration": 12,
    }
    values.update(fields)
    return GenerationRequest.build(**values)


async def run_to_end(provider: ReplicateProvider, handle: Handle) -> list[object]:
    seen: list[object] = []
    for _ in range(20):
        status = await provider.poll(handle)
        seen.append(status)
        if not isinstance(status, Queued | Running):
            return seen
    raise AssertionError(f"never finished: {seen}")


def wav_seconds(data: bytes) -> float:
    with wave.open(io.BytesIO(data)) as w:
        return w.getnframes() / w.getframerate()


async def test_song_happy_path_sends_exact_body_and_delivers_wav(
    fake: FakeReplicate, provider: ReplicateProvider
) -> None:
    request = song(
        steps=40,
        minimum_guidance_scale=2.5,
        scheduler="heun",
        guidance_scale=12,
        tag_guidance_scale=4.0,
    )
    handle = await provider.submit(request, seed=4242)

    assert fake.submits == [
        {
            "version": ACE_STEP_VERSION,
            "input": {
                "tags": "lofi, piano, rain",
                "lyrics": "[verse]\nrain on the window",
                "duration": 12,
                "seed": 4242,
                "number_of_steps": 40,
                "min_guidance_scale": 2.5,
                "scheduler": "heun",
                "guidance_scale": 12.0,
                "tag_guidance_scale": 4.0,
            },
        }
    ]
    seen = await run_to_end(provider, handle)
    assert isinstance(seen[0], Queued)
    running = [s for s in seen if isinstance(s, Running)]
    # The fake logs tqdm lines for steps 13/40 and 26/40: 32% and 65%.
    assert [r.progress for r in running] == [0.32, 0.65]
    assert running[0].message is not None and "13/40" in running[0].message
    done = seen[-1]
    assert isinstance(done, Succeeded)
    result = done.result
    assert result.audio_url == f"{fake.base_url}/files/pred0001xyz.wav"
    assert result.seed == 4242
    assert result.tags == "lofi, piano, rain"
    assert result.content_type == "audio/wav"
    assert result.metadata["predict_time"] == 12.5
    assert result.metadata["prediction_id"] == "pred0001xyz"

    audio = await provider.fetch_audio(result)
    assert audio[:4] == b"RIFF"
    assert wav_seconds(audio) == pytest.approx(12, abs=0.01)


async def test_instrumental_song_sends_the_instrumental_marker(
    fake: FakeReplicate, provider: ReplicateProvider
) -> None:
    await provider.submit(song(lyrics="", instrumental=True), seed=1)
    await provider.submit(song(lyrics="words", instrumental=True), seed=2)
    assert [s["input"]["lyrics"] for s in fake.submits] == ["[instrumental]", "[instrumental]"]
    assert fake.submits[0]["input"] == {
        "tags": "lofi, piano, rain",
        "lyrics": "[instrumental]",
        "duration": 12,
        "seed": 1,
    }


def test_capabilities_song_only_with_every_advanced_option() -> None:
    caps = ReplicateProvider(TOKEN).capabilities
    assert caps.modes == frozenset({Mode.SONG})
    assert not caps.can_serve(GenerationRequest.build(mode="prompt", prompt="lofi rain"))
    assert caps.can_serve(song(duration=240))
    assert (
        caps.ignored_options(song(steps=10, lyric_guidance_scale=2, guidance_interval_decay=0.5))
        == []
    )
    assert caps.price_per_second == 0.0002


async def test_the_token_goes_to_the_api_but_not_to_the_file_host(
    fake: FakeReplicate, provider: ReplicateProvider
) -> None:
    handle = await provider.submit(song(), seed=3)
    done = (await run_to_end(provider, handle))[-1]
    assert isinstance(done, Succeeded)
    # Serve the file from another origin (localhost vs 127.0.0.1): no token may go there.
    other = done.result.audio_url.replace("127.0.0.1", "localhost")
    # The fake's "CDN" is another loopback origin: allowed here on purpose (a real bot
    # downloads from public addresses and the provider's own origin only).
    provider.address_policy = AddressPolicy.allowing("127.0.0.0/8")
    from dataclasses import replace

    await provider.fetch_audio(replace(done.result, audio_url=other))
    assert fake.file_requests[-1]["authorization"] is None


@pytest.mark.parametrize(
    ("problem", "error", "text"),
    [
        ("unauthenticated", AuthError, "valid authentication token"),
        ("billing", BillingError, "insufficient credit"),
        ("forbidden", AuthError, "permission"),
        ("invalid", Rejected, "input.tags"),
        ("throttled", Busy, "throttled"),
        ("unavailable", Busy, "temporarily unavailable"),
        ("server", Unavailable, "Internal Server Error"),
        ("not_found", Unavailable, "could not be found"),
    ],
)
async def test_submit_errors_map_to_typed_errors_and_are_not_retried(
    fake: FakeReplicate,
    provider: ReplicateProvider,
    problem: str,
    error: type[Exception],
    text: str,
) -> None:
    fake.submit_errors.append(problem)
    with pytest.raises(error) as caught:
        await provider.submit(song(), seed=5)
    assert type(caught.value) is error
    assert text.lower() in str(caught.value).lower()
    assert TOKEN not in str(caught.value)
    assert fake.submit_count == 1


async def test_429_carries_retry_after(fake: FakeReplicate, provider: ReplicateProvider) -> None:
    fake.submit_errors.append("throttled")
    with pytest.raises(Busy) as caught:
        await provider.submit(song(), seed=5)
    assert caught.value.retry_after == 7
    assert caught.value.status_code == 429


async def test_wrong_token_is_an_auth_error_without_the_token(fake: FakeReplicate) -> None:
    adapter = ReplicateProvider("r8_wrong_secret", fake.base_url)
    try:
        with pytest.raises(AuthError) as caught:
            await adapter.submit(song(), seed=5)
    finally:
        await adapter.aclose()
    assert "r8_wrong_secret" not in str(caught.value)


async def test_version_is_configurable_and_a_bad_one_is_refused(fake: FakeReplicate) -> None:
    adapter = ReplicateProvider(TOKEN, fake.base_url, version="0" * 64)
    try:
        with pytest.raises(Rejected) as caught:
            await adapter.submit(song(), seed=5)
    finally:
        await adapter.aclose()
    assert fake.submits[0]["version"] == "0" * 64
    assert "Invalid version" in str(caught.value)


async def test_poll_retries_transient_errors_honouring_retry_after(
    fake: FakeReplicate, provider: ReplicateProvider, sleeps: Sleeps
) -> None:
    handle = await provider.submit(song(), seed=6)
    fake.poll_errors.extend(["throttled", "server"])
    status = await provider.poll(handle)
    assert isinstance(status, Queued)
    assert fake.polls == 3
    assert sleeps.delays[0] == 7  # Retry-After wins over the short backoff
    assert len(sleeps.delays) == 2


async def test_poll_gives_up_after_a_few_tries(
    fake: FakeReplicate, provider: ReplicateProvider
) -> None:
    handle = await provider.submit(song(), seed=6)
    fake.poll_errors.extend(["server"] * 5)
    with pytest.raises(Unavailable):
        await provider.poll(handle)
    assert fake.polls == 3


async def test_poll_auth_error_is_not_retried(
    fake: FakeReplicate, provider: ReplicateProvider
) -> None:
    handle = await provider.submit(song(), seed=6)
    fake.poll_errors.append("unauthenticated")
    with pytest.raises(AuthError):
        await provider.poll(handle)
    assert fake.polls == 1


async def test_unknown_prediction_is_task_lost(
    fake: FakeReplicate, provider: ReplicateProvider
) -> None:
    with pytest.raises(TaskLost):
        await provider.poll(Handle("replicate", {"id": "nosuchprediction"}))


async def test_model_failure_is_failed_with_its_error(
    fake: FakeReplicate, provider: ReplicateProvider
) -> None:
    fake.fail_with = "CUDA out of memory.\nTried to allocate 2.00 GiB"
    handle = await provider.submit(song(), seed=7)
    done = (await run_to_end(provider, handle))[-1]
    assert done == Failed("CUDA out of memory. Tried to allocate 2.00 GiB", rejected=False)


async def test_cancel_stops_a_running_prediction(
    fake: FakeReplicate, provider: ReplicateProvider
) -> None:
    handle = await provider.submit(song(), seed=8)
    assert isinstance(await provider.poll(handle), Queued)
    assert await provider.cancel(handle) is CancelOutcome.REQUESTED
    assert fake.cancels == ["pred0001xyz"]
    assert isinstance(await provider.poll(handle), Cancelled)


async def test_cancel_too_late_or_unknown_is_false(
    fake: FakeReplicate, provider: ReplicateProvider
) -> None:
    handle = await provider.submit(song(), seed=9)
    await run_to_end(provider, handle)
    assert await provider.cancel(handle) is CancelOutcome.REFUSED
    assert await provider.cancel(Handle("replicate", {"id": "gone"})) is CancelOutcome.REFUSED


async def test_resumed_poll_from_a_stored_handle_on_a_new_adapter(
    fake: FakeReplicate, provider: ReplicateProvider, sleeps: Sleeps
) -> None:
    handle = await provider.submit(song(duration=7), seed=10)
    assert isinstance(await provider.poll(handle), Queued)
    stored = handle.to_json()
    await provider.aclose()

    fresh = ReplicateProvider(TOKEN, fake.base_url, sleep=sleeps)
    try:
        restored = Handle.from_json(stored)
        assert restored == handle
        done = (await run_to_end(fresh, restored))[-1]
        assert isinstance(done, Succeeded)
        audio = await fresh.fetch_audio(done.result)
    finally:
        await fresh.aclose()
    assert wav_seconds(audio) == pytest.approx(7, abs=0.01)
    assert fake.submit_count == 1


async def test_unreachable_api_is_unavailable() -> None:
    adapter = ReplicateProvider(TOKEN, "http://127.0.0.1:9", timeout=2)
    try:
        with pytest.raises(Unavailable) as caught:
            await adapter.submit(song(), seed=1)
    finally:
        await adapter.aclose()
    assert TOKEN not in str(caught.value)
