"""GenerationRequest validation: every field's bounds, with the message a user sees."""

from __future__ import annotations

import pytest

from bot.requests import (
    ADVANCED_OPTIONS,
    GenerationRequest,
    InvalidRequest,
    Mode,
    parse_options,
)


def build(**fields):
    base = {"mode": "prompt", "prompt": "lofi piano about rain"}
    base.update(fields)
    return GenerationRequest.build(**base)


def test_defaults_for_a_plain_prompt() -> None:
    req = build()
    assert req.mode is Mode.PROMPT
    assert (req.duration, req.seed, req.instrumental) == (60, -1, False)
    assert req.advanced() == {}
    assert req.title == ""  # bot.titles derives one when none is given


@pytest.mark.parametrize(
    ("value", "ok"), [(4, False), (5, True), (240, True), (241, False), (0, False), (-5, False)]
)
def test_duration_bounds(value: int, ok: bool) -> None:
    if ok:
        assert build(duration=value).duration == value
    else:
        with pytest.raises(InvalidRequest) as err:
            build(duration=value)
        assert str(err.value) == (
            f"duration: {value} is not valid; a whole number of seconds from 5 to 240."
        )
        assert err.value.field == "duration"


@pytest.mark.parametrize(
    ("value", "ok"), [(-2, False), (-1, True), (0, True), (2147483647, True), (2147483648, False)]
)
def test_seed_bounds(value: int, ok: bool) -> None:
    if ok:
        assert build(seed=value).seed == value
    else:
        with pytest.raises(InvalidRequest, match=r"^seed: .* from -1 to 2147483647"):
            build(seed=value)


@pytest.mark.parametrize("name", [n for n, s in ADVANCED_OPTIONS.items() if s.kind in (int, float)])
def test_every_numeric_option_bounds(name: str) -> None:
    spec = ADVANCED_OPTIONS[name]
    assert spec.minimum is not None and spec.maximum is not None
    low, high = spec.minimum, spec.maximum
    assert build(**{name: low}).advanced() == {name: low}
    assert build(**{name: high}).advanced() == {name: high}
    step = 1 if spec.kind is int else 0.5
    for bad in (low - step, high + step):
        with pytest.raises(InvalidRequest) as err:
            build(**{name: bad})
        assert err.value.field == name
        assert f"from {spec.allowed().split('from ')[1]}" in str(err.value)


def test_option_messages_name_field_value_and_range() -> None:
    with pytest.raises(InvalidRequest) as err:
        build(steps=201)
    assert str(err.value) == "steps: 201 is not valid; a whole number from 1 to 200."
    with pytest.raises(InvalidRequest) as err:
        build(guidance_interval=1.5)
    assert str(err.value) == "guidance_interval: 1.5 is not valid; a number from 0 to 1."


@pytest.mark.parametrize(
    ("name", "good", "bad", "allowed"),
    [
        ("scheduler", "heun", "ddim", "one of euler, heun"),
        ("guidance_type", "cfg_star", "xyz", "one of cfg, apg, cfg_star"),
    ],
)
def test_choices(name: str, good: str, bad: str, allowed: str) -> None:
    assert getattr(build(**{name: good}), name) == good
    with pytest.raises(InvalidRequest) as err:
        build(**{name: bad})
    assert str(err.value) == f"{name}: {bad!r} is not valid; {allowed}."


def test_prompt_required_and_limited() -> None:
    with pytest.raises(InvalidRequest, match="^prompt: '' is not valid; describe the song"):
        build(prompt="   ")
    with pytest.raises(InvalidRequest) as err:
        build(prompt="x" * 501)
    assert str(err.value) == "prompt is too long (501 characters); at most 500 characters."


def test_song_mode_needs_tags_and_limits_lyrics() -> None:
    ok = GenerationRequest.build(
        mode="song", tags="lofi, piano", lyrics="[verse]\nrain on the window\n[chorus]\nla la"
    )
    assert ok.wants_vocals and ok.lyrics.startswith("[verse]\n")
    with pytest.raises(InvalidRequest, match="^tags: ',' is not valid; give comma-separated"):
        GenerationRequest.build(mode="song", tags=" , ")
    with pytest.raises(
        InvalidRequest, match=r"^lyrics is too long \(3001 characters\); at most 3000"
    ):
        GenerationRequest.build(mode="song", tags="rock", lyrics="a" * 3001)
    with pytest.raises(InvalidRequest, match=r"^tags is too long \(301 characters\)"):
        GenerationRequest.build(mode="song", tags="a" * 301)


@pytest.mark.parametrize("lyrics", ["", "[inst]", "[Instrumental]", "  [INST] "])
def test_instrumental_lyrics_mean_no_vocals(lyrics: str) -> None:
    req = GenerationRequest.build(mode="song", tags="ambient", lyrics=lyrics)
    assert req.wants_vocals is False


def test_instrumental_flag() -> None:
    assert build(instrumental=True).wants_vocals is False


def test_unknown_field_and_bad_mode() -> None:
    with pytest.raises(InvalidRequest, match="^tempo: 120 is not valid; known options are"):
        build(tempo=120)
    with pytest.raises(InvalidRequest, match="^mode: 'remix' is not valid; one of prompt, song"):
        build(mode="remix")


def test_wrong_types_are_named() -> None:
    with pytest.raises(InvalidRequest, match="^duration: 'long' is not valid"):
        build(duration="long")
    with pytest.raises(InvalidRequest, match="^duration: 30.5 is not valid"):
        build(duration=30.5)
    with pytest.raises(InvalidRequest, match="^instrumental: 'maybe' is not valid; true or false"):
        build(instrumental="maybe")


def test_parse_options_text() -> None:
    parsed = parse_options(
        {
            "steps": "40",
            "scheduler": "HEUN",
            "duration": "30",
            "instrumental": "",
            "guidance_scale": "12.5",
        }
    )
    assert parsed == {
        "steps": 40,
        "scheduler": "heun",
        "duration": 30,
        "instrumental": True,
        "guidance_scale": 12.5,
    }
    assert build(**parsed).steps == 40
    for name, raw in (
        ("steps", "forty"),
        ("guidance_scale", "nan"),
        ("guidance_scale", "inf"),
        ("instrumental", "perhaps"),
        ("scheduler", "ddpm"),
    ):
        with pytest.raises(InvalidRequest) as err:
            parse_options({name: raw})
        assert err.value.field == name
    with pytest.raises(
        InvalidRequest,
        match="^colour: .red. is not valid; known options are duration, seed, instrumental, title",
    ):
        parse_options({"colour": "red"})


def test_with_seed_keeps_everything_else() -> None:
    req = build(duration=30, steps=10)
    again = req.with_seed(1234)
    assert (again.seed, again.duration, again.steps, again.prompt) == (1234, 30, 10, req.prompt)


def test_escape_sequences_and_control_characters_are_stripped_from_every_text() -> None:
    prompt = build(prompt="\x1b[31mred\x1b[0m rain\x9b2J on\x07 tin\nroofs\x00")
    assert prompt.prompt == "red rain on tin roofs"
    song = GenerationRequest.build(
        mode="song",
        tags="lofi,\x1b[1m piano\x85, rain\x7f",
        lyrics="[verse]\r\n\x1b]0;pwned\x07Neon\train\x9b31m\r[chorus]\x0bAgain\x1b",
    )
    assert song.tags == "lofi, piano , rain"
    # Lyrics keep their line breaks (and tabs); every other control is gone.
    assert song.lyrics == "[verse]\nNeon\train\n[chorus]\nAgain"
    titled = build(title="\x1b[1mRain\x1b[0m\tsong\x9b")
    assert titled.title == "Rain song"
    for text in (prompt.prompt, song.tags, song.lyrics, titled.title):
        assert not any((ord(c) < 32 and c not in "\n\t") or 0x7F <= ord(c) <= 0x9F for c in text)


def test_a_text_of_nothing_but_controls_is_empty_and_refused() -> None:
    with pytest.raises(InvalidRequest, match="^prompt: '' is not valid; describe the song"):
        build(prompt="\x1b[2J\x00\x9b")


@pytest.mark.parametrize(
    ("written", "stored"),
    [("Am", "A minor"), ("f#m", "F# minor"), ("Bb major", "Bb major"), ("C", "C major")],
)
def test_key_scale_is_stored_in_the_servers_spelling(written: str, stored: str) -> None:
    assert parse_options({"key_scale": written}) == {"key_scale": stored}
    assert build(key_scale=written).key_scale == stored  # the Discord path


def test_the_music_options_of_ace_step_15_are_validated() -> None:
    req = build(thinking=True, vocal_language="JA", bpm=90, time_signature="3")
    assert req.advanced() == {
        "thinking": True,
        "vocal_language": "ja",
        "bpm": 90,
        "time_signature": "3",
    }
    for field, value, allowed in [
        ("vocal_language", "xx", "a language code such as en"),
        ("key_scale", "H minor", "a key such as C, Am"),
        ("bpm", 400, "a whole number from 30 to 300"),
        ("time_signature", "5", "one of 2, 3, 4, 6"),
        ("audio_format", "ogg", "one of mp3, wav, flac"),
    ]:
        with pytest.raises(InvalidRequest) as err:
            build(**{field: value})
        assert err.value.field == field
        assert allowed in str(err.value)
