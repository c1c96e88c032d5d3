"""Personal and community defaults for new songs (`/settings`), and the one place they
are applied: `apply()`, called for every request the chat layer builds, from a command
or a button.

Precedence: an option given in the command wins, then the user's default, then the
community's, then the operator's (the request's own defaults, e.g. 60 s).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bot.requests import (
    ALL_OPTIONS,
    MAX_PROMPT_CHARS,
    MAX_TAGS_CHARS,
    GenerationRequest,
    InvalidRequest,
    Mode,
    parse_option_value,
)

STYLE = "style"  # a suffix appended to the tags (in prompt mode, to the description)
PROVIDER = "provider"  # the provider tried first, among the configured ones
MAX_STYLE_CHARS = 100
# What a default can be set for, in the order /settings shows them. A request option
# named here is offered once bot/requests.py has it: "vocal_language" comes with the
# ACE-Step options, and "takes" belongs here when requests have takes.
NAMES: tuple[str, ...] = ("duration", "instrumental", "vocal_language", STYLE, PROVIDER)
ANY = ("any", "none", "default", "reset", "")


def offered() -> tuple[str, ...]:
    """The defaults this build supports."""
    return tuple(n for n in NAMES if n in (STYLE, PROVIDER) or n in ALL_OPTIONS)


@dataclass(frozen=True)
class Defaults:
    """Whose defaults apply to a request: the user's and the community's."""

    user: Mapping[str, Any] = field(default_factory=dict)
    community: Mapping[str, Any] = field(default_factory=dict)

    def value(self, name: str) -> tuple[Any, str | None]:
        """(value, "yours" | "community") of the default that applies, or (None, None)."""
        if self.user.get(name) is not None:
            return self.user[name], "yours"
        if self.community.get(name) is not None:
            return self.community[name], "community"
        return None, None


def parse(name: str, raw: Any, providers: Iterable[str]) -> Any:
    """A default as typed (text, or a platform's typed value) -> what is stored; None
    for "back to the next level's default". Raises InvalidRequest naming what is allowed."""
    if name not in offered():
        raise InvalidRequest("setting", name, "one of " + ", ".join(offered()))
    if isinstance(raw, str) and raw.strip().lower() in ANY:
        return None
    if name == STYLE:
        text = " ".join(str(raw).split()).strip(" ,")
        if len(text) > MAX_STYLE_CHARS or "\x00" in text:
            raise InvalidRequest(name, raw, f"tags of at most {MAX_STYLE_CHARS} characters")
        return text or None
    if name == PROVIDER:
        names = list(providers)
        choice = str(raw).strip().lower()
        if choice not in names:
            raise InvalidRequest(name, raw, "one of " + ", ".join([*names, "any"]))
        return choice
    value = raw if not isinstance(raw, str) else parse_option_value(name, raw)
    # Checked as a request would check it (ranges, choices), then stored as given.
    GenerationRequest.build(mode=Mode.PROMPT, prompt="x", **{name: value})
    return value


def apply(fields: dict[str, Any], defaults: Defaults, providers: Iterable[str]) -> dict[str, Any]:
    """Request fields with the defaults filled in where the command gave none."""
    out = dict(fields)
    for name in offered():
        if name in (STYLE, PROVIDER) or name in out:
            continue
        value, _ = defaults.value(name)
        if value is not None:
            out[name] = value
    preferred, _ = defaults.value(PROVIDER)
    if "provider" not in out and preferred in set(providers):
        out["provider"] = preferred
    style, _ = defaults.value(STYLE)
    if style:
        _append_style(out, str(style))
    return out


def _append_style(fields: dict[str, Any], style: str) -> None:
    prompt_mode = str(fields.get("mode", "")) == Mode.PROMPT.value
    key, limit = ("prompt", MAX_PROMPT_CHARS) if prompt_mode else ("tags", MAX_TAGS_CHARS)
    text = str(fields.get(key) or "").strip()
    if not text or style.lower() in text.lower():
        return  # empty text is the request's own error; a suffix is never doubled
    joined = f"{text.rstrip(' ,')}, {style}"
    if len(joined) > limit:
        raise InvalidRequest(
            key,
            text,
            f"at most {limit} characters with your style suffix {style!r} "
            "(change it with /settings)",
            problem=f"is too long with the style suffix ({len(joined)} characters)",
        )
    fields[key] = joined
