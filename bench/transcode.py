"""Benchmark: encode a 240 s 48 kHz stereo WAV to MP3 192k with bot.audio, next to ffmpeg.

Run from the repository root:  python bench/transcode.py [--duration 240] [--runs 3]

Each encoder runs in its own process so its peak RSS (ru_maxrss, from wait4) is its own.
Linux carries the parent's peak RSS into a child's ru_maxrss across exec, so this parent
stays lean: the WAV is written by a child too, and numpy is never imported here.
bot.audio's Python-side peak comes from tracemalloc in a separate run, since tracing slows
allocation. Figures are printed and written to bench/results/transcode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import wave
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "transcode.json"
SAMPLE_RATE = 48000


def write_song(path: Path, duration: float, seed: int = 7) -> None:
    """A WAV with chords, a bass line and noisy drums: harder for LAME than a sine."""
    import numpy as np  # only in the child that writes the file; see the module docstring

    rng = np.random.default_rng(seed)
    chords = [
        (220.0, 277.2, 329.6),
        (196.0, 246.9, 293.7),
        (174.6, 220.0, 261.6),
        (196.0, 246.9, 311.1),
    ]
    chunk = SAMPLE_RATE * 2  # written two seconds at a time to keep the bench's own memory low
    total = int(duration * SAMPLE_RATE)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(2)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        for start in range(0, total, chunk):
            t = np.arange(start, min(start + chunk, total)) / SAMPLE_RATE
            chord = chords[int(t[0] // 2) % len(chords)]
            left = sum(0.12 * np.sin(2 * np.pi * f * t) for f in chord)
            right = sum(0.12 * np.sin(2 * np.pi * f * 1.003 * t + 0.5) for f in chord)
            bass = 0.2 * np.sin(2 * np.pi * chord[0] / 2 * t)
            beat = np.exp(-(t % 0.5) * 25) * rng.standard_normal(t.size) * 0.25
            hats = np.exp(-(t % 0.125) * 90) * rng.standard_normal(t.size) * 0.05
            mix = np.stack([left + bass + beat + hats, right + bass + beat + hats], axis=1)
            out.writeframes((np.clip(mix, -1, 1) * 32000).astype("<i2").tobytes())


def timed_process(argv: list[str]) -> dict[str, Any]:
    """Run a command; its wall time, peak RSS and stdout."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    # wait4 gives this child's own rusage, not the maximum over all children.
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    assert proc.stdout is not None and proc.stderr is not None
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({proc.returncode}): {stderr.decode()[-2000:]}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "max_rss_mib": usage.ru_maxrss / 1024,
        "stdout": stdout.decode(),
    }


def child(src: Path, dest: Path, bitrate: int, trace: bool, pyav_lame: bool) -> None:
    """Runs in the child process: one encode, figures as JSON on stdout."""
    sys.path.insert(0, str(ROOT))
    from bot import audio

    if trace:
        tracemalloc.start()
    started = time.perf_counter()
    if pyav_lame:
        encode_with_pyav_lame(src, dest, bitrate)
        size = dest.stat().st_size
    else:
        size = audio.encode(src, dest, bitrate=bitrate).size
    figures = {"encode_s": time.perf_counter() - started, "size": size}
    if trace:
        figures["tracemalloc_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
    figures["max_rss_mib_self"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(figures))


def encode_with_pyav_lame(src: Path, dest: Path, bitrate: int) -> None:
    """The same work through the libmp3lame inside PyAV's wheel, for reference."""
    import av

    with av.open(str(src)) as inp, av.open(str(dest), "w", format="mp3") as out:
        stream: Any = out.add_stream("libmp3lame", rate=SAMPLE_RATE)
        stream.layout = "stereo"
        stream.bit_rate = bitrate * 1000
        for frame in inp.decode(audio=0):
            frame.pts = None
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def ours(src: Path, dest: Path, bitrate: int, *flags: str) -> dict[str, Any]:
    run = timed_process(
        [
            sys.executable,
            __file__,
            "--child",
            str(src),
            str(dest),
            "--bitrate",
            str(bitrate),
            *flags,
        ]
    )
    figures: dict[str, Any] = json.loads(run.pop("stdout").strip().splitlines()[-1])
    return {**run, **figures}


def ffmpeg(ffmpeg_path: str, src: Path, dest: Path, bitrate: int) -> dict[str, Any]:
    argv = [
        ffmpeg_path,
        "-hide_banner",
        "-loglevel",
        "error",
        "-nostdin",
        "-y",
        "-i",
        str(src),
        "-c:a",
        "libmp3lame",
        "-b:a",
        f"{bitrate}k",
        "-ar",
        str(SAMPLE_RATE),
        "-ac",
        "2",
        str(dest),
    ]
    run = timed_process(argv)
    run.pop("stdout")
    return {**run, "size": dest.stat().st_size, "command": " ".join(argv)}


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each numeric figure over the runs (the machine may be shared)."""
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float)]
    merged: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in keys}
    merged.update({k: v for k, v in runs[0].items() if k not in keys})
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=240.0)
    parser.add_argument("--bitrate", type=int, default=192)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--skip-pyav-lame",
        action="store_true",
        help="leave out the reference run through PyAV's own libmp3lame",
    )
    parser.add_argument("--make-wav", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=2, metavar=("SRC", "DEST"), help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pyav-lame", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_wav:
        write_song(Path(args.make_wav), args.duration)
        return
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), args.bitrate, args.trace, args.pyav_lame)
        return

    with tempfile.TemporaryDirectory(prefix="acestep-bench-") as tmp:
        src = Path(tmp) / "song.wav"
        timed_process(
            [sys.executable, __file__, "--make-wav", str(src), "--duration", str(args.duration)]
        )
        print(
            f"input: {src.stat().st_size / 1e6:.1f} MB WAV, {args.duration:g} s, "
            f"48 kHz stereo s16; MP3 {args.bitrate} kbps; median of {args.runs} runs"
        )
        results: dict[str, Any] = {
            "input": {"duration_s": args.duration, "wav_bytes": src.stat().st_size},
            "bitrate_kbps": args.bitrate,
            "runs": args.runs,
            "machine": {
                "python": platform.python_version(),
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
            },
        }
        ffmpeg_path = shutil.which("ffmpeg")
        # Interleave the runs so that load from other work on the machine hits both alike.
        mine_runs: list[dict[str, Any]] = []
        ffmpeg_runs: list[dict[str, Any]] = []
        for _ in range(args.runs):
            mine_runs.append(ours(src, Path(tmp) / "ours.mp3", args.bitrate))
            if ffmpeg_path is not None:
                ffmpeg_runs.append(ffmpeg(ffmpeg_path, src, Path(tmp) / "ffmpeg.mp3", args.bitrate))
        mine = median_of(mine_runs)
        mine["tracemalloc_peak_mib"] = ours(src, Path(tmp) / "ours.mp3", args.bitrate, "--trace")[
            "tracemalloc_peak_mib"
        ]
        results["bot_audio"] = mine
        show("bot.audio.encode (lameenc)", mine)

        if not args.skip_pyav_lame:
            reference = ours(src, Path(tmp) / "pyav.mp3", args.bitrate, "--pyav-lame")
            results["pyav_libmp3lame"] = reference
            show("PyAV libmp3lame (reference)", reference)

        if ffmpeg_path is None:
            print("ffmpeg not installed: no comparison")
            results["ffmpeg"] = None
        else:
            theirs = median_of(ffmpeg_runs)
            results["ffmpeg"] = theirs
            show("ffmpeg", theirs)
            print(f"  command: {theirs['command']}")
            ratio = mine["wall_s"] / theirs["wall_s"]
            results["ratio_wall_ours_over_ffmpeg"] = ratio
            results["ratio_cpu_ours_over_ffmpeg"] = mine["cpu_s"] / theirs["cpu_s"]
            results["ratio_encode_ours_over_ffmpeg"] = mine["encode_s"] / theirs["wall_s"]
            verdict = "not slower than ffmpeg" if ratio <= 1.0 else "slower than ffmpeg"
            print(f"ratio (process wall time, ours / ffmpeg): {ratio:.2f} -> {verdict}")
            print(
                f"ratio (encode call only / ffmpeg process): "
                f"{results['ratio_encode_ours_over_ffmpeg']:.2f}; cpu time: "
                f"{results['ratio_cpu_ours_over_ffmpeg']:.2f}"
            )

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"figures written to {RESULTS.relative_to(ROOT)}")


def show(name: str, figures: dict[str, Any]) -> None:
    extra = ""
    if "encode_s" in figures:
        extra += f", encode() {figures['encode_s']:.2f} s"
    if "tracemalloc_peak_mib" in figures:
        extra += f", tracemalloc peak {figures['tracemalloc_peak_mib']:.1f} MiB"
    print(
        f"{name}: {figures['wall_s']:.2f} s wall (cpu {figures['cpu_s']:.2f} s){extra}, "
        f"peak RSS {figures['max_rss_mib']:.0f} MiB, output {figures['size'] / 1e6:.2f} MB"
    )


if __name__ == "__main__":
    main()
