"""Audio fixtures made in the test: real files of a given duration, never downloaded."""

from __future__ import annotations

import io
import wave
from collections.abc import Iterable, Iterator
from typing import Any

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
        encode_all(dst, stream, src.decode(audio=0))
    return out.getvalue()


def encode_all(dst: Any, stream: Any, frames: Iterable[Any]) -> None:
    """Encode every frame into `stream` of the open container `dst`, then flush."""
    for frame in frames:
        frame.pts = None
        for packet in stream.encode(frame):
            dst.mux(packet)
    for packet in stream.encode(None):
        dst.mux(packet)


def make_flac(duration: float, sample_rate: int = 8000, channels: int = 1) -> bytes:
    """A FLAC file of a tone at its own rate and layout (8 kHz mono keeps long ones quick)."""
    import av

    pcm = sine_pcm(duration, sample_rate, channels=channels)
    layout = "mono" if channels == 1 else "stereo"
    out = io.BytesIO()
    with av.open(out, "w", format="flac") as dst:
        stream = dst.add_stream("flac", rate=sample_rate)
        stream.layout = layout
        stream.format = "s16"

        def frames() -> Iterator[av.AudioFrame]:
            for start in range(0, len(pcm), 4096):
                block = np.ascontiguousarray(pcm[start : start + 4096].reshape(1, -1))
                frame = av.AudioFrame.from_ndarray(block, format="s16", layout=layout)
                frame.sample_rate = sample_rate
                yield frame

        encode_all(dst, stream, frames())
    return out.getvalue()


def claim_flac_samples(flac: bytes, total_samples: int) -> bytes:
    """The same FLAC with STREAMINFO claiming `total_samples` (a header that lies)."""
    assert flac[:4] == b"fLaC" and flac[4] & 0x7F == 0  # STREAMINFO comes first
    info = bytearray(flac[8:42])
    # Bytes 13-17 of STREAMINFO: 4 bits of bits-per-sample, then 36 bits of sample count.
    packed = int.from_bytes(info[13:18], "big")
    packed = (packed & ~((1 << 36) - 1)) | total_samples
    info[13:18] = packed.to_bytes(5, "big")
    return flac[:8] + bytes(info) + flac[42:]


def claim_wav_frames(wav: bytes, frames: int) -> bytes:
    """The same 16-bit WAV with its RIFF and data sizes claiming `frames` frames."""
    channels = int.from_bytes(wav[22:24], "little")
    data_at = wav.index(b"data")
    size = frames * channels * 2
    out = bytearray(wav)
    out[4:8] = (size + data_at).to_bytes(4, "little")
    out[data_at + 4 : data_at + 8] = size.to_bytes(4, "little")
    return bytes(out)


def float_wav(samples: np.ndarray, sample_rate: int = 48000, channels: int = 2) -> bytes:
    """A 32-bit IEEE float WAV (format 3, what soundfile writes) of interleaved samples."""
    import struct

    data = samples.astype("<f4").tobytes()
    fmt = struct.pack(
        "<HHIIHH", 3, channels, sample_rate, sample_rate * channels * 4, channels * 4, 32
    )
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def audio_seconds(data: bytes) -> float | None:
    """How long an audio file is (decoded with PyAV), or None when it is not audio: what a
    provider's server finds when it reads an uploaded source."""
    import av

    try:
        with av.open(io.BytesIO(data)) as src:
            stream = src.streams.audio[0]
            samples = sum(frame.samples for frame in src.decode(stream))
            return samples / float(stream.rate or 1) if samples else None
    except (av.FFmpegError, IndexError, ValueError):
        return None
