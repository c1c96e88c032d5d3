"""A fake Discord API (aiohttp on 127.0.0.1): REST, a minimal gateway, payload builders.

It speaks the parts of Discord's HTTP API the bot uses, with Discord's shapes: login
(`/users/@me`, `/oauth2/applications/@me`), command sync (bulk overwrite), interaction
callbacks (`?with_response=1` answers), webhook followups and original-response edits,
channel messages; JSON or multipart (`payload_json` + `files[n]`) bodies. Errors use
Discord's `{"message", "code"}` bodies: 401 50027 for a dead interaction token, 413 40005
for a file over the interaction's `attachment_size_limit`, 400 40060 for a second
response, and 429s (with `retry_after` and a `Via` header, as Discord sends them) on demand.
The behaviour of a followup right after a deferral (it edits the loading message, keeping
its visibility) follows Discord's documentation. The gateway at `/gateway` says HELLO,
answers IDENTIFY with READY and heartbeats with ACKs, and sends dispatches on demand.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import BodyPartReader, web

from tests.fakes.http import json_response

EPHEMERAL = 1 << 6
LOADING = 1 << 7
# VIEW_CHANNEL | SEND_MESSAGES | EMBED_LINKS | ATTACH_FILES | READ_MESSAGE_HISTORY
BOT_PERMISSIONS = (1 << 10) | (1 << 11) | (1 << 14) | (1 << 15) | (1 << 16)
MANAGE_GUILD = 1 << 5
MEMBER_PERMISSIONS = BOT_PERMISSIONS
DISCORD_EPOCH_MS = 1420070400000

_ids = itertools.count(1)


def snowflake(when: datetime | None = None) -> str:
    """A Discord id whose timestamp is `when` (now by default), unique in this process."""
    when = when or datetime.now(UTC)
    ms = int(when.timestamp() * 1000) - DISCORD_EPOCH_MS
    return str((ms << 22) | (next(_ids) & 0x3FFFFF))


def user_payload(user_id: str, name: str = "user", *, bot: bool = False) -> dict[str, Any]:
    return {
        "id": user_id,
        "username": name,
        "discriminator": "0",
        "global_name": name,
        "avatar": None,
        "bot": bot,
        "public_flags": 0,
    }


@dataclass
class Attachment:
    filename: str
    data: bytes
    content_type: str | None


@dataclass
class FakeMessage:
    """A message as the fake stores it; `payload()` is Discord's message object."""

    id: str
    channel_id: str
    origin: str  # "original" | "followup" | "channel"
    content: str = ""
    embeds: list[dict[str, Any]] = field(default_factory=list)
    components: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    flags: int = 0
    interaction_id: str | None = None
    author_id: str = ""
    deleted: bool = False
    edits: list[float] = field(default_factory=list)  # monotonic times of each edit
    history: list[str] = field(default_factory=list)  # every content it showed

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & EPHEMERAL)

    @property
    def custom_ids(self) -> list[str]:
        return [
            c["custom_id"]
            for row in self.components
            for c in row.get("components", [])
            if "custom_id" in c
        ]

    def payload(self, bot: dict[str, Any], app_id: str) -> dict[str, Any]:
        now = datetime.now(UTC).isoformat()
        return {
            "id": self.id,
            "channel_id": self.channel_id,
            "type": 0 if self.origin == "channel" else 20,
            "content": self.content,
            "embeds": self.embeds,
            "components": self.components,
            "flags": self.flags,
            "author": bot,
            "attachments": [
                {
                    "id": f"{self.id}{i}",
                    "filename": a.filename,
                    "size": len(a.data),
                    "url": f"https://cdn.invalid/attachments/{self.id}/{a.filename}",
                    "proxy_url": f"https://media.invalid/attachments/{self.id}/{a.filename}",
                    "content_type": a.content_type,
                }
                for i, a in enumerate(self.attachments)
            ],
            "mentions": [],
            "mention_roles": [],
            "mention_everyone": False,
            "pinned": False,
            "tts": False,
            "timestamp": now,
            "edited_timestamp": now if self.edits else None,
            **(
                {"application_id": app_id, "webhook_id": app_id} if self.origin != "channel" else {}
            ),
        }


@dataclass
class FakeInteraction:
    id: str
    token: str
    channel_id: str
    attachment_size_limit: int
    responded: int | None = None  # callback type used
    original_id: str | None = None
    expired: bool = False
    message_id: str | None = None  # a component's message (UPDATE_MESSAGE edits it)


@dataclass
class RateLimitRule:
    method: str
    path: re.Pattern[str]
    retry_after: float
    remaining: int


class FakeDiscord:
    """State and routes of the fake Discord API; serve `app()` with tests.fakes.http.serve."""

    def __init__(
        self,
        *,
        token: str = "fake-bot-token",
        app_id: str = "900000000000000001",
        upload_limit: int = 10 * 1024 * 1024,
        recommended_shards: int = 1,
    ) -> None:
        self.token = token
        self.recommended_shards = recommended_shards  # what /gateway/bot answers
        self.app_id = app_id
        self.bot = user_payload("900000000000000002", "songbot", bot=True)
        self.upload_limit = upload_limit
        self.messages: dict[str, FakeMessage] = {}
        self.interactions: dict[str, FakeInteraction] = {}
        self.callbacks: list[dict[str, Any]] = []  # every interaction callback body
        self.modals: list[dict[str, Any]] = []  # modal callback data, latest last
        self.syncs: list[tuple[str, list[dict[str, Any]]]] = []  # (path, commands)
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self.rate_limited: list[tuple[str, str]] = []  # requests answered 429
        self._rules: list[RateLimitRule] = []
        self._changed = asyncio.Event()
        self.forbidden_channels: set[str] = set()  # the bot may not post there (50001)
        self.dm_channels: dict[str, str] = {}  # DM channel id -> recipient user id
        # Gateway: what clients sent when connecting, and the open socket.
        self.gateway_queries: list[dict[str, str]] = []
        self.identifies: list[dict[str, Any]] = []
        # One socket per shard id (0 without IDENTIFY's `shard`), like Discord's routing.
        self._sockets: dict[int, web.WebSocketResponse] = {}
        self._sequence = 0
        # Users' attachments by id (served at /attachments/<id>/<name>) and the ids fetched.
        self.files: dict[str, bytes] = {}
        self.downloads: list[str] = []

    # ---- test controls ----

    def rate_limit_next(
        self, method: str, path_regex: str, *, retry_after: float = 0.05, times: int = 1
    ) -> None:
        """Answer the next `times` matching requests with Discord's 429."""
        self._rules.append(RateLimitRule(method, re.compile(path_regex), retry_after, times))

    def expire_tokens(self) -> None:
        """Every interaction token known so far stops working (15 minutes passed)."""
        for inter in self.interactions.values():
            inter.expired = True

    def visible(self) -> list[FakeMessage]:
        return [m for m in self.messages.values() if not m.deleted]

    def with_file(self) -> list[FakeMessage]:
        return [m for m in self.visible() if m.attachments]

    async def wait_until(self, predicate: Callable[[], Any], within: float = 10.0) -> Any:
        """Wait for a condition on the fake's state (re-checked on every request)."""
        deadline = time.monotonic() + within
        while True:
            value = predicate()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("timed out waiting for the fake Discord state")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.05))
            except TimeoutError:
                pass

    # ---- payload builders ----

    def slash(self, name: str, options: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        """An INTERACTION_CREATE payload for `/name option:value ...`."""
        opts = [
            {"name": k, "type": _option_type(v), "value": v} for k, v in (options or {}).items()
        ]
        data = {"id": snowflake(), "name": name, "type": 1, "options": opts}
        return self._interaction(2, data, **kw)

    def slash_with_file(
        self,
        name: str,
        options: dict[str, Any],
        *,
        base_url: str,
        data: bytes,
        filename: str = "song.mp3",
        content_type: str = "audio/mpeg",
        option: str = "audio",
        declared_size: int | None = None,
        **kw: Any,
    ) -> dict[str, Any]:
        """`/name audio:<file> ...`: an attachment option (type 11) whose value is the
        attachment id, described in `data.resolved.attachments` as Discord does; the file
        is served at its `url` (this fake's /attachments/..., standing in for the CDN)."""
        aid = snowflake()
        self.files[aid] = data
        payload = self.slash(name, options, **kw)
        payload["data"]["options"].append({"name": option, "type": 11, "value": aid})
        payload["data"]["resolved"] = {
            "attachments": {
                aid: {
                    "id": aid,
                    "filename": filename,
                    "size": len(data) if declared_size is None else declared_size,
                    "url": f"{base_url}/attachments/{aid}/{filename}",
                    "proxy_url": f"{base_url}/attachments/{aid}/{filename}",
                    "content_type": content_type,
                }
            }
        }
        return payload

    def user_message_with_file(
        self,
        *,
        base_url: str,
        data: bytes,
        filename: str = "song.mp3",
        content_type: str = "audio/mpeg",
        channel_id: str = "300000000000000001",
        author_id: str = "100000000000000009",
    ) -> dict[str, Any]:
        """A message a user posted with one attachment (its file served by this fake), as
        Discord describes it in an interaction's `resolved.messages`."""
        mid, aid = snowflake(), snowflake()
        self.files[aid] = data
        url = f"{base_url}/attachments/{aid}/{filename}"
        return {
            "id": mid,
            "channel_id": channel_id,
            "type": 0,
            "content": "",
            "embeds": [],
            "components": [],
            "flags": 0,
            "author": user_payload(author_id, "someone"),
            "attachments": [
                {
                    "id": aid,
                    "filename": filename,
                    "size": len(data),
                    "url": url,
                    "proxy_url": url,
                    "content_type": content_type,
                }
            ],
            "mentions": [],
            "mention_roles": [],
            "mention_everyone": False,
            "pinned": False,
            "tts": False,
            "timestamp": datetime.now(UTC).isoformat(),
            "edited_timestamp": None,
        }

    def message_command(self, name: str, message: dict[str, Any], **kw: Any) -> dict[str, Any]:
        """A message context menu command (type 3) used on `message`."""
        data = {
            "id": snowflake(),
            "name": name,
            "type": 3,
            "target_id": message["id"],
            "resolved": {"messages": {message["id"]: message}},
        }
        return self._interaction(2, data, **kw)

    async def _attachment(self, request: web.Request) -> web.Response:
        aid = request.match_info["aid"]
        self.downloads.append(aid)
        data = self.files.get(aid)
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="application/octet-stream")

    def autocomplete(self, name: str, option: str, typed: str, **kw: Any) -> dict[str, Any]:
        """The user is typing `typed` into `/name option:`."""
        data = {
            "id": snowflake(),
            "name": name,
            "type": 1,
            "options": [{"name": option, "type": 3, "value": typed, "focused": True}],
        }
        return self._interaction(4, data, **kw)

    def button(self, custom_id: str, message: FakeMessage, **kw: Any) -> dict[str, Any]:
        """A click on a button of `message`."""
        data = {"custom_id": custom_id, "component_type": 2}
        return self._interaction(3, data, message=message.payload(self.bot, self.app_id), **kw)

    def modal_submit(self, custom_id: str, values: dict[str, str], **kw: Any) -> dict[str, Any]:
        """A modal submitted with `values` by text input custom_id (Label layout)."""
        comps = [
            {
                "type": 18,
                "id": i + 1,
                "component": {"type": 4, "id": i + 100, "custom_id": k, "value": v},
            }
            for i, (k, v) in enumerate(values.items())
        ]
        return self._interaction(5, {"custom_id": custom_id, "components": comps}, **kw)

    def _interaction(
        self,
        kind: int,
        data: dict[str, Any],
        *,
        user_id: str = "100000000000000001",
        user_name: str = "alice",
        guild_id: str | None = "200000000000000001",
        channel_id: str = "300000000000000001",
        app_permissions: int = BOT_PERMISSIONS,
        member_permissions: int = MEMBER_PERMISSIONS,
        attachment_size_limit: int | None = None,
        created_at: datetime | None = None,
        message: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        iid = snowflake(created_at)
        token = "itok-" + secrets.token_urlsafe(24)
        limit = attachment_size_limit or self.upload_limit
        self.interactions[iid] = FakeInteraction(
            iid, token, channel_id, limit, message_id=message["id"] if message else None
        )
        user = user_payload(user_id, user_name)
        payload: dict[str, Any] = {
            "id": iid,
            "application_id": self.app_id,
            "type": kind,
            "data": data,
            "token": token,
            "version": 1,
            "channel_id": channel_id,
            "app_permissions": str(app_permissions),
            "locale": "en-US",
            "entitlements": [],
            "attachment_size_limit": limit,
        }
        if guild_id:
            payload.update(
                guild_id=guild_id,
                guild_locale="en-US",
                context=0,
                authorizing_integration_owners={"0": guild_id},
                channel={
                    "id": channel_id,
                    "type": 0,
                    "guild_id": guild_id,
                    "name": "music",
                    "position": 0,
                    "permission_overwrites": [],
                    "nsfw": False,
                    "parent_id": None,
                },
                member={
                    "user": user,
                    "roles": [],
                    "joined_at": "2024-01-01T00:00:00+00:00",
                    "permissions": str(member_permissions),
                    "deaf": False,
                    "mute": False,
                    "flags": 0,
                },
            )
        else:
            payload.update(
                context=1,
                user=user,
                authorizing_integration_owners={"1": user_id},
                channel={"id": channel_id, "type": 1, "recipients": [user], "flags": 0},
            )
        if message is not None:
            payload["message"] = message
        return payload

    # ---- the app ----

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._middleware])
        r = app.router
        r.add_get("/api/v10/users/@me", self._me)
        r.add_get("/api/v10/oauth2/applications/@me", self._application)
        r.add_put("/api/v10/applications/{app}/commands", self._sync)
        r.add_put("/api/v10/applications/{app}/guilds/{guild}/commands", self._sync)
        r.add_post("/api/v10/interactions/{iid}/{token}/callback", self._callback)
        r.add_post("/api/v10/webhooks/{app}/{token}", self._followup)
        r.add_get("/api/v10/webhooks/{app}/{token}/messages/{mid}", self._get_webhook_message)
        r.add_patch("/api/v10/webhooks/{app}/{token}/messages/{mid}", self._edit_webhook_message)
        r.add_delete("/api/v10/webhooks/{app}/{token}/messages/{mid}", self._delete_webhook_message)
        r.add_post("/api/v10/users/@me/channels", self._open_dm)
        r.add_post("/api/v10/channels/{cid}/messages", self._channel_post)
        r.add_patch("/api/v10/channels/{cid}/messages/{mid}", self._channel_edit)
        r.add_delete("/api/v10/channels/{cid}/messages/{mid}", self._channel_delete)
        r.add_get("/gateway", self._gateway)
        r.add_get("/api/v10/gateway/bot", self._gateway_bot)
        r.add_get("/attachments/{aid}/{name}", self._attachment)
        return app

    # ---- gateway (JSON text frames; a client's binary-only decompressor is not needed) ----

    async def _gateway_bot(self, request: web.Request) -> web.Response:
        url = f"ws://{request.host}/gateway"
        return json_response(
            {
                "url": url,
                "shards": self.recommended_shards,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 999,
                    "reset_after": 0,
                    "max_concurrency": 1,
                },
            }
        )

    def shard_of(self, guild_id: str | None) -> int:
        """The shard Discord sends a guild's events on: (guild_id >> 22) % num_shards."""
        identified = [d.get("shard") for d in self.identifies if d.get("shard")]
        count = identified[-1][1] if identified else 1
        return (int(guild_id) >> 22) % count if guild_id else 0

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.gateway_queries.append(dict(request.query))
        shard_id: int | None = None
        await ws.send_json({"op": 10, "d": {"heartbeat_interval": 41250}, "s": None, "t": None})
        async for frame in ws:
            message = json.loads(frame.data)
            if message["op"] == 2:  # IDENTIFY
                self.identifies.append(message["d"])
                self._changed.set()
                if message["d"].get("token") != self.token:
                    await ws.close(code=4004, message=b"Authentication failed.")
                    break
                shard = message["d"].get("shard") or [0, 1]
                if not (isinstance(shard, list) and len(shard) == 2 and 0 <= shard[0] < shard[1]):
                    await ws.close(code=4010, message=b"Invalid shard.")
                    break
                shard_id = int(shard[0])
                self._sockets[shard_id] = ws
                url = f"ws://{request.host}/gateway"
                await self.send_to(
                    ws,
                    "READY",
                    {
                        "v": 10,
                        "user": self.bot,
                        "guilds": [],
                        "session_id": f"fake-session-{shard_id}",
                        "resume_gateway_url": url,
                        "private_channels": [],
                        "application": {"id": self.app_id, "flags": 0},
                        "shard": shard,
                    },
                )
            elif message["op"] == 1:  # HEARTBEAT
                await ws.send_json({"op": 11, "d": None, "s": None, "t": None})
        if shard_id is not None and self._sockets.get(shard_id) is ws:
            del self._sockets[shard_id]
        return ws

    def connected_shards(self) -> list[int]:
        return sorted(self._sockets)

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Send a DISPATCH event (e.g. INTERACTION_CREATE) on the shard its guild is on."""
        shard = self.shard_of(data.get("guild_id"))
        socket = self._sockets.get(shard)
        if socket is None:
            raise AssertionError(f"no client is connected on shard {shard} of the fake gateway")
        await self.send_to(socket, event, data)

    async def send_to(self, ws: web.WebSocketResponse, event: str, data: dict[str, Any]) -> None:
        self._sequence += 1
        await ws.send_json({"op": 0, "t": event, "s": self._sequence, "d": data})

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        try:
            for rule in self._rules:
                if (
                    rule.remaining > 0
                    and rule.method == request.method
                    and rule.path.search(request.path)
                ):
                    rule.remaining -= 1
                    self.rate_limited.append((request.method, request.path))
                    return json_response(
                        {
                            "message": "You are being rate limited.",
                            "retry_after": rule.retry_after,
                            "global": False,
                        },
                        status=429,
                        headers={
                            "Via": "1.1 google",
                            "Retry-After": str(rule.retry_after),
                            "X-RateLimit-Scope": "user",
                        },
                    )
            # Interaction webhooks carry their token in the path; the gateway, in IDENTIFY;
            # attachment URLs (the CDN's) are signed URLs anyone holding them may fetch.
            needs_bot_auth = not request.path.startswith(
                ("/api/v10/webhooks/", "/api/v10/interactions/", "/gateway", "/attachments/")
            )
            if needs_bot_auth and request.headers.get("Authorization") != f"Bot {self.token}":
                return _error(401, 0, "401: Unauthorized")
            return await handler(request)
        finally:
            self._changed.set()

    async def _me(self, request: web.Request) -> web.Response:
        return json_response(self.bot)

    async def _application(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "id": self.app_id,
                "name": "songbot",
                "icon": None,
                "description": "",
                "bot_public": True,
                "bot_require_code_grant": False,
                "verify_key": "00" * 32,
                "owner": user_payload("100000000000000009", "owner"),
                "flags": 0,
                "team": None,
                "summary": "",
                "rpc_origins": [],
                "bot": self.bot,
                "interactions_endpoint_url": None,
            }
        )

    async def _sync(self, request: web.Request) -> web.Response:
        if request.match_info["app"] != self.app_id:
            return _error(404, 10002, "Unknown Application")
        commands = await request.json()
        self.syncs.append((request.path, commands))
        # Discord answers every command with a description ("" for context menus).
        out = [
            {
                "description": "",
                **c,
                "id": snowflake(),
                "application_id": self.app_id,
                "version": snowflake(),
            }
            for c in commands
        ]
        return json_response(out)

    async def _callback(self, request: web.Request) -> web.Response:
        inter = self.interactions.get(request.match_info["iid"])
        if inter is None or inter.token != request.match_info["token"]:
            return _error(404, 10062, "Unknown interaction")
        if inter.expired:
            return _error(404, 10062, "Unknown interaction")
        if inter.responded is not None:
            return _error(400, 40060, "Interaction has already been acknowledged.")
        body, files = await _read_body(request)
        if _too_large(files, inter.attachment_size_limit):
            return _error(413, 40005, "Request entity too large")
        kind = int(body["type"])
        data = body.get("data") or {}
        self.callbacks.append(body)
        inter.responded = kind
        answer: dict[str, Any] = {"id": inter.id, "type": kind}
        resource: dict[str, Any] = {"type": kind}
        if kind in (4, 5):
            msg = FakeMessage(
                snowflake(),
                inter.channel_id,
                "original",
                interaction_id=inter.id,
                author_id=self.bot["id"],
            )
            _apply(msg, data, files)
            msg.flags = int(data.get("flags") or 0) | (LOADING if kind == 5 else 0)
            self.messages[msg.id] = msg
            inter.original_id = msg.id
            answer.update(
                response_message_id=msg.id,
                response_message_loading=kind == 5,
                response_message_ephemeral=msg.ephemeral,
            )
            resource["message"] = msg.payload(self.bot, self.app_id)
        elif kind == 7 and inter.message_id in self.messages:
            # UPDATE_MESSAGE: a component's interaction edits the message it is on.
            _apply(self.messages[inter.message_id], data, files, keep_flags=True)
        elif kind == 9:
            self.modals.append(data)
        return json_response({"interaction": answer, "resource": resource})

    def _by_token(self, request: web.Request) -> FakeInteraction | web.Response:
        token = request.match_info["token"]
        if request.match_info["app"] != self.app_id:
            return _error(404, 10015, "Unknown Webhook")
        for inter in self.interactions.values():
            if inter.token == token:
                if inter.expired:
                    return _error(401, 50027, "Invalid Webhook Token")
                if inter.responded is None:
                    return _error(404, 10015, "Unknown Webhook")
                return inter
        return _error(401, 50027, "Invalid Webhook Token")

    def _webhook_message(self, inter: FakeInteraction, mid: str) -> FakeMessage | None:
        if mid == "@original":
            mid = inter.original_id or ""
        msg = self.messages.get(mid)
        if msg is None or msg.deleted or msg.interaction_id != inter.id:
            return None
        return msg

    async def _followup(self, request: web.Request) -> web.Response:
        inter = self._by_token(request)
        if isinstance(inter, web.Response):
            return inter
        body, files = await _read_body(request)
        if _too_large(files, inter.attachment_size_limit):
            return _error(413, 40005, "Request entity too large")
        original = self.messages.get(inter.original_id or "")
        if original is not None and not original.deleted and original.flags & LOADING:
            # Discord: the first followup after a deferral edits the loading message and
            # keeps its visibility (the ephemeral flag is ignored).
            original.flags &= ~LOADING
            _apply(original, body, files, keep_flags=True)
            original.edits.append(time.monotonic())
            return json_response(original.payload(self.bot, self.app_id))
        msg = FakeMessage(
            snowflake(),
            inter.channel_id,
            "followup",
            flags=int(body.get("flags") or 0),
            interaction_id=inter.id,
            author_id=self.bot["id"],
        )
        _apply(msg, body, files)
        self.messages[msg.id] = msg
        return json_response(msg.payload(self.bot, self.app_id))

    async def _get_webhook_message(self, request: web.Request) -> web.Response:
        inter = self._by_token(request)
        if isinstance(inter, web.Response):
            return inter
        msg = self._webhook_message(inter, request.match_info["mid"])
        if msg is None:
            return _error(404, 10008, "Unknown Message")
        return json_response(msg.payload(self.bot, self.app_id))

    async def _edit_webhook_message(self, request: web.Request) -> web.Response:
        inter = self._by_token(request)
        if isinstance(inter, web.Response):
            return inter
        msg = self._webhook_message(inter, request.match_info["mid"])
        if msg is None:
            return _error(404, 10008, "Unknown Message")
        body, files = await _read_body(request)
        if _too_large(files, inter.attachment_size_limit):
            return _error(413, 40005, "Request entity too large")
        msg.flags &= ~LOADING
        _apply(msg, body, files, keep_flags=True)
        msg.edits.append(time.monotonic())
        return json_response(msg.payload(self.bot, self.app_id))

    async def _delete_webhook_message(self, request: web.Request) -> web.Response:
        inter = self._by_token(request)
        if isinstance(inter, web.Response):
            return inter
        msg = self._webhook_message(inter, request.match_info["mid"])
        if msg is None:
            return _error(404, 10008, "Unknown Message")
        msg.deleted = True
        return web.Response(status=204)

    async def _open_dm(self, request: web.Request) -> web.Response:
        user_id = str((await request.json())["recipient_id"])
        channel_id = next((c for c, u in self.dm_channels.items() if u == user_id), None)
        if channel_id is None:
            channel_id = snowflake()
            self.dm_channels[channel_id] = user_id
        return json_response(
            {
                "id": channel_id,
                "type": 1,
                "last_message_id": None,
                "flags": 0,
                "recipients": [user_payload(user_id)],
            }
        )

    async def _channel_post(self, request: web.Request) -> web.Response:
        if request.match_info["cid"] in self.forbidden_channels:
            return _error(403, 50001, "Missing Access")
        body, files = await _read_body(request)
        if _too_large(files, self.upload_limit):
            return _error(413, 40005, "Request entity too large")
        msg = FakeMessage(
            snowflake(), request.match_info["cid"], "channel", author_id=self.bot["id"]
        )
        _apply(msg, body, files)
        self.messages[msg.id] = msg
        return json_response(msg.payload(self.bot, self.app_id))

    async def _channel_edit(self, request: web.Request) -> web.Response:
        msg = self.messages.get(request.match_info["mid"])
        if msg is None or msg.deleted or msg.channel_id != request.match_info["cid"]:
            return _error(404, 10008, "Unknown Message")
        if msg.ephemeral:
            return _error(404, 10008, "Unknown Message")
        body, files = await _read_body(request)
        _apply(msg, body, files, keep_flags=True)
        msg.edits.append(time.monotonic())
        return json_response(msg.payload(self.bot, self.app_id))

    async def _channel_delete(self, request: web.Request) -> web.Response:
        """DELETE /channels/{id}/messages/{id}: a bot may delete its own messages."""
        msg = self.messages.get(request.match_info["mid"])
        if msg is None or msg.deleted or msg.channel_id != request.match_info["cid"]:
            return _error(404, 10008, "Unknown Message")
        if msg.ephemeral:
            return _error(404, 10008, "Unknown Message")
        msg.deleted = True
        return web.Response(status=204)


def _error(status: int, code: int, message: str) -> web.Response:
    return json_response({"message": message, "code": code}, status=status)


def _option_type(value: Any) -> int:
    if isinstance(value, bool):
        return 5
    if isinstance(value, int):
        return 4
    if isinstance(value, float):
        return 10
    return 3


def _too_large(files: list[Attachment], limit: int) -> bool:
    return any(len(f.data) > limit for f in files)


async def _read_body(request: web.Request) -> tuple[dict[str, Any], list[Attachment]]:
    """A JSON body, or multipart `payload_json` + `files[n]` parts."""
    if not request.can_read_body:
        return {}, []
    if request.content_type.startswith("multipart/"):
        body: dict[str, Any] = {}
        files: list[Attachment] = []
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                continue  # discord.py never nests multiparts
            data = await part.read()
            if part.name == "payload_json":
                body = json.loads(data)
            elif part.name and part.name.startswith("files["):
                files.append(
                    Attachment(
                        part.filename or part.name, bytes(data), part.headers.get("Content-Type")
                    )
                )
        return body, files
    return await request.json(), []


def _apply(
    msg: FakeMessage, body: dict[str, Any], files: list[Attachment], *, keep_flags: bool = False
) -> None:
    """Apply a create/edit body to a message the way Discord does (absent = unchanged)."""
    if "content" in body:
        msg.content = body["content"] or ""
        msg.history.append(msg.content)
    if "embeds" in body:
        msg.embeds = body["embeds"] or []
    if "components" in body:
        msg.components = body["components"] or []
    if files:
        msg.attachments = list(files)
    elif "attachments" in body and not body["attachments"]:
        msg.attachments = []
    if not keep_flags and "flags" in body:
        msg.flags = int(body["flags"] or 0)
