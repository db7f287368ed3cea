"""The async port over a sync storage, for adapters whose driver is sync."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar, cast

from typing_extensions import ParamSpec, Self

from deepwork_retry._core.events import Event, EventRetry
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
from deepwork_retry.exceptions import InvalidInput, StorageUnavailable
from deepwork_retry.ports import (
    OVERVIEW_METHODS,
    EventLog,
    ProjectOverview,
    RetryInOneStep,
    Storage,
)


class OneStepStorage(Storage, RetryInOneStep, Protocol):
    """A sync storage that also retries in one step."""


S = TypeVar("S", bound=Storage)
W = TypeVar("W", bound=OneStepStorage)
P = ParamSpec("P")
R = TypeVar("R")


DEFAULT_READERS = 4
"""Threads that run an offloaded storage's reads."""
DEFAULT_WRITERS = 4
"""Threads that run an offloaded storage's writes."""
DEFAULT_MAX_WAITING_WRITES = 128
"""Writes an offloaded storage lets be queued or running at once; more are refused."""


_ONE_STEP_METHODS = ("retry_blocked",)
_EVENT_LOG_METHODS = (
    "events", "claim_events", "settle_events", "claim_event_retries", "settle_event_retry",
    "parked_events", "replay_parked",
)  # fmt: skip


def _has(storage: object, names: Sequence[str]) -> bool:
    return all(callable(getattr(storage, name, None)) for name in names)


class AsyncFromSync(Generic[S]):
    """Every method of the wrapped ``sync`` storage as a coroutine.

    With ``offload`` each call runs in a worker thread, so a blocking driver
    never stalls the event loop; without it, calls run inline, for storages
    that never block.

    Offloaded reads and writes run on separate threads the storage owns: up
    to ``readers`` reads at once, and writes on up to ``writers`` threads,
    taken in their order of arrival (a storage that writes one at a time
    still gains from a few: one thread's work outside the lock overlaps
    another's inside it). So a write waiting for a lock held elsewhere never
    holds up a read. At most ``max_waiting_writes`` writes may be queued or
    running; one more is refused at once with
    :class:`~deepwork_retry.exceptions.StorageUnavailable` rather than
    queued behind writes that are already waiting. With ``write_timeout``,
    a write still queued that long after it was sent is refused when its
    turn comes, without touching the storage (a subclass's :meth:`_write`
    may also hand the time left to the storage). :meth:`close` stops the
    threads.

    The port has the optional one-step retry
    (:class:`~deepwork_retry.ports.AsyncRetryInOneStep`) exactly when the
    wrapped storage has it (:class:`~deepwork_retry.ports.RetryInOneStep`):
    ``AsyncFromSync(storage, ...)`` is then an :class:`AsyncFromSyncOneStep`,
    whose ``retry_blocked`` is one write like :meth:`apply`. Likewise it has
    the event log (:class:`~deepwork_retry.ports.AsyncEventLog`) exactly
    when the wrapped storage is an :class:`~deepwork_retry.ports.EventLog`.
    Both are found by the methods ``getattr`` finds, so a proxy that forwards
    with ``__getattr__`` keeps them on every Python version.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        sync = args[0] if args else kwargs.get("sync")
        if cls is AsyncFromSync:
            # By the methods found, as ``getattr`` finds them: a proxy that forwards
            # with ``__getattr__`` keeps its capabilities on every Python (the
            # protocols' ``isinstance`` looks methods up statically from 3.12 on).
            found = (
                _has(sync, _ONE_STEP_METHODS),
                _has(sync, _EVENT_LOG_METHODS),
                _has(sync, OVERVIEW_METHODS),
            )
            return cast(Self, object.__new__(_WITH[found]))
        return object.__new__(cls)

    def __init__(
        self,
        sync: S,
        *,
        offload: bool,
        readers: int = DEFAULT_READERS,
        writers: int = DEFAULT_WRITERS,
        max_waiting_writes: int = DEFAULT_MAX_WAITING_WRITES,
        write_timeout: float | None = None,
    ) -> None:
        sizes = {"readers": readers, "writers": writers, "max_waiting_writes": max_waiting_writes}
        for name, value in sizes.items():
            if value.__class__ is not int or value < 1:
                raise InvalidInput(f"{name} must be an integer >= 1")
        self.sync = sync
        self._max_waiting_writes = max_waiting_writes
        self._write_timeout = write_timeout
        self._writes = 0
        self._count = threading.Lock()
        self._closed = False
        self._readers: ThreadPoolExecutor | None = None
        self._writer: ThreadPoolExecutor | None = None
        if offload:
            # Threads start only when first needed, so nothing here is bound to a loop.
            self._readers = ThreadPoolExecutor(readers, thread_name_prefix="deepwork-storage-read")
            self._writer = ThreadPoolExecutor(writers, thread_name_prefix="deepwork-storage-write")

    def _submit(self, executor: ThreadPoolExecutor, call: Callable[[], R]) -> Future[R]:
        if self._closed:
            raise StorageUnavailable(f"{self!r} is closed")
        try:
            return executor.submit(contextvars.copy_context().run, call)
        except RuntimeError:  # shut down meanwhile
            raise StorageUnavailable(f"{self!r} is closed") from None

    async def _read_call(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run a read (``fn`` with its arguments) on a reader thread."""
        if self._readers is None:
            return fn(*args, **kwargs)
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.wrap_future(self._submit(self._readers, call))

    async def _call(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run a write (or any call not known to be a read) on a writer thread, or
        refuse it at once when ``max_waiting_writes`` are queued or running."""
        if self._writer is None:
            return fn(*args, **kwargs)
        with self._count:
            if self._writes >= self._max_waiting_writes:
                raise StorageUnavailable(
                    f"{self!r}: {self._writes} writes are waiting already; try again later"
                )
            self._writes += 1
        # Counted until done, run or cancelled while queued (its caller gave up).
        call = functools.partial(self._write, time.monotonic(), fn, *args, **kwargs)
        try:
            future = self._submit(self._writer, call)
        except BaseException:
            self._written(None)
            raise
        future.add_done_callback(self._written)
        return await asyncio.wrap_future(future)

    def _written(self, _: object) -> None:
        with self._count:
            self._writes -= 1

    def _write(self, sent: float, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """One write on a writer thread; ``sent`` is when it was queued (``time.monotonic``)."""
        if self._write_timeout is not None and time.monotonic() - sent >= self._write_timeout:
            raise StorageUnavailable(
                f"{self!r}: a write waited {self._write_timeout:g} s for its turn; try again later"
            )
        return fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.sync!r})"

    async def create_project(self, project: Project) -> None:
        await self._call(self.sync.create_project, project)

    async def add_tasks(self, tasks: Sequence[Task]) -> None:
        await self._call(self.sync.add_tasks, tasks)

    async def get_project(self, project_id: str) -> Project:
        return await self._read_call(self.sync.get_project, project_id)

    async def load(self, project_id: str, task_id: str) -> tuple[Project, Task]:
        return await self._read_call(self.sync.load, project_id, task_id)

    async def get_tasks(self, project_id: str, task_ids: Sequence[str]) -> dict[str, Task]:
        return await self._read_call(self.sync.get_tasks, project_id, task_ids)

    async def dependants(self, project_id: str, task_id: str) -> list[Task]:
        return await self._read_call(self.sync.dependants, project_id, task_id)

    async def list_tasks(
        self,
        project_id: str,
        *,
        status: TaskStatus | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[Task]:
        return await self._read_call(
            self.sync.list_tasks, project_id, status=status, after=after, limit=limit
        )

    async def progress(self, project_id: str) -> Progress:
        return await self._read_call(self.sync.progress, project_id)

    async def attempts(self, project_id: str, task_id: str) -> list[Attempt]:
        return await self._read_call(self.sync.attempts, project_id, task_id)

    async def dispatches(self, project_id: str, task_id: str) -> list[DispatchEntry]:
        return await self._read_call(self.sync.dispatches, project_id, task_id)

    async def deferred(self, project_id: str) -> list[DispatchEntry]:
        return await self._read_call(self.sync.deferred, project_id)

    async def apply(self, plan: Plan) -> Applied:
        return await self._call(self.sync.apply, plan)

    async def apply_project(self, plan: ProjectPlan) -> tuple[Project, list[DispatchEntry]]:
        return await self._call(self.sync.apply_project, plan)

    async def claim_due(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[DispatchEntry]:
        return await self._call(
            self.sync.claim_due, now=now, limit=limit, claimed_until=claimed_until
        )

    async def mark_delivered(self, entries: Sequence[DispatchEntry], *, now: datetime) -> None:
        await self._call(self.sync.mark_delivered, entries, now=now)

    async def mark_failed(
        self, entry: DispatchEntry, *, error: str, retry_at: datetime, now: datetime | None = None
    ) -> None:
        if now is None:
            await self._call(self.sync.mark_failed, entry, error=error, retry_at=retry_at)
        else:  # only an event log takes it (the services pass it only then)
            mark: Callable[..., None] = self.sync.mark_failed
            await self._call(mark, entry, error=error, retry_at=retry_at, now=now)

    async def redeliver_stale(
        self, *, now: datetime, delivered_before: datetime, limit: int
    ) -> list[DispatchEntry]:
        return await self._call(
            self.sync.redeliver_stale, now=now, delivered_before=delivered_before, limit=limit
        )

    async def expired_leases(self, *, now: datetime, limit: int) -> list[Task]:
        return await self._read_call(self.sync.expired_leases, now=now, limit=limit)

    async def get_idempotency(
        self, key: str, *, now: datetime | None = None
    ) -> IdempotencyRecord | None:
        return await self._read_call(self.sync.get_idempotency, key, now=now)

    async def save_idempotency(self, record: IdempotencyRecord) -> IdempotencyRecord:
        return await self._call(self.sync.save_idempotency, record)

    async def prune(self, rule: PruneRule) -> Pruned:
        return await self._call(self.sync.prune, rule)

    async def close(self) -> None:
        """Close the storage; calls still queued finish (refused by the closed storage),
        later ones are refused, and the worker threads end."""
        if self._readers is None or self._writer is None:
            self.sync.close()
            return
        if self._closed:
            return
        await self._read_call(self.sync.close)
        self._closed = True
        self._readers.shutdown(wait=False)
        self._writer.shutdown(wait=False)

    # The lifecycle every async storage shares, so that an application opens
    # and closes any of them alike (in its lifespan, or with ``async with``).
    async def open(self) -> None:
        """Nothing to do: the wrapped storage opened when it was constructed."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncFromSyncOneStep(AsyncFromSync[W]):
    """:class:`AsyncFromSync` over a storage that retries in one step, keeping that step.

    ``AsyncFromSync(storage, ...)`` builds one whenever ``storage`` has
    ``retry_blocked``; a subclass for such a storage derives from it.
    """

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
        """The wrapped storage's ``retry_blocked``, run as a write (``trace`` is passed on
        only when given: only an event log takes it)."""
        extra = {} if trace is None else {"trace": trace}
        call: Callable[..., Applied | None] = self.sync.retry_blocked
        return await self._call(
            call, project_id, task_id, now=now, actor=actor, reason=reason,
            budget=budget, claimed_until=claimed_until, idempotency_key=idempotency_key,
            idempotency_expires_at=idempotency_expires_at, **extra,
        )  # fmt: skip


class AsyncFromSyncEvents(AsyncFromSync[S]):
    """:class:`AsyncFromSync` over a storage that is an event log, keeping it.

    ``AsyncFromSync(storage, ...)`` builds one whenever ``storage`` is an
    :class:`~deepwork_retry.ports.EventLog`.
    """

    @property
    def _log(self) -> EventLog:
        return cast(EventLog, self.sync)

    async def events(self, project_id: str, *, after: int = 0, limit: int = 100) -> list[Event]:
        return await self._read_call(self._log.events, project_id, after=after, limit=limit)

    async def claim_events(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[Event]:
        return await self._call(
            self._log.claim_events, now=now, limit=limit, claimed_until=claimed_until
        )

    async def settle_events(
        self, events: Sequence[Event], *, now: datetime, failures: Sequence[EventRetry] = ()
    ) -> None:
        await self._call(self._log.settle_events, events, now=now, failures=failures)

    async def claim_event_retries(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[EventRetry]:
        return await self._call(
            self._log.claim_event_retries, now=now, limit=limit, claimed_until=claimed_until
        )

    async def settle_event_retry(
        self,
        retry: EventRetry,
        *,
        now: datetime,
        error: str | None = None,
        retry_at: datetime | None = None,
    ) -> None:
        await self._call(
            self._log.settle_event_retry, retry, now=now, error=error, retry_at=retry_at
        )

    async def parked_events(
        self, *, subscriber: str | None = None, limit: int = 100
    ) -> list[EventRetry]:
        return await self._read_call(self._log.parked_events, subscriber=subscriber, limit=limit)

    async def replay_parked(
        self,
        *,
        now: datetime,
        subscriber: str | None = None,
        event_ids: Sequence[str] | None = None,
    ) -> int:
        return await self._call(
            self._log.replay_parked, now=now, subscriber=subscriber, event_ids=event_ids
        )


class AsyncFromSyncOneStepEvents(AsyncFromSyncOneStep[W], AsyncFromSyncEvents[W]):
    """:class:`AsyncFromSync` over a storage that retries in one step and is an event log."""


class AsyncFromSyncOverview(AsyncFromSync[S]):
    """:class:`AsyncFromSync` over a storage that reads across projects, keeping those reads.

    ``AsyncFromSync(storage, ...)`` builds one (or a class deriving from it)
    whenever ``storage`` is a :class:`~deepwork_retry.ports.ProjectOverview`;
    a subclass for such a storage derives from it too.
    """

    @property
    def _overview(self) -> ProjectOverview:
        return cast(ProjectOverview, self.sync)

    async def list_projects(
        self, *, projects: frozenset[str] | None = None, after: str | None = None, limit: int = 100
    ) -> list[ProjectSummary]:
        return await self._read_call(
            self._overview.list_projects, projects=projects, after=after, limit=limit
        )

    async def blocked_tasks(
        self,
        *,
        projects: frozenset[str] | None = None,
        error_type: str | None = None,
        after: tuple[str, str] | None = None,
        limit: int = 100,
    ) -> list[Task]:
        return await self._read_call(
            self._overview.blocked_tasks,
            projects=projects,
            error_type=error_type,
            after=after,
            limit=limit,
        )


class AsyncFromSyncOneStepOverview(AsyncFromSyncOneStep[W], AsyncFromSyncOverview[W]):
    """:class:`AsyncFromSync` over a storage that retries in one step and reads across
    projects."""


class AsyncFromSyncEventsOverview(AsyncFromSyncEvents[S], AsyncFromSyncOverview[S]):
    """:class:`AsyncFromSync` over a storage that is an event log and reads across projects."""


class AsyncFromSyncOneStepEventsOverview(AsyncFromSyncOneStepEvents[W], AsyncFromSyncOverview[W]):
    """:class:`AsyncFromSync` over a storage with every optional capability: the one-step
    retry, the event log and the reads across projects."""


_WITH: dict[tuple[bool, bool, bool], type[AsyncFromSync[Any]]] = {
    # (one-step retry, event log, overview): the class that keeps exactly those.
    (False, False, False): AsyncFromSync,
    (True, False, False): AsyncFromSyncOneStep,
    (False, True, False): AsyncFromSyncEvents,
    (True, True, False): AsyncFromSyncOneStepEvents,
    (False, False, True): AsyncFromSyncOverview,
    (True, False, True): AsyncFromSyncOneStepOverview,
    (False, True, True): AsyncFromSyncEventsOverview,
    (True, True, True): AsyncFromSyncOneStepEventsOverview,
}
