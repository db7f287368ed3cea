"""The shipped conformance suite and state machines on a storage that joins the host's
connection (``PostgresStorage.joining``).

Two modes: the connection with no transaction open (each call then runs in a
transaction of its own), and a host transaction held open for the whole test
(each call then runs in it, within a savepoint), rolled back at the end.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test
from pg_support import drop_schema, new_schema_name, schema_dropped_after

from deepwork_retry.ports import AsyncStorage, Storage
from deepwork_retry.storage.postgres import (
    AsyncJoinedPostgresStorage,
    JoinedPostgresStorage,
    PostgresStorage,
    amigrate,
    migrate,
)
from deepwork_retry.testing import (
    AsyncStorageContract,
    StorageContract,
    async_storage_machine,
    storage_machine,
)

pytestmark = pytest.mark.postgres

MACHINE_SETTINGS = settings(
    max_examples=10,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture
def pg_schema(postgres_dsn: str) -> Iterator[str]:
    with schema_dropped_after(postgres_dsn, "pghost") as schema:
        migrate(postgres_dsn, schema=schema)
        yield schema


class TestJoinedOnAnIdleConnection(StorageContract):
    """The sync contract on a host connection with no transaction open."""

    @pytest.fixture
    def storage(self, postgres_dsn: str, pg_schema: str) -> Iterator[JoinedPostgresStorage]:
        with psycopg.connect(postgres_dsn) as conn:
            yield PostgresStorage.joining(conn, schema=pg_schema)


class TestJoinedOnAnAutocommitConnection(StorageContract):
    """The sync contract on a host connection in autocommit mode."""

    @pytest.fixture
    def storage(self, postgres_dsn: str, pg_schema: str) -> Iterator[JoinedPostgresStorage]:
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            yield PostgresStorage.joining(conn, schema=pg_schema)


class TestJoinedInsideAHostTransaction(StorageContract):
    """The sync contract inside one host transaction, rolled back afterwards."""

    @pytest.fixture
    def storage(self, postgres_dsn: str, pg_schema: str) -> Iterator[JoinedPostgresStorage]:
        with psycopg.connect(postgres_dsn) as conn:
            conn.execute("SELECT 1")  # the host's transaction is open from here
            yield PostgresStorage.joining(conn, schema=pg_schema)
            assert "INTRANS" == conn.info.transaction_status.name
            conn.rollback()


class TestAsyncJoinedOnAnIdleConnection(AsyncStorageContract):
    """The async contract on a host connection with no transaction open."""

    @pytest.fixture
    def async_storage_factory(
        self, postgres_dsn: str, pg_schema: str
    ) -> Callable[[], Awaitable[AsyncJoinedPostgresStorage]]:
        async def make() -> AsyncJoinedPostgresStorage:
            conn = await psycopg.AsyncConnection.connect(postgres_dsn)
            return _closing(AsyncJoinedPostgresStorage(conn, schema=pg_schema))

        return make


class TestAsyncJoinedInsideAHostTransaction(AsyncStorageContract):
    """The async contract inside one host transaction, never committed."""

    @pytest.fixture
    def async_storage_factory(
        self, postgres_dsn: str, pg_schema: str
    ) -> Callable[[], Awaitable[AsyncJoinedPostgresStorage]]:
        async def make() -> AsyncJoinedPostgresStorage:
            conn = await psycopg.AsyncConnection.connect(postgres_dsn)
            await conn.execute("SELECT 1")
            return _closing(AsyncJoinedPostgresStorage(conn, schema=pg_schema))

        return make


def _closing(storage: AsyncJoinedPostgresStorage) -> AsyncJoinedPostgresStorage:
    """``storage`` whose close also closes the test's connection (rolling back what is open)."""
    close = storage.close

    async def close_both() -> None:
        await close()
        await storage.connection.close()

    storage.close = close_both  # type: ignore[method-assign]
    return storage


def test_storage_machine(postgres_dsn: str) -> None:
    """The sync services over a joined storage agree with the reference model."""
    conns: dict[int, psycopg.Connection] = {}

    def make() -> Storage:
        schema = new_schema_name("pghost_m")
        migrate(postgres_dsn, schema=schema)
        conn = psycopg.connect(postgres_dsn)
        store = PostgresStorage.joining(conn, schema=schema)
        conns[id(store)] = conn
        return store

    def teardown(store: Storage) -> None:
        assert isinstance(store, JoinedPostgresStorage)
        conns.pop(id(store)).close()
        drop_schema(postgres_dsn, store.schema)

    run_state_machine_as_test(storage_machine(make, teardown), settings=MACHINE_SETTINGS)


def test_async_storage_machine(postgres_dsn: str) -> None:
    """The async services over a joined storage agree with the reference model."""

    async def make() -> AsyncStorage:
        schema = new_schema_name("pghost_m")
        await amigrate(postgres_dsn, schema=schema)
        conn = await psycopg.AsyncConnection.connect(postgres_dsn)
        return _closing(AsyncJoinedPostgresStorage(conn, schema=schema))

    async def teardown(store: AsyncStorage) -> None:
        assert isinstance(store, AsyncJoinedPostgresStorage)
        await store.close()
        drop_schema(postgres_dsn, store.schema)

    run_state_machine_as_test(async_storage_machine(make, teardown), settings=MACHINE_SETTINGS)
