"""PostgreSQL through SQLAlchemy: the PostgreSQL storage's own code on the psycopg
connection SQLAlchemy holds.

:class:`PostgresOps` has the SQL engine's entry points (an executor first), so
the SQLAlchemy storage calls it as it calls the engine; each call runs the
same-named method of a :class:`~deepwork_retry.storage.postgres.JoinedPostgresStorage`
(``AsyncJoinedPostgresStorage`` under the async engine, its coroutines awaited
in SQLAlchemy's greenlet) made once per psycopg connection. The joined storage
takes a savepoint when a transaction is open on the connection (the host's,
or the savepoint the SQLAlchemy storage opened around the call) and a
transaction of its own otherwise: either way it never commits one it did not
begin. Only ``postgresql+psycopg`` is supported (psycopg 3).
"""

from __future__ import annotations

import inspect
import threading
import weakref
from collections.abc import Callable
from typing import Any

import psycopg
from sqlalchemy.engine import Connection
from sqlalchemy.util import await_only

from deepwork_retry._core.plans import Applied
from deepwork_retry._core.retention import Pruned, PruneRule
from deepwork_retry.exceptions import (
    DeepworkError,
    StorageError,
    StorageMissing,
    VersionConflict,
)
from deepwork_retry.storage import _async_postgres, _sync_postgres
from deepwork_retry.storage import _postgres_sql as q
from deepwork_retry.storage._sql import common

__all__ = ["PostgresExecutor", "PostgresOps", "translate_postgres"]


def _run(result: Any) -> Any:
    """A call's result, awaited (in SQLAlchemy's greenlet) when it is a coroutine."""
    return await_only(result) if inspect.isawaitable(result) else result


class PostgresExecutor:
    """The joined PostgreSQL storage on the psycopg connection of a SQLAlchemy one."""

    __slots__ = ("storage",)

    def __init__(self, conn: Connection, ops: PostgresOps) -> None:
        self.storage = ops.joined(conn.connection.driver_connection)

    def call(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        return _run(getattr(self.storage, name)(*args, **kwargs))


def _same(name: str) -> Any:
    def op(self: PostgresOps, ex: PostgresExecutor, /, *args: Any, **kwargs: Any) -> Any:
        return ex.call(name, *args, **kwargs)

    op.__name__ = name
    return op


class PostgresOps:
    """The SQL engine's entry points over the joined PostgreSQL storage (one schema)."""

    def __init__(self, schema: str) -> None:
        self.schema = q.check_schema(schema)
        self.queries = q.Queries(self.schema)
        self._lock = threading.Lock()
        self._joined: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

    def joined(self, raw: Any) -> Any:
        """The joined storage on the psycopg connection ``raw`` (made once per connection)."""
        with self._lock:
            found = self._joined.get(raw)
            if found is None:
                if isinstance(raw, psycopg.AsyncConnection):
                    found = _async_postgres.AsyncPostgresStorage.joining(raw, schema=self.schema)
                else:
                    found = _sync_postgres.PostgresStorage.joining(raw, schema=self.schema)
                self._joined[raw] = found
            return found

    create_project = _same("create_project")
    add_tasks = _same("add_tasks")
    get_project = _same("get_project")
    load = _same("load")
    get_tasks = _same("get_tasks")
    dependants = _same("dependants")
    progress = _same("progress")
    attempts = _same("attempts")
    dispatches = _same("dispatches")
    deferred = _same("deferred")
    claim_due = _same("claim_due")
    mark_delivered = _same("mark_delivered")
    mark_failed = _same("mark_failed")
    redeliver_stale = _same("redeliver_stale")
    expired_leases = _same("expired_leases")
    get_idempotency = _same("get_idempotency")
    save_idempotency = _same("save_idempotency")
    # The event log (EventLog), as the SQL engine names its entry points.
    events = _same("events")
    claim_events = _same("claim_events")
    settle_events = _same("settle_events")
    claim_event_retries = _same("claim_event_retries")
    settle_event_retry = _same("settle_event_retry")
    parked_events = _same("parked_events")
    replay_parked = _same("replay_parked")

    def list_tasks(
        self, ex: PostgresExecutor, project_id: str, *, after_bound: Any = None, **kwargs: Any
    ) -> Any:
        return ex.call("list_tasks", project_id, **kwargs)

    def list_projects(self, ex: PostgresExecutor, *, after_bound: Any = None, **kwargs: Any) -> Any:
        return ex.call("list_projects", **kwargs)

    def blocked_tasks(self, ex: PostgresExecutor, *, after_bound: Any = None, **kwargs: Any) -> Any:
        return ex.call("blocked_tasks", **kwargs)

    @staticmethod
    def plan_params(plan: Any) -> None:
        return None

    project_params = plan_params

    def apply(self, ex: PostgresExecutor, plan: Any, params: None) -> Applied:
        return ex.call("apply", plan)  # type: ignore[no-any-return]

    def apply_project(self, ex: PostgresExecutor, plan: Any, params: None) -> Any:
        return ex.call("apply_project", plan)

    @staticmethod
    def retry_sql(move: Any) -> None:
        return None

    def retry_blocked(
        self, ex: PostgresExecutor, r: None, project_id: str, task_id: str, **kwargs: Any
    ) -> Applied | None:
        return ex.call("retry_blocked", project_id, task_id, **kwargs)  # type: ignore[no-any-return]

    def prune(self, ex: PostgresExecutor, rule: PruneRule) -> Pruned:
        return ex.call("prune", rule)  # type: ignore[no-any-return]


def translate_postgres(
    exc: BaseException, where: str, conflict: Callable[[], VersionConflict] | None = None
) -> Exception:
    """The PostgreSQL storage's own translation of a psycopg error (``.orig`` of
    SQLAlchemy's wrapper); ``conflict`` builds the error of a deadlock or a
    serialisation failure, as in the PostgreSQL storage's ``apply``."""
    orig = getattr(exc, "orig", None) or exc
    if isinstance(orig, Exception):
        found: DeepworkError | None = q.DriverErrors(conflict).translate(orig)
        if found is not None:
            return found
    return StorageError(f"PostgreSQL database {where} failed: {orig}")


def migrate_postgres(conn: Connection, ops: PostgresOps, apply: bool) -> list[int]:
    """The PostgreSQL storage's migrations of ``ops.schema`` (under its advisory lock), or
    only the check that they are applied."""
    raw: Any = conn.connection.driver_connection
    sync = not isinstance(raw, psycopg.AsyncConnection)
    if apply:
        module: Any = _sync_postgres if sync else _async_postgres
        applied: list[int] = _run(module._migrate(raw, ops.queries))
        return applied
    cur = _run(
        raw.execute(ops.queries.schema_present, (ops.schema, f"{ops.schema}.schema_migrations"))
    )
    row = _run(cur.fetchone())
    if row is None or not row[0] or not row[1]:
        _run(raw.rollback())
        raise StorageMissing(f"PostgreSQL schema {ops.schema!r} has no deepwork_retry tables")
    cur = _run(raw.execute(ops.queries.applied_migrations))
    done = {number for (number,) in _run(cur.fetchall())}
    _run(raw.rollback())
    pending = common.pending(q.migrations(), done)
    if pending:
        lacks = ", ".join(m.file.removesuffix(".sql") for m in pending)
        raise StorageMissing(f"PostgreSQL schema {ops.schema!r} lacks migrations {lacks}")
    return []
