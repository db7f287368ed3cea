"""The SQLite storage adapter's own behaviour: schema, persistence, fidelity, failures."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepwork_retry import (
    BlockedReason,
    DispatchState,
    ExecutorService,
    FixedBackoff,
    InvalidTransition,
    Outcome,
    Progress,
    Project,
    ProjectNotFound,
    ProjectStatus,
    RetryBudget,
    RetryPolicy,
    RetryService,
    StaleAttempt,
    Task,
    TaskError,
    TaskEvent,
    TaskNotBlocked,
    TaskNotFound,
    TaskStatus,
    Trigger,
)
from deepwork_retry._core.model import Attempt, DispatchEntry, IdempotencyRecord
from deepwork_retry._core.plans import Plan
from deepwork_retry.exceptions import (
    AlreadyExists,
    IdempotencyConflict,
    InvalidInput,
    StorageCorrupt,
    StorageReadOnly,
    StorageUnavailable,
    VersionConflict,
)
from deepwork_retry.storage.memory import MemoryStorage
from deepwork_retry.storage.sqlite import (
    APPLICATION_ID,
    AsyncSQLiteStorage,
    SQLiteStorage,
    migrations,
)
from deepwork_retry.testing.doubles import FakeClock, RecordingDispatcher

ROOT = Path(__file__).resolve().parent.parent
SQL_DIR = ROOT / "deepwork_retry" / "storage" / "sql" / "sqlite"
T0 = datetime(2025, 3, 4, 5, 6, 7, 891_011, tzinfo=timezone.utc)


class ZeroRandom:
    def random(self) -> float:
        return 0.0


def dump(path: Path) -> list[str]:
    """Every row and schema statement of the file, for "nothing changed" checks."""
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "deepwork.db"


@pytest.fixture
def storage(db: Path) -> Iterator[SQLiteStorage]:
    store = SQLiteStorage(db)
    yield store
    store.close()


def services(storage: Any, clock: FakeClock | None = None) -> tuple[ExecutorService, RetryService]:
    clock = clock or FakeClock(T0)
    common: dict[str, Any] = {"clock": clock, "rng": ZeroRandom()}
    policy = RetryPolicy(backoff=FixedBackoff(wait=5.0))
    dispatcher = RecordingDispatcher()
    return (
        ExecutorService(storage, dispatcher, policy=policy, **common),
        RetryService(storage, dispatcher, **common),
    )


def blocked_task(ex: ExecutorService, pid: str, tid: str) -> Task:
    ex.add_task(pid, tid, title=f"task {tid}", max_retries=0)
    ex.assign(pid, tid)
    ex.start(pid, tid, 1)
    return ex.fail(pid, tid, 1, RuntimeError("boom")).task


# -- schema and migrations ----------------------------------------------------------


def _normalised_schema(conn: sqlite3.Connection) -> list[tuple[str, str, str, str]]:
    rows = conn.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name"
    ).fetchall()
    out = []
    for kind, name, table, sql in rows:
        text = re.sub(r"--[^\n]*", "", sql)
        text = re.sub(r"\s+", " ", text)
        text = re.sub(r"\s*([(),])\s*", r"\1", text).strip().lower()
        out.append((kind, name, table, text))
    return out


def test_migrations_in_order_equal_schema_sql(storage: SQLiteStorage, tmp_path: Path) -> None:
    """The numbered migrations, applied in order, yield exactly the schema of schema.sql."""
    reference = sqlite3.connect(tmp_path / "reference.db")
    reference.executescript((SQL_DIR / "schema.sql").read_text(encoding="utf-8"))
    migrated = sqlite3.connect(storage.path)
    try:
        expected = _normalised_schema(reference)
        assert expected == _normalised_schema(migrated)
        assert [] != expected
    finally:
        reference.close()
        migrated.close()


def test_migrations_are_numbered_from_one_without_gaps() -> None:
    """Migration files are 0001, 0002, ... and the package finds every one of them."""
    on_disk = sorted(p.name for p in SQL_DIR.glob("[0-9][0-9][0-9][0-9]_*.sql"))
    shipped = migrations()
    assert on_disk == [name for _, name, _ in shipped]
    assert list(range(1, len(shipped) + 1)) == [number for number, _, _ in shipped]


def test_open_records_schema_version_and_application_id(storage: SQLiteStorage) -> None:
    """A new file gets WAL, the latest user_version and the library's application_id."""
    conn = sqlite3.connect(storage.path)
    try:
        assert "wal" == conn.execute("PRAGMA journal_mode").fetchone()[0]
        assert migrations()[-1][0] == conn.execute("PRAGMA user_version").fetchone()[0]
        assert APPLICATION_ID == conn.execute("PRAGMA application_id").fetchone()[0]
    finally:
        conn.close()


def test_reopening_applies_nothing_twice(db: Path) -> None:
    """Opening an up-to-date file again leaves its schema and rows exactly as they were."""
    first = SQLiteStorage(db)
    first.create_project(Project(id="p", created_at=T0, updated_at=T0))
    first.close()
    before = dump(db)
    SQLiteStorage(db).close()
    assert before == dump(db)


def test_sql_files_ship_in_the_wheel(tmp_path: Path) -> None:
    """The built wheel contains every SQL migration and schema.sql (SQLite and PostgreSQL)."""
    subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"deepwork_retry/storage/sql/{p.parent.name}/{p.name}"
        for p in SQL_DIR.parent.glob("*/*.sql")
    }
    assert expected == expected & names
    assert "deepwork_retry/storage/sql/sqlite/schema.sql" in names


def test_progress_reads_the_maintained_counters(storage: SQLiteStorage) -> None:
    """progress() returns the counters kept in the projects row, never a recount of tasks."""
    storage.create_project(Project(id="p", created_at=T0, updated_at=T0))
    storage.add_tasks([Task(id="a", project_id="p", created_at=T0, updated_at=T0)])
    conn = sqlite3.connect(storage.path)
    with conn:
        conn.execute("UPDATE projects SET done = 41 WHERE id = 'p'")
    conn.close()
    assert 41 == storage.progress("p").done


# -- persistence and fidelity -----------------------------------------------------------


def test_state_survives_reopening(db: Path) -> None:
    """Tasks, attempts, outbox entries and progress read the same after closing and reopening."""
    first = SQLiteStorage(db)
    ex, rs = services(first)
    ex.create_project("p")
    blocked_task(ex, "p", "t1")
    ex.add_task("p", "t2", blocked_by=["t1"], metadata={"k": [1, "two"]})
    rs.retry("p", "t1", actor="alice", reason="flaky", budget="full")

    def snapshot(s: SQLiteStorage) -> tuple[Any, ...]:
        tasks = s.list_tasks("p")
        return (
            s.get_project("p"),
            tasks,
            [t.metadata for t in tasks],
            [s.attempts("p", t.id) for t in tasks],
            [s.dispatches("p", t.id) for t in tasks],
            s.progress("p"),
            s.dependants("p", "t1"),
        )

    expected = snapshot(first)
    first.close()
    second = SQLiteStorage(db)
    try:
        assert expected == snapshot(second)
    finally:
        second.close()


surrogate_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
aware = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.sampled_from(
        [timezone.utc, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]
    ),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    title=surrogate_text,
    message=st.none() | surrogate_text,
    stamps=st.lists(aware, min_size=6, max_size=6),
    lease=st.none() | aware,
    metadata=st.dictionaries(st.text(max_size=6), json_values, max_size=4),
    status=st.sampled_from(list(TaskStatus)),
    reason=st.none() | st.sampled_from(list(BlockedReason)),
    counts=st.tuples(*[st.integers(0, 2**62)] * 4),
    dep=st.text(st.characters(codec=None, exclude_characters="\x00"), min_size=1, max_size=8),
)
def test_every_field_round_trips(
    title: str,
    message: str | None,
    stamps: list[datetime],
    lease: datetime | None,
    metadata: dict[str, Any],
    status: TaskStatus,
    reason: BlockedReason | None,
    counts: tuple[int, int, int, int],
    dep: str,
) -> None:
    """Every field of projects, tasks, attempts, outbox entries and idempotency keys round-trips."""
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStorage(Path(tmp) / "rt.db", synchronous="NORMAL")
        try:
            project = Project(
                id="p", name=title, status=ProjectStatus.PAUSED, created_at=stamps[0],
                updated_at=stamps[1], version=counts[0] + 1,
            )  # fmt: skip
            task = Task(
                id="t", project_id="p", title=title, status=status, retry_count=counts[0],
                max_retries=counts[1], retries_left=counts[2], error_message=message,
                error_type=message, blocked_reason=reason, blocked_by=("x", dep),
                attempt=0, lease_expires_at=lease, created_at=stamps[2], updated_at=stamps[3],
                started_at=stamps[4], completed_at=stamps[5], version=counts[3] + 1,
                metadata=metadata,
            )  # fmt: skip
            store.create_project(project)
            store.add_tasks([task])
            assert project == store.get_project("p")
            _, loaded = store.load("p", "t")
            assert task == loaded
            assert metadata == dict(loaded.metadata)
            after = attrs.evolve(task, attempt=1, version=task.version + 1)
            attempt = Attempt(
                task_id="t", project_id="p", number=1, trigger=Trigger.MANUAL_RETRY,
                dispatched_at=stamps[0], available_at=stamps[1], actor=message, reason=title,
                budget=RetryBudget.FULL, started_at=lease, finished_at=stamps[2],
                outcome=Outcome.LOST, error_type=title, error_message=message,
            )  # fmt: skip
            entry = DispatchEntry(
                project_id="p", task_id="t", attempt=1, state=DispatchState.DEFERRED,
                available_at=stamps[3], created_at=stamps[4], claimed_until=lease,
                tries=counts[1], last_error=message, delivered_at=stamps[5],
            )  # fmt: skip
            idem = IdempotencyRecord(
                key=title + "k", project_id="p", task_id="t", created_at=stamps[0],
                status_code=200, body=message,
            )  # fmt: skip
            store.apply(
                Plan(event=TaskEvent.BLOCK, before=task, after=after, new_attempt=attempt,
                     dispatch=entry, idempotency=idem)
            )  # fmt: skip
            assert [attempt] == store.attempts("p", "t")
            assert [entry] == store.dispatches("p", "t")
            assert [entry] == store.deferred("p")
            assert idem == store.get_idempotency(title + "k")
            assert [after] == store.dependants("p", dep)
            assert after == store.list_tasks("p")[0]
        finally:
            store.close()


def test_naive_timestamps_are_refused(storage: SQLiteStorage, db: Path) -> None:
    """A timestamp without a timezone is an InvalidInput and stores nothing."""
    before = dump(db)
    with pytest.raises(InvalidInput, match="timezone-aware"):
        storage.create_project(Project(id="p", created_at=datetime(2025, 1, 1)))
    assert before == dump(db)


def test_metadata_that_is_not_json_is_refused(storage: SQLiteStorage, db: Path) -> None:
    """Task metadata SQLite cannot keep as JSON is an InvalidInput and stores nothing."""
    storage.create_project(Project(id="p", created_at=T0, updated_at=T0))
    before = dump(db)
    bad = Task(id="t", project_id="p", created_at=T0, updated_at=T0, metadata={"when": T0})
    with pytest.raises(InvalidInput, match="metadata must be JSON-serialisable"):
        storage.add_tasks([bad])
    assert before == dump(db)


# -- the same answers as MemoryStorage ------------------------------------------------------

# What a task most likely does next in each status; the choice picks one.
NEXT: dict[TaskStatus, list[str]] = {
    TaskStatus.INBOX: ["assign", "skip", "block", "start"],
    TaskStatus.ASSIGNED: ["start", "start", "skip", "retry"],
    TaskStatus.IN_PROGRESS: ["succeed", "fail", "fail_fatal", "lose", "heartbeat", "review"],
    TaskStatus.REVIEW: ["approve", "fail", "skip"],
    TaskStatus.BLOCKED: ["retry", "retry_full", "skip", "assign"],
    TaskStatus.DONE: ["retry", "assign", "skip"],
    TaskStatus.SKIPPED: ["retry", "start"],
}
GLOBAL_OPS = ["relay", "advance", "pause", "resume", "dispatcher", "reap"]


class Stack:
    """The services over one storage, with a clock and dispatcher of their own."""

    def __init__(self, storage: Any) -> None:
        from deepwork_retry import OutboxRelay

        self.storage = storage
        self.clock = FakeClock(T0)
        self.dispatcher = RecordingDispatcher()
        common: dict[str, Any] = {"clock": self.clock, "rng": ZeroRandom()}
        policy = RetryPolicy(backoff=FixedBackoff(wait=5.0), lease=30.0)
        self.ex = ExecutorService(storage, self.dispatcher, policy=policy, **common)
        self.rs = RetryService(storage, self.dispatcher, **common)
        self.relay = OutboxRelay(storage, self.dispatcher, claim_timeout=10.0, **common)

    def do(self, op: str, tid: str, token: int) -> Any:
        ex = self.ex
        actions: dict[str, Callable[[], Any]] = {
            "assign": lambda: ex.assign("p", tid),
            "start": lambda: ex.start("p", tid, token),
            "fail": lambda: ex.fail("p", tid, token, RuntimeError("boom")),
            "fail_fatal": lambda: ex.fail(
                "p", tid, token, TaskError(type="Fatal", message="no", retryable=False)
            ),
            "succeed": lambda: ex.succeed("p", tid, token),
            "review": lambda: ex.succeed("p", tid, token, review=True),
            "approve": lambda: ex.approve("p", tid),
            "reap": ex.reap,
            "retry": lambda: self.rs.retry("p", tid, actor="ann", idempotency_key=f"k{token}"),
            "retry_full": lambda: self.rs.retry("p", tid, budget="full"),
            "skip": lambda: ex.skip("p", tid),
            "block": lambda: ex.block("p", tid, message="held"),
            "lose": lambda: ex.lose("p", tid),
            "heartbeat": lambda: ex.heartbeat("p", tid, token),
            "relay": self.relay.run_once,
            "advance": lambda: self.clock.advance(7.5),
            "pause": lambda: ex.set_project_status("p", "paused"),
            "resume": lambda: ex.set_project_status("p", "executing"),
            "dispatcher": lambda: setattr(self.dispatcher, "failing", not self.dispatcher.failing),
        }
        try:
            return ("ok", actions[op]())
        except Exception as exc:  # noqa: BLE001 - the error itself is what is compared
            return ("error", type(exc).__name__, str(exc))

    def state(self) -> Any:
        s = self.storage
        tasks = s.list_tasks("p")
        now = self.clock.now()
        return (
            s.get_project("p"),
            tasks,
            [
                (s.attempts("p", t.id), s.dispatches("p", t.id), s.dependants("p", t.id))
                for t in tasks
            ],
            s.progress("p"),
            s.deferred("p"),
            s.list_tasks("p", status=TaskStatus.ASSIGNED, after="t1", limit=2),
            s.expired_leases(now=now + timedelta(hours=1), limit=10),
            s.get_tasks("p", ["t3", "zz", "t0", "t3"]),
            self.dispatcher.keys,
            s.claim_due(
                now=now + timedelta(hours=1), limit=50, claimed_until=now + timedelta(hours=2)
            ),
        )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, 4), st.integers(0, 5), st.integers(0, len(GLOBAL_OPS) - 1)),
        max_size=40,
    )
)
def test_same_answers_as_memory_storage(steps: list[tuple[int, int, int]]) -> None:
    """Any sequence of service calls returns the same values and errors on SQLite as in memory."""
    with tempfile.TemporaryDirectory() as tmp:
        sqlite_store = SQLiteStorage(Path(tmp) / "diff.db", synchronous="NORMAL")
        try:
            stacks = [Stack(MemoryStorage()), Stack(sqlite_store)]
            for stack in stacks:
                stack.ex.create_project("p")
                stack.ex.add_task("p", "t0", max_retries=1)
                stack.ex.add_task("p", "t1", max_retries=0)
                stack.ex.add_task("p", "t2", blocked_by=["t0"], max_retries=1)
                stack.ex.add_task("p", "t3", blocked_by=["t0", "t1"], max_retries=0)
            for index, choice, global_op in steps:
                if index == 4:
                    op, tid, token = GLOBAL_OPS[global_op], "t0", 0
                else:
                    tid = f"t{index}"
                    task = stacks[0].storage.load("p", tid)[1]
                    options = NEXT[task.status]
                    op, token = options[choice % len(options)], task.attempt
                expected = stacks[0].do(op, tid, token)
                assert expected == stacks[1].do(op, tid, token), (op, tid)
            assert stacks[0].state() == stacks[1].state()
        finally:
            sqlite_store.close()


# -- lookups of any id ----------------------------------------------------------------------


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pid=st.text(st.characters(codec=None), max_size=300),
    tid=st.text(st.characters(codec=None), max_size=300),
)
def test_any_id_is_not_found_rather_than_a_driver_error(
    storage: SQLiteStorage, pid: str, tid: str
) -> None:
    """Lookups with ids of any length and alphabet (lone surrogates too) are not found."""
    for call in (lambda: storage.get_project(pid), lambda: storage.progress(pid),
                 lambda: storage.list_tasks(pid, after=tid)):  # fmt: skip
        with pytest.raises(ProjectNotFound):
            call()
    for call in (lambda: storage.load(pid, tid), lambda: storage.attempts(pid, tid),
                 lambda: storage.dispatches(pid, tid)):  # fmt: skip
        with pytest.raises((ProjectNotFound, TaskNotFound)):
            call()
    assert {} == storage.get_tasks(pid, [tid])
    assert [] == storage.dependants(pid, tid)
    assert [] == storage.deferred(pid)
    assert storage.get_idempotency(tid) is None


def test_after_with_a_lone_surrogate_pages_in_code_point_order(storage: SQLiteStorage) -> None:
    """list_tasks(after=...) holding a lone surrogate returns the ids above it, as in memory."""
    storage.create_project(Project(id="p", created_at=T0, updated_at=T0))
    ids = ["a", "a\ud7ff", "a\ue000", "b"]
    storage.add_tasks([Task(id=i, project_id="p", created_at=T0, updated_at=T0) for i in ids])
    assert ["a\ue000", "b"] == [t.id for t in storage.list_tasks("p", after="a\udc80")]


def test_ids_that_sqlite_cannot_store_are_refused(storage: SQLiteStorage, db: Path) -> None:
    """A project or task id with a lone surrogate is an InvalidInput and stores nothing."""
    storage.create_project(Project(id="p", created_at=T0, updated_at=T0))
    before = dump(db)
    with pytest.raises(InvalidInput, match="lone surrogates"):
        storage.create_project(Project(id="p\udc80", created_at=T0, updated_at=T0))
    with pytest.raises(InvalidInput, match="lone surrogates"):
        storage.add_tasks([Task(id="t\ud800", project_id="p", created_at=T0, updated_at=T0)])
    assert before == dump(db)


# -- errors: every failure typed, clear, and changing nothing --------------------------------


def test_garbage_file_is_corrupt_at_open_and_left_alone(db: Path) -> None:
    """A file that is not an SQLite database raises StorageCorrupt naming it and stays as it was."""
    db.write_bytes(b"definitely not sqlite\n" * 300)
    with pytest.raises(StorageCorrupt, match=re.escape(str(db))) as info:
        SQLiteStorage(db)
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
    assert b"definitely not sqlite\n" * 300 == db.read_bytes()


def test_damaged_database_is_corrupt(db: Path) -> None:
    """An SQLite file whose pages were overwritten raises StorageCorrupt, never a driver error."""
    store = SQLiteStorage(db)
    ex, _ = services(store)
    ex.create_project("p")
    for i in range(40):
        ex.add_task("p", f"t{i:03d}", title="x" * 200)
    store.close()
    data = bytearray(db.read_bytes())
    page = 4096
    data[page : len(data)] = b"\xff" * (len(data) - page)
    db.write_bytes(bytes(data))

    def reopen_and_read() -> None:
        reopened = SQLiteStorage(db)
        try:
            reopened.list_tasks("p")
        finally:
            reopened.close()

    with pytest.raises(StorageCorrupt, match="damaged"):
        reopen_and_read()


def test_database_of_another_application_is_refused(db: Path) -> None:
    """An SQLite file with other tables raises StorageCorrupt naming them, and gains no tables."""
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        conn.execute("INSERT INTO invoices (total) VALUES (9.5)")
    conn.close()
    before = dump(db)
    with pytest.raises(StorageCorrupt, match=r"another application .*invoices"):
        SQLiteStorage(db)
    assert before == dump(db)


def test_newer_schema_version_is_refused(db: Path) -> None:
    """A file migrated by a newer release raises StorageCorrupt asking for an upgrade."""
    SQLiteStorage(db).close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    with pytest.raises(StorageCorrupt, match="upgrade deepwork_retry"):
        SQLiteStorage(db)


def test_missing_table_is_reported_at_open(db: Path) -> None:
    """A deepwork_retry file missing one of its tables raises StorageCorrupt naming the table."""
    SQLiteStorage(db).close()
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE outbox")
    conn.close()
    with pytest.raises(StorageCorrupt, match="outbox"):
        SQLiteStorage(db)


def test_path_in_a_missing_directory(tmp_path: Path) -> None:
    """A path in a missing directory raises StorageUnavailable naming it and creates nothing."""
    path = tmp_path / "nope" / "deep.db"
    with pytest.raises(StorageUnavailable, match=r"directory .*nope.* does not exist"):
        SQLiteStorage(path)
    assert not (tmp_path / "nope").exists()


def test_path_that_is_a_directory(tmp_path: Path) -> None:
    """A directory given as the database path raises StorageUnavailable saying so."""
    with pytest.raises(StorageUnavailable, match="is a directory"):
        SQLiteStorage(tmp_path)


def test_bad_options_are_invalid_input(db: Path) -> None:
    """Unknown synchronous modes, negative timeouts and ':memory:' are refused before opening."""
    with pytest.raises(InvalidInput, match="synchronous"):
        SQLiteStorage(db, synchronous="OFF")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="timeout"):
        SQLiteStorage(db, timeout=-1)
    with pytest.raises(InvalidInput, match="MemoryStorage"):
        SQLiteStorage(":memory:")
    assert not db.exists()


def test_read_only_database_reads_but_never_writes(db: Path) -> None:
    """Opened read-only, reads work and every write raises StorageReadOnly with nothing changed."""
    writer = SQLiteStorage(db)
    ex, _ = services(writer)
    ex.create_project("p")
    blocked = blocked_task(ex, "p", "t")
    writer.close()
    before = dump(db)
    reader = SQLiteStorage(db, read_only=True)
    try:
        project, task = reader.load("p", "t")
        assert blocked == task
        _, rs = services(reader)
        writes: list[Callable[[], object]] = [
            lambda: rs.retry("p", "t"),
            lambda: reader.create_project(Project(id="q", created_at=T0, updated_at=T0)),
            lambda: reader.add_tasks([Task(id="u", project_id="p", created_at=T0, updated_at=T0)]),
            lambda: reader.claim_due(now=T0, limit=5, claimed_until=T0),
            lambda: reader.save_idempotency(
                IdempotencyRecord(key="k", project_id="p", task_id="t", created_at=T0)
            ),
        ]
        for write in writes:
            with pytest.raises(StorageReadOnly, match="read-only") as info:
                write()
            assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        assert blocked == reader.load("p", "t")[1]
        assert project == reader.get_project("p")
    finally:
        reader.close()
    assert before == dump(db)


def _as_unprivileged(fn: Callable[[], list[str]]) -> list[str]:
    """Run ``fn`` in a forked child as user nobody (root is never refused a write)."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child, which always exits here
        code = 0
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            os.write(write_end, json.dumps(fn()).encode())
        except BaseException:  # noqa: BLE001 - the parent sees the exit code
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(child, 0)
    assert 0 == os.waitstatus_to_exitcode(status)
    result: list[str] = json.loads(data)
    return result


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork() to drop privileges")
@pytest.mark.parametrize("directory_mode", [0o555, 0o777], ids=["read-only-dir", "writable-dir"])
def test_file_without_write_permission_reads_but_refuses_writes(directory_mode: int) -> None:
    """A 0444 file opened by a user who may not write it: reads work, writes are StorageReadOnly."""
    folder = Path(tempfile.mkdtemp(prefix="dw-ro-"))
    try:
        db = folder / "ro.db"
        writer = SQLiteStorage(db)
        writer.create_project(Project(id="p", name="kept", created_at=T0, updated_at=T0))
        writer.close()
        before = dump(db)
        db.chmod(0o444)
        folder.chmod(directory_mode)

        def attempt() -> list[str]:
            out = []
            store = SQLiteStorage(db)
            out.append(store.get_project("p").name)
            try:
                store.create_project(Project(id="q", created_at=T0, updated_at=T0))
            except StorageReadOnly as exc:
                out.append(f"{type(exc).__name__}: {exc}")
            store.close()
            return out

        name, error = _as_unprivileged(attempt)
        assert "kept" == name
        assert error.startswith(f"StorageReadOnly: SQLite database {str(db)!r} is read-only")
        folder.chmod(0o755)
        db.chmod(0o644)
        assert before == dump(db)
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder, ignore_errors=True)


def test_read_only_open_of_a_missing_file(db: Path) -> None:
    """Opening a missing file read-only raises StorageUnavailable and creates nothing."""
    with pytest.raises(StorageUnavailable, match="does not exist"):
        SQLiteStorage(db, read_only=True)
    assert not db.exists()


def test_locked_database_is_unavailable_and_unchanged(db: Path) -> None:
    """A writer holding the lock past the timeout makes writes unavailable; reads still work."""
    store = SQLiteStorage(db, timeout=0.05)
    ex, rs = services(store)
    ex.create_project("p")
    blocked = blocked_task(ex, "p", "t")
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StorageUnavailable, match="locked") as info:
            rs.retry("p", "t")
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        assert 1 == info.value.retry_after
        assert blocked == store.load("p", "t")[1]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert blocked == store.load("p", "t")[1]
    assert TaskStatus.ASSIGNED == rs.retry("p", "t").task.status
    store.close()


def test_closed_storage_is_unavailable(db: Path) -> None:
    """Every call after close() raises StorageUnavailable saying the storage is closed."""
    store = SQLiteStorage(db)
    store.close()
    with pytest.raises(StorageUnavailable, match="closed"):
        store.get_project("p")


# -- bad input through the services ----------------------------------------------------------


@pytest.fixture
def stack(storage: SQLiteStorage) -> tuple[ExecutorService, RetryService]:
    ex, rs = services(storage)
    ex.create_project("p")
    ex.create_project("other")
    blocked_task(ex, "p", "blocked")
    return ex, rs


def _each_status(ex: ExecutorService) -> dict[TaskStatus, str]:
    """One task per non-blocked status in project p; returns status -> task id."""
    ex.add_task("p", "s-inbox")
    ex.add_task("p", "s-assigned")
    ex.assign("p", "s-assigned")
    for tid in ("s-in_progress", "s-review", "s-done"):
        ex.add_task("p", tid)
        ex.assign("p", tid)
        ex.start("p", tid, 1)
    ex.succeed("p", "s-review", 1, review=True)
    ex.succeed("p", "s-done", 1)
    ex.add_task("p", "s-skipped")
    ex.skip("p", "s-skipped")
    return {
        status: f"s-{status.value}" for status in TaskStatus if status is not TaskStatus.BLOCKED
    }


def test_every_non_blocked_status_gives_the_contract_message(
    stack: tuple[ExecutorService, RetryService], db: Path
) -> None:
    """Retrying a task in any status but blocked raises TaskNotBlocked with the exact message."""
    ex, rs = stack
    by_status = _each_status(ex)
    before = dump(db)
    for status, tid in by_status.items():
        assert status == rs.get_task("p", tid).status
        with pytest.raises(TaskNotBlocked) as info:
            rs.retry("p", tid)
        assert f"Can only retry tasks with status 'blocked', got '{status.value}'" == str(
            info.value
        )
    assert before == dump(db)


@pytest.mark.parametrize(
    ("pid", "tid", "error", "message"),
    [
        ("nope", "blocked", ProjectNotFound, "Project not found"),
        ("other", "blocked", TaskNotFound, "Task not found"),
        ("p", "nope", TaskNotFound, "Task not found"),
        ("p", "x" * 5000, TaskNotFound, "Task not found"),
        ("p", "\udc80", TaskNotFound, "Task not found"),
        ("", "blocked", ProjectNotFound, "Project not found"),
        ("p\x00", "blocked", ProjectNotFound, "Project not found"),
    ],
)
def test_unknown_ids_and_wrong_project(
    stack: tuple[ExecutorService, RetryService],
    db: Path,
    pid: str,
    tid: str,
    error: type[Exception],
    message: str,
) -> None:
    """Unknown projects and tasks, and tasks of another project, are not found; nothing changes."""
    _, rs = stack
    before = dump(db)
    with pytest.raises(error) as info:
        rs.retry(pid, tid)
    assert message == str(info.value)
    assert before == dump(db)


def test_illegal_events_raise_typed_errors_and_change_nothing(
    stack: tuple[ExecutorService, RetryService], db: Path
) -> None:
    """Events the transition table forbids, and stale tokens, raise typed errors on SQLite."""
    ex, _ = stack
    by_status = _each_status(ex)
    before = dump(db)
    with pytest.raises(InvalidTransition, match="'done'"):
        ex.assign("p", by_status[TaskStatus.DONE])
    with pytest.raises(InvalidTransition, match="'inbox'"):
        ex.approve("p", by_status[TaskStatus.INBOX])
    with pytest.raises(StaleAttempt):
        ex.succeed("p", by_status[TaskStatus.IN_PROGRESS], 7)
    with pytest.raises(InvalidTransition):
        ex.heartbeat("p", "blocked", 1)
    assert before == dump(db)


def test_adapter_level_conflicts_change_nothing(storage: SQLiteStorage, db: Path) -> None:
    """Duplicate ids, stale plans and reused idempotency keys raise and leave the file as it was."""
    ex, rs = services(storage)
    ex.create_project("p")
    task = blocked_task(ex, "p", "t")
    rs.retry("p", "t", idempotency_key="key-1")
    before = dump(db)
    with pytest.raises(AlreadyExists):
        storage.create_project(Project(id="p", created_at=T0, updated_at=T0))
    with pytest.raises(AlreadyExists):
        storage.add_tasks([Task(id="t", project_id="p", created_at=T0, updated_at=T0)])
    with pytest.raises(ProjectNotFound):
        storage.add_tasks([Task(id="n", project_id="zz", created_at=T0, updated_at=T0)])
    stale = Plan(event=TaskEvent.BLOCK, before=task, after=task)
    with pytest.raises(VersionConflict) as conflict:
        storage.apply(stale)
    assert (task.version, task.version + 1) == (conflict.value.expected, conflict.value.found)
    current = storage.load("p", "t")[1]
    reused = IdempotencyRecord(key="key-1", project_id="p", task_id="t", created_at=T0)
    with pytest.raises(IdempotencyConflict) as idem:
        storage.apply(
            Plan(event=TaskEvent.BLOCK, before=current, after=current, idempotency=reused)
        )
    assert "key-1" == idem.value.record.key
    assert before == dump(db)


def test_async_storage_runs_the_same_operations(db: Path) -> None:
    """AsyncSQLiteStorage serves the async port from worker threads over the same file."""

    async def scenario() -> tuple[Project, Progress]:
        store = AsyncSQLiteStorage(db, timeout=2.0, synchronous="NORMAL")
        try:
            await store.create_project(Project(id="p", created_at=T0, updated_at=T0))
            await store.add_tasks(
                [Task(id=f"t{i}", project_id="p", created_at=T0, updated_at=T0) for i in range(3)]
            )
            return await store.get_project("p"), await store.progress("p")
        finally:
            await store.close()

    project, progress = asyncio.run(scenario())
    assert Project(id="p", created_at=T0, updated_at=T0) == project
    assert Progress(project_id="p", total=3, inbox=3) == progress
    assert os.path.exists(db)


def test_a_long_lived_connection_does_not_grow_with_every_statement(
    storage: SQLiteStorage,
) -> None:
    """CPython's connection keeps a weak reference to each cursor made on it and drops
    the dead ones only in ``Connection.cursor()``: with ``sqlite3.Cursor(conn)`` each
    statement left one behind for the connection's life (about 90 bytes)."""
    import tracemalloc

    storage.create_project(Project(id="p"))
    for _ in range(100):  # warm up the pool and the statement caches
        storage.progress("p")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(5000):
            storage.progress("p")
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 100_000, f"{grown} bytes kept after 5,000 reads"
