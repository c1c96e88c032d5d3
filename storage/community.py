"""What users and communities choose for themselves: song defaults (`/settings`) and the
ban list of words and phrases (`/banlist`). The only place their SQL lives."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from storage.database import Database
from storage.pg import PgDatabase

SCOPES = ("user", "community")
# A community's ban list holds at most this many phrases (each checked on every request).
MAX_BANNED = 500


class BanListFull(Exception):
    """Adding these phrases would take the list past MAX_BANNED."""

    def __init__(self, have: int, adding: int) -> None:
        self.have = have
        self.adding = adding
        super().__init__(f"{have} phrases listed, {adding} more would pass {MAX_BANNED}")


class CommunityStore:
    """Song defaults per user and community, and each community's banned phrases. Each
    method is one transaction on the database's writer or reader thread."""

    def __init__(self, db: Database | PgDatabase) -> None:
        self.db = db

    # ---- song defaults ---------------------------------------------------------------

    async def defaults(self, scope: str, subject: str) -> dict[str, Any]:
        """The defaults a user or community set (name -> value); empty when none."""
        _check_scope(scope)
        return await self.db.read(
            lambda conn: {
                row[0]: json.loads(row[1])
                for row in conn.execute(
                    "SELECT name, value FROM song_defaults WHERE scope = ? AND subject = ?",
                    (scope, subject),
                )
            }
        )

    async def set_defaults(self, scope: str, subject: str, values: dict[str, Any]) -> None:
        """Set several defaults at once; a value of None removes that default."""
        _check_scope(scope)
        now = time.time()

        def write(conn: sqlite3.Connection) -> None:
            for name, value in values.items():
                if value is None:
                    conn.execute(
                        "DELETE FROM song_defaults WHERE scope = ? AND subject = ? AND name = ?",
                        (scope, subject, name),
                    )
                    continue
                conn.execute(
                    "INSERT INTO song_defaults (scope, subject, name, value, updated_at)"
                    " VALUES (?,?,?,?,?) ON CONFLICT (scope, subject, name)"
                    " DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                    (scope, subject, name, json.dumps(value), now),
                )

        await self.db.write(write)

    async def clear_defaults(self, scope: str, subject: str) -> None:
        _check_scope(scope)
        await self.db.write(
            lambda conn: conn.execute(
                "DELETE FROM song_defaults WHERE scope = ? AND subject = ?", (scope, subject)
            )
        )

    # ---- ban list --------------------------------------------------------------------

    async def banned(self, community: str) -> list[str]:
        """A community's banned phrases, alphabetically."""
        return await self.db.read(
            lambda conn: [
                str(row[0])
                for row in conn.execute(
                    "SELECT phrase FROM banned_phrases WHERE community = ? ORDER BY phrase",
                    (community,),
                )
            ]
        )

    async def ban(self, community: str, phrases: list[str], by: str) -> list[str]:
        """Add phrases (already normalised); returns those that were not listed yet.
        Raises BanListFull, adding none, when the list would pass MAX_BANNED."""
        now = time.time()

        def write(conn: sqlite3.Connection) -> list[str]:
            listed = {
                str(row[0])
                for row in conn.execute(
                    "SELECT phrase FROM banned_phrases WHERE community = ?", (community,)
                )
            }
            new = [p for p in dict.fromkeys(phrases) if p not in listed]
            if len(listed) + len(new) > MAX_BANNED:
                raise BanListFull(len(listed), len(new))
            conn.executemany(
                "INSERT INTO banned_phrases (community, phrase, added_by, added_at)"
                " VALUES (?,?,?,?)",
                [(community, phrase, by, now) for phrase in new],
            )
            return new

        return await self.db.write(write)

    async def unban(self, community: str, phrases: list[str]) -> list[str]:
        """Remove phrases; returns those that were listed."""

        def write(conn: sqlite3.Connection) -> list[str]:
            removed = []
            for phrase in dict.fromkeys(phrases):
                cur = conn.execute(
                    "DELETE FROM banned_phrases WHERE community = ? AND phrase = ?",
                    (community, phrase),
                )
                if cur.rowcount:
                    removed.append(phrase)
            return removed

        return await self.db.write(write)


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; one of {', '.join(SCOPES)}")
