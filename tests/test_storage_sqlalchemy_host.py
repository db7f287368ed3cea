"""A retry inside the host's own SQLAlchemy transaction, on SQLite, MariaDB and
PostgreSQL (what only MySQL does is in ``test_storage_sqlalchemy_mysql.py``).

The host writes a row of its own (an order) and retries a task in the same
transaction, through a ``Connection`` or a ``Session`` (sync) and an
``AsyncConnection`` or ``AsyncSession`` (async); an observer storage on its
own engine sees what is committed. The dispatcher records what it was
handed, and the task's status the observer saw at that moment.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from mysql_support import database_dropped_after
from pg_support import schema_dropped_after
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from deepwork_retry import (
    AsyncRetryService,
    ExecutorService,
    JoinsHostTransaction,
    RetryService,
    TaskError,
    TaskNotBlocked,
)
from deepwork_retry._core import decide
from deepwork_retry._core.model import DispatchEntry
from deepwork_retry.exceptions import InvalidInput, VersionConflict
from deepwork_retry.ports import AsyncJoinsHostTransaction, RetryInOneStep
from deepwork_retry.storage import _sqlalchemy_io
from deepwork_retry.storage.sqlalchemy import (
    AsyncJoinedSQLAlchemyStorage,
    AsyncSQLAlchemyStorage,
    JoinedSQLAlchemyStorage,
    SQLAlchemyStorage,
)
from deepwork_retry.testing import FakeClock, RecordingDispatcher


class Watching(RecordingDispatcher):
    """Records each entry with the task's status an observer's engine saw at dispatch."""

    def __init__(self, observer: SQLAlchemyStorage) -> None:
        super().__init__()
        self.observer = observer
        self.seen: list[str] = []

    def dispatch(self, entry: DispatchEntry) -> None:
        self.seen.append(self.observer.load(entry.project_id, entry.task_id)[1].status.value)
        super().dispatch(entry)


class AsyncWatching:
    """The async twin of :class:`Watching` (the observer is sync: it reads committed rows)."""

    def __init__(self, observer: SQLAlchemyStorage) -> None:
        self.inner = Watching(observer)

    async def dispatch(self, entry: DispatchEntry) -> None:
        self.inner.dispatch(entry)


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("mariadb", marks=pytest.mark.mysql),
        pytest.param("postgresql", marks=pytest.mark.postgres),
    ]
)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with the storage's schema, blocked tasks ``t`` and ``u`` in project
    ``p``, and the host's own ``orders`` table. On PostgreSQL a schema of its own, which
    the URL makes the connections' search path (see :func:`_schema`)."""
    if request.param == "sqlite":
        found = f"sqlite:///{tmp_path / 'host.db'}"
        yield from _prepared(found)
    elif request.param == "mariadb":
        with database_dropped_after(request.getfixturevalue("mysql_url"), "sqla") as made:
            yield from _prepared(made.render_as_string(hide_password=False))
    else:
        dsn = request.getfixturevalue("postgres_dsn")
        with schema_dropped_after(dsn, "sqla") as schema:
            base = dsn.replace("postgresql://", "postgresql+psycopg://", 1)
            yield from _prepared(f"{base}?options=-csearch_path%3D{schema}")


def _schema(url: str) -> dict[str, Any]:
    """The storage's ``schema`` argument: on PostgreSQL, the search path the URL sets."""
    options = make_url(url).query.get("options")
    if not isinstance(options, str):
        return {}
    return {"schema": options.removeprefix("-csearch_path=")}


def _prepared(url: str) -> Iterator[str]:
    storage = SQLAlchemyStorage.from_url(url, **_schema(url))
    try:
        executor = ExecutorService(storage)
        executor.create_project("p")
        for task_id in ("t", "u"):
            executor.add_task("p", task_id, max_retries=0)
            executor.assign("p", task_id)
            executor.start("p", task_id, 1)
            executor.fail("p", task_id, 1, TaskError(type="E", message="boom"))
    finally:
        storage.close()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE orders (id INTEGER NOT NULL PRIMARY KEY)")
    engine.dispose()
    yield url


def _host_options(url: str) -> dict[str, Any]:
    """A MySQL host joins at READ COMMITTED (see the storage's documentation)."""
    return {"isolation_level": "READ COMMITTED"} if url.startswith("mysql") else {}


class Host:
    """A host application's engine and an observer storage on an engine of its own."""

    def __init__(self, url: str, mode: str) -> None:
        self.url = url
        self.mode = mode
        self.engine = create_engine(url, **_host_options(url))
        self.observer = SQLAlchemyStorage.from_url(url, **_schema(url))
        self.clock = FakeClock()
        self.dispatcher = Watching(self.observer)

    @contextmanager
    def transaction(
        self,
    ) -> Iterator[tuple[RetryService, SQLAlchemyStorage, Callable[[int], None]]]:
        """The host's transaction: a service over a storage joined to it, and the host's
        own write. Committed at the end, rolled back on an error."""
        if self.mode == "connection":
            with self.engine.connect() as conn, conn.begin():
                yield self._parts(conn, conn.execute)
        else:
            with Session(self.engine) as session, session.begin():
                yield self._parts(session, session.execute)

    def _parts(
        self, bind: Connection | Session, execute: Callable[..., Any]
    ) -> tuple[RetryService, SQLAlchemyStorage, Callable[[int], None]]:
        storage = SQLAlchemyStorage(bind, **_schema(self.url))
        retries = RetryService(storage, self.dispatcher, clock=self.clock)

        def order(number: int) -> None:
            execute(text("INSERT INTO orders (id) VALUES (:id)"), {"id": number})

        return retries, storage, order

    def orders(self) -> list[int]:
        with self.observer._engine.connect() as conn:  # type: ignore[attr-defined]
            return [row[0] for row in conn.exec_driver_sql("SELECT id FROM orders ORDER BY id")]

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
        self.engine.dispose()
        self.observer.close()


@pytest.fixture(params=["connection", "session"])
def host(url: str, request: pytest.FixtureRequest) -> Iterator[Host]:
    h = Host(url, request.param)
    try:
        yield h
    finally:
        h.close()


class HostFailure(Exception):
    pass


def test_a_connection_or_session_makes_a_joined_storage(host: Host) -> None:
    """Given the host's connection or session the storage joins its transactions and
    keeps the one-step retry; given an engine it does neither join nor claim to."""
    with host.transaction() as (_, storage, _):
        assert isinstance(storage, JoinedSQLAlchemyStorage)
        assert isinstance(storage, JoinsHostTransaction)
        assert isinstance(storage, RetryInOneStep)
    assert not isinstance(host.observer, JoinsHostTransaction)


def test_commit_keeps_both_and_dispatches_once_after_it(host: Host) -> None:
    """Host write and retry commit together; the dispatcher gets the retry once, after."""
    with host.transaction() as (retries, _, order):
        order(1)
        result = retries.retry("p", "t", idempotency_key="k")
        assert ("assigned", "pending") == (result.task.status, result.dispatch.status)
        assert [] == host.dispatcher.keys
    assert [("p", "t", 2)] == host.dispatcher.keys
    assert ["assigned"] == host.dispatcher.seen  # the observer saw the commit at dispatch
    assert [1] == host.orders()
    task, attempts, entries, _, record = host.seen()
    assert (2, "assigned", 2) == (task.attempt, task.status, len(attempts))
    assert ["delivered"] == [e.state for e in entries if e.attempt == 2]
    assert record is not None
    assert "t" == record.task_id


def test_rollback_after_the_retry_succeeded_leaves_nothing_and_dispatches_nothing(
    host: Host,
) -> None:
    """The retry's statements succeeded, then the host rolled back: no trace, no dispatch."""
    before = host.seen()

    def retry_then_fail() -> None:
        with host.transaction() as (retries, storage, order):
            order(1)
            assert "assigned" == retries.retry("p", "t", idempotency_key="k").task.status
            assert "assigned" == storage.load("p", "t")[1].status  # in the host's own
            raise HostFailure

    with pytest.raises(HostFailure):
        retry_then_fail()
    assert before == host.seen()
    assert [] == host.orders()
    assert [] == host.dispatcher.keys
    with host.transaction() as (_, _, order):  # a later commit sends nothing of it
        order(2)
    assert [] == host.dispatcher.keys
    assert host.observer.get_idempotency("k") is None


def test_refused_calls_do_not_poison_the_host_transaction(host: Host) -> None:
    """A retry the rules refuse, a stale plan and a value the database refuses each
    leave the host's transaction usable: its own writes and the retry still commit."""
    with host.transaction() as (retries, storage, order):
        order(1)
        retries.retry("p", "t")
        with pytest.raises(TaskNotBlocked):
            retries.retry("p", "t")
        project, task = storage.load("p", "u")
        plan = decide.manual_retry(task, project, now=host.clock.now(), blockers={})
        storage.apply(plan)
        with pytest.raises(VersionConflict):
            storage.apply(plan)  # decided on a version that is gone
        with pytest.raises(InvalidInput):
            storage.list_tasks("p", limit=0)
        order(2)
    assert [1, 2] == host.orders()
    assert ["assigned", "assigned"] == [host.seen(t)[0].status for t in ("t", "u")]
    assert [("p", "t", 2)] == host.dispatcher.keys


def test_a_rolled_back_savepoint_of_the_host_drops_its_own_deliveries_only(host: Host) -> None:
    """A savepoint of the host rolled back around a retry: that retry is gone and never
    sent; the one made before it commits and is sent."""
    with host.transaction() as (retries, storage, _):
        retries.retry("p", "t")
        bind: Any = storage._host  # type: ignore[attr-defined]
        nested = bind.begin_nested()
        retries.retry("p", "u")
        nested.rollback()
    assert [("p", "t", 2)] == host.dispatcher.keys
    assert "blocked" == host.seen("u")[0].status


def test_a_savepoint_of_the_host_opened_after_the_retry_does_not_drop_it(host: Host) -> None:
    """Only savepoints around the retry's work undo it: a later one rolled back does not."""
    with host.transaction() as (retries, storage, order):
        retries.retry("p", "t")
        bind: Any = storage._host  # type: ignore[attr-defined]
        nested = bind.begin_nested()
        order(7)
        nested.rollback()
    assert [("p", "t", 2)] == host.dispatcher.keys
    assert [] == host.orders()


def test_without_a_host_transaction_each_call_commits_and_dispatches_at_once(
    host: Host,
) -> None:
    """No transaction open: the retry commits by itself and is delivered at once."""
    bind: Any
    with host.engine.connect() if host.mode == "connection" else Session(host.engine) as bind:
        storage = SQLAlchemyStorage(bind, **_schema(host.url))
        retries = RetryService(storage, host.dispatcher, clock=host.clock)
        retries.retry("p", "t")
        assert [("p", "t", 2)] == host.dispatcher.keys
        assert not bind.in_transaction()
    assert ["delivered"] == [e.state for e in host.seen()[2] if e.attempt == 2]


def test_closing_a_joined_storage_leaves_the_host_connection_open(host: Host) -> None:
    """``close`` stops the storage; the host's connection and engine stay the host's."""
    with host.engine.connect() as conn:
        storage = SQLAlchemyStorage(conn, **_schema(host.url))
        storage.close()
        assert not conn.closed
        assert 1 == conn.exec_driver_sql("SELECT 1").scalar()


# -- async ----------------------------------------------------------------------------


def _async_url(url: str) -> str:
    return url.replace("mysql+pymysql://", "mysql+aiomysql://").replace(
        "sqlite://", "sqlite+aiosqlite://"
    )


@asynccontextmanager
async def _async_host(
    url: str, mode: str, dispatcher: AsyncWatching, clock: FakeClock
) -> AsyncIterator[tuple[AsyncRetryService, AsyncSQLAlchemyStorage, Callable[[int], Any]]]:
    engine = create_async_engine(_async_url(url), **_host_options(url))
    try:
        if mode == "connection":
            async with engine.connect() as conn, conn.begin():
                yield _async_parts(conn, conn.execute, dispatcher, clock, _schema(url))
        else:
            async with AsyncSession(engine) as session, session.begin():
                yield _async_parts(session, session.execute, dispatcher, clock, _schema(url))
    finally:
        # Deliveries run as tasks after the commit, on the host's engine: let them end first.
        await asyncio.gather(*_sqlalchemy_io._RUNNING)
        await engine.dispose()


def _async_parts(
    bind: AsyncConnection | AsyncSession,
    execute: Callable[..., Any],
    dispatcher: AsyncWatching,
    clock: FakeClock,
    schema: dict[str, Any],
) -> tuple[AsyncRetryService, AsyncSQLAlchemyStorage, Callable[[int], Any]]:
    storage = AsyncSQLAlchemyStorage(bind, **schema)
    assert isinstance(storage, AsyncJoinedSQLAlchemyStorage)
    assert isinstance(storage, AsyncJoinsHostTransaction)

    async def order(number: int) -> None:
        await execute(text("INSERT INTO orders (id) VALUES (:id)"), {"id": number})

    return AsyncRetryService(storage, dispatcher, clock=clock), storage, order


async def _settled(dispatcher: AsyncWatching, count: int) -> None:
    """Wait (within a generous bound) until ``count`` deliveries were made."""
    for _ in range(500):
        if len(dispatcher.inner.keys) >= count:
            return
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("mode", ["connection", "session"])
def test_async_commit_and_rollback_with_the_host(url: str, mode: str) -> None:
    """Async: committed together and delivered after the commit; rolled back after the
    retry succeeded, nothing remains and nothing is delivered; a refused retry leaves the
    host's transaction usable."""
    observer = SQLAlchemyStorage.from_url(url, **_schema(url))
    dispatcher = AsyncWatching(observer)
    clock = FakeClock()

    async def main() -> None:
        async with _async_host(url, mode, dispatcher, clock) as (retries, _, order):
            await order(1)
            result = await retries.retry("p", "t", idempotency_key="k")
            assert "pending" == result.dispatch.status
            with pytest.raises(TaskNotBlocked):
                await retries.retry("p", "t")
            await order(2)
            await asyncio.sleep(0.05)
            assert [] == dispatcher.inner.keys
        await _settled(dispatcher, 1)
        before = observer.load("p", "u")[1]

        async def retry_then_fail() -> None:
            async with _async_host(url, mode, dispatcher, clock) as (retries, _, order):
                await order(3)
                assert "assigned" == (await retries.retry("p", "u")).task.status
                raise HostFailure

        with pytest.raises(HostFailure):
            await retry_then_fail()
        await asyncio.sleep(0.05)
        assert before == observer.load("p", "u")[1]

    try:
        asyncio.run(main())
        assert [("p", "t", 2)] == dispatcher.inner.keys
        assert ["assigned"] == dispatcher.inner.seen
        engine = create_engine(url)
        with engine.connect() as conn:
            assert [1, 2] == [
                r[0] for r in conn.exec_driver_sql("SELECT id FROM orders ORDER BY id")
            ]
        engine.dispose()
        assert [] == observer.attempts("p", "u")[1:]
    finally:
        observer.close()


def _savepoints_inside_transactions(engine: Any) -> None:
    """SQLAlchemy's recipe for pysqlite, which begins no transaction for a SAVEPOINT (so
    releasing the outermost one would commit): SQLAlchemy's begin emits ``BEGIN``."""

    @event.listens_for(engine, "connect")
    def autocommit_driver(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")


def test_a_session_joined_to_an_outer_connection_transaction_waits_for_that(
    url: str,
) -> None:
    """A session bound to a connection whose transaction it joins (SQLAlchemy's recipe
    for test suites): the session's commit sends nothing; the outer commit does, and an
    outer rollback leaves nothing and sends nothing."""
    host = Host(url, "session")
    if url.startswith("sqlite"):
        _savepoints_inside_transactions(host.engine)
    try:
        for outer_commits in (False, True):
            with host.engine.connect() as conn:
                outer = conn.begin()
                with Session(bind=conn, join_transaction_mode="create_savepoint") as session:
                    with session.begin():
                        storage = SQLAlchemyStorage(session, **_schema(url))
                        RetryService(storage, host.dispatcher, clock=host.clock).retry("p", "t")
                    assert [] == host.dispatcher.keys
                if outer_commits:
                    outer.commit()
                else:
                    outer.rollback()
                    assert "blocked" == host.seen()[0].status
        assert [("p", "t", 2)] == host.dispatcher.keys
        assert ["assigned"] == host.dispatcher.seen
    finally:
        host.close()
