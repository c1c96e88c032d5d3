"""Property tests: any input either builds a valid request or names the field at fault.

Front-ends pass user-typed text and Discord interaction payloads (which can carry any
value, DESIGN.md "Known traps") straight into these functions; whatever arrives, the user
must get an InvalidRequest naming a field, never a crash.
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.requests import (
    ADVANCED_OPTIONS,
    ALL_OPTIONS,
    MAX_LYRICS_CHARS,
    MAX_PROMPT_CHARS,
    MAX_TAGS_CHARS,
    GenerationRequest,
    InvalidRequest,
    Mode,
    parse_option_value,
    parse_options,
)

FIELDS = sorted(GenerationRequest.model_fields)

# Values a JSON payload or a careless caller could carry, edge cases included.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
edge_numbers = st.sampled_from(
    [
        0,
        -1,
        1,
        5,
        240,
        241,
        3,
        60,
        2**31,
        2**31 - 1,
        -(2**31),
        0.5,
        1e-9,
        -0.0,
        1e308,
        float("nan"),
        float("inf"),
        "5",
        "60",
        " 7 ",
        "1e3",
        "nan",
        "inf",
        "0x10",
        "",
        "true",
    ]
)
# str() of an int this long raises ValueError (Python's 4300-digit limit).
huge_ints = st.sampled_from([1, -1]).map(lambda sign: sign * 10**5000)
values = st.recursive(
    json_scalars | edge_numbers | huge_ints | st.binary(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)
modes = st.sampled_from(["prompt", "song", "PROMPT", "", "other"]) | values
texts = st.text(max_size=60) | st.sampled_from(
    [
        *("", "   ", "\x00", "a" * (MAX_LYRICS_CHARS + 1), "lofi, piano", ",,,", "[inst]"),
        # terminal escapes and controls: stripped at parsing
        *("\x1b[31mred\x1b[0m", "\x9b2J lofi", "a\r\nb\x85c", "\x1b]0;t\x07x"),
    ]
)
field_names = st.sampled_from(FIELDS) | st.text(min_size=1, max_size=12)


def _check_invalid(err: InvalidRequest, given_fields: dict[str, Any]) -> None:
    """The error names a real field (or one the caller sent) and says so in its text."""
    assert err.field in set(FIELDS) | set(given_fields) | {"request"}, err.field
    message = str(err)
    assert message.startswith(err.field), message
    assert message.endswith("."), message
    assert len(message) < 2000  # a sentence for a chat message, not a dump of the input


def _check_valid(req: GenerationRequest) -> None:
    """A request that built keeps every documented bound."""
    assert isinstance(req.mode, Mode)
    assert 5 <= req.duration <= 240
    assert -1 <= req.seed <= 2_147_483_647
    assert len(req.prompt) <= MAX_PROMPT_CHARS and len(req.tags) <= MAX_TAGS_CHARS
    assert len(req.lyrics) <= MAX_LYRICS_CHARS
    # No terminal control reaches storage, logs or chat (lyrics keep line breaks, tabs).
    for text, kept in ((req.prompt, ""), (req.tags, ""), (req.lyrics, "\n\t")):
        assert not any((ord(c) < 32 or 0x7F <= ord(c) <= 0x9F) and c not in kept for c in text)
    if req.mode is Mode.PROMPT:
        assert req.prompt and not req.tags and not req.lyrics
    else:
        assert req.tags.strip(", ") and not req.prompt
    for name, spec in ADVANCED_OPTIONS.items():
        value = getattr(req, name)
        if value is None:
            continue
        if spec.choices:
            assert value in spec.choices
        elif spec.kind is bool:
            assert isinstance(value, bool)
        elif spec.normalize is not None:
            assert spec.normalize(value) == value  # stored in the one spelling we send
        else:
            assert spec.minimum is not None and spec.maximum is not None
            assert not math.isnan(value) and spec.minimum <= value <= spec.maximum
    # A valid request survives the round trip through the job row.
    assert GenerationRequest.model_validate_json(req.model_dump_json()) == req


def _build_outcome(fields: dict[str, Any]) -> None:
    try:
        req = GenerationRequest.build(**fields)
    except InvalidRequest as err:
        _check_invalid(err, fields)
        if "mode" not in fields:
            assert str(err) == "mode is missing; one of prompt, song."
    else:
        _check_valid(req)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(field_names, values, max_size=6))
def test_build_any_fields_is_a_request_or_names_the_field(fields: dict[str, Any]) -> None:
    _build_outcome(fields)


@settings(max_examples=400, deadline=None)
@given(
    mode=modes,
    prompt=texts,
    tags=texts,
    lyrics=texts,
    extra=st.dictionaries(st.sampled_from(sorted(ALL_OPTIONS)), values | edge_numbers, max_size=4),
)
def test_build_plausible_requests(
    mode: Any, prompt: str, tags: str, lyrics: str, extra: dict[str, Any]
) -> None:
    # Mostly well-formed text with one or more odd options: reaches the range checks.
    _build_outcome({"mode": mode, "prompt": prompt, "tags": tags, "lyrics": lyrics, **extra})


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(ALL_OPTIONS)), edge_numbers | values)
def test_build_one_option_on_a_good_prompt(name: str, value: Any) -> None:
    _build_outcome({"mode": "prompt", "prompt": "lofi piano about rain", name: value})


option_text = st.text(max_size=20) | st.sampled_from(
    [
        "1",
        "-1",
        "0",
        "27",
        "3.5",
        " 60 ",
        "1e2",
        "1e400",
        "-1e400",
        "nan",
        "NaN",
        "inf",
        "-inf",
        "Infinity",
        "0x1f",
        "1_000",
        "\u0663",
        "\uff11\uff12",  # Arabic-Indic and fullwidth digits
        "euler",
        "HEUN",
        "apg",
        "yes",
        "off",
        "",
    ]
)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(sorted(ALL_OPTIONS)) | st.text(max_size=12), option_text)
def test_parse_option_value_typed_or_names_the_option(name: str, raw: str) -> None:
    try:
        value = parse_option_value(name, raw)
    except InvalidRequest as err:
        assert err.field == name
        assert str(err).startswith(name)
        return
    spec = ALL_OPTIONS[name]
    assert isinstance(value, spec.kind if spec.kind is not float else (int, float))
    if isinstance(value, float):
        assert math.isfinite(value)
    if spec.choices:
        assert value in spec.choices


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(sorted(ALL_OPTIONS)) | st.text(max_size=8), option_text, max_size=5
    ),
    st.sampled_from(["prompt", "song"]),
)
def test_parse_options_then_build(pairs: dict[str, str], mode: str) -> None:
    # The Telegram / CLI path: text options parsed, then built into a request.
    try:
        fields = parse_options(pairs)
    except InvalidRequest as err:
        assert err.field in pairs and str(err).startswith(err.field)
        return
    assert set(fields) == set(pairs)
    text = {"prompt": "rain on a tin roof"} if mode == "prompt" else {"tags": "lofi, piano"}
    _build_outcome({"mode": mode, **text, **fields})
