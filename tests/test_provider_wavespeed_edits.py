"""WaveSpeedProvider's work on a song (issue 14) against the fake WaveSpeed v3 server:
audio-to-audio (remix), audio-inpaint (repaint), audio-outpaint (extend), the source
handed over through WaveSpeed's media upload."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.requests import GenerationRequest, Task
from providers.base import AuthError, MemoryUploads, Rejected, Succeeded
from providers.router import Router, price_of
from providers.wavespeed import WaveSpeedProvider
from tests.fakes.wavespeed import FakeWaveSpeed
from tests.test_provider_fal_edits import (
    SOURCE_SECONDS,
    edit_request,
    source_file,
    wav_seconds,
)
from tests.test_provider_wavespeed import poll_until_done


@pytest.fixture
async def fake() -> AsyncIterator[FakeWaveSpeed]:
    server = FakeWaveSpeed()
    async with server.running():
        yield server


def make_provider(fake: FakeWaveSpeed) -> WaveSpeedProvider:
    return WaveSpeedProvider(fake.api_key, fake.base_url, poll_interval=0.01)


@pytest.fixture
async def provider(fake: FakeWaveSpeed) -> AsyncIterator[WaveSpeedProvider]:
    prov = make_provider(fake)
    yield prov
    await prov.aclose()


async def run_to_audio(provider: WaveSpeedProvider, request: GenerationRequest, source) -> bytes:  # type: ignore[no-untyped-def]
    handle = await provider.submit(request, 7, source)
    final = (await poll_until_done(provider, handle))[-1]
    assert isinstance(final, Succeeded), final
    return await provider.fetch_audio(final.result)


@pytest.mark.parametrize(
    ("task", "fields", "model", "wire", "seconds"),
    [
        (
            Task.REMIX,
            {},
            "wavespeed-ai/ace-step/audio-to-audio",
            {
                "edit_mode": "remix",
                "original_tags": "rock, guitar",
                "original_lyrics": "[verse]\nold words",
            },
            SOURCE_SECONDS,
        ),
        (
            Task.REPAINT,
            {"repaint_start": 0.5, "repaint_end": 4},
            "wavespeed-ai/ace-step/audio-inpaint",
            {
                "start_time_relative_to": "start",
                "start_time": 0.5,
                "end_time_relative_to": "start",
                "end_time": 4,
            },
            SOURCE_SECONDS,
        ),
        (
            Task.EXTEND,
            {"extend_before": 2, "extend_after": 3},
            "wavespeed-ai/ace-step/audio-outpaint",
            {"extend_before_duration": 2, "extend_after_duration": 3},
            SOURCE_SECONDS + 5,
        ),
    ],
)
async def test_each_edit_runs_end_to_end_with_wavespeeds_fields(
    fake: FakeWaveSpeed,
    provider: WaveSpeedProvider,
    tmp_path: Path,
    task: Task,
    fields: dict[str, object],
    model: str,
    wire: dict[str, object],
    seconds: float,
) -> None:
    source = source_file(tmp_path)
    request = edit_request(source, task, **fields)
    audio = await run_to_audio(provider, request, source)

    assert wav_seconds(audio) == pytest.approx(seconds, abs=0.01)
    (submit,) = fake.submits
    assert submit["model"] == model
    body = dict(submit["body"])
    assert body.pop("audio").startswith(f"{fake.base_url}/media/")
    assert body == {"tags": "lofi, piano", "lyrics": "[verse]\nnew words", "seed": 7, **wire}
    assert fake.uploads == [source.path.name]
    assert fake.billed_usd() == pytest.approx(price_of(provider, request))


async def test_the_source_is_uploaded_once_across_a_restart(
    fake: FakeWaveSpeed, tmp_path: Path
) -> None:
    uploads = MemoryUploads()
    source = source_file(tmp_path, uploads=uploads)
    request = edit_request(source, Task.EXTEND, extend_after=4)
    first = make_provider(fake)
    await first.submit(request, 1, source)
    await first.aclose()

    restarted = make_provider(fake)
    try:
        await run_to_audio(restarted, request, source)
    finally:
        await restarted.aclose()

    assert fake.uploads == [source.path.name]
    assert fake.bodies[0]["audio"] == fake.bodies[1]["audio"]


async def test_an_expired_upload_is_uploaded_again(
    fake: FakeWaveSpeed, provider: WaveSpeedProvider, tmp_path: Path
) -> None:
    uploads = MemoryUploads()
    source = source_file(tmp_path, uploads=uploads)
    stale = f"{fake.base_url}/media/gone/old.wav"
    await uploads.put("wavespeed", source.sha256, stale, time.time() - 1)

    await run_to_audio(provider, edit_request(source, Task.REMIX), source)

    assert fake.uploads == [source.path.name]
    assert fake.bodies[0]["audio"] != stale


async def test_a_remembered_upload_wavespeed_deleted_is_uploaded_again(
    fake: FakeWaveSpeed, provider: WaveSpeedProvider, tmp_path: Path
) -> None:
    source = source_file(tmp_path)
    request = edit_request(source, Task.REMIX)
    await provider.submit(request, 1, source)
    fake.media.clear()  # deleted before the lifetime we remembered

    await run_to_audio(provider, request, source)

    assert fake.uploads == [source.path.name, source.path.name]
    assert fake.submit_attempts == 3
    assert fake.submit_count == 2  # the refused attempt created nothing


async def test_a_source_that_is_not_audio_is_rejected_and_nothing_is_billed(
    fake: FakeWaveSpeed, provider: WaveSpeedProvider, tmp_path: Path
) -> None:
    source = source_file(tmp_path, data=b"not a song at all" * 64)
    with pytest.raises(Rejected) as caught:
        await provider.submit(edit_request(source, Task.REMIX), 1, source)

    assert "WaveSpeed could not use the source audio" in caught.value.message
    assert "not a supported audio format" in caught.value.message
    assert fake.uploads == [source.path.name]  # a fresh upload refused is not retried
    assert fake.submit_attempts == 1
    assert fake.submit_count == 0
    assert fake.billed_usd() == 0


async def test_edits_are_priced_at_the_edit_models_rate(tmp_path: Path) -> None:
    provider = WaveSpeedProvider("ws-key", song_model="wavespeed-ai/ace-step-1.5")
    try:
        source = source_file(tmp_path)
        request = edit_request(source, Task.EXTEND, extend_after=10)
        assert Router([provider]).capable(request) == [provider]
        assert provider.billed_seconds(request) == SOURCE_SECONDS + 10
        assert price_of(provider, request) == pytest.approx(0.0002 * (SOURCE_SECONDS + 10))
    finally:
        await provider.aclose()


async def test_a_refused_key_at_upload_creates_nothing(fake: FakeWaveSpeed, tmp_path: Path) -> None:
    wrong = WaveSpeedProvider("ws-wrong-key-000000", fake.base_url)
    source = source_file(tmp_path)
    try:
        with pytest.raises(AuthError) as caught:
            await wrong.submit(
                edit_request(source, Task.REPAINT, repaint_start=1, repaint_end=2), 1, source
            )
    finally:
        await wrong.aclose()
    assert "WAVESPEED_API_KEY" in caught.value.message
    assert "ws-wrong-key" not in str(caught.value)
    assert fake.uploads == [] and fake.submit_attempts == 0
