"""Quota reservations on both backends (a real SQLite file, a real PostgreSQL server):
atomic admission, refunds, windows.

Every test ends by checking that the per-day counters admission reads equal the totals
of the job rows (the ledger of record).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.models import Job, Requester
from bot.requests import GenerationRequest
from bot.settings import Settings
from storage.jobs import JobStore, Limits, QuotaRefusal, day_start, next_reset
from tests.conftest import open_db

NOON = 1_790_000_000.0 - (1_790_000_000.0 % 86400) + 12 * 3600  # a UTC noon


@pytest.fixture
async def store(settings: Settings, db_url: str | None) -> AsyncIterator[JobStore]:
    db = await open_db(db_url, settings.db_path)
    checked = JobStore(db)
    try:
        yield checked
        assert await checked.usage_mismatches() == []
    finally:
        await db.close()


def limits(**kw: float | None) -> Limits:
    base: dict[str, float | None] = dict(
        user_jobs_per_day=None,
        user_seconds_per_day=None,
        user_concurrent_jobs=None,
        community_seconds_per_day=None,
        spend_cap_usd=None,
    )
    base.update(kw)
    return Limits(**base)  # type: ignore[arg-type]


def job(
    n: int, user: str = "u1", duration: int = 10, community: str | None = "g1", usd: float = 0.002
) -> Job:
    req = GenerationRequest.build(mode="prompt", prompt="test", duration=duration)
    return Job(
        id=f"{user}-{n:05d}",
        requester=Requester("discord", user, community),
        reply_target={},
        request=req,
        seed=1,
        state="queued",
        reserved_usd=usd,
    )


async def admit_many(
    store: JobStore, jobs: list[Job], lim: Limits, now: float = NOON
) -> tuple[int, list[QuotaRefusal]]:
    results = await asyncio.gather(
        *(store.admit(j, lim, bypass_quotas=False, now=now) for j in jobs), return_exceptions=True
    )
    refusals = [r for r in results if isinstance(r, QuotaRefusal)]
    others = [
        r for r in results if isinstance(r, BaseException) and not isinstance(r, QuotaRefusal)
    ]
    assert not others, others
    return sum(1 for r in results if r is None), refusals


async def test_exactly_k_of_n_concurrent_admissions(store: JobStore) -> None:
    admitted, refusals = await admit_many(
        store, [job(i) for i in range(60)], limits(user_jobs_per_day=7)
    )
    assert admitted == 7
    assert len(refusals) == 53
    assert {r.limit for r in refusals} == {"user_jobs_per_day"}
    assert all(r.remaining == 0 for r in refusals)
    assert len(await store.in_states(("queued",))) == 7
    assert [e["kind"] for e in await store.ledger()] == ["reserve"] * 7


async def test_two_stores_as_two_processes_still_admit_exactly_k(
    tmp_path: Path, db_url: str | None
) -> None:
    """Two Store instances on one database (two connections each, as two processes
    would have): SQLite's write lock, PostgreSQL's advisory write lock."""
    path = tmp_path / "shared.sqlite3"
    first, second = await open_db(db_url, path), await open_db(db_url, path)
    try:
        a, b = JobStore(first), JobStore(second)
        lim = limits(user_seconds_per_day=100)  # room for 10 ten-second songs
        jobs = [job(i) for i in range(40)]
        results = await asyncio.gather(
            *(
                (a if i % 2 else b).admit(j, lim, bypass_quotas=False, now=NOON)
                for i, j in enumerate(jobs)
            ),
            return_exceptions=True,
        )
        assert sum(1 for r in results if r is None) == 10
        assert all(isinstance(r, QuotaRefusal) for r in results if r is not None)
        assert await a.usage_mismatches() == []
    finally:
        await first.close()
        await second.close()


async def test_seconds_concurrency_community_and_spend_limits(store: JobStore) -> None:
    lim = limits(
        user_seconds_per_day=25,
        user_concurrent_jobs=3,
        community_seconds_per_day=50,
        spend_cap_usd=0.02,
    )
    await store.admit(job(1, duration=20), lim, bypass_quotas=False, now=NOON)
    with pytest.raises(QuotaRefusal) as err:
        await store.admit(job(2, duration=10), lim, bypass_quotas=False, now=NOON)
    assert (err.value.limit, err.value.remaining, err.value.needed) == (
        "user_seconds_per_day",
        5,
        10,
    )
    await store.admit(job(3, duration=5), lim, bypass_quotas=False, now=NOON)
    # A second user in the same community uses up the community's seconds.
    await store.admit(job(1, user="u2", duration=20), lim, bypass_quotas=False, now=NOON)
    with pytest.raises(QuotaRefusal) as err:
        await store.admit(job(2, user="u3", duration=10), lim, bypass_quotas=False, now=NOON)
    assert (err.value.limit, err.value.remaining) == ("community_seconds_per_day", 5)
    # Outside that community (a DM) the same user is fine, until the spend cap.
    await store.admit(
        job(3, user="u3", community=None, usd=0.012), lim, bypass_quotas=False, now=NOON
    )
    with pytest.raises(QuotaRefusal) as err:
        await store.admit(
            job(4, user="u3", community=None, usd=0.004), lim, bypass_quotas=False, now=NOON
        )
    assert err.value.limit == "spend_cap_usd_per_day"
    # Admins bypass user and community limits but never the spend cap.
    with pytest.raises(QuotaRefusal):
        await store.admit(job(9, user="u3", usd=0.01), lim, bypass_quotas=True, now=NOON)
    await store.admit(job(9, user="u3", usd=0.0), lim, bypass_quotas=True, now=NOON)


async def test_concurrent_jobs_limit_counts_active_jobs(store: JobStore) -> None:
    lim = limits(user_concurrent_jobs=2)
    await store.admit(job(1), lim, bypass_quotas=False, now=NOON)
    await store.admit(job(2), lim, bypass_quotas=False, now=NOON)
    with pytest.raises(QuotaRefusal) as err:
        await store.admit(job(3), lim, bypass_quotas=False, now=NOON)
    assert err.value.limit == "user_concurrent_jobs"
    await store.transition("u1-00001", ("queued",), "running", now=NOON)
    assert await store.finish_success("u1-00001", "fal", 0.002, {"audio_file": "x"}, now=NOON)
    assert await store.mark_delivered("u1-00001", now=NOON)
    await store.admit(job(3), lim, bypass_quotas=False, now=NOON)


async def test_refund_on_failure_and_cancel_frees_quota(store: JobStore) -> None:
    lim = limits(user_jobs_per_day=2, user_seconds_per_day=20)
    await store.admit(job(1), lim, bypass_quotas=False, now=NOON)
    await store.admit(job(2), lim, bypass_quotas=False, now=NOON)
    with pytest.raises(QuotaRefusal):
        await store.admit(job(3), lim, bypass_quotas=False, now=NOON)
    assert await store.finish_unsuccessful("u1-00001", ("queued",), "cancelled", "Cancelled.")
    assert not await store.finish_unsuccessful("u1-00001", ("queued",), "cancelled", "x")
    await store.transition("u1-00002", ("queued",), "running", now=NOON)
    assert await store.finish_unsuccessful("u1-00002", ("running",), "failed", "boom")
    await store.admit(job(3), lim, bypass_quotas=False, now=NOON)
    await store.admit(job(4), lim, bypass_quotas=False, now=NOON)
    kinds = [(e["job_id"], e["kind"]) for e in await store.ledger()]
    assert ("u1-00001", "refund") in kinds and ("u1-00002", "refund") in kinds
    usage, _ = await store.usage(Requester("discord", "u1", "g1"), lim, now=NOON)
    assert (usage.user_jobs, usage.user_seconds) == (2, 20)


async def test_spend_keeps_a_charge_when_delivery_fails(store: JobStore) -> None:
    lim = limits()
    await store.admit(job(1, usd=0.002), lim, bypass_quotas=False, now=NOON)
    await store.transition("u1-00001", ("queued",), "running", now=NOON)
    await store.finish_success("u1-00001", "fal", 0.0015, {}, now=NOON)
    await store.finish_unsuccessful("u1-00001", ("ready",), "failed", "could not post")
    assert await store.spend_since(day_start(NOON)) == pytest.approx(0.0015)
    usage, _ = await store.usage(Requester("discord", "u1", "g1"), lim, now=NOON)
    assert usage.user_jobs == 0  # the user is not charged for a song they never got


async def test_window_resets_at_utc_midnight(store: JobStore) -> None:
    lim = limits(user_jobs_per_day=1)
    await store.admit(job(1), lim, bypass_quotas=False, now=NOON)
    await store.transition("u1-00001", ("queued",), "cancelled", now=NOON)  # no refund
    with pytest.raises(QuotaRefusal):
        await store.admit(job(2), lim, bypass_quotas=False, now=NOON + 11 * 3600)
    assert next_reset(NOON).timestamp() == day_start(NOON) + 86400
    await store.admit(job(3), lim, bypass_quotas=False, now=day_start(NOON) + 86400 + 1)


async def test_overrides_per_user_and_community(store: JobStore) -> None:
    lim = limits(user_jobs_per_day=1, community_seconds_per_day=10)
    await store.set_override("user", "discord:u1", "jobs_per_day", 3)
    await store.set_override("community", "discord:g1", "seconds_per_day", 1000)
    for i in range(3):
        await store.admit(job(i), lim, bypass_quotas=False, now=NOON)
    with pytest.raises(QuotaRefusal) as err:
        await store.admit(job(5), lim, bypass_quotas=False, now=NOON)
    assert (err.value.limit, err.value.limit_value) == ("user_jobs_per_day", 3)
    await store.set_override("user", "discord:u1", "jobs_per_day", None)
    assert await store.get_overrides("user", "discord:u1") == {}
    with pytest.raises(ValueError, match="unknown limit community.jobs_per_day"):
        await store.set_override("community", "discord:g1", "jobs_per_day", 1)


def takes(batch: str, n: int, user: str = "u1", duration: int = 10) -> list[Job]:
    """The N takes one request makes: one job each, sharing a batch id."""
    out = []
    for k in range(1, n + 1):
        one = job(k, user=f"{user}-{batch}", duration=duration)
        one.requester = Requester("discord", user, "g1")
        one.batch_id, one.take, one.takes, one.seed = batch, k, n, 100 + k
        out.append(one)
    return out


async def test_takes_are_admitted_all_or_none(store: JobStore) -> None:
    lim = limits(user_jobs_per_day=3)
    assert await store.admit_takes(takes("b1", 2), lim, bypass_quotas=False, now=NOON) is None
    stored = await store.batch("b1")
    assert [(j.take, j.takes, j.seed) for j in stored] == [(1, 2, 101), (2, 2, 102)]
    # Two more takes would make four songs today: neither is stored, no quota spent.
    with pytest.raises(QuotaRefusal):
        await store.admit_takes(takes("b2", 2), lim, bypass_quotas=False, now=NOON)
    assert await store.batch("b2") == []
    used, _ = await store.usage(Requester("discord", "u1", "g1"), lim, now=NOON)
    assert used.user_jobs == 2


async def test_uploaded_sources_are_remembered_until_they_expire(store: JobStore) -> None:
    sha = "ab" * 32
    assert await store.uploads.get("fal", sha) is None
    await store.uploads.put("fal", sha, "https://storage.example/one", expires_at=4e9)
    await store.uploads.put("fal", sha, "https://storage.example/two", expires_at=4e9)
    await store.uploads.put("wavespeed", sha, "https://media.example/x", expires_at=1.0)
    assert await store.uploads.get("fal", sha) == "https://storage.example/two"
    assert await store.uploads.get("wavespeed", sha) is None  # expired long ago
