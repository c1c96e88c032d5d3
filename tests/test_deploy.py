"""The deploy/ files: parsed and checked as far as the tools on this machine allow."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from bot.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
_ENV_LINE = re.compile(r"^#?\s?([A-Z][A-Z0-9_]*)=(.*)$")


def env_example() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in (DEPLOY / ".env.example").read_text("utf-8").splitlines():
        match = _ENV_LINE.match(line)
        if match:
            found.setdefault(match.group(1), []).append(match.group(2))
    return found


def test_env_example_documents_every_setting_with_its_default() -> None:
    documented = env_example()
    fields = {name.upper() for name in Settings.model_fields}
    assert sorted(fields - documented.keys()) == [], "settings missing from .env.example"
    assert sorted(documented.keys() - fields) == [], ".env.example names unknown settings"
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    for name, values in documented.items():
        assert len(values) == 1, f"{name} appears twice"
        text, field = values[0], name.lower()
        default = getattr(defaults, field)
        if text == "":
            assert default in (None, [], ""), f"{name}: the default is {default!r}, not empty"
            continue
        parsed = getattr(Settings(_env_file=None, **{field: text}), field)  # type: ignore[call-arg]
        assert parsed == default, f"{name}={text} is documented but the default is {default!r}"


def test_env_example_loads_as_a_dotenv_file(tmp_path: Path) -> None:
    # What an operator gets by copying it unchanged: a bot with nothing configured yet.
    settings = Settings(_env_file=DEPLOY / ".env.example")  # type: ignore[call-arg]
    assert settings.secret("discord_token") is None
    assert settings.secret("fal_key") is None
    assert settings.providers == ["fal"]


def compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text("utf-8"))
    assert isinstance(data, dict)
    return data


def test_compose_file_builds_the_bot_with_env_volume_and_a_gpu_worker() -> None:
    data = compose()
    bot = data["services"]["bot"]
    build = bot["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert bot["env_file"] == ".env"
    assert (DEPLOY / ".env.example").exists()
    env = bot["environment"]
    assert env["DATA_DIR"] == "/data" and "bot-data:/data" in bot["volumes"]
    assert "bot-data" in data["volumes"]
    assert "profiles" not in bot
    assert any(
        p.startswith("127.0.0.1:") and p.endswith(f":{env['HEALTH_PORT']}") for p in bot["ports"]
    )
    worker = data["services"]["acestep-api"]
    assert worker["profiles"] == ["gpu"]
    assert "8001" in " ".join(worker["command"]) and "acestep-api" in worker["command"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "http://acestep-api:8001" in env["ACESTEP_SERVER_URLS"]
    assert bot["depends_on"]["acestep-api"]["required"] is False
    # Compose stops with SIGTERM then SIGKILL: leave room for the upload grace period.
    grace = int(bot["stop_grace_period"].rstrip("s"))
    assert grace > Settings.model_fields["shutdown_grace_seconds"].default


def test_compose_scale_profile_runs_postgres_two_chat_processes_and_a_worker() -> None:
    from bot.__main__ import _parser

    services = compose()["services"]
    scale = {name for name, svc in services.items() if "scale" in svc.get("profiles", [])}
    assert scale == {"postgres", "chat-a", "chat-b", "worker"}
    assert services["postgres"]["image"].startswith("postgres:")
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    roles = {}
    for name in ("chat-a", "chat-b", "worker"):
        svc = services[name]
        args = _parser().parse_args(svc["command"])  # what the image's entrypoint gets
        roles[name] = args.role
        env = svc["environment"]
        assert (
            env["DATABASE_URL"].startswith("postgresql://")
            and "@postgres:5432/" in env["DATABASE_URL"]
        )
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert svc["volumes"] != services["bot"]["volumes"]  # not the SQLite bot's data
        grace = int(svc["stop_grace_period"].rstrip("s"))
        assert grace > Settings.model_fields["shutdown_grace_seconds"].default
    assert roles == {"chat-a": "chat", "chat-b": "chat", "worker": "worker"}
    # The two chat processes split the Discord shards between them, as Settings checks.
    shards = []
    for name in ("chat-a", "chat-b"):
        env = services[name]["environment"]
        checked = Settings(  # type: ignore[call-arg]
            _env_file=None,
            discord_shard_count=env["DISCORD_SHARD_COUNT"],
            discord_shard_ids=env["DISCORD_SHARD_IDS"],
        )
        shards.append((checked.discord_shard_count, checked.discord_shard_ids))
    assert shards == [(2, [0]), (2, [1])]
    # Only chat-a long-polls Telegram unless an operator gives chat-b the token.
    assert services["chat-b"]["environment"]["TELEGRAM_TOKEN"].startswith("${")
    # The worker opens no gateway: it needs no shards.
    assert "DISCORD_SHARD_IDS" not in services["worker"]["environment"]
    # The single bot stays out of the profile (it is how one machine runs).
    assert "profiles" not in services["bot"]


def test_compose_config_with_docker_when_available(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    probe = (
        subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60)
        if docker
        else None
    )
    if docker is None or probe is None or probe.returncode != 0:
        pytest.skip("no Docker Compose v2 (`docker compose`) on this machine")
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    (tmp_path / "deploy" / ".env").write_text("POSTGRES_PASSWORD=x\n", "utf-8")
    result = subprocess.run(
        [
            docker,
            "compose",
            "-f",
            str(tmp_path / "deploy" / "compose.yaml"),
            "--profile",
            "gpu",
            "--profile",
            "scale",
            "config",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def dockerfile() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text("utf-8").replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_slim_non_root_volume_and_healthcheck() -> None:
    steps = dockerfile()
    froms = [rest for word, rest in steps if word == "FROM"]
    assert froms and all(re.match(r"python:3\.11-slim\b", f) for f in froms)
    final = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM") :]
    users = [rest for word, rest in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    env = " ".join(rest for word, rest in final if word == "ENV")
    port = re.search(r"HEALTH_PORT=(\d+)", env)
    assert port and int(port.group(1)) > 0
    data_dir = re.search(r"DATA_DIR=(\S+)", env)
    assert data_dir and f'"{data_dir.group(1)}"' in " ".join(
        rest for word, rest in final if word == "VOLUME"
    )
    [check] = [rest for word, rest in final if word == "HEALTHCHECK"]
    assert "/healthz" in check and "HEALTH_PORT" in check
    assert ("ENTRYPOINT", '["acestep-bot"]') in final and ("CMD", '["run"]') in final
    # Every COPY source from the build context exists in the repository.
    for word, rest in steps:
        if word == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists() or source == "README.md", source
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text("utf-8")
    assert ".env" not in ignore.replace("!", "")  # everything not listed is excluded


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "acestep-bot.service", encoding="utf-8")
    return parser


def test_systemd_unit_is_hardened() -> None:
    service = unit()["Service"]
    for key, value in {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "StateDirectory": "acestep-bot",
        "CapabilityBoundingSet": "",
        "KillSignal": "SIGTERM",
    }.items():
        assert service.get(key) == value, key
    assert service["Environment"] == "DATA_DIR=/var/lib/acestep-bot"
    assert service["ExecStart"].endswith("acestep-bot run")
    stop = int(service["TimeoutStopSec"].rstrip("s"))
    assert stop > Settings.model_fields["shutdown_grace_seconds"].default


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart exists: point it at a real executable here.
    text = (DEPLOY / "acestep-bot.service").read_text("utf-8")
    local = tmp_path / "acestep-bot.service"
    local.write_text(
        text.replace("/opt/acestep-bot/bin/acestep-bot", shutil.which("true") or "/bin/true"),
        "utf-8",
    )
    result = subprocess.run(
        [tool, "verify", str(local)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""
    security = subprocess.run(
        [tool, "security", "--offline=yes", str(local)], capture_output=True, text=True, timeout=60
    )
    level = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    if level is None:
        pytest.skip("this systemd-analyze has no offline security check")
    assert float(level.group(1)) <= 2.0, security.stdout
