"""A fake ACE-Step 1.5 REST server (`acestep-api`), shaped after upstream api_server.py.

Endpoints: `POST /release_task`, `POST /query_result`, `GET /v1/audio?path=...`,
`GET /v1/stats`, `GET /health`; every success wrapped in `{data, code, error, timestamp,
extra}`, refusals as FastAPI's `{"detail": ...}`. Like the real server it keeps its job
store in memory and, when `disk_cache` is on, a progress/result entry per started task on
"disk" that survives a restart. After `restart()` an unknown task id answers status 0 with
result "[]", exactly like upstream.

A task is queued for `polls_queued` queries of it, running for `polls_running` more, then
succeeded (or failed when `fail_with` is set). The audio is a real WAV of the requested
duration (the fake has no MP3 encoder; the bot detects the format from the bytes).

Drive it through plain attributes and methods:
    fake.release_errors.append("queue_full")  # the next /release_task answers 429
    fake.add_load(queued=3, running=1)        # another client's jobs, counted in stats
    await fake.stop(); await fake.start()     # down (connection refused), then back
    await fake.restart()                      # the process restarts: the queue is lost
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from aiohttp import web

from tests.fakes.audio import make_wav
from tests.fakes.http import json_response

AUDIO_DIR = "/srv/acestep/.cache/acestep/tmp/api_audio"

# Refusals exactly as the server (FastAPI HTTPException, or a bare 500) shapes them.
ERRORS: dict[str, tuple[int, dict[str, Any] | None]] = {
    "queue_full": (429, {"detail": "Server busy: queue is full"}),
    "bad_request": (400, {"detail": "JSON payload must be an object"}),
    "unsupported": (
        415,
        {
            "detail": "Unsupported Content-Type: text/plain; use "
            "application/json, application/x-www-form-urlencoded, "
            "or multipart/form-data"
        },
    ),
    "server_error": (500, None),  # "Internal Server Error" text
    "envelope_error": (200, None),  # HTTP 200 with code 500 and `error` in the envelope
}


@dataclass
class FakeTask:
    task_id: str
    body: dict[str, Any]
    created_at: float
    status: str = "queued"  # queued | running | succeeded | failed
    polls: int = 0
    progress: float = 0.0
    error: str | None = None
    foreign: bool = False  # another client's job: moves only through finish_load()
    extra: dict[str, Any] = field(default_factory=dict)


class FakeAceStep:
    """One fake GPU server; start/stop/restart keep its port so handles stay valid."""

    def __init__(
        self,
        api_key: str | None = None,
        *,
        polls_queued: int = 1,
        polls_running: int = 2,
        queue_maxsize: int = 200,
        disk_cache: bool = True,
        report_uptime: bool = False,
        seed_override: int | None = None,
        has_stats: bool = True,
    ) -> None:
        self.api_key = api_key
        self.polls_queued = polls_queued
        self.polls_running = polls_running
        self.queue_maxsize = queue_maxsize
        self.disk_cache = disk_cache
        self.report_uptime = report_uptime
        self.seed_override = seed_override  # report this seed, as builds that ignored it
        self.has_stats = has_stats  # False: an older build without /v1/stats (404)
        self.task_timeout = 3600.0  # upstream TASK_TIMEOUT_SECONDS for stale cache entries
        self.fail_with: str | None = None
        self.release_errors: list[str] = []
        self.query_errors: list[str] = []
        self.submits: list[dict[str, Any]] = []  # bodies of accepted tasks
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)
        self.jobs: dict[str, FakeTask] = {}  # the in-memory store (lost on restart)
        self.cache: dict[str, list[dict[str, Any]]] = {}  # the on-disk cache (kept)
        self.files: dict[str, float] = {}  # audio path -> duration
        self.started_at = time.time()
        self.restarts = 0
        self.port = 0
        self.last_log = ""
        self._ids = (f"{n:08d}-0000-4000-8000-{n:012d}" for n in itertools.count(1))
        self._runner: web.AppRunner | None = None
        self.app = web.Application()
        self.app.router.add_post("/release_task", self._release)
        self.app.router.add_post("/query_result", self._query)
        self.app.router.add_get("/v1/audio", self._audio)
        self.app.router.add_get("/v1/stats", self._stats)
        self.app.router.add_get("/health", self._health)

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def submit_count(self) -> int:
        return len(self.submits)

    @property
    def is_up(self) -> bool:
        return self._runner is not None

    async def start(self) -> str:
        """Listen (on the same port as before, after the first start); returns the URL."""
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        await site.start()
        if not self.port:
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self._runner = runner
        return self.base_url

    async def stop(self) -> None:
        """Stop listening: connections are refused until `start()`."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def restart(self) -> None:
        """The process restarts: the in-memory store and counters are gone; the disk
        cache (when on) keeps the last entry of every task that had started."""
        await self.stop()
        self.jobs.clear()
        self.started_at = time.time() + 60 * (self.restarts + 1)  # a distinct start
        self.restarts += 1
        await self.start()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        """Serve the fake; yields its base URL."""
        url = await self.start()
        try:
            yield url
        finally:
            await self.stop()

    # -- helpers for tests --------------------------------------------------------------

    def add_load(self, queued: int = 0, running: int = 0) -> list[str]:
        """Another client's jobs: they count in /v1/stats and stay until finish_load()."""
        ids = []
        for status in ["running"] * running + ["queued"] * queued:
            task = FakeTask(next(self._ids), {}, time.time(), status=status, foreign=True)
            self.jobs[task.task_id] = task
            ids.append(task.task_id)
        return ids

    def finish_load(self, count: int | None = None) -> None:
        """Finish `count` (default all) of the other client's jobs, oldest first."""
        foreign = [t for t in self.jobs.values() if t.foreign and t.status in ("queued", "running")]
        for task in foreign[:count]:
            task.status = "succeeded"

    def stats(self) -> dict[str, Any]:
        counts = {"total": len(self.jobs), "queued": 0, "running": 0, "succeeded": 0, "failed": 0}
        for task in self.jobs.values():
            counts[task.status] += 1
        data: dict[str, Any] = {
            "jobs": counts,
            "queue_size": counts["queued"],
            "queue_maxsize": self.queue_maxsize,
            "avg_job_seconds": 8.5,
        }
        if self.report_uptime:
            data["uptime_seconds"] = time.time() - self.started_at
        return data

    # -- protocol -----------------------------------------------------------------------

    def _envelope(self, data: Any, code: int = 200, error: str | None = None) -> web.Response:
        return json_response(
            {
                "data": data,
                "code": code,
                "error": error,
                "timestamp": int(time.time() * 1000),
                "extra": None,
            }
        )

    def _refusal(self, name: str) -> web.Response:
        status, body = ERRORS[name]
        if name == "envelope_error":
            return self._envelope(None, code=500, error="Model not initialized")
        if body is None:
            return web.Response(status=status, text="Internal Server Error")
        return json_response(body, status=status)

    def _auth_error(self, request: web.Request) -> web.Response | None:
        self.requests.append((request.method, request.path, request.headers.get("Authorization")))
        if self.api_key is None:
            return None
        header = request.headers.get("Authorization")
        if not header:
            return json_response({"detail": "Missing ai_token or Authorization header"}, status=401)
        token = header[7:] if header.startswith("Bearer ") else header
        if token != self.api_key:
            return json_response({"detail": "Invalid API key"}, status=401)
        return None

    async def _health(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path, request.headers.get("Authorization")))
        return self._envelope({"status": "ok", "service": "ACE-Step API", "version": "1.0"})

    async def _stats(self, request: web.Request) -> web.Response:
        if not self.has_stats:
            return json_response({"detail": "Not Found"}, status=404)
        return self._auth_error(request) or self._envelope(self.stats())

    async def _release(self, request: web.Request) -> web.Response:
        denied = self._auth_error(request)
        if denied:
            return denied
        body = await request.json()
        if self.release_errors:
            return self._refusal(self.release_errors.pop(0))
        if not isinstance(body, dict):
            return self._refusal("bad_request")
        queued = sum(1 for t in self.jobs.values() if t.status == "queued")
        if queued >= self.queue_maxsize:
            return self._refusal("queue_full")
        task = FakeTask(next(self._ids), body, time.time())
        self.jobs[task.task_id] = task
        self.submits.append(body)
        return self._envelope(
            {"task_id": task.task_id, "status": "queued", "queue_position": queued + 1}
        )

    async def _query(self, request: web.Request) -> web.Response:
        denied = self._auth_error(request)
        if denied:
            return denied
        if self.query_errors:
            return self._refusal(self.query_errors.pop(0))
        body = await request.json()
        ids = body.get("task_id_list", "[]")
        if isinstance(ids, str):
            ids = json.loads(ids)
        return self._envelope([self._entry(str(task_id)) for task_id in ids])

    def _entry(self, task_id: str) -> dict[str, Any]:
        task = self.jobs.get(task_id)
        if task is not None and not task.foreign:
            self._advance(task)
        cached = self.cache.get(task_id) if self.disk_cache else None
        if cached:  # upstream reads its disk cache first
            status = cached[0]["status"]
            if status == 0 and time.time() - cached[0]["create_time"] > self.task_timeout:
                status = 2
            return {
                "task_id": task_id,
                "result": json.dumps(cached),
                "status": status,
                "progress_text": self.last_log,
            }
        if task is None:
            return {"task_id": task_id, "result": "[]", "status": 0}
        code = {"queued": 0, "running": 0, "succeeded": 1, "failed": 2}[task.status]
        item = self._item(task, code)
        if task.status != "succeeded":  # the store path has no seed or models
            item = {
                k: item[k]
                for k in (
                    "file",
                    "wave",
                    "status",
                    "create_time",
                    "env",
                    "prompt",
                    "lyrics",
                    "metas",
                )
            }
            item.update(
                {
                    "file": "",
                    "prompt": "",
                    "lyrics": "",
                    "metas": {},
                    "progress": task.progress,
                    "stage": task.status,
                    "error": task.error,
                }
            )
        else:
            item.pop("seed_value")
        return {
            "task_id": task_id,
            "result": json.dumps([item]),
            "status": code,
            "progress_text": self.last_log if code == 0 else "",
        }

    def _advance(self, task: FakeTask) -> None:
        if task.status in ("succeeded", "failed"):
            return
        task.polls += 1
        if task.polls <= self.polls_queued:
            return
        step = task.polls - self.polls_queued
        if step <= self.polls_running:
            task.status = "running"
            task.progress = round(step / (self.polls_running + 1), 2)
            self.last_log = f"DiT diffusion: {int(task.progress * 100)}%"
            self._write_cache(task, 0, stage="running")
            return
        if self.fail_with is not None:
            task.status = "failed"
            task.error = (
                'Traceback (most recent call last):\n  File "api_server.py", '
                f"line 1771, in _run_one_job\nRuntimeError: {self.fail_with}\n"
            )
            self._write_cache(task, 2, stage="failed")
            return
        task.status, task.progress = "succeeded", 1.0
        path = f"{AUDIO_DIR}/{task.task_id}.wav"
        self.files[path] = self._duration(task)
        self._write_cache(task, 1, stage="succeeded")

    def _duration(self, task: FakeTask) -> float:
        return float(task.body.get("audio_duration") or 30)

    def _item(self, task: FakeTask, code: int) -> dict[str, Any]:
        body = task.body
        query = body.get("sample_query")
        caption = f"{query}; warm analog synths, 92 bpm" if query else body.get("prompt", "")
        lyrics = "[verse]\nwritten by the language model" if query else body.get("lyrics", "")
        seed = self.seed_override if self.seed_override is not None else body.get("seed")
        path = f"{AUDIO_DIR}/{task.task_id}.wav"
        return {
            "file": f"/v1/audio?path={quote(path, safe='')}" if code == 1 else "",
            "wave": "",
            "status": code,
            "create_time": int(task.created_at),
            "env": "development",
            "prompt": caption,
            "lyrics": lyrics,
            "metas": {
                "bpm": 92,
                "duration": self._duration(task),
                "genres": "",
                "keyscale": "A minor",
                "timesignature": "4",
                "prompt": body.get("prompt", ""),
                "lyrics": body.get("lyrics", ""),
            },
            "generation_info": "**Steps:** 8",
            "seed_value": str(seed),
            "lm_model": "acestep-5Hz-lm-0.6B",
            "dit_model": "acestep-v15-turbo",
            "progress": task.progress,
            "stage": task.status,
        }

    def _write_cache(self, task: FakeTask, code: int, stage: str) -> None:
        if code == 1:
            self.cache[task.task_id] = [self._item(task, 1)]
            return
        self.cache[task.task_id] = [
            {
                "file": "",
                "wave": "",
                "status": code,
                "create_time": int(task.created_at),
                "env": "development",
                "progress": task.progress,
                "stage": stage,
            }
        ]

    async def _audio(self, request: web.Request) -> web.Response:
        denied = self._auth_error(request)
        if denied:
            return denied
        path = request.query.get("path")
        if path is None:
            return json_response(
                {
                    "detail": [
                        {"type": "missing", "loc": ["query", "path"], "msg": "Field required"}
                    ]
                },
                status=422,
            )
        if not path.startswith(AUDIO_DIR + "/"):
            return json_response(
                {"detail": "Access denied: path outside allowed directory"}, status=403
            )
        if path not in self.files:
            return json_response({"detail": "Audio file not found"}, status=404)
        return web.Response(body=make_wav(self.files[path]), content_type="audio/wav")
