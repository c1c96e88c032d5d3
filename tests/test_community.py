"""Community controls below the platforms: defaults and their precedence, the ban lists
(what they catch and what they leave alone), admission refusals that store and charge
nothing, deleting a song, the provider preference, and `jobs list --search`."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bot import moderation
from bot.chat import defaults
from bot.engine import Refused
from bot.models import Job, JobState, Requester
from bot.requests import GenerationRequest, InvalidRequest
from providers.fal import FalProvider
from providers.wavespeed import WaveSpeedProvider
from storage.community import MAX_BANNED, BanListFull, CommunityStore
from storage.jobs import JobStore, Limits
from tests.conftest import make_settings, open_db
from tests.enginekit import RecordingDelivery, open_engine, wait_for_state
from tests.fakes.fal import FakeFal
from tests.fakes.wavespeed import FakeWaveSpeed
from tests.test_cli import cli_env, run_cli

ANN = Requester("telegram", "42", "-100", "Ann")
NO_LIMITS = Limits(None, None, None, None, None)


def prompt(text: str, **fields: object) -> GenerationRequest:
    return GenerationRequest.build(mode="prompt", prompt=text, duration=5, **fields)


# ---- defaults ---------------------------------------------------------------------------


def test_an_explicit_option_beats_the_user_who_beats_the_community() -> None:
    found = defaults.Defaults(
        user={"duration": 30},
        community={"duration": 90, "instrumental": True, "style": "lo-fi", "provider": "fal"},
    )
    base = {"mode": "song", "tags": "piano"}
    applied = defaults.apply(base, found, ["fal", "wavespeed"])
    assert applied == {
        "mode": "song",
        "tags": "piano, lo-fi",
        "duration": 30,
        "instrumental": True,
        "provider": "fal",
    }
    explicit = defaults.apply({**base, "duration": 10, "instrumental": False}, found, ["fal"])
    assert (explicit["duration"], explicit["instrumental"]) == (10, False)
    # Nothing set anywhere: the request's own (the operator's) defaults.
    bare = GenerationRequest.build(**defaults.apply(base, defaults.Defaults(), ["fal"]))
    assert (bare.duration, bare.instrumental, bare.provider) == (60, False, None)


def test_the_style_suffix_is_never_doubled_and_a_too_long_result_is_named() -> None:
    found = defaults.Defaults(user={"style": "Dreamy"})
    once = defaults.apply({"mode": "prompt", "prompt": "rain, dreamy"}, found, [])
    assert once["prompt"] == "rain, dreamy"
    with pytest.raises(InvalidRequest, match=r"^prompt is too long with the style suffix"):
        defaults.apply({"mode": "prompt", "prompt": "x" * 495}, found, [])


def test_a_preferred_provider_that_is_no_longer_configured_is_ignored() -> None:
    found = defaults.Defaults(user={"provider": "replicate"})
    assert "provider" not in defaults.apply({"mode": "prompt", "prompt": "x"}, found, ["fal"])


@pytest.mark.parametrize(
    ("name", "raw", "stored"),
    [
        ("duration", "30", 30),
        ("duration", 45, 45),
        ("instrumental", "on", True),
        ("style", "  dreamy,  lo-fi , ", "dreamy, lo-fi"),
        ("provider", "FAL", "fal"),
        ("duration", "default", None),
    ],
)
def test_defaults_are_parsed_as_typed(name: str, raw: object, stored: object) -> None:
    assert defaults.parse(name, raw, ["fal"]) == stored


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("duration", "999", "duration: 999 is not valid; a whole number of seconds from 5 to 240"),
        ("provider", "suno", "provider: 'suno' is not valid; one of fal, any"),
        ("colour", "red", "setting: 'colour' is not valid; one of duration, instrumental"),
        ("style", "x" * 101, "style: 'xxxxx"),
    ],
)
def test_bad_defaults_name_the_value_and_what_is_allowed(
    name: str, raw: object, message: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        defaults.parse(name, raw, ["fal"])
    assert str(caught.value).startswith(message)


def test_vocal_language_and_takes_are_offered_once_requests_have_them() -> None:
    offered = defaults.offered()
    assert offered[:2] == ("duration", "instrumental")
    assert ("vocal_language" in offered) == ("vocal_language" in GenerationRequest.model_fields)


# ---- ban lists --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "a Bad Word here",
        "a bad-word here",
        "\uff22\uff21\uff24 \uff37\uff2f\uff32\uff24",  # full-width letters
        "bäd wörd",  # accents
        "b\u200bad word",  # an invisible character inside
        "b4d w0rd",  # digits for letters
        "a b a d w o r d",  # spelled out
    ],
)
def test_a_banned_phrase_is_found_however_it_is_written(text: str) -> None:
    assert moderation.first_banned(text, ["Bad Word"]) == "bad word"


@pytest.mark.parametrize("text", ["classy bassline", "badwordsmith", "a word that is bad"])
def test_whole_words_only(text: str) -> None:
    assert moderation.first_banned(text, ["ass", "bad word"]) is None


def test_every_text_of_a_request_is_checked() -> None:
    request = GenerationRequest.build(
        mode="song", tags="rock", lyrics="[verse]\nsomething rude", title="Fine"
    )
    assert moderation.first_banned(moderation.request_text(request), ["rude"]) == "rude"
    titled = GenerationRequest.build(mode="song", tags="rock", title="Rude Title")
    assert moderation.first_banned(moderation.request_text(titled), ["rude"]) == "rude"


async def test_refused_requests_store_and_charge_nothing_and_are_counted(tmp_path: Path) -> None:
    fake = FakeFal()
    async with fake.running() as url:
        settings = make_settings(tmp_path, fal_queue_url=url, banned_words=["forbidden"])
        engine = await open_engine(settings, [FalProvider(fake.key, url, poll_interval=0.01)])
        try:
            await engine.ban("telegram:-100", ["rude"], ANN)
            for text, listed_by in (("so forbidden", "operator"), ("so RUDE", "community")):
                with pytest.raises(Refused) as caught:
                    await engine.submit(prompt(text), ANN, {})
                assert caught.value.listed_by == listed_by
                assert str(caught.value) == (
                    "I can't make a song from this request here. Please try other words."
                )
            assert await engine.store.recent(10) == []
            assert await engine.store.ledger() == []
            assert fake.submit_count == 0
            usage, _ = await engine.store.usage(ANN, engine.limits())
            assert (usage.user_jobs, usage.spend_usd) == (0, 0.0)
            metrics = engine.metrics.render().decode()
            assert 'acestep_moderation_refusals_total{list="operator"} 1.0' in metrics
            assert 'acestep_moderation_refusals_total{list="community"} 1.0' in metrics
            # Another community's list does not apply.
            elsewhere = Requester("telegram", "42", "-200")
            await engine.submit(prompt("so rude"), elsewhere, {})
        finally:
            await engine.close()


async def test_ban_list_storage(tmp_path: Path, db_url: str | None) -> None:
    db = await open_db(db_url, tmp_path / "db.sqlite3")
    try:
        store = CommunityStore(db)
        assert await store.ban("c", ["b", "a", "b"], "u") == ["b", "a"]
        assert await store.ban("c", ["a", "z"], "u") == ["z"]
        assert await store.banned("c") == ["a", "b", "z"]
        assert await store.unban("c", ["a", "nope"]) == ["a"]
        with pytest.raises(BanListFull):
            await store.ban("c", [f"w{i}" for i in range(MAX_BANNED)], "u")
        assert await store.banned("c") == ["b", "z"]  # none of a refused batch is added
        await store.set_defaults("user", "discord:1", {"duration": 30, "style": "x"})
        await store.set_defaults("user", "discord:1", {"style": None})
        assert await store.defaults("user", "discord:1") == {"duration": 30}
        await store.clear_defaults("user", "discord:1")
        assert await store.defaults("user", "discord:1") == {}
    finally:
        await db.close()


# ---- deleting a song --------------------------------------------------------------------


async def test_delete_keeps_the_ledger_and_removes_the_audio(tmp_path: Path) -> None:
    fake = FakeFal(queue_polls=0, progress_polls=0)
    delivery = RecordingDelivery(platform="telegram")
    async with fake.running() as url:
        settings = make_settings(tmp_path, fal_queue_url=url)
        engine = await open_engine(
            settings, [FalProvider(fake.key, url, poll_interval=0.01)], delivery
        )
        try:
            admission = await engine.submit(prompt("oops"), ANN, {})
            await wait_for_state(engine, admission.job_id, ("delivered",))
            before = await engine.store.ledger(admission.job_id)
            assert list(settings.audio_dir.glob(f"{admission.job_id}.*"))
            job = await engine.delete_song(admission.job_id, ANN)
            assert job.deleted and job.state == JobState.DELIVERED
            assert list(settings.audio_dir.glob(f"{admission.job_id}.*")) == []
            assert await engine.store.ledger(admission.job_id) == before
            # Marked once: a second delete changes nothing.
            assert not await engine.store.mark_deleted(job.id, "someone:else")
            assert (await engine.get_job(job.id)).deleted_by == ANN.key  # type: ignore[union-attr]
        finally:
            await engine.close()


# ---- the provider preference ------------------------------------------------------------


async def test_a_preferred_provider_is_tried_first(tmp_path: Path) -> None:
    fal_fake, ws_fake = FakeFal(), FakeWaveSpeed()
    async with fal_fake.running() as f_url, ws_fake.running() as w_url:
        providers = [
            FalProvider(fal_fake.key, f_url, poll_interval=0.01),
            WaveSpeedProvider(ws_fake.api_key, w_url, poll_interval=0.01, retry_backoff=0.01),
        ]
        delivery = RecordingDelivery(platform="telegram")
        engine = await open_engine(make_settings(tmp_path), providers, delivery)
        try:
            plain = await engine.submit(prompt("one"), ANN, {})
            preferred = await engine.submit(prompt("two", provider="wavespeed"), ANN, {})
            assert preferred.provider == "wavespeed"
            first = await wait_for_state(engine, plain.job_id, ("delivered",))
            second = await wait_for_state(engine, preferred.job_id, ("delivered",))
            assert (first.provider, second.provider) == ("fal", "wavespeed")
        finally:
            await engine.close()


# ---- jobs list --search -----------------------------------------------------------------


async def test_operators_find_who_asked_for_what(tmp_path: Path, db_url: str | None) -> None:
    settings = make_settings(tmp_path)
    db = await open_db(db_url, settings.db_path)
    store = JobStore(db)
    for i, (who, request) in enumerate(
        [
            (ANN, prompt("Rainy night in Tokyo")),
            (Requester("discord", "7"), GenerationRequest.build(mode="song", tags="rock")),
            (
                Requester("discord", "8"),
                GenerationRequest.build(mode="song", tags="folk", lyrics="[verse]\nTokyo 100%"),
            ),
        ]
    ):
        job = Job(f"0000000{i}", who, {}, request, 1, JobState.QUEUED)
        await store.admit(job, NO_LIMITS, bypass_quotas=True, now=time.time() + i)
    await db.close()

    env = cli_env(tmp_path, **({"DATABASE_URL": db_url} if db_url else {}))
    code, out, err = await run_cli(["jobs", "list", "--search", "tokyo"], env, tmp_path)
    assert code == 0, err
    rows = out.splitlines()[1:]
    assert [r.split()[0] for r in rows] == ["00000002", "00000000"]  # newest first
    assert "telegram:42" in out and "discord:8" in out and "discord:7" not in out
    code, out, _ = await run_cli(["jobs", "list", "--search", "100%"], env, tmp_path)
    assert [r.split()[0] for r in out.splitlines()[1:]] == ["00000002"]  # % is literal
    code, out, _ = await run_cli(["jobs", "list", "--search", "nothing like it"], env, tmp_path)
    assert out.strip() == "no jobs"
