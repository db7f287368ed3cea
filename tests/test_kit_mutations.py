"""The conformance kit, tested: it must fail on every single-bug variant of a storage.

Each variant below is the in-memory storage (or a one-step adapter over it)
with one behaviour broken, the way an adapter author might get it wrong. The
contract's scenarios run against each, in process, until one fails; every
variant must be caught, with a message (not a bare ``AssertionError``), and
the unmutated storages must pass every scenario.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import attrs
import pytest

from deepwork_retry._core import decide
from deepwork_retry._core.model import (
    DispatchEntry,
    IdempotencyRecord,
    Project,
    Task,
    evolve_entry,
    evolve_task,
)
from deepwork_retry._core.plans import Applied, Plan, ProjectPlan
from deepwork_retry._core.retention import Pruned, PruneRule
from deepwork_retry._core.states import DispatchState, ProjectStatus, RetryBudget, TaskStatus
from deepwork_retry.exceptions import (
    DeepworkError,
    IdempotencyConflict,
    InvalidInput,
    ProjectNotFound,
    TaskNotFound,
)
from deepwork_retry.ports import REDELIVERED, RetryInOneStep, RetryManyInOneStep, Storage
from deepwork_retry.storage import memory
from deepwork_retry.storage.memory import MemoryStorage
from deepwork_retry.testing.contract import SCENARIOS, play_sync

GAP = 0.001
"""The pause between two locked sections of a variant that splits one: a short round trip,
as any adapter that checks and writes in two statements has between them."""


def _gap() -> None:
    time.sleep(GAP)


def check_limit(limit: int) -> None:
    """The port's rule for limits (1..1000), as an adapter would check it."""
    if not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise InvalidInput(f"limit must be an integer from 1 to 1000, got {limit!r}")


def _tasks(storage: MemoryStorage, pid: str) -> dict[str, Task]:
    """The tasks of project ``pid`` as values (the storage keeps finished ones as rows)."""
    return {tid: memory._as_task(kept) for tid, kept in storage._tasks.get(pid, {}).items()}


def _stored(storage: MemoryStorage, pid: str, tid: str) -> Task:
    return memory._as_task(storage._tasks[pid][tid])


def _store(storage: MemoryStorage, task: Task) -> None:
    storage._tasks[task.project_id][task.id] = storage._keep(task)


def _current_versions(storage: MemoryStorage, plan: Plan) -> Plan:
    """``plan`` with every version it compares set to what is stored now (no compare-and-set)."""
    pid = plan.before.project_id
    tasks = _tasks(storage, pid)
    current = tasks[plan.before.id]
    guards = tuple(
        attrs.evolve(g, version=tasks[g.task_id].version) for g in plan.guards if g.task_id in tasks
    )
    project_version = None if plan.project_version is None else storage._projects[pid].version
    return attrs.evolve(
        plan,
        before=evolve_task(plan.before, version=current.version),
        guards=guards,
        project_version=project_version,
    )


# -- variants of the storage ------------------------------------------------------------------
class ApplyIgnoresVersion(MemoryStorage):
    def apply(self, plan: Plan) -> Applied:
        with self._lock:
            current = _stored(self, plan.before.project_id, plan.before.id)
            plan = attrs.evolve(plan, before=evolve_task(plan.before, version=current.version))
            return super().apply(plan)


class ApplyComparesStatus(MemoryStorage):
    def apply(self, plan: Plan) -> Applied:
        with self._lock:
            current = _stored(self, plan.before.project_id, plan.before.id)
            if current.status is plan.before.status:
                plan = attrs.evolve(plan, before=evolve_task(plan.before, version=current.version))
            return super().apply(plan)


class ApplyIgnoresGuards(MemoryStorage):
    def apply(self, plan: Plan) -> Applied:
        return super().apply(attrs.evolve(plan, guards=()))


class ApplyGuardsByStatus(MemoryStorage):
    """Guards compared on their task's status, not its version."""

    def apply(self, plan: Plan) -> Applied:
        with self._lock:
            tasks = _tasks(self, plan.before.project_id)
            guards = tuple(
                attrs.evolve(g, version=tasks[g.task_id].version)
                if g.task_id in tasks and tasks[g.task_id].status not in (TaskStatus.DONE,)
                else g
                for g in plan.guards
            )
            return super().apply(attrs.evolve(plan, guards=guards))


class ApplyIgnoresProjectVersion(MemoryStorage):
    def apply(self, plan: Plan) -> Applied:
        return super().apply(attrs.evolve(plan, project_version=None))


class ApplySplitsCheckAndWrite(MemoryStorage):
    """Checks in one locked section, writes in another."""

    def apply(self, plan: Plan) -> Applied:
        with self._lock:
            if _current_versions(self, plan) != plan:
                return super().apply(plan)  # raises the conflict
        _gap()
        with self._lock:
            return super().apply(_current_versions(self, plan))


class ApplyOverwritesReservation(MemoryStorage):
    def apply(self, plan: Plan) -> Applied:
        with self._lock:
            if plan.idempotency is not None:
                self._idempotency.pop(plan.idempotency.key, None)
            return super().apply(plan)


class ApplyKeepsExpiredReservation(MemoryStorage):
    def apply(self, plan: Plan) -> Applied:
        with self._lock:
            if plan.idempotency is not None and plan.idempotency.key in self._idempotency:
                raise IdempotencyConflict(
                    memory._idempotency(self._idempotency[plan.idempotency.key])
                )
            return super().apply(plan)


class ApplyForgetsReservation(MemoryStorage):
    def apply(self, plan: Plan) -> Applied:
        with self._lock:
            applied = super().apply(plan)
            if plan.idempotency is not None:
                del self._idempotency[plan.idempotency.key]
            return applied


class ApplyDropsMetadata(MemoryStorage):
    def apply(self, plan: Plan) -> Applied:
        return super().apply(attrs.evolve(plan, after=evolve_task(plan.after, metadata={})))


class ApplyDropsTitle(MemoryStorage):
    def apply(self, plan: Plan) -> Applied:
        return super().apply(attrs.evolve(plan, after=evolve_task(plan.after, title="")))


class ApplyReturnsOldProgress(MemoryStorage):
    def apply(self, plan: Plan) -> Applied:
        with self._lock:
            before = self._progress[plan.before.project_id]
            applied = super().apply(plan)
            return attrs.evolve(applied, progress=before)


class ApplyReturnsStaleTask(MemoryStorage):
    def apply(self, plan: Plan) -> Applied:
        applied = super().apply(plan)
        return attrs.evolve(
            applied, task=evolve_task(applied.task, updated_at=plan.before.updated_at)
        )


class ApplyForgetsNewAttempt(MemoryStorage):
    def apply(self, plan: Plan) -> Applied:
        return super().apply(attrs.evolve(plan, new_attempt=None))


class ApplyIgnoresAttemptUpdate(MemoryStorage):
    def apply(self, plan: Plan) -> Applied:
        return super().apply(attrs.evolve(plan, attempt_update=None))


class ApplyDropsAttemptError(MemoryStorage):
    def apply(self, plan: Plan) -> Applied:
        update = plan.attempt_update
        if update is not None:
            plan = attrs.evolve(plan, attempt_update=attrs.evolve(update, error_message=None))
        return super().apply(plan)


class ApplyDropsActor(MemoryStorage):
    def apply(self, plan: Plan) -> Applied:
        if plan.new_attempt is not None:
            plan = attrs.evolve(plan, new_attempt=attrs.evolve(plan.new_attempt, actor=None))
        return super().apply(plan)


class ApplyForgetsDispatch(MemoryStorage):
    def apply(self, plan: Plan) -> Applied:
        return super().apply(attrs.evolve(plan, dispatch=None))


class ApplyNeverDefers(MemoryStorage):
    def apply(self, plan: Plan) -> Applied:
        if plan.dispatch is not None and plan.dispatch.state is DispatchState.DEFERRED:
            entry = evolve_entry(plan.dispatch, state=DispatchState.PENDING)
            plan = attrs.evolve(plan, dispatch=entry)
        return super().apply(plan)


class ApplyIgnoresReleases(MemoryStorage):
    def apply(self, plan: Plan) -> Applied:
        return super().apply(attrs.evolve(plan, releases=()))


class ApplyReleasesUnclaimed(MemoryStorage):
    def apply(self, plan: Plan) -> Applied:
        return super().apply(attrs.evolve(plan, claimed_until=None))


class ApplyReturnsUnclaimedEntries(MemoryStorage):
    def apply(self, plan: Plan) -> Applied:
        applied = super().apply(plan)
        entry = plan.dispatch
        if entry is not None and entry.state is DispatchState.PENDING and not entry.claimed_until:
            return attrs.evolve(applied, dispatches=(*applied.dispatches, entry))
        return applied


class ApplyNeverSaysDeferred(MemoryStorage):
    def apply(self, plan: Plan) -> Applied:
        return attrs.evolve(super().apply(plan), deferred=False)


class ApplyForgetsProgress(MemoryStorage):
    def apply(self, plan: Plan) -> Applied:
        with self._lock:
            pid = plan.before.project_id
            before = self._progress[pid]
            applied = super().apply(plan)
            self._progress[pid] = before
            return applied


class ApplyWritesBeforeKeyCheck(MemoryStorage):
    """The task is written before the reservation is checked, and kept when it fails."""

    def apply(self, plan: Plan) -> Applied:
        with self._lock:
            idem = plan.idempotency
            taken = None if idem is None else self._idempotency.get(idem.key)
            if (
                idem is not None
                and taken is not None
                and taken[memory._I_EXPIRES] > idem.created_at
            ):
                _store(self, plan.after)
            return super().apply(plan)


class ApplyProjectIgnoresVersion(MemoryStorage):
    def apply_project(self, plan: ProjectPlan) -> tuple[Project, list[DispatchEntry]]:
        with self._lock:
            current = self._projects[plan.before.id]
            before = attrs.evolve(plan.before, version=current.version)
            return super().apply_project(attrs.evolve(plan, before=before))


class ApplyProjectIgnoresReleases(MemoryStorage):
    def apply_project(self, plan: ProjectPlan) -> tuple[Project, list[DispatchEntry]]:
        return super().apply_project(attrs.evolve(plan, releases=()))


class ApplyProjectIgnoresGuards(MemoryStorage):
    def apply_project(self, plan: ProjectPlan) -> tuple[Project, list[DispatchEntry]]:
        return super().apply_project(attrs.evolve(plan, guards=()))


class ApplyProjectReturnsOld(MemoryStorage):
    def apply_project(self, plan: ProjectPlan) -> tuple[Project, list[DispatchEntry]]:
        _, released = super().apply_project(plan)
        return plan.before, released


class CreateProjectOverwrites(MemoryStorage):
    def create_project(self, project: Project) -> None:
        with self._lock:
            if project.id in self._projects:
                self._projects[project.id] = project
                return
            super().create_project(project)


class AddTasksOneByOne(MemoryStorage):
    """Adds what it can of a batch before refusing the rest."""

    def add_tasks(self, tasks: Sequence[Task]) -> None:
        for task in tasks:
            super().add_tasks([task])


class AddTasksUnchecked(MemoryStorage):
    """Stores malformed tasks (the shared input checks left out)."""

    def add_tasks(self, tasks: Sequence[Task]) -> None:
        with self._lock:
            for task in tasks:
                if task.project_id not in self._projects:
                    raise ProjectNotFound(task.project_id)
            for task in tasks:
                _store(self, task)
                self._index(task)
                progress = self._progress[task.project_id]
                self._progress[task.project_id] = progress.shifted(None, task.status)


class AddTasksSkipsUnknownProject(MemoryStorage):
    def add_tasks(self, tasks: Sequence[Task]) -> None:
        super().add_tasks([t for t in tasks if t.project_id in self._projects])


class AddTasksUncounted(MemoryStorage):
    def add_tasks(self, tasks: Sequence[Task]) -> None:
        with self._lock:
            before = dict(self._progress)
            super().add_tasks(tasks)
            self._progress.update(before)


class LoadAcrossProjects(MemoryStorage):
    def load(self, project_id: str, task_id: str) -> tuple[Project, Task]:
        with self._lock:
            project = self.get_project(project_id)
            for pid, tasks in self._tasks.items():
                if task_id in tasks:
                    return project, _stored(self, pid, task_id)
            raise TaskNotFound(project_id, task_id)


class GetTasksAcrossProjects(MemoryStorage):
    def get_tasks(self, project_id: str, task_ids: Sequence[str]) -> dict[str, Task]:
        with self._lock:
            found = super().get_tasks(project_id, task_ids)
            for pid, tasks in self._tasks.items():
                for tid in task_ids:
                    if tid in tasks and tid not in found:
                        found[tid] = _stored(self, pid, tid)
            return found


class DependantsAcrossProjects(MemoryStorage):
    def dependants(self, project_id: str, task_id: str) -> list[Task]:
        with self._lock:
            return [
                _stored(self, pid, tid)
                for (pid, dep), ids in sorted(self._dependants.items())
                if dep == task_id
                for tid in sorted(ids)
            ]


class ListTasksIgnoresAfter(MemoryStorage):
    def list_tasks(
        self,
        project_id: str,
        *,
        status: TaskStatus | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[Task]:
        return super().list_tasks(project_id, status=status, limit=limit)


class ListTasksFiltersAfterLimit(MemoryStorage):
    def list_tasks(
        self,
        project_id: str,
        *,
        status: TaskStatus | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[Task]:
        page = super().list_tasks(project_id, after=after, limit=limit)
        return [t for t in page if status is None or t.status == status]


class ListTasksClampsLimit(MemoryStorage):
    def list_tasks(
        self,
        project_id: str,
        *,
        status: TaskStatus | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[Task]:
        limit = max(1, min(limit, 1000))
        return super().list_tasks(project_id, status=status, after=after, limit=limit)


class DispatchesOnlyLast(MemoryStorage):
    def dispatches(self, project_id: str, task_id: str) -> list[DispatchEntry]:
        return super().dispatches(project_id, task_id)[-1:]


class DeferredOfEveryProject(MemoryStorage):
    def deferred(self, project_id: str) -> list[DispatchEntry]:
        with self._lock:
            return [e for pid in self._projects for e in MemoryStorage.deferred(self, pid)]


class ClaimIgnoresClaims(MemoryStorage):
    def claim_due(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[DispatchEntry]:
        with self._lock:
            for key in self._pending:
                self._outbox[key] = (*self._outbox[key][:6], None, *self._outbox[key][7:])
            return super().claim_due(now=now, limit=limit, claimed_until=claimed_until)


class ClaimIgnoresDueTime(MemoryStorage):
    def claim_due(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[DispatchEntry]:
        return super().claim_due(
            now=now + timedelta(days=1), limit=limit, claimed_until=claimed_until
        )


class ClaimIgnoresLimit(MemoryStorage):
    def claim_due(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[DispatchEntry]:
        return super().claim_due(now=now, limit=1000, claimed_until=claimed_until)


class ClaimClampsLimit(MemoryStorage):
    def claim_due(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[DispatchEntry]:
        limit = max(1, min(limit, 1000))
        return super().claim_due(now=now, limit=limit, claimed_until=claimed_until)


class ClaimTakesDeferred(MemoryStorage):
    def claim_due(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[DispatchEntry]:
        with self._lock:
            for key, row in self._outbox.items():
                if row[3] == DispatchState.DEFERRED.value:
                    self._pending[key] = None
            claimed = super().claim_due(now=now, limit=limit, claimed_until=claimed_until)
            for key, row in self._outbox.items():
                if row[3] == DispatchState.DEFERRED.value:
                    self._pending.pop(key, None)
            return claimed


class ClaimSplitsSelectAndUpdate(MemoryStorage):
    """Reads the due entries in one locked section and marks them claimed in another."""

    def claim_due(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[DispatchEntry]:
        check_limit(limit)
        with self._lock:
            due = [
                key
                for key in self._pending
                if self._outbox[key][4] <= now
                and (self._outbox[key][6] is None or self._outbox[key][6] <= now)
            ][:limit]
        _gap()
        with self._lock:
            claimed = []
            for key in due:
                row = self._outbox[key]
                self._outbox[key] = (*row[:6], claimed_until, *row[7:])
                claimed.append(super().dispatches(key[0], key[1])[key[2] - 1])
            return claimed


class DeliveredKeepsTries(MemoryStorage):
    def mark_delivered(self, entries: Sequence[DispatchEntry], *, now: datetime) -> None:
        with self._lock:
            tries = {e.key: self._outbox[e.key][7] for e in entries if e.key in self._outbox}
            super().mark_delivered(entries, now=now)
            for key, count in tries.items():
                row = self._outbox[key]
                self._outbox[key] = (*row[:7], count, *row[8:])


class DeliveredTwice(MemoryStorage):
    """Marks entries delivered whatever their state (a second mark counts another try)."""

    def mark_delivered(self, entries: Sequence[DispatchEntry], *, now: datetime) -> None:
        with self._lock:
            for entry in entries:
                row = self._outbox.get(entry.key)
                if row is not None:
                    self._outbox[entry.key] = (*row[:3], DispatchState.PENDING.value, *row[4:])
            super().mark_delivered(entries, now=now)


class FailedKeepsClaim(MemoryStorage):
    def mark_failed(self, entry: DispatchEntry, *, error: str, retry_at: datetime) -> None:
        with self._lock:
            claimed = self._outbox[entry.key][6]
            super().mark_failed(entry, error=error, retry_at=retry_at)
            row = self._outbox[entry.key]
            self._outbox[entry.key] = (*row[:6], claimed, *row[7:])


class FailedIgnoresRetryAt(MemoryStorage):
    def mark_failed(self, entry: DispatchEntry, *, error: str, retry_at: datetime) -> None:
        with self._lock:
            available = self._outbox[entry.key][4]
            super().mark_failed(entry, error=error, retry_at=available)


class RedeliverAnyTask(MemoryStorage):
    """Turns back delivered entries whatever their task's status."""

    def redeliver_stale(
        self, *, now: datetime, delivered_before: datetime, limit: int
    ) -> list[DispatchEntry]:
        with self._lock:
            for pid, tasks in self._tasks.items():
                for tid in tasks:
                    self._assigned[(pid, tid)] = None
            try:
                return super().redeliver_stale(
                    now=now, delivered_before=delivered_before, limit=limit
                )
            finally:
                for pid in self._tasks:
                    for tid, task in _tasks(self, pid).items():
                        if task.status is not TaskStatus.ASSIGNED:
                            self._assigned.pop((pid, tid), None)


class RedeliverStrictlyBefore(MemoryStorage):
    def redeliver_stale(
        self, *, now: datetime, delivered_before: datetime, limit: int
    ) -> list[DispatchEntry]:
        before = delivered_before - timedelta(microseconds=1)
        return super().redeliver_stale(now=now, delivered_before=before, limit=limit)


class RedeliverIgnoresLimit(MemoryStorage):
    def redeliver_stale(
        self, *, now: datetime, delivered_before: datetime, limit: int
    ) -> list[DispatchEntry]:
        if not 1 <= limit <= 1000:
            return super().redeliver_stale(now=now, delivered_before=delivered_before, limit=limit)
        return super().redeliver_stale(now=now, delivered_before=delivered_before, limit=1000)


class RedeliverCountsATry(MemoryStorage):
    def redeliver_stale(
        self, *, now: datetime, delivered_before: datetime, limit: int
    ) -> list[DispatchEntry]:
        with self._lock:
            turned = super().redeliver_stale(
                now=now, delivered_before=delivered_before, limit=limit
            )
            out = []
            for entry in turned:
                entry = evolve_entry(entry, tries=entry.tries + 1)
                self._put_entry(entry)
                out.append(entry)
            return out


class RedeliverSplitsSelectAndUpdate(MemoryStorage):
    def redeliver_stale(
        self, *, now: datetime, delivered_before: datetime, limit: int
    ) -> list[DispatchEntry]:
        check_limit(limit)
        with self._lock:
            stale = [
                self._outbox[(pid, tid, _stored(self, pid, tid).attempt)]
                for pid, tid in self._assigned
                if (pid, tid, _stored(self, pid, tid).attempt) in self._outbox
            ]
            keys = sorted(
                (row[9], (row[0], row[1], row[2]))
                for row in stale
                if row[3] == DispatchState.DELIVERED.value and row[9] <= delivered_before
            )[:limit]
        _gap()
        with self._lock:
            turned = []
            for _, key in keys:
                entry = super().dispatches(key[0], key[1])[key[2] - 1]
                entry = evolve_entry(
                    entry, state=DispatchState.PENDING, available_at=now,
                    claimed_until=None, last_error=REDELIVERED,
                )  # fmt: skip
                self._put_entry(entry)
                turned.append(entry)
            return turned


class LeasesStrictlyBefore(MemoryStorage):
    def expired_leases(self, *, now: datetime, limit: int) -> list[Task]:
        return super().expired_leases(now=now - timedelta(microseconds=1), limit=limit)


class LeasesIgnoreLimit(MemoryStorage):
    def expired_leases(self, *, now: datetime, limit: int) -> list[Task]:
        if not 1 <= limit <= 1000:
            return super().expired_leases(now=now, limit=limit)
        return super().expired_leases(now=now, limit=1000)


class LeasesClampLimit(MemoryStorage):
    def expired_leases(self, *, now: datetime, limit: int) -> list[Task]:
        return super().expired_leases(now=now, limit=max(1, min(limit, 1000)))


class LeasesOfAssignedTasks(MemoryStorage):
    def expired_leases(self, *, now: datetime, limit: int) -> list[Task]:
        with self._lock:
            found = super().expired_leases(now=now, limit=limit)
            assigned = [_stored(self, pid, tid) for pid, tid in self._assigned]
            return (found + assigned)[:limit]


class IdempotencyNeverExpires(MemoryStorage):
    def get_idempotency(self, key: str, *, now: datetime | None = None) -> IdempotencyRecord | None:
        return super().get_idempotency(key)


class SaveOverwritesAnswers(MemoryStorage):
    def save_idempotency(self, record: IdempotencyRecord) -> IdempotencyRecord:
        with self._lock:
            existing = self._idempotency.get(record.key)
            if existing is not None and memory._idempotency(existing).status_code is not None:
                self._idempotency[record.key] = memory._idempotency_row(record)
                return record
            return super().save_idempotency(record)


class SaveLetsAnyoneComplete(MemoryStorage):
    def save_idempotency(self, record: IdempotencyRecord) -> IdempotencyRecord:
        with self._lock:
            existing = self._idempotency.get(record.key)
            if existing is not None and memory._idempotency(existing).status_code is None:
                self._idempotency[record.key] = memory._idempotency_row(record)
                return record
            return super().save_idempotency(record)


class SaveSplitsCheckAndInsert(MemoryStorage):
    def save_idempotency(self, record: IdempotencyRecord) -> IdempotencyRecord:
        with self._lock:
            existing = self._idempotency.get(record.key)
            if existing is not None and not memory._idempotency(existing).expired(
                record.created_at
            ):
                return super().save_idempotency(record)
        _gap()
        with self._lock:
            self._keep_idempotency(record)
            return record


class PruneIgnoresBatch(MemoryStorage):
    def prune(self, rule: PruneRule) -> Pruned:
        return super().prune(attrs.evolve(rule, batch=100_000))


class PruneKeepsNothingLive(MemoryStorage):
    """Prunes every delivered entry past the period, started or not."""

    def prune(self, rule: PruneRule) -> Pruned:
        with self._lock:
            for pid, tid in list(self._assigned):
                _store(self, evolve_task(_stored(self, pid, tid), status=TaskStatus.IN_PROGRESS))
            try:
                return super().prune(rule)
            finally:
                for pid, tid in self._assigned:
                    _store(self, evolve_task(_stored(self, pid, tid), status=TaskStatus.ASSIGNED))


# -- a one-step adapter, and its variants --------------------------------------------------------
class OneStepMemory(MemoryStorage):
    """The in-memory storage with :class:`~deepwork_retry.ports.RetryInOneStep`: the core's
    decide and apply under its lock."""

    def _blockers(self, project_id: str, task: Task) -> dict[str, Task]:
        return self.get_tasks(project_id, task.blocked_by)

    def _decide(self, task: Task, project: Project, options: dict[str, Any]) -> Plan:
        blockers = self._blockers(project.id, task)
        return decide.manual_retry(task, project, blockers=blockers, **options)

    def _apply_one(self, plan: Plan) -> Applied:
        return self.apply(plan)

    def retry_blocked(
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
    ) -> Applied | None:
        options: dict[str, Any] = {
            "now": now, "actor": actor, "reason": reason, "budget": budget,
            "claimed_until": claimed_until, "idempotency_key": idempotency_key,
            "idempotency_expires_at": idempotency_expires_at,
        }  # fmt: skip
        with self._lock:
            try:
                project, task = self.load(project_id, task_id)
                return self._apply_one(self._decide(task, project, options))
            except DeepworkError:
                return None


class OneStepIgnoresUnfinishedBlockers(OneStepMemory):
    def _blockers(self, project_id: str, task: Task) -> dict[str, Task]:
        found = super()._blockers(project_id, task)
        return {tid: evolve_task(t, status=TaskStatus.DONE) for tid, t in found.items()}


class OneStepMissingBlockersFinished(OneStepMemory):
    def _blockers(self, project_id: str, task: Task) -> dict[str, Task]:
        found = super()._blockers(project_id, task)
        for tid in task.blocked_by:
            if tid not in found:
                found[tid] = evolve_task(task, id=tid, status=TaskStatus.DONE, blocked_by=())
        return found


def _one_step_option(name: str, value: Any) -> type[OneStepMemory]:
    class Variant(OneStepMemory):
        def _decide(self, task: Task, project: Project, options: dict[str, Any]) -> Plan:
            return super()._decide(task, project, {**options, name: value})

    Variant.__name__ = f"OneStep{name.title().replace('_', '')}Is{value!r}"
    return Variant


class OneStepIgnoresTheProject(OneStepMemory):
    def _decide(self, task: Task, project: Project, options: dict[str, Any]) -> Plan:
        return super()._decide(task, attrs.evolve(project, status=ProjectStatus.EXECUTING), options)


class OneStepRaises(OneStepMemory):
    """Raises the core's refusal instead of answering ``None``."""

    def retry_blocked(self, project_id: str, task_id: str, **options: Any) -> Applied | None:
        with self._lock:
            project, task = self.load(project_id, task_id)
            return self._apply_one(self._decide(task, project, options))


def _after(name: str, **changes: Any) -> type[OneStepMemory]:
    class Variant(OneStepMemory):
        def _decide(self, task: Task, project: Project, options: dict[str, Any]) -> Plan:
            plan = super()._decide(task, project, options)
            fields = {k: (v(task) if callable(v) else v) for k, v in changes.items()}
            return attrs.evolve(plan, after=evolve_task(plan.after, **fields))

    Variant.__name__ = name
    return Variant


class OneStepReturnsOldProgress(OneStepMemory):
    def _apply_one(self, plan: Plan) -> Applied:
        before = self._progress[plan.before.project_id]
        return attrs.evolve(super()._apply_one(plan), progress=before)


class OneStepFreshKeyOnly(OneStepMemory):
    """Refuses a key that has a record at all, expired or not."""

    def retry_blocked(self, project_id: str, task_id: str, **options: Any) -> Applied | None:
        key = options.get("idempotency_key")
        if key is not None and key in self._idempotency:
            return None
        return super().retry_blocked(project_id, task_id, **options)


class OneStepSplitsKeyCheck(OneStepMemory):
    """Checks the key in one locked section, reserves it with the move in another."""

    def retry_blocked(self, project_id: str, task_id: str, **options: Any) -> Applied | None:
        key = options.get("idempotency_key")
        if key is None:
            return super().retry_blocked(project_id, task_id, **options)
        with self._lock:
            taken = self._idempotency.get(key)
            if taken is not None and taken[memory._I_EXPIRES] > options["now"]:
                return None
        _gap()
        with self._lock:
            applied = super().retry_blocked(
                project_id, task_id, **{**options, "idempotency_key": None}
            )
            if applied is not None:
                record = IdempotencyRecord(
                    key=key, project_id=project_id, task_id=task_id, created_at=options["now"]
                )
                expires_at = options.get("idempotency_expires_at")
                if expires_at is not None:
                    record = attrs.evolve(record, expires_at=expires_at)
                self._idempotency[key] = memory._idempotency_row(record)
            return applied


# -- reads across projects -------------------------------------------------------------------


class _Overview(MemoryStorage):
    """The in-memory reads across projects rebuilt from the listing of each project, so that a
    variant can break one step: its ``_key`` orders, ``_take`` selects, ``_page`` cuts."""

    def _key(self, pid: str, tid: str = "") -> Any:
        return (pid, tid)

    def _take(
        self, key: tuple[str, str], after: tuple[str, str] | None, kept: frozenset[str] | None
    ) -> bool:
        return (after is None or self._key(*key) > self._key(*after)) and (
            kept is None or key[0] in kept
        )

    def _page(self, rows: list[Any], limit: int) -> list[Any]:
        check_limit(limit)
        return rows[:limit]

    def _projects_kept(self, projects: frozenset[str] | None) -> frozenset[str] | None:
        return projects

    def _progress_of(self, pid: str) -> Any:
        return self.progress(pid)

    def _matches(self, task: Task, error_type: str | None) -> bool:
        return error_type is None or task.error_type == error_type

    def list_projects(
        self, *, projects: frozenset[str] | None = None, after: str | None = None, limit: int = 100
    ) -> list[Any]:
        from deepwork_retry._core.inputs import check_projects_page
        from deepwork_retry._core.model import ProjectSummary

        projects, after = check_projects_page(projects, after, 1)
        kept = self._projects_kept(projects)
        with self._lock:
            ids = sorted(self._projects, key=self._key)
            chosen = [
                pid
                for pid in ids
                if self._take((pid, ""), None if after is None else (after, ""), kept)
            ]
            return [
                ProjectSummary(project=self._projects[pid], progress=self._progress_of(pid))
                for pid in self._page(chosen, limit)
            ]

    def blocked_tasks(
        self,
        *,
        projects: frozenset[str] | None = None,
        error_type: str | None = None,
        after: tuple[str, str] | None = None,
        limit: int = 100,
    ) -> list[Task]:
        from deepwork_retry._core.inputs import check_blocked_page

        projects, error_type, after = check_blocked_page(projects, error_type, after, 1)
        kept = self._projects_kept(projects)
        with self._lock:
            rows = sorted(
                (
                    task
                    for pid in self._tasks
                    for task in _tasks(self, pid).values()
                    if task.status is TaskStatus.BLOCKED
                ),
                key=lambda t: self._key(t.project_id, t.id),
            )
            chosen = [
                t
                for t in rows
                if self._take((t.project_id, t.id), after, kept) and self._matches(t, error_type)
            ]
            return self._page(chosen, limit)


class OverviewOrdersByCollation(_Overview):
    """Orders ids as a case-insensitive collation would."""

    def _key(self, pid: str, tid: str = "") -> Any:
        return (pid.casefold(), pid, tid.casefold(), tid)


class OverviewOrdersByUtf16(_Overview):
    """Orders ids by their UTF-16 code units (an astral character before U+FFFD)."""

    def _key(self, pid: str, tid: str = "") -> Any:
        return (pid.encode("utf-16-be"), tid.encode("utf-16-be"))


class OverviewOrdersByTaskFirst(_Overview):
    """Orders the blocked tasks by task id, then project."""

    def _key(self, pid: str, tid: str = "") -> Any:
        return (tid, pid)


class OverviewCursorInclusive(_Overview):
    """Starts a page at the cursor rather than after it (the last row comes twice)."""

    def _take(
        self, key: tuple[str, str], after: tuple[str, str] | None, kept: frozenset[str] | None
    ) -> bool:
        return (after is None or key >= after) and (kept is None or key[0] in kept)


class OverviewCursorByProjectOnly(_Overview):
    """Compares the cursor's project only (the rest of that project is lost)."""

    def _take(
        self, key: tuple[str, str], after: tuple[str, str] | None, kept: frozenset[str] | None
    ) -> bool:
        return (after is None or key[0] > after[0]) and (kept is None or key[0] in kept)


class OverviewCursorIgnored(_Overview):
    def _take(
        self, key: tuple[str, str], after: tuple[str, str] | None, kept: frozenset[str] | None
    ) -> bool:
        return kept is None or key[0] in kept


class OverviewIgnoresTheSet(_Overview):
    def _projects_kept(self, projects: frozenset[str] | None) -> frozenset[str] | None:
        return None


class OverviewEmptySetIsEvery(_Overview):
    """Takes an empty set of projects for no restriction (a falsy check)."""

    def _projects_kept(self, projects: frozenset[str] | None) -> frozenset[str] | None:
        return projects or None


class OverviewClampsLimit(_Overview):
    def _page(self, rows: list[Any], limit: int) -> list[Any]:
        return rows[: max(1, min(limit, 1000))]


class OverviewFiltersAfterLimit(_Overview):
    """Cuts the page, then filters it by error type (short pages mid-list)."""

    def blocked_tasks(
        self,
        *,
        projects: frozenset[str] | None = None,
        error_type: str | None = None,
        after: tuple[str, str] | None = None,
        limit: int = 100,
    ) -> list[Task]:
        page = super().blocked_tasks(projects=projects, after=after, limit=limit)
        check_limit(limit)
        return [t for t in page if error_type is None or t.error_type == error_type]


class OverviewErrorTypeIgnoresCase(_Overview):
    def _matches(self, task: Task, error_type: str | None) -> bool:
        return error_type is None or (task.error_type or "").casefold() == error_type.casefold()


class OverviewErrorTypePrefix(_Overview):
    def _matches(self, task: Task, error_type: str | None) -> bool:
        return error_type is None or (task.error_type or "").startswith(error_type)


class OverviewStaleProgress(_Overview):
    """Answers each project with the progress it had when created."""

    def _progress_of(self, pid: str) -> Any:
        from deepwork_retry._core.model import Progress

        return Progress(project_id=pid)


class OverviewProjectsUnchecked(_Overview):
    """Checks no input: a bad limit, cursor or filter is not refused."""

    def list_projects(
        self, *, projects: frozenset[str] | None = None, after: str | None = None, limit: int = 100
    ) -> list[Any]:
        try:
            return super().list_projects(projects=projects, after=after, limit=limit)
        except InvalidInput:
            return []

    def blocked_tasks(self, **options: Any) -> list[Task]:
        try:
            return super().blocked_tasks(**options)
        except InvalidInput:
            return []


OVERVIEW_VARIANTS: list[type[MemoryStorage]] = [
    OverviewOrdersByCollation,
    OverviewOrdersByUtf16,
    OverviewOrdersByTaskFirst,
    OverviewCursorInclusive,
    OverviewCursorByProjectOnly,
    OverviewCursorIgnored,
    OverviewIgnoresTheSet,
    OverviewEmptySetIsEvery,
    OverviewClampsLimit,
    OverviewFiltersAfterLimit,
    OverviewErrorTypeIgnoresCase,
    OverviewErrorTypePrefix,
    OverviewStaleProgress,
    OverviewProjectsUnchecked,
]


VARIANTS: list[type[MemoryStorage]] = [
    ApplyIgnoresVersion,
    ApplyComparesStatus,
    ApplyIgnoresGuards,
    ApplyGuardsByStatus,
    ApplyIgnoresProjectVersion,
    ApplySplitsCheckAndWrite,
    ApplyOverwritesReservation,
    ApplyKeepsExpiredReservation,
    ApplyForgetsReservation,
    ApplyDropsMetadata,
    ApplyDropsTitle,
    ApplyReturnsOldProgress,
    ApplyReturnsStaleTask,
    ApplyForgetsNewAttempt,
    ApplyIgnoresAttemptUpdate,
    ApplyDropsAttemptError,
    ApplyDropsActor,
    ApplyForgetsDispatch,
    ApplyNeverDefers,
    ApplyIgnoresReleases,
    ApplyReleasesUnclaimed,
    ApplyReturnsUnclaimedEntries,
    ApplyNeverSaysDeferred,
    ApplyForgetsProgress,
    ApplyWritesBeforeKeyCheck,
    ApplyProjectIgnoresVersion,
    ApplyProjectIgnoresReleases,
    ApplyProjectIgnoresGuards,
    ApplyProjectReturnsOld,
    CreateProjectOverwrites,
    AddTasksOneByOne,
    AddTasksUnchecked,
    AddTasksSkipsUnknownProject,
    AddTasksUncounted,
    LoadAcrossProjects,
    GetTasksAcrossProjects,
    DependantsAcrossProjects,
    ListTasksIgnoresAfter,
    ListTasksFiltersAfterLimit,
    ListTasksClampsLimit,
    DispatchesOnlyLast,
    DeferredOfEveryProject,
    ClaimIgnoresClaims,
    ClaimIgnoresDueTime,
    ClaimIgnoresLimit,
    ClaimClampsLimit,
    ClaimTakesDeferred,
    ClaimSplitsSelectAndUpdate,
    DeliveredKeepsTries,
    DeliveredTwice,
    FailedKeepsClaim,
    FailedIgnoresRetryAt,
    RedeliverAnyTask,
    RedeliverStrictlyBefore,
    RedeliverIgnoresLimit,
    RedeliverCountsATry,
    RedeliverSplitsSelectAndUpdate,
    LeasesStrictlyBefore,
    LeasesIgnoreLimit,
    LeasesClampLimit,
    LeasesOfAssignedTasks,
    IdempotencyNeverExpires,
    SaveOverwritesAnswers,
    SaveLetsAnyoneComplete,
    SaveSplitsCheckAndInsert,
    PruneIgnoresBatch,
    PruneKeepsNothingLive,
    *OVERVIEW_VARIANTS,
]

ONE_STEP_VARIANTS: list[type[MemoryStorage]] = [
    OneStepIgnoresUnfinishedBlockers,
    OneStepMissingBlockersFinished,
    _one_step_option("actor", None),
    _one_step_option("reason", None),
    _one_step_option("budget", RetryBudget.ONE_MORE),
    _one_step_option("budget", RetryBudget.FULL),
    _one_step_option("claimed_until", None),
    _one_step_option("idempotency_key", None),
    _one_step_option("idempotency_expires_at", None),
    OneStepIgnoresTheProject,
    OneStepRaises,
    _after("OneStepAlwaysResetsStartedAt", started_at=None),
    _after("OneStepKeepsStartedAt", started_at=lambda task: task.started_at),
    _after("OneStepKeepsRetryCount", retry_count=lambda task: task.retry_count),
    _after("OneStepKeepsError", error_message=lambda task: task.error_message),
    _after("OneStepKeepsBlockedReason", blocked_reason=lambda task: task.blocked_reason),
    _after("OneStepDropsMetadata", metadata={}),
    OneStepReturnsOldProgress,
    OneStepFreshKeyOnly,
    OneStepSplitsKeyCheck,
]


class ManyMemory(MemoryStorage):
    """The in-memory storage with :class:`~deepwork_retry.ports.RetryManyInOneStep`: each
    task decided by the core and applied, under the storage's lock."""

    def _one(self, project_id: str, task_id: str, options: dict[str, Any]) -> Applied | None:
        try:
            project, task = self.load(project_id, task_id)
            blockers = self.get_tasks(project_id, task.blocked_by)
            return self.apply(decide.manual_retry(task, project, blockers=blockers, **options))
        except DeepworkError:
            return None

    def retry_blocked_many(
        self,
        project_id: str,
        task_ids: Sequence[str],
        *,
        now: datetime,
        actor: str | None = None,
        reason: str | None = None,
        budget: RetryBudget = RetryBudget.ONE_MORE,
        claimed_until: datetime | None = None,
    ) -> list[Applied | None]:
        options: dict[str, Any] = {
            "now": now, "actor": actor, "reason": reason, "budget": budget,
            "claimed_until": claimed_until,
        }  # fmt: skip
        with self._lock:
            return [self._one(project_id, task_id, options) for task_id in task_ids]


class ManyAnswersInReverse(ManyMemory):
    def retry_blocked_many(self, *args: Any, **kwargs: Any) -> list[Applied | None]:
        return super().retry_blocked_many(*args, **kwargs)[::-1]


class ManyDropsRefusals(ManyMemory):
    """Leaves the tasks it declined out of its answer instead of answering None for them."""

    def retry_blocked_many(self, *args: Any, **kwargs: Any) -> list[Applied | None]:
        return [a for a in super().retry_blocked_many(*args, **kwargs) if a is not None]


class ManyIgnoresBudget(ManyMemory):
    def retry_blocked_many(self, *args: Any, **kwargs: Any) -> list[Applied | None]:
        kwargs["budget"] = RetryBudget.ONE_MORE
        return super().retry_blocked_many(*args, **kwargs)


class ManyStopsAtFirstRefusal(ManyMemory):
    """Declines every task after the first one it declines."""

    def retry_blocked_many(
        self, project_id: str, task_ids: Sequence[str], **kwargs: Any
    ) -> list[Applied | None]:
        answers: list[Applied | None] = []
        for task_id in task_ids:
            if answers and answers[-1] is None:
                answers.append(None)
                continue
            answers.extend(super().retry_blocked_many(project_id, [task_id], **kwargs))
        return answers


MANY_VARIANTS: list[type[MemoryStorage]] = [
    ManyAnswersInReverse,
    ManyDropsRefusals,
    ManyIgnoresBudget,
    ManyStopsAtFirstRefusal,
]

BROKEN_VARIANT = (AttributeError, TypeError, NameError, IndexError)
"""Errors that mean the variant itself is wrong, not that the kit caught it."""


def first_failure(make: Callable[[], Storage]) -> tuple[str, BaseException] | None:
    """The first contract scenario that fails on storages made by ``make``, and how."""
    for name, fn in SCENARIOS.items():
        try:
            play_sync(fn, make())
        except (Exception, pytest.fail.Exception) as exc:  # noqa: BLE001 - any failure is a catch
            return name, exc
    return None


@pytest.mark.parametrize(
    "storage", [MemoryStorage, OneStepMemory, ManyMemory, _Overview], ids=lambda c: c.__name__
)
def test_the_unmutated_storages_pass(storage: type[MemoryStorage]) -> None:
    assert first_failure(storage) is None


def test_the_one_step_adapter_is_one() -> None:
    assert isinstance(OneStepMemory(), RetryInOneStep)
    assert not isinstance(MemoryStorage(), RetryInOneStep)
    assert isinstance(ManyMemory(), RetryManyInOneStep)
    assert not isinstance(MemoryStorage(), RetryManyInOneStep)


def test_there_are_enough_variants() -> None:
    names = [v.__name__ for v in VARIANTS + ONE_STEP_VARIANTS + MANY_VARIANTS]
    assert len(names) == len(set(names))
    assert len(names) >= 50


@pytest.mark.parametrize(
    "variant", VARIANTS + ONE_STEP_VARIANTS + MANY_VARIANTS, ids=lambda c: c.__name__
)
def test_the_kit_catches_the_variant(variant: type[MemoryStorage]) -> None:
    started = time.monotonic()
    failure = first_failure(variant)
    took = time.monotonic() - started
    assert failure is not None, f"{variant.__name__} passed every contract scenario"
    name, exc = failure
    assert not isinstance(exc, BROKEN_VARIANT), f"{variant.__name__} broke in {name}: {exc!r}"
    assert str(exc).strip(), f"{variant.__name__} was caught by {name} with an empty message"
    assert took < 30, f"{variant.__name__} took {took:.1f} s to catch"


@pytest.mark.parametrize(
    ("variant", "fragments"),
    [
        (ApplyDropsTitle, ["title", "expected 'Write the report', got ''"]),
        (ApplyDropsMetadata, ["metadata", "'owner'", "got []"]),
        (ApplyReturnsOldProgress, ["progress", ".inbox: expected 1, got 0"]),
        (OneStepIgnoresUnfinishedBlockers, ["an unfinished blocker", ".dispatches", "got 1"]),
        (OneStepReturnsOldProgress, ["retry_blocked returned a progress", "expected 0, got 1"]),
        (SaveSplitsCheckAndInsert, [".task_id: expected"]),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_a_failure_names_the_field_and_both_values(
    variant: type[MemoryStorage], fragments: list[str]
) -> None:
    failure = first_failure(variant)
    assert failure is not None
    message = str(failure[1])
    for fragment in fragments:
        assert fragment in message


def test_a_plain_assert_of_the_kit_shows_both_sides() -> None:
    """The kit's modules are assertion-rewritten under pytest (registered on import)."""
    failure = first_failure(ApplyForgetsNewAttempt)
    assert failure is not None
    name, exc = failure
    assert (name, type(exc)) == ("apply_writes_plan", AssertionError)
    assert "assert [" in str(exc)
    assert "==" in str(exc)
