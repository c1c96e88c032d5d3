"""Discord sharding: the real discord.py AutoShardedClient against the fake gateway, which
routes each guild's events to the shard Discord would ((guild_id >> 22) % count)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from bot.frontends.discord_frontend import DiscordClient
from bot.settings import Settings
from tests.conftest import make_settings
from tests.fakes.discord_api import FakeDiscord
from tests.fakes.fal import FakeFal
from tests.fakes.http import serve
from tests.test_cli import cli_env, run_cli
from tests.test_discord import Servers, start_bot, stop_bot
from tests.test_discord import _restore_discord_endpoints as _restore  # noqa: F401


@pytest.fixture(autouse=True)
def _no_identify_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    # Discord spaces IDENTIFYs 5 s apart; the fake does not need it.
    monkeypatch.setattr(DiscordClient, "identify_spacing", 0.0)


def guild_on(shard: int, count: int) -> str:
    """A guild id whose events Discord sends on `shard` of `count`."""
    return str(((1 << 40) + shard) << 22)


async def wait_shards(fake: FakeDiscord, shards: list[int]) -> None:
    await fake.wait_until(lambda: fake.connected_shards() == shards)


async def song_over_the_gateway(fake: FakeDiscord, bot: Any, guild: str) -> None:
    payload = fake.slash("song", {"prompt": "shard song", "duration": 5}, guild_id=guild)
    await fake.dispatch("INTERACTION_CREATE", payload)
    song = await bot.song_message(payload)
    assert song.attachments


async def test_default_runs_every_shard_of_the_recommended_count(tmp_path: Path) -> None:
    fake = FakeDiscord(recommended_shards=2)
    fal = FakeFal(queue_polls=1, progress_polls=1)
    async with serve(fake.app()) as base, fal.running() as fal_url:
        servers = Servers(fake, base, fal, fal_url)
        bot = await start_bot(tmp_path, servers, connect_gateway=True)
        try:
            await wait_shards(fake, [0, 1])
            assert ("GET", "/api/v10/gateway/bot") in fake.requests
            assert sorted(tuple(d["shard"]) for d in fake.identifies) == [(0, 2), (1, 2)]
            await asyncio.wait_for(bot.frontend.client.wait_until_ready(), timeout=10)
            assert bot.frontend.is_connected()
            # A guild on the second shard is served by this one process.
            await song_over_the_gateway(fake, bot, guild_on(1, 2))
        finally:
            await stop_bot(bot)
        assert not bot.frontend.is_connected()


async def test_shard_ids_run_only_this_process_share(tmp_path: Path) -> None:
    fake = FakeDiscord(recommended_shards=1)  # ignored: the count is set
    fal = FakeFal(queue_polls=1, progress_polls=1)
    async with serve(fake.app()) as base, fal.running() as fal_url:
        gateway = base.replace("http://", "ws://") + "/gateway"
        servers = Servers(fake, base, fal, fal_url)
        bot = await start_bot(
            tmp_path,
            servers,
            connect_gateway=True,
            discord_gateway_url=gateway,
            discord_shard_count=4,
            discord_shard_ids=[1, 3],
        )
        try:
            await wait_shards(fake, [1, 3])
            assert sorted(tuple(d["shard"]) for d in fake.identifies) == [(1, 4), (3, 4)]
            assert ("GET", "/api/v10/gateway/bot") not in fake.requests
            await song_over_the_gateway(fake, bot, guild_on(3, 4))
            # A guild on shard 0 belongs to another process: nothing here receives it.
            with pytest.raises(AssertionError, match="shard 0"):
                await fake.dispatch(
                    "INTERACTION_CREATE", fake.slash("help", guild_id=guild_on(0, 4))
                )
        finally:
            await stop_bot(bot)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"discord_shard_ids": "0,1"}, "DISCORD_SHARD_IDS needs DISCORD_SHARD_COUNT"),
        (
            {"discord_shard_count": "4", "discord_shard_ids": "1,4,7"},
            "shard ids 4, 7 are outside 0-3 (DISCORD_SHARD_COUNT is 4)",
        ),
        (
            {"discord_shard_count": "4", "discord_shard_ids": "1,2,1"},
            "shard ids 1 are listed twice",
        ),
        ({"discord_shard_count": "0"}, "greater than or equal to 1"),
    ],
)
def test_shard_settings_are_checked(tmp_path: Path, env: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        make_settings(tmp_path, **env)


def test_shard_ids_parse_from_a_comma_list(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, discord_shard_count="6", discord_shard_ids="4, 0,5")
    assert settings.discord_shard_ids == [4, 0, 5]
    assert Settings(_env_file=None).discord_shard_ids == []  # type: ignore[call-arg]


async def test_run_refuses_bad_shard_ids_with_one_line(tmp_path: Path) -> None:
    env = cli_env(
        tmp_path,
        DISCORD_TOKEN="t",
        FAL_KEY="k",
        DISCORD_SHARD_COUNT="2",
        DISCORD_SHARD_IDS="2",
    )
    code, _out, err = await run_cli(["run"], env, tmp_path)
    assert code == 2
    assert "DISCORD_SHARD_IDS" in err and "shard ids 2 are outside 0-1" in err
    assert not (tmp_path / "data" / "acestep-bot.sqlite3").exists()  # nothing started
