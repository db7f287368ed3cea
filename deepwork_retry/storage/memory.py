"""In-memory storage: thread-safe, public, held to the same suite as SQLite.

Good for tests and for a single process that may lose its state on exit.
One lock guards everything, so every method is atomic.

The history (attempt records, outbox entries, events and idempotency
records, which grow with traffic) and the finished tasks (``done`` and ``skipped``, which no move
leaves) are kept as plain tuples of strings, numbers and timestamps rather
than as the frozen values the methods return, which are built on the way out.
CPython's cycle collector stops tracking such tuples, and the dictionaries
holding only them, after it has seen them a few times, so a long-running
process does not rescan its whole history and every task it ever finished on
each full collection (with the values themselves, a process that had made a
few hundred thousand retries paused for hundreds of milliseconds per
collection). Tasks that may still move stay values: a move reads and replaces
one, and building it from a row on every load would cost each retry a few
microseconds.
"""

from __future__ import annotations

import bisect
import heapq
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import attrs

from deepwork_retry._core import events as lifecycle
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
from deepwork_retry._core.plans import Applied, Plan, ProjectPlan, Release
from deepwork_retry._core.retention import Pruned, PruneRule
from deepwork_retry._core.states import (
    TERMINAL,
    BlockedReason,
    DispatchState,
    Outcome,
    RetryBudget,
    TaskStatus,
    Trigger,
)
from deepwork_retry.exceptions import (
    AlreadyExists,
    IdempotencyConflict,
    InvalidInput,
    ProjectNotFound,
    TaskNotFound,
    VersionConflict,
)
from deepwork_retry.ports import REDELIVERED
from deepwork_retry.storage._to_async import AsyncFromSyncEventsOverview
from deepwork_retry.storage._validate import check_new_tasks

_Key = tuple[str, str]
_EntryKey = tuple[str, str, int]
_EventKey = tuple[str, int]
_RetryKey = tuple[str, int, str]

# -- the tasks and the history as rows ---------------------------------------------------------
# A task row holds Task's fields in their declared order, an attempt row
# Attempt's, an entry row DispatchEntry's; enum fields hold the enum's value
# (members are objects the collector tracks, their values are plain strings).
# A mapping (a task's metadata, an event's data) is kept as the tuple of its
# items: the collector never stops tracking a tuple that holds a dict, even a
# dict it no longer tracks, but does stop tracking a tuple of pairs of strings
# and numbers.
_TaskRow = tuple[Any, ...]
_AttemptRow = tuple[Any, ...]
_EntryRow = tuple[Any, ...]

_TRIGGERS = {t.value: t for t in Trigger}
_BUDGETS = {b.value: b for b in RetryBudget}
_OUTCOMES = {o.value: o for o in Outcome}
_STATES = {d.value: d for d in DispatchState}
_PENDING, _DEFERRED, _DELIVERED = (
    DispatchState.PENDING.value,
    DispatchState.DEFERRED.value,
    DispatchState.DELIVERED.value,
)
# Positions in an entry row.
_E_STATE, _E_AVAILABLE, _E_CLAIMED, _E_DELIVERED = 3, 4, 6, 9


def _value(member: Any) -> Any:
    return None if member is None else member._value_


_TASK_STATUSES = {s.value: s for s in TaskStatus}
_BLOCKED_REASONS = {r.value: r for r in BlockedReason}
# Positions in a task row.
_T_ID, _T_PROJECT, _T_UPDATED = 0, 1, 14
_Stored = Task | _TaskRow
"""A stored task: the value while the task may still move, a row once it is finished."""


def _task_row(t: Task) -> _TaskRow:
    return (
        t.id, t.project_id, t.title, t.status._value_, t.retry_count, t.max_retries,
        t.retries_left, t.error_message, t.error_type, _value(t.blocked_reason), t.blocked_by,
        t.attempt, t.lease_expires_at, t.created_at, t.updated_at, t.started_at,
        t.completed_at, t.version, tuple(t.metadata.items()),
    )  # fmt: skip


def _task_of(row: _TaskRow) -> Task:
    return Task(
        id=row[0], project_id=row[1], title=row[2], status=_TASK_STATUSES[row[3]],
        retry_count=row[4], max_retries=row[5], retries_left=row[6], error_message=row[7],
        error_type=row[8], blocked_reason=None if row[9] is None else _BLOCKED_REASONS[row[9]],
        blocked_by=row[10], attempt=row[11], lease_expires_at=row[12], created_at=row[13],
        updated_at=row[14], started_at=row[15], completed_at=row[16], version=row[17],
        metadata=row[18],
    )  # fmt: skip


def _keep(task: Task) -> _Stored:
    """What the storage keeps of ``task``: a row once it is finished (no move leaves it)."""
    return _task_row(task) if task.status in TERMINAL else task


def _as_task(stored: _Stored) -> Task:
    return _task_of(stored) if isinstance(stored, tuple) else stored


def _attempt_row(a: Attempt) -> _AttemptRow:
    return (
        a.task_id, a.project_id, a.number, a.trigger._value_, a.dispatched_at, a.available_at,
        a.actor, a.reason, _value(a.budget), a.started_at, a.finished_at, _value(a.outcome),
        a.error_type, a.error_message,
    )  # fmt: skip


def _attempt(row: _AttemptRow) -> Attempt:
    return Attempt(
        task_id=row[0], project_id=row[1], number=row[2], trigger=_TRIGGERS[row[3]],
        dispatched_at=row[4], available_at=row[5], actor=row[6], reason=row[7],
        budget=None if row[8] is None else _BUDGETS[row[8]], started_at=row[9],
        finished_at=row[10], outcome=None if row[11] is None else _OUTCOMES[row[11]],
        error_type=row[12], error_message=row[13],
    )  # fmt: skip


def _entry_row(e: DispatchEntry) -> _EntryRow:
    return (
        e.project_id, e.task_id, e.attempt, e.state._value_, e.available_at, e.created_at,
        e.claimed_until, e.tries, e.last_error, e.delivered_at, e.trace,
    )  # fmt: skip


def _entry(row: _EntryRow) -> DispatchEntry:
    return DispatchEntry(
        project_id=row[0], task_id=row[1], attempt=row[2], state=_STATES[row[3]],
        available_at=row[4], created_at=row[5], claimed_until=row[6], tries=row[7],
        last_error=row[8], delivered_at=row[9], trace=row[10],
    )  # fmt: skip


# An idempotency row holds IdempotencyRecord's fields in their declared order.
_IdempotencyRow = tuple[Any, ...]
_I_EXPIRES = 6


def _idempotency_row(r: IdempotencyRecord) -> _IdempotencyRow:
    return (r.key, r.project_id, r.task_id, r.created_at, r.status_code, r.body, r.expires_at)


def _idempotency(row: _IdempotencyRow) -> IdempotencyRecord:
    return IdempotencyRecord(
        key=row[0], project_id=row[1], task_id=row[2], created_at=row[3], status_code=row[4],
        body=row[5], expires_at=row[6],
    )  # fmt: skip


# An event row: (project_id, seq, type, task_id, attempt, at, data (its items as a
# tuple of pairs), delivered_at, claimed_until); a retry row: (tries, retry_at,
# last_error, parked, claimed_until).
_EventRow = tuple[Any, ...]
_RetryRow = tuple[Any, ...]
_TYPES = {t.value: t for t in EventType}
_EV_DELIVERED, _EV_CLAIMED = 7, 8


def _event_row(e: Event, seq: int) -> _EventRow:
    return (
        e.project_id, seq, e.type._value_, e.task_id, e.attempt, e.at, tuple(e.data.items()),
        None, None,
    )  # fmt: skip


def _event(row: _EventRow) -> Event:
    return Event(
        project_id=row[0], seq=row[1], type=_TYPES[row[2]], task_id=row[3], attempt=row[4],
        at=row[5], data=row[6],
    )  # fmt: skip


def _retry(event: Event, subscriber: str, row: _RetryRow) -> EventRetry:
    return EventRetry(
        event=event, subscriber=subscriber, tries=row[0], retry_at=row[1], last_error=row[2],
        parked=row[3], claimed_until=row[4],
    )  # fmt: skip


class MemoryStorage:
    """A :class:`~deepwork_retry.ports.Storage` kept in dictionaries."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._projects: dict[str, Project] = {}
        self._progress: dict[str, Progress] = {}
        self._tasks: dict[str, dict[str, _Stored]] = {}
        self._dependants: dict[_Key, set[str]] = {}
        self._attempts: dict[_Key, tuple[_AttemptRow, ...]] = {}
        self._outbox: dict[_EntryKey, _EntryRow] = {}
        self._pending: dict[_EntryKey, None] = {}
        self._in_progress: dict[_Key, None] = {}
        self._assigned: dict[_Key, None] = {}
        self._project_ids: list[str] = []
        """Every project id, sorted (projects are never removed)."""
        self._blocked: dict[str, dict[str, None]] = {}
        """The ids of each project's blocked tasks (projects with none left out)."""
        self._idempotency: dict[str, _IdempotencyRow] = {}
        self._event_seq: dict[str, int] = {}
        self._events: dict[str, dict[int, _EventRow]] = {}
        self._events_pending: dict[_EventKey, None] = {}
        self._event_retries: dict[_RetryKey, _RetryRow] = {}
        # What a prune may remove, by the time its rule cuts on, earliest first (heaps):
        # pushed when a row gets that time, checked against the row when popped (a row
        # changed or removed since leaves a stale item, dropped then). The delivered and
        # finished ones are kept from the first prune that may remove such rows on.
        self._expiring: list[tuple[datetime, str]] = []
        """(expires_at, key) of each idempotency record."""
        self._delivered: list[tuple[datetime, _EntryKey]] | None = None
        """(delivered_at, key) of each delivered outbox entry."""
        self._events_delivered: list[tuple[datetime, str, int]] | None = None
        """(delivered_at, project id, seq) of each delivered event."""
        self._finished: list[tuple[datetime, str, str]] | None = None
        """(updated_at, project id, task id) of each finished task."""

    # -- setup -------------------------------------------------------------
    def create_project(self, project: Project) -> None:
        with self._lock:
            if project.id in self._projects:
                raise AlreadyExists(f"Project {project.id!r} exists already")
            self._projects[project.id] = project
            bisect.insort(self._project_ids, project.id)
            self._progress[project.id] = Progress(project_id=project.id)
            self._tasks[project.id] = {}
            self._event_seq[project.id] = 0
            self._events[project.id] = {}

    def add_tasks(self, tasks: Sequence[Task]) -> None:
        with self._lock:
            check_new_tasks(tasks)
            for task in tasks:
                if task.project_id not in self._projects:
                    raise ProjectNotFound(task.project_id)
                if task.id in self._tasks[task.project_id]:
                    raise AlreadyExists(f"Task {task.id!r} exists already in {task.project_id!r}")
            for task in tasks:
                self._tasks[task.project_id][task.id] = self._keep(task)
                self._index(task)
                self._progress[task.project_id] = self._progress[task.project_id].shifted(
                    None, task.status
                )
                self._record((lifecycle.added(task),))

    def _keep(self, task: Task) -> _Stored:
        """What to store of ``task``; a finished one is also put in the prune's index."""
        stored = _keep(task)
        if isinstance(stored, tuple) and self._finished is not None:
            heapq.heappush(self._finished, (task.updated_at, task.project_id, task.id))
        return stored

    def _index(self, task: Task) -> None:
        for dep in task.blocked_by:
            self._dependants.setdefault((task.project_id, dep), set()).add(task.id)
        key = (task.project_id, task.id)
        if task.status is TaskStatus.IN_PROGRESS:
            self._in_progress[key] = None
        else:
            self._in_progress.pop(key, None)
        if task.status is TaskStatus.ASSIGNED:
            self._assigned[key] = None
        else:
            self._assigned.pop(key, None)
        if task.status is TaskStatus.BLOCKED:
            self._blocked.setdefault(task.project_id, {})[task.id] = None
        else:
            blocked = self._blocked.get(task.project_id)
            if blocked is not None and task.id in blocked:
                del blocked[task.id]
                if not blocked:
                    del self._blocked[task.project_id]

    # -- reads ---------------------------------------------------------------
    def get_project(self, project_id: str) -> Project:
        with self._lock:
            try:
                return self._projects[project_id]
            except KeyError:
                raise ProjectNotFound(project_id) from None

    def _task(self, project_id: str, task_id: str) -> Task:
        try:
            return _as_task(self._tasks[project_id][task_id])
        except KeyError:
            raise TaskNotFound(project_id, task_id) from None

    def load(self, project_id: str, task_id: str) -> tuple[Project, Task]:
        with self._lock:
            try:
                project = self._projects[project_id]
            except KeyError:
                raise ProjectNotFound(project_id) from None
            return project, self._task(project_id, task_id)

    def get_tasks(self, project_id: str, task_ids: Sequence[str]) -> dict[str, Task]:
        with self._lock:
            tasks = self._tasks.get(project_id, {})
            return {tid: _as_task(tasks[tid]) for tid in task_ids if tid in tasks}

    def dependants(self, project_id: str, task_id: str) -> list[Task]:
        with self._lock:
            ids = sorted(self._dependants.get((project_id, task_id), ()))
            return [_as_task(self._tasks[project_id][tid]) for tid in ids]

    def list_tasks(
        self,
        project_id: str,
        *,
        status: TaskStatus | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[Task]:
        check_limit(limit)
        with self._lock:
            tasks = self._tasks.get(project_id)
            if tasks is None:
                raise ProjectNotFound(project_id)
            ids = sorted(tid for tid in tasks if after is None or tid > after)
            selected = (_as_task(tasks[tid]) for tid in ids)
            out = [t for t in selected if status is None or t.status == status]
            return out[:limit]

    def progress(self, project_id: str) -> Progress:
        with self._lock:
            try:
                return self._progress[project_id]
            except KeyError:
                raise ProjectNotFound(project_id) from None

    # -- reads across projects (ProjectOverview) ----------------------------------------
    def list_projects(
        self, *, projects: frozenset[str] | None = None, after: str | None = None, limit: int = 100
    ) -> list[ProjectSummary]:
        projects, after = check_projects_page(projects, after, limit)
        with self._lock:
            if projects is None:
                ids = self._project_ids
                start = 0 if after is None else bisect.bisect_right(ids, after)
                chosen = ids[start : start + limit]
            else:
                chosen = sorted(
                    pid
                    for pid in projects
                    if pid in self._projects and (after is None or pid > after)
                )[:limit]
            return [
                ProjectSummary(project=self._projects[pid], progress=self._progress[pid])
                for pid in chosen
            ]

    def blocked_tasks(
        self,
        *,
        projects: frozenset[str] | None = None,
        error_type: str | None = None,
        after: tuple[str, str] | None = None,
        limit: int = 100,
    ) -> list[Task]:
        projects, error_type, after = check_blocked_page(projects, error_type, after, limit)
        found: list[Task] = []
        with self._lock:
            if projects is None:
                # Only the projects that have blocked tasks, not every project.
                chosen = sorted(pid for pid in self._blocked if after is None or pid >= after[0])
            else:
                chosen = sorted(
                    pid
                    for pid in projects
                    if pid in self._blocked and (after is None or pid >= after[0])
                )
            for pid in chosen:
                tasks = self._tasks[pid]
                ids = sorted(self._blocked[pid])
                if after is not None and pid == after[0]:
                    ids = ids[bisect.bisect_right(ids, after[1]) :]
                for tid in ids:
                    task = _as_task(tasks[tid])
                    if error_type is None or task.error_type == error_type:
                        found.append(task)
                        if len(found) >= limit:
                            return found
        return found

    def attempts(self, project_id: str, task_id: str) -> list[Attempt]:
        with self._lock:
            if task_id not in self._tasks.get(project_id, ()):
                raise TaskNotFound(project_id, task_id)
            return [_attempt(row) for row in self._attempts.get((project_id, task_id), ())]

    def dispatches(self, project_id: str, task_id: str) -> list[DispatchEntry]:
        with self._lock:
            try:
                last = _as_task(self._tasks[project_id][task_id]).attempt
            except KeyError:
                raise TaskNotFound(project_id, task_id) from None
            found = (self._outbox.get((project_id, task_id, n)) for n in range(1, last + 1))
            return [_entry(row) for row in found if row is not None]

    def deferred(self, project_id: str) -> list[DispatchEntry]:
        with self._lock:
            return [
                _entry(row)
                for row in self._outbox.values()
                if row[0] == project_id and row[_E_STATE] == _DEFERRED
            ]

    # -- writes ----------------------------------------------------------------
    def apply(self, plan: Plan) -> Applied:
        before, after = plan.before, plan.after
        pid, tid = before.project_id, before.id
        with self._lock:
            try:
                tasks = self._tasks[pid]
                current = tasks[tid]
            except KeyError:
                raise TaskNotFound(pid, tid) from None
            version = _as_task(current).version
            if version != before.version:
                raise VersionConflict(tid, before.version, version)
            for guard in plan.guards:
                found = tasks.get(guard.task_id)
                if found is None or _as_task(found).version != guard.version:
                    raise VersionConflict(
                        guard.task_id,
                        guard.version,
                        None if found is None else _as_task(found).version,
                    )
            project = self._projects[pid]
            if plan.project_version is not None and project.version != plan.project_version:
                raise VersionConflict(tid, before.version, version)
            idem = plan.idempotency
            if idem is not None:
                taken_row = self._idempotency.get(idem.key)
                taken = None if taken_row is None else _idempotency(taken_row)
                if taken is not None and not taken.expired(idem.created_at):
                    raise IdempotencyConflict(taken)
            dispatch = plan.dispatch
            if dispatch is not None and dispatch.key in self._outbox:
                raise VersionConflict(tid, before.version, version)
            history = self._attempts.get((pid, tid))
            new_attempt = plan.new_attempt
            if new_attempt is not None and new_attempt.number != (
                len(history) + 1 if history else 1
            ):
                raise InvalidInput(f"Task {tid!r}: attempt {new_attempt.number} is not next")
            # Every check passed: from here on nothing raises.
            tasks[after.id] = self._keep(after)
            self._index(after)
            progress = self._progress[pid] = self._progress[pid].shifted(
                before.status, after.status
            )
            update = plan.attempt_update
            if update is not None and history and 0 < update.number <= len(history):
                index = update.number - 1
                old = _attempt(history[index])
                new = attrs.evolve(
                    old,
                    started_at=update.started_at or old.started_at,
                    finished_at=update.finished_at or old.finished_at,
                    outcome=update.outcome or old.outcome,
                    error_type=update.error_type or old.error_type,
                    error_message=update.error_message or old.error_message,
                )
                history = (*history[:index], _attempt_row(new), *history[index + 1 :])
                self._attempts[(pid, tid)] = history
            if new_attempt is not None:
                row = _attempt_row(new_attempt)
                self._attempts[(pid, tid)] = (row,) if history is None else (*history, row)
            made: tuple[DispatchEntry, ...] = ()
            deferred = False
            if dispatch is not None:
                self._put_entry(dispatch)
                if dispatch.state is DispatchState.PENDING:
                    if dispatch.claimed_until:
                        made = (dispatch,)
                else:
                    deferred = dispatch.state is DispatchState.DEFERRED
            if plan.releases:
                made += tuple(self._release(pid, plan.releases, plan.claimed_until))
            if idem is not None:
                self._keep_idempotency(idem)
            self._record(lifecycle.events_of(plan))
            return Applied(task=after, progress=progress, dispatches=made, deferred=deferred)

    def _record(self, events: tuple[Event, ...]) -> None:
        """Number ``events`` after their project's last and keep them pending (under the lock)."""
        if not events:
            return
        pid = events[0].project_id
        last = self._event_seq[pid]
        stored = self._events[pid]
        pending = self._events_pending
        for seq, event in enumerate(events, last + 1):
            stored[seq] = _event_row(event, seq)
            pending[(pid, seq)] = None
        self._event_seq[pid] = last + len(events)

    def _put_entry(self, entry: DispatchEntry) -> None:
        key = entry.key
        self._outbox[key] = _entry_row(entry)
        if entry.state is DispatchState.PENDING:
            self._pending[key] = None
        else:
            self._pending.pop(key, None)
            if (
                self._delivered is not None
                and entry.delivered_at is not None
                and entry.state is DispatchState.DELIVERED
            ):
                heapq.heappush(self._delivered, (entry.delivered_at, key))

    def _release(
        self, pid: str, releases: Sequence[Release], claimed_until: datetime | None
    ) -> list[DispatchEntry]:
        made = []
        for rel in releases:
            row = self._outbox.get((pid, rel.task_id, rel.attempt))
            if row is None or row[_E_STATE] != _DEFERRED:
                continue
            entry = evolve_entry(
                _entry(row), state=DispatchState.PENDING, claimed_until=claimed_until
            )
            self._put_entry(entry)
            if claimed_until is not None:
                made.append(entry)
        return made

    def apply_project(self, plan: ProjectPlan) -> tuple[Project, list[DispatchEntry]]:
        pid = plan.before.id
        with self._lock:
            current = self.get_project(pid)
            if current.version != plan.before.version:
                raise VersionConflict(pid, plan.before.version, current.version)
            for guard in plan.guards:
                found = self._tasks[pid].get(guard.task_id)
                if found is None or _as_task(found).version != guard.version:
                    raise VersionConflict(
                        guard.task_id,
                        guard.version,
                        None if found is None else _as_task(found).version,
                    )
            self._projects[pid] = plan.after
            return plan.after, self._release(pid, plan.releases, plan.claimed_until)

    # -- outbox ------------------------------------------------------------------
    def claim_due(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[DispatchEntry]:
        check_limit(limit)
        with self._lock:
            claimed: list[DispatchEntry] = []
            outbox = self._outbox
            for key in self._pending:
                if len(claimed) >= limit:
                    break
                row = outbox[key]
                until = row[_E_CLAIMED]
                if row[_E_AVAILABLE] <= now and (until is None or until <= now):
                    claimed.append(evolve_entry(_entry(row), claimed_until=claimed_until))
            for entry in claimed:
                outbox[entry.key] = _entry_row(entry)
            return claimed

    def mark_delivered(self, entries: Sequence[DispatchEntry], *, now: datetime) -> None:
        with self._lock:
            for entry in entries:
                row = self._outbox.get(entry.key)
                if row is None or row[_E_STATE] != _PENDING:
                    continue
                stored = _entry(row)
                self._put_entry(
                    evolve_entry(
                        stored,
                        state=DispatchState.DELIVERED,
                        delivered_at=now,
                        tries=stored.tries + 1,
                        claimed_until=None,
                    )
                )

    def mark_failed(
        self, entry: DispatchEntry, *, error: str, retry_at: datetime, now: datetime | None = None
    ) -> None:
        with self._lock:
            row = self._outbox.get(entry.key)
            if row is None or row[_E_STATE] != _PENDING:
                return
            stored = _entry(row)
            at = datetime.now(timezone.utc) if now is None else now
            self._record(
                (lifecycle.dispatch_failed(stored, error=error, retry_at=retry_at, now=at),)
            )
            self._put_entry(
                evolve_entry(
                    stored,
                    tries=stored.tries + 1,
                    last_error=error,
                    available_at=retry_at,
                    claimed_until=None,
                )
            )

    def redeliver_stale(
        self, *, now: datetime, delivered_before: datetime, limit: int
    ) -> list[DispatchEntry]:
        check_limit(limit)
        with self._lock:
            stale = []
            for pid, tid in self._assigned:
                row = self._outbox.get((pid, tid, _as_task(self._tasks[pid][tid]).attempt))
                if (
                    row is not None
                    and row[_E_STATE] == _DELIVERED
                    and row[_E_DELIVERED] is not None
                    and row[_E_DELIVERED] <= delivered_before
                ):
                    stale.append(_entry(row))
            stale.sort(key=lambda e: (e.delivered_at, e.key))
            turned = [
                evolve_entry(
                    entry,
                    state=DispatchState.PENDING,
                    available_at=now,
                    claimed_until=None,
                    last_error=REDELIVERED,
                )
                for entry in stale[:limit]
            ]
            for entry in turned:
                self._put_entry(entry)
            return turned

    # -- leases --------------------------------------------------------------------
    def expired_leases(self, *, now: datetime, limit: int) -> list[Task]:
        check_limit(limit)
        with self._lock:
            found = []
            for pid, tid in self._in_progress:
                task = _as_task(self._tasks[pid][tid])
                if task.lease_expires_at is not None and task.lease_expires_at <= now:
                    found.append(task)
            found.sort(key=lambda t: (t.lease_expires_at, t.project_id, t.id))
            return found[:limit]

    # -- idempotency -----------------------------------------------------------------
    def get_idempotency(self, key: str, *, now: datetime | None = None) -> IdempotencyRecord | None:
        with self._lock:
            row = self._idempotency.get(key)
        record = None if row is None else _idempotency(row)
        if record is not None and now is not None and record.expired(now):
            return None
        return record

    def save_idempotency(self, record: IdempotencyRecord) -> IdempotencyRecord:
        with self._lock:
            row = self._idempotency.get(record.key)
            existing = None if row is None else _idempotency(row)
            if (
                existing is not None
                and not existing.expired(record.created_at)
                and (existing.status_code is not None or existing.created_at != record.created_at)
            ):
                return existing
            self._keep_idempotency(record)
            return record

    def _keep_idempotency(self, record: IdempotencyRecord) -> None:
        self._idempotency[record.key] = _idempotency_row(record)
        heapq.heappush(self._expiring, (record.expires_at, record.key))

    # -- event log --------------------------------------------------------------------
    def events(self, project_id: str, *, after: int = 0, limit: int = 100) -> list[Event]:
        check_limit(limit)
        if after.__class__ is not int or after < 0:
            raise InvalidInput(f"after must be an integer >= 0, got {after!r}")
        with self._lock:
            stored = self._events.get(project_id)
            if stored is None:
                raise ProjectNotFound(project_id)
            last = self._event_seq[project_id]
            found: list[_EventRow] = []
            seq = after + 1
            if stored and seq < next(iter(stored)):  # pruned before: skip the gap
                seq = next(iter(stored))
            while seq <= last and len(found) < limit:
                row = stored.get(seq)
                if row is not None:
                    found.append(row)
                seq += 1
        return [_event(row) for row in found]

    def claim_events(self, *, now: datetime, limit: int, claimed_until: datetime) -> list[Event]:
        check_limit(limit)
        with self._lock:
            held: set[tuple[str, str | None]] = set()
            claimed: list[_EventRow] = []
            for pid, seq in sorted(self._events_pending):
                if len(claimed) >= limit:
                    break
                row = self._events[pid][seq]
                task = (pid, row[3])
                if task in held:
                    continue
                until = row[_EV_CLAIMED]
                if until is not None and until > now:
                    held.add(task)  # an earlier event of the task is out with another caller
                    continue
                claimed.append(row)
            for row in claimed:
                self._events[row[0]][row[1]] = (*row[:_EV_CLAIMED], claimed_until)
        return [_event(row) for row in claimed]

    def settle_events(
        self, events: Sequence[Event], *, now: datetime, failures: Sequence[EventRetry] = ()
    ) -> None:
        with self._lock:
            for event in events:
                key = (event.project_id, event.seq)
                if key not in self._events_pending:
                    continue
                row = self._events[event.project_id][event.seq]
                self._events[event.project_id][event.seq] = (*row[:_EV_DELIVERED], now, None)
                del self._events_pending[key]
                if self._events_delivered is not None:
                    heapq.heappush(self._events_delivered, (now, *key))
            for failure in failures:
                event = failure.event
                if event.seq not in self._events.get(event.project_id, {}):
                    continue
                self._event_retries[(event.project_id, event.seq, failure.subscriber)] = (
                    failure.tries, failure.retry_at, failure.last_error, failure.parked, None
                )  # fmt: skip

    def _retry_of(self, key: _RetryKey, row: _RetryRow) -> EventRetry:
        return _retry(_event(self._events[key[0]][key[1]]), key[2], row)

    def claim_event_retries(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[EventRetry]:
        check_limit(limit)
        with self._lock:
            due = sorted(
                (row[1], key)
                for key, row in self._event_retries.items()
                if not row[3] and row[1] <= now and (row[4] is None or row[4] <= now)
            )[:limit]
            claimed = []
            for _, key in due:
                row = (*self._event_retries[key][:4], claimed_until)
                self._event_retries[key] = row
                claimed.append(self._retry_of(key, row))
        return claimed

    def settle_event_retry(
        self,
        retry: EventRetry,
        *,
        now: datetime,
        error: str | None = None,
        retry_at: datetime | None = None,
    ) -> None:
        key = (retry.event.project_id, retry.event.seq, retry.subscriber)
        with self._lock:
            row = self._event_retries.get(key)
            if row is None:
                return
            if error is None:
                del self._event_retries[key]
            elif retry_at is None:
                self._event_retries[key] = (row[0] + 1, now, error, True, None)
            else:
                self._event_retries[key] = (row[0] + 1, retry_at, error, False, None)

    def parked_events(self, *, subscriber: str | None = None, limit: int = 100) -> list[EventRetry]:
        check_limit(limit)
        with self._lock:
            keys = sorted(
                key
                for key, row in self._event_retries.items()
                if row[3] and (subscriber is None or key[2] == subscriber)
            )[:limit]
            return [self._retry_of(key, self._event_retries[key]) for key in keys]

    def replay_parked(
        self,
        *,
        now: datetime,
        subscriber: str | None = None,
        event_ids: Sequence[str] | None = None,
    ) -> int:
        wanted = None if event_ids is None else set(event_ids)
        with self._lock:
            keys = [
                key
                for key, row in self._event_retries.items()
                if row[3]
                and (subscriber is None or key[2] == subscriber)
                and (wanted is None or f"{key[0]}:{key[1]}" in wanted)
            ]
            for key in keys:
                row = self._event_retries[key]
                self._event_retries[key] = (0, now, row[2], False, None)
        return len(keys)

    # -- retention -------------------------------------------------------------------
    def prune(self, rule: PruneRule) -> Pruned:
        """One batch per table of what ``rule`` removes, oldest first, each under the lock once.

        Each table has an index of its rows by the time the rule cuts on
        (``expires_at``, ``delivered_at``, a finished task's ``updated_at``),
        earliest first; a prune reads it only up to the rule's cut-off and asks
        the rule about each row found there, so its cost follows what it
        removes, not how much history is kept. A row the rule keeps for another
        reason (an entry whose attempt is still to start, an event with failed
        deliveries) stays in the index for later prunes.
        """
        batch = rule.batch
        with self._lock:
            expired = self._pop_removable(
                self._expiring, rule.now, batch,
                lambda key: self._idempotency.get(key),
                lambda row: row[_I_EXPIRES],
                lambda row: rule.removes_idempotency(_idempotency(row)),
            )  # fmt: skip
            for key in expired:
                del self._idempotency[key]
        entries: list[_EntryKey] = []
        if rule.delivered_before is not None:
            with self._lock:
                entries = self._pop_removable(
                    self._delivery_indexes()[0], rule.delivered_before, batch,
                    lambda key: self._outbox.get(key),
                    lambda row: row[_E_DELIVERED] if row[_E_STATE] == _DELIVERED else None,
                    lambda row: rule.removes_entry(
                        _entry(row), _as_task(self._tasks[row[0]][row[1]])
                    ),
                )  # fmt: skip
                for key in entries:
                    del self._outbox[key]
                    self._pending.pop(key, None)
        attempts = 0
        if rule.finished_before is not None:
            with self._lock:
                if self._finished is None:
                    self._finished = [
                        (stored[_T_UPDATED], stored[_T_PROJECT], stored[_T_ID])
                        for tasks in self._tasks.values()
                        for stored in tasks.values()
                        if isinstance(stored, tuple)
                    ]
                    heapq.heapify(self._finished)
                attempts = self._prune_attempts(rule, self._finished)
        gone: list[_EventKey] = []
        if rule.delivered_before is not None:
            with self._lock:
                held: dict[_EventKey, int] = {}
                for retry_key in self._event_retries:
                    held[retry_key[:2]] = held.get(retry_key[:2], 0) + 1
                gone = self._pop_removable(
                    self._delivery_indexes()[1], rule.delivered_before, batch,
                    lambda key: self._events[key[0]].get(key[1]),
                    lambda row: row[_EV_DELIVERED],
                    lambda row: rule.removes_event(
                        row[_EV_DELIVERED], retries=held.get((row[0], row[1]), 0)
                    ),
                )  # fmt: skip
                for pid, seq in gone:
                    del self._events[pid][seq]
        return Pruned(
            idempotency=len(expired), outbox=len(entries), attempts=attempts,
            events=len(gone), batches=1,
        )  # fmt: skip

    def _delivery_indexes(
        self,
    ) -> tuple[list[tuple[datetime, _EntryKey]], list[tuple[datetime, str, int]]]:
        """The indexes of delivered entries and events, made on first use (under the lock)."""
        if self._delivered is None or self._events_delivered is None:
            self._delivered = [
                (row[_E_DELIVERED], key)
                for key, row in self._outbox.items()
                if row[_E_STATE] == _DELIVERED and row[_E_DELIVERED] is not None
            ]
            heapq.heapify(self._delivered)
            self._events_delivered = [
                (row[_EV_DELIVERED], pid, seq)
                for pid, stored in self._events.items()
                for seq, row in stored.items()
                if row[_EV_DELIVERED] is not None
            ]
            heapq.heapify(self._events_delivered)
        return self._delivered, self._events_delivered

    @staticmethod
    def _pop_removable(
        index: list[Any],
        cut: datetime,
        batch: int,
        row_of: Callable[[Any], Any],
        time_of: Callable[[Any], datetime | None],
        removes: Callable[[Any], bool],
    ) -> list[Any]:
        """The keys of at most ``batch`` rows ``removes`` accepts, from ``index`` items
        up to ``cut``, earliest first; popped from ``index`` (those kept are put back)."""
        taken: dict[Any, None] = {}
        kept: list[Any] = []
        while index and len(taken) < batch and index[0][0] <= cut:
            item = heapq.heappop(index)
            key = item[1] if len(item) == 2 else item[1:]
            row = row_of(key)
            if row is None or key in taken or time_of(row) != item[0]:
                continue  # removed, taken or changed since: another item stands for it
            if removes(row):
                taken[key] = None
            else:
                kept.append(item)
        for item in kept:
            heapq.heappush(index, item)
        return list(taken)

    def _prune_attempts(self, rule: PruneRule, index: list[tuple[datetime, str, str]]) -> int:
        """Remove at most ``rule.batch`` attempt records ``rule`` accepts, of the tasks
        that finished first (under the lock); how many went."""
        cut = rule.finished_before
        left = rule.batch
        kept: list[tuple[datetime, str, str]] = []
        while index and left > 0 and cut is not None and index[0][0] <= cut:
            item = heapq.heappop(index)
            _, pid, tid = item
            stored = self._tasks[pid].get(tid)
            history = self._attempts.get((pid, tid))
            if stored is None or not history:
                continue
            task = _as_task(stored)
            if task.updated_at != item[0]:
                continue
            if not rule.removes_attempts_of(task):
                kept.append(item)
                continue
            stays = []
            for row in history:
                if left > 0 and rule.removes_attempt(_attempt(row), task):
                    left -= 1
                else:
                    stays.append(row)
            if stays:
                self._attempts[(pid, tid)] = tuple(stays)
                kept.append(item)  # the batch ran out, or some may go later
            else:
                del self._attempts[(pid, tid)]
        for item in kept:
            heapq.heappush(index, item)
        return rule.batch - left

    def close(self) -> None:
        return None


class AsyncMemoryStorage(AsyncFromSyncEventsOverview[MemoryStorage]):
    """:class:`MemoryStorage` behind the :class:`~deepwork_retry.ports.AsyncStorage` port.

    Dictionary operations never block, so they run on the event loop itself.
    """

    def __init__(self, sync: MemoryStorage | None = None) -> None:
        super().__init__(sync or MemoryStorage(), offload=False)
