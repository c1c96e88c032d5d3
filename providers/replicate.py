"""Replicate adapter: `lucataco/ace-step` through the predictions API (song mode only).

Wire protocol (PROVIDERS.md, "Replicate"): `POST /v1/predictions {version, input}` answers
201 with a prediction; `GET /v1/predictions/{id}` polls it; `POST .../{id}/cancel`
cancels it. Errors are RFC 7807 problem details (`type, title, status, detail`); a 429
may carry `Retry-After`. The model's output is one URL string.

Price: Replicate bills this model by GPU time, not per second of audio; no published
per-audio-second figure was found, so the default is the 0.0002 USD/s the other ACE-Step
hosts charge. `Result.metadata["predict_time"]` keeps the billed GPU seconds so the
operator can compare.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any
from urllib.parse import urlsplit

import httpx

from bot.requests import GenerationRequest, Mode
from providers.base import (
    ACE_STEP_V1_OPTIONS,
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
    Unavailable,
    api_client,
    backoff_delays,
    http_error_text,
    parse_retry_after,
    retry_reads,
    send,
)
from providers.errors import BILLING_WORDS, Stage, has_marker, http_error

log = logging.getLogger(__name__)

ACE_STEP_MODEL = "lucataco/ace-step"
ACE_STEP_VERSION = "280fc4f9ee507577f880a167f639c02622421d8fecf492454320311217b688f1"

# The model's inputs for our options (its input schema on the model page: steps 10-200,
# guidance_scale at most 30, min_guidance_scale at most 100; the others as fal's).
INPUTS: dict[str, OptionRange] = {
    **ACE_STEP_V1_OPTIONS,
    "steps": OptionRange("number_of_steps", 10, 200),
    "guidance_scale": OptionRange("guidance_scale", 0, 30),
    "minimum_guidance_scale": OptionRange("min_guidance_scale", 0, 100),
}

_CONTENT_TYPES = {
    ".wav": "audio/wav",
    ".mp3": "audio/mpeg",
    ".flac": "audio/flac",
    ".ogg": "audio/ogg",
}
_PERCENT = re.compile(r"(\d{1,3})%\|")


class ReplicateProvider(Provider):
    """Runs `lucataco/ace-step` on Replicate: tags + lyrics in, one audio URL out."""

    name = "replicate"

    def __init__(
        self,
        api_token: str,
        base_url: str = "https://api.replicate.com",
        *,
        version: str = ACE_STEP_VERSION,
        concurrency: int = 2,
        price_per_second: float = 0.0002,
        transport: httpx.AsyncBaseTransport | None = None,
        poll_interval: float = 2.0,
        poll_retries: int = 2,
        retry_backoff: float = 0.5,
        max_retry_after: float = 30.0,
        timeout: float = 30.0,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        base = base_url.rstrip("/")
        client = api_client(
            base_url=base,
            transport=transport,
            auth=KeyForOrigins(f"Bearer {api_token}", [base]),
            timeout=timeout,
        )
        super().__init__(client)
        self.base_url = base
        self.version = version
        self.capabilities = Capabilities(
            modes=frozenset({Mode.SONG}),
            min_duration=1,
            max_duration=240,
            options=INPUTS,
            price_per_second=price_per_second,
            concurrency=concurrency,
        )
        self._poll_interval = poll_interval
        self._poll_retries = poll_retries
        self._retry_backoff = retry_backoff
        self._max_retry_after = max_retry_after
        self._sleep = sleep

    # -- the contract -------------------------------------------------------------------

    def build_input(self, request: GenerationRequest, seed: int) -> dict[str, Any]:
        """The model input for one request (exactly what Replicate receives as `input`)."""
        if request.mode is not Mode.SONG:
            raise Rejected(self.name, "this model only composes songs from tags and lyrics")
        body: dict[str, Any] = {
            "tags": request.tags,
            "lyrics": request.lyrics if request.wants_vocals else "[instrumental]",
            "duration": request.duration,
            "seed": seed,
        }
        body.update(self.capabilities.wire_options(request))
        return body

    async def submit(
        self, request: GenerationRequest, seed: int, source: SourceFile | None = None
    ) -> Handle:
        """Create one prediction. Never retried: a lost answer may still be billed."""
        model_input = self.build_input(request, seed)
        payload = {"version": self.version, "input": model_input}
        resp = await self._send("POST", "/v1/predictions", json=payload)
        if resp.status_code >= 400:
            raise map_error(resp, self.name, stage="submit")
        try:
            prediction = _json_object(resp, self.name)
        except Unavailable as exc:  # a created (2xx) prediction we cannot read
            exc.maybe_accepted = True
            raise
        prediction_id = prediction.get("id")
        if not isinstance(prediction_id, str) or not prediction_id:
            raise Unavailable(self.name, "the prediction answer had no id", maybe_accepted=True)
        urls = prediction.get("urls") or {}
        return Handle(
            self.name,
            {
                "id": prediction_id,
                "version": self.version,
                "get_url": urls.get("get"),
                "cancel_url": urls.get("cancel"),
                "tags": request.tags,
                "lyrics": model_input["lyrics"],
                "seed": seed,
            },
        )

    async def poll(self, handle: Handle) -> Status:
        """Ask once how the prediction is doing (transient errors retried briefly)."""
        # Polls go to our configured base URL (a proxy may front the API), not urls.get.
        path = f"/v1/predictions/{handle.data['id']}"
        prediction = await self._get_with_retries(path)
        return self._status(handle, prediction)

    async def cancel(self, handle: Handle) -> CancelOutcome:
        """Cancel the prediction (REFUSED when it had already finished or is unknown). The
        answer does not say whether it had started, so the run may be billed."""
        resp = await self._send("POST", f"/v1/predictions/{handle.data['id']}/cancel")
        if resp.status_code in (400, 404, 409, 422):
            return CancelOutcome.REFUSED
        if resp.status_code >= 400:
            raise map_error(resp, self.name, stage="cancel")
        try:
            status = resp.json().get("status")
        except (ValueError, AttributeError):
            status = None
        if status in ("succeeded", "failed"):
            return CancelOutcome.REFUSED
        return CancelOutcome.REQUESTED

    def poll_interval(self) -> float:
        return self._poll_interval

    # -- helpers ------------------------------------------------------------------------

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await send(
            self.client,
            self.name,
            method,
            path,
            what=f"{method} {_shown_path(path)}",
            submit=method == "POST" and path.rstrip("/").endswith("predictions"),
            **kwargs,
        )

    async def _get_with_retries(self, path: str) -> dict[str, Any]:
        async def get() -> dict[str, Any]:
            resp = await self._send("GET", path)
            if resp.status_code >= 400:
                raise map_error(resp, self.name, stage="poll")
            return _json_object(resp, self.name)

        return await retry_reads(
            get,
            delays=backoff_delays(self._poll_retries, self._retry_backoff),
            sleep=self._sleep,
            provider=self.name,
            what="poll",
            max_wait=self._max_retry_after,
        )

    def _status(self, handle: Handle, prediction: dict[str, Any]) -> Status:
        status = prediction.get("status")
        if status == "starting":
            return Queued(position=None)
        if status == "processing":
            logs = prediction.get("logs") or ""
            return Running(progress=_progress_from_logs(logs), message=_last_line(logs))
        if status == "succeeded":
            url = _output_url(prediction.get("output"))
            if url is None:
                return Failed("the model finished without an audio file")
            return Succeeded(self._result(handle, prediction, url))
        if status == "failed":
            error = prediction.get("error")
            reason = " ".join(str(error).split())[:300] if error else "the model run failed"
            return Failed(reason)
        if status in ("canceled", "canceling"):
            return Cancelled()
        if status == "aborted":
            return Failed("Replicate aborted the prediction before it ran")
        raise Unavailable(self.name, f"unknown prediction status {str(status)[:40]!r}")

    def _result(self, handle: Handle, prediction: dict[str, Any], url: str) -> Result:
        given = prediction.get("input") or {}
        seed = given.get("seed", handle.data.get("seed"))
        metrics = prediction.get("metrics") or {}
        metadata: dict[str, Any] = {
            "prediction_id": prediction.get("id", handle.data["id"]),
            "model": ACE_STEP_MODEL,
            "version": prediction.get("version", handle.data.get("version")),
        }
        for key in ("predict_time", "total_time"):
            if isinstance(metrics.get(key), int | float):
                metadata[key] = metrics[key]
        suffix = urlsplit(url).path.rsplit(".", 1)
        content_type = _CONTENT_TYPES.get("." + suffix[-1].lower()) if len(suffix) == 2 else None
        return Result(
            audio_url=url,
            seed=seed if isinstance(seed, int) else None,
            tags=given.get("tags", handle.data.get("tags")),
            lyrics=given.get("lyrics", handle.data.get("lyrics")),
            content_type=content_type,
            metadata=metadata,
        )


def map_error(
    resp: httpx.Response, provider: str = "replicate", *, stage: str = "submit"
) -> ProviderError:
    """A Replicate problem-details answer in our terms (billing words are the marker)."""
    text = _problem_text(resp)
    return http_error(
        provider,
        resp.status_code,
        text,
        stage=Stage.POLL if stage == "poll" else Stage.SUBMIT,
        retry_after=parse_retry_after(resp),
        billing=has_marker([text], BILLING_WORDS),
        key_setting="REPLICATE_API_TOKEN",
    )


def _problem_text(resp: httpx.Response) -> str:
    """`title: detail` from an RFC 7807 body, else the best text the answer holds."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and ("title" in body or "detail" in body):
        title = " ".join(str(body.get("title") or "").split())
        detail = " ".join(str(body.get("detail") or "").split())
        text = (
            f"{title}: {detail}" if title and detail and title not in detail else (detail or title)
        )
        return text[:300]
    return http_error_text(resp)


def _json_object(resp: httpx.Response, provider: str) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        raise Unavailable(
            provider, "the answer was not JSON", status_code=resp.status_code
        ) from None
    if not isinstance(body, dict):
        raise Unavailable(provider, "the answer was not a JSON object")
    return body


def _output_url(output: Any) -> str | None:
    if isinstance(output, str) and output:
        return output
    if isinstance(output, list) and output and isinstance(output[0], str):
        return output[0]  # tolerate a list, in case the model's schema changes
    return None


def _progress_from_logs(logs: str) -> float | None:
    """The last tqdm percentage in the model's logs, as 0..1."""
    found = _PERCENT.findall(logs[-4000:])
    return min(100, int(found[-1])) / 100 if found else None


def _last_line(logs: str) -> str | None:
    for line in reversed(logs.replace("\r", "\n").splitlines()):
        if line.strip():
            return " ".join(line.split())[:200]
    return None


def _shown_path(path: str) -> str:
    return path.split("?", 1)[0]
