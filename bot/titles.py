"""A song's title, as songs have them: the one the user gave (`title=`), else the
provider's own, else one made from the lyrics (the first chorus line, or the first
sung line), else from the style tags ("lofi, piano, 80 bpm" -> "Lofi Piano"), and only
for a prompt with none of those a few of its words, capitalised."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from bot.requests import GenerationRequest, is_instrumental_lyrics

MAX_WORDS = 7
MAX_CHARS = 60
UNTITLED = "Untitled"
# Section markers ("[verse]", "(chorus)", "Chorus:") are not sung.
_MARKER = re.compile(r"^\s*[\[(][^\])]*[\])]\s*$|^\s*\w+(\s\d+)?:\s*$")
_CHORUS = re.compile(r"^\s*[\[(]\s*(pre-?)?chorus\b|^\s*chorus\b", re.IGNORECASE)
# Tags that say how, not what: tempo, key, metre, vocals, length.
_TECHNICAL = re.compile(
    r"\b(\d+\s*bpm|bpm|[a-g][#b]?\s*(major|minor|maj|min|m)|\d+/\d+|\d+\s*(s|sec|seconds))\b"
    r"|\b(vocals?|voice|singer|instrumental)\b",
    re.IGNORECASE,
)


def song_title(
    request: GenerationRequest,
    *,
    provider_metadata: Mapping[str, Any] | None = None,
    tags: str | None = None,
    lyrics: str | None = None,
) -> str:
    """The title of a song made for `request`; `tags` and `lyrics` are what the provider
    wrote or used, when it said."""
    given = " ".join(str(getattr(request, "title", "") or "").split())
    if given:
        return given
    own = (provider_metadata or {}).get("title")
    if isinstance(own, str) and own.strip():
        return _clip(" ".join(own.split()))
    sung = None if not request.wants_vocals else from_lyrics(lyrics or request.lyrics)
    return sung or from_tags(tags or request.tags) or from_prompt(request.prompt) or UNTITLED


def from_lyrics(lyrics: str | None) -> str | None:
    """The first line of the chorus, else the first sung line."""
    if not lyrics or is_instrumental_lyrics(lyrics):
        return None
    lines = lyrics.splitlines()
    first = None
    in_chorus = False
    for line in lines:
        if _MARKER.match(line) or not line.strip():
            if _MARKER.match(line):
                in_chorus = bool(_CHORUS.match(line))
            continue
        sung = _clean_line(line)
        if not sung:
            continue
        if in_chorus:
            return sung
        first = first or sung
    return first


def style_tags(tags: str) -> list[str]:
    """The tags that say what the music is (genre, instruments, mood), in order:
    "lofi, 80 bpm, female vocals, piano" -> ["lofi", "piano"]."""
    return [t.strip() for t in tags.split(",") if t.strip() and not _TECHNICAL.search(t)]


def from_tags(tags: str | None) -> str | None:
    """The first two style tags, capitalised."""
    style = style_tags(tags or "")
    return _clip(" ".join(_capitalise(t) for t in style[:2])) if style else None


def from_prompt(prompt: str | None) -> str | None:
    """A few words of a description, capitalised (the whole prompt is no title)."""
    words = (prompt or "").split()
    return _clip(_capitalise(" ".join(words[:MAX_WORDS]))) if words else None


def _clean_line(line: str) -> str:
    text = re.sub(r"[\[(][^\])]*[\])]", " ", line)  # inline cues: "(echo)", "[x2]"
    text = " ".join(text.split()).strip(" ,.;:!?-\N{EM DASH}\N{EN DASH}\"'")
    words = text.split()
    if len(words) > MAX_WORDS:
        text = " ".join(words[:MAX_WORDS])
    return _clip(text[:1].upper() + text[1:]) if text else ""


def _capitalise(text: str) -> str:
    return " ".join(w[:1].upper() + w[1:] for w in text.split())


def _clip(text: str) -> str:
    if len(text) <= MAX_CHARS:
        return text
    return text[: MAX_CHARS - 1].rsplit(" ", 1)[0].rstrip(" ,.;:") + "\N{HORIZONTAL ELLIPSIS}"
