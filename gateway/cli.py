"""The ``gateway`` command: run, config check, db upgrade, import, token, ratings, reconcile, openapi.

Errors people will see are sentences on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import stat
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from storage.store import Store

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_SOME_REJECTED = 3
EXIT_DIFFERENCES = 4


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config or os.environ.get("GATEWAY_CONFIG") or None)


class DataDirError(Exception):
    """``[store] data_dir`` cannot be created or written; the message says which, why, and what to do."""


def prepare_data_dir(config: Config) -> None:
    """Create the data directory if it is used, readable by this user only, and check it can be written.

    It holds the SQLite store (masked phones, comments, the audit log) and the generated keys
    (SPEC R5.1): a directory the gateway creates is mode 0700, a new SQLite file 0600. A directory
    that already exists keeps its mode; a group-writable one is shared, and its files keep the
    umask's. With PostgreSQL and both keys configured, nothing is kept there and nothing is created.
    """
    store_is_in_data_dir = not config.store.url.strip()
    keys_are_in_data_dir = not (config.privacy.encryption_key and config.privacy.phone_hash_key)
    if not (store_is_in_data_dir or keys_are_in_data_dir):
        return
    path = config.data_dir
    created = not path.exists()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise DataDirError(f"[store] data_dir {path} is a file, not a directory; name a directory") from None
    except OSError as error:
        raise DataDirError(
            f"[store] data_dir {path} cannot be created ({error.strerror or error}); "
            "create it for the gateway's user, or name another directory"
        ) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DataDirError(
            f"[store] data_dir {path} is not writable by this user; "
            "give the gateway's user write access to it, or name another directory"
        )
    # A directory set up beforehand for a group (gateway-agi's user, say: group-writable) gets the
    # SQLite file, and its -wal and -shm files, as the umask makes them; any other, 0600.
    shared = not created and bool(path.stat().st_mode & stat.S_IWGRP)
    if store_is_in_data_dir and not shared:
        database = Path(config.store.effective_url.removeprefix("sqlite:///"))
        with contextlib.suppress(FileExistsError):  # SQLite takes an empty file as a new database
            os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _open_store(config: Config, *, upgrade: bool = True) -> Store:
    from storage.store import Store

    prepare_data_dir(config)
    return Store.from_config(config, upgrade=upgrade)


def cmd_run(args: argparse.Namespace) -> int:
    # Twisted's epoll reactor: about 10 % less CPU per FastAGI call than the asyncio reactor,
    # and a store result handed back with callFromThread runs on the next turn of the loop
    # instead of the one after; its turns take ready sockets in chunks (gateway.reactor,
    # docs/performance.md). aiosmtpd brings its own loop in its own thread (its Controller).
    from gateway import reactor as gateway_reactor

    reactor = gateway_reactor.install()

    from gateway.app import run
    from gateway.logs import configure_logging, forward_twisted_logs

    config = _load(args)
    configure_logging(config.log.level, config.log.format)
    forward_twisted_logs()
    # Store threads hold the GIL in slices; shorter slices keep the reactor's answers prompt.
    sys.setswitchinterval(0.0005)
    # What start-up built (modules, the schema, the store) lives as long as the process: freeze
    # it out of the cyclic GC, and collect less often, so that a full collection under load
    # pauses every call for a few ms, not 65-85 ms (docs/performance.md).
    gc.set_threshold(10_000, 10, 10)
    reactor.callWhenRunning(gc.freeze)
    prepare_data_dir(config)
    return run(config, reactor)


def cmd_config_check(args: argparse.Namespace) -> int:
    config = _load(args)
    from gateway.privacy import DataProtector, KeyFileError
    from gateway.workdays import CalendarOverrideError, WorkingDayCalendar

    problems: list[str] = []
    try:
        WorkingDayCalendar.from_override_file(config.calendar.override_file or None)
    except CalendarOverrideError as error:
        problems.append(f"{config.source}: [calendar] override_file: {error}")
    privacy = config.privacy
    if not (privacy.encryption_key and privacy.phone_hash_key) and (config.data_dir / "keys.toml").exists():
        try:  # the file exists, so reading it creates nothing
            DataProtector.from_settings(privacy.encryption_key, privacy.phone_hash_key, config.data_dir)
        except KeyFileError as error:
            problems.append(str(error))
    if problems:
        print("the configuration has problems:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_ERROR
    print(f"configuration OK ({config.source})")
    print(f"store: {_safe_url(config.store.effective_url)}")
    for name in ("http", "agi", "smtp"):
        section = getattr(config, name)
        print(f"{name}: " + (f"{section.host}:{section.port}" if section.enabled else "disabled"))
    return EXIT_OK


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from storage import migrate

    config = _load(args)
    store = _open_store(config, upgrade=False)
    before = migrate.current_revision(store.engine)
    migrate.upgrade(store.engine)
    after = migrate.current_revision(store.engine)
    print(f"store {_safe_url(config.store.effective_url)}: schema {before or 'empty'} -> {after}")
    return EXIT_OK


def cmd_import(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from gateway.csv_import import ImportFileError, import_csv

    config = _load(args)
    store = _open_store(config)
    path = Path(args.file)
    with tqdm(unit=" rows", desc=path.name, disable=args.quiet, file=sys.stderr, mininterval=0.5) as bar:
        try:
            report = import_csv(
                path,
                store,
                now=datetime.now(UTC),
                default_country_code=config.privacy.default_country_code,
                progress=bar.update,
            )
        except ImportFileError as error:
            print(f"{path}: {error}; nothing was imported", file=sys.stderr)
            return EXIT_ERROR
    for problem in report.problems:
        print(f"{path}: {problem}", file=sys.stderr)
    if report.ignored_columns:
        print(f"{path}: ignored unknown column(s): {', '.join(report.ignored_columns)}", file=sys.stderr)
    counts = report.counts
    print(
        f"{report.rows} rows: {counts['created']} created, {counts['updated']} updated, "
        f"{counts['unchanged']} unchanged, {counts['rejected']} rejected"
    )
    return EXIT_SOME_REJECTED if counts["rejected"] else EXIT_OK


def cmd_token_create(args: argparse.Namespace) -> int:
    from storage.store import StoreError

    store = _open_store(_load(args))
    try:
        token = store.create_token(args.role, args.name)
    except StoreError as error:
        print(str(error), file=sys.stderr)
        return EXIT_USAGE
    print(token)
    print(f"(role {args.role}; shown once: store it now)", file=sys.stderr)
    return EXIT_OK


def cmd_token_list(args: argparse.Namespace) -> int:
    tokens = _open_store(_load(args)).list_tokens()
    if args.json:
        print(json.dumps(tokens, ensure_ascii=False, indent=2))
        return EXIT_OK
    for token in tokens:
        state = f"revoked {token['revokedAt']}" if token["revokedAt"] else "active"
        name = token["name"] or "-"
        print(f"{token['id']:>5}  {token['role']:<10}  {name:<24}  created {token['createdAt']}  {state}")
    return EXIT_OK


def cmd_token_revoke(args: argparse.Namespace) -> int:
    if not args.ids and args.name is None:
        print("name the tokens to revoke: their ids (see `gateway token list`) or --name", file=sys.stderr)
        return EXIT_USAGE
    revoked = _open_store(_load(args)).revoke_tokens(ids=args.ids, name=args.name)
    print(f"{revoked} token(s) revoked; a running gateway refuses them within 30 s (its cache)")
    return EXIT_OK if revoked else EXIT_ERROR


def cmd_ratings(args: argparse.Namespace) -> int:
    from gateway.intake import parse_timestamp
    from gateway.workdays import SHANGHAI

    filters = {
        "call_id": args.call_id,
        "linked_id": args.linked_id,
        "work_order": args.work_order,
        "agent_id": args.agent,
        "service_id": args.service_id,
    }
    if not any(filters.values()):
        print("give one of --call-id, --linked-id, --work-order, --agent, --service-id", file=sys.stderr)
        return EXIT_USAGE
    try:
        since = parse_timestamp(args.since) if args.since else None
        until = parse_timestamp(args.until) if args.until else None
    except ValueError as error:
        print(str(error), file=sys.stderr)
        return EXIT_USAGE
    if until is not None and len(args.until.strip()) == 10:
        until += timedelta(days=1)
    store = _open_store(_load(args))
    rows = store.find_ratings(**filters, since=since, until=until, limit=args.limit)
    store.audit("cli", "ratings.lookup", None, {k: v for k, v in filters.items() if v})
    if args.json:
        print(json.dumps([row.as_json() for row in rows], ensure_ascii=False, indent=2))
        return EXIT_OK
    if not rows:
        print("no ratings found")
        return EXIT_OK
    for row in rows:
        flags = ",".join(
            name
            for name, on in (("default", row.is_default), ("follow-up", row.is_follow_up), ("attempt", row.is_attempt))
            if on
        )
        # Beijing time, as --since and --until read a time without an offset (docs/operations.md).
        rated_at = row.rated_at.astimezone(SHANGHAI).isoformat(sep=" ", timespec="seconds")
        print(
            f"{rated_at}  {int(row.level)} {row.level.chinese_name:<5}  "
            f"{row.channel:<6} input={row.raw_input or '-'}  service={row.service_id} call={row.call_id or '-'} "
            f"work_order={row.work_order or '-'} agent={row.agent_id or '-'} phone={row.mobile_masked or '-'}"
            + (f" [{flags}]" if flags else "")
        )
    return EXIT_OK


def cmd_reconcile(args: argparse.Namespace) -> int:
    """SPEC R7.3: a day's totals as stored, as pushed and as the platform holds them; 4 if they differ."""
    from gateway.platform.reconcile import format_text, reconcile

    try:
        day = datetime.strptime(args.date, "%Y-%m-%d").date()
    except ValueError:
        print(f"--date {args.date!r} is not a date; write it YYYY-MM-DD", file=sys.stderr)
        return EXIT_USAGE
    if not 1970 <= day.year <= 9998:
        print(f"--date {args.date!r} is not a day the gateway can have ratings of", file=sys.stderr)
        return EXIT_USAGE
    config = _load(args)
    result = reconcile(_open_store(config), day, None if args.no_platform else config.platform)
    print(json.dumps(result.as_json(), ensure_ascii=False, indent=2) if args.json else format_text(result))
    return EXIT_OK if result.consistent else EXIT_DIFFERENCES


def cmd_openapi(args: argparse.Namespace) -> int:
    from gateway.openapi import build_openapi

    print(json.dumps(build_openapi(), ensure_ascii=False, indent=2))
    return EXIT_OK


CONFIG_HELP = "TOML configuration file (default: $GATEWAY_CONFIG, else built-in defaults)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="好差评 evaluation gateway")
    parser.add_argument("--config", "-c", metavar="FILE", help=CONFIG_HELP)
    # Every command takes --config too, before or after its name (`gateway config check -c F`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", metavar="FILE", default=argparse.SUPPRESS, help=CONFIG_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    commands.add_parser("run", parents=[common], help="run the gateway (HTTP API, FastAGI, …)").set_defaults(
        func=cmd_run
    )

    config = commands.add_parser("config", help="configuration").add_subparsers(dest="action", required=True)
    config.add_parser("check", parents=[common], help="report every problem of the configuration").set_defaults(
        func=cmd_config_check
    )

    db = commands.add_parser("db", help="the evaluation store").add_subparsers(dest="action", required=True)
    db.add_parser("upgrade", parents=[common], help="create or migrate the schema").set_defaults(func=cmd_db_upgrade)

    importer = commands.add_parser("import", parents=[common], help="import service records from a CSV file")
    importer.add_argument("file", metavar="FILE.csv")
    importer.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    importer.set_defaults(func=cmd_import)

    token = commands.add_parser("token", help="API tokens").add_subparsers(dest="action", required=True)
    create = token.add_parser("create", parents=[common], help="create a bearer token for a role")
    from storage.store import ROLES

    create.add_argument("--role", required=True, choices=ROLES)
    create.add_argument("--name", default="", help="who or what uses it")
    create.set_defaults(func=cmd_token_create)
    listing = token.add_parser("list", parents=[common], help="list tokens (never the tokens themselves)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_token_list)
    revoke = token.add_parser("revoke", parents=[common], help="revoke tokens by id or by name")
    revoke.add_argument("ids", nargs="*", type=int, metavar="ID")
    revoke.add_argument("--name", help="revoke every token with this name")
    revoke.set_defaults(func=cmd_token_revoke)

    ratings = commands.add_parser(
        "ratings", parents=[common], help="look up ratings of a call, work order, agent or service"
    )
    ratings.add_argument("--call-id")
    ratings.add_argument("--linked-id")
    ratings.add_argument("--work-order")
    ratings.add_argument("--agent")
    ratings.add_argument("--service-id")
    ratings.add_argument("--since", help="ISO 8601 time or date (inclusive)")
    ratings.add_argument("--until", help="ISO 8601 time (exclusive) or date (inclusive)")
    ratings.add_argument("--limit", type=int, default=100)
    ratings.add_argument("--json", action="store_true", help="machine-readable output")
    ratings.set_defaults(func=cmd_ratings)

    reconciliation = commands.add_parser(
        "reconcile", parents=[common], help="a day's totals: stored, pushed, and the platform's"
    )
    reconciliation.add_argument("--date", required=True, help="the day (YYYY-MM-DD, Asia/Shanghai)")
    reconciliation.add_argument("--json", action="store_true", help="machine-readable output")
    reconciliation.add_argument("--no-platform", action="store_true", help="do not ask the platform for its counts")
    reconciliation.set_defaults(func=cmd_reconcile)

    commands.add_parser("openapi", parents=[common], help="print the OpenAPI document").set_defaults(func=cmd_openapi)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as error:
        print("the configuration has problems:", file=sys.stderr)
        for problem in error.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a last resort: a sentence, not a traceback
        sentence = explain(error)
        if sentence is None:
            raise
        print(hide_passwords(sentence), file=sys.stderr)
        return EXIT_ERROR


def explain(error: Exception) -> str | None:
    """One line for a failure of the deployment (a path, a file, the database); None for a bug.

    Only the database's first line is kept: its detail lines may quote the row's values.
    """
    from sqlalchemy.exc import DBAPIError, OperationalError

    from gateway.privacy import KeyFileError
    from gateway.workdays import CalendarOverrideError

    if isinstance(error, DataDirError | KeyFileError | CalendarOverrideError):
        return str(error)
    if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] in ("psycopg", "psycopg2"):
        return (
            "[store] url names PostgreSQL, but its driver psycopg is not installed; install the gateway's "
            "[postgresql] extra: .venv/bin/pip install -e '.[postgresql]' in its checkout"
        )
    if isinstance(error, DBAPIError):
        reason = str(error.orig).strip().splitlines()[0] if str(error.orig).strip() else type(error.orig).__name__
        if getattr(error.orig, "sqlstate", None) == "42501":  # insufficient_privilege
            return (
                f"the store's database user lacks a permission: {reason}; grant it CREATE on the schema "
                "(docs/configuration.md, PostgreSQL) or run `gateway db upgrade` as the schema's owner"
            )
        if isinstance(error, OperationalError):
            return f"the store cannot be reached: {reason}"
        return f"the store refused a command: {reason}"
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror or error}"
    return None


_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
_CONNINFO_PASSWORD = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)


def hide_passwords(text: str) -> str:
    """A database URL's or connection string's password, should one be quoted, becomes ``***``."""
    return _CONNINFO_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))


if __name__ == "__main__":
    sys.exit(main())
