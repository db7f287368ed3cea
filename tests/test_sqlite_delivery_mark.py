"""SQLite commits the delivery mark without waiting for the disk, and no other write of a
direct dispatch (a relay's claim does the same: ``test_outbox_relaxed_commits.py``).

A delivery mark lost to a power cut lets a relay deliver the entry again,
which the attempt's fencing token makes harmless; meanwhile its commit holds
the one write lock a worker's ``start`` needs. Every other write keeps the
storage's ``synchronous`` setting, and a connection is lent again only with it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from deepwork_retry import ExecutorService
from deepwork_retry._core.model import DispatchEntry
from deepwork_retry.storage import sqlite as lib_sqlite
from deepwork_retry.storage.sqlite import SQLiteStorage

Trace = list[str]


class Recorder:
    def __init__(self) -> None:
        self.sent: list[DispatchEntry] = []

    def dispatch(self, entry: DispatchEntry) -> None:
        self.sent.append(entry)


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> Trace:
    """Every statement of every connection the storage opens, in order."""
    statements: Trace = []
    connect = SQLiteStorage._connect

    def tracing(self: SQLiteStorage) -> lib_sqlite._Connection:
        conn = connect(self)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(SQLiteStorage, "_connect", tracing)
    return statements


def synchronous_of(storage: SQLiteStorage) -> list[int]:
    """``PRAGMA synchronous`` of every idle connection in the storage's pool."""
    with storage._lock:
        idle = list(storage._idle)
    assert idle
    return [conn.execute("PRAGMA synchronous").fetchone()[0] for conn in idle]


def assign_one(storage: SQLiteStorage) -> Recorder:
    recorder = Recorder()
    service = ExecutorService(storage, recorder)
    service.create_project("p")
    service.add_task("p", "t")
    service.assign("p", "t")
    return recorder


def relaxed_spans(statements: Trace) -> list[list[str]]:
    """The statements between each ``synchronous = NORMAL`` and the next setting."""
    spans: list[list[str]] = []
    current: list[str] | None = None
    for sql in statements:
        text = " ".join(sql.split())
        if text == "PRAGMA synchronous = NORMAL":
            current = []
            spans.append(current)
        elif text.startswith("PRAGMA synchronous"):
            current = None
        elif current is not None:
            current.append(text)
    return spans


def test_only_the_delivery_mark_commits_without_a_sync(traced: Trace, tmp_path: Path) -> None:
    storage = SQLiteStorage(tmp_path / "db.sqlite")  # synchronous="FULL", the default
    try:
        recorder = assign_one(storage)
        assert [e.task_id for e in recorder.sent] == ["t"]
        spans = relaxed_spans(traced)
        assert len(spans) == 1
        (span,) = spans
        assert span[0] == "BEGIN IMMEDIATE"
        assert span[-1] == "COMMIT"
        assert [s for s in span[1:-1] if not s.startswith("UPDATE outbox SET state")] == []
        # Set back to FULL right after the commit, before the connection is lent again.
        after = traced[traced.index("PRAGMA synchronous = NORMAL") :]
        assert [" ".join(s.split()) for s in after].index("PRAGMA synchronous = FULL") == len(
            span
        ) + 1
        assert set(synchronous_of(storage)) == {2}
    finally:
        storage.close()
    conn = sqlite3.connect(tmp_path / "db.sqlite")
    try:
        assert conn.execute("SELECT delivered_at IS NOT NULL FROM outbox").fetchall() == [(1,)]
    finally:
        conn.close()


def test_a_failed_mark_still_sets_the_connection_back(
    traced: Trace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = SQLiteStorage(tmp_path / "db.sqlite")
    try:

        def broken(*args: object, **kwargs: object) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(lib_sqlite._ENGINE, "mark_delivered", broken)
        assign_one(storage)  # the service logs the unrecorded delivery and carries on
        statements = [" ".join(s.split()) for s in traced]
        relaxed = statements.index("PRAGMA synchronous = NORMAL")
        assert statements[relaxed:][:4] == [
            "PRAGMA synchronous = NORMAL",
            "BEGIN IMMEDIATE",
            "ROLLBACK",
            "PRAGMA synchronous = FULL",
        ]
        assert set(synchronous_of(storage)) == {2}
    finally:
        storage.close()


def test_a_normal_storage_never_changes_the_setting(traced: Trace, tmp_path: Path) -> None:
    storage = SQLiteStorage(tmp_path / "db.sqlite", synchronous="NORMAL")
    try:
        assign_one(storage)
        # Set when each connection opens (before the trace starts), never changed after.
        assert [s for s in traced if s.startswith("PRAGMA synchronous")] == []
        assert set(synchronous_of(storage)) == {1}
    finally:
        storage.close()
