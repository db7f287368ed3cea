"""The task state machine and the project rules, each one table.

Rules, read top to bottom:

1. A task moves only along an edge of :data:`TRANSITIONS`; any other
   ``(state, event)`` pair raises :class:`~deepwork_retry.exceptions.InvalidTransition`.
2. ``done`` and ``skipped`` are terminal: no edge leaves them.
3. ``fail`` and ``lose`` have two targets; the retry policy picks one
   (``assigned`` with budget left, else ``blocked``).
4. ``manual_retry`` is the only edge out of ``blocked`` besides ``skip``.
5. Whether a project accepts retries, and whether its work is dispatched now
   or deferred, is read from :data:`PROJECT_RULES`.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from deepwork_retry._core.model import Project, Task
from deepwork_retry._core.states import TERMINAL, ProjectStatus, TaskEvent, TaskStatus
from deepwork_retry.exceptions import InvalidTransition, TaskNotBlocked

_S = TaskStatus
_E = TaskEvent

TRANSITIONS: Mapping[tuple[TaskStatus, TaskEvent], frozenset[TaskStatus]] = {
    (_S.INBOX, _E.ASSIGN): frozenset({_S.ASSIGNED}),
    (_S.ASSIGNED, _E.START): frozenset({_S.IN_PROGRESS}),
    (_S.IN_PROGRESS, _E.HEARTBEAT): frozenset({_S.IN_PROGRESS}),
    (_S.IN_PROGRESS, _E.SUCCEED): frozenset({_S.DONE}),
    (_S.IN_PROGRESS, _E.SUBMIT_REVIEW): frozenset({_S.REVIEW}),
    (_S.REVIEW, _E.APPROVE): frozenset({_S.DONE}),
    (_S.REVIEW, _E.FAIL): frozenset({_S.ASSIGNED, _S.BLOCKED}),
    (_S.IN_PROGRESS, _E.FAIL): frozenset({_S.ASSIGNED, _S.BLOCKED}),
    (_S.IN_PROGRESS, _E.LOSE): frozenset({_S.ASSIGNED, _S.BLOCKED}),
    (_S.BLOCKED, _E.MANUAL_RETRY): frozenset({_S.ASSIGNED}),
    (_S.INBOX, _E.SKIP): frozenset({_S.SKIPPED}),
    (_S.ASSIGNED, _E.SKIP): frozenset({_S.SKIPPED}),
    (_S.BLOCKED, _E.SKIP): frozenset({_S.SKIPPED}),
    (_S.INBOX, _E.BLOCK): frozenset({_S.BLOCKED}),
    (_S.ASSIGNED, _E.BLOCK): frozenset({_S.BLOCKED}),
    (_S.IN_PROGRESS, _E.BLOCK): frozenset({_S.BLOCKED}),
}
"""Every legal move: ``(state, event) -> allowed target states``."""

assert not any(status in TERMINAL for status, _ in TRANSITIONS), (
    "terminal states must stay terminal"
)


def targets(task: Task, event: TaskEvent) -> frozenset[TaskStatus]:
    """The states ``event`` may move ``task`` to; raises if there are none."""
    allowed = TRANSITIONS.get((task.status, event))
    if allowed is None:
        if event is TaskEvent.MANUAL_RETRY:
            raise TaskNotBlocked(task.id, task.status.value)
        raise InvalidTransition(task.id, task.status.value, event.value)
    return allowed


def check(task: Task, event: TaskEvent, target: TaskStatus) -> TaskStatus:
    """Return ``target`` if the table allows ``task --event--> target``."""
    if target not in targets(task, event):
        raise InvalidTransition(task.id, task.status.value, event.value)
    return target


@attrs.frozen
class ProjectRule:
    accepts_retry: bool
    """Manual retries are allowed (else HTTP 409)."""
    dispatches: bool
    """Work is handed to executors now (else it is recorded as deferred)."""


_P = ProjectStatus

PROJECT_RULES: Mapping[ProjectStatus, ProjectRule] = {
    _P.DRAFT: ProjectRule(accepts_retry=False, dispatches=False),
    _P.PLANNING: ProjectRule(accepts_retry=False, dispatches=False),
    _P.AWAITING_APPROVAL: ProjectRule(accepts_retry=False, dispatches=False),
    _P.APPROVED: ProjectRule(accepts_retry=True, dispatches=True),
    _P.EXECUTING: ProjectRule(accepts_retry=True, dispatches=True),
    _P.PAUSED: ProjectRule(accepts_retry=True, dispatches=False),
    _P.COMPLETED: ProjectRule(accepts_retry=False, dispatches=False),
    _P.FAILED: ProjectRule(accepts_retry=False, dispatches=False),
    _P.CANCELLED: ProjectRule(accepts_retry=False, dispatches=False),
}
"""What each project status allows."""

assert set(PROJECT_RULES) == set(ProjectStatus)

ACCEPTS_RETRY = frozenset(s for s, rule in PROJECT_RULES.items() if rule.accepts_retry)
"""The project statuses in which a manual retry is accepted."""
DISPATCHES = frozenset(s for s, rule in PROJECT_RULES.items() if rule.dispatches)
"""The project statuses in which a new attempt is dispatched at once."""


def sources(event: TaskEvent, target: TaskStatus) -> tuple[TaskStatus, ...]:
    """The statuses from which ``event`` may move a task to ``target``, by value.

    What storages that render a decision into their own statements read the
    table through, so that the table stays the one place the moves are written.
    """
    found = (s for (s, e), allowed in TRANSITIONS.items() if e is event and target in allowed)
    return tuple(sorted(found, key=lambda s: s.value))


def dependencies_met(task: Task, blockers: Mapping[str, TaskStatus]) -> bool:
    """True when every task in ``task.blocked_by`` is ``done`` or ``skipped``.

    A blocker missing from ``blockers`` counts as unfinished, so a dangling
    dependency defers the task instead of silently releasing it.
    """
    return all(blockers.get(dep) in TERMINAL for dep in task.blocked_by)


@attrs.frozen(kw_only=True)
class RetryCheck:
    """The answer of :func:`can_retry`: allowed, or why not."""

    allowed: bool
    code: str | None = None
    """``not_blocked`` or ``project_not_runnable`` when not allowed."""
    reason: str | None = None
    """A sentence for people, the API's ``detail`` for the same refusal."""


def can_retry(task: Task, project: Project) -> RetryCheck:
    """Whether a manual retry of ``task`` would be accepted, and if not why.

    The checks run in the order the API reports them: task state, then project.
    """
    if (task.status, TaskEvent.MANUAL_RETRY) not in TRANSITIONS:
        return RetryCheck(
            allowed=False,
            code="not_blocked",
            reason=TaskNotBlocked(task.id, task.status.value).detail,
        )
    if not PROJECT_RULES[project.status].accepts_retry:
        return RetryCheck(
            allowed=False,
            code="project_not_runnable",
            reason=f"Cannot retry tasks in a '{project.status.value}' project",
        )
    return RetryCheck(allowed=True)
