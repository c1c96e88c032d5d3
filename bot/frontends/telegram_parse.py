"""Telegram command text -> request fields: `/song` and `/compose` are typed as text,
so options are `name=value` words anywhere after the command (the shared
`parse_options` validates them)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from bot.chat.conversation import LimitChange
from bot.requests import InvalidRequest, Mode, OptionSpec, parse_options

# A token that looks like `name=value`; anything else is part of the prompt or tags.
_OPTION_TOKEN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.S)
# `title="Night Drive"`: a value of several words in quotes (phones type curly ones).
_QUOTED_OPTION = re.compile(
    r"(?<!\S)([A-Za-z_][A-Za-z0-9_]*)=[\"\u201c\u201d\u00ab]([^\"\u201c\u201d\u00bb]*)[\"\u201c\u201d\u00bb]"
)
INSTRUMENTAL_WORD = "instrumental"


# Work on a song (issue 14): `name=value` words of /extend, /remix, /repaint (and takes=N
# of every song command) -> the request field and the number it must be.
EDIT_WORDS: dict[str, tuple[str, type]] = {
    "takes": ("takes", int),
    "before": ("extend_before", int),
    "after": ("extend_after", int),
    "start": ("repaint_start", float),
    "end": ("repaint_end", float),
    "strength": ("strength", float),
}


def _edit_numbers(pairs: dict[str, str], allowed: tuple[str, ...]) -> dict[str, Any]:
    """Take the edit words out of `pairs` as request fields (InvalidRequest on a value
    that is not a number)."""
    out: dict[str, Any] = {}
    for word in allowed:
        if word not in pairs:
            continue
        raw = pairs.pop(word).strip()
        field_name, kind = EDIT_WORDS[word]
        try:
            out[field_name] = kind(raw)
        except ValueError:
            what = "a whole number" if kind is int else "a number of seconds"
            raise InvalidRequest(word, raw, what) from None
    return out


def _split_options(
    text: str, edit_words: tuple[str, ...] = ("takes",)
) -> tuple[list[str], dict[str, Any]]:
    """Separate plain words from `name=value` options (a value in quotes may hold
    spaces) and the bare `instrumental` flag."""
    plain: list[str] = []
    pairs: dict[str, str] = {}
    flag = False
    for quoted in _QUOTED_OPTION.finditer(text):
        pairs[quoted.group(1).lower()] = quoted.group(2)
    for word in _QUOTED_OPTION.sub(" ", text).split():
        match = _OPTION_TOKEN.match(word)
        if match:
            pairs[match.group(1).lower()] = match.group(2)
        elif word.lower() == INSTRUMENTAL_WORD:
            flag = True
        else:
            plain.append(word)
    numbers = _edit_numbers(pairs, edit_words)
    fields = {**parse_options(pairs), **numbers}
    if flag and "instrumental" not in fields:
        fields["instrumental"] = True
    return plain, fields


def parse_song(args: str) -> dict[str, Any]:
    """`/song <prompt words> [name=value ...] [instrumental]` -> request fields."""
    words, fields = _split_options(args)
    return {"mode": Mode.PROMPT, "prompt": " ".join(words), **fields}


def parse_compose(args: str, replied_text: str | None) -> dict[str, Any]:
    """`/compose <tags> [options]` with lyrics on the following lines (or the replied-to
    message) -> request fields. Lyrics are kept line for line."""
    first, _, rest = args.partition("\n")
    words, fields = _split_options(first)
    tags = ", ".join(t.strip() for t in " ".join(words).split(",") if t.strip())
    lyrics = rest if rest.strip() else (replied_text or "")
    return {"mode": Mode.SONG, "tags": tags, "lyrics": lyrics, **fields}


EDIT_TASK_WORDS = {
    "extend": ("takes", "before", "after"),
    "remix": ("takes", "strength"),
    "repaint": ("takes", "start", "end"),
}


def parse_edit(task: str, args: str) -> dict[str, Any]:
    """`/extend [tags] after=30 [before=N]`, `/remix <tags> [strength=0.5]`, `/repaint
    [tags] start=10 end=20`, lyrics on the next lines -> request fields (the source
    comes from the replied-to message)."""
    first, _, rest = args.partition("\n")
    words, fields = _split_options(first, EDIT_TASK_WORDS[task])
    tags = ", ".join(t.strip() for t in " ".join(words).split(",") if t.strip())
    return {"tags": tags, "lyrics": rest if rest.strip() else "", **fields}


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


@dataclass(frozen=True)
class LimitsArgs:
    """`/limits` as typed: quota changes, the chat's songs switch, a topic edit."""

    changes: list[LimitChange] = field(default_factory=list)
    songs: bool | None = None  # songs=on|off: the whole chat
    here: str | None = None  # topics=here|-here|all: the topic it is written in


_SWITCH = {"on": True, "yes": True, "off": False, "no": False}


def parse_limits(args: list[str]) -> LimitsArgs:
    """`/limits seconds_per_day=3600 songs=off topics=here` -> what to validate."""
    changes = []
    songs: bool | None = None
    here: str | None = None
    for arg in args:
        key, sep, raw = arg.partition("=")
        key, raw = key.lower(), raw.strip().lower()
        if not sep or not key:
            raise InvalidRequest(
                "limits", arg, "write name=value or name=default, e.g. seconds_per_day=3600"
            )
        if key == "songs":
            if raw not in _SWITCH:
                raise InvalidRequest("songs", raw, "on or off")
            songs = _SWITCH[raw]
            continue
        if key == "topics":
            if raw not in ("here", "-here", "all"):
                raise InvalidRequest(
                    "topics", raw, "here (add this topic), -here (remove it) or all"
                )
            here = raw
            continue
        if raw in ("default", "none", "reset"):
            changes.append(LimitChange(key, None))
            continue
        try:
            value = float(raw)
        except ValueError:
            raise InvalidRequest(key, raw, "a whole number of seconds, or default") from None
        changes.append(LimitChange(key, value))
    return LimitsArgs(changes, songs, here)


@dataclass(frozen=True)
class SettingsArgs:
    """`/settings` as typed: whose defaults, the changes, whether all are reset."""

    community: bool = False
    changes: dict[str, str] = field(default_factory=dict)
    reset_all: bool = False


COMMUNITY_WORDS = ("group", "chat", "community", "server")


def parse_settings(args: str) -> SettingsArgs:
    """`/settings [group] duration=30 instrumental=on style="dreamy, lofi" provider=fal
    reset=duration|all` -> what to validate (bot.chat.defaults checks each value)."""
    pairs: dict[str, str] = {}
    for quoted in _QUOTED_OPTION.finditer(args):
        pairs[quoted.group(1).lower()] = quoted.group(2)
    community = False
    for word in _QUOTED_OPTION.sub(" ", args).split():
        match = _OPTION_TOKEN.match(word)
        if match:
            pairs[match.group(1).lower()] = match.group(2)
        elif word.lower() in COMMUNITY_WORDS:
            community = True
        else:
            raise InvalidRequest(
                "settings", word, 'write name=value, e.g. duration=30 or style="dreamy, lofi"'
            )
    reset = pairs.pop("reset", None)
    if reset and reset.lower() != "all":
        pairs.setdefault(reset.lower(), "default")
    return SettingsArgs(community, pairs, (reset or "").lower() == "all")


BANLIST_ACTIONS = ("add", "remove")


def parse_banlist(args: str) -> tuple[list[str], list[str]]:
    """`/banlist add word, a phrase` / `/banlist remove word` -> (to add, to remove)."""
    action, _, rest = args.strip().partition(" ")
    if not action:
        return [], []
    if action.lower() not in BANLIST_ACTIONS:
        raise InvalidRequest("banlist", action, "add or remove, then words separated by commas")
    phrases = [p.strip() for p in rest.split(",") if p.strip()]
    if not phrases:
        raise InvalidRequest(action.lower(), "", "words or phrases separated by commas")
    return (phrases, []) if action.lower() == "add" else ([], phrases)
