"""The engine's `Delivery` for one chat platform, written once: status updates through
the status board, the finished song as a card, failures as one short public notice.
The platform supplies an `Outlet`, which only renders the models and sends them."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from bot import messages
from bot.chat import replies
from bot.chat.replies import SongCard, StatusView
from bot.chat.status_board import StatusBoard
from bot.engine.contract import Failure, Phase, Progress, RenderedSong, Song
from bot.engine.facade import Engine
from bot.models import Job

log = logging.getLogger("acestep.chat")

# Posts a job's status message; returns the reply-target fields that name it.
OpenStatus = Callable[[StatusView], Awaitable[dict[str, Any]]]


class Outlet(Protocol):
    """What a platform does with the shared models; every call reads the job's stored
    reply target, so it works after a restart."""

    platform: str

    async def ready(self) -> None:
        """Wait until the platform can send (raise DeliveryError if it cannot)."""

    def upload_limit(self, target: dict[str, Any]) -> int:
        """Bytes a posted file may have here."""

    async def edit_status(self, target: dict[str, Any], view: StatusView) -> bool:
        """Show `view` in the job's status message; False when that message is gone."""

    async def remove_status(self, target: dict[str, Any]) -> bool:
        """Delete the status message (the song is posted); False if it cannot."""

    async def post_song(
        self, target: dict[str, Any], card: SongCard, song: RenderedSong
    ) -> dict[str, Any]:
        """Post the song; returns reply-target fields to keep (its link). Raises
        DeliveryError when the platform does not take it."""

    async def post_notice(self, target: dict[str, Any], view: StatusView) -> None:
        """Post a final view as a new message (its status message is gone)."""

    def working(self, target: dict[str, Any], job_id: str, active: bool) -> None:
        """A job started or stopped working (a platform may show a typing indicator)."""

    def bot_name(self) -> str | None:
        """The bot's own name on the platform (the album of its songs), once known."""

    async def remove_song(self, target: dict[str, Any]) -> bool:
        """Delete the posted song's message; False when it could not be deleted."""


class ChatDelivery:
    """Delivery for one platform, on top of its Outlet."""

    def __init__(self, engine: Engine, outlet: Outlet, *, edit_interval: float) -> None:
        self.engine = engine
        self.outlet = outlet
        self.platform = outlet.platform
        self.board = StatusBoard(outlet.edit_status, edit_interval)
        self._background: set[asyncio.Task[Any]] = set()
        # Status messages posted after their job was read by the engine: the job object
        # it hands back may not have them yet (they are stored as well).
        self._attached: dict[str, dict[str, Any]] = {}
        self._reread: set[str] = set()  # jobs whose reply target on_progress re-read

    def note_for(self, job: Job) -> str | None:
        """The line under the status: options the serving provider will ignore."""
        provider = self.engine.provider_for(job)
        ignored = provider.capabilities.ignored_options(job.request) if provider else []
        return messages.ignored_options(provider.name, ignored) if provider and ignored else None

    def _admitted_view(self, job: Job, position: int) -> StatusView:
        return replies.status_view(
            job.id, job.title, Progress(Phase.WAITING, position=position), note=self.note_for(job)
        )

    async def show_admitted(self, job: Job, position: int) -> None:
        await self.board.show_now(job.reply_target, self._admitted_view(job, position))

    def post_status_soon(
        self,
        job: Job,
        open_status: Callable[[StatusView], Awaitable[dict[str, Any]]],
        position: int,
    ) -> None:
        """Post the status message of a job already admitted, in the background."""
        self._spawn(self._post_status(job, open_status, position))

    async def _post_status(
        self,
        job: Job,
        open_status: Callable[[StatusView], Awaitable[dict[str, Any]]],
        position: int,
    ) -> None:
        try:
            fields = await open_status(self._admitted_view(job, position))
        except Exception:
            log.warning("job %s: its status message could not be posted", job.id, exc_info=True)
            return
        if not fields:
            return
        self._attached[job.id] = fields
        try:
            await self.engine.update_reply_target(job.id, **fields)
        except Exception:
            log.warning("job %s: could not store its status message", job.id, exc_info=True)
        if self.board.is_finished(job.id):
            # The song (or its failure) was posted while this was on its way.
            self._attached.pop(job.id, None)
            await self.outlet.remove_status(self._target(job, fields))

    async def _stored(self, job: Job) -> Job:
        """The job with its reply target as stored now. With `--role chat` and `--role
        worker` the status message is posted (and stored) by another process, maybe
        after this one read the job: read it again before the song or failure is shown."""
        try:
            stored = await self.engine.get_job(job.id)
        except Exception:
            log.info("job %s: could not re-read its reply target", job.id, exc_info=True)
            return job
        if stored is None or stored.reply_target == job.reply_target:
            return job
        return dataclasses.replace(job, reply_target={**job.reply_target, **stored.reply_target})

    def _target(self, job: Job, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        attached = self._attached.get(job.id)
        if not attached and not extra:
            return job.reply_target
        return {**job.reply_target, **(attached or {}), **(extra or {})}

    # ---- Delivery ----

    async def on_progress(self, job: Job, progress: Progress) -> None:
        await self.outlet.ready()
        if job.id not in self._attached and job.id not in self._reread:
            # Once per job: a status message another process posted (see _stored).
            job = await self._stored(job)
            self._attached.setdefault(job.id, {}).update(job.reply_target)
            self._reread.add(job.id)
        target = self._target(job)
        if progress.phase is not Phase.WAITING:
            self.outlet.working(target, job.id, True)
        view = replies.status_view(job.id, job.title, progress, note=self.note_for(job))
        self.board.show(target, view)

    async def deliver(self, job: Job, song: Song) -> None:
        await self.outlet.ready()
        job = await self._stored(job)
        target = self._target(job)
        limit = self.outlet.upload_limit(target)
        song.album = self.outlet.bot_name() or song.album
        try:
            rendered = await song.render(max(limit - replies.UPLOAD_MARGIN, limit // 2))
            card = replies.song_card(
                job,
                title=song.title,
                duration=rendered.duration or song.duration,
                seed=song.seed,
                provider=song.provider,
                seed_honoured=song.seed_honoured,
            )
            kept = await self.outlet.post_song(target, card, rendered)
        finally:
            self.outlet.working(target, job.id, False)
        # Posted: nothing below may raise, or the engine would retry and post it twice.
        try:
            if kept:
                await self.engine.update_reply_target(job.id, **kept)
        except Exception:
            log.warning(
                "job %s: could not store the link to the posted song", job.id, exc_info=True
            )
        # Return now so the engine records it delivered at once (a delivery cut short
        # after this point would be posted twice); the status goes in the background.
        self._spawn(self._after_post(job, target, kept))

    async def _after_post(self, job: Job, target: dict[str, Any], kept: dict[str, Any]) -> None:
        await self.board.forget(job.id)
        target = self._target(job, target)
        self._attached.pop(job.id, None)
        self._reread.discard(job.id)
        try:
            if await self.outlet.remove_status(target):
                return
        except Exception:
            log.info("job %s: status message not removed", job.id, exc_info=True)
        await self.board.finish(target, replies.posted_view(job, kept.get("result_url")))

    async def on_failed(self, job: Job, failure: Failure) -> None:
        await self.outlet.ready()
        job = await self._stored(job)
        target = self._target(job)
        self.outlet.working(target, job.id, False)
        view = replies.failure_view(job, failure)
        shown = await self.board.finish(target, view)
        self._attached.pop(job.id, None)
        self._reread.discard(job.id)
        if not shown:
            await self.outlet.post_notice(target, view)

    # ---- lifetime ----

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self, grace: float = 5.0) -> None:
        """Let the short after-post work land, then drop pending status edits."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=grace)
        await self.board.close()
