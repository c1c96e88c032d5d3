"""A fake AIgateway API: real HTTP on 127.0.0.1 speaking the documented protocol.

Drive it with attributes and `fail_next`:

    fake = FakeAIGateway(queued_polls=1, running_polls=2)
    fake.url_field = "result_url"           # where finished jobs put the audio URL
    fake.outcome = "failed"                 # jobs submitted from now end this way
    fake.fail_next("submit", 402, "Budget exceeded", code="budget_exceeded")
    async with fake.running() as base_url: ...

Errors are OpenAI-style `{"error": {message, type, code, param}}`. Jobs go queued ->
processing -> `outcome` over a number of answered polls; finished jobs point at a signed
URL on the fake serving a real WAV (or MP3) of the requested duration. With
`min_poll_interval` set, polls of one job closer together than that answer 304.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import av
import numpy as np
from aiohttp import web

from tests.fakes.audio import make_wav, sine_pcm
from tests.fakes.http import json_response, serve

Route = Literal["submit", "poll", "cancel", "audio"]

MODEL = "ace-step/ace-step-prompt-to-audio"
FIELDS = {"prompt", "model", "duration", "lyrics", "is_instrumental", "format", "webhook_url"}
# Where a finished job's audio URL may sit (the docs name all three).
URL_FIELDS = ("result.url", "result.file_url", "result_url")
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


@dataclass
class FakeFailure:
    status: int
    message: str
    type: str | None
    code: str | None
    param: str | None
    retry_after: str | None


@dataclass
class FakeJob:
    id: str
    body: dict[str, Any]
    outcome: str
    url_field: str
    queued_polls: int
    running_polls: int
    created_at: int
    polls: int = 0
    cancelled: bool = False
    last_poll: float | None = None

    @property
    def duration(self) -> float:
        return float(self.body.get("duration", 60))

    @property
    def format(self) -> str:
        return str(self.body.get("format", "mp3"))

    def state(self) -> str:
        if self.cancelled:
            return "cancelled"
        if self.polls <= self.queued_polls:
            return "queued"
        if self.polls <= self.queued_polls + self.running_polls:
            return "processing"
        return self.outcome


def make_mp3(duration: float, sample_rate: int = 48000) -> bytes:
    """A real MP3 of `duration` seconds, encoded with the codec library (PyAV)."""
    pcm = sine_pcm(duration, sample_rate)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp3") as container:
        stream = container.add_stream("libmp3lame", rate=sample_rate)
        stream.layout = "stereo"
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(pcm.reshape(1, -1)), format="s16", layout="stereo"
        )
        frame.sample_rate = sample_rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


@dataclass
class FakeAIGateway:
    """An AIgateway server; see the module docstring for how to drive it."""

    api_key: str = "sk-aig-test-0123456789abcdef"
    queued_polls: int = 1
    running_polls: int = 1
    # Final status of jobs submitted from now: completed | failed.
    outcome: str = "completed"
    # How finished jobs report the audio URL: one of URL_FIELDS.
    url_field: str = "result.url"
    # What a failed job carries in `error`: a string or an OpenAI-style object.
    failure_error: str | dict[str, Any] = field(
        default_factory=lambda: {
            "message": "Generation failed on the upstream model",
            "type": "server_error",
            "code": "generation_failed",
        }
    )
    # "running" is what the docs spell for the middle state; the live API says processing.
    running_word: str = "processing"
    # Extra fields merged into running job records (e.g. {"progress": 40}).
    running_extra: dict[str, Any] = field(default_factory=dict)
    # Polls of one job closer together than this (seconds) answer 304 Not Modified.
    min_poll_interval: float = 0.0
    # Host name put in result URLs (e.g. "localhost" to look like another origin).
    audio_host: str | None = None

    submits: list[dict[str, Any]] = field(default_factory=list)  # accepted bodies
    submit_attempts: int = 0  # every submit POST, refused ones included
    polls: list[int] = field(default_factory=list)  # HTTP status of each poll answer
    cancels: list[str] = field(default_factory=list)  # job ids whose cancel was accepted
    audio_requests: list[dict[str, str]] = field(default_factory=list)
    jobs: dict[str, FakeJob] = field(default_factory=dict)
    base_url: str = ""

    def __post_init__(self) -> None:
        self._failures: dict[str, deque[FakeFailure]] = {
            "submit": deque(),
            "poll": deque(),
            "cancel": deque(),
            "audio": deque(),
        }
        self._stalls: dict[str, float] = {}
        self._ids = itertools.count(1)
        self._audio: dict[str, bytes] = {}
        self.app = web.Application()
        self.app.router.add_post("/v1/audio/music", self._submit)
        self.app.router.add_get("/v1/jobs/{id}", self._poll)
        self.app.router.add_delete("/v1/jobs/{id}", self._cancel)
        self.app.router.add_get("/files/{name}", self._file)

    # -- driving the fake -----------------------------------------------------------

    @property
    def submit_count(self) -> int:
        return len(self.submits)

    def fail_next(
        self,
        route: Route,
        status: int,
        message: str = "error",
        *,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        retry_after: float | str | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next `times` requests on `route` with this error (304: no body)."""
        ra = None if retry_after is None else str(retry_after)
        for _ in range(times):
            self._failures[route].append(FakeFailure(status, message, type, code, param, ra))

    def stall_next(self, route: Route, seconds: float) -> None:
        """Make the next request on `route` wait this long before answering."""
        self._stalls[route] = seconds

    def forget_jobs(self) -> None:
        """Lose every job (expired records): polls answer 404."""
        self.jobs.clear()

    def audio_for(self, job_id: str) -> bytes:
        """The audio bytes this fake serves for a job, in the format it asked for."""
        if job_id not in self._audio:
            job = self.jobs[job_id]
            maker = make_mp3 if job.format == "mp3" else make_wav
            self._audio[job_id] = maker(job.duration)
        return self._audio[job_id]

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        """Serve on 127.0.0.1; yields the base URL."""
        async with serve(self.app) as url:
            self.base_url = url
            yield url

    # -- protocol -------------------------------------------------------------------

    @staticmethod
    def _error(
        status: int,
        message: str,
        *,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        retry_after: str | None = None,
    ) -> web.Response:
        if status == 304:
            return web.Response(status=304)
        headers = {"Retry-After": retry_after} if retry_after else {}
        body = {
            "error": {
                "message": message,
                "type": type or ERROR_TYPES.get(status, "api_error"),
                "code": code,
                "param": param,
            }
        }
        return json_response(body, status=status, headers=headers)

    async def _gate(self, route: Route, request: web.Request) -> web.Response | None:
        """Auth, stalls and injected failures shared by every route."""
        stall = self._stalls.pop(route, 0.0)
        if stall:
            await asyncio.sleep(stall)
        if route != "audio" and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._error(401, "Invalid API key provided", code="invalid_api_key")
        if self._failures[route]:
            f = self._failures[route].popleft()
            return self._error(
                f.status,
                f.message,
                type=f.type,
                code=f.code,
                param=f.param,
                retry_after=f.retry_after,
            )
        return None

    async def _submit(self, request: web.Request) -> web.Response:
        self.submit_attempts += 1
        if (failure := await self._gate("submit", request)) is not None:
            return failure
        try:
            body = await request.json()
        except ValueError:
            return self._error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return self._error(400, "The request body must be a JSON object.")
        unknown = sorted(set(body) - FIELDS)
        if unknown:
            return self._error(
                400,
                f"Unknown parameter: '{unknown[0]}'.",
                code="unknown_parameter",
                param=unknown[0],
            )
        if not isinstance(body.get("prompt"), str) or not body["prompt"].strip():
            return self._error(
                400,
                "Missing required parameter: 'prompt'.",
                code="missing_required_parameter",
                param="prompt",
            )
        if body.get("model", MODEL) != MODEL:
            return self._error(
                404,
                f"The model '{body['model']}' does not exist",
                code="model_not_found",
                param="model",
            )
        duration = body.get("duration", 60)
        if not isinstance(duration, int | float) or not 5 <= duration <= 240:
            return self._error(
                400,
                "duration must be between 5 and 240 seconds",
                code="invalid_value",
                param="duration",
            )
        if body.get("format", "mp3") not in ("mp3", "wav"):
            return self._error(
                400, "format must be mp3 or wav", code="invalid_value", param="format"
            )
        if not isinstance(body.get("is_instrumental", False), bool):
            return self._error(
                400,
                "is_instrumental must be a boolean",
                code="invalid_type",
                param="is_instrumental",
            )
        self.submits.append(body)
        job = FakeJob(
            f"job_{next(self._ids):03d}{uuid.uuid4().hex[:12]}",
            body,
            self.outcome,
            self.url_field,
            self.queued_polls,
            self.running_polls,
            int(time.time()),
        )
        self.jobs[job.id] = job
        return json_response(self._record(job, "queued"), status=202)

    async def _poll(self, request: web.Request) -> web.Response:
        answer = await self._answer_poll(request)
        self.polls.append(answer.status)
        return answer

    async def _answer_poll(self, request: web.Request) -> web.Response:
        if (failure := await self._gate("poll", request)) is not None:
            return failure
        job = self.jobs.get(request.match_info["id"])
        if job is None:
            return self._error(404, "No job found with that id", code="job_not_found")
        now = time.monotonic()
        if (
            self.min_poll_interval
            and job.last_poll is not None
            and now - job.last_poll < self.min_poll_interval
        ):
            return web.Response(status=304)
        job.last_poll = now
        job.polls += 1
        return json_response(self._record(job, job.state()))

    async def _cancel(self, request: web.Request) -> web.Response:
        if (failure := await self._gate("cancel", request)) is not None:
            return failure
        job = self.jobs.get(request.match_info["id"])
        if job is None:
            return self._error(404, "No job found with that id", code="job_not_found")
        state = job.state()
        if state not in ("queued", "processing"):
            return self._error(
                409, f"Job is already {state} and cannot be cancelled", code="job_not_cancellable"
            )
        job.cancelled = True
        self.cancels.append(job.id)
        return json_response(self._record(job, "cancelled"))

    def _record(self, job: FakeJob, status: str) -> dict[str, Any]:
        record: dict[str, Any] = {
            "id": job.id,
            "object": "job",
            "type": "audio.music",
            "model": MODEL,
            "status": self.running_word if status == "processing" else status,
            "created_at": job.created_at,
            "result": None,
            "result_url": None,
            "error": None,
        }
        if status == "processing":
            record.update(self.running_extra)
        elif status == "completed":
            url = self._audio_url(job)
            record["completed_at"] = int(time.time())
            record["cost"] = round(job.duration * 0.0002, 6)
            if job.url_field == "result_url":
                record["result_url"] = url
            else:
                key = job.url_field.split(".", 1)[1]
                record["result"] = {key: url, "duration": job.duration, "format": job.format}
        elif status == "failed":
            record["error"] = self.failure_error
        return record

    def _audio_url(self, job: FakeJob) -> str:
        base = self.base_url
        if self.audio_host:
            base = base.replace("127.0.0.1", self.audio_host)
        # Signed and expiring like the real thing; the fake does not check the signature.
        return f"{base}/files/{job.id}.{job.format}?expires={int(time.time()) + 86400}&sig=x"

    async def _file(self, request: web.Request) -> web.Response:
        self.audio_requests.append(dict(request.headers))
        if (failure := await self._gate("audio", request)) is not None:
            return web.Response(status=failure.status, text="expired")
        job_id, _, ext = request.match_info["name"].rpartition(".")
        if job_id not in self.jobs:
            return web.Response(status=404, text="not found")
        content_type = "audio/mpeg" if ext == "mp3" else "audio/wav"
        return web.Response(body=self.audio_for(job_id), content_type=content_type)
