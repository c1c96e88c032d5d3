"""A fake Replicate predictions API (the subset the bot uses), served on 127.0.0.1.

Speaks the documented protocol: `POST /v1/predictions {version, input}` -> 201
prediction, `GET /v1/predictions/{id}`, `POST /v1/predictions/{id}/cancel`, RFC 7807
problem-details errors, `Retry-After` on 429. A prediction is `starting` for
`polls_starting` polls, `processing` (with tqdm-style logs) for `polls_processing` polls,
then `succeeded` with one URL to a real WAV of the requested duration served from here.

Drive it through plain attributes:
    fake.submit_errors.append("throttled")   # the next submit answers 429 + Retry-After
    fake.poll_errors.append("server")        # the next poll answers 500
    fake.fail_with = "CUDA out of memory"    # predictions end `failed` with this error
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.audio import make_wav
from tests.fakes.http import json_response, serve

PINNED_VERSION = "280fc4f9ee507577f880a167f639c02622421d8fecf492454320311217b688f1"

# Error answers exactly as Replicate shapes them: (status, problem body, extra headers).
PROBLEMS: dict[str, tuple[int, dict[str, Any] | None, dict[str, str]]] = {
    "unauthenticated": (
        401,
        {
            "type": "https://replicate.com/docs/errors/unauthenticated",
            "title": "Unauthenticated",
            "detail": "You did not pass a valid authentication token",
            "status": 401,
        },
        {},
    ),
    "billing": (
        402,
        {
            "type": "https://replicate.com/docs/errors/insufficient-credit",
            "title": "Insufficient credit",
            "detail": "You have insufficient credit to run this model. Go to "
            "your account's billing page to purchase credit.",
            "status": 402,
        },
        {},
    ),
    "forbidden": (
        403,
        {
            "title": "Forbidden",
            "detail": "You do not have permission to run this model.",
            "status": 403,
        },
        {},
    ),
    "not_found": (
        404,
        {
            "title": "Not found",
            "detail": "The requested resource could not be found.",
            "status": 404,
        },
        {},
    ),
    "invalid": (
        422,
        {
            "type": "https://replicate.com/docs/errors/input-validation",
            "title": "Input validation failed",
            "detail": "- input.tags: String length must be greater than or equal to 1",
            "status": 422,
            "invalid_fields": [
                {
                    "type": "too_short",
                    "field": "input.tags",
                    "description": "String length must be greater than or equal to 1",
                }
            ],
        },
        {},
    ),
    "throttled": (
        429,
        {
            "title": "Request was throttled.",
            "detail": "Request was throttled. Expected available in 7 seconds.",
            "status": 429,
        },
        {"Retry-After": "7"},
    ),
    "server": (500, None, {}),  # a bare "Internal Server Error" text page
    "unavailable": (
        503,
        {
            "title": "Service Unavailable",
            "detail": "The service is temporarily unavailable.",
            "status": 503,
        },
        {"Retry-After": "2"},
    ),
}


@dataclass
class FakePrediction:
    id: str
    version: str
    input: dict[str, Any]
    polls: int = 0
    status: str = "starting"
    error: str | None = None
    logs: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class FakeReplicate:
    """In-memory Replicate with recorded submits and switches for every error shape."""

    def __init__(
        self,
        token: str = "r8_fake_token_123",
        *,
        polls_starting: int = 1,
        polls_processing: int = 2,
        version: str = PINNED_VERSION,
        file_extension: str = "wav",
    ) -> None:
        self.token = token
        self.polls_starting = polls_starting
        self.polls_processing = polls_processing
        self.version = version
        self.file_extension = file_extension
        self.submits: list[dict[str, Any]] = []  # the JSON bodies of accepted and refused submits
        self.predictions: dict[str, FakePrediction] = {}
        self.submit_errors: list[str] = []  # names from PROBLEMS, used first-in first-out
        self.poll_errors: list[str] = []
        self.fail_with: str | None = None
        self.polls = 0
        self.cancels: list[str] = []
        self.file_requests: list[dict[str, str | None]] = []  # Authorization seen by file GETs
        self.base_url = ""
        self._ids = (f"pred{n:04d}xyz" for n in itertools.count(1))
        self.app = web.Application()
        self.app.router.add_post("/v1/predictions", self._create)
        self.app.router.add_get("/v1/predictions/{id}", self._get)
        self.app.router.add_post("/v1/predictions/{id}/cancel", self._cancel)
        self.app.router.add_get("/files/{name}", self._file)

    @property
    def submit_count(self) -> int:
        return len(self.submits)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        """Serve the fake; yields its base URL."""
        async with serve(self.app) as url:
            self.base_url = url
            yield url

    # -- protocol -----------------------------------------------------------------------

    def _problem(self, name: str) -> web.Response:
        status, body, headers = PROBLEMS[name]
        if body is None:
            return web.Response(status=status, text="Internal Server Error", headers=headers)
        return web.Response(
            body=json.dumps(body).encode(),
            status=status,
            headers=headers,
            content_type="application/problem+json",
        )

    def _authorised(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.token}"

    async def _create(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return self._problem("unauthenticated")
        body = await request.json()
        self.submits.append(body)
        if self.submit_errors:
            name = self.submit_errors.pop(0)
            if name == "echoes_authorization":
                # A validation answer that quotes the request back, headers included
                # (what was seen from a misbehaving proxy in front of the API).
                return _problem_body(
                    422,
                    "Input validation failed",
                    f"bad request; headers were Authorization: {request.headers['Authorization']}",
                )
            return self._problem(name)
        if body.get("version") != self.version:
            return _problem_body(
                422,
                "Invalid version or not permitted",
                "The specified version does not exist (or perhaps you "
                "don't have permission to use it?)",
            )
        given = body.get("input") or {}
        if not isinstance(given.get("tags"), str) or not given["tags"]:
            return self._problem("invalid")
        duration = given.get("duration", 60)
        if not 1 <= duration <= 240:
            return _problem_body(
                422,
                "Input validation failed",
                "- input.duration: Must be less than or equal to 240",
            )
        pred = FakePrediction(id=next(self._ids), version=self.version, input=given)
        self.predictions[pred.id] = pred
        return json_response(self._view(pred), status=201)

    async def _get(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return self._problem("unauthenticated")
        self.polls += 1
        if self.poll_errors:
            return self._problem(self.poll_errors.pop(0))
        pred = self.predictions.get(request.match_info["id"])
        if pred is None:
            return self._problem("not_found")
        self._advance(pred)
        return json_response(self._view(pred))

    async def _cancel(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return self._problem("unauthenticated")
        pred = self.predictions.get(request.match_info["id"])
        if pred is None:
            return self._problem("not_found")
        self.cancels.append(pred.id)
        if pred.status not in ("succeeded", "failed", "canceled"):
            pred.status = "canceled"
        return json_response(self._view(pred))

    async def _file(self, request: web.Request) -> web.Response:
        self.file_requests.append({"authorization": request.headers.get("Authorization")})
        pred_id = request.match_info["name"].rsplit(".", 1)[0]
        pred = self.predictions.get(pred_id)
        if pred is None or pred.status != "succeeded":
            return web.Response(status=404, text="Not Found")
        return web.Response(
            body=make_wav(float(pred.input.get("duration", 60))), content_type="audio/wav"
        )

    def _advance(self, pred: FakePrediction) -> None:
        if pred.status in ("succeeded", "failed", "canceled"):
            return
        pred.polls += 1
        if pred.polls <= self.polls_starting:
            pred.status = "starting"
            return
        done = pred.polls - self.polls_starting
        if done <= self.polls_processing:
            pred.status = "processing"
            steps = int(pred.input.get("number_of_steps", 60))
            step = steps * done // (self.polls_processing + 1)
            pct = 100 * step // steps
            pred.logs += f"{pct:3d}%|{'#' * (pct // 10):<10}| {step}/{steps}\n"
            return
        if self.fail_with is not None:
            pred.status, pred.error = "failed", self.fail_with
            return
        pred.status = "succeeded"
        pred.logs += f"100%|##########| done\nsaved output ({pred.input.get('seed')})\n"

    def _view(self, pred: FakePrediction) -> dict[str, Any]:
        base = f"{self.base_url}/v1/predictions/{pred.id}"
        output = (
            f"{self.base_url}/files/{pred.id}.{self.file_extension}"
            if pred.status == "succeeded"
            else None
        )
        view: dict[str, Any] = {
            "id": pred.id,
            "model": "lucataco/ace-step",
            "version": pred.version,
            "input": pred.input,
            "logs": pred.logs,
            "output": output,
            "data_removed": False,
            "error": pred.error,
            "status": pred.status,
            "created_at": "2026-11-21T12:00:00.000Z",
            "urls": {
                "get": base,
                "cancel": f"{base}/cancel",
                "web": f"https://replicate.com/p/{pred.id}",
            },
        }
        if pred.status == "succeeded":
            view["metrics"] = {"predict_time": 12.5, "total_time": 13.1}
        return view


def _problem_body(status: int, title: str, detail: str) -> web.Response:
    body = {"title": title, "detail": detail, "status": status}
    return web.Response(
        body=json.dumps(body).encode(), status=status, content_type="application/problem+json"
    )
