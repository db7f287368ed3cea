"""Storage in the host's own Django database, through Django's ORM and connections.

:class:`DjangoStorage` implements the sync :class:`~deepwork_retry.ports.Storage`
port over the models of this app (:mod:`deepwork_retry.web.django.models`) on
one database alias (``using``):

- every call runs in ``transaction.atomic(using=alias)``: on its own it is a
  transaction of its own; inside a host's ``atomic`` block it is a savepoint
  of the host's transaction, so the retry commits or rolls back with the
  host's own writes, and a refused call (a conflict, a rule) rolls back to
  its savepoint without spoiling the host's transaction;
- rows a decision read are locked with ``select_for_update()`` (the task, the
  tasks a plan guards, the project) before the compare-and-set, taken in id
  order so two plans never wait for each other; the task itself is written
  with an ``update()`` filtered on the version it expects;
- on SQLite, where ``select_for_update()`` does nothing, every write first
  takes the database's write lock (SQLite has one lock for the whole file);
- it is an :class:`~deepwork_retry.ports.EventLog`: every move writes its
  lifecycle events (:mod:`deepwork_retry._core.events`) in its own
  transaction, numbered per project with ``Project.event_seq``, whose
  ``update()`` locks the project's row until the commit, so a project's
  events commit in the order they are numbered;
- it joins the host's transaction
  (:class:`~deepwork_retry.ports.JoinsHostTransaction`): the services hand
  the dispatch of a retry to :meth:`DjangoStorage.after_commit`, that is to
  ``transaction.on_commit``, so nothing is dispatched for a retry the host
  rolls back.

The storage applies the plans the core makes (:mod:`deepwork_retry._core`); it
decides nothing itself. Driver errors become library errors in one place
(:meth:`DjangoStorage._translated`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from deepwork_retry._core import events as ev
from deepwork_retry._core.events import Event, EventRetry, EventType
from deepwork_retry._core.inputs import check_blocked_page, check_limit, check_projects_page
from deepwork_retry._core.model import (
    Attempt,
    DispatchEntry,
    IdempotencyRecord,
    Progress,
    Project,
    ProjectSummary,
    Task,
    evolve_entry,
)
from deepwork_retry._core.plans import Applied, AttemptUpdate, Plan, ProjectPlan, Release
from deepwork_retry._core.retention import (
    AWAITING_START,
    FINISHED,
    PRUNED_ENTRY_STATE,
    Pruned,
    PruneRule,
)
from deepwork_retry._core.states import (
    BlockedReason,
    DispatchState,
    Outcome,
    ProjectStatus,
    RetryBudget,
    TaskStatus,
    Trigger,
)
from deepwork_retry.exceptions import (
    AlreadyExists,
    ConfigurationError,
    IdempotencyConflict,
    InvalidInput,
    ProjectNotFound,
    StorageCorrupt,
    StorageError,
    StorageUnavailable,
    TaskNotFound,
    VersionConflict,
)
from deepwork_retry.ports import REDELIVERED
from deepwork_retry.storage._sql.common import after_bound, chunks, listed
from deepwork_retry.storage._validate import check_new_tasks

try:
    from django.conf import settings
    from django.db import (
        DatabaseError,
        DataError,
        IntegrityError,
        InterfaceError,
        OperationalError,
        ProgrammingError,
        connections,
        transaction,
    )
    from django.db.models import Exists, F, Max, OuterRef, Q, Subquery
    from django.db.models.functions import Collate, Length
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    from deepwork_retry.exceptions import missing_extra

    raise missing_extra("django", __name__, exc) from exc

from deepwork_retry.web.django import models as m

__all__ = ["DjangoStorage"]

_PENDING = DispatchState.PENDING.value
_DEFERRED = DispatchState.DEFERRED.value
_DELIVERED = DispatchState.DELIVERED.value
_COUNTERS = ("total", *(status.value for status in TaskStatus))
_CHUNK = 500
"""Ids per ``IN (...)`` list."""
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_ID_ORDER = {"postgresql": "C", "mysql": "utf8mb4_bin"}
"""The collation that sorts ids by code point, as Python sorts str (SQLite's default does)."""
_LOCK_SQLITE = "UPDATE deepwork_retry_project SET version = version WHERE 0 = 1"
"""A write that changes nothing: it takes SQLite's write lock as a transaction begins."""


_CLAIM_LOCK = 0x64775F6576656E74
"""PostgreSQL advisory lock key that serialises event claims ("dw_event")."""


_LOST_RACE = frozenset({"40P01", "40001"})
"""SQLSTATEs of a deadlock and a serialisation failure: another writer won."""


def _lost_race(exc: BaseException) -> bool:
    """Whether ``exc`` (a translated error) came from a deadlock or serialisation failure.

    Rows are locked in one order, so this is rare; inside a plan's apply it means
    another writer changed what the plan read: a conflict, which the services
    answer by deciding again, not an outage.
    """
    cause: BaseException | None = exc
    while cause is not None:
        if getattr(cause, "sqlstate", None) in _LOST_RACE:
            return True
        cause = cause.__cause__
    return False


def _findable(value: object) -> bool:
    """Whether ``value`` could be a stored id (anything else is simply not found)."""
    return isinstance(value, str) and _UNSTORABLE.search(value) is None


def _diagnostic(value: str | None) -> str | None:
    """Error text as every database can hold it: NUL and lone surrogates become U+FFFD."""
    return None if value is None else _UNSTORABLE.sub("\ufffd", value)


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(f"timestamps must be timezone-aware, got {value!r}")
    return value


def _oaware(value: datetime | None) -> datetime | None:
    return None if value is None else _aware(value)


def _json(what: str, value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"task {what} must be JSON-serialisable: {exc}") from exc
    return value


def _text(value: str) -> str:
    if _UNSTORABLE.search(value) is not None:
        raise InvalidInput("text must not hold NUL characters or lone surrogates")
    return value


# -- values to rows ---------------------------------------------------------------------


def _task_fields(task: Task) -> dict[str, Any]:
    """The columns of ``task`` other than its ids."""
    return {
        "title": _text(task.title),
        "status": TaskStatus(task.status).value,
        "retry_count": task.retry_count,
        "max_retries": task.max_retries,
        "retries_left": task.retries_left,
        "error_message": _diagnostic(task.error_message),
        "error_type": _diagnostic(task.error_type),
        "blocked_reason": None
        if task.blocked_reason is None
        else BlockedReason(task.blocked_reason).value,
        "blocked_by": [_text(dep) for dep in task.blocked_by],
        "attempt": task.attempt,
        "lease_expires_at": _oaware(task.lease_expires_at),
        "created_at": _aware(task.created_at),
        "updated_at": _aware(task.updated_at),
        "started_at": _oaware(task.started_at),
        "completed_at": _oaware(task.completed_at),
        "version": task.version,
        "metadata": _json("metadata", dict(task.metadata)),
    }


def _project_fields(project: Project) -> dict[str, Any]:
    return {
        "status": ProjectStatus(project.status).value,
        "name": _text(project.name),
        "created_at": _aware(project.created_at),
        "updated_at": _aware(project.updated_at),
        "version": project.version,
    }


def _attempt_fields(attempt: Attempt) -> dict[str, Any]:
    return {
        "project_id": attempt.project_id,
        "task_id": attempt.task_id,
        "number": attempt.number,
        "trigger": Trigger(attempt.trigger).value,
        "dispatched_at": _aware(attempt.dispatched_at),
        "available_at": _aware(attempt.available_at),
        "actor": None if attempt.actor is None else _text(attempt.actor),
        "reason": None if attempt.reason is None else _text(attempt.reason),
        "budget": None if attempt.budget is None else RetryBudget(attempt.budget).value,
        "started_at": _oaware(attempt.started_at),
        "finished_at": _oaware(attempt.finished_at),
        "outcome": None if attempt.outcome is None else Outcome(attempt.outcome).value,
        "error_type": _diagnostic(attempt.error_type),
        "error_message": _diagnostic(attempt.error_message),
    }


def _entry_fields(entry: DispatchEntry) -> dict[str, Any]:
    return {
        "project_id": entry.project_id,
        "task_id": entry.task_id,
        "attempt": entry.attempt,
        "state": DispatchState(entry.state).value,
        "available_at": _aware(entry.available_at),
        "created_at": _aware(entry.created_at),
        "claimed_until": _oaware(entry.claimed_until),
        "tries": entry.tries,
        "last_error": _diagnostic(entry.last_error),
        "delivered_at": _oaware(entry.delivered_at),
        "trace": None if entry.trace is None else _text(entry.trace),
    }


def _idem_fields(record: IdempotencyRecord) -> dict[str, Any]:
    return {
        "project_id": _text(record.project_id),
        "task_id": _text(record.task_id),
        "created_at": _aware(record.created_at),
        "status_code": record.status_code,
        "body": None if record.body is None else _text(record.body),
        "expires_at": _aware(record.expires_at),
    }


# -- rows to values -------------------------------------------------------------------


def _task(row: m.Task) -> Task:
    return Task(
        id=row.task_id,
        project_id=row.project_id,
        title=row.title,
        status=TaskStatus(row.status),
        retry_count=row.retry_count,
        max_retries=row.max_retries,
        retries_left=row.retries_left,
        error_message=row.error_message,
        error_type=row.error_type,
        blocked_reason=None if row.blocked_reason is None else BlockedReason(row.blocked_reason),
        blocked_by=tuple(row.blocked_by),
        attempt=row.attempt,
        lease_expires_at=row.lease_expires_at,
        created_at=row.created_at,
        updated_at=row.updated_at,
        started_at=row.started_at,
        completed_at=row.completed_at,
        version=row.version,
        metadata=row.metadata,
    )


def _project(row: m.Project) -> Project:
    return Project(
        id=row.id,
        status=ProjectStatus(row.status),
        name=row.name,
        created_at=row.created_at,
        updated_at=row.updated_at,
        version=row.version,
    )


def _progress(project_id: str, counters: Sequence[int]) -> Progress:
    return Progress(project_id=project_id, **dict(zip(_COUNTERS, counters, strict=True)))


def _attempt(row: m.Attempt) -> Attempt:
    return Attempt(
        task_id=row.task_id,
        project_id=row.project_id,
        number=row.number,
        trigger=Trigger(row.trigger),
        dispatched_at=row.dispatched_at,
        available_at=row.available_at,
        actor=row.actor,
        reason=row.reason,
        budget=None if row.budget is None else RetryBudget(row.budget),
        started_at=row.started_at,
        finished_at=row.finished_at,
        outcome=None if row.outcome is None else Outcome(row.outcome),
        error_type=row.error_type,
        error_message=row.error_message,
    )


def _entry(row: m.OutboxEntry) -> DispatchEntry:
    return DispatchEntry(
        project_id=row.project_id,
        task_id=row.task_id,
        attempt=row.attempt,
        state=DispatchState(row.state),
        available_at=row.available_at,
        created_at=row.created_at,
        claimed_until=row.claimed_until,
        tries=row.tries,
        last_error=row.last_error,
        delivered_at=row.delivered_at,
        trace=row.trace,
    )


def _event_row(event: Event) -> m.Event:
    return m.Event(
        project_id=event.project_id,
        seq=event.seq,
        type=EventType(event.type).value,
        task_id=event.task_id,
        attempt=event.attempt,
        at=_aware(event.at),
        data=ev.data_text(event.data),
    )


def _event(row: m.Event) -> Event:
    return Event(
        project_id=row.project_id,
        seq=row.seq,
        type=EventType(row.type),
        task_id=row.task_id,
        attempt=row.attempt,
        at=row.at,
        data=ev.data_value(row.data),
    )


def _event_id(value: object) -> tuple[str, int] | None:
    """``(project_id, seq)`` of an :attr:`Event.id` (``None`` when it cannot be one)."""
    if not isinstance(value, str) or ":" not in value:
        return None
    pid, _, seq = value.rpartition(":")
    if not seq.isascii() or not seq.isdigit() or not _findable(pid):
        return None
    return pid, int(seq)


def _idem(row: m.IdempotencyRecord) -> IdempotencyRecord:
    return IdempotencyRecord(
        key=row.key,
        project_id=row.project_id,
        task_id=row.task_id,
        created_at=row.created_at,
        status_code=row.status_code,
        body=row.body,
        expires_at=row.expires_at,
    )


class DjangoStorage:
    """A :class:`~deepwork_retry.ports.Storage` in the Django database ``using``.

    The tables come from this app's migrations (``manage.py migrate``). Needs
    ``USE_TZ = True``. Safe to share between threads: each thread uses its own
    Django connection, as Django does. On SQLite, configure the alias with
    ``"OPTIONS": {"transaction_mode": "IMMEDIATE"}`` (Django 5.1+) so that a
    host's own read-then-write transactions wait for the lock too.
    """

    def __init__(self, using: str = "default") -> None:
        if not isinstance(using, str) or using not in settings.DATABASES:
            known = ", ".join(sorted(settings.DATABASES)) or "none"
            raise ConfigurationError(
                f"DjangoStorage: no database alias {using!r} in settings.DATABASES "
                f"(configured: {known})"
            )
        if not settings.USE_TZ:
            raise ConfigurationError(
                "DjangoStorage needs USE_TZ = True: it stores timezone-aware timestamps"
            )
        self.using = using

    def __repr__(self) -> str:
        return f"DjangoStorage(using={self.using!r})"

    # -- transactions --------------------------------------------------------------
    @contextmanager
    def _tx(self, *, write: bool) -> Iterator[str]:
        """One atomic block on the alias (a savepoint inside the host's); driver
        errors leave it as library errors, after it rolled back."""
        connection = connections[self.using]
        joined = connection.in_atomic_block
        try:
            with transaction.atomic(using=self.using):
                if write and connection.vendor == "sqlite":
                    with connection.cursor() as cursor:
                        cursor.execute(_LOCK_SQLITE)
                yield self.using
        except (DatabaseError, OverflowError, UnicodeEncodeError) as exc:
            if not joined and isinstance(exc, (OperationalError, InterfaceError)):
                # A broken connection is opened again on the next call.
                connection.close_if_unusable_or_obsolete()
            raise self._translated(exc) from exc

    @contextmanager
    def _reading(self) -> Iterator[str]:
        """One read statement: atomic by itself, in the host's transaction or on its own
        (no block, so on SQLite a read never waits for the write lock)."""
        connection = connections[self.using]
        joined = connection.in_atomic_block
        try:
            yield self.using
        except (DatabaseError, OverflowError, UnicodeEncodeError) as exc:
            if not joined and isinstance(exc, (OperationalError, InterfaceError)):
                connection.close_if_unusable_or_obsolete()
            raise self._translated(exc) from exc

    def _translated(self, exc: BaseException) -> Exception:
        """The library error for a driver error (see :meth:`_tx`)."""
        where = f"Django database {self.using!r}"
        if isinstance(exc, (OverflowError, DataError)):
            return InvalidInput(f"a value {where} cannot store: {exc}")
        if isinstance(exc, UnicodeEncodeError):
            return InvalidInput(f"text {where} cannot store (lone surrogates)")
        missing = "no such table" in str(exc) or "no such column" in str(exc)  # SQLite's words
        if isinstance(exc, (OperationalError, InterfaceError)) and not missing:
            return StorageUnavailable(f"{where} failed: {exc}")
        if isinstance(exc, ProgrammingError) or missing:
            return StorageCorrupt(
                f"{where} does not have the expected tables (run manage.py migrate): {exc}"
            )
        return StorageError(f"{where} failed: {exc}")

    def _id_order(self, field: str) -> Any:
        """``field`` as an expression that sorts and compares ids by code point."""
        collation = _ID_ORDER.get(connections[self.using].vendor)
        return F(field) if collation is None else Collate(F(field), collation)

    def _exactly(self, rows: Any, field: str, value: str) -> Any:
        """``rows`` whose text ``field`` equals ``value`` character for character (on
        MySQL, in the binary collation, of the same length: it ignores trailing spaces)."""
        if connections[self.using].vendor != "mysql":
            return rows.filter(**{field: value})
        return rows.annotate(
            _exact=Collate(F(field), _ID_ORDER["mysql"]), _exact_length=Length(field)
        ).filter(_exact=value, _exact_length=len(value))

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the transaction on the alias commits (at once outside
        one), never if it rolls back: ``transaction.on_commit(callback, using=alias)``."""
        transaction.on_commit(callback, using=self.using)

    # -- setup -------------------------------------------------------------
    def create_project(self, project: Project) -> None:
        if not isinstance(project.id, str):
            raise InvalidInput("project id must be a string")
        fields = _project_fields(project)
        with self._tx(write=True) as db:
            if m.Project.objects.using(db).filter(id=_text(project.id)).exists():
                raise AlreadyExists(f"Project {project.id!r} exists already")
            try:
                with transaction.atomic(using=db):
                    m.Project.objects.using(db).create(id=project.id, **fields)
            except IntegrityError:
                raise AlreadyExists(f"Project {project.id!r} exists already") from None

    def add_tasks(self, tasks: Sequence[Task]) -> None:
        check_new_tasks(tasks)
        rows = [
            m.Task(project_id=_text(t.project_id), task_id=_text(t.id), **_task_fields(t))
            for t in tasks
        ]
        with self._tx(write=True) as db:
            pids = list(dict.fromkeys(t.project_id for t in tasks))
            known = set(
                m.Project.objects.using(db).filter(id__in=pids).values_list("id", flat=True)
            )
            taken: set[tuple[str, str]] = set()
            for pid in known:
                ids = [t.id for t in tasks if t.project_id == pid]
                for start in range(0, len(ids), _CHUNK):
                    found = m.Task.objects.using(db).filter(
                        project_id=pid, task_id__in=ids[start : start + _CHUNK]
                    )
                    taken.update((pid, tid) for tid in found.values_list("task_id", flat=True))
            for task in tasks:
                if task.project_id not in known:
                    raise ProjectNotFound(task.project_id)
                if (task.project_id, task.id) in taken:
                    raise AlreadyExists(f"Task {task.id!r} exists already in {task.project_id!r}")
            try:
                with transaction.atomic(using=db):
                    m.Task.objects.using(db).bulk_create(rows, batch_size=_CHUNK)
            except IntegrityError:
                raise AlreadyExists("a task of the batch exists already") from None
            deps = [
                m.TaskDependency(project_id=t.project_id, blocker_id=dep, task_id=t.id)
                for t in tasks
                for dep in dict.fromkeys(t.blocked_by)
            ]
            m.TaskDependency.objects.using(db).bulk_create(
                deps, batch_size=_CHUNK, ignore_conflicts=True
            )
            added: dict[str, dict[str, int]] = {}
            made: dict[str, list[Event]] = {}
            for task in tasks:
                counts = added.setdefault(task.project_id, {})
                status = TaskStatus(task.status).value
                counts[status] = counts.get(status, 0) + 1
                made.setdefault(task.project_id, []).append(ev.added(task))
            events: list[m.Event] = []
            for pid, counts in added.items():
                changes = {s: F(s) + n for s, n in counts.items()}
                news = tuple(made[pid])
                projects = m.Project.objects.using(db).filter(id=pid)
                projects.update(
                    total=F("total") + sum(counts.values()),
                    event_seq=F("event_seq") + len(news),
                    **changes,
                )
                last = projects.values_list("event_seq", flat=True)[0] - len(news)
                events.extend(_event_row(e) for e in ev.numbered(news, last))
            m.Event.objects.using(db).bulk_create(events, batch_size=_CHUNK)

    # -- reads ---------------------------------------------------------------
    def _get_project(self, db: str, project_id: str) -> Project:
        rows = list(m.Project.objects.using(db).filter(id=project_id)[:1])
        if not rows:
            raise ProjectNotFound(project_id)
        return _project(rows[0])

    def _get_task(self, db: str, project_id: str, task_id: str) -> Task:
        if not (_findable(project_id) and _findable(task_id)):
            raise TaskNotFound(project_id, task_id)
        rows = list(m.Task.objects.using(db).filter(project_id=project_id, task_id=task_id)[:1])
        if not rows:
            raise TaskNotFound(project_id, task_id)
        return _task(rows[0])

    def get_project(self, project_id: str) -> Project:
        if not _findable(project_id):
            raise ProjectNotFound(project_id)
        with self._reading() as db:
            return self._get_project(db, project_id)

    def load(self, project_id: str, task_id: str) -> tuple[Project, Task]:
        if not _findable(project_id):
            raise ProjectNotFound(project_id)
        if not _findable(task_id):
            self.get_project(project_id)
            raise TaskNotFound(project_id, task_id)
        with self._reading() as db:
            # One statement: the task with its project, read together.
            tasks = m.Task.objects.using(db).select_related("project")
            rows = list(tasks.filter(project_id=project_id, task_id=task_id)[:1])
            if rows:
                return _project(rows[0].project), _task(rows[0])
            self._get_project(db, project_id)
        raise TaskNotFound(project_id, task_id)

    def get_tasks(self, project_id: str, task_ids: Sequence[str]) -> dict[str, Task]:
        wanted = [tid for tid in dict.fromkeys(task_ids) if _findable(tid)]
        if not _findable(project_id) or not wanted:
            return {}
        with self._tx(write=False) as db:
            return self._get_tasks(db, project_id, wanted)

    def _get_tasks(self, db: str, project_id: str, task_ids: Sequence[str]) -> dict[str, Task]:
        found: dict[str, Task] = {}
        for start in range(0, len(task_ids), _CHUNK):
            rows = m.Task.objects.using(db).filter(
                project_id=project_id, task_id__in=task_ids[start : start + _CHUNK]
            )
            found.update((row.task_id, _task(row)) for row in rows)
        return {tid: found[tid] for tid in task_ids if tid in found}

    def dependants(self, project_id: str, task_id: str) -> list[Task]:
        if not (_findable(project_id) and _findable(task_id)):
            return []
        with self._tx(write=False) as db:
            ids = list(
                m.TaskDependency.objects.using(db)
                .filter(project_id=project_id, blocker_id=task_id)
                .values_list("task_id", flat=True)
            )
            found = self._get_tasks(db, project_id, ids)
        return [found[tid] for tid in sorted(found)]

    def list_tasks(
        self,
        project_id: str,
        *,
        status: TaskStatus | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[Task]:
        check_limit(limit)
        if not _findable(project_id):
            raise ProjectNotFound(project_id)
        with self._tx(write=False) as db:
            self._get_project(db, project_id)
            rows = m.Task.objects.using(db).filter(project_id=project_id)
            if status is not None:
                rows = rows.filter(status=TaskStatus(status).value)
            rows = rows.annotate(_order=self._id_order("task_id"))
            if after is not None:
                op, bound = after_bound(after, _UNSTORABLE)
                rows = rows.filter(**{"_order__gt" if op == ">" else "_order__gte": bound})
            return [_task(row) for row in rows.order_by("_order")[:limit]]

    def progress(self, project_id: str) -> Progress:
        if not _findable(project_id):
            raise ProjectNotFound(project_id)
        with self._reading() as db:
            rows = list(m.Project.objects.using(db).filter(id=project_id).values_list(*_COUNTERS))
        if not rows:
            raise ProjectNotFound(project_id)
        return _progress(project_id, rows[0])

    # -- reads across projects (the ProjectOverview port) ---------------------------
    def list_projects(
        self,
        *,
        projects: frozenset[str] | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[ProjectSummary]:
        """Projects by id (code point order) with their progress, the project row's own
        counters: one query, or one per 500 ids of ``projects``."""
        projects, after = check_projects_page(projects, after, limit)
        runs: list[list[str] | None] = [None]
        if projects is not None:
            runs = list(chunks(listed(projects, after, inclusive=False, storable=_findable)))
        found: list[ProjectSummary] = []
        with self._tx(write=False) as db:
            for run in runs:
                rows = m.Project.objects.using(db).annotate(_order=self._id_order("id"))
                if run is not None:
                    rows = rows.filter(id__in=run)
                elif after is not None:
                    op, bound = after_bound(after, _UNSTORABLE)
                    rows = rows.filter(**{"_order__gt" if op == ">" else "_order__gte": bound})
                for row in rows.order_by("_order")[: limit - len(found)]:
                    counters = [getattr(row, name) for name in _COUNTERS]
                    found.append(
                        ProjectSummary(project=_project(row), progress=_progress(row.id, counters))
                    )
                if len(found) == limit:
                    break
        return found

    def blocked_tasks(
        self,
        *,
        projects: frozenset[str] | None = None,
        error_type: str | None = None,
        after: tuple[str, str] | None = None,
        limit: int = 100,
    ) -> list[Task]:
        """Blocked tasks across projects by ``(project_id, task id)`` in code point order,
        found by the index that leads with the status: one query, or one per 500 ids of
        ``projects``."""
        projects, error_type, after = check_blocked_page(projects, error_type, after, limit)
        if error_type is not None and not _findable(error_type):
            return []  # stored error types hold no lone surrogate
        runs: list[list[str] | None] = [None]
        if projects is not None:
            start = None if after is None else after[0]
            runs = list(chunks(listed(projects, start, inclusive=True, storable=_findable)))
        found: list[Task] = []
        with self._tx(write=False) as db:
            for run in runs:
                rows = m.Task.objects.using(db).filter(status=TaskStatus.BLOCKED.value)
                if run is not None:
                    rows = rows.filter(project_id__in=run)
                if error_type is not None:
                    rows = self._exactly(rows, "error_type", error_type)
                rows = rows.annotate(
                    _project=self._id_order("project_id"), _order=self._id_order("task_id")
                )
                if after is not None:
                    rows = rows.filter(self._after_pair(*after))
                for row in rows.order_by("_project", "_order")[: limit - len(found)]:
                    found.append(_task(row))
                if len(found) == limit:
                    break
        return found

    @staticmethod
    def _after_pair(project_id: str, task_id: str) -> Q:
        """``(project, task id) > (project_id, task_id)`` on the collated annotations
        ``_project`` and ``_order``, for bounds the database may not be able to hold."""
        op, bound = after_bound(project_id, _UNSTORABLE)
        if op != ">" or bound != project_id:  # no stored project has this id
            return Q(**{"_project__gt" if op == ">" else "_project__gte": bound})
        op, task_bound = after_bound(task_id, _UNSTORABLE)
        same = {"_project": project_id, "_order__gt" if op == ">" else "_order__gte": task_bound}
        return Q(_project__gt=project_id) | Q(**same)

    def attempts(self, project_id: str, task_id: str) -> list[Attempt]:
        with self._tx(write=False) as db:
            self._get_task(db, project_id, task_id)
            rows = m.Attempt.objects.using(db).filter(project_id=project_id, task_id=task_id)
            return [_attempt(row) for row in rows.order_by("number")]

    def dispatches(self, project_id: str, task_id: str) -> list[DispatchEntry]:
        with self._tx(write=False) as db:
            task = self._get_task(db, project_id, task_id)
            rows = m.OutboxEntry.objects.using(db).filter(
                project_id=project_id, task_id=task_id, attempt__gte=1, attempt__lte=task.attempt
            )
            return [_entry(row) for row in rows.order_by("attempt")]

    def deferred(self, project_id: str) -> list[DispatchEntry]:
        if not _findable(project_id):
            return []
        with self._reading() as db:
            rows = m.OutboxEntry.objects.using(db).filter(project_id=project_id, state=_DEFERRED)
            return [_entry(row) for row in rows.order_by("seq")]

    # -- writes ----------------------------------------------------------------
    def _lock_versions(self, db: str, project_id: str, task_ids: Sequence[str]) -> dict[str, int]:
        """The versions of the tasks ``task_ids``, their rows locked, in id order."""
        rows = (
            m.Task.objects.using(db)
            .select_for_update()
            .filter(project_id=project_id, task_id__in=sorted(set(task_ids)))
            .order_by("task_id")
            .values_list("task_id", "version")
        )
        return dict(rows)

    def apply(self, plan: Plan) -> Applied:
        before, after = plan.before, plan.after
        if after.id != before.id or after.project_id != before.project_id:
            raise InvalidInput("a plan cannot change a task's id or project")
        pid, tid = before.project_id, before.id
        if not (_findable(pid) and _findable(tid)):
            raise TaskNotFound(pid, tid)
        # Everything serialised first: a value the database cannot hold fails before any write.
        fields = _task_fields(after)
        new_attempt = None if plan.new_attempt is None else _attempt_fields(plan.new_attempt)
        entry = None if plan.dispatch is None else _entry_fields(plan.dispatch)
        idem = None if plan.idempotency is None else _idem_fields(plan.idempotency)
        for guard in plan.guards:
            if not _findable(guard.task_id):
                raise VersionConflict(guard.task_id, guard.version, None)
        try:
            with self._tx(write=True) as db:
                return self._apply_in(db, plan, fields, new_attempt, entry, idem)
        except StorageUnavailable as exc:
            if _lost_race(exc):
                raise VersionConflict(tid, before.version, None) from exc
            raise

    def _apply_in(
        self,
        db: str,
        plan: Plan,
        fields: dict[str, Any],
        new_attempt: dict[str, Any] | None,
        entry: dict[str, Any] | None,
        idem: dict[str, Any] | None,
    ) -> Applied:
        before, after = plan.before, plan.after
        pid, tid = before.project_id, before.id
        # -- checks, on locked rows: any refusal rolls the whole block back
        versions = self._lock_versions(db, pid, [tid, *(g.task_id for g in plan.guards)])
        current = versions.get(tid)
        if current is None:
            raise TaskNotFound(pid, tid)
        if current != before.version:
            raise VersionConflict(tid, before.version, current)
        for guard in plan.guards:
            found = versions.get(guard.task_id)
            if found != guard.version:
                raise VersionConflict(guard.task_id, guard.version, found)
        moved = before.status != after.status
        projects = m.Project.objects.using(db).filter(id=pid)
        counters: Sequence[int] | None = None
        project_version: int | None = None
        events = ev.events_of(plan)
        changes: dict[str, Any] = {}
        if moved:
            old, new = TaskStatus(before.status).value, TaskStatus(after.status).value
            changes.update({old: F(old) - 1, new: F(new) + 1})
        if events:
            changes["event_seq"] = F("event_seq") + len(events)
        if changes:
            # The update locks the project's row (so the events of one project
            # commit in the order they are numbered); its version, last event
            # number and counters after the change are read back in one statement.
            projects.update(**changes)
            project_version, last_seq, *counters = projects.values_list(
                "version", "event_seq", *_COUNTERS
            )[0]
            events = ev.numbered(events, last_seq - len(events))
        elif plan.project_version is not None:
            locked = projects.select_for_update().values_list("version", *_COUNTERS)
            project_version, *counters = locked[0]
        if plan.project_version is not None and project_version != plan.project_version:
            raise VersionConflict(tid, before.version, current)
        stored_idem: m.IdempotencyRecord | None = None
        if plan.idempotency is not None:
            key = plan.idempotency.key
            stored_idem = (
                m.IdempotencyRecord.objects.using(db).select_for_update().filter(key=key).first()
            )
            if stored_idem is not None:
                taken = _idem(stored_idem)
                if not taken.expired(plan.idempotency.created_at):
                    raise IdempotencyConflict(taken)
        dispatch = plan.dispatch
        entries = m.OutboxEntry.objects.using(db)
        if (
            dispatch is not None
            and entries.filter(
                project_id=dispatch.project_id, task_id=dispatch.task_id, attempt=dispatch.attempt
            ).exists()
        ):
            raise VersionConflict(tid, before.version, current)
        if plan.new_attempt is not None:
            number = plan.new_attempt.number
            count = m.Attempt.objects.using(db).filter(project_id=pid, task_id=tid).count()
            if count != number - 1:
                raise InvalidInput(f"Task {tid!r}: attempt {number} is not next")
        # -- writes
        written = (
            m.Task.objects.using(db)
            .filter(project_id=pid, task_id=tid, version=before.version)
            .update(**fields)
        )
        if written != 1:  # the rows are locked: only a database without row locks gets here
            raise VersionConflict(tid, before.version, None)
        made: list[DispatchEntry] = []
        if dispatch is not None and entry is not None:
            pending = dispatch.state is DispatchState.PENDING
            entries.create(pending_seq=self._next_pending(db) if pending else None, **entry)
            if pending and dispatch.claimed_until:
                made.append(dispatch)
        if new_attempt is not None:
            m.Attempt.objects.using(db).create(**new_attempt)
        new_deps = [d for d in dict.fromkeys(after.blocked_by) if d not in before.blocked_by]
        if new_deps:
            m.TaskDependency.objects.using(db).bulk_create(
                [m.TaskDependency(project_id=pid, blocker_id=d, task_id=tid) for d in new_deps],
                ignore_conflicts=True,
            )
        if plan.attempt_update is not None:
            self._update_attempt(db, pid, tid, plan.attempt_update)
        if plan.releases:
            made.extend(self._release(db, pid, plan.releases, plan.claimed_until))
        if plan.idempotency is not None and idem is not None:
            self._store_idem(db, plan.idempotency, idem, stored_idem)
        if events:
            m.Event.objects.using(db).bulk_create([_event_row(e) for e in events])
        if counters is None:
            counters = projects.values_list(*_COUNTERS)[0]
        return Applied(
            task=after,
            progress=_progress(pid, counters),
            dispatches=tuple(made),
            deferred=dispatch is not None and dispatch.state is DispatchState.DEFERRED,
        )

    def _store_idem(
        self,
        db: str,
        record: IdempotencyRecord,
        fields: dict[str, Any],
        stored: m.IdempotencyRecord | None,
    ) -> None:
        """Reserve the free key (absent, or its record expired) for the plan."""
        records = m.IdempotencyRecord.objects.using(db)
        if stored is not None:
            records.filter(key=record.key).update(**fields)
            return
        try:
            with transaction.atomic(using=db):
                records.create(key=record.key, **fields)
        except IntegrityError:
            # A concurrent transaction took the key meanwhile (and has committed).
            taken = records.filter(key=record.key).first()
            if taken is None:
                raise
            raise IdempotencyConflict(_idem(taken)) from None

    def _update_attempt(self, db: str, pid: str, tid: str, update: AttemptUpdate) -> None:
        if update.number <= 0:
            return
        changes: dict[str, Any] = {}
        # A field the update leaves empty keeps the stored value, as in MemoryStorage.
        if update.started_at:
            changes["started_at"] = _aware(update.started_at)
        if update.finished_at:
            changes["finished_at"] = _aware(update.finished_at)
        if update.outcome:
            changes["outcome"] = Outcome(update.outcome).value
        if update.error_type:
            changes["error_type"] = _diagnostic(update.error_type)
        if update.error_message:
            changes["error_message"] = _diagnostic(update.error_message)
        if changes:
            m.Attempt.objects.using(db).filter(
                project_id=pid, task_id=tid, number=update.number
            ).update(**changes)

    def _next_pending(self, db: str) -> int:
        """A ``pending_seq`` after every pending entry: claims go in the order made pending."""
        last = (
            m.OutboxEntry.objects.using(db)
            .filter(state=_PENDING)
            .aggregate(last=Max("pending_seq"))["last"]
        )
        return 1 if last is None else int(last) + 1

    def _release(
        self, db: str, pid: str, releases: Sequence[Release], claimed_until: datetime | None
    ) -> list[DispatchEntry]:
        made = []
        entries = m.OutboxEntry.objects.using(db)
        for rel in releases:
            if not _findable(rel.task_id):
                continue
            row = (
                entries.select_for_update()
                .filter(project_id=pid, task_id=rel.task_id, attempt=rel.attempt)
                .first()
            )
            if row is None or row.state != _DEFERRED:
                continue
            entries.filter(seq=row.seq).update(
                state=_PENDING,
                claimed_until=_oaware(claimed_until),
                pending_seq=self._next_pending(db),
            )
            if claimed_until is not None:
                made.append(
                    evolve_entry(
                        _entry(row), state=DispatchState.PENDING, claimed_until=claimed_until
                    )
                )
        return made

    def apply_project(self, plan: ProjectPlan) -> tuple[Project, list[DispatchEntry]]:
        pid = plan.before.id
        if plan.after.id != pid:
            raise InvalidInput("a plan cannot change a project's id")
        if not _findable(pid):
            raise ProjectNotFound(pid)
        fields = _project_fields(plan.after)
        try:
            return self._apply_project_in(plan, fields)
        except StorageUnavailable as exc:
            if _lost_race(exc):
                raise VersionConflict(pid, plan.before.version, None) from exc
            raise

    def _apply_project_in(
        self, plan: ProjectPlan, fields: dict[str, Any]
    ) -> tuple[Project, list[DispatchEntry]]:
        pid = plan.before.id
        with self._tx(write=True) as db:
            # Tasks before the project, as apply() takes them: no two writers wait in a circle.
            versions = self._lock_versions(db, pid, [g.task_id for g in plan.guards])
            row = m.Project.objects.using(db).select_for_update().filter(id=pid).first()
            if row is None:
                raise ProjectNotFound(pid)
            if row.version != plan.before.version:
                raise VersionConflict(pid, plan.before.version, row.version)
            for guard in plan.guards:
                found = versions.get(guard.task_id)
                if found != guard.version:
                    raise VersionConflict(guard.task_id, guard.version, found)
            m.Project.objects.using(db).filter(id=pid).update(**fields)
            return plan.after, self._release(db, pid, plan.releases, plan.claimed_until)

    # -- outbox ------------------------------------------------------------------
    def claim_due(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[DispatchEntry]:
        check_limit(limit)
        now, until = _aware(now), _aware(claimed_until)
        with self._tx(write=True) as db:
            due = (
                m.OutboxEntry.objects.using(db)
                .select_for_update(skip_locked=True)
                .filter(state=_PENDING, available_at__lte=now)
                .filter(Q(claimed_until__isnull=True) | Q(claimed_until__lte=now))
                .order_by("pending_seq", "seq")[:limit]
            )
            rows = list(due)
            m.OutboxEntry.objects.using(db).filter(seq__in=[r.seq for r in rows]).update(
                claimed_until=until
            )
        return [evolve_entry(_entry(row), claimed_until=claimed_until) for row in rows]

    def mark_delivered(self, entries: Sequence[DispatchEntry], *, now: datetime) -> None:
        now = _aware(now)
        keys = sorted({e.key for e in entries if _findable(e.project_id) and _findable(e.task_id)})
        with self._tx(write=True) as db:
            for pid, tid, attempt in keys:
                m.OutboxEntry.objects.using(db).filter(
                    project_id=pid, task_id=tid, attempt=attempt, state=_PENDING
                ).update(
                    state=_DELIVERED,
                    delivered_at=now,
                    tries=F("tries") + 1,
                    claimed_until=None,
                    pending_seq=None,
                )

    def mark_failed(
        self,
        entry: DispatchEntry,
        *,
        error: str,
        retry_at: datetime,
        now: datetime | None = None,
    ) -> None:
        """Release the entry, due again at ``retry_at``, and write its
        ``dispatch.failed`` event (at ``now``, by default the wall clock)."""
        retry_at = _aware(retry_at)
        now = datetime.now(timezone.utc) if now is None else _aware(now)
        if not (_findable(entry.project_id) and _findable(entry.task_id)):
            return
        with self._tx(write=True) as db:
            # The project first, as apply() takes it before outbox rows.
            projects = m.Project.objects.using(db).filter(id=entry.project_id)
            if not list(projects.select_for_update().values_list("id", flat=True)):
                return
            entries = m.OutboxEntry.objects.using(db).filter(
                project_id=entry.project_id,
                task_id=entry.task_id,
                attempt=entry.attempt,
                state=_PENDING,
            )
            row = entries.select_for_update().first()
            if row is None:
                return
            entries.update(
                tries=F("tries") + 1,
                last_error=_diagnostic(error),
                available_at=retry_at,
                claimed_until=None,
            )
            event = ev.dispatch_failed(_entry(row), error=error, retry_at=retry_at, now=now)
            self._write_events(db, entry.project_id, (event,))

    def _write_events(self, db: str, project_id: str, events: tuple[Event, ...]) -> None:
        """Number ``events`` after the project's last and store them (the project's
        row stays locked until the transaction ends)."""
        if not events:
            return
        projects = m.Project.objects.using(db).filter(id=project_id)
        projects.update(event_seq=F("event_seq") + len(events))
        last = projects.values_list("event_seq", flat=True)[0] - len(events)
        m.Event.objects.using(db).bulk_create(
            [_event_row(e) for e in ev.numbered(events, last)], batch_size=_CHUNK
        )

    def _awaiting_start(self) -> Exists:
        """The entry's task is still waiting to start the entry's attempt."""
        return Exists(
            m.Task.objects.filter(
                project_id=OuterRef("project_id"),
                task_id=OuterRef("task_id"),
                attempt=OuterRef("attempt"),
                status=AWAITING_START.value,
            )
        )

    def redeliver_stale(
        self, *, now: datetime, delivered_before: datetime, limit: int
    ) -> list[DispatchEntry]:
        check_limit(limit)
        now, cutoff = _aware(now), _aware(delivered_before)
        with self._tx(write=True) as db:
            stale = (
                m.OutboxEntry.objects.using(db)
                .select_for_update(skip_locked=True)
                .filter(self._awaiting_start(), state=_DELIVERED, delivered_at__lte=cutoff)
                .order_by(
                    "delivered_at",
                    self._id_order("project_id"),
                    self._id_order("task_id"),
                    "attempt",
                )[:limit]
            )
            rows = list(stale)
            first = self._next_pending(db)
            for n, row in enumerate(rows):
                m.OutboxEntry.objects.using(db).filter(seq=row.seq).update(
                    state=_PENDING,
                    available_at=now,
                    claimed_until=None,
                    last_error=REDELIVERED,
                    pending_seq=first + n,
                )
        return [
            evolve_entry(
                _entry(row),
                state=DispatchState.PENDING,
                available_at=now,
                claimed_until=None,
                last_error=REDELIVERED,
            )
            for row in rows
        ]

    # -- lifecycle events ------------------------------------------------------------
    def events(self, project_id: str, *, after: int = 0, limit: int = 100) -> list[Event]:
        check_limit(limit)
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise InvalidInput(f"after must be an int >= 0, got {after!r}")
        if not _findable(project_id):
            raise ProjectNotFound(project_id)
        with self._tx(write=False) as db:
            self._get_project(db, project_id)
            rows = m.Event.objects.using(db).filter(project_id=project_id, seq__gt=after)
            return [_event(row) for row in rows.order_by("seq")[:limit]]

    def _serialise_claims(self, db: str) -> None:
        """Make this transaction's event claim the only one until it ends.

        A claim reads which earlier events of a task others hold; two claims at
        once would each miss the other's. PostgreSQL: a transaction-level
        advisory lock; SQLite: the write lock :meth:`_tx` took; others: the
        rows of the projects with pending events, in id order.
        """
        vendor = connections[db].vendor
        if vendor == "postgresql":
            with connections[db].cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_CLAIM_LOCK])
        elif vendor != "sqlite":
            pending = m.Event.objects.using(db).filter(delivered_at__isnull=True)
            list(
                m.Project.objects.using(db)
                .select_for_update()
                .filter(id__in=pending.values("project_id"))
                .order_by("id")
                .values_list("id", flat=True)
            )

    def claim_events(self, *, now: datetime, limit: int, claimed_until: datetime) -> list[Event]:
        check_limit(limit)
        now, until = _aware(now), _aware(claimed_until)
        with self._tx(write=True) as db:
            self._serialise_claims(db)
            events = m.Event.objects.using(db)
            held = Q(claimed_until__isnull=False) & Q(claimed_until__gt=now)
            held_before = Exists(
                events.filter(
                    held,
                    project_id=OuterRef("project_id"),
                    task_id=OuterRef("task_id"),
                    seq__lt=OuterRef("seq"),
                    delivered_at__isnull=True,
                )
            )
            rows = list(
                events.filter(delivered_at__isnull=True)
                .exclude(held)
                .exclude(held_before)
                .order_by(self._id_order("project_id"), "seq")[:limit]
            )
            if rows:
                events.filter(id__in=[row.id for row in rows]).update(claimed_until=until)
        return [_event(row) for row in rows]

    def settle_events(
        self, events: Sequence[Event], *, now: datetime, failures: Sequence[EventRetry] = ()
    ) -> None:
        now = _aware(now)
        keys: dict[str, list[int]] = {}
        for event in events:
            if _findable(event.project_id):
                keys.setdefault(event.project_id, []).append(event.seq)
        retries = [
            m.EventRetry(
                project_id=_text(f.event.project_id),
                seq=f.event.seq,
                subscriber=_text(f.subscriber),
                tries=f.tries,
                retry_at=_aware(f.retry_at),
                last_error=_diagnostic(f.last_error),
                parked=f.parked,
                claimed_until=_oaware(f.claimed_until),
            )
            for f in failures
        ]
        with self._tx(write=True) as db:
            for pid in sorted(keys):
                seqs = sorted(set(keys[pid]))
                for start in range(0, len(seqs), _CHUNK):
                    m.Event.objects.using(db).filter(
                        project_id=pid, seq__in=seqs[start : start + _CHUNK]
                    ).update(delivered_at=now, claimed_until=None)
            if retries:
                m.EventRetry.objects.using(db).bulk_create(
                    retries,
                    batch_size=_CHUNK,
                    update_conflicts=True,
                    unique_fields=["project", "seq", "subscriber"],
                    update_fields=["tries", "retry_at", "last_error", "parked", "claimed_until"],
                )

    def _retries(self, db: str, rows: Sequence[m.EventRetry]) -> list[EventRetry]:
        """The failed deliveries of ``rows``, each with its event."""
        wanted: dict[str, set[int]] = {}
        for row in rows:
            wanted.setdefault(row.project_id, set()).add(row.seq)
        found: dict[tuple[str, int], Event] = {}
        for pid, seqs in wanted.items():
            ordered = sorted(seqs)
            for start in range(0, len(ordered), _CHUNK):
                chunk = m.Event.objects.using(db).filter(
                    project_id=pid, seq__in=ordered[start : start + _CHUNK]
                )
                found.update(((pid, e.seq), _event(e)) for e in chunk)
        return [
            EventRetry(
                event=found[(row.project_id, row.seq)],
                subscriber=row.subscriber,
                tries=row.tries,
                retry_at=row.retry_at,
                last_error=row.last_error,
                parked=row.parked,
                claimed_until=row.claimed_until,
            )
            for row in rows
            if (row.project_id, row.seq) in found
        ]

    def claim_event_retries(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[EventRetry]:
        check_limit(limit)
        now, until = _aware(now), _aware(claimed_until)
        with self._tx(write=True) as db:
            retries = m.EventRetry.objects.using(db)
            due = (
                retries.select_for_update(skip_locked=True)
                .filter(parked=False, retry_at__lte=now)
                .filter(Q(claimed_until__isnull=True) | Q(claimed_until__lte=now))
                .order_by(
                    "retry_at", self._id_order("project_id"), "seq", self._id_order("subscriber")
                )[:limit]
            )
            rows = list(due)
            if rows:
                retries.filter(id__in=[row.id for row in rows]).update(claimed_until=until)
                for row in rows:
                    row.claimed_until = until
            return self._retries(db, rows)

    def settle_event_retry(
        self,
        retry: EventRetry,
        *,
        now: datetime,
        error: str | None = None,
        retry_at: datetime | None = None,
    ) -> None:
        now = _aware(now)
        pid = retry.event.project_id
        if not (_findable(pid) and _findable(retry.subscriber)):
            return
        with self._tx(write=True) as db:
            rows = m.EventRetry.objects.using(db).filter(
                project_id=pid, seq=retry.event.seq, subscriber=retry.subscriber
            )
            if error is None:
                rows.delete()
            elif retry_at is not None:
                rows.update(
                    tries=F("tries") + 1,
                    retry_at=_aware(retry_at),
                    last_error=_diagnostic(error),
                    claimed_until=None,
                )
            else:
                rows.update(
                    tries=F("tries") + 1,
                    last_error=_diagnostic(error),
                    parked=True,
                    claimed_until=None,
                )

    def _event_at(self) -> Subquery:
        """A failed delivery's event time (for oldest-first orders)."""
        return Subquery(
            m.Event.objects.filter(project_id=OuterRef("project_id"), seq=OuterRef("seq")).values(
                "at"
            )[:1]
        )

    def parked_events(self, *, subscriber: str | None = None, limit: int = 100) -> list[EventRetry]:
        check_limit(limit)
        if subscriber is not None and not _findable(subscriber):
            return []
        with self._tx(write=False) as db:
            rows = m.EventRetry.objects.using(db).filter(parked=True)
            if subscriber is not None:
                rows = rows.filter(subscriber=subscriber)
            ordered = rows.annotate(event_at=self._event_at()).order_by(
                "event_at", self._id_order("project_id"), "seq", self._id_order("subscriber")
            )
            return self._retries(db, list(ordered[:limit]))

    def replay_parked(
        self,
        *,
        now: datetime,
        subscriber: str | None = None,
        event_ids: Sequence[str] | None = None,
    ) -> int:
        now = _aware(now)
        if subscriber is not None and not _findable(subscriber):
            return 0
        which = Q(parked=True)
        if subscriber is not None:
            which &= Q(subscriber=subscriber)
        if event_ids is not None:
            keys = {key for key in map(_event_id, event_ids) if key is not None}
            if not keys:
                return 0
            chosen = Q()
            for pid, seq in sorted(keys):
                chosen |= Q(project_id=pid, seq=seq)
            which &= chosen
        with self._tx(write=True) as db:
            count: int = (
                m.EventRetry.objects.using(db)
                .filter(which)
                .update(parked=False, tries=0, retry_at=now, claimed_until=None)
            )
        return count

    # -- leases --------------------------------------------------------------------
    def expired_leases(self, *, now: datetime, limit: int) -> list[Task]:
        check_limit(limit)
        now = _aware(now)
        with self._reading() as db:
            rows = (
                m.Task.objects.using(db)
                .filter(status=TaskStatus.IN_PROGRESS.value, lease_expires_at__lte=now)
                .order_by(
                    "lease_expires_at", self._id_order("project_id"), self._id_order("task_id")
                )[:limit]
            )
            return [_task(row) for row in rows]

    # -- idempotency -----------------------------------------------------------------
    def get_idempotency(self, key: str, *, now: datetime | None = None) -> IdempotencyRecord | None:
        if not _findable(key):
            return None
        with self._reading() as db:
            rows = list(m.IdempotencyRecord.objects.using(db).filter(key=key)[:1])
        if not rows:
            return None
        record = _idem(rows[0])
        if now is not None and record.expired(now):
            return None
        return record

    def save_idempotency(self, record: IdempotencyRecord) -> IdempotencyRecord:
        fields = _idem_fields(record)
        key = _text(record.key)
        with self._tx(write=True) as db:
            records = m.IdempotencyRecord.objects.using(db)
            for _ in range(2):
                row = records.select_for_update().filter(key=key).first()
                if row is not None:
                    existing = _idem(row)
                    if not existing.expired(record.created_at) and (
                        existing.status_code is not None or existing.created_at != record.created_at
                    ):
                        return existing
                    records.filter(key=key).update(**fields)
                    return record
                try:
                    with transaction.atomic(using=db):
                        records.create(key=key, **fields)
                except IntegrityError:
                    continue  # saved at once by another caller: decide on its record
                return record
            raise StorageError(f"idempotency key {key!r} could not be saved")

    # -- retention -------------------------------------------------------------------
    def prune(self, rule: PruneRule) -> Pruned:
        """One batch per table of what ``rule`` removes, oldest first, each its own
        transaction; rows another transaction holds are skipped."""
        counts = [0, 0, 0, 0]
        with self._tx(write=True) as db:
            records = m.IdempotencyRecord.objects.using(db)
            expired = records.select_for_update(skip_locked=True).filter(expires_at__lte=rule.now)
            keys = list(expired.order_by("expires_at").values_list("key", flat=True)[: rule.batch])
            if keys:
                counts[0] = records.filter(key__in=keys, expires_at__lte=rule.now).delete()[0]
        if rule.delivered_before is not None:
            with self._tx(write=True) as db:
                entries = m.OutboxEntry.objects.using(db)
                old = entries.filter(
                    ~self._awaiting_start(),
                    state=PRUNED_ENTRY_STATE.value,
                    delivered_at__lte=rule.delivered_before,
                )
                seqs = list(
                    old.select_for_update(skip_locked=True)
                    .order_by("delivered_at")
                    .values_list("seq", flat=True)[: rule.batch]
                )
                if seqs:
                    counts[1] = old.filter(seq__in=seqs).delete()[0]
        if rule.finished_before is not None:
            with self._tx(write=True) as db:
                cutoff = rule.finished_before
                finished = Exists(
                    m.Task.objects.filter(
                        project_id=OuterRef("project_id"),
                        task_id=OuterRef("task_id"),
                        status__in=[s.value for s in FINISHED],
                        updated_at__lte=cutoff,
                    )
                )
                old_attempts = m.Attempt.objects.using(db).filter(
                    finished, dispatched_at__lte=cutoff
                )
                seqs = list(
                    old_attempts.select_for_update(skip_locked=True)
                    .order_by("dispatched_at")
                    .values_list("seq", flat=True)[: rule.batch]
                )
                if seqs:
                    counts[2] = old_attempts.filter(seq__in=seqs).delete()[0]
        if rule.delivered_before is not None:
            with self._tx(write=True) as db:
                # Delivered to every subscriber: no failed delivery kept (removes_event).
                kept = Exists(
                    m.EventRetry.objects.filter(
                        project_id=OuterRef("project_id"), seq=OuterRef("seq")
                    )
                )
                old_events = m.Event.objects.using(db).filter(
                    ~kept, delivered_at__isnull=False, delivered_at__lte=rule.delivered_before
                )
                ids = list(
                    old_events.select_for_update(skip_locked=True)
                    .order_by("delivered_at", "id")
                    .values_list("id", flat=True)[: rule.batch]
                )
                if ids:
                    counts[3] = old_events.filter(id__in=ids).delete()[0]
        return Pruned(
            idempotency=counts[0],
            outbox=counts[1],
            attempts=counts[2],
            events=counts[3],
            batches=1,
        )

    def close(self) -> None:
        """Nothing to release: the connections are Django's (and the host's)."""
        return None
