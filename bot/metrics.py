"""Prometheus metrics: event counters the engine feeds, and gauges read at scrape time.

Each Engine owns one `Metrics` on a private CollectorRegistry, so two engines in one
process (tests, the CLI beside a bot) never share or double-register series. Counters
and histograms start at zero when the process starts, as Prometheus expects; what must
survive restarts (jobs by state, queue depth, spend) is read from SQLite at scrape time.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from bot.models import Job
    from providers.router import ProviderState

__all__ = ["CONTENT_TYPE", "Metrics"]

# Songs take tens of seconds to many minutes; buckets cover a fast GPU to a slow queue.
LATENCY_BUCKETS = (5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 900, 1800, float("inf"))


class Metrics:
    """The bot's metric families on their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.quota_refusals = Counter(
            "acestep_quota_refusals",
            "Requests refused at admission, by the limit that refused them",
            ["limit"],
            registry=r,
        )
        self.moderation_refusals = Counter(
            "acestep_moderation_refusals",
            "Requests refused at admission by a ban list (operator or community)",
            ["list"],
            registry=r,
        )
        self.provider_errors = Counter(
            "acestep_provider_errors",
            "Errors from provider APIs, by provider and error "
            "type (Rejected, AuthError, Busy, Unavailable, TaskLost, ...)",
            ["provider", "type"],
            registry=r,
        )
        self.generation_seconds = Histogram(
            "acestep_generation_seconds",
            "From the first submit to a provider until the audio is stored (ready)",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "acestep_end_to_end_seconds",
            "From admission until the song is posted (delivered)",
            ["platform"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Read from SQLite / the router at scrape time (refresh()).
        self.jobs = Gauge(
            "acestep_jobs",
            "Jobs in the database by state and provider (provider empty before one is chosen)",
            ["state", "provider"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "acestep_queue_depth", "Jobs admitted and waiting for a provider", registry=r
        )
        self.spend_today = Gauge(
            "acestep_spend_usd_today",
            "USD spent or reserved since 00:00 UTC (what SPEND_CAP_USD_PER_DAY is checked against)",
            registry=r,
        )
        self.provider_in_flight = Gauge(
            "acestep_provider_in_flight",
            "Jobs a provider is working on now",
            ["provider"],
            registry=r,
        )
        self.provider_cooling_down = Gauge(
            "acestep_provider_cooling_down",
            "1 while a provider is skipped after a busy answer or an auth/billing error",
            ["provider"],
            registry=r,
        )

    # ---- engine events ---------------------------------------------------------------

    def quota_refused(self, limit: str) -> None:
        self.quota_refusals.labels(limit=limit).inc()

    def moderation_refused(self, listed_by: str) -> None:
        self.moderation_refusals.labels(list=listed_by).inc()

    def provider_error(self, provider: str, error_type: str) -> None:
        self.provider_errors.labels(provider=provider, type=error_type).inc()

    def job_ready(self, job: Job, provider: str, now: float | None = None) -> None:
        """A provider's song is stored: observe the generation latency."""
        if job.started_at:
            now = time.time() if now is None else now
            self.generation_seconds.labels(provider=provider).observe(
                max(0.0, now - job.started_at)
            )

    def job_delivered(self, job: Job, now: float | None = None) -> None:
        """The user has the song: observe admission-to-delivery latency."""
        if job.created_at:
            now = time.time() if now is None else now
            self.end_to_end_seconds.labels(platform=job.requester.platform).observe(
                max(0.0, now - job.created_at)
            )

    # ---- scrape time -----------------------------------------------------------------

    def refresh(
        self,
        jobs_by_state: list[tuple[str, str, int]],
        queue_depth: int,
        spend_today: float,
        providers: dict[str, ProviderState],
        monotonic_now: float,
    ) -> None:
        """Set the scrape-time gauges from fresh reads."""
        self.jobs.clear()  # a (state, provider) pair that no longer exists must vanish
        for state, provider, count in jobs_by_state:
            self.jobs.labels(state=state, provider=provider).set(count)
        self.queue_depth.set(queue_depth)
        self.spend_today.set(spend_today)
        for name, st in providers.items():
            self.provider_in_flight.labels(provider=name).set(st.in_flight)
            self.provider_cooling_down.labels(provider=name).set(
                1 if st.cooldown_until > monotonic_now else 0
            )

    def render(self) -> bytes:
        """The Prometheus text exposition of every family."""
        return generate_latest(self.registry)
