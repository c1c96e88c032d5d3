"""One redactor for every text that leaves the process: log lines, `/healthz`, failure
details stored for `jobs show`. It removes the configured secrets and token-shaped strings
(Telegram `/bot<token>/` URLs, `Authorization` values, Discord interaction tokens)."""

from __future__ import annotations

import re
from collections.abc import Iterable

# Bot API URLs carry the token (`/bot<token>/`); Discord interaction and webhook URLs
# carry an interaction token (`/webhooks/<app>/<token>`, `/interactions/<id>/<token>`).
_BOT_URL = re.compile(r"/bot\d+:[A-Za-z0-9_-]+")
_AUTHORIZATION = re.compile(
    r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)(key|bearer|bot|token)\s+[^\s'\",}]+"
)
_INTERACTION_URL = re.compile(r"/(webhooks|interactions)/(\d+)/[A-Za-z0-9_.-]{20,}")


class Redactor:
    """Replaces secrets with `[redacted]`; secrets shorter than 4 characters are ignored
    (they would match everywhere)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        text = _BOT_URL.sub("/bot[redacted]", text)
        text = _INTERACTION_URL.sub(r"/\1/\2/[redacted]", text)
        return _AUTHORIZATION.sub(r"\1\2 [redacted]", text)
