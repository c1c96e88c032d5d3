"""Telegram command parsing and the texts the Telegram front-end shows.

Parsing turns `/song` and `/compose` message text into `GenerationRequest` fields with
the shared `parse_options`; formatting builds the HTML status lines, captions and lists
within Telegram's limits (caption 1024, message 4096 characters).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from html import escape as _escape
from typing import Any

from bot.requests import ALL_OPTIONS, InvalidRequest, Mode, OptionSpec, parse_options


def escape(text: str) -> str:
    """Escape text for Telegram HTML (quotes need no escaping outside attributes)."""
    return _escape(text, quote=False)


CAPTION_LIMIT = 1024
MESSAGE_LIMIT = 4096

# A token that looks like `name=value`; anything else is part of the prompt or tags.
_OPTION_TOKEN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)
INSTRUMENTAL_WORD = "instrumental"


def _split_options(words: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Separate plain words from `name=value` options and the bare `instrumental` flag."""
    plain: list[str] = []
    pairs: dict[str, str] = {}
    flag = False
    for word in words:
        match = _OPTION_TOKEN.match(word)
        if match:
            pairs[match.group(1).lower()] = match.group(2)
        elif word.lower() == INSTRUMENTAL_WORD:
            flag = True
        else:
            plain.append(word)
    fields = parse_options(pairs)
    if flag and "instrumental" not in fields:
        fields["instrumental"] = True
    return plain, fields


def parse_song(args: str) -> dict[str, Any]:
    """`/song <prompt words> [name=value ...] [instrumental]` -> request fields."""
    words, fields = _split_options(args.split())
    return {"mode": Mode.PROMPT, "prompt": " ".join(words), **fields}


def parse_compose(args: str, replied_text: str | None) -> dict[str, Any]:
    """`/compose <tags> [options]` with lyrics on the following lines (or the replied-to
    message) -> request fields. Lyrics are kept line for line."""
    first, _, rest = args.partition("\n")
    words, fields = _split_options(first.split())
    tags = ", ".join(t.strip() for t in " ".join(words).split(",") if t.strip())
    lyrics = rest if rest.strip() else (replied_text or "")
    return {"mode": Mode.SONG, "tags": tags, "lyrics": lyrics, **fields}


def _option_usage(spec: OptionSpec) -> str:
    if spec.kind is bool:
        return spec.name
    if spec.choices:
        return f"{spec.name}={'|'.join(spec.choices)}"
    if spec.kind is str:
        return f"{spec.name}=<{spec.usage or 'text'}>"
    lo = _num(spec.minimum)
    hi = _num(spec.maximum)
    return f"{spec.name}={lo}..{hi}"


def _num(value: float | None) -> str:
    if value is None:
        return "?"
    return str(int(value)) if float(value).is_integer() else str(value)


def options_text() -> str:
    """Every option a user can write, one per line with its range (plain text)."""
    return "\n".join(f"  {_option_usage(s)}  ({s.help})" for s in ALL_OPTIONS.values())


def invalid_request_text(exc: InvalidRequest) -> str:
    """The validation message as it is; option mistakes also list the valid options."""
    text = str(exc)
    if exc.field in ALL_OPTIONS or "known options" in exc.allowed:
        text += "\n\nValid options:\n" + options_text()
    return text


HELP_TEXT = (
    "🎵 I make songs with the ACE-Step music model.\n\n"
    "/song <description> [options] - a song from a description\n"
    "   e.g. /song lofi piano about rain duration=30\n"
    "/compose <tags> [options], then lyrics on the next lines (or reply to a message "
    "that holds the lyrics)\n"
    "   e.g. /compose synthpop, female vocals\n"
    "   [verse]\n   Neon rain on the window...\n"
    "/queue - your songs in progress\n"
    "/cancel [job] - stop a song (the latest one when no job is given)\n"
    "/quota - what you have left today\n"
    "/history - your recent songs\n"
    "/limits - this group's quotas (group admins)\n\n"
    "Options (name=value; write instrumental for no vocals):\n"
)


def help_text() -> str:
    return HELP_TEXT + options_text()


STATE_LABELS = {
    "queued": "⏳ Queued",
    "submitting": "🎛 Starting",
    "running": "🎶 Generating",
    "uploading": "📤 Uploading",
    "ready": "📤 Uploading",
    "delivered": "✅ Sent",
    "failed": "❌ Failed",
    "cancelled": "🚫 Cancelled",
}


def status_html(
    job_id: str,
    title: str,
    state: str,
    *,
    position: int | None = None,
    progress: float | None = None,
    note: str | None = None,
) -> str:
    """The one status message of a job, HTML: title, state, job id for /cancel."""
    line = STATE_LABELS.get(state, state)
    if state == "queued" and position is not None:
        line += f" - position {position}"
    elif state == "running" and progress is not None:
        line += f" - {max(0, min(100, round(progress * 100)))}%"
    else:
        line += "…" if state in ("submitting", "running", "uploading") else ""
    parts = [f"<b>{escape(_clip(title, 200))}</b>", line]
    if note:
        parts.append(escape(_clip(note, 600)))
    parts.append(f"Job <code>{escape(job_id)}</code>")
    return "\n".join(parts)


def final_html(job_id: str, title: str, state: str, message: str | None = None) -> str:
    """The last text of a job's status message (sent, failed or cancelled)."""
    parts = [f"<b>{escape(_clip(title, 200))}</b>", STATE_LABELS.get(state, state)]
    if message:
        parts.append(escape(_clip(message, 1500)))
    parts.append(f"Job <code>{escape(job_id)}</code>")
    return "\n".join(parts)


def caption_html(
    *,
    text: str,
    seed: int,
    duration: float,
    provider: str,
    label: str = "Prompt",
    seed_note: str = "",
) -> str:
    """The song's caption: prompt or tags, seed, duration, provider; at most 1024 chars."""
    note = f" ({escape(seed_note)})" if seed_note else ""
    tail = f"\n<b>Seed</b> <code>{seed}</code>{note} · {_clock(duration)} · {escape(provider)}"
    head = f"<b>{escape(label)}</b> "
    room = CAPTION_LIMIT - len(head) - len(tail)
    body = escape(text)
    if len(body) > room:
        # Cut the plain text, then escape, so no entity (&amp;) is split in half.
        plain = text[: room - 1]
        while len(escape(plain)) > room - 1:
            plain = plain[: len(plain) - (len(escape(plain)) - (room - 1))]
        body = escape(plain.rstrip()) + "…"
    return head + body + tail


def _clock(seconds: float) -> str:
    total = round(seconds)
    return f"{total // 60}:{total % 60:02d}"


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


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


def when(ts: float | datetime | None) -> str:
    """A short UTC time for lists."""
    if ts is None:
        return "?"
    moment = ts if isinstance(ts, datetime) else datetime.fromtimestamp(ts, UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
