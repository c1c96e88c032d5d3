"""Which queued job runs next: round robin between users (least recently served first,
FIFO within a user), within each provider's concurrency limit."""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

from bot.engine.contract import Phase, Progress
from bot.engine.notify import Notifier
from bot.engine.runner import EngineOptions, JobRunner
from bot.engine.tasks import JobTasks
from bot.models import FailureKind, Job, JobState
from bot.requests import GenerationRequest
from bot.timing import wait_event
from providers.base import Provider
from providers.router import Router
from storage.database import StorageError
from storage.store import Store

log = logging.getLogger("acestep.engine")


def pick_for(
    router: Router, request: GenerationRequest, exclude: Iterable[str] = ()
) -> Provider | None:
    """The provider to start a request on now: the one it prefers (a user's or
    community's default) when that one can take it now, else the configured order."""
    skip = set(exclude)
    preferred = router.get(request.provider or "")
    if (
        preferred is not None
        and preferred.name not in skip
        and preferred.capabilities.can_serve(request)
        and router.available(preferred)
        and router.has_capacity(preferred)
    ):
        return preferred
    return router.pick(request, exclude=skip)


class Scheduler:
    """Starts queued jobs fairly; tells waiting jobs their queue position."""

    def __init__(
        self,
        store: Store,
        router: Router,
        runner: JobRunner,
        tasks: JobTasks,
        notifier: Notifier,
        options: EngineOptions,
        handles: Callable[[Job], bool],
    ) -> None:
        self.store = store
        self.router = router
        self.runner = runner
        self.tasks = tasks
        self.notifier = notifier
        self.options = options
        self.handles = handles  # whether this engine runs a job (its platform)
        self.closing = False
        self._last_served: dict[str, int] = {}
        self._serve_counter = 0
        self._positions: dict[str, int] = {}
        self.owner: str | None = None  # this process (bot/engine/leases.py)

    async def loop(self) -> None:
        while not self.closing:
            self.tasks.wake.clear()
            try:
                await self.dispatch()
            except StorageError as exc:
                log.error("scheduler cannot read the database: %s", exc)
            except Exception:
                log.exception("scheduler error")
            timeout = self.options.scheduler_idle
            cooldown = self.router.next_cooldown_end()
            if cooldown is not None:
                timeout = min(timeout, cooldown + 0.01)
            await wait_event(self.tasks.wake, timeout)

    async def queued(self) -> list[Job]:
        return [j for j in await self.store.in_states((JobState.QUEUED,)) if self.handles(j)]

    def fair_order(self, queued: list[Job]) -> list[Job]:
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

    async def positions(self) -> dict[str, int]:
        order = self.fair_order(await self.queued())
        return {job.id: i + 1 for i, job in enumerate(order)}

    async def dispatch(self) -> None:
        """Start every queued job a provider has room for, fairly across users."""
        order = self.fair_order(await self.queued())
        if order and self.owner is not None and self.store.shared:
            # Provider limits are global: count what other processes have in flight (one
            # read; start_run checks the limit again in its transaction).
            elsewhere = await self.store.in_flight(exclude_owner=self.owner)
            for name, state in self.router.state.items():
                state.elsewhere = elsewhere.get(name, 0)
        for job in order:
            if self.closing:
                return
            if self.tasks.running(job.id):
                continue
            if job.cancel_requested:
                await self.runner.fail(
                    job,
                    (JobState.QUEUED,),
                    FailureKind.CANCELLED,
                    "cancelled",
                    state=JobState.CANCELLED,
                )
                continue
            provider = pick_for(self.router, job.request, job.tried_providers)
            if provider is None:
                await self._fail_if_unservable(job)
                continue
            self.router.acquire(provider)
            self._serve_counter += 1
            self._last_served[job.requester.key] = self._serve_counter
            self.tasks.spawn(job.id, self.runner.run(job, provider), "run")
        # Positions come from the order just read: re-reading the queue here cost two more
        # full reads of it per dispatch (bench/engine.py), and counted jobs just started.
        await self._announce_positions(
            [j for j in order if j.state == JobState.QUEUED and not self.tasks.running(j.id)]
        )

    async def _fail_if_unservable(self, job: Job) -> None:
        """A job no provider can ever take now fails; one waiting for room stays queued."""
        left = [p for p in self.router.capable(job.request) if p.name not in job.tried_providers]
        if not left:
            await self.runner.fail(
                job,
                (JobState.QUEUED,),
                job.failure or FailureKind.UNAVAILABLE,
                f"no provider left to try (last: {job.error or 'none'})",
            )
            return
        auth_down = all(
            self.router.state[p.name].last_error_kind == "auth" and not self.router.available(p)
            for p in left
        )
        if auth_down:
            await self.runner.fail(
                job,
                (JobState.QUEUED,),
                FailureKind.UNAVAILABLE,
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
                await self.notifier.progress(job, Progress(Phase.WAITING, position=changed[job.id]))
