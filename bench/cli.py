"""How long operator commands take to start: `acestep-bot --help`, `config check` and two
database commands, against a bare interpreter started the same way in the same run.

Each command runs as a fresh process (`python -m bot ...`) on an empty DATA_DIR, several
times in turn; the table shows the median wall time and its ratio to `python -c pass`,
and the median CPU time (user + system), which other work on the machine disturbs less.

    python bench/cli.py            # 15 runs of each
    python bench/cli.py --quick    # 3 runs of each
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._util import machine, median, table, write_results  # noqa: E402

TARGET_S = 0.3  # `--help` and `config check`, from the issue

COMMANDS: list[tuple[str, list[str]]] = [
    ("python -c pass (reference)", ["-c", "pass"]),
    ("acestep-bot --help", ["-m", "bot", "--help"]),
    ("acestep-bot config check", ["-m", "bot", "config", "check"]),
    ("acestep-bot jobs list", ["-m", "bot", "jobs", "list"]),
    ("acestep-bot stats", ["-m", "bot", "stats"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 runs of each command")
    args = parser.parse_args()
    runs = 3 if args.quick else 15
    times: dict[str, list[float]] = {name: [] for name, _ in COMMANDS}
    cpu: dict[str, list[float]] = {name: [] for name, _ in COMMANDS}
    with tempfile.TemporaryDirectory(prefix="acestep-cli-") as tmp:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("FAL_", "DISCORD_", "TELEGRAM_", "PROVIDERS"))
        }
        env.update(PYTHONPATH=str(ROOT), DATA_DIR=str(Path(tmp) / "data"), LOG_LEVEL="WARNING")
        for _ in range(runs):  # in turn, so that load changes hit every command alike
            for name, argv in COMMANDS:
                started = time.perf_counter()
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                subprocess.run(
                    [sys.executable, *argv],
                    env=env,
                    cwd=tmp,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    check=False,
                )
                times[name].append(time.perf_counter() - started)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu[name].append(
                    after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
                )
    reference = median(times[COMMANDS[0][0]])
    rows = [
        [
            name,
            f"{median(values):.3f}",
            f"{median(values) / reference:.1f}x",
            f"{median(cpu[name]):.3f}",
        ]
        for name, values in times.items()
    ]
    print(table(["command", "median s", "vs bare python", "CPU s"], rows))
    for name in ("acestep-bot --help", "acestep-bot config check"):
        got = median(times[name])
        verdict = "OK" if got < TARGET_S else "MISSED"
        print(f"{name}: {got:.3f} s (target < {TARGET_S:g} s) {verdict}")
    path = write_results(
        "cli",
        {
            "runs": runs,
            "median_s": {k: median(v) for k, v in times.items()},
            "cpu_s": {k: median(v) for k, v in cpu.items()},
        },
    )
    print(f"machine: {machine()}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
