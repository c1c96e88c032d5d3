"""The outgoing scheduler for Telegram (bot/frontends/telegram_pacing.py), driven the way
python-telegram-bot drives its rate limiter: one `process_request` per Bot API call.
The calls here are recorded instead of sent; the end-to-end overload run is
bench/telegram_overload.py."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from telegram.error import RetryAfter

from bot.frontends.telegram_pacing import PacedSender, Priority

# python-telegram-bot itself reads the deprecated int `retry_after` when it builds the error.
pytestmark = pytest.mark.filterwarnings("ignore:.*retry_after.*")

GROUP = -100500


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str, float]] = []  # (endpoint, label, loop time)
        self.fail: dict[str, int] = {}

    def call(self, endpoint: str, label: str) -> Any:
        async def callback() -> bool:
            if self.fail.get(label):
                self.fail[label] -= 1
                raise RetryAfter(timedelta(seconds=1))
            self.sent.append((endpoint, label, asyncio.get_running_loop().time()))
            return True

        return callback


async def send(
    pacer: PacedSender,
    rec: Recorder,
    endpoint: str,
    label: str,
    chat: int = GROUP,
    priority: Priority | None = None,
    **data: Any,
) -> Any:
    args = {"priority": priority} if priority is not None else None
    return await pacer.process_request(
        rec.call(endpoint, label), (), {}, endpoint, {"chat_id": chat, **data}, args
    )


async def test_a_group_gets_at_most_its_budget_and_replies_jump_the_queue() -> None:
    # 20 in any 2 s (Telegram's is 20 a minute: the same shape, slower).
    pacer = PacedSender(group_budget=(20, 2.0))
    rec = Recorder()
    edits = [
        asyncio.create_task(send(pacer, rec, "editMessageText", f"edit {i}", message_id=100 + i))
        for i in range(40)
    ]
    await asyncio.sleep(0.3)
    reply = asyncio.create_task(send(pacer, rec, "sendMessage", "reply to /help"))
    song = asyncio.create_task(send(pacer, rec, "sendAudio", "the song"))
    await asyncio.gather(reply, song, *edits)
    labels = [label for _, label, _ in rec.sent]
    # The reply and the song went out right after the burst, ahead of waiting edits.
    assert labels.index("reply to /help") < labels.index("the song") < labels.index("edit 39")
    assert labels.index("reply to /help") <= 22
    times = [t for _, _, t in rec.sent]
    # Never more than the budget in any 2 s window.
    for i, start in enumerate(times):
        assert sum(1 for t in times[i:] if t - start < 2.0) <= 20 + 1
    await pacer.shutdown()


async def test_status_edits_of_one_message_are_coalesced_to_the_latest() -> None:
    pacer = PacedSender(private_per_second=2)
    rec = Recorder()
    first = asyncio.create_task(send(pacer, rec, "sendMessage", "busy", chat=42))
    edits = [
        asyncio.create_task(
            send(pacer, rec, "editMessageText", f"state {i}", chat=42, message_id=7)
        )
        for i in range(10)
    ]
    results = await asyncio.gather(first, *edits)
    assert all(results)
    labels = [label for _, label, _ in rec.sent]
    # Everything was answered; only the first and the latest state were sent.
    assert labels[0] == "busy" and labels[-1] == "state 9"
    assert len([lbl for lbl in labels if lbl.startswith("state")]) <= 2
    assert pacer.dropped["editMessageText"] >= 8
    await pacer.shutdown()


async def test_a_final_status_edit_is_never_dropped_or_coalesced_away() -> None:
    pacer = PacedSender(private_per_second=1)
    rec = Recorder()
    progress = asyncio.create_task(
        send(pacer, rec, "editMessageText", "progress", chat=42, message_id=7)
    )
    final = asyncio.create_task(
        send(
            pacer,
            rec,
            "editMessageText",
            "final",
            chat=42,
            message_id=7,
            priority=Priority.NOTICE,
        )
    )
    await asyncio.gather(progress, final)
    assert [label for _, label, _ in rec.sent][-1] == "final"
    await pacer.shutdown()


async def test_chat_actions_are_skipped_while_the_chat_is_busy() -> None:
    pacer = PacedSender(private_per_second=1)
    rec = Recorder()
    await send(pacer, rec, "sendMessage", "first", chat=42)
    await send(pacer, rec, "sendMessage", "second", chat=42)  # a short burst of two
    assert await send(pacer, rec, "sendChatAction", "typing", chat=42) is True
    assert [label for _, label, _ in rec.sent] == ["first", "second"]
    assert pacer.dropped["sendChatAction"] == 1
    await pacer.shutdown()


async def test_a_429_holds_the_chat_and_is_retried() -> None:
    sleeps: list[float] = []

    async def sleep(delay: float) -> None:
        sleeps.append(delay)

    pacer = PacedSender(sleep=sleep, private_per_second=100)
    rec = Recorder()
    rec.fail["the song"] = 2
    await send(pacer, rec, "sendAudio", "the song", chat=42)
    assert [label for _, label, _ in rec.sent] == ["the song"]
    assert sleeps == [1.0, 1.0]
    await pacer.shutdown()


async def test_each_retry_after_a_429_takes_its_turn_in_the_global_budget() -> None:
    # A retry is one more message for Telegram's global limit: one that skipped the
    # budget made the next 429 likelier for every chat.
    async def sleep(delay: float) -> None:
        pass

    pacer = PacedSender(sleep=sleep, private_per_second=100)
    permits: list[int] = []
    take = pacer._global_permit

    async def counted(priority: int) -> None:
        permits.append(priority)
        await take(priority)

    pacer._global_permit = counted  # type: ignore[method-assign]
    rec = Recorder()
    rec.fail["the song"] = 2
    await send(pacer, rec, "sendAudio", "the song", chat=42)
    assert [label for _, label, _ in rec.sent] == ["the song"]
    assert permits == [Priority.SONG] * 3
    await pacer.shutdown()


async def test_callback_answers_are_not_held_behind_a_chat() -> None:
    pacer = PacedSender(private_per_second=0.5)
    rec = Recorder()
    await send(pacer, rec, "sendMessage", "one", chat=42)
    await send(pacer, rec, "sendMessage", "two", chat=42)
    slow = asyncio.create_task(send(pacer, rec, "sendMessage", "three", chat=42))
    await asyncio.sleep(0)
    await send(pacer, rec, "answerCallbackQuery", "popup", chat=42)
    assert [label for _, label, _ in rec.sent] == ["one", "two", "popup"]
    slow.cancel()
    await pacer.shutdown()


async def test_a_call_counts_in_the_global_budget_until_telegram_has_answered_it() -> None:
    # Telegram counts a message when it takes it in: any time until it answers. Uploads
    # still in transit must not let more calls start than one second may hold.
    pacer = PacedSender(global_per_second=3, private_per_second=100)  # 2 at once, with headroom
    rec = Recorder()
    answered = asyncio.Event()

    def slow(label: str) -> Any:
        async def callback() -> bool:
            await answered.wait()
            rec.sent.append(("sendAudio", label, asyncio.get_running_loop().time()))
            return True

        return callback

    uploads = [
        asyncio.create_task(
            pacer.process_request(slow(f"song {i}"), (), {}, "sendAudio", {"chat_id": i}, None)
        )
        for i in (1, 2)
    ]
    await asyncio.sleep(0.1)  # both are being sent
    reply = asyncio.create_task(send(pacer, rec, "sendMessage", "reply to /help", chat=3))
    await asyncio.sleep(1.5)  # the uploads are still being sent: the budget is full
    assert rec.sent == []
    answered.set()
    await asyncio.wait_for(asyncio.gather(*uploads, reply), 5)
    labels = [label for _, label, _ in rec.sent]
    assert labels[-1] == "reply to /help"
    # ...and it went only once the uploads' answers had left the one-second window.
    assert rec.sent[-1][2] - rec.sent[0][2] >= 0.9
    await pacer.shutdown()


async def test_a_private_chat_takes_a_short_burst_then_about_one_a_second() -> None:
    pacer = PacedSender()  # Telegram's own limits
    rec = Recorder()
    for i in range(5):
        await send(pacer, rec, "sendMessage", f"reply {i}", chat=42)
    times = [t for _, _, t in rec.sent]
    assert times[1] - times[0] < 0.1  # a second /help right after the first goes at once
    # ...and no window of one second holds more than two (Telegram's fake lets three).
    for i, start in enumerate(times):
        assert sum(1 for t in times[i:] if t - start < 1.0) <= 2
    assert times[-1] - times[0] >= 3 * 0.9  # the rest at about one a second
    await pacer.shutdown()
