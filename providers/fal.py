"""fal.ai adapter: ACE-Step through fal's queue API (submit, poll status, fetch result).

Wire facts (shared PROVIDERS.md): submit goes to the full model id including the
endpoint subpath, but status, result and cancel live under the app id only
(`fal-ai/ace-step/requests/{id}/...`); fal returns those URLs on submit and we follow
them. A submit is never retried here: one that timed out may exist and be billed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import httpx
from httpx_sse import SSEError, aconnect_sse

from bot.requests import GenerationRequest, Mode, Task
from providers.base import (
    ACE_STEP_V1_OPTIONS,
    Cancelled,
    CancelOutcome,
    Capabilities,
    Failed,
    Handle,
    KeyForOrigins,
    Provider,
    ProviderError,
    Queued,
    Rejected,
    Result,
    Running,
    Sleep,
    SourceFile,
    Status,
    Succeeded,
    Unavailable,
    api_client,
    hosted_edit_fields,
    http_error_text,
    origin,
    parse_retry_after,
    retry_reads,
    send,
    wire_values,
)
from providers.errors import BILLING_WORDS, Stage, has_marker, http_error
from providers.uploads import content_type, provider_ref, read_source

log = logging.getLogger(__name__)

DEFAULT_QUEUE_URL = "https://queue.fal.run"
# fal's REST API, where the client's storage upload starts (fal-js libs/client/src/storage.ts).
DEFAULT_STORAGE_URL = "https://rest.fal.ai"
APP_ID = "fal-ai/ace-step"  # owner/alias: the only part used after submit
PROMPT_ENDPOINT = "fal-ai/ace-step/prompt-to-audio"
SONG_ENDPOINT = "fal-ai/ace-step"
# Work on a song (docs/edit-modes.md): one endpoint per task.
TASK_ENDPOINTS = {
    Task.REMIX: "fal-ai/ace-step/audio-to-audio",
    Task.REPAINT: "fal-ai/ace-step/audio-inpaint",
    Task.EXTEND: "fal-ai/ace-step/audio-outpaint",
}
# fal states no lifetime for storage uploads; we trust one for a day, and upload again
# when fal says it cannot fetch a remembered one (see submit).
UPLOAD_LIFETIME_S = 24 * 3600
_SOURCE_REFUSED = (
    "fal could not use the source audio ({detail}); send an MP3, WAV or FLAC song "
    "of at most 240 seconds"
)

# The knobs both ACE-Step endpoints take (PROVIDERS.md), under fal's names and ranges.
FAL_OPTIONS = ACE_STEP_V1_OPTIONS

# Error types that mean the input itself was refused: never retried, told to the user.
_REJECTED_ERROR_TYPES = ("content_policy", "validation", "value_error", "type_error")
_CANCELLED_ERROR_TYPES = ("client_cancelled",)
_CONTENT_POLICY_MESSAGE = (
    "fal refused this request under its content policy; try a different description or lyrics"
)
# A Retry-After longer than this goes back to the engine instead of being slept here.
_MAX_INTERNAL_WAIT_S = 10.0
_PERCENT = re.compile(r"(\d{1,3}(?:\.\d+)?)\s*%")
# After the status stream failed, plain polls for this long before it is tried again.
_STREAM_RETRY_S = 300.0


class _NoStream(Exception):
    """The queue does not offer the status stream here."""


class FalProvider(Provider):
    """ACE-Step on fal.ai through the queue API; prompt-to-audio and composed songs.

    Status comes from fal's status stream (`GET .../requests/{id}/status/stream`, server-
    sent events whose `data` is the same JSON as a status GET, as @fal-ai/client's
    `streamStatus` reads it; the stream ends after COMPLETED), so a finished song is
    known at once; a plain status GET is the fallback where the stream is unavailable.
    """

    name = "fal"

    def __init__(
        self,
        api_key: str,
        queue_url: str = DEFAULT_QUEUE_URL,
        *,
        storage_url: str = DEFAULT_STORAGE_URL,
        concurrency: int = 2,
        transport: httpx.AsyncBaseTransport | None = None,
        poll_interval: float = 1.0,
        retry_delays: Sequence[float] = (0.5, 2.0),
        timeout: float = 30.0,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if not api_key:
            raise ValueError("fal needs an API key (FAL_KEY)")
        self._key = api_key
        self.queue_url = queue_url.rstrip("/")
        self.storage_url = storage_url.rstrip("/")
        self._poll_interval = poll_interval
        self._retry_delays = tuple(retry_delays)
        self._sleep = sleep
        self._stream_off_until = 0.0
        # The key goes to the queue and to storage's initiate call, never to the signed
        # upload URL storage hands back (KeyForOrigins: another origin).
        auth = KeyForOrigins(f"Key {api_key}", [self.queue_url, self.storage_url])
        super().__init__(
            api_client(
                transport=transport,
                auth=auth,
                timeout=timeout,
                headers={"Accept": "application/json"},
            )
        )
        self.capabilities = Capabilities(
            modes=frozenset({Mode.PROMPT, Mode.SONG}),
            tasks=frozenset({Task.GENERATE, *TASK_ENDPOINTS}),
            min_duration=5,
            max_duration=240,
            options=FAL_OPTIONS,
            price_per_second=0.0002,
            concurrency=concurrency,
        )

    # ----- the provider contract -------------------------------------------------------

    async def submit(
        self, request: GenerationRequest, seed: int, source: SourceFile | None = None
    ) -> Handle:
        """Queue one generation at fal; exactly one accepted POST, never retried.

        An edit first puts the source in fal storage (once: the URL is remembered in
        `source.uploads`). When fal refuses a remembered URL as unfetchable (422 on
        `audio_url`: it expired early), the file is uploaded again and the submit sent
        once more; a 422 means fal queued nothing, so nothing runs twice."""
        audio_url, uploaded = None, False
        if request.task is not Task.GENERATE:
            if source is None:
                raise ValueError(f"a {request.task} request needs its source file")
            audio_url, uploaded = await self._source_url(source)
        endpoint, body = self.build_input(request, seed, audio_url=audio_url)
        resp = await self._send("POST", f"{self.queue_url}/{endpoint}", phase="submit", json=body)
        refused = resp.status_code == 422 and self._source_refused(resp)
        if source is not None and refused and not uploaded:
            log.info(
                "fal: the stored source %s was refused; uploading it again", source.sha256[:12]
            )
            body["audio_url"], _ = await self._source_url(source, fresh=True)
            resp = await self._send(
                "POST", f"{self.queue_url}/{endpoint}", phase="submit", json=body
            )
        if resp.status_code >= 300:
            if source is not None and resp.status_code == 422 and self._source_refused(resp):
                detail, _ = self._detail(resp)
                raise Rejected(self.name, _SOURCE_REFUSED.format(detail=detail), status_code=422)
            raise self._error(resp, "submit")
        try:
            data = resp.json()
            request_id = str(data["request_id"])
        except (ValueError, KeyError, TypeError):
            raise Unavailable(
                self.name,
                "fal accepted the submit but its answer had no "
                "request id; the request may still run at fal",
                status_code=resp.status_code,
                maybe_accepted=True,
            ) from None
        handle_data: dict[str, Any] = {"request_id": request_id, "endpoint": endpoint}
        for key in ("status_url", "response_url", "cancel_url"):
            url = data.get(key)
            # Follow fal's URLs, but only on the queue's own origin: the key goes there.
            if isinstance(url, str) and self._same_origin(url):
                handle_data[key] = url
        log.info(
            "fal accepted request %s on %s (queue position %s)",
            request_id,
            endpoint,
            data.get("queue_position"),
        )
        return Handle(provider=self.name, data=handle_data)

    async def poll(self, handle: Handle) -> Status:
        """One status check (with logs); fetches the result once fal says COMPLETED."""
        urls = self._urls(handle)
        resp = await self._get(
            urls["status_url"], "poll", params={"logs": "1"}, transient=range(500, 600)
        )
        if resp.status_code >= 300:
            raise self._error(resp, "poll")
        return await self._status(handle, urls, _json_object(resp))

    @property
    def streams_status(self) -> bool:
        return self._stream_off_until <= time.monotonic()

    async def wait_status(self, handle: Handle, since: Status | None, timeout: float) -> Status:
        """Read fal's status stream until the status differs from `since` (or COMPLETED),
        at most `timeout` s; fall back to one status GET when the stream fails."""
        if self._stream_off_until > time.monotonic():
            return await self.poll(handle)
        urls = self._urls(handle)
        latest: Status | None = None
        completed: dict[str, Any] | None = None
        try:
            async with asyncio.timeout(timeout):
                async with aconnect_sse(
                    self.client,
                    "GET",
                    urls["status_url"] + "/stream",
                    params={"logs": "1"},
                    headers={"Accept": "text/event-stream"},
                    timeout=httpx.Timeout(timeout + 5.0, connect=10.0),
                ) as source:
                    resp = source.response
                    if resp.status_code in (404, 405, 501):
                        # Not offered here (a proxy, an older queue): poll instead.
                        raise _NoStream(f"status stream answered {resp.status_code}")
                    if resp.status_code >= 300:
                        await resp.aread()
                        raise self._error(resp, "poll")
                    async for event in source.aiter_sse():
                        try:
                            body = json.loads(event.data)
                        except ValueError:
                            continue  # a keep-alive or a broken line: wait for the next
                        if not isinstance(body, dict):
                            continue
                        if body.get("status") == "COMPLETED":
                            completed = body
                            break
                        latest = await self._status(handle, urls, body)
                        if latest != since:
                            return latest
            if completed is not None:  # the result GET is not held to the stream's timeout
                return await self._status(handle, urls, completed)
        except TimeoutError:
            if latest is not None:
                return latest
        except (_NoStream, SSEError, httpx.TransportError) as exc:
            log.info("fal: no status stream (%s); polling for %.0f s", exc, _STREAM_RETRY_S)
            self._stream_off_until = time.monotonic() + _STREAM_RETRY_S
        # The stream ended or timed out without news: one plain status GET.
        return await self.poll(handle)

    async def _status(self, handle: Handle, urls: dict[str, str], body: dict[str, Any]) -> Status:
        """A status body (from a GET or a stream event) in our terms."""
        state = body.get("status")
        if state == "IN_QUEUE":
            position = body.get("queue_position")
            return Queued(position=position if isinstance(position, int) else None)
        if state == "IN_PROGRESS":
            return _running(body.get("logs"))
        if state == "COMPLETED":
            if body.get("error"):
                failed = self._failed_run(str(body["error"]), str(body.get("error_type") or ""))
                if isinstance(failed, Failed) and not failed.rejected:
                    # The result's HTTP status says whether fal bills the failed run.
                    return await self._fetch_result(handle, urls, body, run_failed=True)
                return failed
            return await self._fetch_result(handle, urls, body)
        # fal documents no other status; report it as running rather than failing a job.
        log.warning("fal request %s has an unknown status %r", urls["request_id"], state)
        return Running(message=str(state) if state else None)

    async def cancel(self, handle: Handle) -> CancelOutcome:
        """Ask fal to drop the request. fal answers OK when it removed it from the queue
        (it never ran), CANCELLATION_REQUESTED when it signalled a runner already working
        on it, ALREADY_COMPLETED (400) when it was too late
        (fal.ai/docs/inference-api/queue/cancel)."""
        urls = self._urls(handle)
        resp = await self._send("PUT", urls["cancel_url"], phase="cancel")
        if 200 <= resp.status_code < 300:
            try:
                answer = resp.json().get("status")
            except (ValueError, AttributeError):
                answer = None
            return CancelOutcome.REMOVED if answer == "OK" else CancelOutcome.REQUESTED
        if resp.status_code in (400, 404, 409):
            return CancelOutcome.REFUSED
        raise self._error(resp, "cancel")

    def poll_interval(self) -> float:
        return self._poll_interval

    # ----- request building ------------------------------------------------------------

    def billed_seconds(self, request: GenerationRequest) -> float:
        """fal bills "per second of generated audio" on every ACE-Step endpoint; an edit
        returns the whole song (source, or source plus extension), so that is billed."""
        return float(request.duration)

    @staticmethod
    def build_input(
        request: GenerationRequest, seed: int, *, audio_url: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        """The fal endpoint and JSON input for a request (only options the user set)."""
        body: dict[str, Any]
        if request.task is not Task.GENERATE:
            return _edit_input(request, seed, audio_url)
        if request.mode is Mode.PROMPT:
            endpoint = PROMPT_ENDPOINT
            body = {"prompt": request.prompt, "instrumental": request.instrumental}
        else:
            endpoint = SONG_ENDPOINT
            # fal's ACE-Step reads "[inst]" as "no vocals"; empty lyrics mean the same.
            lyrics = request.lyrics if request.wants_vocals else "[inst]"
            body = {"tags": request.tags, "lyrics": lyrics}
        body["duration"] = request.duration
        body["seed"] = seed
        body.update(wire_values(FAL_OPTIONS, request))
        return endpoint, body

    # ----- source uploads (fal storage) -------------------------------------------------

    async def _source_url(self, source: SourceFile, *, fresh: bool = False) -> tuple[str, bool]:
        return await provider_ref(self.name, source, lambda: self._upload(source), fresh=fresh)

    async def _upload(self, source: SourceFile) -> tuple[str, float]:
        """fal's client upload protocol (fal-js libs/client/src/storage.ts): POST the file
        name and content type to `{rest}/storage/upload/initiate`, PUT the bytes to the
        `upload_url` it answers, and use its `file_url` as the model input."""
        kind = content_type(source)
        resp = await self._send(
            "POST",
            f"{self.storage_url}/storage/upload/initiate",
            phase="upload",
            params={"storage_type": "fal-cdn-v3"},
            json={"content_type": kind, "file_name": source.path.name},
        )
        if resp.status_code >= 300:
            raise self._error(resp, "upload")
        answer = _json_object(resp)
        upload_url, file_url = answer.get("upload_url"), answer.get("file_url")
        if not isinstance(upload_url, str) or not isinstance(file_url, str):
            raise Unavailable(self.name, "fal storage answered without upload and file URLs")
        data = await read_source(source)
        put = await send(
            self.client,
            self.name,
            "PUT",
            upload_url,
            what="upload",
            content=data,
            headers={"Content-Type": kind},
        )
        if put.status_code >= 300:
            raise self._error(put, "upload")
        return file_url, UPLOAD_LIFETIME_S

    def _source_refused(self, resp: httpx.Response) -> bool:
        """A 422 whose detail is about `audio_url`: fal could not fetch or read the file."""
        try:
            detail = resp.json().get("detail")
        except (ValueError, AttributeError):
            return False
        return isinstance(detail, list) and any(
            isinstance(item, dict) and "audio_url" in (item.get("loc") or []) for item in detail
        )

    # ----- HTTP and error mapping --------------------------------------------------------

    async def _send(
        self,
        method: str,
        url: str,
        *,
        phase: str,
        json: Any = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        """One HTTP exchange; network failures become Unavailable."""
        return await send(
            self.client,
            self.name,
            method,
            url,
            what=phase,
            submit=phase == "submit",
            json=json,
            params=params,
        )

    async def _get(
        self,
        url: str,
        phase: str,
        *,
        transient: range | tuple[int, ...],
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        """A GET retried a few times on Busy/Unavailable (safe: reads change nothing)."""

        async def get() -> httpx.Response:
            resp = await self._send("GET", url, phase=phase, params=params)
            if resp.status_code == 429 or resp.status_code in transient:
                raise self._error(resp, phase)
            return resp

        return await retry_reads(
            get,
            delays=self._retry_delays,
            sleep=self._sleep,
            provider=self.name,
            what=phase,
            max_wait=_MAX_INTERNAL_WAIT_S,
        )

    def _error(self, resp: httpx.Response, phase: str) -> ProviderError:
        """fal's error answer in our terms: its `detail`, error types and the markers."""
        detail, types = self._detail(resp)
        return http_error(
            self.name,
            resp.status_code,
            detail,
            stage=Stage.SUBMIT if phase in ("submit", "upload") else Stage.POLL,
            retry_after=parse_retry_after(resp),
            # "User is locked. Reason: Exhausted balance..." comes as a 403.
            billing=has_marker([detail], BILLING_WORDS),
            policy=has_marker(types, ("content_policy",)),
            policy_message=_CONTENT_POLICY_MESSAGE,
            key_setting="FAL_KEY",
            # fal queues what is over the account's concurrency: a 503 is its outage.
            busy_statuses=(429,),
        )

    def _detail(self, resp: httpx.Response) -> tuple[str, list[str]]:
        """fal's `detail` as readable text ("duration: ensure ...") and its error types."""
        try:
            body: Any = resp.json()
        except ValueError:
            body = None
        types: list[str] = []
        header_type = resp.headers.get("x-fal-error-type")
        if header_type:
            types.append(header_type)
        text = ""
        if isinstance(body, dict):
            if isinstance(body.get("error_type"), str):
                types.append(body["error_type"])
            detail = body.get("detail")
            if isinstance(detail, list):
                parts = []
                for item in detail[:5]:
                    if not isinstance(item, dict):
                        parts.append(str(item))
                        continue
                    if isinstance(item.get("type"), str):
                        types.append(item["type"])
                    loc = [str(p) for p in item.get("loc") or [] if p != "body"]
                    msg = str(item.get("msg") or item.get("type") or "invalid")
                    parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
                text = "; ".join(parts)
        if not text:
            text = http_error_text(resp)
        return self._redact(text), types

    def _redact(self, text: str) -> str:
        """Belt and braces: a server that echoes our key must not put it in a message."""
        text = text.replace(self._key, "[redacted]")
        # fal keys are "id:secret"; an echo of either half is just as bad.
        for part in self._key.split(":"):
            if len(part) >= 8:
                text = text.replace(part, "[redacted]")
        return text

    def _failed_run(self, error: str, error_type: str) -> Status:
        kind = error_type.lower()
        if any(t in kind for t in _CANCELLED_ERROR_TYPES):
            return Cancelled()
        if "content_policy" in kind:
            return Failed(_CONTENT_POLICY_MESSAGE, rejected=True)
        rejected = any(t in kind for t in _REJECTED_ERROR_TYPES)
        reason = " ".join(self._redact(error).split())[:300]
        return Failed(reason, rejected=rejected)

    async def _fetch_result(
        self,
        handle: Handle,
        urls: dict[str, str],
        status_body: dict[str, Any],
        *,
        run_failed: bool = False,
    ) -> Status:
        """The finished request's output. `run_failed`: the status said the run failed;
        its result then answers with the error, and a 5xx means fal does not bill it (a
        5xx for a run the status called a success is only the fetch failing)."""
        # 502-504 are the gateway's and pass; any other error answer is the run's outcome.
        resp = await self._get(urls["response_url"], "result", transient=(502, 503, 504))
        if resp.status_code in (401, 403, 404, 429):
            raise self._error(resp, "result")
        if resp.status_code >= 300:
            detail, types = self._detail(resp)
            kind = " ".join(types)
            if resp.status_code == 422 and not kind:
                kind = "validation"
            failed = self._failed_run(detail, kind)
            if isinstance(failed, Failed) and run_failed and resp.status_code >= 500:
                # "Failed requests that return 5xx status codes are not billed."
                # (docs.fal.ai/model-apis/model-endpoints/reliability)
                return replace(failed, billed=False)
            return failed
        output = _json_object(resp)
        audio = output.get("audio")
        url = audio.get("url") if isinstance(audio, dict) else None
        if not isinstance(url, str) or not url:
            return Failed("fal finished without an audio file")
        audio = audio if isinstance(audio, dict) else {}
        metrics = status_body.get("metrics")
        metadata: dict[str, Any] = {
            "request_id": urls["request_id"],
            "endpoint": handle.data.get("endpoint"),
            "inference_time": metrics.get("inference_time") if isinstance(metrics, dict) else None,
            "file_name": audio.get("file_name"),
            "file_size": audio.get("file_size"),
        }
        seed = output.get("seed")
        return Succeeded(
            Result(
                audio_url=url,
                seed=seed if isinstance(seed, int) else None,
                tags=output.get("tags") if isinstance(output.get("tags"), str) else None,
                lyrics=output.get("lyrics") if isinstance(output.get("lyrics"), str) else None,
                content_type=audio.get("content_type"),
                metadata={k: v for k, v in metadata.items() if v is not None},
            )
        )

    # ----- handles ---------------------------------------------------------------------

    def _urls(self, handle: Handle) -> dict[str, str]:
        """Status/result/cancel URLs: the stored ones, else built without the subpath."""
        if handle.provider != self.name:
            raise ValueError(f"not a fal handle: {handle.provider}")
        request_id = str(handle.data["request_id"])
        base = f"{self.queue_url}/{APP_ID}/requests/{request_id}"
        built = {
            "status_url": f"{base}/status",
            "response_url": base,
            "cancel_url": f"{base}/cancel",
        }
        urls = {"request_id": request_id}
        for key, fallback in built.items():
            stored = handle.data.get(key)
            # A handle from another queue URL (config changed) is rebuilt for this one,
            # so the key is never sent to a host we were not configured for.
            urls[key] = (
                stored if isinstance(stored, str) and self._same_origin(stored) else fallback
            )
        return urls

    def _same_origin(self, url: str) -> bool:
        try:
            return origin(url) == origin(self.queue_url)
        except httpx.InvalidURL:
            return False


def _edit_input(
    request: GenerationRequest, seed: int, audio_url: str | None
) -> tuple[str, dict[str, Any]]:
    """The input of fal's audio-to-audio / audio-inpaint / audio-outpaint (field names and
    ranges: docs/edit-modes.md)."""
    source = request.source
    if source is None or audio_url is None:
        raise ValueError(f"a {request.task} request needs its source file")
    tags = request.tags or source.tags or request.prompt
    lyrics = request.lyrics if request.wants_vocals else "[inst]"
    body: dict[str, Any] = {"audio_url": audio_url, "tags": tags, "lyrics": lyrics}
    body.update(hosted_edit_fields(request, source, tags))
    body["seed"] = seed
    body.update(wire_values(FAL_OPTIONS, request))
    return TASK_ENDPOINTS[request.task], body


def _json_object(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise Unavailable(
            "fal",
            "fal answered with something that is not a JSON object",
            status_code=resp.status_code,
        )
    return body


def _running(logs: Any) -> Running:
    """IN_PROGRESS: the latest log line, and progress from the latest percentage seen."""
    messages = [
        str(entry.get("message", "")).strip() for entry in logs or [] if isinstance(entry, dict)
    ]
    messages = [m for m in messages if m]
    progress = None
    for message in reversed(messages):
        match = _PERCENT.search(message)
        if match:
            progress = min(1.0, float(match.group(1)) / 100.0)
            break
    return Running(progress=progress, message=messages[-1][:200] if messages else None)
