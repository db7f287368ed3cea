"""The shipped conformance suite on the SQLAlchemy storage joined to a host's
``Connection`` and ``Session`` (and, async, ``AsyncConnection``), on SQLite,
MariaDB and PostgreSQL.

Two modes: the host's connection with no transaction open (each call then runs
in a transaction of its own), and a host transaction held open for the whole
test (each call then runs in it, within a savepoint), rolled back at the end.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mysql_support import database_dropped_after
from pg_support import schema_dropped_after
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.orm import Session

from deepwork_retry.ports import AsyncStorage
from deepwork_retry.storage.sqlalchemy import (
    AsyncJoinedSQLAlchemyStorage,
    JoinedSQLAlchemyStorage,
    SQLAlchemyStorage,
    migrate,
)
from deepwork_retry.testing import AsyncStorageContract, StorageContract


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("mariadb", marks=pytest.mark.mysql),
        pytest.param("postgresql", marks=pytest.mark.postgres),
    ]
)
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


def _async_joined_factory(
    database: dict[str, Any], *, in_transaction: bool
) -> Callable[[], Awaitable[AsyncStorage]]:
    url = database["url"].replace("sqlite://", "sqlite+aiosqlite://")
    url = url.replace("mysql+pymysql://", "mysql+aiomysql://")

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
