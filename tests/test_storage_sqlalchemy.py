"""The SQLAlchemy storage's own behaviour: which databases it takes, one SQLite file
shared with SQLiteStorage, and its migrations run from a host's transaction."""

from __future__ import annotations

import functools
import tempfile
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pg_support import schema_dropped_after
from sqlalchemy import create_engine

from deepwork_retry import ExecutorService, RetryService, TaskError
from deepwork_retry.exceptions import (
    InvalidInput,
    StorageCorrupt,
    StorageMissing,
    TaskNotBlocked,
)
from deepwork_retry.storage._sql import common
from deepwork_retry.storage.sqlalchemy import TABLES, SQLAlchemyStorage, migrate
from deepwork_retry.storage.sqlite import SQLiteStorage

_FAKE_DRIVER = types.SimpleNamespace(paramstyle="format", Error=Exception, __version__="1.31.2")
"""Enough of a DB-API module for SQLAlchemy to make an engine it never connects."""


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql+pg8000://u@h/d", "only through psycopg 3"),
        ("mssql+pymssql://u@h/d", "does not support mssql"),
    ],
)
def test_an_unsupported_database_or_driver_is_refused_clearly(url: str, says: str) -> None:
    """A database or driver the storage cannot run on is refused when it is made."""
    engine = create_engine(url, module=_FAKE_DRIVER)
    with pytest.raises(InvalidInput, match=says):
        SQLAlchemyStorage(engine)


def test_anything_but_an_engine_connection_or_session_is_refused() -> None:
    with pytest.raises(InvalidInput, match="needs an Engine"):
        SQLAlchemyStorage("sqlite:///x.db")  # type: ignore[arg-type]


def test_one_sqlite_file_serves_both_storages(tmp_path: Path) -> None:
    """What one storage writes the other reads: same schema, same encodings, same marks."""
    path = tmp_path / "shared.db"
    sqla = SQLAlchemyStorage.from_url(f"sqlite:///{path}")
    ExecutorService(sqla).create_project("p", name="Å project")
    ExecutorService(sqla).add_task("p", "t", metadata={"k": [1, "é"]})
    with SQLiteStorage(path, create=False) as sqlite:
        assert sqla.load("p", "t") == sqlite.load("p", "t")
        ExecutorService(sqlite).add_task("p", "u")
    assert ["t", "u"] == [t.id for t in sqla.list_tasks("p")]
    assert 2 == sqla.progress("p").total
    sqla.close()


def test_the_host_tables_may_share_the_file_but_another_application_may_not(
    tmp_path: Path,
) -> None:
    """The host's own tables are left alone beside ours; a file marked by another
    application is refused, untouched."""
    engine = create_engine(f"sqlite:///{tmp_path / 'host.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE orders (id INTEGER PRIMARY KEY)")
    storage = SQLAlchemyStorage(engine)
    ExecutorService(storage).create_project("p")
    other = create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    with other.begin() as conn:
        conn.exec_driver_sql("PRAGMA application_id = 42")
    with pytest.raises(StorageCorrupt, match="another application"):
        SQLAlchemyStorage(other).get_project("p")
    with engine.connect() as conn:
        query = "SELECT name FROM sqlite_master WHERE type = 'table'"
        names = {r[0] for r in conn.exec_driver_sql(query)}
    assert names - {"orders"} <= TABLES
    assert "orders" in names
    engine.dispose()
    other.dispose()


def test_migrate_runs_in_the_host_transaction_as_an_alembic_revision_would(
    tmp_path: Path,
) -> None:
    """``migrate(connection)`` joins the transaction open there: rolled back, nothing of
    the schema remains; committed, a storage that does not migrate finds it complete."""
    engine = create_engine(f"sqlite:///{tmp_path / 'alembic.db'}")

    def failed_revision() -> None:
        with engine.begin() as conn:
            assert len(common.migrations("sqlite")) == len(migrate(conn))
            raise RuntimeError("the revision failed")

    with pytest.raises(RuntimeError):
        failed_revision()
    with pytest.raises(StorageMissing):
        SQLAlchemyStorage(engine, migrate=False).get_project("p")
    with engine.begin() as conn:
        migrate(conn)
    fresh = create_engine(f"sqlite:///{tmp_path / 'alembic.db'}")
    storage = SQLAlchemyStorage(fresh, migrate=False)
    ExecutorService(storage).create_project("p")
    assert "p" == storage.get_project("p").id
    assert [] == migrate(fresh)
    engine.dispose()
    fresh.dispose()


_PG_MIGRATIONS = [m.number for m in common.migrations("postgres")]
"""Every PostgreSQL migration shipped, by number."""


@pytest.mark.postgres
def test_postgres_schema_is_migrated_by_name_and_checked(postgres_dsn: str) -> None:
    """On PostgreSQL the tables live in ``schema``: ``migrate(engine, schema=...)`` makes
    them, a storage that does not migrate checks them, and a schema without them is
    refused as missing, with nothing created."""
    url = postgres_dsn.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = create_engine(url)
    try:
        with schema_dropped_after(postgres_dsn, "sqla") as schema:
            with pytest.raises(StorageMissing, match=schema):
                SQLAlchemyStorage(engine, migrate=False, schema=schema).get_project("p")
            assert _PG_MIGRATIONS == migrate(engine, schema=schema)
            storage = SQLAlchemyStorage(engine, migrate=False, schema=schema)
            ExecutorService(storage).create_project("p")
            assert "p" == storage.get_project("p").id
            with pytest.raises(InvalidInput, match="PostgreSQL"):
                SQLAlchemyStorage(create_engine("sqlite://"), schema=schema)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_postgres_migrate_in_a_host_transaction_rolls_back_with_it(postgres_dsn: str) -> None:
    """``migrate(connection, schema=...)`` on PostgreSQL runs in the transaction open
    there: rolled back, the schema's tables are gone again."""
    engine = create_engine(postgres_dsn.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with schema_dropped_after(postgres_dsn, "sqla") as schema:
            with engine.connect() as conn, conn.begin() as transaction:
                assert _PG_MIGRATIONS == migrate(conn, schema=schema)
                transaction.rollback()
            with pytest.raises(StorageMissing):
                SQLAlchemyStorage(engine, migrate=False, schema=schema).get_project("p")
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_postgres_joined_retry_is_one_round_trip_as_on_the_host_connection(
    postgres_dsn: str,
) -> None:
    """Inside a host transaction on PostgreSQL, a retry through the SQLAlchemy storage
    costs what it costs through ``PostgresStorage.joining``: one round trip (savepoint,
    retry, release and the transaction's id), and a refused one leaves the host's
    transaction usable."""
    engine = create_engine(postgres_dsn.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with schema_dropped_after(postgres_dsn, "sqla") as schema:
            migrate(engine, schema=schema)
            executor = ExecutorService(SQLAlchemyStorage(engine, schema=schema))
            executor.create_project("p")
            for task_id in ("t", "u"):
                executor.add_task("p", task_id, max_retries=0)
                executor.assign("p", task_id)
                executor.start("p", task_id, 1)
                executor.fail("p", task_id, 1, TaskError(type="E", message="boom"))
            with engine.connect() as conn, conn.begin():
                conn.exec_driver_sql("SELECT 1")  # the host's own first statement
                retries = RetryService(SQLAlchemyStorage(conn, schema=schema))
                raw = conn.connection.driver_connection
                assert isinstance(raw, psycopg.Connection)
                counts = [_round_trips(raw, functools.partial(retries.retry, "p", t)) for t in "tu"]
                assert [(1, 4), (1, 4)] == counts
                with pytest.raises(TaskNotBlocked):
                    retries.retry("p", "t")
                assert 1 == conn.exec_driver_sql("SELECT 1").scalar()
            storage = SQLAlchemyStorage(engine, schema=schema)
            assert ["assigned", "assigned"] == [storage.load("p", t)[1].status for t in "tu"]
    finally:
        engine.dispose()


def _round_trips(conn: psycopg.Connection[Any], fn: Callable[[], object]) -> tuple[int, int]:
    """``(round trips, statements executed)`` on ``conn`` while ``fn`` runs, from libpq's
    protocol trace (a round trip ends with the server's ReadyForQuery)."""
    with tempfile.TemporaryFile("w+") as trace:
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            fn()
        finally:
            conn.pgconn.untrace()
        trace.seek(0)
        lines = trace.read().splitlines()
    trips = sum(1 for line in lines if line.startswith("B\t") and "\tReadyForQuery" in line)
    statements = sum(1 for line in lines if line.startswith("F\t") and "\tExecute" in line)
    return trips, statements
