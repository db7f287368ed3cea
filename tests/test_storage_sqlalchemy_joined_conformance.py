"""The shipped conformance suite and state machines on the SQLAlchemy storage joined to
a host's ``Connection`` and ``Session`` (and, async, ``AsyncConnection`` and
``AsyncSession``), on SQLite, MariaDB and PostgreSQL.

The contract runs in two modes: the host's connection with no transaction open
(each call then runs in a transaction of its own), and a host transaction held
open for the whole test (each call then runs in it, within a savepoint), rolled
back at the end. The machines run every service call inside a host transaction
of its own, committed after the call whether it succeeded or was refused, as a
host would commit its own work around a refused retry: deliveries then happen
on the host's commit.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test
from mysql_support import create_database, database_dropped_after, drop_database, new_database_name
from pg_support import drop_schema, new_schema_name, schema_dropped_after
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from deepwork_retry.ports import AsyncStorage, Storage
from deepwork_retry.storage import _sqlalchemy_io
from deepwork_retry.storage.sqlalchemy import (
    AsyncJoinedSQLAlchemyStorage,
    AsyncSQLAlchemyStorage,
    JoinedSQLAlchemyStorage,
    SQLAlchemyStorage,
    migrate,
)
from deepwork_retry.testing import (
    AsyncStorageContract,
    StorageContract,
    async_storage_machine,
    storage_machine,
)

MACHINE_SETTINGS = settings(
    max_examples=6,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

BACKENDS = [
    "sqlite",
    pytest.param("mariadb", marks=pytest.mark.mysql),
    pytest.param("postgresql", marks=pytest.mark.postgres),
]


@pytest.fixture(params=BACKENDS)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A migrated database: the engine's URL and options, and the storage's schema."""
    if request.param == "sqlite":
        yield from _migrated({"url": f"sqlite:///{tmp_path / 'joined.db'}"})
    elif request.param == "mariadb":
        with database_dropped_after(request.getfixturevalue("mysql_url")) as url:
            yield from _migrated(
                {
                    "url": url.render_as_string(hide_password=False),
                    "options": {"isolation_level": "READ COMMITTED"},
                }
            )
    else:
        dsn = request.getfixturevalue("postgres_dsn")
        with schema_dropped_after(dsn, "sqla") as schema:
            url = dsn.replace("postgresql://", "postgresql+psycopg://", 1)
            yield from _migrated({"url": url, "schema": schema})


def _migrated(database: dict[str, Any]) -> Iterator[dict[str, Any]]:
    engine = create_engine(database["url"], **database.get("options", {}))
    try:
        migrate(engine, schema=database.get("schema"))
        yield {**database, "engine": engine}
    finally:
        engine.dispose()


def _joined(bind: Any, database: dict[str, Any]) -> JoinedSQLAlchemyStorage:
    storage = SQLAlchemyStorage(bind, schema=database.get("schema"))
    assert isinstance(storage, JoinedSQLAlchemyStorage)
    return storage


class TestJoinedOnAnIdleConnection(StorageContract):
    """The sync contract on a host connection with no transaction open."""

    @pytest.fixture
    def storage(self, database: dict[str, Any]) -> Iterator[JoinedSQLAlchemyStorage]:
        with database["engine"].connect() as conn:
            yield _joined(conn, database)


class TestJoinedInsideAHostTransaction(StorageContract):
    """The sync contract inside one host transaction (a Connection's), rolled back at
    the end."""

    @pytest.fixture
    def storage(self, database: dict[str, Any]) -> Iterator[JoinedSQLAlchemyStorage]:
        with database["engine"].connect() as conn:
            transaction = conn.begin()
            yield _joined(conn, database)
            assert transaction.is_active
            transaction.rollback()


class TestJoinedInsideAHostSession(StorageContract):
    """The sync contract inside one host session's transaction, rolled back at the end."""

    @pytest.fixture
    def storage(self, database: dict[str, Any]) -> Iterator[JoinedSQLAlchemyStorage]:
        with Session(database["engine"]) as session:
            session.begin()
            yield _joined(session, database)
            assert session.in_transaction()
            session.rollback()


class _OwnedHost(AsyncJoinedSQLAlchemyStorage):
    """The async joined storage with the host's part played by the test: closing it ends
    the host's transaction (rolled back), its connection and its engine."""

    async def close(self) -> None:
        await super().close()
        conn = self._host
        assert isinstance(conn, AsyncConnection)
        if conn.in_transaction():
            await conn.rollback()
        await conn.close()
        await conn.engine.dispose()


def _async_url(url: str) -> str:
    url = url.replace("sqlite://", "sqlite+aiosqlite://")
    return url.replace("mysql+pymysql://", "mysql+aiomysql://")


def _async_joined_factory(
    database: dict[str, Any], *, in_transaction: bool
) -> Callable[[], Awaitable[AsyncStorage]]:
    url = _async_url(database["url"])

    async def make() -> AsyncStorage:
        engine = create_async_engine(url, **database.get("options", {}))
        conn = await engine.connect()
        if in_transaction:
            await conn.begin()
        return _OwnedHost(conn, schema=database.get("schema"))

    return make


class TestAsyncJoinedOnAnIdleConnection(AsyncStorageContract):
    """The async contract on a host AsyncConnection with no transaction open."""

    @pytest.fixture
    def async_storage_factory(
        self, database: dict[str, Any]
    ) -> Callable[[], Awaitable[AsyncStorage]]:
        return _async_joined_factory(database, in_transaction=False)


class TestAsyncJoinedInsideAHostTransaction(AsyncStorageContract):
    """The async contract inside a host AsyncConnection's transaction, rolled back at
    the end of each test."""

    @pytest.fixture
    def async_storage_factory(
        self, database: dict[str, Any]
    ) -> Callable[[], Awaitable[AsyncStorage]]:
        return _async_joined_factory(database, in_transaction=True)


# -- state machines ---------------------------------------------------------------------

Databases = tuple[Callable[[], dict[str, Any]], Callable[[dict[str, Any]], None]]


@pytest.fixture(params=BACKENDS)
def machine_databases(request: pytest.FixtureRequest) -> Databases:
    """A new, migrated database per example (the engine's URL and options, and the
    storage's schema), and its removal."""
    if request.param == "sqlite":

        def new_file() -> dict[str, Any]:
            path = Path(tempfile.mkdtemp(prefix="dw-sqla-joined-")) / "m.db"
            return _migrated_once({"url": f"sqlite:///{path}"})

        return new_file, lambda database: None
    if request.param == "mariadb":
        server = request.getfixturevalue("mysql_url")

        def new_db() -> dict[str, Any]:
            url = create_database(server, new_database_name("sqlaj"))
            return _migrated_once(
                {
                    "url": url.render_as_string(hide_password=False),
                    "options": {"isolation_level": "READ COMMITTED"},
                }
            )

        def drop(database: dict[str, Any]) -> None:
            drop_database(server, make_url(database["url"]).database or "")

        return new_db, drop
    dsn = request.getfixturevalue("postgres_dsn")

    def new_schema() -> dict[str, Any]:
        url = dsn.replace("postgresql://", "postgresql+psycopg://", 1)
        return _migrated_once({"url": url, "schema": new_schema_name("sqlaj")})

    return new_schema, lambda database: drop_schema(dsn, database["schema"])


def _migrated_once(database: dict[str, Any]) -> dict[str, Any]:
    engine = create_engine(database["url"])
    try:
        migrate(engine, schema=database.get("schema"))
    finally:
        engine.dispose()
    return database


@pytest.mark.parametrize("mode", ["connection", "session"])
def test_storage_machine_in_host_transactions(machine_databases: Databases, mode: str) -> None:
    """The sync services over a storage joined to a host's Connection or Session, each
    call in a host transaction, agree with the reference model."""
    new, drop = machine_databases
    hosts: dict[int, tuple[Any, Any, dict[str, Any]]] = {}

    def make() -> Storage:
        database = new()
        engine = create_engine(database["url"], **database.get("options", {}))
        bind: Connection | Session = engine.connect() if mode == "connection" else Session(engine)
        store = SQLAlchemyStorage(bind, schema=database.get("schema"))
        hosts[id(store)] = (engine, bind, database)
        return store

    def teardown(store: Storage) -> None:
        engine, bind, database = hosts.pop(id(store))
        bind.close()
        engine.dispose()
        drop(database)

    machine = storage_machine(make, teardown)

    class InHostTransactions(machine):  # type: ignore[valid-type,misc]
        def _do(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            bind = hosts[id(self.storage)][1]
            bind.begin()
            try:
                return fn(*args, **kwargs)
            finally:
                bind.commit()  # the host's own work stays, the call refused or not

    run_state_machine_as_test(InHostTransactions, settings=MACHINE_SETTINGS)


@pytest.mark.parametrize("mode", ["connection", "session"])
def test_async_storage_machine_in_host_transactions(
    machine_databases: Databases, mode: str
) -> None:
    """The async services over a storage joined to a host's AsyncConnection or
    AsyncSession, each call in a host transaction, agree with the reference model."""
    new, drop = machine_databases
    hosts: dict[int, tuple[Any, Any, dict[str, Any]]] = {}

    async def make() -> AsyncStorage:
        database = new()
        engine = create_async_engine(_async_url(database["url"]), **database.get("options", {}))
        bind: AsyncConnection | AsyncSession
        bind = await engine.connect() if mode == "connection" else AsyncSession(engine)
        store = AsyncSQLAlchemyStorage(bind, schema=database.get("schema"))
        hosts[id(store)] = (engine, bind, database)
        return store

    async def teardown(store: AsyncStorage) -> None:
        engine, bind, database = hosts.pop(id(store))
        await asyncio.gather(*_sqlalchemy_io._RUNNING)
        await bind.close()
        await engine.dispose()
        drop(database)

    machine = async_storage_machine(make, teardown)

    class InHostTransactions(machine):  # type: ignore[valid-type,misc]
        def _do(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            bind = hosts[id(self.storage)][1]

            async def in_transaction() -> Any:
                await bind.begin()
                try:
                    return await fn(*args, **kwargs)
                finally:
                    await bind.commit()
                    # Deliveries run as tasks after the commit: let them end first.
                    await asyncio.gather(*_sqlalchemy_io._RUNNING)

            return self.loop.run_until_complete(in_transaction())

    run_state_machine_as_test(InHostTransactions, settings=MACHINE_SETTINGS)
