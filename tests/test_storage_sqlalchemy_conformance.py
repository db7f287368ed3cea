"""The shipped storage conformance suite and state machines, run on the SQLAlchemy
storage over SQLite files and MariaDB, sync and async.

Every contract test and every state-machine example gets a database of its own:
a new SQLite file, or a new MariaDB database dropped afterwards.
"""

from __future__ import annotations

import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test
from mysql_support import create_database, database_dropped_after, drop_database, new_database_name
from sqlalchemy.engine import make_url

from deepwork_retry.ports import AsyncStorage, Storage
from deepwork_retry.storage.sqlalchemy import AsyncSQLAlchemyStorage, SQLAlchemyStorage
from deepwork_retry.testing import (
    AsyncStorageContract,
    StorageContract,
    async_storage_machine,
    storage_machine,
)

MACHINE_SETTINGS = settings(
    max_examples=10,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _async_url(url: str) -> str:
    """The same database through the async driver."""
    return url.replace("mysql+pymysql://", "mysql+aiomysql://").replace(
        "sqlite://", "sqlite+aiosqlite://"
    )


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mysql)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A new, empty database: an SQLite file, or a MariaDB database dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'contract.db'}"
        return
    server = request.getfixturevalue("mysql_url")
    with database_dropped_after(server) as url:
        yield url.render_as_string(hide_password=False)


@pytest.fixture
def storage(database_url: str) -> Iterator[SQLAlchemyStorage]:
    store = SQLAlchemyStorage.from_url(database_url)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def async_storage_factory(database_url: str) -> Callable[[], Awaitable[AsyncStorage]]:
    async def make() -> AsyncStorage:
        store = AsyncSQLAlchemyStorage.from_url(_async_url(database_url))
        await store.open()
        return store

    return make


class TestSQLAlchemyStorage(StorageContract):
    """The sync contract on the SQLAlchemy storage."""


class TestAsyncSQLAlchemyStorage(AsyncStorageContract):
    """The async contract on the SQLAlchemy storage."""


def _machine_databases(
    request: pytest.FixtureRequest,
) -> tuple[Callable[[], str], Callable[[str], None]]:
    """A new database per example, and its removal."""
    if request.param == "sqlite":  # type: ignore[attr-defined]

        def new_file() -> str:
            return f"sqlite:///{Path(tempfile.mkdtemp(prefix='dw-sqla-')) / 'm.db'}"

        return new_file, lambda url: None
    server = request.getfixturevalue("mysql_url")

    def new_db() -> str:
        return create_database(server, new_database_name()).render_as_string(hide_password=False)

    def drop(url: str) -> None:
        drop_database(server, make_url(url).database or "")

    return new_db, drop


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mysql)])
def machine_databases(
    request: pytest.FixtureRequest,
) -> tuple[Callable[[], str], Callable[[str], None]]:
    return _machine_databases(request)


def test_storage_machine(
    machine_databases: tuple[Callable[[], str], Callable[[str], None]],
) -> None:
    """The sync services over the SQLAlchemy storage agree with the reference model."""
    new, drop = machine_databases
    urls: dict[int, str] = {}

    def make() -> Storage:
        url = new()
        store = SQLAlchemyStorage.from_url(url)
        urls[id(store)] = url
        return store

    def teardown(store: Storage) -> None:
        store.close()
        drop(urls.pop(id(store)))

    run_state_machine_as_test(storage_machine(make, teardown), settings=MACHINE_SETTINGS)


def test_async_storage_machine(
    machine_databases: tuple[Callable[[], str], Callable[[str], None]],
) -> None:
    """The async services over the SQLAlchemy storage agree with the reference model."""
    new, drop = machine_databases
    urls: dict[int, str] = {}

    async def make() -> AsyncStorage:
        url = new()
        store = AsyncSQLAlchemyStorage.from_url(_async_url(url))
        await store.open()
        urls[id(store)] = url
        return store

    async def teardown(store: AsyncStorage) -> None:
        await store.close()
        drop(urls.pop(id(store)))

    run_state_machine_as_test(async_storage_machine(make, teardown), settings=MACHINE_SETTINGS)
