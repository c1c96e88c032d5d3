"""One job end to end: submit to a provider, poll it, fail over, store the audio, deliver.

Every step is a state transition in the database (storage/), so a restart can resume
any job from where it stood: `resume()` takes over a job found mid-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bot import audio, messages, render, titles
from bot.engine.contract import DeliveryError, Failure, Phase, Progress, Song
from bot.engine.eta import GenerationTimes
from bot.engine.notify import Notifier
from bot.engine.tasks import JobTasks
from bot.metrics import Metrics
from bot.models import FailureKind, Job, JobState, SongResult
from bot.redact import Redactor
from bot.requests import Task, clean_text
from bot.settings import Settings
from bot.timing import wait_event
from providers.base import (
    AuthError,
    Busy,
    Cancelled,
    CancelOutcome,
    CannotServe,
    Failed,
    Handle,
    Provider,
    ProviderError,
    Queued,
    Rejected,
    Result,
    Running,
    SourceFile,
    Status,
    Succeeded,
    TaskLost,
    Unavailable,
)
from providers.download import DownloadTimedOut
from providers.router import Router, price_of
from storage.quota import QuotaRefusal
from storage.store import Store

log = logging.getLogger("acestep.engine")

# A job is submitted to providers at most this many times (failover, lost tasks).
MAX_SUBMITS = 4
# Crash recovery resubmits a job found mid-submit once; a second time it fails.
MAX_RECOVERIES = 1
# How often a running job re-reads its cancel flag written by another process.
CANCEL_FLAG_CHECK_S = 5.0

S = JobState
T = TypeVar("T")


@dataclass
class EngineOptions:
    """Timing knobs; tests shrink them."""

    poll_max_interval: float = 10.0
    # While the provider says the song is being made, polls stay this close together
    # (never closer than the provider's own interval): see _poll_until_done.
    running_poll_max_interval: float = 1.0
    poll_backoff: float = 1.5
    busy_cooldown: float = 15.0
    unavailable_cooldown: float = 30.0
    delivery_attempts: int = 3
    delivery_backoff: float = 2.0
    scheduler_idle: float = 5.0
    stop_grace: float = 10.0
    # A generating job's status is refreshed this often (elapsed time, estimate) even
    # when the provider reports nothing new; the front-ends throttle their edits anyway.
    progress_refresh: float = 5.0


class JobRunner:
    """Runs jobs: each call works on one job until it leaves the runner's hands."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        router: Router,
        options: EngineOptions,
        tasks: JobTasks,
        notifier: Notifier,
        metrics: Metrics,
        redact: Redactor,
    ) -> None:
        self.settings = settings
        self.store = store
        self.router = router
        self.options = options
        self.tasks = tasks
        self.notifier = notifier
        self.metrics = metrics
        self.redact = redact
        self.times = GenerationTimes()
        # The process's hold on the jobs it starts (bot/engine/leases.py); the engine
        # sets them.
        self.owner: str | None = None
        self.lease_seconds: float | None = None

    # ---- entry points ----------------------------------------------------------------

    async def run(self, job: Job, provider: Provider) -> None:
        """Submit a queued job to `provider` (already acquired) and see it through."""
        released = False
        try:
            handle = await self._submit(job, provider)
            if handle is None:
                return
            await self._poll_job(job, provider, handle)
            released = True
        finally:
            if not released:
                self.router.release(provider)

    async def resume(self, job: Job) -> None:
        """Take over a job a previous process left mid-way (called at start)."""
        if job.state == S.SUBMITTING:
            # The submit may or may not have reached the provider: resubmit once.
            if job.recoveries >= MAX_RECOVERIES:
                await self.fail(
                    job,
                    (S.SUBMITTING,),
                    FailureKind.INTERNAL,
                    "interrupted twice while submitting",
                )
                return
            await self.store.transition(
                job.id, (S.SUBMITTING,), S.QUEUED, recoveries=job.recoveries + 1, provider=None
            )
            log.warning("job %s was interrupted while submitting; resubmitting once", job.id)
        elif job.state == S.RUNNING:
            provider = self.router.get(job.provider or "")
            if provider is None or not job.handle:
                await self.fail(
                    job,
                    (S.RUNNING,),
                    FailureKind.UNAVAILABLE,
                    f"provider {job.provider} is no longer configured",
                )
                return
            self.router.acquire(provider)
            log.info("job %s resumes polling %s", job.id, provider.name)
            self.tasks.spawn(
                job.id, self._poll_job(job, provider, Handle.from_json(job.handle)), "run"
            )

    # ---- submitting ------------------------------------------------------------------

    async def _submit(self, job: Job, provider: Provider) -> Handle | None:
        now = time.time()
        usd = round(price_of(provider, job.request), 6)
        try:
            # The run is charged from the moment it may reach the provider; a later run
            # of the same job must fit under the day's spend cap.
            moved = await self.store.start_run(
                job.id,
                provider.name,
                usd,
                self.settings.spend_cap_usd_per_day,
                now,
                owner=self.owner,
                lease_seconds=self.lease_seconds,
                # The provider's concurrency counts every process on the database.
                concurrency=provider.capabilities.concurrency,
                attempts=job.attempts + 1,
                started_at=job.started_at or now,
            )
        except QuotaRefusal as refusal:
            self.metrics.quota_refused(refusal.limit)
            await self.fail(
                job,
                (S.QUEUED,),
                FailureKind.BUDGET,
                f"no room under the spend cap for another run at {provider.name}",
            )
            return None
        if not moved:
            return None
        job.attempts += 1
        job.state = S.SUBMITTING
        job.provider = provider.name
        job.started_at = job.started_at or now
        await self.notifier.progress(job, Progress(Phase.STARTING, provider=provider.name))
        source = self.source_file(job)
        if job.request.task is not Task.GENERATE and (source is None or not source.path.is_file()):
            # The source is stored with the job before admission (bot/sources.py); gone
            # means someone removed DATA_DIR/sources by hand. Nothing reached the provider.
            await self.store.credit_run(job.id, usd, provider.name)
            await self.fail(
                job, (S.SUBMITTING,), FailureKind.INTERNAL, "the source audio file is missing"
            )
            return None
        try:
            if source is None:
                handle = await provider.submit(job.request, job.seed)
            else:
                handle = await provider.submit(job.request, job.seed, source=source)
        except ProviderError as exc:
            # An answer that refuses the submit means nothing was queued, so nothing is
            # billed; only a submit that timed out may exist there (and be billed).
            if not exc.maybe_accepted:
                await self.store.credit_run(job.id, usd, provider.name)
            await self._submit_refused(job, provider, exc)
            return None
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: unexpected error submitting to %s", job.id, provider.name)
            await self.fail(job, (S.SUBMITTING,), FailureKind.INTERNAL, "submit crashed")
            return None
        self.router.note_ok(provider)
        if not await self.store.transition(
            job.id, (S.SUBMITTING,), S.RUNNING, handle=handle.to_json()
        ):
            # Someone else moved the job meanwhile (failed or requeued it: another process
            # on this database, or recovery). This submit is nobody's: stop it there
            # rather than poll, deliver or submit the job a second time.
            log.warning(
                "job %s changed state while %s accepted it; cancelling that submit",
                job.id,
                provider.name,
            )
            with contextlib.suppress(ProviderError):
                if await provider.cancel(handle) is CancelOutcome.REMOVED:
                    await self.store.credit_run(job.id, usd, provider.name)
            return None
        job.state = S.RUNNING
        job.handle = handle.to_json()
        log.info("job %s accepted by %s", job.id, provider.name)
        return handle

    def source_file(self, job: Job) -> SourceFile | None:
        """The job's source audio as a provider takes it (None for a new song)."""
        found = job.request.source
        if job.request.task is Task.GENERATE or found is None:
            return None
        return SourceFile(
            found.path(self.settings.data_dir), found.sha256, found.seconds, self.store.uploads
        )

    async def _submit_refused(self, job: Job, provider: Provider, exc: ProviderError) -> None:
        if isinstance(exc, Rejected):
            self._log_provider_error(job, provider, exc)
            await self.fail(
                job, (S.SUBMITTING,), FailureKind.REJECTED, f"{provider.name}: {exc.message}"
            )
        elif isinstance(exc, CannotServe):
            self._log_provider_error(job, provider, exc, level=logging.WARNING)
            await self._requeue(job, provider, exc, tried=True)
        elif isinstance(exc, AuthError):
            self._log_provider_error(job, provider, exc)
            self.router.cool_down(
                provider, self.settings.provider_cooldown_seconds, "auth", exc.message
            )
            await self._requeue(job, provider, exc, tried=True)
        elif isinstance(exc, Busy | Unavailable):
            self._log_provider_error(job, provider, exc)
            busy = isinstance(exc, Busy)
            wait = exc.retry_after or (
                self.options.busy_cooldown if busy else self.options.unavailable_cooldown
            )
            self.router.cool_down(provider, wait, "busy", exc.message)
            # A busy answer means "not accepted": the same provider may take it later. An
            # unreachable or timed-out submit may exist (and be billed): never resend it
            # there; only another provider may take the job.
            await self._requeue(job, provider, exc, tried=not busy)
        else:
            self._log_provider_error(job, provider, exc)
            await self.fail(job, (S.SUBMITTING,), FailureKind.PROVIDER_FAILED, str(exc))

    async def _requeue(
        self, job: Job, provider: Provider, exc: ProviderError, *, tried: bool
    ) -> None:
        """Back to the queue so the scheduler picks the next capable provider."""
        tried_list = job.tried_providers + ([provider.name] if tried else [])
        if job.attempts >= MAX_SUBMITS:
            await self.fail(
                job,
                (S.SUBMITTING, S.RUNNING),
                FailureKind.UNAVAILABLE,
                f"gave up after {job.attempts} submits",
            )
            return
        kind = (
            FailureKind.UNAVAILABLE
            if isinstance(exc, AuthError | Busy | Unavailable)
            else FailureKind.PROVIDER_FAILED
        )
        # The last failure is kept, so a job no provider is left for fails with it.
        await self.store.transition(
            job.id,
            (S.SUBMITTING, S.RUNNING),
            S.QUEUED,
            provider=None,
            handle=None,
            tried_providers=tried_list,
            error=self.redact(f"{provider.name}: {exc.message}"),
            failure=kind,
        )
        self.tasks.wake.set()

    # ---- polling ---------------------------------------------------------------------

    async def _poll_job(self, job: Job, provider: Provider, handle: Handle) -> None:
        """Poll until the provider finishes, then store the song and deliver it."""
        try:
            outcome = await self._poll_until_done(job, provider, handle)
        finally:
            self.router.release(provider)
            self.tasks.wake.set()
        if outcome:
            fresh = await self.store.get(job.id)
            if fresh is not None and fresh.state == S.READY:
                await self.deliver(fresh)

    async def _poll_until_done(self, job: Job, provider: Provider, handle: Handle) -> bool:
        """True when the job reached `ready`."""
        cancel = self.tasks.cancel_event(job.id)
        base = provider.poll_interval()
        interval = base
        deadline = (job.started_at or time.time()) + self.settings.job_timeout_seconds
        last: Status | None = None
        next_flag_check = 0.0
        generating_since: float | None = None  # wall clock, first "running" seen here
        next_refresh = 0.0
        while True:
            # A cancel from this process sets the event at once; one from another process
            # (`acestep-bot jobs cancel`) is a flag in the row, read every few seconds.
            if not cancel.is_set() and time.monotonic() >= next_flag_check:
                next_flag_check = time.monotonic() + CANCEL_FLAG_CHECK_S
                if await self._cancel_requested(job.id):
                    cancel.set()
            if cancel.is_set():
                await self._cancel_at_provider(job, provider, handle)
                return False
            if time.time() > deadline:
                await self._cancel_at_provider(job, provider, handle, quiet=True)
                await self.fail(
                    job,
                    (S.RUNNING,),
                    FailureKind.TIMED_OUT,
                    f"timed out at {provider.name}",
                )
                return False
            try:
                found = await self._next_status(provider, handle, last, cancel)
                if found is None:
                    continue  # cancelled while waiting for news
                status = found
                await self._keep_handle(job, handle)
            except TaskLost as exc:
                self._log_provider_error(job, provider, exc)
                await self._requeue(job, provider, exc, tried=False)
                return False
            except Rejected as exc:
                self._log_provider_error(job, provider, exc)
                await self.fail(
                    job, (S.RUNNING,), FailureKind.REJECTED, f"{provider.name}: {exc.message}"
                )
                return False
            except ProviderError as exc:
                # A poll is safe to retry: back off (honouring Retry-After) until the deadline.
                self._log_provider_error(job, provider, exc, level=logging.WARNING)
                if isinstance(exc, AuthError):
                    self.router.cool_down(
                        provider, self.settings.provider_cooldown_seconds, "auth", exc.message
                    )
                interval = min(self.options.poll_max_interval, interval * self.options.poll_backoff)
                await self._sleep(cancel, max(interval, exc.retry_after or 0))
                continue
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job %s: unexpected error polling %s", job.id, provider.name)
                await self._sleep(cancel, interval)
                continue
            if isinstance(status, Succeeded):
                if generating_since is not None:
                    self.times.record(provider.name, time.time() - generating_since)
                return await self._finish(job, provider, status.result, deadline, cancel)
            if isinstance(status, Failed):
                await self._provider_failed(job, provider, status)
                return False
            if isinstance(status, Cancelled):
                await self.fail(
                    job,
                    (S.RUNNING,),
                    FailureKind.CANCELLED,
                    f"cancelled at {provider.name}",
                    state=S.CANCELLED,
                )
                return False
            if isinstance(status, Running) and generating_since is None:
                generating_since = time.time()
            changed = status != last
            if changed or time.monotonic() >= next_refresh:
                next_refresh = time.monotonic() + self.options.progress_refresh
                await self.notifier.progress(
                    job, self._progress_of(job, provider, status, generating_since)
                )
            if changed:
                if type(status) is not type(last):
                    interval = base
                last = status
            else:
                cap = self.options.poll_max_interval
                if isinstance(status, Running) or (
                    isinstance(status, Queued) and status.position is not None
                ):
                    # A running song is done within a minute or so, and each second
                    # between polls is a second the user waits for it (backing off to 10 s
                    # made that 2.9 s median, 8 s at worst: bench/detect.py); a queue that
                    # reports a position is moving too (a song leaving a 35 s queue was
                    # noticed 4 s late). Only a queue that says nothing backs off to 10 s.
                    cap = min(cap, max(base, self.options.running_poll_max_interval))
                interval = min(cap, interval * self.options.poll_backoff)
            if not provider.streams_status:
                await self._sleep(cancel, interval)

    async def _next_status(
        self, provider: Provider, handle: Handle, last: Status | None, cancel: asyncio.Event
    ) -> Status | None:
        """The next status: one poll, or for a provider that streams its status, the
        next change (at most CANCEL_FLAG_CHECK_S away); None when a cancel came first."""
        if not provider.streams_status:
            return await provider.poll(handle)
        waiting = asyncio.ensure_future(provider.wait_status(handle, last, CANCEL_FLAG_CHECK_S))
        stop = asyncio.ensure_future(cancel.wait())
        try:
            await asyncio.wait({waiting, stop}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            waiting.cancel()
            stop.cancel()
            raise
        stop.cancel()
        if not waiting.done():  # the user cancelled first
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
            return None
        return waiting.result()

    async def _keep_handle(self, job: Job, handle: Handle) -> None:
        """A provider may move its job on to a new task (ACE-Step's described songs are
        two): store the handle when it changed, so a restart resumes the right one."""
        current = handle.to_json()
        if current != job.handle:
            await self.store.transition(job.id, (S.RUNNING,), S.RUNNING, handle=current)
            job.handle = current

    def _progress_of(
        self, job: Job, provider: Provider, status: Status, generating_since: float | None
    ) -> Progress:
        if isinstance(status, Queued):
            return Progress(
                Phase.PROVIDER_QUEUE,
                position=status.position,
                provider=provider.name,
                eta_seconds=self.times.queue_wait(
                    provider.name, status.position, provider.capabilities.concurrency
                ),
            )
        since = generating_since or job.started_at or time.time()
        fraction = status.progress if isinstance(status, Running) else None
        return Progress(
            Phase.GENERATING,
            provider=provider.name,
            fraction=fraction,
            eta_seconds=self.times.remaining(provider.name, time.time() - since, fraction),
            since=since,
        )

    async def _sleep(self, cancel: asyncio.Event, seconds: float) -> None:
        await wait_event(cancel, seconds)

    async def _cancel_requested(self, job_id: str) -> bool:
        job = await self.store.get(job_id)
        return bool(job and job.cancel_requested)

    async def _cancel_at_provider(
        self,
        job: Job,
        provider: Provider,
        handle: Handle,
        *,
        quiet: bool = False,
    ) -> None:
        """Stop the job at the provider. Only a provider that says it removed the job from
        its queue before it ran (so it is not billed) gets the charge taken back and, for
        a cancel the user asked for, the quota given back; otherwise the provider may bill
        the run, so the spend keeps it."""
        try:
            outcome = await provider.cancel(handle)
        except ProviderError as exc:
            outcome = CancelOutcome.REFUSED
            self._log_provider_error(job, provider, exc, level=logging.WARNING)
        unbilled = outcome is CancelOutcome.REMOVED
        if unbilled:
            await self.store.credit_run(
                job.id, round(price_of(provider, job.request), 6), provider.name
            )
        if quiet:
            return
        log.info(
            "job %s cancelled (provider %s %s)",
            job.id,
            provider.name,
            "stopped it before it ran" if unbilled else "may bill it",
        )
        await self.fail(
            job,
            (S.RUNNING, S.SUBMITTING),
            FailureKind.CANCELLED,
            "cancelled" if unbilled else "cancelled after the provider began; its charge stays",
            state=S.CANCELLED,
            refund_quota=unbilled,
        )

    async def _provider_failed(self, job: Job, provider: Provider, status: Failed) -> None:
        log.warning("job %s failed at %s: %s", job.id, provider.name, self.redact(status.reason))
        if not status.billed:
            await self.store.credit_run(
                job.id, round(price_of(provider, job.request), 6), provider.name
            )
        self.metrics.provider_error(provider.name, "Rejected" if status.rejected else "Failed")
        detail = f"{provider.name}: {status.reason}"
        if status.rejected:
            await self.fail(job, (S.RUNNING,), FailureKind.REJECTED, detail)
            return
        # A remote failure after acceptance may be retried once on another provider.
        others = [
            p
            for p in self.router.capable(job.request)
            if p.name != provider.name and p.name not in job.tried_providers
        ]
        if others and job.attempts < 2:
            await self._requeue(
                job, provider, ProviderError(provider.name, status.reason), tried=True
            )
            return
        await self.fail(job, (S.RUNNING,), FailureKind.PROVIDER_FAILED, detail)

    # ---- storing the result ----------------------------------------------------------

    async def _finish(
        self,
        job: Job,
        provider: Provider,
        result: Result,
        deadline: float,
        cancel: asyncio.Event,
    ) -> bool:
        """Download (streamed to a .part file under DATA_DIR, by the job's deadline, and
        stopped by a cancel), check and keep the audio; running -> ready."""
        part = self.settings.audio_dir / f"{job.id}.download.part"
        expected = float(job.duration)
        price = round(price_of(provider, job.request), 6)
        try:
            part.parent.mkdir(parents=True, exist_ok=True)
            fetched = await _unless_cancelled(
                self._download(provider, result, part, deadline),
                cancel,
                lambda: self._cancel_requested(job.id),
            )
            if fetched is None:
                log.info("job %s cancelled during the download from %s", job.id, provider.name)
                # The provider made the song: it is billed, and the user's quota stays spent.
                await self.fail(
                    job,
                    (S.RUNNING,),
                    FailureKind.CANCELLED,
                    "cancelled during the download; the provider made (and bills) it",
                    state=S.CANCELLED,
                    refund_quota=False,
                )
                return False
            info = await render.shared().check(part, expected)
            path = self.settings.audio_dir / f"{job.id}.{info.format}"
            part.replace(path)
        except DownloadTimedOut as exc:
            log.warning("job %s: download from %s: %s", job.id, provider.name, exc.message)
            if time.time() >= deadline - 1:  # the job's own time ran out
                await self.fail(
                    job,
                    (S.RUNNING,),
                    FailureKind.TIMED_OUT,
                    f"{provider.name}: result download timed out",
                )
            else:
                await self._provider_failed(job, provider, Failed(reason=exc.message))
            return False
        except (audio.AudioError, ProviderError) as exc:
            reason = exc.message if isinstance(exc, ProviderError) else str(exc)
            log.warning(
                "job %s: result from %s unusable: %s", job.id, provider.name, self.redact(reason)
            )
            await self._provider_failed(job, provider, Failed(reason=reason))
            return False
        except OSError as exc:
            log.error(
                "job %s: cannot store audio in %s: %s (disk full or unwritable DATA_DIR?)",
                job.id,
                self.settings.audio_dir,
                exc,
            )
            # The provider made (and billed) the song: the spend keeps its charge.
            await self.fail(job, (S.RUNNING,), FailureKind.INTERNAL, "audio not stored")
            return False
        finally:
            part.unlink(missing_ok=True)
        song = SongResult(
            audio_file=path.name,
            format=info.format,
            duration=round(info.duration, 3),
            seed=result.seed if result.seed is not None else job.seed,
            provider=provider.name,
            title=titles.song_title(
                job.request,
                provider_metadata=result.metadata,
                tags=clean_text(result.tags, multiline=False) if result.tags else None,
                lyrics=clean_text(result.lyrics, multiline=True) if result.lyrics else None,
            ),
            sample_rate=info.sample_rate,
            channels=info.channels,
            # Provider text is untrusted too: it goes into captions, tags and logs.
            tags=clean_text(result.tags, multiline=False) if result.tags else result.tags,
            lyrics=clean_text(result.lyrics, multiline=True) if result.lyrics else result.lyrics,
            seed_honoured=result.seed_honoured,
            provider_metadata=result.metadata,
        )
        moved = await self.store.finish_success(job.id, provider.name, price, song)
        if moved:
            self.metrics.job_ready(job, provider.name)
            log.info(
                "job %s ready: %.1fs %s from %s", job.id, info.duration, info.format, provider.name
            )
        return moved

    async def _download(
        self, provider: Provider, result: Result, dest: Path, deadline: float
    ) -> int:
        attempts = 3
        for attempt in range(attempts):
            try:
                return await provider.save_audio(result, dest, deadline=deadline)
            except Unavailable:
                if attempt == attempts - 1 or time.time() >= deadline:
                    raise
                await asyncio.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    # ---- delivery --------------------------------------------------------------------

    def song_for(self, job: Job) -> Song:
        """The stored song of a `ready` (or delivered) job, for a front-end to post."""
        req = job.request
        result = job.result or SongResult(
            audio_file="", format="", duration=req.duration, seed=job.seed, provider="", title=""
        )
        return Song(
            job_id=job.id,
            title=job.title,
            original_path=self.settings.audio_dir / result.audio_file,
            duration=float(result.duration or req.duration),
            seed=result.seed,
            provider=result.provider or job.provider or "",
            tags=result.tags or (req.tags or None),
            lyrics=result.lyrics or (req.lyrics or None),
            prompt=req.prompt or None,
            seed_honoured=result.seed_honoured,
            made_at=job.finished_at or job.created_at or None,
            lineage=messages.lineage(req),
        )

    async def deliver(self, job: Job) -> None:
        """Post a `ready` job through its platform, retrying; ready -> delivered."""
        delivery = self.notifier.get(job.requester.platform)
        if delivery is None:
            return  # stays ready until that front-end is running
        self.tasks.mark_uploading(job.id)
        song = self.song_for(job)
        error = "delivery failed"
        for attempt in range(self.options.delivery_attempts):
            try:
                await self.notifier.progress(job, Progress(Phase.UPLOADING))
                await delivery.deliver(job, song)
            except DeliveryError as exc:
                error = str(exc)
                log.warning(
                    "job %s: delivery to %s failed (attempt %d): %s",
                    job.id,
                    job.requester.platform,
                    attempt + 1,
                    self.redact(error),
                )
                if exc.permanent:
                    break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                log.exception(
                    "job %s: delivery to %s crashed (attempt %d)",
                    job.id,
                    job.requester.platform,
                    attempt + 1,
                )
            else:
                if await self.store.mark_delivered(job.id):
                    self.metrics.job_delivered(job)
                log.info("job %s delivered to %s", job.id, job.requester.platform)
                return
            await asyncio.sleep(self.options.delivery_backoff * (attempt + 1))
        log.error("job %s: giving up delivery: %s", job.id, self.redact(error))
        await self.fail(job, (S.READY,), FailureKind.NOT_POSTED, error)

    # ---- shared helpers --------------------------------------------------------------

    async def fail(
        self,
        job: Job,
        from_states: tuple[JobState, ...],
        kind: FailureKind,
        detail: str,
        *,
        state: JobState = S.FAILED,
        refund_quota: bool = True,
    ) -> bool:
        """Finish unsuccessfully (giving the user's quota back unless told not to), tell
        the user, log for the operator. Charges of runs the provider may bill stay."""
        detail = self.redact(detail)
        moved = await self.store.finish_unsuccessful(
            job.id, from_states, state, detail, failure=kind, refund_quota=refund_quota
        )
        if not moved:
            return False
        log.info(
            "job %s %s (%s); quota %s",
            job.id,
            state,
            detail,
            "refunded" if refund_quota else "kept",
        )
        job.state = state
        job.error = detail
        job.failure = kind
        job.refunded = refund_quota
        await self.notifier.failed(job, self.failure_of(job))
        self.tasks.wake.set()
        return True

    def failure_of(self, job: Job) -> Failure:
        """How an unsuccessful job is reported to its platform."""
        kind = job.failure or (
            FailureKind.CANCELLED if job.state == S.CANCELLED else FailureKind.INTERNAL
        )
        return Failure(
            kind=kind,
            quota_refunded=job.refunded,
            detail=job.error or "",
            timeout_seconds=(
                self.settings.job_timeout_seconds if kind is FailureKind.TIMED_OUT else None
            ),
        )

    def _log_provider_error(
        self, job: Job, provider: Provider, exc: ProviderError, level: int = logging.ERROR
    ) -> None:
        kind = type(exc).__name__
        self.metrics.provider_error(provider.name, kind)
        if isinstance(exc, AuthError):
            level = logging.ERROR
            hint = " (operator: check the key and the account balance)"
        else:
            hint = ""
        log.log(
            level,
            "job %s: %s %s%s: %s",
            job.id,
            provider.name,
            kind,
            hint,
            self.redact(exc.message),
        )


async def _unless_cancelled(
    work: Coroutine[Any, Any, T], cancel: asyncio.Event, requested: Callable[[], Awaitable[bool]]
) -> T | None:
    """`work`'s result, or None when the job was cancelled first: by this process (the
    event, at once) or another one (the flag in its row, read every few seconds). A
    cancel, or this task being cancelled (shutdown), stops `work` where it is."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(cancel.wait())
    try:
        while True:
            await asyncio.wait(
                {task, waiter}, timeout=CANCEL_FLAG_CHECK_S, return_when=asyncio.FIRST_COMPLETED
            )
            if task.done():
                return task.result()
            if cancel.is_set() or await requested():
                return None
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
