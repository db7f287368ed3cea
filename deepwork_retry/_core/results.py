"""What the services return, and its JSON form (the API's response bodies)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

import attrs

from deepwork_retry._core.machine import RetryCheck
from deepwork_retry._core.model import Attempt, DispatchEntry, IdempotencyRecord, Progress, Task
from deepwork_retry._core.policy import Block, RetryAt, RetryDecision

DispatchStatus = Literal["dispatched", "pending", "deferred"]


@attrs.frozen(kw_only=True)
class DispatchOutcome:
    """What happened to the dispatch of one (task, attempt)."""

    status: DispatchStatus
    task_id: str
    attempt: int
    error: str | None = None
    """Why delivery failed, when ``status`` is ``pending`` because it did."""


@attrs.frozen(kw_only=True)
class RetryResult:
    """A committed manual retry."""

    task: Task
    progress: Progress
    dispatch: DispatchOutcome
    idempotency: IdempotencyRecord | None = None
    """The idempotency key reserved with the retry, when one was given."""

    @property
    def success(self) -> bool:
        """Committed and its dispatch durably recorded: always true once returned."""
        return True


@attrs.frozen(kw_only=True)
class ChangeResult:
    """A committed executor event (start, fail, succeed, ...)."""

    task: Task
    progress: Progress
    decision: RetryDecision | None = None
    dispatches: tuple[DispatchOutcome, ...] = ()


@attrs.frozen(kw_only=True)
class BulkItem:
    task_id: str
    retried: bool
    """With ``dry_run``: would be retried."""
    detail: str | None = None
    """Why not, when not."""
    dispatch: DispatchStatus | None = None


@attrs.frozen(kw_only=True)
class BulkResult:
    dry_run: bool
    items: tuple[BulkItem, ...]
    next_after: str | None
    """Pass as ``after`` for the next page; ``None`` on the last page."""


# -- JSON ------------------------------------------------------------------------


def _ts(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def task_json(task: Task) -> dict[str, Any]:
    return {
        "id": task.id,
        "project_id": task.project_id,
        "title": task.title,
        "status": task.status.value,
        "retry_count": task.retry_count,
        "max_retries": task.max_retries,
        "retries_left": task.retries_left,
        "error_message": task.error_message,
        "error_type": task.error_type,
        "blocked_reason": None if task.blocked_reason is None else task.blocked_reason.value,
        "blocked_by": list(task.blocked_by),
        "attempt": task.attempt,
        "created_at": _ts(task.created_at),
        "updated_at": _ts(task.updated_at),
        "started_at": _ts(task.started_at),
        "completed_at": _ts(task.completed_at),
        "lease_expires_at": _ts(task.lease_expires_at),
        "metadata": dict(task.metadata),
    }


def progress_json(progress: Progress) -> dict[str, Any]:
    return {
        "total": progress.total,
        "completed": progress.completed,
        "in_progress": progress.in_progress,
        "percent": progress.percent,
        "inbox": progress.inbox,
        "assigned": progress.assigned,
        "review": progress.review,
        "blocked": progress.blocked,
        "skipped": progress.skipped,
        "done": progress.done,
    }


def dispatch_json(outcome: DispatchOutcome) -> dict[str, Any]:
    return {
        "status": outcome.status,
        "task_id": outcome.task_id,
        "attempt": outcome.attempt,
        "error": outcome.error,
    }


def retry_json(result: RetryResult) -> dict[str, Any]:
    return {
        "success": result.success,
        "task": task_json(result.task),
        "progress": progress_json(result.progress),
        "dispatch": dispatch_json(result.dispatch),
    }


def attempt_json(attempt: Attempt) -> dict[str, Any]:
    return {
        "number": attempt.number,
        "trigger": attempt.trigger.value,
        "actor": attempt.actor,
        "reason": attempt.reason,
        "budget": None if attempt.budget is None else attempt.budget.value,
        "dispatched_at": _ts(attempt.dispatched_at),
        "available_at": _ts(attempt.available_at),
        "started_at": _ts(attempt.started_at),
        "finished_at": _ts(attempt.finished_at),
        "outcome": None if attempt.outcome is None else attempt.outcome.value,
        "error_type": attempt.error_type,
        "error_message": attempt.error_message,
    }


def entry_json(entry: DispatchEntry) -> dict[str, Any]:
    return {
        "attempt": entry.attempt,
        "state": entry.state.value,
        "available_at": _ts(entry.available_at),
        "tries": entry.tries,
        "last_error": entry.last_error,
        "delivered_at": _ts(entry.delivered_at),
    }


def check_json(check: RetryCheck) -> dict[str, Any]:
    return {"allowed": check.allowed, "code": check.code, "reason": check.reason}


def decision_json(decision: RetryDecision | None) -> dict[str, Any] | None:
    if isinstance(decision, RetryAt):
        return {"retry": True, "at": _ts(decision.at), "delay": decision.delay}
    if isinstance(decision, Block):
        return {"retry": False, "blocked_reason": decision.reason.value}
    return None


def bulk_json(result: BulkResult) -> dict[str, Any]:
    return {
        "dry_run": result.dry_run,
        "items": [
            {
                "task_id": item.task_id,
                ("would_retry" if result.dry_run else "retried"): item.retried,
                "detail": item.detail,
                "dispatch": item.dispatch,
            }
            for item in result.items
        ],
        "retried": sum(item.retried for item in result.items),
        "next_after": result.next_after,
    }


def tasks_page_json(tasks: Sequence[Task], next_after: str | None) -> dict[str, Any]:
    return {"tasks": [task_json(t) for t in tasks], "next_after": next_after}
