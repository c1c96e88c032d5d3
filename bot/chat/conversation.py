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

from bot import sources, titles
from bot.chat import defaults, replies
from bot.chat.delivery import ChatDelivery
from bot.chat.markup import Span
from bot.chat.replies import Action, Reply, StatusView
from bot.engine.errors import EngineError
from bot.engine.facade import Engine
from bot.models import Job, JobState, Requester
from bot.moderation import MAX_PHRASE_CHARS, normalize
from bot.requests import (
    MAX_LYRICS_CHARS,
    MAX_TAGS_CHARS,
    GenerationRequest,
    InvalidRequest,
    Mode,
    SourceAudio,
)
from bot.sources import SourceRefused
from storage.community import MAX_BANNED, BanListFull
from storage.jobs import COMMUNITY_KEYS

log = logging.getLogger("acestep.chat")

# Community settings: the channels the bot answers in (an empty list = all of them;
# Telegram: forum topics, "general" for a forum's General topic), their names where the
# platform cannot show a channel by id, and whether songs are made at all.
CHANNELS_SETTING = "channels"
CHANNEL_NAMES_SETTING = "channel_names"
SONGS_SETTING = "songs"
# What a community admin may set a community limit to when the operator set none.
COMMUNITY_LIMIT_CEILING = 1_000_000


class Place(Protocol):
    """One incoming command or button press, as the shared layer sees it."""

    requester: Requester
    source_key: str | None  # the platform event, so one event never makes two jobs
    channel_id: str | None  # where it was asked (a channel, a topic), for channel rules
    channel_name: str  # its name where the platform cannot show a channel by id, or ""
    admins: str  # who administers a community here, e.g. "this group's administrators"
    settings_usage: str  # how /settings is typed here
    # True where the status message must exist before admission (Discord answers an
    # interaction within 3 s by deferring: that deferral is the status message). False
    # where it is posted after admission, so admitting never waits for a busy chat.
    status_first: bool

    def reply_target(self) -> dict[str, Any]:
        """Where a job asked here posts its status and song (stored with the job)."""

    async def can_post_songs(self) -> bool:
        """Whether the bot may post files here (a missing permission says no)."""

    async def is_community_admin(self) -> bool:
        """Whether the asker administers the community this came from."""

    async def open_status(self, view: StatusView) -> dict[str, Any]:
        """Put up the job's status message; returns reply-target fields to store."""

    async def retract_status(self, reply: Reply, view: StatusView) -> None:
        """Admission was refused: answer `reply` (in place of the status message where
        one was opened; `view` is what it would have shown)."""

    async def drop_status(self) -> None:
        """The same event was admitted before: remove the new status message."""

    async def answer(self, reply: Reply) -> None:
        """A short answer only the asker sees (or a reply to them)."""

    async def answer_long(self, reply: Reply) -> None:
        """A long text only the asker should see (lyrics)."""

    async def working(self, note: str) -> None:
        """The answer will take a few seconds (a deferral, a "Cancelling…" popup)."""

    async def answer_choice(self, reply: Reply) -> None:
        """A question for the asker with buttons to answer it (a new message, only to
        them where the platform can)."""

    async def answer_panel(self, reply: Reply) -> None:
        """An answer with buttons (the /settings quick picks); when a press of one of
        them asked, it replaces the message pressed."""

    async def offer_compose(self, fields: dict[str, Any]) -> bool:
        """Let the asker edit a song-mode request before it is made (Discord: the
        /compose form, filled in); False where the platform has no such form."""

    async def offer_form(self, form: replies.EditForm) -> bool:
        """Open the form of an edit button (Discord: a modal); False where the platform
        has no forms (then the asker is given the command to copy)."""

    @property
    def form_how(self) -> str:
        """How the command of a form is sent here (where there are no forms)."""


_FORM_NUMBERS: dict[str, tuple[str, type]] = {
    "after": ("extend_after", int),
    "before": ("extend_before", int),
    "start": ("repaint_start", float),
    "end": ("repaint_end", float),
    "strength": ("strength", float),
    "duration": ("duration", int),
    "seed": ("seed", int),
}


def form_fields(task: str, values: dict[str, str]) -> dict[str, Any]:
    """An edit form's text values -> request fields (InvalidRequest naming a value that
    is not the number it must be); empty numbers are left out."""
    out: dict[str, Any] = {}
    for name, raw in values.items():
        text = raw.strip()
        if name in _FORM_NUMBERS:
            if not text:
                continue
            field_name, kind = _FORM_NUMBERS[name]
            try:
                out[field_name] = kind(text)
            except ValueError:
                what = "a whole number" if kind is int else "a number"
                raise InvalidRequest(name, raw, what) from None
        elif name in ("tags", "prompt", "lyrics"):
            out[name] = raw
    return out


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

    async def make(self, place: Place, fields: dict[str, Any]) -> None:
        """A request from a command or a button: the asker's and the community's
        defaults filled in (the one place they are applied), validated, admitted."""
        found = await self.defaults_for(place.requester)
        providers = list(self.engine.router.providers)
        request = GenerationRequest.build(**defaults.apply(fields, found, providers))
        await self.song(place, request)

    async def defaults_for(self, requester: Requester) -> defaults.Defaults:
        user = await self.engine.song_defaults("user", requester.key)
        community = requester.community_key
        shared = await self.engine.song_defaults("community", community) if community else {}
        return defaults.Defaults(user, shared)

    async def song(self, place: Place, request: GenerationRequest) -> None:
        """Admit a song asked here and put up its status message."""
        if place.source_key and await self.engine.admitted_for(place.source_key) is not None:
            log.info("%s was already admitted; ignoring the repeat", place.source_key)
            return
        refusal = await self._refusal(place)
        if refusal is not None:
            await place.answer(refusal)
            return
        # Before the status message, so a refused request is never echoed in public.
        await self.engine.check_banned(request, place.requester)
        provisional = replies.provisional_view(titles.song_title(request))
        slot = await place.open_status(provisional) if place.status_first else {}
        target = {**place.reply_target(), **slot}
        try:
            admission = await self.engine.submit(
                request, place.requester, target, source_key=place.source_key
            )
        except (InvalidRequest, EngineError) as exc:
            await place.retract_status(replies.error_reply(exc), provisional)
            return
        except Exception:
            log.exception("admission failed for %s (%s)", place.requester.key, place.source_key)
            await place.retract_status(replies.error_reply(RuntimeError()), provisional)
            return
        if admission.duplicate:
            await place.drop_status()
            return
        job = await self.engine.get_job(admission.job_id)
        if job is None:
            return
        if place.status_first:
            await self.delivery.show_admitted(job, admission.position)
        else:
            # Admitted and durable: the status message may wait for the chat's budget.
            await place.working(replies.ON_ITS_WAY)
            self.delivery.post_status_soon(job, place.open_status, admission.position)

    async def _refusal(self, place: Place) -> Reply | None:
        """Why songs cannot be made here, or None."""
        community = place.requester.community_key
        if community and not self.engine.is_admin(place.requester):
            if await self.engine.get_community_setting(community, SONGS_SETTING) is False:
                return Reply.say(replies.SONGS_OFF)
            allowed = await self.engine.get_community_setting(community, CHANNELS_SETTING)
            if isinstance(allowed, list) and allowed and place.channel_id not in allowed:
                return replies.only_in_channels(allowed, await self._channel_names(community))
        if not await place.can_post_songs():
            return Reply.say(replies.CANNOT_ATTACH)
        return None

    # ---- work on a song (issue 14) ---------------------------------------------------

    async def work_on(
        self,
        place: Place,
        task: str,
        fields: dict[str, Any],
        load: Callable[[], Awaitable[SourceAudio]],
    ) -> None:
        """`/extend`, `/remix`, `/repaint` on a source `load` fetches (a user's audio or a
        posted song): where songs may be made, the source is fetched and checked, then
        the request is made from it. A refused source is answered in one line."""
        refusal = await self._refusal(place)
        if refusal is not None:
            await place.answer(refusal)
            return
        if place.source_key and await self.engine.admitted_for(place.source_key) is not None:
            return
        try:
            source = await load()
        except SourceRefused as exc:
            await place.answer(Reply.say(str(exc)))
            return
        request = {**fields, "mode": Mode.SONG.value, "task": task, "source": source}
        # The new music's style and words: the asker's, else the source song's own.
        if not str(request.get("tags") or "").strip():
            request["tags"] = source.tags
        if not str(request.get("lyrics") or "").strip():
            request["lyrics"] = source.lyrics
        try:
            await self.make(place, request)
        finally:
            # A refused request (bad window, quota, no provider) keeps no source file:
            # one no job works on is removed.
            await sources.discard(self.engine.settings.data_dir, source, self.engine.store)

    async def submit_form(
        self, place: Place, task: str, job_id: str, values: dict[str, str]
    ) -> None:
        """An edit form sent back (its values are untrusted text; the job id too)."""
        fields = form_fields(task, values)
        if task == "edit":
            job = await self.engine.get_job(job_id)
            if job is None or job.deleted or not self._same_place(job, place.requester):
                await place.answer(Reply.say(replies.NOT_KNOWN))
                return
            base = job.request.model_dump(
                exclude={
                    "task",
                    "source",
                    "extend_before",
                    "extend_after",
                    "repaint_start",
                    "repaint_end",
                    "strength",
                    "takes",
                },
                exclude_defaults=True,
            )
            await self.make(place, {**base, "mode": job.request.mode.value, **fields})
            return
        await self.work_on(place, task, fields, lambda: self.posted_source(place, job_id))

    async def posted_source(self, place: Place, job_id: str) -> SourceAudio:
        """A song the bot posted, as the source of an edit asked here. The id comes from
        a platform (a replied-to message's button, a form): untrusted. Raises SourceRefused
        for a job that is not a posted song or was made somewhere else."""
        job = await self.engine.get_job(job_id)
        if job is not None and not self._same_place(job, place.requester):
            raise SourceRefused(replies.SOURCE_NOT_HERE)
        settings = self.engine.settings
        return await sources.from_job(settings.data_dir, settings.audio_dir, job)

    # ---- buttons ---------------------------------------------------------------------

    async def press(self, place: Place, payload: str) -> None:
        """A job button was pressed; its payload is untrusted."""
        parsed = replies.parse_payload(payload)
        if parsed is not None and parsed[0] is Action.SET:
            # The presser's own default, whoever's panel it was pressed on.
            name, _, value = parsed[1].partition("=")
            await self.settings(place, {name: value})
            return
        job = await self.engine.get_job(parsed[1]) if parsed else None
        if parsed is None or job is None:
            await place.answer(Reply.say(replies.NOT_KNOWN))
            return
        action = parsed[0]
        if action is Action.DELETE:
            await self._delete(place, job)
            return
        if job.deleted:
            await place.answer(Reply.say(replies.SONG_DELETED))
            return
        if action is Action.STOP:
            await self._cancel(place, job, confirmed=True)
            return
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
        if action is Action.TAGS:
            await self._use_tags(place, job)
            return
        if action in replies.EDIT_ACTIONS:
            if job.state is not JobState.DELIVERED:
                await place.answer(Reply.say(replies.ONLY_POSTED))
                return
            form = replies.edit_form(job, action.value)
            if not await place.offer_form(form):
                await place.answer_choice(replies.form_as_command(form, place.form_how))
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

    async def _use_tags(self, place: Place, job: Job) -> None:
        """Go on in song mode with the tags (and lyrics) the provider wrote."""
        tags = replies.written_tags(job)
        if not tags:
            await place.answer(Reply.say(replies.NOT_KNOWN))
            return
        lyrics = "" if not replies.has_lyrics(job) else job.lyrics
        fields: dict[str, Any] = {
            "mode": Mode.SONG.value,
            "tags": tags[:MAX_TAGS_CHARS],
            "lyrics": lyrics[:MAX_LYRICS_CHARS] if lyrics else "[inst]",
            "duration": job.request.duration,
        }
        if job.request.title:
            fields["title"] = job.request.title
        if not await place.offer_compose(fields):
            await self.make(place, fields)

    # ---- delete ----------------------------------------------------------------------

    async def _delete(self, place: Place, job: Job) -> None:
        """Remove a posted song: the requester, the community's admins, bot admins."""
        if job.deleted:
            await place.answer(Reply.say(replies.SONG_DELETED))
            return
        if not (job.requester.key == place.requester.key or await self._admin_of(place, job)):
            await place.answer(Reply.say(replies.NOT_YOURS_TO_DELETE))
            return
        if job.state != JobState.DELIVERED:
            await place.answer(Reply.say(replies.ONLY_POSTED))
            return
        # Quick (a row, a few files, one platform call): answered without a deferral, so
        # a Telegram button press gets the outcome in its one popup.
        deleted = await self.engine.delete_song(job.id, place.requester)
        removed = await self.delivery.outlet.remove_song(deleted.reply_target)
        if not removed:
            log.warning("job %s deleted but its message could not be removed", job.id)
        await place.answer(replies.song_deleted(deleted, removed))

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

    async def _cancel(self, place: Place, job: Job, *, confirmed: bool = False) -> None:
        is_admin = await self._may_cancel_any(place, job)
        if job.requester.key != place.requester.key and not is_admin:
            await place.answer(Reply.say(replies.NOT_YOURS))
            return
        if not confirmed and job.state in (JobState.SUBMITTING, JobState.RUNNING):
            # The provider may bill it from here on: say so before it is cancelled.
            await place.answer_choice(replies.confirm_cancel_reply(job))
            return
        # Stopping a running job waits for the provider: longer than platforms wait.
        await place.working("Cancelling\N{HORIZONTAL ELLIPSIS}")
        cancelled = await self.engine.cancel(job.id, place.requester, is_admin=is_admin)
        await place.answer(replies.cancelled_reply(cancelled))

    async def _may_cancel_any(self, place: Place, job: Job) -> bool:
        """Bot admins cancel any job; community admins the jobs of their community."""
        if job.requester.key == place.requester.key and not self.engine.is_admin(place.requester):
            return False
        return await self._admin_of(place, job)

    async def _admin_of(self, place: Place, job: Job) -> bool:
        """Whether the asker is a bot admin, or an admin of the job's community here."""
        if self.engine.is_admin(place.requester):
            return True
        community = job.requester.community_key
        if community is None or community != place.requester.community_key:
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
        songs: bool | None = None,
        here: str | None = None,
        channel_word: str = "Channels",
    ) -> None:
        """Show or change the community's limits, its channels (where the platform has
        them: `channels` replaces the list, `here` = "here" | "-here" | "all" edits it
        from where the admin writes) and whether songs are made here at all. Admins may
        only lower a limit below the operator's default; the operator raises limits
        with `acestep-bot quota set`."""
        community = await self._admin_community(
            place, replies.LIMITS_COMMUNITY_ONLY, "this community's limits"
        )
        if community is None:
            return
        bot_admin = self.engine.is_admin(place.requester)
        done: list[tuple[Span, ...]] = []
        for change in changes:
            value = self._limit_value(change, bot_admin)
            await self.engine.set_limit("community", community, change.key, value)
            done.append(replies.limit_changed(change.key, value))
        if here is not None:
            channels = await self._edit_channels(place, community, here)
        if channels is not None:
            await self.engine.set_community_setting(community, CHANNELS_SETTING, channels)
            names = await self._channel_names(community)
            done.append(replies.channels_changed(channels, channel_word.lower(), names))
        if songs is not None:
            await self.engine.set_community_setting(community, SONGS_SETTING, songs)
            done.append(replies.songs_switched(songs))
        overrides = await self.engine.get_limits("community", community)
        shown: list[str] | None = None
        if has_channels:
            allowed = await self.engine.get_community_setting(community, CHANNELS_SETTING)
            shown = [str(c) for c in allowed] if isinstance(allowed, list) else []
        songs_on = await self.engine.get_community_setting(community, SONGS_SETTING) is not False
        reply = replies.limits_reply(
            done,
            overrides,
            shown,
            channel_word=channel_word,
            names=await self._channel_names(community),
            songs_on=songs_on,
        )
        await place.answer(reply)

    async def _edit_channels(self, place: Place, community: str, here: str) -> list[str]:
        """The channel list with the one the admin writes in added ("here") or removed
        ("-here"), or emptied ("all": every channel)."""
        if here == "all":
            return []
        where = place.channel_id
        if where is None or here not in ("here", "-here"):
            raise InvalidRequest("topics", here, replies.TOPICS_ONLY_IN_FORUMS.rstrip("."))
        stored = await self.engine.get_community_setting(community, CHANNELS_SETTING)
        current = [str(c) for c in stored] if isinstance(stored, list) else []
        if here == "-here":
            return [c for c in current if c != where]
        if place.channel_name:
            names = await self._channel_names(community)
            names[where] = place.channel_name
            await self.engine.set_community_setting(community, CHANNEL_NAMES_SETTING, names)
        return current if where in current else [*current, where]

    async def _channel_names(self, community: str) -> dict[str, str]:
        stored = await self.engine.get_community_setting(community, CHANNEL_NAMES_SETTING)
        return {str(k): str(v) for k, v in stored.items()} if isinstance(stored, dict) else {}

    # ---- defaults and the ban list -----------------------------------------------------

    async def settings(
        self,
        place: Place,
        changes: dict[str, Any],
        *,
        community: bool = False,
        reset_all: bool = False,
    ) -> None:
        """Show or change defaults for new songs: the asker's own, or with `community`
        the community's (its admins only). Every value is checked before any is stored."""
        requester = place.requester
        if community:
            admin_of = await self._admin_community(
                place, replies.SETTINGS_COMMUNITY_ONLY, "this community's defaults"
            )
            if admin_of is None:
                return
            scope, subject, words = "community", admin_of, "this community"
        else:
            scope, subject, words = "user", requester.key, "you"
        providers = list(self.engine.router.providers)
        parsed = {name: defaults.parse(name, raw, providers) for name, raw in changes.items()}
        if reset_all:
            await self.engine.clear_song_defaults(scope, subject)
        if parsed:
            await self.engine.set_song_defaults(scope, subject, parsed)
        found = await self.defaults_for(requester)
        if community:
            found = defaults.Defaults({}, found.community)
        rows = [(name, *found.value(name)) for name in defaults.offered()]
        changed = (["all reset"] if reset_all else []) + list(parsed)
        extras = (place.settings_usage,)
        if community:
            await place.answer(replies.settings_reply(words, changed, rows, extras))
            return
        buttons = replies.settings_buttons(providers)
        await place.answer_panel(replies.settings_reply(words, changed, rows, extras, buttons))

    async def banlist(self, place: Place, add: list[str], remove: list[str]) -> None:
        """Show, add to or remove from the community's banned words and phrases (its
        admins only). The list is answered to the admin alone."""
        community = await self._admin_community(
            place, replies.BANLIST_COMMUNITY_ONLY, "this community's ban list"
        )
        if community is None:
            return
        adding = [_phrase(p) for p in add]
        removing = [_phrase(p) for p in remove]
        try:
            added = await self.engine.ban(community, adding, place.requester)
        except BanListFull as full:
            raise InvalidRequest(
                "phrases",
                ", ".join(add),
                f"a community lists at most {MAX_BANNED} phrases; remove some first",
                problem=f"would make {full.have + full.adding} banned phrases",
            ) from None
        removed = await self.engine.unban(community, removing)
        listed = await self.engine.banned(community)
        await place.answer_long(replies.banlist_reply(listed, added, removed))

    async def _admin_community(self, place: Place, alone: str, what: str) -> str | None:
        """The community the asker administers here (a bot admin counts), else None
        after telling them why: `alone` outside a community, else who may change `what`."""
        community = place.requester.community_key
        if community is None:
            await place.answer(Reply.say(alone))
            return None
        if not (self.engine.is_admin(place.requester) or await place.is_community_admin()):
            await place.answer(Reply.say(replies.admins_only(place.admins, what)))
            return None
        return community

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


def _phrase(text: str) -> str:
    """A phrase for a ban list, normalised; refused when empty or too long."""
    phrase = normalize(text)
    if not phrase or len(phrase) > MAX_PHRASE_CHARS:
        raise InvalidRequest(
            "phrase", text, f"a word or phrase of 1 to {MAX_PHRASE_CHARS} letters or digits"
        )
    return phrase
