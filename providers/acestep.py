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
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx

from bot.requests import GenerationRequest, Mode
from providers.base import (
    AuthError,
    Busy,
    Capabilities,
    Failed,
    Handle,
    KeyForOrigins,
    Provider,
    ProviderError,
    Queued,
    Result,
    Running,
    Sleep,
    Status,
    Succeeded,
    TaskLost,
    Unavailable,
    api_client,
    backoff_delays,
    http_error_text,
    parse_retry_after,
    retry_reads,
)
from providers.errors import Stage, http_error

log = logging.getLogger(__name__)

# The server accepts 10-600 s; 240 s matches the hosted APIs and our request limit.
SERVER_MIN_DURATION = 10
DEFAULT_MAX_DURATION = 240
# The server drops finished jobs from its store 24 h after they finish (upstream
# JOB_STORE_MAX_AGE_SECONDS), so its counters only bound what it can have forgotten
# within that window.
STORE_MEMORY_S = 24 * 3600
_START_TOLERANCE_S = 5.0

_CONTENT_TYPES = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "ogg": "audio/ogg"}

Clock = Callable[[], float]
T = TypeVar("T")


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
        return self.queued + self.running

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
        `extra_fields` go into every task, e.g. {"model": "acestep-v15-turbo"}."""
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
        modes = {Mode.SONG, Mode.PROMPT} if prompt_mode else {Mode.SONG}
        self.capabilities = Capabilities(
            modes=frozenset(modes),
            min_duration=SERVER_MIN_DURATION,
            max_duration=min(max_duration, DEFAULT_MAX_DURATION),
            options=frozenset({"steps", "guidance_scale"}),
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
        """The `/release_task` JSON for one request (exactly what the server receives).

        Prompt mode uses `sample_query`: the server's language model writes the caption
        and lyrics and, upstream, also picks the duration (it replaces `audio_duration`
        with its own); `Result.metadata["duration"]` reports what was made.
        """
        body: dict[str, Any] = dict(self._extra)
        if request.mode is Mode.SONG:
            body["prompt"] = request.tags
            body["lyrics"] = request.lyrics if request.wants_vocals else "[Instrumental]"
        else:
            query = request.prompt
            # The server reads "instrumental" in the description as "no vocals".
            if request.instrumental and "instrumental" not in query.lower():
                query = f"{query}, instrumental"
            body["sample_query"] = query
        body.update(
            {
                "audio_duration": request.duration,
                "batch_size": 1,
                "use_random_seed": False,
                "seed": seed,
                "audio_format": "mp3",
            }
        )
        if request.steps is not None:
            body["inference_steps"] = request.steps
        if request.guidance_scale is not None:
            body["guidance_scale"] = request.guidance_scale
        return body

    async def submit(self, request: GenerationRequest, seed: int) -> Handle:
        """Queue one task on the least loaded server that answers."""
        body = self.build_body(request, seed)
        async with self._dispatch_lock:
            ranked = await self._rank_servers()
            last_error: ProviderError | None = None
            for server, _stats in ranked:
                submitted_at = self._clock()
                try:
                    data = await self._call(server, "POST", "/release_task", json=body)
                except (_Refused, Busy) as exc:
                    # Refused or queue full: no task was created there, so the next
                    # server may take it without risking a duplicate.
                    last_error = exc
                    continue
                if not isinstance(data, dict) or not data.get("task_id"):
                    raise Unavailable(self.name, f"{server.host} answered without a task id")
                task_id = str(data["task_id"])
                server.tasks.add(task_id)
                snapshot = await self._snapshot(server)
                log.info("acestep task %s queued on %s", task_id, server.host)
                return Handle(
                    self.name,
                    {
                        "server": server.url,
                        "task_id": task_id,
                        "submitted_at": submitted_at,
                        "queue_position": _int(data.get("queue_position"), 1),
                        "seed": seed,
                        "mode": request.mode.value,
                        "snapshot": snapshot,
                    },
                )
            assert last_error is not None
            raise last_error

    async def poll(self, handle: Handle) -> Status:
        """Ask the server that took the task how it is doing."""
        server = self._server(str(handle.data["server"]), dispatch=False)
        task_id = str(handle.data["task_id"])
        # Stats first: a task that is pending when queried was pending then too.
        stats = await self._retrying(lambda: self._stats(server))
        entry = await self._retrying(lambda: self._query(server, task_id))
        return self._interpret(handle, server, stats, entry)

    def poll_interval(self) -> float:
        return self._poll_interval

    # -- dispatch -----------------------------------------------------------------------

    async def _rank_servers(self) -> list[tuple[_Server, ServerStats]]:
        servers = [s for s in self._servers.values() if s.dispatch]
        answers = await asyncio.gather(*(self._probe(s) for s in servers))
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

    async def _probe(self, server: _Server) -> ServerStats | ProviderError | None:
        """Stats for a server believed up; a down one is asked `/health` first."""
        if server.unreachable_since is not None:
            now = self._clock()
            if now - server.last_probe < self._recheck_after:
                return None
            server.last_probe = now
            try:
                await self._call(server, "GET", "/health", limit_s=self._health_timeout)
            except ProviderError as exc:
                return exc
            log.info("acestep server %s answers again", server.host)
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
            waiting = stats.queued if stats is not None and stats.queued else position
            return Queued(position=max(1, min(position, waiting)))
        progress = _float(item.get("progress"))
        message = entry.get("progress_text") or item.get("stage")
        return Running(
            progress=None if progress is None else max(0.0, min(1.0, progress)),
            message=" ".join(str(message).split())[:200] if message else None,
        )

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
        return Result(
            audio_url=audio_url,
            seed=_first_int(item.get("seed_value")),
            tags=item.get("prompt") or None,
            lyrics=item.get("lyrics") or None,
            content_type=_content_type(location),
            duration_chosen_by_model=handle.data.get("mode") == Mode.PROMPT.value,
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
        limit_s: float | None = None,
    ) -> Any:
        """One request; returns the envelope's `data` or raises a typed error."""
        extra: dict[str, Any] = {} if limit_s is None else {"timeout": limit_s}
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
