"""The shipped storage conformance suite and state machines, run on PostgreSQL.

Every contract test and every state-machine example gets a schema of its own,
dropped afterwards, so no test sees another's rows.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test
from pg_support import drop_schema, new_schema_name, schema_dropped_after

from deepwork_retry.ports import AsyncStorage, Storage
from deepwork_retry.storage.postgres import AsyncPostgresStorage, PostgresStorage
from deepwork_retry.testing import (
    AsyncStorageContract,
    StorageContract,
    async_storage_machine,
    storage_machine,
)

pytestmark = pytest.mark.postgres

MACHINE_SETTINGS = settings(
    max_examples=15,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture
def pg_schema(postgres_dsn: str) -> Iterator[str]:
    with schema_dropped_after(postgres_dsn) as schema:
        yield schema


@pytest.fixture
def storage(postgres_dsn: str, pg_schema: str) -> Iterator[PostgresStorage]:
    store = PostgresStorage(postgres_dsn, schema=pg_schema, max_size=2)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def async_storage_factory(
    postgres_dsn: str, pg_schema: str
) -> Callable[[], Awaitable[AsyncPostgresStorage]]:
    async def make() -> AsyncPostgresStorage:
        store = AsyncPostgresStorage(postgres_dsn, schema=pg_schema, max_size=2)
        await store.open()
        return store

    return make


class TestPostgresStorageContract(StorageContract):
    """The sync contract on PostgreSQL."""


class TestAsyncPostgresStorageContract(AsyncStorageContract):
    """The async contract on PostgreSQL."""


def test_storage_machine(postgres_dsn: str) -> None:
    """The sync services over PostgreSQL agree with the reference model in every example."""

    def make() -> Storage:
        return PostgresStorage(postgres_dsn, schema=new_schema_name("m"), max_size=2)

    def teardown(store: Storage) -> None:
        assert isinstance(store, PostgresStorage)
        drop_schema(postgres_dsn, store.schema)

    run_state_machine_as_test(storage_machine(make, teardown), settings=MACHINE_SETTINGS)


def test_async_storage_machine(postgres_dsn: str) -> None:
    """The async services over PostgreSQL agree with the reference model in every example."""

    async def make() -> AsyncStorage:
        store = AsyncPostgresStorage(postgres_dsn, schema=new_schema_name("m"), max_size=2)
        await store.open()
        return store

    async def teardown(store: AsyncStorage) -> None:
        assert isinstance(store, AsyncPostgresStorage)
        drop_schema(postgres_dsn, store.schema)

    run_state_machine_as_test(async_storage_machine(make, teardown), settings=MACHINE_SETTINGS)
