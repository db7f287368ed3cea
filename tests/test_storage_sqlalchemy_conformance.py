"""The shipped storage conformance suite and state machines, run on the SQLAlchemy
storage over SQLite files, MariaDB and PostgreSQL, sync and async.

Every contract test and every state-machine example gets a database of its own:
a new SQLite file, a new MariaDB database or a new PostgreSQL schema, dropped
afterwards.
"""

from __future__ import annotations

import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test
from mysql_support import create_database, database_dropped_after, drop_database, new_database_name
from pg_support import drop_schema, new_schema_name, schema_dropped_after
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


BACKENDS = [
    "sqlite",
    pytest.param("mariadb", marks=pytest.mark.mysql),
    pytest.param("postgresql", marks=pytest.mark.postgres),
]


def _async_url(url: str) -> str:
    """The same database through the async driver (psycopg is both)."""
    return url.replace("mysql+pymysql://", "mysql+aiomysql://").replace(
        "sqlite://", "sqlite+aiosqlite://"
    )


def _pg_url(dsn: str) -> str:
    return dsn.replace("postgresql://", "postgresql+psycopg://", 1)


@pytest.fixture(params=BACKENDS)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A new, empty database: an SQLite file, a MariaDB database or a PostgreSQL schema,
    as ``from_url``'s arguments."""
    if request.param == "sqlite":
        yield {"url": f"sqlite:///{tmp_path / 'contract.db'}"}
    elif request.param == "mariadb":
        with database_dropped_after(request.getfixturevalue("mysql_url")) as url:
            yield {"url": url.render_as_string(hide_password=False)}
    else:
        dsn = request.getfixturevalue("postgres_dsn")
        with schema_dropped_after(dsn, "sqla") as schema:
            yield {"url": _pg_url(dsn), "schema": schema}


@pytest.fixture
def storage(database: dict[str, Any]) -> Iterator[SQLAlchemyStorage]:
    store = SQLAlchemyStorage.from_url(**database)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def async_storage_factory(database: dict[str, Any]) -> Callable[[], Awaitable[AsyncStorage]]:
    async def make() -> AsyncStorage:
        store = AsyncSQLAlchemyStorage.from_url(**{**database, "url": _async_url(database["url"])})
        await store.open()
        return store

    return make


class TestSQLAlchemyStorage(StorageContract):
    """The sync contract on the SQLAlchemy storage."""


class TestAsyncSQLAlchemyStorage(AsyncStorageContract):
    """The async contract on the SQLAlchemy storage."""


Databases = tuple[Callable[[], dict[str, Any]], Callable[[dict[str, Any]], None]]


@pytest.fixture(params=BACKENDS)
def machine_databases(request: pytest.FixtureRequest) -> Databases:
    """A new database per example (``from_url``'s arguments), and its removal."""
    if request.param == "sqlite":

        def new_file() -> dict[str, Any]:
            return {"url": f"sqlite:///{Path(tempfile.mkdtemp(prefix='dw-sqla-')) / 'm.db'}"}

        return new_file, lambda database: None
    if request.param == "mariadb":
        server = request.getfixturevalue("mysql_url")

        def new_db() -> dict[str, Any]:
            url = create_database(server, new_database_name())
            return {"url": url.render_as_string(hide_password=False)}

        def drop(database: dict[str, Any]) -> None:
            drop_database(server, make_url(database["url"]).database or "")

        return new_db, drop
    dsn = request.getfixturevalue("postgres_dsn")

    def new_schema() -> dict[str, Any]:
        return {"url": _pg_url(dsn), "schema": new_schema_name("sqla")}

    return new_schema, lambda database: drop_schema(dsn, database["schema"])


def test_storage_machine(machine_databases: Databases) -> None:
    """The sync services over the SQLAlchemy storage agree with the reference model."""
    new, drop = machine_databases
    urls: dict[int, dict[str, Any]] = {}

    def make() -> Storage:
        database = new()
        store = SQLAlchemyStorage.from_url(**database)
        urls[id(store)] = database
        return store

    def teardown(store: Storage) -> None:
        store.close()
        drop(urls.pop(id(store)))

    run_state_machine_as_test(storage_machine(make, teardown), settings=MACHINE_SETTINGS)


def test_async_storage_machine(machine_databases: Databases) -> None:
    """The async services over the SQLAlchemy storage agree with the reference model."""
    new, drop = machine_databases
    urls: dict[int, dict[str, Any]] = {}

    async def make() -> AsyncStorage:
        database = new()
        store = AsyncSQLAlchemyStorage.from_url(**{**database, "url": _async_url(database["url"])})
        await store.open()
        urls[id(store)] = database
        return store

    async def teardown(store: AsyncStorage) -> None:
        await store.close()
        drop(urls.pop(id(store)))

    run_state_machine_as_test(async_storage_machine(make, teardown), settings=MACHINE_SETTINGS)
