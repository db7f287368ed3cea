"""The ``deepwork-retry`` command (also ``python -m deepwork_retry``).

deepwork-retry serve                  the demo API on 127.0.0.1:8000 (SQLite)
deepwork-retry retry PROJECT TASK     retry a blocked task in a database
deepwork-retry blocked PROJECT        list a project's blocked tasks
deepwork-retry migrate                create or upgrade a database's schema
deepwork-retry reap                   fail attempts whose lease expired
deepwork-retry prune                  remove what the retention rule allows
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from deepwork_retry._core.policy import RetryPolicy
from deepwork_retry._core.results import retry_json, task_json
from deepwork_retry._sync.services import ExecutorService, RetryService
from deepwork_retry.exceptions import DeepworkError
from deepwork_retry.ports import Storage

DEFAULT_DB = os.path.join("deepwork-demo", "demo.db")


def _add_storage_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--db",
        help=f"SQLite database file (default: $DEEPWORK_DB or {DEFAULT_DB})",
    )
    group.add_argument(
        "--dsn",
        help="PostgreSQL connection string (default: $DEEPWORK_DSN when set)",
    )
    parser.add_argument(
        "--schema", default="deepwork", help="PostgreSQL schema (default: deepwork)"
    )


def open_storage(args: argparse.Namespace) -> Storage:
    """The storage named on the command line or in the environment."""
    dsn = args.dsn or (None if args.db else os.environ.get("DEEPWORK_DSN"))
    if dsn:
        from deepwork_retry.storage.postgres import PostgresStorage

        return PostgresStorage(dsn, schema=args.schema)
    from deepwork_retry.storage.sqlite import SQLiteStorage

    path = args.db or os.environ.get("DEEPWORK_DB") or DEFAULT_DB
    return SQLiteStorage(path)


def _print(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def cmd_retry(args: argparse.Namespace) -> int:
    storage = open_storage(args)
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
    return 0


def cmd_blocked(args: argparse.Namespace) -> int:
    storage = open_storage(args)
    try:
        tasks, next_after = RetryService(storage).blocked(
            args.project, after=args.after, limit=args.limit
        )
    finally:
        storage.close()
    _print({"tasks": [task_json(t) for t in tasks], "next_after": next_after})
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    dsn = args.dsn or (None if args.db else os.environ.get("DEEPWORK_DSN"))
    if dsn:
        from deepwork_retry.storage.postgres import migrate

        applied = migrate(dsn, schema=args.schema)
        print(f"applied migrations: {list(applied) or 'none (up to date)'}")
        return 0
    storage = open_storage(args)  # SQLite migrates on open
    storage.close()
    print("SQLite schema is up to date")
    return 0


def cmd_reap(args: argparse.Namespace) -> int:
    storage = open_storage(args)
    policy = RetryPolicy(lease=args.lease, start_timeout=args.start_timeout)
    try:
        reaped = ExecutorService(storage, policy=policy).reap(limit=args.limit)
    finally:
        storage.close()
    for change in reaped:
        print(f"{change.task.project_id}/{change.task.id}: lost -> {change.task.status.value}")
    print(f"reaped {len(reaped)} attempt(s)")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from deepwork_retry._core.retention import Retention
    from deepwork_retry._sync.services import Pruner

    def days(value: float | None) -> timedelta | None:
        return None if value is None else timedelta(days=value)

    outbox = None if args.keep_delivered_outbox else days(args.delivered_outbox_days)
    retention = Retention(delivered_outbox=outbox, attempts=days(args.attempts_days))
    storage = open_storage(args)
    try:
        pruned = Pruner(storage, retention, batch=args.batch).prune()
    finally:
        storage.close()
    print(
        f"pruned {pruned.idempotency} expired idempotency record(s), "
        f"{pruned.outbox} delivered outbox entry(ies), {pruned.attempts} attempt record(s) "
        f"in {pruned.batches} batch(es)"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from deepwork_retry.server import serve

    return serve(
        host=args.host,
        port=args.port,
        db=args.db or os.environ.get("DEEPWORK_DB") or DEFAULT_DB,
        token=args.token,
        demo=not args.no_demo,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepwork-retry",
        description="Retry blocked Deep Work tasks; run the demo API.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser("serve", help="run the demo API server (SQLite, in-process executor)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--db", help=f"SQLite database file (default: {DEFAULT_DB})")
    serve.add_argument(
        "--token", help="accept this bearer token (default: $DEEPWORK_TOKEN or a random one)"
    )
    serve.add_argument("--no-demo", action="store_true", help="do not create a demo project")
    serve.set_defaults(func=cmd_serve)

    retry = sub.add_parser("retry", help="retry a blocked task (prints the result as JSON)")
    retry.add_argument("project")
    retry.add_argument("task")
    retry.add_argument("--budget", choices=["one_more", "full"], default="one_more")
    retry.add_argument("--reason")
    retry.add_argument("--actor", default=os.environ.get("USER") or "cli")
    _add_storage_args(retry)
    retry.set_defaults(func=cmd_retry)

    blocked = sub.add_parser("blocked", help="list a project's blocked tasks (JSON)")
    blocked.add_argument("project")
    blocked.add_argument("--after", help="page after this task id")
    blocked.add_argument("--limit", type=int, default=50)
    _add_storage_args(blocked)
    blocked.set_defaults(func=cmd_blocked)

    migrate = sub.add_parser("migrate", help="create or upgrade the schema")
    _add_storage_args(migrate)
    migrate.set_defaults(func=cmd_migrate)

    reap = sub.add_parser("reap", help="fail attempts whose lease expired, once")
    reap.add_argument("--limit", type=int, default=100)
    reap.add_argument(
        "--lease", type=float, default=300.0, help="the workers' lease in seconds (default 300)"
    )
    reap.add_argument(
        "--start-timeout",
        type=float,
        default=600.0,
        help="redeliver dispatches not started within this many seconds (default 600)",
    )
    _add_storage_args(reap)
    reap.set_defaults(func=cmd_reap)

    prune = sub.add_parser(
        "prune",
        help="remove expired idempotency records, old delivered outbox entries and, "
        "when asked, the attempt records of long-finished tasks (docs/deployment.md)",
    )
    prune.add_argument(
        "--delivered-outbox-days",
        type=float,
        default=7.0,
        metavar="DAYS",
        help="remove outbox entries delivered more than DAYS ago (default 7)",
    )
    prune.add_argument(
        "--keep-delivered-outbox", action="store_true", help="remove no outbox entries"
    )
    prune.add_argument(
        "--attempts-days",
        type=float,
        metavar="DAYS",
        help="remove the attempt records of tasks finished more than DAYS ago "
        "(default: keep every attempt record)",
    )
    prune.add_argument(
        "--batch",
        type=int,
        default=500,
        help="rows removed per table per transaction (default 500)",
    )
    _add_storage_args(prune)
    prune.set_defaults(func=cmd_prune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except DeepworkError as exc:
        print(f"error: {exc.detail}", file=sys.stderr)
        return 1
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":  # pragma: no cover - exercised through __main__.py
    sys.exit(main())
