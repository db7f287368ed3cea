"""The Storage conformance suite: what every adapter must do, as pytest tests.

Subclass :class:`StorageContract` in a test module and provide a fixture named
``storage`` that yields a fresh, empty :class:`~deepwork_retry.ports.Storage`;
subclass :class:`AsyncStorageContract` and provide ``async_storage_factory``,
an async callable that creates a fresh :class:`~deepwork_retry.ports.AsyncStorage`
inside the running event loop. Both classes run the same scenarios, each
written once against the async port (a sync storage is driven through a thin
inline wrapper), and only through the port and the core's decisions.

After every write a scenario makes, the suite recounts each project's tasks
and checks the stored progress counters against the recount.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepwork_retry._async.services import (
    AsyncExecutorService,
    AsyncOutboxRelay,
    AsyncPruner,
    AsyncRetryService,
)
from deepwork_retry._core import decide
from deepwork_retry._core.model import (
    Attempt,
    DispatchEntry,
    IdempotencyRecord,
    Progress,
    Project,
    Task,
)
from deepwork_retry._core.plans import Applied, Plan, ProjectPlan
from deepwork_retry._core.policy import FixedBackoff, RetryPolicy, TaskError
from deepwork_retry._core.retention import Pruned, PruneRule, Retention
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
    IdempotencyConflict,
    InvalidInput,
    InvalidTransition,
    ProjectNotFound,
    TaskNotBlocked,
    TaskNotFound,
    VersionConflict,
)
from deepwork_retry.ports import REDELIVERED, AsyncStorage, Storage
from deepwork_retry.storage._to_async import AsyncFromSync
from deepwork_retry.testing.doubles import AsyncRecordingDispatcher, FakeClock

__all__ = ["AsyncStorageContract", "StorageContract", "recount"]

T = TypeVar("T")

LEASE = 60.0
BACKOFF = 10.0
START = 120.0
PAGE = 1000


async def recount(storage: AsyncStorage, project_id: str) -> Progress:
    """The project's progress computed by reading every task through ``list_tasks``."""
    statuses: list[TaskStatus] = []
    after: str | None = None
    for _ in range(100_000):  # bounded: 100M tasks is beyond any test
        page = await storage.list_tasks(project_id, after=after, limit=PAGE)
        statuses.extend(task.status for task in page)
        if len(page) < PAGE:
            break
        after = page[-1].id
    return Progress.recount(project_id, statuses)


class _Checked:
    """An AsyncStorage that checks progress against a recount after every write."""

    def __init__(self, inner: AsyncStorage) -> None:
        self.inner = inner
        self.projects: set[str] = set()

    async def _verify(self) -> None:
        for pid in sorted(self.projects):
            expected = await recount(self.inner, pid)
            actual = await self.inner.progress(pid)
            assert expected == actual, f"progress of {pid!r} differs from a recount"

    async def _write(self, call: Awaitable[T]) -> T:
        try:
            return await call
        finally:
            await self._verify()

    async def create_project(self, project: Project) -> None:
        await self._write(self.inner.create_project(project))
        self.projects.add(project.id)

    async def add_tasks(self, tasks: Sequence[Task]) -> None:
        await self._write(self.inner.add_tasks(tasks))

    async def get_project(self, project_id: str) -> Project:
        return await self.inner.get_project(project_id)

    async def load(self, project_id: str, task_id: str) -> tuple[Project, Task]:
        return await self.inner.load(project_id, task_id)

    async def get_tasks(self, project_id: str, task_ids: Sequence[str]) -> dict[str, Task]:
        return await self.inner.get_tasks(project_id, task_ids)

    async def dependants(self, project_id: str, task_id: str) -> list[Task]:
        return await self.inner.dependants(project_id, task_id)

    async def list_tasks(
        self,
        project_id: str,
        *,
        status: TaskStatus | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[Task]:
        return await self.inner.list_tasks(project_id, status=status, after=after, limit=limit)

    async def progress(self, project_id: str) -> Progress:
        return await self.inner.progress(project_id)

    async def attempts(self, project_id: str, task_id: str) -> list[Attempt]:
        return await self.inner.attempts(project_id, task_id)

    async def dispatches(self, project_id: str, task_id: str) -> list[DispatchEntry]:
        return await self.inner.dispatches(project_id, task_id)

    async def deferred(self, project_id: str) -> list[DispatchEntry]:
        return await self.inner.deferred(project_id)

    async def apply(self, plan: Plan) -> Applied:
        return await self._write(self.inner.apply(plan))

    async def apply_project(self, plan: ProjectPlan) -> tuple[Project, list[DispatchEntry]]:
        return await self._write(self.inner.apply_project(plan))

    async def claim_due(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[DispatchEntry]:
        return await self._write(
            self.inner.claim_due(now=now, limit=limit, claimed_until=claimed_until)
        )

    async def mark_delivered(self, entries: Sequence[DispatchEntry], *, now: datetime) -> None:
        await self._write(self.inner.mark_delivered(entries, now=now))

    async def mark_failed(self, entry: DispatchEntry, *, error: str, retry_at: datetime) -> None:
        await self._write(self.inner.mark_failed(entry, error=error, retry_at=retry_at))

    async def redeliver_stale(
        self, *, now: datetime, delivered_before: datetime, limit: int
    ) -> list[DispatchEntry]:
        return await self._write(
            self.inner.redeliver_stale(now=now, delivered_before=delivered_before, limit=limit)
        )

    async def expired_leases(self, *, now: datetime, limit: int) -> list[Task]:
        return await self.inner.expired_leases(now=now, limit=limit)

    async def get_idempotency(
        self, key: str, *, now: datetime | None = None
    ) -> IdempotencyRecord | None:
        return await self.inner.get_idempotency(key, now=now)

    async def save_idempotency(self, record: IdempotencyRecord) -> IdempotencyRecord:
        return await self.inner.save_idempotency(record)

    async def prune(self, rule: PruneRule) -> Pruned:
        return await self._write(self.inner.prune(rule))

    async def close(self) -> None:
        await self.inner.close()


@attrs.frozen
class Snapshot:
    """Everything a storage holds about one project, for "nothing changed" checks."""

    project: Project
    tasks: tuple[Task, ...]
    metadata: tuple[dict[str, Any], ...]
    attempts: tuple[tuple[Attempt, ...], ...]
    dispatches: tuple[tuple[DispatchEntry, ...], ...]
    progress: Progress
    deferred: tuple[tuple[str, str, int], ...]


class Harness:
    """A scenario's view of the storage under test, with services and a fake clock."""

    def __init__(self, storage: AsyncStorage) -> None:
        self.checked = _Checked(storage)
        self.s: AsyncStorage = self.checked
        self.clock = FakeClock()
        self.policy = RetryPolicy(
            backoff=FixedBackoff(wait=BACKOFF), lease=LEASE, start_timeout=START
        )
        self.dispatcher = AsyncRecordingDispatcher()
        # Without a dispatcher the services leave pending entries unclaimed in
        # the outbox, so scenarios can inspect and claim them.
        self.ex = AsyncExecutorService(self.s, policy=self.policy, clock=self.clock)
        self.live = AsyncExecutorService(
            self.s, self.dispatcher, policy=self.policy, clock=self.clock
        )
        self.retrier = AsyncRetryService(self.s, self.dispatcher, clock=self.clock)

    def now(self) -> datetime:
        return self.clock.now()

    async def project(
        self, project_id: str = "p", status: ProjectStatus = ProjectStatus.EXECUTING
    ) -> Project:
        return await self.ex.create_project(project_id, status=status)

    async def task(
        self,
        project_id: str,
        task_id: str,
        *,
        max_retries: int = 3,
        blocked_by: Sequence[str] = (),
    ) -> Task:
        return await self.ex.add_task(
            project_id, task_id, max_retries=max_retries, blocked_by=blocked_by
        )

    def new_task(self, project_id: str, task_id: str, **fields: Any) -> Task:
        now = self.now()
        return Task(id=task_id, project_id=project_id, created_at=now, updated_at=now, **fields)

    async def running(self, project_id: str, task_id: str) -> Task:
        """Assign and start ``task_id``; returns the running task."""
        assigned = await self.ex.assign(project_id, task_id)
        started = await self.ex.start(project_id, task_id, assigned.task.attempt)
        return started.task

    async def blocked(self, project_id: str, task_id: str, message: str = "boom") -> Task:
        """Run ``task_id`` into ``blocked`` with a non-retryable error."""
        task = await self.running(project_id, task_id)
        error = TaskError(type="Fatal", message=message, retryable=False)
        result = await self.ex.fail(project_id, task_id, task.attempt, error)
        assert TaskStatus.BLOCKED == result.task.status
        return result.task

    async def get(self, project_id: str, task_id: str) -> Task:
        return (await self.s.load(project_id, task_id))[1]

    async def all_tasks(self, project_id: str) -> list[Task]:
        tasks: list[Task] = []
        after: str | None = None
        for _ in range(100_000):
            page = await self.s.list_tasks(project_id, after=after, limit=PAGE)
            tasks.extend(page)
            if len(page) < PAGE:
                break
            after = page[-1].id
        return tasks

    async def snapshot(self, project_id: str) -> Snapshot:
        tasks = await self.all_tasks(project_id)
        return Snapshot(
            project=await self.s.get_project(project_id),
            tasks=tuple(tasks),
            metadata=tuple(dict(t.metadata) for t in tasks),
            attempts=tuple([tuple(await self.s.attempts(project_id, t.id)) for t in tasks]),
            dispatches=tuple([tuple(await self.s.dispatches(project_id, t.id)) for t in tasks]),
            progress=await self.s.progress(project_id),
            deferred=tuple(sorted(e.key for e in await self.s.deferred(project_id))),
        )


Scenario = Callable[[Harness], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(fn: Scenario) -> Scenario:
    """Register ``fn`` as a contract test named after it (its docstring is the pin)."""
    name = fn.__name__.lstrip("_")
    assert name not in SCENARIOS, name
    assert fn.__doc__, f"scenario {name} needs a one-sentence docstring"
    SCENARIOS[name] = fn
    return fn


# -- projects ----------------------------------------------------------------


@scenario
async def _create_and_get_project(h: Harness) -> None:
    """A created project reads back equal, with empty progress."""
    project = Project(
        id="p-1", status=ProjectStatus.PAUSED, name="Launch", created_at=h.now(), updated_at=h.now()
    )
    await h.s.create_project(project)
    assert project == await h.s.get_project("p-1")
    assert Progress(project_id="p-1") == await h.s.progress("p-1")
    assert [] == await h.s.list_tasks("p-1")


@scenario
async def _duplicate_project_rejected(h: Harness) -> None:
    """Creating a project whose id is taken raises AlreadyExists and keeps the original."""
    original = await h.project("p", ProjectStatus.EXECUTING)
    with pytest.raises(AlreadyExists):
        await h.s.create_project(attrs.evolve(original, status=ProjectStatus.DRAFT, name="other"))
    assert original == await h.s.get_project("p")


@scenario
async def _unknown_project_not_found(h: Harness) -> None:
    """Every project read of an unknown id raises ProjectNotFound."""
    await h.project("p")
    with pytest.raises(ProjectNotFound):
        await h.s.get_project("nope")
    with pytest.raises(ProjectNotFound):
        await h.s.progress("nope")
    with pytest.raises(ProjectNotFound):
        await h.s.list_tasks("nope")
    with pytest.raises(ProjectNotFound):
        await h.s.load("nope", "t")


@scenario
async def _apply_project_changes_status(h: Harness) -> None:
    """apply_project stores the new status and rejects a plan built on a stale version."""
    project = await h.project("p")
    plan = decide.change_project(project, ProjectStatus.PAUSED, now=h.now())
    stored, released = await h.s.apply_project(plan)
    assert plan.after == stored
    assert [] == released
    assert plan.after == await h.s.get_project("p")
    with pytest.raises(VersionConflict):
        await h.s.apply_project(plan)
    assert plan.after == await h.s.get_project("p")


# -- adding tasks ----------------------------------------------------------------


@scenario
async def _add_tasks_counted(h: Harness) -> None:
    """Added tasks read back equal (metadata included) and are counted by status."""
    await h.project("p")
    tasks = [
        h.new_task("p", "a", title="first", metadata={"k": [1, "x"], "n": None}),
        h.new_task("p", "b", status=TaskStatus.BLOCKED, error_message="bad"),
        h.new_task("p", "c", status=TaskStatus.DONE, blocked_by=["a"]),
        h.new_task("p", "d", status=TaskStatus.SKIPPED, max_retries=0),
    ]
    await h.s.add_tasks(tasks)
    stored = await h.s.list_tasks("p")
    assert tasks == stored
    assert [dict(t.metadata) for t in tasks] == [dict(t.metadata) for t in stored]
    expected = Progress(project_id="p", total=4, inbox=1, blocked=1, done=1, skipped=1)
    assert expected == await h.s.progress("p")
    assert 50 == (await h.s.progress("p")).percent


@scenario
async def _add_duplicate_task_rejected(h: Harness) -> None:
    """A batch naming a stored task raises AlreadyExists and adds none of its tasks."""
    await h.project("p")
    await h.task("p", "a")
    before = await h.snapshot("p")
    with pytest.raises(AlreadyExists):
        await h.s.add_tasks([h.new_task("p", "b"), h.new_task("p", "a", title="again")])
    assert before == await h.snapshot("p")


@scenario
async def _add_task_to_unknown_project(h: Harness) -> None:
    """A batch with a task of an unknown project raises ProjectNotFound and adds nothing."""
    await h.project("p")
    with pytest.raises(ProjectNotFound):
        await h.s.add_tasks([h.new_task("p", "a"), h.new_task("nope", "b")])
    assert [] == await h.s.list_tasks("p")
    assert Progress(project_id="p") == await h.s.progress("p")


@scenario
async def _add_bad_batch_rejected(h: Harness) -> None:
    """Malformed new tasks raise InvalidInput and add nothing."""
    await h.project("p")
    bad_batches = [
        [h.new_task("p", "a"), h.new_task("p", "a")],
        [h.new_task("p", "")],
        [h.new_task("p", "a", blocked_by=["a"])],
        [h.new_task("p", "a", max_retries=-1)],
        [h.new_task("p", "a\x00b")],
    ]
    for batch in bad_batches:
        with pytest.raises(InvalidInput):
            await h.s.add_tasks(batch)
    assert [] == await h.s.list_tasks("p")


@scenario
async def _same_task_id_in_two_projects(h: Harness) -> None:
    """Tasks are keyed by project: the same id in two projects are two tasks."""
    await h.project("p1")
    await h.project("p2")
    await h.task("p1", "t")
    await h.task("p2", "t")
    await h.ex.assign("p1", "t")
    assert TaskStatus.ASSIGNED == (await h.get("p1", "t")).status
    assert TaskStatus.INBOX == (await h.get("p2", "t")).status
    assert [] == await h.s.attempts("p2", "t")
    assert [] == await h.s.dispatches("p2", "t")


# -- reads -------------------------------------------------------------------------


@scenario
async def _task_of_other_project_not_found(h: Harness) -> None:
    """A task id that exists only in another project is not found there."""
    await h.project("p1")
    await h.project("p2")
    await h.task("p1", "x")
    await h.task("p2", "y")
    with pytest.raises(TaskNotFound):
        await h.s.load("p2", "x")
    with pytest.raises(TaskNotFound):
        await h.s.attempts("p2", "x")
    with pytest.raises(TaskNotFound):
        await h.s.dispatches("p2", "x")
    with pytest.raises(TaskNotFound):
        await h.s.load("p1", "missing")
    assert ["y"] == sorted(await h.s.get_tasks("p2", ["x", "y", "missing"]))


@scenario
async def _load_reads_project_and_task(h: Harness) -> None:
    """load returns the project and the task together."""
    project = await h.project("p")
    task = await h.task("p", "t", max_retries=5)
    assert (project, task) == await h.s.load("p", "t")


@scenario
async def _dependants_listed(h: Harness) -> None:
    """dependants returns exactly the tasks whose blocked_by names the task."""
    await h.project("p")
    await h.task("p", "a")
    await h.task("p", "b", blocked_by=["a"])
    await h.task("p", "c", blocked_by=["a", "b"])
    await h.task("p", "d", blocked_by=["b"])
    assert ["b", "c"] == sorted(t.id for t in await h.s.dependants("p", "a"))
    assert ["c", "d"] == sorted(t.id for t in await h.s.dependants("p", "b"))
    assert [] == await h.s.dependants("p", "d")
    assert [] == await h.s.dependants("p", "unknown")


@scenario
async def _list_tasks_pages_by_id(h: Harness) -> None:
    """list_tasks orders by id, pages with after/limit and filters by status."""
    await h.project("p")
    ids = ["e", "a", "c", "b", "d"]
    statuses = [TaskStatus.BLOCKED, TaskStatus.INBOX, TaskStatus.BLOCKED]
    statuses += [TaskStatus.DONE, TaskStatus.INBOX]
    await h.s.add_tasks([h.new_task("p", i, status=s) for i, s in zip(ids, statuses, strict=True)])
    assert ["a", "b", "c", "d", "e"] == [t.id for t in await h.s.list_tasks("p")]
    assert ["c", "d", "e"] == [t.id for t in await h.s.list_tasks("p", after="b")]
    assert ["a", "b"] == [t.id for t in await h.s.list_tasks("p", limit=2)]
    assert ["c", "d"] == [t.id for t in await h.s.list_tasks("p", after="b", limit=2)]
    assert [] == await h.s.list_tasks("p", after="e")
    blocked = await h.s.list_tasks("p", status=TaskStatus.BLOCKED)
    assert ["c", "e"] == [t.id for t in blocked]
    after_c = await h.s.list_tasks("p", status=TaskStatus.BLOCKED, after="c")
    assert ["e"] == [t.id for t in after_c]
    assert ["c"] == [t.id for t in await h.s.list_tasks("p", status=TaskStatus.BLOCKED, limit=1)]


@scenario
async def _list_tasks_rejects_bad_limit(h: Harness) -> None:
    """A limit outside 1..1000 raises InvalidInput."""
    await h.project("p")
    for limit in (0, -1, 1001):
        with pytest.raises(InvalidInput):
            await h.s.list_tasks("p", limit=limit)


# -- apply: compare-and-set --------------------------------------------------------


@scenario
async def _apply_writes_plan(h: Harness) -> None:
    """apply stores the plan's task, attempt and outbox entry and returns them."""
    await h.project("p")
    await h.task("p", "t")
    project, task = await h.s.load("p", "t")
    plan = decide.assign(task, project, now=h.now(), blockers={})
    applied = await h.s.apply(plan)
    assert plan.after == applied.task
    assert plan.after == await h.get("p", "t")
    assert Progress(project_id="p", total=1, assigned=1) == applied.progress
    assert [plan.new_attempt] == await h.s.attempts("p", "t")
    assert [plan.dispatch] == await h.s.dispatches("p", "t")
    assert () == applied.dispatches  # nothing was claimed
    assert applied.deferred is False


@scenario
async def _stale_version_conflicts(h: Harness) -> None:
    """A plan built on a stale task version raises VersionConflict and changes nothing."""
    await h.project("p")
    await h.task("p", "t")
    project, task = await h.s.load("p", "t")
    plan = decide.assign(task, project, now=h.now(), blockers={})
    await h.s.apply(plan)
    before = await h.snapshot("p")
    with pytest.raises(VersionConflict):
        await h.s.apply(plan)
    skip = decide.skip(task, project, now=h.now())
    with pytest.raises(VersionConflict):
        await h.s.apply(skip)
    assert before == await h.snapshot("p")


@scenario
async def _concurrent_decisions_one_wins(h: Harness) -> None:
    """Of two manual retries decided on the same read, one applies and the other conflicts."""
    await h.project("p")
    await h.task("p", "t")
    blocked = await h.blocked("p", "t")
    project = await h.s.get_project("p")
    first = decide.manual_retry(blocked, project, now=h.now(), blockers={})
    second = decide.manual_retry(
        blocked, project, now=h.now(), blockers={}, budget=RetryBudget.FULL
    )
    await h.s.apply(first)
    before = await h.snapshot("p")
    with pytest.raises(VersionConflict):
        await h.s.apply(second)
    assert before == await h.snapshot("p")
    assert 1 == (await h.get("p", "t")).retry_count
    assert 2 == len(await h.s.dispatches("p", "t"))


@scenario
async def _guard_conflicts(h: Harness) -> None:
    """A plan whose guarded task changed raises VersionConflict and changes nothing."""
    await h.project("p")
    await h.task("p", "a")
    await h.task("p", "b", blocked_by=["a"])
    project, b = await h.s.load("p", "b")
    blockers = await h.s.get_tasks("p", ["a"])
    plan = decide.assign(b, project, now=h.now(), blockers=blockers)
    assert 1 == len(plan.guards)
    await h.ex.assign("p", "a")
    before = await h.snapshot("p")
    with pytest.raises(VersionConflict):
        await h.s.apply(plan)
    assert before == await h.snapshot("p")


@scenario
async def _project_version_conflicts(h: Harness) -> None:
    """A plan that read the project conflicts after the project changed, changing nothing."""
    project = await h.project("p")
    await h.task("p", "t")
    _, task = await h.s.load("p", "t")
    plan = decide.assign(task, project, now=h.now(), blockers={})
    await h.s.apply_project(decide.change_project(project, ProjectStatus.PAUSED, now=h.now()))
    before = await h.snapshot("p")
    with pytest.raises(VersionConflict):
        await h.s.apply(plan)
    assert before == await h.snapshot("p")


@scenario
async def _idempotency_reservation_conflicts(h: Harness) -> None:
    """A second plan reserving a taken key raises IdempotencyConflict carrying the record."""
    await h.project("p")
    await h.task("p", "t1")
    await h.task("p", "t2")
    await h.blocked("p", "t1")
    await h.blocked("p", "t2")
    project, t1 = await h.s.load("p", "t1")
    first = decide.manual_retry(t1, project, now=h.now(), blockers={}, idempotency_key="k-1")
    await h.s.apply(first)
    assert first.idempotency == await h.s.get_idempotency("k-1")
    _, t2 = await h.s.load("p", "t2")
    second = decide.manual_retry(t2, project, now=h.now(), blockers={}, idempotency_key="k-1")
    before = await h.snapshot("p")
    with pytest.raises(IdempotencyConflict) as caught:
        await h.s.apply(second)
    assert first.idempotency == caught.value.record
    assert before == await h.snapshot("p")


# -- attempts ----------------------------------------------------------------------


@scenario
async def _attempt_history_kept(h: Harness) -> None:
    """Attempts are kept oldest first, each closed with its outcome and error."""
    await h.project("p")
    await h.task("p", "t", max_retries=1)
    t0 = h.now()
    await h.running("p", "t")
    h.clock.advance(1)
    await h.ex.fail("p", "t", 1, TaskError(type="Flaky", message="first"))
    h.clock.advance(BACKOFF)
    await h.ex.start("p", "t", 2)
    t2 = h.now()
    result = await h.ex.fail("p", "t", 2, TaskError(type="Flaky", message="second"))
    assert BlockedReason.BUDGET_EXHAUSTED == result.task.blocked_reason
    retried = await h.retrier.retry("p", "t", actor="alice", reason="fixed the config")
    attempts = await h.s.attempts("p", "t")
    assert [1, 2, 3] == [a.number for a in attempts]
    triggers = [Trigger.INITIAL, Trigger.AUTO_RETRY, Trigger.MANUAL_RETRY]
    assert triggers == [a.trigger for a in attempts]
    assert [Outcome.FAILED, Outcome.FAILED, None] == [a.outcome for a in attempts]
    assert ["first", "second", None] == [a.error_message for a in attempts]
    assert ["Flaky", "Flaky", None] == [a.error_type for a in attempts]
    assert [t0, t0 + timedelta(seconds=1 + BACKOFF), None] == [a.started_at for a in attempts]
    assert [t0 + timedelta(seconds=1), t2, None] == [a.finished_at for a in attempts]
    assert t0 + timedelta(seconds=1 + BACKOFF) == attempts[1].available_at
    assert ("alice", "fixed the config", RetryBudget.ONE_MORE) == (
        attempts[2].actor,
        attempts[2].reason,
        attempts[2].budget,
    )
    assert (2, None, 3) == (
        retried.task.retry_count,
        retried.task.error_message,
        retried.task.attempt,
    )


@scenario
async def _lost_attempt_recorded(h: Harness) -> None:
    """A reaped attempt whose lease expired is closed as lost and retried."""
    await h.project("p")
    await h.task("p", "t")
    await h.running("p", "t")
    h.clock.advance(LEASE - 1)
    assert [] == await h.s.expired_leases(now=h.now(), limit=10)
    h.clock.advance(1)
    results = await h.ex.reap()
    assert [("t", TaskStatus.ASSIGNED, 2)] == [
        (r.task.id, r.task.status, r.task.attempt) for r in results
    ]
    attempts = await h.s.attempts("p", "t")
    assert [Outcome.LOST, None] == [a.outcome for a in attempts]
    assert "LeaseExpired" == attempts[0].error_type


@scenario
async def _expired_leases_found(h: Harness) -> None:
    """expired_leases lists only in-progress tasks whose lease ended, at most limit."""
    await h.project("p")
    for tid in ("a", "b", "c", "d"):
        await h.task("p", tid)
    await h.running("p", "a")
    h.clock.advance(5)
    await h.running("p", "b")
    await h.running("p", "c")
    await h.ex.succeed("p", "c", 1)
    await h.ex.assign("p", "d")
    assert [] == await h.s.expired_leases(now=h.now(), limit=10)
    h.clock.advance(LEASE - 5)
    assert ["a"] == [t.id for t in await h.s.expired_leases(now=h.now(), limit=10)]
    h.clock.advance(5)
    expired = await h.s.expired_leases(now=h.now(), limit=10)
    assert ["a", "b"] == sorted(t.id for t in expired)
    assert 1 == len(await h.s.expired_leases(now=h.now(), limit=1))
    await h.ex.heartbeat("p", "b", 1)
    assert ["a"] == [t.id for t in await h.s.expired_leases(now=h.now(), limit=10)]


# -- outbox ------------------------------------------------------------------------


@scenario
async def _outbox_entry_per_attempt(h: Harness) -> None:
    """Every attempt records exactly one outbox entry, due when its backoff ends."""
    await h.project("p")
    await h.task("p", "t", max_retries=2)
    await h.running("p", "t")
    t1 = h.now()
    await h.ex.fail("p", "t", 1, TaskError(type="Flaky"))
    entries = await h.s.dispatches("p", "t")
    assert [1, 2] == [e.attempt for e in entries]
    assert [DispatchState.PENDING, DispatchState.PENDING] == [e.state for e in entries]
    assert t1 + timedelta(seconds=BACKOFF) == entries[1].available_at
    assert [("p", "t", 1), ("p", "t", 2)] == [e.key for e in entries]


@scenario
async def _deferred_until_dependency_done(h: Harness) -> None:
    """A dispatch waiting on a dependency is deferred, then released when it finishes."""
    await h.project("p")
    await h.task("p", "a")
    await h.task("p", "b", blocked_by=["a"])
    result = await h.ex.assign("p", "b")
    assert "deferred" == result.dispatches[0].status
    assert [("p", "b", 1)] == [e.key for e in await h.s.deferred("p")]
    await h.running("p", "a")
    await h.ex.succeed("p", "a", 1)
    assert [] == await h.s.deferred("p")
    (entry,) = await h.s.dispatches("p", "b")
    assert (DispatchState.PENDING, None) == (entry.state, entry.claimed_until)
    claimed = await h.s.claim_due(
        now=h.now(), limit=10, claimed_until=h.now() + timedelta(seconds=30)
    )
    assert [("p", "a", 1), ("p", "b", 1)] == sorted(e.key for e in claimed)


@scenario
async def _release_claims_for_caller(h: Harness) -> None:
    """A release in a plan with claimed_until returns the released entry claimed."""
    await h.project("p")
    await h.task("p", "a")
    await h.task("p", "b", blocked_by=["a"])
    await h.task("p", "c", blocked_by=["a"])
    await h.ex.assign("p", "b")
    await h.ex.assign("p", "c")
    await h.running("p", "a")
    result = await h.live.succeed("p", "a", 1)
    expected = [("b", 1, "dispatched"), ("c", 1, "dispatched")]
    assert expected == sorted((d.task_id, d.attempt, d.status) for d in result.dispatches)
    assert [("p", "b", 1), ("p", "c", 1)] == sorted(h.dispatcher.keys)
    for tid in ("b", "c"):
        (entry,) = await h.s.dispatches("p", tid)
        assert (DispatchState.DELIVERED, 1, h.now()) == (
            entry.state,
            entry.tries,
            entry.delivered_at,
        )


@scenario
async def _paused_project_defers(h: Harness) -> None:
    """Work of a paused project is deferred and released when it resumes."""
    await h.project("p", ProjectStatus.PAUSED)
    await h.task("p", "t")
    result = await h.ex.assign("p", "t")
    assert "deferred" == result.dispatches[0].status
    project, outcomes = await h.live.set_project_status("p", ProjectStatus.EXECUTING)
    assert ProjectStatus.EXECUTING == project.status
    assert [("t", "dispatched")] == [(o.task_id, o.status) for o in outcomes]
    assert [] == await h.s.deferred("p")
    assert [("p", "t", 1)] == h.dispatcher.keys


@scenario
async def _claim_due_exclusive(h: Harness) -> None:
    """Claimed entries are not claimed again until their claim expires."""
    await h.project("p")
    for tid in ("a", "b", "c"):
        await h.task("p", tid)
        await h.ex.assign("p", tid)
    now = h.now()
    until = now + timedelta(seconds=30)
    first = await h.s.claim_due(now=now, limit=2, claimed_until=until)
    second = await h.s.claim_due(now=now, limit=2, claimed_until=until)
    third = await h.s.claim_due(now=now, limit=2, claimed_until=until)
    assert (2, 1, 0) == (len(first), len(second), len(third))
    keys = [e.key for e in first + second]
    assert [("p", "a", 1), ("p", "b", 1), ("p", "c", 1)] == sorted(keys)
    assert [until, until, until] == [e.claimed_until for e in first + second]
    h.clock.advance(29)
    assert [] == await h.s.claim_due(
        now=h.now(), limit=10, claimed_until=h.now() + timedelta(seconds=30)
    )
    h.clock.advance(1)
    again = await h.s.claim_due(
        now=h.now(), limit=10, claimed_until=h.now() + timedelta(seconds=30)
    )
    assert sorted(keys) == sorted(e.key for e in again)


@scenario
async def _claim_due_waits_for_due_time(h: Harness) -> None:
    """An entry is not claimed before its available_at."""
    await h.project("p")
    await h.task("p", "t")
    await h.running("p", "t")
    await h.s.mark_delivered(await h.s.dispatches("p", "t"), now=h.now())
    await h.ex.fail("p", "t", 1, TaskError(type="Flaky"))

    async def claim() -> list[DispatchEntry]:
        until = h.now() + timedelta(seconds=30)
        return await h.s.claim_due(now=h.now(), limit=10, claimed_until=until)

    assert [] == await claim()
    h.clock.advance(BACKOFF - 1)
    assert [] == await claim()
    h.clock.advance(1)
    assert [("p", "t", 2)] == [e.key for e in await claim()]


@scenario
async def _mark_delivered_final(h: Harness) -> None:
    """A delivered entry records its delivery and is never claimed again."""
    await h.project("p")
    await h.task("p", "t")
    await h.ex.assign("p", "t")
    claimed = await h.s.claim_due(
        now=h.now(), limit=10, claimed_until=h.now() + timedelta(seconds=30)
    )
    h.clock.advance(2)
    await h.s.mark_delivered(claimed, now=h.now())
    (entry,) = await h.s.dispatches("p", "t")
    assert (DispatchState.DELIVERED, h.now(), 1, None) == (
        entry.state,
        entry.delivered_at,
        entry.tries,
        entry.claimed_until,
    )
    h.clock.advance(3600)
    assert [] == await h.s.claim_due(
        now=h.now(), limit=10, claimed_until=h.now() + timedelta(seconds=30)
    )
    await h.s.mark_delivered(claimed, now=h.now())
    assert [entry] == await h.s.dispatches("p", "t")


@scenario
async def _mark_failed_keeps_pending(h: Harness) -> None:
    """A failed delivery stays pending, releases its claim and is due again at retry_at."""
    await h.project("p")
    await h.task("p", "t")
    await h.ex.assign("p", "t")
    (claimed,) = await h.s.claim_due(
        now=h.now(), limit=10, claimed_until=h.now() + timedelta(seconds=30)
    )
    retry_at = h.now() + timedelta(seconds=5)
    await h.s.mark_failed(claimed, error="broker down", retry_at=retry_at)
    (entry,) = await h.s.dispatches("p", "t")
    assert (DispatchState.PENDING, 1, "broker down", retry_at, None) == (
        entry.state,
        entry.tries,
        entry.last_error,
        entry.available_at,
        entry.claimed_until,
    )
    until = h.now() + timedelta(seconds=30)
    assert [] == await h.s.claim_due(now=h.now(), limit=10, claimed_until=until)
    h.clock.advance(5)
    (again,) = await h.s.claim_due(
        now=h.now(), limit=10, claimed_until=h.now() + timedelta(seconds=30)
    )
    assert (("p", "t", 1), 1) == (again.key, again.tries)


@scenario
async def _failed_dispatch_left_for_relay(h: Harness) -> None:
    """When the dispatcher refuses, a manual retry still commits and its entry stays pending."""
    await h.project("p")
    await h.task("p", "t")
    await h.blocked("p", "t")
    h.dispatcher.failing = True
    result = await h.retrier.retry("p", "t")
    assert ("pending", TaskStatus.ASSIGNED) == (result.dispatch.status, result.task.status)
    entries = await h.s.dispatches("p", "t")
    assert (DispatchState.PENDING, 1) == (entries[-1].state, entries[-1].tries)
    assert entries[-1].last_error is not None


# -- lost messages -------------------------------------------------------------------


async def _stale(h: Harness, *, limit: int = 10) -> list[DispatchEntry]:
    """Turn back what was delivered START seconds ago or earlier."""
    before = h.now() - timedelta(seconds=START)
    return await h.s.redeliver_stale(now=h.now(), delivered_before=before, limit=limit)


async def _claim_all(h: Harness) -> list[DispatchEntry]:
    until = h.now() + timedelta(seconds=30)
    return await h.s.claim_due(now=h.now(), limit=100, claimed_until=until)


@scenario
async def _redeliver_stale_only_unstarted(h: Harness) -> None:
    """Only a delivered entry of a still-assigned task's current attempt, delivered at or before
    the cutoff, turns pending (unclaimed, due now, tries kept) and is claimable at once."""
    await h.project("p")
    await h.project("q")
    for tid in ("lost", "started", "late", "skipped", "retried", "waiting"):
        await h.task("p", tid)
    await h.task("p", "child", blocked_by=["waiting"])
    await h.task("q", "lost")
    t0 = h.now()
    await h.live.assign("q", "lost")
    h.clock.advance(1)
    for tid in ("lost", "started", "skipped", "retried"):
        await h.live.assign("p", tid)
    await h.ex.start("p", "started", 1)
    await h.ex.skip("p", "skipped")
    await h.ex.start("p", "retried", 1)
    await h.ex.fail("p", "retried", 1, TaskError(type="Flaky"))  # attempt 2, not delivered
    await h.ex.assign("p", "waiting")  # pending, never delivered
    await h.ex.assign("p", "child")  # deferred behind "waiting"
    h.clock.advance(START - 1)
    await h.live.assign("p", "late")
    ignored = ("started", "skipped", "retried", "waiting", "child")
    before = [await h.s.dispatches("p", tid) for tid in ignored]

    (first,) = await _stale(h)  # the cutoff is exactly t0
    expected = DispatchEntry(
        project_id="q",
        task_id="lost",
        attempt=1,
        state=DispatchState.PENDING,
        available_at=h.now(),
        created_at=t0,
        claimed_until=None,
        tries=1,
        last_error=REDELIVERED,
        delivered_at=t0,
    )
    assert expected == first
    assert [expected] == await h.s.dispatches("q", "lost")
    assert [] == await _stale(h)
    h.clock.advance(1)
    assert [("p", "lost", 1)] == [e.key for e in await _stale(h)]
    assert before == [await h.s.dispatches("p", tid) for tid in ignored]
    h.clock.advance(START)
    assert [("p", "late", 1)] == [e.key for e in await _stale(h)]
    assert before == [await h.s.dispatches("p", tid) for tid in ignored]

    claimed = await _claim_all(h)
    due = [("p", "late", 1), ("p", "lost", 1), ("p", "retried", 2), ("p", "waiting", 1)]
    assert [*due, ("q", "lost", 1)] == sorted(e.key for e in claimed)
    await h.s.mark_delivered(claimed, now=h.now())
    (entry,) = await h.s.dispatches("q", "lost")
    assert (DispatchState.DELIVERED, 2, h.now()) == (entry.state, entry.tries, entry.delivered_at)
    assert [] == await _stale(h)


@scenario
async def _redeliver_stale_limit(h: Harness) -> None:
    """redeliver_stale turns back at most limit entries, earliest delivery first, and rejects
    a limit outside 1..1000."""
    await h.project("p")
    for tid in ("c", "a", "b"):
        await h.task("p", tid)
        await h.live.assign("p", tid)
        h.clock.advance(1)
    h.clock.advance(START)
    for limit in (0, -1, 1001):
        with pytest.raises(InvalidInput):
            await _stale(h, limit=limit)
    assert [("p", "c", 1), ("p", "a", 1)] == [e.key for e in await _stale(h, limit=2)]
    assert [("p", "b", 1)] == [e.key for e in await _stale(h, limit=2)]
    assert [] == await _stale(h, limit=2)


@scenario
async def _reap_redelivers_lost_message(h: Harness) -> None:
    """Reaping after the start timeout hands a lost delivery to the relay again, and of the two
    messages for the attempt only the first start is accepted."""
    await h.project("p")
    await h.task("p", "t")
    await h.live.assign("p", "t")
    h.clock.advance(START - 1)
    assert ([], []) == (await h.live.reap(), await h.live.redeliver())
    h.clock.advance(1)
    assert [] == await h.live.reap()
    (entry,) = await h.s.dispatches("p", "t")
    assert (DispatchState.PENDING, REDELIVERED) == (entry.state, entry.last_error)
    relay = AsyncOutboxRelay(h.s, h.dispatcher, clock=h.clock)
    assert 1 == await relay.run_once()
    assert [("p", "t", 1), ("p", "t", 1)] == h.dispatcher.keys
    started = await h.live.start("p", "t", 1)
    assert TaskStatus.IN_PROGRESS == started.task.status
    before = await h.snapshot("p")
    with pytest.raises(InvalidTransition):
        await h.live.start("p", "t", 1)
    assert before == await h.snapshot("p")
    h.clock.advance(START)
    assert [] == await h.live.redeliver()


@scenario
async def _no_start_timeout_never_redelivers(h: Harness) -> None:
    """With start_timeout None, a delivered attempt that never starts stays delivered."""
    await h.project("p")
    await h.task("p", "t")
    policy = attrs.evolve(h.policy, start_timeout=None)
    service = AsyncExecutorService(h.s, h.dispatcher, policy=policy, clock=h.clock)
    await service.assign("p", "t")
    h.clock.advance(100 * START)
    assert ([], []) == (await service.reap(), await service.redeliver())
    (entry,) = await h.s.dispatches("p", "t")
    assert DispatchState.DELIVERED == entry.state


# -- services end to end -------------------------------------------------------------


@scenario
async def _manual_retry_end_to_end(h: Harness) -> None:
    """A manual retry moves blocked to assigned once, keeping the cleared error in history."""
    await h.project("p")
    await h.task("p", "t", max_retries=1)
    blocked = await h.blocked("p", "t", message="disk full")
    result = await h.retrier.retry("p", "t", actor="alice")
    assert (TaskStatus.ASSIGNED, 1, 1, None) == (
        result.task.status,
        result.task.retry_count,
        result.task.max_retries,
        result.task.error_message,
    )
    assert blocked.version + 1 == result.task.version
    assert "dispatched" == result.dispatch.status
    assert [("p", "t", 2)] == h.dispatcher.keys
    assert "disk full" == (await h.s.attempts("p", "t"))[0].error_message
    before = await h.snapshot("p")
    with pytest.raises(TaskNotBlocked) as caught:
        await h.retrier.retry("p", "t")
    assert "Can only retry tasks with status 'blocked', got 'assigned'" == str(caught.value)
    assert before == await h.snapshot("p")


@scenario
async def _full_budget_resets_retries(h: Harness) -> None:
    """A full-budget manual retry restores the automatic retries; one_more gives none."""
    await h.project("p")
    await h.task("p", "a", max_retries=2)
    await h.task("p", "b", max_retries=2)
    await h.blocked("p", "a")
    await h.blocked("p", "b")
    full = await h.retrier.retry("p", "a", budget=RetryBudget.FULL)
    one = await h.retrier.retry("p", "b", budget=RetryBudget.ONE_MORE)
    assert (2, 0) == (full.task.retries_left, one.task.retries_left)
    assert [RetryBudget.FULL] == [a.budget for a in (await h.s.attempts("p", "a"))[1:]]


# -- idempotency records ----------------------------------------------------------------


@scenario
async def _save_idempotency_semantics(h: Harness) -> None:
    """A reserved key is completed once; a completed record is kept and returned unchanged."""
    await h.project("p")
    assert await h.s.get_idempotency("k") is None
    reserved = IdempotencyRecord(key="k", project_id="p", task_id="t", created_at=h.now())
    assert reserved == await h.s.save_idempotency(reserved)
    assert reserved == await h.s.get_idempotency("k")
    done = attrs.evolve(reserved, status_code=200, body='{"success": true}')
    assert done == await h.s.save_idempotency(done)
    other = attrs.evolve(reserved, task_id="u", status_code=400, body="{}")
    assert done == await h.s.save_idempotency(other)
    assert done == await h.s.get_idempotency("k")
    # A response from another request (another created_at) never displaces a reservation.
    held = IdempotencyRecord(key="k3", project_id="p", task_id="t", created_at=h.now())
    await h.s.save_idempotency(held)
    later = held.created_at + timedelta(seconds=1)
    intruder = attrs.evolve(held, created_at=later, status_code=400, body="{}")
    assert held == await h.s.save_idempotency(intruder)
    assert held == await h.s.get_idempotency("k3")
    fresh = IdempotencyRecord(
        key="k2", project_id="p", task_id="t", created_at=h.now(), status_code=404, body="{}"
    )
    assert fresh == await h.s.save_idempotency(fresh)
    assert fresh == await h.s.get_idempotency("k2")


# -- retention ------------------------------------------------------------------------------
HOUR = 3600.0
DAY = 24 * HOUR


def _record(h: Harness, key: str, *, life: float, task_id: str = "t") -> IdempotencyRecord:
    now = h.now()
    return IdempotencyRecord(
        key=key,
        project_id="p",
        task_id=task_id,
        created_at=now,
        expires_at=now + timedelta(seconds=life),
    )


async def _prune_all(h: Harness, retention: Retention, *, batch: int = 500) -> Pruned:
    return await AsyncPruner(h.s, retention, clock=h.clock, batch=batch).prune()


@scenario
async def _expired_idempotency_record_is_absent(h: Harness) -> None:
    """A record looked up at or after its expires_at is absent, before any prune ran."""
    await h.project("p")
    record = _record(h, "k", life=60)
    await h.s.save_idempotency(record)
    assert record == await h.s.get_idempotency("k", now=h.now())
    assert record == await h.s.get_idempotency("k", now=h.clock.advance(59.999))
    assert await h.s.get_idempotency("k", now=record.expires_at) is None
    assert await h.s.get_idempotency("k", now=h.clock.advance(3600)) is None
    assert await h.s.get_idempotency("missing", now=h.now()) is None


@scenario
async def _expired_idempotency_key_is_free_again(h: Harness) -> None:
    """An expired key is taken by a new record, reservation or retry as if it were absent."""
    await h.project("p")
    await h.task("p", "t")
    await h.task("p", "u")
    done = attrs.evolve(_record(h, "k", life=60), status_code=200, body="{}")
    await h.s.save_idempotency(done)
    held = _record(h, "k2", life=60)
    await h.s.save_idempotency(held)
    h.clock.advance(60)
    # save_idempotency: a completed record and a reservation alike give their key up.
    fresh = attrs.evolve(_record(h, "k", life=60, task_id="u"), status_code=404, body="{}")
    assert fresh == await h.s.save_idempotency(fresh)
    assert fresh == await h.s.get_idempotency("k", now=h.now())
    answer = attrs.evolve(_record(h, "k2", life=60), status_code=400, body="{}")
    assert answer == await h.s.save_idempotency(answer)
    # apply's reservation and the retry service (one step where the storage has it).
    await h.blocked("p", "t")
    await h.blocked("p", "u")
    h.clock.advance(61)
    project, task = await h.s.load("p", "t")
    plan = decide.manual_retry(task, project, now=h.now(), blockers={}, idempotency_key="k")
    await h.s.apply(plan)
    assert plan.idempotency == await h.s.get_idempotency("k", now=h.now())
    result = await h.retrier.retry("p", "u", idempotency_key="k2")
    assert TaskStatus.ASSIGNED == result.task.status
    assert result.idempotency == await h.s.get_idempotency("k2", now=h.now())
    # A key that has not expired is still refused.
    await h.ex.start("p", "t", 2)
    await h.ex.fail("p", "t", 2, TaskError(type="Fatal", message="again", retryable=False))
    project, task = await h.s.load("p", "t")
    again = decide.manual_retry(task, project, now=h.now(), blockers={}, idempotency_key="k")
    with pytest.raises(IdempotencyConflict):
        await h.s.apply(again)


@scenario
async def _idempotency_key_gets_the_service_retention(h: Harness) -> None:
    """A retry with a key reserves it for the service's retention.idempotency period."""
    await h.project("p")
    await h.task("p", "t")
    await h.blocked("p", "t")
    retrier = AsyncRetryService(
        h.s, h.dispatcher, clock=h.clock, retention=Retention(idempotency=timedelta(minutes=5))
    )
    result = await retrier.retry("p", "t", idempotency_key="k")
    stored = await h.s.get_idempotency("k", now=h.now())
    assert stored is not None
    assert result.idempotency == stored
    assert h.now() + timedelta(minutes=5) == stored.expires_at


@scenario
async def _prune_removes_expired_idempotency_records_only(h: Harness) -> None:
    """A prune deletes the records expired at its now and keeps every other one."""
    await h.project("p")
    for n, life in enumerate([10, 20, 30, 40]):
        await h.s.save_idempotency(_record(h, f"k{n}", life=life))
    h.clock.advance(20)
    pruned = await h.s.prune(Retention().rule(h.now()))
    assert (2, 0, 0) == (pruned.idempotency, pruned.outbox, pruned.attempts)
    assert [None, None] == [await h.s.get_idempotency(k) for k in ("k0", "k1")]
    assert all([await h.s.get_idempotency(k) for k in ("k2", "k3")])


@scenario
async def _prune_batches_are_bounded(h: Harness) -> None:
    """One prune call removes at most rule.batch rows of a table, oldest first."""
    await h.project("p")
    for n in range(5):
        await h.s.save_idempotency(_record(h, f"k{n}", life=n + 1))
    h.clock.advance(10)
    rule = Retention().rule(h.now(), batch=2)
    assert [2, 2, 1, 0] == [(await h.s.prune(rule)).idempotency for _ in range(4)]
    assert [] == [k for k in ("k0", "k1", "k2", "k3", "k4") if await h.s.get_idempotency(k)]
    # The first to expire go first.
    for n in range(3):
        await h.s.save_idempotency(_record(h, f"j{n}", life=3 - n))
    h.clock.advance(10)
    await h.s.prune(Retention().rule(h.now(), batch=1))
    assert [True, True, False] == [await h.s.get_idempotency(f"j{n}") is not None for n in range(3)]


@scenario
async def _prune_removes_old_delivered_entries_only(h: Harness) -> None:
    """Delivered entries older than the period go; pending, deferred, recent ones and the
    entry of an attempt still waiting to start stay."""
    await h.project("p")
    for tid in ("done", "waiting", "pending", "recent", "dep"):
        await h.task("p", tid, blocked_by=("pending",) if tid == "dep" else ())
    await h.live.assign("p", "done")
    await h.live.start("p", "done", 1)
    await h.live.succeed("p", "done", 1)
    await h.live.assign("p", "waiting")
    await h.ex.assign("p", "pending")  # no dispatcher: stays pending
    await h.ex.assign("p", "dep")  # deferred behind "pending"
    h.clock.advance(8 * DAY)
    await h.live.assign("p", "recent")
    h.clock.advance(DAY)
    before = {t: await h.s.dispatches("p", t) for t in ("waiting", "pending", "recent", "dep")}
    pruned = await h.s.prune(Retention(delivered_outbox=timedelta(days=7)).rule(h.now()))
    assert 1 == pruned.outbox
    assert [] == await h.s.dispatches("p", "done")
    assert before == {t: await h.s.dispatches("p", t) for t in before}
    # Kept by default for 7 days, and not at all without a period.
    assert 0 == (await h.s.prune(Retention(delivered_outbox=None).rule(h.now()))).outbox


@scenario
async def _prune_keeps_attempts_unless_asked_and_only_of_finished_tasks(h: Harness) -> None:
    """Attempt records stay by default; asked, a prune removes those of tasks finished
    longer ago than the period, never those of a task that can still move."""
    await h.project("p")
    for tid in ("done", "skipped", "blocked", "recent"):
        await h.task("p", tid)
    await h.running("p", "done")
    await h.ex.succeed("p", "done", 1)
    await h.ex.assign("p", "skipped")
    await h.ex.skip("p", "skipped")
    await h.blocked("p", "blocked")
    h.clock.advance(10 * DAY)
    await h.running("p", "recent")
    await h.ex.succeed("p", "recent", 1)
    h.clock.advance(DAY)
    assert 0 == (await _prune_all(h, Retention())).attempts
    kept = {t: await h.s.attempts("p", t) for t in ("blocked", "recent")}
    pruned = await _prune_all(h, Retention(attempts=timedelta(days=2)))
    assert 2 == pruned.attempts
    assert [[], []] == [await h.s.attempts("p", t) for t in ("done", "skipped")]
    assert kept == {t: await h.s.attempts("p", t) for t in kept}
    assert TaskStatus.DONE == (await h.get("p", "done")).status


@scenario
async def _nothing_live_is_lost_to_a_prune(h: Harness) -> None:
    """After the strictest prune, a blocked task still retries, an unstarted delivery is still
    handed out again, and pending work is still delivered."""
    await h.project("p")
    for tid in ("b", "w", "q"):
        await h.task("p", tid)
    await h.blocked("p", "b")
    await h.live.assign("p", "w")
    await h.ex.assign("p", "q")
    h.clock.advance(30 * DAY)
    everything = Retention(
        idempotency=timedelta(seconds=1), delivered_outbox=timedelta(0), attempts=timedelta(0)
    )
    await _prune_all(h, everything)
    result = await h.retrier.retry("p", "b")
    assert (TaskStatus.ASSIGNED, 2) == (result.task.status, result.task.attempt)
    assert 2 == len(await h.s.attempts("p", "b"))
    turned = await h.s.redeliver_stale(
        now=h.now(), delivered_before=h.now() - timedelta(seconds=START), limit=10
    )
    assert [("p", "w", 1)] == [e.key for e in turned]
    relay = AsyncOutboxRelay(h.s, h.dispatcher, clock=h.clock)
    while await relay.run_once():
        pass
    assert {("p", "w", 1), ("p", "q", 1)} <= set(h.dispatcher.keys[-3:])


# -- retention: the property ------------------------------------------------------------------
_PATHS = ("inbox", "assigned", "delivered", "running", "blocked", "retried", "done", "skipped",
          "retried_done")  # fmt: skip
_PERIODS = st.sampled_from([None, timedelta(0), timedelta(days=1), timedelta(days=3)])


@st.composite
def _retention_cases(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "tasks": draw(
            st.lists(
                st.tuples(st.sampled_from(_PATHS), st.integers(0, 4), st.integers(0, 96)),
                min_size=1,
                max_size=6,
            )
        ),
        "delivered_outbox": draw(_PERIODS),
        "attempts": draw(_PERIODS),
        "later": draw(st.integers(0, 6)),
        "batch": draw(st.integers(1, 4)),
    }


async def _walk(h: Harness, pid: str, tid: str, path: str) -> None:
    """Take task ``tid`` along ``path``, an hour per step."""
    await h.task(pid, tid, max_retries=0)
    if path == "inbox":
        return
    if path == "skipped":
        await h.ex.skip(pid, tid)
        return
    if path == "assigned":
        await h.ex.assign(pid, tid)
        return
    if path == "delivered":
        await h.live.assign(pid, tid)
        return
    await h.live.assign(pid, tid)
    h.clock.advance(HOUR)
    await h.live.start(pid, tid, 1)
    if path == "running":
        return
    h.clock.advance(HOUR)
    if path == "done":
        await h.live.succeed(pid, tid, 1)
        return
    error = TaskError(type="Fatal", message="boom", retryable=False)
    await h.live.fail(pid, tid, 1, error)
    if path == "blocked":
        return
    h.clock.advance(HOUR)
    await h.retrier.retry(pid, tid)
    if path == "retried":
        return
    h.clock.advance(HOUR)
    await h.live.start(pid, tid, 2)
    await h.live.succeed(pid, tid, 2)


async def _prune_keeps_exactly_what_the_rule_keeps(
    storage: AsyncStorage, pid: str, case: dict[str, Any]
) -> None:
    h = Harness(storage)
    await h.project(pid)
    keys: dict[str, IdempotencyRecord] = {}
    for n, (path, days, key_hours) in enumerate(case["tasks"]):
        h.clock.advance(days * DAY)
        await _walk(h, pid, f"t{n}", path)
        key = f"{pid}-k{n}"
        keys[key] = await h.s.save_idempotency(
            attrs.evolve(_record(h, key, life=key_hours * HOUR), project_id=pid)
        )
    h.clock.advance(case["later"] * DAY)
    retention = Retention(delivered_outbox=case["delivered_outbox"], attempts=case["attempts"])
    tasks = {t.id: t for t in await h.all_tasks(pid)}
    attempts = {tid: await h.s.attempts(pid, tid) for tid in tasks}
    entries = {tid: await h.s.dispatches(pid, tid) for tid in tasks}
    rule = retention.rule(h.now())
    pruned = await AsyncPruner(h.s, retention, clock=h.clock, batch=case["batch"]).prune()
    assert pruned.complete
    for tid, task in tasks.items():
        kept = [a for a in attempts[tid] if not rule.removes_attempt(a, task)]
        assert kept == await h.s.attempts(pid, tid), f"attempts of {tid}"
        kept_entries = [e for e in entries[tid] if not rule.removes_entry(e, task)]
        assert kept_entries == await h.s.dispatches(pid, tid), f"outbox of {tid}"
        assert task == await h.get(pid, tid)
    for key, record in keys.items():
        expected = None if rule.removes_idempotency(record) else record
        assert expected == await h.s.get_idempotency(key), key


_PROPERTY_SETTINGS = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# -- running the scenarios ----------------------------------------------------------------


async def _play(fn: Scenario, storage: AsyncStorage) -> None:
    await fn(Harness(storage))


def _sync_test(name: str, fn: Scenario) -> Callable[..., None]:
    def test(self: object, storage: Storage) -> None:
        asyncio.run(_play(fn, AsyncFromSync(storage, offload=False)))

    test.__name__ = test.__qualname__ = f"test_{name}"
    test.__doc__ = fn.__doc__
    return test


AsyncStorageFactory = Callable[[], Awaitable[AsyncStorage]]


def _async_test(name: str, fn: Scenario) -> Callable[..., None]:
    def test(self: object, async_storage_factory: AsyncStorageFactory) -> None:
        async def main() -> None:
            storage = await async_storage_factory()
            try:
                await _play(fn, storage)
            finally:
                await storage.close()

        asyncio.run(main())

    test.__name__ = test.__qualname__ = f"test_{name}"
    test.__doc__ = fn.__doc__
    return test


class StorageContract:
    """The conformance tests for a sync :class:`~deepwork_retry.ports.Storage`.

    Needs a fixture named ``storage`` yielding a fresh, empty storage per test.
    """

    def test_implements_protocol(self, storage: Storage) -> None:
        """The storage has every method of the Storage protocol."""
        assert isinstance(storage, Storage)

    def test_prune_keeps_exactly_what_the_rule_keeps(self, storage: Storage) -> None:
        """After a prune, every row left is one the retention rule keeps, and every row it
        keeps is left unchanged (any history, any periods, any batch size)."""
        wrapped = AsyncFromSync(storage, offload=False)
        examples = iter(range(1_000_000))

        @_PROPERTY_SETTINGS
        @given(case=_retention_cases())
        def check(case: dict[str, Any]) -> None:
            pid = f"r{next(examples)}"
            asyncio.run(_prune_keeps_exactly_what_the_rule_keeps(wrapped, pid, case))

        check()


class AsyncStorageContract:
    """The conformance tests for an :class:`~deepwork_retry.ports.AsyncStorage`.

    Needs a fixture named ``async_storage_factory``: an async callable that
    creates a fresh, empty storage inside the running event loop (drivers bind
    their connections to the loop that opened them). Each test runs in its
    own ``asyncio.run`` and closes the storage at the end.
    """

    def test_implements_protocol(self, async_storage_factory: AsyncStorageFactory) -> None:
        """The storage has every coroutine of the AsyncStorage protocol."""

        async def main() -> bool:
            storage = await async_storage_factory()
            try:
                return isinstance(storage, AsyncStorage)
            finally:
                await storage.close()

        assert asyncio.run(main()) is True

    def test_prune_keeps_exactly_what_the_rule_keeps(
        self, async_storage_factory: AsyncStorageFactory
    ) -> None:
        """After a prune, every row left is one the retention rule keeps, and every row it
        keeps is left unchanged (any history, any periods, any batch size)."""
        examples = iter(range(1_000_000))

        async def main(pid: str, case: dict[str, Any]) -> None:
            storage = await async_storage_factory()
            try:
                await _prune_keeps_exactly_what_the_rule_keeps(storage, pid, case)
            finally:
                await storage.close()

        @_PROPERTY_SETTINGS
        @given(case=_retention_cases())
        def check(case: dict[str, Any]) -> None:
            asyncio.run(main(f"r{next(examples)}", case))

        check()


for _name, _fn in SCENARIOS.items():
    setattr(StorageContract, f"test_{_name}", _sync_test(_name, _fn))
    setattr(AsyncStorageContract, f"test_{_name}", _async_test(_name, _fn))
del _name, _fn
