"""The `acestep-bot` command line: run, generate, config, db, audio, stats, quota, jobs.

Each command imports what it uses when it runs: `--help` needs argparse alone, `config
check` the settings, the database commands the store, and only `run`, `generate`,
`quota show` and `jobs cancel` the engine (with its audio libraries).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage.quota import COMMUNITY_KEYS, USER_KEYS

if TYPE_CHECKING:
    import asyncio

    from pydantic import ValidationError

    from bot.engine import Failure, Progress, Song
    from bot.models import Job, Requester
    from bot.requests import GenerationRequest, SourceAudio
    from bot.retention import PruneReport
    from bot.settings import Settings
    from storage.store import Store

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
OUT_FORMATS = ("mp3", "wav", "flac", "ogg")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    from pydantic import ValidationError

    from bot import logs
    from bot.settings import Settings
    from storage.errors import StorageError

    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"error: invalid configuration:\n{_settings_errors(exc)}", file=sys.stderr)
        return EXIT_USAGE
    logs.setup(settings)
    try:
        return int(args.handler(settings, args))
    except StorageError as exc:
        print(f"error: database problem: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def with_store(
    settings: Settings, body: Callable[[Store], Awaitable[int]], *, migrate: bool = True
) -> int:
    """Run `body` on the configured store (opened, migrated unless told not to, and
    closed after): what every database command does."""
    import asyncio

    from storage.store import open_store

    async def go() -> int:
        async with open_store(settings, migrate=migrate) as store:
            return await body(store)

    return asyncio.run(go())


def _settings_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err.get("loc", ())).upper() or "SETTINGS"
        lines.append(f"  {name}: {err.get('msg')}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="acestep-bot", description="Discord and Telegram bot that makes songs with ACE-Step."
    )
    sub = p.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run the configured chat front-ends")
    run.add_argument(
        "--role",
        choices=("all", "chat", "worker"),
        default="all",
        help="all: everything in this process (default); chat: receive commands and admit "
        "songs; worker: make and post the songs others admitted (needs DATABASE_URL)",
    )
    run.set_defaults(handler=cmd_run)

    gen = sub.add_parser("generate", help="make one song from the command line")
    what = gen.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="describe the song (the model writes tags and lyrics)")
    what.add_argument("--tags", help="comma-separated style tags (compose mode)")
    gen.add_argument("--lyrics-file", type=Path, help="lyrics with [verse]/[chorus] markers")
    gen.add_argument("--instrumental", action="store_true", help="no vocals")
    gen.add_argument("--duration", type=int, default=60, help="seconds, 5-240 (default 60)")
    gen.add_argument("--seed", type=int, default=-1, help="-1 for random (default)")
    gen.add_argument("--provider", help="use only this provider (default: PROVIDERS order)")
    gen.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="advanced option, e.g. steps=40 (repeatable)",
    )
    gen.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output file: .mp3, .wav, .flac or .ogg (with --takes N: NAME-1.mp3 ... NAME-N)",
    )
    gen.add_argument("--takes", type=int, default=1, help="how many songs (seeds), 1-4")
    edit = gen.add_mutually_exclusive_group()
    edit.add_argument("--extend", type=Path, metavar="SRC", help="add music to this audio file")
    edit.add_argument("--remix", type=Path, metavar="SRC", help="re-make this audio file")
    edit.add_argument("--repaint", type=Path, metavar="SRC", help="re-make a part of this file")
    gen.add_argument("--before", type=int, default=0, help="--extend: seconds of new intro")
    gen.add_argument("--after", type=int, default=0, help="--extend: seconds of new ending")
    gen.add_argument("--start", type=float, help="--repaint: start of the part, in seconds")
    gen.add_argument("--end", type=float, help="--repaint: end of the part, in seconds")
    gen.add_argument("--strength", type=float, help="--remix: 0 keeps the source, 1 ignores it")
    gen.set_defaults(handler=cmd_generate)

    cfg = sub.add_parser("config", help="configuration")
    cfg_sub = cfg.add_subparsers(dest="action", required=True)
    cfg_sub.add_parser(
        "check", help="print the effective configuration, secrets masked"
    ).set_defaults(handler=cmd_config_check)

    db = sub.add_parser("db", help="database")
    db_sub = db.add_subparsers(dest="action", required=True)
    db_sub.add_parser("upgrade", help="apply database migrations").set_defaults(
        handler=cmd_db_upgrade
    )
    db_backup = db_sub.add_parser(
        "backup", help="consistent copy of the database, safe while the bot runs"
    )
    db_backup.add_argument(
        "path",
        type=Path,
        help="backup file, or an existing directory to write a time-stamped file into",
    )
    db_backup.set_defaults(handler=cmd_db_backup)
    db_sub.add_parser(
        "check", help="check the per-day usage counters against the job rows"
    ).set_defaults(handler=cmd_db_check)
    db_prune = db_sub.add_parser(
        "prune", help="delete finished job rows admitted more than JOB_RETENTION_DAYS ago"
    )
    db_prune.add_argument("--days", type=int, help="override JOB_RETENTION_DAYS (>= 1)")
    db_prune.set_defaults(handler=cmd_db_prune)

    audio = sub.add_parser("audio", help="stored audio")
    a_sub = audio.add_subparsers(dest="action", required=True)
    a_prune = a_sub.add_parser(
        "prune", help="delete audio of jobs finished more than AUDIO_RETENTION_DAYS ago"
    )
    a_prune.add_argument("--days", type=int, help="override AUDIO_RETENTION_DAYS (>= 1)")
    a_prune.set_defaults(handler=cmd_audio_prune)

    stats = sub.add_parser("stats", help="songs, seconds and spend by community, user and provider")
    stats.add_argument("--days", type=int, default=7, help="period in days (default 7)")
    stats.add_argument("--top", type=int, default=20, help="rows per table (default 20)")
    stats.set_defaults(handler=cmd_stats)

    quota = sub.add_parser("quota", help="quotas and limit overrides")
    q_sub = quota.add_subparsers(dest="action", required=True)
    q_show = q_sub.add_parser("show", help="usage and limits of a user or community")
    _subject_args(q_show)
    q_show.set_defaults(handler=cmd_quota_show)
    q_set = q_sub.add_parser("set", help="override a limit (VALUE 'default' removes it)")
    _subject_args(q_set)
    q_set.add_argument(
        "limit", help=f"user: {', '.join(USER_KEYS)}; community: {', '.join(COMMUNITY_KEYS)}"
    )
    q_set.add_argument("value", help="a number, or 'default'")
    q_set.set_defaults(handler=cmd_quota_set)

    jobs = sub.add_parser("jobs", help="inspect and cancel jobs")
    j_sub = jobs.add_subparsers(dest="action", required=True)
    j_list = j_sub.add_parser("list", help="recent jobs")
    j_list.add_argument("--state", help="only jobs in this state")
    j_list.add_argument("--user", help="only this user (platform:id)")
    j_list.add_argument(
        "--search", metavar="TEXT", help="only jobs whose prompt, tags, lyrics or title hold TEXT"
    )
    j_list.add_argument("--limit", type=int, default=20)
    j_list.set_defaults(handler=cmd_jobs_list)
    j_show = j_sub.add_parser("show", help="one job in full")
    j_show.add_argument("job_id")
    j_show.set_defaults(handler=cmd_jobs_show)
    j_cancel = j_sub.add_parser("cancel", help="cancel a job (as an admin)")
    j_cancel.add_argument("job_id")
    j_cancel.set_defaults(handler=cmd_jobs_cancel)
    return p


def _subject_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--user", help="platform:id, e.g. discord:1234 or cli")
    group.add_argument("--community", help="platform:id, e.g. discord:<guild> or telegram:<chat>")


# ---- run -------------------------------------------------------------------------------


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio

    from bot.settings import configured_frontends, problems, usable_providers

    found = problems(settings)
    if not configured_frontends(settings) or not usable_providers(settings):
        print("acestep-bot cannot start: nothing usable is configured.", file=sys.stderr)
        for line in found:
            print(f"  - {line}", file=sys.stderr)
        print(
            "Set these in the environment or in a .env file "
            "(see deploy/.env.example), then run `acestep-bot config check`.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from bot.app import Role, run_bot

    role = Role(getattr(args, "role", "all"))
    refusal = role_refusal(settings, role)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return EXIT_USAGE
    for line in found:
        print(f"warning: {line}", file=sys.stderr)
    return _holding_data_dir(
        settings,
        "run" if role is Role.ALL else f"run --role {role.value}",
        lambda: asyncio.run(run_bot(settings, role=role)),
    )


def role_refusal(settings: Settings, role: Any) -> str | None:
    """Why this process may not take `role` with this configuration, in one line."""
    if role.value == "all":
        return None
    if not settings.secret("database_url"):
        return (
            f"--role {role.value} shares the work with other processes, which needs "
            "DATABASE_URL (PostgreSQL); with the SQLite file in DATA_DIR one process does "
            "everything: run without --role (or --role all)"
        )
    return None


def _holding_data_dir(settings: Settings, command: str, work: Callable[[], int]) -> int:
    """Run `work` holding DATA_DIR's lock (bot/datalock.py); a second `run` or `generate`
    on the same data directory exits at once, naming the pid that holds it."""
    from bot.datalock import AlreadyRunning, hold

    try:
        with hold(settings.data_dir, command):
            return work()
    except AlreadyRunning as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


# ---- generate --------------------------------------------------------------------------


class CliDelivery:
    """Writes each finished song to its file and reports progress on stderr.

    With several takes, take K of `--out NAME.mp3` is written to NAME-K.mp3; `done` is
    set once every take was written or failed (take -> None or the failure's text)."""

    platform = "cli"

    def __init__(self, out: Path, takes: int = 1) -> None:
        import asyncio

        self.out = out
        self.takes = takes
        self.done: asyncio.Future[dict[int, str | None]] = (
            asyncio.get_running_loop().create_future()
        )
        self.finished: dict[int, str | None] = {}
        self.written: list[Path] = []
        self._last: dict[str, str] = {}

    def path_for(self, take: int, takes: int) -> Path:
        if takes <= 1:
            return self.out
        return self.out.with_name(f"{self.out.stem}-{take}{self.out.suffix}")

    def _settle(self, take: int, outcome: str | None) -> None:
        self.finished[take] = outcome
        if len(self.finished) >= self.takes and not self.done.done():
            self.done.set_result(dict(sorted(self.finished.items())))

    async def on_progress(self, job: Job, progress: Progress) -> None:
        text = _progress_text(progress)
        if text != self._last.get(job.id):
            self._last[job.id] = text
            print(f"[{job.id}] {text}", file=sys.stderr, flush=True)

    async def deliver(self, job: Job, song: Song) -> None:
        import asyncio
        import shutil

        fmt = self.out.suffix.lower().lstrip(".")
        rendered = await song.render(None, fmt)
        target = self.path_for(job.take, job.takes)
        target.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(shutil.copyfile, rendered.path, target)
        self.written.append(target)
        self._settle(job.take, None)

    async def on_failed(self, job: Job, failure: Failure) -> None:
        from bot import messages

        self._settle(
            job.take,
            messages.failure_text(failure.kind, failure.quota_refunded, failure.timeout_seconds)
            + (f" ({failure.detail})" if failure.detail else ""),
        )


def _progress_text(progress: Progress) -> str:
    from bot.engine import Phase

    if progress.phase is Phase.WAITING:
        return f"queued (position {progress.position})"
    if progress.phase is Phase.STARTING:
        return f"sending to {progress.provider or 'the music service'}"
    if progress.phase is Phase.UPLOADING:
        return "writing the file"
    if progress.phase is Phase.PROVIDER_QUEUE:
        where = f", position {progress.position}" if progress.position else ""
        return f"waiting at {progress.provider}{where}"
    parts = ["generating"]
    if progress.fraction is not None:
        parts.append(f"{progress.fraction:.0%}")
    return " ".join(parts)


def build_cli_request(
    args: argparse.Namespace, source: SourceAudio | None = None
) -> GenerationRequest:
    """The CLI's arguments as a validated request (InvalidRequest on bad input);
    `source` is the stored file of `--extend/--remix/--repaint SRC`."""
    from bot.requests import GenerationRequest, InvalidRequest, parse_options

    fields: dict[str, Any] = {
        "instrumental": args.instrumental,
        "duration": args.duration,
        "seed": args.seed,
    }
    if args.prompt is not None:
        fields.update(mode="prompt", prompt=args.prompt)
    else:
        fields.update(mode="song", tags=args.tags)
    if edit_source_arg(args) is not None:
        fields.pop("duration")  # an edit's length follows from its source
    if args.lyrics_file:
        if args.prompt is not None:
            raise InvalidRequest(
                "lyrics-file",
                str(args.lyrics_file),
                "lyrics go with --tags (compose mode), not --prompt",
            )
        try:
            fields["lyrics"] = args.lyrics_file.read_text("utf-8")
        except OSError as exc:
            raise InvalidRequest(
                "lyrics-file", str(args.lyrics_file), f"a readable text file ({exc.strerror})"
            ) from None
    pairs = {}
    for item in args.option:
        name, sep, value = item.partition("=")
        if not sep:
            raise InvalidRequest("option", item, "NAME=VALUE, e.g. steps=40")
        pairs[name.strip()] = value
    fields.update(parse_options(pairs))
    fields.update(_edit_fields(args, source))
    return GenerationRequest.build(**fields)


def edit_source_arg(args: argparse.Namespace) -> tuple[str, Path] | None:
    """The task and source file of `--extend/--remix/--repaint SRC`, if one was given."""
    for task in ("extend", "remix", "repaint"):
        path = getattr(args, task, None)
        if path is not None:
            return task, path
    return None


def _edit_fields(args: argparse.Namespace, source: SourceAudio | None) -> dict[str, Any]:
    """The request fields of an edit (and --takes); InvalidRequest for an edit's option
    given without its edit, so `--after 30` alone is not silently ignored."""
    from bot.requests import InvalidRequest

    fields: dict[str, Any] = {"takes": args.takes}
    edit = edit_source_arg(args)
    task = edit[0] if edit else None
    for flag, value, owner in (
        ("before", args.before, "extend"),
        ("after", args.after, "extend"),
        ("start", args.start, "repaint"),
        ("end", args.end, "repaint"),
        ("strength", args.strength, "remix"),
    ):
        if value not in (None, 0) and task != owner:
            raise InvalidRequest(flag, value, f"only with --{owner} SRC")
    if task is None or source is None:
        return fields
    fields.update(task=task, source=source)
    if task == "extend":
        fields.update(extend_before=args.before, extend_after=args.after)
    elif task == "repaint":
        fields.update(repaint_start=args.start, repaint_end=args.end)
    elif args.strength is not None:
        fields["strength"] = args.strength
    return fields


def cmd_generate(settings: Settings, args: argparse.Namespace) -> int:
    import asyncio

    from bot.requests import InvalidRequest
    from bot.settings import PROVIDER_NAMES

    fmt = args.out.suffix.lower().lstrip(".")
    try:
        if fmt not in OUT_FORMATS:
            raise InvalidRequest(
                "out",
                str(args.out),
                "a file name ending in " + ", ".join("." + f for f in OUT_FORMATS),
            )
        if edit_source_arg(args) is None:
            request: GenerationRequest | None = build_cli_request(args)
        else:  # checked once the source is read (under the data dir's lock)
            request = None
            _edit_fields(args, None)
    except InvalidRequest as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.provider and args.provider not in PROVIDER_NAMES:
        print(
            f"error: provider: {args.provider!r} is not valid; choose from "
            f"{', '.join(PROVIDER_NAMES)}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return _holding_data_dir(
        settings,
        "generate",
        lambda: asyncio.run(_generate(settings, request, args, args.out, args.provider)),
    )


async def _edit_request(settings: Settings, args: argparse.Namespace) -> GenerationRequest:
    """Read and store `--extend/--remix/--repaint SRC` and build the request on it.
    Raises SourceRefused or InvalidRequest; a source stored only for a refused request is
    removed again, so bad input leaves nothing behind."""
    import asyncio

    from bot import sources
    from bot.requests import InvalidRequest

    edit = edit_source_arg(args)
    assert edit is not None
    folder = settings.sources_dir
    before = set(await asyncio.to_thread(_names_in, folder))
    source = await sources.from_file(
        settings.data_dir, edit[1], max_bytes=settings.source_max_bytes
    )
    try:
        return build_cli_request(args, source)
    except InvalidRequest:
        if source.file not in before:
            await asyncio.to_thread(source.path(settings.data_dir).unlink, True)
        raise


async def _discard_source(settings: Settings, request: GenerationRequest, engine: Any) -> None:
    """A refused request keeps no source file that no job works on."""
    from bot import sources

    if request.source is not None:
        await sources.discard(settings.data_dir, request.source, engine.store)


def _names_in(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir()] if folder.is_dir() else []


async def _generate(
    settings: Settings,
    request: GenerationRequest | None,
    args: argparse.Namespace,
    out: Path,
    only: str | None,
) -> int:
    import asyncio

    from bot import messages
    from bot.engine import Engine, EngineError, NoProvider
    from bot.models import Requester
    from bot.requests import InvalidRequest
    from bot.settings import problems
    from bot.sources import SourceRefused
    from providers.registry import build_providers

    if request is None:
        try:
            request = await _edit_request(settings, args)
        except (SourceRefused, InvalidRequest) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    providers = build_providers(settings, only)
    if not providers:
        needed = [line for line in problems(settings) if "rovider" in line]
        print("error: no usable provider: " + " ".join(needed), file=sys.stderr)
        return EXIT_USAGE
    engine = await Engine.open(settings, providers, platforms={"cli"})
    delivery = CliDelivery(out, request.takes)
    engine.register_delivery(delivery)
    try:
        await engine.start()
        try:
            admission = await engine.submit(request, Requester("cli", "cli"), {"out": str(out)})
        except NoProvider as exc:  # mode, task, duration or an option no provider here takes
            print(f"error: {exc}", file=sys.stderr)
            await _discard_source(settings, request, engine)
            return EXIT_USAGE
        except EngineError as exc:
            print(f"error: {exc}", file=sys.stderr)
            await _discard_source(settings, request, engine)
            return EXIT_FAILED
        for job_id, seed in admission.takes or ((admission.job_id, admission.seed),):
            print(
                f"[{job_id}] admitted with seed {seed}, queue position {admission.position}",
                file=sys.stderr,
            )
        if admission.ignored_options:
            print(
                messages.ignored_options(
                    admission.provider or "the provider", admission.ignored_options
                ),
                file=sys.stderr,
            )
        outcomes = await delivery.done
        takes = admission.takes or ((admission.job_id, admission.seed),)
        failed = False
        for take, (job_id, seed) in enumerate(takes, start=1):
            failure = outcomes.get(take)
            target = delivery.path_for(take, len(takes))
            if failure is not None:
                failed = True
                which = f"take {take} (job {job_id}): " if len(takes) > 1 else ""
                print(f"error: {which}{failure}", file=sys.stderr)
            else:
                print(f"wrote {target} (seed {seed}, job {job_id})", file=sys.stderr)
        return EXIT_FAILED if failed else EXIT_OK
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(
            "interrupted: the job stays queued and resumes at the next "
            "`acestep-bot generate` or can be cancelled with `acestep-bot jobs cancel`",
            file=sys.stderr,
        )
        return 130
    finally:
        await engine.close()


# ---- config / db -----------------------------------------------------------------------


def cmd_config_check(settings: Settings, args: argparse.Namespace) -> int:
    from bot.settings import (
        configured_frontends,
        describe,
        mask_url_passwords,
        problems,
        usable_providers,
    )

    print("Effective configuration (secrets masked):")
    for line in describe(settings):
        print(f"  {line}")
    fronts = configured_frontends(settings)
    provs = usable_providers(settings)
    print(f"Front-ends ready: {', '.join(fronts) if fronts else 'none'}")
    print(f"Providers ready (in order): {', '.join(provs) if provs else 'none'}")
    found = problems(settings)
    if found:
        print("Missing:")
        for line in found:
            print(f"  - {line}")
    notes: list[str] = []
    if "acestep" in provs:  # it can tell whether its GPU servers can do prompt mode
        import asyncio

        from providers.registry import provider_notes

        notes = asyncio.run(provider_notes(settings))
    if notes:
        from bot.redact import Redactor

        # A server's own words may quote its URL, password included (Settings.secrets()
        # lists passwords inside URL settings).
        redact = Redactor(settings.secrets())
        print("Providers say:")
        for line in notes:
            print(f"  - {mask_url_passwords(redact(line))}")
    return EXIT_OK if fronts and provs else EXIT_FAILED


def cmd_db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    async def upgrade(store: Store) -> int:
        applied = await store.upgrade()
        version = await store.schema_version()
        if applied:
            print(f"applied: {', '.join(applied)}")
        print(f"database {settings.database_label} is at schema version {version}")
        return EXIT_OK

    return with_store(settings, upgrade, migrate=False)


def cmd_db_backup(settings: Settings, args: argparse.Namespace) -> int:
    from storage.database import backup

    if settings.secret("database_url"):
        print(
            "error: DATABASE_URL is PostgreSQL: back it up with pg_dump"
            " (db backup copies the SQLite file)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    dest: Path = args.path
    if dest.is_dir():
        dest = dest / f"acestep-bot-{datetime.now(UTC):%Y%m%d-%H%M%S}.sqlite3"
    if not settings.db_path.exists():
        print(f"error: no database at {settings.db_path} (check DATA_DIR)", file=sys.stderr)
        return EXIT_FAILED
    info = backup(settings.db_path, dest)
    print(
        f"backed up {settings.db_path} to {info.path}: {info.size} bytes, "
        f"schema version {info.schema_version}, {info.jobs} jobs, integrity ok"
    )
    return EXIT_OK


def cmd_db_check(settings: Settings, args: argparse.Namespace) -> int:
    async def check(store: Store) -> int:
        problems = await store.usage_mismatches()
        if not problems:
            print("usage counters match the job rows")
            return EXIT_OK
        print(f"usage counters differ from the job rows in {len(problems)} places:")
        for line in problems:
            print(f"  {line}")
        return EXIT_FAILED

    return with_store(settings, check)


def cmd_db_prune(settings: Settings, args: argparse.Namespace) -> int:
    from bot.retention import prune_jobs

    said = (
        "removed {jobs} finished job rows admitted more than {days} days ago "
        "(and {files} audio files, {mb:.1f} MB); their totals stay in stats"
    )
    return _prune(settings, args.days, "job_retention_days", prune_jobs, said)


def _prune(
    settings: Settings,
    asked: int | None,
    setting: str,
    prune: Callable[..., Awaitable[PruneReport]],
    said: str,
) -> int:
    """A retention command: `prune` over `asked` days (--days) or the `setting`'s, then
    what was removed, `said` (a format of jobs, files, mb and days); 0 days keeps
    everything, --days below 1 is refused."""
    if asked is not None and asked <= 0:
        print(f"error: days: {asked} is not valid; 1 or more", file=sys.stderr)
        return EXIT_USAGE
    days = int(getattr(settings, setting)) if asked is None else asked
    if days <= 0:
        print(f"{setting.upper()} is 0: everything is kept; nothing removed")
        return EXIT_OK

    async def run(store: Store) -> int:
        report = await prune(settings, store, days=days)
        print(said.format(jobs=report.jobs, files=report.files, mb=report.bytes / 1e6, days=days))
        return EXIT_OK

    return with_store(settings, run)


# ---- audio / stats ---------------------------------------------------------------------


def cmd_audio_prune(settings: Settings, args: argparse.Namespace) -> int:
    from bot.retention import prune_audio

    said = "removed {files} files ({mb:.1f} MB) of {jobs} jobs finished more than {days} days ago"
    return _prune(settings, args.days, "audio_retention_days", prune_audio, said)


def cmd_stats(settings: Settings, args: argparse.Namespace) -> int:
    from storage.quota import day_start

    for name in ("days", "top"):
        if getattr(args, name) < 1:
            print(f"error: {name}: {getattr(args, name)} is not valid; 1 or more", file=sys.stderr)
            return EXIT_USAGE
    # Whole UTC days, as the quotas count them: today and the days before it.
    since = day_start(datetime.now(UTC).timestamp()) - (args.days - 1) * 86_400

    async def stats(store: Store) -> int:
        found = await store.stats(since, top=args.top)
        total = found.total
        print(f"Last {args.days} days (since {_when(since)} UTC)")
        print(
            f"Total: {total.songs} songs, {total.seconds / 60:.1f} minutes, "
            f"${total.spend_usd:.4f} spent, {total.unsuccessful} failed or cancelled, "
            f"{total.jobs} admitted"
        )
        for group in ("community", "user", "provider"):
            rows, count = found.groups[group], found.counts[group]
            print()
            print(
                f"{('BY ' + group.upper()):30}  {'SONGS':>6}  {'SECONDS':>8}  "
                f"{'SPEND USD':>10}  {'FAILED':>6}  {'JOBS':>5}"
            )
            for row in rows:
                print(
                    f"{row.key[:30]:30}  {row.songs:>6}  {row.seconds:>8.0f}  "
                    f"{row.spend_usd:>10.4f}  {row.unsuccessful:>6}  {row.jobs:>5}"
                )
            if not rows:
                print("(none)")
            elif count > len(rows):
                print(f"... and {count - len(rows)} more")
        return EXIT_OK

    return with_store(settings, stats)


# ---- quota -----------------------------------------------------------------------------


def _subject(args: argparse.Namespace) -> tuple[str, str]:
    if args.user:
        return "user", args.user
    return "community", args.community


def _requester_from(scope: str, subject: str) -> Requester:
    from bot.models import Requester

    platform, _, ident = subject.partition(":")
    if scope == "user":
        return Requester(platform, ident or platform)
    return Requester(platform, "-", community_id=ident)


def cmd_quota_show(settings: Settings, args: argparse.Namespace) -> int:
    from bot import messages
    from bot.engine import Engine

    scope, subject = _subject(args)

    async def show(store: Store) -> int:
        engine = Engine(settings, store, [], platforms=set())
        status = await engine.quota_status(_requester_from(scope, subject))
        overrides = await engine.get_limits(scope, subject)
        print(f"{scope} {subject}: window resets at {status.resets_at:%Y-%m-%d %H:%M} UTC")
        for line in status.lines:
            if scope == "community" and not line.name.startswith("community"):
                continue
            limit = "unlimited" if line.limit is None else messages.plural(line.limit, line.unit)
            print(f"  {line.label}: {messages.num(line.used)} used of {limit}")
        if overrides:
            print("  overrides: " + ", ".join(f"{k}={v:g}" for k, v in overrides.items()))
        return EXIT_OK

    return with_store(settings, show)


def cmd_quota_set(settings: Settings, args: argparse.Namespace) -> int:
    scope, subject = _subject(args)
    value: float | None
    if args.value.lower() == "default":
        value = None
    else:
        try:
            value = float(args.value)
        except ValueError:
            print(
                f"error: value: {args.value!r} is not valid; a number >= 0 or 'default'",
                file=sys.stderr,
            )
            return EXIT_USAGE
        if value < 0:
            print(
                f"error: value: {args.value} is not valid; a number >= 0 or 'default'",
                file=sys.stderr,
            )
            return EXIT_USAGE

    async def set_limit(store: Store) -> int:
        try:
            await store.set_override(scope, subject, args.limit, value)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        shown = "default" if value is None else f"{value:g}"
        print(f"{scope} {subject}: {args.limit} set to {shown}")
        return EXIT_OK

    return with_store(settings, set_limit)


# ---- jobs ------------------------------------------------------------------------------


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def cmd_jobs_list(settings: Settings, args: argparse.Namespace) -> int:
    async def list_jobs(store: Store) -> int:
        states = (args.state,) if args.state else None
        if args.search:
            jobs = await store.search(args.search, args.limit, states, args.user)
        elif args.user:
            jobs = await store.for_user(args.user, states, limit=args.limit)
        else:
            jobs = await store.recent(args.limit, states)
        if not jobs:
            print("no jobs")
            return EXIT_OK
        print(
            f"{'ID':8}  {'STATE':10}  {'CREATED (UTC)':19}  {'USER':22}  {'PROVIDER':9}  "
            f"{'DUR':>4}  TITLE"
        )
        for job in jobs:
            print(
                f"{job.id:8}  {job.state:10}  {_when(job.created_at):19}  "
                f"{job.requester.key[:22]:22}  {(job.provider or '-'):9}  "
                f"{job.duration:>4}  {job.title}" + ("  (deleted)" if job.deleted else "")
            )
        return EXIT_OK

    return with_store(settings, list_jobs)


def cmd_jobs_show(settings: Settings, args: argparse.Namespace) -> int:
    async def show(store: Store) -> int:
        job = await store.get(args.job_id.strip().lower())
        if job is None:
            print(f"error: no job {args.job_id!r}", file=sys.stderr)
            return EXIT_FAILED
        _print_job(settings, job, await store.ledger(job.id))
        return EXIT_OK

    return with_store(settings, show)


def _print_job(settings: Settings, job: Job, ledger: list[dict[str, Any]]) -> None:
    import json

    req = job.request
    print(f"job {job.id}: {job.state}")
    print(
        f"  requester: {job.requester.key}"
        + (f" in {job.requester.community_key}" if job.requester.community_key else "")
    )
    print(
        f"  request:   {req.mode.value}"
        + (f" {req.task.value}" if req.task.value != "generate" else "")
        + f" {req.duration}s seed {job.seed}"
        + (" instrumental" if req.instrumental else "")
    )
    for name in ("prompt", "tags", "lyrics"):
        if getattr(req, name):
            text = getattr(req, name).replace("\n", " / ")
            print(f"  {name + ':':10} {text}")
    if req.advanced():
        print(f"  options:   {json.dumps(req.advanced())}")
    from bot import messages

    source = messages.lineage(req)
    if source:
        print(f"  source:    {source} (file {req.source.file if req.source else '-'})")
    if job.takes > 1:
        print(f"  takes:     {messages.take_note(job.take, job.takes)} (batch {job.batch_id})")
    print(
        f"  provider:  {job.provider or '-'}  attempts {job.attempts}"
        + (f"  tried {','.join(job.tried_providers)}" if job.tried_providers else "")
    )
    print(
        f"  created {_when(job.created_at)}  started {_when(job.started_at)}  "
        f"finished {_when(job.finished_at)}  delivered {_when(job.delivered_at)}"
    )
    print(
        f"  reserved ${job.reserved_usd:.4f}  charged "
        f"{'-' if job.charged_usd is None else f'${job.charged_usd:.4f}'}"
        f"  refunded {'yes' if job.refunded else 'no'}"
    )
    if job.result:
        path = settings.audio_dir / job.result.audio_file
        exists = "" if path.exists() else " (removed)"
        print(
            f"  audio:     {path}{exists} ({job.result.format}, "
            f"{job.result.duration} s, seed {job.result.seed})"
        )
    if job.deleted:
        print(f"  deleted:   {_when(job.deleted_at)} by {job.deleted_by}")
    if job.failure:
        print(f"  failure:   {job.failure}")
    if job.error:
        print(f"  error:     {job.error}")
    for entry in ledger:
        print(
            f"  ledger: {_when(entry['at'])} {entry['kind']:7} {entry['seconds']:g}s "
            f"${entry['usd']:.4f}"
        )


def cmd_jobs_cancel(settings: Settings, args: argparse.Namespace) -> int:
    from bot.engine import Engine, EngineError
    from bot.models import Requester

    async def cancel(store: Store) -> int:
        engine = Engine(settings, store, [], platforms=set())
        try:
            job = await engine.cancel(args.job_id, Requester("cli", "operator"), is_admin=True)
        except EngineError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        if job.state == "cancelled":
            print(f"job {job.id} cancelled; quota refunded")
        else:
            print(
                f"job {job.id} is {job.state}: cancel requested; the running bot stops it "
                "at the provider and refunds the quota"
            )
        return EXIT_OK

    return with_store(settings, cancel)


if __name__ == "__main__":
    sys.exit(main())
