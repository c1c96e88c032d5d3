"""Every reply model rendered on both platforms from one table of cases: the words a user
reads are the same on Discord and Telegram (only the markup differs), and so are the
buttons. The examples are the texts the conversation-layer issue asks for."""

from __future__ import annotations

import html
import itertools
import re
import time
from datetime import UTC, datetime, timedelta

import discord
import pytest

from bot import messages
from bot.chat import replies
from bot.chat.markup import Bold, Code, Text, When
from bot.chat.replies import EDIT_ACTIONS, Action, Button, Reply, StatusView
from bot.engine import Failure, Phase, Progress, QuotaLine, QuotaStatus, Refused
from bot.frontends import discord_render, telegram_render
from bot.frontends.discord_commands import HELP_STYLE as DISCORD_HELP
from bot.frontends.telegram_commands import HELP_STYLE as TELEGRAM_HELP
from bot.models import FailureKind, Job, JobState, Requester, SongResult
from bot.requests import GenerationRequest, InvalidRequest

NOW = 1_800_000_000.0
JOB = "0badf00d"


def job(state: JobState = JobState.RUNNING, lyrics: str | None = None, **fields: object) -> Job:
    request = GenerationRequest.build(mode="prompt", prompt="lofi piano about rain", seed=7)
    if lyrics is not None:
        fields["result"] = SongResult("x.wav", "wav", 5, 7, "fal", "", lyrics=lyrics)
    made = Job(
        id=JOB,
        requester=Requester("discord", "42", "9"),
        reply_target={},
        request=request,
        seed=7,
        state=state,
        created_at=NOW - 600,
    )
    for name, value in fields.items():
        setattr(made, name, value)
    return made


def status(progress: Progress) -> StatusView:
    return replies.status_view(JOB, "lofi piano about rain", progress, now=lambda: NOW)


def discord_words(markdown: str) -> str:
    """What a Discord user reads: markdown syntax removed."""
    text = re.sub(r"\[([^\]]*)\]\(<[^>]*>\)", r"\1", markdown)
    text = re.sub(r"^-# ", "", text, flags=re.M)
    text = text.replace("**", "").replace("`", "")
    return re.sub(r"\\(.)", r"\1", text)


def telegram_words(markup: str) -> str:
    """What a Telegram user reads: HTML tags removed, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


HEAD = f"lofi piano about rain \N{MIDDLE DOT} job {JOB}"

# (case, the model's text, the line a user must read, the buttons it carries)
CASES: list[tuple[str, StatusView | Reply, str, tuple[Action, ...]]] = [
    (
        "our queue, next",
        status(Progress(Phase.WAITING, position=1)),
        "\N{HOURGLASS WITH FLOWING SAND} Queued \N{MIDDLE DOT} next up",
        (Action.CANCEL,),
    ),
    (
        "our queue, third",
        status(Progress(Phase.WAITING, position=3)),
        "Queued \N{MIDDLE DOT} position 3",
        (Action.CANCEL,),
    ),
    (
        "starting at the provider",
        status(Progress(Phase.STARTING, provider="fal")),
        "Starting at fal",
        (Action.CANCEL,),
    ),
    (
        "the provider's queue",
        status(Progress(Phase.PROVIDER_QUEUE, position=3, provider="fal", eta_seconds=41)),
        "Waiting at fal, position 3 \N{MIDDLE DOT} about 40 s",
        (Action.CANCEL,),
    ),
    (
        "generating with progress",
        status(
            Progress(
                Phase.GENERATING, provider="fal", fraction=0.45, eta_seconds=14.6, since=NOW - 12
            )
        ),
        "Generating 45 % \N{MIDDLE DOT} 0:12 elapsed \N{MIDDLE DOT} about 15 s left",
        (Action.CANCEL,),
    ),
    (
        "generating, nothing known",
        status(Progress(Phase.GENERATING, provider="acestep", since=NOW - 75)),
        "\N{MULTIPLE MUSICAL NOTES} Generating \N{MIDDLE DOT} 1:15 elapsed",
        (Action.CANCEL,),
    ),
    (
        "uploading",
        status(Progress(Phase.UPLOADING)),
        "\N{OUTBOX TRAY} Uploading",
        (),
    ),
    (
        "provider failure",
        replies.failure_view(job(JobState.FAILED), Failure(FailureKind.PROVIDER_FAILED)),
        "The music service could not make this song. Your quota was refunded.",
        (Action.RETRY,),
    ),
    (
        "timed out",
        replies.failure_view(
            job(JobState.FAILED), Failure(FailureKind.TIMED_OUT, timeout_seconds=900)
        ),
        "This song took too long to make (over 15 min) and was stopped.",
        (Action.RETRY,),
    ),
    (
        "cancel kept the quota",
        replies.failure_view(
            job(JobState.CANCELLED), Failure(FailureKind.CANCELLED, quota_refunded=False)
        ),
        "Cancelled. It still counts against your quota, because the music service made it.",
        (),
    ),
    (
        "posted, status kept as a link",
        replies.posted_view(job(JobState.DELIVERED), "https://example.org/song"),
        "Posted: the song",
        (),
    ),
    (
        "queue",
        replies.queue_reply(
            [(job(JobState.QUEUED), 2), (job(JobState.RUNNING), None), (job(JobState.READY), None)]
        ),
        f"{JOB} Lofi Piano About Rain \N{EM DASH} waiting, position 2",
        (),
    ),
    (
        "history",
        replies.history_reply(
            [
                job(
                    JobState.DELIVERED,
                    reply_target={"result_url": "https://example.org/song"},
                    result=SongResult("x.wav", "wav", 5, 99, "fal", "lofi piano about rain"),
                )
            ]
        ),
        f"{JOB} lofi piano about rain \N{MIDDLE DOT} posted \N{MIDDLE DOT} seed 99",
        (),
    ),
    (
        "quota",
        replies.quota_reply(
            QuotaStatus(
                [
                    QuotaLine("user_jobs_per_day", "Songs today", 1, 20, "song"),
                    QuotaLine("user_seconds_per_day", "Seconds of audio today", 60, 1200, "s"),
                    QuotaLine("user_concurrent_jobs", "Songs at once", 1, None, "song"),
                ],
                datetime.fromtimestamp(NOW, UTC) + timedelta(hours=5),
                bypass=False,
            )
        ),
        "Songs today: 1 of 20 songs used, 19 left",
        (),
    ),
    (
        "bad input",
        replies.error_reply(InvalidRequest("duration", 999, "a whole number from 5 to 240")),
        "duration: 999 is not valid; a whole number from 5 to 240. See /help for every option.",
        (),
    ),
    (
        "our own error",
        replies.error_reply(RuntimeError("database on fire")),
        "Something went wrong; the operator has been told.",
        (),
    ),
    (
        "lyrics",
        replies.lyrics_reply(job(lyrics="x")),
        "Lyrics: Lofi Piano About Rain",
        (),
    ),
    (
        "cancelled",
        replies.cancelled_reply(job(JobState.CANCELLED, refunded=True)),
        f"Cancelled {JOB} (Lofi Piano About Rain). Your quota was refunded.",
        (),
    ),
    (
        "history of a deleted song",
        replies.history_reply(
            [
                job(
                    JobState.DELIVERED,
                    reply_target={"result_url": "https://example.org/gone"},
                    deleted_at=NOW,
                )
            ]
        ),
        f"{JOB} Lofi Piano About Rain \N{MIDDLE DOT} deleted \N{MIDDLE DOT} seed 7",
        (),
    ),
    (
        "song deleted",
        replies.song_deleted(job(JobState.DELIVERED), message_removed=True),
        f"Deleted {JOB} (Lofi Piano About Rain).",
        (),
    ),
    (
        "song deleted, message kept by the platform",
        replies.song_deleted(job(JobState.DELIVERED), message_removed=False),
        "its audio is gone, but the message could not be removed",
        (),
    ),
    (
        "settings",
        replies.settings_reply(
            "you",
            ["duration"],
            [("duration", 30, "yours"), ("instrumental", True, "community"), ("style", None, None)],
            ("Change with /settings duration=30",),
        ),
        "Duration: 30 s (yours)\nInstrumental: yes (community)\nStyle suffix: not set",
        (),
    ),
    (
        "settings with quick picks",
        replies.settings_reply(
            "you", [], [("duration", None, None)], (), replies.settings_buttons(["fal"])
        ),
        "Duration: not set",
        (Action.SET,) * 5,
    ),
    (
        "ban list",
        replies.banlist_reply(["bad word", "spam"], ["spam"], []),
        "Banned: spam\nBanned in this community (2)\nbad word, spam",
        (),
    ),
    (
        "banned words refused",
        replies.error_reply(Refused("community", messages.REFUSED_BY_BAN_LIST)),
        "I can't make a song from this request here. Please try other words.",
        (),
    ),
    (
        "songs switched off",
        replies.limits_reply([replies.songs_switched(False)], {}, None, songs_on=False),
        "Changed songs off",
        (),
    ),
]


@pytest.mark.parametrize("case, model, line, actions", CASES, ids=[c[0] for c in CASES])
def test_every_reply_reads_the_same_on_both_platforms(
    case: str, model: StatusView | Reply, line: str, actions: tuple[Action, ...]
) -> None:
    text: Text = model.text
    on_discord = discord_words(discord_render.markdown(text))
    on_telegram = telegram_words(telegram_render.html(text))
    assert line in on_discord and line in on_telegram, (on_discord, on_telegram)
    # Line by line the same words (a time reads in each platform's own way).
    pairs = zip(on_discord.splitlines(), on_telegram.splitlines(), text.lines, strict=True)
    for discord_line, telegram_line, spans in pairs:
        if not any(isinstance(span, When) for span in spans):
            assert discord_line == telegram_line == Text((spans,)).plain()
    if isinstance(model, StatusView) and model.rank < replies.FINAL_RANK:
        assert on_discord.splitlines()[0] == HEAD
    # The same buttons, with the same payloads.
    buttons = model.buttons
    assert tuple(b.action for b in buttons) == actions
    view = discord_render.view_of(buttons)
    discord_ids = [i.custom_id for i in view.children] if view else []  # type: ignore[attr-defined]
    assert discord_ids == [f"acestep:{b.payload}" for b in buttons]
    keyboard = telegram_render.keyboard(buttons)
    telegram_data = (
        [b.callback_data for row in keyboard.inline_keyboard for b in row] if keyboard else []
    )
    assert telegram_data == [b.payload for b in buttons]


def test_the_song_card_shows_the_same_facts_on_both_platforms() -> None:
    made = job(JobState.DELIVERED, lyrics="[verse] rain")
    card = replies.song_card(made, title="Rain on tin", duration=65, seed=7, provider="fal")
    embed = discord_render.song_embed(card, "cover.jpg")
    fields = {f.name: f.value for f in embed.fields}
    assert (embed.title, embed.description) == ("Rain on tin", "lofi piano about rain")
    assert fields["Duration"] == "1:05" and fields["Seed"] == "`7`" and fields["Provider"] == "fal"
    caption = telegram_words(telegram_render.caption(card))
    assert caption == "Prompt lofi piano about rain\nSeed 7 \N{MIDDLE DOT} 1:05 \N{MIDDLE DOT} fal"
    assert card.file_name == f"rain-on-tin-{JOB}.mp3"
    assert [b.action for b in card.buttons] == [
        Action.NEW,
        Action.SAME,
        Action.LYRICS,
        *EDIT_ACTIONS,
        Action.DELETE,
    ]
    # A provider that ignored the seed: both platforms say so next to it.
    unseeded = replies.song_card(
        made, title="x", duration=5, seed=3, provider="acestep", seed_honoured=False
    )
    note = "(this server does not honour seeds, so it will not make this song again)"
    assert note in telegram_words(telegram_render.caption(unseeded))
    fields = {f.name: f.value for f in discord_render.song_embed(unseeded, None).fields}
    assert fields["Seed"] == f"`3` {note}"
    instrumental = replies.song_card(
        job(JobState.DELIVERED, lyrics="[inst]"), title="x", duration=5, seed=1, provider="fal"
    )
    assert [b.action for b in instrumental.buttons] == [
        Action.NEW,
        Action.SAME,
        *EDIT_ACTIONS,
        Action.DELETE,
    ]


def test_a_described_song_shows_the_tags_written_for_it_and_offers_them() -> None:
    made = job(JobState.DELIVERED, lyrics="[verse] rain")
    assert made.result is not None
    made.result = SongResult(
        "x.wav", "wav", 5, 7, "fal", "", tags="lofi,  piano", lyrics="[verse] rain"
    )
    card = replies.song_card(made, title="Rain", duration=65, seed=7, provider="fal")
    fields = {f.name: f.value for f in discord_render.song_embed(card, None).fields}
    assert fields["Tags"] == "lofi, piano"
    caption = telegram_words(telegram_render.caption(card))
    assert caption.splitlines()[1] == "Tags lofi, piano"
    assert [b.action for b in card.buttons][-6:] == [Action.TAGS, *EDIT_ACTIONS, Action.DELETE]
    assert [b.label for b in card.buttons][-6:] == [
        "Use these tags",
        "Extend",
        "Remix",
        "Repaint",
        "Edit",
        "Delete",
    ]


def test_help_lists_each_option_once_on_both_platforms() -> None:
    for style in (DISCORD_HELP, TELEGRAM_HELP):
        text = replies.help_reply(style).text.plain()
        for option in ("duration", "seed", "instrumental", "guidance_scale"):
            listed = re.findall(rf"^{option}\b", text, flags=re.M)
            assert len(listed) == 1, (option, text)
        assert "/queue" in text and "/cancel" in text and "/limits" in text
    assert "duration=" in replies.help_reply(TELEGRAM_HELP).text.plain()


def test_plurals_and_no_doubled_words() -> None:
    one = QuotaLine("user_jobs_per_day", "Songs today", 0, 1, "song")
    status_one = QuotaStatus([one], datetime.fromtimestamp(NOW, UTC), bypass=False)
    assert "0 of 1 song used" in replies.quota_reply(status_one).text.plain()
    for _, model, _, _ in CASES:
        words = model.text.plain().split()
        doubled = [a for a, b in itertools.pairwise(words) if a.lower() == b.lower()]
        assert not doubled, model.text.plain()


def test_button_payloads_from_a_platform_are_checked() -> None:
    assert replies.parse_payload(f"same:{JOB}") == (Action.SAME, JOB)
    assert replies.parse_payload(f"cxl:{JOB}") == (Action.CANCEL, JOB)  # older messages
    for forged in ("same:../../etc", "drop:0badf00d", "new:", "new:0BADF00D", "x" * 500):
        assert replies.parse_payload(forged) is None
    assert Button(Action.RETRY, JOB).payload == f"retry:{JOB}"


def test_discord_text_neutralises_markdown_in_user_words() -> None:
    text = Text.of(Bold("**bold** `tick`"), " _under_ ", Code("a`b"))
    rendered = discord_render.markdown(text)
    assert rendered == "**\\*\\*bold\\*\\* \\`tick\\`** \\_under\\_ `a'b`"  # all escaped
    assert discord.utils.remove_markdown(rendered)  # still readable text


def test_times_read_as_each_platform_shows_them() -> None:
    later = time.time() + 3 * 3600 + 125
    text = Text.of("Resets ", When(later))
    assert discord_render.markdown(text) == f"Resets <t:{int(later)}:R>"
    assert telegram_render.html(text) == "Resets in 3 h 2 min"


def test_channels_show_as_mentions_on_discord_and_by_name_on_telegram() -> None:
    reply = replies.only_in_channels(["77", "88"], {"77": "Music"})
    assert discord_render.reply_content(reply) == "I make songs in <#77>, <#88> here."
    assert telegram_render.html(reply.text) == "I make songs in #Music, #88 here."


@pytest.mark.parametrize(
    ("payload", "parsed"),
    [
        ("set:duration=30", (Action.SET, "duration=30")),
        ("set:provider=any", (Action.SET, "provider=any")),
        ("set:0badf00d", None),  # a SET carries a choice, not a job
        ("new:duration=30", None),  # and a job button a job id
        ("set:duration=30;drop", None),
        ("set:" + "x" * 30 + "=1", None),
    ],
)
def test_button_payloads_are_checked_by_their_shape(
    payload: str, parsed: tuple[Action, str] | None
) -> None:
    assert replies.parse_payload(payload) == parsed
