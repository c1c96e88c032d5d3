"""The shared reply models as Telegram sees them: HTML text within Telegram's limits
(caption 1024, message 4096 characters) and inline keyboards. No wording lives here
(bot/chat/replies.py has it)."""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape as _escape

from telegram import InlineKeyboardButton, InlineKeyboardMarkup

from bot import messages
from bot.chat.markup import Bold, Code, Link, Mention, Muted, Span, Text, When, clip
from bot.chat.replies import Button, SongCard

CAPTION_LIMIT = 1024
MESSAGE_LIMIT = 4096
ALERT_LIMIT = 200  # answerCallbackQuery text
KEYS_PER_ROW = 3


def escape(text: str) -> str:
    """Escape text for Telegram HTML (quotes need no escaping outside attributes)."""
    return _escape(text, quote=False)


def _span(span: Span) -> str:
    if isinstance(span, str):
        return escape(span)
    if isinstance(span, Bold):
        return f"<b>{escape(span.text)}</b>"
    if isinstance(span, Code):
        return f"<code>{escape(span.text)}</code>"
    if isinstance(span, Link):
        return f'<a href="{_escape(span.url, quote=True)}">{escape(span.text)}</a>'
    if isinstance(span, When):
        if span.style == "relative":
            return escape(relative(span.at))
        return escape(datetime.fromtimestamp(span.at, UTC).strftime("%Y-%m-%d %H:%M UTC"))
    if isinstance(span, Mention):
        if span.kind == "user":
            return f'<a href="tg://user?id={int(span.id)}">{escape(span.name or span.id)}</a>'
        return escape(f"#{span.name or span.id}")
    if isinstance(span, Muted):
        return f"<i>{escape(span.text)}</i>"
    raise TypeError(span)


def html(text: Text) -> str:
    """A Text as Telegram HTML (may be longer than one message: see split_message)."""
    return "\n".join("".join(_span(s) for s in line) for line in text.lines)


def relative(at: float, now: float | None = None) -> str:
    """'in 5 h 12 min' for the future, 'just now' / '3 min ago' / the date for the past."""
    moment = datetime.fromtimestamp(at, UTC)
    current = datetime.fromtimestamp(now, UTC) if now is not None else datetime.now(UTC)
    if moment > current:
        return messages.until(moment, current)
    minutes = int((current - moment).total_seconds() // 60)
    if minutes < 1:
        return "just now"
    if minutes < 60:
        return f"{minutes} min ago"
    if minutes < 24 * 60:
        return f"{minutes // 60} h ago"
    return moment.strftime("%Y-%m-%d")


def keyboard(buttons: tuple[Button, ...]) -> InlineKeyboardMarkup | None:
    if not buttons:
        return None
    keys = [
        InlineKeyboardButton(f"{b.emoji} {b.label}".strip(), callback_data=b.payload)
        for b in buttons
    ]
    # Phones fit about three labelled buttons across.
    return InlineKeyboardMarkup(
        [keys[i : i + KEYS_PER_ROW] for i in range(0, len(keys), KEYS_PER_ROW)]
    )


def caption(card: SongCard) -> str:
    """The song's caption: what it was made from, seed, duration, provider; at most 1024
    characters (the text is cut before escaping, so no entity is split)."""
    written = [card.tags_line()] if card.tags else []
    tail = html(Text.from_lines([*written, card.numbers(), *((Muted(n),) for n in card.notes)]))
    head = f"<b>{escape(card.label)}</b> "
    room = CAPTION_LIMIT - len(head) - len(tail) - 1
    body = escape(card.description)
    if len(body) > room:
        plain = card.description[: room - 1]
        while len(escape(plain)) > room - 1:
            plain = plain[: len(plain) - (len(escape(plain)) - (room - 1))]
        body = escape(plain.rstrip()) + "\N{HORIZONTAL ELLIPSIS}"
    return head + body + "\n" + tail


def split_message(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Split text into messages of at most `limit` characters, at line breaks if possible."""
    chunks: list[str] = []
    rest = text
    while len(rest) > limit:
        cut = rest.rfind("\n", 0, limit + 1)
        if cut <= 0:
            cut = rest.rfind(" ", 0, limit + 1)
        if cut <= 0:
            cut = limit
        chunks.append(rest[:cut])
        rest = rest[cut:].lstrip("\n")
    if rest.strip():
        chunks.append(rest)
    return chunks


def alert(text: Text) -> str:
    """A popup's text: plain, at most 200 characters."""
    return clip(text.plain(), ALERT_LIMIT)
