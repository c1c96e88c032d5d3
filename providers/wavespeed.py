"""WaveSpeed AI (v3 API) adapter: ACE-Step prompt-to-audio plus one of two song models.

Wire facts (shared PROVIDERS.md): every answer is an envelope `{code, message, data}` that
can carry an error even under HTTP 200, a failed run is HTTP 200 with `status: failed`, the
result lives at `/api/v3/predictions/{id}/result` (newer servers also answer
`/api/v3/predictions/{id}`), and there is no cancel endpoint.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

from bot.requests import GenerationRequest, Mode, Task, is_instrumental_lyrics
from providers.base import (
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
    TaskLost,
    Unavailable,
    api_client,
    backoff_delays,
    hosted_edit_fields,
    parse_retry_after,
    retry_reads,
    send,
    whole_number,
)
from providers.errors import BILLING_WORDS, POLICY_WORDS, Stage, has_marker, http_error
from providers.uploads import content_type, provider_ref, read_source

log = logging.getLogger(__name__)

NAME = "wavespeed"
DEFAULT_BASE_URL = "https://api.wavespeed.ai"
PROMPT_MODEL = "wavespeed-ai/ace-step/prompt-to-audio"
PROMPT_PRICE = 0.0002  # USD per second of audio
# Song models the operator can choose between, with their price per second of audio.
SONG_MODELS: dict[str, float] = {
    "wavespeed-ai/ace-step": 0.0002,
    "wavespeed-ai/ace-step-1.5": 0.0003,
}
DEFAULT_SONG_MODEL = "wavespeed-ai/ace-step"
# Work on a song (docs/edit-modes.md): one model per task, each "$0.0002 per second of
# generated audio".
EDIT_MODELS: dict[Task, str] = {
    Task.REMIX: "wavespeed-ai/ace-step/audio-to-audio",
    Task.REPAINT: "wavespeed-ai/ace-step/audio-inpaint",
    Task.EXTEND: "wavespeed-ai/ace-step/audio-outpaint",
}
EDIT_PRICE = 0.0002
UPLOAD_PATH = "/api/v3/media/upload/binary"
# "Uploaded files are stored for 7 days and then automatically deleted"
# (wavespeed.ai/docs/upload-files); we trust six, to leave a run time to fetch it.
UPLOAD_LIFETIME_S = 6 * 24 * 3600
_SOURCE_REFUSED = (
    "WaveSpeed could not use the source audio ({detail}); send an MP3, WAV or FLAC song "
    "of at most 240 seconds"
)
# How each song model spells "no vocals" in its lyrics field.
_NO_LYRICS = {"wavespeed-ai/ace-step": "[inst]", "wavespeed-ai/ace-step-1.5": ""}

_QUEUED = {"created", "pending", "queued"}
_RUNNING = {"processing", "running"}
_FAILED = {"failed", "timeout", "deleted"}
_CANCELLED = {"cancelled", "canceled"}
_MAX_RETRY_WAIT_S = 30.0
_MAX_REASON_CHARS = 300


def map_error(
    status: int, message: str, *, retry_after: float | None = None, polling: bool = False
) -> ProviderError:
    """WaveSpeed's HTTP status or envelope code, with the markers its message carries."""
    return http_error(
        NAME,
        status,
        message,
        stage=Stage.POLL if polling else Stage.SUBMIT,
        retry_after=retry_after,
        billing=has_marker([message], BILLING_WORDS),
        key_setting="WAVESPEED_API_KEY",
    )


class WaveSpeedProvider(Provider):
    """ACE-Step on WaveSpeed: prompt mode always, song mode with the chosen song model."""

    name = NAME

    def __init__(
        self,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        *,
        song_model: str = DEFAULT_SONG_MODEL,
        concurrency: int = 2,
        transport: httpx.AsyncBaseTransport | None = None,
        poll_interval: float = 2.0,
        poll_retries: int = 2,
        retry_backoff: float = 1.0,
        timeout: float = 30.0,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        """`poll_retries` extra tries per poll after a busy/unavailable answer, waiting
        `retry_backoff` * 2**n seconds (or Retry-After) through `sleep`."""
        if song_model not in SONG_MODELS:
            raise ValueError(
                f"unknown WaveSpeed song model {song_model!r}; "
                f"choose one of {', '.join(SONG_MODELS)}"
            )
        if not api_key:
            raise ValueError("the WaveSpeed API key is empty")
        self.base_url = base_url.rstrip("/")
        client = api_client(
            base_url=self.base_url,
            transport=transport,
            auth=KeyForOrigins(f"Bearer {api_key}", [self.base_url]),
            timeout=timeout,
        )
        super().__init__(client)
        self._api_key = api_key
        self.song_model = song_model
        self.capabilities = Capabilities(
            modes=frozenset({Mode.PROMPT, Mode.SONG}),
            tasks=frozenset({Task.GENERATE, *EDIT_MODELS}),
            options={},  # WaveSpeed takes no knobs beyond duration and seed
            # The engine budgets with one figure: the dearest model this instance may use.
            price_per_second=max(PROMPT_PRICE, SONG_MODELS[song_model]),
            concurrency=concurrency,
        )
        self._poll_interval = poll_interval
        self._poll_retries = max(0, poll_retries)
        self._retry_backoff = retry_backoff
        self._sleep = sleep
        # Set once the server answers 404 on `/result` but knows `/predictions/{id}`.
        self._prefer_plain_path = False

    # -- what to send ---------------------------------------------------------------

    def model_for(self, request: GenerationRequest) -> str:
        """The WaveSpeed model id that serves this request."""
        if request.task is not Task.GENERATE:
            return EDIT_MODELS[request.task]
        return PROMPT_MODEL if request.mode is Mode.PROMPT else self.song_model

    def price_per_second_for(self, request: GenerationRequest) -> float:
        """USD per second of audio for this request's model."""
        if request.task is not Task.GENERATE:
            return EDIT_PRICE
        if request.mode is Mode.PROMPT:
            return PROMPT_PRICE
        return SONG_MODELS[self.song_model]

    def billed_seconds(self, request: GenerationRequest) -> float:
        """Billed "per second of generated audio": an edit returns the whole song (the
        source's length, plus the extension for outpaint)."""
        return float(request.duration)

    def build_input(
        self, request: GenerationRequest, seed: int, *, audio: str | None = None
    ) -> dict[str, Any]:
        """The flat JSON body WaveSpeed's model takes."""
        if request.task is not Task.GENERATE:
            return _edit_input(request, seed, audio)
        if request.mode is Mode.PROMPT:
            return {
                "prompt": request.prompt,
                "instrumental": request.instrumental,
                "duration": request.duration,
                "seed": seed,
            }
        if request.instrumental or is_instrumental_lyrics(request.lyrics):
            lyrics = _NO_LYRICS[self.song_model]
        else:
            lyrics = request.lyrics
        return {"tags": request.tags, "lyrics": lyrics, "duration": request.duration, "seed": seed}

    # -- the contract ---------------------------------------------------------------

    async def submit(
        self, request: GenerationRequest, seed: int, source: SourceFile | None = None
    ) -> Handle:
        if not self.capabilities.can_serve(request):
            raise ValueError(
                f"{self.name} cannot serve a {request.mode} request of {request.duration} s"
            )
        model = self.model_for(request)
        audio, uploaded = None, False
        if request.task is not Task.GENERATE:
            if source is None:
                raise ValueError(f"a {request.task} request needs its source file")
            audio, uploaded = await self._source_url(source)
        body = self.build_input(request, seed, audio=audio)
        # Never retried blindly: a submit that timed out may exist and be billed. Only a
        # remembered source WaveSpeed says it cannot fetch (a 400: nothing was created)
        # is uploaded again and the submit sent once more.
        try:
            try:
                data = await self._request("POST", f"/api/v3/{model}", json=body, polling=False)
            except Rejected as exc:
                if source is None or uploaded or not _about_audio(exc.message):
                    raise
                log.info("wavespeed: source %s refused; uploading it again", source.sha256[:12])
                body["audio"], _ = await self._source_url(source, fresh=True)
                data = await self._request("POST", f"/api/v3/{model}", json=body, polling=False)
        except Rejected as refused:
            if source is None or not _about_audio(refused.message):
                raise
            raise Rejected(
                self.name,
                _SOURCE_REFUSED.format(detail=refused.message),
                status_code=refused.status_code,
            ) from None
        job_id = data.get("id")
        if not isinstance(job_id, str) or not job_id:
            raise Unavailable(
                self.name, "submit answer carried no prediction id", maybe_accepted=True
            )
        log.info("wavespeed: submitted prediction %s to %s", job_id, model)
        return Handle(
            self.name, {"id": job_id, "model": model, "seed": seed, "duration": request.duration}
        )

    async def poll(self, handle: Handle) -> Status:
        self._check_handle(handle)
        data = await self._fetch_prediction(str(handle.data["id"]))
        return self._status_from(data, handle)

    async def cancel(self, handle: Handle) -> CancelOutcome:
        """WaveSpeed has no cancel endpoint: the run finishes (and is billed) anyway."""
        self._check_handle(handle)
        return CancelOutcome.REFUSED

    def poll_interval(self) -> float:
        return self._poll_interval

    # -- source uploads (WaveSpeed media upload) -------------------------------------

    async def _source_url(self, source: SourceFile, *, fresh: bool = False) -> tuple[str, bool]:
        return await provider_ref(self.name, source, lambda: self._upload(source), fresh=fresh)

    async def _upload(self, source: SourceFile) -> tuple[str, float]:
        """`POST /api/v3/media/upload/binary`, multipart field `file`; the envelope's
        `data.download_url` is what a model's `audio` field takes
        (wavespeed.ai/docs-common-api/media-upload)."""
        data = await read_source(source)
        files = {"file": (source.path.name, data, content_type(source))}
        answer = await self._request("POST", UPLOAD_PATH, files=files, polling=False, what="upload")
        url = answer.get("download_url")
        if not isinstance(url, str) or not url:
            raise Unavailable(self.name, "the media upload answered without a download_url")
        return url, UPLOAD_LIFETIME_S

    # -- internals ------------------------------------------------------------------

    def _check_handle(self, handle: Handle) -> None:
        if handle.provider != self.name or not handle.data.get("id"):
            raise ValueError(f"not a {self.name} handle: provider {handle.provider!r}")

    async def _fetch_prediction(self, job_id: str) -> dict[str, Any]:
        """GET the prediction, retrying busy/unavailable answers with backoff."""
        return await retry_reads(
            lambda: self._get_prediction(job_id),
            delays=backoff_delays(self._poll_retries, self._retry_backoff),
            sleep=self._sleep,
            provider=self.name,
            what=f"poll of {job_id}",
            max_wait=_MAX_RETRY_WAIT_S,
        )

    async def _get_prediction(self, job_id: str) -> dict[str, Any]:
        paths = [f"/api/v3/predictions/{job_id}/result", f"/api/v3/predictions/{job_id}"]
        if self._prefer_plain_path:
            paths.reverse()
        try:
            return await self._request("GET", paths[0], polling=True)
        except TaskLost:
            # Only one of the two documented paths may exist on this server.
            data = await self._request("GET", paths[1], polling=True)
            self._prefer_plain_path = not self._prefer_plain_path
            return data

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        files: dict[str, tuple[str, bytes, str]] | None = None,
        polling: bool,
        what: str | None = None,
    ) -> dict[str, Any]:
        """One HTTP call; returns the envelope's `data` or raises our typed error."""
        what = what or ("poll" if polling else "submit")
        resp = await send(
            self.client,
            self.name,
            method,
            path,
            json=json,
            files=files,
            what=what,
            submit=what == "submit",
        )
        try:
            body: Any = resp.json()
        except ValueError:
            body = None
        envelope = body if isinstance(body, dict) else {}
        code = envelope.get("code")
        if resp.status_code >= 400 or not resp.is_success:
            status = resp.status_code
        else:
            # HTTP 2xx can still carry an error code in the envelope.
            status = code if isinstance(code, int) else 200
        if status != 200:
            message = (
                envelope.get("message")
                or envelope.get("error")
                or (resp.text if body is None else "")
            )
            raise map_error(
                status,
                self._clean(str(message)),
                retry_after=parse_retry_after(resp),
                polling=polling,
            )
        data = envelope.get("data")
        if not isinstance(data, dict):
            raise Unavailable(self.name, "answer had no data object", status_code=status)
        return data

    def _clean(self, text: str) -> str:
        """Short, one-line and key-free (some servers echo the key they refused)."""
        text = " ".join(text.replace(self._api_key, "***").split())
        return text[:_MAX_REASON_CHARS]

    def _status_from(self, data: dict[str, Any], handle: Handle) -> Status:
        status = str(data.get("status") or "").lower()
        if status in _QUEUED:
            return Queued(whole_number(data.get("queue_position")))
        if status in _RUNNING:
            return Running()
        if status == "completed":
            return self._succeeded(data, handle)
        if status in _FAILED:
            error = self._clean(str(data.get("error") or ""))
            if status == "timeout":
                reason = f"timed out: {error}" if error else "timed out"
            else:
                reason = error or "no reason given"
            low = error.lower()
            return Failed(reason, rejected=has_marker([low], POLICY_WORDS))
        if status in _CANCELLED:
            return Cancelled()
        # A status the docs do not list: keep polling rather than give up on a paid job.
        return Running(message=f"status {status or 'unknown'}")

    def _succeeded(self, data: dict[str, Any], handle: Handle) -> Status:
        outputs = data.get("outputs") or []
        url = next((o for o in outputs if isinstance(o, str) and o), None)
        if url is None:
            return Failed("WaveSpeed finished without an audio file")
        metadata: dict[str, Any] = {
            "prediction_id": data.get("id") or handle.data["id"],
            "model": data.get("model") or handle.data.get("model"),
        }
        timings = data.get("timings")
        if isinstance(timings, dict) and isinstance(timings.get("inference"), int | float):
            metadata["inference_time_s"] = timings["inference"] / 1000.0
        nsfw = data.get("has_nsfw_contents")
        if isinstance(nsfw, list):
            metadata["has_nsfw_contents"] = [bool(x) for x in nsfw]
            metadata["nsfw"] = any(bool(x) for x in nsfw)
        if data.get("created_at"):
            metadata["created_at"] = data["created_at"]
        # WaveSpeed runs the concrete seed it was sent; prefer one it reports, if ever.
        seed = whole_number(data.get("seed"))
        if seed is None:
            seed = whole_number(handle.data.get("seed"))
        return Succeeded(Result(audio_url=url, seed=seed, metadata=metadata))


def _about_audio(message: str) -> bool:
    """A refusal that is about the `audio` input (unfetchable or not audio)."""
    return "audio" in message.lower()


def _edit_input(request: GenerationRequest, seed: int, audio: str | None) -> dict[str, Any]:
    """The body of WaveSpeed's audio-to-audio / audio-inpaint / audio-outpaint (field
    names and ranges: docs/edit-modes.md)."""
    source = request.source
    if source is None or audio is None:
        raise ValueError(f"a {request.task} request needs its source file")
    tags = request.tags or source.tags or request.prompt
    no_vocals = request.instrumental or is_instrumental_lyrics(request.lyrics)
    lyrics = "[inst]" if no_vocals else request.lyrics
    body: dict[str, Any] = {"audio": audio, "tags": tags, "lyrics": lyrics}
    body.update(hosted_edit_fields(request, source, tags))
    body["seed"] = seed
    return body
