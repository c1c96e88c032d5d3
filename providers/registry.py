"""Build the configured providers from Settings, in the operator's order."""

from __future__ import annotations

from bot.settings import Settings, missing_for_provider
from providers.base import Provider


def build_provider(settings: Settings, name: str) -> Provider:
    """One provider adapter configured from settings (its keys must be set)."""
    if name == "fal":
        from providers.fal import FalProvider

        return FalProvider(
            settings.secret("fal_key") or "",
            settings.fal_queue_url,
            concurrency=settings.fal_concurrency,
        )
    if name == "wavespeed":
        from providers.wavespeed import WaveSpeedProvider

        return WaveSpeedProvider(
            settings.secret("wavespeed_api_key") or "",
            settings.wavespeed_base_url,
            song_model=settings.wavespeed_song_model,
            concurrency=settings.wavespeed_concurrency,
        )
    if name == "aigateway":
        from providers.aigateway import AIGatewayProvider

        return AIGatewayProvider(
            settings.secret("aigateway_api_key") or "",
            settings.aigateway_base_url,
            concurrency=settings.aigateway_concurrency,
        )
    if name == "replicate":
        from providers.replicate import ReplicateProvider

        return ReplicateProvider(
            settings.secret("replicate_api_token") or "",
            settings.replicate_base_url,
            concurrency=settings.replicate_concurrency,
        )
    if name == "acestep":
        from providers.acestep import AceStepProvider

        return AceStepProvider(
            settings.acestep_server_urls,
            settings.secret("acestep_api_key"),
            price_per_second=settings.acestep_price_per_second,
            concurrency=settings.acestep_concurrency * max(1, len(settings.acestep_server_urls)),
        )
    raise ValueError(f"unknown provider {name!r}")


def build_providers(settings: Settings, only: str | None = None) -> list[Provider]:
    """Every provider listed in PROVIDERS that has what it needs (or just `only`)."""
    names = [only] if only else settings.providers
    return [build_provider(settings, n) for n in names if not missing_for_provider(settings, n)]
