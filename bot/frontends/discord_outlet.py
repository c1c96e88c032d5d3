"""Discord transport for the shared delivery: edits, posts and deletes messages from a
job's stored reply target, which holds the interaction's application id and token
(valid 15 minutes), the channel, the requester and the upload limit Discord reported.

While the token lives, the status message is the interaction's original response and the
song a followup; after it expires, both go through the channel (or the requester's DMs
when the bot cannot post there: a user-installed app in a server it is not in).
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import discord

from bot.chat.markup import clip
from bot.chat.replies import SongCard, StatusView
from bot.engine.contract import DeliveryError, RenderedSong
from bot.frontends import discord_render as render
from bot.timing import within

log = logging.getLogger("acestep.discord")

TOKEN_LIFETIME_S = 15 * 60
# A followup started just before expiry may still be uploading when the token dies.
TOKEN_SAFETY_S = 90
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024
LOGIN_WAIT_S = 60.0
ORIGINAL: Any = "@original"  # the webhook message routes accept it in place of an id
MENTIONS = discord.AllowedMentions(everyone=False, roles=False, users=True)


class DiscordOutlet:
    """Sends the shared models to Discord for the engine's jobs."""

    platform = "discord"

    def __init__(self, client: discord.Client, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self._clock = clock
        self.logged_in = asyncio.Event()

    async def ready(self) -> None:
        try:
            await within(self.logged_in.wait(), LOGIN_WAIT_S)
        except TimeoutError:
            raise DeliveryError("the Discord front-end is not connected") from None

    def upload_limit(self, target: dict[str, Any]) -> int:
        return int(target.get("upload_limit") or DEFAULT_UPLOAD_LIMIT)

    def working(self, target: dict[str, Any], job_id: str, active: bool) -> None:
        """Discord shows the status message; no typing indicator is needed."""

    def bot_name(self) -> str | None:
        user = self.client.user
        return user.name if user is not None else None

    # ---- the status message ----

    async def edit_status(self, target: dict[str, Any], view: StatusView) -> bool:
        """Edit it via the interaction while it lives, else through the channel."""
        content, buttons = render.status_content(view)
        if self.client.is_closed() or not self.logged_in.is_set():
            return False
        try:
            if self.token_usable(target):
                await self.webhook(target).edit_message(ORIGINAL, content=content, view=buttons)
                return True
            message = self._status_message(target)
            if message is None:
                return False
            await message.edit(content=content, view=buttons)
            return True
        except discord.NotFound:
            return False
        except discord.HTTPException as exc:
            log.info("Could not edit a Discord status message: %s", http_text(exc))
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.info("Could not edit a Discord status message: %s", type(exc).__name__)
        return False

    async def remove_status(self, target: dict[str, Any]) -> bool:
        return await self._delete(
            target, ORIGINAL, target.get("channel_id"), target.get("status_message_id"), "status"
        )

    async def remove_song(self, target: dict[str, Any]) -> bool:
        message_id = target.get("result_message_id")
        if not message_id:
            return False
        channel_id = target.get("result_channel_id") or target.get("channel_id")
        return await self._delete(target, int(message_id), channel_id, message_id, "song")

    async def _delete(
        self,
        target: dict[str, Any],
        via_webhook: Any,
        channel_id: str | None,
        message_id: str | None,
        what: str,
    ) -> bool:
        """Delete a message: through the interaction while its token lives, else through
        its channel (the bot's own message). True when it is gone."""
        try:
            if self.token_usable(target):
                try:
                    await self.webhook(target).delete_message(via_webhook)
                    return True
                except discord.NotFound:
                    pass  # gone, or posted through the channel after all: look there
            if not (channel_id and message_id):
                # Nowhere else to look: an interaction's original it said is gone, is.
                return via_webhook is ORIGINAL and self.token_usable(target)
            channel = self.client.get_partial_messageable(int(channel_id))
            await channel.get_partial_message(int(message_id)).delete()
            return True
        except discord.NotFound:
            return True  # already gone
        except discord.HTTPException as exc:
            log.info("Could not delete a Discord %s message: %s", what, http_text(exc))
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.info("Could not delete a Discord %s message: %s", what, type(exc).__name__)
        return False

    def _status_message(self, target: dict[str, Any]) -> discord.PartialMessage | None:
        if not (target.get("status_message_id") and target.get("channel_id")):
            return None
        channel = self.client.get_partial_messageable(int(target["channel_id"]))
        return channel.get_partial_message(int(target["status_message_id"]))

    # ---- posting ----

    async def post_song(
        self, target: dict[str, Any], card: SongCard, song: RenderedSong
    ) -> dict[str, Any]:
        cover_name = "cover.jpg" if song.cover else None
        embed = render.song_embed(card, cover_name)
        view = render.view_of(card.buttons)

        def files() -> list[discord.File]:
            out = [discord.File(song.path, filename=card.file_name)]
            if song.cover:
                out.append(discord.File(io.BytesIO(song.cover), filename="cover.jpg"))
            return out

        message = await self._post(
            target, f"<@{target.get('user_id')}> your song is ready.", files, embed=embed, view=view
        )
        in_place = str(message.channel.id) == str(target.get("channel_id"))  # else a DM
        url = jump_url(target.get("guild_id") if in_place else None, message.channel.id, message.id)
        return {
            "result_url": url,
            "result_message_id": str(message.id),
            "result_channel_id": str(message.channel.id),
        }

    async def post_notice(self, target: dict[str, Any], view: StatusView) -> None:
        content, buttons = render.status_content(view)
        await self._post(target, f"<@{target.get('user_id')}> {content}", list, view=buttons)

    async def _post(
        self,
        target: dict[str, Any],
        late_content: str,
        files: Callable[[], list[discord.File]],
        **kwargs: Any,
    ) -> discord.Message:
        """A followup while the token lives, else a channel message or a DM."""
        if self.token_usable(target):
            try:
                return await self.webhook(target).send(files=files(), wait=True, **kwargs)
            except discord.HTTPException as exc:
                if not token_dead(exc):
                    raise delivery_error("Discord refused the message", exc) from None
                log.info("interaction token expired; posting to the channel instead")
        return await self._post_later(target, late_content, files, **kwargs)

    async def _post_later(
        self,
        target: dict[str, Any],
        content: str,
        files: Callable[[], list[discord.File]],
        **kwargs: Any,
    ) -> discord.Message:
        channel_id = target.get("channel_id")
        failure: discord.HTTPException | None = None
        if channel_id:
            channel = self.client.get_partial_messageable(int(channel_id))
            try:
                return await channel.send(
                    content, files=files(), allowed_mentions=MENTIONS, **kwargs
                )
            except (discord.Forbidden, discord.NotFound) as exc:
                failure = exc
            except discord.HTTPException as exc:
                raise delivery_error(f"cannot post in Discord channel {channel_id}", exc) from None
        user_id = target.get("user_id")
        if not user_id:
            raise DeliveryError("the job has nowhere on Discord to post to", permanent=True)
        try:
            dm = await self.client.create_dm(discord.Object(int(user_id)))
            return await dm.send(content, files=files(), allowed_mentions=MENTIONS, **kwargs)
        except discord.HTTPException as exc:
            raise delivery_error(
                f"cannot post in channel {channel_id} "
                f"({http_text(failure) if failure else 'none'}) nor in the requester's DMs",
                exc,
            ) from None

    # ---- the interaction token ----

    def token_usable(self, target: dict[str, Any]) -> bool:
        expires = float(target.get("token_expires_at") or 0)
        return bool(target.get("interaction_token")) and self._clock() < expires - TOKEN_SAFETY_S

    def webhook(self, target: dict[str, Any]) -> discord.Webhook:
        """The interaction's followup webhook, rebuilt from the stored reply target."""
        return discord.Webhook.from_state(
            data={
                "id": int(target["application_id"]),
                "type": 3,
                "token": target["interaction_token"],
            },
            state=self.client._connection,
        )


def jump_url(guild_id: str | None, channel_id: int, message_id: int) -> str:
    return f"https://discord.com/channels/{guild_id or '@me'}/{channel_id}/{message_id}"


def token_dead(exc: discord.HTTPException) -> bool:
    """Discord's answer to an expired or unknown interaction token."""
    return exc.status in (401, 404) or exc.code in (10015, 50027)


def delivery_error(what: str, exc: discord.HTTPException) -> DeliveryError:
    # A 4xx (missing access, file too large) will not change on retry; 5xx might.
    return DeliveryError(f"{what}: {http_text(exc)}", permanent=400 <= exc.status < 500)


def http_text(exc: discord.HTTPException) -> str:
    return f"HTTP {exc.status} ({exc.code}) {clip(exc.text or '', 200)}"
