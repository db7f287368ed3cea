"""What differs between the sync and async SQLAlchemy APIs, under names that line up.

``storage/_async_sqlalchemy.py`` is written against the ``Async…`` names here;
its generated sync twin (``scripts/unasync.py`` drops the prefix) gets the
sync ones: the same methods, without ``await``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any, TypeVar

import sqlalchemy
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from deepwork_retry.storage._sqlalchemy_tx import AFTER_COMMIT

T = TypeVar("T")
_LOG = logging.getLogger("deepwork_retry")

__all__ = [
    "AsyncBridge",
    "AsyncConnection",
    "AsyncEngine",
    "AsyncSession",
    "Bridge",
    "Connection",
    "Engine",
    "Session",
]


class Bridge:
    """The sync API: a ``Connection`` is used as it is."""

    @staticmethod
    def connect(engine: Engine) -> AbstractContextManager[Connection]:
        return engine.connect()

    @staticmethod
    def run(conn: Connection, fn: Callable[..., T], /, *args: Any) -> T:
        return fn(conn, *args)

    @staticmethod
    def host_connection(host: Connection | Session) -> Connection:
        return host if isinstance(host, Connection) else host.connection()

    @staticmethod
    def sync_engine(engine: Engine) -> Engine:
        return engine

    @staticmethod
    def engine_of(host: Connection | Session) -> Engine:
        bind = host.get_bind() if isinstance(host, Session) else host
        return bind.engine

    @staticmethod
    def sync_host_connection(host: Connection | Session) -> Connection:
        """The host's connection (a session's, for its current transaction)."""
        return host if isinstance(host, Connection) else host.connection()

    @staticmethod
    def create_engine(url: str, **options: Any) -> Engine:
        return sqlalchemy.create_engine(url, **options)

    @staticmethod
    def sync_session(session: Session) -> Session:
        return session

    @staticmethod
    def call(callback: Callable[[], None]) -> None:
        """Run an after-commit callback now; its error stays its own."""
        try:
            callback()
        except Exception:  # noqa: BLE001 - the host's commit stands; the relay retries
            _LOG.exception("deepwork_retry: a callback after the host's commit failed")

    @staticmethod
    def dispose(engine: Engine) -> None:
        engine.dispose()

    @staticmethod
    def lock() -> threading.Lock:
        return threading.Lock()


class AsyncBridge:
    """The async API: sync code runs on ``AsyncConnection.run_sync``'s connection."""

    @staticmethod
    def connect(engine: AsyncEngine) -> AbstractAsyncContextManager[AsyncConnection]:
        return engine.connect()

    @staticmethod
    async def run(conn: AsyncConnection, fn: Callable[..., T], /, *args: Any) -> T:
        return await conn.run_sync(fn, *args)

    @staticmethod
    async def host_connection(host: AsyncConnection | AsyncSession) -> AsyncConnection:
        return host if isinstance(host, AsyncConnection) else await host.connection()

    @staticmethod
    def sync_engine(engine: AsyncEngine) -> Engine:
        return engine.sync_engine

    @staticmethod
    def engine_of(host: AsyncConnection | AsyncSession) -> AsyncEngine:
        if isinstance(host, AsyncConnection):
            return host.engine
        bind = host.sync_session.get_bind()
        return AsyncEngine(bind.engine)

    @staticmethod
    def sync_host_connection(host: AsyncConnection | AsyncSession) -> Connection:
        """The host's connection (a session's, for its current transaction, which has
        one already: a call of the storage ran in it)."""
        if isinstance(host, AsyncConnection):
            return host.sync_connection  # type: ignore[return-value]
        return host.sync_session.connection()

    @staticmethod
    def create_engine(url: str, **options: Any) -> AsyncEngine:
        return create_async_engine(url, **options)

    @staticmethod
    def sync_session(session: AsyncSession) -> Session:
        return session.sync_session

    @staticmethod
    def call(callback: Callable[[], Awaitable[None]]) -> None:
        """Schedule an after-commit coroutine on the running loop; the task is kept
        referenced until it ends, and its calls take their own transactions."""

        async def run() -> None:
            AFTER_COMMIT.set(True)  # in this task's own context
            try:
                await callback()
            except Exception:  # noqa: BLE001 - the host's commit stands; the relay retries
                _LOG.exception("deepwork_retry: a callback after the host's commit failed")

        task = asyncio.get_running_loop().create_task(run())
        _RUNNING.add(task)
        task.add_done_callback(_RUNNING.discard)

    @staticmethod
    async def dispose(engine: AsyncEngine) -> None:
        await engine.dispose()

    @staticmethod
    def lock() -> asyncio.Lock:
        return asyncio.Lock()


_RUNNING: set[asyncio.Task[None]] = set()
