"""A Hypothesis state machine that drives the services over a storage and a model.

:func:`storage_machine` (sync) and :func:`async_storage_machine` build a
:class:`~hypothesis.stateful.RuleBasedStateMachine` whose rules are what
happens to a project in production: tasks are created (with dependencies),
assigned, started, heartbeated, finished, failed, lost, retried by hand
(any budget, actor, reason and idempotency key), skipped and blocked; the
project is paused and resumed; executors send stale reports; the dispatcher
goes down and comes back; messages are lost; the outbox relay runs. Each rule runs through the real
services over the storage under test and through a small reference model
written here, and after every step the machine checks that they agree and
that the invariants hold:

- the stored tasks and attempts equal the model's in every field it tracks,
  and what each service call returned is what is stored;
- progress equals a recount of the tasks (and the model's counts);
- ``retry_count`` never decreases; terminal states stay terminal;
- ``blocked -> assigned`` happens only through a manual retry;
- attempt numbers run 1..n with only the last one open, and only while the
  task is assigned or running;
- exactly one outbox entry per (task, attempt); a (task, attempt) is
  delivered a second time only after the reaper found its first message
  lost (not started within the start timeout), and is still started once;
- a stale or illegal report raises and changes nothing.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import attrs
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from deepwork_retry._async.services import (
    REDELIVERY,
    AsyncExecutorService,
    AsyncOutboxRelay,
    AsyncRetryService,
)
from deepwork_retry._core.model import Progress, Task
from deepwork_retry._core.policy import FixedBackoff, RetryPolicy, TaskError
from deepwork_retry._core.states import (
    TERMINAL,
    BlockedReason,
    DispatchState,
    Outcome,
    ProjectStatus,
    RetryBudget,
    TaskStatus,
    Trigger,
)
from deepwork_retry._sync.services import ExecutorService, OutboxRelay, RetryService
from deepwork_retry.exceptions import IdempotencyConflict, InvalidTransition, StaleAttempt
from deepwork_retry.ports import AsyncStorage, Storage
from deepwork_retry.testing._compare import check_same
from deepwork_retry.testing.doubles import AsyncRecordingDispatcher, FakeClock, RecordingDispatcher

__all__ = ["async_storage_machine", "storage_machine"]

PROJECT = "proj"
LEASE = 60.0
BACKOFF = 5.0
START = 120.0
CLAIM = 30.0
SERVICE_CLAIM = 30.0
"""How long the executor service claims the entries it releases (its default)."""
MAX_TASKS = 8
NON_RETRYABLE = "Fatal"
_NON_RETRYABLE: frozenset[str] = frozenset({NON_RETRYABLE})
_OPEN = frozenset({TaskStatus.ASSIGNED, TaskStatus.IN_PROGRESS, TaskStatus.REVIEW})


class _ZeroRandom:
    """No jitter, so the model can predict every delay."""

    def random(self) -> float:
        return 0.0


# -- the reference model ----------------------------------------------------------


@attrs.define
class _Attempt:
    number: int
    trigger: Trigger
    budget: RetryBudget | None = None
    outcome: Outcome | None = None
    error_type: str | None = None
    actor: str | None = None
    reason: str | None = None
    started_at: datetime | None = None


@attrs.define
class _Entry:
    state: DispatchState
    available_at: datetime
    tries: int = 0
    claimed_until: datetime | None = None
    delivered_at: datetime | None = None
    deliveries: int = 0
    redeliveries: int = 0


@attrs.define
class _Task:
    id: str
    max_retries: int
    blocked_by: tuple[str, ...]
    status: TaskStatus = TaskStatus.INBOX
    retry_count: int = 0
    retries_left: int = 0
    attempt: int = 0
    version: int = 1
    error_type: str | None = None
    error_message: str | None = None
    blocked_reason: BlockedReason | None = None
    lease_expires_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    attempts: list[_Attempt] = attrs.field(factory=list)


class Model:
    """What the storage should hold, computed the plain way."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.tasks: dict[str, _Task] = {}
        self.entries: dict[tuple[str, int], _Entry] = {}
        self.dispatcher_up = True
        self.paused = False
        self.keys: dict[str, str] = {}
        """Idempotency keys reserved by manual retries, and the task of each."""

    # -- helpers -------------------------------------------------------------
    def deps_met(self, task: _Task) -> bool:
        return all(self.tasks[dep].status in TERMINAL for dep in task.blocked_by)

    def ready(self, task: _Task) -> bool:
        return not self.paused and self.deps_met(task)

    def _deliver(self, key: tuple[str, int]) -> None:
        entry = self.entries[key]
        now = self.clock.now()
        entry.claimed_until = None
        if self.dispatcher_up:
            entry.state = DispatchState.DELIVERED
            entry.delivered_at = now
            entry.deliveries += 1
        else:
            delay = REDELIVERY.delay(entry.tries + 1, _ZeroRandom())
            entry.available_at = now + timedelta(seconds=delay)
        entry.tries += 1

    def _new_attempt(
        self,
        task: _Task,
        trigger: Trigger,
        delay: float,
        budget: RetryBudget | None = None,
        actor: str | None = None,
        reason: str | None = None,
    ) -> None:
        task.attempt += 1
        task.attempts.append(
            _Attempt(
                number=task.attempt, trigger=trigger, budget=budget, actor=actor, reason=reason
            )
        )
        now = self.clock.now()
        ready = self.ready(task)
        key = (task.id, task.attempt)
        self.entries[key] = _Entry(
            state=DispatchState.PENDING if ready else DispatchState.DEFERRED,
            available_at=now + timedelta(seconds=delay),
        )
        if ready and delay <= 0:
            self._deliver(key)

    def _close(self, task: _Task, outcome: Outcome, error_type: str | None = None) -> None:
        last = task.attempts[-1]
        last.outcome = outcome
        last.error_type = error_type or last.error_type

    def _finish(self, task: _Task, target: TaskStatus) -> None:
        task.status = target
        task.lease_expires_at = None
        task.completed_at = self.clock.now()
        if target is TaskStatus.DONE:
            task.error_message = None
            task.error_type = None
        for dep in self.tasks.values():
            if task.id not in dep.blocked_by or dep.status is not TaskStatus.ASSIGNED:
                continue
            key = (dep.id, dep.attempt)
            if self.ready(dep) and self.entries[key].state is DispatchState.DEFERRED:
                self._release(key)

    def _release(self, key: tuple[str, int]) -> None:
        """A deferred entry made pending and claimed by the service that released it, which
        delivers it at once, or leaves it to the relay while its backoff lasts."""
        entry = self.entries[key]
        entry.state = DispatchState.PENDING
        now = self.clock.now()
        if entry.available_at > now:
            entry.claimed_until = now + timedelta(seconds=SERVICE_CLAIM)
        else:
            self._deliver(key)

    def set_paused(self, paused: bool) -> None:
        """Pause the project, or resume it and release what its pause held back."""
        self.paused = paused
        if paused:
            return
        for task in sorted(self.tasks.values(), key=lambda t: t.id):
            if task.status is not TaskStatus.ASSIGNED:
                continue
            key = (task.id, task.attempt)
            if self.deps_met(task) and self.entries[key].state is DispatchState.DEFERRED:
                self._release(key)

    # -- events ----------------------------------------------------------------
    def add(self, task_id: str, max_retries: int, blocked_by: tuple[str, ...]) -> None:
        self.tasks[task_id] = _Task(
            id=task_id, max_retries=max_retries, retries_left=max_retries, blocked_by=blocked_by
        )

    def assign(self, task: _Task) -> None:
        task.version += 1
        task.status = TaskStatus.ASSIGNED
        self._new_attempt(task, Trigger.INITIAL, 0.0)

    def start(self, task: _Task) -> None:
        now = self.clock.now()
        task.version += 1
        task.status = TaskStatus.IN_PROGRESS
        task.lease_expires_at = now + timedelta(seconds=LEASE)
        task.started_at = task.started_at or now
        task.attempts[-1].started_at = now

    def heartbeat(self, task: _Task) -> None:
        task.version += 1
        task.lease_expires_at = self.clock.now() + timedelta(seconds=LEASE)

    def succeed(self, task: _Task) -> None:
        task.version += 1
        self._close(task, Outcome.SUCCEEDED)
        self._finish(task, TaskStatus.DONE)

    def fail(self, task: _Task, error: TaskError, outcome: Outcome) -> None:
        task.version += 1
        self._close(task, outcome, error.type)
        task.error_type = error.type
        task.error_message = error.message
        task.lease_expires_at = None
        if error.type == NON_RETRYABLE or task.retries_left <= 0:
            task.status = TaskStatus.BLOCKED
            task.blocked_reason = (
                BlockedReason.NON_RETRYABLE
                if error.type == NON_RETRYABLE
                else BlockedReason.BUDGET_EXHAUSTED
            )
            return
        task.status = TaskStatus.ASSIGNED
        task.retry_count += 1
        task.retries_left -= 1
        self._new_attempt(task, Trigger.AUTO_RETRY, BACKOFF)

    def manual_retry(
        self,
        task: _Task,
        budget: RetryBudget,
        actor: str | None = None,
        reason: str | None = None,
        key: str | None = None,
    ) -> None:
        task.version += 1
        task.status = TaskStatus.ASSIGNED
        task.retry_count += 1
        task.retries_left = task.max_retries if budget is RetryBudget.FULL else 0
        task.error_type = task.error_message = None
        task.blocked_reason = None
        task.lease_expires_at = None
        if budget is RetryBudget.FULL:
            task.started_at = None
        if key is not None:
            self.keys[key] = task.id
        self._new_attempt(task, Trigger.MANUAL_RETRY, 0.0, budget, actor, reason)

    def skip(self, task: _Task) -> None:
        task.version += 1
        if task.status in _OPEN:
            self._close(task, Outcome.CANCELLED)
        self._finish(task, TaskStatus.SKIPPED)

    def block(self, task: _Task, message: str) -> None:
        task.version += 1
        if task.status in _OPEN and task.attempt > 0:
            self._close(task, Outcome.CANCELLED)
        task.status = TaskStatus.BLOCKED
        task.blocked_reason = BlockedReason.MANUAL
        task.error_message = message
        task.error_type = None
        task.lease_expires_at = None

    def expired(self) -> list[_Task]:
        now = self.clock.now()
        return [
            t
            for t in self.tasks.values()
            if t.status is TaskStatus.IN_PROGRESS
            and t.lease_expires_at is not None
            and t.lease_expires_at <= now
        ]

    def due(self) -> list[tuple[str, int]]:
        now = self.clock.now()
        return [
            key
            for key, entry in self.entries.items()
            if entry.state is DispatchState.PENDING
            and entry.available_at <= now
            and (entry.claimed_until is None or entry.claimed_until <= now)
        ]

    def relay(self) -> None:
        for key in self.due():
            self._deliver(key)

    def redeliver(self) -> None:
        """Delivered, never started within START seconds: pending again, due now."""
        now = self.clock.now()
        cutoff = now - timedelta(seconds=START)
        for (task_id, number), entry in self.entries.items():
            task = self.tasks[task_id]
            if (
                entry.state is DispatchState.DELIVERED
                and entry.delivered_at is not None
                and entry.delivered_at <= cutoff
                and task.status is TaskStatus.ASSIGNED
                and task.attempt == number
            ):
                entry.state = DispatchState.PENDING
                entry.available_at = now
                entry.claimed_until = None
                entry.redeliveries += 1

    def claim(self) -> list[tuple[str, int]]:
        until = self.clock.now() + timedelta(seconds=CLAIM)
        keys = self.due()
        for key in keys:
            self.entries[key].claimed_until = until
        return keys

    def progress(self) -> Progress:
        return Progress.recount(PROJECT, [t.status for t in self.tasks.values()])


# -- the machine -------------------------------------------------------------------------


class _ServiceMachine(RuleBasedStateMachine):
    """The rules and invariants; subclasses say how a service call is run."""

    storage: Any
    executor: Any
    retrier: Any
    relay_service: Any
    dispatcher: RecordingDispatcher | AsyncRecordingDispatcher

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.model = Model(self.clock)
        self.policy = RetryPolicy(
            backoff=FixedBackoff(wait=BACKOFF),
            lease=LEASE,
            start_timeout=START,
            non_retryable=_NON_RETRYABLE,
        )
        self._open()
        self._do(self.executor.create_project, PROJECT)
        self._manual: set[str] = set()
        self._prev: dict[str, Task] = {}

    # -- to be provided -----------------------------------------------------------------
    def _open(self) -> None:
        raise NotImplementedError

    def _do(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    # -- helpers -----------------------------------------------------------------------------
    def _ids(self, *statuses: TaskStatus) -> list[str]:
        return sorted(t.id for t in self.model.tasks.values() if t.status in statuses)

    def _startable(self) -> list[str]:
        # An executor starts only what it was handed: the current attempt, delivered.
        return sorted(
            t.id
            for t in self.model.tasks.values()
            if t.status is TaskStatus.ASSIGNED
            and self.model.entries[(t.id, t.attempt)].state is DispatchState.DELIVERED
        )

    def _pick(self, data: st.DataObject, ids: list[str]) -> _Task:
        return self.model.tasks[data.draw(st.sampled_from(ids), label="task")]

    def _state(self, task_id: str) -> tuple[Any, ...]:
        _, task = self._do(self.storage.load, PROJECT, task_id)
        return (
            task,
            dict(task.metadata),
            self._do(self.storage.attempts, PROJECT, task_id),
            self._do(self.storage.dispatches, PROJECT, task_id),
            self._do(self.storage.progress, PROJECT),
            list(self.dispatcher.keys),
        )

    def _rejected(self, task_id: str, error: type[Exception], call: Callable[[], Any]) -> None:
        before = self._state(task_id)
        try:
            call()
        except error:
            pass
        else:
            raise AssertionError(f"{error.__name__} was not raised for {task_id}")
        check_same(before, self._state(task_id), f"{task_id} after a rejected call")

    def _check_result(self, result: Any) -> None:
        """What a service returned (task, progress) is what the storage holds now."""
        _, stored = self._do(self.storage.load, PROJECT, result.task.id)
        check_same(result.task, stored, f"the task {result.task.id} returned")
        progress = self._do(self.storage.progress, PROJECT)
        check_same(result.progress, progress, f"the progress returned with {result.task.id}")

    # -- rules ---------------------------------------------------------------------------------
    def _add(self, data: st.DataObject, max_retries: int) -> None:
        task_id = f"t{len(self.model.tasks)}"
        existing = sorted(self.model.tasks)
        deps: list[str] = []
        if existing:
            deps = data.draw(st.lists(st.sampled_from(existing), max_size=2, unique=True))
        self._do(
            self.executor.add_task,
            PROJECT,
            task_id,
            max_retries=max_retries,
            blocked_by=tuple(deps),
            metadata={"n": len(self.model.tasks)},
        )
        self.model.add(task_id, max_retries, tuple(deps))

    @initialize(data=st.data(), budgets=st.lists(st.integers(0, 2), min_size=2, max_size=5))
    def some_tasks(self, data: st.DataObject, budgets: list[int]) -> None:
        for max_retries in budgets:
            self._add(data, max_retries)

    @precondition(lambda self: len(self.model.tasks) < MAX_TASKS)
    @rule(data=st.data(), max_retries=st.integers(0, 2))
    def add_task(self, data: st.DataObject, max_retries: int) -> None:
        self._add(data, max_retries)

    @precondition(lambda self: self._ids(TaskStatus.INBOX))
    @rule(data=st.data())
    def assign(self, data: st.DataObject) -> None:
        task = self._pick(data, self._ids(TaskStatus.INBOX))
        self._check_result(self._do(self.executor.assign, PROJECT, task.id))
        self.model.assign(task)

    @precondition(lambda self: self._startable())
    @rule(data=st.data())
    def start(self, data: st.DataObject) -> None:
        task = self._pick(data, self._startable())
        self._check_result(self._do(self.executor.start, PROJECT, task.id, task.attempt))
        self.model.start(task)

    @precondition(lambda self: self._ids(TaskStatus.IN_PROGRESS))
    @rule(data=st.data())
    def heartbeat(self, data: st.DataObject) -> None:
        task = self._pick(data, self._ids(TaskStatus.IN_PROGRESS))
        self._check_result(self._do(self.executor.heartbeat, PROJECT, task.id, task.attempt))
        self.model.heartbeat(task)

    @precondition(lambda self: self._ids(TaskStatus.IN_PROGRESS))
    @rule(data=st.data())
    def succeed(self, data: st.DataObject) -> None:
        task = self._pick(data, self._ids(TaskStatus.IN_PROGRESS))
        self._check_result(self._do(self.executor.succeed, PROJECT, task.id, task.attempt))
        self.model.succeed(task)

    @precondition(lambda self: self._ids(TaskStatus.IN_PROGRESS))
    @rule(data=st.data(), retryable=st.booleans())
    def fail(self, data: st.DataObject, retryable: bool) -> None:
        task = self._pick(data, self._ids(TaskStatus.IN_PROGRESS))
        error = TaskError(type="Flaky" if retryable else NON_RETRYABLE, message="it broke")
        self._check_result(self._do(self.executor.fail, PROJECT, task.id, task.attempt, error))
        self.model.fail(task, error, Outcome.FAILED)

    @precondition(lambda self: self._startable())
    @rule(data=st.data())
    def start_and_fail_for_good(self, data: st.DataObject) -> None:
        """A delivered attempt starts and fails with a non-retryable error (a blocked task
        with a history, for the manual retry to take on)."""
        task = self._pick(data, self._startable())
        self._check_result(self._do(self.executor.start, PROJECT, task.id, task.attempt))
        self.model.start(task)
        self.clock.advance(1.0)
        error = TaskError(type=NON_RETRYABLE, message="it broke for good")
        self._check_result(self._do(self.executor.fail, PROJECT, task.id, task.attempt, error))
        self.model.fail(task, error, Outcome.FAILED)

    @precondition(lambda self: self._ids(TaskStatus.IN_PROGRESS))
    @rule(data=st.data())
    def lose(self, data: st.DataObject) -> None:
        task = self._pick(data, self._ids(TaskStatus.IN_PROGRESS))
        assert task.lease_expires_at is not None
        wait = (task.lease_expires_at - self.clock.now()).total_seconds()
        self.clock.advance(max(wait, 0.0) + 1.0)
        self._reap()

    @precondition(lambda self: self._startable())
    @rule(wait=st.sampled_from([START - 1.0, START]))
    def message_lost(self, wait: float) -> None:
        """Delivered messages never reach a worker; the reaper runs ``wait`` seconds later."""
        self.clock.advance(wait)
        self._reap()

    @precondition(lambda self: self._started_twice_delivered())
    @rule(data=st.data())
    def duplicate_start(self, data: st.DataObject) -> None:
        """The first message of a redelivered attempt turns up after the attempt started."""
        task = self._pick(data, self._started_twice_delivered())
        start = self.executor.start
        self._rejected(
            task.id, InvalidTransition, lambda: self._do(start, PROJECT, task.id, task.attempt)
        )

    def _started_twice_delivered(self) -> list[str]:
        return sorted(
            t.id
            for t in self.model.tasks.values()
            if t.status is not TaskStatus.ASSIGNED
            and t.attempt > 0
            and self.model.entries[(t.id, t.attempt)].deliveries > 1
        )

    def _reap(self) -> None:
        """Run the reaper: expired leases are lost, unstarted deliveries handed out again."""
        expired = self.model.expired()
        results = self._do(self.executor.reap)
        assert sorted(t.id for t in expired) == sorted(r.task.id for r in results)
        for lost in expired:
            error = TaskError(type="LeaseExpired", message="")
            self.model.fail(lost, error, Outcome.LOST)
            # The message names the expiry time; take it from storage.
            lost.error_message = next(r.task.error_message for r in results if r.task.id == lost.id)
        self.model.redeliver()

    @precondition(lambda self: self._ids(TaskStatus.BLOCKED))
    @rule(
        data=st.data(),
        budget=st.sampled_from(RetryBudget),
        actor=st.sampled_from([None, "operator", "zoë"]),
        reason=st.sampled_from([None, "fixed the input"]),
        keyed=st.booleans(),
    )
    def manual_retry(
        self,
        data: st.DataObject,
        budget: RetryBudget,
        actor: str | None,
        reason: str | None,
        keyed: bool,
    ) -> None:
        task = self._pick(data, self._ids(TaskStatus.BLOCKED))
        key = f"key-{len(self.model.keys)}" if keyed else None
        result = self._do(
            self.retrier.retry, PROJECT, task.id, budget=budget, actor=actor, reason=reason,
            idempotency_key=key,
        )  # fmt: skip
        self.model.manual_retry(task, budget, actor, reason, key)
        self._manual.add(task.id)
        self._check_result(result)

    @precondition(lambda self: self._ids(TaskStatus.BLOCKED) and self.model.keys)
    @rule(data=st.data())
    def retry_with_a_used_key(self, data: st.DataObject) -> None:
        """A retry under a key another retry reserved is refused and changes nothing."""
        task = self._pick(data, self._ids(TaskStatus.BLOCKED))
        key = data.draw(st.sampled_from(sorted(self.model.keys)), label="key")
        retry = self.retrier.retry
        self._rejected(
            task.id,
            IdempotencyConflict,
            lambda: self._do(retry, PROJECT, task.id, idempotency_key=key),
        )

    @rule(paused=st.booleans())
    def project_status(self, paused: bool) -> None:
        """Pause the project (new work is deferred) or resume it (deferred work is released)."""
        status = ProjectStatus.PAUSED if paused else ProjectStatus.EXECUTING
        project, _ = self._do(self.executor.set_project_status, PROJECT, status)
        assert status == project.status
        self.model.set_paused(paused)

    @precondition(lambda self: self._ids(TaskStatus.INBOX, TaskStatus.ASSIGNED, TaskStatus.BLOCKED))
    @rule(data=st.data())
    def skip(self, data: st.DataObject) -> None:
        ids = self._ids(TaskStatus.INBOX, TaskStatus.ASSIGNED, TaskStatus.BLOCKED)
        task = self._pick(data, ids)
        self._check_result(self._do(self.executor.skip, PROJECT, task.id))
        self.model.skip(task)

    @precondition(
        lambda self: self._ids(TaskStatus.INBOX, TaskStatus.ASSIGNED, TaskStatus.IN_PROGRESS)
    )
    @rule(data=st.data())
    def block(self, data: st.DataObject) -> None:
        ids = self._ids(TaskStatus.INBOX, TaskStatus.ASSIGNED, TaskStatus.IN_PROGRESS)
        task = self._pick(data, ids)
        self._check_result(
            self._do(self.executor.block, PROJECT, task.id, message="held by an operator")
        )
        self.model.block(task, "held by an operator")

    @precondition(lambda self: self.model.tasks)
    @rule(
        data=st.data(),
        event=st.sampled_from(["start", "heartbeat", "succeed", "fail"]),
        offset=st.sampled_from([-2, -1, 1, 5]),
    )
    def stale_report(self, data: st.DataObject, event: str, offset: int) -> None:
        task = self._pick(data, sorted(self.model.tasks))
        token = max(task.attempt + offset, 0)
        fn = getattr(self.executor, event)
        args: tuple[Any, ...] = (PROJECT, task.id, token)
        if event == "fail":
            args += (TaskError(type="Flaky"),)
        self._rejected(task.id, StaleAttempt, lambda: self._do(fn, *args))

    @precondition(lambda self: any(t.attempt > 0 for t in self.model.tasks.values()))
    @rule(data=st.data(), event=st.sampled_from(["start", "heartbeat", "succeed", "fail"]))
    def illegal_report(self, data: st.DataObject, event: str) -> None:
        allowed = {
            "start": {TaskStatus.ASSIGNED},
            "heartbeat": {TaskStatus.IN_PROGRESS},
            "succeed": {TaskStatus.IN_PROGRESS},
            "fail": {TaskStatus.IN_PROGRESS, TaskStatus.REVIEW},
        }[event]
        ids = sorted(
            t.id for t in self.model.tasks.values() if t.attempt > 0 and t.status not in allowed
        )
        if not ids:
            return
        task = self._pick(data, ids)
        fn = getattr(self.executor, event)
        args: tuple[Any, ...] = (PROJECT, task.id, task.attempt)
        if event == "fail":
            args += (TaskError(type="Flaky"),)
        self._rejected(task.id, InvalidTransition, lambda: self._do(fn, *args))

    @precondition(
        lambda self: any(t.status is not TaskStatus.BLOCKED for t in self.model.tasks.values())
    )
    @rule(data=st.data())
    def retry_not_blocked(self, data: st.DataObject) -> None:
        ids = sorted(t.id for t in self.model.tasks.values() if t.status is not TaskStatus.BLOCKED)
        task = self._pick(data, ids)
        self._rejected(
            task.id, InvalidTransition, lambda: self._do(self.retrier.retry, PROJECT, task.id)
        )

    @rule(up=st.booleans())
    def dispatcher_health(self, up: bool) -> None:
        self.dispatcher.failing = not up
        self.model.dispatcher_up = up

    @rule(wait=st.sampled_from([0.0, 1.0, BACKOFF, CLAIM, 61.0]))
    def relay(self, wait: float) -> None:
        self.clock.advance(wait)
        delivered = self._do(self.relay_service.run_once)
        before = sum(e.state is DispatchState.DELIVERED for e in self.model.entries.values())
        self.model.relay()
        after = sum(e.state is DispatchState.DELIVERED for e in self.model.entries.values())
        assert after - before == delivered

    @rule()
    def relay_crashes_after_claim(self) -> None:
        """A relay claims due entries and dies before delivering them."""
        now = self.clock.now()
        until = now + timedelta(seconds=CLAIM)
        claimed = self._do(self.storage.claim_due, now=now, limit=1000, claimed_until=until)
        expected = self.model.claim()
        assert sorted(expected) == sorted((e.task_id, e.attempt) for e in claimed)

    # -- invariants ------------------------------------------------------------------------------
    @invariant()
    def storage_agrees_with_model(self) -> None:
        tasks = self._do(self.storage.list_tasks, PROJECT, limit=1000)
        assert sorted(self.model.tasks) == [t.id for t in tasks]
        progress = self._do(self.storage.progress, PROJECT)
        assert Progress.recount(PROJECT, [t.status for t in tasks]) == progress
        assert self.model.progress() == progress
        delivered: list[tuple[str, str, int]] = []
        for task in tasks:
            self._check_task(task)
            delivered += [
                e.key
                for e in self._do(self.storage.dispatches, PROJECT, task.id)
                if e.state is DispatchState.DELIVERED
            ]
        keys = self.dispatcher.keys
        for entry in self.model.entries.values():
            assert entry.deliveries <= 1 + entry.redeliveries, "delivered twice, never lost"
        expected = Counter(
            {(PROJECT, tid, n): e.deliveries for (tid, n), e in self.model.entries.items()}
        )
        assert +expected == Counter(keys), "deliveries differ from the model"
        assert set(delivered) <= set(keys)
        self._check_history(tasks)
        for key, task_id in self.model.keys.items():
            record = self._do(self.storage.get_idempotency, key, now=self.clock.now())
            assert record is not None, f"the key {key!r} reserved by a retry of {task_id} is gone"
            assert (PROJECT, task_id) == (record.project_id, record.task_id), key
        self._manual = set()
        self._prev = {t.id: t for t in tasks}

    def _check_task(self, task: Task) -> None:
        want = self.model.tasks[task.id]
        fields = (
            "status", "retry_count", "retries_left", "max_retries", "attempt", "version",
            "error_type", "error_message", "blocked_reason", "lease_expires_at", "blocked_by",
            "started_at", "completed_at",
        )  # fmt: skip
        check_same(
            {name: getattr(want, name) for name in fields},
            {name: getattr(task, name) for name in fields},
            f"task {task.id} (expected: the model's)",
        )
        check_same({"n": int(task.id[1:])}, dict(task.metadata), f"the metadata of {task.id}")
        attempts = self._do(self.storage.attempts, PROJECT, task.id)
        assert list(range(1, task.attempt + 1)) == [a.number for a in attempts]
        kept = (
            "number", "trigger", "budget", "outcome", "error_type", "actor", "reason", "started_at",
        )  # fmt: skip
        check_same(
            [{name: getattr(a, name) for name in kept} for a in want.attempts],
            [{name: getattr(a, name) for name in kept} for a in attempts],
            f"the attempts of {task.id} (expected: the model's)",
        )
        open_attempts = [a.number for a in attempts if a.outcome is None]
        assert ([task.attempt] if task.status in _OPEN else []) == open_attempts
        entries = self._do(self.storage.dispatches, PROJECT, task.id)
        assert list(range(1, task.attempt + 1)) == [e.attempt for e in entries]
        model_entries = [self.model.entries[(task.id, n)] for n in range(1, task.attempt + 1)]
        assert [
            (e.state, e.available_at, e.tries, e.claimed_until, e.delivered_at)
            for e in model_entries
        ] == [(e.state, e.available_at, e.tries, e.claimed_until, e.delivered_at) for e in entries]

    def _check_history(self, tasks: list[Task]) -> None:
        for task in tasks:
            prev = self._prev.get(task.id)
            if prev is None:
                continue
            assert prev.retry_count <= task.retry_count
            if prev.status in TERMINAL:
                assert prev == task, "a terminal task changed"
            if prev.status is TaskStatus.BLOCKED and task.status is TaskStatus.ASSIGNED:
                assert task.id in self._manual, "blocked -> assigned without a manual retry"

    def teardown(self) -> None:
        self._close()

    def _close(self) -> None:
        raise NotImplementedError


_SETTINGS = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def storage_machine(
    factory: Callable[[], Storage],
    teardown: Callable[[Storage], None] | None = None,
) -> type[RuleBasedStateMachine]:
    """A state machine driving the sync services over storages made by ``factory``.

    ``factory`` is called once per example and must return a fresh, empty
    storage; at the end of the example the machine calls ``close()`` on it,
    then ``teardown(storage)`` when given. Run it with
    ``TestMyStorage = storage_machine(make).TestCase``; change
    ``TestMyStorage.settings`` to run more or fewer examples.
    """

    class StorageMachine(_ServiceMachine):
        def _open(self) -> None:
            self.storage = factory()
            self.dispatcher = RecordingDispatcher()
            common: dict[str, Any] = {"clock": self.clock, "rng": _ZeroRandom()}
            self.executor = ExecutorService(
                self.storage, self.dispatcher, policy=self.policy, **common
            )
            self.retrier = RetryService(self.storage, self.dispatcher, **common)
            self.relay_service = OutboxRelay(
                self.storage, self.dispatcher, batch=1000, claim_timeout=CLAIM, **common
            )

        def _do(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        def _close(self) -> None:
            try:
                self.storage.close()
            finally:
                if teardown is not None:
                    teardown(self.storage)

    StorageMachine.TestCase.settings = _SETTINGS
    return StorageMachine


def async_storage_machine(
    factory: Callable[[], Awaitable[AsyncStorage]],
    teardown: Callable[[AsyncStorage], Awaitable[None]] | None = None,
) -> type[RuleBasedStateMachine]:
    """The machine of :func:`storage_machine` over the async services.

    Each example owns one event loop; ``factory`` (an async callable) runs in
    it, so drivers that bind connections to a loop work, and every service
    call of the example runs in the same loop. At the end the machine awaits
    ``storage.close()`` and then ``teardown(storage)`` when given.
    """

    class AsyncStorageMachine(_ServiceMachine):
        def _open(self) -> None:
            self.loop = asyncio.new_event_loop()
            self.storage = self.loop.run_until_complete(factory())
            self.dispatcher = AsyncRecordingDispatcher()
            common: dict[str, Any] = {"clock": self.clock, "rng": _ZeroRandom()}
            self.executor = AsyncExecutorService(
                self.storage, self.dispatcher, policy=self.policy, **common
            )
            self.retrier = AsyncRetryService(self.storage, self.dispatcher, **common)
            self.relay_service = AsyncOutboxRelay(
                self.storage, self.dispatcher, batch=1000, claim_timeout=CLAIM, **common
            )

        def _do(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            return self.loop.run_until_complete(fn(*args, **kwargs))

        def _close(self) -> None:
            try:
                self.loop.run_until_complete(self.storage.close())
                if teardown is not None:
                    self.loop.run_until_complete(teardown(self.storage))
            finally:
                self.loop.close()

    AsyncStorageMachine.TestCase.settings = _SETTINGS
    return AsyncStorageMachine
