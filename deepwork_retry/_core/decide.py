"""The decisions: current state + event + ``now`` (+ ``rng``) -> a :class:`Plan`.

Each function checks the move against the transition table, and returns a
value; none of them performs I/O, reads a clock or draws a random number of
its own.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime, timedelta

import attrs

from deepwork_retry._core import effects, machine
from deepwork_retry._core.model import (
    Attempt,
    DispatchEntry,
    IdempotencyRecord,
    Project,
    Task,
    evolve_task,
)
from deepwork_retry._core.plans import AttemptUpdate, Guard, Plan, ProjectPlan, Release
from deepwork_retry._core.policy import Block, RandomSource, RetryAt, RetryPolicy, TaskError
from deepwork_retry._core.states import (
    TERMINAL,
    BlockedReason,
    DispatchState,
    Outcome,
    ProjectStatus,
    RetryBudget,
    TaskEvent,
    TaskStatus,
    Trigger,
)
from deepwork_retry.exceptions import (
    InvalidInput,
    InvalidTransition,
    ProjectNotRunnable,
    StaleAttempt,
)

_OPEN_ATTEMPT = frozenset({TaskStatus.ASSIGNED, TaskStatus.IN_PROGRESS, TaskStatus.REVIEW})


def _bump(task: Task, now: datetime, **changes: object) -> Task:
    return evolve_task(task, updated_at=now, version=task.version + 1, **changes)


def _check_token(task: Task, token: int) -> None:
    if token != task.attempt or task.attempt == 0:
        raise StaleAttempt(task.id, token, task.attempt)


def _unfinished_guards(ids: Collection[str], tasks: Mapping[str, Task]) -> tuple[Guard, ...]:
    if not ids or not tasks:
        return ()
    return tuple(
        Guard(task_id=tid, version=tasks[tid].version)
        for tid in ids
        if tid in tasks and tasks[tid].status not in TERMINAL
    )


def _statuses(tasks: Mapping[str, Task]) -> dict[str, TaskStatus]:
    return {tid: t.status for tid, t in tasks.items()}


def _new_attempt(
    after: Task,
    project: Project,
    blockers: Mapping[str, Task],
    attempt: Attempt,
    *,
    now: datetime,
    claimed_until: datetime | None = None,
) -> tuple[DispatchEntry, tuple[Guard, ...]]:
    """The outbox entry for ``after.attempt``, whose record is ``attempt``: due when the
    attempt is available, pending if it may be dispatched now, else deferred."""
    available_at = attempt.available_at
    ready = machine.PROJECT_RULES[project.status].dispatches and (
        not after.blocked_by or machine.dependencies_met(after, _statuses(blockers))
    )
    entry = DispatchEntry(
        project_id=after.project_id,
        task_id=after.id,
        attempt=after.attempt,
        state=DispatchState.PENDING if ready else DispatchState.DEFERRED,
        available_at=available_at,
        created_at=now,
        claimed_until=claimed_until if ready and available_at <= now else None,
    )
    return entry, _unfinished_guards(after.blocked_by, blockers)


def _check_project(task: Task, project: Project) -> None:
    if task.project_id != project.id:
        raise InvalidInput(
            f"Task {task.id!r} belongs to project {task.project_id!r}, not {project.id!r}"
        )


def assign(
    task: Task,
    project: Project,
    *,
    now: datetime,
    blockers: Mapping[str, Task],
    claimed_until: datetime | None = None,
) -> Plan:
    """``inbox -> assigned``: the first attempt, dispatched once dependencies are met."""
    _check_project(task, project)
    machine.check(task, TaskEvent.ASSIGN, TaskStatus.ASSIGNED)
    after = _bump(task, now, status=TaskStatus.ASSIGNED, attempt=task.attempt + 1)
    attempt = Attempt(
        task_id=after.id, project_id=after.project_id, number=after.attempt,
        trigger=Trigger.INITIAL, dispatched_at=now, available_at=now,
    )  # fmt: skip
    entry, guards = _new_attempt(
        after, project, blockers, attempt, now=now, claimed_until=claimed_until
    )
    return Plan(
        event=TaskEvent.ASSIGN,
        before=task,
        after=after,
        new_attempt=attempt,
        dispatch=entry,
        guards=guards,
        project_version=project.version,
    )


def manual_retry(
    task: Task,
    project: Project,
    *,
    now: datetime,
    blockers: Mapping[str, Task],
    actor: str | None = None,
    reason: str | None = None,
    budget: RetryBudget = RetryBudget.ONE_MORE,
    claimed_until: datetime | None = None,
    idempotency_key: str | None = None,
    idempotency_expires_at: datetime | None = None,
) -> Plan:
    """``blocked -> assigned`` by a person, bypassing ``max_retries``.

    With ``idempotency_key`` the plan reserves that key, until
    ``idempotency_expires_at`` (by default the record's own default period).

    Raises :class:`TaskNotBlocked` (checked first) or :class:`ProjectNotRunnable`.
    """
    _check_project(task, project)
    machine.check(task, TaskEvent.MANUAL_RETRY, TaskStatus.ASSIGNED)
    if not machine.PROJECT_RULES[project.status].accepts_retry:
        raise ProjectNotRunnable(project.id, project.status.value)
    if budget.__class__ is not RetryBudget:
        budget = RetryBudget(budget)
    # The move's effects are data (effects.MANUAL_RETRY), rendered here and into
    # the storages' one-step statements alike.
    move = effects.MANUAL_RETRY
    after = move.change_task(task, now, budget)
    attempt = move.open_attempt(after, now, actor, reason, budget)
    entry, guards = _new_attempt(
        after, project, blockers, attempt, now=now, claimed_until=claimed_until
    )
    idem = None
    if idempotency_key is not None:
        idem = IdempotencyRecord(
            key=idempotency_key, project_id=project.id, task_id=task.id, created_at=now
        )
        if idempotency_expires_at is not None:
            idem = attrs.evolve(idem, expires_at=idempotency_expires_at)
    return Plan(
        event=TaskEvent.MANUAL_RETRY,
        before=task,
        after=after,
        new_attempt=attempt,
        dispatch=entry,
        guards=guards,
        project_version=project.version,
        idempotency=idem,
    )


def start(task: Task, token: int, *, now: datetime, policy: RetryPolicy) -> Plan:
    """``assigned -> in_progress`` for the attempt ``token``; its lease starts now."""
    _check_token(task, token)
    machine.check(task, TaskEvent.START, TaskStatus.IN_PROGRESS)
    after = _bump(
        task,
        now,
        status=TaskStatus.IN_PROGRESS,
        started_at=task.started_at or now,
        lease_expires_at=now + timedelta(seconds=policy.lease),
    )
    return Plan(
        event=TaskEvent.START,
        before=task,
        after=after,
        attempt_update=AttemptUpdate(number=token, started_at=now),
    )


def heartbeat(task: Task, token: int, *, now: datetime, policy: RetryPolicy) -> Plan:
    """Extend the lease of the running attempt ``token``."""
    _check_token(task, token)
    machine.check(task, TaskEvent.HEARTBEAT, TaskStatus.IN_PROGRESS)
    after = _bump(task, now, lease_expires_at=now + timedelta(seconds=policy.lease))
    return Plan(event=TaskEvent.HEARTBEAT, before=task, after=after)


def _finish(
    task: Task,
    event: TaskEvent,
    target: TaskStatus,
    project: Project,
    *,
    now: datetime,
    dependants: Sequence[Task],
    blockers: Mapping[str, Task],
    attempt_update: AttemptUpdate | None,
    claimed_until: datetime | None,
) -> Plan:
    """Move ``task`` to a terminal state and release the dependants it unblocks.

    ``dependants`` are the tasks whose ``blocked_by`` names ``task``;
    ``blockers`` holds every other task those dependants wait on.
    """
    machine.check(task, event, target)
    after = _bump(
        task,
        now,
        status=target,
        completed_at=now,
        lease_expires_at=None,
        error_message=None if target is TaskStatus.DONE else task.error_message,
        error_type=None if target is TaskStatus.DONE else task.error_type,
    )
    statuses = _statuses(blockers)
    statuses[task.id] = target
    dispatches = machine.PROJECT_RULES[project.status].dispatches
    releases: list[Release] = []
    guard_ids: list[str] = []
    open_dependants = [d for d in dependants if d.status not in TERMINAL and d.id != task.id]
    for dep in open_dependants:
        guard_ids.extend(b for b in dep.blocked_by if b != task.id)
        if (
            dispatches
            and dep.status is TaskStatus.ASSIGNED
            and machine.dependencies_met(dep, statuses)
        ):
            releases.append(Release(task_id=dep.id, attempt=dep.attempt))
    guards = tuple(Guard(task_id=d.id, version=d.version) for d in open_dependants)
    guards += _unfinished_guards(dict.fromkeys(guard_ids), blockers)
    return Plan(
        event=event,
        before=task,
        after=after,
        attempt_update=attempt_update,
        releases=tuple(releases),
        guards=guards,
        project_version=project.version,
        claimed_until=claimed_until,
    )


def succeed(
    task: Task,
    token: int,
    project: Project,
    *,
    now: datetime,
    dependants: Sequence[Task] = (),
    blockers: Mapping[str, Task] | None = None,
    review: bool = False,
    claimed_until: datetime | None = None,
) -> Plan:
    """The attempt ``token`` succeeded: ``done`` (or ``review`` when asked)."""
    _check_token(task, token)
    if review:
        machine.check(task, TaskEvent.SUBMIT_REVIEW, TaskStatus.REVIEW)
        after = _bump(task, now, status=TaskStatus.REVIEW, lease_expires_at=None)
        return Plan(event=TaskEvent.SUBMIT_REVIEW, before=task, after=after)
    update = AttemptUpdate(number=token, finished_at=now, outcome=Outcome.SUCCEEDED)
    return _finish(
        task,
        TaskEvent.SUCCEED,
        TaskStatus.DONE,
        project,
        now=now,
        dependants=dependants,
        blockers=blockers or {},
        attempt_update=update,
        claimed_until=claimed_until,
    )


def approve(
    task: Task,
    project: Project,
    *,
    now: datetime,
    dependants: Sequence[Task] = (),
    blockers: Mapping[str, Task] | None = None,
    claimed_until: datetime | None = None,
) -> Plan:
    """``review -> done``."""
    update = AttemptUpdate(number=task.attempt, finished_at=now, outcome=Outcome.SUCCEEDED)
    return _finish(
        task,
        TaskEvent.APPROVE,
        TaskStatus.DONE,
        project,
        now=now,
        dependants=dependants,
        blockers=blockers or {},
        attempt_update=update,
        claimed_until=claimed_until,
    )


def skip(
    task: Task,
    project: Project,
    *,
    now: datetime,
    dependants: Sequence[Task] = (),
    blockers: Mapping[str, Task] | None = None,
    claimed_until: datetime | None = None,
) -> Plan:
    """Give up on a task for good; its dependants may proceed."""
    update = (
        AttemptUpdate(number=task.attempt, finished_at=now, outcome=Outcome.CANCELLED)
        if task.status in _OPEN_ATTEMPT
        else None
    )
    return _finish(
        task,
        TaskEvent.SKIP,
        TaskStatus.SKIPPED,
        project,
        now=now,
        dependants=dependants,
        blockers=blockers or {},
        attempt_update=update,
        claimed_until=claimed_until,
    )


def block(task: Task, *, now: datetime, message: str) -> Plan:
    """An operator blocks a task (``blocked_reason`` ``manual``)."""
    machine.check(task, TaskEvent.BLOCK, TaskStatus.BLOCKED)
    after = _bump(
        task,
        now,
        status=TaskStatus.BLOCKED,
        blocked_reason=BlockedReason.MANUAL,
        error_message=message,
        error_type=None,
        lease_expires_at=None,
    )
    update = (
        AttemptUpdate(number=task.attempt, finished_at=now, outcome=Outcome.CANCELLED)
        if task.status in _OPEN_ATTEMPT and task.attempt > 0
        else None
    )
    return Plan(event=TaskEvent.BLOCK, before=task, after=after, attempt_update=update)


def fail(
    task: Task,
    token: int,
    error: TaskError,
    project: Project,
    *,
    now: datetime,
    rng: RandomSource,
    policy: RetryPolicy,
    blockers: Mapping[str, Task] | None = None,
    claimed_until: datetime | None = None,
) -> Plan:
    """The attempt ``token`` failed: retry per ``policy``, or block."""
    _check_token(task, token)
    return _failed(
        task, TaskEvent.FAIL, Outcome.FAILED, error, project,
        now=now, rng=rng, policy=policy, blockers=blockers or {}, claimed_until=claimed_until,
    )  # fmt: skip


def lose(
    task: Task,
    project: Project,
    *,
    now: datetime,
    rng: RandomSource,
    policy: RetryPolicy,
    blockers: Mapping[str, Task] | None = None,
    claimed_until: datetime | None = None,
) -> Plan:
    """The running attempt's lease expired: fail it as lost."""
    if task.status is TaskStatus.IN_PROGRESS and (
        task.lease_expires_at is None or task.lease_expires_at > now
    ):
        raise InvalidTransition(
            task.id, task.status.value, TaskEvent.LOSE.value,
            f"Task {task.id!r}: lease of attempt {task.attempt} has not expired",
        )  # fmt: skip
    expired = task.lease_expires_at.isoformat() if task.lease_expires_at else "?"
    error = TaskError(
        type="LeaseExpired",
        message=f"attempt {task.attempt} stopped heartbeating; its lease expired at {expired}",
    )
    return _failed(
        task, TaskEvent.LOSE, Outcome.LOST, error, project,
        now=now, rng=rng, policy=policy, blockers=blockers or {}, claimed_until=claimed_until,
    )  # fmt: skip


def _failed(
    task: Task,
    event: TaskEvent,
    outcome: Outcome,
    error: TaskError,
    project: Project,
    *,
    now: datetime,
    rng: RandomSource,
    policy: RetryPolicy,
    blockers: Mapping[str, Task],
    claimed_until: datetime | None,
) -> Plan:
    machine.targets(task, event)
    update = AttemptUpdate(
        number=task.attempt,
        finished_at=now,
        outcome=outcome,
        error_type=error.type,
        error_message=error.message,
    )
    decision = policy.decide(task, error, now=now, rng=rng, first_dispatched_at=task.started_at)
    common = {
        "error_message": error.message,
        "error_type": error.type,
        "lease_expires_at": None,
    }
    if isinstance(decision, Block):
        machine.check(task, event, TaskStatus.BLOCKED)
        after = _bump(
            task, now, status=TaskStatus.BLOCKED, blocked_reason=decision.reason, **common
        )
        return Plan(event=event, before=task, after=after, attempt_update=update, decision=decision)
    assert isinstance(decision, RetryAt)
    machine.check(task, event, TaskStatus.ASSIGNED)
    after = _bump(
        task,
        now,
        status=TaskStatus.ASSIGNED,
        retry_count=task.retry_count + 1,
        retries_left=task.retries_left - 1,
        attempt=task.attempt + 1,
        **common,
    )
    attempt = Attempt(
        task_id=after.id, project_id=after.project_id, number=after.attempt,
        trigger=Trigger.AUTO_RETRY, dispatched_at=now, available_at=decision.at,
    )  # fmt: skip
    entry, guards = _new_attempt(
        after, project, blockers, attempt, now=now, claimed_until=claimed_until
    )
    return Plan(
        event=event,
        before=task,
        after=after,
        attempt_update=update,
        new_attempt=attempt,
        dispatch=entry,
        guards=guards,
        project_version=project.version,
        decision=decision,
    )


_PROJECT_FINAL = frozenset({ProjectStatus.COMPLETED, ProjectStatus.CANCELLED})


def change_project(
    project: Project,
    status: ProjectStatus,
    *,
    now: datetime,
    deferred: Sequence[DispatchEntry] = (),
    tasks: Mapping[str, Task] | None = None,
    claimed_until: datetime | None = None,
) -> ProjectPlan:
    """Change a project's status; entering a dispatching status releases deferred work.

    ``deferred`` are the project's deferred outbox entries and ``tasks`` the
    tasks they belong to plus those tasks' blockers.
    """
    status = ProjectStatus(status)
    if project.status in _PROJECT_FINAL and status is not project.status:
        raise InvalidInput(f"Project {project.id!r} is {project.status.value}; its status is final")
    after = attrs.evolve(project, status=status, updated_at=now, version=project.version + 1)
    releases: list[Release] = []
    guard_ids: list[str] = []
    tasks = tasks or {}
    if machine.PROJECT_RULES[status].dispatches:
        statuses = _statuses(tasks)
        for entry in deferred:
            task = tasks.get(entry.task_id)
            if (
                task is None
                or task.status is not TaskStatus.ASSIGNED
                or task.attempt != entry.attempt
            ):
                continue
            guard_ids.append(task.id)
            guard_ids.extend(task.blocked_by)
            if machine.dependencies_met(task, statuses):
                releases.append(Release(task_id=task.id, attempt=task.attempt))
    return ProjectPlan(
        before=project,
        after=after,
        releases=tuple(releases),
        guards=_unfinished_guards(dict.fromkeys(guard_ids), tasks),
        claimed_until=claimed_until,
    )
