"""FalProvider's work on a song (issue 14) against the fake fal queue and storage:
remix (audio-to-audio), repaint (audio-inpaint), extend (audio-outpaint)."""

from __future__ import annotations

import hashlib
import io
import time
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.requests import GenerationRequest, SourceAudio, Task
from providers.aigateway import AIGatewayProvider
from providers.base import AuthError, Handle, MemoryUploads, Rejected, SourceFile, Succeeded
from providers.fal import FalProvider
from providers.replicate import ReplicateProvider
from providers.router import Router, price_of
from tests.fakes.audio import make_wav
from tests.fakes.fal import FakeFal
from tests.test_provider_fal import KEY, poll_to_end

SOURCE_SECONDS = 8.0


@pytest.fixture
async def fake() -> AsyncIterator[FakeFal]:
    server = FakeFal(KEY, queue_polls=1, progress_polls=1)
    async with server.running():
        yield server


def make_provider(fake: FakeFal) -> FalProvider:
    assert fake.base_url
    return FalProvider(
        KEY,
        fake.base_url,
        storage_url=fake.base_url,
        poll_interval=0.01,
        retry_delays=(0.0, 0.0),
    )


@pytest.fixture
async def provider(fake: FakeFal) -> AsyncIterator[FalProvider]:
    prov = make_provider(fake)
    yield prov
    await prov.aclose()


def source_file(
    tmp_path: Path,
    data: bytes | None = None,
    uploads: MemoryUploads | None = None,
    seconds: float = SOURCE_SECONDS,
) -> SourceFile:
    """A source as the engine hands it over: a real WAV under sources/, named by hash."""
    data = make_wav(seconds) if data is None else data
    sha = hashlib.sha256(data).hexdigest()
    path = tmp_path / "sources" / f"{sha}.wav"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return SourceFile(path, sha, seconds, uploads or MemoryUploads())


def edit_request(source: SourceFile, task: Task, **fields: object) -> GenerationRequest:
    audio = SourceAudio(
        sha256=source.sha256,
        seconds=source.seconds,
        file=source.path.name,
        tags="rock, guitar",
        lyrics="[verse]\nold words",
    )
    defaults: dict[str, object] = {"tags": "lofi, piano", "lyrics": "[verse]\nnew words"}
    return GenerationRequest.build(mode="song", task=task, source=audio, **{**defaults, **fields})


def wav_seconds(data: bytes) -> float:
    with wave.open(io.BytesIO(data)) as w:
        return w.getnframes() / w.getframerate()


async def run_to_audio(
    provider: FalProvider, request: GenerationRequest, source: SourceFile
) -> bytes:
    handle = await provider.submit(request, 42, source)
    final = (await poll_to_end(provider, handle))[-1]
    assert isinstance(final, Succeeded), final
    return await provider.fetch_audio(final.result)


@pytest.mark.parametrize(
    ("task", "fields", "endpoint", "wire", "seconds"),
    [
        (
            Task.REMIX,
            {"strength": 0.4},
            "/fal-ai/ace-step/audio-to-audio",
            {
                "edit_mode": "remix",
                "original_tags": "rock, guitar",
                "original_lyrics": "[verse]\nold words",
            },
            SOURCE_SECONDS,
        ),
        (
            Task.REPAINT,
            {"repaint_start": 2, "repaint_end": 5.5},
            "/fal-ai/ace-step/audio-inpaint",
            {
                "start_time_relative_to": "start",
                "start_time": 2,
                "end_time_relative_to": "start",
                "end_time": 5.5,
            },
            SOURCE_SECONDS,
        ),
        (
            Task.EXTEND,
            {"extend_after": 4},
            "/fal-ai/ace-step/audio-outpaint",
            {"extend_before_duration": 0, "extend_after_duration": 4},
            SOURCE_SECONDS + 4,
        ),
    ],
)
async def test_each_edit_runs_end_to_end_with_fals_fields(
    fake: FakeFal,
    provider: FalProvider,
    tmp_path: Path,
    task: Task,
    fields: dict[str, object],
    endpoint: str,
    wire: dict[str, object],
    seconds: float,
) -> None:
    source = source_file(tmp_path)
    request = edit_request(source, task, **fields)
    audio = await run_to_audio(provider, request, source)

    assert wav_seconds(audio) == pytest.approx(seconds, abs=0.01)
    (submit,) = fake.submits
    assert submit.path == endpoint
    audio_url = submit.body.pop("audio_url")
    assert audio_url.startswith(f"{fake.base_url}/storage/files/")
    assert submit.body == {
        "tags": "lofi, piano",
        "lyrics": "[verse]\nnew words",
        "seed": 42,
        **wire,
    }
    assert fake.uploads == [source.path.name]
    # What fal bills for it is what the bot reserved for it.
    assert fake.billed_usd() == pytest.approx(price_of(provider, request))


async def test_the_source_is_uploaded_once_across_a_restart(fake: FakeFal, tmp_path: Path) -> None:
    uploads = MemoryUploads()  # stands in for the database the engine keeps
    source = source_file(tmp_path, uploads=uploads)
    request = edit_request(source, Task.REMIX)
    first = make_provider(fake)
    await first.submit(request, 1, source)
    await first.aclose()

    restarted = make_provider(fake)  # a new process: only the cache survives
    try:
        audio = await run_to_audio(restarted, request, source)
    finally:
        await restarted.aclose()

    assert len(audio) > 0
    assert fake.uploads == [source.path.name]
    assert len(fake.submits) == 2
    assert fake.submits[0].body["audio_url"] == fake.submits[1].body["audio_url"]


async def test_an_expired_upload_is_uploaded_again(
    fake: FakeFal, provider: FalProvider, tmp_path: Path
) -> None:
    uploads = MemoryUploads()
    source = source_file(tmp_path, uploads=uploads)
    await uploads.put(
        "fal", source.sha256, f"{fake.base_url}/storage/files/old/x.wav", time.time() - 1
    )

    await run_to_audio(provider, edit_request(source, Task.REMIX), source)

    assert fake.uploads == [source.path.name]
    assert fake.submits[0].body["audio_url"] != f"{fake.base_url}/storage/files/old/x.wav"
    assert await uploads.get("fal", source.sha256) == fake.submits[0].body["audio_url"]


async def test_a_remembered_upload_fal_lost_is_uploaded_again_and_queued_once(
    fake: FakeFal, provider: FalProvider, tmp_path: Path
) -> None:
    source = source_file(tmp_path)
    request = edit_request(source, Task.REPAINT, repaint_start=1, repaint_end=3)
    await provider.submit(request, 1, source)
    fake.stored.clear()  # fal dropped the file before the lifetime we remembered

    await run_to_audio(provider, request, source)

    assert fake.uploads == [source.path.name, source.path.name]
    # The refused submit queued nothing: two requests in all, one per accepted submit.
    assert len(fake.submits) == 3
    assert len(fake.requests) == 2
    assert fake.submits[1].body["audio_url"] != fake.submits[2].body["audio_url"]


async def test_a_source_that_is_not_audio_is_rejected_and_nothing_runs(
    fake: FakeFal, provider: FalProvider, tmp_path: Path
) -> None:
    source = source_file(tmp_path, data=b"this is not a song" * 100)
    with pytest.raises(Rejected) as caught:
        await provider.submit(edit_request(source, Task.REMIX), 1, source)

    assert "fal could not use the source audio" in caught.value.message
    assert "MP3, WAV or FLAC" in caught.value.message
    assert fake.uploads == [source.path.name]  # a fresh upload refused is not retried
    assert len(fake.submits) == 1
    assert fake.requests == {}
    assert fake.billed_usd() == 0


def test_fal_declares_every_edit_but_replicate_does_not(tmp_path: Path) -> None:
    source = source_file(tmp_path)
    fal = FalProvider(KEY)
    replicate = ReplicateProvider("r8_test_token")
    aigateway = AIGatewayProvider("sk-aig-test")
    for task, fields in (
        (Task.REMIX, {}),
        (Task.REPAINT, {"repaint_start": 1, "repaint_end": 2}),
        (Task.EXTEND, {"extend_before": 3}),
    ):
        request = edit_request(source, task, **fields)
        assert Router([aigateway, fal, replicate]).capable(request) == [fal]
        assert Router([aigateway, replicate]).capable(request) == []
    assert (
        fal.billed_seconds(edit_request(source, Task.EXTEND, extend_before=3, extend_after=5)) == 16
    )
    assert fal.billed_seconds(edit_request(source, Task.REMIX)) == SOURCE_SECONDS


async def test_the_key_goes_to_storage_but_not_to_the_signed_upload_url(
    fake: FakeFal, provider: FalProvider, tmp_path: Path
) -> None:
    fake.upload_host = "localhost"  # the same fake, on another origin
    source = source_file(tmp_path)
    await provider.submit(edit_request(source, Task.REMIX), 1, source)

    (put,) = fake.upload_headers
    assert "Authorization" not in put
    assert put["Content-Type"] == "audio/wav"
    assert fake.submits[0].authorization == f"Key {KEY}"


async def test_a_refused_key_at_upload_queues_nothing(fake: FakeFal, tmp_path: Path) -> None:
    assert fake.base_url
    wrong = FalProvider("fal-id:wrong-secret-000000", fake.base_url, storage_url=fake.base_url)
    source = source_file(tmp_path)
    try:
        with pytest.raises(AuthError) as caught:
            await wrong.submit(edit_request(source, Task.REMIX), 1, source)
    finally:
        await wrong.aclose()
    assert "FAL_KEY" in caught.value.message
    assert "wrong-secret" not in str(caught.value)
    assert fake.uploads == [] and fake.submits == []
    assert await source.uploads.get("fal", source.sha256) is None


async def test_an_extend_resumes_from_its_stored_handle_after_a_restart(
    fake: FakeFal, tmp_path: Path
) -> None:
    source = source_file(tmp_path)
    request = edit_request(source, Task.EXTEND, extend_before=2, extend_after=3)
    first = make_provider(fake)
    stored = (await first.submit(request, 5, source)).to_json()  # the job row keeps this
    await first.aclose()

    restarted = make_provider(fake)
    try:
        final = (await poll_to_end(restarted, Handle.from_json(stored)))[-1]
        assert isinstance(final, Succeeded), final
        audio = await restarted.fetch_audio(final.result)
    finally:
        await restarted.aclose()
    assert wav_seconds(audio) == pytest.approx(SOURCE_SECONDS + 5, abs=0.01)
    assert len(fake.submits) == 1 and fake.uploads == [source.path.name]


async def test_fal_storage_url_comes_from_the_settings(fake: FakeFal, tmp_path: Path) -> None:
    """FAL_STORAGE_URL: a deployment whose queue is elsewhere (a proxy, the fakes) uploads
    there too, never to fal's public storage by surprise."""
    from providers.registry import build_provider
    from tests.conftest import make_settings

    settings = make_settings(
        tmp_path, fal_key=KEY, fal_queue_url=fake.base_url, fal_storage_url=fake.base_url
    )
    provider = build_provider(settings, "fal")
    source = source_file(tmp_path)
    try:
        await provider.submit(edit_request(source, Task.REMIX), 1, source)
    finally:
        await provider.aclose()
    assert fake.uploads == [source.path.name]
