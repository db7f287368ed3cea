"""The outbox's claims and delivery marks commit without waiting for the disk.

Losing either to a crash is the same as the relay crashing before it: the
entry is delivered again, and the attempt's fencing token makes that second
delivery run nothing. So on the storage's own connections they do not wait
for the flush (SQLite ``synchronous = NORMAL``, PostgreSQL
``synchronous_commit = off`` for that one transaction); every other write
keeps its durability, and so does a host's transaction that a joined storage
writes in.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from pg_support import schema_dropped_after

from deepwork_retry import ExecutorService
from deepwork_retry._core.model import DispatchEntry
from deepwork_retry.storage import sqlite as lib_sqlite
from deepwork_retry.storage.postgres import PostgresStorage, migrate
from deepwork_retry.storage.sqlite import SQLiteStorage
from deepwork_retry.testing import FakeClock


class Refusing:
    """A dispatcher that cannot deliver: the entry stays pending, for a relay."""

    def dispatch(self, entry: DispatchEntry) -> None:
        raise ConnectionError("broker down")


def leave_pending(service: ExecutorService) -> None:
    service.create_project("p")
    service.add_task("p", "t")
    service.assign("p", "t")


# -- SQLite ------------------------------------------------------------------------
def test_sqlite_claims_commit_without_a_sync_and_set_the_connection_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    statements: list[str] = []
    connect = SQLiteStorage._connect

    def tracing(self: SQLiteStorage) -> lib_sqlite._Connection:
        conn = connect(self)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(SQLiteStorage, "_connect", tracing)
    clock = FakeClock()
    storage = SQLiteStorage(tmp_path / "db.sqlite")  # synchronous="FULL", the default
    try:
        leave_pending(ExecutorService(storage, Refusing(), clock=clock))
        del statements[:]
        now = clock.now() + timedelta(minutes=5)
        claimed = storage.claim_due(now=now, limit=10, claimed_until=now + timedelta(seconds=30))
        assert [e.task_id for e in claimed] == ["t"]
        text = [" ".join(s.split()) for s in statements]
        start = text.index("PRAGMA synchronous = NORMAL")
        end = text.index("PRAGMA synchronous = FULL", start)
        span = text[start + 1 : end]
        assert span[0] == "BEGIN IMMEDIATE"
        assert span[-1] == "COMMIT"
        assert any("claimed_until" in s for s in span[1:-1])
        with storage._lock:
            idle = list(storage._idle)
        assert {c.execute("PRAGMA synchronous").fetchone()[0] for c in idle} == {2}
    finally:
        storage.close()
    conn = sqlite3.connect(tmp_path / "db.sqlite")
    try:
        assert conn.execute("SELECT claimed_until IS NOT NULL FROM outbox").fetchall() == [(1,)]
    finally:
        conn.close()


# -- PostgreSQL ------------------------------------------------------------------------
pg = pytest.mark.postgres


@pytest.fixture
def schema(postgres_dsn: str) -> Iterator[str]:
    with schema_dropped_after(postgres_dsn, "pgrelax") as name:
        migrate(postgres_dsn, schema=name)
        yield name


def setting_after(conn: psycopg.Connection, statement: bytes, params: object) -> str:
    """``synchronous_commit`` inside a transaction, right after ``statement`` ran in it."""
    with conn.transaction(force_rollback=True):
        conn.execute(statement, params)
        row = conn.execute("SHOW synchronous_commit").fetchone()
        assert row is not None
        return str(row[0])


@pg
def test_postgres_claim_and_mark_texts_turn_the_flush_off_for_their_transaction_only(
    postgres_dsn: str, schema: str
) -> None:
    clock = FakeClock()
    storage = PostgresStorage(postgres_dsn, schema=schema, max_size=2)
    try:
        leave_pending(ExecutorService(storage, Refusing(), clock=clock))
        q = storage._q
        now = clock.now() + timedelta(minutes=5)
        claim = {"now": now, "limit": 10, "until": now + timedelta(seconds=30)}
        mark = (now, ["p"], ["t"], [1])
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            assert setting_after(conn, q.claim_due, claim) == "on"
            assert setting_after(conn, q.claim_due_relaxed, claim) == "off"
            assert setting_after(conn, q.mark_delivered, mark) == "on"
            assert setting_after(conn, q.mark_delivered_relaxed, mark) == "off"
            # Local to the transaction: the next one is durable again.
            row = conn.execute("SHOW synchronous_commit").fetchone()
            assert row is not None
            assert row[0] == "on"
        # The storage's own calls use them, and still claim and mark as before.
        claimed = storage.claim_due(now=now, limit=10, claimed_until=now + timedelta(seconds=30))
        assert [e.task_id for e in claimed] == ["t"]
        storage.mark_delivered(claimed, now=now)
        assert [e.state.value for e in storage.dispatches("p", "t")] == ["delivered"]
    finally:
        storage.close()


@pg
def test_postgres_a_joined_storage_leaves_the_hosts_transaction_durable(
    postgres_dsn: str, schema: str
) -> None:
    clock = FakeClock()
    with psycopg.connect(postgres_dsn) as conn:
        storage = PostgresStorage.joining(conn, schema=schema)
        leave_pending(ExecutorService(storage, Refusing(), clock=clock))
        conn.commit()
        now = clock.now() + timedelta(minutes=5)
        with conn.transaction(force_rollback=True):
            conn.execute("SELECT 1")  # the host's transaction is open
            claimed = storage.claim_due(
                now=now, limit=10, claimed_until=now + timedelta(seconds=30)
            )
            storage.mark_delivered(claimed, now=now)
            assert [e.task_id for e in claimed] == ["t"]
            row = conn.execute("SHOW synchronous_commit").fetchone()
            assert row is not None
            assert row[0] == "on"
