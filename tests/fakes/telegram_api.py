"""A fake Telegram Bot API server (aiohttp on 127.0.0.1) for the real python-telegram-bot.

It speaks the Bot API's wire shapes: `POST /bot<token>/<method>` with form or multipart
parameters, answers `{"ok": true, "result": ...}` or `{"ok": false, "error_code": ...,
"description": ...}`, serves updates through long-polled getUpdates (or, once setWebhook
registered one, POSTs them to the bot's webhook with `deliver_webhooks`), and answers an
unknown method with 400 naming it (a 404 would surface in the library as InvalidToken).
Tests push user messages and button presses, then read what the bot sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from tests.fakes.http import json_response

BOT_ID = 7000001


@dataclass
class UploadedFile:
    """One multipart file part the bot uploaded."""

    filename: str
    content_type: str
    data: bytes


@dataclass
class Call:
    """One Bot API request the bot made (after any injected failure was answered)."""

    method: str
    params: dict[str, Any]
    files: dict[str, UploadedFile] = field(default_factory=dict)
    answered_status: int = 200
    at: float = field(default_factory=time.monotonic)


@dataclass
class FakeMessage:
    """A message the bot posted, with every text it has shown (edits included)."""

    chat_id: int
    message_id: int
    texts: list[str]
    reply_markup: dict[str, Any] | None
    thread_id: int | None
    reply_to: int | None
    kind: str = "text"  # text | audio
    caption: str | None = None
    files: dict[str, UploadedFile] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    deleted: bool = False

    @property
    def text(self) -> str:
        return self.texts[-1] if self.texts else ""

    def buttons(self) -> list[dict[str, Any]]:
        if not self.reply_markup:
            return []
        return [b for row in self.reply_markup.get("inline_keyboard", []) for b in row]

    def button_data(self) -> list[str]:
        return [b["callback_data"] for b in self.buttons() if "callback_data" in b]


def _decode(value: str) -> Any:
    """PTB sends non-string parameters JSON-encoded; plain strings as they are."""
    try:
        return json.loads(value)
    except (ValueError, TypeError):
        return value


class FakeTelegram:
    """The fake server's state and handlers; `app` is the aiohttp application to serve."""

    def __init__(
        self,
        token: str = "123456:TEST-token_abc",
        username: str = "AceStepBot",
        max_poll_wait: float = 0.2,
    ) -> None:
        self.token = token
        # A long poll may end early with no updates (the real server does too); keeping it
        # short lets a test's server shut down without waiting out the bot's poll timeout.
        self.max_poll_wait = max_poll_wait
        self.username = username
        self.calls: list[Call] = []
        self.messages: dict[tuple[int, int], FakeMessage] = {}
        self.sent: list[FakeMessage] = []  # everything the bot posted, deleted ones too
        self.chats: dict[int, dict[str, Any]] = {}
        self.admins: dict[int, set[int]] = {}
        self.topics: dict[tuple[int, int], str] = {}  # (forum chat, thread id) -> name
        self.webhook: dict[str, Any] | None = None
        self.commands: list[dict[str, Any]] = []
        self._updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1)
        self._message_ids = itertools.count(1000)
        self._callback_ids = itertools.count(1)
        self._file_ids = itertools.count(1)
        self._changed = asyncio.Condition()
        self._failures: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        self._holds: list[tuple[str, int | None, asyncio.Event]] = []
        self.offsets: list[int] = []  # the offset of every getUpdates: what it confirmed
        # Every webhook POST: (update id, HTTP status or the connection error's name).
        self.webhook_posts: list[tuple[int, int | str]] = []
        self.webhook_sending: int | None = None  # the update whose POST is in flight
        self.limits: BotApiLimits | None = None  # set to enforce Telegram's limits
        self.app = web.Application(client_max_size=200 * 1024 * 1024)
        self.app.router.add_route("*", "/bot{token}/{method}", self._handle)
        self.app.router.add_get("/file/bot{token}/{path:.+}", self._file)
        # Files users sent (and the bot's own uploads) by file_id, as getFile serves them.
        self.files: dict[str, bytes] = {}
        self.downloads: list[str] = []  # file_path of every file download

    # --- what tests do ------------------------------------------------------------

    def chat(
        self, chat_id: int, kind: str = "private", title: str = "", is_forum: bool = False
    ) -> dict[str, Any]:
        """Register a chat; private chats have positive ids, groups negative ones."""
        info: dict[str, Any] = {"id": chat_id, "type": kind}
        if kind == "private":
            info["first_name"] = title or "User"
        else:
            info["title"] = title or "Group"
        if is_forum:
            info["is_forum"] = True
        self.chats[chat_id] = info
        return info

    def topic(self, chat_id: int, thread_id: int, name: str) -> None:
        """A forum topic: its messages reply to the service message that opened it
        (Bot API `Message.forum_topic_created`), unless they reply to another message."""
        self.topics[(chat_id, thread_id)] = name

    @staticmethod
    def user(user_id: int, first_name: str = "Ann", username: str | None = None) -> dict[str, Any]:
        info: dict[str, Any] = {"id": user_id, "is_bot": False, "first_name": first_name}
        if username:
            info["username"] = username
        return info

    def message_update(
        self,
        chat_id: int,
        user: dict[str, Any],
        text: str,
        *,
        reply_to: int | None = None,
        thread_id: int | None = None,
        sender_chat: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A user's message as an Update object (command entities added as Telegram does);
        not queued: `send_text` queues it, a webhook test POSTs it. `sender_chat`: sent
        on behalf of a chat (an anonymous group admin is the group itself, with the fixed
        user @GroupAnonymousBot in `from`; core.telegram.org/bots/api#message)."""
        chat = self.chats.get(chat_id) or self.chat(chat_id)
        message_id = next(self._message_ids)
        msg: dict[str, Any] = {
            "message_id": message_id,
            "date": int(time.time()),
            "chat": chat,
            "from": user,
            "text": text,
        }
        if sender_chat is not None:
            msg["sender_chat"] = sender_chat
        if text.startswith("/"):
            command = text.split(maxsplit=1)[0]
            msg["entities"] = [
                {
                    "type": "bot_command",
                    "offset": 0,
                    "length": len(command.encode("utf-16-le")) // 2,
                }
            ]
        if thread_id is not None:
            msg["message_thread_id"] = thread_id
            msg["is_topic_message"] = True
        if reply_to is not None:
            msg["reply_to_message"] = self._message_json(chat_id, reply_to)
        elif thread_id is not None and (chat_id, thread_id) in self.topics:
            msg["reply_to_message"] = {
                "message_id": thread_id,
                "date": int(time.time()),
                "chat": chat,
                "from": user,
                "message_thread_id": thread_id,
                "is_topic_message": True,
                "forum_topic_created": {
                    "name": self.topics[(chat_id, thread_id)],
                    "icon_color": 7322096,
                },
            }
        self._record_user_message(chat_id, message_id, text, thread_id)
        return {"update_id": next(self._update_ids), "message": msg}

    def send_text(
        self,
        chat_id: int,
        user: dict[str, Any],
        text: str,
        *,
        reply_to: int | None = None,
        thread_id: int | None = None,
        sender_chat: dict[str, Any] | None = None,
    ) -> int:
        """A user posts `text`; the bot gets it from getUpdates. Returns the message id."""
        update = self.message_update(
            chat_id, user, text, reply_to=reply_to, thread_id=thread_id, sender_chat=sender_chat
        )
        self._updates.append(update)
        asyncio.get_running_loop().create_task(self._notify())
        return int(update["message"]["message_id"])

    def send_file(
        self,
        chat_id: int,
        user: dict[str, Any],
        data: bytes,
        *,
        kind: str = "audio",
        file_name: str = "song.mp3",
        mime_type: str = "audio/mpeg",
        declared_size: int | None = None,
    ) -> int:
        """A user posts an audio, voice or document message (Bot API `Audio`, `Voice`,
        `Document`: file_id, file_unique_id, file_size, and file_name/mime_type where the
        type has them). `declared_size` overrides file_size (a platform that under- or
        over-declares). Returns the message id; reply to it with send_text."""
        message_id = next(self._message_ids)
        file_id = f"UF{message_id}"
        self.files[file_id] = data
        media: dict[str, Any] = {
            "file_id": file_id,
            "file_unique_id": f"UU{message_id}",
            "file_size": len(data) if declared_size is None else declared_size,
        }
        if kind in ("audio", "voice"):
            media["duration"] = 1
        if kind in ("audio", "document"):
            media["file_name"] = file_name
        media["mime_type"] = mime_type
        self.messages[(chat_id, message_id)] = FakeMessage(
            chat_id, message_id, [], None, None, None, kind="user_file", params={kind: media}
        )
        self.chats.get(chat_id) or self.chat(chat_id)
        return message_id

    def resend(self, update: dict[str, Any]) -> None:
        """Offer an update again with its original id, as Telegram does with a batch
        whose getUpdates was never confirmed (the bot died after fetching it)."""
        self._updates.append(update)
        asyncio.get_running_loop().create_task(self._notify())

    def press(self, chat_id: int, message_id: int, user: dict[str, Any], data: str) -> str:
        """A user presses an inline button on one of the bot's messages."""
        query_id = str(next(self._callback_ids))
        self._push(
            {
                "callback_query": {
                    "id": query_id,
                    "from": user,
                    "chat_instance": f"ci{chat_id}",
                    "data": data,
                    "message": self._message_json(chat_id, message_id),
                }
            }
        )
        return query_id

    def fail_next(
        self,
        method: str,
        *,
        retry_after: int | None = None,
        status: int = 429,
        description: str | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next `times` calls of `method` with an error (429 flood control)."""
        body: dict[str, Any] = {"ok": False, "error_code": status}
        if status == 429:
            body["description"] = description or (
                f"Too Many Requests: retry after {retry_after or 1}"
            )
            body["parameters"] = {"retry_after": retry_after or 1}
        else:
            body["description"] = description or "Bad Request: injected failure"
        self._failures.setdefault(method, []).extend([(status, body)] * times)

    def hold(self, method: str, chat_id: int | None = None) -> asyncio.Event:
        """Keep answers to `method` (in `chat_id`, or any chat) waiting until the returned
        event is set: a slow server, to show other users are not blocked meanwhile."""
        event = asyncio.Event()
        self._holds.append((method, chat_id, event))
        return event

    @contextlib.asynccontextmanager
    async def deliver_webhooks(self, target: str, retry_every: float = 0.2) -> AsyncIterator[None]:
        """While inside, POST each pending update to the registered webhook, in order.

        `target` is where the registered public URL leads (what a reverse proxy in front
        of the bot would forward to). As on the real server
        (https://core.telegram.org/bots/api#setwebhook): the request carries
        `X-Telegram-Bot-Api-Secret-Token` when a secret was set, and "in case of an
        unsuccessful request (a request with response HTTP status code different from
        2XY), we will repeat the request"; an update leaves the queue only once answered
        2xx. (The real server gives up after "a reasonable amount of attempts"; this one
        keeps trying while the test runs.)
        """
        task = asyncio.get_running_loop().create_task(self._webhook_loop(target, retry_every))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _webhook_loop(self, target: str, retry_every: float) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                if self.webhook is None or not self._updates:
                    await asyncio.sleep(0.02)
                    continue
                update = self._updates[0]
                secret = self.webhook.get("secret_token")
                headers = {"X-Telegram-Bot-Api-Secret-Token": secret} if secret else {}
                outcome: int | str
                self.webhook_sending = int(update["update_id"])
                await self._notify()
                try:
                    async with session.post(target, json=update, headers=headers) as resp:
                        outcome = resp.status
                except aiohttp.ClientError as exc:
                    outcome = type(exc).__name__
                self.webhook_sending = None
                self.webhook_posts.append((int(update["update_id"]), outcome))
                delivered = isinstance(outcome, int) and 200 <= outcome < 300
                if delivered:
                    self._updates.remove(update)
                await self._notify()
                if not delivered:
                    await asyncio.sleep(retry_every)

    def calls_of(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method and c.answered_status == 200]

    def bot_messages(self, chat_id: int) -> list[FakeMessage]:
        return [
            m
            for (c, _), m in sorted(self.messages.items())
            if c == chat_id and m.kind not in ("user", "user_file")
        ]

    async def wait_for(self, predicate: Callable[[], Any], within: float = 10.0) -> Any:
        """Wait until `predicate()` is truthy (re-checked after every request); return it."""

        async def check() -> Any:
            async with self._changed:
                while True:
                    value = predicate()
                    if value:
                        return value
                    await self._changed.wait()

        return await asyncio.wait_for(check(), within)

    async def wait_call(self, method: str, count: int = 1, within: float = 10.0) -> list[Call]:
        """Wait until the bot has made `count` successful calls of `method`."""
        return await self.wait_for(
            lambda: self.calls_of(method) if len(self.calls_of(method)) >= count else None, within
        )

    # --- the wire ---------------------------------------------------------------

    def _push(self, payload: dict[str, Any]) -> None:
        self._updates.append({"update_id": next(self._update_ids), **payload})
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _record_user_message(
        self, chat_id: int, message_id: int, text: str, thread_id: int | None
    ) -> None:
        self.messages[(chat_id, message_id)] = FakeMessage(
            chat_id, message_id, [text], None, thread_id, None, kind="user"
        )

    def _bot_user(self) -> dict[str, Any]:
        return {"id": BOT_ID, "is_bot": True, "first_name": "AceStep", "username": self.username}

    def _message_json(self, chat_id: int, message_id: int) -> dict[str, Any]:
        stored = self.messages.get((chat_id, message_id))
        chat = self.chats.get(chat_id) or self.chat(chat_id)
        out: dict[str, Any] = {"message_id": message_id, "date": int(time.time()), "chat": chat}
        if stored is None:
            return out
        if stored.kind in ("user", "user_file"):
            out["from"] = {"id": 1, "is_bot": False, "first_name": "User"}
        else:
            out["from"] = self._bot_user()
        if stored.kind == "user_file":
            out.update(stored.params)
        elif stored.kind == "audio":
            out["audio"] = {
                "file_id": f"F{message_id}",
                "file_unique_id": f"U{message_id}",
                "duration": int(stored.params.get("duration") or 0),
            }
            uploaded = stored.files.get("audio")
            if uploaded is not None:
                self.files[f"F{message_id}"] = uploaded.data
                out["audio"]["file_size"] = len(uploaded.data)
            if stored.caption is not None:
                out["caption"] = stored.caption
        else:
            out["text"] = stored.text
        if stored.thread_id is not None:
            out["message_thread_id"] = stored.thread_id
            out["is_topic_message"] = True
        if stored.reply_markup:
            out["reply_markup"] = stored.reply_markup
        return out

    async def _handle(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return json_response(
                {"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401
            )
        method = request.match_info["method"]
        params: dict[str, Any] = {}
        files: dict[str, UploadedFile] = {}
        if request.method == "POST" and request.can_read_body:
            try:
                form = await request.post()
            except ConnectionResetError:  # the bot stopped mid-request (a cancelled poll)
                return web.Response(status=499)
            for key, value in form.items():
                if isinstance(value, web.FileField):
                    files[key] = UploadedFile(value.filename, value.content_type, value.file.read())
                else:
                    params[key] = _decode(str(value))
        params.update({k: _decode(v) for k, v in request.query.items()})
        if method == "getUpdates":
            return await self._get_updates(params)
        for held_method, held_chat, event in self._holds:
            if held_method == method and held_chat in (None, _int(params.get("chat_id"))):
                await event.wait()
        call = Call(method, params, files)
        self.calls.append(call)
        limited = self.limits.check(method, _int(params.get("chat_id"))) if self.limits else None
        if limited is not None:
            call.answered_status = 429
            await self._notify()
            return json_response(
                {
                    "ok": False,
                    "error_code": 429,
                    "description": f"Too Many Requests: retry after {limited}",
                    "parameters": {"retry_after": limited},
                },
                status=429,
            )
        pending = self._failures.get(method)
        if pending:
            status, body = pending.pop(0)
            call.answered_status = status
            await self._notify()
            return json_response(body, status=status)
        handler = getattr(self, "_m_" + method, None)
        if handler is None:
            call.answered_status = 400
            await self._notify()
            return json_response(
                {
                    "ok": False,
                    "error_code": 400,
                    "description": f"Bad Request: method {method} not found",
                },
                status=400,
            )
        try:
            result = handler(params, files)
        except _ApiError as exc:
            call.answered_status = exc.status
            await self._notify()
            return json_response(
                {"ok": False, "error_code": exc.status, "description": exc.description},
                status=exc.status,
            )
        await self._notify()
        return json_response({"ok": True, "result": result})

    async def _get_updates(self, params: dict[str, Any]) -> web.Response:
        if self.webhook is not None:
            return json_response(
                {
                    "ok": False,
                    "error_code": 409,
                    "description": (
                        "Conflict: can't use getUpdates method while webhook is active; "
                        "use deleteWebhook to delete the webhook first"
                    ),
                },
                status=409,
            )
        offset = int(params.get("offset") or 0)
        self.offsets.append(offset)
        await self._notify()  # wait_for may watch what was confirmed
        timeout = min(float(params.get("timeout") or 0), self.max_poll_wait)
        # Confirmed updates (id < offset) are forgotten, as on the real server.
        self._updates = [u for u in self._updates if u["update_id"] >= offset]
        deadline = asyncio.get_running_loop().time() + timeout
        async with self._changed:
            while not self._updates:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                except TimeoutError:
                    break
        limit = int(params.get("limit") or 100)
        return json_response({"ok": True, "result": self._updates[:limit]})

    # --- methods ------------------------------------------------------------------

    def _m_getMe(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> Any:
        return {
            **self._bot_user(),
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
        }

    def _m_deleteWebhook(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> Any:
        self.webhook = None
        return True

    def _m_setWebhook(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> Any:
        self.webhook = params
        return True

    def _m_setMyCommands(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> Any:
        commands = params.get("commands")
        if not isinstance(commands, list) or not all(
            isinstance(c, dict) and c.get("command") and c.get("description") for c in commands
        ):
            raise _ApiError(400, "Bad Request: can't parse commands JSON object")
        self.commands = commands
        return True

    def _m_sendChatAction(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> Any:
        self._chat(params)
        return True

    def _m_answerCallbackQuery(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> Any:
        return True

    def _m_sendMessage(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> Any:
        text = str(params.get("text", ""))
        if not text.strip():
            raise _ApiError(400, "Bad Request: message text is empty")
        if len(text) > 4096:
            raise _ApiError(400, "Bad Request: message is too long")
        _check_html(params, text)
        return self._store(params, "text", text=text)

    def _m_sendAudio(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> Any:
        if "audio" not in files:
            raise _ApiError(400, "Bad Request: there is no audio in the request")
        caption = params.get("caption")
        if caption is not None and len(str(caption)) > 1024:
            raise _ApiError(400, "Bad Request: message caption is too long")
        if caption is not None:
            _check_html(params, str(caption))
        return self._store(params, "audio", caption=caption, files=files)

    def _m_getFile(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> Any:
        """Bot API getFile: a file_path to download from /file/bot<token>/<file_path>;
        "file is too big" past the 20 MB the Bot API serves to bots."""
        file_id = str(params.get("file_id", ""))
        data = self.files.get(file_id)
        if data is None:
            raise _ApiError(400, "Bad Request: invalid file_id")
        if len(data) > 20 * 1024 * 1024:
            raise _ApiError(400, "Bad Request: file is too big")
        return {
            "file_id": file_id,
            "file_unique_id": "U" + file_id,
            "file_size": len(data),
            "file_path": f"music/{file_id}.bin",
        }

    async def _file(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["token"] != self.token:
            return web.Response(status=401)
        path = request.match_info["path"]
        self.downloads.append(path)
        file_id = path.removeprefix("music/").removesuffix(".bin")
        data = self.files.get(file_id)
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="application/octet-stream")

    def _m_editMessageText(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> Any:
        msg = self._existing(params)
        text = str(params.get("text", ""))
        markup = params.get("reply_markup")
        if text == msg.text and markup == msg.reply_markup:
            raise _ApiError(
                400,
                "Bad Request: message is not modified: specified new message "
                "content and reply markup are exactly the same as a current "
                "content and reply markup of the message",
            )
        _check_html(params, text)
        msg.texts.append(text)
        msg.reply_markup = markup if isinstance(markup, dict) else None
        return self._message_json(msg.chat_id, msg.message_id)

    def _m_editMessageReplyMarkup(
        self, params: dict[str, Any], files: dict[str, UploadedFile]
    ) -> Any:
        msg = self._existing(params)
        markup = params.get("reply_markup")
        msg.reply_markup = markup if isinstance(markup, dict) else None
        return self._message_json(msg.chat_id, msg.message_id)

    def _m_deleteMessage(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> Any:
        msg = self._existing(params)
        del self.messages[(msg.chat_id, msg.message_id)]
        msg.deleted = True
        return True

    def _m_getChatMember(self, params: dict[str, Any], files: dict[str, UploadedFile]) -> Any:
        chat = self._chat(params)
        user_id = int(params["user_id"])
        user = {"id": user_id, "is_bot": False, "first_name": "Member"}
        if user_id in self.admins.get(chat["id"], set()):
            rights = dict.fromkeys(
                (
                    "can_be_edited",
                    "can_manage_chat",
                    "can_delete_messages",
                    "can_manage_video_chats",
                    "can_restrict_members",
                    "can_promote_members",
                    "can_change_info",
                    "can_invite_users",
                    "can_post_stories",
                    "can_edit_stories",
                    "can_delete_stories",
                ),
                False,
            )
            return {
                "status": "administrator",
                "user": user,
                "is_anonymous": False,
                **rights,
                "can_manage_chat": True,
            }
        return {"status": "member", "user": user}

    # --- helpers ------------------------------------------------------------------

    def _chat(self, params: dict[str, Any]) -> dict[str, Any]:
        try:
            chat_id = int(params["chat_id"])
        except (KeyError, ValueError, TypeError):
            raise _ApiError(400, "Bad Request: chat_id is empty") from None
        chat = self.chats.get(chat_id)
        if chat is None and chat_id > 0:
            # A user who never opened a private chat with the bot cannot be written to.
            raise _ApiError(403, "Forbidden: bot can't initiate conversation with a user")
        if chat is None:
            raise _ApiError(400, "Bad Request: chat not found")
        return chat

    def _existing(self, params: dict[str, Any]) -> FakeMessage:
        chat = self._chat(params)
        msg = self.messages.get((chat["id"], int(params.get("message_id") or 0)))
        if msg is None or msg.kind == "user":
            raise _ApiError(400, "Bad Request: message to edit not found")
        return msg

    def _store(
        self,
        params: dict[str, Any],
        kind: str,
        *,
        text: str = "",
        caption: Any = None,
        files: dict[str, UploadedFile] | None = None,
    ) -> Any:
        chat = self._chat(params)
        reply = params.get("reply_parameters")
        reply_to = int(reply["message_id"]) if isinstance(reply, dict) else None
        thread = params.get("message_thread_id")
        thread_id = int(thread) if thread is not None else None
        if thread_id is not None and not chat.get("is_forum"):
            raise _ApiError(400, "Bad Request: message thread not found")
        message_id = next(self._message_ids)
        markup = params.get("reply_markup")
        self.messages[(chat["id"], message_id)] = message = FakeMessage(
            chat["id"],
            message_id,
            [text] if kind == "text" else [],
            markup if isinstance(markup, dict) else None,
            thread_id,
            reply_to,
            kind=kind,
            caption=None if caption is None else str(caption),
            files=files or {},
            params=params,
        )
        self.sent.append(message)
        out = self._message_json(chat["id"], message_id)
        if kind == "audio":
            out["audio"]["file_size"] = len(files["audio"].data) if files else 0
            out["audio"]["file_id"] = f"AUD{next(self._file_ids)}"
        return out


class BotApiLimits:
    """Telegram's flood limits for bots, as the Bot API FAQ states them
    (core.telegram.org/bots/faq, "My bot is hitting limits, how do I avoid this?"): about
    30 messages a second overall, no more than about one a second in one chat (short
    bursts pass), and at most 20 a minute in one group. A call over a limit is answered
    429 with `retry_after`, the way the Bot API does. Sending and editing messages count;
    answering button presses, chat actions and reads do not."""

    COUNTED = frozenset(
        {"sendMessage", "sendAudio", "sendDocument", "editMessageText", "editMessageReplyMarkup"}
    )

    def __init__(
        self, per_second: int = 30, per_chat_burst: int = 3, per_group_minute: int = 20
    ) -> None:
        self.per_second = per_second
        self.per_chat_burst = per_chat_burst
        self.per_group_minute = per_group_minute
        self._all: list[float] = []
        self._chats: dict[int, list[float]] = {}
        self.accepted: list[tuple[float, str, int]] = []  # (time, method, chat) let through
        self.refused: Counter[str] = Counter()  # by the limit hit: overall, chat, group

    def check(self, method: str, chat_id: int | None) -> int | None:
        """None if the call may go through (and count it), else the seconds to wait."""
        if method not in self.COUNTED or chat_id is None:
            return None
        now = time.monotonic()
        self._all = [t for t in self._all if now - t < 1.0]
        if len(self._all) >= self.per_second:
            self.refused["overall"] += 1
            return 1
        sent = self._chats.setdefault(chat_id, [])
        if chat_id < 0:
            sent[:] = [t for t in sent if now - t < 60.0]
            if len(sent) >= self.per_group_minute:
                self.refused["group"] += 1
                return max(1, int(60.0 - (now - sent[0])) + 1)
        else:
            sent[:] = [t for t in sent if now - t < 1.0]
            if len(sent) >= self.per_chat_burst:
                self.refused["chat"] += 1
                return 1
        self._all.append(now)
        sent.append(now)
        self.accepted.append((now, method, chat_id))
        return None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class _ApiError(Exception):
    def __init__(self, status: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.description = description


def _check_html(params: dict[str, Any], text: str) -> None:
    """Reject the unescaped `<`/`&` that make the real server refuse an HTML message."""
    if str(params.get("parse_mode", "")).upper() != "HTML":
        return
    import re

    allowed = r"</?(b|i|u|s|code|pre|a|blockquote|tg-spoiler)(\s[^>]*)?>"
    stripped = re.sub(allowed, "", text)
    stripped = re.sub(r"&(lt|gt|amp|quot|#\d+|#x[0-9a-fA-F]+);", "", stripped)
    if "<" in stripped or ">" in stripped or "&" in stripped:
        raise _ApiError(400, "Bad Request: can't parse entities: unsupported start tag")
