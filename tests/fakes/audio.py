"""Audio fixtures made in the test: real files of a given duration, never downloaded."""

from __future__ import annotations

import io
import wave

import numpy as np


def sine_pcm(
    duration: float,
    sample_rate: int = 48000,
    freq: float = 440.0,
    channels: int = 2,
    amplitude: float = 0.3,
) -> np.ndarray:
    """Interleaved int16 samples of a tone with a slow tremolo (not silent, not flat)."""
    n = round(duration * sample_rate)
    t = np.arange(n, dtype=np.float64) / sample_rate
    tone = np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t))
    mono = (tone * amplitude * 32767).astype(np.int16)
    return np.repeat(mono[:, None], channels, axis=1)


def make_wav(
    duration: float,
    sample_rate: int = 48000,
    channels: int = 2,
    freq: float = 440.0,
    silent: bool = False,
) -> bytes:
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


# Provider formats as PyAV (FFmpeg) writes them: (container, encoder).
PROVIDER_CODECS = {
    "mp3": ("mp3", "libmp3lame"),
    "flac": ("flac", "flac"),
    "ogg-vorbis": ("ogg", "vorbis"),
    "ogg-opus": ("ogg", "libopus"),
    "wav-float": ("wav", "pcm_f32le"),  # what soundfile/torchaudio write by default
    "wav-24bit": ("wav", "pcm_s24le"),
}


def transcode(wav: bytes, kind: str) -> bytes:
    """Re-encode a WAV into one of PROVIDER_CODECS with PyAV, as a provider's server would."""
    import av  # imported here so fixtures that only need WAV stay light

    container_format, codec = PROVIDER_CODECS[kind]
    out = io.BytesIO()
    with av.open(io.BytesIO(wav)) as src, av.open(out, "w", format=container_format) as dst:
        stream = dst.add_stream(codec, rate=48000)
        stream.layout = "stereo"
        if codec == "vorbis":
            # FFmpeg's own Vorbis encoder is flagged experimental; libvorbis is not built in.
            stream.codec_context.options = {"strict": "experimental"}
        for frame in src.decode(audio=0):
            frame.pts = None
            for packet in stream.encode(frame):
                dst.mux(packet)
        for packet in stream.encode(None):
            dst.mux(packet)
    return out.getvalue()
