"""Django ORM benchmarks: the library's manual retry on DjangoStorage against raw SQL.

- library: ``RetryService(DjangoStorage(alias)).retry``;
- floor: the same work as raw SQL through Django's own cursor, in one
  ``transaction.atomic()`` block: the guarded task update (``RETURNING`` the
  new attempt), the counters update, the outbox insert and the attempt
  insert, on a twin project of the same content in the same tables;

on Django's SQLite backend (a file in the scratch folder, WAL, taking the
write lock at ``BEGIN``) and, when the server answers, its PostgreSQL
backend (a database of its own, dropped afterwards). Django is configured once,
for this process.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from _fixtures import add_blocked, chunks
from _harness import Figure, Row, alternate, per_op_rounds, unavailable
from suite_pg import dsn, reachable

from deepwork_retry import RetryService

PG_DATABASE = f"bench_django_{uuid.uuid4().hex[:8]}"

FLOOR_UPDATE = (
    "UPDATE deepwork_retry_task SET status = 'assigned', retry_count = retry_count + 1, "
    "retries_left = 0, error_message = NULL, error_type = NULL, blocked_reason = NULL, "
    "attempt = attempt + 1, lease_expires_at = NULL, updated_at = %s, version = version + 1 "
    "WHERE project_id = %s AND task_id = %s AND status = 'blocked' RETURNING attempt"
)
FLOOR_COUNTERS = (
    "UPDATE deepwork_retry_project SET blocked = blocked - 1, assigned = assigned + 1 WHERE id = %s"
)
FLOOR_OUTBOX = (
    "INSERT INTO deepwork_retry_outbox (project_id, task_id, attempt, state, available_at, "
    "created_at, tries, pending_seq) VALUES (%s, %s, %s, 'pending', %s, %s, 0, %s)"
)
FLOOR_ATTEMPT = (
    "INSERT INTO deepwork_retry_attempt (project_id, task_id, number, trigger, dispatched_at, "
    "available_at, budget) VALUES (%s, %s, %s, 'manual_retry', %s, %s, 'one_more')"
)


def _configure(scratch: Path, with_pg: bool) -> None:
    import django
    from django.conf import settings

    databases: dict[str, Any] = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(scratch / "django.db"),
            "OPTIONS": {
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL",
            },
        }
    }
    if with_pg:
        import psycopg

        info = psycopg.conninfo.conninfo_to_dict(dsn())
        databases["pg"] = {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": PG_DATABASE,
            "HOST": info.get("host", "127.0.0.1"),
            "PORT": str(info.get("port", "5432")),
            "USER": info.get("user", "postgres"),
        }
    settings.configure(
        INSTALLED_APPS=["deepwork_retry.web.django"],
        DATABASES=databases,
        USE_TZ=True,
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
    )
    django.setup()


class RawSQL:
    """The retry's statements through Django's cursor, in one atomic block."""

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.seq = 1_000_000

    def retry(self, pid: str, tid: str) -> None:
        from django.db import connections, transaction

        now = datetime.now(timezone.utc)
        self.seq += 1
        with transaction.atomic(using=self.alias), connections[self.alias].cursor() as cur:
            cur.execute(FLOOR_UPDATE, (now, pid, tid))
            row = cur.fetchone()
            if row is None:
                raise RuntimeError(f"task {tid} not blocked")
            cur.execute(FLOOR_COUNTERS, (pid,))
            cur.execute(FLOOR_OUTBOX, (pid, tid, row[0], now, now, self.seq))
            cur.execute(FLOOR_ATTEMPT, (pid, tid, row[0], now, now))


def _row(alias: str, label: str, rounds: int, per_round: int) -> Row:
    from deepwork_retry.web.django.storage import DjangoStorage

    storage = DjangoStorage(using=alias)
    count = rounds * per_round
    lib_items = [("lib", tid) for tid in add_blocked(storage, "lib", count)]
    floor_items = [("floor", tid) for tid in add_blocked(storage, "floor", count)]
    service = RetryService(storage)
    floor = RawSQL(alias)
    lib = Figure(f"RetryService(DjangoStorage({alias!r})).retry", "us")
    ref = Figure(f"raw SQL through Django's cursor ({label})", "us")
    alternate(
        [
            (lib, per_op_rounds(service.retry, chunks(lib_items, rounds))),
            (ref, per_op_rounds(floor.retry, chunks(floor_items, rounds))),
        ],
        rounds,
    )
    return Row(
        "django",
        f"manual retry, Django ORM on {label}",
        lib,
        ref,
        target="report",
        note="the floor: task update, counters, outbox and attempt inserts, one atomic block",
    )


def django_orm(rounds: int, per_round: int, scratch: Path) -> list[Row]:
    from django.core.management import call_command

    why_not = reachable()
    _configure(scratch, with_pg=why_not is None)
    rows = []
    call_command("migrate", database="default", verbosity=0)
    rows.append(_row("default", "SQLite", rounds, per_round))
    if why_not is not None:
        rows.append(unavailable("django", "manual retry, Django ORM on PostgreSQL", why_not))
        return rows
    import psycopg
    from django.db import connections
    from psycopg import sql

    with psycopg.connect(dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(PG_DATABASE)))
    try:
        call_command("migrate", database="pg", verbosity=0)
        rows.append(_row("pg", "PostgreSQL", rounds, per_round))
    finally:
        connections["pg"].close()
        time.sleep(0.1)
        with psycopg.connect(dsn(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(PG_DATABASE)
                )
            )
    return rows
