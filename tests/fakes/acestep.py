"""A fake ACE-Step 1.5 REST server (`acestep-api`), shaped after upstream api_server.py.

Checked line by line against ace-step/ACE-Step-1.5 `acestep/api_server.py` at commit
f30aee4c186c33b7b8a6ea59a4b7fc36f795b49f (2026-02-08) and, for what newer builds changed,
`acestep/api/http/model_service_routes.py` and `acestep/api/job_generation_setup.py`
(docs/providers.md lists what was verified). Upstream's code is not copied here.

Endpoints: `POST /release_task`, `POST /query_result`, `GET /v1/audio?path=...`,
`GET /v1/stats`, `GET /health`; every success wrapped in `{data, code, error, timestamp,
extra}`, refusals as FastAPI's `{"detail": ...}`. Like the real server it keeps its job
store in memory and, when `disk_cache` is on, a progress/result entry per started task on
"disk" that survives a restart. After `restart()` an unknown task id answers status 0 with
result "[]", exactly like upstream.

What upstream does that the bot must cope with, each reproducible here:
- `lm=False`: no 5Hz language model (upstream skips it on GPUs under 12 GB). A task that
  needs it (`sample_query`, `thinking`, `use_format`, `sample_mode`) fails with status 2;
  its cache entry carries no error text. `/health` reports `llm_initialized` only when
  `health_reports_lm` (newer builds); f30aee4 answers just `{status, service, version}`.
- `sample_query` makes the LM pick the length: `audio_duration` is replaced by
  `lm_duration`. With `analysis_only` the task writes caption and lyrics and no audio.
- `honours_seeds=False`: f30aee4 passes `seeds=None`, so `use_random_seed=false` + `seed`
  still draws a random seed per song; newer builds use the seed sent.
- `progress_text` is the server's global last log line, whichever job wrote it (the
  "Creating sample from query: ..." line of another user's song, for instance).
- A refused submit (queue full, 429) first creates a job record that stays "queued" for
  ever: `jobs.queued` in `/v1/stats` counts it, `queue_size` (the real queue) does not.
- `batch_size` defaults to 2 songs; `audio_format` (default mp3) picks the file's format.
- Work on a song (issue 14): `/release_task` also takes multipart/form-data, the source
  file in `src_audio` (or `ctx_audio`) and every other field a form value read back the
  way upstream's RequestParser does (_to_int, _to_float, _to_bool: "true"/"1"/"yes").
  `task_type` "cover" makes a song as long as the source; "repaint" one as long as the
  source padded to the window (handler.py prepare_padding_info: repainting_start < 0 or
  repainting_end past the end extend it). Uploads are counted in `uploads`.

A task is queued for `polls_queued` queries of it, running for `polls_running` more, then
succeeded (or failed when `fail_with` is set). The audio is real: WAV, FLAC or MP3 of the
length the server decided, encoded with PyAV.

Drive it through plain attributes and methods:
    fake.release_errors.append("queue_full")  # the next /release_task answers 429
    fake.add_load(queued=3, running=1)        # another client's jobs, counted in stats
    await fake.stop(); await fake.start()     # down (connection refused), then back
    await fake.restart()                      # the process restarts: the queue is lost
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from aiohttp import web

from tests.fakes.audio import audio_seconds, make_wav, transcode
from tests.fakes.http import json_response

AUDIO_DIR = "/srv/acestep/.cache/acestep/tmp/api_audio"
# How upstream's RequestParser reads form values back (GenerateMusicRequest's types).
_FORM_INTS = {"seed", "batch_size", "inference_steps", "bpm"}
_FORM_FLOATS = {
    "audio_duration",
    "repainting_start",
    "repainting_end",
    "audio_cover_strength",
    "guidance_scale",
    "shift",
    "cfg_interval_start",
    "cfg_interval_end",
}
_FORM_BOOLS = {"use_random_seed", "thinking", "use_cot_caption", "use_cot_language", "use_adg"}

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
    ghost: bool = False  # the record a refused submit left behind: never runs
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_lm(self) -> bool:
        return any(
            self.body.get(k) for k in ("sample_query", "thinking", "use_format", "sample_mode")
        )


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
        has_stats: bool = True,
        lm: bool = True,
        health_reports_lm: bool = False,
        honours_seeds: bool = True,
        lm_duration: float = 30.0,
    ) -> None:
        self.api_key = api_key
        self.polls_queued = polls_queued
        self.polls_running = polls_running
        self.queue_maxsize = queue_maxsize
        self.disk_cache = disk_cache
        self.report_uptime = report_uptime
        self.has_stats = has_stats  # False: an older build without /v1/stats (404)
        self.lm = lm
        self.health_reports_lm = health_reports_lm
        self.honours_seeds = honours_seeds
        self.lm_duration = lm_duration  # the length the LM picks for a sample_query
        self.task_timeout = 3600.0  # upstream TASK_TIMEOUT_SECONDS for stale cache entries
        self.fail_with: str | None = None
        self.release_errors: list[str] = []
        self.query_errors: list[str] = []
        self.submits: list[dict[str, Any]] = []  # bodies of accepted tasks
        self.uploads: list[str] = []  # file names of every src_audio received
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)
        self.jobs: dict[str, FakeTask] = {}  # the in-memory store (lost on restart)
        self.cache: dict[str, list[dict[str, Any]]] = {}  # the on-disk cache (kept)
        self.files: dict[str, float] = {}  # audio path -> duration
        self.started_at = time.time()
        self.restarts = 0
        self.port = 0
        self.last_log = "Waiting"  # upstream's LogBuffer starts with this
        self._rng = random.Random(7)
        self._ids = (f"{n:08d}-0000-4000-8000-{n:012d}" for n in itertools.count(1))
        self._runner: web.AppRunner | None = None
        self.app = web.Application(client_max_size=64 * 1024**2)  # whole songs uploaded
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

    def queue_size(self) -> int:
        """The real queue (upstream's asyncio.Queue): queued records minus the ghosts."""
        return sum(1 for t in self.jobs.values() if t.status == "queued" and not t.ghost)

    def stats(self) -> dict[str, Any]:
        counts = {"total": len(self.jobs), "queued": 0, "running": 0, "succeeded": 0, "failed": 0}
        for task in self.jobs.values():
            counts[task.status] += 1
        data: dict[str, Any] = {
            "jobs": counts,
            "queue_size": self.queue_size(),
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
        data: dict[str, Any] = {"status": "ok", "service": "ACE-Step API", "version": "1.0"}
        if self.health_reports_lm:  # newer builds (acestep/api/http/model_service_routes.py)
            data.update(
                {
                    "models_initialized": True,
                    "llm_initialized": self.lm,
                    "loaded_model": "acestep-v15-turbo",
                    "loaded_lm_model": "acestep-5Hz-lm-0.6B" if self.lm else None,
                }
            )
        return self._envelope(data)

    async def _stats(self, request: web.Request) -> web.Response:
        if not self.has_stats:
            return json_response({"detail": "Not Found"}, status=404)
        return self._auth_error(request) or self._envelope(self.stats())

    async def _release(self, request: web.Request) -> web.Response:
        denied = self._auth_error(request)
        if denied:
            return denied
        if request.content_type.startswith("multipart/form-data"):
            body = await self._form_body(request)
        else:
            body = await request.json()
        if self.release_errors:
            name = self.release_errors.pop(0)
            if name == "queue_full":  # the record is made before the queue is checked
                ghost = FakeTask(next(self._ids), {}, time.time(), ghost=True)
                self.jobs[ghost.task_id] = ghost
            return self._refusal(name)
        if not isinstance(body, dict):
            return self._refusal("bad_request")
        # Upstream creates the record before it looks at the queue (a ghost if refused).
        task = FakeTask(next(self._ids), body, time.time())
        self.jobs[task.task_id] = task
        if self.queue_size() > self.queue_maxsize:
            task.ghost = True
            return self._refusal("queue_full")
        self.submits.append(body)
        return self._envelope(
            {"task_id": task.task_id, "status": "queued", "queue_position": self.queue_size()}
        )

    async def _form_body(self, request: web.Request) -> dict[str, Any]:
        """A multipart task as upstream reads it: the file parts saved, the values typed."""
        form = await request.post()
        body: dict[str, Any] = {}
        for name, value in form.items():
            if isinstance(value, web.FileField):
                if name in ("src_audio", "ctx_audio"):
                    data = value.file.read()
                    self.uploads.append(value.filename)
                    body["_src_seconds"] = audio_seconds(data)
                continue
            text = str(value).strip()
            if name in _FORM_INTS:
                body[name] = int(text) if text.lstrip("-").isdigit() else None
            elif name in _FORM_FLOATS:
                try:
                    body[name] = float(text)
                except ValueError:
                    body[name] = None
            elif name in _FORM_BOOLS:
                body[name] = text.lower() in {"1", "true", "yes", "y", "on"}
            else:
                body[name] = text
        return body

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
        item = self._item(task, code, (task.extra.get("paths") or [""])[0])
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
        if step == 1 and task.body.get("sample_query"):
            # Every job's log lines land in the one global buffer progress_text shows.
            self.last_log = f"Creating sample from query: {task.body['sample_query'][:100]}..."
        if task.needs_lm and not self.lm:
            self._fail(
                task,
                "5Hz LM init failed: LLM not initialized at startup. To enable LLM, "
                "set ACESTEP_INIT_LLM=true in .env or environment variables.",
            )
            return
        if step <= self.polls_running:
            task.status = "running"
            task.progress = round(step / (self.polls_running + 1), 2)
            if not task.body.get("sample_query"):
                self.last_log = f"DiT diffusion: {int(task.progress * 100)}%"
            self._write_cache(task, 0, stage="running")
            return
        if self.fail_with is not None:
            self._fail(task, self.fail_with)
            return
        task.status, task.progress = "succeeded", 1.0
        count = int(task.body.get("batch_size") or 2)  # upstream's default: two songs
        task.extra["seeds"] = self._seeds(task, count)
        if not task.body.get("analysis_only"):
            fmt = str(task.body.get("audio_format") or "mp3")
            task.extra["paths"] = [f"{AUDIO_DIR}/{task.task_id}_{n}.{fmt}" for n in range(count)]
            for path in task.extra["paths"]:
                self.files[path] = self._duration(task)
        self._write_cache(task, 1, stage="succeeded")

    def _fail(self, task: FakeTask, error: str) -> None:
        task.status = "failed"
        task.error = (
            'Traceback (most recent call last):\n  File "api_server.py", '
            f"line 1771, in _run_one_job\nRuntimeError: {error}\n"
        )
        self._write_cache(task, 2, stage="failed")

    def _seeds(self, task: FakeTask, count: int) -> list[int]:
        """Newer builds use the seed sent (then random ones for the rest of the batch);
        f30aee4 draws every seed at random whatever it was sent."""
        seed = task.body.get("seed")
        honoured = (
            self.honours_seeds
            and task.body.get("use_random_seed") is False
            and isinstance(seed, int)
            and seed >= 0
        )
        first = [seed] if honoured else []
        return first + [self._rng.randrange(2**32) for _ in range(count - len(first))]

    def _duration(self, task: FakeTask) -> float:
        source = task.body.get("_src_seconds")
        if isinstance(source, float) and task.body.get("task_type") in ("cover", "repaint"):
            if task.body["task_type"] == "cover":
                return source
            start = float(task.body.get("repainting_start") or 0.0)
            end = task.body.get("repainting_end")
            end = source if end is None or end < 0 else float(end)
            return source + max(0.0, -start) + max(0.0, end - source)
        if task.body.get("sample_query"):
            return self.lm_duration  # the LM's choice replaces audio_duration
        return float(task.body.get("audio_duration") or 30)

    def _item(self, task: FakeTask, code: int, path: str = "") -> dict[str, Any]:
        body = task.body
        query = body.get("sample_query")
        caption = f"{query}; warm analog synths, 92 bpm" if query else body.get("prompt", "")
        lyrics = "[verse]\nwritten by the language model" if query else body.get("lyrics", "")
        if query and "instrumental" in query.lower():
            lyrics = "[Instrumental]"
        seeds = task.extra.get("seeds") or []
        return {
            "file": f"/v1/audio?path={quote(path, safe='')}" if path else "",
            "wave": "",
            "status": code,
            "create_time": int(task.created_at),
            "env": "development",
            "prompt": caption,
            "lyrics": lyrics,
            "metas": {
                "bpm": body.get("bpm") or 92,
                "duration": self._duration(task),
                "genres": "",
                "keyscale": body.get("key_scale") or "A minor",
                "timesignature": body.get("time_signature") or "4",
                "prompt": body.get("prompt", ""),
                "lyrics": body.get("lyrics", ""),
            },
            "generation_info": "Analysis Only Mode Complete"
            if body.get("analysis_only")
            else "**Steps:** 8",
            "seed_value": "" if body.get("analysis_only") else ",".join(map(str, seeds)),
            "lm_model": "acestep-5Hz-lm-0.6B",
            "dit_model": "None (Analysis Only)"
            if body.get("analysis_only")
            else "acestep-v15-turbo",
            "progress": task.progress,
            "stage": task.status,
        }

    def _write_cache(self, task: FakeTask, code: int, stage: str) -> None:
        if code == 1:  # one item per song; one without a file for an analysis-only task
            paths = task.extra.get("paths") or [""]
            self.cache[task.task_id] = [self._item(task, 1, path) for path in paths]
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
        wav = make_wav(self.files[path])
        ext = path.rsplit(".", 1)[-1]
        if ext in ("mp3", "flac"):
            media = "audio/mpeg" if ext == "mp3" else "audio/flac"
            return web.Response(body=transcode(wav, ext), content_type=media)
        return web.Response(body=wav, content_type="audio/wav")
