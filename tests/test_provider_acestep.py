"""The local ACE-Step 1.5 server adapter against fake servers on 127.0.0.1."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import av
import pytest

from bot.requests import GenerationRequest, Mode
from providers.acestep import AceStepProvider
from providers.base import (
    AuthError,
    Busy,
    CannotServe,
    Failed,
    Handle,
    ProviderFailedDownload,
    Queued,
    Rejected,
    Running,
    Status,
    Succeeded,
    TaskLost,
    Unavailable,
)
from tests.fakes.acestep import FakeAceStep

KEY = "ace-secret-key-42"


class Sleeps:
    """Records the pauses the adapter asks for instead of sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


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


def make(urls: list[str], key: str | None = KEY, **kwargs: object) -> AceStepProvider:
    settings: dict[str, object] = {"sleep": Sleeps(), "poll_interval": 0.01, "recheck_after": 0.0}
    settings.update(kwargs)
    return AceStepProvider(urls, key, **settings)  # type: ignore[arg-type]


def song(**fields: object) -> GenerationRequest:
    values: dict[str, object] = {
        "mode": "song",
        "tags": "lofi, piano, rain",
        "lyrics": "[verse]\nrain on the window",
        "duration": 12,
    }
    values.update(fields)
    return GenerationRequest.build(**values)


async def run_to_end(provider: AceStepProvider, handle: Handle) -> list[Status]:
    seen: list[Status] = []
    for _ in range(20):
        status = await provider.poll(handle)
        seen.append(status)
        if not isinstance(status, Queued | Running):
            return seen
    raise AssertionError(f"never finished: {seen}")


def audio_seconds(data: bytes) -> float:
    """The length of a real audio file (WAV, MP3, FLAC), decoded with PyAV."""
    with av.open(io.BytesIO(data)) as container:
        return sum(f.samples for f in container.decode(audio=0)) / 48000


async def test_song_mode_sends_tags_lyrics_and_a_fixed_seed(
    fake: FakeAceStep, provider: AceStepProvider
) -> None:
    handle = await provider.submit(song(steps=20, guidance_scale=7.5), seed=31337)
    assert fake.submits == [
        {
            "prompt": "lofi, piano, rain",
            "lyrics": "[verse]\nrain on the window",
            "audio_duration": 12,
            "batch_size": 1,
            "use_random_seed": False,
            "seed": 31337,
            "audio_format": "mp3",
            "inference_steps": 20,
            "guidance_scale": 7.5,
        }
    ]
    assert handle.data["server"] == fake.base_url
    assert handle.data["task_id"] == "00000001-0000-4000-8000-000000000001"

    seen = await run_to_end(provider, handle)
    assert seen[0] == Queued(position=1)
    # The task's own progress, never the server's log line ("DiT diffusion: 33%").
    assert [s for s in seen if isinstance(s, Running)] == [Running(0.33), Running(0.67)]
    done = seen[-1]
    assert isinstance(done, Succeeded)
    result = done.result
    assert result.audio_url.startswith(f"{fake.base_url}/v1/audio?path=")
    assert result.seed == 31337 and result.seed_honoured
    assert result.tags == "lofi, piano, rain"
    assert result.lyrics == "[verse]\nrain on the window"
    assert result.content_type == "audio/mpeg"
    assert result.metadata["bpm"] == 92
    assert result.metadata["keyscale"] == "A minor"
    assert result.metadata["duration"] == 12
    assert result.metadata["dit_model"] == "acestep-v15-turbo"
    assert "genres" not in result.metadata  # the server left it empty

    audio = await provider.fetch_audio(result)
    assert audio[:3] == b"ID3" or audio[0] == 0xFF  # the MP3 asked for, not a WAV
    assert audio_seconds(audio) == pytest.approx(12, abs=0.1)
    # Every call, the audio download included, carried the key.
    assert {auth for _, _, auth in fake.requests} == {f"Bearer {KEY}"}


async def test_prompt_mode_writes_first_then_renders_at_the_asked_length(
    fake: FakeAceStep, provider: AceStepProvider
) -> None:
    """Upstream's sample_query replaces audio_duration with the LM's choice (30 s here):
    the LM only writes, then a text2music task renders at the user's 12 s."""
    request = GenerationRequest.build(
        mode="prompt", prompt="a calm song about rain", duration=12, instrumental=True
    )
    handle = await provider.submit(request, seed=5)
    assert fake.submits == [
        {
            "sample_query": "a calm song about rain, instrumental",
            "analysis_only": True,
            "use_cot_caption": False,
            "use_cot_language": False,
            "batch_size": 1,
        }
    ]
    seen = await run_to_end(provider, handle)
    done = seen[-1]
    assert isinstance(done, Succeeded)
    written = "a calm song about rain, instrumental; warm analog synths, 92 bpm"
    assert fake.submits[1] == {
        "prompt": written,
        "lyrics": "[Instrumental]",
        "use_cot_caption": False,
        "audio_duration": 12,
        "batch_size": 1,
        "use_random_seed": False,
        "seed": 5,
        "audio_format": "mp3",
        # The LM's choice of tempo, key and metre, since the user chose none.
        "bpm": 92,
        "key_scale": "A minor",
        "time_signature": "4",
    }
    assert handle.data["phase"] == "render"  # the engine stores the moved handle
    assert done.result.tags == written
    assert done.result.seed == 5
    audio = await provider.fetch_audio(done.result)
    assert audio_seconds(audio) == pytest.approx(12, abs=0.1)


async def test_prompt_mode_keeps_what_the_user_chose(
    fake: FakeAceStep, provider: AceStepProvider
) -> None:
    request = GenerationRequest.build(
        mode="prompt", prompt="a waltz", duration=20, bpm=84, key_scale="F#m",
        vocal_language="fr", thinking=True, time_signature="3",
    )  # fmt: skip
    handle = await provider.submit(request, seed=9)
    assert fake.submits[0]["vocal_language"] == "fr"
    await run_to_end(provider, handle)
    render = fake.submits[1]
    assert {k: render[k] for k in ("bpm", "key_scale", "time_signature", "vocal_language")} == {
        "bpm": 84,
        "key_scale": "F# minor",
        "time_signature": "3",
        "vocal_language": "fr",
    }
    assert render["thinking"] is True
    assert render["lyrics"] == "[verse]\nwritten by the language model"


async def test_instrumental_song_sends_the_instrumental_marker(
    fake: FakeAceStep, provider: AceStepProvider
) -> None:
    await provider.submit(song(lyrics="", instrumental=True), seed=1)
    assert fake.submits[0]["lyrics"] == "[Instrumental]"


def test_capabilities() -> None:
    adapter = AceStepProvider(["http://gpu1:8001", "http://gpu2:8001"])
    caps = adapter.capabilities
    assert caps.modes == frozenset({Mode.SONG, Mode.PROMPT})
    assert caps.price_per_second == 0.0
    assert caps.concurrency == 4
    assert caps.ignored_options(song(steps=8, guidance_scale=5, scheduler="heun")) == ["scheduler"]
    assert not caps.can_serve(song(duration=5))  # the server's minimum is 10 s
    assert caps.can_serve(song(duration=240))
    # Turbo takes 1-20 steps: a request for 27 (fal's default) goes elsewhere.
    assert caps.can_serve(song(steps=20)) and not caps.can_serve(song(steps=27))
    assert [n for n, _ in caps.out_of_range(song(steps=27))] == ["steps"]
    assert AceStepProvider(["http://gpu1:8001"], max_steps=200).capabilities.can_serve(
        song(steps=64)
    )
    song_only = AceStepProvider(["http://gpu1:8001"], prompt_mode=False).capabilities
    assert not song_only.can_serve(GenerationRequest.build(mode="prompt", prompt="rain"))


async def test_a_server_that_ignores_seeds_is_reported_as_such() -> None:
    fake = FakeAceStep(KEY, honours_seeds=False)  # as f30aee4: seeds=None upstream
    async with fake.running():
        adapter = make([fake.base_url])
        try:
            handle = await adapter.submit(song(), seed=1)
            done = (await run_to_end(adapter, handle))[-1]
            report = await adapter.health()
        finally:
            await adapter.aclose()
    assert isinstance(done, Succeeded)
    # The seed it used, never the one it ignored, and a flag the user is shown.
    assert done.result.seed != 1 and done.result.seed is not None
    assert done.result.seed_honoured is False
    assert done.result.metadata["seed_sent"] == 1
    assert report["servers"][fake.base_url]["honours_seeds"] is False


async def test_failure_reports_the_servers_error_text() -> None:
    fake = FakeAceStep(KEY, disk_cache=False)  # the store path carries the traceback
    fake.fail_with = "5Hz LM init failed: CUDA out of memory"
    async with fake.running():
        adapter = make([fake.base_url])
        try:
            handle = await adapter.submit(song(), seed=1)
            done = (await run_to_end(adapter, handle))[-1]
        finally:
            await adapter.aclose()
    assert done == Failed("RuntimeError: 5Hz LM init failed: CUDA out of memory")


async def test_failure_from_the_disk_cache_has_a_generic_reason(
    fake: FakeAceStep, provider: AceStepProvider
) -> None:
    fake.fail_with = "boom"
    handle = await provider.submit(song(), seed=1)
    done = (await run_to_end(provider, handle))[-1]
    assert done == Failed("the server reported that generation failed")


async def test_without_disk_cache_the_seed_is_unknown() -> None:
    fake = FakeAceStep(None, disk_cache=False)
    async with fake.running():
        adapter = make([fake.base_url], key=None)
        try:
            handle = await adapter.submit(song(), seed=99)
            done = (await run_to_end(adapter, handle))[-1]
            assert isinstance(done, Succeeded)
            audio = await adapter.fetch_audio(done.result)
        finally:
            await adapter.aclose()
    assert done.result.seed is None
    assert done.result.metadata["seed_sent"] == 99
    assert audio_seconds(audio) == pytest.approx(12, abs=0.01)
    assert {auth for _, _, auth in fake.requests} == {None}


@pytest.mark.parametrize(
    ("name", "error", "text"),
    [
        ("queue_full", Busy, "queue is full"),
        ("bad_request", Rejected, "JSON payload must be an object"),
        ("unsupported", Rejected, "Unsupported Content-Type"),
        ("server_error", Unavailable, "Internal Server Error"),
        ("envelope_error", Unavailable, "Model not initialized"),
    ],
)
async def test_release_errors_map_to_typed_errors(
    fake: FakeAceStep, provider: AceStepProvider, name: str, error: type[Exception], text: str
) -> None:
    fake.release_errors.append(name)
    with pytest.raises(error) as caught:
        await provider.submit(song(), seed=1)
    assert type(caught.value) is error
    assert text in str(caught.value)
    assert KEY not in str(caught.value)
    assert fake.submit_count == 0
    assert [p for m, p, _ in fake.requests if m == "POST"] == ["/release_task"]


async def test_wrong_key_is_an_auth_error_without_the_key(fake: FakeAceStep) -> None:
    adapter = make([fake.base_url], key="not-the-key-123")
    try:
        with pytest.raises(AuthError) as caught:
            await adapter.submit(song(), seed=1)
    finally:
        await adapter.aclose()
    assert "not-the-key-123" not in str(caught.value)
    assert "Invalid API key" in str(caught.value)


async def test_a_full_queue_is_busy_before_submitting() -> None:
    fake = FakeAceStep(KEY, queue_maxsize=2)
    async with fake.running():
        fake.add_load(queued=2)
        adapter = make([fake.base_url])
        try:
            with pytest.raises(Busy):
                await adapter.submit(song(), seed=1)
        finally:
            await adapter.aclose()
    assert fake.submit_count == 0


async def test_poll_retries_a_transient_error(fake: FakeAceStep, provider: AceStepProvider) -> None:
    handle = await provider.submit(song(), seed=1)
    fake.query_errors.append("server_error")
    assert await provider.poll(handle) == Queued(position=1)
    fake.query_errors.extend(["server_error"] * 3)
    with pytest.raises(Unavailable):
        await provider.poll(handle)


async def test_cancel_sends_nothing_and_the_task_runs_on(
    fake: FakeAceStep, provider: AceStepProvider
) -> None:
    """Upstream's server has no cancel endpoint: the adapter must not invent one, and the
    engine is told it could not stop the task (which then finishes on the GPU)."""
    handle = await provider.submit(song(), seed=1)
    before = list(fake.requests)
    assert await provider.cancel(handle) is False
    assert fake.requests == before
    assert isinstance((await run_to_end(provider, handle))[-1], Succeeded)


async def test_resumed_poll_from_a_stored_handle_on_a_new_adapter(
    fake: FakeAceStep, provider: AceStepProvider
) -> None:
    handle = await provider.submit(song(duration=15), seed=8)
    assert isinstance(await provider.poll(handle), Queued)
    stored = handle.to_json()
    await provider.aclose()

    fresh = make([fake.base_url])
    try:
        restored = Handle.from_json(stored)
        assert restored == handle
        done = (await run_to_end(fresh, restored))[-1]
        assert isinstance(done, Succeeded)
        audio = await fresh.fetch_audio(done.result)
    finally:
        await fresh.aclose()
    assert audio_seconds(audio) == pytest.approx(15, abs=0.01)
    assert fake.submit_count == 1


async def test_an_expired_file_is_a_failed_download(
    fake: FakeAceStep, provider: AceStepProvider
) -> None:
    handle = await provider.submit(song(), seed=1)
    done = (await run_to_end(provider, handle))[-1]
    assert isinstance(done, Succeeded)
    fake.files.clear()  # the operator cleaned the server's output folder
    with pytest.raises(ProviderFailedDownload):
        await provider.fetch_audio(done.result)


async def test_a_handle_for_a_server_no_longer_configured_still_polls_with_the_key(
    fake: FakeAceStep, provider: AceStepProvider
) -> None:
    handle = await provider.submit(song(), seed=1)
    other = make(["http://127.0.0.1:9"])  # the operator moved to another GPU box
    try:
        done = (await run_to_end(other, Handle.from_json(handle.to_json())))[-1]
        assert isinstance(done, Succeeded)
        await other.fetch_audio(done.result)
    finally:
        await other.aclose()
    assert {auth for _, _, auth in fake.requests} == {f"Bearer {KEY}"}
    assert other.server_urls == ["http://127.0.0.1:9"]  # never dispatched to


async def test_a_build_without_stats_still_works() -> None:
    fake = FakeAceStep(KEY, has_stats=False)
    async with fake.running():
        adapter = make([fake.base_url])
        try:
            handle = await adapter.submit(song(), seed=3)
            seen = await run_to_end(adapter, handle)
        finally:
            await adapter.aclose()
    assert seen[0] == Queued(position=1)
    assert isinstance(seen[-1], Succeeded)


# -- several servers ----------------------------------------------------------------------


@pytest.fixture
async def trio() -> AsyncIterator[tuple[FakeAceStep, FakeAceStep, FakeAceStep]]:
    """Three servers; the second is down (its port refuses connections)."""
    a, b, c = FakeAceStep(KEY), FakeAceStep(KEY), FakeAceStep(KEY)
    async with a.running(), b.running(), c.running():
        await b.stop()
        yield a, b, c


async def test_least_loaded_server_wins_and_a_down_one_is_skipped(
    trio: tuple[FakeAceStep, FakeAceStep, FakeAceStep],
) -> None:
    a, b, c = trio
    a.add_load(queued=2, running=1)
    c.add_load(running=1)
    adapter = make([a.base_url, b.base_url, c.base_url])
    try:
        first = await adapter.submit(song(), seed=1)
        second = await adapter.submit(song(), seed=2)
        third = await adapter.submit(song(), seed=3)
    finally:
        await adapter.aclose()
    # c starts lighter (load 1 vs 3), takes one (load 2) and another (load 3); at a tie
    # with a, the server holding fewer of our tasks wins.
    assert [h.data["server"] for h in (first, second, third)] == [
        c.base_url,
        c.base_url,
        a.base_url,
    ]
    assert (a.submit_count, b.submit_count, c.submit_count) == (1, 0, 2)


async def test_load_spreads_over_idle_servers(
    trio: tuple[FakeAceStep, FakeAceStep, FakeAceStep],
) -> None:
    a, b, c = trio
    adapter = make([a.base_url, b.base_url, c.base_url])
    try:
        handles = [await adapter.submit(song(), seed=n) for n in range(4)]
    finally:
        await adapter.aclose()
    assert [h.data["server"] for h in handles] == [a.base_url, c.base_url, a.base_url, c.base_url]


async def test_a_down_server_returns_once_health_answers(
    trio: tuple[FakeAceStep, FakeAceStep, FakeAceStep],
) -> None:
    a, b, c = trio
    a.add_load(running=1)
    c.add_load(running=1)
    adapter = make([a.base_url, b.base_url, c.base_url])
    try:
        await adapter.submit(song(), seed=1)
        assert b.submit_count == 0
        await b.start()
        handle = await adapter.submit(song(), seed=2)
    finally:
        await adapter.aclose()
    assert handle.data["server"] == b.base_url
    assert [p for _, p, _ in b.requests][:2] == ["/health", "/v1/stats"]


async def test_a_down_server_is_not_asked_again_too_soon(
    trio: tuple[FakeAceStep, FakeAceStep, FakeAceStep],
) -> None:
    a, b, c = trio
    adapter = make([a.base_url, b.base_url, c.base_url], recheck_after=3600.0)
    try:
        await adapter.submit(song(), seed=1)
        await b.start()
        for n in range(3):
            await adapter.submit(song(), seed=n)
    finally:
        await adapter.aclose()
    assert b.requests == []
    assert a.submit_count + c.submit_count == 4


async def test_all_servers_down_is_unavailable(
    trio: tuple[FakeAceStep, FakeAceStep, FakeAceStep],
) -> None:
    a, b, c = trio
    await a.stop()
    await c.stop()
    adapter = make([a.base_url, b.base_url, c.base_url])
    try:
        with pytest.raises(Unavailable) as caught:
            await adapter.submit(song(), seed=1)
    finally:
        await adapter.aclose()
    assert "no ACE-Step server answered" in str(caught.value)


async def test_queue_full_on_one_server_falls_to_the_next(
    trio: tuple[FakeAceStep, FakeAceStep, FakeAceStep],
) -> None:
    a, b, c = trio
    a.release_errors.append("queue_full")
    c.add_load(running=1)
    adapter = make([a.base_url, b.base_url, c.base_url])
    try:
        handle = await adapter.submit(song(), seed=1)
    finally:
        await adapter.aclose()
    assert handle.data["server"] == c.base_url
    assert (a.submit_count, c.submit_count) == (0, 1)


# -- a server restart loses its queue -----------------------------------------------------


async def test_restart_seen_by_the_poller_is_task_lost_and_resubmission_delivers(
    fake: FakeAceStep, provider: AceStepProvider
) -> None:
    fake.add_load(running=1)  # keep the server from looking idle afterwards
    handle = await provider.submit(song(duration=11), seed=4)
    assert isinstance(await provider.poll(handle), Queued)
    await fake.stop()
    with pytest.raises(Unavailable):
        await provider.poll(handle)
    await fake.restart()
    fake.add_load(running=1)
    # The server answers the unknown id with status 0 and "[]", like a queued task.
    with pytest.raises(TaskLost):
        await provider.poll(handle)

    again = await provider.submit(song(duration=11), seed=4)
    assert again.data["server"] == fake.base_url
    done = (await run_to_end(provider, again))[-1]
    assert isinstance(done, Succeeded)
    audio = await provider.fetch_audio(done.result)
    assert audio_seconds(audio) == pytest.approx(11, abs=0.01)
    assert [s["seed"] for s in fake.submits] == [4, 4]


async def test_restart_found_on_resume_when_the_server_is_idle(fake: FakeAceStep) -> None:
    adapter = make([fake.base_url])
    handle = await adapter.submit(song(), seed=4)
    await adapter.aclose()
    await fake.restart()  # nobody was polling; the bot resumes with a new adapter
    fresh = make([fake.base_url])
    try:
        with pytest.raises(TaskLost) as caught:
            await fresh.poll(Handle.from_json(handle.to_json()))
    finally:
        await fresh.aclose()
    assert "no queued or running job" in str(caught.value)


async def test_restart_of_a_busy_server_found_when_later_jobs_finish(fake: FakeAceStep) -> None:
    fake.add_load(running=1)
    adapter = make([fake.base_url])
    handle = await adapter.submit(song(), seed=4)
    await adapter.aclose()
    await fake.restart()
    fake.add_load(queued=3)
    fresh = make([fake.base_url])
    try:
        # Other jobs are pending: our unknown task might still be queued behind them.
        assert isinstance(await fresh.poll(handle), Queued)
        fake.finish_load(2)
        # Two jobs finished, more than the one that was ahead of ours: it is gone.
        with pytest.raises(TaskLost) as caught:
            await fresh.poll(handle)
    finally:
        await fresh.aclose()
    assert "never started" in str(caught.value)


async def test_restart_while_running_leaves_a_stale_entry_that_is_task_lost() -> None:
    fake = FakeAceStep(KEY, polls_queued=0, polls_running=5)
    async with fake.running():
        adapter = make([fake.base_url])
        try:
            handle = await adapter.submit(song(), seed=4)
            status = await adapter.poll(handle)
            assert isinstance(status, Running)
            await fake.restart()
            # Its disk cache still says "running" for the task: an idle server cannot be.
            with pytest.raises(TaskLost):
                await adapter.poll(handle)
            # After upstream's one-hour timeout the stale entry turns into status 2.
            fake.task_timeout = 0
            fake.add_load(running=1)
            with pytest.raises(TaskLost) as caught:
                await adapter.poll(handle)
        finally:
            await adapter.aclose()
    assert "gave up" in str(caught.value)


async def test_restart_detected_by_a_changed_start_time() -> None:
    fake = FakeAceStep(KEY, report_uptime=True)
    async with fake.running():
        fake.add_load(running=2)
        adapter = make([fake.base_url])
        handle = await adapter.submit(song(), seed=4)
        await adapter.aclose()
        await fake.restart()
        fake.add_load(running=3)
        fresh = make([fake.base_url])
        try:
            with pytest.raises(TaskLost) as caught:
                await fresh.poll(handle)
        finally:
            await fresh.aclose()
    assert "restarted" in str(caught.value)


async def test_a_queued_task_on_a_busy_server_is_not_declared_lost(fake: FakeAceStep) -> None:
    """No false alarm: other jobs come and go while ours waits its turn."""
    fake.polls_queued = 4
    fake.add_load(running=1)
    adapter = make([fake.base_url])
    try:
        handle = await adapter.submit(song(), seed=4)
        fake.add_load(queued=2)  # submitted after ours
        for _ in range(3):
            assert isinstance(await adapter.poll(handle), Queued)
        fake.finish_load(1)  # the job ahead of ours
        done = (await run_to_end(adapter, handle))[-1]
    finally:
        await adapter.aclose()
    assert isinstance(done, Succeeded)


# -- a server without its language model ---------------------------------------------------


def prompt(**fields: object) -> GenerationRequest:
    values: dict[str, object] = {"mode": "prompt", "prompt": "rain at night", "duration": 12}
    values.update(fields)
    return GenerationRequest.build(**values)


async def test_a_server_that_says_it_has_no_lm_is_not_used_for_prompt_mode() -> None:
    fake = FakeAceStep(KEY, lm=False, health_reports_lm=True)  # a newer build
    async with fake.running():
        adapter = make([fake.base_url])
        try:
            with pytest.raises(CannotServe) as caught:
                await adapter.submit(prompt(), seed=1)
            # Routing now skips it for described songs; composed songs still go there.
            assert not adapter.capabilities.can_serve(prompt())
            assert adapter.capabilities.ignored_options(song(thinking=True)) == ["thinking"]
            handle = await adapter.submit(song(), seed=2)
            assert isinstance((await run_to_end(adapter, handle))[-1], Succeeded)
            report = await adapter.health()
        finally:
            await adapter.aclose()
    assert "ACESTEP_INIT_LLM=true" in str(caught.value)
    assert fake.submit_count == 1  # nothing was queued that could only fail
    server = report["servers"][fake.base_url]
    assert report["prompt_mode"] is False and server["prompt_mode"] is False
    assert "language model" in server["note"]


async def test_an_older_build_without_lm_is_found_out_by_its_first_prompt_song() -> None:
    fake = FakeAceStep(KEY, lm=False)  # f30aee4: /health does not say
    async with fake.running():
        adapter = make([fake.base_url])
        try:
            assert (await adapter.health())["servers"][fake.base_url]["prompt_mode"] is None
            handle = await adapter.submit(prompt(), seed=1)
            with pytest.raises(CannotServe):
                await run_to_end(adapter, handle)
            assert not adapter.capabilities.can_serve(prompt())
            with pytest.raises(CannotServe):
                await adapter.submit(prompt(), seed=1)
        finally:
            await adapter.aclose()
    # Only the cheap write task was tried; no audio was made at the LM's length.
    assert [b.get("analysis_only") for b in fake.submits] == [True]


async def test_prompt_songs_go_to_the_server_that_has_the_lm() -> None:
    small = FakeAceStep(KEY, lm=False, health_reports_lm=True)
    big = FakeAceStep(KEY, health_reports_lm=True)
    async with small.running(), big.running():
        big.add_load(running=2)  # busier, but the only one that can write
        adapter = make([small.base_url, big.base_url])
        try:
            handle = await adapter.submit(prompt(), seed=1)
            assert isinstance((await run_to_end(adapter, handle))[-1], Succeeded)
            composed = await adapter.submit(song(), seed=2)
        finally:
            await adapter.aclose()
    assert handle.data["server"] == big.base_url
    assert composed.data["server"] == small.base_url  # the idle one, for a composed song
    assert adapter.capabilities.can_serve(prompt())


# -- what upstream shares between jobs ------------------------------------------------------


async def test_progress_never_shows_the_servers_log_line_of_another_users_song(
    fake: FakeAceStep, provider: AceStepProvider
) -> None:
    mine = await provider.submit(song(), seed=1)
    theirs = await provider.submit(prompt(prompt="secret birthday song for Alice"), seed=2)
    await provider.poll(theirs)
    await provider.poll(theirs)  # its "Creating sample from query: ..." is the last line
    assert "Alice" in fake.last_log
    seen = await run_to_end(provider, mine)
    for status in seen:
        if isinstance(status, Running):
            assert status.message is None
            assert status.progress is not None and 0 < status.progress < 1


async def test_a_refused_submit_leaves_a_ghost_that_is_not_counted_as_load() -> None:
    """Upstream records the job before it finds the queue full: that record stays
    "queued" in /v1/stats for ever. The real queue size is what counts, for the queue
    position and for noticing a task that a restart lost."""
    fake = FakeAceStep(KEY)
    async with fake.running():
        first = make([fake.base_url])
        handle = await first.submit(song(), seed=4)
        await first.aclose()
        await fake.restart()  # our task is gone with the process
        other = make([fake.base_url])  # another client's submit is refused: a ghost
        fake.release_errors.append("queue_full")
        with pytest.raises(Busy):
            await other.submit(song(), seed=5)
        await other.aclose()
        assert fake.stats()["jobs"]["queued"] == 1 and fake.stats()["queue_size"] == 0
        fresh = make([fake.base_url])  # the bot resumes after its own restart
        try:
            with pytest.raises(TaskLost) as caught:
                await fresh.poll(Handle.from_json(handle.to_json()))
            again = await fresh.submit(song(), seed=4)
            assert await fresh.poll(again) == Queued(position=1)
        finally:
            await fresh.aclose()
    assert "no queued or running job" in str(caught.value)
