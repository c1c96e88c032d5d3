"""Songs get titles that look like song titles: the user's, the provider's, a lyric line,
the style tags; never the raw prompt."""

from __future__ import annotations

import pytest

from bot import titles
from bot.requests import GenerationRequest, InvalidRequest


def song(tags: str, lyrics: str = "", **fields: object) -> GenerationRequest:
    return GenerationRequest.build(mode="song", tags=tags, lyrics=lyrics, **fields)


def test_the_title_option_wins_over_everything() -> None:
    request = song("rock", "[chorus]\nHold on", title="  Night   Drive ")
    assert titles.song_title(request, provider_metadata={"title": "Theirs"}) == "Night Drive"


def test_the_provider_title_comes_next() -> None:
    request = song("rock", "[chorus]\nHold on")
    assert titles.song_title(request, provider_metadata={"title": " Glass  Hearts "}) == (
        "Glass Hearts"
    )


def test_the_first_chorus_line_is_the_title_of_a_sung_song() -> None:
    lyrics = "[verse]\nNeon rain on the window,\n[chorus]\n(oh) hold on, hold on tonight!\n"
    assert titles.song_title(song("synthpop, female vocals", lyrics)) == (
        "Hold on, hold on tonight"
    )


def test_without_a_chorus_the_first_sung_line() -> None:
    lyrics = "Verse 1:\n\nneon rain on the window and the city lights are low\n"
    assert titles.song_title(song("synthpop", lyrics)) == "Neon rain on the window and the"


def test_an_instrumental_takes_its_title_from_the_style_tags() -> None:
    request = song("lofi, 80 bpm, female vocals, piano, rain, A minor", "[inst]")
    assert titles.song_title(request) == "Lofi Piano"
    sung_but_instrumental = song("jazz, sax", "[verse]\nla la", instrumental=True)
    assert titles.song_title(sung_but_instrumental) == "Jazz Sax"


def test_prompt_mode_uses_what_the_provider_wrote() -> None:
    request = GenerationRequest.build(mode="prompt", prompt="a sad song about my cat in the rain")
    made = titles.song_title(request, tags="indie folk, acoustic", lyrics="[chorus]\nWhiskers")
    assert made == "Whiskers"
    assert titles.song_title(request, tags="indie folk, acoustic guitar") == (
        "Indie Folk Acoustic Guitar"
    )
    # Nothing written back: a few words of the prompt, capitalised, not the whole prompt.
    assert titles.song_title(request) == "A Sad Song About My Cat In"


def test_long_titles_are_cut_at_a_word() -> None:
    request = song("x", "[chorus]\n" + "supercalifragilistic " * 10)
    made = titles.song_title(request)
    assert len(made) <= titles.MAX_CHARS and made.endswith("\N{HORIZONTAL ELLIPSIS}")


def test_a_title_option_is_checked_like_other_text() -> None:
    with pytest.raises(InvalidRequest, match=r"^title is too long \(101 characters\)"):
        song("rock", title="x" * 101)
