"""The engine end to end against the fake fal queue server and a real SQLite file."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import av
import pytest

from bot.engine import AlreadyFinished, Engine, NotAllowed, QuotaExceeded
from bot.models import Requester
from bot.requests import GenerationRequest
from providers.fal import FalProvider
from tests.conftest import make_settings
from tests.enginekit import RecordingDelivery, audio_files, open_engine, wait_for_state
from tests.fakes.fal import FakeFal

ALICE = Requester("discord", "100", "guild1", "alice")
BOB = Requester("discord", "200", "guild1", "bob")


def prompt(text: str = "lofi piano about rain", **kw: object) -> GenerationRequest:
    return GenerationRequest.build(mode="prompt", prompt=text, **kw)


def fal(fake: FakeFal, url: str, concurrency: int = 2) -> FalProvider:
    return FalProvider(
        fake.key, url, concurrency=concurrency, poll_interval=0.01, retry_delays=(0.01, 0.02)
    )


def decoded_seconds(path: Path) -> float:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return samples / stream.rate


async def test_song_delivered_as_mp3_with_progress_and_quota_committed(tmp_path: Path) -> None:
    fake = FakeFal(queue_polls=2, progress_polls=2)
    settings = make_settings(tmp_path)
    delivery = RecordingDelivery()
    async with fake.running() as url:
        engine = await open_engine(settings, [fal(fake, url)], delivery)
        try:
            admission = await engine.submit(
                prompt(duration=12, seed=-1), ALICE, {"channel_id": "1"}
            )
            assert admission.position == 1 and 0 <= admission.seed <= 2147483647
            job = await wait_for_state(engine, admission.job_id, ("delivered",))
            ledger = await engine.store.ledger(job.id)
        finally:
            await engine.close()
    assert fake.submit_count == 1
    sent = fake.submits[0]
    assert sent.path == "/fal-ai/ace-step/prompt-to-audio"
    assert sent.body["seed"] == admission.seed and sent.body["duration"] == 12
    phases = [p.phase for jid, p in delivery.progress if jid == job.id]
    assert phases[0] in ("waiting", "starting")
    assert "generating" in phases and phases[-1] == "uploading"
    [(jid, rendered)] = delivery.delivered
    assert jid == job.id and rendered.format == "mp3"
    assert rendered.size <= 10 * 1024 * 1024
    assert decoded_seconds(rendered.path) == pytest.approx(12, abs=0.2)
    assert rendered.cover[:3] == b"\xff\xd8\xff"  # a JPEG cover
    assert job.result and job.result.seed == admission.seed
    assert job.charged_usd == pytest.approx(12 * 0.0002)
    assert [e["kind"] for e in ledger] == ["reserve", "charge", "commit"]
    assert f"{job.id}.wav" in [p.name for p in audio_files(settings)]  # original kept


async def test_fair_between_users_not_fifo(tmp_path: Path) -> None:
    fake = FakeFal(queue_polls=0, progress_polls=1)
    settings = make_settings(tmp_path, quota_user_jobs_per_day=50, quota_user_concurrent_jobs=20)
    delivery = RecordingDelivery(byte_limit=None)
    async with fake.running() as url:
        engine = await open_engine(settings, [fal(fake, url, concurrency=1)], delivery)
        try:
            alice_jobs = [
                await engine.submit(prompt(f"alice song {i}", duration=5), ALICE, {})
                for i in range(10)
            ]
            bob = await engine.submit(prompt("bob song", duration=5), BOB, {})
            assert bob.position <= 2  # not behind all of Alice's queued songs
            await wait_for_state(engine, bob.job_id, ("delivered",), timeout=20)
            order = [s.body["prompt"] for s in fake.submits]
        finally:
            await engine.close()
    assert order.index("bob song") <= 2, order
    # Within one user it stays first come, first served.
    alice = [p for p in order if p.startswith("alice")]
    assert alice == [f"alice song {i}" for i in range(len(alice))] and len(alice) >= 1
    assert alice_jobs[0].position == 1


async def test_recovery_resumes_polling_and_delivers_once(tmp_path: Path) -> None:
    fake = FakeFal(queue_polls=1, progress_polls=10_000)  # stays running until released
    settings = make_settings(tmp_path)
    first_delivery = RecordingDelivery()
    async with fake.running() as url:
        engine = await open_engine(settings, [fal(fake, url)], first_delivery)
        admission = await engine.submit(prompt(duration=6), ALICE, {"channel_id": "9"})
        await wait_for_state(engine, admission.job_id, ("running",))
        await asyncio.sleep(0.1)
        await engine.abort()  # a hard stop: no further writes
        await engine.store.close()
        fake.progress_polls = 1  # the provider finishes while the bot is down

        second_delivery = RecordingDelivery()
        engine2 = await open_engine(settings, [fal(fake, url)], second_delivery)
        try:
            job = await wait_for_state(engine2, admission.job_id, ("delivered",))
            await asyncio.sleep(0.2)
        finally:
            await engine2.close()
    assert fake.submit_count == 1
    assert first_delivery.delivered == []
    assert second_delivery.delivered_ids() == [job.id]
    assert job.reply_target == {"channel_id": "9"}


async def test_recovery_resubmits_a_job_interrupted_while_submitting(tmp_path: Path) -> None:
    fake = FakeFal(queue_polls=0, progress_polls=1)
    settings = make_settings(tmp_path)
    async with fake.running() as url:
        engine = await Engine.open(settings, [fal(fake, url)])
        admission = await engine.submit(prompt(duration=5), ALICE, {})
        # Simulate a crash between "submitting" being saved and the provider answering.
        assert await engine.store.transition(admission.job_id, ("queued",), "submitting")
        await engine.store.close()
        delivery = RecordingDelivery()
        engine2 = await open_engine(settings, [fal(fake, url)], delivery)
        try:
            job = await wait_for_state(engine2, admission.job_id, ("delivered",))
        finally:
            await engine2.close()
    assert fake.submit_count == 1
    assert job.recoveries == 1


async def test_cancel_refunds_a_waiting_song_but_not_one_being_made(tmp_path: Path) -> None:
    fake = FakeFal(queue_polls=1, progress_polls=10_000)
    settings = make_settings(tmp_path, quota_user_jobs_per_day=2)
    delivery = RecordingDelivery()
    async with fake.running() as url:
        engine = await open_engine(settings, [fal(fake, url, concurrency=1)], delivery)
        try:
            running = await engine.submit(prompt("first", duration=5), ALICE, {})
            await wait_for_state(engine, running.job_id, ("running",))
            queued = await engine.submit(prompt("second", duration=5), ALICE, {})
            with pytest.raises(QuotaExceeded):
                await engine.submit(prompt("third", duration=5), ALICE, {})
            with pytest.raises(NotAllowed, match="only cancel your own"):
                await engine.cancel(queued.job_id, BOB)
            cancelled = await engine.cancel(queued.job_id, ALICE)
            assert cancelled.state == "cancelled" and cancelled.refunded
            await asyncio.sleep(0.1)  # fal has moved it on: IN_PROGRESS
            stopped = await engine.cancel(running.job_id, ALICE)
            # fal was making it: it may bill it, so the user's quota stays spent.
            assert stopped.state == "cancelled" and not stopped.refunded
            with pytest.raises(AlreadyFinished):
                await engine.cancel(running.job_id, ALICE)
            # Only the waiting song's refund frees the quota again.
            await engine.submit(prompt("fourth", duration=5), ALICE, {})
            with pytest.raises(QuotaExceeded):
                await engine.submit(prompt("fifth", duration=5), ALICE, {})
        finally:
            await engine.close()
    assert len(fake.cancels) == 1
    assert {jid for jid, _ in delivery.failures} == {queued.job_id, running.job_id}
    assert all("Cancelled" in msg for _, msg in delivery.failures)


async def test_content_policy_rejection_told_and_never_retried(tmp_path: Path) -> None:
    fake = FakeFal()
    fake.content_policy = True
    settings = make_settings(tmp_path)
    delivery = RecordingDelivery()
    async with fake.running() as url:
        engine = await open_engine(settings, [fal(fake, url)], delivery)
        try:
            adm = await engine.submit(prompt(duration=5), ALICE, {})
            job = await wait_for_state(engine, adm.job_id, ("failed",))
        finally:
            await engine.close()
    assert fake.submit_count == 1
    assert job.refunded
    [(jid, message)] = delivery.failures
    assert jid == adm.job_id
    assert message == (
        "The music service refused this request; try other words or tags. Your quota was refunded."
    )
    # The provider's own words are for the operator (`jobs show`), not the chat.
    assert job.failure == "rejected" and "content" in (job.error or "").lower()


async def test_auth_failure_tells_user_unavailable_and_operator_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeFal()
    fake.exhausted_balance = True
    settings = make_settings(tmp_path, fal_key=fake.key)
    delivery = RecordingDelivery()
    caplog.set_level(logging.INFO)
    async with fake.running() as url:
        engine = await open_engine(settings, [fal(fake, url)], delivery)
        try:
            adm = await engine.submit(prompt(duration=5), ALICE, {})
            job = await wait_for_state(engine, adm.job_id, ("failed",))
        finally:
            await engine.close()
    assert job.refunded
    assert delivery.failures == [
        (
            adm.job_id,
            "The music services are unavailable right now; try again later. "
            "Your quota was refunded.",
        )
    ]
    operator_lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("Exhausted balance" in line for line in operator_lines), operator_lines
    assert all(fake.key not in r.getMessage() for r in caplog.records)


async def test_busy_provider_is_retried_after_its_cooldown(tmp_path: Path) -> None:
    fake = FakeFal(queue_polls=0)
    fake.rate_limited = 1
    fake.retry_after = 0
    settings = make_settings(tmp_path)
    delivery = RecordingDelivery()
    async with fake.running() as url:
        engine = await open_engine(settings, [fal(fake, url)], delivery)
        try:
            adm = await engine.submit(prompt(duration=5), ALICE, {})
            await wait_for_state(engine, adm.job_id, ("delivered",))
        finally:
            await engine.close()
    assert fake.submit_count == 2  # the 429 was not an accepted job


async def test_remote_failure_and_wrong_audio_fail_with_refund(tmp_path: Path) -> None:
    fake = FakeFal(queue_polls=0)
    fake.run_error = ("CUDA out of memory", "runner_error")
    settings = make_settings(tmp_path)
    delivery = RecordingDelivery()
    async with fake.running() as url:
        engine = await open_engine(settings, [fal(fake, url)], delivery)
        try:
            adm = await engine.submit(prompt(duration=5), ALICE, {})
            job = await wait_for_state(engine, adm.job_id, ("failed",))
            assert job.refunded
            assert delivery.failures[-1][1] == (
                "The music service could not make this song. Your quota was refunded."
            )
            # The raw provider error stays out of the chat, in the job for the operator.
            assert "CUDA out of memory" in (job.error or "")
        finally:
            await engine.close()


async def test_delivery_failure_refunds_user_but_keeps_the_charge(tmp_path: Path) -> None:
    fake = FakeFal(queue_polls=0)
    settings = make_settings(tmp_path)
    delivery = RecordingDelivery(fail_deliveries=5)
    async with fake.running() as url:
        engine = await open_engine(settings, [fal(fake, url)], delivery)
        try:
            adm = await engine.submit(prompt(duration=5), ALICE, {})
            job = await wait_for_state(engine, adm.job_id, ("failed",))
        finally:
            await engine.close()
    assert job.refunded and job.charged_usd == pytest.approx(5 * 0.0002)
    assert delivery.failures == [
        (adm.job_id, "The song was made but could not be posted here. Your quota was refunded.")
    ]


async def test_quota_refusal_message_names_limit_remaining_and_reset(tmp_path: Path) -> None:
    fake = FakeFal()
    settings = make_settings(tmp_path, quota_user_seconds_per_day=50)
    async with fake.running() as url:
        engine = await open_engine(settings, [fal(fake, url)], RecordingDelivery())
        try:
            await engine.submit(prompt(duration=30), ALICE, {})
            with pytest.raises(QuotaExceeded) as err:
                await engine.submit(prompt(duration=30), ALICE, {})
        finally:
            await engine.close()
    assert err.value.limit == "user_seconds_per_day"
    assert str(err.value).startswith(
        "This 30 s song needs more audio than you have left today: 20 s of your 50 s."
    )
    assert "It resets at 00:00 UTC" in str(err.value)
    assert fake.submit_count <= 1


async def test_per_job_timeout_stops_the_job_and_refunds(tmp_path: Path) -> None:
    fake = FakeFal(queue_polls=0, progress_polls=10_000)
    settings = make_settings(tmp_path, job_timeout_seconds=1)
    delivery = RecordingDelivery()
    async with fake.running() as url:
        engine = await open_engine(settings, [fal(fake, url)], delivery)
        try:
            adm = await engine.submit(prompt(duration=5), ALICE, {})
            job = await wait_for_state(engine, adm.job_id, ("failed",))
        finally:
            await engine.close()
    assert job.refunded
    assert len(fake.cancels) == 1
    assert delivery.failures == [
        (
            adm.job_id,
            "This song took too long to make (over 1 s) and was stopped. Your quota was refunded.",
        )
    ]


async def test_a_finished_song_waits_for_its_front_end_then_is_delivered_once(
    tmp_path: Path,
) -> None:
    fake = FakeFal(queue_polls=0)
    settings = make_settings(tmp_path)
    async with fake.running() as url:
        # The platform's front-end is not running: the song is made and kept.
        engine = await open_engine(settings, [fal(fake, url)])
        adm = await engine.submit(prompt(duration=5), ALICE, {"channel_id": "3"})
        await wait_for_state(engine, adm.job_id, ("ready",))
        await engine.close()
        delivery = RecordingDelivery()
        engine2 = await open_engine(settings, [fal(fake, url)], delivery)
        try:
            job = await wait_for_state(engine2, adm.job_id, ("delivered",))
            await asyncio.sleep(0.2)
        finally:
            await engine2.close()
    assert fake.submit_count == 1
    assert delivery.delivered_ids() == [job.id]


async def test_cancel_from_another_process_stops_the_running_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bot.engine.runner

    monkeypatch.setattr(bot.engine.runner, "CANCEL_FLAG_CHECK_S", 0.05)
    fake = FakeFal(queue_polls=0, progress_polls=10_000)
    settings = make_settings(tmp_path)
    delivery = RecordingDelivery()
    async with fake.running() as url:
        engine = await open_engine(settings, [fal(fake, url)], delivery)
        # What `acestep-bot jobs cancel` does: its own engine on the same file, running
        # nothing itself.
        operator = await Engine.open(settings, [], platforms=set())
        try:
            adm = await engine.submit(prompt(duration=5), ALICE, {})
            await wait_for_state(engine, adm.job_id, ("running",))
            flagged = await operator.cancel(adm.job_id, Requester("cli", "operator"), is_admin=True)
            assert flagged.state == "running" and flagged.cancel_requested
            job = await wait_for_state(engine, adm.job_id, ("cancelled",))
        finally:
            await operator.store.close()
            await engine.close()
    # fal was already making it: the charge stays and so does the user's quota.
    assert not job.refunded
    assert len(fake.cancels) == 1
    assert job.charged_usd == pytest.approx(fake.billed_usd()) == pytest.approx(5 * 0.0002)
    assert delivery.failures == [
        (
            adm.job_id,
            "Cancelled. It still counts against your quota, because the music service made it.",
        )
    ]


async def test_a_cancel_fal_takes_while_the_song_waits_in_its_queue_costs_nothing(
    tmp_path: Path,
) -> None:
    fake = FakeFal(queue_polls=10_000)  # stays IN_QUEUE at fal
    settings = make_settings(tmp_path, quota_user_jobs_per_day=1)
    delivery = RecordingDelivery()
    async with fake.running() as url:
        engine = await open_engine(settings, [fal(fake, url)], delivery)
        try:
            adm = await engine.submit(prompt(duration=5), ALICE, {})
            await wait_for_state(engine, adm.job_id, ("running",))
            await asyncio.sleep(0.2)  # polled: fal said IN_QUEUE
            job = await engine.cancel(adm.job_id, ALICE)
            ledger = await engine.store.ledger(adm.job_id)
            spend = await engine.store.spend_since(time.time())
            # The quota came back: another song fits today.
            await engine.submit(prompt("again", duration=5), ALICE, {})
        finally:
            await engine.close()
    assert job.state == "cancelled" and job.refunded and job.charged_usd is None
    assert fake.billed() == []
    kinds = [e["kind"] for e in ledger]
    assert kinds == ["reserve", "charge", "credit", "refund"]
    charged = sum(e["usd"] for e in ledger if e["kind"] == "charge")
    credited = sum(e["usd"] for e in ledger if e["kind"] == "credit")
    assert charged - credited == pytest.approx(fake.billed_usd()) == 0
    assert spend == 0  # nothing billed, nothing held
    assert delivery.failures == [(adm.job_id, "Cancelled. Your quota was refunded.")]


async def test_the_same_platform_event_is_admitted_once(tmp_path: Path) -> None:
    fake = FakeFal(queue_polls=0, progress_polls=10_000)
    settings = make_settings(tmp_path)
    async with fake.running() as url:
        engine = await open_engine(settings, [fal(fake, url)], RecordingDelivery())
        try:
            first, second = await asyncio.gather(
                engine.submit(prompt(duration=5), ALICE, {}, source_key="telegram:1:77"),
                engine.submit(prompt(duration=5), ALICE, {}, source_key="telegram:1:77"),
            )
            other = await engine.submit(prompt(duration=5), ALICE, {}, source_key="telegram:1:78")
            jobs = await engine.store.recent()
            ledger = await engine.store.ledger()
        finally:
            await engine.close()
    assert first.job_id == second.job_id and [first.duplicate, second.duplicate].count(True) == 1
    assert other.job_id != first.job_id and not other.duplicate
    assert len(jobs) == 2
    assert [e["kind"] for e in ledger if e["kind"] == "reserve"] == ["reserve", "reserve"]


async def test_a_prompt_with_escape_sequences_is_stored_and_logged_clean(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fake = FakeFal(queue_polls=0, progress_polls=0)
    settings = make_settings(tmp_path)
    async with fake.running() as url:
        engine = await open_engine(settings, [fal(fake, url)], RecordingDelivery())
        try:
            admission = await engine.submit(
                prompt("\x1b[31mred\x1b[0m rain \x9b2Jon roofs", duration=5), ALICE, {}
            )
            job = await wait_for_state(engine, admission.job_id, ("delivered",))
        finally:
            await engine.close()
    assert job.request.prompt == "red rain on roofs"
    assert fake.submits[0].body["prompt"] == "red rain on roofs"
    admitted = [r.getMessage() for r in caplog.records if "admitted" in r.getMessage()]
    assert admitted and "red rain on roofs" in admitted[0].lower()
    assert "\x1b" not in caplog.text and "\x9b" not in caplog.text


async def test_a_job_another_engine_took_over_mid_submit_runs_and_posts_once(
    tmp_path: Path,
) -> None:
    # Two engines on one database (what the DATA_DIR lock prevents between processes):
    # the second one's recovery takes the first one's job, caught mid-submit, and
    # submits it again. Whichever submit is accepted second must not run the job too.
    fake = FakeFal(queue_polls=0, progress_polls=1)
    fake.submit_delay = 0.5
    settings = make_settings(tmp_path)
    first, second = RecordingDelivery(), RecordingDelivery()
    async with fake.running() as url:
        a = await open_engine(settings, [fal(fake, url)], first)
        b = None
        try:
            admission = await a.submit(prompt(duration=5), ALICE, {})
            await wait_for_state(a, admission.job_id, ("submitting",))
            b = await open_engine(settings, [fal(fake, url)], second)
            job = await wait_for_state(b, admission.job_id, ("delivered",))
            await asyncio.sleep(1.0)  # the later submit's answer has arrived meanwhile
            job = await wait_for_state(b, admission.job_id, ("delivered",))
        finally:
            await a.close()
            if b is not None:
                await b.close()
    assert fake.submit_count == 2  # the crash-recovery resubmit DESIGN.md allows
    assert len(first.delivered) + len(second.delivered) == 1
    assert len(fake.cancels) == 1  # the orphaned submit was stopped at fal...
    assert len(fake.downloads) == 1  # ...and never polled to the end and downloaded
    assert job.attempts == 2 and job.recoveries == 1


async def test_a_provider_error_that_echoes_the_key_never_reaches_the_chat_or_the_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from providers.replicate import ReplicateProvider
    from tests.fakes.replicate import FakeReplicate

    caplog.set_level(logging.DEBUG)
    fake = FakeReplicate()
    fake.submit_errors.append("echoes_authorization")
    settings = make_settings(tmp_path, providers=["replicate"], replicate_api_token=fake.token)
    delivery = RecordingDelivery()
    async with fake.running() as url:
        provider = ReplicateProvider(fake.token, url)
        engine = await open_engine(settings, [provider], delivery)
        try:
            request = GenerationRequest.build(mode="song", tags="lofi", duration=5)
            adm = await engine.submit(request, ALICE, {})
            job = await wait_for_state(engine, adm.job_id, ("failed",))
        finally:
            await engine.close()
    [(_, told)] = delivery.failures
    assert fake.token not in told and "Authorization" not in told
    assert told.startswith("The music service refused this request")
    # The operator's copy (jobs show) and every log line have the key removed.
    assert job.error and "[redacted]" in job.error and fake.token not in job.error
    assert all(fake.token not in r.getMessage() for r in caplog.records)
