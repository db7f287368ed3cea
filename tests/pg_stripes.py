"""Helpers for the PostgreSQL tests: a project's progress stripes against a recount."""

from __future__ import annotations

from psycopg import sql

from deepwork_retry.storage._postgres_sql import COUNTERS, STRIPES
from deepwork_retry.storage.postgres import PostgresStorage


def stripes(store: PostgresStorage, project_id: str) -> tuple[dict[int, dict[str, int]], ...]:
    """Each progress stripe's stored counters, and the same counted from the tasks."""
    stored: dict[int, dict[str, int]] = {}
    counted: dict[int, dict[str, int]] = {}
    with store.pool.connection() as conn:
        for row in conn.execute(
            sql.SQL("SELECT stripe, {} FROM {} WHERE project_id = %s").format(
                sql.SQL(", ").join(map(sql.Identifier, COUNTERS)),
                sql.Identifier(store.schema, "progress"),
            ),
            (project_id,),
        ):
            stored[row[0]] = dict(zip(COUNTERS, row[1:], strict=True))
        for stripe in stored:
            counted[stripe] = dict.fromkeys(COUNTERS, 0)
        for stripe, status, count in conn.execute(
            sql.SQL(
                "SELECT stripe, status, count(*) FROM {} WHERE project_id = %s GROUP BY 1, 2"
            ).format(sql.Identifier(store.schema, "tasks")),
            (project_id,),
        ):
            counted[stripe][status] += count
            counted[stripe]["total"] += count
    return stored, counted


def assert_stripes_exact(store: PostgresStorage, project_id: str) -> None:
    """The project has its STRIPES rows, and each one counts exactly its own tasks."""
    stored, counted = stripes(store, project_id)
    assert list(range(STRIPES)) == sorted(stored)
    assert counted == stored
