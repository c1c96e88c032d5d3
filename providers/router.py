"""Routing: which configured provider serves a request, in the operator's order.

The router knows each provider's capabilities, how many jobs it has in flight against
its concurrency, and which providers are cooling down after an auth/billing failure or a
busy answer. It never decides on retries itself; the engine does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from bot.requests import GenerationRequest
from providers.base import Provider


@dataclass
class ProviderState:
    """What the bot last knew about a provider (also shown by health checks)."""

    in_flight: int = 0
    elsewhere: int = 0  # in flight from other processes on the same database
    cooldown_until: float = 0.0
    last_error: str | None = None
    last_error_kind: str | None = None
    last_ok: float | None = None


class Router:
    """Picks providers in configured order, within concurrency and outside cool-downs."""

    def __init__(
        self, providers: Iterable[Provider], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.providers: dict[str, Provider] = {p.name: p for p in providers}
        self.state: dict[str, ProviderState] = {n: ProviderState() for n in self.providers}
        self._clock = clock

    def get(self, name: str) -> Provider | None:
        return self.providers.get(name)

    def capable(self, request: GenerationRequest) -> list[Provider]:
        """Every configured provider able to serve this request, in order."""
        return [p for p in self.providers.values() if p.capabilities.can_serve(request)]

    def available(self, provider: Provider) -> bool:
        return self.state[provider.name].cooldown_until <= self._clock()

    def has_capacity(self, provider: Provider) -> bool:
        state = self.state[provider.name]
        return state.in_flight + state.elsewhere < provider.capabilities.concurrency

    def pick(self, request: GenerationRequest, exclude: Iterable[str] = ()) -> Provider | None:
        """The first capable, available provider with room, skipping `exclude`."""
        skip = set(exclude)
        for provider in self.capable(request):
            if (
                provider.name not in skip
                and self.available(provider)
                and self.has_capacity(provider)
            ):
                return provider
        return None

    def acquire(self, provider: Provider) -> None:
        self.state[provider.name].in_flight += 1

    def release(self, provider: Provider) -> None:
        state = self.state[provider.name]
        state.in_flight = max(0, state.in_flight - 1)

    def cool_down(self, provider: Provider, seconds: float, kind: str, message: str) -> None:
        state = self.state[provider.name]
        state.cooldown_until = max(state.cooldown_until, self._clock() + seconds)
        state.last_error = message
        state.last_error_kind = kind

    def note_ok(self, provider: Provider) -> None:
        state = self.state[provider.name]
        state.last_ok = time.time()
        state.last_error = state.last_error_kind = None

    def next_cooldown_end(self) -> float | None:
        """Seconds until the soonest cool-down ends, if any provider is cooling down."""
        now = self._clock()
        ends = [s.cooldown_until - now for s in self.state.values() if s.cooldown_until > now]
        return min(ends) if ends else None

    def option_limits(self, request: GenerationRequest) -> dict[str, list[tuple[str, str]]]:
        """For each option whose value rules providers out: (provider, what it takes),
        among the providers that could otherwise serve the request."""
        limits: dict[str, list[tuple[str, str]]] = {}
        for provider in self.providers.values():
            caps = provider.capabilities
            if request.mode not in caps.modes or not (
                caps.min_duration <= request.duration <= caps.max_duration
            ):
                continue
            for name, allowed in caps.out_of_range(request):
                limits.setdefault(name, []).append((provider.name, allowed.describe()))
        return limits

    def price_for(self, request: GenerationRequest) -> float:
        """The highest price per second among providers that could serve it: the
        reservation must cover whichever ends up serving."""
        prices = [_price(p, request) for p in self.capable(request)]
        return max(prices) if prices else 0.0


def _price(provider: Provider, request: GenerationRequest) -> float:
    custom = getattr(provider, "price_per_second_for", None)
    if callable(custom):
        return float(custom(request))
    return provider.capabilities.price_per_second


def price_of(provider: Provider, request: GenerationRequest) -> float:
    """USD this provider charges for this request."""
    return _price(provider, request) * request.duration
