"""AIgateway adapter: ACE-Step prompt-to-audio through `POST /v1/audio/music` jobs.

Wire facts (shared PROVIDERS.md): submit answers 202 with a job record, `GET /v1/jobs/{id}`
reports it (and answers 304 when polled faster than every 3 s), the audio URL sits in one
of three places, `DELETE /v1/jobs/{id}` cancels, and errors are OpenAI-style
`{"error": {message, type, code, param}}`. The API takes no seed, so none is sent or
reported.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

from bot.requests import GenerationRequest, Mode
from providers.base import (
    Cancelled,
    CancelOutcome,
    Capabilities,
    Failed,
    Handle,
    KeyForOrigins,
    OptionRange,
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
    TaskLost,
    Unavailable,
    api_client,
    backoff_delays,
    parse_retry_after,
    retry_reads,
    send,
    whole_number,
)
from providers.errors import BILLING_WORDS, POLICY_WORDS, Stage, has_marker, http_error

log = logging.getLogger(__name__)

NAME = "aigateway"
DEFAULT_BASE_URL = "https://api.aigateway.sh"
DEFAULT_MODEL = "ace-step/ace-step-prompt-to-audio"
PRICE_PER_SECOND = 0.0002  # USD per second of audio
AUDIO_FORMATS = ("wav", "mp3")
# AIgateway answers 304 to polls closer together than this.
MIN_POLL_INTERVAL_S = 3.0

_QUEUED = {"queued", "pending", "created"}
_RUNNING = {"processing", "running", "in_progress", "started"}
_CANCELLED = {"cancelled", "canceled"}
_MAX_RETRY_WAIT_S = 30.0
_MAX_REASON_CHARS = 300


def map_error(
    status: int,
    message: str,
    *,
    error_type: str = "",
    code: str = "",
    param: str = "",
    retry_after: float | None = None,
    polling: bool = False,
) -> ProviderError:
    """AIgateway's OpenAI-style error in our terms: its type and code are the markers."""
    text = message or "no details given"
    if param and param not in text:
        text = f"{param}: {text}"  # which field a validation error is about
    return http_error(
        NAME,
        status,
        text,
        stage=Stage.POLL if polling else Stage.SUBMIT,
        retry_after=retry_after,
        billing=has_marker([error_type, code], BILLING_WORDS),
        key_setting="AIGATEWAY_API_KEY",
    )


class AIGatewayProvider(Provider):
    """ACE-Step prompt-to-audio on AIgateway (prompt mode only, no seed control)."""

    name = NAME

    def __init__(
        self,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        *,
        model: str = DEFAULT_MODEL,
        audio_format: str = "mp3",
        concurrency: int = 2,
        transport: httpx.AsyncBaseTransport | None = None,
        poll_interval: float = MIN_POLL_INTERVAL_S,
        poll_retries: int = 2,
        retry_backoff: float = MIN_POLL_INTERVAL_S,
        timeout: float = 30.0,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        """`poll_interval` is raised to 3 s (faster polls only earn 304s); `poll_retries`
        extra tries per poll after busy/unavailable answers, waiting `retry_backoff` *
        2**n seconds (or Retry-After) through `sleep`."""
        if audio_format not in AUDIO_FORMATS:
            raise ValueError(f"AIgateway audio format must be one of {', '.join(AUDIO_FORMATS)}")
        if not api_key:
            raise ValueError("the AIgateway API key is empty")
        self.base_url = base_url.rstrip("/")
        client = api_client(
            base_url=self.base_url,
            transport=transport,
            auth=KeyForOrigins(f"Bearer {api_key}", [self.base_url]),
            timeout=timeout,
        )
        super().__init__(client)
        self._api_key = api_key
        self.model = model
        self.audio_format = audio_format
        self.capabilities = Capabilities(
            modes=frozenset({Mode.PROMPT}),
            # The music endpoint takes no diffusion knobs; it does let us pick the file.
            options={"audio_format": OptionRange("format", choices=AUDIO_FORMATS)},
            price_per_second=PRICE_PER_SECOND,
            concurrency=concurrency,
        )
        self._poll_interval = max(MIN_POLL_INTERVAL_S, poll_interval)
        self._poll_retries = max(0, poll_retries)
        self._retry_backoff = retry_backoff
        self._sleep = sleep
        # The last status seen per job id: what a 304 Not Modified means.
        self._last: dict[str, Status] = {}

    def price_per_second_for(self, request: GenerationRequest) -> float:
        """USD per second of audio (one model, one price)."""
        return PRICE_PER_SECOND

    def build_input(self, request: GenerationRequest) -> dict[str, Any]:
        """The JSON body of `POST /v1/audio/music` (no seed: the API does not take one)."""
        return {
            "prompt": request.prompt,
            "model": self.model,
            "duration": request.duration,
            "is_instrumental": request.instrumental,
            # MP3 unless the user asked otherwise: it is what the chat gets, so a file
            # that fits the upload limit needs no re-encode.
            "format": request.audio_format or self.audio_format,
        }

    # -- the contract ---------------------------------------------------------------

    async def submit(
        self, request: GenerationRequest, seed: int, source: SourceFile | None = None
    ) -> Handle:
        """Start a job. `seed` cannot be passed on: AIgateway picks its own."""
        if not self.capabilities.can_serve(request):
            raise ValueError(
                f"{self.name} cannot serve a {request.mode} request of {request.duration} s"
            )
        # Never retried here: a submit that timed out may exist and be billed.
        resp = await self._send(
            "POST", "/v1/audio/music", json=self.build_input(request), polling=False
        )
        record = self._record(resp)
        job_id = record.get("id")
        if not isinstance(job_id, str) or not job_id:
            raise Unavailable(self.name, "submit answer carried no job id", maybe_accepted=True)
        log.info("aigateway: submitted job %s", job_id)
        return Handle(
            self.name,
            {
                "id": job_id,
                "model": self.model,
                "format": request.audio_format or self.audio_format,
                "duration": request.duration,
            },
        )

    async def poll(self, handle: Handle) -> Status:
        job_id = self._job_id(handle)
        resp = await retry_reads(
            lambda: self._send("GET", f"/v1/jobs/{job_id}", polling=True),
            delays=backoff_delays(self._poll_retries, self._retry_backoff),
            sleep=self._sleep,
            provider=self.name,
            what=f"poll of {job_id}",
            max_wait=_MAX_RETRY_WAIT_S,
        )
        if resp.status_code == 304:
            # Nothing changed since the last answer (we polled too soon).
            return self._last.get(job_id, Running())
        status = self._status_from(self._record(resp), handle)
        self._last[job_id] = status
        return status

    async def cancel(self, handle: Handle) -> CancelOutcome:
        """DELETE the job (REFUSED when it had already ended or is gone). The gateway does
        not say whether it had started, so the run may be billed."""
        job_id = self._job_id(handle)
        try:
            await self._send("DELETE", f"/v1/jobs/{job_id}", polling=True)
        except (Rejected, TaskLost):
            return CancelOutcome.REFUSED  # 400/409: finished already; 404: forgotten
        self._last[job_id] = Cancelled()
        return CancelOutcome.REQUESTED

    def poll_interval(self) -> float:
        return self._poll_interval

    # -- internals ------------------------------------------------------------------

    def _job_id(self, handle: Handle) -> str:
        if handle.provider != self.name or not handle.data.get("id"):
            raise ValueError(f"not a {self.name} handle: provider {handle.provider!r}")
        return str(handle.data["id"])

    async def _send(
        self, method: str, path: str, *, json: Any = None, polling: bool
    ) -> httpx.Response:
        """One HTTP call; returns a 2xx/304 response or raises our typed error."""
        resp = await send(
            self.client,
            self.name,
            method,
            path,
            json=json,
            what="poll" if polling else "submit",
            submit=not polling,
        )
        if resp.is_success or resp.status_code == 304:
            return resp
        message, error_type, code, param = self._error_fields(resp)
        raise map_error(
            resp.status_code,
            message,
            error_type=error_type,
            code=code,
            param=param,
            retry_after=parse_retry_after(resp),
            polling=polling,
        )

    def _error_fields(self, resp: httpx.Response) -> tuple[str, str, str, str]:
        """message, type, code and param of an OpenAI-style error body, tolerantly."""
        try:
            body: Any = resp.json()
        except ValueError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            fields = [error.get(k) for k in ("message", "type", "code", "param")]
            text = [str(f) if f is not None else "" for f in fields]
            return self._clean(text[0]), text[1], text[2], text[3]
        if isinstance(error, str):
            return self._clean(error), "", "", ""
        if isinstance(body, dict) and body.get("message"):
            return self._clean(str(body["message"])), "", "", ""
        return self._clean(resp.text or resp.reason_phrase), "", "", ""

    def _clean(self, text: str) -> str:
        """Short, one-line and key-free (some servers echo the key they refused)."""
        text = " ".join(text.replace(self._api_key, "***").split())
        return text[:_MAX_REASON_CHARS]

    def _record(self, resp: httpx.Response) -> dict[str, Any]:
        try:
            body: Any = resp.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and "id" not in body and isinstance(body.get("data"), dict):
            body = body["data"]  # tolerate a wrapped job record
        if not isinstance(body, dict):
            raise Unavailable(
                self.name, "answer was not a job record", status_code=resp.status_code
            )
        return body

    def _status_from(self, record: dict[str, Any], handle: Handle) -> Status:
        status = str(record.get("status") or "").lower()
        if status in _QUEUED:
            return Queued(whole_number(record.get("queue_position", record.get("position"))))
        if status in _RUNNING:
            message = record.get("message")
            return Running(
                progress=_fraction(record.get("progress")),
                message=self._clean(message) if isinstance(message, str) else None,
            )
        if status in ("completed", "succeeded"):
            return self._succeeded(record, handle)
        if status == "failed":
            return self._failed(record)
        if status in _CANCELLED:
            return Cancelled()
        # A status the docs do not list: keep polling rather than give up on a paid job.
        return Running(message=f"status {status or 'unknown'}")

    def _succeeded(self, record: dict[str, Any], handle: Handle) -> Status:
        result = record.get("result")
        result = result if isinstance(result, dict) else {}
        url = next(
            (
                u
                for u in (result.get("url"), result.get("file_url"), record.get("result_url"))
                if isinstance(u, str) and u
            ),
            None,
        )
        if url is None:
            return Failed("AIgateway finished without an audio file")
        metadata: dict[str, Any] = {
            "job_id": record.get("id") or handle.data["id"],
            "model": record.get("model") or handle.data.get("model"),
            "format": handle.data.get("format"),
        }
        for key in ("created_at", "completed_at", "cost", "usage"):
            if record.get(key) is not None:
                metadata[key] = record[key]
        # Extras the result carries (duration, bpm, ...), minus the URLs that expire.
        for key, value in result.items():
            if key not in ("url", "file_url") and isinstance(value, str | int | float | bool):
                metadata.setdefault(key, value)
        content_type = result.get("content_type") or result.get("mime_type")
        return Succeeded(
            Result(
                audio_url=url,
                seed=None,  # AIgateway takes no seed and reports none
                content_type=content_type if isinstance(content_type, str) else None,
                metadata=metadata,
            )
        )

    def _failed(self, record: dict[str, Any]) -> Failed:
        error = record.get("error")
        code = ""
        if isinstance(error, dict):
            code = f"{error.get('type') or ''} {error.get('code') or ''}"
            error = error.get("message")
        text = self._clean(str(error)) if error else ""
        reason = text or "no reason given"
        markers = f"{code} {text}".lower()
        return Failed(reason, rejected=has_marker([markers], POLICY_WORDS))


def _fraction(value: Any) -> float | None:
    """Progress as 0..1, accepting a fraction or a percentage."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    if number > 1.0:
        number /= 100.0
    return min(1.0, max(0.0, number))
