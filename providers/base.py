"""The provider contract: what the engine needs from any service that runs ACE-Step.

A provider adapter turns a `GenerationRequest` into the service's wire protocol. It is
small on purpose: `submit` returns a serialisable `Handle` (stored in the job row so a
restart can resume), `poll` returns a normalised `Status`, `cancel` asks the service to
stop, and `fetch_audio` downloads the finished file. Errors are mapped to the typed
exceptions below in exactly one place per adapter.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import httpx

from bot.requests import GenerationRequest, Mode, SourceAudio, Task

if TYPE_CHECKING:
    from providers.download import AddressPolicy

log = logging.getLogger("acestep.providers")
T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass(frozen=True)
class OptionRange:
    """How one provider takes one request option: its field name and the values it accepts
    (a range for numbers, a list for choices; neither = whatever the request allows)."""

    wire: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()

    def admits(self, value: Any) -> bool:
        if self.choices:
            return str(value) in self.choices
        if isinstance(value, bool) or not isinstance(value, int | float):
            return True
        if self.minimum is not None and value < self.minimum:
            return False
        return self.maximum is None or value <= self.maximum

    def describe(self) -> str:
        """'from 3 to 60', 'at most 30', 'one of mp3, wav'."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.minimum is not None and self.maximum is not None:
            return f"from {_num(self.minimum)} to {_num(self.maximum)}"
        if self.maximum is not None:
            return f"at most {_num(self.maximum)}"
        if self.minimum is not None:
            return f"at least {_num(self.minimum)}"
        return "any value"


# The knobs of the ACE-Step v1 pipeline as fal documents them (PROVIDERS.md); hosts of the
# same model start from these and change what they name or bound differently.
ACE_STEP_V1_OPTIONS: dict[str, OptionRange] = {
    "steps": OptionRange("number_of_steps", 3, 60),
    "scheduler": OptionRange("scheduler", choices=("euler", "heun")),
    "guidance_type": OptionRange("guidance_type", choices=("cfg", "apg", "cfg_star")),
    "granularity_scale": OptionRange("granularity_scale", -100, 100),
    "guidance_interval": OptionRange("guidance_interval", 0, 1),
    "guidance_interval_decay": OptionRange("guidance_interval_decay", 0, 1),
    "guidance_scale": OptionRange("guidance_scale", 0, 200),
    "minimum_guidance_scale": OptionRange("minimum_guidance_scale", 0, 200),
    "tag_guidance_scale": OptionRange("tag_guidance_scale", 0, 10),
    "lyric_guidance_scale": OptionRange("lyric_guidance_scale", 0, 10),
}


def wire_values(options: Mapping[str, OptionRange], request: GenerationRequest) -> dict[str, Any]:
    """The options the user set that a provider takes, under the provider's field names."""
    return {options[k].wire: v for k, v in request.advanced().items() if k in options}


@dataclass(frozen=True)
class Capabilities:
    """What a provider can do and what it costs."""

    modes: frozenset[Mode]
    # What it can do with music (issue 14): a provider without EXTEND is skipped for an
    # extend request, as one without a mode is skipped for that mode.
    tasks: frozenset[Task] = frozenset({Task.GENERATE})
    max_duration: int = 240
    min_duration: int = 5
    # The GenerationRequest advanced options this provider passes to the model, each with
    # its wire name and the range this provider accepts.
    options: Mapping[str, OptionRange] = field(default_factory=dict)
    price_per_second: float = 0.0002  # USD per second of audio
    concurrency: int = 2  # jobs this bot keeps in flight at the provider at once

    def can_serve(self, request: GenerationRequest) -> bool:
        return (
            request.mode in self.modes
            and request.task in self.tasks
            and self.min_duration <= request.duration <= self.max_duration
            and not self.out_of_range(request)
        )

    def out_of_range(self, request: GenerationRequest) -> list[tuple[str, OptionRange]]:
        """Options the user set that this provider takes, but not with that value."""
        return [
            (name, self.options[name])
            for name, value in request.advanced().items()
            if name in self.options and not self.options[name].admits(value)
        ]

    def ignored_options(self, request: GenerationRequest) -> list[str]:
        """Advanced options the user set that this provider does not honour."""
        return sorted(set(request.advanced()) - set(self.options))

    def wire_options(self, request: GenerationRequest) -> dict[str, Any]:
        """The honoured options under this provider's field names."""
        return wire_values(self.options, request)


class UploadCache(Protocol):
    """Where a provider remembers the source files it already holds (fal storage URLs,
    WaveSpeed media URLs), so a restart mid-submit does not upload the same file twice.
    Keyed by provider name and the file's SHA-256; `expires_at` is a `time.time()` instant
    after which the provider no longer has it."""

    async def get(self, provider: str, sha256: str) -> str | None: ...

    async def put(self, provider: str, sha256: str, ref: str, expires_at: float) -> None: ...


class MemoryUploads:
    """An UploadCache for one process (the CLI's `generate`, tests)."""

    def __init__(self) -> None:
        self._refs: dict[tuple[str, str], tuple[str, float]] = {}

    async def get(self, provider: str, sha256: str) -> str | None:
        import time

        found = self._refs.get((provider, sha256))
        return found[0] if found and found[1] > time.time() else None

    async def put(self, provider: str, sha256: str, ref: str, expires_at: float) -> None:
        self._refs[(provider, sha256)] = (ref, expires_at)


@dataclass(frozen=True)
class SourceFile:
    """The source audio of an edit (request.source), on disk, as handed to `submit`."""

    path: Path
    sha256: str
    seconds: float
    uploads: UploadCache


def hosted_edit_fields(
    request: GenerationRequest, source: SourceAudio, tags: str
) -> dict[str, Any]:
    """The task's own fields of the ACE-Step edit endpoints fal and WaveSpeed both host
    (audio-to-audio, audio-inpaint, audio-outpaint; docs/edit-modes.md)."""
    if request.task is Task.REMIX:
        # Neither has a strength knob; "original_tags" is required.
        return {
            "edit_mode": "remix",
            "original_tags": source.tags or tags,
            "original_lyrics": source.lyrics,
        }
    if request.task is Task.REPAINT:
        return {
            "start_time_relative_to": "start",
            "start_time": request.repaint_start,
            "end_time_relative_to": "start",
            "end_time": request.repaint_end,
        }
    # EXTEND: both sent, as the providers' default for "after" is 30 s.
    return {
        "extend_before_duration": request.extend_before,
        "extend_after_duration": request.extend_after,
    }


@dataclass(frozen=True)
class Handle:
    """Everything needed to poll, fetch or cancel a submitted job, even after a restart."""

    provider: str
    data: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps({"provider": self.provider, "data": self.data}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Handle:
        raw = json.loads(text)
        return cls(provider=str(raw["provider"]), data=dict(raw["data"]))


@dataclass(frozen=True)
class Result:
    """A finished generation as the provider reports it."""

    audio_url: str
    seed: int | None = None
    tags: str | None = None
    lyrics: str | None = None
    content_type: str | None = None
    # False when the provider reported another seed than the one it was sent: it ignores
    # seeds, so `seed` (what it used) cannot make the song again. Users are told so.
    seed_honoured: bool = True
    # Anything else worth keeping: inference time, NSFW flags, bpm, provider's ids.
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Queued:
    position: int | None = None


@dataclass(frozen=True)
class Running:
    progress: float | None = None  # 0..1 when the provider reports it
    message: str | None = None  # latest provider log line or progress text


@dataclass(frozen=True)
class Succeeded:
    result: Result


@dataclass(frozen=True)
class Failed:
    reason: str  # safe to show a user
    # True when the model refused the input (content policy, validation): never retried.
    rejected: bool = False
    # False only where the provider documents that this failure is not billed (fal: a
    # server error); the spend keeps the run's charge otherwise.
    billed: bool = True


@dataclass(frozen=True)
class Cancelled:
    pass


Status = Queued | Running | Succeeded | Failed | Cancelled


class CancelOutcome(Enum):
    """What a provider said to a cancel. Only REMOVED says the job never ran (so it is
    not billed); REQUESTED stops it, but the provider may bill what it did."""

    REFUSED = "refused"  # too late (it finished), unknown, or the provider has no cancel
    REQUESTED = "requested"  # it will stop
    REMOVED = "removed"  # taken out of the provider's queue before it ran

    def __bool__(self) -> bool:
        return self is not CancelOutcome.REFUSED


class ProviderError(Exception):
    """Base of provider errors. `message` is safe to log; it never holds a key."""

    def __init__(
        self,
        provider: str,
        message: str,
        *,
        status_code: int | None = None,
        retry_after: float | None = None,
        maybe_accepted: bool = False,
    ) -> None:
        self.provider = provider
        self.message = message
        self.status_code = status_code
        self.retry_after = retry_after
        # A submit that timed out may have been queued at the provider (and billed).
        self.maybe_accepted = maybe_accepted
        code = f" (HTTP {status_code})" if status_code else ""
        super().__init__(f"{provider}{code}: {message}")


class Rejected(ProviderError):
    """The provider refused this input (4xx validation, content policy). Tell the user;
    never retry, never fail over."""


class AuthError(ProviderError):
    """Bad or missing key (401/403). The operator must fix it; fail over meanwhile."""


class BillingError(AuthError):
    """Balance exhausted or budget exceeded (402, fal's locked account)."""


class Busy(ProviderError):
    """Rate limited or queue full (429/503): try later or fail over."""


class Unavailable(ProviderError):
    """Unreachable, timed out or a server error: try later or fail over."""


class TaskLost(ProviderError):
    """The provider no longer knows the task (e.g. the local server restarted)."""


class CannotServe(TaskLost):
    """The provider found it cannot serve this request after all (e.g. no ACE-Step
    server has the language model that a described song needs). Its capabilities now say
    so; the job goes back to the queue for another provider, with no cool-down."""


class ProviderFailedDownload(ProviderError):
    """The result file cannot be had (expired, gone, too large): the job failed."""


class Provider(ABC):
    """A service that runs ACE-Step. Subclasses set `name` and `capabilities`."""

    name: str
    capabilities: Capabilities
    # Where result downloads outside the provider's own origins may connect: None is
    # public addresses only (providers/download.py). Tests that serve a file from another
    # loopback origin set AddressPolicy.allowing("127.0.0.0/8").
    address_policy: AddressPolicy | None = None

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    @abstractmethod
    async def submit(
        self, request: GenerationRequest, seed: int, source: SourceFile | None = None
    ) -> Handle:
        """Start one generation with this concrete seed. Never retried blindly.

        `source` is given exactly when `request.task` is not GENERATE (only to providers
        whose capabilities list that task)."""

    def billed_seconds(self, request: GenerationRequest) -> float:
        """Seconds of audio this provider bills for the request (its documented price
        for that task: some bill the whole result of an edit, some only what is new)."""
        return float(request.duration)

    @abstractmethod
    async def poll(self, handle: Handle) -> Status:
        """Ask once how the job is doing. Safe to retry."""

    async def cancel(self, handle: Handle) -> CancelOutcome:
        """Ask the provider to stop; what it answered (REFUSED where it has no cancel)."""
        return CancelOutcome.REFUSED

    async def save_audio(self, result: Result, dest: Path, *, deadline: float | None = None) -> int:
        """Stream the finished audio into `dest` at once (result URLs expire), by the
        `time.time()` instant `deadline`; returns its size. Nothing is left at `dest` when
        it fails. Errors: see providers.download.download."""
        # Imported here: providers.download builds on this module's errors.
        from providers.download import PUBLIC_ONLY, download

        out = await asyncio.to_thread(dest.open, "wb")
        try:
            return await download(
                self.client,
                self.name,
                result.audio_url,
                out,
                trusted=self.trusted_origins(),
                deadline=deadline,
                policy=self.address_policy or PUBLIC_ONLY,
            )
        except BaseException:
            # Synchronously: this also runs while the task is being cancelled.
            out.close()
            dest.unlink(missing_ok=True)  # noqa: ASYNC240
            raise
        finally:
            if not out.closed:
                await asyncio.to_thread(out.close)

    @property
    def streams_status(self) -> bool:
        """True while `wait_status` returns as soon as the status changes (a status
        stream): the engine then waits on it instead of sleeping between polls."""
        return False

    async def wait_status(self, handle: Handle, since: Status | None, timeout: float) -> Status:
        """The job's status once it differs from `since`, or whatever it is after
        `timeout` seconds. Providers that can be told of a change override this; the
        default asks once."""
        return await self.poll(handle)

    async def fetch_audio(self, result: Result) -> bytes:
        """The finished audio in memory, under the same rules as `save_audio` (for tests
        and tools; the engine streams to disk)."""
        from providers.download import PUBLIC_ONLY, download

        out = io.BytesIO()
        await download(
            self.client,
            self.name,
            result.audio_url,
            out,
            trusted=self.trusted_origins(),
            policy=self.address_policy or PUBLIC_ONLY,
        )
        return out.getvalue()

    def trusted_origins(self) -> set[tuple[str, str, int]]:
        """The provider's own servers (the origins its key goes to: its configured base
        URLs): the operator chose them, so downloads from them skip the address check."""
        auth = self.client.auth
        return set(auth.origins) if isinstance(auth, KeyForOrigins) else set()

    def poll_interval(self) -> float:
        """The shortest sensible pause between polls, in seconds."""
        return 1.0

    async def health(self) -> dict[str, Any]:
        """Provider-specific facts for `/healthz` and `config check` (none by default)."""
        return {}

    async def aclose(self) -> None:
        await self.client.aclose()


def api_client(
    *,
    auth: httpx.Auth,
    transport: httpx.AsyncBaseTransport | None,
    timeout: float,
    base_url: str = "",
    headers: dict[str, str] | None = None,
) -> httpx.AsyncClient:
    """The one HTTP client an adapter uses: its auth, a short connect timeout."""
    return httpx.AsyncClient(
        base_url=base_url,
        transport=transport,
        auth=auth,
        timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        headers={"User-Agent": "acestep-bot", **(headers or {})},
    )


def whole_number(value: Any) -> int | None:
    """An int from a JSON number that is whole (not a bool), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


async def send(
    client: httpx.AsyncClient,
    provider: str,
    method: str,
    url: str,
    *,
    what: str,
    submit: bool = False,
    **kwargs: Any,
) -> httpx.Response:
    """One HTTP call; a timeout or a network failure becomes Unavailable. A submit that
    timed out says it may exist, because the engine must not send it there again."""
    try:
        return await client.request(method, url, **kwargs)
    except httpx.TimeoutException:
        extra = "; the request may still have been queued (and billed)" if submit else ""
        raise Unavailable(provider, f"{what} timed out{extra}", maybe_accepted=submit) from None
    except httpx.TransportError as exc:
        raise Unavailable(provider, f"{what}: connection failed ({type(exc).__name__})") from None


def backoff_delays(retries: int, first: float) -> tuple[float, ...]:
    """`retries` waits doubling from `first`: (1, 2, 4, ...)."""
    return tuple(first * 2**i for i in range(retries))


async def retry_reads(
    call: Callable[[], Awaitable[T]],
    *,
    delays: Sequence[float],
    sleep: Sleep,
    provider: str,
    what: str,
    max_wait: float = 30.0,
) -> T:
    """Repeat a read (status, result, stats; never a submit) after a Busy/Unavailable
    answer, waiting each delay or the provider's Retry-After, whichever is longer. A
    Retry-After beyond `max_wait` goes straight back to the engine, which backs off."""
    attempt = 0
    while True:
        try:
            return await call()
        except (Busy, Unavailable) as exc:
            if attempt >= len(delays):
                raise
            wait = delays[attempt]
            if exc.retry_after is not None:
                if exc.retry_after > max_wait:
                    raise
                wait = max(wait, exc.retry_after)
            attempt += 1
            log.info(
                "%s: %s failed (%s); retry %d in %.1f s", provider, what, exc.message, attempt, wait
            )
            await sleep(wait)


def origin(url: str | httpx.URL) -> tuple[str, str, int]:
    """(scheme, host, port) with the default port filled in, for same-server checks."""
    parsed = httpx.URL(url) if isinstance(url, str) else url
    return (parsed.scheme, parsed.host, parsed.port or (443 if parsed.scheme == "https" else 80))


class KeyForOrigins(httpx.Auth):
    """Adds the Authorization header only on requests to the provider's own servers, so
    a key never travels to the CDN that serves result files, or anywhere else."""

    def __init__(self, header: str | None, urls: Iterable[str] = ()) -> None:
        self._header = header
        self.origins = {origin(u) for u in urls}

    def add(self, url: str) -> None:
        self.origins.add(origin(url))

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if self._header and origin(request.url) in self.origins:
            request.headers["Authorization"] = self._header
        yield request


def http_error_text(resp: httpx.Response, limit: int = 300) -> str:
    """The most useful human text from an error response, shortened."""
    try:
        body: Any = resp.json()
    except ValueError:
        body = resp.text
    text = _find_message(body) if not isinstance(body, str) else body
    text = " ".join((text or resp.reason_phrase or "error").split())
    return text[:limit]


def _find_message(body: Any) -> str:
    if isinstance(body, dict):
        for key in ("detail", "message", "error", "title", "msg"):
            if body.get(key):
                return _find_message(body[key])
        return json.dumps(body)[:300]
    if isinstance(body, list) and body:
        parts = [_find_message(item) for item in body[:3]]
        return "; ".join(p for p in parts if p)
    return str(body)


def parse_retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
