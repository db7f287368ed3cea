"""SQLAlchemy storage: the shared SQL engine on a SQLAlchemy engine, connection or session.

This file is the hand-written source; ``deepwork_retry/storage/_sync_sqlalchemy.py`` is
generated from it by ``scripts/unasync.py``. Import the public names from
:mod:`deepwork_retry.storage.sqlalchemy`.

The storage runs the operations of :mod:`deepwork_retry.storage._sql.engine`
(the same code as :class:`~deepwork_retry.storage.sqlite.SQLiteStorage`) with
an executor over ``Connection.exec_driver_sql``; the async storage runs that
same sync code through ``AsyncConnection.run_sync``. How each call's
transaction is begun, joined and ended is :mod:`._sqlalchemy_tx`.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy.exc

from deepwork_retry._core import effects
from deepwork_retry._core.events import Event, EventRetry
from deepwork_retry._core.inputs import check_limit
from deepwork_retry._core.model import (
    Attempt,
    DispatchEntry,
    IdempotencyRecord,
    Progress,
    Project,
    ProjectSummary,
    Task,
)
from deepwork_retry._core.plans import Applied, Plan, ProjectPlan
from deepwork_retry._core.retention import Pruned, PruneRule
from deepwork_retry._core.states import RetryBudget, TaskStatus
from deepwork_retry.exceptions import (
    DeepworkError,
    InvalidInput,
    StorageError,
    StorageUnavailable,
    VersionConflict,
)
from deepwork_retry.storage import _sqlalchemy_tx as tx
from deepwork_retry.storage._sql.engine import all_text
from deepwork_retry.storage._sqlalchemy_io import (
    AsyncBridge,
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
)
from deepwork_retry.storage._sqlalchemy_sql import (
    Bound,
    Refused,
    bound_to,
    check_schema,
    migrate_schema,
)

T = TypeVar("T")

FAILURES = (sqlalchemy.exc.SQLAlchemyError, OverflowError, UnicodeEncodeError)
"""What the driver and SQLAlchemy raise that :meth:`AsyncSQLAlchemyStorage._translated`
turns into library errors."""

__all__ = ["AsyncJoinedSQLAlchemyStorage", "AsyncSQLAlchemyStorage"]


class AsyncSQLAlchemyStorage:
    """An :class:`~deepwork_retry.ports.AsyncStorage` on a SQLAlchemy ``AsyncEngine``, or
    joined to the host's ``AsyncConnection`` / ``AsyncSession``.

    Given an engine, each call takes a connection from its pool and runs in a
    transaction of its own. Given a connection or a session (the class is then
    :class:`AsyncJoinedSQLAlchemyStorage`), each call runs inside the host's
    open transaction, in a savepoint, and never commits it (see there).

    SQLite (``sqlite+aiosqlite``), MySQL/MariaDB (``mysql+aiomysql``,
    ``mysql+asyncmy``) and PostgreSQL (``postgresql+psycopg`` only) are
    supported. ``migrate=True`` (with an engine) applies the schema's pending
    migrations on first use; otherwise the schema must be migrated already
    (``StorageMissing`` names what is missing). ``dispose=True`` disposes
    the engine on :meth:`close` (:meth:`from_url` sets it: the engine is the
    storage's own). ``schema`` names the PostgreSQL schema of the tables
    (``deepwork`` by default); on SQLite and MySQL they live in the database given.
    """

    def __new__(cls, bind: Any, **kwargs: Any) -> AsyncSQLAlchemyStorage:
        if cls is AsyncSQLAlchemyStorage and isinstance(bind, (AsyncConnection, AsyncSession)):
            cls = AsyncJoinedSQLAlchemyStorage
        return super().__new__(cls)

    def __init__(
        self,
        bind: AsyncEngine | AsyncConnection | AsyncSession,
        *,
        migrate: bool = True,
        dispose: bool = False,
        schema: str | None = None,
    ) -> None:
        if isinstance(bind, AsyncEngine):
            self._engine = bind
        elif isinstance(bind, (AsyncConnection, AsyncSession)):
            self._engine = AsyncBridge.engine_of(bind)
            migrate = False  # never DDL inside the host's transaction
        else:
            raise InvalidInput(
                "AsyncSQLAlchemyStorage needs an AsyncEngine, AsyncConnection or "
                f"AsyncSession, not {type(bind).__name__}"
            )
        self._bound: Bound = bound_to(AsyncBridge.sync_engine(self._engine), schema)
        self._migrate = migrate
        self._dispose = dispose
        self._ready = False
        self._closed = False
        self._retry = self._bound.engine.retry_sql(effects.MANUAL_RETRY)

    @classmethod
    def from_url(
        cls, url: str, *, migrate: bool = True, schema: str | None = None, **engine_options: Any
    ) -> AsyncSQLAlchemyStorage:
        """A storage on an engine of its own for ``url`` (``engine_options`` go to
        SQLAlchemy's ``create_async_engine``), disposed on :meth:`close`."""
        engine = AsyncBridge.create_engine(url, **engine_options)
        return cls(engine, migrate=migrate, dispose=True, schema=schema)

    # -- transactions ------------------------------------------------------------------------
    def _translated(
        self, exc: Exception, conflict: Callable[[], VersionConflict] | None = None
    ) -> Exception:
        """The one place driver and SQLAlchemy errors (:data:`FAILURES`) become library
        errors; the caller raises it ``from`` the original. ``conflict`` builds the error
        of a transaction the database aborted to resolve a deadlock, for a write whose
        caller decides again on it."""
        if isinstance(exc, (sqlalchemy.exc.DBAPIError, OverflowError, UnicodeEncodeError)):
            return self._bound.translated(exc, conflict)
        if isinstance(exc, sqlalchemy.exc.TimeoutError):
            return StorageUnavailable(f"{self!r}: no connection free in the pool: {exc}")
        return StorageError(f"{self!r} failed: {exc}")

    async def open(self) -> None:
        """Migrate (or check) the schema now rather than on first use."""
        if self._closed:
            raise StorageUnavailable(f"{self!r} is closed")
        if self._ready:
            return
        try:
            async with AsyncBridge.connect(self._engine) as conn:
                if self._migrate:
                    await AsyncBridge.run(conn, migrate_schema, self._bound)
                else:
                    await AsyncBridge.run(conn, check_schema, self._bound)
        except FAILURES as exc:
            raise self._translated(exc) from exc
        self._ready = True

    async def _run(
        self,
        write: bool,
        op: Callable[..., T],
        *args: Any,
        conflict: Callable[[], VersionConflict] | None = None,
        **kwargs: Any,
    ) -> T:
        """``op(executor, *args, **kwargs)`` in a transaction of the storage's own (a
        deadlock there is ``conflict()`` when given, see :meth:`_translated`)."""
        if not self._ready:
            await self.open()
        body = functools.partial(self._bound.call, op, args, kwargs)
        try:
            async with AsyncBridge.connect(self._engine) as conn:
                result: T = await AsyncBridge.run(conn, tx.own, self._bound.kind, write, body)
                return result
        except FAILURES as exc:
            raise self._translated(exc, conflict) from exc

    async def _write(
        self,
        op: Callable[..., T],
        *args: Any,
        conflict: Callable[[], VersionConflict] | None = None,
        **kwargs: Any,
    ) -> T:
        return await self._run(True, op, *args, conflict=conflict, **kwargs)

    async def _read(self, op: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self._run(False, op, *args, **kwargs)

    # -- setup ------------------------------------------------------------------------
    async def create_project(self, project: Project) -> None:
        await self._write(self._bound.engine.create_project, project)

    async def add_tasks(self, tasks: Sequence[Task]) -> None:
        await self._write(self._bound.engine.add_tasks, tasks)

    # -- reads ------------------------------------------------------------------------
    async def get_project(self, project_id: str) -> Project:
        return await self._read(self._bound.engine.get_project, project_id)

    async def load(self, project_id: str, task_id: str) -> tuple[Project, Task]:
        return await self._read(self._bound.engine.load, project_id, task_id)

    async def get_tasks(self, project_id: str, task_ids: Sequence[str]) -> dict[str, Task]:
        return await self._read(self._bound.engine.get_tasks, project_id, task_ids)

    async def dependants(self, project_id: str, task_id: str) -> list[Task]:
        return await self._read(self._bound.engine.dependants, project_id, task_id)

    async def list_tasks(
        self,
        project_id: str,
        *,
        status: TaskStatus | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[Task]:
        check_limit(limit)
        return await self._read(
            self._bound.engine.list_tasks, project_id, status=status, after=after, limit=limit,
            after_bound=self._bound.after_bound,
        )  # fmt: skip

    async def progress(self, project_id: str) -> Progress:
        return await self._read(self._bound.engine.progress, project_id)

    # -- reads across projects (the ProjectOverview port) --------------------------------
    async def list_projects(
        self,
        *,
        projects: frozenset[str] | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[ProjectSummary]:
        """Projects by id with their progress, in one statement."""
        check_limit(limit)
        return await self._read(
            self._bound.engine.list_projects, projects=projects, after=after, limit=limit,
            after_bound=self._bound.after_bound,
        )  # fmt: skip

    async def blocked_tasks(
        self,
        *,
        projects: frozenset[str] | None = None,
        error_type: str | None = None,
        after: tuple[str, str] | None = None,
        limit: int = 100,
    ) -> list[Task]:
        """Blocked tasks across projects by ``(project_id, id)``, from the index of
        blocked tasks, in one statement."""
        check_limit(limit)
        return await self._read(
            self._bound.engine.blocked_tasks, projects=projects, error_type=error_type,
            after=after, limit=limit, after_bound=self._bound.after_bound,
        )  # fmt: skip

    async def attempts(self, project_id: str, task_id: str) -> list[Attempt]:
        return await self._read(self._bound.engine.attempts, project_id, task_id)

    async def dispatches(self, project_id: str, task_id: str) -> list[DispatchEntry]:
        return await self._read(self._bound.engine.dispatches, project_id, task_id)

    async def deferred(self, project_id: str) -> list[DispatchEntry]:
        return await self._read(self._bound.engine.deferred, project_id)

    # -- writes ------------------------------------------------------------------------
    async def apply(self, plan: Plan) -> Applied:
        params = self._bound.engine.plan_params(plan)
        before = plan.before
        return await self._write(
            self._bound.engine.apply, plan, params,
            conflict=lambda: VersionConflict(before.id, before.version, None),
        )  # fmt: skip

    async def apply_project(self, plan: ProjectPlan) -> tuple[Project, list[DispatchEntry]]:
        params = self._bound.engine.project_params(plan)
        before = plan.before
        return await self._write(
            self._bound.engine.apply_project, plan, params,
            conflict=lambda: VersionConflict(before.id, before.version, None),
        )  # fmt: skip

    async def retry_blocked(
        self,
        project_id: str,
        task_id: str,
        *,
        now: datetime,
        actor: str | None = None,
        reason: str | None = None,
        budget: RetryBudget = RetryBudget.ONE_MORE,
        claimed_until: datetime | None = None,
        idempotency_key: str | None = None,
        idempotency_expires_at: datetime | None = None,
        trace: str | None = None,
    ) -> Applied | None:
        """The manual retry in one transaction (the optional
        :class:`~deepwork_retry.ports.RetryInOneStep` capability), or ``None`` with
        nothing changed when it cannot be made so; the service then takes the
        step-by-step path, which raises the core's own error. Its events are written
        in the same transaction; ``trace`` goes on the outbox entry."""
        if not all_text(project_id, task_id):
            return None
        traced = {} if trace is None else {"trace": trace}
        try:
            return await self._write(
                self._bound.one_step, self._retry, project_id, task_id, now=now, actor=actor,
                reason=reason, budget=RetryBudget(budget), claimed_until=claimed_until,
                idempotency_key=idempotency_key, idempotency_expires_at=idempotency_expires_at,
                conflict=lambda: VersionConflict(task_id, 0, None), **traced,
            )  # fmt: skip
        except Refused:
            return None
        except StorageError:
            raise
        except DeepworkError:
            return None  # rolled back; the general path raises it again

    # -- outbox ------------------------------------------------------------------------
    async def claim_due(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[DispatchEntry]:
        check_limit(limit)
        return await self._write(
            self._bound.engine.claim_due, now=now, limit=limit, claimed_until=claimed_until
        )

    async def mark_delivered(self, entries: Sequence[DispatchEntry], *, now: datetime) -> None:
        await self._write(self._bound.engine.mark_delivered, entries, now=now)

    async def mark_failed(
        self,
        entry: DispatchEntry,
        *,
        error: str,
        retry_at: datetime,
        now: datetime | None = None,
    ) -> None:
        """Release the claim and write the ``dispatch.failed`` event (at ``now``, by default
        the wall clock) in the same transaction."""
        at: dict[str, Any] = {} if now is None else {"now": now}
        await self._write(
            self._bound.engine.mark_failed, entry, error=error, retry_at=retry_at, **at
        )

    async def redeliver_stale(
        self, *, now: datetime, delivered_before: datetime, limit: int
    ) -> list[DispatchEntry]:
        check_limit(limit)
        return await self._write(
            self._bound.engine.redeliver_stale,
            now=now,
            delivered_before=delivered_before,
            limit=limit,
        )

    # -- lifecycle events (the EventLog capability) ------------------------------------
    async def events(self, project_id: str, *, after: int = 0, limit: int = 100) -> list[Event]:
        check_limit(limit)
        return await self._read(self._bound.engine.events, project_id, after=after, limit=limit)

    async def claim_events(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[Event]:
        """A write: claimers take turns (SQLite's write lock, MySQL's writer turn), so
        each task's events are handed out in order."""
        check_limit(limit)
        return await self._write(
            self._bound.engine.claim_events, now=now, limit=limit, claimed_until=claimed_until
        )

    async def settle_events(
        self, events: Sequence[Event], *, now: datetime, failures: Sequence[EventRetry] = ()
    ) -> None:
        await self._write(self._bound.engine.settle_events, events, now=now, failures=failures)

    async def claim_event_retries(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[EventRetry]:
        check_limit(limit)
        return await self._write(
            self._bound.engine.claim_event_retries,
            now=now,
            limit=limit,
            claimed_until=claimed_until,
        )

    async def settle_event_retry(
        self,
        retry: EventRetry,
        *,
        now: datetime,
        error: str | None = None,
        retry_at: datetime | None = None,
    ) -> None:
        await self._write(
            self._bound.engine.settle_event_retry, retry, now=now, error=error, retry_at=retry_at
        )

    async def parked_events(
        self, *, subscriber: str | None = None, limit: int = 100
    ) -> list[EventRetry]:
        check_limit(limit)
        return await self._read(
            self._bound.engine.parked_events, subscriber=subscriber, limit=limit
        )

    async def replay_parked(
        self,
        *,
        now: datetime,
        subscriber: str | None = None,
        event_ids: Sequence[str] | None = None,
    ) -> int:
        return await self._write(
            self._bound.engine.replay_parked, now=now, subscriber=subscriber, event_ids=event_ids
        )

    # -- leases ------------------------------------------------------------------------
    async def expired_leases(self, *, now: datetime, limit: int) -> list[Task]:
        check_limit(limit)
        return await self._read(self._bound.engine.expired_leases, now=now, limit=limit)

    # -- idempotency ------------------------------------------------------------------------
    async def get_idempotency(
        self, key: str, *, now: datetime | None = None
    ) -> IdempotencyRecord | None:
        record = await self._read(self._bound.engine.get_idempotency, key)
        if record is not None and now is not None and record.expired(now):
            return None
        return record

    async def save_idempotency(self, record: IdempotencyRecord) -> IdempotencyRecord:
        return await self._write(self._bound.engine.save_idempotency, record)

    # -- retention ------------------------------------------------------------------------
    async def prune(self, rule: PruneRule) -> Pruned:
        """One batch per table of what ``rule`` removes, each its own write transaction."""
        if self._bound.kind == "postgresql":
            postgres: Any = self._bound.engine  # PostgresOps: the PostgreSQL storage prunes
            pruned: Pruned = await self._write(postgres.prune, rule)
            return pruned
        counts = []
        for statement, params in self._bound.engine.prune_statements(rule):
            if params is None:
                counts.append(0)
                continue
            counts.append(await self._write(self._bound.rowcount, statement, params))
        return self._bound.engine.pruned(counts)

    # -- lifetime ------------------------------------------------------------------------
    async def close(self) -> None:
        """Refuse later calls; dispose of the engine when it is the storage's own."""
        if self._closed:
            return
        self._closed = True
        self._ready = False
        if self._dispose:
            await AsyncBridge.dispose(self._engine)

    async def __aenter__(self) -> AsyncSQLAlchemyStorage:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._bound.where})"


class AsyncJoinedSQLAlchemyStorage(AsyncSQLAlchemyStorage):
    """The storage joined to the host's ``AsyncConnection`` or ``AsyncSession``
    (an :class:`~deepwork_retry.ports.AsyncJoinsHostTransaction`).

    Built by ``AsyncSQLAlchemyStorage(connection_or_session)``. While the host
    has a transaction open, each call runs inside it, in a savepoint released
    on success and rolled back on failure (so a refused retry leaves the
    host's transaction usable); the host commits or rolls back, never the
    storage. Calls on the host's connection take turns (one at a time). With
    no transaction open, and for the calls of after-commit callbacks, a call
    takes a short transaction of its own on the engine.
    The schema must be migrated already (never DDL in the host's transaction).
    """

    def __init__(
        self,
        bind: AsyncEngine | AsyncConnection | AsyncSession,
        *,
        migrate: bool = False,
        dispose: bool = False,
        schema: str | None = None,
    ) -> None:
        if not isinstance(bind, (AsyncConnection, AsyncSession)):
            raise InvalidInput(
                f"{type(self).__name__} needs an AsyncConnection or AsyncSession, "
                f"not {type(bind).__name__}"
            )
        super().__init__(bind, migrate=False, dispose=False, schema=schema)
        self._host = bind
        self._last_savepoint = 0
        self._isolation_checked: set[int] = set()
        self._callbacks = tx.AfterCommit(AsyncBridge.call)
        self._turn = AsyncBridge.lock()
        """Calls on the host's connection take turns: a connection runs one at a time."""
        if isinstance(bind, AsyncSession):
            self._callbacks.hook_session(AsyncBridge.sync_session(bind))

    def _in_host_transaction(self) -> bool:
        return not tx.AFTER_COMMIT.get() and self._host.in_transaction()

    async def _run(
        self,
        write: bool,
        op: Callable[..., T],
        *args: Any,
        conflict: Callable[[], VersionConflict] | None = None,
        **kwargs: Any,
    ) -> T:
        if not self._in_host_transaction():
            return await super()._run(write, op, *args, conflict=conflict, **kwargs)
        if not self._ready:
            await self.open()
        body = functools.partial(self._bound.call, op, args, kwargs)
        try:
            async with self._turn:
                conn = await AsyncBridge.host_connection(self._host)
                joined: tuple[T, int] = await AsyncBridge.run(
                    conn, tx.joined, self._bound.kind, write, body, self._isolation_checked
                )
        except FAILURES as exc:
            # MySQL ends the whole transaction on a deadlock, the host's work with it:
            # no conflict to decide again in there, the host must hear of it.
            mine = conflict if self._bound.kind != "mysql" else None
            raise self._translated(exc, mine) from exc
        self._last_savepoint = joined[1]
        return joined[0]

    def after_commit(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` once the host's transaction commits, and never if it rolls
        back (or a savepoint of the host around the storage's last call does); at
        once when no host transaction is open."""
        if not self._in_host_transaction():
            AsyncBridge.call(callback)
            return
        self._callbacks.hook_connection(
            AsyncBridge.sync_host_connection(self._host),
            commits=isinstance(self._host, AsyncConnection),
        )
        self._callbacks.add(callback, self._last_savepoint)

    async def close(self) -> None:
        """Refuse later calls; the host's connection, session and engine stay open."""
        self._closed = True
        self._ready = False
