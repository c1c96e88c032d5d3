"""The use-cases of the chat bot, written once for every platform: make a song, press a
job button, cancel, and the queue, quota, history, limits and help answers.

A platform hands each incoming command or button press over as a `Place` (who asked,
where, and the few ways to answer there); the rules (who may cancel, which buttons act
where, what a community admin may change) and every word come from here and `replies`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from bot.chat import replies
from bot.chat.delivery import ChatDelivery
from bot.chat.markup import Span
from bot.chat.replies import Action, Reply, StatusView
from bot.engine.errors import EngineError
from bot.engine.facade import Engine
from bot.models import Job, Requester
from bot.requests import GenerationRequest, InvalidRequest
from storage.jobs import COMMUNITY_KEYS

log = logging.getLogger("acestep.chat")

# Community settings: the channels the bot answers in (an empty list = all of them).
CHANNELS_SETTING = "channels"
# What a community admin may set a community limit to when the operator set none.
COMMUNITY_LIMIT_CEILING = 1_000_000


class Place(Protocol):
    """One incoming command or button press, as the shared layer sees it."""

    requester: Requester
    source_key: str | None  # the platform event, so one event never makes two jobs
    channel_id: str | None  # where it was asked (a channel, a topic), for channel rules
    admins: str  # who administers a community here, e.g. "this group's administrators"

    def reply_target(self) -> dict[str, Any]:
        """Where a job asked here posts its status and song (stored with the job)."""

    async def can_post_songs(self) -> bool:
        """Whether the bot may post files here (a missing permission says no)."""

    async def is_community_admin(self) -> bool:
        """Whether the asker administers the community this came from."""

    async def open_status(self, view: StatusView) -> dict[str, Any]:
        """Put up the job's status message; returns reply-target fields to store."""

    async def retract_status(self, reply: Reply) -> None:
        """Admission was refused after open_status: replace the status with `reply`."""

    async def drop_status(self) -> None:
        """The same event was admitted before: remove the new status message."""

    async def answer(self, reply: Reply) -> None:
        """A short answer only the asker sees (or a reply to them)."""

    async def answer_long(self, reply: Reply) -> None:
        """A long text only the asker should see (lyrics)."""

    async def working(self, note: str) -> None:
        """The answer will take a few seconds (a deferral, a "Cancelling…" popup)."""


@dataclass(frozen=True)
class LimitChange:
    key: str
    value: float | None  # None = back to the operator's default


class Conversation:
    """The chat use-cases over the engine, for one platform's delivery."""

    def __init__(self, engine: Engine, delivery: ChatDelivery) -> None:
        self.engine = engine
        self.delivery = delivery

    async def run(self, place: Place, what: str, step: Callable[[], Awaitable[None]]) -> None:
        """Run a use-case; a refusal is answered to the asker, anything else logged once."""
        try:
            await step()
        except (InvalidRequest, EngineError) as exc:
            await place.answer(replies.error_reply(exc))
        except Exception as exc:
            log.exception(
                "%s failed for %s (%s): %s",
                what,
                place.requester.key,
                place.source_key,
                type(exc).__name__,
            )
            await place.answer(replies.error_reply(exc))

    # ---- songs -----------------------------------------------------------------------

    async def song(self, place: Place, request: GenerationRequest) -> None:
        """Admit a song asked here and put up its status message."""
        if place.source_key and await self.engine.admitted_for(place.source_key) is not None:
            log.info("%s was already admitted; ignoring the repeat", place.source_key)
            return
        refusal = await self._refusal(place)
        if refusal is not None:
            await place.answer(refusal)
            return
        slot = await place.open_status(replies.provisional_view(request.title()))
        target = {**place.reply_target(), **slot}
        try:
            admission = await self.engine.submit(
                request, place.requester, target, source_key=place.source_key
            )
        except (InvalidRequest, EngineError) as exc:
            await place.retract_status(replies.error_reply(exc))
            return
        except Exception:
            log.exception("admission failed for %s (%s)", place.requester.key, place.source_key)
            await place.retract_status(replies.error_reply(RuntimeError()))
            return
        if admission.duplicate:
            await place.drop_status()
            return
        job = await self.engine.get_job(admission.job_id)
        if job is not None:
            await self.delivery.show_admitted(job, admission.position)

    async def _refusal(self, place: Place) -> Reply | None:
        """Why songs cannot be made here, or None."""
        community = place.requester.community_key
        if community and not self.engine.is_admin(place.requester):
            allowed = await self.engine.get_community_setting(community, CHANNELS_SETTING)
            if isinstance(allowed, list) and allowed and place.channel_id not in allowed:
                return replies.only_in_channels(allowed)
        if not await place.can_post_songs():
            return Reply.say(replies.CANNOT_ATTACH)
        return None

    # ---- buttons ---------------------------------------------------------------------

    async def press(self, place: Place, payload: str) -> None:
        """A job button was pressed; its payload is untrusted."""
        parsed = replies.parse_payload(payload)
        job = await self.engine.get_job(parsed[1]) if parsed else None
        if parsed is None or job is None:
            await place.answer(Reply.say(replies.NOT_KNOWN))
            return
        action = parsed[0]
        if action is Action.CANCEL:
            await self._cancel(place, job)
            return
        if not self._same_place(job, place.requester):
            # A button works only where its song was made (or for its own requester): a
            # forged payload must not replay someone's private prompt elsewhere.
            await place.answer(Reply.say(replies.NOT_HERE))
            return
        if action is Action.LYRICS:
            await place.answer_long(replies.lyrics_reply(job))
            return
        made_seed = job.result.seed if job.result else job.seed
        seed = -1 if action is Action.NEW else made_seed
        await self.song(place, job.request.with_seed(seed))

    @staticmethod
    def _same_place(job: Job, presser: Requester) -> bool:
        if job.requester.key == presser.key:
            return True
        community = job.requester.community_key
        return community is not None and community == presser.community_key

    # ---- cancel ----------------------------------------------------------------------

    async def cancel(self, place: Place, job_id: str | None) -> None:
        """`/cancel [job]`: the given job, or the asker's latest one in progress."""
        if job_id:
            job = await self.engine.get_job(job_id)
            if job is None:
                await place.answer(Reply.say(replies.no_such_job(job_id)))
                return
        else:
            job = await self.engine.latest_active(place.requester)
            if job is None:
                await place.answer(Reply.say(replies.NOTHING_TO_CANCEL))
                return
        await self._cancel(place, job)

    async def _cancel(self, place: Place, job: Job) -> None:
        is_admin = await self._may_cancel_any(place, job)
        if job.requester.key != place.requester.key and not is_admin:
            await place.answer(Reply.say(replies.NOT_YOURS))
            return
        # Stopping a running job waits for the provider: longer than platforms wait.
        await place.working("Cancelling\N{HORIZONTAL ELLIPSIS}")
        cancelled = await self.engine.cancel(job.id, place.requester, is_admin=is_admin)
        await place.answer(replies.cancelled_reply(cancelled))

    async def _may_cancel_any(self, place: Place, job: Job) -> bool:
        """Bot admins cancel any job; community admins the jobs of their community."""
        if self.engine.is_admin(place.requester):
            return True
        community = job.requester.community_key
        if community is None or community != place.requester.community_key:
            return False
        if job.requester.key == place.requester.key:
            return False
        return await place.is_community_admin()

    # ---- lists -----------------------------------------------------------------------

    async def queue(self, place: Place) -> None:
        await place.answer(replies.queue_reply(await self.engine.queue_for(place.requester)))

    async def quota(self, place: Place) -> None:
        await place.answer(replies.quota_reply(await self.engine.quota_status(place.requester)))

    async def history(self, place: Place) -> None:
        jobs = await self.engine.history(place.requester, limit=10)
        await place.answer(replies.history_reply(jobs))

    async def limits(
        self,
        place: Place,
        changes: list[LimitChange],
        channels: list[str] | None = None,
        *,
        has_channels: bool = False,
    ) -> None:
        """Show or change the community's limits (and its channels, where the platform
        has them). Admins may only lower a limit below the operator's default; the
        operator raises limits with `acestep-bot quota set`."""
        community = place.requester.community_key
        if community is None:
            await place.answer(Reply.say(replies.LIMITS_COMMUNITY_ONLY))
            return
        bot_admin = self.engine.is_admin(place.requester)
        if not (bot_admin or await place.is_community_admin()):
            await place.answer(Reply.say(replies.admins_only(place.admins)))
            return
        done: list[tuple[Span, ...]] = []
        for change in changes:
            value = self._limit_value(change, bot_admin)
            await self.engine.set_limit("community", community, change.key, value)
            done.append(replies.limit_changed(change.key, value))
        if channels is not None:
            await self.engine.set_community_setting(community, CHANNELS_SETTING, channels)
            done.append(replies.channels_changed(channels))
        overrides = await self.engine.get_limits("community", community)
        shown: list[str] | None = None
        if has_channels:
            allowed = await self.engine.get_community_setting(community, CHANNELS_SETTING)
            shown = [str(c) for c in allowed] if isinstance(allowed, list) else []
        await place.answer(replies.limits_reply(done, overrides, shown))

    def _limit_value(self, change: LimitChange, bot_admin: bool) -> float | None:
        if change.key not in COMMUNITY_KEYS:
            raise InvalidRequest("limit", change.key, "one of " + ", ".join(COMMUNITY_KEYS))
        if change.value is None:
            return None
        default = self.engine.limits().community_seconds_per_day
        ceiling = COMMUNITY_LIMIT_CEILING if bot_admin or default is None else default
        value = change.value
        if not (math.isfinite(value) and value.is_integer() and 0 <= value <= ceiling):
            raise InvalidRequest(
                change.key,
                value,
                f"a whole number of seconds from 0 to {int(ceiling)}"
                + ("" if bot_admin else " (the operator's default; only the operator raises it)"),
            )
        return float(value)

    async def help(self, place: Place, style: replies.HelpStyle) -> None:
        await place.answer(replies.help_reply(style))
