"""The ``deepwork-retry`` command (also ``python -m deepwork_retry``).

deepwork-retry serve                  the demo API on 127.0.0.1:8000 (SQLite)
deepwork-retry retry PROJECT TASK     retry a blocked task in a database
deepwork-retry blocked PROJECT        list a project's blocked tasks
deepwork-retry migrate                create or upgrade a database's schema
deepwork-retry reap                   fail attempts whose lease expired
deepwork-retry prune                  remove what the retention rule allows
deepwork-retry events parked          list the event deliveries parked after their retries
deepwork-retry events replay          deliver parked events again
deepwork-retry events relay           POST the lifecycle events to signed webhooks

Only ``migrate`` (and ``serve``, for its demo database) creates a database or
a schema; every other command opens what exists, read-only when it only
reads, and otherwise says what is missing and how to create it. Each outcome
has its own exit status (:class:`ExitCode`).

A new command is a function ``cmd_NAME(args) -> int`` and a ``_add_NAME``
that declares its arguments, listed in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import os
import re
import shlex
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from deepwork_retry import __version__
from deepwork_retry._core.policy import RetryPolicy
from deepwork_retry._core.results import retry_json, task_json
from deepwork_retry._sync.services import ExecutorService, RetryService
from deepwork_retry.exceptions import (
    AlreadyExists,
    ConfigurationError,
    DeepworkError,
    IdempotencyKeyReused,
    InvalidInput,
    InvalidTransition,
    NotFound,
    ProjectNotRunnable,
    StaleAttempt,
    StorageMissing,
    StorageUnavailable,
)
from deepwork_retry.ports import Storage

DEFAULT_DB = os.path.join("deepwork-demo", "demo.db")
DEFAULT_SCHEMA = "deepwork"


class ExitCode(enum.IntEnum):
    """The exit status of ``deepwork-retry``: one per kind of outcome (see :data:`MEANING`)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    NOT_FOUND = 3
    REFUSED = 4
    UNAVAILABLE = 5
    NO_DATABASE = 6


MEANING: dict[ExitCode, str] = {
    ExitCode.OK: "done",
    ExitCode.FAILED: "failed for another reason, which the message names (a damaged "
    "database or one of another application, a port in use, a missing optional dependency)",
    ExitCode.USAGE: "the command line is wrong: an unknown option, a missing or invalid value",
    ExitCode.NOT_FOUND: "the project or task does not exist",
    ExitCode.REFUSED: "a rule refused the change (the task is not blocked, the project "
    "takes no retries); nothing changed",
    ExitCode.UNAVAILABLE: "the storage is unreachable, locked or timed out; nothing "
    "changed: try again later",
    ExitCode.NO_DATABASE: "the database or schema does not exist or lacks migrations; "
    "nothing was created: run `deepwork-retry migrate` with the same storage options",
}
"""What each exit status means, as the help prints it."""


EXIT_FOR: tuple[tuple[type[BaseException], ExitCode], ...] = (
    (StorageMissing, ExitCode.NO_DATABASE),  # before StorageUnavailable, its base
    (StorageUnavailable, ExitCode.UNAVAILABLE),
    (NotFound, ExitCode.NOT_FOUND),
    (InvalidInput, ExitCode.USAGE),
    (InvalidTransition, ExitCode.REFUSED),
    (ProjectNotRunnable, ExitCode.REFUSED),
    (StaleAttempt, ExitCode.REFUSED),
    (IdempotencyKeyReused, ExitCode.REFUSED),
    (AlreadyExists, ExitCode.REFUSED),
    (DeepworkError, ExitCode.FAILED),
    (ImportError, ExitCode.FAILED),
)
"""Which exit status an error ends the command with: the first matching row."""


def exit_code(exc: BaseException) -> ExitCode:
    """The exit status for ``exc`` (see :data:`EXIT_FOR`)."""
    for kind, code in EXIT_FOR:
        if isinstance(exc, kind):
            return code
    return ExitCode.FAILED


def _exit_codes_text() -> str:
    lines = ["exit status:"]
    for code in ExitCode:
        indent = f"  {code.value}  "
        lines.append(
            textwrap.fill(MEANING[code], 79, initial_indent=indent, subsequent_indent="     ")
        )
    return "\n".join(lines)


# -- storage ----------------------------------------------------------------------


def _add_storage_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--db",
        metavar="FILE",
        help=f"SQLite database file (default: $DEEPWORK_DB, else {DEFAULT_DB})",
    )
    group.add_argument(
        "--dsn",
        help="PostgreSQL connection string or URL (default: $DEEPWORK_DSN when set); "
        "selects PostgreSQL instead of SQLite",
    )
    parser.add_argument(
        "--schema",
        help=f"PostgreSQL schema (default: $DEEPWORK_SCHEMA, else {DEFAULT_SCHEMA}); "
        "only with PostgreSQL",
    )


def _dsn(args: argparse.Namespace) -> str | None:
    dsn: str | None = args.dsn or (None if args.db else os.environ.get("DEEPWORK_DSN"))
    return dsn or None


def _schema(args: argparse.Namespace) -> str:
    return str(args.schema or os.environ.get("DEEPWORK_SCHEMA") or DEFAULT_SCHEMA)


def _db(args: argparse.Namespace) -> str:
    return str(args.db or os.environ.get("DEEPWORK_DB") or DEFAULT_DB)


def _check_storage_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.schema and _dsn(args) is None:
        parser.error("--schema applies to PostgreSQL only: give --dsn or set $DEEPWORK_DSN")


def migrate_command(args: argparse.Namespace) -> str:
    """The ``migrate`` command that creates the storage these arguments name."""
    dsn = _dsn(args)
    if dsn is None:
        return f"deepwork-retry migrate --db {shlex.quote(_db(args))}"
    shown = "DSN" if _has_password(dsn) else shlex.quote(dsn)
    return f"deepwork-retry migrate --dsn {shown} --schema {shlex.quote(_schema(args))}"


def _has_password(dsn: str) -> bool:
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:  # pragma: no cover - without psycopg, --dsn fails before this
        return True
    try:
        return bool(conninfo_to_dict(dsn).get("password"))
    except Exception:  # noqa: BLE001 - an unparsable DSN: show a placeholder
        return True


def open_storage(args: argparse.Namespace, *, write: bool) -> Storage:
    """The existing storage named on the command line or in the environment.

    Never creates a database or schema: a missing one raises
    :class:`~deepwork_retry.exceptions.StorageMissing`. Opened read-only
    (SQLite) unless ``write``.
    """
    dsn = _dsn(args)
    if dsn is not None:
        from deepwork_retry.storage.postgres import PostgresStorage, check_migrated

        schema = _schema(args)
        # One direct connection first: it fails at once with the server's own
        # reason when the server is down, and checks the schema without
        # creating it; the pool is only opened on a usable schema.
        check_migrated(dsn, schema=schema)
        return PostgresStorage(dsn, schema=schema, migrate=False, min_size=1, max_size=2)
    from deepwork_retry.storage.sqlite import SQLiteStorage

    return SQLiteStorage(_db(args), create=False, read_only=not write)


# -- commands -----------------------------------------------------------------------


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def cmd_retry(args: argparse.Namespace) -> int:
    storage = open_storage(args, write=True)
    try:
        result = RetryService(storage).retry(
            args.project,
            args.task,
            actor=args.actor,
            reason=args.reason,
            budget=args.budget,
        )
    finally:
        storage.close()
    _print(retry_json(result))
    return ExitCode.OK


def cmd_blocked(args: argparse.Namespace) -> int:
    storage = open_storage(args, write=False)
    try:
        tasks, next_after = RetryService(storage).blocked(
            args.project, after=args.after, limit=args.limit
        )
    finally:
        storage.close()
    _print({"tasks": [task_json(t) for t in tasks], "next_after": next_after})
    return ExitCode.OK


def cmd_migrate(args: argparse.Namespace) -> int:
    dsn = _dsn(args)
    if dsn is not None:
        from deepwork_retry.storage.postgres import migrate

        applied = migrate(dsn, schema=_schema(args))
        print(f"applied migrations: {list(applied) or 'none (up to date)'}")
        return ExitCode.OK
    from deepwork_retry.storage.sqlite import SQLiteStorage

    path = _db(args)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    SQLiteStorage(path).close()  # SQLite creates and migrates on open
    print("SQLite schema is up to date")
    return ExitCode.OK


def cmd_reap(args: argparse.Namespace) -> int:
    storage = open_storage(args, write=True)
    policy = RetryPolicy(lease=args.lease, start_timeout=args.start_timeout)
    try:
        reaped = ExecutorService(storage, policy=policy).reap(limit=args.limit)
    finally:
        storage.close()
    for change in reaped:
        print(f"{change.task.project_id}/{change.task.id}: lost -> {change.task.status.value}")
    print(f"reaped {len(reaped)} attempt(s)")
    return ExitCode.OK


def cmd_prune(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from deepwork_retry._core.retention import Retention
    from deepwork_retry._sync.services import Pruner

    def days(value: float | None) -> timedelta | None:
        return None if value is None else timedelta(days=value)

    outbox = None if args.keep_delivered_outbox else days(args.delivered_outbox_days)
    retention = Retention(delivered_outbox=outbox, attempts=days(args.attempts_days))
    storage = open_storage(args, write=True)
    try:
        pruned = Pruner(storage, retention, batch=args.batch).prune()
    finally:
        storage.close()
    print(
        f"pruned {pruned.idempotency} expired idempotency record(s), "
        f"{pruned.outbox} delivered outbox entry(ies), {pruned.attempts} attempt record(s) "
        f"in {pruned.batches} batch(es)"
    )
    return ExitCode.OK


WEBHOOK_SECRET_ENV = "DEEPWORK_WEBHOOK_SECRET"
"""The environment variable that holds the webhooks' secret (several, separated by
spaces, while one is rotated): never given on the command line, where ``ps`` shows it."""


def _event_log(args: argparse.Namespace, *, write: bool) -> Any:
    from deepwork_retry.ports import EventLog

    storage = open_storage(args, write=write)
    if not isinstance(storage, EventLog):
        storage.close()
        raise ConfigurationError(f"{type(storage).__name__} keeps no lifecycle events")
    return storage


def _parked_json(retry: Any) -> dict[str, Any]:
    return {
        "event": retry.event.to_json(),
        "subscriber": retry.subscriber,
        "tries": retry.tries,
        "last_error": retry.last_error,
        "retry_at": retry.retry_at.isoformat(),
    }


def cmd_events_parked(args: argparse.Namespace) -> int:
    storage = _event_log(args, write=False)
    try:
        parked = storage.parked_events(subscriber=args.subscriber, limit=args.limit)
    finally:
        storage.close()
    if not args.table:
        _print({"parked": [_parked_json(r) for r in parked]})
        return ExitCode.OK
    for r in parked:
        error = (r.last_error or "").replace("\n", " ")
        print(f"{r.event.id}\t{r.event.type.value}\t{r.event.task_id or '-'}\t"
              f"{r.subscriber}\t{r.tries}\t{error}")  # fmt: skip
    print(f"{len(parked)} parked delivery(ies)")
    return ExitCode.OK


def cmd_events_replay(args: argparse.Namespace) -> int:
    from deepwork_retry.ports import SystemClock

    storage = _event_log(args, write=True)
    try:
        count = storage.replay_parked(
            now=SystemClock().now(), subscriber=args.subscriber, event_ids=args.event or None
        )
    finally:
        storage.close()
    print(f"replayed {count} parked delivery(ies); the event relay delivers them")
    return ExitCode.OK


def webhooks_from(args: argparse.Namespace) -> list[Any]:
    """The :class:`~deepwork_retry.webhooks.Webhook` of each ``--webhook`` URL, signed
    with the secret(s) of :data:`WEBHOOK_SECRET_ENV`."""
    from deepwork_retry.webhooks import Webhook

    secrets = os.environ.get(WEBHOOK_SECRET_ENV, "").split()
    if not secrets:
        raise InvalidInput(f"set ${WEBHOOK_SECRET_ENV} to the webhooks' secret")
    types = [t for item in args.type or () for t in item.split(",") if t] or None
    if len(set(args.webhook)) != len(args.webhook):
        raise InvalidInput("a --webhook URL is given twice")
    hooks: list[Any] = []
    names: set[str] = set()
    for url in args.webhook:
        hook = Webhook(url, secrets, types=types, timeout=args.timeout, max_tries=args.max_tries)
        # URLs that differ only in their query (not shown in names): #2, #3 … in order.
        base, count = hook.subscriber, 1
        while hook.subscriber in names:
            count += 1
            hook.subscriber = f"{base}#{count}"
        names.add(hook.subscriber)
        hooks.append(hook)
    return hooks


def cmd_events_relay(args: argparse.Namespace) -> int:
    import signal
    import threading

    from deepwork_retry.events import Hooks, run_events

    hooks = Hooks()
    for hook in webhooks_from(args):
        hooks.add(hook)
    storage = _event_log(args, write=True)
    stop = threading.Event()

    def stopping(signum: int, frame: object) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, stopping)
    try:
        claimed = run_events(
            storage, hooks, poll_interval=args.poll_interval, once=args.once, stop=stop
        )
    except KeyboardInterrupt:
        claimed = 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        storage.close()
    if args.once:
        print(f"handled {claimed} event(s) and failed deliveries")
    return ExitCode.OK


def cmd_events(args: argparse.Namespace) -> int:
    run: Callable[[argparse.Namespace], int] = args.events_func
    return run(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from deepwork_retry.server import serve

    return serve(
        host=args.host,
        port=args.port,
        db=_db(args),
        token=args.token,
        demo=not args.no_demo,
        metrics=args.metrics,
    )


# -- the parser ------------------------------------------------------------------------


def _event_id(text: str) -> str:
    """An argparse type: an event id ``PROJECT:SEQ``, ``SEQ`` a positive integer."""
    project, sep, seq = text.rpartition(":")
    if not sep or not project or not re.fullmatch(r"[0-9]{1,18}", seq) or int(seq) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an event id: PROJECT:SEQ, SEQ a positive integer (e.g. p1:7)"
        )
    return f"{project}:{int(seq)}"


def _count(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer from ``low`` (to ``high``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _positive(unit: str) -> Callable[[str], float]:
    """An argparse type: a finite number of ``unit`` above zero."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of {unit}") from None
        if not 0 < value < 1e9:
            raise argparse.ArgumentTypeError(f"must be a number of {unit} > 0, got {text}")
        return value

    parse.__name__ = unit
    return parse


_seconds = _positive("seconds")
_days = _positive("days")


def _add_serve(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)"
    )
    serve.add_argument(
        "--port", type=_count(0, 65535), default=8000, help="port to listen on (default: 8000)"
    )
    serve.add_argument(
        "--db",
        metavar="FILE",
        help=f"SQLite database file, created if missing (default: $DEEPWORK_DB, else {DEFAULT_DB})",
    )
    serve.add_argument(
        "--token", help="accept this bearer token (default: $DEEPWORK_TOKEN, else a random one)"
    )
    serve.add_argument(
        "--no-demo", action="store_true", help="do not create a demo project at start-up"
    )
    serve.add_argument(
        "--metrics",
        action="store_true",
        help="turn telemetry on and serve GET /metrics for Prometheus (extra otel-prometheus)",
    )


def _add_retry(retry: argparse.ArgumentParser) -> None:
    retry.add_argument("project", help="the project's id")
    retry.add_argument("task", help="the id of the blocked task to retry")
    retry.add_argument(
        "--budget",
        choices=["one_more", "full"],
        default="one_more",
        help="one_more: exactly one more attempt (default); "
        "full: the automatic retry budget starts afresh",
    )
    retry.add_argument("--reason", help="why, recorded on the attempt")
    retry.add_argument(
        "--actor",
        default=os.environ.get("USER") or "cli",
        help="who retries, recorded on the attempt (default: $USER, else cli)",
    )
    _add_storage_args(retry)


def _add_blocked(blocked: argparse.ArgumentParser) -> None:
    blocked.add_argument("project", help="the project's id")
    blocked.add_argument(
        "--after", metavar="TASK", help="list the tasks after this task id (the next page)"
    )
    blocked.add_argument(
        "--limit", type=_count(1, 1000), default=50, help="at most this many tasks (default: 50)"
    )
    _add_storage_args(blocked)


def _add_migrate(migrate: argparse.ArgumentParser) -> None:
    _add_storage_args(migrate)


def _add_reap(reap: argparse.ArgumentParser) -> None:
    reap.add_argument(
        "--limit",
        type=_count(1, 1000),
        default=100,
        help="at most this many attempts (default: 100)",
    )
    reap.add_argument(
        "--lease",
        type=_seconds,
        default=300.0,
        help="the workers' lease in seconds (default: 300)",
    )
    reap.add_argument(
        "--start-timeout",
        type=_seconds,
        default=600.0,
        help="redeliver dispatches not started within this many seconds (default: 600)",
    )
    _add_storage_args(reap)


def _add_prune(prune: argparse.ArgumentParser) -> None:
    prune.add_argument(
        "--delivered-outbox-days",
        type=_days,
        default=7.0,
        metavar="DAYS",
        help="remove outbox entries delivered more than DAYS ago (default 7)",
    )
    prune.add_argument(
        "--keep-delivered-outbox", action="store_true", help="remove no outbox entries"
    )
    prune.add_argument(
        "--attempts-days",
        type=_days,
        metavar="DAYS",
        help="remove the attempt records of tasks finished more than DAYS ago "
        "(default: keep every attempt record)",
    )
    prune.add_argument(
        "--batch",
        type=_count(1, 10_000),
        default=500,
        help="rows removed per table per transaction (default 500)",
    )
    _add_storage_args(prune)


def _add_events(events: argparse.ArgumentParser) -> None:
    sub = events.add_subparsers(
        dest="events_command", metavar="SUBCOMMAND", required=True,
        help="parked, replay or relay; `deepwork-retry events SUBCOMMAND --help` for its options",
    )  # fmt: skip
    parked = sub.add_parser(
        "parked", help="list parked deliveries (JSON; read-only)",
        description="List the event deliveries parked after their listener's last try.",
    )  # fmt: skip
    parked.add_argument("--subscriber", help="only this subscriber's (e.g. webhook:https://…)")
    parked.add_argument(
        "--limit", type=_count(1, 1000), default=100, help="at most this many (default: 100)"
    )
    parked.add_argument(
        "--table", action="store_true", help="one tab-separated line each instead of JSON"
    )
    _add_storage_args(parked)
    parked.set_defaults(events_func=cmd_events_parked)
    replay = sub.add_parser(
        "replay", help="make parked deliveries due again",
        description="Make parked deliveries due now with their tries reset; a running "
        "event relay delivers them.",
    )  # fmt: skip
    replay.add_argument("--subscriber", help="only this subscriber's parked deliveries")
    replay.add_argument(
        "--event", action="append", metavar="ID", type=_event_id,
        help="only this event (PROJECT:SEQ, as `events parked` shows it); may be repeated",
    )  # fmt: skip
    _add_storage_args(replay)
    replay.set_defaults(events_func=cmd_events_replay)
    relay = sub.add_parser(
        "relay", help="POST the lifecycle events to signed webhooks, until stopped",
        description="Deliver every lifecycle event to each --webhook URL, signed with "
        f"${WEBHOOK_SECRET_ENV}; failed deliveries are retried with backoff, then parked.",
    )  # fmt: skip
    relay.add_argument(
        "--webhook", action="append", metavar="URL", required=True,
        help="an http(s) URL to POST each event to; may be repeated (failed deliveries "
        "are kept under webhook:URL without its query, then #2, #3 … for URLs that "
        "differ only in their query, in the order given)",
    )  # fmt: skip
    relay.add_argument(
        "--type", action="append", metavar="TYPE",
        help="send only these event types (e.g. task.blocked; comma-separated or repeated)",
    )  # fmt: skip
    relay.add_argument(
        "--timeout", type=_seconds, default=10.0, help="seconds per request (default: 10)"
    )
    relay.add_argument(
        "--max-tries", type=_count(1, 1000), default=10,
        help="tries of one event before it is parked (default: 10)",
    )  # fmt: skip
    relay.add_argument(
        "--poll-interval", type=_seconds, default=1.0,
        help="seconds between polls when idle (default: 1)",
    )  # fmt: skip
    relay.add_argument("--once", action="store_true", help="run one pass and exit")
    _add_storage_args(relay)
    relay.set_defaults(events_func=cmd_events_relay)


Command = tuple[
    str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]
]

COMMANDS: tuple[Command, ...] = (
    ("serve", "run the demo API server (SQLite, in-process executor)", _add_serve, cmd_serve),
    ("retry", "retry a blocked task (prints the result as JSON)", _add_retry, cmd_retry),
    ("blocked", "list a project's blocked tasks (JSON; read-only)", _add_blocked, cmd_blocked),
    ("migrate", "create the database or schema, or upgrade it", _add_migrate, cmd_migrate),
    ("reap", "fail attempts whose lease expired, once", _add_reap, cmd_reap),
    (
        "prune",
        "remove what the retention rule allows (expired keys, old deliveries, finished attempts)",
        _add_prune,
        cmd_prune,
    ),
    (
        "events",
        "the lifecycle events: parked deliveries, replay, the webhook relay",
        _add_events,
        cmd_events,
    ),
)
"""Every subcommand: name, one-line help, the function declaring its arguments, the command."""


def build_parser() -> argparse.ArgumentParser:
    epilog = (
        "Every command but migrate (and serve, for its demo database) opens an existing\n"
        "database: a missing one is reported, never created.\n\n" + _exit_codes_text()
    )
    parser = argparse.ArgumentParser(
        prog="deepwork-retry",
        description="Retry blocked Deep Work tasks; run the demo API.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}", help="print the version"
    )
    sub = parser.add_subparsers(
        dest="command",
        metavar="COMMAND",
        required=True,
        help="one of the commands below; `deepwork-retry COMMAND --help` for its options",
    )
    for name, summary, declare, run in COMMANDS:
        command = sub.add_parser(
            name,
            help=summary,
            description=summary[0].upper() + summary[1:] + ".",
            epilog=_exit_codes_text(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        declare(command)
        command.set_defaults(func=run, parser=command)
    return parser


def _report(exc: BaseException, args: argparse.Namespace) -> ExitCode:
    """Print ``exc`` as one line (plus what to do) and return its exit status."""
    code = exit_code(exc)
    # The operator runs the command on the database's own side: the full
    # message (a storage error's path and cause included) is theirs to read,
    # unlike the fixed ``detail`` an API client gets.
    message = str(exc)
    if code is ExitCode.NO_DATABASE:
        message += f"; create it with: {migrate_command(args)}"
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if "schema" in args:
        _check_storage_args(args.parser, args)
    # The pool's own reconnection warnings would repeat the one error below.
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
    try:
        code: int = args.func(args)
    except (DeepworkError, ImportError) as exc:
        return _report(exc, args)
    return code


if __name__ == "__main__":  # pragma: no cover - exercised through __main__.py
    sys.exit(main())
