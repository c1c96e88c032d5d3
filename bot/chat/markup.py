"""Rich text without a platform: a `Text` is lines of spans, rendered by each front-end
(Discord markdown, Telegram HTML). Spans escape nothing themselves; renderers do."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Union


@dataclass(frozen=True)
class Bold:
    text: str


@dataclass(frozen=True)
class Code:
    text: str


@dataclass(frozen=True)
class Link:
    text: str
    url: str


@dataclass(frozen=True)
class When:
    """A moment; Discord shows it in each reader's time zone, Telegram in UTC."""

    at: float  # epoch seconds
    style: Literal["relative", "full"] = "relative"


@dataclass(frozen=True)
class Mention:
    """A user or channel of the platform, by id (Discord `<@id>` / `<#id>`)."""

    kind: Literal["user", "channel"]
    id: str
    name: str = ""  # what to show where the platform cannot mention by id


@dataclass(frozen=True)
class Muted:
    """A side note in small or pale type."""

    text: str


Span = Union[str, Bold, Code, Link, When, Mention, Muted]  # noqa: UP007 (a runtime alias)
Line = tuple[Span, ...]


@dataclass(frozen=True)
class Text:
    """Lines of spans. `Text.of("a", Bold("b"))` is one line."""

    lines: tuple[Line, ...] = ()

    @classmethod
    def of(cls, *spans: Span) -> Text:
        return cls((tuple(spans),))

    @classmethod
    def from_lines(cls, lines: Iterable[Iterable[Span]]) -> Text:
        return cls(tuple(tuple(line) for line in lines))

    def __add__(self, other: Text) -> Text:
        return Text(self.lines + other.lines)

    def plain(self) -> str:
        """The text with no formatting (logs, tests, the CLI)."""
        return "\n".join("".join(_plain(span) for span in line) for line in self.lines)


def _plain(span: Span) -> str:
    if isinstance(span, str):
        return span
    if isinstance(span, When):
        from datetime import UTC, datetime

        return datetime.fromtimestamp(span.at, UTC).strftime("%Y-%m-%d %H:%M UTC")
    if isinstance(span, Mention):
        return span.name or span.id
    return span.text


def clip(text: str, limit: int) -> str:
    """Shorten text (whitespace collapsed) to `limit` characters, marking the cut."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "\N{HORIZONTAL ELLIPSIS}"
