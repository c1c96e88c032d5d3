"""The engine's `Delivery` for one chat platform, written once: status updates through
the status board, the finished song as a card, failures as one short public notice.
The platform supplies an `Outlet`, which only renders the models and sends them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, Protocol

from bot import messages
from bot.chat import replies
from bot.chat.replies import SongCard, StatusView
from bot.chat.status_board import StatusBoard
from bot.engine.contract import Failure, Phase, Progress, RenderedSong, Song
from bot.engine.facade import Engine
from bot.models import Job

log = logging.getLogger("acestep.chat")


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

    def note_for(self, job: Job) -> str | None:
        """The line under the status: options the serving provider will ignore."""
        provider = self.engine.provider_for(job)
        ignored = provider.capabilities.ignored_options(job.request) if provider else []
        return messages.ignored_options(provider.name, ignored) if provider and ignored else None

    async def show_admitted(self, job: Job, position: int) -> None:
        view = replies.status_view(
            job.id, job.title, Progress(Phase.WAITING, position=position), note=self.note_for(job)
        )
        await self.board.show_now(job.reply_target, view)

    # ---- Delivery ----

    async def on_progress(self, job: Job, progress: Progress) -> None:
        await self.outlet.ready()
        if progress.phase is not Phase.WAITING:
            self.outlet.working(job.reply_target, job.id, True)
        view = replies.status_view(job.id, job.title, progress, note=self.note_for(job))
        self.board.show(job.reply_target, view)

    async def deliver(self, job: Job, song: Song) -> None:
        await self.outlet.ready()
        target = job.reply_target
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
        self._spawn(self._after_post(job, kept))

    async def _after_post(self, job: Job, kept: dict[str, Any]) -> None:
        await self.board.forget(job.id)
        try:
            if await self.outlet.remove_status(job.reply_target):
                return
        except Exception:
            log.info("job %s: status message not removed", job.id, exc_info=True)
        await self.board.finish(job.reply_target, replies.posted_view(job, kept.get("result_url")))

    async def on_failed(self, job: Job, failure: Failure) -> None:
        await self.outlet.ready()
        self.outlet.working(job.reply_target, job.id, False)
        view = replies.failure_view(job, failure)
        if not await self.board.finish(job.reply_target, view):
            await self.outlet.post_notice(job.reply_target, view)

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
