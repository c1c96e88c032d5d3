"""Ban lists: words and phrases a request may not contain (the operator's BANNED_WORDS
and each community's own list).

Matching is on whole words after normalising both sides the same way: Unicode
compatibility forms folded (full-width letters, ligatures), case folded, accents and
invisible characters dropped, punctuation read as a space. A request is also checked
with spaced-out letters joined ("b a d" -> "bad") and common digit-for-letter swaps
undone ("b4d" -> "bad"), the usual ways around a word filter.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from bot.requests import GenerationRequest

MAX_PHRASE_CHARS = 100
_NOT_WORD = re.compile(r"[\W_]+")
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a"})


def normalize(text: str) -> str:
    """The form phrases are stored and compared in: lower case, no accents or
    invisible characters, words separated by single spaces."""
    folded = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text).casefold())
    # Line breaks and tabs separate words; other control, format and combining marks go.
    kept = "".join(
        " " if ch.isspace() else ch
        for ch in folded
        if ch.isspace() or unicodedata.category(ch) not in ("Mn", "Me", "Cf", "Cc")
    )
    return " ".join(_NOT_WORD.sub(" ", kept).split())


def _spelled_out(words: list[str]) -> list[str]:
    """Runs of one-letter words, joined: "a b a d w o r d" -> "abadword"."""
    runs: list[str] = []
    run = ""
    for word in [*words, ""]:
        if len(word) == 1:
            run += word
            continue
        if len(run) > 1:
            runs.append(run)
        run = ""
    return runs


def _forms(text: str) -> tuple[set[str], list[str]]:
    """The request's words (plain and with digits read as letters), and the runs of
    spelled-out letters in them."""
    words = {normalize(text), normalize(text.translate(_LEET))}
    runs = [run for form in words for run in _spelled_out(form.split())]
    return {f" {form} " for form in words}, runs


def request_text(request: GenerationRequest) -> str:
    """Every text of a request a ban list applies to."""
    parts = [request.prompt, request.tags, request.lyrics]
    title = getattr(request, "title", "")
    if isinstance(title, str):
        parts.append(title)
    return "\n".join(p for p in parts if p)


def first_banned(text: str, phrases: Iterable[str]) -> str | None:
    """The first listed phrase `text` contains as whole words, or None."""
    words, runs = _forms(text)
    for phrase in phrases:
        wanted = normalize(phrase)
        if not wanted:
            continue
        if any(f" {wanted} " in form for form in words):
            return wanted
        # Spelled out, the word edges are gone: "a b a d w o r d" holds "bad word".
        if any(wanted.replace(" ", "") in run for run in runs):
            return wanted
    return None
