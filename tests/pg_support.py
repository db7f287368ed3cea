"""Helpers for the PostgreSQL tests: a fresh schema per test, dropped afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

from deepwork_retry import ExecutorService


def new_schema_name(prefix: str = "t") -> str:
    """A schema name no other test uses."""
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def drop_schema(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@contextmanager
def schema_dropped_after(dsn: str, prefix: str = "t") -> Iterator[str]:
    """A fresh schema name; the schema (if created) is dropped on exit."""
    schema = new_schema_name(prefix)
    try:
        yield schema
    finally:
        drop_schema(dsn, schema)


def finished_tasks(executor: ExecutorService, project: str, *tasks: str) -> None:
    """Make ``project`` with ``tasks``, each run once to ``done`` (one attempt record each)."""
    executor.create_project(project)
    for task in tasks:
        executor.add_task(project, task, max_retries=0)
        executor.assign(project, task)
        executor.start(project, task, 1)
        executor.succeed(project, task, 1)
