"""A fake fal.ai queue: a real aiohttp server speaking fal's queue protocol for ACE-Step.

It follows the shared PROVIDERS.md: submit at the full model id (subpath included),
status / result / cancel under the app id only, `Authorization: Key <key>`, 422 with
fal's `detail` list for bad input, 202 while a request waits or runs and 200 once it is
COMPLETED. Each request moves IN_QUEUE -> IN_PROGRESS -> COMPLETED over a configurable
number of status polls. Switches reproduce each documented error shape; `chaos` adds
random faults (429, 5xx, stalls past the client's timeout, slow answers, malformed JSON,
expired file URLs) drawn from a seeded generator, so a failing run can be replayed.

The status stream (`GET .../requests/{id}/status/stream`) is served the way fal does for
@fal-ai/client's `streamStatus` (fal-ai/fal-js libs/client/src/queue.ts, streaming.ts):
`text/event-stream`, one `data: <status JSON>` event per change, each carrying the log
lines new since the previous one, closed after COMPLETED. Each event moves the request on
as a status GET would, `stream_interval` seconds apart; `streams = False` answers 404.

Work on a song (issue 14; schemas in docs/edit-modes.md, from fal's model pages
fal.ai/models/fal-ai/ace-step/{audio-to-audio,audio-inpaint,audio-outpaint}/llms.txt): the
three edit endpoints take an `audio_url`, which must be a file this fake's storage holds
(fal's client upload protocol, fal-js libs/client/src/storage.ts: POST
`/storage/upload/initiate` with `file_name` and `content_type` -> `upload_url` and
`file_url`; PUT the bytes to `upload_url`). A URL it cannot fetch, or a file that is not
audio, is a 422 on `audio_url`. The result is as long as the mode makes it (the source;
the source plus before and after for outpaint) and is billed per second of it. The edit
endpoints list no `duration`; the fake refuses one (stricter than fal says it is, so an
adapter that sends one is caught). `upload_host` puts upload URLs on another origin, as
fal's signed storage URLs are, to check that the key is not sent there.

Usage:
    fake = FakeFal(queue_polls=2, progress_polls=1)
    async with fake.running() as url:   # FalProvider(fake.key, url, ...)
        ...
    assert fake.submit_count == 1
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fakes.audio import audio_seconds, make_wav
from tests.fakes.http import json_response, serve

APP_ID = "fal-ai/ace-step"
# Submit paths this fake knows -> which input schema they take.
ENDPOINTS = {
    "fal-ai/ace-step": "song",
    "fal-ai/ace-step/prompt-to-audio": "prompt",
    "fal-ai/ace-step/audio-to-audio": "remix",
    "fal-ai/ace-step/audio-inpaint": "inpaint",
    "fal-ai/ace-step/audio-outpaint": "outpaint",
}
# The edit endpoints' own fields and their documented ranges / choices.
EDIT_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "remix": {},
    "inpaint": {"start_time": (0, 240), "end_time": (0, 240), "variance": (0, 1)},
    "outpaint": {"extend_before_duration": (0, 240), "extend_after_duration": (0, 240)},
}
EDIT_CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "remix": {"edit_mode": ("lyrics", "remix")},
    "inpaint": {
        "start_time_relative_to": ("start", "end"),
        "end_time_relative_to": ("start", "end"),
    },
    "outpaint": {},
}
EDIT_REQUIRED = {"remix": ("tags", "original_tags"), "inpaint": ("tags",), "outpaint": ("tags",)}

# fal's documented ranges for the shared knobs (PROVIDERS.md).
RANGES: dict[str, tuple[float, float]] = {
    "number_of_steps": (3, 60),
    "granularity_scale": (-100, 100),
    "guidance_interval": (0, 1),
    "guidance_interval_decay": (0, 1),
    "guidance_scale": (0, 200),
    "minimum_guidance_scale": (0, 200),
    "tag_guidance_scale": (0, 10),
    "lyric_guidance_scale": (0, 10),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "scheduler": ("euler", "heun"),
    "guidance_type": ("cfg", "apg", "cfg_star"),
}

LOCKED_DETAIL = (
    "User is locked. Reason: Exhausted balance. Top up your balance at fal.ai/dashboard/billing."
)
CONTENT_POLICY_MSG = (
    "The content could not be processed because it contained material flagged by a content checker."
)


@dataclass
class Submit:
    """One submit POST as the fake received it (recorded even when it was refused)."""

    path: str  # e.g. "/fal-ai/ace-step/prompt-to-audio"
    body: Any
    authorization: str | None


@dataclass
class Chaos:
    """Random faults, each a probability per call; `rng` is seeded by the test.

    Queue calls (submit, status, result, cancel) may get a 429, a 5xx, a stall longer
    than the client's timeout, a slow answer or a 200 whose body is cut-off JSON; file
    downloads may be slow, a 5xx, or an expired signed URL (403 or 404). A stalled or
    garbled submit still queues the request, as fal would once the POST arrived.
    """

    rng: random.Random
    rate_limit: float = 0.0
    server_error: float = 0.0
    stall: float = 0.0
    malformed: float = 0.0
    slow: float = 0.0
    expired: float = 0.0  # file downloads only
    drip: float = 0.0  # file downloads only: the file comes in small pieces, slowly
    huge: float = 0.0  # file downloads only: it says it is bigger than any song can be
    drip_seconds: float = 1.0  # how long a dripped file takes in all
    stall_seconds: float = 1.0
    slow_seconds: float = 0.05
    # Every kind with a chance is drawn at least once within the first calls of the
    # queue (and of the file downloads), so a test that needs each kind to happen is
    # never at the mercy of the seed; the rest stays random.
    _owed: dict[str, list[str]] = field(default_factory=dict)

    def draw(self, route: str) -> str | None:
        """The fault for one call on `route` (submit/status/result/cancel/file), if any."""
        kinds: tuple[str, ...]
        if route == "file":
            kinds = ("expired", "server_error", "slow", "drip", "huge")
        else:
            kinds = ("rate_limit", "server_error", "stall", "malformed", "slow")
        group = "file" if route == "file" else "queue"
        owed = self._owed.setdefault(group, [k for k in kinds if getattr(self, k) > 0])
        if owed and self.rng.random() < 0.2:
            return owed.pop(0)
        roll = self.rng.random()
        for kind in kinds:
            roll -= getattr(self, kind)
            if roll < 0:
                if kind in owed:
                    owed.remove(kind)
                return kind
        return None


@dataclass
class FakeRequest:
    """A queued request and how far it has got."""

    request_id: str
    endpoint: str
    body: dict[str, Any]
    polls: int = 0
    cancelled: bool = False
    # fal bills a request that ran, unless it failed with a server error ("Failed
    # requests that return 5xx status codes are not billed",
    # docs.fal.ai/model-apis/model-endpoints/reliability); one cancelled while IN_QUEUE
    # never ran.
    unbilled: bool = False
    audio: bytes | None = None
    source_seconds: float | None = None  # an edit's source, as fal read it
    logs: list[dict[str, str]] = field(default_factory=list)
    # The stream moves a request on in time, as fal's queue does: one step per
    # `stream_interval`, however often a client reconnects.
    streamed: dict[str, Any] | None = None
    stream_step_at: float = 0.0


class FakeFal:
    """The fake queue. Change the settings / switches between calls to shape its answers."""

    def __init__(
        self,
        key: str = "fal-test-id:fal-test-secret-0123456789",
        *,
        queue_polls: int = 1,
        progress_polls: int = 1,
        queue_position: int = 2,
        max_duration: int = 240,
    ) -> None:
        self.key = key
        # Status polls answered IN_QUEUE, then IN_PROGRESS, before COMPLETED.
        self.queue_polls = queue_polls
        self.progress_polls = progress_polls
        self.queue_position = queue_position  # first position reported; counts down
        self.max_duration = max_duration  # fal documents 240; lower it to test a 422
        self.inference_time = 3.25  # seconds reported in metrics on completion
        # Error switches.
        self.unauthorized = False  # every queue call: 401 (a revoked key)
        self.exhausted_balance = False  # every queue call: 403 locked account
        self.content_policy = False  # submit: 422 content_policy_violation
        self.rate_limited = 0  # the next N queue calls: 429 with Retry-After
        self.retry_after = 1
        self.server_errors = 0  # the next N queue calls: 500
        self.submit_delay = 0.0  # seconds a submit takes (to make clients time out)
        self.run_error: tuple[str, str] | None = None  # COMPLETED with (error, error_type)
        self.result_error: tuple[int, str] | None = None  # result GET -> (status, detail)
        self.forget = False  # status / result / cancel: 404, as if fal lost the request
        self.chaos: Chaos | None = None  # random faults on every call (see Chaos)
        self.streams = True  # False: the status stream answers 404 (clients must poll)
        self.stream_interval = 0.05  # seconds between the stream's status events
        # Host for audio URLs; e.g. "localhost" puts the file on another origin than
        # 127.0.0.1 (same server), to check that the key is not sent with downloads.
        self.file_host: str | None = None
        # A provider that misbehaves with its result file (issue 12 items 6-8):
        self.audio: bytes | None = None  # serve these bytes as every result (else a WAV)
        self.audio_url: str | None = None  # put this URL in results instead of our own
        self.file_redirect: str | None = None  # answer file GETs with a 302 to here
        self.file_drip: float | None = None  # send the file a byte at a time, this far apart
        # Called with the request id when a dripped (slow) download begins: a test may
        # cancel the job mid-download.
        self.on_drip: Callable[[str], None] | None = None
        # What happened.
        self.submits: list[Submit] = []
        self.requests: dict[str, FakeRequest] = {}
        self.status_paths: list[str] = []  # path of every status GET
        self.stream_paths: list[str] = []  # path of every status stream opened
        self.result_paths: list[str] = []
        self.cancels: list[str] = []  # request ids whose cancel was accepted
        # fal storage: token -> (file name, content type, bytes once PUT).
        self.stored: dict[str, tuple[str, str, bytes | None]] = {}
        self.uploads: list[str] = []  # file names of every completed upload (PUT)
        self.storage_forget = False  # storage answers 404 for every stored file
        self.upload_host: str | None = None  # e.g. "localhost": upload URLs on another origin
        self.upload_headers: list[dict[str, str]] = []  # request headers of every PUT
        self.downloads: list[dict[str, str]] = []  # request headers of each file GET
        self.faults: Counter[str] = Counter()  # "route:kind" -> chaos faults injected
        self.base_url: str | None = None
        self.app = self._build_app()

    @property
    def submit_count(self) -> int:
        return len(self.submits)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        """Serve on 127.0.0.1; yields the queue base URL (use it as FAL_QUEUE_URL)."""
        async with serve(self.app) as url:
            self.base_url = url
            yield url

    # ----- routing ---------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024**2)  # uploads of whole songs
        app.router.add_get("/files/{request_id}/{name}", self._file)
        app.router.add_post("/storage/upload/initiate", self._initiate)
        app.router.add_put("/storage/put/{token}", self._put)
        app.router.add_get("/storage/files/{token}/{name}", self._stored_file)
        app.router.add_post("/{owner}/{alias}", self._submit)
        app.router.add_post("/{owner}/{alias}/{subpath}", self._submit)
        app.router.add_get("/{owner}/{alias}/requests/{request_id}/status", self._status)
        app.router.add_get(
            "/{owner}/{alias}/requests/{request_id}/status/stream", self._status_stream
        )
        app.router.add_get("/{owner}/{alias}/requests/{request_id}", self._result)
        app.router.add_put("/{owner}/{alias}/requests/{request_id}/cancel", self._cancel)
        # Anything else (e.g. a status URL that kept the subpath) is fal's JSON 404.
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    async def _not_found(self, request: web.Request) -> web.Response:
        return json_response({"detail": "Not Found"}, status=404)

    def _gate(self, request: web.Request) -> web.Response | None:
        """Checks every queue call shares: key, account, injected 429 / 500."""
        if request.headers.get("Authorization") != f"Key {self.key}" or self.unauthorized:
            return json_response({"detail": "No user found for Key ID and Secret"}, status=401)
        if self.exhausted_balance:
            return json_response({"detail": LOCKED_DETAIL}, status=403)
        if self.rate_limited > 0:
            self.rate_limited -= 1
            return json_response(
                {"detail": "Too many requests"},
                status=429,
                headers={"Retry-After": str(self.retry_after)},
            )
        if self.server_errors > 0:
            self.server_errors -= 1
            return json_response({"detail": "Internal Server Error"}, status=500)
        return None

    async def _chaos(self, route: str) -> tuple[str | None, web.Response | None]:
        """Draw this call's fault; sleep for a stall or slow answer; the error answer for
        a 429 / 5xx / expired file (None when the call goes on)."""
        fault = self.chaos.draw(route) if self.chaos is not None else None
        if fault is None or self.chaos is None:
            return None, None
        self.faults[f"{route}:{fault}"] += 1
        if fault == "stall":
            await asyncio.sleep(self.chaos.stall_seconds)
        elif fault == "slow":
            await asyncio.sleep(self.chaos.slow_seconds)
        elif fault == "rate_limit":
            return fault, json_response(
                {"detail": "Too many requests"},
                status=429,
                headers={"Retry-After": str(self.retry_after)},
            )
        elif fault == "server_error":
            status = self.chaos.rng.choice((500, 502, 503))
            return fault, json_response({"detail": "Internal Server Error"}, status=status)
        elif fault == "expired":
            # A signed CDN URL past its expiry: storage answers 403 (or 404 once purged).
            if self.chaos.rng.random() < 0.5:
                return fault, web.Response(
                    status=403,
                    content_type="application/xml",
                    text="<Error><Code>AccessDenied</Code>"
                    "<Message>Request has expired</Message></Error>",
                )
            return fault, json_response({"detail": "Not Found"}, status=404)
        return fault, None

    def _lookup(self, request: web.Request) -> FakeRequest | web.Response:
        app_id = f"{request.match_info['owner']}/{request.match_info['alias']}"
        found = self.requests.get(request.match_info["request_id"])
        if self.forget or found is None or app_id != APP_ID:
            return json_response({"detail": "Request not found"}, status=404)
        return found

    # ----- queue API -------------------------------------------------------------------

    async def _submit(self, request: web.Request) -> web.Response:
        try:
            body: Any = await request.json()
        except ValueError:
            body = None
        self.submits.append(Submit(request.path, body, request.headers.get("Authorization")))
        if self.submit_delay:
            await asyncio.sleep(self.submit_delay)
        fault, answer = await self._chaos("submit")
        if answer is not None:
            return answer
        refused = self._gate(request)
        if refused is not None:
            return refused
        endpoint = request.path.strip("/")
        schema = ENDPOINTS.get(endpoint)
        if schema is None:
            return json_response({"detail": f"Application '{endpoint}' not found"}, status=404)
        errors = self._validate(schema, body)
        source_seconds = None
        if not errors and schema in EDIT_REQUIRED:
            errors, source_seconds = self._validate_source(body)
        if errors:
            return json_response({"detail": errors}, status=422)
        if self.content_policy:
            loc = ["body", "prompt" if schema == "prompt" else "lyrics"]
            return json_response(
                {
                    "detail": [
                        {
                            "loc": loc,
                            "msg": CONTENT_POLICY_MSG,
                            "type": "content_policy_violation",
                            "url": "https://docs.fal.ai/errors#content_policy_violation",
                        }
                    ]
                },
                status=422,
            )
        request_id = str(uuid.uuid4())
        self.requests[request_id] = FakeRequest(
            request_id, endpoint, dict(body), source_seconds=source_seconds
        )
        if fault == "malformed":
            return _malformed()
        urls = self._urls(request, request_id)
        return json_response(
            {
                "status": "IN_QUEUE",
                "request_id": request_id,
                "gateway_request_id": request_id,
                "queue_position": self.queue_position,
                **urls,
            },
            headers={"x-fal-request-id": request_id},
        )

    async def _status(self, request: web.Request) -> web.Response:
        self.status_paths.append(request.path)
        fault, answer = await self._chaos("status")
        if answer is not None:
            return answer
        if fault == "malformed":
            return _malformed()
        found = self._gated_lookup(request)
        if isinstance(found, web.Response):
            return found
        body, status = self._status_body(request, found)
        return json_response(body, status=status)

    def _gated_lookup(self, request: web.Request) -> FakeRequest | web.Response:
        """The request a status call is about, after the checks every queue call shares."""
        refused = self._gate(request)
        return refused if refused is not None else self._lookup(request)

    async def _status_stream(self, request: web.Request) -> web.StreamResponse:
        self.stream_paths.append(request.path)
        if not self.streams:
            return json_response({"detail": "Not Found"}, status=404)
        found = self._gated_lookup(request)
        if isinstance(found, web.Response):
            return found
        stream = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await stream.prepare(request)
        try:
            await self._stream_events(request, found, stream)
        except ConnectionResetError:  # the client had what it wanted and hung up
            pass
        return stream

    async def _stream_events(
        self, request: web.Request, found: FakeRequest, stream: web.StreamResponse
    ) -> None:
        sent, previous = 0, None
        while True:
            now = time.monotonic()
            if found.streamed is None or now - found.stream_step_at >= self.stream_interval:
                found.streamed, _ = self._status_body(request, found)
                found.stream_step_at = now
            body = found.streamed
            if body != previous:  # an event only when something changed
                previous = body
                logs = body.get("logs")
                if isinstance(logs, list):  # only what is new since the last event
                    body = {**body, "logs": logs[sent:]}
                    sent = len(logs)
                await stream.write(f"data: {json.dumps(body)}\n\n".encode())
            if body["status"] == "COMPLETED":
                break
            await asyncio.sleep(self.stream_interval)
        await stream.write_eof()

    def _status_body(self, request: web.Request, req: FakeRequest) -> tuple[dict[str, Any], int]:
        """The status JSON and HTTP status for the next look at a request (GET or stream)."""
        poll = req.polls
        req.polls += 1
        base: dict[str, Any] = {"request_id": req.request_id, **self._urls(request, req.request_id)}
        if req.cancelled:
            return (
                {
                    **base,
                    "status": "COMPLETED",
                    "logs": req.logs,
                    "metrics": {},
                    "error": "Request was cancelled by the client",
                    "error_type": "client_cancelled",
                },
                200,
            )
        if poll < self.queue_polls:
            position = max(0, self.queue_position - poll)
            return {**base, "status": "IN_QUEUE", "queue_position": position, "logs": None}, 202
        step = poll - self.queue_polls
        if step < self.progress_polls:
            if not req.logs:
                req.logs.append(_log("Loading ACE-Step model"))
            pct = round(100 * (step + 1) / (self.progress_polls + 1))
            req.logs.append(_log(f"Generating: {pct}%| {step + 1}/{self.progress_polls + 1}"))
            return {**base, "status": "IN_PROGRESS", "logs": list(req.logs)}, 202
        done: dict[str, Any] = {
            **base,
            "status": "COMPLETED",
            "logs": req.logs,
            "metrics": {"inference_time": self.inference_time},
        }
        if self.run_error is not None:
            done["error"], done["error_type"] = self.run_error
        return done, 200

    async def _result(self, request: web.Request) -> web.Response:
        self.result_paths.append(request.path)
        fault, answer = await self._chaos("result")
        if answer is not None:
            return answer
        if fault == "malformed":
            return _malformed()
        refused = self._gate(request)
        if refused is not None:
            return refused
        found = self._lookup(request)
        if isinstance(found, web.Response):
            return found
        req = found
        if req.cancelled:
            return json_response(
                {"detail": "Request was cancelled by the client", "error_type": "client_cancelled"},
                status=499,
            )
        if not self._completed(req):
            return json_response({"detail": "Request is still in progress"}, status=400)
        if self.result_error is not None:
            status, detail = self.result_error
            req.unbilled = req.unbilled or status >= 500
            return json_response({"detail": detail}, status=status)
        if self.run_error is not None:
            message, error_type = self.run_error
            req.unbilled = True
            return json_response({"detail": message, "error_type": error_type}, status=500)
        return json_response(
            self._output(request, req), headers={"x-fal-request-id": req.request_id}
        )

    async def _cancel(self, request: web.Request) -> web.Response:
        fault, answer = await self._chaos("cancel")
        if answer is not None:
            return answer
        if fault == "malformed":
            return _malformed()
        refused = self._gate(request)
        if refused is not None:
            return refused
        found = self._lookup(request)
        if isinstance(found, web.Response):
            return found
        if self._completed(found) or found.cancelled:
            return json_response({"status": "ALREADY_COMPLETED"}, status=400)
        found.cancelled = True
        self.cancels.append(found.request_id)
        # fal.ai/docs/inference-api/queue/cancel: a request still in the queue is removed
        # ("OK"); one a runner is working on is sent a cancellation signal.
        if found.polls < self.queue_polls:
            found.unbilled = True  # it never ran
            return json_response({"status": "OK"}, status=200)
        return json_response({"status": "CANCELLATION_REQUESTED"}, status=202)

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self.downloads.append(dict(request.headers))
        fault, answer = await self._chaos("file")
        if answer is not None:
            return answer
        if fault == "huge":  # the CDN claims a file far bigger than a song
            huge = web.StreamResponse(headers={"Content-Type": "audio/wav"})
            huge.content_length = 10 * 1024**3
            await huge.prepare(request)
            await huge.write(b"RIFF" + b"\0" * 65536)
            return huge
        if self.file_redirect is not None:
            raise web.HTTPFound(self.file_redirect)
        req = self.requests.get(request.match_info["request_id"])
        if req is None or req.audio is None:
            return json_response({"detail": "Not Found"}, status=404)
        if fault == "drip" and self.chaos is not None:
            if self.on_drip is not None:
                self.on_drip(req.request_id)
            return await _drip(request, req.audio, pieces=20, seconds=self.chaos.drip_seconds)
        if self.file_drip is None:
            return web.Response(body=req.audio, content_type="audio/wav")
        drip = web.StreamResponse(headers={"Content-Type": "audio/wav"})
        drip.content_length = len(req.audio)
        await drip.prepare(request)
        for i in range(len(req.audio)):
            await drip.write(req.audio[i : i + 1])
            await asyncio.sleep(self.file_drip)
        return drip

    # ----- storage (fal's client upload protocol) ---------------------------------------

    async def _initiate(self, request: web.Request) -> web.Response:
        refused = self._gate(request)
        if refused is not None:
            return refused
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("file_name"), str):
            return json_response(
                {"detail": [_err(["body", "file_name"], "field required", "value_error.missing")]},
                status=422,
            )
        token = uuid.uuid4().hex
        kind = str(body.get("content_type") or "application/octet-stream")
        self.stored[token] = (body["file_name"], kind, None)
        base = f"{request.scheme}://{request.host}/storage"
        put_base = base
        if self.upload_host is not None:  # a signed URL on another origin, as fal's CDN
            put_base = f"{request.scheme}://{self.upload_host}:{request.host.rsplit(':', 1)[-1]}"
            put_base += "/storage"
        return json_response(
            {
                "upload_url": f"{put_base}/put/{token}?signature=fake",
                "file_url": f"{base}/files/{token}/{body['file_name']}",
            }
        )

    async def _put(self, request: web.Request) -> web.Response:
        found = self.stored.get(request.match_info["token"])
        if found is None:
            return web.Response(status=403, text="<Error><Code>AccessDenied</Code></Error>")
        self.upload_headers.append(dict(request.headers))
        data = await request.read()
        self.stored[request.match_info["token"]] = (found[0], found[1], data)
        self.uploads.append(found[0])
        return web.Response(status=200)

    async def _stored_file(self, request: web.Request) -> web.Response:
        data = self._stored_bytes(str(request.url))
        if data is None:
            return json_response({"detail": "Not Found"}, status=404)
        return web.Response(body=data, content_type="application/octet-stream")

    def _stored_bytes(self, url: str) -> bytes | None:
        """The bytes behind a file URL of this fake's storage (None: fal cannot fetch it)."""
        marker = "/storage/files/"
        if self.storage_forget or marker not in url:
            return None
        token = url.split(marker, 1)[1].split("/", 1)[0]
        found = self.stored.get(token)
        return found[2] if found else None

    def _validate_source(self, body: dict[str, Any]) -> tuple[list[dict[str, Any]], float | None]:
        """fal fetches `audio_url` and reads it before queueing: 422 when it cannot."""
        data = self._stored_bytes(str(body["audio_url"]))
        if data is None:
            return [
                _err(
                    ["body", "audio_url"],
                    "Failed to download the file. Please check if the URL is accessible.",
                    "file_download_error",
                )
            ], None
        seconds = audio_seconds(data)
        if seconds is None:
            return [
                _err(["body", "audio_url"], "Unsupported or corrupt audio file", "invalid_file")
            ], None
        return [], seconds

    def result_seconds(self, req: FakeRequest) -> float:
        """How long the request's song is: what fal bills ("per second of generated
        audio") and what the returned file lasts."""
        body = req.body
        schema = ENDPOINTS[req.endpoint]
        if schema in ("remix", "inpaint"):
            return float(req.source_seconds or 0)
        if schema == "outpaint":
            return (
                float(req.source_seconds or 0)
                + float(body.get("extend_before_duration", 0))
                + float(body.get("extend_after_duration", 30))
            )
        return float(body.get("duration", 60))

    # ----- helpers ---------------------------------------------------------------------

    def billed(self) -> list[FakeRequest]:
        """The requests fal would bill: every one accepted that ran and did not fail with
        a server error (fal bills per second of the requested duration)."""
        return [r for r in self.requests.values() if not r.unbilled]

    def billed_usd(self, price_per_second: float = 0.0002) -> float:
        return sum(self.result_seconds(r) * price_per_second for r in self.billed())

    def _completed(self, req: FakeRequest) -> bool:
        return req.polls > self.queue_polls + self.progress_polls

    def _urls(self, request: web.Request, request_id: str) -> dict[str, str]:
        # fal's returned URLs drop the endpoint subpath: owner/alias only.
        base = f"{request.scheme}://{request.host}/{APP_ID}/requests/{request_id}"
        return {
            "response_url": base,
            "status_url": f"{base}/status",
            "cancel_url": f"{base}/cancel",
        }

    def _output(self, request: web.Request, req: FakeRequest) -> dict[str, Any]:
        body = req.body
        if req.audio is None:
            req.audio = self.audio or make_wav(self.result_seconds(req))
        host = request.host
        if self.file_host is not None:
            host = f"{self.file_host}:{host.rsplit(':', 1)[-1]}"
        url = self.audio_url or f"{request.scheme}://{host}/files/{req.request_id}/audio.wav"
        seed = body.get("seed")
        if ENDPOINTS[req.endpoint] == "prompt":
            # fal writes tags and lyrics from the prompt.
            words = [w.strip(".,!?").lower() for w in str(body["prompt"]).split()]
            tags = ", ".join(itertools.islice((w for w in words if len(w) > 3), 4))
            lyrics = "[inst]" if body.get("instrumental") else f"[verse]\n{body['prompt']}"
        else:
            tags, lyrics = body["tags"], body.get("lyrics", "")
        return {
            "audio": {
                "url": url,
                "content_type": "audio/wav",
                "file_name": "audio.wav",
                "file_size": len(req.audio),
            },
            "seed": seed if isinstance(seed, int) else random.randint(0, 2**31 - 1),
            "tags": tags,
            "lyrics": lyrics,
        }

    def _validate(self, schema: str, body: Any) -> list[dict[str, Any]]:
        """fal-style (pydantic) validation errors for an input body; [] when valid."""
        if not isinstance(body, dict):
            return [_err(["body"], "value is not a valid dict", "type_error.dict")]
        errors: list[dict[str, Any]] = []
        required: tuple[str, ...] = ("prompt",) if schema == "prompt" else ("tags",)
        if schema in EDIT_REQUIRED:
            required = ("audio_url", *EDIT_REQUIRED[schema])
        for name in required:
            if not isinstance(body.get(name), str) or not body[name].strip():
                errors.append(_err(["body", name], "field required", "value_error.missing"))
        ranges = {"duration": (5.0, float(self.max_duration)), **RANGES}
        if schema in EDIT_RANGES:  # the edit endpoints take no duration
            ranges = {**RANGES, **EDIT_RANGES[schema]}
            if "duration" in body:
                errors.append(
                    _err(["body", "duration"], "extra fields not permitted", "value_error.extra")
                )
        for name, (low, high) in ranges.items():
            if name not in body:
                continue
            value = body[name]
            if isinstance(value, bool) or not isinstance(value, int | float):
                errors.append(
                    _err(["body", name], "value is not a valid float", "type_error.float")
                )
            elif value > high:
                errors.append(
                    _err(
                        ["body", name],
                        f"ensure this value is less than or equal to {_num(high)}",
                        "value_error.number.not_le",
                        limit_value=high,
                    )
                )
            elif value < low:
                errors.append(
                    _err(
                        ["body", name],
                        f"ensure this value is greater than or equal to {_num(low)}",
                        "value_error.number.not_ge",
                        limit_value=low,
                    )
                )
        for name, choices in {**CHOICES, **EDIT_CHOICES.get(schema, {})}.items():
            if name in body and body[name] not in choices:
                permitted = ", ".join(repr(c) for c in choices)
                errors.append(
                    _err(
                        ["body", name],
                        f"unexpected value; permitted: {permitted}",
                        "value_error.const",
                        permitted=list(choices),
                    )
                )
        return errors


def _err(loc: list[str], msg: str, type_: str, **ctx: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"loc": loc, "msg": msg, "type": type_}
    if ctx:
        item["ctx"] = ctx
    return item


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _malformed() -> web.Response:
    """A 200 whose JSON is cut off mid-object (a proxy or the service garbled it)."""
    return web.Response(
        body=b'{"status": "IN_PROGRESS", "request_id": "',
        status=200,
        content_type="application/json",
    )


def _log(message: str) -> dict[str, str]:
    return {
        "message": message,
        "level": "INFO",
        "source": "user",
        "timestamp": "2026-01-01T00:00:00.000000",
    }


async def _drip(
    request: web.Request, data: bytes, *, pieces: int, seconds: float
) -> web.StreamResponse:
    """Send `data` in `pieces` parts spread over `seconds` (a slow CDN)."""
    drip = web.StreamResponse(headers={"Content-Type": "audio/wav"})
    drip.content_length = len(data)
    await drip.prepare(request)
    size = -(-len(data) // pieces)
    for start in range(0, len(data), size):
        await drip.write(data[start : start + size])
        await asyncio.sleep(seconds / pieces)
    return drip
