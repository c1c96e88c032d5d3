"""/healthz and /metrics as an operator (or Prometheus) reads them, after real jobs."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.engine import QuotaExceeded
from bot.health import HealthServer, start_health_server
from bot.models import Requester
from providers.router import price_of
from tests.conftest import make_settings
from tests.enginekit import RecordingDelivery, open_engine, wait_for_state
from tests.fakes.fal import FakeFal
from tests.test_engine import ALICE, fal, prompt

BOB = Requester("discord", "200", "guild2", "bob")


class Connected:
    platform = "discord"
    is_connected = True


class Disconnected:
    platform = "telegram"

    def is_connected(self) -> bool:
        return False


class NoState:
    platform = "matrix"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, keyed by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def get(server: HealthServer, path: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.get(server.url + path)


async def test_metrics_and_health_after_real_jobs(tmp_path: Path) -> None:
    fake = FakeFal(queue_polls=1, progress_polls=1)
    settings = make_settings(tmp_path, quota_user_jobs_per_day=2)
    delivery = RecordingDelivery()
    async with fake.running() as url:
        provider = fal(fake, url)
        engine = await open_engine(settings, [provider], delivery)
        engine.platforms = {"discord"}  # the Telegram front-end is not running
        server = await start_health_server(settings, engine, [Connected(), NoState()])
        try:
            # The first submit meets a 429: the job waits out the cool-down and succeeds.
            fake.rate_limited, fake.retry_after = 1, 0
            first = await engine.submit(prompt(duration=5), ALICE, {})
            await wait_for_state(engine, first.job_id, ("delivered",))
            second = await engine.submit(prompt("second", duration=6), ALICE, {})
            await wait_for_state(engine, second.job_id, ("delivered",))
            with pytest.raises(QuotaExceeded):
                await engine.submit(prompt("third", duration=5), ALICE, {})
            fake.run_error = ("CUDA out of memory", "internal_error")
            failed = await engine.submit(prompt("fails", duration=5), BOB, {})
            await wait_for_state(engine, failed.job_id, ("failed",))
            fake.run_error = None
            waiting = await engine.submit(
                prompt("waits", duration=5), Requester("telegram", "7", "chat9"), {}
            )
            metrics = await get(server, "/metrics")
            health = await get(server, "/healthz")
        finally:
            await server.stop()
            await engine.close()

    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain; version=")
    got = samples(metrics.text)
    assert got[("acestep_jobs", (("provider", "fal"), ("state", "delivered")))] == 2
    assert got[("acestep_jobs", (("provider", "fal"), ("state", "failed")))] == 1
    assert got[("acestep_jobs", (("provider", ""), ("state", "queued")))] == 1
    assert got[("acestep_queue_depth", ())] == 1
    assert got[("acestep_quota_refusals_total", (("limit", "user_jobs_per_day"),))] == 1
    assert got[("acestep_provider_errors_total", (("provider", "fal"), ("type", "Busy")))] == 1
    assert got[("acestep_provider_errors_total", (("provider", "fal"), ("type", "Failed")))] == 1
    assert got[("acestep_generation_seconds_count", (("provider", "fal"),))] == 2
    assert got[("acestep_end_to_end_seconds_count", (("platform", "discord"),))] == 2
    e2e_sum = got[("acestep_end_to_end_seconds_sum", (("platform", "discord"),))]
    assert 0 < e2e_sum < 30
    # Spend today: two songs charged, the failed one refunded, the queued one reserved.
    charged = sum(price_of(provider, prompt(duration=d)) for d in (5, 6))
    reserved = engine.router.price_for(prompt(duration=5)) * 5
    assert got[("acestep_spend_usd_today", ())] == pytest.approx(charged + reserved)
    assert got[("acestep_provider_in_flight", (("provider", "fal"),))] == 0

    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["problems"] == []
    assert body["database"] == {"writable": True}
    assert body["frontends"] == {"discord": "connected", "matrix": "unknown"}
    fal_state = body["providers"]["fal"]
    assert fal_state["state"] == "ok" and fal_state["in_flight"] == 0
    assert fal_state["last_ok"] is not None and fal_state["last_error"] is None
    assert waiting.job_id  # admitted, still queued for the telegram front-end


async def test_health_reports_disconnected_front_end_and_provider_auth_cooldown(
    tmp_path: Path,
) -> None:
    fake = FakeFal()
    settings = make_settings(tmp_path)
    async with fake.running() as url:
        engine = await open_engine(settings, [fal(fake, url)], RecordingDelivery())
        server = await start_health_server(settings, engine, [Connected(), Disconnected()])
        try:
            fake.unauthorized = True
            job = await engine.submit(prompt(duration=5), ALICE, {})
            await wait_for_state(engine, job.job_id, ("failed",))
            health = await get(server, "/healthz")
            metrics = await get(server, "/metrics")
        finally:
            await server.stop()
            await engine.close()
    assert health.status_code == 503
    body = health.json()
    assert body["status"] == "unhealthy"
    assert body["problems"] == ["telegram is disconnected"]
    assert body["frontends"] == {"discord": "connected", "telegram": "disconnected"}
    fal_state = body["providers"]["fal"]
    assert fal_state["state"] == "cooling_down"
    assert fal_state["last_error_kind"] == "auth"
    assert 0 < fal_state["cooldown_seconds_left"] <= settings.provider_cooldown_seconds
    assert fake.key not in health.text
    got = samples(metrics.text)
    assert got[("acestep_provider_cooling_down", (("provider", "fal"),))] == 1
    assert got[("acestep_provider_errors_total", (("provider", "fal"), ("type", "AuthError")))] == 1
    assert got[("acestep_jobs", (("provider", ""), ("state", "failed")))] == 1


async def test_healthz_fails_fast_when_the_database_cannot_take_writes(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    engine = await open_engine(settings, [])
    server = await start_health_server(settings, engine, [])
    server.db_check_timeout_ms = 200
    blocker = sqlite3.connect(str(settings.db_path), isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        locked = await get(server, "/healthz")
        blocker.execute("ROLLBACK")
        healthy = await get(server, "/healthz")
    finally:
        blocker.close()
        await server.stop()
        await engine.close()
    assert locked.status_code == 503
    body: dict[str, Any] = locked.json()
    assert body["database"]["writable"] is False
    assert "locked" in body["database"]["error"]
    assert body["problems"] == ["database is not writable"]
    assert healthy.status_code == 200


async def test_health_server_binds_configured_host_and_stops(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, health_host="127.0.0.1")
    engine = await open_engine(settings, [])
    server = await start_health_server(settings, engine, [])
    try:
        assert server.url.startswith("http://127.0.0.1:")
        assert (await get(server, "/nope")).status_code == 404
    finally:
        await server.stop()
        await engine.close()
    with pytest.raises(httpx.ConnectError):
        await get(server, "/healthz")
    await asyncio.sleep(0)


async def test_healthz_says_when_a_gpu_server_cannot_do_prompt_mode(tmp_path: Path) -> None:
    from providers.acestep import AceStepProvider
    from tests.fakes.acestep import FakeAceStep

    small, big = FakeAceStep(lm=False, health_reports_lm=True), FakeAceStep()
    settings = make_settings(tmp_path)
    async with small.running() as s_url, big.running() as b_url:
        engine = await open_engine(settings, [AceStepProvider([s_url, b_url])], RecordingDelivery())
        server = await start_health_server(settings, engine, [Connected()])
        try:
            health = await get(server, "/healthz")
        finally:
            await server.stop()
            await engine.close()
    assert health.status_code == 200  # a provider's trouble never fails the check
    gpu = health.json()["providers"]["acestep"]
    assert gpu["prompt_mode"] is True  # the other server may still write songs
    assert gpu["servers"][s_url]["prompt_mode"] is False
    assert "ACESTEP_INIT_LLM=true" in gpu["servers"][s_url]["note"]
    assert gpu["servers"][b_url]["prompt_mode"] is None  # f30aee4: /health does not say
    assert "first described song" in gpu["servers"][b_url]["note"]
