"""One working bot per DATA_DIR: an exclusive OS file lock held while the engine runs.

`acestep-bot run` and `acestep-bot generate` resume every unfinished job they find at
start, so two of them on one database would each take the other's jobs for crash
leftovers and submit and post them twice. Each holds `flock(LOCK_EX)` on
`DATA_DIR/acestep-bot.lock` for as long as it runs. The kernel drops the lock when the
process ends however it ends (kill -9 included), so a crash never leaves a stale lock
behind. The file keeps the holder's pid and command, for the message a second instance
prints. Read-only operator commands and the one-row writes (`jobs cancel`, `quota set`)
do not take it: SQLite's own locking serialises them with the running bot.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = "acestep-bot.lock"


class AlreadyRunning(Exception):
    """Work only one process may do is another's; str() says whose and what to do."""


class DataDirLocked(AlreadyRunning):
    """Another process holds the data directory; str() says which and what to do."""

    def __init__(self, path: Path, holder: str) -> None:
        self.path = path
        self.holder = holder
        super().__init__(
            f"another acestep-bot ({holder}) is already using {path.parent}: "
            f"only one `run` or `generate` may work on a data directory at a time "
            f"(lock {path}). Stop it first, or set another DATA_DIR."
        )


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 200).decode("utf-8", "replace").split()
    if text and text[0].isdigit():
        return f"pid {text[0]}" + (f", `{' '.join(text[1:])}`" if len(text) > 1 else "")
    return "pid unknown"


@contextlib.contextmanager
def hold(data_dir: Path, command: str) -> Iterator[Path]:
    """Hold the data directory's lock for the block; raises DataDirLocked at once (no
    waiting) when another process has it. Yields the lock file's path."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_NAME
    # Opened without O_TRUNC: the holder's pid must stay readable until we own the lock.
    # Python's descriptors are not inherited by child processes, so no renderer or
    # other subprocess can keep the lock alive after this process dies.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataDirLocked(path, _holder(fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} acestep-bot {command}\n".encode(), 0)
        try:
            yield path
        finally:
            # Never unlink: a process that opened the old file between our unlink and
            # close would lock an orphan inode while the next one locks a new file.
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


class SingletonHeld(AlreadyRunning):
    """A database-wide hold (`Store.hold_singleton`) is another process's, e.g. the one
    Telegram getUpdates poller; `what` names the work and `fix` how to share it."""

    def __init__(self, what: str, holder: str, fix: str) -> None:
        self.holder = holder
        super().__init__(f"{what} is already done by another acestep-bot ({holder}): {fix}")
