"""The PostgreSQL storage adapter's own behaviour: migrations, one-statement apply,
locking, outbox claims, notifications and error translation, on a real server.

Every test works in a schema of its own, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pg_stripes import assert_stripes_exact, stripes
from pg_support import schema_dropped_after
from psycopg import errors, sql

from deepwork_retry import (
    DispatchState,
    ExecutorService,
    NoBackoff,
    ProjectNotFound,
    RetryPolicy,
    RetryService,
    TaskError,
    TaskNotFound,
    TaskStatus,
)
from deepwork_retry._core import decide
from deepwork_retry._core.model import Progress, Project, Task
from deepwork_retry.exceptions import (
    AlreadyExists,
    InvalidInput,
    StorageCorrupt,
    StorageUnavailable,
    VersionConflict,
)
from deepwork_retry.storage import _postgres_sql as q
from deepwork_retry.storage._postgres_sql import STRIPES, DriverErrors, check_schema, stripe_of
from deepwork_retry.storage.memory import MemoryStorage
from deepwork_retry.storage.postgres import (
    AsyncPostgresStorage,
    PostgresStorage,
    amigrate,
    migrate,
)
from deepwork_retry.testing.doubles import RecordingDispatcher

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parent.parent
SQL_DIR = ROOT / "deepwork_retry" / "storage" / "sql" / "postgres"
T0 = datetime(2025, 3, 4, 5, 6, 7, 891_011, tzinfo=timezone.utc)
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/test"
NO_BACKOFF = RetryPolicy(backoff=NoBackoff())


@pytest.fixture
def pg_schema(postgres_dsn: str) -> Iterator[str]:
    with schema_dropped_after(postgres_dsn) as schema:
        yield schema


@pytest.fixture
def store(postgres_dsn: str, pg_schema: str) -> Iterator[PostgresStorage]:
    storage = PostgresStorage(postgres_dsn, schema=pg_schema, max_size=4)
    try:
        yield storage
    finally:
        storage.close()


@pytest.fixture
def raw(postgres_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        yield conn


def blocked_tasks(storage: PostgresStorage, project: str, ids: list[str]) -> ExecutorService:
    """Create ``project`` with the tasks ``ids``, each run into ``blocked``."""
    ex = ExecutorService(storage, policy=NO_BACKOFF)
    ex.create_project(project)
    for tid in ids:
        ex.add_task(project, tid, max_retries=0)
        ex.assign(project, tid)
        ex.start(project, tid, 1)
        ex.fail(project, tid, 1, TaskError(type="Fatal", message="boom", retryable=False))
    return ex


def state(storage: PostgresStorage, project: str) -> tuple[Any, ...]:
    """Everything stored about ``project``, for "nothing changed" checks."""
    tasks = storage.list_tasks(project, limit=1000)
    return (
        storage.get_project(project),
        tasks,
        [storage.attempts(project, t.id) for t in tasks],
        [storage.dispatches(project, t.id) for t in tasks],
        storage.progress(project),
    )


# -- import, schema names, migrations ---------------------------------------------------


def test_import_without_psycopg_names_the_extra() -> None:
    """Importing the adapter without psycopg raises an ImportError naming the postgres extra."""
    code = (
        "import sys; sys.modules['psycopg'] = None\n"
        "try:\n"
        "    import deepwork_retry.storage.postgres\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert "deepwork-retry[postgres]" in done.stdout


@pytest.mark.parametrize("name", ["Bad", "1abc", "a-b", 'a"b', "", "x" * 51, "a b"])
def test_schema_name_validated(name: str) -> None:
    """Schema names outside [a-z_][a-z0-9_]{0,49} raise InvalidInput before any I/O."""
    with pytest.raises(InvalidInput):
        check_schema(name)
    with pytest.raises(InvalidInput):
        PostgresStorage(UNREACHABLE, schema=name, migrate=False)


def test_migrate_applies_once(postgres_dsn: str, pg_schema: str) -> None:
    """migrate returns the migrations it applied, and nothing the second time."""
    assert [m.number for m in q.migrations()] == migrate(postgres_dsn, schema=pg_schema)
    assert [] == migrate(postgres_dsn, schema=pg_schema)
    assert [] == asyncio.run(amigrate(postgres_dsn, schema=pg_schema))


def test_migrate_from_many_processes_at_once(postgres_dsn: str, pg_schema: str) -> None:
    """Several processes migrating one schema at once apply each migration exactly once."""
    command = [
        sys.executable, "-m", "deepwork_retry.storage.postgres",
        "migrate", "--dsn", postgres_dsn, "--schema", pg_schema,
    ]  # fmt: skip
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [0, 0, 0, 0] == [proc.returncode for proc in procs], outputs
    said = sorted(out.strip() for out, _ in outputs)
    every = ", ".join(f"{m.number:04d}" for m in q.migrations())
    assert [f"applied: {every}", *["applied: nothing pending"] * 3] == said
    with psycopg.connect(postgres_dsn) as conn:
        rows = conn.execute(
            sql.SQL("SELECT number FROM {}.schema_migrations").format(sql.Identifier(pg_schema))
        ).fetchall()
    assert [(m.number,) for m in q.migrations()] == rows


def test_migrate_from_many_threads_at_once(postgres_dsn: str, pg_schema: str) -> None:
    """Threads racing to migrate a fresh schema apply the migrations once between them."""
    results: list[list[int]] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        barrier.wait(timeout=30)
        results.append(migrate(postgres_dsn, schema=pg_schema))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [[], [], [], [m.number for m in q.migrations()]] == sorted(results)


CATALOG = {
    "columns": """
        SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               co.collname, pg_get_expr(d.adbin, d.adrelid)
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_collation co ON co.oid = a.attcollation AND a.attcollation <> 0
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE n.nspname = %(s)s AND a.attnum > 0 AND NOT a.attisdropped
          AND c.relkind IN ('r', 'p', 'v', 'm')
        ORDER BY 1, 2""",
    "relations": """
        SELECT c.relname, c.relkind FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %(s)s ORDER BY 1""",
    "constraints": """
        SELECT c.relname, k.conname, replace(pg_get_constraintdef(k.oid), %(s)s, 'SCHEMA')
        FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
        JOIN pg_namespace n ON n.oid = k.connamespace WHERE n.nspname = %(s)s ORDER BY 1, 2""",
    "indexes": """
        SELECT tablename, indexname, replace(indexdef, %(s)s, 'SCHEMA')
        FROM pg_indexes WHERE schemaname = %(s)s ORDER BY 1, 2""",
    "sequences": """
        SELECT sequencename, data_type::text, start_value, increment_by
        FROM pg_sequences WHERE schemaname = %(s)s ORDER BY 1""",
}


def catalog(conn: psycopg.Connection[Any], schema: str) -> dict[str, list[tuple[Any, ...]]]:
    """The schema's tables, columns, constraints, indexes and sequences, bookkeeping aside."""
    dump = {}
    for name, query in CATALOG.items():
        rows = conn.execute(query, {"s": schema}).fetchall()  # type: ignore[call-overload]
        dump[name] = [row for row in rows if "schema_migrations" not in row[0]]
    return dump


def test_schema_sql_equals_migrations(postgres_dsn: str, raw: psycopg.Connection[Any]) -> None:
    """The migrations applied in order build exactly the schema written in schema.sql."""
    with (
        schema_dropped_after(postgres_dsn) as migrated,
        schema_dropped_after(postgres_dsn) as fresh,
    ):
        migrate(postgres_dsn, schema=migrated)
        with raw.transaction():
            raw.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(fresh)))
            raw.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(fresh)))
            raw.execute((SQL_DIR / "schema.sql").read_bytes())
        expected = catalog(raw, fresh)
        actual = catalog(raw, migrated)
    assert expected == actual
    assert 60 <= len(actual["columns"])
    assert 10 <= len(actual["indexes"])


def test_migration_0003_puts_existing_counters_in_stripe_0(
    postgres_dsn: str, pg_schema: str
) -> None:
    """A schema at migration 0002 holding tasks: 0003 makes the existing tasks and each
    project's counters stripe 0 and adds the other stripes at zero, so every stripe is
    exact at once and stays exact as old and new tasks move."""
    queries = q.Queries(pg_schema)
    old_tasks = [
        Task(id=f"old{n}", project_id="p", status=status, max_retries=0, created_at=T0,
             updated_at=T0)
        for n, status in enumerate([TaskStatus.INBOX] * 3 + [TaskStatus.BLOCKED] * 2)
    ]  # fmt: skip
    with psycopg.connect(postgres_dsn, autocommit=True) as conn, conn.transaction():
        conn.execute(queries.bootstrap)
        for migration in q.migrations():
            if migration.number < 3:
                conn.execute(queries.search_path)
                conn.execute(migration.text.encode())
                conn.execute(queries.record_migration, (migration.number, migration.name))
        # What the storage wrote before 0003: one progress row per project.
        conn.execute(
            queries.render(
                "INSERT INTO {s}.projects (id, status, name, created_at, updated_at, version)"
                " VALUES ('p', 'executing', '', %s, %s, 1), ('empty', 'executing', '', %s, %s, 1)"
            ),
            (T0, T0, T0, T0),
        )
        conn.execute(
            queries.render(
                "INSERT INTO {s}.progress (project_id, total, inbox, blocked)"
                " VALUES ('p', 5, 3, 2), ('empty', 0, 0, 0)"
            )
        )
        columns = ", ".join(q.TASK_COLS)
        values = ", ".join(f"%(t_{c})s" for c in q.TASK_COLS)
        with conn.cursor() as cur:
            cur.executemany(
                queries.render(f"INSERT INTO {{s}}.tasks ({columns}) VALUES ({values})"),
                [q.task_params(task) for task in old_tasks],
            )
    assert [m.number for m in q.migrations() if m.number >= 3] == migrate(
        postgres_dsn, schema=pg_schema
    )
    storage = PostgresStorage(postgres_dsn, schema=pg_schema, migrate=False)
    try:
        stored, _ = stripes(storage, "p")
        assert 5 == stored[0]["total"]
        assert {0} == {counts["total"] for stripe, counts in stored.items() if stripe}
        assert_stripes_exact(storage, "p")
        assert_stripes_exact(storage, "empty")
        assert Progress(project_id="p", total=5, inbox=3, blocked=2) == storage.progress("p")
        ex = ExecutorService(storage, policy=NO_BACKOFF)
        ex.assign("p", "old0")
        RetryService(storage).retry("p", "old3")
        for n in range(8):
            ex.add_task("p", f"new{n}", max_retries=0)
            ex.assign("p", f"new{n}")
        ex.start("p", "new0", 1)
        ex.fail("p", "new0", 1, TaskError(type="Fatal", message="boom", retryable=False))
        result = RetryService(storage).retry("p", "new0")
        tasks = storage.list_tasks("p", limit=100)
        recount = Progress.recount("p", [t.status for t in tasks])
        assert recount == result.progress == storage.progress("p")
        assert_stripes_exact(storage, "p")
    finally:
        storage.close()


def test_new_project_has_every_stripe_and_tasks_spread_over_them(store: PostgresStorage) -> None:
    """A new project has its STRIPES rows at zero; task ids spread evenly over them."""
    store.create_project(Project(id="p", created_at=T0, updated_at=T0))
    stored, counted = stripes(store, "p")
    assert list(range(STRIPES)) == sorted(stored)
    assert counted == stored
    assert Progress(project_id="p") == store.progress("p")
    spread = [0] * STRIPES
    for n in range(4000):
        spread[stripe_of(f"task-{n}")] += 1
    assert min(spread) > 4000 // STRIPES // 2
    assert stripe_of("\ud800") in range(STRIPES)  # never raises, whatever the id


@settings(max_examples=25, deadline=None)
@given(
    batches=st.lists(
        st.lists(
            st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(list(TaskStatus))),
            max_size=12,
        ),
        max_size=5,
    )
)
def test_added_tasks_counted_in_their_stripes_as_in_memory(
    postgres_dsn: str, batches: list[list[tuple[str, TaskStatus]]]
) -> None:
    """Batches of new tasks of any statuses over two projects: the summed stripes equal
    the memory storage's progress, and each stripe counts exactly its own tasks."""
    with schema_dropped_after(postgres_dsn) as schema:
        storage = PostgresStorage(postgres_dsn, schema=schema, max_size=1)
        memory = MemoryStorage()
        try:
            for target in (storage, memory):
                for pid in ("a", "b"):
                    target.create_project(Project(id=pid, created_at=T0, updated_at=T0))
            number = 0
            for batch in batches:
                tasks = []
                for pid, status in batch:
                    number += 1
                    tasks.append(
                        Task(id=f"t{number}", project_id=pid, status=status, created_at=T0,
                             updated_at=T0)
                    )  # fmt: skip
                storage.add_tasks(tasks)
                memory.add_tasks(tasks)
            for pid in ("a", "b"):
                assert memory.progress(pid) == storage.progress(pid)
                assert_stripes_exact(storage, pid)
        finally:
            storage.close()


def test_concurrent_batches_into_one_project_never_deadlock(
    postgres_dsn: str, store: PostgresStorage
) -> None:
    """Threads adding batches that span every stripe of one project all succeed: the
    stripes are locked in one order, so no two batches wait for each other in a cycle."""
    store.create_project(Project(id="p", created_at=T0, updated_at=T0))
    failures: list[BaseException] = []
    start = threading.Barrier(4)

    def add(n: int) -> None:
        own = PostgresStorage(postgres_dsn, schema=store.schema, max_size=1, migrate=False)
        try:
            start.wait(timeout=60)
            for b in range(15):
                ids = [f"w{n}-{b}-{k}" for k in range(8)]
                if n % 2:
                    ids.reverse()
                own.add_tasks(
                    [Task(id=tid, project_id="p", created_at=T0, updated_at=T0) for tid in ids]
                )
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)
        finally:
            own.close()

    threads = [threading.Thread(target=add, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [] == failures
    assert Progress(project_id="p", total=4 * 15 * 8, inbox=4 * 15 * 8) == store.progress("p")
    assert_stripes_exact(store, "p")


def test_unmigrated_schema_is_reported(postgres_dsn: str, pg_schema: str) -> None:
    """A storage told not to migrate an empty schema raises StorageCorrupt naming the fix."""
    storage = PostgresStorage(postgres_dsn, schema=pg_schema, migrate=False)
    try:
        with pytest.raises(StorageCorrupt, match="migrate") as caught:
            storage.get_project("p")
        assert isinstance(caught.value.__cause__, psycopg.Error)
    finally:
        storage.close()


def test_from_pool_uses_the_host_pool(postgres_dsn: str, pg_schema: str) -> None:
    """A storage over a host's open pool works and leaves the pool open when closed."""
    from psycopg_pool import ConnectionPool

    migrate(postgres_dsn, schema=pg_schema)
    pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
        postgres_dsn, min_size=1, max_size=2, kwargs={"autocommit": True}, open=True
    )
    try:
        storage = PostgresStorage.from_pool(pool, schema=pg_schema)
        storage.create_project(Project(id="p", created_at=T0, updated_at=T0))
        storage.close()
        assert "p" == PostgresStorage.from_pool(pool, schema=pg_schema).get_project("p").id
        assert pool.closed is False
    finally:
        pool.close()


# -- values and lookups --------------------------------------------------------------------

ODD_IDS = ["B", "a", "a b", "é", "Z\u00e9", "\u4e2d", "\U0001f600", "~", "a\U0010ffff", "0"]


def test_ids_sort_by_code_point_like_python(store: PostgresStorage) -> None:
    """list_tasks orders ids by code point, as Python sorts str, whatever the collation."""
    store.create_project(Project(id="p", created_at=T0, updated_at=T0))
    store.add_tasks([Task(id=i, project_id="p", created_at=T0, updated_at=T0) for i in ODD_IDS])
    assert sorted(ODD_IDS) == [t.id for t in store.list_tasks("p")]


def test_list_after_agrees_with_memory(store: PostgresStorage) -> None:
    """list_tasks(after=...) selects the same ids as memory storage, even for NUL or surrogates."""
    memory = MemoryStorage()
    tasks = [Task(id=i, project_id="p", created_at=T0, updated_at=T0) for i in ODD_IDS]
    for storage in (memory, store):
        storage.create_project(Project(id="p", created_at=T0, updated_at=T0))
        storage.add_tasks(tasks)
    odd = st.sampled_from(["\x00", "\ud800", "\udfff", "\ud7ff", "\ue000", "a", "\U0010ffff"])
    text = st.text(alphabet=st.one_of(odd, st.characters(exclude_categories=())), max_size=4)

    @settings(max_examples=60, deadline=None)
    @given(after=text)
    def agree(after: str) -> None:
        expected = [t.id for t in memory.list_tasks("p", after=after)]
        assert expected == [t.id for t in store.list_tasks("p", after=after)]

    agree()


@pytest.mark.parametrize("bad", ["a\x00b", "\ud800", "x\udfffy", "\x00"])
def test_unstorable_ids_are_not_found(store: PostgresStorage, bad: str) -> None:
    """Ids with NUL or lone surrogates are simply not found by every lookup."""
    blocked_tasks(store, "p", ["t"])
    with pytest.raises(ProjectNotFound):
        store.get_project(bad)
    with pytest.raises(ProjectNotFound):
        store.progress(bad)
    with pytest.raises(ProjectNotFound):
        store.list_tasks(bad)
    with pytest.raises(ProjectNotFound):
        store.load(bad, "t")
    with pytest.raises(TaskNotFound):
        store.load("p", bad)
    with pytest.raises(TaskNotFound):
        store.attempts("p", bad)
    with pytest.raises(TaskNotFound):
        store.dispatches(bad, "t")
    assert {} == store.get_tasks("p", [bad])
    assert ["t"] == list(store.get_tasks("p", [bad, "t"]))
    assert [] == store.dependants("p", bad)
    assert [] == store.deferred(bad)
    assert store.get_idempotency(bad) is None
    with pytest.raises(ProjectNotFound):
        RetryService(store).retry(bad, "t")
    with pytest.raises(TaskNotFound):
        RetryService(store).retry("p", bad)


def test_unstorable_text_rejected_and_nothing_added(store: PostgresStorage) -> None:
    """A title PostgreSQL cannot hold raises InvalidInput and the batch adds nothing."""
    store.create_project(Project(id="p", created_at=T0, updated_at=T0))
    good = Task(id="a", project_id="p", created_at=T0, updated_at=T0)
    for title in ("nul\x00here", "half \ud800 pair"):
        bad = Task(id="b", project_id="p", title=title, created_at=T0, updated_at=T0)
        with pytest.raises(InvalidInput):
            store.add_tasks([good, bad])
    with pytest.raises(InvalidInput):
        store.add_tasks([Task(id="c", project_id="p", metadata={"f": object()})])
    assert [] == store.list_tasks("p")
    assert Progress(project_id="p") == store.progress("p")


def test_error_text_with_nul_is_kept_readable(store: PostgresStorage) -> None:
    """An executor error holding NUL or a lone surrogate is stored with U+FFFD in its place."""
    ex = ExecutorService(store, policy=NO_BACKOFF)
    ex.create_project("p")
    ex.add_task("p", "t", max_retries=0)
    ex.assign("p", "t")
    ex.start("p", "t", 1)
    result = ex.fail("p", "t", 1, TaskError(type="E\x00", message="bad \ud800 \x00 end"))
    assert "bad \ufffd \ufffd end" == result.task.error_message
    assert "bad \ufffd \ufffd end" == store.attempts("p", "t")[0].error_message
    assert "E\ufffd" == store.load("p", "t")[1].error_type


def test_duplicate_project_race_is_already_exists(store: PostgresStorage) -> None:
    """Creating a project twice raises AlreadyExists and keeps one progress row."""
    project = Project(id="p", created_at=T0, updated_at=T0)
    store.create_project(project)
    with pytest.raises(AlreadyExists):
        store.create_project(project)
    assert Progress(project_id="p") == store.progress("p")


# -- one round trip ------------------------------------------------------------------------


class Wire:
    """What one connection sends, read from libpq's protocol trace."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def record(self, fn: Callable[[], object]) -> list[tuple[str, str]]:
        """``(direction, message)`` for every protocol message while ``fn`` runs."""
        with tempfile.TemporaryFile("w+") as trace:
            self.conn.pgconn.trace(trace.fileno())
            self.conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
            try:
                fn()
            finally:
                self.conn.pgconn.untrace()
            trace.seek(0)
            fields = [line.split("\t") for line in trace.read().splitlines()]
        return [(f[0], f[2].split(" ")[0]) for f in fields if len(f) > 2]

    def round_trips(self, fn: Callable[[], object]) -> tuple[int, int]:
        """``(round trips, statements executed)`` while ``fn`` runs.

        A round trip ends with the server's ReadyForQuery; a statement is an
        Execute (extended protocol) or a Query (simple protocol).
        """
        messages = self.record(fn)
        trips = sum(1 for d, m in messages if d == "B" and m == "ReadyForQuery")
        statements = sum(1 for d, m in messages if d == "F" and m in ("Execute", "Query"))
        return trips, statements


def test_manual_retry_apply_is_one_round_trip(postgres_dsn: str, pg_schema: str) -> None:
    """Applying a manual retry sends one statement in one round trip, every time."""
    storage = PostgresStorage(postgres_dsn, schema=pg_schema, min_size=1, max_size=1)
    try:
        ids = [f"t{n}" for n in range(8)]
        blocked_tasks(storage, "p", ids)
        with storage.pool.connection() as conn:
            wire = Wire(conn)
        counts = []
        for tid in ids:  # past the driver's prepare threshold (5 executions)
            project, task = storage.load("p", tid)
            plan = decide.manual_retry(
                task, project, now=datetime.now(timezone.utc), blockers={},
                idempotency_key=f"key-{tid}",
            )  # fmt: skip
            counts.append(wire.round_trips(lambda plan=plan: storage.apply(plan)))
        assert [(1, 1)] * len(ids) == counts
        assert {TaskStatus.ASSIGNED} == {t.status for t in storage.list_tasks("p")}
    finally:
        storage.close()


def test_retry_service_round_trips(postgres_dsn: str, pg_schema: str) -> None:
    """RetryService.retry costs one round trip every time, and one more to record a delivery."""
    storage = PostgresStorage(postgres_dsn, schema=pg_schema, min_size=1, max_size=1)
    try:
        ids = [f"t{n}" for n in range(10)]
        blocked_tasks(storage, "p", ids)
        with storage.pool.connection() as conn:
            wire = Wire(conn)
        service = RetryService(storage)
        counts = [wire.round_trips(lambda tid=tid: service.retry("p", tid)) for tid in ids[:8]]
        assert [(1, 1)] * 8 == counts  # the first sends the preparation with the execution
        with_dispatcher = RetryService(storage, RecordingDispatcher())
        counts = [
            wire.round_trips(lambda tid=tid: with_dispatcher.retry("p", tid)) for tid in ids[8:]
        ]
        assert [(2, 2)] * 2 == counts  # the retry, then the delivery recorded
        assert {TaskStatus.ASSIGNED} == {t.status for t in storage.list_tasks("p")}
    finally:
        storage.close()


# -- concurrency -------------------------------------------------------------------------


def test_blockers_finishing_at_once_release_the_dependant(
    postgres_dsn: str, pg_schema: str
) -> None:
    """Two blockers of one task succeeding at the same moment dispatch that task exactly once."""
    # Deadlocks between the two finishers are expected; find them quickly.
    dsn = (
        postgres_dsn + ("&" if "?" in postgres_dsn else "?") + "options=-c%20deadlock_timeout%3D20"
    )
    storage = PostgresStorage(dsn, schema=pg_schema, max_size=4)
    try:
        dispatcher = RecordingDispatcher()
        ex = ExecutorService(storage, dispatcher, policy=NO_BACKOFF)
        for round_ in range(6):
            pid = f"p{round_}"
            ex.create_project(pid)
            ex.add_task(pid, "a")
            ex.add_task(pid, "b")
            ex.add_task(pid, "d", blocked_by=["a", "b"])
            for tid in ("a", "b", "d"):
                ex.assign(pid, tid)
            ex.start(pid, "a", 1)
            ex.start(pid, "b", 1)
            barrier = threading.Barrier(2)
            failures: list[BaseException] = []

            def finish(
                tid: str,
                pid: str = pid,
                barrier: threading.Barrier = barrier,
                failures: list[BaseException] = failures,
            ) -> None:
                barrier.wait(timeout=30)
                try:
                    ex.succeed(pid, tid, 1)
                except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                    failures.append(exc)

            threads = [threading.Thread(target=finish, args=(tid,)) for tid in ("a", "b")]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            assert [] == failures
            keys = [key for key in dispatcher.keys if key[0] == pid]
            assert [(pid, "a", 1), (pid, "b", 1), (pid, "d", 1)] == sorted(keys)
            [entry] = storage.dispatches(pid, "d")
            assert DispatchState.DELIVERED == entry.state
    finally:
        storage.close()


def test_claim_skips_rows_locked_by_another_relay(
    store: PostgresStorage, raw: psycopg.Connection[Any], pg_schema: str
) -> None:
    """claim_due passes over entries another transaction holds, without waiting for it."""
    ex = ExecutorService(store)  # no dispatcher: entries stay unclaimed for relays
    ex.create_project("p")
    for n in range(6):
        ex.add_task("p", f"t{n}")
        ex.assign("p", f"t{n}")
    now = datetime.now(timezone.utc) + timedelta(seconds=1)
    with raw.transaction():
        held = raw.execute(
            sql.SQL(
                "SELECT task_id FROM {}.outbox WHERE task_id IN ('t1', 't4') FOR UPDATE"
            ).format(sql.Identifier(pg_schema))
        ).fetchall()
        assert 2 == len(held)
        first = store.claim_due(now=now, limit=10, claimed_until=now + timedelta(seconds=30))
    assert ["t0", "t2", "t3", "t5"] == [e.task_id for e in first]
    later = now + timedelta(seconds=1)
    second = store.claim_due(now=later, limit=10, claimed_until=later + timedelta(seconds=30))
    assert ["t1", "t4"] == [e.task_id for e in second]


def test_concurrent_claims_never_share_an_entry(postgres_dsn: str, store: PostgresStorage) -> None:
    """Relays claiming at once from separate connections receive disjoint entries, all of them."""
    ex = ExecutorService(store)
    ex.create_project("p")
    for n in range(60):
        ex.add_task("p", f"t{n:02d}")
        ex.assign("p", f"t{n:02d}")
    relays = [PostgresStorage(postgres_dsn, schema=store.schema, migrate=False) for _ in range(4)]
    claimed: list[list[str]] = [[] for _ in relays]
    barrier = threading.Barrier(len(relays))
    now = datetime.now(timezone.utc) + timedelta(seconds=1)

    def claim(index: int) -> None:
        barrier.wait(timeout=30)
        for _ in range(60):
            got = relays[index].claim_due(now=now, limit=3, claimed_until=now + timedelta(hours=1))
            if not got:
                return
            claimed[index].extend(e.task_id for e in got)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(relays))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        for relay in relays:
            relay.close()
    everything = [tid for part in claimed for tid in part]
    assert sorted(f"t{n:02d}" for n in range(60)) == sorted(everything)


# -- notifications -----------------------------------------------------------------------


def test_pending_work_wakes_a_waiting_relay(postgres_dsn: str, store: PostgresStorage) -> None:
    """A write that leaves a due entry for relays wakes wait_for_work at once."""
    writer = PostgresStorage(postgres_dsn, schema=store.schema, migrate=False)
    try:
        assert store.wait_for_work(0) is False  # now listening
        ex = ExecutorService(writer)
        ex.create_project("p")
        ex.add_task("p", "t")
        woke: list[bool] = []
        waiter = threading.Thread(target=lambda: woke.append(store.wait_for_work(60)))
        waiter.start()
        ex.assign("p", "t")
        waiter.join(timeout=90)
        assert [True] == woke
        assert store.wait_for_work(0) is False  # one wake-up drained the backlog
    finally:
        writer.close()


def test_work_claimed_by_its_writer_wakes_nobody(store: PostgresStorage) -> None:
    """Entries the writer claims and delivers itself send no notification."""
    assert store.wait_for_work(0) is False
    ex = ExecutorService(store, RecordingDispatcher())
    ex.create_project("p")
    ex.add_task("p", "t")
    ex.assign("p", "t")
    assert store.wait_for_work(0.2) is False


def test_async_wait_for_work(postgres_dsn: str, pg_schema: str) -> None:
    """The async storage's wait_for_work wakes on a write from another connection."""
    from deepwork_retry import AsyncExecutorService

    async def main() -> list[bool]:
        async with (
            AsyncPostgresStorage(postgres_dsn, schema=pg_schema) as waiter,
            AsyncPostgresStorage(postgres_dsn, schema=pg_schema) as writer,
        ):
            assert await waiter.wait_for_work(0) is False
            ex = AsyncExecutorService(writer)
            await ex.create_project("p")
            await ex.add_task("p", "t")
            wait = asyncio.ensure_future(waiter.wait_for_work(60))
            await ex.assign("p", "t")
            return [await wait, await waiter.wait_for_work(0)]

    assert [True, False] == asyncio.run(main())


# -- failures ----------------------------------------------------------------------------


def test_unreachable_server_is_unavailable() -> None:
    """Nothing listening on the port: every call raises StorageUnavailable with the cause kept."""
    storage = PostgresStorage(UNREACHABLE, migrate=False, timeout=0.3)
    try:
        with pytest.raises(StorageUnavailable) as caught:
            storage.get_project("p")
        assert isinstance(caught.value.__cause__, psycopg.Error)
        assert 1 <= caught.value.retry_after
        with pytest.raises(StorageUnavailable):
            RetryService(storage).retry("p", "t")
    finally:
        storage.close()
    with pytest.raises(StorageUnavailable):
        PostgresStorage(UNREACHABLE, timeout=0.3)  # migrating needs the server


def test_unreachable_server_is_unavailable_async() -> None:
    """The async storage raises StorageUnavailable when it cannot reach the server."""

    async def main() -> None:
        storage = AsyncPostgresStorage(UNREACHABLE, timeout=0.3)
        with pytest.raises(StorageUnavailable):
            await storage.open()
        quiet = AsyncPostgresStorage(UNREACHABLE, migrate=False, timeout=0.3)
        async with quiet:
            with pytest.raises(StorageUnavailable):
                await quiet.load("p", "t")

    asyncio.run(main())


def lock_task_row(raw: psycopg.Connection[Any], schema: str, task_id: str) -> None:
    """Hold ``task_id``'s row lock in ``raw``'s open transaction."""
    raw.execute(
        sql.SQL("SELECT 1 FROM {}.tasks WHERE id = %s FOR UPDATE").format(sql.Identifier(schema)),
        (task_id,),
    )


def test_statement_timeout_is_unavailable_and_changes_nothing(
    postgres_dsn: str, pg_schema: str, raw: psycopg.Connection[Any]
) -> None:
    """A retry stuck past the statement timeout raises StorageUnavailable and writes nothing."""
    storage = PostgresStorage(postgres_dsn, schema=pg_schema, statement_timeout_ms=200)
    try:
        blocked_tasks(storage, "p", ["t"])
        before = state(storage, "p")
        with raw.transaction():
            lock_task_row(raw, pg_schema, "t")
            with pytest.raises(StorageUnavailable) as caught:
                RetryService(storage, RecordingDispatcher()).retry("p", "t", idempotency_key="k")
        assert isinstance(caught.value.__cause__, errors.QueryCanceled)
        assert before == state(storage, "p")
        assert storage.get_idempotency("k") is None
        assert TaskStatus.ASSIGNED == RetryService(storage).retry("p", "t").task.status
    finally:
        storage.close()


def test_backend_killed_mid_retry_is_unavailable_and_changes_nothing(
    postgres_dsn: str, pg_schema: str, raw: psycopg.Connection[Any]
) -> None:
    """A retry whose server process is terminated mid-statement raises StorageUnavailable,
    leaves no trace, and the storage recovers on the next call."""
    storage = PostgresStorage(postgres_dsn, schema=pg_schema, max_size=2)
    watcher = psycopg.connect(postgres_dsn, autocommit=True)
    try:
        blocked_tasks(storage, "p", ["t"])
        before = state(storage, "p")
        outcome: list[BaseException | None] = []

        def retry() -> None:
            try:
                RetryService(storage).retry("p", "t")
            except BaseException as exc:  # noqa: BLE001 - inspected below
                outcome.append(exc)
            else:
                outcome.append(None)

        with raw.transaction():
            lock_task_row(raw, pg_schema, "t")
            worker = threading.Thread(target=retry)
            worker.start()
            victims: list[tuple[Any, ...]] = []
            for _ in range(400):  # up to ~20 s for the retry to block on the lock
                victims = watcher.execute(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE %s",
                    (f'%"{pg_schema}".tasks%',),
                ).fetchall()
                if victims:
                    break
                time.sleep(0.05)
            assert 1 == len(victims)
            watcher.execute("SELECT pg_terminate_backend(%s)", victims[0])
            worker.join(timeout=60)
        assert 1 == len(outcome)
        assert isinstance(outcome[0], StorageUnavailable)
        assert isinstance(outcome[0].__cause__, psycopg.OperationalError)
        assert before == state(storage, "p")
        assert TaskStatus.ASSIGNED == RetryService(storage).retry("p", "t").task.status
    finally:
        watcher.close()
        storage.close()


@pytest.mark.parametrize(
    ("driver_error", "conflict", "expected"),
    [
        (errors.DeadlockDetected("deadlock"), True, VersionConflict),
        (errors.SerializationFailure("serialise"), True, VersionConflict),
        (errors.DeadlockDetected("deadlock"), False, StorageUnavailable),
        (errors.QueryCanceled("statement timeout"), True, StorageUnavailable),
        (errors.AdminShutdown("terminating"), False, StorageUnavailable),
        (psycopg.OperationalError("connection refused"), False, StorageUnavailable),
        (psycopg.InterfaceError("the connection is closed"), False, StorageUnavailable),
        (errors.UndefinedTable("no such table"), False, StorageCorrupt),
        (errors.UniqueViolation("duplicate"), False, AlreadyExists),
        (errors.DataError("NUL"), False, InvalidInput),
        (errors.CheckViolation("check"), False, InvalidInput),
    ],
)
def test_driver_errors_translated_at_one_point(
    driver_error: Exception, conflict: bool, expected: type[Exception]
) -> None:
    """Each kind of driver error becomes one library error, its cause kept."""
    made = VersionConflict("t", 1, None)
    with pytest.raises(expected) as caught, DriverErrors((lambda: made) if conflict else None):
        raise driver_error
    assert driver_error is caught.value.__cause__


def test_other_errors_pass_through_untouched() -> None:
    """Errors that are not the driver's leave the translation point unchanged."""
    with pytest.raises(KeyError), DriverErrors():
        raise KeyError("x")
    with pytest.raises(ProjectNotFound), DriverErrors():
        raise ProjectNotFound("p")


def test_guard_changed_while_apply_waits_is_seen(
    postgres_dsn: str, pg_schema: str, raw: psycopg.Connection[Any]
) -> None:
    """A guard row committed by another transaction while apply waits for it makes apply
    conflict with the new version, instead of passing on the statement's older snapshot."""
    storage = PostgresStorage(postgres_dsn, schema=pg_schema, max_size=2)
    try:
        ex = ExecutorService(storage, policy=NO_BACKOFF)
        ex.create_project("p")
        for tid, deps in (("a", []), ("b", []), ("d", ["a", "b"])):
            ex.add_task("p", tid, blocked_by=deps)
            ex.assign("p", tid)
        ex.start("p", "a", 1)
        ex.start("p", "b", 1)
        project, b = storage.load("p", "b")
        version_a = storage.load("p", "a")[1].version
        plan = decide.succeed(
            b, 1, project, now=datetime.now(timezone.utc),
            dependants=storage.dependants("p", "b"), blockers=storage.get_tasks("p", ["a"]),
        )  # fmt: skip
        assert ("a", version_a) in {(g.task_id, g.version) for g in plan.guards}
        raised: list[BaseException] = []

        def apply() -> None:
            try:
                storage.apply(plan)
            except BaseException as exc:  # noqa: BLE001 - inspected below
                raised.append(exc)

        with raw.transaction():
            raw.execute(
                sql.SQL("UPDATE {} SET version = version + 1 WHERE id = 'a'").format(
                    sql.Identifier(pg_schema, "tasks")
                )
            )
            worker = threading.Thread(target=apply)
            worker.start()
            for _ in range(400):  # until apply waits for the row lock on "a" (~20 s at most)
                waiting = raw.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE %s",
                    (f'%"{pg_schema}".tasks%',),
                ).fetchone()
                if waiting and waiting[0]:
                    break
                time.sleep(0.05)
        worker.join(timeout=60)
        assert 1 == len(raised)
        assert isinstance(raised[0], VersionConflict)
        assert ("a", version_a, version_a + 1) == (
            raised[0].task_id, raised[0].expected, raised[0].found,
        )  # fmt: skip
        assert TaskStatus.IN_PROGRESS == storage.load("p", "b")[1].status
    finally:
        storage.close()


def test_relay_woken_by_notification_before_its_poll(
    postgres_dsn: str, store: PostgresStorage, raw: psycopg.Connection[Any]
) -> None:
    """An idle relay on PostgreSQL delivers new work on the write's notification, long
    before its poll interval would have woken it."""
    from deepwork_retry import OutboxRelay

    poll = 60.0
    dispatcher = RecordingDispatcher()
    relay = OutboxRelay(store, dispatcher, poll_interval=poll)
    stop = threading.Event()
    runner = threading.Thread(target=relay.run, args=(stop,))
    writer = PostgresStorage(postgres_dsn, schema=store.schema, migrate=False)
    try:
        assert store.wait_for_work(0) is False  # the relay's listener is up before the write
        runner.start()
        time.sleep(0.3)  # ordering aid only: let the relay find nothing and go idle first
        ex = ExecutorService(writer)  # no dispatcher: the entry is left for the relay
        ex.create_project("p")
        ex.add_task("p", "t")
        ex.assign("p", "t")
        for _ in range(300):  # up to ~15 s, a quarter of the poll interval
            if dispatcher.keys:
                break
            time.sleep(0.05)
        assert [("p", "t", 1)] == dispatcher.keys
    finally:
        stop.set()
        raw.execute("SELECT pg_notify(%s, '')", (f"{store.schema}_outbox",))  # wake it to stop
        runner.join(timeout=poll + 30)
        writer.close()
    assert runner.is_alive() is False


def _terminate_backends(raw: psycopg.Connection[Any], application_name: str, count: int) -> None:
    """Terminate the ``count`` server processes of ``application_name`` (and no one else's)."""
    pids = [
        pid
        for (pid,) in raw.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (application_name,)
        )
    ]
    assert count == len(pids)
    raw.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))
    for _ in range(200):  # until the processes are gone (up to ~10 s)
        left = raw.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
        ).fetchone()
        if left == (0,):
            return
        time.sleep(0.05)
    raise AssertionError(f"backends {pids} did not end")


@pytest.mark.parametrize("size", [1, 4])
def test_terminated_pool_connections_are_never_lent(
    postgres_dsn: str, pg_schema: str, raw: psycopg.Connection[Any], size: int
) -> None:
    """After pg_terminate_backend of every pooled connection, the next size + 1 calls all
    succeed: the pool checks a connection before lending it and replaces the dead ones."""
    name = f"dw-check-{pg_schema}"
    dsn = psycopg.conninfo.make_conninfo(postgres_dsn, application_name=name)
    storage = PostgresStorage(dsn, schema=pg_schema, min_size=size, max_size=size)
    try:
        storage.create_project(Project(id="p", created_at=T0, updated_at=T0))
        storage.pool.wait(timeout=10)
        _terminate_backends(raw, name, size)
        outcomes = []
        for _ in range(size + 1):
            try:
                outcomes.append(storage.get_project("p").id)
            except StorageUnavailable as exc:
                outcomes.append(f"{type(exc).__name__}: {exc}")
        assert ["p"] * (size + 1) == outcomes
    finally:
        storage.close()


def test_terminated_pool_connections_are_never_lent_async(
    postgres_dsn: str, pg_schema: str, raw: psycopg.Connection[Any]
) -> None:
    """The async storage, too, lends no connection whose server process was terminated."""
    name = f"dw-check-async-{pg_schema}"
    dsn = psycopg.conninfo.make_conninfo(postgres_dsn, application_name=name)

    async def main() -> list[str]:
        async with AsyncPostgresStorage(dsn, schema=pg_schema, min_size=3, max_size=3) as storage:
            await storage.create_project(Project(id="p", created_at=T0, updated_at=T0))
            await storage.pool.wait(timeout=10)
            await asyncio.to_thread(_terminate_backends, raw, name, 3)
            outcomes = []
            for _ in range(4):
                try:
                    outcomes.append((await storage.get_project("p")).id)
                except StorageUnavailable as exc:
                    outcomes.append(f"{type(exc).__name__}: {exc}")
            return outcomes

    assert ["p"] * 4 == asyncio.run(main())
