"""FalProvider against a real fake fal queue server on 127.0.0.1 (tests/fakes/fal.py)."""

from __future__ import annotations

import io
import itertools
import logging
import time
import wave
from collections.abc import AsyncIterator

import pytest

from bot.requests import GenerationRequest
from providers.base import (
    AuthError,
    BillingError,
    Busy,
    Cancelled,
    CancelOutcome,
    Failed,
    Handle,
    ProviderError,
    Queued,
    Rejected,
    Running,
    Status,
    Succeeded,
    TaskLost,
    Unavailable,
)
from providers.download import AddressPolicy
from providers.fal import FalProvider
from tests.fakes.fal import FakeFal
from tests.fakes.http import serve

KEY = "fal-test-id:fal-test-secret-0123456789"


@pytest.fixture
async def fake() -> AsyncIterator[FakeFal]:
    server = FakeFal(KEY, queue_polls=2, progress_polls=2, queue_position=2)
    async with server.running():
        yield server


def make_provider(fake: FakeFal, key: str = KEY, **kwargs: object) -> FalProvider:
    assert fake.base_url
    return FalProvider(key, fake.base_url, poll_interval=0.01, retry_delays=(0.0, 0.0), **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def provider(fake: FakeFal) -> AsyncIterator[FalProvider]:
    prov = make_provider(fake)
    yield prov
    await prov.aclose()


def prompt_request(**fields: object) -> GenerationRequest:
    defaults: dict[str, object] = {"prompt": "lofi piano about rain", "duration": 5}
    return GenerationRequest.build(mode="prompt", **{**defaults, **fields})


def song_request(**fields: object) -> GenerationRequest:
    defaults: dict[str, object] = {
        "tags": "lofi, piano",
        "lyrics": "[verse]\nrain on glass",
        "duration": 6,
    }
    return GenerationRequest.build(mode="song", **{**defaults, **fields})


async def poll_to_end(provider: FalProvider, handle: Handle, limit: int = 20) -> list[Status]:
    seen: list[Status] = []
    for _ in range(limit):
        status = await provider.poll(handle)
        seen.append(status)
        if isinstance(status, Succeeded | Failed | Cancelled):
            return seen
    raise AssertionError(f"no final status after {limit} polls: {seen}")


def wav_seconds(data: bytes) -> float:
    with wave.open(io.BytesIO(data)) as w:
        return w.getnframes() / w.getframerate()


# ----- success ------------------------------------------------------------------------


async def test_prompt_mode_runs_to_a_song(fake: FakeFal, provider: FalProvider) -> None:
    handle = await provider.submit(prompt_request(instrumental=True), seed=1234)

    assert fake.submit_count == 1
    sent = fake.submits[0]
    assert sent.path == "/fal-ai/ace-step/prompt-to-audio"
    assert sent.body == {
        "prompt": "lofi piano about rain",
        "instrumental": True,
        "duration": 5,
        "seed": 1234,
    }
    assert sent.authorization == f"Key {KEY}"

    # The handle keeps the URLs fal returned (the fake's, without the subpath).
    request_id = handle.data["request_id"]
    assert handle.data["status_url"] == (
        f"{fake.base_url}/fal-ai/ace-step/requests/{request_id}/status"
    )
    assert handle.data["endpoint"] == "fal-ai/ace-step/prompt-to-audio"

    statuses = await poll_to_end(provider, handle)
    # Status and result live under the app id, without the endpoint subpath.
    assert set(fake.status_paths) == {f"/fal-ai/ace-step/requests/{request_id}/status"}
    assert fake.result_paths == [f"/fal-ai/ace-step/requests/{request_id}"]

    assert statuses[:2] == [Queued(position=2), Queued(position=1)]
    running = [s for s in statuses if isinstance(s, Running)]
    assert [r.progress for r in running] == [pytest.approx(0.33), pytest.approx(0.67)]
    assert running[-1].message == "Generating: 67%| 2/3"
    final = statuses[-1]
    assert isinstance(final, Succeeded)
    result = final.result
    assert result.seed == 1234
    assert result.lyrics == "[inst]"
    assert result.tags == "lofi, piano, about, rain"
    assert result.content_type == "audio/wav"
    assert result.metadata["inference_time"] == 3.25
    assert result.metadata["request_id"] == request_id

    audio = await provider.fetch_audio(result)
    assert audio[:4] == b"RIFF"
    assert wav_seconds(audio) == pytest.approx(5.0)


async def test_song_mode_sends_tags_lyrics_and_only_the_options_set(
    fake: FakeFal, provider: FalProvider
) -> None:
    request = song_request(steps=40, scheduler="heun", lyric_guidance_scale=2.5)
    handle = await provider.submit(request, seed=7)

    sent = fake.submits[0]
    assert sent.path == "/fal-ai/ace-step"
    assert sent.body == {
        "tags": "lofi, piano",
        "lyrics": "[verse]\nrain on glass",
        "duration": 6,
        "seed": 7,
        "number_of_steps": 40,
        "scheduler": "heun",
        "lyric_guidance_scale": 2.5,
    }
    final = (await poll_to_end(provider, handle))[-1]
    assert isinstance(final, Succeeded)
    assert final.result.lyrics == "[verse]\nrain on glass"
    assert wav_seconds(await provider.fetch_audio(final.result)) == pytest.approx(6.0)


@pytest.mark.parametrize(
    "fields", [{"lyrics": ""}, {"instrumental": True}, {"lyrics": "[instrumental]"}]
)
async def test_song_without_vocals_sends_inst_marker(
    fake: FakeFal, provider: FalProvider, fields: dict[str, object]
) -> None:
    await provider.submit(song_request(**fields), seed=1)
    assert fake.submits[0].body["lyrics"] == "[inst]"


async def test_capabilities_and_poll_interval(fake: FakeFal) -> None:
    prov = FalProvider(KEY, fake.base_url or "", concurrency=5, poll_interval=2.5)
    try:
        caps = prov.capabilities
        assert prov.name == "fal"
        assert {m.value for m in caps.modes} == {"prompt", "song"}
        assert (caps.min_duration, caps.max_duration) == (5, 240)
        assert caps.price_per_second == 0.0002
        assert caps.concurrency == 5
        assert caps.ignored_options(song_request(steps=10, guidance_type="cfg")) == []
        assert prov.poll_interval() == 2.5
    finally:
        await prov.aclose()


# ----- resuming and cancelling -------------------------------------------------------


async def test_new_instance_resumes_polling_from_a_stored_handle(fake: FakeFal) -> None:
    first = make_provider(fake)
    handle = await first.submit(prompt_request(), seed=99)
    assert isinstance(await first.poll(handle), Queued)
    stored = handle.to_json()
    await first.aclose()

    second = make_provider(fake)  # as after a restart
    try:
        final = (await poll_to_end(second, Handle.from_json(stored)))[-1]
        assert isinstance(final, Succeeded)
        assert final.result.seed == 99
        assert fake.submit_count == 1
    finally:
        await second.aclose()


async def test_handle_without_urls_is_polled_without_the_subpath(
    fake: FakeFal, provider: FalProvider
) -> None:
    handle = await provider.submit(prompt_request(), seed=3)
    bare = Handle(
        "fal",
        {"request_id": handle.data["request_id"], "endpoint": "fal-ai/ace-step/prompt-to-audio"},
    )
    final = (await poll_to_end(provider, bare))[-1]
    assert isinstance(final, Succeeded)
    assert all("prompt-to-audio" not in p for p in fake.status_paths)


async def test_stored_urls_on_another_host_are_not_followed(
    fake: FakeFal, provider: FalProvider
) -> None:
    # A tampered or stale job row must not make us send the key to a foreign host.
    handle = await provider.submit(prompt_request(), seed=3)
    request_id = handle.data["request_id"]
    foreign = "http://127.0.0.1:9/fal-ai/ace-step/requests"  # another origin
    tampered = Handle(
        "fal",
        {
            **handle.data,
            "status_url": f"{foreign}/{request_id}/status",
            "response_url": f"{foreign}/{request_id}",
        },
    )
    final = (await poll_to_end(provider, tampered))[-1]
    assert isinstance(final, Succeeded)


async def test_cancel_before_completion_is_accepted(fake: FakeFal, provider: FalProvider) -> None:
    handle = await provider.submit(prompt_request(), seed=3)
    assert await provider.cancel(handle) is CancelOutcome.REMOVED
    assert fake.cancels == [handle.data["request_id"]]
    assert await provider.poll(handle) == Cancelled()


async def test_cancel_after_completion_is_too_late(fake: FakeFal, provider: FalProvider) -> None:
    handle = await provider.submit(prompt_request(), seed=3)
    assert isinstance((await poll_to_end(provider, handle))[-1], Succeeded)
    assert await provider.cancel(handle) is CancelOutcome.REFUSED
    assert fake.cancels == []


# ----- errors -------------------------------------------------------------------------


def assert_readable(err: ProviderError) -> None:
    """What an operator or user reads: no key, no raw JSON."""
    text = str(err)
    assert KEY not in text and "fal-test-secret" not in text
    assert "{" not in err.message and "[{" not in err.message


async def test_wrong_key_is_an_auth_error_naming_the_setting(fake: FakeFal) -> None:
    prov = make_provider(fake, key="fal-wrong-id:wrong-secret-abcdefgh")
    try:
        with pytest.raises(AuthError) as caught:
            await prov.submit(prompt_request(), seed=1)
    finally:
        await prov.aclose()
    assert not isinstance(caught.value, BillingError)
    assert caught.value.status_code == 401
    assert "FAL_KEY" in caught.value.message
    assert "wrong-secret" not in str(caught.value)
    assert_readable(caught.value)


async def test_revoked_key_during_poll_is_an_auth_error(
    fake: FakeFal, provider: FalProvider
) -> None:
    handle = await provider.submit(prompt_request(), seed=1)
    fake.unauthorized = True
    with pytest.raises(AuthError) as caught:
        await provider.poll(handle)
    assert_readable(caught.value)


async def test_exhausted_balance_is_a_billing_error(fake: FakeFal, provider: FalProvider) -> None:
    fake.exhausted_balance = True
    with pytest.raises(BillingError) as caught:
        await provider.submit(prompt_request(), seed=1)
    assert "Exhausted balance" in caught.value.message
    assert caught.value.status_code == 403
    assert_readable(caught.value)


async def test_validation_error_names_the_field(fake: FakeFal, provider: FalProvider) -> None:
    fake.max_duration = 120  # fal narrowed its range after we were configured
    with pytest.raises(Rejected) as caught:
        await provider.submit(prompt_request(duration=200), seed=1)
    assert caught.value.message == "duration: ensure this value is less than or equal to 120"
    assert caught.value.status_code == 422


async def test_content_policy_is_rejected_in_plain_words(
    fake: FakeFal, provider: FalProvider
) -> None:
    fake.content_policy = True
    with pytest.raises(Rejected) as caught:
        await provider.submit(prompt_request(), seed=1)
    assert "content policy" in caught.value.message
    assert "content_policy_violation" not in caught.value.message
    assert_readable(caught.value)


async def test_rate_limited_submit_is_busy_and_not_retried(
    fake: FakeFal, provider: FalProvider
) -> None:
    fake.rate_limited, fake.retry_after = 1, 7
    with pytest.raises(Busy) as caught:
        await provider.submit(prompt_request(), seed=1)
    assert caught.value.retry_after == 7
    assert fake.submit_count == 1


async def test_server_error_on_submit_is_unavailable_and_not_retried(
    fake: FakeFal, provider: FalProvider
) -> None:
    fake.server_errors = 1
    with pytest.raises(Unavailable) as caught:
        await provider.submit(prompt_request(), seed=1)
    assert caught.value.status_code == 500
    assert fake.submit_count == 1


async def test_timed_out_submit_is_unavailable_and_sent_once(fake: FakeFal) -> None:
    fake.submit_delay = 0.5
    prov = make_provider(fake, timeout=0.1)
    try:
        with pytest.raises(Unavailable) as caught:
            await prov.submit(prompt_request(), seed=1)
    finally:
        await prov.aclose()
    assert "may still have been queued" in caught.value.message
    assert fake.submit_count == 1


async def test_unreachable_queue_is_unavailable() -> None:
    async with serve(FakeFal().app) as url:
        pass  # the port is closed again
    prov = FalProvider(KEY, url, retry_delays=(0.0, 0.0))
    try:
        with pytest.raises(Unavailable) as caught:
            await prov.submit(prompt_request(), seed=1)
    finally:
        await prov.aclose()
    assert "submit: connection failed (ConnectError)" in caught.value.message


async def test_poll_retries_a_passing_rate_limit(fake: FakeFal, provider: FalProvider) -> None:
    handle = await provider.submit(prompt_request(), seed=1)
    fake.rate_limited, fake.retry_after = 1, 0
    assert await provider.poll(handle) == Queued(position=2)
    assert len(fake.status_paths) == 2


async def test_poll_gives_up_after_a_few_server_errors(
    fake: FakeFal, provider: FalProvider
) -> None:
    handle = await provider.submit(prompt_request(), seed=1)
    fake.server_errors = 10
    with pytest.raises(Unavailable) as caught:
        await provider.poll(handle)
    assert len(fake.status_paths) == 3  # the first try and two retries
    assert caught.value.status_code == 500


async def test_poll_passes_a_long_retry_after_back_at_once(fake: FakeFal) -> None:
    slept: list[float] = []

    async def record_sleep(seconds: float) -> None:
        slept.append(seconds)

    prov = make_provider(fake, sleep=record_sleep)
    try:
        handle = await prov.submit(prompt_request(), seed=1)
        fake.rate_limited, fake.retry_after = 5, 120
        started = time.monotonic()
        with pytest.raises(Busy) as caught:
            await prov.poll(handle)
    finally:
        await prov.aclose()
    assert caught.value.retry_after == 120
    assert slept == [] and time.monotonic() - started < 2
    assert len(fake.status_paths) == 1


async def test_forgotten_request_is_task_lost(fake: FakeFal, provider: FalProvider) -> None:
    handle = await provider.submit(prompt_request(), seed=1)
    fake.forget = True
    with pytest.raises(TaskLost):
        await provider.poll(handle)


async def test_completed_with_error_fails_the_job_unbilled_on_a_server_error(
    fake: FakeFal, provider: FalProvider
) -> None:
    fake.run_error = ("CUDA out of memory", "runner_server_error")
    handle = await provider.submit(prompt_request(), seed=1)
    final = (await poll_to_end(provider, handle))[-1]
    # The result's 500 says fal does not bill the run (fal: 5xx failures are not billed).
    assert final == Failed("CUDA out of memory", rejected=False, billed=False)
    assert len(fake.result_paths) == 1
    assert fake.billed() == []


async def test_completed_with_content_policy_error_is_rejected(
    fake: FakeFal, provider: FalProvider
) -> None:
    fake.run_error = ("flagged output", "content_policy_violation")
    handle = await provider.submit(prompt_request(), seed=1)
    final = (await poll_to_end(provider, handle))[-1]
    assert isinstance(final, Failed)
    assert final.rejected is True
    assert "content policy" in final.reason


async def test_failing_result_fetch_fails_with_its_detail(
    fake: FakeFal, provider: FalProvider
) -> None:
    fake.result_error = (500, "Model crashed while decoding audio")
    handle = await provider.submit(song_request(), seed=1)
    final = (await poll_to_end(provider, handle))[-1]
    assert isinstance(final, Failed)
    assert "Model crashed while decoding audio" in final.reason
    assert final.rejected is False


async def test_result_fetch_validation_error_is_a_rejection(
    fake: FakeFal, provider: FalProvider
) -> None:
    fake.result_error = (422, "lyrics could not be parsed")
    handle = await provider.submit(song_request(), seed=1)
    final = (await poll_to_end(provider, handle))[-1]
    assert isinstance(final, Failed)
    assert final.rejected is True
    assert "lyrics could not be parsed" in final.reason


# ----- secrets ------------------------------------------------------------------------


async def test_key_stays_on_the_queue_origin_and_out_of_logs(
    fake: FakeFal, provider: FalProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.file_host = "localhost"  # the same server under another origin, like fal's CDN
    # The fake's "CDN" is another loopback origin: allowed here on purpose (a real bot
    # downloads from public addresses and the provider's own origin only).
    provider.address_policy = AddressPolicy.allowing("127.0.0.0/8")
    handle = await provider.submit(prompt_request(), seed=5)
    final = (await poll_to_end(provider, handle))[-1]
    assert isinstance(final, Succeeded)
    assert final.result.audio_url.startswith("http://localhost:")
    assert wav_seconds(await provider.fetch_audio(final.result)) == pytest.approx(5.0)
    assert len(fake.downloads) == 1
    assert "Authorization" not in fake.downloads[0]
    fake.exhausted_balance = True
    with pytest.raises(BillingError):
        await provider.submit(prompt_request(), seed=5)
    assert caplog.records  # the flow did log
    assert "fal-test-secret" not in caplog.text and KEY not in caplog.text


# -- the status stream ----------------------------------------------------------------------


async def test_the_status_stream_reports_each_change_and_the_result(
    fake: FakeFal, provider: FalProvider
) -> None:
    fake.queue_polls, fake.progress_polls, fake.stream_interval = 2, 2, 0.01
    handle = await provider.submit(prompt_request(), seed=3)
    seen: list[Status] = []
    last: Status | None = None
    while not isinstance(last, Succeeded):
        last = await provider.wait_status(handle, last, timeout=2)
        seen.append(last)
    # Each change once, in order (a step that passes while no stream is open is skipped,
    # as with fal's own time-driven queue).
    assert seen[0] == Queued(position=2)
    assert len(seen) >= 3 and all(a != b for a, b in itertools.pairwise(seen))
    positions = [s.position for s in seen if isinstance(s, Queued)]
    assert positions == sorted(positions, reverse=True)
    progress = [s.progress for s in seen if isinstance(s, Running)]
    assert progress == sorted(progress) and all(0 < p < 1 for p in progress if p)
    assert fake.status_paths == []  # no status GET at all
    assert (
        fake.stream_paths[0]
        == f"/fal-ai/ace-step/requests/{handle.data['request_id']}/status/stream"
    )
    assert provider.streams_status


async def test_without_a_stream_it_polls_and_says_so(fake: FakeFal, provider: FalProvider) -> None:
    fake.streams = False
    fake.queue_polls = 0
    handle = await provider.submit(prompt_request(), seed=3)
    status = await provider.wait_status(handle, None, timeout=2)
    assert isinstance(status, Running)
    assert len(fake.stream_paths) == 1 and len(fake.status_paths) == 1
    assert not provider.streams_status  # the engine paces its polls again


async def test_an_auth_error_on_the_stream_is_an_auth_error(
    fake: FakeFal, provider: FalProvider
) -> None:
    handle = await provider.submit(prompt_request(), seed=3)
    fake.exhausted_balance = True
    with pytest.raises(BillingError):
        await provider.wait_status(handle, None, timeout=2)
