"""`acestep-bot run` with a file-writing front-end, for shutdown/restart tests.

Runs the real `run_bot` (signals, engine, health server, retention, graceful stop) with
one front-end, platform "file", that renders each song to MP3 and records the delivery
in OPS_DELIVERIES (one line per posted song). OPS_UPLOAD_SECONDS makes each upload take
that long, to send SIGTERM in the middle of one. Configuration comes from the
environment like the real bot's.

    python -m tests.run_bot_script
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from bot import app, logs
from bot.engine import Engine, Failure, Progress, Song
from bot.models import Job
from bot.settings import Settings


class FileFrontend:
    """Posts songs by copying them next to OPS_DELIVERIES and appending a line to it."""

    platform = "file"
    is_connected = True

    def __init__(self, record: Path, upload_seconds: float) -> None:
        self.record = record
        self.upload_seconds = upload_seconds

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def on_progress(self, job: Job, progress: Progress) -> None:
        pass

    async def deliver(self, job: Job, song: Song) -> None:
        rendered = await song.render(None, "mp3")
        self._append(f"uploading {job.id}")
        await asyncio.sleep(self.upload_seconds)
        posted = self.record.with_name(f"posted-{job.id}.mp3")
        shutil.copyfile(rendered.path, posted)
        self._append(f"delivered {job.id} {posted}")

    async def on_failed(self, job: Job, failure: Failure) -> None:
        self._append(f"failed {job.id} {failure.kind}")

    def _append(self, line: str) -> None:
        with self.record.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def main() -> int:
    settings = Settings()
    logs.setup(settings)
    frontend = FileFrontend(
        Path(os.environ["OPS_DELIVERIES"]), float(os.environ.get("OPS_UPLOAD_SECONDS", "0"))
    )

    def build_frontends(settings: Settings, engine: Engine, role: Any = None) -> list[Any]:
        engine.register_delivery(frontend)
        return [frontend]

    # The chat front-ends need real tokens; this one stands in for them.
    app.build_frontends = build_frontends  # type: ignore[assignment]
    app.configured_frontends = lambda settings: ["file"]  # type: ignore[assignment]
    return asyncio.run(app.run_bot(settings))


if __name__ == "__main__":
    sys.exit(main())
