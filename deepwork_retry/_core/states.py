"""The vocabularies: task and project states, events, triggers, outcomes.

Every enum is a ``str`` subclass whose value is the lowercase wire form, so a
value serialises as itself and compares equal to its string.
"""

from __future__ import annotations

import enum


class _StrEnum(str, enum.Enum):
    def __str__(self) -> str:
        # ``_value_``: the member's value without the ``value`` property's lookup.
        return str(self._value_)


class TaskStatus(_StrEnum):
    INBOX = "inbox"
    ASSIGNED = "assigned"
    IN_PROGRESS = "in_progress"
    REVIEW = "review"
    DONE = "done"
    BLOCKED = "blocked"
    SKIPPED = "skipped"


TERMINAL = frozenset({TaskStatus.DONE, TaskStatus.SKIPPED})
"""States a task never leaves."""


class ProjectStatus(_StrEnum):
    DRAFT = "draft"
    PLANNING = "planning"
    AWAITING_APPROVAL = "awaiting_approval"
    APPROVED = "approved"
    EXECUTING = "executing"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TaskEvent(_StrEnum):
    ASSIGN = "assign"
    START = "start"
    HEARTBEAT = "heartbeat"
    SUCCEED = "succeed"
    SUBMIT_REVIEW = "submit_review"
    APPROVE = "approve"
    FAIL = "fail"
    LOSE = "lose"
    MANUAL_RETRY = "manual_retry"
    SKIP = "skip"
    BLOCK = "block"


class Trigger(_StrEnum):
    """Why an attempt was created."""

    INITIAL = "initial"
    AUTO_RETRY = "auto_retry"
    MANUAL_RETRY = "manual_retry"


class RetryBudget(_StrEnum):
    """What a manual retry does to the automatic retry budget."""

    ONE_MORE = "one_more"
    """Exactly one more execution; a failure blocks the task again."""
    FULL = "full"
    """The automatic budget (``max_retries``) starts afresh."""


class Outcome(_StrEnum):
    """How an attempt ended."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    LOST = "lost"
    CANCELLED = "cancelled"


class BlockedReason(_StrEnum):
    BUDGET_EXHAUSTED = "budget_exhausted"
    NON_RETRYABLE = "non_retryable"
    TIMEOUT = "timeout"
    MANUAL = "manual"


class DispatchState(_StrEnum):
    """Where an outbox entry stands."""

    DEFERRED = "deferred"
    """Recorded; waits for unfinished dependencies or a paused project."""
    PENDING = "pending"
    """Recorded; not yet handed to the dispatcher (or the dispatcher failed)."""
    DELIVERED = "delivered"
    """Handed to the dispatcher."""
    CANCELLED = "cancelled"
    """The attempt it was for is no longer current."""
