"""The SQLAlchemy storage's own behaviour on MariaDB: its schema, its migrations, races
between processes' worth of connections, a deadlock with a host's locks, the isolation
level it joins at, and errors."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from mysql_support import database_dropped_after
from sqlalchemy import create_engine
from sqlalchemy.engine import URL, Engine

from deepwork_retry import ExecutorService, RetryService, TaskError
from deepwork_retry._core import decide
from deepwork_retry._core.plans import Plan
from deepwork_retry.exceptions import (
    InvalidInput,
    StorageCorrupt,
    StorageMissing,
    StorageUnavailable,
    TaskNotBlocked,
    VersionConflict,
)
from deepwork_retry.storage._sql import common
from deepwork_retry.storage._sql.engine import split_script
from deepwork_retry.storage.sqlalchemy import SQLAlchemyStorage, migrate

pytestmark = pytest.mark.mysql


@pytest.fixture
def database(mysql_url: str) -> Iterator[URL]:
    with database_dropped_after(mysql_url, "sqla") as url:
        yield url


def _url(url: URL) -> str:
    return url.render_as_string(hide_password=False)


def _schema(engine: Engine) -> dict[str, Any]:
    """Every table's columns and indexes, as the server describes them."""
    with engine.connect() as conn:
        columns = conn.exec_driver_sql(
            "SELECT table_name, column_name, ordinal_position, column_type, is_nullable, "
            "column_default, character_set_name, collation_name, extra "
            "FROM information_schema.columns WHERE table_schema = DATABASE() "
            "AND table_name <> 'schema_migrations' ORDER BY table_name, ordinal_position"
        ).all()
        indexes = conn.exec_driver_sql(
            "SELECT table_name, index_name, seq_in_index, column_name, non_unique "
            "FROM information_schema.statistics WHERE table_schema = DATABASE() "
            "AND table_name <> 'schema_migrations' ORDER BY table_name, index_name, seq_in_index"
        ).all()
        tables = conn.exec_driver_sql(
            "SELECT table_name, engine, table_collation FROM information_schema.tables "
            "WHERE table_schema = DATABASE() AND table_name <> 'schema_migrations' "
            "ORDER BY table_name"
        ).all()
        turn = conn.exec_driver_sql("SELECT id FROM writer_turn").all()
    return {"columns": columns, "indexes": indexes, "tables": tables, "turn": turn}


def test_migrations_in_order_equal_schema_sql(mysql_url: str) -> None:
    """The numbered migrations, applied in order, yield exactly the schema of schema.sql."""
    with database_dropped_after(mysql_url) as a, database_dropped_after(mysql_url) as b:
        reference, migrated = create_engine(_url(a)), create_engine(_url(b))
        try:
            schema_sql = common.sql_folder("mysql").joinpath("schema.sql").read_text("utf-8")
            with reference.begin() as conn:
                for statement in split_script(schema_sql):
                    conn.exec_driver_sql(statement)
            assert [m.number for m in common.migrations("mysql")] == migrate(migrated)
            assert _schema(reference) == _schema(migrated)
        finally:
            reference.dispose()
            migrated.dispose()


def test_ids_compare_by_code_point(database: URL) -> None:
    """Ids that a default collation would call equal or order otherwise ("a" and "A",
    "e" and "é", trailing spaces) are distinct ids, listed in code point order."""
    storage = SQLAlchemyStorage.from_url(_url(database))
    try:
        executor = ExecutorService(storage)
        executor.create_project("p")
        ids = ["a", "A", "a ", "é", "e", "Z", "ß", "ss"]
        for task_id in ids:
            executor.add_task("p", task_id)
        assert sorted(ids) == [t.id for t in storage.list_tasks("p")]
        assert "a " == storage.load("p", "a ")[1].id
    finally:
        storage.close()


def test_a_second_migrate_applies_nothing_and_a_newer_schema_is_refused(database: URL) -> None:
    """Migrating twice is harmless; a database migrated by a newer release is refused."""
    engine = create_engine(_url(database))
    try:
        assert [m.number for m in common.migrations("mysql")] == migrate(engine)
        assert [] == migrate(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO schema_migrations (number, name, applied_at) VALUES (99, 'x', 0)"
            )
        with pytest.raises(StorageCorrupt, match="newer"):
            migrate(engine)
    finally:
        engine.dispose()


def test_without_migrate_an_empty_database_is_refused_and_left_empty(database: URL) -> None:
    """``migrate=False`` on a database without the schema says so and creates nothing."""
    storage = SQLAlchemyStorage.from_url(_url(database), migrate=False)
    try:
        with pytest.raises(StorageMissing, match="no deepwork_retry schema"):
            storage.get_project("p")
    finally:
        storage.close()
    engine = create_engine(_url(database))
    try:
        with engine.connect() as conn:
            assert [] == conn.exec_driver_sql("SHOW TABLES").all()
    finally:
        engine.dispose()


def _race(services: list[RetryService], task_id: str) -> list[str]:
    """Each service retries ``task_id`` on a thread of its own, all released at once."""
    barrier = threading.Barrier(len(services))
    outcomes: list[str] = []

    def retry(service: RetryService) -> None:
        barrier.wait()
        try:
            service.retry("p", task_id)
            outcomes.append("applied")
        except TaskNotBlocked:
            outcomes.append("refused")

    threads = [threading.Thread(target=retry, args=(s,)) for s in services]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_two_storages_racing_the_same_retry_one_wins(database: URL) -> None:
    """Two storages on engines of their own (as two processes would be) retry the same
    blocked task at once, many times over: each time exactly one retry applies, the
    other is refused with the core's error, and the counters stay exact."""
    url = _url(database)
    first, second = SQLAlchemyStorage.from_url(url), SQLAlchemyStorage.from_url(url)
    rounds = 20
    try:
        executor = ExecutorService(first)
        executor.create_project("p")
        for n in range(rounds):
            executor.add_task("p", f"t{n}", max_retries=0)
            executor.assign("p", f"t{n}")
            executor.start("p", f"t{n}", 1)
            executor.fail("p", f"t{n}", 1, TaskError(type="E", message="boom"))
        services = [RetryService(first), RetryService(second)]
        for n in range(rounds):
            assert ["applied", "refused"] == sorted(_race(services, f"t{n}"))
            assert 2 == len(first.attempts("p", f"t{n}"))
        progress = second.progress("p")
        assert (rounds, rounds, 0) == (progress.total, progress.assigned, progress.blocked)
    finally:
        first.close()
        second.close()


def _blocked(storage: SQLAlchemyStorage, *task_ids: str) -> None:
    """Project ``p`` with each of ``task_ids`` blocked (failed with no retries left)."""
    executor = ExecutorService(storage)
    executor.create_project("p")
    for task_id in task_ids:
        executor.add_task("p", task_id, max_retries=0)
        executor.assign("p", task_id)
        executor.start("p", task_id, 1)
        executor.fail("p", task_id, 1, TaskError(type="E", message="boom"))


def test_a_host_at_repeatable_read_is_refused_clearly(database: URL) -> None:
    """A host transaction whose reads see an old snapshot (MySQL's default level) is
    refused, saying how to fix it, and nothing is changed."""
    storage = SQLAlchemyStorage.from_url(_url(database))
    _blocked(storage, "t")
    engine = create_engine(_url(database))  # MySQL's default: REPEATABLE READ
    try:
        with engine.connect() as conn, conn.begin():
            retries = RetryService(SQLAlchemyStorage(conn))
            with pytest.raises(InvalidInput, match="READ COMMITTED"):
                retries.retry("p", "t")
        assert "blocked" == storage.load("p", "t")[1].status
    finally:
        engine.dispose()
        storage.close()


def _deadlock(url: str, plan: Plan, apply: Callable[[Plan], object]) -> BaseException | None:
    """A real deadlock between a host's transaction and ``apply(plan)`` run on a thread:
    the host inserts 200 orders and locks the project's row; ``apply`` updates the task
    and waits for that row; the host then locks the task. The server aborts the smaller
    transaction, ``apply``'s. What ``apply`` raised (``None`` if it did not); the host's
    transaction commits its orders and one more."""
    host = create_engine(url)
    waiting: list[int] = []
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            apply(plan)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread
            outcome.append(exc)

    try:
        with host.connect() as conn, conn.begin():
            conn.exec_driver_sql("INSERT INTO orders (id) SELECT seq FROM seq_1_to_200")
            conn.exec_driver_sql("SELECT id FROM projects WHERE id = 'p' FOR UPDATE")
            thread = threading.Thread(target=run)
            thread.start()
            for _ in range(3000):  # until apply waits for the project's row
                waiting.extend(
                    conn.exec_driver_sql(
                        "SELECT id FROM information_schema.processlist WHERE db = DATABASE() "
                        "AND info LIKE 'UPDATE projects%%'"
                    ).scalars()
                )
                if waiting or not thread.is_alive():
                    break
                time.sleep(0.01)
            assert waiting, "apply never waited for the host's lock"
            conn.exec_driver_sql("SELECT id FROM tasks WHERE id = 't' FOR UPDATE")
            thread.join()
            conn.exec_driver_sql("INSERT INTO orders (id) VALUES (1000)")
        assert 1 == len(outcome)
        return outcome[0]
    finally:
        host.dispose()


@pytest.fixture
def blocked_with_orders(database: URL) -> Iterator[tuple[str, SQLAlchemyStorage, Plan]]:
    """The database's URL, a storage with task ``t`` blocked, the plan retrying it, and
    the host's ``orders`` table."""
    url = _url(database)
    storage = SQLAlchemyStorage.from_url(url)
    try:
        _blocked(storage, "t")
        with storage._engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE orders (id INTEGER NOT NULL PRIMARY KEY)")
        yield url, storage, _retry_plan(storage)
    finally:
        storage.close()


def _retry_plan(storage: SQLAlchemyStorage) -> Plan:
    project, task = storage.load("p", "t")
    return decide.manual_retry(task, project, now=task.updated_at, blockers={})


def _orders(storage: SQLAlchemyStorage) -> list[int]:
    with storage._engine.connect() as conn:
        return list(conn.exec_driver_sql("SELECT id FROM orders ORDER BY id").scalars())


def test_a_deadlock_inside_apply_is_a_version_conflict(
    blocked_with_orders: tuple[str, SQLAlchemyStorage, Plan],
) -> None:
    """A real deadlock between a host's locks and the storage's ``apply`` (see
    :func:`_deadlock`): ``apply`` answers ``VersionConflict``, on which the services
    decide again, as the other SQL storages do; nothing of it remains, and the plan
    decided again applies."""
    url, storage, plan = blocked_with_orders
    raised = _deadlock(url, plan, storage.apply)
    assert isinstance(raised, VersionConflict), raised
    assert ("t", plan.before.version) == (raised.task_id, raised.expected)
    assert "blocked" == storage.load("p", "t")[1].status
    assert 1 == len(storage.attempts("p", "t"))
    assert "assigned" == storage.apply(_retry_plan(storage)).task.status
    assert 201 == len(_orders(storage))


def test_a_deadlock_inside_a_host_transaction_is_reported_to_the_host(
    blocked_with_orders: tuple[str, SQLAlchemyStorage, Plan],
) -> None:
    """The same deadlock with the storage joined to another host's transaction: MySQL
    rolled back that whole transaction (the host's own write with it), so deciding
    again there is no answer: the call is ``StorageUnavailable`` saying to try again,
    and nothing of that transaction remains."""
    url, storage, plan = blocked_with_orders
    engine = create_engine(url, isolation_level="READ COMMITTED")
    try:
        with engine.connect() as conn:
            conn.begin()
            conn.exec_driver_sql("INSERT INTO orders (id) VALUES (5000)")
            joined = SQLAlchemyStorage(conn)
            raised = _deadlock(url, plan, joined.apply)
            conn.rollback()
    finally:
        engine.dispose()
    assert isinstance(raised, StorageUnavailable), raised
    assert "try again" in str(raised)
    assert 5000 not in _orders(storage)
    assert "blocked" == storage.load("p", "t")[1].status
