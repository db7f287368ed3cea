"""The services: load -> decide (core) -> apply (storage) -> dispatch.

This file is the hand-written source; ``deepwork_retry/_sync/services.py`` is
generated from it by ``scripts/unasync.py``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, cast

import deepwork_retry._trace as _trace
from deepwork_retry._async._compat import ASYNCHRONOUS, Event, let_scheduled_run, wait_or_stop
from deepwork_retry._core import decide
from deepwork_retry._core.inputs import (
    MAX_ID_LENGTH,
    check_after_id,
    check_blocked_after,
    check_error_type,
    check_id,
    check_limit,
    check_projects,
)
from deepwork_retry._core.machine import RetryCheck, can_retry
from deepwork_retry._core.model import (
    Attempt,
    DispatchEntry,
    IdempotencyRecord,
    Progress,
    Project,
    ProjectSummary,
    Task,
)
from deepwork_retry._core.plans import Applied, Plan
from deepwork_retry._core.policy import ExponentialBackoff, RandomSource, RetryPolicy, TaskError
from deepwork_retry._core.results import (
    INTERRUPTED,
    OUT_OF_TIME,
    STORAGE_STOPPED,
    BulkItem,
    BulkResult,
    ChangeResult,
    DispatchOutcome,
    DispatchStatus,
    RetryResult,
    bulk_outcome,
)
from deepwork_retry._core.retention import PRUNE_BATCH, Pruned, Retention
from deepwork_retry._core.states import ProjectStatus, RetryBudget, TaskStatus
from deepwork_retry._log import emit
from deepwork_retry._wiring import check_kind, check_parts
from deepwork_retry.exceptions import (
    DeepworkError,
    InvalidInput,
    OverviewNotKept,
    ProjectNotFound,
    StorageError,
    TaskNotFound,
    VersionConflict,
)
from deepwork_retry.ports import (
    OVERVIEW_METHODS,
    AsyncDispatcher,
    AsyncEventLog,
    AsyncJoinsHostTransaction,
    AsyncProjectOverview,
    AsyncRetryInOneStep,
    AsyncRetryManyInOneStep,
    AsyncStorage,
    Clock,
    SystemClock,
)

log = logging.getLogger("deepwork_retry")

_Build = Callable[[Project, Task, datetime], Awaitable[Plan]]

BULK_TIME_BUDGET = 10.0
"""Seconds a bulk retry may spend starting retries (see ``RetryService.bulk_retry``)."""

BULK_BATCH = 100
"""Tasks a bulk retry commits together on a storage that retries several in one transaction
(:class:`~deepwork_retry.ports.RetryManyInOneStep`): the write lock is held for one batch."""


class _BulkStopped(Exception):
    """A bulk retry's batch stopped by ``error``, after finishing ``items``."""

    def __init__(self, items: list[BulkItem], error: BaseException) -> None:
        super().__init__(str(error))
        self.items = items
        self.error = error


REDELIVERY = ExponentialBackoff(wait_initial=1.0, wait_max=60.0, wait_jitter=1.0)
"""Backoff between deliveries of an outbox entry whose dispatcher failed."""


def _plain_id(value: object) -> bool:
    """A short ASCII id without NUL: valid everywhere, known without the full checks."""
    return (
        value.__class__ is str
        and 0 < len(value) <= MAX_ID_LENGTH
        and value.isascii()
        and "\x00" not in value
    )


def _lookup_ids(project_id: str, task_id: str | None = None) -> None:
    """Ids that no storage could hold are "not found" without a round trip."""
    if _plain_id(project_id) and (task_id is None or _plain_id(task_id)):
        return
    try:
        check_id("project", project_id)
        project_id.encode("utf-8")
    except (InvalidInput, UnicodeEncodeError, AttributeError):
        raise ProjectNotFound(str(project_id)[:255]) from None
    if task_id is not None:
        try:
            check_id("task", task_id)
            task_id.encode("utf-8")
        except (InvalidInput, UnicodeEncodeError, AttributeError):
            raise TaskNotFound(project_id, str(task_id)[:255]) from None


def _outcome(
    results: Mapping[tuple[str, int], str | None], task_id: str, attempt: int
) -> DispatchOutcome:
    """Delivered (no error) is dispatched; failed (error) or not tried is pending."""
    if (task_id, attempt) in results and results[(task_id, attempt)] is None:
        return DispatchOutcome(status="dispatched", task_id=task_id, attempt=attempt)
    error = results.get((task_id, attempt))
    return DispatchOutcome(status="pending", task_id=task_id, attempt=attempt, error=error)


class _AsyncShell:
    """What both services share: the commit loop and the delivery step."""

    def __init__(
        self,
        storage: AsyncStorage,
        dispatcher: AsyncDispatcher | None = None,
        *,
        policy: RetryPolicy | None = None,
        clock: Clock | None = None,
        rng: RandomSource | None = None,
        claim_timeout: float = 30.0,
        max_conflicts: int = 64,
        retention: Retention | None = None,
    ) -> None:
        check_parts(type(self).__name__, storage, dispatcher, asynchronous=ASYNCHRONOUS)
        self.storage = storage
        self.retention = retention or Retention()
        """Gives new idempotency keys their life (``retention.idempotency``)."""
        self.dispatcher = dispatcher
        self.policy = policy or RetryPolicy()
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self.claim_timeout = claim_timeout
        self.max_conflicts = max_conflicts
        self._one_step: tuple[object, AsyncRetryInOneStep | None] = (None, None)
        self._joined: tuple[object, AsyncJoinsHostTransaction | None] = (None, None)
        self._source = "request"
        """Who delivers here, for telemetry: ``request`` (a service) or ``relay``."""

    def _one_step_storage(self) -> AsyncRetryInOneStep | None:
        """``storage`` when it retries in one step; the (slow) protocol check runs once."""
        seen, capable = self._one_step
        if seen is not self.storage:
            storage = self.storage
            capable = storage if isinstance(storage, AsyncRetryInOneStep) else None
            self._one_step = (storage, capable)
        return capable

    def _host_transaction(self) -> AsyncJoinsHostTransaction | None:
        """``storage`` when it joins the host's transaction; the protocol check runs once."""
        seen, joined = self._joined
        if seen is not self.storage:
            storage = self.storage
            joined = storage if isinstance(storage, AsyncJoinsHostTransaction) else None
            self._joined = (storage, joined)
        return joined

    def _claim(self, now: datetime) -> datetime | None:
        # Without a dispatcher nothing is delivered here: leave entries unclaimed
        # so a relay takes them at once.
        if self.dispatcher is None:
            return None
        return now + timedelta(seconds=self.claim_timeout)

    async def _commit(self, project_id: str, task_id: str, build: _Build) -> tuple[Plan, Applied]:
        """Load, decide and apply, deciding afresh after each lost race."""
        _lookup_ids(project_id, task_id)
        telemetry = _trace.current
        if telemetry is not None:
            return await self._commit_traced(telemetry, project_id, task_id, build)
        conflict: VersionConflict | None = None
        for _ in range(self.max_conflicts):
            project, task = await self.storage.load(project_id, task_id)
            plan = await build(project, task, self.clock.now())
            try:
                return plan, await self.storage.apply(plan)
            except VersionConflict as exc:
                conflict = exc
        assert conflict is not None
        raise conflict

    async def _commit_traced(
        self, telemetry: _trace.Hooks, project_id: str, task_id: str, build: _Build
    ) -> tuple[Plan, Applied]:
        """:meth:`_commit` in a span; the plan's outbox entry carries its trace context."""
        with telemetry.commit(project_id, task_id) as span:
            conflict: VersionConflict | None = None
            for _ in range(self.max_conflicts):
                with telemetry.storage("load"):
                    project, task = await self.storage.load(project_id, task_id)
                plan = span.stamped(await build(project, task, self.clock.now()))
                try:
                    with telemetry.storage("apply"):
                        applied = await self.storage.apply(plan)
                except VersionConflict as exc:
                    conflict = exc
                    continue
                span.committed(plan, applied)
                return plan, applied
            assert conflict is not None
            raise conflict

    async def _deliver(self, entries: Sequence[DispatchEntry]) -> dict[tuple[str, int], str | None]:
        """Hand claimed entries to the dispatcher; ``(task, attempt) -> error or None``.

        Never raises: it runs after a commit, which nothing here may make look
        undone. An entry whose delivery failed, or whose outcome could not be
        recorded, stays in the outbox, and a relay delivers it once its claim
        lapses; an entry missing from the result was not handed over here.
        """
        results: dict[tuple[str, int], str | None] = {}
        if self.dispatcher is None or not entries:
            return results
        try:
            await self._hand_over(self.dispatcher, entries, results)
        except Exception:  # noqa: BLE001 - logged; after a commit, whatever fails leaves the work to the relay
            # The fields name the entry when there is one, the project when all share it.
            about = entries[0] if len(entries) == 1 else None
            projects = {entry.project_id for entry in entries}
            emit(
                log, logging.ERROR, "deepwork.post_commit_failed",
                "delivery after a commit failed; the outbox relay delivers what is left",
                about=about, project_id=projects.pop() if len(projects) == 1 else None,
                exc_info=True,
            )  # fmt: skip
        return results

    async def _deliver_committed(
        self, entries: Sequence[DispatchEntry]
    ) -> dict[tuple[str, int], str | None]:
        """:meth:`_deliver` once what made ``entries`` pending has committed.

        On a storage that joins the host's transaction the commit is the
        host's, still to come: the delivery is registered with the storage's
        ``after_commit`` (so it never happens if the host rolls back), and
        the entries report pending unless it ran at once (no host
        transaction was open). Otherwise the storage has committed already
        and the entries are delivered at once.
        """
        joined = self._host_transaction()
        if joined is None or self.dispatcher is None or not entries:
            return await self._deliver(entries)
        claimed = tuple(entries)
        results: dict[tuple[str, int], str | None] = {}

        async def deliver() -> None:
            results.update(await self._deliver(claimed))

        joined.after_commit(deliver)
        return dict(results)

    async def _hand_over(
        self,
        dispatcher: AsyncDispatcher,
        entries: Sequence[DispatchEntry],
        results: dict[tuple[str, int], str | None],
    ) -> None:
        delivered: list[DispatchEntry] = []
        now = self.clock.now()
        for entry in entries:
            if entry.available_at > now:
                # A released entry still inside its backoff: the relay takes it
                # once both the backoff and this claim have passed.
                continue
            telemetry = _trace.current
            try:
                if telemetry is None:
                    await dispatcher.dispatch(entry)
                else:
                    with telemetry.dispatch(entry, self._source) as carried:
                        await dispatcher.dispatch(carried)
            except Exception as exc:  # noqa: BLE001 - any dispatcher failure leaves the entry pending
                error = f"{type(exc).__name__}: {exc}"
                if telemetry is not None:
                    telemetry.dispatch_failed(entry, self._source)
                emit(
                    log, logging.WARNING, "deepwork.dispatch_failed",
                    "dispatch of %s failed, it stays pending: %s", entry.key, error, about=entry,
                )  # fmt: skip
                results[(entry.task_id, entry.attempt)] = error
                retry_at = self.clock.now() + timedelta(
                    seconds=REDELIVERY.delay(entry.tries + 1, self.rng)
                )
                try:
                    if isinstance(
                        self.storage, AsyncEventLog
                    ):  # it records the failure as an event
                        recorder: Any = self.storage  # the port's mark_failed has no ``now``
                        await recorder.mark_failed(
                            entry, error=error, retry_at=retry_at, now=self.clock.now()
                        )
                    else:
                        await self.storage.mark_failed(entry, error=error, retry_at=retry_at)
                except Exception:  # noqa: BLE001 - logged; the entry stays claimed, then a relay takes it
                    emit(
                        log, logging.WARNING, "deepwork.dispatch_failure_unrecorded",
                        "could not record failed delivery of %s", entry.key,
                        about=entry, exc_info=True,
                    )  # fmt: skip
            else:
                results[(entry.task_id, entry.attempt)] = None
                delivered.append(entry)
                emit(
                    log, logging.DEBUG, "deepwork.delivered", "delivered %s", entry.key, about=entry
                )
        if delivered:
            delivered_at = self.clock.now()
            telemetry = _trace.current
            if telemetry is not None:
                telemetry.delivered(delivered, self._source, delivered_at)
            # Work the dispatcher scheduled on this loop (an AsyncioDispatcher's
            # tasks) starts before the delivery is recorded, rather than after the
            # recording's first wait, behind the storage's own thread.
            await let_scheduled_run()
            try:
                await self.storage.mark_delivered(delivered, now=delivered_at)
            except Exception:  # noqa: BLE001 - logged with its traceback
                # The entries stay claimed; once the claim lapses a relay delivers
                # them again under the same (task, attempt) key, which executors
                # deduplicate with the fencing token.
                # One record per entry, so that each can be found by its ids;
                # the traceback comes with the first.
                for n, entry in enumerate(delivered, 1):
                    emit(
                        log, logging.WARNING, "deepwork.delivery_unrecorded",
                        "could not record delivery of %s (%d of %d)", entry.key, n, len(delivered),
                        about=entry, exc_info=n == 1,
                    )  # fmt: skip

    async def _dispatch_outcomes(self, plan: Plan, applied: Applied) -> tuple[DispatchOutcome, ...]:
        """Deliver what ``applied`` made pending; the plan's own dispatch comes first."""
        own = plan.dispatch
        if not applied.dispatches:  # nothing to deliver: only the plan's own entry to report
            if own is None:
                return ()
            status0: DispatchStatus = "deferred" if applied.deferred else "pending"
            return (DispatchOutcome(status=status0, task_id=own.task_id, attempt=own.attempt),)
        results = await self._deliver_committed(applied.dispatches)
        outcomes = [_outcome(results, e.task_id, e.attempt) for e in applied.dispatches]
        listed = {(e.task_id, e.attempt) for e in applied.dispatches}
        if own is not None and (own.task_id, own.attempt) not in listed:
            status: DispatchStatus = "deferred" if applied.deferred else "pending"
            outcomes.insert(
                0, DispatchOutcome(status=status, task_id=own.task_id, attempt=own.attempt)
            )
        return tuple(outcomes)

    async def _blockers(self, project_id: str, task: Task) -> dict[str, Task]:
        if not task.blocked_by:
            return {}
        return await self.storage.get_tasks(project_id, task.blocked_by)

    async def _dependants(
        self, project_id: str, task_id: str
    ) -> tuple[list[Task], dict[str, Task]]:
        dependants = await self.storage.dependants(project_id, task_id)
        ids = sorted({b for d in dependants for b in d.blocked_by if b != task_id})
        blockers = await self.storage.get_tasks(project_id, ids) if ids else {}
        return dependants, blockers


class AsyncRetryService(_AsyncShell):
    """Manual retries and the reads a person or a UI needs around them."""

    async def retry(
        self,
        project_id: str,
        task_id: str,
        *,
        actor: str | None = None,
        reason: str | None = None,
        budget: RetryBudget | str = RetryBudget.ONE_MORE,
        idempotency_key: str | None = None,
    ) -> RetryResult:
        """Retry a blocked task: ``blocked -> assigned``, ``retry_count + 1``, error cleared.

        Raises ``ProjectNotFound``, ``TaskNotFound``, ``TaskNotBlocked`` (with
        the status found), ``ProjectNotRunnable``, ``IdempotencyConflict``.
        """
        if budget.__class__ is not RetryBudget:
            try:
                budget = RetryBudget(budget)
            except ValueError:
                raise InvalidInput("budget must be 'one_more' or 'full'") from None
        one_step = self._one_step_storage()
        if one_step is not None:
            done = await self._retry_in_one_step(
                one_step, project_id, task_id, actor, reason, budget, idempotency_key
            )
            if done is not None:
                return done

        async def build(project: Project, task: Task, now: datetime) -> Plan:
            return decide.manual_retry(
                task,
                project,
                now=now,
                blockers=await self._blockers(project_id, task),
                actor=actor,
                reason=reason,
                budget=budget,
                claimed_until=self._claim(now),
                idempotency_key=idempotency_key,
                idempotency_expires_at=self.retention.expires_at(now),
            )

        plan, applied = await self._commit(project_id, task_id, build)
        outcomes = await self._dispatch_outcomes(plan, applied)
        return RetryResult(
            task=applied.task,
            progress=applied.progress,
            dispatch=outcomes[0],
            idempotency=plan.idempotency,
        )

    async def _retry_in_one_step(
        self,
        storage: AsyncRetryInOneStep,
        project_id: str,
        task_id: str,
        actor: str | None,
        reason: str | None,
        budget: RetryBudget,
        idempotency_key: str | None,
    ) -> RetryResult | None:
        """The retry by a storage that decides it in one step; ``None`` if it changed nothing.

        The storage renders :func:`decide.manual_retry` into its own statement
        (see :class:`~deepwork_retry.ports.RetryInOneStep`); whenever it
        declines, the caller's load, decide and apply path runs and raises
        the core's own error.
        """
        _lookup_ids(project_id, task_id)
        now = self.clock.now()
        expires_at = self.retention.expires_at(now)
        telemetry = _trace.current
        if telemetry is None:
            applied = await storage.retry_blocked(
                project_id, task_id, now=now, actor=actor, reason=reason, budget=budget,
                claimed_until=self._claim(now), idempotency_key=idempotency_key,
                idempotency_expires_at=None if idempotency_key is None else expires_at,
            )  # fmt: skip
        else:
            with telemetry.commit(project_id, task_id) as span:
                trace = span.trace()
                # Only when there is one: a storage that predates ``trace`` takes no such keyword.
                carried: dict[str, Any] = {} if trace is None else {"trace": trace}
                with telemetry.storage("retry_blocked"):
                    applied = await storage.retry_blocked(
                        project_id, task_id, now=now, actor=actor, reason=reason, budget=budget,
                        claimed_until=self._claim(now), idempotency_key=idempotency_key,
                        idempotency_expires_at=None if idempotency_key is None else expires_at,
                        **carried,
                    )  # fmt: skip
                if applied is not None:
                    span.committed(None, applied)
        if applied is None:
            return None
        results = await self._deliver_committed(applied.dispatches)
        attempt = applied.task.attempt
        if (task_id, attempt) in results:
            dispatch = _outcome(results, task_id, attempt)
        else:
            status: DispatchStatus = "deferred" if applied.deferred else "pending"
            dispatch = DispatchOutcome(status=status, task_id=task_id, attempt=attempt)
        idempotency = (
            None
            if idempotency_key is None
            else IdempotencyRecord(
                key=idempotency_key,
                project_id=project_id,
                task_id=task_id,
                created_at=now,
                expires_at=expires_at,
            )
        )
        return RetryResult(
            task=applied.task, progress=applied.progress, dispatch=dispatch, idempotency=idempotency
        )

    async def can_retry(self, project_id: str, task_id: str) -> RetryCheck:
        """Whether :meth:`retry` would be accepted now, and if not why."""
        _lookup_ids(project_id, task_id)
        project, task = await self.storage.load(project_id, task_id)
        return can_retry(task, project)

    async def bulk_retry(
        self,
        project_id: str,
        *,
        dry_run: bool = False,
        actor: str | None = None,
        reason: str | None = None,
        budget: RetryBudget | str = RetryBudget.ONE_MORE,
        after: str | None = None,
        limit: int = 100,
        time_budget: float = BULK_TIME_BUDGET,
    ) -> BulkResult:
        """Retry (or with ``dry_run`` check) one page of the project's blocked tasks.

        Each task is retried in its own transaction, in id order, and a task a
        rule refuses (it is no longer blocked, ...) is reported and passed. On a
        storage that retries several tasks in one transaction
        (:class:`~deepwork_retry.ports.AsyncRetryManyInOneStep`), the tasks are
        committed in batches of :data:`BULK_BATCH` instead, each decided as
        :meth:`retry` decides it. The request has one deadline: no task (no
        batch) is started once ``time_budget`` seconds have passed. A storage
        error ends it at once: raised when no task was retried (so nothing
        changed), otherwise the result keeps the tasks retried and lists the
        rest as not attempted
        (:func:`~deepwork_retry._core.results.bulk_outcome`).
        """
        project = await self.get_project(project_id)
        tasks = await self.storage.list_tasks(
            project_id, status=TaskStatus.BLOCKED, after=after, limit=limit
        )
        if dry_run:
            checks = [(task, can_retry(task, project)) for task in tasks]
            items = [BulkItem(task_id=t.id, retried=c.allowed, detail=c.reason) for t, c in checks]
            return bulk_outcome(True, items, tasks, limit=limit)
        deadline = time.monotonic() + time_budget
        done: list[BulkItem] = []
        many = self._many_storage()
        chosen: RetryBudget | None = None
        if many is not None:
            try:
                chosen = RetryBudget(budget)
            except ValueError:
                many = None  # each task is refused as retry refuses it
        batch = BULK_BATCH if many is not None else 1
        for start in range(0, len(tasks), batch):
            if done and time.monotonic() >= deadline:  # the first task is always attempted
                return bulk_outcome(False, done, tasks, limit=limit, stop=OUT_OF_TIME)
            page = tasks[start : start + batch]
            try:
                if many is None or chosen is None:
                    items = [await self._bulk_one(project_id, page[0], actor, reason, budget)]
                else:
                    items = await self._bulk_many(many, project_id, page, actor, reason, chosen)
            except _BulkStopped as stopped:
                done.extend(stopped.items)
                task = page[len(stopped.items)]
                if not any(item.retried for item in done):
                    raise stopped.error from None  # nothing committed: the request failed
                if isinstance(stopped.error, StorageError):
                    emit(
                        log, logging.WARNING, "deepwork.bulk_retry_stopped",
                        "bulk retry of %s stopped by the storage", project_id,
                        project_id=project_id, task_id=task.id, exc_info=stopped.error,
                    )  # fmt: skip
                    return bulk_outcome(False, done, tasks, limit=limit, stop=STORAGE_STOPPED)
                # Retries are committed: the page ends here, and the caller
                # continues from the task that failed.
                emit(
                    log, logging.ERROR, "deepwork.bulk_retry_stopped",
                    "bulk retry of %s stopped at %s", project_id, task.id,
                    project_id=project_id, task_id=task.id, exc_info=stopped.error,
                )  # fmt: skip
                return bulk_outcome(False, done, tasks, limit=limit, stop=INTERRUPTED)
            done.extend(items)
        return bulk_outcome(False, done, tasks, limit=limit)

    async def _bulk_one(
        self,
        project_id: str,
        task: Task,
        actor: str | None,
        reason: str | None,
        budget: RetryBudget | str,
    ) -> BulkItem:
        """One task of a bulk retry by :meth:`retry`: retried, or refused by a rule;
        :class:`_BulkStopped` (nothing finished) on any other error."""
        try:
            result = await self.retry(
                project_id, task.id, actor=actor, reason=reason, budget=budget
            )
        except DeepworkError as exc:
            if isinstance(exc, StorageError):
                raise _BulkStopped([], exc) from exc
            return BulkItem(task_id=task.id, retried=False, detail=exc.detail)
        except Exception as exc:
            raise _BulkStopped([], exc) from exc
        return BulkItem(task_id=task.id, retried=True, dispatch=result.dispatch.status)

    async def _bulk_many(
        self,
        storage: AsyncRetryManyInOneStep,
        project_id: str,
        tasks: Sequence[Task],
        actor: str | None,
        reason: str | None,
        budget: RetryBudget,
    ) -> list[BulkItem]:
        """A batch of a bulk retry in one transaction of the storage; a task it declines
        goes the way of :meth:`retry` (which raises the core's own error). On an error,
        :class:`_BulkStopped` with the tasks finished before it (none of the batch's
        own when the batch's transaction failed)."""
        now = self.clock.now()
        try:
            applied = await storage.retry_blocked_many(
                project_id, [task.id for task in tasks], now=now, actor=actor, reason=reason,
                budget=budget, claimed_until=self._claim(now),
            )  # fmt: skip
        except Exception as exc:
            raise _BulkStopped([], exc) from exc
        entries = [entry for one in applied if one is not None for entry in one.dispatches]
        results = await self._deliver_committed(entries)
        items: list[BulkItem] = []
        for task, one in zip(tasks, applied, strict=True):
            if one is None:
                try:
                    items.append(await self._bulk_one(project_id, task, actor, reason, budget))
                except _BulkStopped as stopped:
                    raise _BulkStopped(items, stopped.error) from stopped.error
                continue
            attempt = one.task.attempt
            if (task.id, attempt) in results:
                status = _outcome(results, task.id, attempt).status
            else:
                status = "deferred" if one.deferred else "pending"
            items.append(BulkItem(task_id=task.id, retried=True, dispatch=status))
        return items

    def _many_storage(self) -> AsyncRetryManyInOneStep | None:
        """``storage`` when a bulk retry can commit several retries together there: it
        retries several in one step, no telemetry wants a span per retry, and it does
        not join a host's transaction."""
        storage = self.storage
        if (
            _trace.current is not None
            or self._host_transaction() is not None
            or not isinstance(storage, AsyncRetryManyInOneStep)
        ):
            return None
        return storage

    # -- reads -------------------------------------------------------------
    async def get_project(self, project_id: str) -> Project:
        _lookup_ids(project_id)
        return await self.storage.get_project(project_id)

    async def get_task(self, project_id: str, task_id: str) -> Task:
        _lookup_ids(project_id, task_id)
        _, task = await self.storage.load(project_id, task_id)
        return task

    async def attempts(self, project_id: str, task_id: str) -> list[Attempt]:
        _lookup_ids(project_id, task_id)
        await self.storage.load(project_id, task_id)
        return await self.storage.attempts(project_id, task_id)

    async def progress(self, project_id: str) -> Progress:
        _lookup_ids(project_id)
        return await self.storage.progress(project_id)

    async def blocked(
        self, project_id: str, *, after: str | None = None, limit: int = 50
    ) -> tuple[list[Task], str | None]:
        """One page of blocked tasks and the ``after`` for the next page."""
        await self.get_project(project_id)
        tasks = await self.storage.list_tasks(
            project_id, status=TaskStatus.BLOCKED, after=after, limit=limit
        )
        return tasks, (tasks[-1].id if len(tasks) == limit else None)

    # -- reads across projects ----------------------------------------------------------
    def _overview(self) -> AsyncProjectOverview:
        """``storage`` as a :class:`~deepwork_retry.ports.AsyncProjectOverview`, found by the
        methods ``getattr`` finds (so a forwarding proxy keeps it on every Python), else
        :class:`~deepwork_retry.exceptions.OverviewNotKept`."""
        storage = self.storage
        if not all(callable(getattr(storage, name, None)) for name in OVERVIEW_METHODS):
            raise OverviewNotKept(type(storage).__name__)
        return cast(AsyncProjectOverview, storage)

    async def projects(
        self,
        *,
        scope: frozenset[str] | None = None,
        after: str | None = None,
        limit: int = 50,
    ) -> tuple[list[ProjectSummary], str | None]:
        """One page of projects (ordered by id) with their progress, and the ``after`` of
        the next page (``None`` after the last).

        ``scope`` is the set of projects the caller may see (``None``: every
        project). Raises :class:`~deepwork_retry.exceptions.OverviewNotKept` when
        the storage has no reads across projects.
        """
        scope = check_projects(scope)
        after = check_after_id("project", after)
        check_limit(limit)
        found = await self._overview().list_projects(projects=scope, after=after, limit=limit)
        return found, (found[-1].project.id if len(found) == limit else None)

    async def blocked_across(
        self,
        *,
        scope: frozenset[str] | None = None,
        project_id: str | None = None,
        error_type: str | None = None,
        after: tuple[str, str] | None = None,
        limit: int = 50,
    ) -> tuple[list[Task], tuple[str, str] | None]:
        """One page of blocked tasks across projects, ordered by ``(project_id, id)``, and
        the ``after`` of the next page (``None`` after the last).

        ``scope`` is the set of projects the caller may see (``None``: every
        project); ``project_id`` narrows the page to that one project (one outside
        ``scope`` gives an empty page, as an unknown one does: never an error that
        would tell whether it exists); ``error_type`` keeps the tasks whose
        ``error_type`` equals it exactly. Raises
        :class:`~deepwork_retry.exceptions.OverviewNotKept` when the storage has no
        reads across projects.
        """
        scope = check_projects(scope)
        if project_id is not None:
            only = frozenset((check_id("project", project_id),))
            scope = only if scope is None else scope & only
        error_type = check_error_type(error_type)
        after = check_blocked_after(after)
        check_limit(limit)
        overview = self._overview()
        if scope is not None and not scope:
            return [], None
        tasks = await overview.blocked_tasks(
            projects=scope, error_type=error_type, after=after, limit=limit
        )
        last = (tasks[-1].project_id, tasks[-1].id) if len(tasks) == limit else None
        return tasks, last


class AsyncExecutorService(_AsyncShell):
    """Creating work and the executor's reports: assign, start, heartbeat, succeed, fail."""

    async def create_project(
        self,
        project_id: str,
        *,
        status: ProjectStatus | str = ProjectStatus.EXECUTING,
        name: str = "",
    ) -> Project:
        check_id("project", project_id)
        now = self.clock.now()
        project = Project(
            id=project_id, status=ProjectStatus(status), name=name, created_at=now, updated_at=now
        )
        await self.storage.create_project(project)
        return project

    async def add_task(
        self,
        project_id: str,
        task_id: str,
        *,
        title: str = "",
        max_retries: int = 3,
        blocked_by: Sequence[str] = (),
        metadata: Mapping[str, object] | None = None,
    ) -> Task:
        now = self.clock.now()
        task = Task(
            id=task_id,
            project_id=project_id,
            title=title,
            max_retries=max_retries,
            blocked_by=tuple(blocked_by),
            metadata=dict(metadata or {}),
            created_at=now,
            updated_at=now,
        )
        await self.storage.add_tasks([task])
        return task

    async def set_project_status(
        self, project_id: str, status: ProjectStatus | str
    ) -> tuple[Project, tuple[DispatchOutcome, ...]]:
        """Change the project's status; resuming releases its deferred work."""
        _lookup_ids(project_id)
        conflict: VersionConflict | None = None
        for _ in range(self.max_conflicts):
            project = await self.storage.get_project(project_id)
            deferred = await self.storage.deferred(project_id)
            ids = {e.task_id for e in deferred}
            tasks = await self.storage.get_tasks(project_id, sorted(ids)) if ids else {}
            blocker_ids = {b for t in tasks.values() for b in t.blocked_by} - set(tasks)
            if blocker_ids:
                tasks.update(await self.storage.get_tasks(project_id, sorted(blocker_ids)))
            now = self.clock.now()
            plan = decide.change_project(
                project, ProjectStatus(status), now=now, deferred=deferred, tasks=tasks,
                claimed_until=self._claim(now),
            )  # fmt: skip
            try:
                project, released = await self.storage.apply_project(plan)
            except VersionConflict as exc:
                conflict = exc
                continue
            results = await self._deliver_committed(released)
            return project, tuple(_outcome(results, e.task_id, e.attempt) for e in released)
        assert conflict is not None
        raise conflict

    async def _change(self, project_id: str, task_id: str, build: _Build) -> ChangeResult:
        plan, applied = await self._commit(project_id, task_id, build)
        return ChangeResult(
            task=applied.task,
            progress=applied.progress,
            decision=plan.decision,
            dispatches=await self._dispatch_outcomes(plan, applied),
        )

    async def assign(self, project_id: str, task_id: str) -> ChangeResult:
        """``inbox -> assigned``: create attempt 1 and dispatch it (or defer it)."""

        async def build(project: Project, task: Task, now: datetime) -> Plan:
            blockers = await self._blockers(project_id, task)
            return decide.assign(
                task, project, now=now, blockers=blockers, claimed_until=self._claim(now)
            )

        return await self._change(project_id, task_id, build)

    async def start(self, project_id: str, task_id: str, token: int) -> ChangeResult:
        """The executor begins attempt ``token``; raises ``StaleAttempt`` if it is not current."""

        async def build(project: Project, task: Task, now: datetime) -> Plan:
            return decide.start(task, token, now=now, policy=self.policy)

        return await self._change(project_id, task_id, build)

    async def heartbeat(self, project_id: str, task_id: str, token: int) -> ChangeResult:
        async def build(project: Project, task: Task, now: datetime) -> Plan:
            return decide.heartbeat(task, token, now=now, policy=self.policy)

        return await self._change(project_id, task_id, build)

    async def succeed(
        self, project_id: str, task_id: str, token: int, *, review: bool = False
    ) -> ChangeResult:
        """Attempt ``token`` succeeded; dependants that became ready are dispatched."""

        async def build(project: Project, task: Task, now: datetime) -> Plan:
            dependants, blockers = await self._dependants(project_id, task_id)
            return decide.succeed(
                task, token, project, now=now, dependants=dependants, blockers=blockers,
                review=review, claimed_until=self._claim(now),
            )  # fmt: skip

        return await self._change(project_id, task_id, build)

    async def approve(self, project_id: str, task_id: str) -> ChangeResult:
        async def build(project: Project, task: Task, now: datetime) -> Plan:
            dependants, blockers = await self._dependants(project_id, task_id)
            return decide.approve(
                task, project, now=now, dependants=dependants, blockers=blockers,
                claimed_until=self._claim(now),
            )  # fmt: skip

        return await self._change(project_id, task_id, build)

    async def skip(self, project_id: str, task_id: str) -> ChangeResult:
        async def build(project: Project, task: Task, now: datetime) -> Plan:
            dependants, blockers = await self._dependants(project_id, task_id)
            return decide.skip(
                task, project, now=now, dependants=dependants, blockers=blockers,
                claimed_until=self._claim(now),
            )  # fmt: skip

        return await self._change(project_id, task_id, build)

    async def block(self, project_id: str, task_id: str, *, message: str) -> ChangeResult:
        async def build(project: Project, task: Task, now: datetime) -> Plan:
            return decide.block(task, now=now, message=message)

        return await self._change(project_id, task_id, build)

    async def fail(
        self, project_id: str, task_id: str, token: int, error: TaskError | BaseException
    ) -> ChangeResult:
        """Attempt ``token`` failed: retried per the policy (with backoff) or blocked."""
        if isinstance(error, BaseException):
            error = TaskError.from_exception(error)
        report = error

        async def build(project: Project, task: Task, now: datetime) -> Plan:
            return decide.fail(
                task, token, report, project, now=now, rng=self.rng, policy=self.policy,
                blockers=await self._blockers(project_id, task), claimed_until=self._claim(now),
            )  # fmt: skip

        return await self._change(project_id, task_id, build)

    async def lose(self, project_id: str, task_id: str) -> ChangeResult:
        """Fail the running attempt as lost (its lease must have expired)."""

        async def build(project: Project, task: Task, now: datetime) -> Plan:
            return decide.lose(
                task, project, now=now, rng=self.rng, policy=self.policy,
                blockers=await self._blockers(project_id, task), claimed_until=self._claim(now),
            )  # fmt: skip

        return await self._change(project_id, task_id, build)

    async def reap(self, *, limit: int = 100) -> list[ChangeResult]:
        """Fail every attempt whose lease expired (at most ``limit``) and hand out
        again the dispatches delivered but never started (:meth:`redeliver`).

        Returns the attempts failed as lost.
        """
        results = []
        for task in await self.storage.expired_leases(now=self.clock.now(), limit=limit):
            try:
                lost = await self.lose(task.project_id, task.id)
            except DeepworkError:
                # It heartbeated, finished or was reaped by someone else meanwhile.
                emit(
                    log, logging.DEBUG, "deepwork.lease_no_longer_expired",
                    "lease of %s/%s no longer expired", task.project_id, task.id,
                    project_id=task.project_id, task_id=task.id, attempt=task.attempt,
                )  # fmt: skip
            else:
                results.append(lost)
                emit(
                    log, logging.WARNING, "deepwork.attempt_lost",
                    "attempt %s/%s #%d lost: its lease expired at %s",
                    task.project_id, task.id, task.attempt, task.lease_expires_at,
                    project_id=task.project_id, task_id=task.id, attempt=task.attempt,
                )  # fmt: skip
        await self.redeliver(limit=limit)
        return results

    async def redeliver(self, *, limit: int = 100) -> list[DispatchEntry]:
        """Make pending again the dispatches delivered more than ``policy.start_timeout``
        seconds ago whose attempt was never started (at most ``limit``).

        The message is presumed lost (a broker that forgot it, a worker that
        took it and died before starting); an outbox relay delivers the
        entries again, under the same attempt number, so if the first message
        turns up after all only one of the two starts is accepted. Returns the
        entries made pending; nothing when ``start_timeout`` is ``None``.
        """
        timeout = self.policy.start_timeout
        if timeout is None:
            return []
        now = self.clock.now()
        try:
            before = now - timedelta(seconds=timeout)
        except OverflowError:
            return []  # further back than any delivery
        entries = await self.storage.redeliver_stale(now=now, delivered_before=before, limit=limit)
        for entry in entries:
            emit(
                log, logging.WARNING, "deepwork.redelivered",
                "attempt %s/%s #%d not started %gs after its delivery; dispatching it again",
                entry.project_id, entry.task_id, entry.attempt, timeout, about=entry,
            )  # fmt: skip
        return entries


class AsyncOutboxRelay:
    """Delivers pending outbox entries: those whose first delivery failed or
    never happened (a crash between commit and dispatch), and delayed retries.

    Run one or more per deployment; claims keep two relays from delivering the
    same entry at once.
    """

    def __init__(
        self,
        storage: AsyncStorage,
        dispatcher: AsyncDispatcher,
        *,
        clock: Clock | None = None,
        rng: RandomSource | None = None,
        batch: int = 100,
        claim_timeout: float = 30.0,
        poll_interval: float = 1.0,
        prune_every: float | None = None,
        retention: Retention | None = None,
    ) -> None:
        check_parts(type(self).__name__, storage, dispatcher, asynchronous=ASYNCHRONOUS)
        self._shell = _AsyncShell(storage, dispatcher, clock=clock, rng=rng)
        self._shell._source = "relay"
        self.storage = storage
        self.clock = self._shell.clock
        self.batch = batch
        self.claim_timeout = claim_timeout
        self.poll_interval = poll_interval
        self.pruner = _scheduled(storage, self.clock, retention, prune_every)
        """With ``prune_every`` (seconds), prunes per ``retention`` between batches."""

    async def run_once(self) -> int:
        """Claim and deliver one batch; returns how many were delivered."""
        now = self.clock.now()
        until = now + timedelta(seconds=self.claim_timeout)
        telemetry = _trace.current
        if telemetry is None:
            entries = await self.storage.claim_due(now=now, limit=self.batch, claimed_until=until)
        else:
            with telemetry.storage("claim_due"):
                entries = await self.storage.claim_due(
                    now=now, limit=self.batch, claimed_until=until
                )
        results = await self._shell._deliver(entries)
        return sum(1 for error in results.values() if error is None)

    async def run(self, stop: Event) -> None:
        """Deliver until ``stop`` is set, polling when there is nothing to do.

        A storage with ``wait_for_work(timeout)`` (PostgreSQL's LISTEN/NOTIFY)
        wakes the relay as soon as a write leaves work for it; ``stop`` is then
        noticed at the latest after ``poll_interval``.
        """
        while not stop.is_set():
            try:
                busy = await self.run_once() > 0
            except StorageError:
                log.warning("outbox relay: storage unavailable", exc_info=True)
                busy = False
            if self.pruner is not None and await self.pruner.when_due():
                busy = True  # more to prune: come back after the next batch
            if not busy and await self._idle(stop):
                return

    async def _idle(self, stop: Event) -> bool:
        """Wait for work or ``poll_interval``; True when ``stop`` was set."""
        wait_for_work = getattr(self.storage, "wait_for_work", None)
        if wait_for_work is None:
            return await wait_or_stop(stop, self.poll_interval)
        try:
            await wait_for_work(self.poll_interval)
        except StorageError:
            log.warning("outbox relay: cannot listen for work", exc_info=True)
            return await wait_or_stop(stop, self.poll_interval)
        return stop.is_set()


class AsyncReaper:
    """Fails attempts whose executor stopped heartbeating, on an interval."""

    def __init__(
        self,
        service: AsyncExecutorService,
        *,
        interval: float = 5.0,
        prune_every: float | None = None,
        retention: Retention | None = None,
    ) -> None:
        check_kind(type(self).__name__, "service", service, "reap", asynchronous=ASYNCHRONOUS)
        self.service = service
        self.interval = interval
        self.pruner = _scheduled(service.storage, service.clock, retention, prune_every)
        """With ``prune_every`` (seconds), prunes per ``retention`` after its passes."""

    async def run_once(self) -> int:
        return len(await self.service.reap())

    async def run(self, stop: Event) -> None:
        while not stop.is_set():
            try:
                await self.run_once()
            except StorageError:
                log.warning("reaper: storage unavailable", exc_info=True)
            more = self.pruner is not None and await self.pruner.when_due()
            if await wait_or_stop(stop, 0 if more else self.interval):
                return


class AsyncPruner:
    """Removes what the retention rule allows from the tables that grow with traffic.

    See :mod:`deepwork_retry._core.retention` for the rule. :meth:`prune`
    removes in batches of ``batch`` rows per table, each its own short
    transaction, until nothing is left or ``max_batches`` rounds ran. With
    ``every`` (seconds), :meth:`when_due` prunes when that long has passed
    since the last complete prune; the relay and the reaper call it between
    their passes (their ``prune_every`` option).
    """

    def __init__(
        self,
        storage: AsyncStorage,
        retention: Retention | None = None,
        *,
        clock: Clock | None = None,
        batch: int = PRUNE_BATCH,
        every: float | None = None,
        max_batches: int | None = 20,
    ) -> None:
        if every is not None and not every > 0:
            raise InvalidInput("prune_every must be a positive number of seconds")
        if max_batches is not None and not max_batches >= 1:
            raise InvalidInput("max_batches must be at least 1, or None for no limit")
        self.storage = storage
        self.retention = retention or Retention()
        self.clock = clock or SystemClock()
        self.batch = batch
        self.every = every
        self.max_batches = max_batches
        self.retention.rule(self.clock.now(), batch=batch)  # a bad batch fails here, not later
        self._due: datetime | None = None

    async def prune(self, *, max_batches: int | None = None) -> Pruned:
        """Prune until nothing is left (or ``max_batches`` rounds); the counts per table."""
        if max_batches is not None and not max_batches >= 1:
            raise InvalidInput("max_batches must be at least 1, or None for no limit")
        total = Pruned(batches=0)
        while max_batches is None or total.batches < max_batches:
            rule = self.retention.rule(self.clock.now(), batch=self.batch)
            done = await self.storage.prune(rule)
            total += Pruned(
                idempotency=done.idempotency, outbox=done.outbox, attempts=done.attempts,
                events=done.events, batches=1, complete=not done.full(self.batch),
            )  # fmt: skip
            if total.complete:
                return total
        return total

    async def when_due(self) -> bool:
        """Prune (at most ``max_batches`` rounds) if due; True when rows may be left.

        A storage outage is logged and the prune tried again at the next period.
        """
        if self.every is None:
            return False
        now = self.clock.now()
        if self._due is not None and now < self._due:
            return False
        try:
            pruned = await self.prune(max_batches=self.max_batches)
        except StorageError:
            log.warning("prune: storage unavailable", exc_info=True)
            pruned = Pruned()
        if pruned.total:
            emit(
                log, logging.INFO, "deepwork.pruned",
                "pruned %d idempotency records, %d delivered outbox entries, %d attempt records",
                pruned.idempotency, pruned.outbox, pruned.attempts,
            )  # fmt: skip
        if pruned.complete:
            self._due = now + timedelta(seconds=self.every)
        return not pruned.complete


def _scheduled(
    storage: AsyncStorage, clock: Clock, retention: Retention | None, every: float | None
) -> AsyncPruner | None:
    if every is None:
        return None
    return AsyncPruner(storage, retention, clock=clock, every=every)
