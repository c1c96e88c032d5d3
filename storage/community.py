"""What users and communities choose for themselves: song defaults (`/settings`) and the
ban list of words and phrases (`/banlist`). The only place their SQL lives."""

from __future__ import annotations

import json
import time
from typing import Any

from storage.database import Database

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
    """Song defaults per user and community, and each community's banned phrases."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # ---- song defaults ---------------------------------------------------------------

    async def defaults(self, scope: str, subject: str) -> dict[str, Any]:
        """The defaults a user or community set (name -> value); empty when none."""
        _check_scope(scope)
        async with self.db.read() as conn:
            rows = await conn.execute_fetchall(
                "SELECT name, value FROM song_defaults WHERE scope = ? AND subject = ?",
                (scope, subject),
            )
        return {row[0]: json.loads(row[1]) for row in rows}

    async def set_defaults(self, scope: str, subject: str, values: dict[str, Any]) -> None:
        """Set several defaults at once; a value of None removes that default."""
        _check_scope(scope)
        now = time.time()
        async with self.db.transaction() as conn:
            for name, value in values.items():
                if value is None:
                    await conn.execute(
                        "DELETE FROM song_defaults WHERE scope = ? AND subject = ? AND name = ?",
                        (scope, subject, name),
                    )
                    continue
                await conn.execute(
                    "INSERT INTO song_defaults (scope, subject, name, value, updated_at)"
                    " VALUES (?,?,?,?,?) ON CONFLICT (scope, subject, name)"
                    " DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                    (scope, subject, name, json.dumps(value), now),
                )

    async def clear_defaults(self, scope: str, subject: str) -> None:
        _check_scope(scope)
        async with self.db.transaction() as conn:
            await conn.execute(
                "DELETE FROM song_defaults WHERE scope = ? AND subject = ?", (scope, subject)
            )

    # ---- ban list --------------------------------------------------------------------

    async def banned(self, community: str) -> list[str]:
        """A community's banned phrases, alphabetically."""
        async with self.db.read() as conn:
            rows = await conn.execute_fetchall(
                "SELECT phrase FROM banned_phrases WHERE community = ? ORDER BY phrase",
                (community,),
            )
        return [str(row[0]) for row in rows]

    async def ban(self, community: str, phrases: list[str], by: str) -> list[str]:
        """Add phrases (already normalised); returns those that were not listed yet.
        Raises BanListFull, adding none, when the list would pass MAX_BANNED."""
        now = time.time()
        async with self.db.transaction() as conn:
            rows = await conn.execute_fetchall(
                "SELECT phrase FROM banned_phrases WHERE community = ?", (community,)
            )
            listed = {str(row[0]) for row in rows}
            new = [p for p in dict.fromkeys(phrases) if p not in listed]
            if len(listed) + len(new) > MAX_BANNED:
                raise BanListFull(len(listed), len(new))
            for phrase in new:
                await conn.execute(
                    "INSERT INTO banned_phrases (community, phrase, added_by, added_at)"
                    " VALUES (?,?,?,?)",
                    (community, phrase, by, now),
                )
        return new

    async def unban(self, community: str, phrases: list[str]) -> list[str]:
        """Remove phrases; returns those that were listed."""
        removed = []
        async with self.db.transaction() as conn:
            for phrase in dict.fromkeys(phrases):
                cur = await conn.execute(
                    "DELETE FROM banned_phrases WHERE community = ? AND phrase = ?",
                    (community, phrase),
                )
                if cur.rowcount:
                    removed.append(phrase)
        return removed


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; one of {', '.join(SCOPES)}")
