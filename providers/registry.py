"""Build the configured providers from Settings, in the operator's order."""

from __future__ import annotations

from bot.settings import Settings, missing_for_provider
from providers.base import Provider, ProviderError


def build_provider(settings: Settings, name: str) -> Provider:
    """One provider adapter configured from settings (its keys must be set)."""
    if name == "fal":
        from providers.fal import FalProvider

        return FalProvider(
            settings.secret("fal_key") or "",
            settings.fal_queue_url,
            storage_url=settings.fal_storage_url,
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


async def provider_notes(settings: Settings) -> list[str]:
    """What the configured providers say about themselves that an operator must know
    (today: ACE-Step servers that cannot make described songs), one line each."""
    lines: list[str] = []
    for provider in build_providers(settings):
        try:
            facts = await provider.health()
        except ProviderError as exc:
            lines.append(f"Provider {provider.name}: {exc.message}")
            continue
        finally:
            await provider.aclose()
        for url, server in (facts.get("servers") or {}).items():
            if not server.get("reachable", True):
                lines.append(f"ACE-Step server {url} did not answer: {server.get('error')}.")
            elif server.get("prompt_mode") is not True and server.get("note"):
                lines.append(
                    f"ACE-Step server {url} cannot be relied on for described songs "
                    f"(/song, --prompt): {server['note']}."
                )
    return lines
