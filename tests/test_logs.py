"""What an operator sees in the log: one line per event, text or JSON, secrets redacted."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot import logs
from tests.conftest import make_settings

TELEGRAM_TOKEN = "7012345678:AAF-secretTelegramToken_xyz"
FAL_KEY = "fal-id:fal-secret-0123456789abcdef"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def log_a_leaky_failure() -> None:
    log = logging.getLogger("acestep.engine")
    log.info("job 1a2b3c4d admitted: prompt %s", "lofi piano\n2026-01-01 INFO forged line")
    try:
        raise RuntimeError(
            f"POST https://api.telegram.org/bot{TELEGRAM_TOKEN}/sendAudio "
            f"failed; also /bot123:ABC/getMe; key {FAL_KEY}"
        )
    except RuntimeError:
        log.exception("job 1a2b3c4d: delivery to telegram crashed (attempt 1)")
    log.warning("job 1a2b3c4d: fal said %s", {"Authorization": "Key " + "k" * 20})
    log.warning("job 1a2b3c4d: PATCH /webhooks/1234/%s/messages/@original failed", "t" * 60)


def setup(tmp_path: Path, fmt: str) -> None:
    logs.setup(
        make_settings(
            tmp_path,
            telegram_token=TELEGRAM_TOKEN,
            fal_key=FAL_KEY,
            log_format=fmt,
            log_level="INFO",
        )
    )


def assert_no_secrets(text: str) -> None:
    assert TELEGRAM_TOKEN not in text
    assert TELEGRAM_TOKEN.split(":")[1] not in text
    assert FAL_KEY not in text and "fal-secret" not in text
    assert "123:ABC" not in text
    assert "k" * 20 not in text
    assert "t" * 60 not in text  # a Discord interaction token


def test_text_logs_redact_secrets_in_messages_and_tracebacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup(tmp_path, "text")
    log_a_leaky_failure()
    err = capsys.readouterr().err
    assert_no_secrets(err)
    lines = err.splitlines()
    # The user's newline does not start a forged line.
    assert "lofi piano\\n2026-01-01 INFO forged line" in lines[0]
    assert " INFO    acestep.engine: job 1a2b3c4d admitted" in lines[0]
    assert not any(line.startswith("2026-01-01 INFO forged") for line in lines)
    crashed = next(i for i, line in enumerate(lines) if "delivery to telegram crashed" in line)
    assert " ERROR   acestep.engine: job 1a2b3c4d:" in lines[crashed]
    assert lines[crashed + 1] == "Traceback (most recent call last):"
    assert "RuntimeError: POST https://api.telegram.org/bot[redacted]/sendAudio" in err
    assert "/bot[redacted]/getMe" in err
    assert "key [redacted]" in err
    assert "'Key [redacted]'" in err
    assert "PATCH /webhooks/1234/[redacted]/messages/@original" in err


def test_json_logs_one_object_per_line_with_job_id_and_redacted_exception(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup(tmp_path, "json")
    log_a_leaky_failure()
    logging.getLogger("acestep.app").info("acestep-bot running")
    err = capsys.readouterr().err
    assert_no_secrets(err)
    records = [json.loads(line) for line in err.splitlines()]
    assert len(records) == 5
    admitted, crashed, warned, webhook, running = records
    assert "/webhooks/1234/[redacted]/" in webhook["message"]
    assert admitted["job_id"] == "1a2b3c4d" and admitted["level"] == "INFO"
    assert admitted["message"].endswith("lofi piano\n2026-01-01 INFO forged line")
    assert crashed["level"] == "ERROR" and crashed["logger"] == "acestep.engine"
    assert crashed["job_id"] == "1a2b3c4d"
    assert crashed["exception"].startswith("Traceback (most recent call last):")
    assert "bot[redacted]/sendAudio" in crashed["exception"]
    assert warned["level"] == "WARNING" and "job_id" in warned
    assert "job_id" not in running
    assert running["time"].endswith("Z")


def test_httpx_request_lines_are_not_logged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup(tmp_path, "text")
    # httpx logs each request URL at INFO; Telegram URLs carry the token.
    logging.getLogger("httpx").info("HTTP Request: POST https://example.test/bot1:x/getMe")
    assert capsys.readouterr().err == ""


def test_a_bad_format_call_does_not_raise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup(tmp_path, "text")
    logging.getLogger("acestep.x").info("job %s %s", "only-one")
    assert "job %s %s" in capsys.readouterr().err


def test_a_password_inside_a_url_setting_is_redacted_from_log_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(
        tmp_path,
        providers=["acestep"],
        acestep_server_urls=["http://gpu:pw-in-url-4321@10.0.0.5:8001"],
    )
    logs.setup(settings)
    logging.getLogger("acestep.providers").warning(
        "acestep server %s unreachable", settings.acestep_server_urls[0]
    )
    err = capsys.readouterr().err
    assert "unreachable" in err and "pw-in-url-4321" not in err
