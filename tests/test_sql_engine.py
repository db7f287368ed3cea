"""The shared SQL engine: one place for every SQL storage's statements.

SQLite runs the engine's statements and nothing else but its connection setup;
a one-step retry stays one transaction of eight statements (its events one of them); a dialect that
takes ``%s`` parameters gets the same statements with its parameters in the
right order; a dialect whose ``UPDATE`` assigns left to right gets the retry's
assignments ordered so each reads the old values; the shared migration runner
applies a dialect's migrations once.
"""

from __future__ import annotations

import ast
import re
import sqlite3
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_effects_rendered import moves

import deepwork_retry.storage.sqlite as sqlite_module
from deepwork_retry._core import effects
from deepwork_retry._core.effects import ByBudget, Const, Field, Now, Plus
from deepwork_retry._core.model import Project, Task
from deepwork_retry._core.states import BlockedReason, TaskStatus
from deepwork_retry.exceptions import AlreadyExists, InvalidInput, StorageUnavailable
from deepwork_retry.storage._sql import common, statements
from deepwork_retry.storage._sql.dialect import Dialect, Kind, translate
from deepwork_retry.storage._sql.engine import Engine, split_script
from deepwork_retry.storage.sqlite import SQLITE, SQLiteStorage, migrations

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
_DML = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|REPLACE|UPSERT)\b")


def test_sqlite_runs_no_statement_of_its_own_but_its_connection_setup() -> None:
    """Every SELECT/INSERT/UPDATE/DELETE SQLite runs is the engine's; its module keeps
    only connection setup, transactions and the migration bookkeeping."""
    tree = ast.parse(Path(sqlite_module.__file__).read_text(encoding="utf-8"))
    docs = {
        id(body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
        and (body := node.body)
        and isinstance(body[0], ast.Expr)
    }
    texts = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
    ]
    assert [t for t in texts if _DML.search(t) and "sqlite_master" not in t] == []


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[SQLiteStorage]:
    made = SQLiteStorage(tmp_path / "engine.db", synchronous="NORMAL")
    yield made
    made.close()


def _traced(storage: SQLiteStorage) -> list[str]:
    """The statements the pooled connection runs from now on (the pool has one)."""
    seen: list[str] = []
    conn = storage._checkout()
    conn.set_trace_callback(seen.append)
    storage._checkin(conn)
    return seen


@pytest.mark.parametrize("with_key", [False, True])
def test_a_one_step_retry_is_one_transaction_of_eight_statements(
    storage: SQLiteStorage, with_key: bool
) -> None:
    """BEGIN, the guarded update, the counters (numbering the events too), the read back,
    the outbox entry, the attempt record, the events, COMMIT (and the idempotency key's
    reservation when one is given)."""
    storage.create_project(Project(id="p", created_at=T0, updated_at=T0))
    storage.add_tasks(
        [
            Task(
                id="t", project_id="p", status=TaskStatus.BLOCKED, max_retries=2,
                retries_left=0, retry_count=2, blocked_reason=BlockedReason.BUDGET_EXHAUSTED,
                created_at=T0, updated_at=T0,
            )
        ]
    )  # fmt: skip
    seen = _traced(storage)
    applied = storage.retry_blocked(
        "p", "t", now=T0 + timedelta(seconds=1), idempotency_key="k" if with_key else None
    )
    assert applied is not None
    assert applied.task.status is TaskStatus.ASSIGNED
    run = [s.split()[0] for s in seen if not s.startswith("PRAGMA")]
    expected = ["BEGIN", "UPDATE", "UPDATE", "SELECT", "INSERT", "INSERT", "INSERT", "COMMIT"]
    if with_key:
        expected.insert(1, "INSERT")
    assert run == expected


# -- a dialect with %s parameters ---------------------------------------------------------


class _Format(Dialect):
    paramstyle = "format"


_pieces = st.one_of(
    st.sampled_from(["SELECT a", " FROM t", " WHERE ", " AND ", " = ", ", ", "x % 2"]),
    st.builds(lambda s: "'" + s.replace("'", "''") + "'", st.text("?%'ab1 ", max_size=6)),
    st.integers(1, 4).map(lambda n: f"?{n}"),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_pieces, max_size=12))
def test_format_parameters_are_bound_as_numbered_ones(pieces: list[str]) -> None:
    """A statement in SQLite's style, turned into ``%s`` and its parameters reordered,
    reads as the original with each ``?N`` replaced by parameter N (``%`` kept)."""
    text = "".join(pieces)
    used = {int(n) for n in re.findall(r"'(?:[^']|'')*'|\?(\d)", text) if n}
    assume(used == set(range(1, len(used) + 1)))  # a statement takes each parameter
    values = ("<1>", "<2>", "<3>", "<4>")[: len(used)]
    expected = re.sub(
        r"'(?:[^']|'')*'|\?(\d)", lambda m: values[int(m[1]) - 1] if m[1] else m[0], text
    )
    dialect = _Format()
    sql = dialect.sql(text)
    assert sql % tuple(dialect.bind(sql, values)) == expected  # as a format driver binds


def test_plain_parameters_keep_their_order_in_format() -> None:
    dialect = _Format()
    sql = dialect.sql("UPDATE t SET a = ?, b = '?%' WHERE c = ?")
    assert sql == "UPDATE t SET a = %s, b = '?%%' WHERE c = %s"
    assert dialect.bind(sql, (1, 2)) == (1, 2)


def test_every_statement_renders_for_a_format_dialect() -> None:
    """The whole statement set, and the retry's, render with ``%s`` parameters."""
    rendered = statements.Statements(_Format())
    retry = rendered.retry(effects.MANUAL_RETRY)
    for sql in (rendered.update_task, rendered.reserve_idem, *rendered.prune, retry.read):
        assert "?" not in sql.replace("'?'", "")
        assert "%s" in sql


# -- a dialect whose UPDATE assigns left to right -------------------------------------------

_INTS = {"retry_count", "max_retries", "retries_left", "attempt", "version"}


def _value(expr: effects.Expr, row: dict[str, Any], full: bool) -> Any:
    if isinstance(expr, Const):
        return expr.value
    if isinstance(expr, Now):
        return "now"
    if isinstance(expr, Field):
        return row[expr.name]
    if isinstance(expr, Plus):
        return row[expr.name] + expr.delta
    if isinstance(expr, ByBudget):
        return _value(expr.full if full else expr.one_more, row, full)
    raise AssertionError(expr)


@settings(max_examples=100, deadline=None)
@given(moves(), st.booleans())
def test_sequential_assignments_read_the_old_values(move: effects.Move, full: bool) -> None:
    """Assigned one after another, each seeing the new values before it, the ordered
    effects give what SQL's all-at-once ``SET`` gives (or the order is refused)."""
    old = {f: (i if f in _INTS else f"old {f}") for i, f in enumerate(common.TASK_FIELDS)}
    at_once = {**old, **{name: _value(e, old, full) for name, e in move.task}}
    try:
        ordered = statements.sequential(move)
    except ValueError:
        return  # two fields read each other: no order keeps both old values
    row = dict(old)
    for name, expr in ordered.task:
        row[name] = _value(expr, row, full)
    assert row == at_once


def test_fields_reading_each_other_have_no_sequential_order() -> None:
    swap = effects.Move(
        event=effects.MANUAL_RETRY.event,
        task=(
            ("status", Const(TaskStatus.ASSIGNED)),
            ("error_message", Field("error_type")),
            ("error_type", Field("error_message")),
        ),
    )
    with pytest.raises(ValueError, match="no order"):
        statements.sequential(swap)


# -- errors --------------------------------------------------------------------------------------


def test_sqlite_errors_are_classified_by_the_shared_table(tmp_path: Path) -> None:
    """A real constraint error is a conflict; a real lock wait is busy; each translates
    to the library's error for its kind."""
    db = tmp_path / "e.db"
    conn = sqlite3.connect(db, isolation_level=None, timeout=0)
    conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY)")
    conn.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(sqlite3.IntegrityError) as taken:
        conn.execute("INSERT INTO t VALUES (1)")
    assert SQLITE.classify(taken.value) is Kind.CONFLICT
    assert isinstance(translate(SQLITE, taken.value, where="'e.db'"), AlreadyExists)
    conn.execute("BEGIN IMMEDIATE")
    other = sqlite3.connect(db, isolation_level=None, timeout=0)
    with pytest.raises(sqlite3.OperationalError) as locked:
        other.execute("BEGIN IMMEDIATE")
    assert SQLITE.classify(locked.value) is Kind.BUSY
    error = translate(SQLITE, locked.value, where="'e.db'", waited=0)
    assert isinstance(error, StorageUnavailable)
    assert "locked by another writer" in str(error)
    conn.execute("ROLLBACK")
    conn.close()
    other.close()
    assert isinstance(translate(SQLITE, OverflowError(), where="x"), InvalidInput)


# -- the shared migration runner -------------------------------------------------------------


def test_the_shared_runner_applies_each_migration_once() -> None:
    """On a database recording migrations in a table: all pending ones in order, then none."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    engine = Engine(SQLITE)
    assert engine.migrate(conn, now=T0) == [m.number for m in migrations()]
    assert engine.migrate(conn, now=T0) == []
    assert engine.pending_migrations(conn) == []
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {"projects", "tasks", "outbox", "attempts", "idempotency"} <= tables
    conn.close()


def test_scripts_split_at_semicolons_outside_quotes_and_comments() -> None:
    script = "CREATE TABLE a (x TEXT DEFAULT 'a;''b'); -- not; a statement\nDROP TABLE \"q;\" ;"
    assert split_script(script) == ["CREATE TABLE a (x TEXT DEFAULT 'a;''b')", 'DROP TABLE "q;"']
    with pytest.raises(InvalidInput, match="unterminated"):
        split_script("SELECT 'open")
