"""The ports: what the services need from storage, dispatch and time.

Each is a :class:`typing.Protocol`; the adapters under ``storage/`` and
``dispatch/`` implement them, and so can a host application. The shipped
conformance suite (:mod:`deepwork_retry.testing`) checks a Storage.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timezone
from typing import Protocol, runtime_checkable

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

REDELIVERED = "not started within the start timeout; redelivered"
"""The ``last_error`` of an entry that :meth:`Storage.redeliver_stale` turned back."""


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...


class SystemClock:
    """The wall clock."""

    def now(self) -> datetime:
        return datetime.now(timezone.utc)


@runtime_checkable
class Storage(Protocol):
    """Durable state. Every method is atomic; :meth:`apply` is all-or-nothing.

    Lookups raise :class:`~deepwork_retry.exceptions.ProjectNotFound` /
    :class:`~deepwork_retry.exceptions.TaskNotFound`; a task id that exists in
    another project is "not found" too. Every ``limit`` must be an integer from
    1 to 1000, else :class:`~deepwork_retry.exceptions.InvalidInput`.
    Connection failures and timeouts raise
    :class:`~deepwork_retry.exceptions.StorageUnavailable` and change nothing.
    Every method is safe to call from several threads (or, on an
    :class:`AsyncStorage`, tasks) at once. The conformance kit
    (:mod:`deepwork_retry.testing`) checks all of this.
    """

    # -- setup -------------------------------------------------------------
    def create_project(self, project: Project) -> None:
        """Store a new project (``AlreadyExists`` if the id is taken)."""
        ...

    def add_tasks(self, tasks: Sequence[Task]) -> None:
        """Store new tasks of existing projects and count them in progress.

        All or nothing: a malformed batch (an id empty, longer than 255
        characters or holding NUL, a task twice in the batch, a negative
        retry counter, a task blocked by itself or by such an id) raises
        :class:`~deepwork_retry.exceptions.InvalidInput`, a task of an
        unknown project ``ProjectNotFound``, a taken id ``AlreadyExists``,
        and none of the batch is stored.
        """
        ...

    # -- reads ---------------------------------------------------------------
    def get_project(self, project_id: str) -> Project: ...

    def load(self, project_id: str, task_id: str) -> tuple[Project, Task]:
        """The project and one of its tasks, read together."""
        ...

    def get_tasks(self, project_id: str, task_ids: Sequence[str]) -> dict[str, Task]:
        """The tasks of ``project_id`` among ``task_ids`` (missing ids are left out)."""
        ...

    def dependants(self, project_id: str, task_id: str) -> list[Task]:
        """The tasks whose ``blocked_by`` names ``task_id``."""
        ...

    def list_tasks(
        self,
        project_id: str,
        *,
        status: TaskStatus | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[Task]:
        """Tasks ordered by id, those with ``id > after``, at most ``limit``."""
        ...

    def progress(self, project_id: str) -> Progress: ...

    def attempts(self, project_id: str, task_id: str) -> list[Attempt]:
        """The task's attempt history, oldest first."""
        ...

    def dispatches(self, project_id: str, task_id: str) -> list[DispatchEntry]:
        """The task's outbox entries, oldest first."""
        ...

    def deferred(self, project_id: str) -> list[DispatchEntry]:
        """The project's deferred outbox entries."""
        ...

    # -- writes ----------------------------------------------------------------
    def apply(self, plan: Plan) -> Applied:
        """Apply ``plan`` in one transaction.

        Compare-and-set on versions, never on statuses (a heartbeat keeps the
        status and still moves the version on): the task must still be at
        ``plan.before.version``, each guard at its version, the project at
        ``plan.project_version`` (when set), else
        :class:`~deepwork_retry.exceptions.VersionConflict` and nothing
        changes; a key reserved and not expired raises
        :class:`~deepwork_retry.exceptions.IdempotencyConflict` carrying the
        stored record. Checks and writes are one atomic step: of plans
        decided on the same read and applied at once, exactly one applies.
        Writes the task (every field, ``metadata`` included), the attempt
        record(s), the outbox entry, the releases, the progress counters and
        the idempotency reservation, and returns the task, the progress after
        the change and the entries made pending.
        """
        ...

    def apply_project(self, plan: ProjectPlan) -> tuple[Project, list[DispatchEntry]]:
        """Apply a project status change and its releases in one transaction."""
        ...

    # -- outbox ------------------------------------------------------------------
    def claim_due(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[DispatchEntry]:
        """Claim up to ``limit`` pending entries that are due and not claimed.

        Two concurrent callers never receive the same entry.
        """
        ...

    def mark_delivered(self, entries: Sequence[DispatchEntry], *, now: datetime) -> None: ...

    def mark_failed(self, entry: DispatchEntry, *, error: str, retry_at: datetime) -> None:
        """Release the claim; the entry stays pending, due again at ``retry_at``.

        A storage that is an :class:`EventLog` takes a keyword ``now`` too
        (the services pass it only to such a storage; ``None``: the wall
        clock) and writes :func:`~deepwork_retry._core.events.dispatch_failed`
        in the same transaction.
        """
        ...

    def redeliver_stale(
        self, *, now: datetime, delivered_before: datetime, limit: int
    ) -> list[DispatchEntry]:
        """Turn delivered entries whose attempt never started back to pending.

        Every ``delivered`` entry with ``delivered_at <= delivered_before``
        whose task is still ``assigned`` at that entry's attempt (at most
        ``limit``, earliest delivery first) becomes ``pending``, unclaimed,
        due at ``now``, with ``last_error`` :data:`REDELIVERED` and ``tries``
        unchanged, in one transaction; returns the entries as updated. Two
        concurrent callers never both turn back the same entry.
        """
        ...

    # -- leases --------------------------------------------------------------------
    def expired_leases(self, *, now: datetime, limit: int) -> list[Task]:
        """Tasks ``in_progress`` whose lease has expired at ``now``
        (``lease_expires_at <= now``), at most ``limit``."""
        ...

    # -- idempotency -----------------------------------------------------------------
    def get_idempotency(self, key: str, *, now: datetime | None = None) -> IdempotencyRecord | None:
        """The record of ``key``; ``None`` when there is none or, given ``now``,
        when it has expired at ``now`` (an expired record counts as absent)."""
        ...

    def save_idempotency(self, record: IdempotencyRecord) -> IdempotencyRecord:
        """Insert ``record`` if the key is free, or complete the reservation it came from.

        A reservation (``status_code is None``) is completed only by a record
        with the same ``created_at`` (the reserving request's own answer); any
        other existing record is kept and returned unchanged, so a concurrent
        request's refusal never displaces the retry that reserved the key.
        A key whose record has expired at ``record.created_at`` is free (and so
        in :meth:`apply`'s reservation): the new record replaces the old.
        Of records saved at once for one free key, one is stored and every
        caller gets that one back.
        """
        ...

    # -- retention ---------------------------------------------------------------------
    def prune(self, rule: PruneRule) -> Pruned:
        """Remove one batch of what ``rule`` allows from each table.

        Deletes exactly rows the rule's predicates accept
        (:meth:`~deepwork_retry._core.retention.PruneRule.removes_idempotency`,
        ``removes_entry``, ``removes_attempt``), at most ``rule.batch`` of each
        table, each table in its own short transaction, oldest first; returns
        how many of each it removed (a count below ``rule.batch`` means that
        table has nothing more to remove). Never waits long for a row another
        transaction holds (it may skip it), never removes what a concurrent
        move still needs.
        """
        ...

    def close(self) -> None: ...


@runtime_checkable
class AsyncStorage(Protocol):
    """:class:`Storage` with every method a coroutine."""

    async def create_project(self, project: Project) -> None: ...
    async def add_tasks(self, tasks: Sequence[Task]) -> None: ...
    async def get_project(self, project_id: str) -> Project: ...
    async def load(self, project_id: str, task_id: str) -> tuple[Project, Task]: ...
    async def get_tasks(self, project_id: str, task_ids: Sequence[str]) -> dict[str, Task]: ...
    async def dependants(self, project_id: str, task_id: str) -> list[Task]: ...
    async def list_tasks(
        self,
        project_id: str,
        *,
        status: TaskStatus | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[Task]: ...
    async def progress(self, project_id: str) -> Progress: ...
    async def attempts(self, project_id: str, task_id: str) -> list[Attempt]: ...
    async def dispatches(self, project_id: str, task_id: str) -> list[DispatchEntry]: ...
    async def deferred(self, project_id: str) -> list[DispatchEntry]: ...
    async def apply(self, plan: Plan) -> Applied: ...
    async def apply_project(self, plan: ProjectPlan) -> tuple[Project, list[DispatchEntry]]: ...
    async def claim_due(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[DispatchEntry]: ...
    async def mark_delivered(self, entries: Sequence[DispatchEntry], *, now: datetime) -> None: ...
    async def mark_failed(
        self, entry: DispatchEntry, *, error: str, retry_at: datetime
    ) -> None: ...
    async def redeliver_stale(
        self, *, now: datetime, delivered_before: datetime, limit: int
    ) -> list[DispatchEntry]: ...
    async def expired_leases(self, *, now: datetime, limit: int) -> list[Task]: ...
    async def get_idempotency(
        self, key: str, *, now: datetime | None = None
    ) -> IdempotencyRecord | None: ...
    async def save_idempotency(self, record: IdempotencyRecord) -> IdempotencyRecord: ...
    async def prune(self, rule: PruneRule) -> Pruned: ...
    async def close(self) -> None: ...


@runtime_checkable
class RetryInOneStep(Protocol):
    """Optional storage capability: the manual retry loaded, decided and applied at once.

    A storage that has it saves the service's load and apply round trips:
    :meth:`~deepwork_retry.RetryService.retry` calls :meth:`retry_blocked`
    first. It must do exactly what applying
    :func:`~deepwork_retry._core.decide.manual_retry`'s plan for the current
    state does (same task, attempt record, outbox entry, progress,
    idempotency reservation; blockers that do not exist count as
    unfinished), in one transaction, and return what :meth:`Storage.apply`
    returns. When it cannot (the task is missing or not blocked, the project
    refuses retries, the key is taken, a conflict), it changes nothing and
    returns ``None``; the service then takes the load, decide and apply
    path, which raises the core's own error; it never raises a refusal
    itself. Of retries of one task, or under one key, made at once, exactly
    one applies. The conformance kit (:mod:`deepwork_retry.testing`) checks
    a storage that has this capability against the core's decide and apply
    on the in-memory storage, case by case (project and task status,
    finished, unfinished and missing blockers, budget, actor, reason, claim,
    new, taken and expired keys), and under concurrency.

    ``idempotency_expires_at`` is when the reserved key expires (by default
    :data:`~deepwork_retry._core.model.IDEMPOTENCY_PERIOD` after ``now``); a
    key whose record has expired at ``now`` is free.

    A storage that is an :class:`EventLog` writes
    :func:`~deepwork_retry._core.events.manual_retry_events` in the same
    transaction, and takes a keyword ``trace`` (the outbox entry's
    :attr:`~deepwork_retry._core.model.DispatchEntry.trace`), which the
    services pass only when telemetry made one.
    """

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
    ) -> Applied | None: ...


@runtime_checkable
class AsyncRetryInOneStep(Protocol):
    """:class:`RetryInOneStep` with a coroutine."""

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
    ) -> Applied | None: ...


@runtime_checkable
class RetryManyInOneStep(Protocol):
    """Optional storage capability: several manual retries of one project in one transaction.

    :meth:`~deepwork_retry.RetryService.bulk_retry` calls
    :meth:`retry_blocked_many` with a batch of the page's tasks, so that the
    batch costs one commit rather than one per task. Each task is retried
    exactly as :meth:`RetryInOneStep.retry_blocked` (no idempotency key) would
    retry it, and a task it would decline changes nothing and is ``None`` in
    its place (the service then takes the step-by-step path for it, which
    raises the core's own error). The answer has one item per task, in order.
    A storage error rolls the whole batch back and is raised: nothing of the
    batch is committed.
    """

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
    ) -> list[Applied | None]: ...


@runtime_checkable
class AsyncRetryManyInOneStep(Protocol):
    """:class:`RetryManyInOneStep` with a coroutine."""

    async def retry_blocked_many(
        self,
        project_id: str,
        task_ids: Sequence[str],
        *,
        now: datetime,
        actor: str | None = None,
        reason: str | None = None,
        budget: RetryBudget = RetryBudget.ONE_MORE,
        claimed_until: datetime | None = None,
    ) -> list[Applied | None]: ...


@runtime_checkable
class JoinsHostTransaction(Protocol):
    """Optional storage capability: its calls run inside a transaction that the host owns.

    A storage built on the host application's own connection (or session)
    writes the retry, its attempt record, its outbox entry and its
    idempotency record in the host's current transaction, so they commit or
    roll back with the host's own writes; it never commits or rolls back the
    host's transaction itself. A call that fails leaves the host's
    transaction usable (the storage wraps each call in a savepoint).

    The services see this capability and hand nothing to the dispatcher
    before the host commits: the delivery is registered with
    :meth:`after_commit` and the answer reports the dispatch ``pending``
    (``dispatched`` when the callback ran at once, no host transaction being
    open).
    If the host rolls back, nothing of the retry remains and nothing is
    dispatched; the delivery's bookkeeping runs afterwards in a short
    transaction of the storage's own.
    """

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the host's current transaction commits, and never
        if it rolls back; at once when no host transaction is open."""
        ...


@runtime_checkable
class AsyncJoinsHostTransaction(Protocol):
    """:class:`JoinsHostTransaction` for an :class:`AsyncStorage`."""

    def after_commit(self, callback: Callable[[], Awaitable[None]]) -> None:
        """As :meth:`JoinsHostTransaction.after_commit`; the storage schedules the
        coroutine on the running loop (it is not awaited by the caller)."""
        ...


@runtime_checkable
class EventLog(Protocol):
    """Storage capability: the durable lifecycle events (every shipped storage has it).

    A storage that has it writes :func:`~deepwork_retry._core.events.events_of`
    of every plan it applies (and
    :func:`~deepwork_retry._core.events.manual_retry_events` of every one-step
    retry, :func:`~deepwork_retry._core.events.added` of every task added,
    :func:`~deepwork_retry._core.events.dispatch_failed` of every
    :meth:`Storage.mark_failed`) in the same transaction, numbered per
    project from 1 in commit order without gaps. A stored event is
    ``pending`` until :meth:`settle_events`; a subscriber's failed delivery
    is kept as an :class:`~deepwork_retry._core.events.EventRetry`.
    The conformance kit (:mod:`deepwork_retry.testing`) checks all of this.
    """

    def events(self, project_id: str, *, after: int = 0, limit: int = 100) -> list[Event]:
        """The project's events with ``seq > after``, in order, at most ``limit``
        (``ProjectNotFound`` for an unknown project; ``after`` must be >= 0)."""
        ...

    def claim_events(self, *, now: datetime, limit: int, claimed_until: datetime) -> list[Event]:
        """Claim up to ``limit`` pending events not claimed (or whose claim expired
        at ``now``), ordered by ``(project_id, seq)``; an event is claimed only
        when no earlier event of its task is pending and claimed by another
        caller, so each task's events are delivered in order. Two concurrent
        callers never receive the same event."""
        ...

    def settle_events(
        self, events: Sequence[Event], *, now: datetime, failures: Sequence[EventRetry] = ()
    ) -> None:
        """Mark ``events`` delivered and keep ``failures`` (each a subscriber's failed
        delivery of one of them) in one transaction."""
        ...

    def claim_event_retries(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[EventRetry]:
        """Claim up to ``limit`` failed deliveries due at ``now``, not parked, not
        claimed, earliest ``retry_at`` first."""
        ...

    def settle_event_retry(
        self,
        retry: EventRetry,
        *,
        now: datetime,
        error: str | None = None,
        retry_at: datetime | None = None,
    ) -> None:
        """The retried delivery's outcome: ``error`` ``None``: delivered (forgotten);
        with ``retry_at``: ``tries`` + 1, due then; without: ``tries`` + 1, parked."""
        ...

    def parked_events(self, *, subscriber: str | None = None, limit: int = 100) -> list[EventRetry]:
        """Parked deliveries (of ``subscriber``, or all), oldest event first."""
        ...

    def replay_parked(
        self,
        *,
        now: datetime,
        subscriber: str | None = None,
        event_ids: Sequence[str] | None = None,
    ) -> int:
        """Turn parked deliveries (of ``subscriber``; of ``event_ids`` only, when
        given) back to due at ``now`` with ``tries`` 0; returns how many."""
        ...


@runtime_checkable
class AsyncEventLog(Protocol):
    """:class:`EventLog` with every method a coroutine."""

    async def events(self, project_id: str, *, after: int = 0, limit: int = 100) -> list[Event]: ...
    async def claim_events(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[Event]: ...
    async def settle_events(
        self, events: Sequence[Event], *, now: datetime, failures: Sequence[EventRetry] = ()
    ) -> None: ...
    async def claim_event_retries(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[EventRetry]: ...
    async def settle_event_retry(
        self,
        retry: EventRetry,
        *,
        now: datetime,
        error: str | None = None,
        retry_at: datetime | None = None,
    ) -> None: ...
    async def parked_events(
        self, *, subscriber: str | None = None, limit: int = 100
    ) -> list[EventRetry]: ...
    async def replay_parked(
        self,
        *,
        now: datetime,
        subscriber: str | None = None,
        event_ids: Sequence[str] | None = None,
    ) -> int: ...


@runtime_checkable
class ProjectOverview(Protocol):
    """Storage capability: reads across projects, for an operator's overview (every
    shipped storage has it).

    Both reads are pages in a fixed order with a cursor (``after``): pages read
    one after another, each from the last one's end, give every row once, none
    twice, nothing skipped, even when rows of other projects change meanwhile
    (a row that changes is in the page read after the change or not, never
    twice). Ids are compared as Python compares strings (by code point), in
    every storage. ``projects``, when given, keeps only those project ids
    (``None``: every project; an empty set: nothing; ids of no project are
    ignored). Every ``limit`` must be an integer from 1 to 1000, else
    :class:`~deepwork_retry.exceptions.InvalidInput`, like the cursors and
    filters (:func:`~deepwork_retry._core.inputs.check_id` for each id).
    A page is served by the storage's indexes: its cost grows with the page
    and the projects it spans, not with all the tasks stored. The services
    raise :class:`~deepwork_retry.exceptions.OverviewNotKept` for a storage
    without this capability. The conformance kit (:mod:`deepwork_retry.testing`)
    checks all of this.
    """

    def list_projects(
        self, *, projects: frozenset[str] | None = None, after: str | None = None, limit: int = 100
    ) -> list[ProjectSummary]:
        """Projects ordered by id with ``id > after``, at most ``limit``; ``projects``,
        when given, keeps only those ids (``None``: every project). Each comes with
        its progress, the same as :meth:`Storage.progress` would read, in the same
        read (one statement where the storage allows)."""
        ...

    def blocked_tasks(
        self,
        *,
        projects: frozenset[str] | None = None,
        error_type: str | None = None,
        after: tuple[str, str] | None = None,
        limit: int = 100,
    ) -> list[Task]:
        """Blocked tasks across projects ordered by ``(project_id, id)``, those after
        ``after`` (a ``(project_id, task_id)`` pair), at most ``limit``; ``projects``
        keeps only those projects (``None``: all; an empty set: nothing);
        ``error_type`` keeps only tasks whose ``error_type`` equals it exactly
        (case and all)."""
        ...


@runtime_checkable
class AsyncProjectOverview(Protocol):
    """:class:`ProjectOverview` with every method a coroutine."""

    async def list_projects(
        self, *, projects: frozenset[str] | None = None, after: str | None = None, limit: int = 100
    ) -> list[ProjectSummary]: ...

    async def blocked_tasks(
        self,
        *,
        projects: frozenset[str] | None = None,
        error_type: str | None = None,
        after: tuple[str, str] | None = None,
        limit: int = 100,
    ) -> list[Task]: ...


OVERVIEW_METHODS = ("list_projects", "blocked_tasks")
"""The methods of :class:`ProjectOverview` (a storage has the capability when it has both)."""


@runtime_checkable
class Dispatcher(Protocol):
    """Hands an attempt to whatever executes it.

    Returning means the executor side accepted it (delivery); raising means it
    did not, and the outbox keeps the entry pending for the relay.
    """

    def dispatch(self, entry: DispatchEntry) -> None: ...


@runtime_checkable
class AsyncDispatcher(Protocol):
    async def dispatch(self, entry: DispatchEntry) -> None: ...
