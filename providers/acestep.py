"""Local GPU worker adapter: the ACE-Step 1.5 REST server (`acestep-api`) on the operator's GPUs.

Wire protocol (PROVIDERS.md, "ACE-Step 1.5 REST server", checked against the upstream
`acestep/api_server.py`): `POST /release_task` queues a task, `POST /query_result`
reports status 0 (queued or running), 1 (succeeded) or 2 (failed) with `result` as a JSON
*string*, `GET /v1/audio?path=...` serves the file, `GET /v1/stats` and `GET /health`
describe the server. Successful answers are wrapped in `{data, code, error, timestamp,
extra}`; refusals are FastAPI's `{"detail": ...}` with an HTTP error status.

Several servers (one per GPU) can be configured: each task goes to the least loaded one
that answers, and its URL is stored in the handle. A server that stops answering is
skipped until its `/health` answers again.

The server keeps its queue in memory. After a restart it answers an unknown task id
with status 0 and an empty result, like a queued task, and a task that was running keeps
its last on-disk progress entry. `poll` therefore checks `/v1/stats` before each query
and raises `TaskLost` when the task cannot still be pending there (see `_loss_evidence`).
`TaskLost` means "resubmit": call `submit` again with the same request and seed.

A described song (prompt mode) is two tasks, so the length the user asked for is kept:
upstream's `sample_query` lets the language model (LM) pick the duration and replaces
`audio_duration` with it. First a "write" task (`sample_query` with `analysis_only`: the
LM writes caption and lyrics, no audio), then a "render" task (text2music with that
caption and lyrics and the user's duration and seed). `poll` submits the second when the
first succeeds and records it in the handle, which the engine stores again.

Prompt mode (and `thinking`) need the LM, which upstream does not load on GPUs under
12 GB. A server whose `/health` says `llm_initialized: false` (newer builds), or whose
write task failed, is not used for them; when no server can, the capabilities drop
prompt mode so routing falls back to the next provider (`health()` says why).

Checked against ace-step/ACE-Step-1.5 `acestep/api_server.py` at commit f30aee4
(2026-02-08) and the newer `acestep/api/` modules in the public index (see
docs/providers.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx

from bot.requests import (
    AUDIO_FORMATS,
    TIME_SIGNATURES,
    GenerationRequest,
    Mode,
    Task,
    normalize_key_scale,
    normalize_language,
)
from providers.base import (
    AuthError,
    Busy,
    CannotServe,
    Capabilities,
    Failed,
    Handle,
    KeyForOrigins,
    OptionRange,
    Provider,
    ProviderError,
    Queued,
    Result,
    Running,
    Sleep,
    SourceFile,
    Status,
    Succeeded,
    TaskLost,
    Unavailable,
    api_client,
    backoff_delays,
    http_error_text,
    parse_retry_after,
    retry_reads,
    whole_number,
)
from providers.errors import Stage, http_error
from providers.uploads import content_type, read_source

log = logging.getLogger(__name__)

# The server accepts 10-600 s; 240 s matches the hosted APIs and our request limit.
SERVER_MIN_DURATION = 10
DEFAULT_MAX_DURATION = 240
# The server drops finished jobs from its store 24 h after they finish (upstream
# JOB_STORE_MAX_AGE_SECONDS), so its counters only bound what it can have forgotten
# within that window.
STORE_MEMORY_S = 24 * 3600
_START_TOLERANCE_S = 5.0
# How long a server that failed a language-model task is kept out of prompt mode before
# it is given another chance (an operator may have loaded the LM meanwhile).
LM_RECHECK_S = 600.0
NO_LM = (
    "its language model (LM) is not loaded, which described songs need; start it with "
    "ACESTEP_INIT_LLM=true (GPUs under 12 GB skip it by default)"
)

TURBO_MAX_STEPS = 20  # upstream: turbo 1-20 (8 recommended), base 1-200


def server_options(max_steps: int = TURBO_MAX_STEPS) -> dict[str, OptionRange]:
    """Our request options under the server's field names, with the ranges upstream
    documents (docs/en/API.md, acestep/constants.py); key and language arrive already
    in upstream's spelling (bot/requests.py)."""
    return {
        "steps": OptionRange("inference_steps", 1, max_steps),
        # Upstream's own UI offers 1-15; it only affects the base model.
        "guidance_scale": OptionRange("guidance_scale", 1, 15),
        "thinking": OptionRange("thinking"),
        "vocal_language": OptionRange("vocal_language"),
        "bpm": OptionRange("bpm", 30, 300),
        "key_scale": OptionRange("key_scale"),
        "time_signature": OptionRange("time_signature", choices=TIME_SIGNATURES),
        "audio_format": OptionRange("audio_format", choices=AUDIO_FORMATS),
    }


_CONTENT_TYPES = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "ogg": "audio/ogg"}

Clock = Callable[[], float]
T = TypeVar("T")

# Work on a song (docs/edit-modes.md): upstream's task types ("cover", "repaint"; TASK_TYPES
# in acestep/constants.py). An extend is a repaint past an end of the source: the handler
# pads the source where repainting_start < 0 or repainting_end > its length
# (prepare_padding_info in acestep/handler.py), so one task extends one end.
UPSTREAM_TASK = {Task.REMIX: "cover", Task.REPAINT: "repaint", Task.EXTEND: "repaint"}
# The multipart part upstream reads the source from ("ctx_audio" is its other name).
SOURCE_PART = "src_audio"


@dataclass(frozen=True)
class _AceStepCapabilities(Capabilities):
    """What upstream's one repaint window cannot do: extend both ends at once (a window
    from before the start to past the end would re-make the source too). Edits are of
    composed songs (tags and lyrics) only: a described song's write task has no source."""

    def can_serve(self, request: GenerationRequest) -> bool:
        if request.task is not Task.GENERATE:
            if request.mode is not Mode.SONG:
                return False
            if request.task is Task.EXTEND and request.extend_before and request.extend_after:
                return False
        return super().can_serve(request)


@dataclass(frozen=True)
class ServerStats:
    """One `/v1/stats` answer, reduced to what dispatch and loss detection need."""

    queue_size: int
    queue_maxsize: int | None
    queued: int
    running: int
    finished: int  # succeeded + failed still in the server's store
    total: int
    avg_job_seconds: float | None = None
    started_at: float | None = None  # only when the server reports uptime or start time

    @property
    def pending(self) -> int:
        """Jobs really waiting or running. Not `jobs.queued`: upstream creates the job
        record before it checks the queue, so every refused submit leaves a record that
        stays "queued" for ever; the queue's own size does not count those."""
        return self.queue_size + self.running

    @property
    def load(self) -> int:
        return self.queue_size + self.running

    @property
    def full(self) -> bool:
        return self.queue_maxsize is not None and self.queue_size >= self.queue_maxsize

    @classmethod
    def parse(cls, data: Any, now: float) -> ServerStats:
        data = data if isinstance(data, dict) else {}
        jobs = data.get("jobs") if isinstance(data.get("jobs"), dict) else {}
        queued = _int(jobs.get("queued"))
        maxsize = data.get("queue_maxsize")
        return cls(
            queue_size=_int(data.get("queue_size"), queued),
            queue_maxsize=_int(maxsize) if maxsize is not None else None,
            queued=queued,
            running=_int(jobs.get("running")),
            finished=_int(jobs.get("succeeded")) + _int(jobs.get("failed")),
            total=_int(jobs.get("total")),
            avg_job_seconds=_float(data.get("avg_job_seconds")),
            started_at=_started_at(data, now),
        )


@dataclass
class _Server:
    """What this adapter knows about one server between calls."""

    url: str
    index: int
    dispatch: bool = True  # False for a server known only from a stored handle
    unreachable_since: float | None = None
    last_probe: float = 0.0
    # Tasks submitted before this moment are gone: the process went away after that.
    lost_before: float = 0.0
    last_stats: ServerStats | None = None
    last_stats_at: float = 0.0
    tasks: set[str] = field(default_factory=set)  # ours, not yet seen finished
    # Whether the server has its language model: None until known (older builds do not
    # say; a failed LM task tells), with why and since when.
    lm: bool | None = None
    lm_reason: str = ""
    lm_known_at: float = 0.0
    honours_seeds: bool | None = None  # False once it reported another seed than ours

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc or self.url


class _Refused(Unavailable):
    """The connection was refused: the request never reached the server."""


class AceStepProvider(Provider):
    """The operator's own ACE-Step 1.5 servers: free to run, one queue per GPU."""

    name = "acestep"

    def __init__(
        self,
        server_urls: list[str],
        api_key: str | None = None,
        *,
        price_per_second: float = 0.0,
        concurrency: int | None = None,
        prompt_mode: bool = True,
        max_duration: int = DEFAULT_MAX_DURATION,
        max_steps: int = TURBO_MAX_STEPS,
        extra_fields: Mapping[str, Any] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        poll_interval: float = 2.0,
        poll_retries: int = 2,
        retry_backoff: float = 0.5,
        timeout: float = 30.0,
        health_timeout: float = 3.0,
        recheck_after: float = 10.0,
        sleep: Sleep = asyncio.sleep,
        clock: Clock = time.time,
    ) -> None:
        """`concurrency` defaults to two tasks per server (one running, one waiting), so
        each GPU stays busy. `prompt_mode` needs the server's language model loaded.
        `max_steps` is 20 for the turbo model (200 for the base model). `extra_fields` go
        into every task, e.g. {"model": "acestep-v15-turbo"}."""
        urls = [u.strip().rstrip("/") for u in server_urls if u.strip()]
        if not urls:
            raise ValueError("AceStepProvider needs at least one server URL")
        self._auth = KeyForOrigins(f"Bearer {api_key}" if api_key else None)
        client = api_client(
            transport=transport,
            auth=self._auth,
            timeout=timeout,
        )
        super().__init__(client)
        self._servers: dict[str, _Server] = {}
        for url in urls:
            self._server(url)
        self._prompt_mode = prompt_mode
        self._all_options = server_options(max_steps)
        self.capabilities = _AceStepCapabilities(
            modes=frozenset({Mode.SONG, Mode.PROMPT} if prompt_mode else {Mode.SONG}),
            tasks=frozenset({Task.GENERATE, *UPSTREAM_TASK}),
            min_duration=SERVER_MIN_DURATION,
            max_duration=min(max_duration, DEFAULT_MAX_DURATION),
            options=self._all_options,
            price_per_second=price_per_second,
            concurrency=concurrency if concurrency is not None else 2 * len(urls),
        )
        self._extra = dict(extra_fields or {})
        self._poll_interval = poll_interval
        self._poll_retries = poll_retries
        self._retry_backoff = retry_backoff
        self._health_timeout = health_timeout
        self._recheck_after = recheck_after
        self._sleep = sleep
        self._clock = clock
        # One dispatch at a time, so each choice sees the load the previous one added.
        self._dispatch_lock = asyncio.Lock()

    @property
    def server_urls(self) -> list[str]:
        return [s.url for s in self._servers.values() if s.dispatch]

    # -- the contract -------------------------------------------------------------------

    def build_body(self, request: GenerationRequest, seed: int) -> dict[str, Any]:
        """The `/release_task` JSON of the task that makes the audio (for a described
        song: everything but the caption and lyrics, which the write task supplies)."""
        body: dict[str, Any] = dict(self._extra)
        if request.mode is Mode.SONG:
            body["prompt"] = request.tags
            body["lyrics"] = request.lyrics if request.wants_vocals else "[Instrumental]"
        else:
            # The LM already wrote the caption: do not have it rewrite its own words.
            body["use_cot_caption"] = False
        body.update(
            {
                "audio_duration": request.duration,
                "batch_size": 1,  # the server's default is 2 songs
                # With use_random_seed false, upstream uses `seed` (newer builds through
                # _resolve_generation_seeds; f30aee4 still drew a random one).
                "use_random_seed": False,
                "seed": seed,
                # MP3 unless asked otherwise: what the chat gets, so it need not be
                # re-encoded when it fits the upload limit.
                "audio_format": "mp3",
            }
        )
        body.update(self.capabilities.wire_options(request))
        if request.task is not Task.GENERATE:
            body.update(self._edit_fields(request))
        return body

    @staticmethod
    def _edit_fields(request: GenerationRequest) -> dict[str, Any]:
        """The task fields of an edit; the length follows from the source (upstream
        ignores audio_duration for these tasks, so it is left out)."""
        source = request.source
        if source is None:
            raise ValueError(f"a {request.task} request needs its source")
        fields: dict[str, Any] = {"task_type": UPSTREAM_TASK[request.task], "audio_duration": None}
        if request.task is Task.REMIX:
            # Ours: 0 keeps the source, 1 ignores it; upstream's audio_cover_strength
            # (default 1.0) is how strongly the source shapes the cover.
            # Unset: upstream's default.
            if request.strength is not None:
                fields["audio_cover_strength"] = round(1.0 - request.strength, 4)
        elif request.task is Task.REPAINT:
            fields["repainting_start"] = request.repaint_start
            fields["repainting_end"] = request.repaint_end
        elif request.extend_before:
            fields["repainting_start"] = -float(request.extend_before)
            fields["repainting_end"] = 0.0
        else:
            fields["repainting_start"] = float(source.seconds)
            fields["repainting_end"] = float(source.seconds) + request.extend_after
        return fields

    def write_body(self, request: GenerationRequest) -> dict[str, Any]:
        """The write task of a described song: the LM turns the description into a
        caption and lyrics (`analysis_only`: no audio is made)."""
        query = request.prompt
        # The server reads "instrumental" in the description as "no vocals".
        if request.instrumental and "instrumental" not in query.lower():
            query = f"{query}, instrumental"
        body: dict[str, Any] = {
            **self._extra,
            "sample_query": query,
            "analysis_only": True,
            "use_cot_caption": False,
            "use_cot_language": False,
            "batch_size": 1,
        }
        if request.vocal_language:
            body["vocal_language"] = request.vocal_language
        return body

    def _needs_lm(self, request: GenerationRequest) -> bool:
        return request.mode is Mode.PROMPT or bool(request.thinking)

    async def submit(
        self, request: GenerationRequest, seed: int, source: SourceFile | None = None
    ) -> Handle:
        """Queue one task on the least loaded server that answers (for a described song,
        its write task, on a server with the language model)."""
        render = self.build_body(request, seed)
        upload: tuple[str, bytes, str] | None = None
        if request.task is not Task.GENERATE:
            if source is None:
                raise ValueError(f"a {request.task} request needs its source file")
            # The server keeps no uploads (a temp file per task, deleted after it), so the
            # file goes with each submit; `source.uploads` has nothing to remember here.
            upload = (source.path.name, await read_source(source), content_type(source))
        async with self._dispatch_lock:
            ranked = await self._rank_servers(needs_lm=self._needs_lm(request))
            if request.mode is Mode.PROMPT:
                ranked = [pair for pair in ranked if pair[0].lm is not False]
                if not ranked:
                    raise CannotServe(self.name, f"no server can make described songs: {NO_LM}")
            elif request.thinking:  # first to servers that have (or may have) the LM
                ranked.sort(key=lambda pair: pair[0].lm is False)
            last_error: ProviderError | None = None
            for server, _stats in ranked:
                body = render
                if request.thinking and server.lm is False:
                    body = {k: v for k, v in render.items() if k != "thinking"}
                    log.info("acestep: %s has no LM; thinking left out", server.host)
                if request.mode is Mode.PROMPT:
                    body = self.write_body(request)
                try:
                    data = await self._start_task(server, body, upload)
                except (_Refused, Busy) as exc:
                    # Refused or queue full: no task was created there, so the next
                    # server may take it without risking a duplicate.
                    last_error = exc
                    continue
                handle_data: dict[str, Any] = {
                    "server": server.url,
                    "seed": seed,
                    "mode": request.mode.value,
                    **data,
                }
                if request.mode is Mode.PROMPT:
                    handle_data["phase"] = "write"
                    handle_data["render"] = render
                    # What the user chose; the LM's choice fills in the rest.
                    handle_data["fixed"] = sorted(
                        k
                        for k in ("bpm", "key_scale", "time_signature", "vocal_language")
                        if getattr(request, k) is not None
                    )
                return Handle(self.name, handle_data)
            assert last_error is not None
            raise last_error

    async def _start_task(
        self,
        server: _Server,
        body: dict[str, Any],
        upload: tuple[str, bytes, str] | None = None,
    ) -> dict[str, Any]:
        """POST one task; the handle fields that track it (id, time, queue, counters).
        With a source file it goes as multipart/form-data, the file in `src_audio` and
        every other field a form value, as upstream's /release_task parses it."""
        submitted_at = self._clock()
        if upload is None:
            data = await self._call(server, "POST", "/release_task", json=body)
        else:
            form = {k: _form_value(v) for k, v in body.items() if v is not None}
            data = await self._call(
                server, "POST", "/release_task", data=form, files={SOURCE_PART: upload}
            )
        if not isinstance(data, dict) or not data.get("task_id"):
            raise Unavailable(self.name, f"{server.host} answered without a task id")
        task_id = str(data["task_id"])
        server.tasks.add(task_id)
        snapshot = await self._snapshot(server)
        log.info("acestep task %s queued on %s", task_id, server.host)
        return {
            "task_id": task_id,
            "submitted_at": submitted_at,
            "queue_position": _int(data.get("queue_position"), 1),
            "snapshot": snapshot,
        }

    async def poll(self, handle: Handle) -> Status:
        """Ask the server that took the task how it is doing."""
        server = self._server(str(handle.data["server"]), dispatch=False)
        task_id = str(handle.data["task_id"])
        # Stats first: a task that is pending when queried was pending then too.
        stats = await self._retrying(lambda: self._stats(server))
        entry = await self._retrying(lambda: self._query(server, task_id))
        if handle.data.get("phase") == "write":
            return await self._poll_write(handle, server, stats, entry)
        return self._interpret(handle, server, stats, entry)

    async def _poll_write(
        self, handle: Handle, server: _Server, stats: ServerStats | None, entry: dict[str, Any]
    ) -> Status:
        """The write task of a described song; when it is done, start the render task
        and move the handle on to it (the engine stores the changed handle)."""
        task_id = str(handle.data["task_id"])
        code = _int(entry.get("status"), -1)
        if code == 2:
            server.tasks.discard(task_id)
            item = (_result_items(entry.get("result")) or [{}])[0]
            if not item.get("error") and item.get("stage") not in (None, "", "failed"):
                raise TaskLost(self.name, f"{server.host} gave up on the task (it was lost)")
            # Nothing but the language model works in this task: it is missing or broken.
            self._set_lm(server, False, f"{NO_LM} (its language model step failed)")
            raise CannotServe(self.name, f"{server.host} could not write the song: {NO_LM}")
        if code != 1:
            status = self._interpret(handle, server, stats, entry)
            return Running() if isinstance(status, Running) else status
        server.tasks.discard(task_id)
        item = (_result_items(entry.get("result")) or [{}])[0]
        caption = " ".join(str(item.get("prompt") or "").split())
        if not caption:
            return Failed("the server's language model wrote no description of the song")
        self._set_lm(server, True, "")
        body = self._render_body(handle, item, caption)
        started = await self._start_task(server, body)
        handle.data.update(started)
        handle.data["phase"] = "render"
        handle.data.pop("render", None)
        handle.data.pop("fixed", None)
        return Queued(position=started["queue_position"])

    def _render_body(self, handle: Handle, item: dict[str, Any], caption: str) -> dict[str, Any]:
        """The render task: the stored body with what the LM wrote, and its choice of
        tempo, key, metre and language where the user left them open (never duration)."""
        body = dict(handle.data.get("render") or {})
        lyrics = str(item.get("lyrics") or "").strip()
        body["prompt"] = caption
        body["lyrics"] = lyrics or "[Instrumental]"
        fixed = set(handle.data.get("fixed") or ())
        raw = item.get("metas")
        metas: dict[str, Any] = raw if isinstance(raw, dict) else {}
        chosen = {
            "bpm": _int(metas.get("bpm"), 0) or None,
            "key_scale": normalize_key_scale(str(metas.get("keyscale") or "")),
            "time_signature": str(metas.get("timesignature") or "") or None,
            "vocal_language": normalize_language(str(metas.get("language") or "")),
        }
        for name, value in chosen.items():
            if name not in fixed and value is not None and self._all_options[name].admits(value):
                body[name] = value
        return body

    def poll_interval(self) -> float:
        return self._poll_interval

    async def health(self) -> dict[str, Any]:
        """Per server: reachable, whether it can make described songs (prompt mode) and
        why not, whether it honours seeds. Asks `/health` where that is not known yet."""
        servers: dict[str, dict[str, Any]] = {}
        for server in [s for s in self._servers.values() if s.dispatch]:
            entry: dict[str, Any] = {"reachable": True}
            fresh = server.lm_known_at and self._clock() - server.lm_known_at < LM_RECHECK_S
            if not fresh or server.unreachable_since is not None:
                try:
                    await self._learn_lm(server)
                except ProviderError as exc:
                    entry = {"reachable": False, "error": exc.message}
            entry["prompt_mode"] = server.lm if self._prompt_mode else False
            if not self._prompt_mode:
                entry["note"] = "prompt mode is switched off for this provider"
            elif server.lm is False:
                entry["note"] = server.lm_reason or NO_LM
            elif server.lm is None:
                entry["note"] = (
                    "this server build does not say whether its language model is loaded; "
                    "the first described song sent to it finds out"
                )
            entry["honours_seeds"] = server.honours_seeds
            servers[server.url] = entry
        return {"prompt_mode": Mode.PROMPT in self.capabilities.modes, "servers": servers}

    # -- dispatch -----------------------------------------------------------------------

    async def _rank_servers(self, *, needs_lm: bool = False) -> list[tuple[_Server, ServerStats]]:
        servers = [s for s in self._servers.values() if s.dispatch]
        answers = await asyncio.gather(*(self._probe(s, needs_lm) for s in servers))
        ranked: list[tuple[_Server, ServerStats]] = []
        errors: list[ProviderError] = []
        for server, answer in zip(servers, answers, strict=True):
            if isinstance(answer, ServerStats):
                if answer.full:
                    errors.append(Busy(self.name, f"{server.host}: queue is full"))
                else:
                    ranked.append((server, answer))
            elif answer is not None:
                errors.append(answer)
        if ranked:
            ranked.sort(key=lambda pair: (pair[1].load, len(pair[0].tasks), pair[0].index))
            return ranked
        for kind in (AuthError, Busy):
            for error in errors:
                if isinstance(error, kind):
                    raise error
        raise Unavailable(self.name, f"no ACE-Step server answered ({len(servers)} configured)")

    async def _probe(self, server: _Server, needs_lm: bool) -> ServerStats | ProviderError | None:
        """Stats for a server believed up; a down one is asked `/health` first, and so is
        one whose language model is not known yet when the request needs it."""
        now = self._clock()
        if server.unreachable_since is not None:
            if now - server.last_probe < self._recheck_after:
                return None
            server.last_probe = now
            try:
                await self._learn_lm(server)
            except ProviderError as exc:
                return exc
            log.info("acestep server %s answers again", server.host)
        elif (
            needs_lm
            and server.lm is not True
            and (not server.lm_known_at or now - server.lm_known_at >= LM_RECHECK_S)
        ):
            try:
                await self._learn_lm(server)
            except ProviderError as exc:
                return exc
        try:
            stats = await self._stats(server)
        except ProviderError as exc:
            return exc
        if stats is None:  # no load figures: count only the tasks we gave it
            return ServerStats(
                queue_size=len(server.tasks),
                queue_maxsize=None,
                queued=0,
                running=0,
                finished=0,
                total=0,
            )
        return stats

    async def _learn_lm(self, server: _Server) -> None:
        """Ask `/health`; newer builds say there whether the LM is loaded."""
        data = await self._call(server, "GET", "/health", limit_s=self._health_timeout)
        server.lm_known_at = self._clock()
        loaded = data.get("llm_initialized") if isinstance(data, dict) else None
        if isinstance(loaded, bool):
            self._set_lm(server, loaded, "" if loaded else NO_LM)
        elif server.lm is False:
            # An older build that says nothing: give it another chance after a while.
            self._set_lm(server, None, "")

    def _set_lm(self, server: _Server, loaded: bool | None, reason: str) -> None:
        if server.lm is not loaded:
            log.log(
                logging.WARNING if loaded is False else logging.INFO,
                "acestep server %s: prompt mode %s%s",
                server.host,
                {True: "available", False: "unavailable", None: "unknown"}[loaded],
                f" ({reason})" if reason else "",
            )
        server.lm, server.lm_reason = loaded, reason
        server.lm_known_at = self._clock()
        self._refresh_capabilities()

    def _refresh_capabilities(self) -> None:
        """Prompt mode and `thinking` only while some server may have the LM."""
        dispatch = [s for s in self._servers.values() if s.dispatch]
        any_lm = any(s.lm is not False for s in dispatch)
        modes = {Mode.SONG} | ({Mode.PROMPT} if self._prompt_mode and any_lm else set())
        options = dict(self._all_options)
        if not any_lm:
            options.pop("thinking", None)  # told to the user as ignored, never failed
        self.capabilities = replace(self.capabilities, modes=frozenset(modes), options=options)

    async def _snapshot(self, server: _Server) -> dict[str, Any] | None:
        """The server's counters just after a submit, kept in the handle for loss checks."""
        try:
            stats = await self._stats(server)
        except ProviderError:
            return None
        if stats is None:
            return None
        return {
            "pending": stats.pending,
            "finished": stats.finished,
            "total": stats.total,
            "started_at": stats.started_at,
            "at": self._clock(),
        }

    # -- polling ------------------------------------------------------------------------

    def _interpret(
        self, handle: Handle, server: _Server, stats: ServerStats | None, entry: dict[str, Any]
    ) -> Status:
        task_id = str(handle.data["task_id"])
        status = _int(entry.get("status"), -1)
        items = _result_items(entry.get("result"))
        item = items[0] if items else None
        if status == 1:
            server.tasks.discard(task_id)
            found = next((i for i in items if i.get("file") or i.get("url")), None)
            if found is None:
                return Failed("the server finished without an audio file")
            return Succeeded(self._result(handle, server, found))
        if status == 2:
            server.tasks.discard(task_id)
            stage = str(item.get("stage") or "") if item else ""
            error = item.get("error") if item else None
            if not error and stage and stage != "failed":
                # The server times out a task whose last entry never moved on.
                raise TaskLost(self.name, f"{server.host} gave up on the task (it was lost)")
            return Failed(_failure_reason(error))
        if status != 0:
            raise Unavailable(self.name, f"{server.host}: unknown task status {status}")
        evidence = self._loss_evidence(handle, server, stats, item)
        if evidence:
            server.tasks.discard(task_id)
            log.warning("acestep task %s lost on %s: %s", task_id, server.host, evidence)
            raise TaskLost(self.name, f"{server.host} no longer has the task ({evidence})")
        if item is None or item.get("stage") in (None, "", "queued"):
            position = _int(handle.data.get("queue_position"), 1)
            waiting = stats.queue_size if stats is not None and stats.queue_size else position
            return Queued(position=max(1, min(position, waiting)))
        # Only this task's own progress figure: `progress_text` is the server's last log
        # line, whoever's job wrote it (other users' captions among them).
        progress = _float(item.get("progress"))
        return Running(progress=None if progress is None else max(0.0, min(1.0, progress)))

    def _loss_evidence(
        self,
        handle: Handle,
        server: _Server,
        stats: ServerStats | None,
        item: dict[str, Any] | None,
    ) -> str | None:
        """Why a task the server calls pending (status 0) cannot really be, or None.

        Each rule only fires when the server's own numbers rule the task out:
        - it reports no queued or running job at all (stats were read before the query);
        - it went away (refused connections) or its counters fell after we submitted;
        - its reported start time changed since the submit;
        - its job total is below the jobs that were pending right after the submit (they
          stay in its store for 24 h after finishing);
        - the task still looks queued although more jobs finished since the submit than
          were ahead of it (the queue is first in, first out).
        """
        submitted_at = _float(handle.data.get("submitted_at")) or 0.0
        if server.lost_before > submitted_at:
            return "the server went away after the task was submitted"
        if stats is None:
            return None
        if stats.pending == 0:
            return "the server reports no queued or running job"
        snap = handle.data.get("snapshot")
        if not isinstance(snap, dict):
            return None
        before = _float(snap.get("started_at"))
        if (
            before is not None
            and stats.started_at is not None
            and abs(stats.started_at - before) > _START_TOLERANCE_S
        ):
            return "the server restarted"
        pending_then = _int(snap.get("pending"))
        taken_at = _float(snap.get("at")) or submitted_at
        if self._clock() - taken_at < STORE_MEMORY_S and stats.total < pending_then:
            return "the server's job counters were reset"
        looks_queued = item is None or item.get("stage") in (None, "", "queued")
        if looks_queued and stats.finished - _int(snap.get("finished")) >= max(pending_then, 1):
            return "later jobs finished while the task never started"
        return None

    def _result(self, handle: Handle, server: _Server, item: dict[str, Any]) -> Result:
        location = str(item.get("file") or item.get("url"))
        audio_url = (
            location
            if location.startswith(("http://", "https://"))
            else (server.url + ("" if location.startswith("/") else "/") + location)
        )
        raw_metas = item.get("metas")
        metas: dict[str, Any] = raw_metas if isinstance(raw_metas, dict) else {}
        metadata: dict[str, Any] = {
            "server": server.url,
            "task_id": handle.data["task_id"],
            "seed_sent": handle.data.get("seed"),
        }
        for key in ("bpm", "duration", "keyscale", "genres", "timesignature"):
            value = metas.get(key)
            if value not in (None, "", "N/A"):
                metadata[key] = value
        for key in ("lm_model", "dit_model"):
            if item.get(key):
                metadata[key] = item[key]
        if item.get("generation_info"):
            metadata["generation_info"] = str(item["generation_info"])[:2000]
        reported = _first_int(item.get("seed_value"))
        sent = whole_number(handle.data.get("seed"))
        if reported is not None and sent is not None:
            honoured = reported == sent
            if server.honours_seeds is not honoured and not honoured:
                log.warning(
                    "acestep server %s used seed %s instead of %s: it ignores seeds",
                    server.host,
                    reported,
                    sent,
                )
            server.honours_seeds = honoured
        else:
            honoured = server.honours_seeds is not False
        return Result(
            audio_url=audio_url,
            seed=reported,
            tags=item.get("prompt") or None,
            lyrics=item.get("lyrics") or None,
            content_type=_content_type(location),
            seed_honoured=honoured,
            metadata=metadata,
        )

    # -- HTTP ---------------------------------------------------------------------------

    def _server(self, url: str, *, dispatch: bool = True) -> _Server:
        url = url.rstrip("/")
        server = self._servers.get(url)
        if server is None:
            server = _Server(url=url, index=len(self._servers), dispatch=dispatch)
            self._servers[url] = server
            parsed = httpx.URL(url)
            self._auth.add(str(parsed))
        return server

    async def _stats(self, server: _Server) -> ServerStats | None:
        """The server's counters, or None from a build without `/v1/stats`."""
        try:
            data = await self._call(server, "GET", "/v1/stats")
        except Unavailable as exc:
            if exc.status_code == 404:
                return None
            raise
        now = self._clock()
        stats = ServerStats.parse(data, now)
        last = server.last_stats
        if last is not None and now - server.last_stats_at < STORE_MEMORY_S:
            restarted = stats.total < last.pending or (
                stats.started_at is not None
                and last.started_at is not None
                and abs(stats.started_at - last.started_at) > _START_TOLERANCE_S
            )
            if restarted:
                log.warning("acestep server %s restarted (its counters were reset)", server.host)
                server.lost_before = max(server.lost_before, server.last_stats_at)
        server.last_stats, server.last_stats_at = stats, now
        return stats

    async def _query(self, server: _Server, task_id: str) -> dict[str, Any]:
        data = await self._call(server, "POST", "/query_result", json={"task_id_list": [task_id]})
        entries = data if isinstance(data, list) else []
        for entry in entries:
            if isinstance(entry, dict) and str(entry.get("task_id")) == task_id:
                return entry
        raise Unavailable(self.name, f"{server.host} did not report the task")

    async def _call(
        self,
        server: _Server,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: dict[str, str] | None = None,
        files: dict[str, tuple[str, bytes, str]] | None = None,
        limit_s: float | None = None,
    ) -> Any:
        """One request; returns the envelope's `data` or raises a typed error."""
        extra: dict[str, Any] = {} if limit_s is None else {"timeout": limit_s}
        if files is not None:
            extra.update(data=data, files=files)
        try:
            resp = await self.client.request(method, server.url + path, json=json, **extra)
        except httpx.ConnectError:
            now = self._clock()
            if server.unreachable_since is None:
                log.warning("acestep server %s is down", server.host)
                server.unreachable_since = now
            server.last_probe = now
            # Its in-memory queue went with the process.
            server.lost_before = max(server.lost_before, now)
            raise _Refused(self.name, f"{server.host} refused the connection") from None
        except httpx.TimeoutException:
            server.unreachable_since = server.unreachable_since or self._clock()
            raise Unavailable(self.name, f"{server.host} timed out on {path}") from None
        except httpx.TransportError as exc:
            server.unreachable_since = server.unreachable_since or self._clock()
            raise Unavailable(self.name, f"{server.host}: {type(exc).__name__} on {path}") from None
        server.unreachable_since = None
        if resp.status_code >= 400:
            raise map_error(resp, self.name, server.host)
        try:
            envelope = resp.json()
        except ValueError:
            raise Unavailable(self.name, f"{server.host} answered {path} with non-JSON") from None
        if not isinstance(envelope, dict) or "data" not in envelope:
            raise Unavailable(self.name, f"{server.host} answered {path} without an envelope")
        code = envelope.get("code")
        if code not in (None, 200) or envelope.get("error"):
            raise map_error(resp, self.name, server.host, envelope=envelope)
        return envelope["data"]

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """Polls are safe to repeat: retry a transient failure a couple of times."""
        return await retry_reads(
            call,
            delays=backoff_delays(self._poll_retries, self._retry_backoff),
            sleep=self._sleep,
            provider=self.name,
            what="poll",
        )


def map_error(
    resp: httpx.Response,
    provider: str = "acestep",
    host: str = "server",
    *,
    envelope: dict[str, Any] | None = None,
) -> ProviderError:
    """An ACE-Step server's refusal in our terms: FastAPI's `detail` under an HTTP error
    status, or an envelope whose `code` is not 200 (e.g. "Model not initialized")."""
    if envelope is not None:
        code = _int(envelope.get("code"), 500)
        text = " ".join(str(envelope.get("error") or "error").split())[:300]
    else:
        code = resp.status_code
        text = http_error_text(resp)
    return http_error(
        provider,
        code,
        text,
        stage=Stage.OTHER,
        retry_after=parse_retry_after(resp),
        key_setting="ACESTEP_API_KEY",
        where=host,
    )


def _result_items(raw: Any) -> list[dict[str, Any]]:
    """`result` is a JSON string holding a list of items (tolerate an already-parsed list)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else []
        except ValueError:
            return []
    if isinstance(raw, dict):
        raw = [raw]
    return [i for i in raw if isinstance(i, dict)] if isinstance(raw, list) else []


def _form_value(value: Any) -> str:
    """A field as a form value upstream's RequestParser reads back (_to_bool takes
    "true"/"false", _to_int and _to_float the number's text)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _failure_reason(error: Any) -> str:
    """The last line of the server's traceback (the exception), shortened."""
    if not error:
        return "the server reported that generation failed"
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return (lines[-1] if lines else "generation failed")[:300]


def _content_type(location: str) -> str | None:
    query = parse_qs(urlsplit(location).query)
    path = (query.get("path") or [urlsplit(location).path])[0]
    return _CONTENT_TYPES.get(path.rsplit(".", 1)[-1].lower()) if "." in path else None


def _started_at(data: dict[str, Any], now: float) -> float | None:
    """The server's start time, where a build reports one (upstream does not yet)."""
    for key in ("started_at", "start_time"):
        value = _float(data.get(key))
        if value is not None:
            return value / 1000 if value > 1e12 else value
    for key in ("uptime_seconds", "uptime"):
        value = _float(data.get(key))
        if value is not None:
            return now - value
    return None


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _first_int(value: Any) -> int | None:
    """`seed_value` is "123" or "123,456" (one per batch item)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    first = str(value or "").split(",")[0].strip()
    try:
        return int(first)
    except ValueError:
        return None
