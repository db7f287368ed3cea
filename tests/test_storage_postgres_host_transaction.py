"""A retry inside the host's own PostgreSQL transaction (``PostgresStorage.joining``).

The host writes a row of its own (an order) and retries a task on the same
connection, in one transaction; an observer on another connection sees what
is committed. The dispatcher records what it was handed, and what the
observer saw at that moment.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pg_support import schema_dropped_after
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from deepwork_retry import (
    AsyncRetryService,
    ConfigurationError,
    ExecutorService,
    JoinsHostTransaction,
    OutboxRelay,
    RetryService,
    StorageUnavailable,
    TaskError,
    TaskNotBlocked,
)
from deepwork_retry._core import decide
from deepwork_retry._core.model import DispatchEntry, Task
from deepwork_retry.exceptions import InvalidInput, VersionConflict
from deepwork_retry.ports import AsyncJoinsHostTransaction, RetryInOneStep
from deepwork_retry.storage.postgres import (
    AsyncPostgresStorage,
    PostgresStorage,
    migrate,
)
from deepwork_retry.testing import AsyncRecordingDispatcher, FakeClock, RecordingDispatcher

pytestmark = pytest.mark.postgres


class Watching(RecordingDispatcher):
    """Records each entry with the task's status an observer's connection saw at dispatch."""

    def __init__(self, observer: PostgresStorage) -> None:
        super().__init__()
        self.observer = observer
        self.seen: list[str] = []

    def dispatch(self, entry: DispatchEntry) -> None:
        _, task = self.observer.load(entry.project_id, entry.task_id)
        self.seen.append(task.status.value)
        super().dispatch(entry)


class Host:
    """A host application's connection, its orders table, and an observer elsewhere."""

    def __init__(self, dsn: str, schema: str, **connect: Any) -> None:
        self.schema = schema
        self.conn = psycopg.connect(dsn, **connect)
        self.storage = PostgresStorage.joining(self.conn, schema=schema)
        self.observer = PostgresStorage(dsn, schema=schema, max_size=2)
        self.clock = FakeClock()
        self.dispatcher = Watching(self.observer)
        self.retries = RetryService(self.storage, self.dispatcher, clock=self.clock)

    def order(self, number: int) -> None:
        self.conn.execute(
            sql.SQL("INSERT INTO {}.orders (id) VALUES (%s)").format(sql.Identifier(self.schema)),
            (number,),
        )

    def orders(self) -> list[int]:
        with self.observer.pool.connection() as conn:
            query = sql.SQL("SELECT id FROM {}.orders ORDER BY id")
            cur = conn.execute(query.format(sql.Identifier(self.schema)))
            return [row[0] for row in cur.fetchall()]

    def seen(self, task_id: str = "t") -> tuple[Any, ...]:
        """Everything the observer sees of the task, and the idempotency key ``k``."""
        o = self.observer
        return (
            o.load("p", task_id)[1],
            o.attempts("p", task_id),
            o.dispatches("p", task_id),
            o.progress("p"),
            o.get_idempotency("k"),
        )

    def close(self) -> None:
        self.conn.close()
        self.observer.close()


@pytest.fixture
def schema(postgres_dsn: str) -> Iterator[str]:
    with schema_dropped_after(postgres_dsn, "pghost") as name:
        migrate(postgres_dsn, schema=name)
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE TABLE {}.orders (id int PRIMARY KEY)").format(sql.Identifier(name))
            )
            executor = ExecutorService(PostgresStorage.joining(conn, schema=name))
            executor.create_project("p")
            for task_id in ("t", "u"):
                executor.add_task("p", task_id, max_retries=0)
                executor.assign("p", task_id)
                executor.start("p", task_id, 1)
                executor.fail("p", task_id, 1, TaskError(type="E", message="boom"))
        yield name


@pytest.fixture
def host(postgres_dsn: str, schema: str) -> Iterator[Host]:
    h = Host(postgres_dsn, schema)
    try:
        yield h
    finally:
        h.close()


def test_the_joined_storage_has_both_capabilities(host: Host) -> None:
    """It joins host transactions and keeps the one-step retry; the pool storage does not join."""
    assert isinstance(host.storage, JoinsHostTransaction)
    assert isinstance(host.storage, RetryInOneStep)
    assert not isinstance(host.observer, JoinsHostTransaction)


def test_commit_keeps_both_and_dispatches_once_after_it(host: Host) -> None:
    """Host write and retry commit together; the dispatcher gets the retry once, after."""
    with host.storage.transaction():
        host.order(1)
        result = host.retries.retry("p", "t", idempotency_key="k")
        assert ("assigned", "pending") == (result.task.status, result.dispatch.status)
        assert "blocked" == host.observer.load("p", "t")[1].status  # not committed yet
        assert [] == host.dispatcher.keys
    assert [("p", "t", 2)] == host.dispatcher.keys
    assert ["assigned"] == host.dispatcher.seen  # the observer saw the commit at dispatch
    assert [1] == host.orders()
    task, attempts, entries, _, record = host.seen()
    assert (2, "assigned", 2) == (task.attempt, task.status, len(attempts))
    assert ["delivered"] == [e.state for e in entries if e.attempt == 2]
    assert record is not None
    assert "t" == record.task_id
    assert "IDLE" == host.conn.info.transaction_status.name


def test_rollback_after_the_retry_succeeded_leaves_nothing_and_dispatches_nothing(
    host: Host,
) -> None:
    """The retry's statement succeeded, then the host rolled back: no trace, no dispatch."""
    before = host.seen()

    class HostFailure(Exception):
        pass

    def retry_then_fail() -> None:
        with host.storage.transaction():
            host.order(1)
            result = host.retries.retry("p", "t", idempotency_key="k")
            assert "assigned" == result.task.status
            assert "assigned" == host.storage.load("p", "t")[1].status  # in the host's own
            raise HostFailure

    with pytest.raises(HostFailure):
        retry_then_fail()
    assert before == host.seen()
    assert [] == host.orders()
    assert [] == host.dispatcher.keys
    with host.storage.transaction():  # a later commit delivers nothing of the rolled-back one
        host.order(2)
    assert [] == host.dispatcher.keys
    assert host.storage.get_idempotency("k") is None


def test_explicit_rollback_inside_the_block_dispatches_nothing(host: Host) -> None:
    """``psycopg.Rollback`` raised in the block rolls it back quietly, and nothing is sent."""
    before = host.seen()
    with host.storage.transaction():
        host.order(1)
        host.retries.retry("p", "t", idempotency_key="k")
        raise psycopg.Rollback
    assert (before, [], []) == (host.seen(), host.orders(), host.dispatcher.keys)


def test_refused_retries_do_not_poison_the_host_transaction(host: Host) -> None:
    """A retry the rules refuse, a lost race and a statement PostgreSQL refuses each
    leave the host's transaction usable: its own writes still commit."""
    with host.storage.transaction():
        host.order(1)
        host.retries.retry("p", "t")
        with pytest.raises(TaskNotBlocked):
            host.retries.retry("p", "t")
        project, task = host.storage.load("p", "u")
        plan = decide.manual_retry(task, project, now=host.clock.now(), blockers={})
        host.storage.apply(plan)
        with pytest.raises(VersionConflict):
            host.storage.apply(plan)  # decided on a version that is gone
        bad = Task(id="x", project_id="p", metadata={"a": "\x00"}, created_at=host.clock.now())
        with pytest.raises(InvalidInput):
            host.storage.add_tasks([bad])  # PostgreSQL's jsonb refuses NUL
        host.order(2)
    assert [1, 2] == host.orders()
    assert ["assigned", "assigned"] == [host.seen(t)[0].status for t in ("t", "u")]
    assert [("p", "t", 2)] == host.dispatcher.keys


def test_failures_again_and_again_never_poison_the_host_transaction(host: Host) -> None:
    """Statements PostgreSQL refuses, many times over and between successes (past the
    driver's prepare threshold), each leave the host's transaction usable."""
    project, task = host.storage.load("p", "t")
    plan = decide.manual_retry(task, project, now=host.clock.now(), blockers={})
    unstorable = attrs.evolve(plan, after=attrs.evolve(plan.after, metadata={"a": "\x00"}))
    with host.storage.transaction():
        for number in range(12):
            host.order(number)
            with pytest.raises(InvalidInput):
                host.storage.apply(unstorable)  # jsonb refuses NUL, in the server
            assert "blocked" == host.storage.load("p", "t")[1].status
        host.storage.apply(plan)
    assert list(range(12)) == host.orders()
    assert "assigned" == host.seen()[0].status


def test_manual_commit_through_the_storage_dispatches_after_it(host: Host) -> None:
    """A host that commits by hand calls ``storage.commit()``; ``rollback()`` drops."""
    host.order(1)  # psycopg opens the host's transaction here
    host.retries.retry("p", "t")
    assert [] == host.dispatcher.keys
    host.storage.commit()
    assert ([("p", "t", 2)], [1]) == (host.dispatcher.keys, host.orders())
    host.order(2)
    host.retries.retry("p", "u")
    host.storage.rollback()
    assert ([("p", "t", 2)], [1]) == (host.dispatcher.keys, host.orders())
    assert "blocked" == host.seen("u")[0].status


def test_a_rolled_back_nested_block_drops_its_own_deliveries_only(host: Host) -> None:
    """A nested block is a savepoint: rolled back, its retry is gone and never sent."""
    with host.storage.transaction():
        host.retries.retry("p", "t")
        with host.storage.transaction():
            host.retries.retry("p", "u")
            raise psycopg.Rollback
    assert [("p", "t", 2)] == host.dispatcher.keys
    assert "blocked" == host.seen("u")[0].status


def test_a_commit_the_storage_did_not_see_leaves_the_delivery_to_the_relay(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    """Committed with ``conn.commit()``: nothing is sent then, and the relay delivers the
    retry once its claim lapses, exactly once."""
    host.order(1)
    host.retries.retry("p", "t")
    host.conn.commit()
    with caplog.at_level(logging.WARNING, logger="deepwork_retry"):
        host.storage.get_project("p")  # the next call notices the transaction ended
    assert "left to the outbox relay" in caplog.text
    assert [] == host.dispatcher.keys
    relay = OutboxRelay(host.observer, host.dispatcher, clock=host.clock)
    assert 0 == relay.run_once()  # still claimed by the retry
    host.clock.advance(host.retries.claim_timeout + 1)
    assert 1 == relay.run_once()
    host.storage.commit()
    assert [("p", "t", 2)] == host.dispatcher.keys


def test_a_rollback_the_storage_did_not_see_is_never_dispatched_by_a_later_commit(
    host: Host,
) -> None:
    """Rolled back with ``conn.rollback()``, then a new transaction committed through the
    storage with no call of it in between: the rolled-back retry is not dispatched, the
    new transaction's own retry is."""
    host.order(1)
    host.retries.retry("p", "t")
    host.conn.rollback()
    host.order(2)  # a new transaction of the host's
    host.storage.commit()
    assert [] == host.dispatcher.keys
    assert ([2], "blocked") == (host.orders(), host.seen("t")[0].status)
    host.order(3)
    host.retries.retry("p", "u")
    host.conn.commit()
    with host.storage.transaction():  # begins after the unseen commit: drops its delivery
        host.retries.retry("p", "t")
    assert [("p", "t", 2)] == host.dispatcher.keys


def test_two_host_transactions_retrying_one_task_apply_it_once(
    postgres_dsn: str, schema: str, host: Host
) -> None:
    """Two hosts retry one task, each in its own transaction, on threads: the second
    waits for the first's commit, then is refused; its own write still commits, and
    the task is dispatched once."""
    other = Host(postgres_dsn, schema)
    other.dispatcher = host.dispatcher
    other.retries = RetryService(other.storage, host.dispatcher, clock=other.clock)
    outcome: list[object] = []

    def second() -> None:
        try:
            with other.storage.transaction():
                other.order(2)
                try:
                    other.retries.retry("p", "t")
                except TaskNotBlocked as exc:
                    outcome.append(exc)
                else:
                    outcome.append("retried")
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            outcome.append(exc)

    try:
        with host.storage.transaction():
            host.order(1)
            host.retries.retry("p", "t")
            thread = threading.Thread(target=second, daemon=True)
            thread.start()
            _until_waiting_for_a_lock(host.observer, other.conn.info.backend_pid)
        thread.join(30)
        assert not thread.is_alive()
        [result] = outcome
        assert isinstance(result, TaskNotBlocked)
        assert [1, 2] == host.orders()
        assert [("p", "t", 2)] == host.dispatcher.keys
    finally:
        other.close()


def _until_waiting_for_a_lock(observer: PostgresStorage, pid: int) -> None:
    """Return once backend ``pid`` waits for a lock (generous bound: 30 s)."""
    query = "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s"
    with observer.pool.connection() as conn:
        for _ in range(3000):
            row = conn.execute(query, (pid,)).fetchone()
            if row is not None and row[0] == "Lock":
                return
            time.sleep(0.01)
    raise AssertionError(f"backend {pid} never waited for the first host's lock")


def test_without_a_host_transaction_each_call_commits_and_dispatches_at_once(
    host: Host,
) -> None:
    """No transaction open: the retry commits by itself and is delivered at once."""
    result = host.retries.retry("p", "t")
    assert "dispatched" == result.dispatch.status
    assert [("p", "t", 2)] == host.dispatcher.keys
    assert ["delivered"] == [e.state for e in host.seen()[2] if e.attempt == 2]
    assert "IDLE" == host.conn.info.transaction_status.name


def test_the_retry_in_a_host_transaction_is_one_round_trip(host: Host) -> None:
    """Savepoint, retry, release and the transaction's id go together: one round trip
    inside the host's transaction."""
    wire: list[str] = []
    retries = RetryService(host.storage, clock=host.clock)
    with host.storage.transaction():
        host.order(1)
        with _trace(host.conn, wire):
            retries.retry("p", "t")
    trips = sum(1 for line in wire if line.startswith("B\t") and "\tReadyForQuery" in line)
    statements = sum(1 for line in wire if line.startswith("F\t") and "\tExecute" in line)
    assert (1, 4) == (trips, statements)


def test_a_host_row_factory_is_left_as_it_was(postgres_dsn: str, schema: str) -> None:
    """A host connection returning dicts works, and returns dicts again afterwards."""
    h = Host(postgres_dsn, schema, row_factory=dict_row)
    try:
        with h.storage.transaction():
            h.order(1)
            h.storage.add_tasks([Task(id="v", project_id="p", created_at=h.clock.now())])
            h.retries.retry("p", "t")
            assert {"n": 1} == h.conn.execute("SELECT 1 AS n").fetchone()
        assert [("p", "t", 2)] == h.dispatcher.keys
    finally:
        h.close()


def test_a_failed_host_transaction_is_refused_clearly(host: Host) -> None:
    """A call in a transaction that already failed says to roll it back, and changes nothing."""
    host.order(1)
    with pytest.raises(psycopg.errors.UniqueViolation):
        host.order(1)
    with pytest.raises(StorageUnavailable, match="roll it back"):
        host.retries.retry("p", "t")
    host.storage.rollback()
    assert "blocked" == host.seen()[0].status


def test_the_wrong_kind_of_connection_is_refused(postgres_dsn: str, schema: str) -> None:
    """A sync storage on an async connection (and the reverse) is refused when made."""

    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(postgres_dsn) as aconn:
            with pytest.raises(ConfigurationError, match=r"psycopg\.Connection"):
                PostgresStorage.joining(aconn)  # type: ignore[arg-type]

    asyncio.run(main())
    with psycopg.connect(postgres_dsn) as conn:
        with pytest.raises(ConfigurationError, match=r"psycopg\.AsyncConnection"):
            AsyncPostgresStorage.joining(conn)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError):
            PostgresStorage.joining("postgresql://")  # type: ignore[arg-type]


def test_closing_the_storage_leaves_the_host_connection_open(host: Host) -> None:
    """``close`` stops the storage; the host's connection stays the host's."""
    host.storage.close()
    assert not host.conn.closed
    with pytest.raises(StorageUnavailable, match="closed"):
        host.storage.get_project("p")


def test_a_host_pool_without_autocommit_is_used_and_left_open(
    postgres_dsn: str, schema: str
) -> None:
    """``from_pool`` on a host's pool whose connections open transactions: every call
    (the one-step retry too) commits, and closing the storage leaves the pool open."""
    pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
        postgres_dsn, min_size=1, max_size=1, open=True
    )
    observer = PostgresStorage(postgres_dsn, schema=schema, max_size=1)
    try:
        storage = PostgresStorage.from_pool(pool, schema=schema)
        dispatcher = RecordingDispatcher()
        result = RetryService(storage, dispatcher).retry("p", "t")
        assert "dispatched" == result.dispatch.status
        storage.close()
        assert not pool.closed
        assert "assigned" == observer.load("p", "t")[1].status
        assert ["delivered"] == [e.state for e in observer.dispatches("p", "t") if e.attempt == 2]
        with pool.connection() as conn:
            assert "IDLE" == conn.info.transaction_status.name
    finally:
        pool.close()
        observer.close()


# -- async ---------------------------------------------------------------------------------


def test_async_commit_dispatches_after_it_and_rollback_dispatches_nothing(
    postgres_dsn: str, schema: str
) -> None:
    """The async twin: the delivery runs after the outermost block commits, never after
    a rollback, and a refused retry leaves the host's transaction usable."""

    async def main() -> tuple[list[Any], list[str]]:
        observer = PostgresStorage(postgres_dsn, schema=schema, max_size=1)
        dispatcher = AsyncRecordingDispatcher()
        seen: list[str] = []
        try:
            async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
                storage = AsyncPostgresStorage.joining(conn, schema=schema)
                assert isinstance(storage, AsyncJoinsHostTransaction)
                retries = AsyncRetryService(storage, dispatcher)

                async def retry_then_fail() -> None:
                    async with storage.transaction():
                        await retries.retry("p", "u", idempotency_key="k")
                        raise RuntimeError("the host fails")

                with pytest.raises(RuntimeError):
                    await retry_then_fail()
                async with storage.transaction():
                    result = await retries.retry("p", "t")
                    with pytest.raises(TaskNotBlocked):
                        await retries.retry("p", "t")
                    seen.append(observer.load("p", "t")[1].status.value)
                    assert [] == dispatcher.keys
                seen.append(observer.load("p", "t")[1].status.value)
                assert "pending" == result.dispatch.status
                return [dispatcher.keys, observer.get_idempotency("k")], seen
        finally:
            observer.close()

    outcome, seen = asyncio.run(main())
    assert [[("p", "t", 2)], None] == outcome
    assert ["blocked", "assigned"] == seen


def test_async_without_a_host_transaction_the_delivery_is_scheduled_at_once(
    postgres_dsn: str, schema: str
) -> None:
    """No transaction open: the retry commits by itself; its delivery runs on the loop."""

    async def main() -> list[tuple[str, str, int]]:
        dispatcher = AsyncRecordingDispatcher()
        async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
            storage = AsyncPostgresStorage.joining(conn, schema=schema)
            await AsyncRetryService(storage, dispatcher).retry("p", "t")
            for _ in range(100):
                if dispatcher.keys:
                    break
                await asyncio.sleep(0.01)
            entries = await storage.dispatches("p", "t")
            assert ["delivered"] == [e.state for e in entries if e.attempt == 2]
        return dispatcher.keys

    assert [("p", "t", 2)] == asyncio.run(main())


@contextmanager
def _trace(conn: psycopg.Connection[Any], lines: list[str]) -> Iterator[None]:
    """libpq's protocol trace of ``conn`` while the block runs, added to ``lines``."""
    with tempfile.TemporaryFile("w+") as trace:
        conn.pgconn.trace(trace.fileno())
        conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            yield
        finally:
            conn.pgconn.untrace()
        trace.seek(0)
        lines.extend(trace.read().splitlines())


# -- any sequence of host transactions -----------------------------------------------------

TASKS = 4
ORDER_NUMBERS = itertools.count(1000)
_retry_op = st.tuples(st.just("retry"), st.integers(0, TASKS - 1))
_end_op = st.sampled_from(
    [("commit",), ("rollback",), ("conn_commit",), ("conn_rollback",), ("order",)]
)
_block_op = st.tuples(
    st.just("block"), st.lists(st.integers(0, TASKS - 1), max_size=3), st.booleans()
)


class HostModel:
    """What must have happened: retries committed, dispatched, left to the relay."""

    def __init__(self) -> None:
        self.open = False
        self.in_tx: set[int] = set()
        self.orders_in_tx: list[int] = []
        self.committed: set[int] = set()
        self.orders: list[int] = []
        self.dispatched: list[int] = []
        self.to_relay: set[int] = set()

    def retry(self, task: int) -> bool:
        if task in self.committed or task in self.in_tx:
            return False
        if self.open:
            self.in_tx.add(task)
        else:  # no transaction open: the storage commits it by itself, and delivers it
            self.committed.add(task)
            self.dispatched.append(task)
        return True

    def end(self, *, commit: bool, seen: bool) -> None:
        if commit:
            self.committed |= self.in_tx
            self.orders += self.orders_in_tx
            if seen:
                self.dispatched += sorted(self.in_tx)
            else:
                self.to_relay |= self.in_tx
        self.in_tx, self.orders_in_tx, self.open = set(), [], False


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(st.one_of(_retry_op, _end_op, _block_op), max_size=12))
def test_any_sequence_of_host_transactions_dispatches_exactly_what_committed(
    postgres_dsn: str, schema: str, ops: list[tuple[Any, ...]]
) -> None:
    """Retries in host transactions committed and rolled back in any way (through the
    storage, behind its back, in nested blocks): a retry is dispatched once, after its
    commit, if and only if it committed; what committed behind the storage's back is
    the relay's, once its claim lapses; nothing rolled back is ever sent."""
    h = Host(postgres_dsn, schema)
    pid = f"p{uuid.uuid4().hex[:12]}"
    model = HostModel()
    used: set[int] = set()

    def keys() -> list[int]:
        return sorted(int(t[1:]) for p, t, _ in h.dispatcher.keys if p == pid)

    def retry(task: int) -> None:
        expected = model.retry(task)
        try:
            h.retries.retry(pid, f"t{task}")
        except TaskNotBlocked:
            assert not expected
        else:
            assert expected

    try:
        _blocked_tasks(h.storage, pid, TASKS)
        for op in ops:
            if op[0] == "retry":
                retry(op[1])
            elif op[0] == "order":
                number = next(ORDER_NUMBERS)
                used.add(number)
                h.order(number)
                model.orders_in_tx.append(number)
                model.open = True
            elif op[0] in ("commit", "rollback"):
                getattr(h.storage, op[0])()
                model.end(commit=op[0] == "commit", seen=True)
            elif op[0] in ("conn_commit", "conn_rollback"):
                getattr(h.conn, op[0].removeprefix("conn_"))()
                model.end(commit=op[0] == "conn_commit", seen=False)
            else:
                _, tasks, keep = op
                outer, saved = not model.open, set(model.in_tx)
                with h.storage.transaction():
                    model.open = True
                    for task in tasks:
                        retry(task)
                    if not keep:
                        raise psycopg.Rollback
                if outer:
                    model.end(commit=keep, seen=True)
                elif not keep:
                    model.in_tx = saved
            assert sorted(model.dispatched) == keys()
        h.conn.rollback()
        model.end(commit=False, seen=True)
        statuses = {t.id: t.status.value for t in h.observer.list_tasks(pid)}
        assert {
            f"t{n}": "assigned" if n in model.committed else "blocked" for n in range(TASKS)
        } == (statuses)
        relay = OutboxRelay(h.observer, h.dispatcher, clock=h.clock)
        h.clock.advance(h.retries.claim_timeout + 1)
        while relay.run_once():
            pass
        assert sorted(model.dispatched + sorted(model.to_relay)) == keys()
        assert sorted(model.committed) == keys()  # each committed retry sent once
        assert set(h.dispatcher.seen) <= {"assigned"}  # never before its commit
        assert sorted(model.orders) == sorted(set(h.orders()) & used)  # the host's own writes
    finally:
        h.close()


def _blocked_tasks(storage: PostgresStorage, pid: str, count: int) -> None:
    executor = ExecutorService(storage)
    executor.create_project(pid)
    for n in range(count):
        executor.add_task(pid, f"t{n}", max_retries=0)
        executor.assign(pid, f"t{n}")
        executor.start(pid, f"t{n}", 1)
        executor.fail(pid, f"t{n}", 1, TaskError(type="E", message="boom"))
