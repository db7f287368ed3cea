"""The storage operations of every SQL storage, written once over an :class:`Executor`.

An :class:`Engine` is made once per :class:`~deepwork_retry.storage._sql.dialect.Dialect`
and holds its rendered statements (:mod:`.statements`). Each operation takes
an executor first and runs inside a transaction the caller opened: a storage
keeps only its connections, its transactions and its error table, and calls::

    with self._tx(write=True) as ex:        # BEGIN … COMMIT, ROLLBACK on error
        return ENGINE.apply(ex, plan, ENGINE.plan_params(plan))

A write operation that refuses (a :class:`~deepwork_retry.exceptions.DeepworkError`)
leaves the transaction for the caller to roll back; :meth:`Engine.retry_blocked`
returns ``None`` when it refuses, and the caller rolls back then too. Reads
marked *write* below lock what they read with the dialect's ``lock`` suffix, so
a check and the write it guards are atomic on a dialect with row locks as they
are under SQLite's whole-database write lock.

Values are encoded with :mod:`.codec` (integer microseconds, JSON text) and
rows decoded by column name. Parameters are passed in the statement's
numbered order; a dialect whose driver takes them in another order reorders
them in its executor (:meth:`Dialect.bind <deepwork_retry.storage._sql.dialect.Dialect.bind>`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from typing import Any, Protocol

import attrs

from deepwork_retry._core import effects, machine
from deepwork_retry._core import events as lifecycle
from deepwork_retry._core.events import Event, EventRetry
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
from deepwork_retry._core.plans import Applied, AttemptUpdate, Plan, ProjectPlan, Release
from deepwork_retry._core.retention import Pruned, PruneRule
from deepwork_retry._core.states import DispatchState, Outcome, RetryBudget, TaskStatus
from deepwork_retry.exceptions import (
    AlreadyExists,
    IdempotencyConflict,
    InvalidInput,
    ProjectNotFound,
    TaskNotFound,
    VersionConflict,
)
from deepwork_retry.ports import REDELIVERED
from deepwork_retry.storage._sql import codec, common
from deepwork_retry.storage._sql.dialect import Dialect, Kind
from deepwork_retry.storage._sql.statements import (
    ACCEPTING,
    COUNTERS,
    DISPATCHING,
    IN_CHUNK,
    RetrySQL,
    Statements,
)
from deepwork_retry.storage._validate import check_new_tasks

__all__ = ["Engine", "Executor", "PlanParams", "Result"]


class Result(Protocol):
    """What an executed statement answers (a DB-API cursor, a SQLAlchemy result)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> Sequence[Any]: ...


class Executor(Protocol):
    """Runs one statement of the dialect inside the caller's open transaction.

    ``sqlite3.Connection`` and ``sqlite3.Cursor`` are executors as they are.
    Parameters come in the statement's numbered order: an executor for a
    dialect whose ``paramstyle`` is ``"format"`` passes them through
    :meth:`Dialect.bind <deepwork_retry.storage._sql.dialect.Dialect.bind>`
    first. ``fetchone``/``fetchall`` are called only after a ``SELECT`` (or a
    statement with ``RETURNING``), ``rowcount`` only after a write.
    """

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Result: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Any: ...


PlanParams = tuple[
    tuple[Any, ...],
    tuple[Any, ...] | None,
    tuple[Any, ...] | None,
    tuple[Any, ...] | None,
    int | None,
]
"""A plan's rows as bound parameters: task, new attempt, outbox entry, idempotency, claim."""


_ENTRY_STATE = 1 + common.ENTRY_COLUMNS.index("state")
"""The entry's state in a row of ``seq`` and the entry's columns."""


_EVENT_SEQ = 1 + len(COUNTERS)
"""The project's last event number in a row of its version, counters and ``event_seq``."""

READY_RETRY_EVENTS = len(
    lifecycle.manual_retry_events(
        Task(id="", project_id=""), now=codec.EPOCH, actor=None, reason=None,
        budget=RetryBudget.ONE_MORE, deferred=False,
    )
)  # fmt: skip
"""How many events a manual retry dispatched at once makes (the core's count): the
one-step retry numbers them with the project's counters, and the others (a deferred
one's) when it knows of them."""


_EVENTS_PER_INSERT = 100
"""Events per ``INSERT`` (a move makes a few; a batch of tasks added, one per task)."""


MIGRATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations (number INTEGER NOT NULL PRIMARY KEY, "
    "name VARCHAR(200) NOT NULL, applied_at BIGINT NOT NULL)"
)
"""Where a dialect without a schema version of its own (SQLite has ``user_version``)
records the migrations applied (see :meth:`Engine.migrate`)."""


def split_script(script: str) -> list[str]:
    """A migration file's statements: split at each ``;`` outside quotes, ``--`` comments
    dropped (a driver runs one statement per call)."""
    out: list[str] = []
    part: list[str] = []
    i, n = 0, len(script)
    while i < n:
        ch = script[i]
        if ch == "-" and script.startswith("--", i):
            end = script.find("\n", i)
            i = n if end < 0 else end
            continue
        if ch in "'\"`":
            end = script.find(ch, i + 1)
            while end >= 0 and script.startswith(ch * 2, end):
                end = script.find(ch, end + 2)  # a doubled quote is part of the literal
            if end < 0:
                raise InvalidInput(f"unterminated quote in SQL script: {script[i : i + 40]!r}")
            part.append(script[i : end + 1])
            i = end + 1
            continue
        if ch == ";":
            statement = "".join(part).strip()
            if statement:
                out.append(statement)
            part = []
        else:
            part.append(ch)
        i += 1
    statement = "".join(part).strip()
    if statement:
        out.append(statement)
    return out


def all_text(*values: object) -> bool:
    return all(isinstance(v, str) for v in values)


def expiry(now: datetime, expires_at: datetime | None) -> int:
    """When a key reserved at ``now`` expires: ``expires_at``, or the default period on."""
    if expires_at is not None:
        return codec.ts(expires_at)
    return codec.ts(IdempotencyRecord(key="", project_id="", task_id="", created_at=now).expires_at)


class Engine:
    """Every storage operation for one dialect (see the module's documentation)."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        made = dialect.statements_class or Statements
        self.sql: Statements = made(dialect)

    def _is_conflict(self, exc: BaseException) -> bool:
        return self.dialect.classify(exc) is Kind.CONFLICT

    # -- setup ------------------------------------------------------------------------
    def create_project(self, ex: Executor, project: Project) -> None:
        """*write*"""
        codec.valid_id("project", project.id)
        params = codec.project_params(project)
        if ex.execute(self.sql.project_exists, (project.id,)).fetchone():
            raise AlreadyExists(f"Project {project.id!r} exists already")
        ex.execute(self.sql.insert_project, params)

    def add_tasks(self, ex: Executor, tasks: Sequence[Task]) -> None:
        """*write*"""
        check_new_tasks(tasks)
        for task in tasks:
            codec.valid_id("project", task.project_id)
            codec.valid_id("task", task.id)
        rows = [codec.task_params(task) for task in tasks]
        s = self.sql
        known: set[str] = set()
        for task in tasks:
            if task.project_id not in known:
                if not ex.execute(s.project_exists, (task.project_id,)).fetchone():
                    raise ProjectNotFound(task.project_id)
                known.add(task.project_id)
            if ex.execute(s.task_exists, (task.project_id, task.id)).fetchone():
                raise AlreadyExists(f"Task {task.id!r} exists already in {task.project_id!r}")
        ex.executemany(s.insert_task, rows)
        deps = [(t.project_id, codec.text(dep), t.id) for t in tasks for dep in t.blocked_by]
        if deps:
            ex.executemany(s.insert_dep, deps)
        added: dict[str, dict[str, int]] = {}
        for task in tasks:
            counts = added.setdefault(task.project_id, {})
            status = TaskStatus(task.status).value
            counts[status] = counts.get(status, 0) + 1
        for pid, counts in added.items():
            ex.execute(s.add_counts(tuple(counts)), (sum(counts.values()), *counts.values(), pid))
        for pid in added:
            self._store_events(
                ex, pid, tuple(lifecycle.added(t) for t in tasks if t.project_id == pid)
            )

    # -- reads ---------------------------------------------------------------------------
    def get_project(self, ex: Executor, project_id: str, *, lock: bool = False) -> Project:
        if not isinstance(project_id, str):
            raise ProjectNotFound(project_id)
        sql = self.sql.project_locked if lock else self.sql.project
        row = ex.execute(sql, (codec.text(project_id),)).fetchone()
        if row is None:
            raise ProjectNotFound(project_id)
        return codec.project(row)

    def get_task(self, ex: Executor, project_id: str, task_id: str) -> Task:
        if not isinstance(project_id, str) or not isinstance(task_id, str):
            raise TaskNotFound(project_id, task_id)
        row = ex.execute(self.sql.task, (codec.text(project_id), codec.text(task_id))).fetchone()
        if row is None:
            raise TaskNotFound(project_id, task_id)
        return codec.task(row)

    def load(self, ex: Executor, project_id: str, task_id: str) -> tuple[Project, Task]:
        """The project and one of its tasks; one statement when both ids are text."""
        if not all_text(project_id, task_id):  # odd ids: the step-by-step lookups report them
            return self.get_project(ex, project_id), self.get_task(ex, project_id, task_id)
        rows = ex.execute(self.sql.load, (codec.text(task_id), codec.text(project_id))).fetchall()
        if not rows:
            raise ProjectNotFound(project_id)
        row = rows[0]
        width = self.sql.project_width
        if row[width] is None:
            raise TaskNotFound(project_id, task_id)
        return codec.project(row[:width]), codec.task(row[width:])

    def get_tasks(
        self, ex: Executor, project_id: str, task_ids: Sequence[str], *, lock: bool = False
    ) -> dict[str, Task]:
        ids = [codec.text(tid) for tid in dict.fromkeys(task_ids)]
        found: dict[str, Task] = {}
        pid = codec.text(project_id)
        for start in range(0, len(ids), IN_CHUNK):
            chunk = ids[start : start + IN_CHUNK]
            rows = ex.execute(self.sql.tasks_in(len(chunk), locked=lock), (pid, *chunk))
            for row in rows.fetchall():
                task = codec.task(row)
                found[task.id] = task
        return {tid: found[tid] for tid in dict.fromkeys(task_ids) if tid in found}

    def dependants(self, ex: Executor, project_id: str, task_id: str) -> list[Task]:
        rows = ex.execute(self.sql.dependants, (codec.text(project_id), codec.text(task_id)))
        return [codec.task(row) for row in rows.fetchall()]

    def list_tasks(
        self,
        ex: Executor,
        project_id: str,
        *,
        status: TaskStatus | None = None,
        after: str | None = None,
        limit: int = 100,
        after_bound: Callable[[str], tuple[str, Any]] | None = None,
    ) -> list[Task]:
        """A page of tasks by id; ``after_bound(after)`` gives ``(operator, value)`` for
        an ``after`` the dialect cannot compare as given (see :func:`common.after_bound`)."""
        check_limit(limit)
        params: list[Any] = [codec.text(project_id)]
        if status is not None:
            params.append(TaskStatus(status).value)
        op = None
        if after is not None:
            op, bound = after_bound(after) if after_bound else (">", after)
            params.append(bound)
        self.get_project(ex, project_id)
        rows = ex.execute(self.sql.list_tasks(status is not None, op), (*params, limit))
        return [codec.task(row) for row in rows.fetchall()]

    def list_projects(
        self,
        ex: Executor,
        *,
        projects: frozenset[str] | None = None,
        after: str | None = None,
        limit: int = 100,
        after_bound: Callable[[str], tuple[str, Any]] | None = None,
    ) -> list[ProjectSummary]:
        """A page of projects by id with their progress (the counters are columns of
        the project's row): one statement, or one per :data:`IN_CHUNK` ids of
        ``projects``, in id order, until the page is full."""
        projects, after = check_projects_page(projects, after, limit)
        if projects is None:
            params: list[Any] = []
            op = None
            if after is not None:
                op, bound = after_bound(after) if after_bound else (">", after)
                params.append(codec.text(bound))
            rows = ex.execute(self.sql.list_projects(0, op), (*params, limit)).fetchall()
            return [self._summary(row) for row in rows]
        found: list[ProjectSummary] = []
        for chunk in common.chunks(common.listed(projects, after, inclusive=False), IN_CHUNK):
            statement = self.sql.list_projects(len(chunk), None)
            rows = ex.execute(statement, (*chunk, limit - len(found))).fetchall()
            found.extend(self._summary(row) for row in rows)
            if len(found) == limit:
                break
        return found

    def _summary(self, row: Any) -> ProjectSummary:
        width = self.sql.project_width
        project = codec.project(row[:width])
        return ProjectSummary(project=project, progress=codec.progress(row, project.id, width))

    def blocked_tasks(
        self,
        ex: Executor,
        *,
        projects: frozenset[str] | None = None,
        error_type: str | None = None,
        after: tuple[str, str] | None = None,
        limit: int = 100,
        after_bound: Callable[[str], tuple[str, Any]] | None = None,
    ) -> list[Task]:
        """A page of blocked tasks by ``(project_id, id)``, read from the index of
        blocked tasks: one statement, or one per :data:`IN_CHUNK` ids of ``projects``,
        in id order, until the page is full."""
        projects, error_type, after = check_blocked_page(projects, error_type, after, limit)
        if error_type is not None and not (self.dialect.surrogates or common.encodes(error_type)):
            return []  # the database stores no error type holding a lone surrogate
        bound = after_bound or (lambda value: (">", value))
        head: tuple[Any, ...] = () if error_type is None else (codec.text(error_type),)
        after_project = after_task = None
        if after is not None:
            after_project, project_bound = bound(after[0])
            if after_project == ">" and project_bound == after[0]:  # a storable project id
                after_task, task_bound = bound(after[1])
                after_project = "="
                head += (codec.text(after[0]), codec.text(task_bound))
            else:  # no stored project has this id: the tasks of the projects after it
                head += (codec.text(project_bound),)
        if projects is None:
            statement = self.sql.blocked_tasks(0, error_type is not None, after_project, after_task)
            rows = ex.execute(statement, (*head, limit)).fetchall()
            return [codec.task(row) for row in rows]
        found: list[Task] = []
        start = None if after is None else after[0]
        for chunk in common.chunks(common.listed(projects, start, inclusive=True), IN_CHUNK):
            statement = self.sql.blocked_tasks(
                len(chunk), error_type is not None, after_project, after_task
            )
            rows = ex.execute(statement, (*chunk, *head, limit - len(found))).fetchall()
            found.extend(codec.task(row) for row in rows)
            if len(found) == limit:
                break
        return found

    def progress(self, ex: Executor, project_id: str) -> Progress:
        row = ex.execute(self.sql.progress, (codec.text(project_id),)).fetchone()
        if row is None:
            raise ProjectNotFound(project_id)
        return codec.progress(row, project_id, 0)

    def attempts(self, ex: Executor, project_id: str, task_id: str) -> list[Attempt]:
        self.get_task(ex, project_id, task_id)
        rows = ex.execute(self.sql.attempts, (project_id, task_id))
        return [codec.attempt(row) for row in rows.fetchall()]

    def dispatches(self, ex: Executor, project_id: str, task_id: str) -> list[DispatchEntry]:
        task = self.get_task(ex, project_id, task_id)
        rows = ex.execute(self.sql.dispatches, (project_id, task_id, task.attempt))
        return [codec.entry(row) for row in rows.fetchall()]

    def deferred(self, ex: Executor, project_id: str) -> list[DispatchEntry]:
        rows = ex.execute(self.sql.deferred, (codec.text(project_id),))
        return [codec.entry(row) for row in rows.fetchall()]

    # -- writes ----------------------------------------------------------------------------
    def version(self, ex: Executor, project_id: str, task_id: str) -> int | None:
        """*write*: the task's version, ``None`` when it is missing."""
        row = ex.execute(self.sql.version, (codec.text(project_id), codec.text(task_id))).fetchone()
        return None if row is None else int(row[0])

    def check_guards(self, ex: Executor, project_id: str, plan: Plan | ProjectPlan) -> None:
        """*write*"""
        for guard in plan.guards:
            found = self.version(ex, project_id, guard.task_id)
            if found != guard.version:
                raise VersionConflict(guard.task_id, guard.version, found)

    def plan_params(self, plan: Plan) -> PlanParams:
        """Serialise everything first: a value the database cannot hold fails before any
        write (and before the transaction begins)."""
        before, after = plan.before, plan.after
        if after.id != before.id or after.project_id != before.project_id:
            raise InvalidInput("a plan cannot change a task's id or project")
        return (
            codec.task_params(after),
            None if plan.new_attempt is None else codec.attempt_params(plan.new_attempt),
            None if plan.dispatch is None else codec.entry_params(plan.dispatch),
            None if plan.idempotency is None else codec.idem_params(plan.idempotency),
            None if plan.claimed_until is None else codec.ts(plan.claimed_until),
        )

    def apply(self, ex: Executor, plan: Plan, params: PlanParams) -> Applied:
        """*write*: apply ``plan`` (``params`` from :meth:`plan_params`)."""
        s = self.sql
        before, after = plan.before, plan.after
        pid, tid = before.project_id, before.id
        task_row, new_attempt, entry, idem, claimed_until = params
        # The compare-and-set is the write itself; any refusal below rolls
        # the whole transaction back, so checks and writes may interleave.
        written = ex.execute(s.update_task, (*task_row[2:], pid, tid, before.version)).rowcount
        if written != 1:
            current = self.version(ex, pid, tid)
            if current is None:
                raise TaskNotFound(pid, tid)
            raise VersionConflict(tid, before.version, current)
        if plan.guards:
            self.check_guards(ex, pid, plan)
        moved = before.status != after.status
        made_events = lifecycle.events_of(plan)
        last_event: int | None = None
        counters: Any = None
        key_free = False  # the key was absent: reserved by an insert, not an upsert
        if plan.idempotency is not None or not moved:
            # The project's version is checked before the idempotency key.
            if plan.project_version is not None:
                row = ex.execute(s.project_version, (pid,)).fetchone()
                if row[0] != plan.project_version:
                    raise VersionConflict(tid, before.version, before.version)
            if plan.idempotency is not None:
                existing = self.get_idempotency(ex, plan.idempotency.key, lock=True)
                if existing is not None and not existing.expired(plan.idempotency.created_at):
                    raise IdempotencyConflict(existing)
                key_free = existing is None
        if moved:
            values = codec.TASK_STATUS_VALUES
            key = (
                codec.value(values, TaskStatus, before.status),
                codec.value(values, TaskStatus, after.status),
            )
            # The shift numbers the move's events too: one statement for both.
            count = len(made_events)
            if self.dialect.returning:
                row = ex.execute(s.shift_events_returning[key], (count, pid)).fetchall()[0]
            else:
                ex.execute(s.shift_events[key], (count, pid))
                row = ex.execute(s.counters, (pid,)).fetchone()
            last_event = row[_EVENT_SEQ] - count
            if (
                plan.idempotency is None
                and plan.project_version is not None
                and row[0] != plan.project_version
            ):
                raise VersionConflict(tid, before.version, before.version)
            counters = row
        made: list[DispatchEntry] = []
        dispatch = plan.dispatch
        if dispatch is not None and entry is not None:
            pending = dispatch.state is DispatchState.PENDING
            try:
                ex.execute(s.insert_pending if pending else s.insert_entry, entry)
            except Exception as exc:
                if not self._is_conflict(exc):
                    raise
                # The (task, attempt) entry exists already: the plan is stale.
                raise VersionConflict(tid, before.version, before.version) from None
            if pending and dispatch.claimed_until:
                made.append(dispatch)
        if plan.new_attempt is not None and new_attempt is not None:
            number = plan.new_attempt.number
            inserted = ex.execute(s.insert_next_attempt, (*new_attempt, pid, tid, number - 1))
            if not inserted.rowcount:
                raise InvalidInput(f"Task {tid!r}: attempt {number} is not next")
        if after.blocked_by:
            new_deps = [d for d in dict.fromkeys(after.blocked_by) if d not in before.blocked_by]
            if new_deps:
                ex.executemany(s.insert_dep, [(pid, codec.text(dep), tid) for dep in new_deps])
        if plan.attempt_update is not None:
            self._update_attempt(ex, pid, tid, plan.attempt_update)
        if plan.releases:
            made.extend(self._release(ex, pid, plan.releases, claimed_until))
        if idem is not None and plan.idempotency is not None:
            # The key is free: absent (an insert; where rows are locked, a write reserving
            # it meanwhile makes that a conflict), or its record expired (an upsert).
            if not key_free:
                ex.execute(s.upsert_idem, idem)
            elif not self._inserted(ex, s.insert_idem, idem):
                raise IdempotencyConflict(self._taken(ex, plan.idempotency.key))
        self._store_events(ex, pid, made_events, last_event)
        return Applied(
            task=after,
            progress=(
                self.progress(ex, pid) if counters is None else codec.progress(counters, pid, 1)
            ),
            dispatches=tuple(made),
            deferred=dispatch is not None and dispatch.state is DispatchState.DEFERRED,
        )

    def retry_sql(self, move: effects.Move) -> RetrySQL:
        """The one-step retry's statements for ``move`` (normally ``effects.MANUAL_RETRY``,
        read when a storage is made)."""
        return self.sql.retry(move)

    def retry_blocked(
        self,
        ex: Executor,
        r: RetrySQL,
        project_id: str,
        task_id: str,
        *,
        now: datetime,
        actor: str | None,
        reason: str | None,
        budget: RetryBudget,
        claimed_until: datetime | None,
        idempotency_key: str | None,
        idempotency_expires_at: datetime | None,
        trace: str | None = None,
    ) -> Applied | None:
        """*write*: the manual retry decided and applied in the caller's write transaction.

        :func:`~deepwork_retry._core.decide.manual_retry`'s change is made by
        :attr:`RetrySQL.update`, rendered from the core's description of the
        move (``r``, from :meth:`retry_sql`), only from a state the core lets a
        retry leave; the rest of its checks and choices are made on one read of
        what changed (:attr:`RetrySQL.read`), and each insert refuses what
        :meth:`apply` would refuse (a taken idempotency key, an existing outbox
        entry, an attempt that is not next). ``None`` whenever anything
        refuses: the caller rolls the transaction back, and its step-by-step
        path then raises the core's own error. ``project_id`` and ``task_id``
        are text; ``budget`` a :class:`RetryBudget`. Its events
        (:func:`~deepwork_retry._core.events.manual_retry_events`) are numbered by the
        shift of the project's counters and stored with it; ``trace`` goes on the
        outbox entry.
        """
        at = codec.ts(now)
        pid, tid = codec.text(project_id), codec.text(task_id)
        if idempotency_key is not None and not self._reserve(
            ex, codec.text(idempotency_key), pid, tid, at, expiry(now, idempotency_expires_at)
        ):
            return None  # the key is taken
        full = budget is RetryBudget.FULL
        for source in r.sources:
            if ex.execute(r.update[source], (full, at, pid, tid)).rowcount:
                break
        else:
            return None  # no such task, or not in a state a retry leaves
        ex.execute(r.shift_events[source], (READY_RETRY_EVENTS, pid))
        rows = ex.execute(r.read, (pid, tid)).fetchall()
        if not rows or rows[0][0] not in ACCEPTING:
            return None  # the project does not accept retries
        row = rows[0]
        task = r.decode(row, project_id, task_id, now)
        number = task.attempt
        if row[r.count_at] != number - 1:
            return None  # the attempt is not next
        ready = row[0] in DISPATCHING and (not task.blocked_by or self._dependencies_met(ex, task))
        until = codec.ots(claimed_until)
        try:
            if ready:
                last = row[r.count_at + 1]  # pending after every pending entry
                seq = 1 if last is None else last + 1
                ex.execute(r.insert_pending, (pid, tid, number, at, until, seq, trace))
            else:
                ex.execute(r.insert_deferred, (pid, tid, number, at, trace))
            ex.execute(
                r.insert_attempt,
                (
                    pid, tid, number, at, codec.otext(actor), codec.otext(reason),
                    codec.BUDGET_VALUES[budget],
                ),
            )  # fmt: skip
        except Exception as exc:
            if self._is_conflict(exc):
                return None  # the (task, attempt) outbox entry or attempt exists already
            raise
        made_events = lifecycle.manual_retry_events(
            task, now=now, actor=actor, reason=reason, budget=budget, deferred=not ready,
            before=codec.member(codec.TASK_STATUSES, TaskStatus, source),
        )  # fmt: skip
        if len(made_events) != READY_RETRY_EVENTS:
            ex.execute(self.sql.bump_events, (len(made_events) - READY_RETRY_EVENTS, pid))
        self._store_events(ex, project_id, made_events, row[r.count_at + 2] - READY_RETRY_EVENTS)
        made: tuple[DispatchEntry, ...] = ()
        if ready and claimed_until:
            made = (
                DispatchEntry(
                    project_id=project_id, task_id=task_id, attempt=number,
                    state=DispatchState.PENDING, available_at=now, created_at=now,
                    claimed_until=claimed_until, trace=trace,
                ),
            )  # fmt: skip
        return Applied(
            task=task, progress=codec.progress(row, project_id, 1), dispatches=made,
            deferred=not ready,
        )  # fmt: skip

    def _reserve(self, ex: Executor, key: Any, pid: Any, tid: Any, at: int, until: int) -> bool:
        """Reserve an idempotency key for the one-step retry; False when a record that
        has not expired holds it."""
        if self.dialect.conditional_upsert:
            return bool(ex.execute(self.sql.reserve_idem, (key, pid, tid, at, until)).rowcount)
        row = (key, pid, tid, at, None, None, until)
        if self._inserted(ex, self.sql.insert_idem, row):
            return True
        held = ex.execute(self.sql.idem_locked, (key,)).fetchone()
        if held is None or codec.idem(held).expires_at > codec.dt(at):
            return False
        ex.execute(self.sql.upsert_idem, row)
        return True

    def _inserted(self, ex: Executor, sql: str, row: Sequence[Any]) -> bool:
        """Insert ``row``; False when a unique key refuses it (the statement alone is
        undone: SQLite and MySQL keep the transaction)."""
        try:
            ex.execute(sql, row)
        except Exception as exc:
            if self._is_conflict(exc):
                return False
            raise
        return True

    def _taken(self, ex: Executor, key: str) -> IdempotencyRecord:
        """The record that took ``key`` while this write had found it absent.

        The write that took it has committed (else the insert would have waited,
        not been refused), so a plain read sees it under ``READ COMMITTED``; a
        locking read would deadlock with the other writes refused at once, which
        hold a shared lock on the key from their own refused insert.
        """
        record = self.get_idempotency(ex, key)
        assert record is not None  # a refused insert of the key leaves it stored
        return record

    def _dependencies_met(self, ex: Executor, task: Task) -> bool:
        """Whether every task ``task`` waits for is finished (a missing one is not).

        Read after ``task`` itself changed; it is never among its own
        blockers, and would count as unfinished before the change as after.
        """
        found = self.get_tasks(ex, task.project_id, task.blocked_by, lock=bool(self.dialect.lock))
        return machine.dependencies_met(task, {tid: t.status for tid, t in found.items()})

    def _update_attempt(self, ex: Executor, pid: str, tid: str, update: AttemptUpdate) -> None:
        if update.number <= 0:
            return
        row = ex.execute(self.sql.attempt, (pid, tid, update.number)).fetchone()
        if row is None:
            return
        old = codec.attempt(row)
        # A falsy field of the update keeps the stored value, as in MemoryStorage.
        outcome = update.outcome or old.outcome
        ex.execute(
            self.sql.update_attempt,
            (
                codec.ots(update.started_at or old.started_at),
                codec.ots(update.finished_at or old.finished_at),
                None if not outcome else Outcome(outcome).value,
                codec.otext(update.error_type or old.error_type),
                codec.otext(update.error_message or old.error_message),
                pid,
                tid,
                update.number,
            ),
        )

    def _next_pending(self, ex: Executor) -> int:
        """A pending_seq after every pending entry: claim order is the order made pending."""
        row = ex.execute(self.sql.next_pending, ()).fetchone()
        return 1 if row is None or row[0] is None else int(row[0]) + 1

    def _release(
        self, ex: Executor, pid: str, releases: Sequence[Release], claimed_until: int | None
    ) -> list[DispatchEntry]:
        made = []
        for rel in releases:
            row = ex.execute(self.sql.entry, (pid, codec.text(rel.task_id), rel.attempt)).fetchone()
            if row is None or row[_ENTRY_STATE] != DispatchState.DEFERRED.value:
                continue
            ex.execute(self.sql.release, (claimed_until, self._next_pending(ex), row[0]))
            if claimed_until is not None:
                made.append(
                    attrs.evolve(
                        codec.entry(row[1:]),
                        state=DispatchState.PENDING,
                        claimed_until=codec.dt(claimed_until),
                    )
                )
        return made

    def project_params(self, plan: ProjectPlan) -> tuple[tuple[Any, ...], int | None]:
        """A project plan's row and claim as parameters (before the transaction)."""
        if plan.after.id != plan.before.id:
            raise InvalidInput("a plan cannot change a project's id")
        return codec.project_params(plan.after), codec.ots(plan.claimed_until)

    def apply_project(
        self, ex: Executor, plan: ProjectPlan, params: tuple[tuple[Any, ...], int | None]
    ) -> tuple[Project, list[DispatchEntry]]:
        """*write* (``params`` from :meth:`project_params`)"""
        pid = plan.before.id
        row, claimed_until = params
        current = self.get_project(ex, pid, lock=True)
        if current.version != plan.before.version:
            raise VersionConflict(pid, plan.before.version, current.version)
        self.check_guards(ex, pid, plan)
        ex.execute(self.sql.update_project, (*row[1:], pid))
        return plan.after, self._release(ex, pid, plan.releases, claimed_until)

    # -- outbox ------------------------------------------------------------------------------
    def claim_due(
        self, ex: Executor, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[DispatchEntry]:
        """*write*"""
        check_limit(limit)
        at, until = codec.ts(now), codec.ts(claimed_until)
        rows = ex.execute(self.sql.claimable, (at, at, limit)).fetchall()
        if rows:
            ex.executemany(self.sql.claim, [(until, r[0]) for r in rows])
        return [attrs.evolve(codec.entry(r[1:]), claimed_until=claimed_until) for r in rows]

    def mark_delivered(
        self, ex: Executor, entries: Sequence[DispatchEntry], *, now: datetime
    ) -> None:
        """*write*"""
        at = codec.ts(now)
        keys = [(codec.text(e.project_id), codec.text(e.task_id), e.attempt) for e in entries]
        if keys:
            ex.executemany(self.sql.mark_delivered, [(at, *key) for key in keys])

    def mark_failed(
        self,
        ex: Executor,
        entry: DispatchEntry,
        *,
        error: str,
        retry_at: datetime,
        now: datetime | None = None,
    ) -> None:
        """*write*: and, when the entry was pending, its
        :func:`~deepwork_retry._core.events.dispatch_failed` event (at ``now``, by
        default the wall clock)."""
        written = ex.execute(
            self.sql.mark_failed,
            (
                codec.text(error), codec.ts(retry_at), codec.text(entry.project_id),
                codec.text(entry.task_id), entry.attempt,
            ),
        ).rowcount  # fmt: skip
        if written:
            at = datetime.now(timezone.utc) if now is None else now
            failed = lifecycle.dispatch_failed(entry, error=error, retry_at=retry_at, now=at)
            self._store_events(ex, entry.project_id, (failed,))

    def redeliver_stale(
        self, ex: Executor, *, now: datetime, delivered_before: datetime, limit: int
    ) -> list[DispatchEntry]:
        """*write*"""
        check_limit(limit)
        at, error = codec.ts(now), codec.text(REDELIVERED)
        rows = ex.execute(self.sql.stale, (codec.ts(delivered_before), limit)).fetchall()
        first = self._next_pending(ex)
        if rows:
            ex.executemany(
                self.sql.redeliver,
                [(at, error, first + n, row[0]) for n, row in enumerate(rows)],
            )
        return [
            attrs.evolve(
                codec.entry(row[1:]),
                state=DispatchState.PENDING,
                available_at=now,
                claimed_until=None,
                last_error=REDELIVERED,
            )
            for row in rows
        ]

    def expired_leases(self, ex: Executor, *, now: datetime, limit: int) -> list[Task]:
        check_limit(limit)
        rows = ex.execute(self.sql.expired_leases, (codec.ts(now), limit))
        return [codec.task(row) for row in rows.fetchall()]

    # -- idempotency -------------------------------------------------------------------------
    def get_idempotency(
        self, ex: Executor, key: str, *, lock: bool = False
    ) -> IdempotencyRecord | None:
        sql = self.sql.idem_locked if lock else self.sql.idem
        row = ex.execute(sql, (codec.text(key),)).fetchone()
        return None if row is None else codec.idem(row)

    def save_idempotency(self, ex: Executor, record: IdempotencyRecord) -> IdempotencyRecord:
        """*write*"""
        params = codec.idem_params(record)
        existing = self.get_idempotency(ex, record.key, lock=True)
        if existing is None:
            if self._inserted(ex, self.sql.insert_idem, params):
                return record
            existing = self._taken(ex, record.key)  # saved meanwhile, where rows are locked
        if (
            existing is not None
            and not existing.expired(record.created_at)
            and (existing.status_code is not None or existing.created_at != record.created_at)
        ):
            return existing
        ex.execute(self.sql.upsert_idem, params)
        return record

    # -- lifecycle events ----------------------------------------------------------------------
    def _store_events(
        self, ex: Executor, project_id: str, events: Sequence[Event], last: int | None = None
    ) -> None:
        """*write*: ``events`` numbered after ``last``, the project's last number before
        them (``None``: the project's numbering is moved on here, by as many), stored."""
        if not events:
            return
        pid = codec.text(project_id)
        if last is None:
            count = len(events)
            if self.dialect.returning:
                rows = ex.execute(self.sql.bump_events_returning, (count, pid)).fetchall()
            else:
                ex.execute(self.sql.bump_events, (count, pid))
                rows = ex.execute(self.sql.event_seq, (pid,)).fetchall()
            if not rows:
                raise ProjectNotFound(project_id)
            last = int(rows[0][0]) - count
        for start in range(0, len(events), _EVENTS_PER_INSERT):
            chunk = events[start : start + _EVENTS_PER_INSERT]
            params = [
                value
                for seq, e in enumerate(chunk, last + 1)
                for value in codec.event_params(e, seq)
            ]
            last += len(chunk)
            ex.execute(self.sql.insert_events(len(chunk)), params)

    def events(
        self, ex: Executor, project_id: str, *, after: int = 0, limit: int = 100
    ) -> list[Event]:
        check_limit(limit)
        if after.__class__ is not int or after < 0:
            raise InvalidInput("after must be an integer >= 0")
        self.get_project(ex, project_id)
        rows = ex.execute(self.sql.events, (codec.text(project_id), after, limit)).fetchall()
        return [codec.event(row) for row in rows]

    def claim_events(
        self, ex: Executor, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[Event]:
        """*write*: the caller's write transaction serialises claimers (SQLite's write
        lock, MySQL's writer turn), so the per-task order rule holds between them: an
        event is skipped while an earlier pending event of its task is held."""
        check_limit(limit)
        at, until = codec.ts(now), codec.ts(claimed_until)
        held: dict[tuple[Any, Any], int] = {}
        for pid, tid, seq in ex.execute(self.sql.held_events, (at,)).fetchall():
            if tid is not None:
                held[(pid, tid)] = min(seq, held.get((pid, tid), seq))
        rows: list[Any] = []
        page = ex.execute(self.sql.claimable_events, (at, limit)).fetchall()
        while page:
            for row in page:
                first = None if row[3] is None else held.get((row[0], row[3]))
                if first is None or first > row[1]:
                    rows.append(row)
                    if len(rows) == limit:
                        break
            if len(rows) == limit or len(page) < limit:
                break
            last = page[-1]
            page = ex.execute(
                self.sql.claimable_events_after, (at, last[0], last[1], limit)
            ).fetchall()
        if rows:
            ex.executemany(self.sql.claim_event, [(until, row[0], row[1]) for row in rows])
        return [codec.event(row) for row in rows]

    def settle_events(
        self,
        ex: Executor,
        events: Sequence[Event],
        *,
        now: datetime,
        failures: Sequence[EventRetry] = (),
    ) -> None:
        """*write*"""
        at = codec.ts(now)
        if events:
            ex.executemany(
                self.sql.settle_event, [(at, codec.text(e.project_id), e.seq) for e in events]
            )
        if failures:
            ex.executemany(self.sql.upsert_event_retry, [retry_params(f) for f in failures])

    def claim_event_retries(
        self, ex: Executor, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[EventRetry]:
        """*write*"""
        check_limit(limit)
        at, until = codec.ts(now), codec.ts(claimed_until)
        rows = ex.execute(self.sql.claimable_retries, (at, limit)).fetchall()
        if rows:
            ex.executemany(self.sql.claim_retry, [(until, row[0], row[1], row[2]) for row in rows])
        return [attrs.evolve(codec.event_retry(row), claimed_until=claimed_until) for row in rows]

    def settle_event_retry(
        self,
        ex: Executor,
        retry: EventRetry,
        *,
        now: datetime,
        error: str | None = None,
        retry_at: datetime | None = None,
    ) -> None:
        """*write*"""
        event = retry.event
        key = (codec.text(event.project_id), event.seq, codec.text(retry.subscriber))
        if error is None:
            ex.execute(self.sql.retry_delivered, key)
        elif retry_at is not None:
            ex.execute(self.sql.retry_again, (codec.ts(retry_at), codec.text(error), *key))
        else:
            ex.execute(self.sql.retry_parked, (codec.text(error), *key))

    def parked_events(
        self, ex: Executor, *, subscriber: str | None = None, limit: int = 100
    ) -> list[EventRetry]:
        check_limit(limit)
        if subscriber is None:
            rows = ex.execute(self.sql.parked[False], (limit,)).fetchall()
        else:
            rows = ex.execute(self.sql.parked[True], (codec.text(subscriber), limit)).fetchall()
        return [codec.event_retry(row) for row in rows]

    def replay_parked(
        self,
        ex: Executor,
        *,
        now: datetime,
        subscriber: str | None = None,
        event_ids: Sequence[str] | None = None,
    ) -> int:
        """*write*: an id that names no event (``project_id:seq``) replays nothing."""
        by_subscriber = subscriber is not None
        head: tuple[Any, ...] = (codec.ts(now),)
        if subscriber is not None:
            head += (codec.text(subscriber),)
        if event_ids is None:
            return int(ex.execute(self.sql.replay[(by_subscriber, False)], head).rowcount)
        replayed = 0
        for event_id in dict.fromkeys(event_ids):
            project_id, _, seq = str(event_id).rpartition(":")
            if not project_id or not (seq.isascii() and seq.isdigit()):
                continue
            statement = self.sql.replay[(by_subscriber, True)]
            replayed += ex.execute(statement, (*head, codec.text(project_id), int(seq))).rowcount
        return replayed

    # -- retention ---------------------------------------------------------------------------
    def prune_statements(self, rule: PruneRule) -> list[tuple[str, tuple[int, int] | None]]:
        """Each table's delete for ``rule`` (idempotency, outbox, attempts, events), with its
        parameters (``None``: nothing to do). Each runs in its own write transaction."""

        def bound(cutoff: datetime | None) -> tuple[int, int] | None:
            return None if cutoff is None else (codec.ts(cutoff), rule.batch)

        idempotency, outbox, attempts, events = self.sql.prune
        return [
            (idempotency, bound(rule.now)),
            (outbox, bound(rule.delivered_before)),
            (attempts, bound(rule.finished_before)),
            (events, bound(rule.delivered_before)),
        ]

    # -- migrations (a dialect recording them in a table) ------------------------------------
    def pending_migrations(self, ex: Executor) -> list[common.Migration]:
        """The dialect's shipped migrations (``sql/<name>/``) not yet recorded as applied;
        the table must exist (else the driver's error: a database without our schema)."""
        rows = ex.execute(self.dialect.sql("SELECT number FROM schema_migrations"), ())
        return common.pending(common.migrations(self.dialect.name), [r[0] for r in rows.fetchall()])

    def migrate(self, ex: Executor, *, now: datetime) -> list[int]:
        """*write*: apply the pending migrations in order, each recorded as applied right
        after its statements (where DDL commits by itself, as on MySQL, a failed run
        resumes at the migration that failed); the numbers applied.

        The caller serialises processes migrating one database at once (an
        advisory lock: ``GET_LOCK`` on MySQL) around this call.
        """
        q = self.dialect.sql
        ex.execute(q(MIGRATIONS_TABLE), ())
        applied = []
        for migration in self.pending_migrations(ex):
            for statement in split_script(migration.text):
                ex.execute(q(statement), ())
            ex.execute(
                q("INSERT INTO schema_migrations (number, name, applied_at) VALUES (?, ?, ?)"),
                (migration.number, migration.name, codec.ts(now)),
            )
            applied.append(migration.number)
        return applied

    @staticmethod
    def pruned(counts: Sequence[int]) -> Pruned:
        """The result of the statements of :meth:`prune_statements` (rows deleted by each)."""
        return Pruned(
            idempotency=counts[0], outbox=counts[1], attempts=counts[2], events=counts[3],
            batches=1,
        )  # fmt: skip


def retry_params(retry: EventRetry) -> tuple[Any, ...]:
    """A failed delivery as the parameters of its row (:data:`common.EVENT_RETRY_COLUMNS`)."""
    event = retry.event
    return (
        codec.text(event.project_id), event.seq, codec.text(retry.subscriber), retry.tries,
        codec.ts(retry.retry_at), codec.otext(retry.last_error), 1 if retry.parked else 0,
        codec.ots(retry.claimed_until),
    )  # fmt: skip
