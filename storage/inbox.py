"""Platform updates received and not yet handled: the only place their SQL lives.

Telegram's getUpdates confirms a batch when the next one is asked for. Waiting for every
handler before asking again makes each /help wait behind a burst of /song admissions; not
waiting would lose a /song on a crash. So a batch is written here (one transaction, on
disk before COMMIT returns) before it is confirmed, each row goes once its handler has
run, and what is left after a crash is handled again at start.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable

from storage.database import Database
from storage.pg import PgDatabase


class UpdateInbox:
    """Received updates per `source` (e.g. "telegram:<bot id>"), until handled."""

    def __init__(self, db: Database | PgDatabase) -> None:
        self.db = db

    async def keep(
        self,
        source: str,
        updates: Iterable[tuple[int, str]],
        handled: Iterable[int] = (),
        now: float | None = None,
    ) -> None:
        """In one transaction: forget the `handled` update ids and keep the new
        `updates` (id, payload JSON). One already kept stays as it was."""
        at = time.time() if now is None else now
        rows = [(source, int(uid), payload, at) for uid, payload in updates]
        gone = [(source, int(uid)) for uid in handled]

        def write(conn: sqlite3.Connection) -> None:
            if gone:
                conn.executemany(
                    "DELETE FROM update_inbox WHERE source = ? AND update_id = ?", gone
                )
            if rows:
                conn.executemany(
                    "INSERT INTO update_inbox (source, update_id, payload, received_at)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (source, update_id) DO NOTHING",
                    rows,
                )

        if rows or gone:
            # Polling waits on this: ahead of the admissions the last batch queued.
            await self.db.write(write, exclusive=False, urgent=True)

    async def pending(self, source: str) -> list[tuple[int, str]]:
        """The updates kept and not handled, oldest first."""

        def read(conn: sqlite3.Connection) -> list[tuple[int, str]]:
            return [
                (int(r[0]), str(r[1]))
                for r in conn.execute(
                    "SELECT update_id, payload FROM update_inbox WHERE source = ?"
                    " ORDER BY update_id",
                    (source,),
                ).fetchall()
            ]

        return await self.db.read(read)
