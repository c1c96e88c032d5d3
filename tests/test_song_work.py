"""Work on a song (issue 14), engine and storage side: several takes, extend/remix/repaint
jobs handed their source file, source intake, the providers' upload cache and restarts.

The provider is the real fal adapter against the fake fal queue server, widened in the
test to declare the edit tasks and to use the upload cache the way fal's storage upload
does (until the provider helpers' adapters land, that is what exercises the engine).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest

from bot import messages, sources
from bot.engine import Engine, NoProvider, QuotaExceeded
from bot.models import Requester
from bot.requests import GenerationRequest, SourceAudio, Task
from providers.base import Handle, Rejected, SourceFile
from providers.fal import FalProvider
from storage.database import Database
from storage.jobs import JobStore
from tests.conftest import make_settings
from tests.enginekit import RecordingDelivery, open_engine, wait_for_state
from tests.fakes.audio import make_wav, transcode
from tests.fakes.fal import FakeFal

ALICE = Requester("discord", "100", "guild1", "alice")
CAP = 5 * 1024 * 1024


class EditingFal(FalProvider):
    """The real fal adapter (its edit endpoints and storage upload on the fake), which
    records what the engine handed it and refuses the seeds a test names."""

    def __init__(self, fake: FakeFal, url: str, *, reject_seeds: tuple[int, ...] = ()) -> None:
        super().__init__(fake.key, url, storage_url=url, concurrency=4, poll_interval=0.01)
        self.reject_seeds = reject_seeds
        self.sources: list[SourceFile | None] = []

    async def submit(
        self, request: GenerationRequest, seed: int, source: SourceFile | None = None
    ) -> Handle:
        self.sources.append(source)
        if seed in self.reject_seeds:
            raise Rejected(self.name, "content policy")
        return await super().submit(request, seed, source)


def prompt(**kw: object) -> GenerationRequest:
    return GenerationRequest.build(mode="prompt", prompt="lofi piano about rain", **kw)


async def stored_source(data_dir: Path, seconds: float = 8.0) -> SourceAudio:
    return await sources.from_bytes(data_dir, make_wav(seconds), name="mine.wav", max_bytes=CAP)


def extend(source: SourceAudio, after: int = 4, **kw: object) -> GenerationRequest:
    return GenerationRequest.build(
        mode="prompt",
        prompt="lofi piano about rain",
        task="extend",
        source=source,
        extend_after=after,
        **kw,
    )


async def count_jobs(engine: Engine) -> int:
    return len(await engine.store.recent(100))


# ---- storage: the upload cache --------------------------------------------------------


async def test_upload_cache_survives_a_restart_and_forgets_expired_refs(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    db = await Database.open(settings.db_path)
    store = JobStore(db)
    sha = "a" * 64
    await store.uploads.put("fal", sha, "https://storage.example/one", time.time() + 60)
    await store.uploads.put("wavespeed", sha, "https://w.example/old", time.time() - 1)
    await db.close()
    store = JobStore(await Database.open(settings.db_path))
    try:
        assert await store.uploads.get("fal", sha) == "https://storage.example/one"
        assert await store.uploads.get("wavespeed", sha) is None  # expired
        assert await store.uploads.get("fal", "b" * 64) is None
        await store.uploads.put("fal", sha, "https://storage.example/two", time.time() + 60)
        assert await store.uploads.get("fal", sha) == "https://storage.example/two"
    finally:
        await store.close()


# ---- takes ----------------------------------------------------------------------------


async def test_takes_make_one_job_each_with_distinct_seeds_all_delivered(tmp_path: Path) -> None:
    fake = FakeFal(queue_polls=0, progress_polls=1)
    settings = make_settings(tmp_path, quota_user_concurrent_jobs=4)
    delivery = RecordingDelivery(byte_limit=None)
    async with fake.running() as url:
        engine = await open_engine(settings, [EditingFal(fake, url)], delivery)
        try:
            admission = await engine.submit(prompt(duration=6, takes=3), ALICE, {})
            ids = [job_id for job_id, _ in admission.takes]
            jobs = [await wait_for_state(engine, i, ("delivered",)) for i in ids]
            usage = await engine.quota_status(ALICE)
        finally:
            await engine.close()
    assert len(ids) == 3 and admission.job_id == ids[0]
    seeds = [job.seed for job in jobs]
    assert len(set(seeds)) == 3 and seeds == [seed for _, seed in admission.takes]
    assert sorted(fake_seed for fake_seed in (s.body["seed"] for s in fake.submits)) == sorted(
        seeds
    )
    assert [(job.take, job.takes) for job in jobs] == [(1, 3), (2, 3), (3, 3)]
    assert {job.batch_id for job in jobs} == {ids[0]}
    # each take alone: its stored request asks for one take and its seed makes it again
    assert all(job.request.takes == 1 for job in jobs)
    songs = next(line for line in usage.lines if line.name == "user_jobs_per_day")
    assert songs.used == 3  # each take counts against quota
    assert sorted(delivery.delivered_ids()) == sorted(ids)


async def test_a_user_seed_gives_the_takes_that_seed_and_the_ones_after(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, quota_user_concurrent_jobs=4)
    engine = await Engine.open(settings, [EditingFal(FakeFal(), "http://127.0.0.1:9")])
    try:
        admission = await engine.submit(prompt(duration=6, takes=2, seed=41), ALICE, {})
    finally:
        await engine.close()
    assert [seed for _, seed in admission.takes] == [41, 42]


async def test_takes_over_a_limit_store_none_of_them(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, quota_user_jobs_per_day=4, quota_user_concurrent_jobs=4)
    engine = await Engine.open(settings, [EditingFal(FakeFal(), "http://127.0.0.1:9")])
    try:
        await engine.submit(prompt(duration=6, takes=2), ALICE, {})
        with pytest.raises(QuotaExceeded) as refused:
            await engine.submit(prompt(duration=6, takes=3), ALICE, {})
        assert await count_jobs(engine) == 2  # none of the three takes was stored
        line = str(refused.value)
        ledger = await engine.store.ledger()
    finally:
        await engine.close()
    assert "song" in line.lower()
    assert [e["kind"] for e in ledger] == ["reserve", "reserve"]


async def test_one_failed_take_does_not_lose_the_others(tmp_path: Path) -> None:
    fake = FakeFal(queue_polls=0, progress_polls=1)
    settings = make_settings(tmp_path, quota_user_concurrent_jobs=4)
    delivery = RecordingDelivery(byte_limit=None)
    async with fake.running() as url:
        provider = EditingFal(fake, url, reject_seeds=(11,))
        engine = await open_engine(settings, [provider], delivery)
        try:
            admission = await engine.submit(prompt(duration=6, takes=3, seed=10), ALICE, {})
            states = [
                (await wait_for_state(engine, i, ("delivered", "failed"))).state
                for i, _ in admission.takes
            ]
        finally:
            await engine.close()
    assert states == ["delivered", "failed", "delivered"]
    assert [jid for jid, _ in delivery.failures] == [admission.takes[1][0]]


async def test_the_same_event_with_takes_is_admitted_once(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, quota_user_concurrent_jobs=4)
    engine = await Engine.open(settings, [EditingFal(FakeFal(), "http://127.0.0.1:9")])
    try:
        first = await engine.submit(prompt(duration=6, takes=2), ALICE, {}, source_key="tg:7")
        again = await engine.submit(prompt(duration=6, takes=2), ALICE, {}, source_key="tg:7")
        assert await count_jobs(engine) == 2
    finally:
        await engine.close()
    assert again.duplicate and again.takes == first.takes


# ---- tasks ----------------------------------------------------------------------------


async def test_a_task_no_provider_offers_is_refused_at_once_naming_it(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    plain = FalProvider(FakeFal().key, "http://127.0.0.1:9")
    plain.capabilities = replace(plain.capabilities, tasks=frozenset({Task.GENERATE}))
    source = await stored_source(settings.data_dir)
    engine = await Engine.open(settings, [plain])
    try:
        with pytest.raises(NoProvider) as refused:
            await engine.submit(extend(source), ALICE, {})
        assert await count_jobs(engine) == 0
        usage = await engine.quota_status(ALICE)
    finally:
        await engine.close()
    assert str(refused.value) == messages.no_provider_for_task("extend")
    assert "extend" in str(refused.value)
    assert all(line.used == 0 for line in usage.lines)


@pytest.mark.parametrize(
    "task, fields",
    [
        ("extend", {"extend_after": 4}),
        ("remix", {"strength": 0.5}),
        ("repaint", {"repaint_start": 2.0, "repaint_end": 4.0}),
    ],
)
async def test_an_edit_is_handed_its_source_file_and_delivered(
    tmp_path: Path, task: str, fields: dict[str, object]
) -> None:
    fake = FakeFal(queue_polls=0, progress_polls=1)
    settings = make_settings(tmp_path)
    delivery = RecordingDelivery(byte_limit=None)
    source = await stored_source(settings.data_dir)
    async with fake.running() as url:
        provider = EditingFal(fake, url)
        engine = await open_engine(settings, [provider], delivery)
        try:
            request = GenerationRequest.build(
                mode="prompt", prompt="lofi piano", task=task, source=source, **fields
            )
            admission = await engine.submit(request, ALICE, {})
            job = await wait_for_state(engine, admission.job_id, ("delivered",))
        finally:
            await engine.close()
    [handed] = provider.sources
    assert handed is not None
    assert handed.path == settings.data_dir / "sources" / source.file
    assert handed.sha256 == source.sha256 and handed.seconds == pytest.approx(8.0)
    assert job.request.task.value == task and job.request.source == source
    assert job.duration == (12 if task == "extend" else 8)
    assert delivery.delivered_ids() == [job.id]


async def test_restart_mid_submit_of_an_edit_resumes_without_uploading_again(
    tmp_path: Path,
) -> None:
    fake = FakeFal(queue_polls=0, progress_polls=1)
    settings = make_settings(tmp_path)
    source = await stored_source(settings.data_dir)
    async with fake.running() as url:
        first = EditingFal(fake, url)
        engine = await Engine.open(settings, [first])
        admission = await engine.submit(extend(source, after=4), ALICE, {})
        job = await engine.get_job(admission.job_id)
        assert job is not None
        # The first process uploaded the source, then died before the provider answered.
        handed = engine.runner.source_file(job)
        assert handed is not None
        await first.submit(job.request, job.seed, handed)
        assert len(fake.uploads) == 1
        assert await engine.store.transition(job.id, ("queued",), "submitting")
        await engine.store.close()

        second = EditingFal(fake, url)
        delivery = RecordingDelivery(byte_limit=None)
        engine2 = await open_engine(settings, [second], delivery)
        try:
            done = await wait_for_state(engine2, job.id, ("delivered",))
        finally:
            await engine2.close()
    assert len(fake.uploads) == 1  # the provider already had the file: not sent again
    assert [s.sha256 for s in second.sources if s] == [source.sha256]
    assert done.recoveries == 1 and delivery.delivered_ids() == [job.id]


async def test_restart_while_an_edit_runs_polls_on_and_delivers(tmp_path: Path) -> None:
    fake = FakeFal(queue_polls=1, progress_polls=10_000)
    settings = make_settings(tmp_path)
    source = await stored_source(settings.data_dir)
    async with fake.running() as url:
        engine = await open_engine(settings, [EditingFal(fake, url)])
        admission = await engine.submit(extend(source, after=4), ALICE, {})
        await wait_for_state(engine, admission.job_id, ("running",))
        await engine.abort()
        await engine.store.close()
        fake.progress_polls = 1
        second = EditingFal(fake, url)
        engine2 = await open_engine(settings, [second], RecordingDelivery(byte_limit=None))
        try:
            await wait_for_state(engine2, admission.job_id, ("delivered",))
        finally:
            await engine2.close()
    assert fake.submit_count == 1 and second.sources == []


async def test_an_edit_whose_source_file_vanished_fails_without_a_charge(tmp_path: Path) -> None:
    fake = FakeFal(queue_polls=0, progress_polls=1)
    settings = make_settings(tmp_path)
    source = await stored_source(settings.data_dir)
    source.path(settings.data_dir).unlink()
    async with fake.running() as url:
        provider = EditingFal(fake, url)
        engine = await open_engine(settings, [provider], RecordingDelivery())
        try:
            admission = await engine.submit(extend(source), ALICE, {})
            job = await wait_for_state(engine, admission.job_id, ("failed",))
            ledger = await engine.store.ledger(job.id)
        finally:
            await engine.close()
    assert provider.sources == [] and fake.submit_count == 0
    charged = sum(e["usd"] for e in ledger if e["kind"] == "charge")
    credited = sum(e["usd"] for e in ledger if e["kind"] == "credit")
    assert charged == pytest.approx(credited)


# ---- source intake --------------------------------------------------------------------


async def test_a_source_is_stored_once_by_its_hash(tmp_path: Path) -> None:
    data = make_wav(6)
    one = await sources.from_bytes(tmp_path, data, name="a.wav", max_bytes=CAP)
    two = await sources.from_bytes(tmp_path, data, name="b.wav", max_bytes=CAP)
    assert one.sha256 == two.sha256 and one.file == f"{one.sha256}.wav"
    assert one.seconds == pytest.approx(6.0)
    assert [p.name for p in (tmp_path / "sources").iterdir()] == [one.file]


async def test_an_mp3_source_keeps_its_format(tmp_path: Path) -> None:
    got = await sources.from_bytes(
        tmp_path, transcode(make_wav(5), "mp3"), name="x.mp3", max_bytes=CAP
    )
    assert got.file.endswith(".mp3") and got.seconds == pytest.approx(5.0, abs=0.1)


@pytest.mark.parametrize(
    "data, line",
    [
        (b"", messages.SOURCE_EMPTY),
        (b"<html>not a song</html>" * 100, messages.SOURCE_NOT_AUDIO),
        (make_wav(5, silent=True), messages.SOURCE_SILENT),
        (make_wav(300, sample_rate=8000, channels=1), messages.source_too_long(None, 240)),
    ],
    ids=["empty", "not-audio", "silent", "too-long"],
)
async def test_bad_sources_get_one_line_and_leave_nothing(
    tmp_path: Path, data: bytes, line: str
) -> None:
    with pytest.raises(sources.SourceRefused) as refused:
        await sources.from_bytes(tmp_path, data, max_bytes=CAP)
    assert str(refused.value) == line
    assert list((tmp_path / "sources").iterdir()) == []


async def test_a_source_over_the_cap_is_refused_saying_the_cap(tmp_path: Path) -> None:
    with pytest.raises(sources.SourceRefused) as refused:
        await sources.from_bytes(tmp_path, make_wav(5), max_bytes=100_000)
    assert "0.1 MB" in str(refused.value) and "allowed" in str(refused.value)


async def test_a_platform_file_over_the_cap_is_refused_before_download(tmp_path: Path) -> None:
    import httpx

    fetched: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        fetched.append(str(request.url))
        return httpx.Response(200, content=make_wav(5))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(sources.SourceRefused) as refused:
            await sources.from_url(
                tmp_path, client, "https://cdn/x.wav", declared_size=50 << 20, max_bytes=CAP
            )
        assert fetched == [] and "5 MB" in str(refused.value)
        # a platform that under-declares is cut off at the cap while downloading
        with pytest.raises(sources.SourceRefused):
            await sources.from_url(
                tmp_path, client, "https://cdn/x.wav", declared_size=10, max_bytes=100_000
            )
        got = await sources.from_url(
            tmp_path, client, "https://cdn/x.wav", declared_size=None, max_bytes=CAP
        )
    assert got.seconds == pytest.approx(5.0)
    assert [p.name for p in (tmp_path / "sources").iterdir()] == [got.file]


async def test_a_posted_song_is_a_source_with_its_lineage(tmp_path: Path) -> None:
    fake = FakeFal(queue_polls=0, progress_polls=1)
    settings = make_settings(tmp_path)
    async with fake.running() as url:
        engine = await open_engine(settings, [EditingFal(fake, url)], RecordingDelivery())
        try:
            admission = await engine.submit(prompt(duration=6), ALICE, {})
            job = await wait_for_state(engine, admission.job_id, ("delivered",))
        finally:
            await engine.close()
    got = await sources.from_job(settings.data_dir, settings.audio_dir, job)
    assert got.job_id == job.id and got.seconds == pytest.approx(6.0, abs=0.3)
    with pytest.raises(sources.SourceRefused) as refused:
        await sources.from_job(settings.data_dir, settings.audio_dir, None)
    assert str(refused.value) == messages.SOURCE_NO_SUCH_SONG


# ---- lineage ---------------------------------------------------------------------------


async def test_an_extended_song_says_where_it_came_from_everywhere(tmp_path: Path) -> None:
    from mutagen.id3 import ID3

    from bot.chat import replies

    fake = FakeFal(queue_polls=0, progress_polls=1)
    settings = make_settings(tmp_path)
    delivery = RecordingDelivery(byte_limit=None)
    async with fake.running() as url:
        engine = await open_engine(settings, [EditingFal(fake, url)], delivery)
        try:
            first = await engine.submit(prompt(duration=6, title="Rain on Glass"), ALICE, {})
            original = await wait_for_state(engine, first.job_id, ("delivered",))
            source = await sources.from_job(settings.data_dir, settings.audio_dir, original)
            second = await engine.submit(extend(source, after=4), ALICE, {})
            edited = await wait_for_state(engine, second.job_id, ("delivered",))
            history = replies.history_reply(await engine.history(ALICE)).text.plain()
        finally:
            await engine.close()
    said = f"extended from \u201cRain on Glass\u201d (job {original.id})"
    card = replies.song_card(edited, title=edited.title, duration=10, seed=1, provider="fal")
    assert said in card.notes
    assert said in history
    rendered = dict(delivery.delivered)[edited.id]
    comments = [c.text[0] for c in ID3(rendered.path).getall("COMM")]
    assert any(f"Source: {said}" in c for c in comments)
    plain_card = replies.song_card(original, title="x", duration=6, seed=1, provider="fal")
    assert plain_card.notes == ()
