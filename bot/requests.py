"""GenerationRequest: what a user asked for, validated the same way for every front-end.

Every front-end (Discord, Telegram, the CLI) builds its request through
`GenerationRequest.build(...)` or `parse_options(...)`; both raise `InvalidRequest`, one
error type whose message names the field, the value given and what is allowed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

MIN_DURATION = 5
MAX_DURATION = 240
DEFAULT_DURATION = 60
MAX_SEED = 2_147_483_647

# Text limits chosen to fit both platforms: a Telegram caption is 1024 characters and a
# message 4096; a Discord modal paragraph holds 4000 and an embed description 4096.
MAX_PROMPT_CHARS = 500
MAX_TAGS_CHARS = 300
MAX_LYRICS_CHARS = 3000
MAX_TITLE_CHARS = 100

INSTRUMENTAL_MARKERS = ("[inst]", "[instrumental]")

# Vocal languages the ACE-Step 1.5 model knows (upstream acestep/constants.py
# VALID_LANGUAGES; "unknown" there means "let the model tell", i.e. leave it unset).
VOCAL_LANGUAGES = (
    "ar", "az", "bg", "bn", "ca", "cs", "da", "de", "el", "en", "es", "fa", "fi", "fr", "he",
    "hi", "hr", "ht", "hu", "id", "is", "it", "ja", "ko", "la", "lt", "ms", "ne", "nl", "no",
    "pa", "pl", "pt", "ro", "ru", "sa", "sk", "sr", "sv", "sw", "ta", "te", "th", "tl", "tr",
    "uk", "ur", "vi", "yue", "zh",
)  # fmt: skip
TIME_SIGNATURES = ("2", "3", "4", "6")  # 2/4, 3/4, 4/4 and 6/8, as upstream spells them
AUDIO_FORMATS = ("mp3", "wav", "flac")
_KEY = re.compile(r"([a-g])([#b\u266f\u266d]?)\s*(m|min|minor|maj|major)?", re.IGNORECASE)


class Mode(StrEnum):
    """How the music is described: free text, or style tags plus lyrics."""

    PROMPT = "prompt"
    SONG = "song"


class Task(StrEnum):
    """What is done with the music: a new song, or work on an existing one (a source)."""

    GENERATE = "generate"  # a new song from text
    EXTEND = "extend"  # the source plus new music before and/or after it
    REMIX = "remix"  # the source re-made in other tags/lyrics (ACE-Step "cover")
    REPAINT = "repaint"  # one window of the source re-made, the rest kept


MAX_TAKES = 4
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SOURCE_FILE = re.compile(r"^[0-9a-f]{64}\.(mp3|wav|flac|ogg|m4a)$")


class SourceAudio(BaseModel):
    """The audio an edit works on: a song the bot posted, or a file a user sent.

    The bytes live at `DATA_DIR/sources/<file>` (named by content hash, so a restart can
    resubmit and the same file is stored once); `job_id` is the bot's song it came from
    (lineage), `name` the user's file name, if any.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    sha256: str
    seconds: float
    file: str
    job_id: str | None = None
    name: str = ""
    # What the source is, where known (the bot's own song): fal's and WaveSpeed's remix
    # endpoints require the source's tags ("original_tags") and take its lyrics.
    tags: str = ""
    lyrics: str = ""

    @model_validator(mode="after")
    def _check(self) -> SourceAudio:
        if not _SHA256.match(self.sha256):
            raise InvalidRequest("source", self.sha256, "a lowercase hex SHA-256")
        if not _SOURCE_FILE.match(self.file) or not self.file.startswith(self.sha256):
            raise InvalidRequest("source", self.file, "<sha256>.<mp3|wav|flac|ogg|m4a>")
        if not (0 < self.seconds <= MAX_DURATION) or self.seconds != self.seconds:
            raise InvalidRequest(
                "source",
                self.seconds,
                f"audio from 1 to {MAX_DURATION} seconds long",
                problem=f"is {_num(self.seconds)} seconds long",
            )
        return self

    def path(self, data_dir: Path) -> Path:
        return data_dir / "sources" / self.file


class InvalidRequest(ValueError):
    """A request a user can fix: names the field, the value and what is allowed."""

    def __init__(
        self, field: str, value: object, allowed: str, *, problem: str | None = None
    ) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        if problem:
            super().__init__(f"{field} {problem}; {allowed}.")
        else:
            super().__init__(f"{field}: {_show(value)} is not valid; {allowed}.")


def _show(value: object) -> str:
    try:
        text = repr(value) if isinstance(value, str) else str(value)
    except Exception:  # e.g. an int past Python's 4300-digit str() limit, from a payload
        text = f"this {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class OptionSpec:
    """An advanced option: its type, range and what it does (for help texts and parsers)."""

    name: str
    kind: type
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    default: object = None
    help: str = ""
    # A text option without fixed choices: turns what the user wrote into the one
    # spelling we store and send, or None when it is not valid; `usage` says what is.
    normalize: Callable[[str], str | None] | None = None
    usage: str = ""

    def allowed(self) -> str:
        if self.usage:
            return self.usage
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.kind is str:
            return f"text of at most {_num(self.maximum)} characters"
        noun = "a whole number" if self.kind is int else "a number"
        return f"{noun} from {_num(self.minimum)} to {_num(self.maximum)}"


def _num(value: float | None) -> str:
    if value is None:
        return "?"
    return str(int(value)) if float(value).is_integer() else str(value)


def normalize_key_scale(text: str) -> str | None:
    """'Am', 'f#m', 'Bb major', 'C' -> upstream's spelling ('A minor', 'F# minor',
    'Bb major', 'C major'); None for anything else."""
    match = _KEY.fullmatch(text.strip())
    if match is None:
        return None
    note, accidental, mode = match.groups()
    accidental = {"\u266f": "#", "\u266d": "b", "B": "b"}.get(accidental, accidental)
    minor = (mode or "").lower() in ("m", "min", "minor")
    return f"{note.upper()}{accidental} {'minor' if minor else 'major'}"


def normalize_language(text: str) -> str | None:
    code = text.strip().lower()
    return code if code in VOCAL_LANGUAGES else None


# The advanced options. Each provider takes its own range of each (its Capabilities say
# which, and routing skips a provider whose range excludes a value); the bounds here are
# the widest any provider takes. `default` is only for help texts (None in a request =
# the provider's default).
ADVANCED_OPTIONS: dict[str, OptionSpec] = {
    spec.name: spec
    for spec in (
        OptionSpec("steps", int, 1, 200, help="diffusion steps (the provider's default)"),
        OptionSpec("scheduler", str, choices=("euler", "heun"), default="euler", help="sampler"),
        OptionSpec(
            "guidance_type",
            str,
            choices=("cfg", "apg", "cfg_star"),
            default="apg",
            help="guidance method",
        ),
        OptionSpec(
            "granularity_scale",
            float,
            -100,
            100,
            default=10,
            help="higher = more detail, fewer artifacts",
        ),
        OptionSpec(
            "guidance_interval", float, 0, 1, default=0.5, help="share of steps that use guidance"
        ),
        OptionSpec(
            "guidance_interval_decay",
            float,
            0,
            1,
            default=0,
            help="how guidance fades over the interval",
        ),
        OptionSpec("guidance_scale", float, 0, 200, help="overall guidance"),
        OptionSpec(
            "minimum_guidance_scale",
            float,
            0,
            200,
            default=3,
            help="floor of the decaying guidance",
        ),
        OptionSpec(
            "tag_guidance_scale",
            float,
            0,
            10,
            default=5,
            help="how closely the style tags are followed",
        ),
        OptionSpec(
            "lyric_guidance_scale",
            float,
            0,
            10,
            default=1.5,
            help="how closely the lyrics are followed",
        ),
        OptionSpec("thinking", bool, default=False, help="the model plans the song first"),
        OptionSpec(
            "vocal_language",
            str,
            help="language of the lyrics",
            normalize=normalize_language,
            usage="a language code such as en, zh, ja, es, fr or de (50 are known)",
        ),
        OptionSpec("bpm", int, 30, 300, help="tempo in beats per minute"),
        OptionSpec(
            "key_scale",
            str,
            help="key, e.g. C, Am, F#m or Bb major",
            normalize=normalize_key_scale,
            usage="a key such as C, Am, F#m or Bb major",
        ),
        OptionSpec("time_signature", str, choices=TIME_SIGNATURES, help="beats per bar (6 = 6/8)"),
        OptionSpec("audio_format", str, choices=AUDIO_FORMATS, help="file the provider makes"),
    )
}

# Basic options every front-end offers besides the text.
BASIC_OPTIONS: dict[str, OptionSpec] = {
    "duration": OptionSpec(
        "duration",
        int,
        MIN_DURATION,
        MAX_DURATION,
        default=DEFAULT_DURATION,
        help="length in seconds",
    ),
    "seed": OptionSpec(
        "seed", int, -1, MAX_SEED, default=-1, help="-1 for random; reuse one to repeat a song"
    ),
    "instrumental": OptionSpec("instrumental", bool, default=False, help="no vocals"),
    "title": OptionSpec(
        "title", str, 1, MAX_TITLE_CHARS, help="the song's title (default: from its words)"
    ),
}

ALL_OPTIONS: dict[str, OptionSpec] = {**BASIC_OPTIONS, **ADVANCED_OPTIONS}


class GenerationRequest(BaseModel):
    """One song request, shared by every front-end. Immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    mode: Mode
    prompt: str = ""
    tags: str = ""
    lyrics: str = ""
    title: str = ""  # empty: bot.titles derives one
    # The provider to try first (a user's or community's preference), if it can serve.
    provider: str | None = None
    instrumental: bool = False
    duration: int = DEFAULT_DURATION
    seed: int = -1
    steps: int | None = None
    scheduler: Literal["euler", "heun"] | None = None
    guidance_type: Literal["cfg", "apg", "cfg_star"] | None = None
    granularity_scale: float | None = None
    guidance_interval: float | None = None
    guidance_interval_decay: float | None = None
    guidance_scale: float | None = None
    minimum_guidance_scale: float | None = None
    tag_guidance_scale: float | None = None
    lyric_guidance_scale: float | None = None
    thinking: bool | None = None
    vocal_language: str | None = None
    bpm: int | None = None
    key_scale: str | None = None
    time_signature: Literal["2", "3", "4", "6"] | None = None
    audio_format: Literal["mp3", "wav", "flac"] | None = None
    # Work on a song (issue 14). For every task but GENERATE, `source` is required and
    # `duration` is the length of the result, derived from the source (see _derive).
    task: Task = Task.GENERATE
    source: SourceAudio | None = None
    extend_before: int = 0  # EXTEND: seconds of new music before the source
    extend_after: int = 0  # EXTEND: seconds of new music after it
    repaint_start: float | None = None  # REPAINT: the window re-made, in source seconds
    repaint_end: float | None = None
    strength: float | None = None  # REMIX: 0 keeps the source, 1 ignores it
    # How many takes (distinct seeds) the user asked for; each take is its own job.
    takes: int = 1

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any) -> Any:
        """An edit's duration is not the user's to choose: it follows from the source."""
        if not isinstance(data, dict) or data.get("task", Task.GENERATE) == Task.GENERATE:
            return data
        source = data.get("source")
        seconds = source.seconds if isinstance(source, SourceAudio) else None
        if isinstance(source, dict) and isinstance(source.get("seconds"), int | float):
            seconds = float(source["seconds"])
        if seconds is None:
            return data
        total = math.ceil(seconds - 1e-6)
        if data.get("task") == Task.EXTEND:
            before, after = data.get("extend_before", 0), data.get("extend_after", 0)
            if isinstance(before, int) and isinstance(after, int):
                total += before + after
        return {**data, "duration": total}

    @field_validator("prompt", "tags", mode="before")
    @classmethod
    def _one_line(cls, value: Any) -> Any:
        return clean_text(value, multiline=False) if isinstance(value, str) else value

    @field_validator("lyrics", mode="before")
    @classmethod
    def _lines(cls, value: Any) -> Any:
        return clean_text(value, multiline=True) if isinstance(value, str) else value

    @field_validator("vocal_language", "key_scale", mode="before")
    @classmethod
    def _normalize(cls, value: Any, info: Any) -> Any:
        spec = ADVANCED_OPTIONS[info.field_name]
        if isinstance(value, str) and spec.normalize is not None:
            return spec.normalize(value) or value  # an invalid one is refused in _check
        return value

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, value: str | None) -> str | None:
        from bot.settings import PROVIDER_NAMES

        if value is not None and value not in PROVIDER_NAMES:
            raise InvalidRequest("provider", value, "one of " + ", ".join(PROVIDER_NAMES))
        return value

    @field_validator("title", mode="before")
    @classmethod
    def _title(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        return " ".join(clean_text(value, multiline=False).split())

    @model_validator(mode="after")
    def _check(self) -> GenerationRequest:
        _check_text(self)
        _check_task(self)
        _check_range(
            "duration", self.duration, MIN_DURATION, MAX_DURATION, "a whole number of seconds"
        )
        _check_range("seed", self.seed, -1, MAX_SEED, "a whole number (-1 = random)")
        for name, spec in ADVANCED_OPTIONS.items():
            value = getattr(self, name)
            if value is None or spec.choices or spec.kind is bool:
                continue
            if spec.normalize is not None:
                if spec.normalize(value) != value:
                    raise InvalidRequest(name, value, spec.allowed())
                continue
            if isinstance(value, float) and value != value:  # NaN
                raise InvalidRequest(name, value, spec.allowed())
            if not (
                spec.minimum is not None
                and spec.maximum is not None
                and spec.minimum <= value <= spec.maximum
            ):
                raise InvalidRequest(name, value, spec.allowed())
        return self

    @classmethod
    def build(cls, **fields: Any) -> GenerationRequest:
        """Validate fields into a request, raising InvalidRequest (never ValidationError)."""
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise _from_validation_error(exc, fields) from None

    @property
    def wants_vocals(self) -> bool:
        """False when instrumental was chosen or the lyrics say there are no vocals."""
        if self.instrumental:
            return False
        if self.mode is Mode.SONG:
            return not is_instrumental_lyrics(self.lyrics)
        return True

    def advanced(self) -> dict[str, Any]:
        """The advanced options the user set (provider defaults apply to the rest)."""
        return {k: getattr(self, k) for k in ADVANCED_OPTIONS if getattr(self, k) is not None}

    def with_seed(self, seed: int) -> GenerationRequest:
        return self.model_copy(update={"seed": seed})


# Terminal escape sequences, removed whole so no "[31m" is left behind: CSI (7-bit
# `ESC [ ... final` and 8-bit `\x9b ... final`) and OSC (`ESC ] ... BEL|ESC \`, window
# titles, hyperlinks). Then every other C0/C1 control and DEL.
_ESCAPES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves, screen clears
    r"|(?:\x1b\]|\x9d)[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"  # OSC: titles, links
)
_SPACES = re.compile(r"[\t\n\v\f\r\x85\u2028\u2029]")
_LINE_BREAKS = re.compile(r"[\r\v\f\x85\u2028\u2029]")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean_text(text: str, *, multiline: bool) -> str:
    """User or provider text made safe to store, log and show: escape sequences and
    control characters removed, line breaks normalised to "\\n" (kept only when
    `multiline`, as in lyrics; elsewhere they become spaces), surrounding space trimmed.
    Tabs survive in lyrics only."""
    text = _ESCAPES.sub("", text.replace("\r\n", "\n"))
    if multiline:
        text = _LINE_BREAKS.sub("\n", text)
    else:
        text = _SPACES.sub(" ", text)
    return _CONTROLS.sub("", text).strip()


def is_instrumental_lyrics(lyrics: str) -> bool:
    text = lyrics.strip().lower()
    return text == "" or text in INSTRUMENTAL_MARKERS


def _check_text(req: GenerationRequest) -> None:
    if req.mode is Mode.PROMPT:
        if not req.prompt:
            raise InvalidRequest(
                "prompt", req.prompt, f"describe the song in 1 to {MAX_PROMPT_CHARS} characters"
            )
        if req.tags or req.lyrics:
            field = "tags" if req.tags else "lyrics"
            raise InvalidRequest(
                field, getattr(req, field), "tags and lyrics belong to a composed song (song mode)"
            )
    else:
        if not req.tags or not any(t.strip() for t in req.tags.split(",")):
            raise InvalidRequest(
                "tags", req.tags, "give comma-separated style tags such as 'lofi, piano, rain'"
            )
        if req.prompt:
            raise InvalidRequest(
                "prompt", req.prompt, "a composed song takes tags and lyrics, not a prompt"
            )
    for field, limit in (
        ("prompt", MAX_PROMPT_CHARS),
        ("tags", MAX_TAGS_CHARS),
        ("lyrics", MAX_LYRICS_CHARS),
        ("title", MAX_TITLE_CHARS),
    ):
        value = getattr(req, field)
        if len(value) > limit:
            raise InvalidRequest(
                field,
                value,
                f"at most {limit} characters",
                problem=f"is too long ({len(value)} characters)",
            )


def _check_task(req: GenerationRequest) -> None:
    _check_range("takes", req.takes, 1, MAX_TAKES, "a whole number of takes")
    edits = {
        "extend_before": req.extend_before or None,
        "extend_after": req.extend_after or None,
        "repaint_start": req.repaint_start,
        "repaint_end": req.repaint_end,
        "strength": req.strength,
    }
    wanted = {
        Task.GENERATE: (),
        Task.EXTEND: ("extend_before", "extend_after"),
        Task.REPAINT: ("repaint_start", "repaint_end"),
        Task.REMIX: ("strength",),
    }[req.task]
    for name, value in edits.items():
        if value is not None and name not in wanted:
            raise InvalidRequest(name, value, f"only for {name.split('_')[0]}")
    if req.task is Task.GENERATE:
        if req.source is not None:
            raise InvalidRequest("source", req.source.file, "only for extend, remix or repaint")
        return
    source = req.source
    if source is None:
        raise InvalidRequest("source", None, "a song to work on (a posted song or your audio)")
    if req.task is Task.EXTEND:
        for name in ("extend_before", "extend_after"):
            _check_range(name, getattr(req, name), 0, MAX_DURATION, "a whole number of seconds")
        if req.extend_before + req.extend_after < 1:
            raise InvalidRequest("extend_after", 0, "at least 1 second before or after")
        if req.duration > MAX_DURATION:
            raise InvalidRequest(
                "extend_after",
                req.extend_before + req.extend_after,
                f"at most {MAX_DURATION - math.ceil(source.seconds - 1e-6)} seconds in all",
                problem=(
                    f"would make the song {req.duration} seconds long; songs are at most "
                    f"{MAX_DURATION} seconds"
                ),
            )
    elif req.task is Task.REPAINT:
        start, end = req.repaint_start, req.repaint_end
        allowed = f"a window inside the song: 0 <= start < end <= {_num(source.seconds)}"
        if start is None or end is None:
            raise InvalidRequest(
                "repaint_end" if start is not None else "repaint_start", None, allowed
            )
        if not (math.isfinite(start) and math.isfinite(end) and 0 <= start < end <= source.seconds):
            raise InvalidRequest("repaint_start", f"{_num(start)}-{_num(end)}", allowed)
    elif req.strength is not None and not (0 <= req.strength <= 1):
        raise InvalidRequest("strength", req.strength, "a number from 0 to 1")
    if req.duration < MIN_DURATION:
        raise InvalidRequest(
            "source",
            source.seconds,
            f"audio of at least {MIN_DURATION} seconds",
            problem=f"is only {_num(source.seconds)} seconds long",
        )


def _check_range(field: str, value: int, low: int, high: int, what: str) -> None:
    if not low <= value <= high:
        raise InvalidRequest(field, value, f"{what} from {low} to {high}")


def _from_validation_error(exc: ValidationError, fields: dict[str, Any]) -> InvalidRequest:
    err = exc.errors()[0]
    original = (err.get("ctx") or {}).get("error")
    if isinstance(original, InvalidRequest):
        return original
    loc = err.get("loc") or ()
    field = str(loc[0]) if loc else "request"
    value = fields.get(field, err.get("input"))
    if err.get("type") == "extra_forbidden":
        return InvalidRequest(
            field,
            value,
            "known options are " + ", ".join(["mode", "prompt", "tags", "lyrics", *ALL_OPTIONS]),
        )
    if field == "mode":
        # pydantic's input for a missing field is the whole payload: never echo that.
        missing = err.get("type") == "missing"
        return InvalidRequest(
            field,
            None if missing else value,
            "one of prompt, song",
            problem="is missing" if missing else None,
        )
    spec = ALL_OPTIONS.get(field)
    if spec is not None:
        if spec.kind is bool:
            return InvalidRequest(field, value, "true or false")
        return InvalidRequest(field, value, spec.allowed())
    return InvalidRequest(field, value, "plain text")


_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n"}


def parse_option_value(name: str, raw: str) -> Any:
    """Turn one `name=value` text into the option's type, or raise InvalidRequest."""
    spec = ALL_OPTIONS.get(name)
    if spec is None:
        raise InvalidRequest(name, raw, "known options are " + ", ".join(ALL_OPTIONS))
    text = raw.strip()
    if spec.kind is bool:
        if text.lower() in _TRUE or text == "":
            return True
        if text.lower() in _FALSE:
            return False
        raise InvalidRequest(name, raw, "true or false")
    if spec.choices:
        if text.lower() in spec.choices:
            return text.lower()
        raise InvalidRequest(name, raw, spec.allowed())
    if spec.normalize is not None:
        value = spec.normalize(text)
        if value is None:
            raise InvalidRequest(name, raw, spec.allowed())
        return value
    if spec.kind is str:
        return text
    try:
        number: float = int(text) if spec.kind is int else float(text)
    except ValueError:
        raise InvalidRequest(name, raw, spec.allowed()) from None
    if spec.kind is float and (
        not re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text)
        or not math.isfinite(number)
    ):  # nan, inf, and "1e400" (overflows to inf)
        raise InvalidRequest(name, raw, spec.allowed())
    return number


def parse_options(pairs: dict[str, str]) -> dict[str, Any]:
    """Parse textual options (Telegram's `name=value`, the CLI) into request fields."""
    return {name: parse_option_value(name, raw) for name, raw in pairs.items()}
