"""Handing an edit's source audio to a provider once (issue 14).

Each provider takes files its own way (fal storage, WaveSpeed media upload, a multipart
field on the ACE-Step server); what they share is that an upload is remembered in the
`UploadCache` by provider name and SHA-256 with its expiry, so a resubmit after a restart
uses the provider's copy instead of sending the file again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from providers.base import SourceFile

log = logging.getLogger(__name__)

# Content types by the file suffixes a SourceAudio may have (bot/requests.py).
CONTENT_TYPES = {
    ".mp3": "audio/mpeg",
    ".wav": "audio/wav",
    ".flac": "audio/flac",
    ".ogg": "audio/ogg",
    ".m4a": "audio/mp4",
}


def content_type(source: SourceFile) -> str:
    return CONTENT_TYPES.get(source.path.suffix.lower(), "application/octet-stream")


async def read_source(source: SourceFile) -> bytes:
    """The source file's bytes (sources are songs: at most a few tens of MB)."""
    return await asyncio.to_thread(source.path.read_bytes)


async def provider_ref(
    provider: str,
    source: SourceFile,
    upload: Callable[[], Awaitable[tuple[str, float]]],
    *,
    fresh: bool = False,
) -> tuple[str, bool]:
    """The provider's reference to the source and whether it was uploaded just now: the
    remembered one unless `fresh` (or it expired), else `upload()`'s (ref, lifetime in
    seconds), remembered from now on. A refused remembered reference is worth one new
    upload; a refused fresh one is the file's fault."""
    if not fresh:
        known = await source.uploads.get(provider, source.sha256)
        if known is not None:
            return known, False
    ref, lifetime = await upload()
    await source.uploads.put(provider, source.sha256, ref, time.time() + lifetime)
    log.info("%s: uploaded source %s (kept %.0f h)", provider, source.sha256[:12], lifetime / 3600)
    return ref, True
