"""Projects full of blocked tasks, built fast, for the storages under test.

The retried tasks are created through the library (so every row is exactly
what it writes); the filler that makes a project big (``done`` tasks) is
bulk-inserted with one SQL statement that copies a template row, and the
project's progress counters are moved by the same amount.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from deepwork_retry import Project, Task, TaskStatus
from deepwork_retry.ports import Storage

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
BATCH = 5000


def blocked_task(pid: str, tid: str) -> Task:
    """A task that exhausted its automatic retries: what a person retries by hand."""
    return Task(
        id=tid,
        project_id=pid,
        status=TaskStatus.BLOCKED,
        max_retries=1,
        retries_left=0,
        retry_count=1,
        error_message="boom",
        created_at=NOW,
        updated_at=NOW,
    )


def add_blocked(storage: Storage, pid: str, count: int, *, prefix: str = "t") -> list[str]:
    """Create the project ``pid`` with ``count`` blocked tasks; returns their ids."""
    storage.create_project(Project(id=pid, created_at=NOW, updated_at=NOW))
    ids = [f"{prefix}{i:07d}" for i in range(count)]
    for start in range(0, len(ids), BATCH):
        storage.add_tasks([blocked_task(pid, tid) for tid in ids[start : start + BATCH]])
    return ids


def fill_sqlite(path: Path, pid: str, filler: int) -> None:
    """Add ``filler`` done tasks to project ``pid`` of the SQLite file at ``path``."""
    if filler <= 0:
        return
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "WITH RECURSIVE c(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM c WHERE x + 1 < ?) "
            "INSERT INTO tasks (project_id, id, title, status, retry_count, max_retries, "
            "retries_left, error_message, error_type, blocked_reason, blocked_by, attempt, "
            "lease_expires_at, created_at, updated_at, started_at, completed_at, version, "
            "metadata) SELECT ?, printf('f%08d', x), '', 'done', 0, 1, 1, NULL, NULL, NULL, "
            "'[]', 1, NULL, 0, 0, NULL, 0, 1, '{}' FROM c",
            (filler, pid),
        )
        conn.execute(
            "UPDATE projects SET total = total + ?, done = done + ? WHERE id = ?",
            (filler, filler, pid),
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def fill_postgres(conninfo: str, schema: str, pid: str, filler: int) -> None:
    """Add ``filler`` done tasks to project ``pid`` in the PostgreSQL ``schema``."""
    import psycopg

    if filler <= 0:
        return
    with psycopg.connect(conninfo, autocommit=False) as conn:
        conn.execute("SET LOCAL synchronous_commit = off")
        conn.execute(
            f'INSERT INTO "{schema}".tasks (project_id, id, title, status, retry_count, '
            "max_retries, retries_left, blocked_by, attempt, created_at, updated_at, "
            "completed_at, version, metadata) "
            "SELECT %s, 'f' || lpad(x::text, 8, '0'), '', 'done', 0, 1, 1, '{}', 1, "
            "'2026-01-01Z', '2026-01-01Z', '2026-01-01Z', 1, '{}'::jsonb "
            "FROM generate_series(0, %s - 1) AS x",
            (pid, filler),
        )
        # The filler rows take the tasks' default stripe (0), so that stripe counts them.
        conn.execute(
            f'UPDATE "{schema}".progress SET total = total + %s, done = done + %s '
            "WHERE project_id = %s AND stripe = 0",
            (filler, filler, pid),
        )
        conn.commit()
        conn.autocommit = True
        conn.execute(f'ANALYZE "{schema}".tasks')


def chunks(items: Sequence[tuple[str, str]], rounds: int) -> list[list[tuple[str, str]]]:
    """``items`` cut into ``rounds`` consecutive slices of equal size (the rest dropped)."""
    size = len(items) // rounds
    return [list(items[r * size : (r + 1) * size]) for r in range(rounds)]


_FLOOR_RETRIED = (
    '{"actor":null,"available_at":null,"budget":"one_more","reason":null,'
    '"retry_count":1,"trigger":"manual_retry"}'
)
_FLOOR_PROGRESS = '{"from":"blocked","to":"assigned"}'


def floor_events(pid: str, tid: str, attempt: int, now: int, seq: int) -> tuple[object, ...]:
    """The two event rows of a manual retry as bare parameters (their JSON as constants):
    the floor writes what the library writes, without building it from the core."""
    return (
        pid, seq + 1, "task.retried", tid, attempt, now, _FLOOR_RETRIED,
        pid, seq + 2, "project.progress", tid, attempt, now, _FLOOR_PROGRESS,
    )  # fmt: skip
