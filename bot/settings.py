"""The bot's configuration: one Settings object read from the environment and `.env`.

Names are a contract (DESIGN.md "Configuration names"): docs, deploy files and tests use
them. Secrets are `SecretStr` so they never print by accident.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROVIDER_NAMES = ("fal", "wavespeed", "aigateway", "replicate", "acestep")


def _split(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Everything an operator can set. Defaults run a local, SQLite-backed bot."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False
    )

    # Discord
    discord_token: SecretStr | None = None
    discord_api_url: str = "https://discord.com/api/v10"
    discord_gateway_url: str | None = None
    discord_guild_ids: CommaList = Field(default_factory=list)
    # Gateway shards: unset runs every shard of Discord's recommended count in this
    # process; with several chat processes give each the same count and its own ids.
    discord_shard_count: int | None = Field(default=None, ge=1)
    discord_shard_ids: Annotated[list[int], NoDecode] = Field(default_factory=list)

    # Telegram
    telegram_token: SecretStr | None = None
    telegram_api_url: str = "https://api.telegram.org"
    telegram_webhook_url: str | None = None  # public HTTPS URL: webhook mode instead of polling
    telegram_webhook_listen: str = "127.0.0.1:8443"
    # What the bot sends stays within Telegram's limits for bots (bot/frontends/
    # telegram_pacing.py); raise them only where Telegram allows more (paid broadcasts).
    telegram_messages_per_second: float = Field(default=30, gt=0)
    telegram_chat_messages_per_second: float = Field(default=1, gt=0)
    telegram_group_messages_per_minute: float = Field(default=20, gt=0)

    # Providers, in the order they are tried
    providers: CommaList = Field(default_factory=lambda: ["fal"])
    fal_key: SecretStr | None = None
    fal_queue_url: str = "https://queue.fal.run"
    fal_storage_url: str = "https://rest.fal.ai"  # where a song to edit is uploaded
    fal_concurrency: int = Field(default=2, ge=1)
    wavespeed_api_key: SecretStr | None = None
    wavespeed_base_url: str = "https://api.wavespeed.ai"
    wavespeed_song_model: str = "wavespeed-ai/ace-step"
    wavespeed_concurrency: int = Field(default=2, ge=1)
    aigateway_api_key: SecretStr | None = None
    aigateway_base_url: str = "https://api.aigateway.sh"
    aigateway_concurrency: int = Field(default=2, ge=1)
    replicate_api_token: SecretStr | None = None
    replicate_base_url: str = "https://api.replicate.com"
    replicate_concurrency: int = Field(default=2, ge=1)
    acestep_server_urls: CommaList = Field(default_factory=list)
    acestep_api_key: SecretStr | None = None
    acestep_price_per_second: float = Field(default=0.0, ge=0)  # your own GPU: electricity only
    acestep_concurrency: int = Field(default=2, ge=1)  # per server: one running, one waiting

    # Quotas (UTC day windows) and spend
    quota_user_jobs_per_day: int = Field(default=20, ge=0)
    quota_user_seconds_per_day: int = Field(default=1200, ge=0)
    quota_user_concurrent_jobs: int = Field(default=2, ge=0)
    quota_community_seconds_per_day: int = Field(default=7200, ge=0)
    spend_cap_usd_per_day: float = Field(default=5.0, ge=0)
    admin_ids: CommaList = Field(default_factory=list)
    # Words and phrases no request may contain, anywhere (communities add their own).
    banned_words: CommaList = Field(default_factory=list)

    # Engine
    job_timeout_seconds: int = Field(default=900, ge=1)
    provider_cooldown_seconds: int = Field(default=600, ge=1)

    # Operations: health/metrics HTTP server (0 = off), audio retention, shutdown grace
    health_host: str = "127.0.0.1"
    health_port: int = Field(default=0, ge=0, le=65535)
    audio_retention_days: int = Field(default=30, ge=0)  # 0 keeps audio forever
    job_retention_days: int = Field(default=90, ge=0)  # 0 keeps finished job rows forever
    shutdown_grace_seconds: int = Field(default=20, ge=0)

    # Work on a song (issue 14): the largest source audio a user may send, checked before
    # it is downloaded (Telegram's and Discord's declared file size).
    source_max_bytes: int = Field(default=20 * 1024 * 1024, ge=1)

    # Storage and logs
    data_dir: Path = Path("./data")
    # Unset: the SQLite file in DATA_DIR. `postgresql://user:password@host/db`: PostgreSQL,
    # shared by several bot processes (a secret: it may hold a password).
    database_url: SecretStr | None = None
    lease_seconds: int = Field(default=60, ge=3, le=3600)  # a process's hold on a job
    log_level: str = "INFO"
    log_format: str = "text"

    @field_validator(
        "discord_guild_ids",
        "providers",
        "acestep_server_urls",
        "admin_ids",
        "banned_words",
        mode="before",
    )
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return _split(value)

    @field_validator("discord_shard_ids", mode="before")
    @classmethod
    def _shard_id_list(cls, value: Any) -> Any:
        return _split(value)

    @field_validator("discord_shard_ids")
    @classmethod
    def _shard_ids(cls, value: list[int], info: ValidationInfo) -> list[int]:
        if not value:
            return value
        count = info.data.get("discord_shard_count")
        if count is None:
            raise ValueError(
                "DISCORD_SHARD_IDS needs DISCORD_SHARD_COUNT (the total over every process)"
            )
        wrong = sorted({i for i in value if not 0 <= i < count})
        if wrong:
            raise ValueError(
                f"shard ids {', '.join(map(str, wrong))} are outside 0-{count - 1} "
                f"(DISCORD_SHARD_COUNT is {count})"
            )
        twice = sorted({i for i in value if value.count(i) > 1})
        if twice:
            raise ValueError(f"shard ids {', '.join(map(str, twice))} are listed twice")
        return value

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: list[str]) -> list[str]:
        names = [v.lower() for v in value]
        unknown = [n for n in names if n not in PROVIDER_NAMES]
        if unknown:
            raise ValueError(
                f"unknown provider(s) {', '.join(unknown)}; choose from {', '.join(PROVIDER_NAMES)}"
            )
        return names

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value().strip():
            return None
        scheme = value.get_secret_value().split("://", 1)[0].lower()
        if scheme not in ("postgresql", "postgres"):
            raise ValueError(
                "DATABASE_URL must start with postgresql:// (leave it unset for the SQLite"
                " file in DATA_DIR)"
            )
        return value

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, value: str) -> str:
        if value.lower() not in ("text", "json"):
            raise ValueError("LOG_FORMAT must be text or json")
        return value.lower()

    @property
    def db_path(self) -> Path:
        return self.data_dir / "acestep-bot.sqlite3"

    @property
    def database_label(self) -> str:
        """Where the data lives, for messages: the SQLite path, or PostgreSQL's URL with
        its password masked."""
        url = self.secret("database_url")
        return mask_url_passwords(url) if url else str(self.db_path)

    @property
    def sources_dir(self) -> Path:
        return self.data_dir / "sources"

    @property
    def audio_dir(self) -> Path:
        return self.data_dir / "audio"

    def secret(self, name: str) -> str | None:
        """The plain value of a secret setting, or None when unset or empty."""
        value = getattr(self, name)
        if value is None:
            return None
        text = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        return text or None

    def secrets(self) -> list[str]:
        """Every configured secret value, for redaction."""
        names = [
            n
            for n, f in type(self).model_fields.items()
            if f.annotation in (SecretStr | None, SecretStr)
        ]
        found = [s for s in (self.secret(n) for n in names) if s]
        # A password inside a URL setting (`https://user:pass@host`, or a token used as
        # the user name) is a secret too.
        for value in self.model_dump().values():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str):
                    found.extend(
                        m.group("user") if m.group("password") is None else m.group("password")
                        for m in _URL_USERINFO.finditer(item)
                    )
        return [s for s in found if s]


# What each provider needs before it can serve.
PROVIDER_REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "fal": ("fal_key",),
    "wavespeed": ("wavespeed_api_key",),
    "aigateway": ("aigateway_api_key",),
    "replicate": ("replicate_api_token",),
    "acestep": ("acestep_server_urls",),
}


def missing_for_provider(settings: Settings, name: str) -> list[str]:
    """Environment names that must be set before provider `name` can be used."""
    missing = []
    for field in PROVIDER_REQUIREMENTS[name]:
        value = getattr(settings, field)
        if not value or (isinstance(value, SecretStr) and not value.get_secret_value()):
            missing.append(field.upper())
    return missing


def usable_providers(settings: Settings) -> list[str]:
    return [p for p in settings.providers if not missing_for_provider(settings, p)]


def configured_frontends(settings: Settings) -> list[str]:
    fronts = []
    if settings.secret("discord_token"):
        fronts.append("discord")
    if settings.secret("telegram_token"):
        fronts.append("telegram")
    return fronts


def mask(value: str) -> str:
    """Show that a secret is set without showing any of it."""
    return f"******** (set, {len(value)} characters)"


# The userinfo of a URL: `scheme://user:password@` or `scheme://token@`.
_URL_USERINFO = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/\s]*)(?::(?P<password>[^@/\s]*))?@"
)


def mask_url_passwords(text: str) -> str:
    """`https://user:pass@host` -> `https://user:********@host`; a bare `https://token@host`
    (a token used as the user name) -> `https://********@host`."""

    def masked(match: re.Match[str]) -> str:
        if match.group("password") is None:
            return f"{match.group('scheme')}********@"
        return f"{match.group('scheme')}{match.group('user')}:********@"

    return _URL_USERINFO.sub(masked, text)


def describe(settings: Settings) -> list[str]:
    """The effective configuration, one `NAME=value` line each, secrets masked."""
    lines = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            shown = mask(value.get_secret_value()) if value.get_secret_value() else "(empty)"
        elif value is None:
            shown = "(not set)"
        elif isinstance(value, list):
            shown = ",".join(value) if value else "(none)"
        else:
            shown = str(value)
        lines.append(f"{name.upper()}={mask_url_passwords(shown)}")
    return lines


def problems(settings: Settings) -> list[str]:
    """What is missing for each front-end and provider, in words an operator can act on."""
    out = []
    if not configured_frontends(settings):
        out.append("No chat front-end: set DISCORD_TOKEN and/or TELEGRAM_TOKEN.")
    for name in settings.providers:
        missing = missing_for_provider(settings, name)
        if missing:
            out.append(f"Provider {name} is listed in PROVIDERS but needs {', '.join(missing)}.")
    if not usable_providers(settings):
        out.append(
            "No usable provider: set PROVIDERS (e.g. fal) and its key (e.g. FAL_KEY), "
            "or ACESTEP_SERVER_URLS for your own GPU."
        )
    return out
