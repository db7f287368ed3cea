"""Plans: what the core decided, for storage to apply atomically.

A plan names the version it expects to replace; storage applies all of it in
one transaction or none of it (raising
:class:`~deepwork_retry.exceptions.VersionConflict`).
"""

from __future__ import annotations

from datetime import datetime

import attrs

from deepwork_retry._core.model import (
    Attempt,
    DispatchEntry,
    IdempotencyRecord,
    Progress,
    Project,
    Task,
)
from deepwork_retry._core.policy import RetryDecision
from deepwork_retry._core.states import Outcome, TaskEvent


@attrs.frozen(kw_only=True)
class Guard:
    """Another task that must still be at ``version`` when the plan commits.

    Decisions that read other tasks (dependencies, dependants) guard them, so a
    concurrent change to one of them makes the plan conflict instead of acting
    on a stale read (for example, two blockers finishing at once would each
    think the other unfinished, and the dependant would never be released).
    """

    task_id: str
    version: int


@attrs.frozen(kw_only=True)
class Release:
    """Turn the deferred outbox entry of ``(task_id, attempt)`` pending."""

    task_id: str
    attempt: int


@attrs.frozen(kw_only=True)
class AttemptUpdate:
    """Fields of an existing attempt record to set (``None`` leaves a field)."""

    number: int
    started_at: datetime | None = None
    finished_at: datetime | None = None
    outcome: Outcome | None = None
    error_type: str | None = None
    error_message: str | None = None


@attrs.frozen(kw_only=True)
class Plan:
    """One task's change and everything that must commit with it."""

    event: TaskEvent
    before: Task
    """The task as the decision saw it; storage compares its version."""
    after: Task
    attempt_update: AttemptUpdate | None = None
    """Closes or starts the current attempt record."""
    new_attempt: Attempt | None = None
    """The attempt record of a new attempt (assign, retry)."""
    dispatch: DispatchEntry | None = None
    """The outbox entry for the new attempt, exactly one per (task, attempt)."""
    releases: tuple[Release, ...] = ()
    guards: tuple[Guard, ...] = ()
    project_version: int | None = None
    """When set, the project must still be at this version (its status was read)."""
    claimed_until: datetime | None = None
    """Pending entries this plan makes are claimed by the caller until then."""
    idempotency: IdempotencyRecord | None = None
    """Reserve this idempotency key in the same transaction."""
    decision: RetryDecision | None = None
    """For ``fail``/``lose``: what the retry policy decided."""


@attrs.frozen(kw_only=True)
class ProjectPlan:
    """A project status change and the deferred work it releases."""

    before: Project
    after: Project
    releases: tuple[Release, ...] = ()
    guards: tuple[Guard, ...] = ()
    claimed_until: datetime | None = None


@attrs.frozen(kw_only=True)
class Applied:
    """What storage returns after applying a plan."""

    task: Task
    progress: Progress
    dispatches: tuple[DispatchEntry, ...] = ()
    """Outbox entries this plan made pending (new or released), claimed by the caller."""
    deferred: bool = False
    """The plan's own dispatch was recorded as deferred."""
