"""How long a song will take: from the provider's own progress, else from how long that
provider took for its recent songs (kept in memory; the first songs after a start have
no estimate)."""

from __future__ import annotations

from collections import defaultdict, deque
from statistics import median

# A fraction this small says too little about the rest of the run.
MIN_FRACTION = 0.05


class GenerationTimes:
    """The last few generation times (seconds from "the provider started it" to "the audio
    is stored") of each provider."""

    def __init__(self, keep: int = 20) -> None:
        self._times: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=keep))

    def record(self, provider: str, seconds: float) -> None:
        if seconds > 0:
            self._times[provider].append(seconds)

    def typical(self, provider: str) -> float | None:
        times = self._times.get(provider)
        return median(times) if times else None

    def remaining(self, provider: str, elapsed: float, fraction: float | None) -> float | None:
        """Seconds left of a generation `elapsed` seconds in, at `fraction` done."""
        if fraction is not None and MIN_FRACTION <= fraction < 1 and elapsed > 0:
            return elapsed * (1 - fraction) / fraction
        typical = self.typical(provider)
        if typical is None:
            return None
        return max(0.0, typical - elapsed)

    def queue_wait(self, provider: str, position: int | None, slots: int) -> float | None:
        """Seconds until a job at `position` in the provider's queue is done, assuming it
        runs `slots` songs at once."""
        typical = self.typical(provider)
        if typical is None:
            return None
        ahead = max(0, (position or 1) - 1)
        return typical * (1 + ahead / max(1, slots))
