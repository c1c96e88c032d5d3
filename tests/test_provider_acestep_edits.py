"""AceStepProvider's work on a song (issue 14) against the fake ACE-Step 1.5 server: task
types "cover" and "repaint", the source sent as the multipart `src_audio` part."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.requests import Task
from providers.acestep import AceStepProvider
from providers.base import MemoryUploads, Succeeded
from providers.fal import FalProvider
from providers.router import Router
from tests.fakes.acestep import FakeAceStep
from tests.test_provider_acestep import KEY, audio_seconds, make, run_to_end
from tests.test_provider_fal_edits import edit_request, source_file

SECONDS = 12.0  # the server makes songs of at least 10 s


@pytest.fixture
async def fake() -> AsyncIterator[FakeAceStep]:
    server = FakeAceStep(KEY)
    async with server.running():
        yield server


@pytest.fixture
async def provider(fake: FakeAceStep) -> AsyncIterator[AceStepProvider]:
    adapter = make([fake.base_url])
    yield adapter
    await adapter.aclose()


@pytest.mark.parametrize(
    ("task", "fields", "wire", "seconds"),
    [
        (
            Task.REMIX,
            {"strength": 0.25},
            {"task_type": "cover", "audio_cover_strength": 0.75},
            SECONDS,
        ),
        (
            Task.REPAINT,
            {"repaint_start": 3, "repaint_end": 7.5},
            {"task_type": "repaint", "repainting_start": 3.0, "repainting_end": 7.5},
            SECONDS,
        ),
        (
            Task.EXTEND,
            {"extend_after": 6},
            {"task_type": "repaint", "repainting_start": SECONDS, "repainting_end": SECONDS + 6},
            SECONDS + 6,
        ),
        (
            Task.EXTEND,
            {"extend_before": 4},
            {"task_type": "repaint", "repainting_start": -4.0, "repainting_end": 0.0},
            SECONDS + 4,
        ),
    ],
)
async def test_each_edit_is_one_multipart_task_with_upstreams_fields(
    fake: FakeAceStep,
    provider: AceStepProvider,
    tmp_path: Path,
    task: Task,
    fields: dict[str, object],
    wire: dict[str, object],
    seconds: float,
) -> None:
    source = source_file(tmp_path, seconds=SECONDS)
    request = edit_request(source, task, **fields)
    handle = await provider.submit(request, 99, source)
    final = (await run_to_end(provider, handle))[-1]
    assert isinstance(final, Succeeded), final
    audio = await provider.fetch_audio(final.result)

    assert audio_seconds(audio) == pytest.approx(seconds, abs=0.1)
    assert fake.uploads == [source.path.name]
    (body,) = fake.submits
    body = {k: v for k, v in body.items() if not k.startswith("_")}
    assert body == {
        "prompt": "lofi, piano",
        "lyrics": "[verse]\nnew words",
        "batch_size": 1,
        "use_random_seed": False,
        "seed": 99,
        "audio_format": "mp3",
        **wire,
    }
    assert provider.billed_seconds(request) == seconds


async def test_a_resubmit_after_a_restart_sends_the_file_again(
    fake: FakeAceStep, tmp_path: Path
) -> None:
    """The server deletes a task's upload when the task ends and keeps no store to refer
    to, so nothing is remembered: each submit carries the file."""
    uploads = MemoryUploads()
    source = source_file(tmp_path, uploads=uploads, seconds=SECONDS)
    request = edit_request(source, Task.REMIX)
    for _ in range(2):
        adapter = make([fake.base_url])
        try:
            await adapter.submit(request, 1, source)
        finally:
            await adapter.aclose()

    assert fake.uploads == [source.path.name, source.path.name]
    assert await uploads.get("acestep", source.sha256) is None


async def test_both_ends_at_once_is_left_to_a_provider_that_can(tmp_path: Path) -> None:
    source = source_file(tmp_path, seconds=SECONDS)
    ace = make(["http://127.0.0.1:9"])
    fal = FalProvider("fal-id:fal-secret-0123456789")
    try:
        both = edit_request(source, Task.EXTEND, extend_before=2, extend_after=2)
        one = edit_request(source, Task.EXTEND, extend_after=2)
        assert Router([ace, fal]).capable(both) == [fal]
        assert Router([ace]).capable(both) == []
        assert Router([ace, fal]).capable(one) == [ace, fal]
    finally:
        await ace.aclose()
        await fal.aclose()


async def test_a_full_queue_passes_the_task_and_its_file_to_the_next_server(
    tmp_path: Path,
) -> None:
    first, second = FakeAceStep(KEY), FakeAceStep(KEY)
    async with first.running(), second.running():
        first.release_errors.append("queue_full")
        adapter = make([first.base_url, second.base_url])
        source = source_file(tmp_path, seconds=SECONDS)
        try:
            handle = await adapter.submit(edit_request(source, Task.REMIX), 3, source)
            final = (await run_to_end(adapter, handle))[-1]
        finally:
            await adapter.aclose()
    assert isinstance(final, Succeeded), final
    assert handle.data["server"] == second.base_url
    # The refusal came after the file arrived: each server got it with the task.
    assert first.uploads == [source.path.name] and first.submits == []
    assert second.uploads == [source.path.name] and len(second.submits) == 1
