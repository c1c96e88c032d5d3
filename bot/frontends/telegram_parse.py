"""Telegram command text -> request fields: `/song` and `/compose` are typed as text,
so options are `name=value` words anywhere after the command (the shared
`parse_options` validates them)."""

from __future__ import annotations

import re
from typing import Any

from bot.chat.conversation import LimitChange
from bot.requests import InvalidRequest, Mode, OptionSpec, parse_options

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


def option_usage(spec: OptionSpec) -> str:
    """How an option is written in a Telegram command (for /help)."""
    if spec.kind is bool:
        return spec.name
    return f"{spec.name}=\N{HORIZONTAL ELLIPSIS}"


def command_args(text: str, command_length: int | None) -> str:
    """What follows the command (`/song@Bot ...`) in a message's text."""
    if command_length is not None:
        return text[command_length:]
    return text.partition(" ")[2]


def parse_limits(args: list[str]) -> list[LimitChange]:
    """`/limits seconds_per_day=3600 ...` (or `=default`) -> changes to validate."""
    changes = []
    for arg in args:
        key, sep, raw = arg.partition("=")
        if not sep or not key:
            raise InvalidRequest(
                "limits", arg, "write name=value or name=default, e.g. seconds_per_day=3600"
            )
        if raw.strip().lower() in ("default", "none", "reset"):
            changes.append(LimitChange(key.lower(), None))
            continue
        try:
            value = float(raw)
        except ValueError:
            raise InvalidRequest(key, raw, "a whole number of seconds, or default") from None
        changes.append(LimitChange(key.lower(), value))
    return changes
