"""The transition table, every illegal move's error, and can_retry, checked exhaustively."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from datetime import datetime, timezone

import pytest

from deepwork_retry import (
    PROJECT_RULES,
    TRANSITIONS,
    InvalidTransition,
    Project,
    ProjectStatus,
    RetryPolicy,
    Task,
    TaskError,
    TaskEvent,
    TaskNotBlocked,
    TaskStatus,
    can_retry,
)
from deepwork_retry._core import decide, machine
from deepwork_retry._core.plans import Plan
from deepwork_retry._core.states import TERMINAL
from deepwork_retry.exceptions import ProjectNotRunnable, StaleAttempt

NOW = datetime(2024, 5, 1, 9, 30, tzinfo=timezone.utc)
PROJECT = Project(id="p", status=ProjectStatus.EXECUTING)
POLICY = RetryPolicy()
PAIRS = list(itertools.product(TaskStatus, TaskEvent))


def _task(status: TaskStatus) -> Task:
    attempt = 0 if status is TaskStatus.INBOX else 1
    # A running attempt's lease has expired, so ``lose`` is legal where the table allows it.
    lease = NOW if status is TaskStatus.IN_PROGRESS else None
    return Task(id="t-9", project_id="p", status=status, attempt=attempt, lease_expires_at=lease)


@pytest.mark.parametrize(("status", "event"), PAIRS)
def test_table_lookup_or_typed_error(status: TaskStatus, event: TaskEvent) -> None:
    """Each (state, event) pair has targets in the table or raises naming task, state, event."""
    task = _task(status)
    if (status, event) in TRANSITIONS:
        assert TRANSITIONS[(status, event)] == machine.targets(task, event)
        return
    with pytest.raises(InvalidTransition) as caught:
        machine.targets(task, event)
    assert ("t-9", status.value, event.value) == (
        caught.value.task_id,
        caught.value.status,
        caught.value.event,
    )
    if event is TaskEvent.MANUAL_RETRY:
        assert isinstance(caught.value, TaskNotBlocked)
        assert f"Can only retry tasks with status 'blocked', got '{status.value}'" == str(
            caught.value
        )
    else:
        assert f"Task 't-9' in status '{status.value}' does not accept event '{event.value}'" == (
            str(caught.value)
        )


@pytest.mark.parametrize(("status", "event"), [p for p in PAIRS if p in TRANSITIONS])
def test_check_rejects_targets_outside_table(status: TaskStatus, event: TaskEvent) -> None:
    """check() accepts exactly the listed targets of an edge and raises for every other state."""
    task = _task(status)
    for target in TaskStatus:
        if target in TRANSITIONS[(status, event)]:
            assert target == machine.check(task, event, target)
        else:
            with pytest.raises(InvalidTransition):
                machine.check(task, event, target)


def test_terminal_states_have_no_edges() -> None:
    """No edge leaves done or skipped."""
    assert [] == [pair for pair in TRANSITIONS if pair[0] in TERMINAL]


def test_only_manual_retry_and_skip_leave_blocked() -> None:
    """blocked -> assigned is the manual retry edge; the only other way out is skip."""
    leaving = {
        event: targets for (s, event), targets in TRANSITIONS.items() if s is TaskStatus.BLOCKED
    }
    expected = {
        TaskEvent.MANUAL_RETRY: frozenset({TaskStatus.ASSIGNED}),
        TaskEvent.SKIP: frozenset({TaskStatus.SKIPPED}),
    }
    assert expected == leaving


_Decision = Callable[[Task], Plan]

DECISIONS: dict[TaskEvent, _Decision] = {
    TaskEvent.ASSIGN: lambda t: decide.assign(t, PROJECT, now=NOW, blockers={}),
    TaskEvent.START: lambda t: decide.start(t, t.attempt, now=NOW, policy=POLICY),
    TaskEvent.HEARTBEAT: lambda t: decide.heartbeat(t, t.attempt, now=NOW, policy=POLICY),
    TaskEvent.SUCCEED: lambda t: decide.succeed(t, t.attempt, PROJECT, now=NOW),
    TaskEvent.SUBMIT_REVIEW: lambda t: decide.succeed(t, t.attempt, PROJECT, now=NOW, review=True),
    TaskEvent.APPROVE: lambda t: decide.approve(t, PROJECT, now=NOW),
    TaskEvent.FAIL: lambda t: decide.fail(
        t, t.attempt, TaskError(type="E"), PROJECT, now=NOW, rng=random.Random(1), policy=POLICY
    ),
    TaskEvent.LOSE: lambda t: decide.lose(t, PROJECT, now=NOW, rng=random.Random(1), policy=POLICY),
    TaskEvent.MANUAL_RETRY: lambda t: decide.manual_retry(t, PROJECT, now=NOW, blockers={}),
    TaskEvent.SKIP: lambda t: decide.skip(t, PROJECT, now=NOW),
    TaskEvent.BLOCK: lambda t: decide.block(t, now=NOW, message="held"),
}


def test_every_event_has_a_decision() -> None:
    """Each event of the vocabulary has a decision function under test."""
    assert set(TaskEvent) == set(DECISIONS)


@pytest.mark.parametrize(("status", "event"), PAIRS)
def test_decisions_follow_the_table(status: TaskStatus, event: TaskEvent) -> None:
    """A decision moves a task along a table edge, or raises InvalidTransition and plans nothing.

    An inbox task has no attempt yet, so a report for it is stale before it is illegal.
    """
    task = _task(status)
    if (status, event) not in TRANSITIONS:
        reports = {TaskEvent.START, TaskEvent.HEARTBEAT, TaskEvent.SUCCEED, TaskEvent.FAIL}
        reports.add(TaskEvent.SUBMIT_REVIEW)
        stale = task.attempt == 0 and event in reports
        with pytest.raises(StaleAttempt if stale else InvalidTransition):
            DECISIONS[event](task)
        return
    plan = DECISIONS[event](task)
    assert plan.after.status in TRANSITIONS[(status, event)]
    assert (task, task.version + 1) == (plan.before, plan.after.version)
    assert plan.after.retry_count >= task.retry_count


@pytest.mark.parametrize(
    ("status", "project_status"), list(itertools.product(TaskStatus, ProjectStatus))
)
def test_can_retry_every_combination(status: TaskStatus, project_status: ProjectStatus) -> None:
    """can_retry checks the task state first, then the project's rule, with the API's wording."""
    task = _task(status)
    project = Project(id="p", status=project_status)
    check = can_retry(task, project)
    if status is not TaskStatus.BLOCKED:
        expected = (
            False,
            "not_blocked",
            f"Can only retry tasks with status 'blocked', got '{status.value}'",
        )
    elif not PROJECT_RULES[project_status].accepts_retry:
        expected = (
            False,
            "project_not_runnable",
            f"Cannot retry tasks in a '{project_status.value}' project",
        )
    else:
        expected = (True, None, None)
    assert expected == (check.allowed, check.code, check.reason)


@pytest.mark.parametrize(
    ("status", "project_status"), list(itertools.product(TaskStatus, ProjectStatus))
)
def test_manual_retry_agrees_with_can_retry(
    status: TaskStatus, project_status: ProjectStatus
) -> None:
    """manual_retry succeeds exactly when can_retry allows it, else raises the matching error."""
    task = _task(status)
    project = Project(id="p", status=project_status)
    check = can_retry(task, project)
    if check.allowed:
        plan = decide.manual_retry(task, project, now=NOW, blockers={})
        assert TaskStatus.ASSIGNED == plan.after.status
        return
    error = TaskNotBlocked if check.code == "not_blocked" else ProjectNotRunnable
    with pytest.raises(error) as caught:
        decide.manual_retry(task, project, now=NOW, blockers={})
    assert check.reason == str(caught.value)


def test_project_rules_cover_every_status() -> None:
    """Retries are accepted in approved, executing and paused projects only; paused defers."""
    accepting = {s for s, rule in PROJECT_RULES.items() if rule.accepts_retry}
    dispatching = {s for s, rule in PROJECT_RULES.items() if rule.dispatches}
    assert {ProjectStatus.APPROVED, ProjectStatus.EXECUTING, ProjectStatus.PAUSED} == accepting
    assert {ProjectStatus.APPROVED, ProjectStatus.EXECUTING} == dispatching
