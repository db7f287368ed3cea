"""Frozen values: projects, tasks, attempts, outbox entries, progress.

All are keyword-only attrs classes; change them with :func:`attrs.evolve`.
Timestamps are timezone-aware UTC :class:`~datetime.datetime` values.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import attrs

from deepwork_retry._core.states import (
    BlockedReason,
    DispatchState,
    Outcome,
    ProjectStatus,
    RetryBudget,
    TaskStatus,
    Trigger,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _tuple_of_str(value: Any) -> tuple[str, ...]:
    return tuple(value)


def _frozen_mapping(value: Any) -> Mapping[str, Any]:
    return dict(value)


@attrs.frozen(kw_only=True)
class Project:
    id: str
    status: ProjectStatus = ProjectStatus.EXECUTING
    name: str = ""
    created_at: datetime = _EPOCH
    updated_at: datetime = _EPOCH
    version: int = 1


@attrs.frozen(kw_only=True)
class Task:
    id: str
    project_id: str
    title: str = ""
    status: TaskStatus = TaskStatus.INBOX
    retry_count: int = 0
    """Retries so far, automatic and manual; never decreases."""
    max_retries: int = 3
    """Automatic retries allowed after the first attempt."""
    retries_left: int = attrs.field(
        default=attrs.Factory(lambda self: self.max_retries, takes_self=True)
    )
    """Automatic retries still allowed (a manual retry may reset or zero it)."""
    error_message: str | None = None
    error_type: str | None = None
    blocked_reason: BlockedReason | None = None
    blocked_by: tuple[str, ...] = attrs.field(default=(), converter=_tuple_of_str)
    attempt: int = 0
    """The current attempt number, the executor's fencing token; 0 before any."""
    lease_expires_at: datetime | None = None
    created_at: datetime = _EPOCH
    updated_at: datetime = _EPOCH
    started_at: datetime | None = None
    completed_at: datetime | None = None
    version: int = 1
    metadata: Mapping[str, Any] = attrs.field(
        factory=dict, converter=_frozen_mapping, eq=False, hash=False
    )


@attrs.frozen(kw_only=True)
class Attempt:
    """One execution of a task, kept forever as its history."""

    task_id: str
    project_id: str
    number: int
    trigger: Trigger
    dispatched_at: datetime
    available_at: datetime
    """Not to be delivered before this time (backoff)."""
    actor: str | None = None
    reason: str | None = None
    budget: RetryBudget | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    outcome: Outcome | None = None
    error_type: str | None = None
    error_message: str | None = None


@attrs.frozen(kw_only=True)
class DispatchEntry:
    """A row of the dispatch outbox: one per (task, attempt)."""

    project_id: str
    task_id: str
    attempt: int
    state: DispatchState
    available_at: datetime
    created_at: datetime
    claimed_until: datetime | None = None
    tries: int = 0
    last_error: str | None = None
    delivered_at: datetime | None = None

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.project_id, self.task_id, self.attempt)


@attrs.frozen(kw_only=True)
class Progress:
    project_id: str
    total: int = 0
    inbox: int = 0
    assigned: int = 0
    in_progress: int = 0
    review: int = 0
    done: int = 0
    blocked: int = 0
    skipped: int = 0

    @property
    def completed(self) -> int:
        return self.done

    @property
    def percent(self) -> int:
        if self.total <= 0:
            return 0
        return (100 * (self.done + self.skipped)) // self.total

    def count(self, status: TaskStatus) -> int:
        value: int = getattr(self, status.value)
        return value

    def shifted(self, before: TaskStatus | None, after: TaskStatus | None) -> Progress:
        """The progress after one task moved from ``before`` to ``after``."""
        changes: dict[str, int] = {}
        if before is not None:
            changes[before.value] = self.count(before) - 1
        if after is not None:
            changes[after.value] = changes.get(after.value, self.count(after)) + 1
        total = self.total + (after is not None) - (before is not None)
        return attrs.evolve(self, total=total, **changes)  # type: ignore[arg-type]

    @classmethod
    def recount(cls, project_id: str, statuses: Any) -> Progress:
        """Progress computed by counting ``statuses`` (an iterable of TaskStatus)."""
        counts = {status.value: 0 for status in TaskStatus}
        total = 0
        for status in statuses:
            counts[TaskStatus(status).value] += 1
            total += 1
        return cls(project_id=project_id, total=total, **counts)


@attrs.frozen(kw_only=True)
class IdempotencyRecord:
    """What a request with an ``Idempotency-Key`` did, for replaying it."""

    key: str
    project_id: str
    task_id: str
    created_at: datetime
    status_code: int | None = None
    """``None`` while the request that reserved the key has not finished."""
    body: str | None = None
