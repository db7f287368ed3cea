"""PostgreSQL storage on psycopg 3 and its connection pool.

This file is the hand-written source; ``deepwork_retry/storage/_sync_postgres.py`` is
generated from it by ``scripts/unasync.py``. Import the public names from
:mod:`deepwork_retry.storage.postgres`.

Every method is one statement (or one transaction) on an autocommit
connection from the pool. :meth:`AsyncPostgresStorage.apply` is a single
statement: its common table expressions lock and check the task, the guards
and the project, then write the task, the attempt records, the outbox entry,
the releases, the progress counters and the idempotency key, and return the
task and the progress. :meth:`AsyncPostgresStorage.retry_blocked` goes one
step further for the manual retry: one statement loads, decides and applies
it, so the service's retry costs one round trip in all.

:class:`AsyncJoinedPostgresStorage` runs the same statements on a connection
of the host's, inside the host's transaction (see
:meth:`AsyncPostgresStorage.joining`).

A project's counters are kept in a few rows, its stripes
(:data:`~deepwork_retry.storage._postgres_sql.STRIPES`): each task's moves
change its own stripe, and readers sum them. The progress a move returns is
its task's stripe as changed plus the other stripes as of the statement's
snapshot.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, cast

import psycopg
from psycopg import AsyncConnection, AsyncCursor, AsyncRawCursor, AsyncTransaction
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow, tuple_row
from psycopg_pool import AsyncConnectionPool

from deepwork_retry._async._compat import Event, Lock, start_soon, wait_or_stop
from deepwork_retry._core import events as ev
from deepwork_retry._core.events import Event as LifecycleEvent
from deepwork_retry._core.events import EventRetry
from deepwork_retry._core.inputs import check_blocked_page, check_limit, check_projects_page
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
from deepwork_retry._wiring import not_opened
from deepwork_retry.exceptions import (
    AlreadyExists,
    ConfigurationError,
    IdempotencyConflict,
    InvalidInput,
    ProjectNotFound,
    StorageMissing,
    StorageUnavailable,
    TaskNotFound,
    VersionConflict,
)
from deepwork_retry.ports import REDELIVERED
from deepwork_retry.storage import _postgres_sql as q
from deepwork_retry.storage._sql import common
from deepwork_retry.storage._validate import check_new_tasks

log = logging.getLogger("deepwork_retry")

_Conn = AsyncConnection[TupleRow]
_Pool = AsyncConnectionPool[AsyncConnection[TupleRow]]

_HOT = "_deepwork_retry_hot"
"""The attribute under which a connection keeps its :class:`_Hot` state."""


class _Hot:
    """What one connection keeps for the hot statements: those it has prepared,
    and the cursor that runs them (it holds the connection, so it is kept on
    the connection itself and goes with it)."""

    __slots__ = ("cursor", "prepared")

    def __init__(self, cursor: AsyncRawCursor[TupleRow]) -> None:
        self.cursor = cursor
        self.prepared: set[bytes] = set()


def _declined() -> VersionConflict:
    return VersionConflict("", 0, None)


_DECLINE = q.DriverErrors(_declined)
"""Driver errors of the one-step retry; a deadlock or a serialisation failure
becomes a :class:`VersionConflict`, on which the retry declines."""


async def migrate(conninfo: str, *, schema: str = q.DEFAULT_SCHEMA) -> list[int]:
    """Apply the pending migrations to ``schema``; returns the numbers applied.

    Safe to run from several processes at once: an advisory lock serialises
    them, and each applies what the previous ones left pending.
    """
    queries = q.Queries(schema)
    async with q.DriverErrors(), await AsyncConnection.connect(conninfo, autocommit=True) as conn:
        return await _migrate(conn, queries)


async def check_migrated(
    conninfo: str, *, schema: str = q.DEFAULT_SCHEMA, connect_timeout: float = 5.0
) -> None:
    """Check that ``schema`` exists and has every migration, creating nothing.

    Raises :class:`~deepwork_retry.exceptions.StorageMissing` naming what is
    missing (run :func:`migrate`), or
    :class:`~deepwork_retry.exceptions.StorageUnavailable` when the server
    cannot be reached within ``connect_timeout`` seconds.
    """
    queries = q.Queries(schema)
    timeout = max(1, round(connect_timeout))
    async with (
        q.DriverErrors(),
        await AsyncConnection.connect(conninfo, autocommit=True, connect_timeout=timeout) as conn,
    ):
        cur = await conn.execute(queries.schema_present, (schema, f"{schema}.schema_migrations"))
        row = await cur.fetchone()
        if row is None or not row[0]:
            raise StorageMissing(f"PostgreSQL schema {schema!r} does not exist")
        if not row[1]:
            raise StorageMissing(f"PostgreSQL schema {schema!r} has no deepwork_retry tables")
        cur = await conn.execute(queries.applied_migrations)
        done = {number for (number,) in await cur.fetchall()}
    pending = common.pending(q.migrations(), done)
    if pending:
        lacks = ", ".join(m.file.removesuffix(".sql") for m in pending)
        raise StorageMissing(f"PostgreSQL schema {schema!r} lacks migrations {lacks}")


async def _migrate(conn: _Conn, queries: q.Queries) -> list[int]:
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute(queries.lock, (q.LOCK_CLASS, queries.schema))
        await conn.execute(queries.bootstrap)
        cur = await conn.execute(queries.applied_migrations)
        done = {row[0] for row in await cur.fetchall()}
        for migration in common.pending(q.migrations(), done):
            await conn.execute(queries.search_path)
            await conn.execute(migration.text.encode("utf-8"))
            await conn.execute(queries.record_migration, (migration.number, migration.name))
            applied.append(migration.number)
    return applied


class AsyncPostgresStorage:
    """A :class:`~deepwork_retry.ports.AsyncStorage` in one PostgreSQL schema.

    Open it inside the event loop that will use it (``await storage.open()``
    or ``async with``): the pool's connections belong to that loop.
    """

    _relaxed_outbox = True
    """Outbox claims and delivery marks commit without waiting for the WAL flush
    (see ``_RELAX`` in ``_postgres_sql``); never in a host's transaction."""

    def __init__(
        self,
        conninfo: str,
        *,
        schema: str = q.DEFAULT_SCHEMA,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 5.0,
        statement_timeout_ms: int | None = 10_000,
        migrate: bool = True,
    ) -> None:
        self._statement_timeout = "0" if statement_timeout_ms is None else str(statement_timeout_ms)
        pool: _Pool = AsyncConnectionPool(
            conninfo,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            open=False,
            kwargs={"autocommit": True, "connect_timeout": max(2, round(timeout))},
            configure=self._configure,
            check=self._check,
            name=f"deepwork_retry.{schema}",
        )
        self._setup(pool, schema, owns_pool=True, migrate=migrate)
        q.open_async_now(self.open)

    @classmethod
    def from_pool(cls, pool: _Pool, *, schema: str = q.DEFAULT_SCHEMA) -> AsyncPostgresStorage:
        """A storage over a pool the host opens, configures and closes.

        Closing the storage leaves the pool open. Each call commits its own
        work, whether the pool's connections are in autocommit mode or not;
        to join a transaction of the host, use :meth:`joining` on the
        connection that holds it. The schema must be migrated (:func:`migrate`).
        """
        storage = cls.__new__(cls)
        storage._setup(pool, schema, owns_pool=False, migrate=False)
        return storage

    @classmethod
    def joining(
        cls, connection: AsyncConnection[Any], *, schema: str = q.DEFAULT_SCHEMA
    ) -> AsyncJoinedPostgresStorage:
        """A storage on the host's own ``connection``, inside the host's transaction.

        Every call runs on ``connection``: in the host's current transaction
        when one is open (within a savepoint, so a call that fails leaves the
        transaction usable), else in a transaction of its own. The storage
        never commits or rolls back the host's transaction. See
        :class:`AsyncJoinedPostgresStorage`. The schema must be migrated
        (:func:`migrate`).
        """
        return AsyncJoinedPostgresStorage(connection, schema=schema)

    def _setup(self, pool: _Pool, schema: str, *, owns_pool: bool, migrate: bool) -> None:
        self._q = q.Queries(schema)
        self.schema = schema
        self.pool = pool
        self._owns_pool = owns_pool
        self._migrate = migrate
        self._opened = not owns_pool
        self._closed = False
        self._listener: _Conn | None = None

    async def _configure(self, conn: _Conn) -> None:
        await conn.execute(self._q.configure, (self._statement_timeout,))

    async def _check(self, conn: _Conn) -> None:
        """The pool's check before it lends ``conn``: a dead connection is never lent.

        A round trip only when the server has spoken to the idle connection
        (:func:`~deepwork_retry.storage._postgres_sql.server_spoke`), so a
        healthy request costs nothing more. A server that ended one
        connection most likely ended its siblings too (a restart, a
        ``pg_terminate_backend`` of them all): the pool's idle connections are
        then checked at once, so the pool lends a live one next instead of
        trying the dead ones in turn, with a growing pause after each.
        """
        if not q.server_spoke(conn):
            return
        try:
            await AsyncConnectionPool.check_connection(conn)
        except Exception:
            await self.pool.check()
            raise

    # -- lifecycle -----------------------------------------------------------
    async def open(self) -> None:
        """Open the pool and, unless told not to, migrate the schema."""
        if self._opened:
            return
        async with q.DriverErrors():
            await self.pool.open(wait=False)
        try:
            if self._migrate:
                async with q.DriverErrors(), self.pool.connection() as conn:
                    await _migrate(conn, self._q)
        except BaseException:
            await self.pool.close()
            raise
        self._opened = True
        self._closed = False

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.close()
        if self._owns_pool:
            await self.pool.close()
            self._opened = False
            self._closed = True

    async def __aenter__(self) -> AsyncPostgresStorage:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _unopened(self) -> StorageUnavailable:
        """The error for a call while the pool is not open: closed, or never opened."""
        if not self._owns_pool:
            return not_opened(self, "await pool.open()", name=f"{type(self).__name__}'s pool")
        if self._closed:
            return StorageUnavailable(f"{type(self).__name__} is closed")
        return not_opened(self, "await storage.open()")

    @asynccontextmanager
    async def _connection(self, conflict: VersionConflict | None = None) -> AsyncIterator[_Conn]:
        if not self._opened or self.pool.closed:
            raise self._unopened()
        errors = q.DriverErrors(None if conflict is None else lambda: conflict)
        async with errors, self.pool.connection() as conn:
            yield conn

    async def _one(
        self, query: bytes, params: Any, conflict: VersionConflict | None = None
    ) -> tuple[Any, ...] | None:
        async with self._connection(conflict) as conn:
            cur = await conn.execute(query, params)
            return await cur.fetchone()

    async def _write(
        self, query: bytes, params: Any, conflict: VersionConflict
    ) -> tuple[Any, ...] | None:
        async with self._connection(conflict) as conn:
            cur = await _execute_pipelined(conn, query, params)
            return await cur.fetchone()

    async def _all(self, query: bytes, params: Any) -> list[tuple[Any, ...]]:
        async with self._connection() as conn:
            cur = await conn.execute(query, params)
            return await cur.fetchall()

    async def _rows_changed(self, query: bytes, params: Any) -> int:
        """Run a statement that returns no rows; how many rows it changed."""
        async with self._connection() as conn:
            cur = await conn.execute(query, params)
            return max(cur.rowcount, 0)

    # -- setup ---------------------------------------------------------------
    async def create_project(self, project: Project) -> None:
        row = await self._one(self._q.create_project, q.project_params(project))
        if row is None:
            raise AlreadyExists(f"Project {project.id!r} exists already")

    async def add_tasks(self, tasks: Sequence[Task]) -> None:
        check_new_tasks(tasks)
        if not tasks:
            return
        params = [q.new_task_params(task) for task in tasks]
        project_ids = sorted({task.project_id for task in tasks})
        deltas = q.progress_deltas(tasks)
        async with self._connection() as conn, conn.transaction():
            cur = await conn.execute(self._q.existing_projects, (project_ids,))
            projects = {row[0] for row in await cur.fetchall()}
            cur = await conn.execute(
                self._q.existing_tasks,
                ([t.project_id for t in tasks], [t.id for t in tasks]),
            )
            existing = {(row[0], row[1]) for row in await cur.fetchall()}
            for task in tasks:
                if task.project_id not in projects:
                    raise ProjectNotFound(task.project_id)
                if (task.project_id, task.id) in existing:
                    raise AlreadyExists(f"Task {task.id!r} exists already in {task.project_id!r}")
            async with conn.cursor() as cur:
                await cur.executemany(self._q.insert_task, params)
            await conn.execute(self._q.add_progress, deltas)
            await conn.execute(self._q.add_events, q.added_params(tasks))

    # -- reads ---------------------------------------------------------------
    async def get_project(self, project_id: str) -> Project:
        if not q.findable(project_id):
            raise ProjectNotFound(project_id)
        row = await self._one(self._q.get_project, (project_id,))
        if row is None:
            raise ProjectNotFound(project_id)
        return q.decode_project(row)

    async def load(self, project_id: str, task_id: str) -> tuple[Project, Task]:
        if not q.findable(project_id):
            raise ProjectNotFound(project_id)
        if not q.findable(task_id):
            await self.get_project(project_id)
            raise TaskNotFound(project_id, task_id)
        row = await self._one(self._q.load, {"pid": project_id, "tid": task_id})
        if row is None:
            raise ProjectNotFound(project_id)
        if row[len(q.PROJECT_COLS)] is None:
            raise TaskNotFound(project_id, task_id)
        return q.decode_project(row), q.decode_task(row, len(q.PROJECT_COLS))

    async def get_tasks(self, project_id: str, task_ids: Sequence[str]) -> dict[str, Task]:
        wanted = [tid for tid in dict.fromkeys(task_ids) if q.findable(tid)]
        if not wanted or not q.findable(project_id):
            return {}
        rows = await self._all(self._q.get_tasks, (project_id, wanted))
        found = {task.id: task for task in map(q.decode_task, rows)}
        return {tid: found[tid] for tid in wanted if tid in found}

    async def dependants(self, project_id: str, task_id: str) -> list[Task]:
        if not (q.findable(project_id) and q.findable(task_id)):
            return []
        rows = await self._all(self._q.dependants, (project_id, task_id))
        return [q.decode_task(row) for row in rows]

    async def list_tasks(
        self,
        project_id: str,
        *,
        status: TaskStatus | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[Task]:
        check_limit(limit)
        if not q.findable(project_id):
            raise ProjectNotFound(project_id)
        known = status if isinstance(status, TaskStatus) else None
        query, params = self._q.list_tasks(project_id, known, after, limit)
        rows = await self._all(query, params)
        if not rows:
            raise ProjectNotFound(project_id)
        if status is not known:
            return []  # not a TaskStatus: no task has it
        return [q.decode_task(row) for row in rows if row[0] is not None]

    async def progress(self, project_id: str) -> Progress:
        if not q.findable(project_id):
            raise ProjectNotFound(project_id)
        row = await self._one(self._q.progress, (project_id,))
        if row is None:
            raise ProjectNotFound(project_id)
        return q.decode_progress(row)

    # -- reads across projects (the ProjectOverview port) ----------------------------
    async def list_projects(
        self,
        *,
        projects: frozenset[str] | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[ProjectSummary]:
        """Projects by id, each joined to the sum of its progress stripes: one statement."""
        projects, after = check_projects_page(projects, after, limit)
        listed = None
        if projects is not None:
            listed = common.listed(projects, after, inclusive=False, storable=q.findable)
            if not listed:
                return []
            after = None  # the ids listed are those after it
        query, params = self._q.list_projects(listed, after, limit)
        rows = await self._all(query, params)
        width = len(q.PROJECT_COLS)
        return [
            ProjectSummary(project=q.decode_project(row), progress=q.decode_progress(row, width))
            for row in rows
        ]

    async def blocked_tasks(
        self,
        *,
        projects: frozenset[str] | None = None,
        error_type: str | None = None,
        after: tuple[str, str] | None = None,
        limit: int = 100,
    ) -> list[Task]:
        """Blocked tasks across projects by ``(project_id, id)`` from the partial index of
        blocked tasks: one statement."""
        projects, error_type, after = check_blocked_page(projects, error_type, after, limit)
        if error_type is not None and not q.findable(error_type):
            return []  # stored error types hold no lone surrogate
        listed = None
        if projects is not None:
            start = None if after is None else after[0]
            listed = common.listed(projects, start, inclusive=True, storable=q.findable)
            if not listed:
                return []
        query, params = self._q.blocked_tasks(listed, error_type, after, limit)
        rows = await self._all(query, params)
        return [q.decode_task(row) for row in rows]

    async def attempts(self, project_id: str, task_id: str) -> list[Attempt]:
        if not (q.findable(project_id) and q.findable(task_id)):
            raise TaskNotFound(project_id, task_id)
        rows = await self._all(self._q.attempts, (project_id, task_id))
        if not rows:
            raise TaskNotFound(project_id, task_id)
        return [q.decode_attempt(row, 1) for row in rows if row[1] is not None]

    async def dispatches(self, project_id: str, task_id: str) -> list[DispatchEntry]:
        if not (q.findable(project_id) and q.findable(task_id)):
            raise TaskNotFound(project_id, task_id)
        rows = await self._all(self._q.dispatches, (project_id, task_id))
        if not rows:
            raise TaskNotFound(project_id, task_id)
        return [q.decode_entry(row, 1) for row in rows if row[1] is not None]

    async def deferred(self, project_id: str) -> list[DispatchEntry]:
        if not q.findable(project_id):
            return []
        rows = await self._all(self._q.deferred, (project_id,))
        return [q.decode_entry(row) for row in rows]

    # -- writes --------------------------------------------------------------
    async def apply(self, plan: Plan) -> Applied:
        """Apply ``plan`` in one statement (one round trip when it succeeds)."""
        before = plan.before
        query, params = self._q.apply(plan)
        conflict = VersionConflict(before.id, before.version, None)
        row = await self._write(query, params, conflict)
        assert row is not None  # the statement always returns one row
        outcome = q.apply_outcome(plan, row)
        if outcome.applied is not None:
            return outcome.applied
        if outcome.reread_idempotency and plan.idempotency is not None:
            taken_at = plan.idempotency.created_at
            record = await self.get_idempotency(plan.idempotency.key, now=taken_at)
            if record is not None:
                raise IdempotencyConflict(record)
        assert outcome.error is not None
        raise outcome.error

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
        """The manual retry loaded, decided and applied in one statement (one round trip).

        Returns what :meth:`apply` would return for the plan
        :func:`~deepwork_retry._core.decide.manual_retry` makes from the
        current state, or ``None`` when the retry cannot be made that way
        (nothing changed): the caller takes the load, decide and apply path,
        which raises the core's own error (or, after a concurrent change,
        applies the retry). See :class:`~deepwork_retry.ports.AsyncRetryInOneStep`.
        """
        ids = (
            (project_id, task_id)
            if idempotency_key is None
            else (project_id, task_id, idempotency_key)
        )
        if now.tzinfo is None or not all(q.findable(value) for value in ids):
            return None  # a naive ``now``: the general path stores what it always did
        query = self._q.retry_blocked(
            keyed=idempotency_key is not None, claimed=claimed_until is not None
        )
        params = q.retry_params(
            project_id, task_id, now=now, actor=actor, reason=reason,
            budget=RetryBudget(budget), claimed_until=claimed_until,
            idempotency_key=idempotency_key, idempotency_expires_at=idempotency_expires_at,
            trace=trace,
        )  # fmt: skip
        params.update(
            self._q.retry_events(
                project_id, task_id, now=now, actor=actor, reason=reason,
                budget=RetryBudget(budget),
            )
        )  # fmt: skip
        try:
            async with _DECLINE:
                row = await self._hot_row(query.text, query.values(params))
        except VersionConflict:
            return None  # a deadlock or serialisation failure: the general path decides
        assert row is not None  # the statement always returns one row
        return self._q.retried(
            project_id, task_id, row, now=now, claimed_until=claimed_until, trace=trace
        )

    async def _hot_row(self, query: bytes, params: Any) -> tuple[Any, ...] | None:
        """Run the hottest statement (prepared) and return its row."""
        if not self._opened or self.pool.closed:
            raise self._unopened()
        pool = self.pool
        # The pool's own context manager and the connection's (a commit that
        # has nothing to do in autocommit mode) cost more than the two calls
        # they make.
        conn = await pool.getconn()
        try:
            if conn.autocommit:
                cur = await _execute_prepared(conn, query, params)
            else:  # a host's pool whose connections open transactions: commit this one
                async with conn.transaction():
                    cur = await _execute_prepared(conn, query, params)
            return await cur.fetchone()
        finally:
            await pool.putconn(conn)

    async def apply_project(self, plan: ProjectPlan) -> tuple[Project, list[DispatchEntry]]:
        query, params = self._q.apply_project(plan)
        conflict = VersionConflict(plan.before.id, plan.before.version, None)
        row = await self._write(query, params, conflict)
        assert row is not None
        outcome = q.apply_project_outcome(plan, row)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    # -- outbox --------------------------------------------------------------
    async def claim_due(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[DispatchEntry]:
        check_limit(limit)
        claim = self._q.claim_due_relaxed if self._relaxed_outbox else self._q.claim_due
        rows = await self._all(claim, {"now": now, "limit": limit, "until": claimed_until})
        rows.sort(key=lambda row: row[0])
        return [q.decode_entry(row, 1) for row in rows]

    async def mark_delivered(self, entries: Sequence[DispatchEntry], *, now: datetime) -> None:
        keys = [e.key for e in entries if q.findable(e.project_id) and q.findable(e.task_id)]
        if not keys:
            return
        project_ids, task_ids, attempts = (list(column) for column in zip(*keys, strict=True))
        async with self._connection() as conn:
            mark = (
                self._q.mark_delivered_relaxed if self._relaxed_outbox else self._q.mark_delivered
            )
            await conn.execute(mark, (now, project_ids, task_ids, attempts))

    async def mark_failed(
        self,
        entry: DispatchEntry,
        *,
        error: str,
        retry_at: datetime,
        now: datetime | None = None,
    ) -> None:
        """Release the claim, due again at ``retry_at``, and write the
        ``dispatch.failed`` event (at ``now``, the wall clock by default) in the
        same statement."""
        if not (q.findable(entry.project_id) and q.findable(entry.task_id)):
            return
        at = datetime.now(timezone.utc) if now is None else now
        event = ev.dispatch_failed(entry, error=error, retry_at=retry_at, now=at)
        params = {
            "error": q.diagnostic(error),
            "at": retry_at,
            "pid": entry.project_id,
            "tid": entry.task_id,
            "n": entry.attempt,
            **q.event_params([event]),
        }
        await self._one(self._q.mark_failed_event, params)

    async def redeliver_stale(
        self, *, now: datetime, delivered_before: datetime, limit: int
    ) -> list[DispatchEntry]:
        check_limit(limit)
        params = {
            "now": now,
            "before": delivered_before,
            "limit": limit,
            "error": REDELIVERED,
            "channel": self._q.channel,
        }
        entries = [q.decode_entry(row) for row in await self._all(self._q.redeliver_stale, params)]
        entries.sort(key=lambda e: (e.delivered_at, e.key))
        return entries

    # -- leases --------------------------------------------------------------
    async def expired_leases(self, *, now: datetime, limit: int) -> list[Task]:
        check_limit(limit)
        rows = await self._all(self._q.expired_leases, (now, limit))
        return [q.decode_task(row) for row in rows]

    # -- idempotency ---------------------------------------------------------
    async def get_idempotency(
        self, key: str, *, now: datetime | None = None
    ) -> IdempotencyRecord | None:
        if not q.findable(key):
            return None
        row = await self._one(self._q.get_idempotency, (key,))
        record = None if row is None else q.decode_idem(row)
        if record is not None and now is not None and record.expired(now):
            return None
        return record

    async def save_idempotency(self, record: IdempotencyRecord) -> IdempotencyRecord:
        row = await self._one(self._q.save_idempotency, q.idem_params(record))
        if row is None:
            # Completed by a transaction that committed after this statement began.
            row = await self._one(self._q.get_idempotency, (record.key,))
            assert row is not None
            return q.decode_idem(row)
        return record if row[0] else q.decode_idem(row, 1)

    # -- retention -----------------------------------------------------------
    async def prune(self, rule: PruneRule) -> Pruned:
        """One batch per table of what ``rule`` removes, each one statement (one transaction).

        Rows locked by another transaction are skipped, never waited for.
        """
        counts = []
        for query, params in self._q.prune(rule):
            if params is None:
                counts.append(0)
                continue
            async with self._connection() as conn:
                cur = await conn.execute(query, params)
                counts.append(max(cur.rowcount, 0))
        return Pruned(
            idempotency=counts[0],
            outbox=counts[1],
            attempts=counts[2],
            events=counts[3],
            batches=1,
        )

    # -- lifecycle events ----------------------------------------------------
    async def events(
        self, project_id: str, *, after: int = 0, limit: int = 100
    ) -> list[LifecycleEvent]:
        """The project's events with ``seq > after``, in order, at most ``limit``."""
        check_limit(limit)
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise InvalidInput(f"after must be an int >= 0, got {after!r}")
        if not q.findable(project_id):
            raise ProjectNotFound(project_id)
        params = {"pid": project_id, "after": after, "limit": limit}
        rows = await self._all(self._q.events, params)
        if not rows:
            raise ProjectNotFound(project_id)
        return [q.decode_event(row, 1) for row in rows if row[2] is not None]

    async def claim_events(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[LifecycleEvent]:
        """Claim pending events in ``(project_id, seq)`` order; callers are serialised
        by an advisory lock held to the commit, so each sees the claims before it and
        a task's events are handed out in order."""
        check_limit(limit)
        params = {"now": now, "limit": limit, "until": claimed_until}
        async with self._connection() as conn, conn.transaction():
            await conn.execute(self._q.event_lock, (self.schema,))
            cur = await conn.execute(self._q.claim_events, params)
            rows = await cur.fetchall()
        found = [q.decode_event(row) for row in rows]
        found.sort(key=lambda e: (e.project_id, e.seq))
        return found

    async def settle_events(
        self,
        events: Sequence[LifecycleEvent],
        *,
        now: datetime,
        failures: Sequence[EventRetry] = (),
    ) -> None:
        """Mark ``events`` delivered and keep ``failures``, in one statement."""
        done = [e for e in events if q.findable(e.project_id)]
        kept = [f for f in failures if q.findable(f.event.project_id)]
        if not done and not kept:
            return
        params = {
            "now": now,
            "pids": [e.project_id for e in done],
            "seqs": [e.seq for e in done],
            **q.failure_params(kept),
        }
        await self._one(self._q.settle_events, params)

    async def claim_event_retries(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[EventRetry]:
        check_limit(limit)
        params = {"now": now, "limit": limit, "until": claimed_until}
        found = [
            q.decode_event_retry(row)
            for row in await self._all(self._q.claim_event_retries, params)
        ]
        found.sort(key=lambda r: (r.retry_at, r.event.project_id, r.event.seq, r.subscriber))
        return found

    async def settle_event_retry(
        self,
        retry: EventRetry,
        *,
        now: datetime,
        error: str | None = None,
        retry_at: datetime | None = None,
    ) -> None:
        if not (q.findable(retry.event.project_id) and q.findable(retry.subscriber)):
            return
        params: dict[str, Any] = {
            "pid": retry.event.project_id,
            "seq": retry.event.seq,
            "sub": retry.subscriber,
        }
        if error is None:
            await self._rows_changed(self._q.forget_event_retry, params)
            return
        params.update(error=q.diagnostic(error), at=retry_at, now=now)
        await self._rows_changed(self._q.fail_event_retry, params)

    async def parked_events(
        self, *, subscriber: str | None = None, limit: int = 100
    ) -> list[EventRetry]:
        check_limit(limit)
        if subscriber is not None and not q.findable(subscriber):
            return []
        params = {"sub": subscriber, "limit": limit}
        return [q.decode_event_retry(row) for row in await self._all(self._q.parked_events, params)]

    async def replay_parked(
        self,
        *,
        now: datetime,
        subscriber: str | None = None,
        event_ids: Sequence[str] | None = None,
    ) -> int:
        if subscriber is not None and not q.findable(subscriber):
            return 0
        keys = [] if event_ids is None else [q.event_key(i) for i in event_ids]
        found = [k for k in keys if k is not None]
        if event_ids is not None and not found:
            return 0
        params = {
            "now": now,
            "sub": subscriber,
            "some": event_ids is not None,
            "pids": [k[0] for k in found],
            "seqs": [k[1] for k in found],
        }
        return await self._rows_changed(self._q.replay_parked, params)

    # -- notifications -------------------------------------------------------
    async def wait_for_work(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a write to announce pending work.

        True when announced. Listens on a connection of its own; announcements
        made while nobody waits are kept until the next call, so a relay that
        calls this between batches never sleeps through one.
        """
        if not self._opened or self.pool.closed:
            raise self._unopened()
        async with q.DriverErrors():
            listener = self._listener
            if listener is None or listener.closed:
                listener = await AsyncConnection.connect(
                    _conninfo(self.pool), autocommit=True, **_connect_kwargs(self.pool)
                )
                await listener.execute(self._q.listen)
                self._listener = listener
            notified = False
            try:
                # Let each generator run out (rather than leave it early): it
                # holds the connection's lock until it finishes.
                async for _ in listener.notifies(timeout=timeout, stop_after=1):
                    notified = True
                if notified:
                    async for _ in listener.notifies(timeout=0):
                        pass  # one wake-up covers the whole backlog
            except BaseException:
                self._listener = None
                await listener.close()
                raise
            return notified


# The savepoint commands are never prepared: in a pipeline that an error
# aborted, the driver would count as prepared a command the server skipped.
_SAVEPOINT = b"SAVEPOINT deepwork_retry"
_RELEASE = b"RELEASE SAVEPOINT deepwork_retry"
_UNDO = b"ROLLBACK TO SAVEPOINT deepwork_retry"
_XID = b"SELECT txid_current_if_assigned()"
"""The host's transaction, once it has written: tells one transaction from the next."""
_IDLE = TransactionStatus.IDLE
_OPEN = (TransactionStatus.INTRANS, TransactionStatus.INERROR)


class AsyncJoinedPostgresStorage(AsyncPostgresStorage):
    """An :class:`AsyncPostgresStorage` on the host's own psycopg connection.

    Made by :meth:`AsyncPostgresStorage.joining`. Each call runs on the
    host's connection:

    - while the host's transaction is open, inside it, between a
      ``SAVEPOINT`` and its release sent together with the statement (one
      round trip); a call that fails rolls back to its savepoint, so the
      host's own writes can still commit;
    - when no transaction is open, in one of its own (an autocommit
      connection runs the single statements as they are).

    It never commits or rolls back the host's transaction. Deliveries the
    services register with :meth:`after_commit` run when the host commits
    through the storage: at the end of the outermost :meth:`transaction`
    block, or in :meth:`commit` (which runs only those registered in the
    transaction it commits: each is marked with the server's id of the
    transaction, read in the same round trip as the call before it). A
    transaction committed or rolled back some other way (``conn.commit()``,
    the connection's own ``transaction()`` block) drops them: nothing is
    dispatched for it here, and the outbox relay delivers what was committed
    once its claim lapses.

    Calls are serialised (one at a time on the connection); the connection's
    row factory is set aside during a call. Expect PostgreSQL's default
    isolation (read committed) in the host's transaction.
    """

    _relaxed_outbox = False  # the host's transaction keeps its own durability

    def __init__(self, connection: AsyncConnection[Any], *, schema: str = q.DEFAULT_SCHEMA) -> None:
        if not isinstance(connection, AsyncConnection):
            raise ConfigurationError(
                f"{type(self).__name__} needs a psycopg.AsyncConnection,"
                f" not {type(connection).__name__}"
            )
        self._q = q.Queries(schema)
        self.schema = schema
        self.connection: _Conn = cast(_Conn, connection)
        """The host's connection."""
        self._owns_pool = False
        self._migrate = False
        self._opened = True
        self._closed = False
        self._listener = None
        self._lock = Lock()
        self._pending: list[tuple[int | None, Callable[[], Awaitable[None]]]] = []
        self._xid: int | None = None

    # -- the host's transaction ----------------------------------------------
    def after_commit(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` once the host's current transaction commits (see the class);
        at once (scheduled on the running loop) when no transaction is open."""
        if self._drop_stale():
            start_soon(callback)
        else:
            self._pending.append((self._xid, callback))

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncTransaction]:
        """The connection's ``transaction()`` block, after which the deliveries registered
        in it run if it committed the host's transaction.

        Nested in the host's transaction it is a savepoint: rolled back, it
        drops what was registered inside it; released, its deliveries wait
        for the enclosing transaction.
        """
        conn = self.connection
        self._drop_stale()
        mark = len(self._pending)
        committed = False
        try:
            async with conn.transaction() as tx:
                yield tx
            committed = tx.status is tx.Status.COMMITTED
        finally:
            if not committed:
                del self._pending[mark:]
        if conn.info.transaction_status == _IDLE:
            pending, self._pending = self._pending, []
            await _run_after_commit([callback for _, callback in pending])

    async def commit(self) -> None:
        """Commit the host's transaction (``connection.commit()``) and run its deliveries."""
        conn = self.connection
        xid = None
        try:
            async with q.DriverErrors():
                if not self._drop_stale() and self._pending:
                    cur = await conn.cursor(row_factory=tuple_row).execute(_XID, prepare=False)
                    xid = _xid(await cur.fetchone())
                await conn.commit()
        except BaseException:
            self._pending.clear()  # committed or not, the relay sees to it
            raise
        pending, self._pending = self._pending, []
        ours = [callback for tag, callback in pending if tag is not None and tag == xid]
        if len(ours) < len(pending):
            _left_to_relay(len(pending) - len(ours))
        await _run_after_commit(ours)

    async def rollback(self) -> None:
        """Roll back the host's transaction (``connection.rollback()``); nothing of it is
        delivered."""
        self._pending.clear()
        async with q.DriverErrors():
            await self.connection.rollback()

    def _drop_stale(self) -> bool:
        """Whether no transaction is open; if so, drop what an ended one left pending."""
        if self.connection.info.transaction_status != _IDLE:
            return False
        if self._pending:
            _left_to_relay(len(self._pending))
            self._pending.clear()
        return True

    def _usable(self) -> _Conn:
        """The connection, once stale deliveries are dropped; refused when closed."""
        conn = self.connection
        if self._closed:
            raise StorageUnavailable(f"{type(self).__name__} is closed")
        if conn.closed:
            raise StorageUnavailable("the host's PostgreSQL connection is closed")
        if conn.info.transaction_status == TransactionStatus.INERROR:
            raise StorageUnavailable(
                "the host's transaction has failed: roll it back before using the storage"
            )
        self._drop_stale()
        return conn

    # -- calls on the host's connection ----------------------------------------
    @asynccontextmanager
    async def _connection(self, conflict: VersionConflict | None = None) -> AsyncIterator[_Conn]:
        errors = q.DriverErrors(None if conflict is None else lambda: conflict)
        async with self._lock, errors:
            conn = self._usable()
            rows = conn.row_factory
            conn.row_factory = tuple_row
            try:
                if conn.info.transaction_status not in _OPEN:
                    async with conn.transaction():
                        yield conn
                    return
                await conn.execute(_SAVEPOINT, prepare=False)
                try:
                    yield conn
                except BaseException:
                    await _undo(conn)
                    raise
                await conn.execute(_RELEASE, prepare=False)
            finally:
                conn.row_factory = rows

    async def _statement(
        self,
        query: bytes,
        params: Any,
        conflict: VersionConflict | None = None,
        *,
        raw: bool = False,
    ) -> AsyncCursor[TupleRow]:
        """Run one statement (``raw``: with ``$n`` placeholders); its cursor, with every
        row fetched."""
        errors = q.DriverErrors(None if conflict is None else lambda: conflict)
        async with self._lock, errors:
            conn = self._usable()
            cur = (
                AsyncRawCursor(conn, row_factory=tuple_row)
                if raw
                else conn.cursor(row_factory=tuple_row)
            )
            status = conn.info.transaction_status
            if status not in _OPEN:
                if conn.autocommit:
                    return await cur.execute(query, params)  # one statement, one transaction
                async with conn.transaction():
                    return await cur.execute(query, params)
            try:
                if q.PIPELINE:
                    async with conn.pipeline():
                        xid = await _in_savepoint(conn, cur, query, params)
                else:
                    xid = await _in_savepoint(conn, cur, query, params)
            except BaseException:
                await _undo(conn)
                raise
            self._xid = _xid(await xid.fetchone())
            return cur

    async def _one(
        self, query: bytes, params: Any, conflict: VersionConflict | None = None
    ) -> tuple[Any, ...] | None:
        return await (await self._statement(query, params, conflict)).fetchone()

    async def _write(
        self, query: bytes, params: Any, conflict: VersionConflict
    ) -> tuple[Any, ...] | None:
        return await (await self._statement(query, params, conflict)).fetchone()

    async def _all(self, query: bytes, params: Any) -> list[tuple[Any, ...]]:
        return await (await self._statement(query, params)).fetchall()

    async def _hot_row(self, query: bytes, params: Any) -> tuple[Any, ...] | None:
        return await (await self._statement(query, params, _declined(), raw=True)).fetchone()

    # -- lifecycle -------------------------------------------------------------
    async def open(self) -> None:
        """Nothing to open: the host opened the connection."""

    async def close(self) -> None:
        """Stop using the host's connection (which stays open)."""
        self._closed = True

    async def wait_for_work(self, timeout: float) -> bool:
        """Wait ``timeout`` seconds and return False: a storage on the host's connection
        hears no announcements, so a relay on it polls."""
        await wait_or_stop(Event(), timeout)
        return False


async def _in_savepoint(
    conn: _Conn, cur: AsyncCursor[TupleRow], query: bytes, params: Any
) -> AsyncCursor[TupleRow]:
    """Run ``query`` on ``cur`` within the call's savepoint; the cursor of the
    transaction's id, read after it."""
    await conn.execute(_SAVEPOINT, prepare=False)
    await cur.execute(query, params)
    await conn.execute(_RELEASE, prepare=False)
    return await conn.cursor(row_factory=tuple_row).execute(_XID, prepare=False)


def _xid(row: tuple[Any, ...] | None) -> int | None:
    return None if row is None or row[0] is None else int(row[0])


def _left_to_relay(count: int) -> None:
    log.warning(
        "the host's transaction ended without the storage; %d deliveries are left"
        " to the outbox relay",
        count,
    )


async def _run_after_commit(callbacks: Sequence[Callable[[], Awaitable[None]]]) -> None:
    for callback in callbacks:
        try:
            await callback()
        except Exception:  # the commit is made: nothing here may make it look undone
            log.error("a callback after the host's commit failed", exc_info=True)


async def _undo(conn: _Conn) -> None:
    """Roll back to the call's savepoint, so that the host's transaction can go on."""
    if conn.closed or conn.info.transaction_status not in _OPEN:
        return
    try:
        await conn.execute(_UNDO, prepare=False)
        await conn.execute(_RELEASE, prepare=False)
    except psycopg.Error:
        # No savepoint to return to: the host's transaction had failed before
        # this call, and only the host can roll it back.
        log.debug("no savepoint to roll back to", exc_info=True)


async def _execute_pipelined(conn: _Conn, query: bytes, params: Any) -> AsyncCursor[TupleRow]:
    """Run one statement in one round trip, every time.

    In pipeline mode the driver sends the statement's preparation (after it
    has run a few times) together with its execution, instead of waiting
    for the server between the two. The pipeline costs a little on every
    call; :func:`_execute_prepared` avoids it for the hottest statement.
    """
    if not q.PIPELINE:
        return await conn.execute(query, params)
    async with conn.pipeline():
        return await conn.execute(query, params)


async def _execute_prepared(conn: _Conn, query: bytes, params: Any) -> AsyncRawCursor[TupleRow]:
    """Run a hot statement as a prepared statement, in one round trip every time.

    The first run on a connection sends the preparation and the execution
    together in one pipeline; later runs execute the prepared statement
    directly, without a pipeline's cost. Each connection keeps one cursor for
    these statements, so that the driver's loaders for their columns are
    looked up once rather than on every call; a raw cursor
    (:class:`~deepwork_retry.storage._postgres_sql.RawQuery`), so that the text
    is not converted again on every call.
    """
    hot: _Hot | None = getattr(conn, _HOT, None)
    if hot is None:
        hot = _Hot(AsyncRawCursor(conn))
        setattr(conn, _HOT, hot)
    cur = hot.cursor
    if query in hot.prepared or not q.PIPELINE:
        return await cur.execute(query, params, prepare=True)
    async with conn.pipeline():
        await cur.execute(query, params, prepare=True)
    hot.prepared.add(query)
    return cur


def _conninfo(pool: _Pool) -> str:
    conninfo = pool.conninfo
    if not isinstance(conninfo, str):
        raise TypeError("wait_for_work needs a pool built from a conninfo string")
    return conninfo


def _connect_kwargs(pool: _Pool) -> dict[str, Any]:
    kwargs = pool.kwargs
    extra = dict(kwargs) if isinstance(kwargs, dict) else {}
    extra.pop("autocommit", None)
    return extra
