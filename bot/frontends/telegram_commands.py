"""Telegram's commands and buttons, one handler each, over the shared conversation layer.

Each update becomes a `TelegramPlace` (the shared layer's `Place`): who asked, in which
chat and forum topic, and the Telegram ways to answer there (a reply, a popup for a
button press, a private message). The rules and the words are not here.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import httpx
from telegram import CallbackQuery, Chat, Message, Update, User
from telegram.constants import ChatMemberStatus, ChatType, ParseMode
from telegram.error import Forbidden, TelegramError
from telegram.ext import ContextTypes, ExtBot

from bot import messages, sources
from bot.chat.conversation import Conversation
from bot.chat.markup import Text
from bot.chat.replies import (
    Action,
    EditForm,
    HelpStyle,
    Reply,
    StatusView,
    edit_usage,
    edit_usage_refusal,
    parse_payload,
    welcome_reply,
)
from bot.frontends import telegram_render as render
from bot.frontends.telegram_outlet import reply_to
from bot.frontends.telegram_pacing import Priority
from bot.frontends.telegram_parse import (
    command_args,
    option_usage,
    parse_banlist,
    parse_compose,
    parse_edit,
    parse_limits,
    parse_settings,
    parse_song,
)
from bot.models import Requester
from bot.requests import SourceAudio
from bot.sources import SourceRefused

log = logging.getLogger("acestep.telegram")

HELP_STYLE = HelpStyle(
    song="/song <description> [options]",
    compose="/compose <tags> [options], lyrics on the next lines (or reply to them)",
    option=option_usage,
    extras=("In groups address me as /song@<my name>; forum topics work.",),
)
SONG_USAGE = "Describe the song after /song, e.g. /song lofi piano about rain duration=30."
COMPOSE_USAGE = (
    "Give style tags after /compose and the lyrics on the next lines, e.g.\n"
    "/compose synthpop, female vocals\n[verse]\nNeon rain on the window"
)
START_PRIVATELY = "Start a private chat with me to read the whole lyrics."
GENERAL_TOPIC = "general"
FORM_HOW = "Copy this, change what you like, and send it as a reply to the song:"
EDIT_HOW = "Reply with this to a song I posted, or to an audio, voice or file message"
SETTINGS_USAGE = (
    'Change with /settings duration=30 instrumental=on style="dreamy, lofi" provider=fal '
    "(reset=duration or reset=all; /settings group ... for the group's, by its admins)."
)

Handler = Callable[[Update, ContextTypes.DEFAULT_TYPE], Coroutine[Any, Any, None]]


def thread_of(message: Message) -> int | None:
    """The forum topic a message is in; non-forum reply threads must not be targeted."""
    return message.message_thread_id if message.is_topic_message else None


def topic_of(message: Message, chat: Chat) -> str | None:
    """Where in a chat a message is, for /limits topics: its forum topic's id, "general"
    for a forum's General topic, None outside forums."""
    thread = thread_of(message)
    if thread is not None:
        return str(thread)
    return GENERAL_TOPIC if chat.is_forum else None


def topic_name(message: Message) -> str:
    """The forum topic's name, from the service message that opened it (every message
    in a topic replies to it)."""
    opened = message.reply_to_message.forum_topic_created if message.reply_to_message else None
    if opened is not None:
        return opened.name
    return "General" if message.chat.is_forum and thread_of(message) is None else ""


def requester_of(user: User, chat: Chat, sender_chat: Chat | None) -> Requester:
    """Who asked. An anonymous group admin or a channel posting in a group arrives as one
    fixed placeholder user: such a sender is its `sender_chat` (ids of chats are negative,
    so they never collide with users), with its own quota and its own songs."""
    community = None if chat.type == ChatType.PRIVATE else str(chat.id)
    if sender_chat is not None:
        return Requester(
            platform="telegram",
            user_id=str(sender_chat.id),
            community_id=community,
            display_name=sender_chat.title or sender_chat.username or str(sender_chat.id),
        )
    name = user.full_name or user.username or str(user.id)
    return Requester(
        platform="telegram", user_id=str(user.id), community_id=community, display_name=name
    )


class TelegramPlace:
    """One update (a command message or a button press), as the shared layer's Place."""

    admins = "this group's administrators"
    status_first = False
    settings_usage = SETTINGS_USAGE

    def __init__(self, bot: ExtBot[Any], update: Update) -> None:
        message, user, chat = update.effective_message, update.effective_user, update.effective_chat
        if message is None or user is None or chat is None:
            raise ValueError("an update without a message, user or chat")
        self.bot = bot
        self.query: CallbackQuery | None = update.callback_query
        self.message = message
        self.user = user
        self.chat = chat
        # A button press is made by its user, never by the message's sender chat.
        sender = None if self.query is not None else message.sender_chat
        self.requester = requester_of(user, chat, sender)
        self.source_key: str | None = f"telegram:{bot.id}:{update.update_id}"
        self.thread_id = thread_of(message)
        self.channel_id = topic_of(message, chat)
        self.channel_name = topic_name(message)
        self._answered = False

    def reply_target(self) -> dict[str, Any]:
        return {
            "chat_id": self.chat.id,
            "thread_id": self.thread_id,
            "request_message_id": self.message.message_id,
        }

    async def can_post_songs(self) -> bool:
        return True

    async def is_community_admin(self) -> bool:
        if self.chat.type == ChatType.PRIVATE:
            return False
        if self.message.sender_chat is not None and self.message.sender_chat.id == self.chat.id:
            return True  # an anonymous admin posts as the group itself
        member = await self.bot.get_chat_member(self.chat.id, self.user.id)
        return member.status in (ChatMemberStatus.ADMINISTRATOR, ChatMemberStatus.OWNER)

    async def open_status(self, view: StatusView) -> dict[str, Any]:
        """Post the status message of a job already admitted (a busy group may make this
        wait for its budget: admission never waits for it)."""
        status = await self.bot.send_message(
            self.chat.id,
            render.html(view.text),
            parse_mode=ParseMode.HTML,
            reply_markup=render.keyboard(view.buttons),
            message_thread_id=self.thread_id,
            reply_parameters=reply_to(self.message.message_id),
            rate_limit_args={"priority": Priority.OPEN},
        )
        return {"status_message_id": status.message_id}

    async def retract_status(self, reply: Reply, view: StatusView) -> None:
        """A refusal: the answer under the song's title, as its status would have been."""
        if self.query is not None and not self._answered:
            await self.answer(reply)
            return
        await self._send(Reply(Text(view.text.lines[:1]) + reply.text))

    async def drop_status(self) -> None:
        """No status message is posted before admission here."""

    async def answer(self, reply: Reply) -> None:
        """A popup for a button press, else a reply to the message."""
        if self.query is not None and not self._answered:
            self._answered = True
            await self.query.answer(render.alert(reply.text), show_alert=True)
            return
        await self._send(reply)

    async def answer_long(self, reply: Reply) -> None:
        """In a private chat, there; in a group, a private message to the presser (when
        they have started the bot), else a popup with the start of it."""
        if self.chat.type == ChatType.PRIVATE:
            await self.toast("")
            await self._send(reply, reply_to_message=self.message.message_id)
            return
        try:
            for chunk in render.split_message(render.html(reply.text)):
                await self.bot.send_message(self.user.id, chunk, parse_mode=ParseMode.HTML)
        except Forbidden:
            # The user never started a private chat with the bot: Telegram refuses it.
            short = render.alert(reply.text)
            room = render.ALERT_LIMIT - len(START_PRIVATELY) - 2
            await self.answer(Reply.say(f"{short[:room]}\N{HORIZONTAL ELLIPSIS} {START_PRIVATELY}"))
            return
        await self.toast("Sent to you privately.")

    async def working(self, note: str) -> None:
        await self.toast(note)

    async def answer_choice(self, reply: Reply) -> None:
        """A reply with the buttons (a popup cannot hold buttons)."""
        await self.toast("")
        for chunk in render.split_message(render.html(reply.text)):
            await self.bot.send_message(
                self.chat.id,
                chunk,
                parse_mode=ParseMode.HTML,
                reply_markup=render.keyboard(reply.buttons),
                message_thread_id=self.thread_id,
                reply_parameters=reply_to(self.message.message_id),
            )

    async def answer_panel(self, reply: Reply) -> None:
        """Pressed on the panel: edit it in place (a popup would cut it off at 200
        characters); else a reply with the keyboard."""
        text, keyboard = render.html(reply.text), render.keyboard(reply.buttons)
        if self.query is not None:
            try:
                await self.bot.edit_message_text(
                    text,
                    chat_id=self.chat.id,
                    message_id=self.message.message_id,
                    parse_mode=ParseMode.HTML,
                    reply_markup=keyboard,
                )
                await self.toast("Saved.")
                return
            except TelegramError as exc:
                if "not modified" in str(exc).lower():
                    await self.toast("Saved.")
                    return
                log.info("telegram: settings panel not edited: %s", exc)
        await self.bot.send_message(
            self.chat.id,
            text,
            parse_mode=ParseMode.HTML,
            reply_markup=keyboard,
            message_thread_id=self.thread_id,
            reply_parameters=reply_to(self.message.message_id),
        )

    async def offer_compose(self, fields: dict[str, Any]) -> bool:
        return False  # no forms on Telegram: the song is made at once

    async def offer_form(self, form: EditForm) -> bool:
        return False  # no forms on Telegram: the command to copy is sent instead

    form_how = FORM_HOW

    async def toast(self, text: str) -> None:
        """Answer a button press with a short notice (once; later answers are replies)."""
        if self.query is not None and not self._answered:
            self._answered = True
            await self.query.answer(text or None)

    async def finish(self) -> None:
        """A button press must be answered, or the user's client keeps spinning."""
        await self.toast("")

    async def _send(self, reply: Reply, reply_to_message: int | None = None) -> None:
        for chunk in render.split_message(render.html(reply.text)):
            await self.bot.send_message(
                self.chat.id,
                chunk,
                parse_mode=ParseMode.HTML,
                message_thread_id=self.thread_id,
                reply_parameters=reply_to(reply_to_message or self.message.message_id),
            )


class TelegramCommands:
    """The handlers python-telegram-bot calls; each builds a Place and a use-case."""

    def __init__(self, bot: Callable[[], ExtBot[Any]], conversation: Conversation) -> None:
        self._bot = bot
        self.conversation = conversation

    def handlers(self) -> dict[str, Handler]:
        return {
            "song": self.song,
            "compose": self.compose,
            "extend": self.extend,
            "remix": self.remix,
            "repaint": self.repaint,
            "queue": self.queue,
            "cancel": self.cancel,
            "quota": self.quota,
            "history": self.history,
            "help": self.help,
            "start": self.start,
            "limits": self.limits,
            "settings": self.settings,
            "banlist": self.banlist,
        }

    async def _run(
        self, update: Update, what: str, step: Callable[[TelegramPlace], Awaitable[None]]
    ) -> None:
        try:
            place = TelegramPlace(self._bot(), update)
        except ValueError:
            log.info("telegram: update %s has no message, user or chat", update.update_id)
            return
        try:
            await self.conversation.run(place, what, lambda: step(place))
        finally:
            try:
                await place.finish()
            except TelegramError as exc:
                log.info("telegram: could not answer a button press: %s", exc)

    # ---- songs ----

    async def song(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        async def step(place: TelegramPlace) -> None:
            args = _args(place.message)
            if not args.strip():
                await place.answer(Reply.say(f"{SONG_USAGE} See /help for every option."))
                return
            await self.conversation.make(place, parse_song(args))

        await self._run(update, "/song", step)

    async def compose(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        async def step(place: TelegramPlace) -> None:
            args = _args(place.message)
            if not args.strip():
                await place.answer(Reply.say(COMPOSE_USAGE))
                return
            replied = place.message.reply_to_message
            replied_text = (replied.text or replied.caption) if replied is not None else None
            await self.conversation.make(place, parse_compose(args, replied_text))

        await self._run(update, "/compose", step)

    # ---- work on a song (issue 14) ----

    async def extend(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self._edit(update, "extend")

    async def remix(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self._edit(update, "remix")

    async def repaint(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self._edit(update, "repaint")

    async def _edit(self, update: Update, task: str) -> None:
        async def step(place: TelegramPlace) -> None:
            replied = place.message.reply_to_message
            if replied is None or replied.forum_topic_created is not None:
                await place.answer(Reply.say(edit_usage(task, EDIT_HOW)))
                return
            fields = parse_edit(task, _args(place.message))
            await self.conversation.work_on(
                place, task, fields, lambda: self._source_of(place, replied)
            )

        await self._run(update, f"/{task}", step)

    async def _source_of(self, place: TelegramPlace, replied: Message) -> SourceAudio:
        """The replied-to message as a source: a song this bot posted (its job, found
        from the message's buttons), or the audio, voice or file a user sent, fetched
        with getFile after its declared size is checked against SOURCE_MAX_BYTES."""
        posted = _posted_job(replied)
        if posted is not None and replied.from_user and replied.from_user.id == place.bot.id:
            return await self.conversation.posted_source(place, posted)
        media = replied.audio or replied.voice or replied.document
        if media is None:
            raise SourceRefused(edit_usage_refusal())
        settings = self.conversation.engine.settings
        cap = settings.source_max_bytes
        if media.file_size is not None and media.file_size > cap:
            raise SourceRefused(messages.source_too_big(media.file_size, cap))
        try:
            found = await place.bot.get_file(media.file_id)
        except TelegramError as exc:
            if "too big" in str(exc).lower():  # the Bot API serves files up to 20 MB
                raise SourceRefused(messages.source_too_big(media.file_size or 0, cap)) from None
            raise SourceRefused(messages.SOURCE_UNREACHABLE) from None
        if not found.file_path:
            raise SourceRefused(messages.SOURCE_UNREACHABLE)
        name = getattr(media, "file_name", None) or ""
        async with httpx.AsyncClient() as client:
            return await sources.from_url(
                settings.data_dir,
                client,
                found.file_path,
                declared_size=found.file_size or media.file_size,
                max_bytes=cap,
                name=name,
            )

    async def button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        payload = update.callback_query.data if update.callback_query else None

        async def step(place: TelegramPlace) -> None:
            await self.conversation.press(place, str(payload or ""))

        await self._run(update, f"button {payload}", step)

    # ---- your jobs ----

    async def cancel(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        job_id = context.args[0] if context.args else None
        await self._run(update, "/cancel", lambda p: self.conversation.cancel(p, job_id))

    async def queue(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self._run(update, "/queue", self.conversation.queue)

    async def quota(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self._run(update, "/quota", self.conversation.quota)

    async def history(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self._run(update, "/history", self.conversation.history)

    async def help(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self._run(update, "/help", lambda p: self.conversation.help(p, HELP_STYLE))

    async def start(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self._run(update, "/start", lambda p: p.answer(welcome_reply()))

    # ---- group admins ----

    async def limits(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        args = list(context.args or [])

        async def step(place: TelegramPlace) -> None:
            parsed = parse_limits(args)
            await self.conversation.limits(
                place,
                parsed.changes,
                has_channels=bool(place.chat.is_forum),
                songs=parsed.songs,
                here=parsed.here,
                channel_word="Topics",
            )

        await self._run(update, "/limits", step)

    async def settings(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        async def step(place: TelegramPlace) -> None:
            parsed = parse_settings(_args(place.message))
            await self.conversation.settings(
                place,
                dict(parsed.changes),
                community=parsed.community,
                reset_all=parsed.reset_all,
            )

        await self._run(update, "/settings", step)

    async def banlist(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        async def step(place: TelegramPlace) -> None:
            add, remove = parse_banlist(_args(place.message))
            await self.conversation.banlist(place, add, remove)

        await self._run(update, "/banlist", step)


def _posted_job(message: Message) -> str | None:
    """The job id a bot's song message carries in its buttons' payloads, if any."""
    markup = message.reply_markup
    if markup is None:
        return None
    for row in markup.inline_keyboard:
        for button in row:
            parsed = parse_payload(str(button.callback_data or ""))
            if parsed is not None and parsed[0] is not Action.SET:
                return parsed[1]
    return None


def _args(message: Message) -> str:
    text = message.text or ""
    length = next(
        (e.length for e in message.entities if e.type == "bot_command" and e.offset == 0), None
    )
    return command_args(text, length)
