"""The reads across projects on the SQL storages: their order is Python's str order
on every database, whatever the ids hold, and a page is served by an index.

The data set (``overview_support``) is stored once per storage; Hypothesis then
draws cursors, page sizes, project sets and error types, and every page must be
what Python computes from the data.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mysql_support import database_dropped_after
from overview_support import (
    BLOCKED,
    ERROR_TYPES,
    IDS,
    PROJECTS,
    SETS,
    SETTINGS,
    TEXT,
    expected_blocked,
    expected_projects,
    fill,
    progress,
)
from pg_support import schema_dropped_after
from sqlalchemy.engine import make_url

from deepwork_retry._core.states import TaskStatus
from deepwork_retry.exceptions import InvalidInput
from deepwork_retry.storage import _postgres_sql
from deepwork_retry.storage._sql.engine import Engine
from deepwork_retry.storage._sql.mysql import MySQLDialect
from deepwork_retry.storage.postgres import PostgresStorage
from deepwork_retry.storage.sqlalchemy import SQLAlchemyStorage
from deepwork_retry.storage.sqlite import SQLITE, SQLiteStorage


def _pg_url(dsn: str) -> str:
    return dsn.replace("postgresql://", "postgresql+psycopg://", 1)


STORAGES = [
    "sqlite",
    "sqlalchemy-sqlite",
    pytest.param("sqlalchemy-mariadb", marks=pytest.mark.mysql),
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("postgres-joined", marks=pytest.mark.postgres),
    pytest.param("sqlalchemy-postgres", marks=pytest.mark.postgres),
]


@pytest.fixture(scope="module", params=STORAGES)
def filled(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A storage holding the data set (one per module and kind: the tests only read)."""
    kind = request.param
    folder = tmp_path_factory.mktemp(kind)
    if kind == "sqlite":
        store = SQLiteStorage(folder / "o.db")
        yield fill(store)
        store.close()
    elif kind == "sqlalchemy-sqlite":
        store = SQLAlchemyStorage.from_url(f"sqlite:///{folder / 'o.db'}")
        yield fill(store)
        store.close()
    elif kind == "sqlalchemy-mariadb":
        with database_dropped_after(request.getfixturevalue("mysql_url")) as url:
            store = SQLAlchemyStorage.from_url(url.render_as_string(hide_password=False))
            yield fill(store)
            store.close()
    else:
        dsn = request.getfixturevalue("postgres_dsn")
        with schema_dropped_after(dsn, "ov") as schema:
            if kind == "sqlalchemy-postgres":
                store = SQLAlchemyStorage.from_url(_pg_url(dsn), schema=schema)
                yield fill(store)
                store.close()
                return
            own = PostgresStorage(dsn, schema=schema, max_size=2)
            fill(own)
            if kind == "postgres":
                yield own
            else:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    yield PostgresStorage.joining(conn, schema=schema)
            own.close()


def test_every_project_in_python_order_with_itsprogress(filled: Any) -> None:
    """Pages of 4 walk every project once, by code point, each with its counters."""
    seen: list[str] = []
    after = None
    while True:
        page = filled.list_projects(after=after, limit=4)
        for summary in page:
            assert summary.project == next(p for p in PROJECTS if p.id == summary.project.id)
            assert summary.progress == progress(summary.project.id)
        seen += [s.project.id for s in page]
        if len(page) < 4:
            break
        after = page[-1].project.id
    assert seen == sorted(IDS)


@SETTINGS
@given(after=st.one_of(st.none(), TEXT), limit=st.integers(1, 20), projects=SETS)
def test_a_page_of_projects_is_pythons(
    filled: Any, after: str | None, limit: int, projects: frozenset[str] | None
) -> None:
    page = filled.list_projects(projects=projects, after=after, limit=limit)
    assert [s.project.id for s in page] == expected_projects(projects, after)[:limit]
    assert all(s.progress == progress(s.project.id) for s in page)


def test_every_blocked_task_walked_in_python_order(filled: Any) -> None:
    seen: list[tuple[str, str]] = []
    after = None
    while True:
        page = filled.blocked_tasks(after=after, limit=3)
        assert all(t.status is TaskStatus.BLOCKED for t in page)
        seen += [(t.project_id, t.id) for t in page]
        if len(page) < 3:
            break
        after = (page[-1].project_id, page[-1].id)
    assert seen == [(t.project_id, t.id) for t in BLOCKED]


@SETTINGS
@given(
    after=st.one_of(st.none(), st.tuples(TEXT, TEXT)),
    limit=st.integers(1, 30),
    projects=SETS,
    error_type=ERROR_TYPES,
)
def test_a_page_of_blocked_tasks_is_pythons(
    filled: Any,
    after: tuple[str, str] | None,
    limit: int,
    projects: frozenset[str] | None,
    error_type: str | None,
) -> None:
    page = filled.blocked_tasks(projects=projects, error_type=error_type, after=after, limit=limit)
    expected = expected_blocked(projects, error_type, after)[:limit]
    assert [(t.project_id, t.id) for t in page] == expected
    by_key = {(t.project_id, t.id): t for t in BLOCKED}
    assert all(t == by_key[(t.project_id, t.id)] for t in page)


def test_an_empty_set_of_projects_holds_nothing(filled: Any) -> None:
    assert filled.list_projects(projects=frozenset()) == []
    assert filled.blocked_tasks(projects=frozenset()) == []
    assert filled.blocked_tasks(projects=frozenset({"no such project"})) == []


@pytest.mark.parametrize("limit", [0, 1001, -1, "10", 2.0])
def test_a_bad_limit_is_refused(filled: Any, limit: Any) -> None:
    with pytest.raises(InvalidInput):
        filled.list_projects(limit=limit)
    with pytest.raises(InvalidInput):
        filled.blocked_tasks(limit=limit)


@pytest.mark.parametrize(
    "after", [("a",), ("a", "b", "c"), ["a", "b"], ("a", 1), "a", ("a\x00", "b"), ("", "b")]
)
def test_a_malformed_cursor_is_refused(filled: Any, after: Any) -> None:
    with pytest.raises(InvalidInput):
        filled.blocked_tasks(after=after)


def test_more_projects_than_one_in_list_holds(filled: Any) -> None:
    """A set longer than one ``IN`` list is read in runs, still in order."""
    many = frozenset({*IDS, *(f"missing {n:04}" for n in range(1200))})
    assert [s.project.id for s in filled.list_projects(projects=many, limit=1000)] == sorted(IDS)
    page = filled.blocked_tasks(projects=many, after=("a", "a"), limit=1000)
    assert [(t.project_id, t.id) for t in page] == expected_blocked(None, None, ("a", "a"))


# -- plans: a page is read from an index, not by scanning every task ------------------

_ENGINE = Engine(SQLITE)
_SHAPES = [  # (projects listed, by error type, after project, after task)
    (0, False, None, None),
    (0, True, None, None),
    (0, False, "=", ">"),
    (0, False, ">=", None),
    (3, False, "=", ">="),
    (3, True, None, None),
]


@pytest.mark.parametrize("shape", _SHAPES)
def test_sqlite_reads_blocked_tasks_from_their_index(tmp_path: Path, shape: Any) -> None:
    SQLiteStorage(tmp_path / "plan.db").close()
    conn = sqlite3.connect(tmp_path / "plan.db")
    try:
        statement = _ENGINE.sql.blocked_tasks(*shape)
        plan = conn.execute(
            f"EXPLAIN QUERY PLAN {statement}", [""] * statement.count("?")
        ).fetchall()
    finally:
        conn.close()
    details = " | ".join(row[-1] for row in plan)
    assert "USING INDEX tasks_blocked" in details, details
    assert "TEMP B-TREE" not in details, details  # already in order: no sort


def test_sqlite_reads_projects_in_key_order(tmp_path: Path) -> None:
    SQLiteStorage(tmp_path / "plan.db").close()
    conn = sqlite3.connect(tmp_path / "plan.db")
    try:
        for count, op in [(0, None), (0, ">"), (3, None)]:
            statement = _ENGINE.sql.list_projects(count, op)
            plan = conn.execute(
                f"EXPLAIN QUERY PLAN {statement}", [""] * statement.count("?")
            ).fetchall()
            details = " | ".join(row[-1] for row in plan)
            assert "TEMP B-TREE" not in details, details
    finally:
        conn.close()


_BULK_PROJECTS = 40
_BULK_TASKS = 500
"""Projects and tasks per project of the plan tests (1 in 50 tasks blocked)."""


@pytest.fixture(scope="module")
def pg_bulk(postgres_dsn: str) -> Any:
    """A schema of 1,000 projects, the first 40 with 500 tasks each (1 in 50 blocked),
    statistics gathered: a connection to it and its statements."""
    with schema_dropped_after(postgres_dsn, "plan") as schema:
        PostgresStorage(postgres_dsn, schema=schema, max_size=1).close()
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(
                f"INSERT INTO {schema}.projects (id, status, name, created_at, updated_at, version)"
                f" SELECT 'p' || lpad(n::text, 3, '0'), 'executing', '', now(), now(), 1"
                " FROM generate_series(0, 999) AS n"
            )
            conn.execute(
                f"INSERT INTO {schema}.progress (project_id, stripe)"
                f" SELECT id, s FROM {schema}.projects, generate_series(0, 3) AS s"
            )
            conn.execute(
                f"INSERT INTO {schema}.tasks (project_id, id, title, status, retry_count,"
                " max_retries, retries_left, error_type, blocked_by, attempt, created_at,"
                " updated_at, version, metadata)"
                " SELECT 'p' || lpad(p::text, 3, '0'), 't' || lpad(n::text, 4, '0'), '',"
                " CASE WHEN n % 50 = 7 THEN 'blocked' ELSE 'done' END, 0, 3, 3,"
                " CASE WHEN n % 50 = 7 THEN 'E' || (n % 3) END, '{}', 1, now(), now(), 1, '{}'"
                f" FROM generate_series(0, {_BULK_PROJECTS - 1}) AS p,"
                f" generate_series(0, {_BULK_TASKS - 1}) AS n"
            )
            for table in ("projects", "progress", "tasks"):
                conn.execute(f"ANALYZE {schema}.{table}")
            yield conn, _postgres_sql.Queries(schema)


def _pg_plan(pg_bulk: Any, query: bytes, params: Any) -> str:
    conn, _ = pg_bulk
    (plan,) = conn.execute(b"EXPLAIN (FORMAT JSON) " + query, params).fetchone()
    return json.dumps(plan)


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("projects", "error_type", "after"),
    [
        (None, None, None),
        (None, "E1", None),
        (None, None, ("p010", "t0100")),
        (None, None, ("p010\x00", "t0100")),
        (["p010", "p020"], None, ("p010", "t0100")),
    ],
)
def test_postgres_reads_blocked_tasks_from_their_index(
    pg_bulk: Any, projects: list[str] | None, error_type: str | None, after: Any
) -> None:
    text = _pg_plan(pg_bulk, *pg_bulk[1].blocked_tasks(projects, error_type, after, 20))
    assert "tasks_blocked" in text, text
    assert "Seq Scan" not in text, text
    if error_type is None:  # read in order (a filter may rather sort the blocked rows)
        assert '"Sort"' not in text, text


@pytest.mark.postgres
@pytest.mark.parametrize("after", [None, "p010"])
def test_postgres_reads_projects_and_their_stripes_by_key(pg_bulk: Any, after: Any) -> None:
    text = _pg_plan(pg_bulk, *pg_bulk[1].list_projects(None, after, 20))
    assert "projects_pkey" in text, text
    assert "progress_pkey" in text, text
    assert "Seq Scan" not in text, text


@pytest.mark.postgres
def test_postgres_orders_ids_as_python_whatever_the_database_collation(
    postgres_dsn: str,
) -> None:
    """The id columns are ``COLLATE "C"`` (the database's own collation may be any:
    a libc or ICU one would put "a" beside "A"), so pages follow Python's order."""
    with schema_dropped_after(postgres_dsn, "coll") as schema:
        store = PostgresStorage(postgres_dsn, schema=schema, max_size=1)
        try:
            fill(store)
            with psycopg.connect(postgres_dsn) as conn:
                collations = {
                    row[0]
                    for row in conn.execute(
                        "SELECT collation_name FROM information_schema.columns"
                        " WHERE table_schema = %s AND table_name IN ('projects', 'tasks')"
                        " AND column_name IN ('id', 'project_id')",
                        (schema,),
                    )
                }
            assert collations == {"C"}
            assert [s.project.id for s in store.list_projects(limit=100)] == sorted(IDS)
        finally:
            store.close()


@pytest.mark.mysql
@pytest.mark.parametrize(
    ("projects", "after"),
    [(None, None), (None, ("p010", "t0100")), (["p010", "p020"], ("p010", "t0100"))],
)
def test_mariadb_reads_blocked_tasks_from_an_index(
    mysql_url: str, projects: list[str] | None, after: Any
) -> None:
    """MySQL has no partial index: ``tasks_assigned`` leads with the status, so the
    blocked tasks are one range of it, in (project, id) order; never a table scan."""
    with database_dropped_after(mysql_url) as url:
        migrated = SQLAlchemyStorage.from_url(url.render_as_string(hide_password=False))
        migrated.open()
        migrated.close()
        parsed = make_url(url)
        conn = pymysql.connect(
            host=parsed.host, port=parsed.port or 3306, user=parsed.username,
            password=parsed.password or "", database=parsed.database, autocommit=True,
        )  # fmt: skip
        try:
            with conn.cursor() as cur:
                rows = [
                    (f"p{p:03}", f"t{n:04}", "blocked" if n % 50 == 7 else "done")
                    for p in range(_BULK_PROJECTS)
                    for n in range(_BULK_TASKS)
                ]
                cur.executemany(
                    "INSERT INTO tasks (project_id, id, title, status, retry_count, max_retries,"
                    " retries_left, blocked_by, attempt, created_at, updated_at, version,"
                    " metadata) VALUES (%s, %s, '', %s, 0, 3, 3, '[]', 1, 0, 0, 1, '{}')",
                    rows,
                )
                cur.execute("ANALYZE TABLE tasks")
                cur.fetchall()
                engine = Engine(MySQLDialect())
                count = 0 if projects is None else len(projects)
                shape = (None, None) if after is None else ("=", ">")
                statement = engine.sql.blocked_tasks(count, False, *shape)
                params = [*(projects or []), *(after or ()), 20]
                cur.execute(f"EXPLAIN {statement}", engine.dialect.bind(statement, params))
                plan = cur.fetchall()
        finally:
            conn.close()
    assert len(plan) == 1, plan
    access, key = plan[0][3], plan[0][5]
    assert access in ("ref", "range"), plan
    assert key in ("tasks_assigned", "tasks_by_status", "PRIMARY"), plan
    if projects is None:
        assert key == "tasks_assigned", plan  # all projects: the status leads
    assert "filesort" not in (plan[0][-1] or ""), plan
