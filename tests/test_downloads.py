"""Result downloads under a hostile or broken provider: bounded in time, interruptible,
and never aimed at the bot's own network.

The engine and FalProvider run against the fake fal queue on 127.0.0.1, which serves the
result file from its own origin: that is the configured FAL_QUEUE_URL, so it is trusted,
as a real provider's own API origin is. Any other loopback port, link-local address or
redirect to one is what a blind SSRF would use, and is refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from aiohttp import web

import bot.engine
import bot.engine.runner
from bot import messages
from bot.models import FailureKind, Requester
from bot.requests import GenerationRequest
from providers.base import ProviderFailedDownload
from providers.download import AddressPolicy, DownloadRefused, DownloadTimedOut, download
from providers.fal import FalProvider
from tests.conftest import make_settings
from tests.enginekit import RecordingDelivery, audio_files, open_engine, wait_for_state
from tests.fakes.audio import make_wav
from tests.fakes.fal import FakeFal
from tests.fakes.http import serve

ALICE = Requester("discord", "100", "guild1", "alice")


def prompt(duration: int = 5) -> GenerationRequest:
    return GenerationRequest.build(mode="prompt", prompt="lofi piano about rain", duration=duration)


def fal(fake: FakeFal, url: str) -> FalProvider:
    return FalProvider(fake.key, url, poll_interval=0.01, retry_delays=(0.01,))


@asynccontextmanager
async def other_server() -> AsyncIterator[tuple[str, list[web.Request]]]:
    """Another loopback service (an admin panel, a metadata endpoint) holding a WAV."""
    seen: list[web.Request] = []

    async def anything(request: web.Request) -> web.Response:
        seen.append(request)
        return web.Response(body=make_wav(5), content_type="audio/wav")

    app = web.Application()
    app.router.add_get("/{tail:.*}", anything)
    async with serve(app) as url:
        yield url, seen


async def downloading(fake: FakeFal) -> None:
    """Until the bot has started to download a result file."""
    for _ in range(500):
        if fake.downloads:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("no download started")


# ---- a total deadline, and cancel --------------------------------------------------------


async def test_a_dripping_result_file_cannot_hold_a_job_past_its_timeout(tmp_path: Path) -> None:
    fake = FakeFal(queue_polls=0, progress_polls=0)
    fake.file_drip = 2.0  # one byte every 2 s: each read is quick, the whole takes days
    settings = make_settings(tmp_path, job_timeout_seconds=3, quota_user_concurrent_jobs=1)
    delivery = RecordingDelivery()
    async with fake.running() as url:
        engine = await open_engine(settings, [fal(fake, url)], delivery)
        try:
            first = await engine.submit(prompt(), ALICE, {})
            job = await wait_for_state(engine, first.job_id, ("failed",), timeout=15)
            # The slot and the user's concurrency are free again: the next song goes through.
            fake.file_drip = None
            second = await engine.submit(prompt(), ALICE, {})
            await wait_for_state(engine, second.job_id, ("delivered",))
        finally:
            await engine.close()
    assert job.failure is FailureKind.TIMED_OUT and job.refunded
    assert job.error == "fal: result download timed out"
    told = messages.failure_text(FailureKind.TIMED_OUT, True, 3)
    assert delivery.failures == [(first.job_id, told)] and "took too long" in told
    assert not [p for p in audio_files(settings) if p.name.startswith(first.job_id)]


async def test_cancel_stops_a_download_in_progress(tmp_path: Path) -> None:
    fake = FakeFal(queue_polls=0, progress_polls=0)
    fake.file_drip = 2.0
    settings = make_settings(tmp_path)
    delivery = RecordingDelivery()
    async with fake.running() as url:
        engine = await open_engine(settings, [fal(fake, url)], delivery)
        try:
            admission = await engine.submit(prompt(), ALICE, {})
            await downloading(fake)
            final = await engine.cancel(admission.job_id, ALICE)
            job = await engine.get_job(admission.job_id)
        finally:
            await engine.close()
    assert final.state == "cancelled" and job is not None and job.state == "cancelled"
    # fal made the song: it bills it, so the charge and the user's quota both stay.
    assert not job.refunded and job.charged_usd == pytest.approx(fake.billed_usd())
    told = messages.failure_text(FailureKind.CANCELLED, False, None)
    assert delivery.failures == [(admission.job_id, told)]
    assert delivery.delivered == []
    assert not [p for p in audio_files(settings) if p.name.startswith(admission.job_id)]


async def test_a_cancel_from_another_process_stops_a_download_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bot.engine.runner, "CANCEL_FLAG_CHECK_S", 0.05)
    fake = FakeFal(queue_polls=0, progress_polls=0)
    fake.file_drip = 2.0
    settings = make_settings(tmp_path)
    async with fake.running() as url:
        engine = await open_engine(settings, [fal(fake, url)], RecordingDelivery())
        operator = await bot.engine.Engine.open(settings, [], platforms=set())
        try:
            admission = await engine.submit(prompt(), ALICE, {})
            await downloading(fake)
            # `acestep-bot jobs cancel`: a flag in the row, the working engine reads it.
            asked = await operator.cancel(admission.job_id, ALICE)
            job = await wait_for_state(engine, admission.job_id, ("cancelled",), timeout=5)
        finally:
            await operator.store.db.close()
            await engine.close()
    assert asked.state == "running" and job.state == "cancelled"


# ---- where a download may go -------------------------------------------------------------


async def run_to_failure(
    tmp_path: Path, fake: FakeFal, caplog: pytest.LogCaptureFixture
) -> tuple[str, list[str]]:
    """One song with the fake as it is set up; the operator's detail of its failure
    (`jobs show`), and the log lines. The user is told the provider could not make it."""
    caplog.set_level(logging.INFO)
    settings = make_settings(tmp_path)
    delivery = RecordingDelivery()
    async with fake.running() as url:
        engine = await open_engine(settings, [fal(fake, url)], delivery)
        try:
            admission = await engine.submit(prompt(), ALICE, {})
            job = await wait_for_state(engine, admission.job_id, ("failed", "delivered"))
        finally:
            await engine.close()
    assert job.state == "failed", "the download was made"
    assert job.failure is FailureKind.PROVIDER_FAILED
    told = messages.failure_text(FailureKind.PROVIDER_FAILED, True, None)
    assert delivery.failures == [(job.id, told)]
    return str(job.error), [r.getMessage() for r in caplog.records]


async def test_a_result_url_on_another_loopback_port_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    error, lines, other = await refused(tmp_path, caplog, "audio_url", "/admin/export.wav")
    assert other == []  # never asked
    assert error.startswith("fal: result URL host 127.0.0.1 is a private or local address")
    assert any("unusable" in line and "private or local address" in line for line in lines)


async def test_a_redirect_from_the_provider_to_a_loopback_address_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    error, _, other = await refused(tmp_path, caplog, "file_redirect", "/internal/secret.wav")
    assert other == []  # the hop the provider's own origin pointed to was not asked
    assert "127.0.0.1 is a private or local address" in error


async def refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, switch: str, path: str
) -> tuple[str, list[str], list[web.Request]]:
    """A song whose result URL (or the redirect its file answers with) leads to another
    loopback service: the failure detail, the log lines, and what that service saw."""
    async with other_server() as (other, seen):
        fake = FakeFal(queue_polls=0, progress_polls=0)
        setattr(fake, switch, other + path)
        error, lines = await run_to_failure(tmp_path, fake, caplog)
    if switch == "file_redirect":
        assert len(fake.downloads) == 1  # the provider's own origin was asked
    return error, lines, seen


async def test_the_cloud_metadata_address_is_refused_without_a_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeFal(queue_polls=0, progress_polls=0)
    fake.audio_url = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
    error, _ = await run_to_failure(tmp_path, fake, caplog)
    assert "169.254.169.254 is a private or local address" in error


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://files.example.org/song.wav", "gopher://x/1"]
)
async def test_only_http_and_https_are_downloaded(url: str) -> None:
    async with httpx.AsyncClient() as client:
        with pytest.raises(DownloadRefused, match="not http"):
            await download(client, "fal", url, _Sink())


async def test_a_host_whose_name_resolves_to_a_private_address_is_refused() -> None:
    async def rebinding(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "10.0.0.7"]  # one public answer is not enough

    async with httpx.AsyncClient() as client:
        with pytest.raises(DownloadRefused, match=r"cdn\.example\.org .*\(10\.0\.0\.7\)"):
            await download(
                client,
                "fal",
                "https://cdn.example.org/a.wav",
                _Sink(),
                policy=AddressPolicy(resolver=rebinding),
            )


async def test_the_connection_goes_to_the_address_that_was_checked() -> None:
    # A name only our resolver knows: if the client resolved it again (what a DNS
    # rebinding attack relies on), the connection could not be made at all.
    asked: list[tuple[str, int]] = []
    async with other_server() as (other, seen):
        port = int(other.rsplit(":", 1)[1])

        async def resolver(host: str, port: int) -> list[str]:
            asked.append((host, port))
            return ["127.0.0.1"]

        policy = AddressPolicy.allowing("127.0.0.0/8", resolver=resolver)
        sink = _Sink()
        async with httpx.AsyncClient() as client:
            size = await download(
                client, "fal", f"http://cdn.example.test:{port}/a.wav", sink, policy=policy
            )
    assert asked == [("cdn.example.test", port)]
    assert size == len(sink.data) and sink.data[:4] == b"RIFF"
    [request] = seen
    assert request.headers["Host"] == f"cdn.example.test:{port}"


async def test_the_download_deadline_covers_the_whole_transfer(tmp_path: Path) -> None:
    fake = FakeFal(queue_polls=0, progress_polls=0)
    fake.file_drip = 0.5  # the whole file would take days
    dest = tmp_path / "song.part"
    async with fake.running() as url:
        provider = fal(fake, url)
        try:
            result = await _finished_result(provider)
            with pytest.raises(DownloadTimedOut, match="did not finish within 1 s"):
                await provider.save_audio(result, dest, deadline=time.time() + 1)
            assert not dest.exists()  # nothing half-written is left
            with pytest.raises(DownloadTimedOut, match="no time was left"):
                await provider.save_audio(result, dest, deadline=0.0)
        finally:
            await provider.aclose()


async def test_a_file_larger_than_any_song_is_refused_while_it_streams() -> None:
    fake = FakeFal(queue_polls=0, progress_polls=0)
    fake.audio = make_wav(5)
    async with fake.running() as url:
        provider = fal(fake, url)
        try:
            result = await _finished_result(provider)
            sink = _Sink()
            async with httpx.AsyncClient() as client:
                with pytest.raises(ProviderFailedDownload, match="too large"):
                    await download(
                        client,
                        "fal",
                        result.audio_url,
                        sink,
                        trusted=provider.trusted_origins(),
                        max_bytes=1000,
                    )
        finally:
            await provider.aclose()


class _Sink:
    """A file-like that keeps what was written."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, chunk: bytes) -> int:
        self.data += chunk
        return len(chunk)


async def _finished_result(provider: FalProvider):  # type: ignore[no-untyped-def]
    from providers.base import Succeeded

    handle = await provider.submit(prompt(), seed=1)
    for _ in range(100):
        status = await provider.poll(handle)
        if isinstance(status, Succeeded):
            return status.result
        await asyncio.sleep(0.01)
    raise AssertionError("fal did not finish")
