"""The one place an HTTP error answer from any provider becomes one of our typed errors.

Each adapter only extracts what its own response shape carries (the status, a readable
message, Retry-After, and a few markers such as fal's "Exhausted balance" or a content
policy type) and calls `http_error`. The rules, in order:

- 402, or a billing marker on 400/403/429 -> BillingError (the operator must top up)
- 401/403 -> AuthError (the operator must fix the key)
- 404 -> TaskLost while polling a known job, else Unavailable (a wrong model path or an
  endpoint this build lacks is the operator's problem, not the user's input)
- 429 and the provider's other busy statuses (503 unless it says otherwise) -> Busy
- 408 and 5xx -> Unavailable
- any other 4xx -> Rejected with the provider's message, or `policy_message` when the
  provider flagged a content-policy refusal (the text a user can act on)
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

from providers.base import (
    AuthError,
    BillingError,
    Busy,
    ProviderError,
    Rejected,
    TaskLost,
    Unavailable,
)

# Words in an error message or type that mean the account is out of money.
BILLING_WORDS = (
    "balance",
    "billing",
    "budget",
    "credit",
    "payment",
    "insufficient",
    "locked",
    "spend limit",
    "top up",
)
# Words in an error message or type that mean the input was refused on content grounds.
POLICY_WORDS = (
    "content_policy",
    "content policy",
    "nsfw",
    "moderation",
    "safety",
    "flagged",
    "not allowed",
    "sensitive",
    "prohibited",
    "violat",
)


class Stage(Enum):
    """What the failed call was doing: a 404 means something else in each."""

    SUBMIT = "submit"  # creating a job: a 404 is a wrong model path
    POLL = "poll"  # reading a job we created: a 404 means the provider forgot it
    OTHER = "other"  # anything else (stats, health, cancel)


def has_marker(texts: Iterable[str], words: Iterable[str]) -> bool:
    """True when any of `words` appears in any of `texts` (case-insensitive)."""
    low = " ".join(t for t in texts if t).lower()
    return any(w in low for w in words)


def http_error(
    provider: str,
    status: int,
    message: str,
    *,
    stage: Stage = Stage.SUBMIT,
    retry_after: float | None = None,
    billing: bool = False,
    policy: bool = False,
    policy_message: str | None = None,
    key_setting: str = "the API key",
    busy_statuses: tuple[int, ...] = (429, 503),
    where: str = "",
) -> ProviderError:
    """Our typed error for one HTTP error answer (see the module docstring for the rules).

    `message` is the provider's own text, already shortened and free of keys; `billing`
    and `policy` are the markers the adapter found in its response shape. `where` (e.g.
    one of several servers) prefixes the operator-facing messages, never a rejection.
    """
    reason = message or "no details given"
    text = f"{where}: {reason}" if where else reason
    if status == 402 or (billing and status in (400, 403, 429)):
        return BillingError(provider, f"the account cannot pay: {text}", status_code=status)
    if status in (401, 403):
        return AuthError(
            provider, f"the API key was refused; check {key_setting} ({text})", status_code=status
        )
    if status == 404:
        if stage is Stage.POLL:
            return TaskLost(provider, f"the job is no longer known ({text})", status_code=status)
        return Unavailable(provider, f"not found: {text}", status_code=status)
    if status in busy_statuses:
        return Busy(provider, f"busy: {text}", status_code=status, retry_after=retry_after)
    if status == 408 or status >= 500:
        return Unavailable(
            provider, f"server error: {text}", status_code=status, retry_after=retry_after
        )
    if 400 <= status < 500:
        if policy and policy_message:
            return Rejected(provider, policy_message, status_code=status)
        return Rejected(provider, reason, status_code=status)
    return Unavailable(provider, f"unexpected answer (HTTP {status}): {text}", status_code=status)
