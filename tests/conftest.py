"""Shared fixtures: settings on a temp data dir, a real SQLite database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.settings import Settings
from storage.database import Database
from storage.jobs import JobStore


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    """Settings that ignore the developer's environment and .env file."""
    values: dict[str, object] = {
        "data_dir": tmp_path / "data",
        "providers": ["fal"],
        "fal_key": "test-fal-key-123456",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[JobStore]:
    db = await Database.open(settings.db_path)
    yield JobStore(db)
    await db.close()
