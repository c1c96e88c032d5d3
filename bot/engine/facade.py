"""The engine's face to front-ends and the CLI: admission, queries, cancel, lifecycle.

Every state change is one database transaction (storage/). The engine keeps only what
can be rebuilt in memory: which tasks run, each provider's in-flight count, and the
round-robin order of users. A new engine on the same database resumes every job that was
not finished: queued -> schedule; submitting -> resubmit once; running -> poll again with
the stored handle; ready -> deliver.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bot import messages, moderation, render, titles
from bot.engine.contract import Delivery, Failure, Song
from bot.engine.errors import (
    AlreadyFinished,
    EngineClosed,
    JobNotFound,
    NoProvider,
    NotAllowed,
    QuotaExceeded,
    Refused,
)
from bot.engine.leases import LeaseKeeper, instance_id, new_owner
from bot.engine.notify import Notifier
from bot.engine.runner import EngineOptions, JobRunner
from bot.engine.scheduler import Scheduler, pick_for
from bot.engine.tasks import JobTasks
from bot.metrics import Metrics
from bot.models import ACTIVE_STATES, FailureKind, Job, JobState, Requester
from bot.redact import Redactor
from bot.requests import GenerationRequest, InvalidRequest
from bot.settings import Settings
from providers.base import Provider
from providers.router import Router
from storage.database import StorageError
from storage.quota import Limits, QuotaRefusal, next_reset
from storage.store import Store, connect_store

log = logging.getLogger("acestep.engine")


@dataclass(frozen=True)
class Admission:
    job_id: str
    position: int
    seed: int
    ignored_options: list[str]
    provider: str | None = None  # the provider the job will most likely run on
    duplicate: bool = False  # the same platform event was admitted before: this is that job
    # Every take the request made, (job id, seed) in take order; the first is job_id.
    takes: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class QuotaLine:
    name: str
    label: str
    used: float
    limit: float | None  # None = unlimited
    unit: str  # "song" or "s"

    @property
    def remaining(self) -> float | None:
        return None if self.limit is None else max(0.0, self.limit - self.used)


@dataclass(frozen=True)
class QuotaStatus:
    lines: list[QuotaLine]
    resets_at: datetime
    bypass: bool


class Engine:
    """Admits, schedules, runs and delivers songs; survives restarts."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        providers: Iterable[Provider],
        *,
        platforms: Iterable[str] | None = None,
        options: EngineOptions | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.community = store.community  # song defaults and ban lists
        self.router = Router(providers)
        self.options = options or EngineOptions()
        # Which platforms' jobs this engine runs: the bot runs chat jobs, the CLI its own.
        self.platforms = set(platforms) if platforms is not None else None
        self.metrics = Metrics()  # ops: counters/histograms for /metrics (bot/health.py)
        self.redact = Redactor(settings.secrets())
        self.tasks = JobTasks()
        self.notifier = Notifier()
        self.runner = JobRunner(
            settings,
            store,
            self.router,
            self.options,
            self.tasks,
            self.notifier,
            self.metrics,
            self.redact,
        )
        self.scheduler = Scheduler(
            store, self.router, self.runner, self.tasks, self.notifier, self.options, self._handles
        )
        # Several processes may share the database (PostgreSQL): each job being worked
        # on is leased to one of them (bot/engine/leases.py).
        self.instance = instance_id(settings)
        self.owner = new_owner(self.instance)
        self.lease_seconds = float(settings.lease_seconds)
        self.runner.owner = self.scheduler.owner = self.owner
        self.runner.lease_seconds = self.lease_seconds
        self.leases = LeaseKeeper(
            store, self.tasks, self.owner, self.instance, self.lease_seconds, self._take_over
        )
        self._scheduler_task: asyncio.Task[None] | None = None
        self._closing = False
        self._started = False

    # ---- construction ----------------------------------------------------------------

    @classmethod
    async def open(cls, settings: Settings, providers: Iterable[Provider], **kwargs: Any) -> Engine:
        """Open the database under DATA_DIR (migrating it) and build an engine."""
        return cls(settings, await connect_store(settings), providers, **kwargs)

    def register_delivery(self, delivery: Delivery) -> None:
        self.notifier.register(delivery)
        if self._started:
            asyncio.get_running_loop().create_task(self._resume_ready(delivery.platform))

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Resume unfinished jobs and start scheduling."""
        if self._started:
            return
        self._started = True
        self._closing = self.scheduler.closing = False
        render.shared().start()  # the renderer's workers get ready while jobs resume
        await self._recover()
        self.leases.start()
        self._scheduler_task = asyncio.create_task(self.scheduler.loop(), name="engine-scheduler")

    async def stop(self, grace: float | None = None) -> None:
        """Stop admitting and scheduling; let running deliveries finish within the grace
        period, then stop every task. Job states stay as they are for the next start."""
        self._closing = self.scheduler.closing = True
        await self._stop_scheduler()
        grace = self.options.stop_grace if grace is None else grace
        uploading = self.tasks.uploading()
        if uploading and grace > 0:
            await asyncio.wait(uploading, timeout=grace)
        await self.abort()
        self._started = False

    async def abort(self) -> None:
        """Stop every task at once, writing nothing more (what a crash would leave)."""
        await self._stop_scheduler()
        await self.tasks.cancel_all()
        self._closing = self.scheduler.closing = True
        self._started = False

    async def _stop_scheduler(self) -> None:
        await self.leases.stop()
        if self._scheduler_task is not None:
            self._scheduler_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler_task
            self._scheduler_task = None

    async def close(self) -> None:
        """Stop, close providers' HTTP clients and the database."""
        await self.stop()
        for provider in self.router.providers.values():
            with contextlib.suppress(Exception):
                await provider.aclose()
        await self.store.close()

    def _handles(self, job: Job) -> bool:
        return self.platforms is None or job.requester.platform in self.platforms

    async def _claim(self, job: Job, states: tuple[str, ...]) -> Job | None:
        """The job, made this process's, unless another live process holds it."""
        return await self.store.claim(job.id, self.owner, self.instance, states, self.lease_seconds)

    async def _recover(self) -> None:
        """Take back every unfinished job no other live process holds: at a restart,
        this instance's own old jobs at once (bot/engine/leases.py)."""
        in_flight = (JobState.SUBMITTING, JobState.RUNNING)
        for job in await self.store.in_states(in_flight):
            if self._handles(job):
                claimed = await self._claim(job, in_flight)
                if claimed is not None:
                    await self.runner.resume(claimed)
        for platform in self.notifier.deliveries:
            await self._resume_ready(platform)

    async def _resume_ready(self, platform: str) -> None:
        for job in await self.store.in_states((JobState.READY,)):
            if (
                job.requester.platform == platform
                and self._handles(job)
                and not self.tasks.running(job.id)
            ):
                claimed = await self._claim(job, (JobState.READY,))
                if claimed is not None:
                    self.tasks.spawn(job.id, self.runner.deliver(claimed), "deliver")

    async def _take_over(self, job: Job) -> None:
        """A job whose owner stopped renewing its lease (LeaseKeeper): resume it here."""
        if self._closing or not self._handles(job) or self.tasks.running(job.id):
            return
        if job.state == JobState.READY:
            if job.requester.platform not in self.notifier.deliveries:
                return
            claimed = await self._claim(job, (JobState.READY,))
        else:
            claimed = await self._claim(job, (JobState.SUBMITTING, JobState.RUNNING))
        if claimed is None:
            return
        log.warning("job %s: taking it over from %s, whose lease ran out", job.id, job.owner)
        if claimed.state == JobState.READY:
            self.tasks.spawn(claimed.id, self.runner.deliver(claimed), "deliver")
        else:
            await self.runner.resume(claimed)

    # ---- admission -------------------------------------------------------------------

    def is_admin(self, requester: Requester) -> bool:
        return requester.key in self.settings.admin_ids

    def limits(self) -> Limits:
        s = self.settings
        return Limits(
            s.quota_user_jobs_per_day,
            s.quota_user_seconds_per_day,
            s.quota_user_concurrent_jobs,
            s.quota_community_seconds_per_day,
            s.spend_cap_usd_per_day,
        )

    async def submit(
        self,
        request: GenerationRequest,
        requester: Requester,
        reply_target: dict[str, Any],
        *,
        source_key: str | None = None,
    ) -> Admission:
        """Reserve quota and queue a validated request; answers with its queue position.

        `source_key` names the platform event that asked (e.g. a Telegram update): the
        same event is never admitted twice; a repeat answers with the first job and
        `duplicate=True`. Raises NoProvider or QuotaExceeded (nothing stored),
        EngineClosed when stopping.
        """
        if self._closing:
            raise EngineClosed(messages.RESTARTING)
        if not isinstance(request, GenerationRequest):
            raise InvalidRequest("request", type(request).__name__, "a GenerationRequest")
        await self.check_banned(request, requester)
        capable = self.router.capable(request)
        if not capable:
            raise NoProvider(self._no_provider_text(request))
        seeds = _take_seeds(request.seed, request.takes)
        # Each take is a job of its own: its own concrete seed and a request asking for
        # one take, so any take can be made again alone.
        one = request.model_copy(update={"takes": 1}) if request.takes > 1 else request
        reserved = round(self.router.price_for(one) * one.duration, 6)
        jobs = [
            Job(
                id="",
                requester=requester,
                reply_target=reply_target,
                request=one,
                seed=seed,
                state=JobState.QUEUED,
                source_key=(
                    source_key if take == 1 or source_key is None else f"{source_key}#{take}"
                ),
                reserved_usd=reserved,
                take=take,
                takes=len(seeds),
            )
            for take, seed in enumerate(seeds, start=1)
        ]
        job = jobs[0]
        seed = job.seed
        now = time.time()
        for _ in range(5):
            for each in jobs:
                each.id = secrets.token_hex(4)
            if len(jobs) > 1:
                for each in jobs:
                    each.batch_id = job.id
            try:
                existing = await self.store.admit_takes(
                    jobs, self.limits(), bypass_quotas=self.is_admin(requester), now=now
                )
                if existing is not None:
                    return await self._repeat_admission(existing)
                break
            except QuotaRefusal as refusal:
                self.metrics.quota_refused(refusal.limit)
                resets = None if refusal.limit == "user_concurrent_jobs" else next_reset(now)
                raise QuotaExceeded(
                    refusal.limit,
                    refusal.remaining,
                    refusal.limit_value,
                    resets,
                    messages.quota_refusal(
                        refusal.limit,
                        refusal.limit_value,
                        refusal.remaining,
                        refusal.needed,
                        resets,
                    ),
                ) from None
            except StorageError:
                raise
            except Exception as exc:  # an id collision: draw another
                if "UNIQUE" not in str(exc):
                    raise
        log.info(
            "job %s admitted: %s %s %ss seed %s for %s",
            job.id,
            request.mode.value,
            titles.song_title(request),
            request.duration,
            seed,
            requester.key,
        )
        likely = pick_for(self.router, request) or capable[0]
        position = await self._position_of(job.id)
        self.tasks.wake.set()
        return Admission(
            job_id=job.id,
            position=position,
            seed=seed,
            ignored_options=likely.capabilities.ignored_options(request),
            provider=likely.name,
            takes=tuple((each.id, each.seed) for each in jobs),
        )

    async def check_banned(self, request: GenerationRequest, requester: Requester) -> None:
        """Raise Refused for a request a ban list names (nothing is stored or charged).
        `submit` checks it; a front-end may check first, before it shows anything."""
        text = moderation.request_text(request)
        lists = [("operator", self.settings.banned_words)]
        if requester.community_key:
            lists.append(("community", await self.community.banned(requester.community_key)))
        for listed_by, phrases in lists:
            found = moderation.first_banned(text, phrases)
            if found is not None:
                self.metrics.moderation_refused(listed_by)
                log.info(
                    "request by %s refused: the %s ban list has a phrase it contains",
                    requester.key,
                    listed_by,
                )
                raise Refused(listed_by, messages.REFUSED_BY_BAN_LIST)

    async def _repeat_admission(self, job_id: str) -> Admission:
        job = await self.store.get(job_id)
        assert job is not None
        log.info(
            "job %s: its request arrived again (%s); not admitted twice", job_id, job.source_key
        )
        batch = await self.store.batch(job.batch_id) if job.batch_id else [job]
        return Admission(
            job_id=job.id,
            position=await self._position_of(job.id),
            seed=job.seed,
            ignored_options=[],
            provider=job.provider,
            duplicate=True,
            takes=tuple((each.id, each.seed) for each in batch),
        )

    async def admitted_for(self, source_key: str) -> Job | None:
        """The job a platform event already created, if any."""
        return await self.store.by_source_key(source_key)

    def _no_provider_text(self, request: GenerationRequest) -> str:
        same_mode = [
            p for p in self.router.providers.values() if request.mode in p.capabilities.modes
        ]
        if not same_mode:
            return messages.no_provider_for_mode(request.mode.value)
        same_mode = [p for p in same_mode if request.task in p.capabilities.tasks]
        if not same_mode:
            return messages.no_provider_for_task(request.task.value)
        limits = self.router.option_limits(request)
        if limits:  # the mode and length are served, an option's value is not
            name, which = next(iter(limits.items()))
            return messages.no_provider_for_option(name, request.advanced()[name], which)
        longest = max(p.capabilities.max_duration for p in same_mode)
        shortest = min(p.capabilities.min_duration for p in same_mode)
        return messages.no_provider_for_duration(request.duration, shortest, longest)

    # ---- queries ---------------------------------------------------------------------

    async def get_job(self, job_id: str) -> Job | None:
        return await self.store.get(job_id.strip().lower())

    async def queue_for(self, requester: Requester) -> list[tuple[Job, int | None]]:
        jobs = await self.store.for_user(requester.key, ACTIVE_STATES)
        positions = await self.scheduler.positions()
        return [(job, positions.get(job.id)) for job in reversed(jobs)]

    async def latest_active(self, requester: Requester) -> Job | None:
        """The requester's most recently admitted job still in progress, if any."""
        active = await self.store.for_user(requester.key, ACTIVE_STATES, limit=1)
        return active[0] if active else None

    async def history(self, requester: Requester, limit: int = 10) -> list[Job]:
        return await self.store.for_user(requester.key, (JobState.DELIVERED,), limit=limit)

    async def quota_status(self, requester: Requester) -> QuotaStatus:
        now = time.time()
        usage, eff = await self.store.usage(requester, self.limits(), now)
        bypass = self.is_admin(requester)

        def line(name: str, used: float, limit: float | None, unit: str) -> QuotaLine:
            return QuotaLine(
                name, messages.QUOTA_NAMES[name], used, None if bypass else limit, unit
            )

        lines = [
            line("user_jobs_per_day", usage.user_jobs, eff.user_jobs_per_day, "song"),
            line("user_seconds_per_day", usage.user_seconds, eff.user_seconds_per_day, "s"),
            line("user_concurrent_jobs", usage.user_active, eff.user_concurrent_jobs, "song"),
        ]
        if requester.community_key:
            lines.append(
                line(
                    "community_seconds_per_day",
                    usage.community_seconds,
                    eff.community_seconds_per_day,
                    "s",
                )
            )
        return QuotaStatus(lines=lines, resets_at=next_reset(now), bypass=bypass)

    async def update_reply_target(self, job_id: str, **changes: Any) -> dict[str, Any]:
        """Merge `changes` into a job's stored reply target (the one place it is
        rewritten after admission); returns the new target."""
        job = await self.store.get(job_id)
        if job is None:
            raise JobNotFound(messages.no_such_job(job_id))
        target = {**job.reply_target, **changes}
        await self.store.update(job_id, reply_target=target)
        return target

    async def get_limits(self, scope: str, subject: str) -> dict[str, float]:
        return await self.store.get_overrides(scope, subject)

    async def set_limit(self, scope: str, subject: str, key: str, value: float | None) -> None:
        await self.store.set_override(scope, subject, key, value)
        log.info("limit %s %s %s set to %s", scope, subject, key, value)

    async def get_community_setting(self, community: str, name: str) -> Any:
        return await self.store.get_community_setting(community, name)

    async def set_community_setting(self, community: str, name: str, value: Any) -> None:
        await self.store.set_community_setting(community, name, value)

    # ---- community controls: defaults, ban lists, deleting songs ---------------------

    async def song_defaults(self, scope: str, subject: str) -> dict[str, Any]:
        return await self.community.defaults(scope, subject)

    async def set_song_defaults(self, scope: str, subject: str, values: dict[str, Any]) -> None:
        await self.community.set_defaults(scope, subject, values)
        log.info("song defaults of %s %s set: %s", scope, subject, sorted(values))

    async def clear_song_defaults(self, scope: str, subject: str) -> None:
        await self.community.clear_defaults(scope, subject)

    async def banned(self, community: str) -> list[str]:
        return await self.community.banned(community)

    async def ban(self, community: str, phrases: list[str], by: Requester) -> list[str]:
        added = await self.community.ban(community, phrases, by.key)
        if added:
            log.info("%s added %d phrases to the ban list of %s", by.key, len(added), community)
        return added

    async def unban(self, community: str, phrases: list[str]) -> list[str]:
        return await self.community.unban(community, phrases)

    async def delete_song(self, job_id: str, by: Requester) -> Job:
        """Remove a posted song: mark the job deleted (the row stays, it is the ledger)
        and remove its audio files at once. Who may is the caller's rule."""
        job = await self.store.get(job_id)
        if job is None:
            raise JobNotFound(messages.no_such_job(job_id))
        if job.state != JobState.DELIVERED:
            raise AlreadyFinished(messages.not_posted_yet(job_id))
        await self.store.mark_deleted(job.id, by.key)
        removed = await asyncio.to_thread(_remove_audio, self.settings.audio_dir, job.id)
        log.info("job %s deleted by %s (%d audio files removed)", job.id, by.key, removed)
        fresh = await self.store.get(job.id)
        assert fresh is not None
        return fresh

    def provider_for(self, job: Job) -> Provider | None:
        """The provider serving a job, else the one most likely to."""
        return (
            self.router.get(job.provider or "")
            or pick_for(self.router, job.request)
            or next(iter(self.router.capable(job.request)), None)
        )

    def song_for(self, job: Job) -> Song:
        return self.runner.song_for(job)

    def failure_of(self, job: Job) -> Failure:
        return self.runner.failure_of(job)

    # ---- cancel ----------------------------------------------------------------------

    async def cancel(self, job_id: str, requester: Requester, *, is_admin: bool = False) -> Job:
        """Cancel a job of one's own (or any, for an admin). Refunds its quota."""
        job_id = job_id.strip().lower()
        job = await self.store.get(job_id)
        if job is None:
            raise JobNotFound(messages.no_such_job(job_id))
        if job.requester.key != requester.key and not (is_admin or self.is_admin(requester)):
            raise NotAllowed(messages.NOT_YOURS)
        if not job.active or job.state == JobState.READY:
            raise AlreadyFinished(messages.already_finished(job_id, job.state))
        if await self.runner.fail(
            job,
            (JobState.QUEUED,),
            FailureKind.CANCELLED,
            f"cancelled while queued by {requester.key}",
            state=JobState.CANCELLED,
        ):
            cancelled = await self.store.get(job_id)
            assert cancelled is not None
            return cancelled
        # Submitting or running: the job's task stops it at the provider.
        await self.store.update(job_id, cancel_requested=True)
        self.tasks.signal_cancel(job_id)
        await self.tasks.wait_for(job_id, timeout=10)
        # Without a task here (another process runs it, or it is not resumed yet) the flag
        # stays set and whichever engine runs the job stops it at the provider.
        final = await self.store.get(job_id)
        assert final is not None
        if final.state in (JobState.READY, JobState.DELIVERED):
            raise AlreadyFinished(messages.finished_before_cancel(job_id))
        return final

    async def _position_of(self, job_id: str) -> int:
        return (await self.scheduler.positions()).get(job_id, 1)


def _take_seeds(seed: int, takes: int) -> list[int]:
    """`takes` distinct concrete seeds: the user's seed and the ones after it, else drawn."""
    if seed >= 0:
        return [(seed + i) % 2_147_483_648 for i in range(takes)]
    seeds: list[int] = []
    while len(seeds) < takes:
        drawn = secrets.randbelow(2_147_483_648)
        if drawn not in seeds:
            seeds.append(drawn)
    return seeds


def _remove_audio(audio_dir: Path, job_id: str) -> int:
    """Delete every stored file of a job (`<job_id>.*`); returns how many."""
    removed = 0
    for path in audio_dir.glob(f"{job_id}.*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed
