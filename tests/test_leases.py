"""Several processes on one database: job leases, global provider limits and singleton
holds, on both backends (two Store instances, each with its own connections, stand for
two processes)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.engine import Engine
from bot.engine.leases import instance_id, new_owner
from bot.models import Requester
from bot.settings import Settings
from providers.fal import FalProvider
from storage.jobs import JobStore
from tests.conftest import make_settings, open_db
from tests.enginekit import FAST, RecordingDelivery, open_engine, wait_for_state
from tests.fakes.fal import FakeFal
from tests.opskit import seed_job
from tests.pgcluster import Cluster
from tests.test_storage_failures import fal, prompt

NOW = 1_790_000_000.0
ALICE = Requester("discord", "100", "guild1", "alice")
A, B = "hostA:/data/one/run1", "hostB:/data/two/run1"
A_INSTANCE, B_INSTANCE = "hostA:/data/one", "hostB:/data/two"


@pytest.fixture
async def stores(tmp_path: Path, db_url: str | None) -> AsyncIterator[tuple[JobStore, JobStore]]:
    path = tmp_path / "shared.sqlite3"
    first, second = await open_db(db_url, path), await open_db(db_url, path)
    try:
        yield JobStore(first), JobStore(second)
    finally:
        await first.close()
        await second.close()


async def started(store: JobStore, owner: str, *, provider: str = "fal", at: float = NOW) -> str:
    job = await seed_job(store, ALICE, at=at - 10, state="queued", provider=None)
    assert await store.start_run(
        job.id, provider, 0.01, None, at, owner=owner, lease_seconds=60, concurrency=None
    )
    return job.id


async def test_a_job_is_taken_over_only_after_its_lease_runs_out(
    stores: tuple[JobStore, JobStore],
) -> None:
    a, b = stores
    job_id = await started(a, A)
    held = await a.get(job_id)
    assert held is not None and held.owner == A and held.lease_expires == NOW + 60
    states = ("submitting", "running")
    # B may not take A's live job, however often it asks.
    assert await b.claim(job_id, B, B_INSTANCE, states, 60, now=NOW + 30) is None
    assert await b.lapsed(states, B, B_INSTANCE, now=NOW + 30) == []
    # A renews; B still cannot take it past the first lease's end.
    assert await a.renew_leases(A, 60, now=NOW + 40) == {job_id}
    assert await b.claim(job_id, B, B_INSTANCE, states, 60, now=NOW + 90) is None
    # A stops renewing (it died): once the lease has run out, B takes the job.
    assert [j.id for j in await b.lapsed(states, B, B_INSTANCE, now=NOW + 101)] == [job_id]
    taken = await b.claim(job_id, B, B_INSTANCE, states, 60, now=NOW + 101)
    assert taken is not None and taken.owner == B
    # A, back from a long pause, finds it no longer holds the job.
    assert await a.renew_leases(A, 60, now=NOW + 102) == set()
    assert await b.renew_leases(B, 60, now=NOW + 102) == {job_id}


async def test_a_restarted_process_takes_its_own_old_jobs_at_once(
    stores: tuple[JobStore, JobStore],
) -> None:
    """The same instance (host and data directory, one process at a time) restarted:
    the earlier run is dead, so its leases need not run out first."""
    a, _ = stores
    job_id = await started(a, A)
    again = await a.claim(
        job_id, f"{A_INSTANCE}/run2", A_INSTANCE, ("submitting",), 60, now=NOW + 1
    )
    assert again is not None and again.owner == f"{A_INSTANCE}/run2"
    # Once it holds the job, it is not "lapsed" to itself, however late.
    assert await a.lapsed(("submitting",), f"{A_INSTANCE}/run2", A_INSTANCE, now=NOW + 500) == []
    # A different data directory on the same host is another process: it waits.
    other = ("hostA:/data/x/r", "hostA:/data/x")
    assert await a.claim(job_id, *other, ("submitting",), 60, now=NOW + 2) is None


async def test_two_processes_claiming_one_job_at_once_give_it_to_one(
    stores: tuple[JobStore, JobStore],
) -> None:
    a, b = stores
    job_id = await started(a, "dead-host:/data/run0")
    later = NOW + 500  # the dead process's lease ran out long ago
    results = await asyncio.gather(
        *(
            (a if i % 2 else b).claim(
                job_id, f"host{i}:/d/run", f"host{i}:/d", ("submitting",), 60, now=later
            )
            for i in range(10)
        )
    )
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    final = await a.get(job_id)
    assert final is not None and final.owner == winners[0].owner


async def test_a_provider_limit_counts_every_process(stores: tuple[JobStore, JobStore]) -> None:
    a, b = stores
    first = await started(a, A)
    second = await started(b, B)
    assert await a.in_flight() == {"fal": 2}
    assert await a.in_flight(exclude_owner=A) == {"fal": 1}  # what the others hold
    third = await seed_job(b, ALICE, at=NOW - 5, state="queued", provider=None)
    # Room for two at fal, both taken (one by each process): the third waits.
    assert not await b.start_run(third.id, "fal", 0.01, None, NOW, owner=B, concurrency=2)
    waiting = await b.get(third.id)
    assert waiting is not None and waiting.state == "queued" and waiting.charged_usd is None
    assert await b.start_run(third.id, "wavespeed", 0.01, None, NOW, owner=B, concurrency=2)
    # One finishes: room again.
    await a.finish_unsuccessful(first, ("submitting",), "failed", "x")
    fourth = await seed_job(a, ALICE, at=NOW - 4, state="queued", provider=None)
    assert await a.start_run(fourth.id, "fal", 0.01, None, NOW, owner=A, concurrency=2)
    assert await a.in_flight() == {"fal": 2, "wavespeed": 1}
    assert second


async def test_concurrent_starts_never_exceed_a_provider_limit(
    stores: tuple[JobStore, JobStore],
) -> None:
    a, b = stores
    jobs = [
        await seed_job(a, ALICE, at=NOW - 20 + i, state="queued", provider=None) for i in range(12)
    ]
    results = await asyncio.gather(
        *(
            (a if i % 2 else b).start_run(
                j.id, "fal", 0.01, None, NOW, owner=A if i % 2 else B, concurrency=3
            )
            for i, j in enumerate(jobs)
        )
    )
    assert sum(results) == 3
    assert await b.in_flight() == {"fal": 3}
    assert await a.usage_mismatches() == []


async def test_a_singleton_is_held_by_one_process_until_released_or_expired(
    stores: tuple[JobStore, JobStore],
) -> None:
    a, b = stores
    assert await a.hold_singleton("telegram-poller", A, 30, now=NOW)
    assert not await b.hold_singleton("telegram-poller", B, 30, now=NOW + 1)
    assert await a.hold_singleton("telegram-poller", A, 30, now=NOW + 20)  # renewed
    assert not await b.hold_singleton("telegram-poller", B, 30, now=NOW + 40)
    assert await b.singleton_owner("telegram-poller", now=NOW + 40) == A
    # A stops renewing: B gets it once the hold has expired.
    assert await b.hold_singleton("telegram-poller", B, 30, now=NOW + 51)
    assert not await a.release_singleton("telegram-poller", A)  # not A's any more
    assert await b.release_singleton("telegram-poller", B)
    assert await a.singleton_owner("telegram-poller", now=NOW + 52) is None
    assert await a.hold_singleton("telegram-poller", A, 30, now=NOW + 52)
    # Holds are by name: another one is independent.
    assert await b.hold_singleton("other", B, 30, now=NOW + 52)


async def test_concurrent_holds_give_a_singleton_to_one(
    stores: tuple[JobStore, JobStore],
) -> None:
    a, b = stores
    results = await asyncio.gather(
        *((a if i % 2 else b).hold_singleton("poller", f"p{i}", 30, now=NOW) for i in range(10))
    )
    assert sum(results) == 1


# ---- two engines (two processes) on one PostgreSQL database ---------------------------


async def test_a_second_process_takes_over_a_dead_ones_song_once_its_lease_runs_out(
    tmp_path: Path, pg_cluster: Cluster
) -> None:
    url = pg_cluster.new_database()
    fake = FakeFal(queue_polls=10**6)  # stays in the queue until the test lets it go
    fake.streams = False
    seen_a, seen_b = RecordingDelivery(), RecordingDelivery()
    async with fake.running() as fal_url:

        def engine_settings(name: str) -> Settings:
            return make_settings(tmp_path / name, database_url=url, lease_seconds=3)

        first = await open_engine(engine_settings("a"), [fal(fake, fal_url)], seen_a)
        second = await open_engine(engine_settings("b"), [fal(fake, fal_url)], seen_b)
        try:
            assert first.instance != second.instance
            adm = await first.submit(prompt(), ALICE, {"channel_id": "1"})
            job = await wait_for_state(first, adm.job_id, ("running",))
            assert job.owner == first.owner
            await first.abort()  # the process dies: nothing more is written
            fake.queue_polls = 0
            await asyncio.sleep(1.5)  # within the lease: the other process leaves it
            held = await second.get_job(adm.job_id)
            assert held is not None and held.state == "running" and held.owner == first.owner
            done = await wait_for_state(second, adm.job_id, ("delivered",), timeout=15)
        finally:
            await first.close()
            await second.close()
    assert done.owner == second.owner
    assert seen_b.delivered_ids() == [adm.job_id] and seen_a.delivered_ids() == []
    assert fake.submit_count == 1  # polled where it was, never sent twice


async def test_a_provider_limit_holds_across_processes(tmp_path: Path, pg_cluster: Cluster) -> None:
    url = pg_cluster.new_database()
    fake = FakeFal(queue_polls=3, progress_polls=3)
    fake.streams = False
    deliveries = [RecordingDelivery(), RecordingDelivery()]
    async with fake.running() as fal_url:
        engines = [
            await open_engine(
                make_settings(tmp_path / name, database_url=url),
                [FalProvider(fake.key, fal_url, poll_interval=0.01, concurrency=1)],
                seen,
            )
            for name, seen in zip(("a", "b"), deliveries, strict=True)
        ]
        try:
            ids = [
                (
                    await engines[i % 2].submit(
                        prompt(), Requester("discord", str(i), "g"), {"channel_id": "1"}
                    )
                ).job_id
                for i in range(4)
            ]
            peak = 0
            while True:
                peak = max(peak, sum((await engines[0].store.in_flight()).values()))
                jobs = [await engines[0].get_job(i) for i in ids]
                if all(j is not None and j.state == "delivered" for j in jobs):
                    break
                await asyncio.sleep(0.005)
        finally:
            for engine in engines:
                await engine.close()
    assert peak == 1  # one song at a time at fal, from both processes together
    assert sorted(deliveries[0].delivered_ids() + deliveries[1].delivered_ids()) == sorted(ids)


def test_an_instance_is_the_data_dir_on_sqlite_and_host_and_data_dir_on_postgresql(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lite = make_settings(tmp_path / "a")
    pg = make_settings(tmp_path / "a", database_url="postgresql://db/bot")
    monkeypatch.setattr("socket.gethostname", lambda: "container-1")
    first_lite, first_pg = instance_id(lite), instance_id(pg)
    monkeypatch.setattr("socket.gethostname", lambda: "container-2")  # recreated
    # SQLite: the same file, so the same instance: its jobs come back at once.
    assert instance_id(lite) == first_lite
    # PostgreSQL: another host may be another machine with its own /data.
    assert instance_id(pg) != first_pg
    assert instance_id(make_settings(tmp_path / "b")) != first_lite
    assert "/" not in first_lite and "/" not in first_pg
    owner = new_owner(first_pg)
    assert owner.startswith(first_pg + "/") and owner != new_owner(first_pg)


async def test_a_cancel_in_one_process_stops_the_song_another_runs(
    tmp_path: Path, pg_cluster: Cluster
) -> None:
    url = pg_cluster.new_database()
    fake = FakeFal(queue_polls=10**6)
    fake.streams = False
    seen_a = RecordingDelivery()
    async with fake.running() as fal_url:
        worker = await open_engine(
            make_settings(tmp_path / "a", database_url=url), [fal(fake, fal_url)], seen_a
        )
        # A process that admits and cancels but runs no jobs (platforms=set()).
        chat = await Engine.open(
            make_settings(tmp_path / "b", database_url=url),
            [fal(fake, fal_url)],
            options=FAST,
            platforms=set(),
        )
        await chat.start()
        try:
            adm = await chat.submit(prompt(), ALICE, {"channel_id": "1"})  # admitted here
            running = await wait_for_state(worker, adm.job_id, ("running",))  # runs there
            assert running.owner == worker.owner
            await chat.cancel(adm.job_id, ALICE)
            done = await wait_for_state(worker, adm.job_id, ("cancelled",), timeout=15)
        finally:
            await worker.close()
            await chat.close()
    assert len(fake.cancels) == 1 and fake.submit_count == 1  # stopped at the provider
    assert [jid for jid, _ in seen_a.failures] == [adm.job_id]
    assert done.failure is not None and done.failure.value == "cancelled"
