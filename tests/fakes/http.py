"""Run a local aiohttp application on 127.0.0.1 for a test (a real HTTP server)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Serve `app` on an ephemeral loopback port; yields its base URL (no trailing /)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
    port = sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def json_response(data: object, status: int = 200, **kwargs: object) -> web.Response:
    """JSON with exactly `application/json` (discord.py rejects a charset suffix)."""
    import json

    return web.Response(
        body=json.dumps(data).encode(), status=status, content_type="application/json", **kwargs
    )  # type: ignore[arg-type]
