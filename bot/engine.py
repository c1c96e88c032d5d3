"""The generation engine: admit -> persist -> schedule -> run -> deliver, and recovery.

Every state change is one SQLite transaction (storage/). The engine keeps only
what can be rebuilt in memory: which tasks run, each provider's in-flight count, and the
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
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from bot import audio, messages, render
from bot.metrics import Metrics
from bot.models import ACTIVE_STATES, Job, Requester
from bot.requests import GenerationRequest, InvalidRequest, clean_text
from bot.settings import Settings
from providers.base import (
    AuthError,
    Busy,
    Cancelled,
    Failed,
    Handle,
    Provider,
    ProviderError,
    Queued,
    Rejected,
    Result,
    Running,
    Status,
    Succeeded,
    TaskLost,
    Unavailable,
)
from providers.download import DownloadTimedOut
from providers.router import Router, price_of
from storage.database import Database, StorageError
from storage.jobs import JobStore, Limits, QuotaRefusal, next_reset

__all__ = [
    "Admission",
    "AlreadyFinished",
    "Delivery",
    "DeliveryError",
    "Engine",
    "EngineClosed",
    "EngineError",
    "EngineOptions",
    "Job",
    "JobNotFound",
    "NoProvider",
    "NotAllowed",
    "Progress",
    "QuotaExceeded",
    "QuotaLine",
    "QuotaStatus",
    "RenderedSong",
    "Requester",
    "Song",
]

log = logging.getLogger("acestep.engine")
T = TypeVar("T")

# A job is submitted to providers at most this many times (failover, lost tasks).
MAX_SUBMITS = 4
# Crash recovery resubmits a job found mid-submit once; a second time it fails.
MAX_RECOVERIES = 1
# How often a running job re-reads its cancel flag written by another process.
CANCEL_FLAG_CHECK_S = 5.0


# ---- errors the front-ends show --------------------------------------------------------


class EngineError(Exception):
    """A user-facing refusal; str() is the sentence to show."""


class QuotaExceeded(EngineError):
    def __init__(
        self,
        limit: str,
        remaining: float,
        limit_value: float,
        resets_at: datetime | None,
        message: str,
    ) -> None:
        self.limit = limit
        self.remaining = remaining
        self.limit_value = limit_value
        self.resets_at = resets_at
        super().__init__(message)


class JobNotFound(EngineError):
    pass


class NotAllowed(EngineError):
    pass


class AlreadyFinished(EngineError):
    pass


class EngineClosed(EngineError):
    pass


class NoProvider(EngineError):
    """No configured provider can serve this request (mode or duration)."""


class DeliveryError(Exception):
    """A front-end could not post a result. `permanent` = retrying will not help."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        self.permanent = permanent
        super().__init__(message)


# ---- data passed to front-ends ---------------------------------------------------------


@dataclass(frozen=True)
class Admission:
    job_id: str
    position: int
    seed: int
    ignored_options: list[str]
    provider: str | None = None  # the provider the job will most likely run on
    duplicate: bool = False  # the same platform event was admitted before: this is that job


@dataclass(frozen=True)
class Progress:
    state: str  # queued | submitting | running | uploading
    position: int | None = None
    progress: float | None = None
    message: str | None = None


@dataclass(frozen=True)
class QuotaLine:
    name: str
    label: str
    used: float
    limit: float | None  # None = unlimited
    unit: str

    @property
    def remaining(self) -> float | None:
        return None if self.limit is None else max(0.0, self.limit - self.used)


@dataclass(frozen=True)
class QuotaStatus:
    lines: list[QuotaLine]
    resets_at: datetime
    bypass: bool


@dataclass(frozen=True)
class RenderedSong:
    path: Path
    size: int
    bitrate: int | None
    duration: float
    format: str
    cover: bytes


@dataclass
class Song:
    """A finished song, its original file under DATA_DIR/audio, ready to be rendered."""

    job_id: str
    title: str
    original_path: Path
    duration: float
    seed: int
    provider: str
    tags: str | None
    lyrics: str | None
    prompt: str | None
    album: str = "acestep-bot"
    _cover: bytes | None = field(default=None, repr=False)

    async def cover(self) -> bytes:
        cover = self._cover
        if cover is None:
            cover = self._cover = await render.shared().cover(self.original_path)
        return cover

    async def render(self, byte_limit: int | None, fmt: str = "mp3") -> RenderedSong:
        """Encode for delivery to fit `byte_limit`, tagged, with cover: one task for the
        renderer's worker processes (bot/render.py). An original already in `fmt` that
        fits is sent as it is, only its tags replaced."""
        limit_tag = f"{byte_limit}" if byte_limit else "any"
        dest = self.original_path.with_name(f"{self.job_id}.{limit_tag}.{fmt}")
        tags = audio.SongTags(
            title=self.title,
            lyrics=self.lyrics,
            prompt=self.prompt,
            tags=self.tags,
            seed=self.seed,
            provider=self.provider,
            job_id=self.job_id,
            album=self.album,
        )
        cover, encoded = await render.shared().render(
            self.original_path,
            dest,
            fmt,
            byte_limit=byte_limit,
            tags=tags,
            duration=self.duration,  # as the check measured it, whatever a header claims
            cover=self._cover,
        )
        self._cover = cover
        return RenderedSong(
            path=encoded.path,
            size=encoded.size,
            bitrate=encoded.bitrate,
            duration=encoded.duration,
            format=encoded.format,
            cover=cover,
        )


class Delivery(Protocol):
    """How a platform shows progress and posts results; one per platform."""

    platform: str

    async def on_progress(self, job: Job, progress: Progress) -> None: ...

    async def deliver(self, job: Job, song: Song) -> None: ...

    async def on_failed(self, job: Job, message: str) -> None: ...


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


# ---- the engine ------------------------------------------------------------------------


class Engine:
    """Admits, schedules, runs and delivers songs; survives restarts."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        providers: Iterable[Provider],
        *,
        platforms: Iterable[str] | None = None,
        options: EngineOptions | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.router = Router(providers)
        self.options = options or EngineOptions()
        # Which platforms' jobs this engine runs: the bot runs chat jobs, the CLI its own.
        self.platforms = set(platforms) if platforms is not None else None
        self._deliveries: dict[str, Delivery] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancel_events: dict[str, asyncio.Event] = {}
        self._last_served: dict[str, int] = {}
        self._serve_counter = 0
        self._positions: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None
        self._closing = False
        self._started = False
        self._secrets = settings.secrets()
        self.metrics = Metrics()  # ops: counters/histograms for /metrics (bot/health.py)

    # ---- construction ----------------------------------------------------------------

    @classmethod
    async def open(cls, settings: Settings, providers: Iterable[Provider], **kwargs: Any) -> Engine:
        """Open the database under DATA_DIR (migrating it) and build an engine."""
        db = await Database.open(settings.db_path)
        return cls(settings, JobStore(db), providers, **kwargs)

    def register_delivery(self, delivery: Delivery) -> None:
        self._deliveries[delivery.platform] = delivery
        if self._started:
            asyncio.get_running_loop().create_task(self._resume_ready(delivery.platform))

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Resume unfinished jobs and start scheduling."""
        if self._started:
            return
        self._started = True
        self._closing = False
        await self._recover()
        self._scheduler = asyncio.create_task(self._schedule_loop(), name="engine-scheduler")

    async def stop(self, grace: float | None = None) -> None:
        """Stop admitting and scheduling; let running deliveries finish within the grace
        period, then stop every task. Job states stay as they are for the next start."""
        self._closing = True
        if self._scheduler:
            self._scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scheduler
            self._scheduler = None
        grace = self.options.stop_grace if grace is None else grace
        uploading = [t for jid, t in self._tasks.items() if t.get_name().startswith("deliver")]
        if uploading and grace > 0:
            await asyncio.wait(uploading, timeout=grace)
        await self.abort()
        self._started = False

    async def abort(self) -> None:
        """Stop every task at once, writing nothing more (what a crash would leave)."""
        tasks = list(self._tasks.values())
        if self._scheduler:
            self._scheduler.cancel()
            tasks.append(self._scheduler)
            self._scheduler = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        self._closing = True
        self._started = False

    async def close(self) -> None:
        """Stop, close providers' HTTP clients and the database."""
        await self.stop()
        for provider in self.router.providers.values():
            with contextlib.suppress(Exception):
                await provider.aclose()
        await self.store.db.close()

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
            raise EngineClosed(
                "The bot is restarting and not taking new songs right now; try again in a minute."
            )
        if not isinstance(request, GenerationRequest):
            raise InvalidRequest("request", type(request).__name__, "a GenerationRequest")
        capable = self.router.capable(request)
        if not capable:
            raise NoProvider(self._no_provider_text(request))
        seed = request.seed if request.seed >= 0 else secrets.randbelow(2_147_483_648)
        job = Job(
            id="",
            requester=requester,
            reply_target=reply_target,
            request=request,
            seed=seed,
            state="queued",
            source_key=source_key,
            reserved_usd=round(self.router.price_for(request) * request.duration, 6),
        )
        now = time.time()
        for _ in range(5):
            job.id = secrets.token_hex(4)
            try:
                existing = await self.store.admit(
                    job, self.limits(), bypass_quotas=self.is_admin(requester), now=now
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
            request.title(),
            request.duration,
            seed,
            requester.key,
        )
        likely = self.router.pick(request) or capable[0]
        position = await self._position_of(job.id)
        self._wake.set()
        return Admission(
            job_id=job.id,
            position=position,
            seed=seed,
            ignored_options=likely.capabilities.ignored_options(request),
            provider=likely.name,
        )

    async def _repeat_admission(self, job_id: str) -> Admission:
        job = await self.store.get(job_id)
        assert job is not None
        log.info(
            "job %s: its request arrived again (%s); not admitted twice", job_id, job.source_key
        )
        return Admission(
            job_id=job.id,
            position=await self._position_of(job.id),
            seed=job.seed,
            ignored_options=[],
            provider=job.provider,
            duplicate=True,
        )

    async def admitted_for(self, source_key: str) -> Job | None:
        """The job a platform event already created, if any."""
        return await self.store.by_source_key(source_key)

    def _no_provider_text(self, request: GenerationRequest) -> str:
        kinds = {"prompt": "a described song (/song)", "song": "a composed song (/compose)"}
        same_mode = [
            p for p in self.router.providers.values() if request.mode in p.capabilities.modes
        ]
        if not same_mode:
            return (
                f"This bot's music services cannot make {kinds[request.mode.value]}; "
                "try the other command."
            )
        longest = max(p.capabilities.max_duration for p in same_mode)
        shortest = min(p.capabilities.min_duration for p in same_mode)
        return (
            f"duration: {request.duration} is not available here; this bot's music "
            f"services make songs from {shortest} to {longest} seconds."
        )

    # ---- queries ---------------------------------------------------------------------

    async def get_job(self, job_id: str) -> Job | None:
        return await self.store.get(job_id.strip().lower())

    async def queue_for(self, requester: Requester) -> list[tuple[Job, int | None]]:
        jobs = await self.store.for_user(requester.key, ACTIVE_STATES)
        positions = await self._queue_positions()
        return [(job, positions.get(job.id)) for job in reversed(jobs)]

    async def history(self, requester: Requester, limit: int = 10) -> list[Job]:
        return await self.store.for_user(requester.key, ("delivered",), limit=limit)

    async def quota_status(self, requester: Requester) -> QuotaStatus:
        now = time.time()
        usage, eff = await self.store.usage(requester, self.limits(), now)
        bypass = self.is_admin(requester)
        lines = [
            QuotaLine(
                "user_jobs_per_day",
                messages.QUOTA_NAMES["user_jobs_per_day"],
                usage.user_jobs,
                None if bypass else eff.user_jobs_per_day,
                "songs",
            ),
            QuotaLine(
                "user_seconds_per_day",
                messages.QUOTA_NAMES["user_seconds_per_day"],
                usage.user_seconds,
                None if bypass else eff.user_seconds_per_day,
                "s",
            ),
            QuotaLine(
                "user_concurrent_jobs",
                messages.QUOTA_NAMES["user_concurrent_jobs"],
                usage.user_active,
                None if bypass else eff.user_concurrent_jobs,
                "songs",
            ),
        ]
        if requester.community_key:
            lines.append(
                QuotaLine(
                    "community_seconds_per_day",
                    messages.QUOTA_NAMES["community_seconds_per_day"],
                    usage.community_seconds,
                    None if bypass else eff.community_seconds_per_day,
                    "s",
                )
            )
        return QuotaStatus(lines=lines, resets_at=next_reset(now), bypass=bypass)

    async def update_reply_target(self, job_id: str, reply_target: dict[str, Any]) -> None:
        await self.store.update(job_id, reply_target=reply_target)

    async def get_limits(self, scope: str, subject: str) -> dict[str, float]:
        return await self.store.get_overrides(scope, subject)

    async def set_limit(self, scope: str, subject: str, key: str, value: float | None) -> None:
        await self.store.set_override(scope, subject, key, value)
        log.info("limit %s %s %s set to %s", scope, subject, key, value)

    async def get_community_setting(self, community: str, name: str) -> Any:
        return await self.store.get_community_setting(community, name)

    async def set_community_setting(self, community: str, name: str, value: Any) -> None:
        await self.store.set_community_setting(community, name, value)

    # ---- cancel ----------------------------------------------------------------------

    async def cancel(self, job_id: str, requester: Requester, *, is_admin: bool = False) -> Job:
        """Cancel a job of one's own (or any, for an admin). Refunds its quota."""
        job_id = job_id.strip().lower()
        job = await self.store.get(job_id)
        if job is None:
            raise JobNotFound(f"No song with id {job_id!r} was found.")
        if job.requester.key != requester.key and not (is_admin or self.is_admin(requester)):
            raise NotAllowed("You can only cancel your own songs.")
        if not job.active or job.state == "ready":
            raise AlreadyFinished(f"Song {job_id} is already {_state_word(job.state)}.")
        if await self.store.finish_unsuccessful(
            job_id, ("queued",), "cancelled", messages.CANCELLED
        ):
            log.info("job %s cancelled while queued by %s", job_id, requester.key)
            cancelled = await self.store.get(job_id)
            assert cancelled is not None
            await self._notify_failed(cancelled, messages.CANCELLED)
            self._wake.set()
            return cancelled
        # Submitting or running: the job's task stops it at the provider.
        await self.store.update(job_id, cancel_requested=True)
        event = self._cancel_events.get(job_id)
        if event:
            event.set()
        task = self._tasks.get(job_id)
        if task is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout=10)
        # Without a task here (another process runs it, or it is not resumed yet) the flag
        # stays set and whichever engine runs the job stops it at the provider.
        final = await self.store.get(job_id)
        assert final is not None
        if final.state in ("ready", "delivered"):
            raise AlreadyFinished(f"Song {job_id} finished before it could be cancelled.")
        return final

    # ---- scheduling ------------------------------------------------------------------

    def _handles(self, job: Job) -> bool:
        return self.platforms is None or job.requester.platform in self.platforms

    async def _queued(self) -> list[Job]:
        return [j for j in await self.store.in_states(("queued",)) if self._handles(j)]

    def _fair_order(self, queued: list[Job]) -> list[Job]:
        """Round robin between users, least recently served first; FIFO within a user."""
        per_user: OrderedDict[str, deque[Job]] = OrderedDict()
        for job in queued:  # queued is oldest first
            per_user.setdefault(job.requester.key, deque()).append(job)
        users = sorted(
            per_user, key=lambda u: (self._last_served.get(u, 0), per_user[u][0].created_at)
        )
        order: list[Job] = []
        while users:
            still = []
            for user in users:
                order.append(per_user[user].popleft())
                if per_user[user]:
                    still.append(user)
            users = still
        return order

    async def _queue_positions(self) -> dict[str, int]:
        order = self._fair_order(await self._queued())
        return {job.id: i + 1 for i, job in enumerate(order)}

    async def _position_of(self, job_id: str) -> int:
        return (await self._queue_positions()).get(job_id, 1)

    async def _schedule_loop(self) -> None:
        while not self._closing:
            self._wake.clear()
            try:
                await self._dispatch()
            except StorageError as exc:
                log.error("scheduler cannot read the database: %s", exc)
            except Exception:
                log.exception("scheduler error")
            timeout = self.options.scheduler_idle
            cooldown = self.router.next_cooldown_end()
            if cooldown is not None:
                timeout = min(timeout, cooldown + 0.01)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)

    async def _dispatch(self) -> None:
        """Start every queued job a provider has room for, fairly across users."""
        order = self._fair_order(await self._queued())
        for job in order:
            if self._closing:
                return
            if job.id in self._tasks:
                continue
            if job.cancel_requested:
                await self._fail(
                    job, ("queued",), messages.CANCELLED, "cancelled", state="cancelled"
                )
                continue
            provider = self.router.pick(job.request, exclude=job.tried_providers)
            if provider is None:
                await self._fail_if_unservable(job)
                continue
            self.router.acquire(provider)
            self._serve_counter += 1
            self._last_served[job.requester.key] = self._serve_counter
            self._spawn(job, self._run_job(job, provider), "run")
        # Positions come from the order just read: re-reading the queue here cost two more
        # full reads of it per dispatch (bench/engine.py), and counted jobs just started.
        await self._announce_positions(
            [j for j in order if j.state == "queued" and j.id not in self._tasks]
        )

    async def _fail_if_unservable(self, job: Job) -> None:
        """A job no provider can ever take now fails; one waiting for room stays queued."""
        left = [p for p in self.router.capable(job.request) if p.name not in job.tried_providers]
        if not left:
            await self._fail(
                job, ("queued",), job.error or messages.UNAVAILABLE, "no provider left to try"
            )
            return
        auth_down = all(
            self.router.state[p.name].last_error_kind == "auth" and not self.router.available(p)
            for p in left
        )
        if auth_down:
            await self._fail(
                job,
                ("queued",),
                messages.UNAVAILABLE,
                "every capable provider is cooling down after auth/billing errors",
            )

    async def _announce_positions(self, waiting: list[Job]) -> None:
        """Tell each waiting job (in fair order) its new queue position, if it changed."""
        positions = {job.id: i + 1 for i, job in enumerate(waiting)}
        changed = {jid: pos for jid, pos in positions.items() if self._positions.get(jid) != pos}
        self._positions = positions
        if not changed:
            return
        for job in waiting:
            if job.id in changed:
                await self._notify(job, Progress("queued", position=changed[job.id]))

    def _spawn(self, job: Job, coro: Any, kind: str) -> None:
        task = asyncio.create_task(coro, name=f"{kind}-{job.id}")
        self._tasks[job.id] = task

        def _done(t: asyncio.Task[None], job_id: str = job.id) -> None:
            if self._tasks.get(job_id) is t:
                del self._tasks[job_id]
                self._cancel_events.pop(job_id, None)
            self._wake.set()

        task.add_done_callback(_done)

    # ---- recovery --------------------------------------------------------------------

    async def _recover(self) -> None:
        jobs = [
            j
            for j in await self.store.in_states(("submitting", "running", "ready"))
            if self._handles(j)
        ]
        for job in jobs:
            if job.state == "submitting":
                # The submit may or may not have reached the provider: resubmit once.
                if job.recoveries >= MAX_RECOVERIES:
                    await self._fail(
                        job,
                        ("submitting",),
                        messages.FAILED_GENERIC,
                        "interrupted twice while submitting",
                    )
                    continue
                await self.store.transition(
                    job.id, ("submitting",), "queued", recoveries=job.recoveries + 1, provider=None
                )
                log.warning("job %s was interrupted while submitting; resubmitting once", job.id)
            elif job.state == "running":
                provider = self.router.get(job.provider or "")
                if provider is None or not job.handle:
                    await self._fail(
                        job,
                        ("running",),
                        messages.UNAVAILABLE,
                        f"provider {job.provider} is no longer configured",
                    )
                    continue
                self.router.acquire(provider)
                log.info("job %s resumes polling %s", job.id, provider.name)
                self._spawn(job, self._poll_job(job, provider, Handle.from_json(job.handle)), "run")
        for platform in self._deliveries:
            await self._resume_ready(platform)

    async def _resume_ready(self, platform: str) -> None:
        for job in await self.store.in_states(("ready",)):
            if (
                job.requester.platform == platform
                and self._handles(job)
                and job.id not in self._tasks
            ):
                self._spawn(job, self._deliver(job), "deliver")

    # ---- running one job -------------------------------------------------------------

    async def _run_job(self, job: Job, provider: Provider) -> None:
        released = False
        try:
            handle = await self._submit(job, provider)
            if handle is None:
                return
            await self._poll_job(job, provider, handle, acquired=True)
            released = True
        finally:
            if not released:
                self.router.release(provider)

    async def _submit(self, job: Job, provider: Provider) -> Handle | None:
        now = time.time()
        moved = await self.store.transition(
            job.id,
            ("queued",),
            "submitting",
            now,
            provider=provider.name,
            attempts=job.attempts + 1,
            started_at=job.started_at or now,
        )
        if not moved:
            return None
        job.attempts += 1
        job.state = "submitting"
        job.provider = provider.name
        job.started_at = job.started_at or now
        await self._notify(job, Progress("submitting"))
        try:
            handle = await provider.submit(job.request, job.seed)
        except Rejected as exc:
            self._log_provider_error(job, provider, exc)
            await self._fail(
                job, ("submitting",), messages.rejected(exc.message), f"rejected by {provider.name}"
            )
            return None
        except AuthError as exc:
            self._log_provider_error(job, provider, exc)
            self.router.cool_down(
                provider, self.settings.provider_cooldown_seconds, "auth", exc.message
            )
            await self._requeue(job, provider, exc, tried=True)
            return None
        except (Busy, Unavailable) as exc:
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
            return None
        except ProviderError as exc:
            self._log_provider_error(job, provider, exc)
            await self._fail(job, ("submitting",), messages.provider_failed(exc.message), str(exc))
            return None
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: unexpected error submitting to %s", job.id, provider.name)
            await self._fail(job, ("submitting",), messages.FAILED_GENERIC, "submit crashed")
            return None
        self.router.note_ok(provider)
        if not await self.store.transition(
            job.id, ("submitting",), "running", handle=handle.to_json()
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
                await provider.cancel(handle)
            return None
        job.state = "running"
        job.handle = handle.to_json()
        log.info("job %s accepted by %s", job.id, provider.name)
        return handle

    async def _requeue(
        self, job: Job, provider: Provider, exc: ProviderError, *, tried: bool
    ) -> None:
        """Back to the queue so the scheduler picks the next capable provider."""
        tried_list = job.tried_providers + ([provider.name] if tried else [])
        if job.attempts >= MAX_SUBMITS:
            await self._fail(
                job,
                ("submitting", "running"),
                messages.UNAVAILABLE,
                f"gave up after {job.attempts} submits",
            )
            return
        error = (
            messages.UNAVAILABLE
            if isinstance(exc, AuthError | Busy | Unavailable)
            else messages.provider_failed(exc.message)
        )
        await self.store.transition(
            job.id,
            ("submitting", "running"),
            "queued",
            provider=None,
            handle=None,
            tried_providers=tried_list,
            error=error,
        )
        self._wake.set()

    async def _poll_job(
        self, job: Job, provider: Provider, handle: Handle, *, acquired: bool = True
    ) -> None:
        """Poll until the provider finishes, then store the song and deliver it."""
        try:
            outcome = await self._poll_until_done(job, provider, handle)
        finally:
            if acquired:
                self.router.release(provider)
            self._wake.set()
        if outcome:
            fresh = await self.store.get(job.id)
            if fresh is not None and fresh.state == "ready":
                await self._deliver(fresh)

    async def _poll_until_done(self, job: Job, provider: Provider, handle: Handle) -> bool:
        """True when the job reached `ready`."""
        cancel = self._cancel_events.setdefault(job.id, asyncio.Event())
        base = provider.poll_interval()
        interval = base
        deadline = (job.started_at or time.time()) + self.settings.job_timeout_seconds
        last: Status | None = None
        next_flag_check = 0.0
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
                limit = messages.span(self.settings.job_timeout_seconds)
                await self._fail(
                    job,
                    ("running",),
                    messages.TIMED_OUT.format(limit=limit),
                    f"timed out at {provider.name}",
                )
                return False
            try:
                status = await provider.poll(handle)
            except TaskLost as exc:
                self._log_provider_error(job, provider, exc)
                await self._requeue(job, provider, exc, tried=False)
                return False
            except Rejected as exc:
                self._log_provider_error(job, provider, exc)
                await self._fail(
                    job,
                    ("running",),
                    messages.rejected(exc.message),
                    f"rejected by {provider.name}",
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
                return await self._finish(job, provider, status.result, deadline, cancel)
            if isinstance(status, Failed):
                await self._provider_failed(job, provider, status)
                return False
            if isinstance(status, Cancelled):
                await self._fail(
                    job,
                    ("running",),
                    messages.CANCELLED,
                    f"cancelled at {provider.name}",
                    state="cancelled",
                )
                return False
            if status != last:
                if isinstance(status, Queued):
                    await self._notify(
                        job,
                        Progress(
                            "running",
                            position=status.position,
                            message="waiting at the music service",
                        ),
                    )
                elif isinstance(status, Running):
                    await self._notify(
                        job, Progress("running", progress=status.progress, message=status.message)
                    )
                if type(status) is not type(last):
                    interval = base
                last = status
            else:
                cap = self.options.poll_max_interval
                if isinstance(status, Running):
                    # A queued job may wait long, so back off; a running song is done within
                    # a minute or so, and each second between polls is a second the user
                    # waits for it (backing off to 10 s made that 2.9 s median, 8 s at
                    # worst: bench/detect.py). fal's 1 s is what a job whose logs change
                    # already costs.
                    cap = min(cap, max(base, self.options.running_poll_max_interval))
                interval = min(cap, interval * self.options.poll_backoff)
            await self._sleep(cancel, interval)

    async def _sleep(self, cancel: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(cancel.wait(), timeout=seconds)

    async def _cancel_requested(self, job_id: str) -> bool:
        job = await self.store.get(job_id)
        return bool(job and job.cancel_requested)

    async def _cancel_at_provider(
        self, job: Job, provider: Provider, handle: Handle, *, quiet: bool = False
    ) -> None:
        try:
            accepted = await provider.cancel(handle)
        except ProviderError as exc:
            accepted = False
            self._log_provider_error(job, provider, exc, level=logging.WARNING)
        if quiet:
            return
        log.info(
            "job %s cancelled (provider %s %s)",
            job.id,
            provider.name,
            "stopped it" if accepted else "could not stop it",
        )
        await self._fail(
            job, ("running", "submitting"), messages.CANCELLED, "cancelled", state="cancelled"
        )

    async def _provider_failed(self, job: Job, provider: Provider, status: Failed) -> None:
        log.warning("job %s failed at %s: %s", job.id, provider.name, status.reason)
        self.metrics.provider_error(provider.name, "Rejected" if status.rejected else "Failed")
        if status.rejected:
            await self._fail(
                job, ("running",), messages.rejected(status.reason), f"rejected by {provider.name}"
            )
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
        await self._fail(
            job, ("running",), messages.provider_failed(status.reason), f"failed at {provider.name}"
        )

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
        expected = None if result.duration_chosen_by_model else float(job.duration)
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
                await self._fail(
                    job, ("running",), messages.CANCELLED, "cancelled", state="cancelled"
                )
                return False
            info = await render.shared().check(part, expected)
            path = self.settings.audio_dir / f"{job.id}.{info.format}"
            part.replace(path)
        except DownloadTimedOut as exc:
            log.warning("job %s: download from %s: %s", job.id, provider.name, exc.message)
            if time.time() >= deadline - 1:  # the job's own time ran out
                limit = messages.span(self.settings.job_timeout_seconds)
                await self._fail(
                    job, ("running",), messages.TIMED_OUT.format(limit=limit), "download timed out"
                )
            else:
                await self._provider_failed(job, provider, Failed(reason=exc.message))
            return False
        except (audio.AudioError, ProviderError) as exc:
            reason = exc.message if isinstance(exc, ProviderError) else str(exc)
            log.warning("job %s: result from %s unusable: %s", job.id, provider.name, reason)
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
            await self._fail(
                job, ("running",), messages.FAILED_GENERIC, "audio not stored", charged_usd=price
            )
            return False
        finally:
            part.unlink(missing_ok=True)
        meta = {
            "seed": result.seed if result.seed is not None else job.seed,
            # Provider text is untrusted too: it goes into captions, tags and logs.
            "tags": clean_text(result.tags, multiline=False) if result.tags else result.tags,
            "lyrics": clean_text(result.lyrics, multiline=True) if result.lyrics else result.lyrics,
            "duration": round(info.duration, 3),
            "format": info.format,
            "sample_rate": info.sample_rate,
            "channels": info.channels,
            "audio_file": path.name,
            "provider": provider.name,
            "title": job.request.title(),
            "provider_metadata": result.metadata,
        }
        moved = await self.store.finish_success(job.id, provider.name, price, meta)
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
        result = job.result or {}
        req = job.request
        return Song(
            job_id=job.id,
            title=result.get("title") or req.title(),
            original_path=self.settings.audio_dir / str(result.get("audio_file")),
            duration=float(result.get("duration") or req.duration),
            seed=int(result["seed"]) if result.get("seed") is not None else job.seed,
            provider=str(result.get("provider") or job.provider),
            tags=result.get("tags") or (req.tags or None),
            lyrics=result.get("lyrics") or (req.lyrics or None),
            prompt=req.prompt or None,
        )

    async def _deliver(self, job: Job) -> None:
        delivery = self._deliveries.get(job.requester.platform)
        if delivery is None:
            return  # stays ready until that front-end is running
        task = asyncio.current_task()
        if task is not None and task is self._tasks.get(job.id):
            # Called inline from the run task: rename so stop() lets the upload finish.
            task.set_name(f"deliver-{job.id}")
        song = self.song_for(job)
        error = "delivery failed"
        for attempt in range(self.options.delivery_attempts):
            try:
                await self._notify(job, Progress("uploading"))
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
        await self._fail(job, ("ready",), messages.DELIVERY_FAILED, "delivery failed")

    # ---- shared helpers --------------------------------------------------------------

    async def _fail(
        self,
        job: Job,
        from_states: tuple[str, ...],
        message: str,
        why: str,
        *,
        state: str = "failed",
        charged_usd: float | None = None,
    ) -> None:
        """Finish unsuccessfully with a refund, tell the user, log for the operator."""
        moved = await self.store.finish_unsuccessful(
            job.id, from_states, state, message, charged_usd=charged_usd
        )
        if not moved:
            return
        log.info("job %s %s (%s); quota refunded", job.id, state, self.redact(why))
        job.state = state
        job.error = message
        await self._notify_failed(job, message)
        self._wake.set()

    async def _notify(self, job: Job, progress: Progress) -> None:
        delivery = self._deliveries.get(job.requester.platform)
        if delivery is None:
            return
        try:
            await delivery.on_progress(job, progress)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("job %s: progress update failed", job.id, exc_info=True)

    async def _notify_failed(self, job: Job, message: str) -> None:
        delivery = self._deliveries.get(job.requester.platform)
        if delivery is None:
            return
        try:
            await delivery.on_failed(job, message)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("job %s: failure notice could not be posted", job.id, exc_info=True)

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

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text


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


def _state_word(state: str) -> str:
    return {
        "delivered": "finished",
        "failed": "failed",
        "cancelled": "cancelled",
        "ready": "finished and being posted",
    }.get(state, state)
