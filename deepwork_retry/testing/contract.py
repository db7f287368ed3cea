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
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepwork_retry._async.services import (
    AsyncExecutorService,
    AsyncOutboxRelay,
    AsyncPruner,
    AsyncRetryService,
)
from deepwork_retry._core import decide
from deepwork_retry._core import events as lifecycle
from deepwork_retry._core.events import Event, EventRetry
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
    DeepworkError,
    IdempotencyConflict,
    InvalidInput,
    InvalidTransition,
    ProjectNotFound,
    ProjectNotRunnable,
    TaskNotBlocked,
    TaskNotFound,
    VersionConflict,
)
from deepwork_retry.ports import (
    REDELIVERED,
    AsyncEventLog,
    AsyncProjectOverview,
    AsyncRetryInOneStep,
    AsyncRetryManyInOneStep,
    AsyncStorage,
    RetryManyInOneStep,
    Storage,
)
from deepwork_retry.storage._to_async import AsyncFromSync
from deepwork_retry.storage.memory import MemoryStorage
from deepwork_retry.testing._compare import check_same
from deepwork_retry.testing.doubles import AsyncRecordingDispatcher, FakeClock

__all__ = ["AsyncStorageContract", "StorageContract", "recount"]

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

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
        self.log: AsyncEventLog | None = inner if isinstance(inner, AsyncEventLog) else None
        self.seen: dict[str, int] = {}

    async def _new_events(self, project_id: str) -> list[Event]:
        """The project's events since the last look, checked to be numbered on without a gap."""
        if self.log is None:
            return []
        found: list[Event] = []
        last = self.seen.get(project_id, 0)
        while True:
            page = await self.log.events(project_id, after=last, limit=EVENT_PAGE)
            for event in page:
                if event.seq != last + 1 and not (last == 0 and not found):
                    raise AssertionError(
                        f"the events of {project_id!r} skip from {last} to {event.seq}"
                    )
                last = event.seq
            found.extend(page)
            if len(page) < EVENT_PAGE:
                break
        self.seen[project_id] = last
        return found

    async def _check_events(self, project_id: str, expected: Sequence[Event], what: str) -> None:
        """The write recorded ``expected`` (unnumbered), in order, as consecutive events
        among those written since the last look (other writers may have written too)."""
        if self.log is None:
            return
        new = [attrs.evolve(e, seq=0) for e in await self._new_events(project_id)]
        want = list(expected)
        for start in range(len(new) - len(want) + 1):
            if new[start : start + len(want)] == want:
                return
        raise AssertionError(
            f"{what} did not record the core's events: expected {want!r} among {new!r}"
        )

    async def _verify(self) -> None:
        for pid in sorted(self.projects):
            expected = await recount(self.inner, pid)
            actual = await self.inner.progress(pid)
            check_same(expected, actual, f"the stored progress of {pid!r} (expected: a recount)")

    async def _verify_applied(self, applied: Applied, what: str) -> None:
        """What a write returned is what it stored: the task (every field) and the progress."""
        task = applied.task
        stored = await self.inner.load(task.project_id, task.id)
        check_same(applied.task, stored[1], f"{what} returned a task unlike the stored one")
        progress = await self.inner.progress(task.project_id)
        check_same(applied.progress, progress, f"{what} returned a progress unlike the stored one")

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
        for pid in dict.fromkeys(t.project_id for t in tasks):
            added = [lifecycle.added(t) for t in tasks if t.project_id == pid]
            await self._check_events(pid, added, "add_tasks")

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
        applied = await self._write(self.inner.apply(plan))
        await self._verify_applied(applied, "apply")
        await self._check_events(plan.before.project_id, lifecycle.events_of(plan), "apply")
        return applied

    async def apply_project(self, plan: ProjectPlan) -> tuple[Project, list[DispatchEntry]]:
        project, released = await self._write(self.inner.apply_project(plan))
        stored = await self.inner.get_project(project.id)
        check_same(project, stored, "apply_project returned a project unlike the stored one")
        return project, released

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


class _CheckedOneStep(_Checked):
    """:class:`_Checked` over a storage that retries in one step, passing the capability on."""

    inner: Any

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
    ) -> Applied | None:
        applied: Applied | None = await self._write(
            self.inner.retry_blocked(
                project_id, task_id, now=now, actor=actor, reason=reason, budget=budget,
                claimed_until=claimed_until, idempotency_key=idempotency_key,
                idempotency_expires_at=idempotency_expires_at,
            )
        )  # fmt: skip
        if applied is not None:
            await self._verify_applied(applied, "retry_blocked")
            expected = lifecycle.manual_retry_events(
                applied.task, now=now, actor=actor, reason=reason, budget=RetryBudget(budget),
                deferred=applied.deferred,
            )  # fmt: skip
            await self._check_events(project_id, expected, "retry_blocked")
        return applied


def checked(storage: AsyncStorage) -> _Checked:
    """``storage`` with the suite's checks after every write (and its one-step retry, if any)."""
    if isinstance(storage, AsyncRetryInOneStep):
        return _CheckedOneStep(storage)
    return _Checked(storage)


def inline_port(storage: Storage) -> AsyncStorage:
    """The async port over a sync ``storage``, calls run inline; keeps its one-step retry."""
    return AsyncFromSync(storage, offload=False)


Racer = Callable[[AsyncStorage], Awaitable[Any]]
EVENT_PAGE = 1000
"""Events read per page by the suite's checks."""

Race = Callable[[Sequence[Racer]], Awaitable[list[Any]]]
RACE_TIMEOUT = 30.0


def thread_race(storage: Storage) -> Race:
    """Run racing calls on a sync storage, each on its own thread, released together.

    Each call gets its own inline port (and event loop) on its thread; the
    interpreter switches threads as often as it can meanwhile, so that
    interleavings inside the storage's methods happen.
    """

    async def race(calls: Sequence[Racer]) -> list[Any]:
        barrier = threading.Barrier(len(calls))
        results: list[Any] = [None] * len(calls)

        def run(index: int) -> None:
            port = inline_port(storage)

            async def go() -> Any:
                barrier.wait(RACE_TIMEOUT)
                return await calls[index](port)

            try:
                results[index] = asyncio.run(go())
            except BaseException as exc:  # noqa: BLE001 - handed to the scenario
                results[index] = exc

        threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(len(calls))]
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(RACE_TIMEOUT)
        finally:
            sys.setswitchinterval(interval)
        stuck = sum(thread.is_alive() for thread in threads)
        assert not stuck, f"{stuck} racing calls did not finish within {RACE_TIMEOUT:g} s"
        return results

    return race


def task_race(storage: AsyncStorage) -> Race:
    """Run racing calls on an async storage as concurrent tasks of the running loop."""

    async def race(calls: Sequence[Racer]) -> list[Any]:
        gathered = asyncio.gather(*(call(storage) for call in calls), return_exceptions=True)
        return list(await asyncio.wait_for(gathered, RACE_TIMEOUT))

    return race


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

    def __init__(self, storage: AsyncStorage, race: Race | None = None) -> None:
        self.raw = storage
        self.checked = checked(storage)
        self.s: AsyncStorage = self.checked
        self.race: Race = race or task_race(storage)
        """Runs calls concurrently on the storage (threads for a sync one); returns each
        call's result or the exception it raised, in order."""
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


async def refused(call: Awaitable[Any], error: type[E], what: str) -> E:
    """Await ``call`` and check that it raised ``error`` (returned); a failure names ``what``
    and what the call returned instead."""
    try:
        result = await call
    except error as exc:
        return exc
    raise AssertionError(f"{what}: expected {error.__name__} to be raised, got {result!r}")


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
    await refused(
        h.s.create_project(attrs.evolve(original, status=ProjectStatus.DRAFT, name="other")),
        AlreadyExists,
        "create_project(attrs.evolve(original, status=ProjectStatus.DRAFT, name='other'))",
    )
    assert original == await h.s.get_project("p")


@scenario
async def _unknown_project_not_found(h: Harness) -> None:
    """Every project read of an unknown id raises ProjectNotFound."""
    await h.project("p")
    await refused(h.s.get_project("nope"), ProjectNotFound, "get_project('nope')")
    await refused(h.s.progress("nope"), ProjectNotFound, "progress('nope')")
    await refused(h.s.list_tasks("nope"), ProjectNotFound, "list_tasks('nope')")
    await refused(h.s.load("nope", "t"), ProjectNotFound, "load('nope', 't')")


@scenario
async def _apply_project_changes_status(h: Harness) -> None:
    """apply_project stores the new status and rejects a plan built on a stale version."""
    project = await h.project("p")
    plan = decide.change_project(project, ProjectStatus.PAUSED, now=h.now())
    stored, released = await h.s.apply_project(plan)
    assert plan.after == stored
    assert [] == released
    assert plan.after == await h.s.get_project("p")
    await refused(h.s.apply_project(plan), VersionConflict, "apply_project(plan)")
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
    await refused(
        h.s.add_tasks([h.new_task("p", "b"), h.new_task("p", "a", title="again")]),
        AlreadyExists,
        "add_tasks([h.new_task('p', 'b'), h.new_task('p', 'a', title='again')])",
    )
    check_same(before, await h.snapshot("p"), "the state after a refused write")


@scenario
async def _add_task_to_unknown_project(h: Harness) -> None:
    """A batch with a task of an unknown project raises ProjectNotFound and adds nothing."""
    await h.project("p")
    await refused(
        h.s.add_tasks([h.new_task("p", "a"), h.new_task("nope", "b")]),
        ProjectNotFound,
        "add_tasks([h.new_task('p', 'a'), h.new_task('nope', 'b')])",
    )
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
        await refused(h.s.add_tasks(batch), InvalidInput, "add_tasks(batch)")
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
    await refused(h.s.load("p2", "x"), TaskNotFound, "load('p2', 'x')")
    await refused(h.s.attempts("p2", "x"), TaskNotFound, "attempts('p2', 'x')")
    await refused(h.s.dispatches("p2", "x"), TaskNotFound, "dispatches('p2', 'x')")
    await refused(h.s.load("p1", "missing"), TaskNotFound, "load('p1', 'missing')")
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
        await refused(
            h.s.list_tasks("p", limit=limit), InvalidInput, "list_tasks('p', limit=limit)"
        )


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
    await refused(h.s.apply(plan), VersionConflict, "apply of a plan on a stale task version")
    skip = decide.skip(task, project, now=h.now())
    await refused(h.s.apply(skip), VersionConflict, "apply of a plan on a stale task version")
    check_same(before, await h.snapshot("p"), "the state after a refused write")


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
    await refused(
        h.s.apply(second), VersionConflict, "apply of the second retry decided on the same read"
    )
    check_same(before, await h.snapshot("p"), "the state after a refused write")
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
    await refused(h.s.apply(plan), VersionConflict, "apply of a plan whose guarded task changed")
    check_same(before, await h.snapshot("p"), "the state after a refused write")


@scenario
async def _project_version_conflicts(h: Harness) -> None:
    """A plan that read the project conflicts after the project changed, changing nothing."""
    project = await h.project("p")
    await h.task("p", "t")
    _, task = await h.s.load("p", "t")
    plan = decide.assign(task, project, now=h.now(), blockers={})
    await h.s.apply_project(decide.change_project(project, ProjectStatus.PAUSED, now=h.now()))
    before = await h.snapshot("p")
    await refused(h.s.apply(plan), VersionConflict, "apply of a plan whose project changed")
    check_same(before, await h.snapshot("p"), "the state after a refused write")


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
    caught = await refused(
        h.s.apply(second), IdempotencyConflict, "apply of a second plan reserving the same key"
    )
    check_same(first.idempotency, caught.record, "the record IdempotencyConflict carries")
    check_same(before, await h.snapshot("p"), "the state after a refused write")


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
        await refused(_stale(h, limit=limit), InvalidInput, "_stale(h, limit=limit)")
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
    await refused(h.live.start("p", "t", 1), InvalidTransition, "live.start('p', 't', 1)")
    check_same(before, await h.snapshot("p"), "the state after a refused write")
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
    refusal = await refused(
        h.retrier.retry("p", "t"), TaskNotBlocked, "a retry of an assigned task"
    )
    assert "Can only retry tasks with status 'blocked', got 'assigned'" == str(refusal)
    check_same(before, await h.snapshot("p"), "the state after a refused write")


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
    await refused(
        h.s.apply(again), IdempotencyConflict, "apply reserving a key that has not expired"
    )


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


# -- every field, every state ------------------------------------------------------------------


@scenario
async def _every_field_survives_every_move(h: Harness) -> None:
    """A task's title, metadata and every other field read back as each move left them
    (assign, start, heartbeat, fail, retry, submit for review, approve)."""
    await h.project("p")
    metadata = {"owner": "zoë", "tags": [1, "two"], "nested": {"n": None}}
    added = h.new_task("p", "t", title="Write the report", max_retries=1, metadata=metadata)
    await h.s.add_tasks([added])
    check_same(added, await h.get("p", "t"), "the added task")
    moves: list[Callable[[], Awaitable[Any]]] = [
        lambda: h.ex.assign("p", "t"),
        lambda: h.ex.start("p", "t", 1),
        lambda: h.ex.heartbeat("p", "t", 1),
        lambda: h.ex.fail("p", "t", 1, TaskError(type="Flaky", message="try again")),
        lambda: h.ex.start("p", "t", 2),
        lambda: h.ex.fail("p", "t", 2, TaskError(type="Fatal", message="no", retryable=False)),
        lambda: h.retrier.retry("p", "t", actor="alice", reason="fixed"),
        lambda: h.ex.start("p", "t", 3),
        lambda: h.ex.succeed("p", "t", 3, review=True),
        lambda: h.ex.approve("p", "t"),
    ]
    for n, move in enumerate(moves):
        h.clock.advance(1)
        result = await move()
        stored = await h.get("p", "t")
        check_same(result.task, stored, f"the task after move {n}")
        check_same(dict(metadata), dict(stored.metadata), f"the metadata after move {n}")
        check_same("Write the report", stored.title, f"the title after move {n}")
    assert TaskStatus.DONE == (await h.get("p", "t")).status


@scenario
async def _review_waits_then_approval_finishes(h: Harness) -> None:
    """A task submitted for review keeps its attempt open and its dependants waiting; approval
    finishes it, closes the attempt and releases them."""
    await h.project("p")
    await h.task("p", "a")
    await h.task("p", "b", blocked_by=["a"])
    await h.ex.assign("p", "b")
    await h.running("p", "a")
    h.clock.advance(5)
    submitted = await h.ex.succeed("p", "a", 1, review=True)
    stored = await h.get("p", "a")
    check_same(submitted.task, stored, "the task in review")
    assert (TaskStatus.REVIEW, None, None) == (
        stored.status,
        stored.lease_expires_at,
        stored.completed_at,
    )
    check_same(
        Progress(project_id="p", total=2, review=1, assigned=1),
        await h.s.progress("p"),
        "the progress with a task in review",
    )
    (attempt,) = await h.s.attempts("p", "a")
    assert (None, None) == (attempt.outcome, attempt.finished_at), "review closed the attempt"
    assert [("p", "b", 1)] == [e.key for e in await h.s.deferred("p")]
    assert [] == await h.s.expired_leases(now=h.now() + timedelta(days=1), limit=10)
    before = await h.snapshot("p")
    await refused(h.retrier.retry("p", "a"), TaskNotBlocked, "retrier.retry('p', 'a')")
    check_same(before, await h.snapshot("p"), "the state after a refused retry")
    h.clock.advance(5)
    approved = await h.live.approve("p", "a")
    check_same(approved.task, await h.get("p", "a"), "the approved task")
    assert (TaskStatus.DONE, h.now()) == (approved.task.status, approved.task.completed_at)
    (attempt,) = await h.s.attempts("p", "a")
    assert (Outcome.SUCCEEDED, h.now()) == (attempt.outcome, attempt.finished_at)
    assert [] == await h.s.deferred("p")
    assert [("p", "b", 1)] == h.dispatcher.keys


@scenario
async def _projects_in_every_status(h: Harness) -> None:
    """A project of every status reads back equal; a cancelled or completed project refuses
    retries and changing nothing, a paused one defers them until it resumes."""
    for status in ProjectStatus:
        project = Project(
            id=f"p-{status.value}", status=status, created_at=h.now(), updated_at=h.now()
        )
        await h.s.create_project(project)
        check_same(project, await h.s.get_project(project.id), f"the {status.value} project")
    for status in (ProjectStatus.CANCELLED, ProjectStatus.COMPLETED, ProjectStatus.PAUSED):
        pid = f"q-{status.value}"
        await h.project(pid)
        await h.task(pid, "t")
        await h.blocked(pid, "t")
        await h.ex.set_project_status(pid, status)
        if status is ProjectStatus.PAUSED:
            result = await h.retrier.retry(pid, "t")
            assert ("deferred", TaskStatus.ASSIGNED) == (result.dispatch.status, result.task.status)
            assert [(pid, "t", 2)] == [e.key for e in await h.s.deferred(pid)]
            _, outcomes = await h.live.set_project_status(pid, ProjectStatus.EXECUTING)
            assert [("t", "dispatched")] == [(o.task_id, o.status) for o in outcomes]
            continue
        before = await h.snapshot(pid)
        await refused(h.retrier.retry(pid, "t"), ProjectNotRunnable, "retrier.retry(pid, 't')")
        check_same(before, await h.snapshot(pid), f"the {status.value} project after a retry")


@scenario
async def _projects_sharing_task_ids_stay_apart(h: Harness) -> None:
    """Two projects with the same task ids: every move, release, retry and read of one leaves
    the other exactly as it was."""
    for pid in ("p1", "p2"):
        await h.project(pid)
        await h.task(pid, "a")
        await h.task(pid, "b", blocked_by=["a"])
        await h.ex.assign(pid, "b")
    untouched = await h.snapshot("p2")
    await h.running("p1", "a")
    await h.ex.heartbeat("p1", "a", 1)
    await h.ex.succeed("p1", "a", 1)
    await h.ex.start("p1", "b", 1)
    await h.ex.fail("p1", "b", 1, TaskError(type="Fatal", retryable=False))
    await h.retrier.retry("p1", "b", idempotency_key="shared-k")
    check_same(untouched, await h.snapshot("p2"), "project p2 after moves in p1")
    assert [("p2", "b", 1)] == [e.key for e in await h.s.deferred("p2")]
    assert [("p2", "b")] == [(t.project_id, t.id) for t in await h.s.dependants("p2", "a")]
    assert {"a": "p2", "b": "p2"} == {
        tid: t.project_id for tid, t in (await h.s.get_tasks("p2", ["a", "b"])).items()
    }
    await h.running("p2", "a")
    h.clock.advance(LEASE)
    expired = await h.s.expired_leases(now=h.now(), limit=10)
    assert [("p2", "a")] == [(t.project_id, t.id) for t in expired]
    p1 = await h.snapshot("p1")
    await h.ex.reap()
    check_same(p1, await h.snapshot("p1"), "project p1 after a reap in p2")


@scenario
async def _limits_and_batches_checked(h: Harness) -> None:
    """Every method taking a limit rejects one outside 1..1000 with InvalidInput and accepts
    1 and 1000; a malformed batch of tasks raises InvalidInput and adds nothing."""
    await h.project("p")
    now = h.now()
    calls: dict[str, Callable[[int], Awaitable[Any]]] = {
        "list_tasks": lambda n: h.s.list_tasks("p", limit=n),
        "claim_due": lambda n: h.s.claim_due(now=now, limit=n, claimed_until=now),
        "redeliver_stale": lambda n: h.s.redeliver_stale(now=now, delivered_before=now, limit=n),
        "expired_leases": lambda n: h.s.expired_leases(now=now, limit=n),
    }
    for name, call in calls.items():
        for limit in (0, -1, 1001):
            await refused(call(limit), InvalidInput, f"{name}(limit={limit})")
        for limit in (1, 1000):
            assert [] == await call(limit), f"{name}(limit={limit})"
    long_id = "x" * 256
    for batch in ([h.new_task("p", "ok"), h.new_task("p", long_id)],
                  [h.new_task("p", "ok"), h.new_task("p", "r", retries_left=-1)],
                  [h.new_task("p", "ok"), h.new_task("p", "c", retry_count=-1)],
                  [h.new_task("p", "ok"), h.new_task("p", "d", blocked_by=[""])]):  # fmt: skip
        await refused(h.s.add_tasks(batch), InvalidInput, f"add_tasks of {[t.id for t in batch]}")
    assert [] == await h.s.list_tasks("p")


# -- stale plans that keep the status -------------------------------------------------------


@scenario
async def _stale_plan_keeping_the_status_conflicts(h: Harness) -> None:
    """The compare-and-set is on versions: a stale plan conflicts even where the task, the
    guarded task or the project it read still has the same status."""
    project = await h.project("p")
    await h.task("p", "a")
    await h.task("p", "b", blocked_by=["a"])
    running = await h.running("p", "a")
    first = decide.heartbeat(running, 1, now=h.now(), policy=h.policy)
    second = decide.heartbeat(running, 1, now=h.now() + timedelta(seconds=1), policy=h.policy)
    await h.s.apply(first)
    before = await h.snapshot("p")
    await refused(
        h.s.apply(second),
        VersionConflict,
        "apply of a stale heartbeat (same status, older version)",
    )
    check_same(before, await h.snapshot("p"), "the state after a stale heartbeat")
    # A guard whose task kept its status but moved on.
    project, b = await h.s.load("p", "b")
    plan = decide.assign(b, project, now=h.now(), blockers=await h.s.get_tasks("p", ["a"]))
    await h.ex.heartbeat("p", "a", 1)
    before = await h.snapshot("p")
    await refused(
        h.s.apply(plan),
        VersionConflict,
        "apply of a plan whose guard kept its status but not its version",
    )
    check_same(before, await h.snapshot("p"), "the state after a plan with a stale guard")
    # A project paused again since the plan read it.
    await h.ex.set_project_status("p", ProjectStatus.PAUSED)
    project, b = await h.s.load("p", "b")
    plan = decide.assign(b, project, now=h.now(), blockers=await h.s.get_tasks("p", ["a"]))
    await h.ex.set_project_status("p", ProjectStatus.EXECUTING)
    await h.ex.set_project_status("p", ProjectStatus.PAUSED)
    before = await h.snapshot("p")
    await refused(
        h.s.apply(plan),
        VersionConflict,
        "apply of a plan on a project paused again (same status, older version)",
    )
    check_same(before, await h.snapshot("p"), "the state after a plan on a stale project")
    stale = decide.change_project(project, ProjectStatus.EXECUTING, now=h.now())
    await refused(
        h.s.apply_project(stale),
        VersionConflict,
        "apply_project of a plan on a stale project version",
    )
    check_same(before, await h.snapshot("p"), "the state after a stale project plan")


@scenario
async def _project_plan_guards_conflict(h: Harness) -> None:
    """A project plan whose guarded task changed since it was decided raises VersionConflict
    and changes nothing."""
    project = await h.project("p", ProjectStatus.PAUSED)
    await h.task("p", "a")
    await h.task("p", "b", blocked_by=["a"])
    await h.ex.assign("p", "b")
    await h.running("p", "a")
    project = await h.s.get_project("p")
    deferred = await h.s.deferred("p")
    tasks = await h.s.get_tasks("p", ["a", "b"])
    plan = decide.change_project(
        project, ProjectStatus.EXECUTING, now=h.now(), deferred=deferred, tasks=tasks
    )
    assert plan.guards, "the plan guards the unfinished blocker"
    await h.ex.heartbeat("p", "a", 1)
    before = await h.snapshot("p")
    await refused(
        h.s.apply_project(plan),
        VersionConflict,
        "apply_project of a plan whose guarded task changed",
    )
    check_same(before, await h.snapshot("p"), "the state after a project plan with a stale guard")


# -- reads across projects (storages that are a ProjectOverview) ---------------------------------

_OVERVIEW_NAMES = ("list_projects", "blocked_tasks")

ODD_IDS = (
    "p", "P", "p/1", "p\n2", "p 3", "p-", "p%2F", "p\u00e9", "p\ufffd", "p\U0001f600", "p\t",
    "q" * 255,
)  # fmt: skip
"""Project (and task) ids whose order tells code-point order from a collation's: case,
"/", newlines, spaces, accents, the last BMP character against an astral one (UTF-16
would put them the other way round), a tab (below every printable character)."""


def _has_overview(storage: object) -> bool:
    return all(callable(getattr(storage, name, None)) for name in _OVERVIEW_NAMES)


def _skip_without_overview(storage: object) -> None:
    """Skip the test, naming the missing methods, unless ``storage`` reads across projects."""
    missing = [name for name in _OVERVIEW_NAMES if not callable(getattr(storage, name, None))]
    if missing:
        import pytest

        what = type(storage).__name__
        inner = getattr(storage, "sync", None)
        if inner is not None:  # the async port over a sync storage: name that one too
            what += f" over {type(inner).__name__}"
        pytest.skip(
            f"{what} has no reads across projects (not a ProjectOverview; "
            f"missing: {', '.join(missing)})"
        )


def _overview(h: Harness) -> AsyncProjectOverview:
    """The storage under test as a project overview; the scenario is skipped (with the
    reason) for a storage without the reads across projects."""
    _skip_without_overview(h.raw)
    return h.raw  # type: ignore[return-value]  # both methods found by getattr


def _keys(tasks: Sequence[Task]) -> list[tuple[str, str]]:
    return [(t.project_id, t.id) for t in tasks]


async def _all_projects(
    view: AsyncProjectOverview, *, projects: frozenset[str] | None = None, limit: int
) -> list[str]:
    """Every project id, read page by page of ``limit``, each page checked to go on in order
    after the last."""
    found: list[str] = []
    after: str | None = None
    for _ in range(10_000):
        page = await view.list_projects(projects=projects, after=after, limit=limit)
        assert len(page) <= limit, f"list_projects(limit={limit}) gave {len(page)} rows"
        ids = [s.project.id for s in page]
        assert after is None or not ids or ids[0] > after, (
            f"the page of {limit} after {after!r} starts at {ids[0]!r}, not after it"
        )
        assert ids == sorted(set(ids)), f"a page of {limit} out of order: {ids}"
        found.extend(ids)
        if len(page) < limit:
            break
        after = page[-1].project.id
    return found


async def _all_blocked(
    view: AsyncProjectOverview,
    *,
    projects: frozenset[str] | None = None,
    error_type: str | None = None,
    limit: int,
) -> list[tuple[str, str]]:
    """Every blocked task's key, read page by page of ``limit``."""
    found: list[tuple[str, str]] = []
    after: tuple[str, str] | None = None
    for _ in range(10_000):
        page = await view.blocked_tasks(
            projects=projects, error_type=error_type, after=after, limit=limit
        )
        assert len(page) <= limit, f"blocked_tasks(limit={limit}) gave {len(page)} rows"
        keys = _keys(page)
        assert after is None or not keys or keys[0] > after, (
            f"the page of {limit} after {after!r} starts at {keys[0]!r}, not after it"
        )
        assert keys == sorted(set(keys)), f"a page of {limit} out of order: {keys}"
        found.extend(keys)
        if len(page) < limit:
            break
        after = found[-1]
    return found


def _blocked_row(h: Harness, pid: str, tid: str, error_type: str | None = "Fatal") -> Task:
    """A task stored as blocked at once (``add_tasks``), with ``error_type``."""
    return h.new_task(
        pid, tid, status=TaskStatus.BLOCKED, error_type=error_type, error_message="boom",
        blocked_reason=BlockedReason.NON_RETRYABLE,
    )  # fmt: skip


@scenario
async def _projects_are_listed_by_id_with_their_progress(h: Harness) -> None:
    """list_projects gives every project once, ordered by id as Python orders strings
    (odd characters included), each with the progress progress() reads, in pages that
    reassemble the whole whatever their size."""
    view = _overview(h)
    assert [] == await view.list_projects()
    shuffled = sorted(ODD_IDS, key=lambda pid: pid[::-1])
    for n, pid in enumerate(shuffled):
        await h.project(pid, status=ProjectStatus.PAUSED if n % 3 == 0 else ProjectStatus.EXECUTING)
        statuses = [TaskStatus.INBOX, TaskStatus.BLOCKED, TaskStatus.DONE, TaskStatus.SKIPPED]
        await h.s.add_tasks(
            [h.new_task(pid, f"t{k}", status=statuses[(n + k) % 4]) for k in range(n % 5)]
        )
    expected = sorted(ODD_IDS)
    whole = await view.list_projects(limit=1000)
    assert expected == [s.project.id for s in whole], "list_projects() order"
    for summary in whole:
        pid = summary.project.id
        assert await h.s.get_project(pid) == summary.project, f"the project {pid!r}"
        assert await h.s.progress(pid) == summary.progress, f"the progress of {pid!r}"
        assert await recount(h.s, pid) == summary.progress, f"the progress of {pid!r}"
    assert whole == await view.list_projects(limit=len(expected))
    for limit in (1, 2, 3, 5, len(expected) - 1, len(expected) + 1):
        assert expected == await _all_projects(view, limit=limit), f"pages of {limit}"
    assert [pid for pid in expected if pid > "p\u00e9"] == [
        s.project.id for s in await view.list_projects(after="p\u00e9")
    ]
    between = "p/0"  # no project's id: the page starts at the next one
    assert [pid for pid in expected if pid > between] == [
        s.project.id for s in await view.list_projects(after=between)
    ]
    assert [] == await view.list_projects(after=expected[-1])
    assert expected[:2] == [s.project.id for s in await view.list_projects(limit=2)]


@scenario
async def _projects_are_listed_within_the_given_set(h: Harness) -> None:
    """list_projects(projects=...) keeps only those ids: None is every project, an empty
    set none, ids of no project are ignored; paging works within the set."""
    view = _overview(h)
    for pid in ("a", "b", "c", "d", "e"):
        await h.project(pid)
    every = ["a", "b", "c", "d", "e"]
    assert every == [s.project.id for s in await view.list_projects(projects=None)], "None"
    assert [] == await view.list_projects(projects=frozenset()), "an empty set of projects"
    assert [] == await view.list_projects(projects=frozenset({"x", "A"})), "unknown projects"
    subset = frozenset({"e", "b", "d", "unknown", "B"})
    assert ["b", "d", "e"] == [s.project.id for s in await view.list_projects(projects=subset)]
    assert ["d", "e"] == [
        s.project.id for s in await view.list_projects(projects=subset, after="b")
    ]
    assert ["b"] == [s.project.id for s in await view.list_projects(projects=subset, limit=1)]
    for limit in (1, 2, 3, 4):
        assert ["b", "d", "e"] == await _all_projects(view, projects=subset, limit=limit), limit


@scenario
async def _blocked_tasks_are_listed_across_projects_in_order(h: Harness) -> None:
    """blocked_tasks gives every blocked task of every project once, ordered by
    (project_id, id) as Python orders strings, the same task id in two projects being two
    rows, each as load() reads it; pages of any size reassemble the whole."""
    view = _overview(h)
    assert [] == await view.blocked_tasks()
    pids = ODD_IDS[:6]
    tids = (*ODD_IDS[6:], "t", "T", "t/x", "t\nx")
    for n, pid in enumerate(reversed(pids)):
        await h.project(pid)
        rows = [_blocked_row(h, pid, tid) for k, tid in enumerate(tids) if (n + k) % 3]
        rows += [h.new_task(pid, tid, status=TaskStatus.INBOX) for k, tid in enumerate(tids)
                 if not (n + k) % 3]  # fmt: skip
        await h.s.add_tasks(rows)
    await h.project("none-blocked")
    await h.task("none-blocked", "t")
    stored = [t for pid in pids for t in await h.all_tasks(pid)]
    expected = sorted((t.project_id, t.id) for t in stored if t.status is TaskStatus.BLOCKED)
    assert len(expected) > 20
    assert {pid for pid, _ in expected} == set(pids)
    whole = await view.blocked_tasks(limit=1000)
    assert expected == _keys(whole), "blocked_tasks() order"
    for task in whole:
        assert await h.get(task.project_id, task.id) == task, f"the task {_keys([task])}"
        assert dict(task.metadata) == dict((await h.get(task.project_id, task.id)).metadata)
    for limit in (1, 2, 3, 7, len(expected) - 1, len(expected), len(expected) + 1):
        assert expected == await _all_blocked(view, limit=limit), f"pages of {limit}"
    middle = expected[len(expected) // 2]
    assert [k for k in expected if k > middle] == _keys(await view.blocked_tasks(after=middle))
    # A cursor naming no blocked task (an unknown id, a task not blocked) still pages on.
    for cursor in ((middle[0], middle[1] + "\x01"), (pids[0], "t"), ("p0", "a"), ("o", "z")):
        assert [k for k in expected if k > cursor] == _keys(
            await view.blocked_tasks(after=cursor)
        ), f"after {cursor!r}"
    assert [] == await view.blocked_tasks(after=expected[-1])
    assert expected[:3] == _keys(await view.blocked_tasks(limit=3))


@scenario
async def _blocked_tasks_are_kept_by_project_and_error_type(h: Harness) -> None:
    """blocked_tasks(projects=...) keeps only those projects (None: all, an empty set:
    nothing, unknown ids ignored); error_type keeps the tasks whose error_type equals it
    exactly (case, spaces and all); both combine with paging."""
    view = _overview(h)
    types = ("Boom", "boom", "Boom ", "BoomError", None)
    for pid in ("a", "b", "c"):
        await h.project(pid)
        await h.s.add_tasks(
            [_blocked_row(h, pid, f"t{n}", error_type) for n, error_type in enumerate(types)]
            + [h.new_task(pid, "u", status=TaskStatus.INBOX, error_type="Boom")]
        )
    everything = [(pid, f"t{n}") for pid in ("a", "b", "c") for n in range(len(types))]
    assert everything == _keys(await view.blocked_tasks(projects=None)), "None"
    assert [] == await view.blocked_tasks(projects=frozenset()), "an empty set of projects"
    assert [] == await view.blocked_tasks(projects=frozenset({"x", "A"})), "unknown projects"
    kept = frozenset({"c", "a", "unknown"})
    in_kept = [k for k in everything if k[0] in kept]
    assert in_kept == _keys(await view.blocked_tasks(projects=kept))
    for limit in (1, 2, 4):
        assert in_kept == await _all_blocked(view, projects=kept, limit=limit), f"{limit=}"
    for n, error_type in enumerate(types[:-1]):
        assert [(pid, f"t{n}") for pid in ("a", "b", "c")] == _keys(
            await view.blocked_tasks(error_type=error_type)
        ), f"error_type={error_type!r}"
        assert [("c", f"t{n}")] == _keys(
            await view.blocked_tasks(projects=frozenset({"c"}), error_type=error_type)
        )
        assert [(pid, f"t{n}") for pid in ("a", "b", "c")] == await _all_blocked(
            view, error_type=error_type, limit=1
        ), f"pages of 1 of error_type={error_type!r}"
    assert [] == await view.blocked_tasks(error_type="Boo")
    assert [] == await view.blocked_tasks(error_type="Fatal")


@scenario
async def _blocked_tasks_follow_every_move(h: Harness) -> None:
    """A task that becomes blocked through the services is listed at its place with its
    error_type, one retried leaves the list, one blocked again comes back with its new
    error_type; a cursor taken before the change pages on without losing or repeating
    what did not move."""
    view = _overview(h)
    for pid in ("p1", "p2"):
        await h.project(pid)
        for tid in ("a", "b", "c"):
            await h.task(pid, tid, max_retries=0)
    await h.blocked("p1", "b")
    await h.blocked("p2", "a")
    await h.blocked("p2", "c")
    assert [("p1", "b"), ("p2", "a"), ("p2", "c")] == _keys(await view.blocked_tasks())
    first = await view.blocked_tasks(limit=1)
    assert [("p1", "b")] == _keys(first)
    await h.retrier.retry("p2", "a")  # after the cursor: gone from the next page
    await h.blocked("p1", "a")  # before the cursor: not in the next page
    await h.blocked("p1", "c")  # after the cursor: in the next page
    assert [("p1", "c"), ("p2", "c")] == _keys(await view.blocked_tasks(after=("p1", "b")))
    assert ["Fatal"] == [t.error_type for t in await view.blocked_tasks(after=("p1", "b"), limit=1)]
    _, task = await h.s.load("p2", "a")
    started = await h.ex.start("p2", "a", task.attempt)
    error = TaskError(type="Other", message="again", retryable=False)
    await h.ex.fail("p2", "a", started.task.attempt, error)
    assert [("p2", "a")] == _keys(await view.blocked_tasks(error_type="Other"))
    assert [("p1", "a"), ("p1", "b"), ("p1", "c"), ("p2", "c")] == _keys(
        await view.blocked_tasks(error_type="Fatal")
    )
    summaries = await view.list_projects()
    assert [await h.s.progress("p1"), await h.s.progress("p2")] == [s.progress for s in summaries]
    assert [3, 2] == [s.progress.blocked for s in summaries]


@scenario
async def _overview_inputs_checked(h: Harness) -> None:
    """Both reads refuse a limit outside 1..1000, a malformed cursor, project id or
    error_type with InvalidInput, and accept limits 1 and 1000."""
    view = _overview(h)
    await h.project("p")
    await h.s.add_tasks([_blocked_row(h, "p", "t")])
    for limit in (0, -1, 1001):
        await refused(view.list_projects(limit=limit), InvalidInput, f"list_projects({limit=})")
        await refused(view.blocked_tasks(limit=limit), InvalidInput, f"blocked_tasks({limit=})")
    for limit in (1, 1000):
        assert ["p"] == [s.project.id for s in await view.list_projects(limit=limit)]
        assert [("p", "t")] == _keys(await view.blocked_tasks(limit=limit))
    bad_afters: list[Any] = [("p",), ("p", "t", "x"), ("", "t"), ("p", ""), ("p", "a\x00"),
                             ("x" * 256, "t"), ["p", "t"], "p"]  # fmt: skip
    for after in bad_afters:
        await refused(view.blocked_tasks(after=after), InvalidInput, f"blocked_tasks({after=})")
    for project_after in ("", "a\x00", "x" * 256):
        await refused(
            view.list_projects(after=project_after),
            InvalidInput,
            f"list_projects({project_after=})",
        )
    for error_type in ("", "a\x00b", "E" * 256):
        await refused(
            view.blocked_tasks(error_type=error_type), InvalidInput, f"blocked_tasks({error_type=})"
        )
    for projects in (frozenset({""}), frozenset({"p", "x" * 256}), frozenset({"a\x00"})):
        await refused(view.list_projects(projects=projects), InvalidInput, f"{projects=}")
        await refused(view.blocked_tasks(projects=projects), InvalidInput, f"{projects=}")


# -- reads across projects: the property ------------------------------------------------------
_OVERVIEW_SUFFIXES = st.sampled_from(["a", "A", "b", "a/b", "a\nb", "\u00e9", "\U0001f600", "a "])
_OVERVIEW_TYPES = st.sampled_from(["E", "e", "F", None])


@st.composite
def _overview_cases(draw: st.DrawFn) -> dict[str, Any]:
    suffixes = draw(st.lists(_OVERVIEW_SUFFIXES, min_size=1, max_size=4, unique=True))
    tasks = draw(
        st.lists(
            st.tuples(
                st.sampled_from(suffixes), st.sampled_from(["t", "T", "t/1", "\u00e9", "u"]),
                st.booleans(), _OVERVIEW_TYPES,
            ),
            max_size=12,
            unique_by=lambda t: (t[0], t[1]),
        )
    )  # fmt: skip
    kept = draw(st.none() | st.sets(st.sampled_from([*suffixes, "zz"])))
    return {
        "projects": suffixes,
        "tasks": tasks,
        "kept": kept,
        "error_type": draw(_OVERVIEW_TYPES),
        "limit": draw(st.integers(1, 5)),
    }


async def _overview_matches_a_model(
    storage: AsyncStorage, prefix: str, case: dict[str, Any]
) -> bool:
    """Pages of both reads, over projects whose ids start with ``prefix``, against a model
    built in Python; ``False`` for a storage without the reads."""
    h = Harness(storage)
    if not _has_overview(storage):
        return False
    view: AsyncProjectOverview = storage  # type: ignore[assignment]
    pids = [prefix + suffix for suffix in case["projects"]]
    for pid in pids:
        await h.project(pid)
    rows: list[Task] = []
    for suffix, tid, blocked, error_type in case["tasks"]:
        pid = prefix + suffix
        if blocked:
            rows.append(_blocked_row(h, pid, tid, error_type))
        else:
            rows.append(h.new_task(pid, tid, error_type=error_type))
    await h.s.add_tasks(rows)
    # The storage is shared by every example: the model's world is this prefix's projects.
    world = frozenset(pids)
    kept = world if case["kept"] is None else frozenset(prefix + s for s in case["kept"]) & world
    asked = kept | {prefix + "zz"} if case["kept"] is not None else kept
    limit, error_type = case["limit"], case["error_type"]
    assert sorted(kept) == await _all_projects(view, projects=asked, limit=limit), "projects"
    model = sorted(
        (t.project_id, t.id)
        for t in rows
        if t.status is TaskStatus.BLOCKED
        and t.project_id in kept
        and (error_type is None or t.error_type == error_type)
    )
    got = await _all_blocked(view, projects=asked, error_type=error_type, limit=limit)
    assert model == got, f"blocked pages of {limit}"
    for summary in await view.list_projects(projects=asked, limit=1000):
        assert await h.s.progress(summary.project.id) == summary.progress
    return True


# -- the one-step retry (RetryInOneStep), against the core ---------------------------------------


# -- lifecycle events (storages that are an event log) ------------------------------------


def _event_log(h: Harness) -> AsyncEventLog:
    """The storage under test as an event log; the scenario is skipped (with the reason)
    for a storage that keeps no lifecycle events."""
    if not isinstance(h.raw, AsyncEventLog):
        import pytest

        missing = [
            name
            for name in ("events", "claim_events", "settle_events", "claim_event_retries",
                         "settle_event_retry", "parked_events", "replay_parked")
            if not callable(getattr(h.raw, name, None))
        ]  # fmt: skip
        pytest.skip(
            f"{type(h.raw).__name__} keeps no lifecycle events (not an EventLog; missing: "
            f"{', '.join(missing) or 'none by name: check the signatures'})"
        )
    return h.raw


async def _all_events(log: AsyncEventLog, project_id: str) -> list[Event]:
    found: list[Event] = []
    while True:
        page = await log.events(project_id, after=found[-1].seq if found else 0, limit=EVENT_PAGE)
        found.extend(page)
        if len(page) < EVENT_PAGE:
            return found


def _kinds(events: Sequence[Event]) -> list[tuple[str, str | None, int | None]]:
    return [(e.type.value, e.task_id, e.attempt) for e in events]


@scenario
async def _events_record_every_move_in_order(h: Harness) -> None:
    """Each move's lifecycle events are stored with it, numbered 1, 2, 3 … per project."""
    log = _event_log(h)
    await h.project("p")
    await h.task("p", "t", max_retries=1)
    task = await h.running("p", "t")
    await h.ex.fail("p", "t", task.attempt, TaskError(type="Flaky", message="again"))
    h.clock.advance(BACKOFF)
    await h.ex.start("p", "t", 2)
    await h.ex.fail("p", "t", 2, TaskError(type="Flaky", message="still"))
    await h.retrier.retry("p", "t", actor="alice", reason="fixed")
    events = await _all_events(log, "p")
    assert list(range(1, len(events) + 1)) == [e.seq for e in events]
    assert [
        ("project.progress", "t", None),
        ("project.progress", "t", 1),
        ("attempt.started", "t", 1),
        ("project.progress", "t", 1),
        ("attempt.failed", "t", 1),
        ("task.retried", "t", 2),
        ("project.progress", "t", 2),
        ("attempt.started", "t", 2),
        ("project.progress", "t", 2),
        ("attempt.failed", "t", 2),
        ("task.blocked", "t", 2),
        ("project.progress", "t", 2),
        ("task.retried", "t", 3),
        ("project.progress", "t", 3),
    ] == _kinds(events)
    blocked = events[10]
    assert "budget_exhausted" == blocked.data["reason"]
    assert blocked.data["retries_exhausted"] is True
    assert "still" == blocked.data["error_message"]
    retried = events[12]
    assert ("manual_retry", "alice", "fixed") == (
        retried.data["trigger"],
        retried.data["actor"],
        retried.data["reason"],
    )
    assert {"from": "blocked", "to": "assigned"} == events[13].data
    assert all(e.id == f"p:{e.seq}" for e in events)


@scenario
async def _events_are_read_per_project_in_pages(h: Harness) -> None:
    """Events are read after a number, at most a limit, each project on its own."""
    log = _event_log(h)
    await h.project("a")
    await h.project("b")
    for n in range(5):
        await h.task("a", f"t{n}")
        await h.task("b", f"t{n}")
    assert [3, 4] == [e.seq for e in await log.events("a", after=2, limit=2)]
    assert [] == await log.events("b", after=5)
    assert {"a"} == {e.project_id for e in await log.events("a")}
    await refused(log.events("nope"), ProjectNotFound, "events of an unknown project")
    for bad in (-1, "1", 1.5, None):
        await refused(log.events("a", after=bad), InvalidInput, f"events after {bad!r}")  # type: ignore[arg-type]
    for limit in (0, 1001):
        await refused(log.events("a", limit=limit), InvalidInput, f"events limit {limit}")


@scenario
async def _refused_writes_record_no_event(h: Harness) -> None:
    """A write that is refused (stale plan, wrong state) leaves no event behind."""
    log = _event_log(h)
    await h.project("p")
    task = await h.task("p", "t")
    project = await h.s.get_project("p")
    stale = decide.assign(task, project, now=h.now(), blockers={})
    await h.ex.assign("p", "t")
    before = await _all_events(log, "p")
    await refused(h.raw.apply(stale), VersionConflict, "a stale plan")
    await refused(h.retrier.retry("p", "t"), TaskNotBlocked, "a retry of an assigned task")
    assert before == await _all_events(log, "p")


@scenario
async def _events_are_claimed_once_in_order_per_task(h: Harness) -> None:
    """Pending events are claimed oldest first by one caller at a time; a task's later
    event waits while an earlier one is out with another caller; settled ones are done."""
    log = _event_log(h)
    await h.project("p")
    await h.task("p", "t")
    await h.task("p", "u")
    await h.ex.assign("p", "t")  # events 3 (t) and later
    until = h.now() + timedelta(seconds=30)
    first = await log.claim_events(now=h.now(), limit=1, claimed_until=until)
    assert [1] == [e.seq for e in first]
    rest = await log.claim_events(now=h.now(), limit=10, claimed_until=until)
    # Event 1 is t's: t's later event (3) waits; u's (2) is free.
    assert [2] == [e.seq for e in rest]
    assert [] == await log.claim_events(now=h.now(), limit=10, claimed_until=until)
    await log.settle_events(first, now=h.now())
    third = await log.claim_events(now=h.now(), limit=10, claimed_until=until)
    assert [3] == [e.seq for e in third]
    # A claim that expired is taken again; a settled event never is.
    later = until + timedelta(seconds=1)
    again = await log.claim_events(now=later, limit=10, claimed_until=later + timedelta(1))
    assert [2, 3] == [e.seq for e in again]
    await log.settle_events(again, now=later)
    assert [] == await log.claim_events(
        now=later + timedelta(days=1), limit=10, claimed_until=later + timedelta(days=2)
    )
    results = await h.race(
        [
            lambda s: s.claim_events(now=later, limit=10, claimed_until=until)  # type: ignore[attr-defined]
            for _ in range(3)
        ]
    )
    assert all(r == [] for r in results), results


@scenario
async def _racing_claims_never_share_an_event(h: Harness) -> None:
    """Of callers claiming events at once, no two receive the same event."""
    _event_log(h)  # skipped for a storage without the event log
    await h.project("p")
    for n in range(12):
        await h.task("p", f"t{n:02}")
    until = h.now() + timedelta(seconds=30)
    results = await h.race(
        [
            lambda s: s.claim_events(now=h.now(), limit=5, claimed_until=until)  # type: ignore[attr-defined]
            for _ in range(4)
        ]
    )
    for result in results:
        if isinstance(result, BaseException):
            raise result
    seqs = [e.seq for result in results for e in result]
    assert len(seqs) == len(set(seqs)), seqs
    assert set(range(1, 13)) == set(seqs)


@scenario
async def _failed_deliveries_are_retried_then_parked_and_replayed(h: Harness) -> None:
    """A subscriber's failed delivery is due again when asked, parked after its last try,
    listed, replayed by hand, and forgotten once delivered."""
    log = _event_log(h)
    await h.project("p")
    await h.task("p", "t")
    await h.task("p", "u")
    until = h.now() + timedelta(seconds=30)
    events = await log.claim_events(now=h.now(), limit=10, claimed_until=until)
    due = h.now() + timedelta(seconds=5)
    failures = [
        EventRetry(event=events[0], subscriber="hook", tries=1, retry_at=due, last_error="boom"),
        EventRetry(event=events[1], subscriber="web", tries=1, retry_at=due, last_error="503"),
    ]
    await log.settle_events(events, now=h.now(), failures=failures)
    assert [] == await log.claim_events(now=h.now(), limit=10, claimed_until=until)
    assert [] == await log.claim_event_retries(now=h.now(), limit=10, claimed_until=until)
    h.clock.advance(5)
    claimed = await log.claim_event_retries(now=h.now(), limit=10, claimed_until=until)
    assert [("hook", 1, 1, "boom"), ("web", 2, 1, "503")] == [
        (r.subscriber, r.event.seq, r.tries, r.last_error) for r in claimed
    ]
    assert events[0] == claimed[0].event
    assert [] == await log.claim_event_retries(now=h.now(), limit=10, claimed_until=until)
    hook, web = claimed
    later = h.now() + timedelta(seconds=60)
    await log.settle_event_retry(hook, now=h.now(), error="boom again", retry_at=later)
    await log.settle_event_retry(web, now=h.now(), error="gone")  # parked
    parked = await log.parked_events()
    assert [("web", 2, 2, "gone", True)] == [
        (r.subscriber, r.event.seq, r.tries, r.last_error, r.parked) for r in parked
    ]
    assert [] == await log.parked_events(subscriber="hook")
    h.clock.advance(61)
    (hook,) = await log.claim_event_retries(now=h.now(), limit=10, claimed_until=later)
    assert (2, "boom again") == (hook.tries, hook.last_error)
    await log.settle_event_retry(hook, now=h.now())  # delivered
    assert 0 == await log.replay_parked(now=h.now(), subscriber="hook")
    assert 0 == await log.replay_parked(now=h.now(), event_ids=["p:1"])
    assert 1 == await log.replay_parked(now=h.now(), event_ids=["p:2"])
    assert [] == await log.parked_events()
    (web,) = await log.claim_event_retries(now=h.now(), limit=10, claimed_until=later)
    assert ("web", 0) == (web.subscriber, web.tries)
    await log.settle_event_retry(web, now=h.now())
    assert [] == await log.claim_event_retries(
        now=h.now() + timedelta(days=1), limit=10, claimed_until=later + timedelta(days=2)
    )


@scenario
async def _dispatch_failure_is_an_event(h: Harness) -> None:
    """A failed delivery of an outbox entry records ``dispatch.failed`` with the entry."""
    log = _event_log(h)
    await h.project("p")
    await h.task("p", "t")
    await h.ex.assign("p", "t")
    (entry,) = await h.s.claim_due(
        now=h.now(), limit=10, claimed_until=h.now() + timedelta(seconds=30)
    )
    retry_at = h.now() + timedelta(seconds=7)
    recorder: Any = h.raw
    await recorder.mark_failed(entry, error="broker down", retry_at=retry_at, now=h.now())
    last = (await _all_events(log, "p"))[-1]
    assert lifecycle.dispatch_failed(
        entry, error="broker down", retry_at=retry_at, now=h.now()
    ) == attrs.evolve(last, seq=0)


@scenario
async def _prune_removes_old_delivered_events_only(h: Harness) -> None:
    """Events delivered longer ago than the period go, unless a delivery is still to be
    retried or parked; pending ones stay; numbering goes on after a prune."""
    log = _event_log(h)
    await h.project("p")
    for n in range(4):
        await h.task("p", f"t{n}")
    until = h.now() + timedelta(seconds=30)
    claimed = await log.claim_events(now=h.now(), limit=3, claimed_until=until)
    failure = EventRetry(
        event=claimed[2], subscriber="hook", tries=1, retry_at=h.now(), last_error="x"
    )
    await log.settle_events(claimed, now=h.now(), failures=[failure])
    h.clock.advance(8 * DAY)
    pruned = await h.s.prune(Retention(delivered_outbox=timedelta(days=7)).rule(h.now()))
    assert 2 == pruned.events
    assert [3, 4] == [e.seq for e in await _all_events(log, "p")]
    assert 0 == (await h.s.prune(Retention(delivered_outbox=None).rule(h.now()))).events
    await h.task("p", "t9")
    assert [3, 4, 5] == [e.seq for e in await _all_events(log, "p")]


@scenario
async def _concurrent_writers_number_events_without_gaps(h: Harness) -> None:
    """Moves of one project made at once get consecutive numbers, each move's events
    together, none lost."""
    log = _event_log(h)
    await h.project("p")
    ids = [f"t{n}" for n in range(6)]
    for tid in ids:
        await h.task("p", tid)
    project = await h.s.get_project("p")
    plans = [decide.assign(await h.get("p", tid), project, now=h.now(), blockers={}) for tid in ids]
    results = await h.race([_applier(plan) for plan in plans])
    won = [
        plan
        for plan, result in zip(plans, results, strict=True)
        if not isinstance(result, BaseException)
    ]
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, VersionConflict):
            raise result
    events = await _all_events(log, "p")
    assert list(range(1, len(events) + 1)) == [e.seq for e in events]
    written = [attrs.evolve(e, seq=0) for e in events[len(ids) :]]
    assert len(written) == sum(len(lifecycle.events_of(p)) for p in won)
    for plan in won:
        want = list(lifecycle.events_of(plan))
        starts = [i for i in range(len(written)) if written[i : i + len(want)] == want]
        assert starts, f"the events of {plan.before.id} are not together: {written!r}"


@attrs.frozen
class OneStepCase:
    """An initial state and the arguments of one manual retry."""

    name: str
    project: ProjectStatus = ProjectStatus.EXECUTING
    status: TaskStatus = TaskStatus.BLOCKED
    history: bool = True
    """The task reached ``status`` through attempt 1 (record and outbox entry), or was added so."""
    blockers: tuple[TaskStatus | None, ...] = ()
    """The blockers' statuses; ``None`` names a blocker that does not exist."""
    budget: RetryBudget = RetryBudget.ONE_MORE
    actor: str | None = "alice"
    reason: str | None = "fixed the input"
    claimed: bool = True
    key: str | None = None
    """``None``, ``"new"``, ``"used"`` (taken by another retry) or ``"expired"``."""
    started: bool = True
    max_retries: int = 2
    retries_left: int = 0
    task_id: str = "t"


_DONE, _SKIPPED = TaskStatus.DONE, TaskStatus.SKIPPED
ONE_STEP_CASES: tuple[OneStepCase, ...] = (
    OneStepCase("plain"),
    OneStepCase("full budget", budget=RetryBudget.FULL),
    OneStepCase("full budget, never started", budget=RetryBudget.FULL, started=False),
    OneStepCase("one more, never started", started=False, retries_left=1),
    OneStepCase("unclaimed", claimed=False),
    OneStepCase("no actor or reason", actor=None, reason=None),
    OneStepCase("no history", history=False),
    OneStepCase("no history, full budget", history=False, budget=RetryBudget.FULL, max_retries=0),
    OneStepCase("finished blockers", blockers=(_DONE, _SKIPPED)),
    OneStepCase("an unfinished blocker", blockers=(_DONE, TaskStatus.IN_PROGRESS)),
    OneStepCase("a blocked blocker", blockers=(TaskStatus.BLOCKED,)),
    OneStepCase("a blocker in review", blockers=(TaskStatus.REVIEW,), claimed=False),
    OneStepCase("a missing blocker", blockers=(None,)),
    OneStepCase("finished and missing blockers", blockers=(_DONE, None)),
    OneStepCase("a new key", key="new"),
    OneStepCase("a new key, deferred", key="new", blockers=(TaskStatus.INBOX,)),
    OneStepCase("a used key", key="used"),
    OneStepCase("an expired key", key="expired", budget=RetryBudget.FULL),
    OneStepCase("a missing task", task_id="missing"),
    *(
        OneStepCase(f"a {status.value} project", project=status, key="new")
        for status in ProjectStatus
        if status is not ProjectStatus.EXECUTING
    ),
    *(
        OneStepCase(f"a task {status.value}", status=status, history=False)
        for status in TaskStatus
        if status is not TaskStatus.BLOCKED
    ),
    OneStepCase("an assigned task with history", status=TaskStatus.ASSIGNED),
)


async def _build_case(s: AsyncStorage, pid: str, case: OneStepCase, t0: datetime) -> None:
    """The case's initial state, written through the port and the core."""
    await s.create_project(Project(id=pid, status=case.project, created_at=t0, updated_at=t0))
    names = [f"b{n}" for n in range(len(case.blockers))]
    blockers = [
        Task(id=name, project_id=pid, status=status, created_at=t0, updated_at=t0)
        for name, status in zip(names, case.blockers, strict=True)
        if status is not None
    ]
    fabricated = case.status is TaskStatus.BLOCKED and not case.history
    task = Task(
        id="t",
        project_id=pid,
        title="the task",
        status=TaskStatus.INBOX if case.history else case.status,
        max_retries=case.max_retries,
        retries_left=case.retries_left,
        retry_count=1,
        error_message="failed" if fabricated else None,
        error_type="Failure" if fabricated else None,
        blocked_reason=BlockedReason.NON_RETRYABLE if fabricated else None,
        blocked_by=names,
        attempt=0,
        started_at=t0 if case.started else None,
        created_at=t0,
        updated_at=t0,
        metadata={"owner": "zoë", "tags": [1, "two"]},
    )
    await s.add_tasks([*blockers, task])
    if case.history:
        project, task = await s.load(pid, "t")
        blocking = await s.get_tasks(pid, task.blocked_by)
        await s.apply(decide.assign(task, project, now=t0, blockers=blocking))
        if case.status is TaskStatus.BLOCKED:
            _, task = await s.load(pid, "t")
            await s.apply(decide.block(task, now=t0, message="stuck"))
    key = f"{pid}-k"
    if case.key == "used":
        await s.save_idempotency(
            IdempotencyRecord(key=key, project_id=pid, task_id="b0", created_at=t0)
        )
    if case.key == "expired":
        created = t0 - timedelta(days=2)
        await s.save_idempotency(
            IdempotencyRecord(
                key=key, project_id=pid, task_id="b0", created_at=created,
                expires_at=created + timedelta(days=1),
            )
        )  # fmt: skip


async def _case_state(s: AsyncStorage, pid: str, key: str) -> dict[str, Any]:
    """Everything a retry could change in the case's project."""
    tasks = await s.list_tasks(pid)
    return {
        "project": await s.get_project(pid),
        "tasks": tasks,
        "attempts": {t.id: await s.attempts(pid, t.id) for t in tasks},
        "outbox": {t.id: await s.dispatches(pid, t.id) for t in tasks},
        "deferred": sorted((e.key for e in await s.deferred(pid)), key=repr),
        "progress": await s.progress(pid),
        "idempotency": await s.get_idempotency(key),
    }


async def _core_retry(s: AsyncStorage, pid: str, task_id: str, **options: Any) -> Applied | None:
    """The retry the core decides, applied; ``None`` where the core or the apply refuses."""
    try:
        project, task = await s.load(pid, task_id)
        blockers = await s.get_tasks(pid, task.blocked_by)
        plan = decide.manual_retry(task, project, blockers=blockers, **options)
        return await s.apply(plan)
    except DeepworkError:
        return None


def _one_step(h: Harness) -> AsyncRetryInOneStep | None:
    return h.s if isinstance(h.s, AsyncRetryInOneStep) else None


@scenario
async def _one_step_retry_does_what_the_core_decides(h: Harness) -> None:
    """A storage that retries in one step (RetryInOneStep) returns and stores exactly what the
    core's decide and apply do on the in-memory storage, for every case of project and task
    status, blockers (finished, unfinished, missing), budget, actor, reason, claim and key;
    and changes nothing, returning None, wherever the core refuses."""
    one_step = _one_step(h)
    if one_step is None:
        return
    for n, case in enumerate(ONE_STEP_CASES):
        await _check_one_step_case(h, one_step, f"c{n}", case)
    assert await one_step.retry_blocked("nope", "t", now=h.now()) is None


async def _check_one_step_case(
    h: Harness, one_step: AsyncRetryInOneStep, pid: str, case: OneStepCase
) -> None:
    """Build ``case`` in project ``pid`` here and on a MemoryStorage, retry it in one step
    here and through the core there, and compare the answers and the states after."""
    t0 = h.now()
    await _build_case(h.s, pid, case, t0)
    reference = inline_port(MemoryStorage())
    await _build_case(reference, pid, case, t0)
    h.clock.advance(7.5)
    now = h.now()
    key = f"{pid}-k"
    options: dict[str, Any] = {
        "now": now,
        "actor": case.actor,
        "reason": case.reason,
        "budget": case.budget,
        "claimed_until": now + timedelta(seconds=30) if case.claimed else None,
        "idempotency_key": None if case.key is None else key,
        "idempotency_expires_at": None if case.key is None else now + timedelta(hours=1),
    }
    expected = await _core_retry(reference, pid, case.task_id, **options)
    what = f"case {case!r}"
    try:
        got = await one_step.retry_blocked(pid, case.task_id, **options)
    except Exception as exc:
        raise AssertionError(
            f"{what}: retry_blocked raised {exc!r}; expected (the core's) {expected!r}"
        ) from exc
    check_same(expected, got, f"{what}: retry_blocked's answer (expected: the core's)")
    check_same(
        await _case_state(reference, pid, key),
        await _case_state(h.s, pid, key),
        f"{what}: the state after retry_blocked (expected: the core's)",
    )


one_step_cases = st.builds(
    OneStepCase,
    name=st.just("drawn"),
    project=st.one_of(st.just(ProjectStatus.EXECUTING), st.sampled_from(ProjectStatus)),
    status=st.one_of(st.just(TaskStatus.BLOCKED), st.sampled_from(TaskStatus)),
    history=st.booleans(),
    blockers=st.lists(st.sampled_from([*TaskStatus, None]), max_size=3).map(tuple),
    budget=st.sampled_from(RetryBudget),
    actor=st.sampled_from([None, "alice", "zoë"]),
    reason=st.sampled_from([None, "fixed the input"]),
    claimed=st.booleans(),
    key=st.sampled_from([None, "new", "used", "expired"]),
    started=st.booleans(),
    max_retries=st.integers(0, 3),
    retries_left=st.integers(0, 3),
)
"""Any :class:`OneStepCase` (finished blockers, executing projects and blocked tasks often)."""


@scenario
async def _one_step_retry_through_the_service(h: Harness) -> None:
    """Through the retry service, a one-step storage keeps the actor, reason, budget, key and
    its life, and waits for unfinished blockers; refusals raise the core's errors."""
    if _one_step(h) is None:
        return
    await h.project("p")
    await h.task("p", "a")
    await h.task("p", "b", blocked_by=["a"])
    await h.blocked("p", "a")
    await h.s.apply(decide.block(await h.get("p", "b"), now=h.now(), message="held"))
    result = await h.retrier.retry("p", "b", actor="bob", reason="unblocked", idempotency_key="k")
    assert ("deferred", TaskStatus.ASSIGNED) == (result.dispatch.status, result.task.status)
    stored = await h.s.get_idempotency("k", now=h.now())
    check_same(result.idempotency, stored, "the key reserved by the one-step retry")
    (attempt,) = await h.s.attempts("p", "b")
    assert ("bob", "unblocked", RetryBudget.ONE_MORE, Trigger.MANUAL_RETRY) == (
        attempt.actor,
        attempt.reason,
        attempt.budget,
        attempt.trigger,
    )
    assert [("p", "b", 1)] == [e.key for e in await h.s.deferred("p")]
    result = await h.retrier.retry("p", "a", budget=RetryBudget.FULL)
    assert ("dispatched", 3) == (result.dispatch.status, result.task.retries_left)
    before = await h.snapshot("p")
    await refused(h.retrier.retry("p", "a"), TaskNotBlocked, "retrier.retry('p', 'a')")
    await refused(h.retrier.retry("p", "nope"), TaskNotFound, "retrier.retry('p', 'nope')")
    check_same(before, await h.snapshot("p"), "the state after refused retries")


# -- several retries in one transaction (RetryManyInOneStep), against the core -----------------
RetryMany = Callable[..., Awaitable[list[Applied | None]]]


def _retry_many(h: Harness) -> RetryMany | None:
    """The storage's ``retry_blocked_many`` as a coroutine, if it has one (sync or async)."""
    raw: object = h.raw
    if isinstance(raw, AsyncRetryManyInOneStep):
        return raw.retry_blocked_many
    inner = getattr(raw, "sync", None)  # the async port over a sync storage keeps it there
    if isinstance(inner, RetryManyInOneStep):
        sync_many = inner.retry_blocked_many

        async def call(*args: Any, **kwargs: Any) -> list[Applied | None]:
            return sync_many(*args, **kwargs)

        return call
    return None


@scenario
async def _retry_many_does_what_the_core_decides(h: Harness) -> None:
    """A storage that retries several tasks in one transaction (RetryManyInOneStep) answers
    and stores, for each task, what the core's decide and apply do on the in-memory storage,
    for every case of project and task status, blockers, budget, actor, reason and claim; a
    task the core refuses (or that does not exist) is None in its place and changes nothing;
    and the tasks of one call are retried in order, each seeing the ones before."""
    many = _retry_many(h)
    if many is None:
        return
    for n, case in enumerate(ONE_STEP_CASES):
        if case.key is not None:  # a bulk retry has no idempotency key
            continue
        pid = f"m{n}"
        t0 = h.now()
        await _build_case(h.s, pid, case, t0)
        reference = inline_port(MemoryStorage())
        await _build_case(reference, pid, case, t0)
        h.clock.advance(7.5)
        now = h.now()
        options: dict[str, Any] = {
            "now": now,
            "actor": case.actor,
            "reason": case.reason,
            "budget": case.budget,
            "claimed_until": now + timedelta(seconds=30) if case.claimed else None,
        }
        what = f"case {case!r}"
        expected = await _core_retry(reference, pid, case.task_id, **options)
        got = await many(pid, [case.task_id, "absent"], **options)
        assert len(got) == 2, f"{what}: retry_blocked_many answered {len(got)} items for 2 ids"
        check_same(expected, got[0], f"{what}: retry_blocked_many's answer (expected: the core's)")
        assert got[1] is None, f"{what}: a task that does not exist was answered {got[1]!r}"
        check_same(
            await _case_state(reference, pid, f"{pid}-k"),
            await _case_state(h.s, pid, f"{pid}-k"),
            f"{what}: the state after retry_blocked_many (expected: the core's)",
        )
    # Several tasks of one project in one call, one of them not blocked.
    ref = Harness(inline_port(MemoryStorage()))
    ref.clock.advance((h.now() - ref.now()).total_seconds())  # the same times on both
    ids = ["a", "b", "c", "d"]
    for harness in (h, ref):
        await harness.project("many")
        for tid in ids:
            await harness.task("many", tid)
        for tid in ("a", "c", "d"):
            await harness.blocked("many", tid)
    h.clock.advance(3.0)
    ref.clock.advance(3.0)
    now = h.now()
    expected_all = [await _core_retry(ref.s, "many", tid, now=now, actor="ops") for tid in ids]
    got_all = await many("many", ids, now=now, actor="ops")
    check_same(expected_all, got_all, "retry_blocked_many of a, b (not blocked), c, d")
    check_same(
        await _case_state(ref.s, "many", "none"),
        await _case_state(h.s, "many", "none"),
        "the state after retry_blocked_many of several tasks (expected: the core's)",
    )
    assert await many("nope", ["t"], now=now) == [None]


# -- concurrency ---------------------------------------------------------------------------------
ROUNDS = 12
RACERS = 4


def _wins(results: Sequence[Any], refusal: type[BaseException], what: str) -> list[Any]:
    """The results that are not ``refusal``; any other exception is re-raised."""
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, refusal):
            raise result
    wins = [r for r in results if not isinstance(r, BaseException)]
    assert len(wins) == 1, (
        f"{what}: expected exactly one of {len(results)} racing calls to succeed, "
        f"got {len(wins)}: {results!r}"
    )
    return wins


def _applier(plan: Plan) -> Racer:
    async def call(s: AsyncStorage) -> Applied:
        return await s.apply(plan)

    return call


@scenario
async def _racing_plans_one_wins(h: Harness) -> None:
    """Of plans decided on the same read and applied at once from several threads (manual
    retries, heartbeats that keep the status), exactly one applies; the others conflict."""
    await h.project("p")
    for r in range(ROUNDS):
        tid = f"t{r}"
        await h.task("p", tid)
        blocked = await h.blocked("p", tid)
        project = await h.s.get_project("p")
        plans = [
            decide.manual_retry(
                blocked, project, now=h.now(), blockers={}, actor=f"actor-{n}",
                budget=RetryBudget.FULL if n % 2 else RetryBudget.ONE_MORE,
            )
            for n in range(RACERS)
        ]  # fmt: skip
        (won,) = _wins(await h.race([_applier(p) for p in plans]), VersionConflict, "retries")
        check_same(won.task, await h.get("p", tid), f"{tid} after racing retries")
        assert 2 == len(await h.s.attempts("p", tid)), f"{tid}: attempts after racing retries"
        assert 2 == len(await h.s.dispatches("p", tid)), f"{tid}: entries after racing retries"
        await h.ex.start("p", tid, 2)
        running = await h.get("p", tid)
        beats = [
            decide.heartbeat(running, 2, now=h.now() + timedelta(seconds=n), policy=h.policy)
            for n in range(RACERS)
        ]
        (won,) = _wins(await h.race([_applier(p) for p in beats]), VersionConflict, "heartbeats")
        check_same(won.task, await h.get("p", tid), f"{tid} after racing heartbeats")


@scenario
async def _racing_guarded_plans_one_wins(h: Harness) -> None:
    """A blocker's success and its dependant's assignment, decided on the same reads and applied
    at once, guard each other: exactly one applies, and no dispatch is left waiting on a
    finished blocker."""
    await h.project("p")
    for r in range(ROUNDS):
        a, b = f"a{r}", f"b{r}"
        await h.task("p", a)
        await h.task("p", b, blocked_by=[a])
        running = await h.running("p", a)
        project, dependant = await h.s.load("p", b)
        succeed = decide.succeed(
            running, 1, project, now=h.now(), dependants=[dependant], blockers={}
        )
        assign = decide.assign(dependant, project, now=h.now(), blockers={a: running})
        results = await h.race([_applier(succeed), _applier(assign)])
        _wins(results, VersionConflict, f"round {r}: succeed({a}) and assign({b})")
    assert [] == [
        e.key
        for e in await h.s.deferred("p")
        if (await h.get("p", f"a{e.task_id[1:]}")).status is TaskStatus.DONE
    ], "deferred entries whose blocker is done"


@scenario
async def _racing_reservations_one_wins(h: Harness) -> None:
    """Retries of different tasks reserving the same idempotency key at once: exactly one
    applies and holds the key; the others raise IdempotencyConflict."""
    await h.project("p")
    for r in range(ROUNDS):
        project = await h.s.get_project("p")
        plans = []
        for n in range(RACERS):
            tid = f"t{r}-{n}"
            await h.task("p", tid)
            blocked = await h.blocked("p", tid)
            plans.append(
                decide.manual_retry(
                    blocked, project, now=h.now(), blockers={}, idempotency_key=f"k{r}"
                )
            )
        (won,) = _wins(await h.race([_applier(p) for p in plans]), IdempotencyConflict, f"key k{r}")
        record = await h.s.get_idempotency(f"k{r}")
        assert record is not None, f"key k{r} is not stored"
        assert won.task.id == record.task_id, f"key k{r} is held by {record!r}, {won.task.id} won"
        moved = [
            tid
            for tid in (f"t{r}-{n}" for n in range(RACERS))
            if (await h.get("p", tid)).status is TaskStatus.ASSIGNED
        ]
        assert [won.task.id] == moved, f"tasks moved under key k{r}"


_Take = Callable[[AsyncStorage], Awaitable[list[DispatchEntry]]]


async def _race_exclusive(h: Harness, take: _Take, total: int, who: str, did: str) -> None:
    """Racing callers each ``take`` batches until none is left: no entry goes to two of
    them, and together they get all ``total``."""

    async def caller(s: AsyncStorage) -> list[tuple[str, str, int]]:
        keys: list[tuple[str, str, int]] = []
        for _ in range(total):
            batch = await take(s)
            if not batch:
                break
            keys.extend(e.key for e in batch)
        return keys

    results = await h.race([caller] * RACERS)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    taken = [key for keys in results for key in keys]
    twice = sorted({key for key in taken if taken.count(key) > 1})
    assert not twice, f"entries {did} by two {who} at once: {twice}"
    assert total == len(taken), f"expected all {total} entries {did}, got {len(taken)}"


@scenario
async def _racing_claims_are_exclusive(h: Harness) -> None:
    """Relays claiming at once from several threads never receive the same entry, and
    together receive every due entry."""
    await h.project("p")
    total = 48
    for n in range(total):
        await h.task("p", f"t{n:02}")
        await h.ex.assign("p", f"t{n:02}")
    now = h.now()

    async def claim(s: AsyncStorage) -> list[DispatchEntry]:
        return await s.claim_due(now=now, limit=2, claimed_until=now + timedelta(seconds=30))

    await _race_exclusive(h, claim, total, "relays", "claimed")


@scenario
async def _racing_redeliveries_are_exclusive(h: Harness) -> None:
    """Reapers turning back unstarted deliveries at once never both turn back the same entry."""
    await h.project("p")
    total = 24
    for n in range(total):
        await h.task("p", f"t{n:02}")
        await h.live.assign("p", f"t{n:02}")
    h.clock.advance(START)
    now = h.now()

    async def redeliver(s: AsyncStorage) -> list[DispatchEntry]:
        return await s.redeliver_stale(now=now, delivered_before=now, limit=2)

    await _race_exclusive(h, redeliver, total, "reapers", "turned back")


@scenario
async def _racing_idempotency_saves_agree(h: Harness) -> None:
    """Requests saving records for the same free key at once all get back the one record
    stored, and it is one of theirs."""
    await h.project("p")
    for r in range(ROUNDS):
        records = [
            IdempotencyRecord(
                key=f"k{r}", project_id="p", task_id=f"t{n}",
                created_at=h.now() + timedelta(microseconds=n), status_code=200 + n, body="{}",
            )
            for n in range(RACERS)
        ]  # fmt: skip

        def saver(record: IdempotencyRecord) -> Racer:
            async def call(s: AsyncStorage) -> IdempotencyRecord:
                return await s.save_idempotency(record)

            return call

        results = await h.race([saver(record) for record in records])
        for result in results:
            if isinstance(result, BaseException):
                raise result
        stored = await h.s.get_idempotency(f"k{r}")
        assert stored in records, f"k{r}: stored {stored!r}, which nobody saved"
        for n, result in enumerate(results):
            check_same(
                stored, result, f"k{r}: what racing save {n} got back (expected: the stored)"
            )


@scenario
async def _racing_one_step_retries_one_wins(h: Harness) -> None:
    """One-step retries of the same task, or under the same key, at once: exactly one applies."""
    if _one_step(h) is None:
        return
    await h.project("p")
    for r in range(ROUNDS):
        tid = f"t{r}"
        await h.task("p", tid)
        await h.blocked("p", tid)

        def retry(task_id: str, key: str | None) -> Racer:
            async def call(s: AsyncStorage) -> Applied | None:
                assert isinstance(s, AsyncRetryInOneStep)
                return await s.retry_blocked("p", task_id, now=h.now(), idempotency_key=key)

            return call

        results = await h.race([retry(tid, None)] * RACERS)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        wins = [result for result in results if result is not None]
        assert 1 == len(wins), f"{tid}: {len(wins)} of {RACERS} racing one-step retries applied"
        assert 2 == len(await h.s.attempts("p", tid)), f"{tid}: attempts after racing retries"
        others = [f"u{r}-{n}" for n in range(RACERS)]
        for other in others:
            await h.task("p", other)
            await h.blocked("p", other)
        results = await h.race([retry(other, f"k{r}") for other in others])
        for result in results:
            if isinstance(result, BaseException):
                raise result
        wins = [result for result in results if result is not None]
        assert 1 == len(wins), f"key k{r}: {len(wins)} of {RACERS} racing one-step retries applied"


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


async def _play(fn: Scenario, storage: AsyncStorage, race: Race | None = None) -> None:
    await fn(Harness(storage, race))


def play_sync(fn: Scenario, storage: Storage) -> None:
    """Run one scenario against a sync ``storage`` (its races on threads)."""
    asyncio.run(_play(fn, inline_port(storage), thread_race(storage)))


def _sync_test(name: str, fn: Scenario) -> Callable[..., None]:
    def test(self: object, storage: Storage) -> None:
        play_sync(fn, storage)

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
        wrapped = inline_port(storage)
        examples = iter(range(1_000_000))

        @_PROPERTY_SETTINGS
        @given(case=_retention_cases())
        def check(case: dict[str, Any]) -> None:
            pid = f"r{next(examples)}"
            asyncio.run(_prune_keeps_exactly_what_the_rule_keeps(wrapped, pid, case))

        check()

    def test_one_step_retry_does_what_the_core_decides_in_any_case(self, storage: Storage) -> None:
        """A storage with the one-step retry answers and stores what the core decides, for
        any drawn combination of project, task, blockers, budget, actor, claim and key."""
        wrapped = inline_port(storage)
        if not isinstance(wrapped, AsyncRetryInOneStep):
            return

        def run(pid: str, case: OneStepCase) -> None:
            h = Harness(wrapped)
            one_step = _one_step(h)
            assert one_step is not None
            asyncio.run(_check_one_step_case(h, one_step, pid, case))

        _one_step_property(run)

    def test_overview_pages_match_a_model(self, storage: Storage) -> None:
        """Pages of list_projects and blocked_tasks, of any size, within any set of
        projects (unknown ids included), filtered by any error_type, reassemble exactly what
        a model of the stored tasks says, each project with its own progress."""
        wrapped = inline_port(storage)
        _skip_without_overview(wrapped)
        examples = iter(range(1_000_000))

        @_PROPERTY_SETTINGS
        @given(case=_overview_cases())
        def check(case: dict[str, Any]) -> None:
            assert asyncio.run(_overview_matches_a_model(wrapped, f"ov{next(examples)}:", case))

        check()


def _one_step_property(run: Callable[[str, OneStepCase], None]) -> None:
    examples = iter(range(1_000_000))

    @_PROPERTY_SETTINGS
    @given(case=one_step_cases)
    def check(case: OneStepCase) -> None:
        run(f"h{next(examples)}", case)

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

    def test_one_step_retry_does_what_the_core_decides_in_any_case(
        self, async_storage_factory: AsyncStorageFactory
    ) -> None:
        """A storage with the one-step retry answers and stores what the core decides, for
        any drawn combination of project, task, blockers, budget, actor, claim and key."""

        async def main(pid: str, case: OneStepCase) -> bool:
            storage = await async_storage_factory()
            try:
                h = Harness(storage)
                one_step = _one_step(h)
                if one_step is None:
                    return False
                await _check_one_step_case(h, one_step, pid, case)
                return True
            finally:
                await storage.close()

        if not asyncio.run(main("h-probe", ONE_STEP_CASES[0])):
            return

        def run(pid: str, case: OneStepCase) -> None:
            asyncio.run(main(pid, case))

        _one_step_property(run)

    def test_overview_pages_match_a_model(self, async_storage_factory: AsyncStorageFactory) -> None:
        """Pages of list_projects and blocked_tasks, of any size, within any set of
        projects (unknown ids included), filtered by any error_type, reassemble exactly what
        a model of the stored tasks says, each project with its own progress."""

        async def probe() -> object:
            storage = await async_storage_factory()
            try:
                return type(storage) if _has_overview(storage) else storage
            finally:
                await storage.close()

        found = asyncio.run(probe())
        if not isinstance(found, type):
            _skip_without_overview(found)
        examples = iter(range(1_000_000))

        async def main(prefix: str, case: dict[str, Any]) -> None:
            storage = await async_storage_factory()
            try:
                assert await _overview_matches_a_model(storage, prefix, case)
            finally:
                await storage.close()

        @_PROPERTY_SETTINGS
        @given(case=_overview_cases())
        def check(case: dict[str, Any]) -> None:
            asyncio.run(main(f"ov{next(examples)}:", case))

        check()


for _name, _fn in SCENARIOS.items():
    setattr(StorageContract, f"test_{_name}", _sync_test(_name, _fn))
    setattr(AsyncStorageContract, f"test_{_name}", _async_test(_name, _fn))
del _name, _fn
