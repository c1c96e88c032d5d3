"""Audio fixtures made in the test: real files of a given duration, never downloaded."""

from __future__ import annotations

import io
import wave

import numpy as np


def sine_pcm(duration: float, sample_rate: int = 48000, freq: float = 440.0,
             channels: int = 2, amplitude: float = 0.3) -> np.ndarray:
    """Interleaved int16 samples of a tone with a slow tremolo (not silent, not flat)."""
    n = round(duration * sample_rate)
    t = np.arange(n, dtype=np.float64) / sample_rate
    tone = np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t))
    mono = (tone * amplitude * 32767).astype(np.int16)
    return np.repeat(mono[:, None], channels, axis=1)


def make_wav(duration: float, sample_rate: int = 48000, channels: int = 2,
             freq: float = 440.0, silent: bool = False) -> bytes:
    """A 16-bit PCM WAV file of `duration` seconds, as ACE-Step providers return."""
    pcm = sine_pcm(duration, sample_rate, freq, channels)
    if silent:
        pcm[:] = 0
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()
