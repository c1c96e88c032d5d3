"""A fake WaveSpeed v3 API: real HTTP on 127.0.0.1 speaking the documented protocol.

Drive it with attributes and `fail_next`:

    fake = FakeWaveSpeed(queued_polls=1, running_polls=2)
    fake.outcome = "failed"                 # jobs submitted from now end this way
    fake.fail_next("submit", 402, "Insufficient balance")
    async with fake.running() as base_url: ...

Every answer is the `{code, message, data}` envelope. Jobs go created -> processing ->
`outcome` over a number of polls; finished jobs point at a real WAV of the requested
duration served by the fake itself.

Work on a song (issue 14; schemas in docs/edit-modes.md, from the models' pages
wavespeed.ai/docs/docs-api/wavespeed-ai/ace-step-audio-{to-audio,inpaint,outpaint}): the
three edit models take `audio`, a URL this fake's media upload handed out
(`POST /api/v3/media/upload/binary`, multipart `file`, answered with `data.download_url`;
wavespeed.ai/docs-common-api/media-upload). A URL it does not hold, or a file that is not
audio, is a 400 envelope naming `audio`. The song lasts (and is billed for) the source, or
the source plus before and after for outpaint.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from tests.fakes.audio import audio_seconds, make_wav
from tests.fakes.http import json_response, serve

Route = Literal["submit", "poll", "audio"]

MODELS: dict[str, set[str]] = {
    "wavespeed-ai/ace-step/prompt-to-audio": {"prompt", "instrumental", "duration", "seed"},
    "wavespeed-ai/ace-step": {"tags", "lyrics", "duration", "seed"},
    "wavespeed-ai/ace-step-1.5": {"tags", "lyrics", "duration", "seed"},
    "wavespeed-ai/ace-step/audio-to-audio": {
        "audio",
        "original_tags",
        "tags",
        "edit_mode",
        "original_lyrics",
        "lyrics",
        "seed",
    },
    "wavespeed-ai/ace-step/audio-inpaint": {
        "audio",
        "tags",
        "start_time_relative_to",
        "start_time",
        "end_time_relative_to",
        "end_time",
        "lyrics",
        "seed",
    },
    "wavespeed-ai/ace-step/audio-outpaint": {
        "audio",
        "tags",
        "extend_before_duration",
        "extend_after_duration",
        "lyrics",
        "seed",
    },
}
# The edit models' further required fields, and their numbers' documented ranges.
EDIT_REQUIRED = {
    "wavespeed-ai/ace-step/audio-to-audio": ("audio", "original_tags"),
    "wavespeed-ai/ace-step/audio-inpaint": ("audio",),
    "wavespeed-ai/ace-step/audio-outpaint": ("audio",),
}
EDIT_RANGES = {
    "start_time": (0, 240),
    "end_time": (0, 240),
    "extend_before_duration": (0, 240),
    "extend_after_duration": (0, 240),
}
EDIT_CHOICES = {
    "edit_mode": ("remix", "lyrics"),
    "start_time_relative_to": ("start", "end"),
    "end_time_relative_to": ("start", "end"),
}
REQUIRED = {
    "wavespeed-ai/ace-step/audio-to-audio": "tags",
    "wavespeed-ai/ace-step/audio-inpaint": "tags",
    "wavespeed-ai/ace-step/audio-outpaint": "tags",
    "wavespeed-ai/ace-step/prompt-to-audio": "prompt",
    "wavespeed-ai/ace-step": "tags",
    "wavespeed-ai/ace-step-1.5": "tags",
}
# Optional flags every WaveSpeed model accepts.
COMMON_FLAGS = {"enable_sync_mode", "enable_base64_output", "webhook_url"}


@dataclass
class FakeFailure:
    status: int  # HTTP status; 200 with `code` set is an error inside the envelope
    message: str
    code: int | None = None
    retry_after: str | None = None


@dataclass
class FakeJob:
    id: str
    model: str
    body: dict[str, Any]
    outcome: str
    error: str
    nsfw: bool
    queued_polls: int
    running_polls: int
    created_at: str
    polls: int = 0
    source_seconds: float | None = None  # an edit's source, as the server read it

    @property
    def duration(self) -> float:
        """How long its song is: the requested duration, or what the edit makes."""
        if self.source_seconds is None:
            return float(self.body.get("duration", 60))
        if self.model.endswith("/audio-outpaint"):
            before = float(self.body.get("extend_before_duration", 0))
            return self.source_seconds + before + float(self.body.get("extend_after_duration", 30))
        return self.source_seconds


@dataclass
class FakeWaveSpeed:
    """A WaveSpeed server; see the module docstring for how to drive it."""

    api_key: str = "ws-test-key-0123456789"
    queued_polls: int = 1
    running_polls: int = 1
    # Final status of jobs submitted from now: completed | failed | timeout | cancelled.
    outcome: str = "completed"
    failure_error: str = "Inference failed: CUDA out of memory"
    nsfw: bool = False
    # False: the server lacks `/predictions/{id}/result` and answers it 404.
    result_path: bool = True
    # Host name put in output URLs (e.g. "localhost" to look like another origin).
    audio_host: str | None = None
    inference_ms: int = 4321

    submits: list[dict[str, Any]] = field(default_factory=list)  # accepted: model + body
    submit_attempts: int = 0  # every submit POST, refused ones included
    poll_paths: list[str] = field(default_factory=list)
    audio_requests: list[dict[str, str]] = field(default_factory=list)
    jobs: dict[str, FakeJob] = field(default_factory=dict)
    billed_seconds: list[float] = field(default_factory=list)  # per accepted submit
    media: dict[str, bytes] = field(default_factory=dict)  # uploaded files by id
    uploads: list[str] = field(default_factory=list)  # file names of every upload
    base_url: str = ""

    def __post_init__(self) -> None:
        self._failures: dict[str, deque[FakeFailure]] = {
            "submit": deque(),
            "poll": deque(),
            "audio": deque(),
        }
        self._stalls: dict[str, float] = {}
        self._ids = itertools.count(1)
        self._audio: dict[str, bytes] = {}
        self.app = web.Application(client_max_size=64 * 1024**2)  # whole songs uploaded
        self.app.router.add_post("/api/v3/media/upload/binary", self._upload)
        self.app.router.add_get("/media/{id}/{name}", self._media)
        self.app.router.add_get("/api/v3/predictions/{id}/result", self._result)
        self.app.router.add_get("/api/v3/predictions/{id}", self._prediction)
        self.app.router.add_get("/files/{id}.wav", self._file)
        self.app.router.add_post("/api/v3/{model:.+}", self._submit)

    # -- driving the fake -----------------------------------------------------------

    @property
    def submit_count(self) -> int:
        return len(self.submits)

    def billed_usd(self, price_per_second: float = 0.0002) -> float:
        """What WaveSpeed would bill. Its API docs say nothing of failed predictions going
        unbilled, so the fake bills every accepted one: the cautious reading, which the
        bot's spend accounting takes too."""
        return sum(self.billed_seconds) * price_per_second

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [s["body"] for s in self.submits]

    def fail_next(
        self,
        route: Route,
        status: int,
        message: str = "error",
        *,
        code: int | None = None,
        retry_after: float | str | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next `times` requests on `route` with this error."""
        ra = None if retry_after is None else str(retry_after)
        for _ in range(times):
            self._failures[route].append(FakeFailure(status, message, code, ra))

    def stall_next(self, route: Route, seconds: float) -> None:
        """Make the next request on `route` wait this long before answering."""
        self._stalls[route] = seconds

    def forget_jobs(self) -> None:
        """Lose every job, as if they had expired: polls answer 404."""
        self.jobs.clear()

    def audio_for(self, job_id: str) -> bytes:
        """The WAV bytes this fake serves for a job."""
        if job_id not in self._audio:
            self._audio[job_id] = make_wav(self.jobs[job_id].duration)
        return self._audio[job_id]

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        """Serve on 127.0.0.1; yields the base URL."""
        async with serve(self.app) as url:
            self.base_url = url
            yield url

    # -- protocol -------------------------------------------------------------------

    @staticmethod
    def _envelope(
        data: Any,
        code: int = 200,
        message: str = "success",
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        return json_response(
            {"code": code, "message": message, "data": data}, status=status, headers=headers or {}
        )

    def _error(
        self, status: int, message: str, code: int | None = None, retry_after: str | None = None
    ) -> web.Response:
        headers = {"Retry-After": retry_after} if retry_after else {}
        return self._envelope(
            None, code=code or status, message=message, status=status, headers=headers
        )

    async def _gate(self, route: Route, request: web.Request) -> web.Response | None:
        """Auth, stalls and injected failures shared by every route."""
        stall = self._stalls.pop(route, 0.0)
        if stall:
            await asyncio.sleep(stall)
        if route != "audio" and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._error(401, "Unauthorized: invalid API key")
        if self._failures[route]:
            f = self._failures[route].popleft()
            return self._error(f.status, f.message, f.code, f.retry_after)
        return None

    async def _submit(self, request: web.Request) -> web.Response:
        self.submit_attempts += 1
        if (failure := await self._gate("submit", request)) is not None:
            return failure
        model = request.match_info["model"]
        if model not in MODELS:
            return self._error(404, f"model {model} not found")
        try:
            body = await request.json()
        except ValueError:
            return self._error(400, "request body is not JSON")
        if not isinstance(body, dict):
            return self._error(400, "request body must be an object")
        unknown = set(body) - MODELS[model] - COMMON_FLAGS
        if unknown:
            return self._error(400, f"unknown fields: {', '.join(sorted(unknown))}")
        required = REQUIRED[model]
        if not isinstance(body.get(required), str) or not body[required].strip():
            return self._error(400, f"{required} is required")
        duration = body.get("duration", 60)
        if not isinstance(duration, int | float) or not 5 <= duration <= 240:
            return self._error(400, "duration must be between 5 and 240")
        seed = body.get("seed", -1)
        if not isinstance(seed, int) or not -1 <= seed <= 2_147_483_647:
            return self._error(400, "seed must be between -1 and 2147483647")
        source_seconds = None
        if model in EDIT_REQUIRED:
            refused = self._check_edit(model, body)
            if isinstance(refused, web.Response):
                return refused
            source_seconds = refused
        self.submits.append({"model": model, "body": body})
        job_id = f"ws{next(self._ids):03d}-{uuid.uuid4().hex[:12]}"
        job = FakeJob(
            job_id,
            model,
            body,
            self.outcome,
            self.failure_error,
            self.nsfw,
            self.queued_polls,
            self.running_polls,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            source_seconds=source_seconds,
        )
        self.jobs[job_id] = job
        self.billed_seconds.append(job.duration)
        return self._envelope(self._data(job, "created"))

    def _check_edit(self, model: str, body: dict[str, Any]) -> web.Response | float:
        """An edit's own fields, then its source: the source's length, or the refusal."""
        for name in EDIT_REQUIRED[model]:
            if not isinstance(body.get(name), str) or not body[name].strip():
                return self._error(400, f"{name} is required")
        for name, (low, high) in EDIT_RANGES.items():
            value = body.get(name, low)
            if isinstance(value, bool) or not isinstance(value, int | float):
                return self._error(400, f"{name} must be a number")
            if not low <= value <= high:
                return self._error(400, f"{name} must be between {low} and {high}")
        for name, choices in EDIT_CHOICES.items():
            if name in body and body[name] not in choices:
                return self._error(400, f"{name} must be one of {', '.join(choices)}")
        marker = f"{self.base_url}/media/"
        url = str(body["audio"])
        data = (
            self.media.get(url[len(marker) :].split("/", 1)[0]) if url.startswith(marker) else None
        )
        if data is None:
            return self._error(400, "audio: failed to download the file from the given URL")
        seconds = audio_seconds(data)
        if seconds is None:
            return self._error(400, "audio: the file is not a supported audio format")
        return seconds

    async def _upload(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._error(401, "Unauthorized: invalid API key")
        form = await request.post()
        upload = form.get("file")
        if not isinstance(upload, web.FileField):
            return self._error(400, "file is required")
        data = upload.file.read()
        media_id = uuid.uuid4().hex
        self.media[media_id] = data
        self.uploads.append(upload.filename)
        return self._envelope(
            {
                "type": "audio",
                "download_url": f"{self.base_url}/media/{media_id}/{upload.filename}",
                "filename": upload.filename,
                "size": len(data),
            }
        )

    async def _media(self, request: web.Request) -> web.Response:
        data = self.media.get(request.match_info["id"])
        if data is None:
            return web.Response(status=404, text="not found")
        return web.Response(body=data, content_type="application/octet-stream")

    async def _result(self, request: web.Request) -> web.Response:
        if not self.result_path:
            self.poll_paths.append(request.path)
            return web.Response(status=404, text="404 page not found")
        return await self._poll(request)

    async def _prediction(self, request: web.Request) -> web.Response:
        return await self._poll(request)

    async def _poll(self, request: web.Request) -> web.Response:
        self.poll_paths.append(request.path)
        if (failure := await self._gate("poll", request)) is not None:
            return failure
        job = self.jobs.get(request.match_info["id"])
        if job is None:
            return self._error(404, "prediction not found")
        job.polls += 1
        if job.polls <= job.queued_polls:
            status = "created"
        elif job.polls <= job.queued_polls + job.running_polls:
            status = "processing"
        else:
            status = job.outcome
        return self._envelope(self._data(job, status))

    def _data(self, job: FakeJob, status: str) -> dict[str, Any]:
        done = status == "completed"
        return {
            "id": job.id,
            "model": job.model,
            "outputs": [self._audio_url(job)] if done else [],
            "urls": {"get": f"{self.base_url}/api/v3/predictions/{job.id}/result"},
            "has_nsfw_contents": [job.nsfw] if done else [],
            "status": status,
            "created_at": job.created_at,
            "error": job.error if status in ("failed", "timeout") else "",
            "timings": {"inference": self.inference_ms if done else 0},
        }

    def _audio_url(self, job: FakeJob) -> str:
        base = self.base_url
        if self.audio_host:
            base = base.replace("127.0.0.1", self.audio_host)
        return f"{base}/files/{job.id}.wav"

    async def _file(self, request: web.Request) -> web.Response:
        self.audio_requests.append(dict(request.headers))
        if (failure := await self._gate("audio", request)) is not None:
            return web.Response(status=failure.status, text="gone")
        job_id = request.match_info["id"]
        if job_id not in self.jobs:
            return web.Response(status=404, text="not found")
        return web.Response(body=self.audio_for(job_id), content_type="audio/wav")
