"""What the services return, and its JSON form (the API's response bodies)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from json.encoder import encode_basestring
from typing import Any, Literal

import attrs

from deepwork_retry._core.machine import RetryCheck
from deepwork_retry._core.model import (
    Attempt,
    IdempotencyRecord,
    Progress,
    Project,
    ProjectSummary,
    Task,
)
from deepwork_retry._core.policy import RetryDecision

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
    attempted: bool = True
    """False for a task the request stopped before (see :attr:`BulkResult.stopped`)."""


BulkStop = Literal["storage_unavailable", "out_of_time", "interrupted"]

STORAGE_STOPPED: BulkStop = "storage_unavailable"
OUT_OF_TIME: BulkStop = "out_of_time"
INTERRUPTED: BulkStop = "interrupted"

NOT_ATTEMPTED: dict[BulkStop, str] = {
    STORAGE_STOPPED: "Not attempted: storage is unavailable; try again later",
    OUT_OF_TIME: "Not attempted: the request ran out of time; send it again to go on",
    INTERRUPTED: "Not attempted: the request failed after retrying the tasks before; "
    "send it again to go on",
}
"""The ``detail`` of a task a bulk request stopped before, by the reason it stopped."""


@attrs.frozen(kw_only=True)
class BulkResult:
    dry_run: bool
    items: tuple[BulkItem, ...]
    next_after: str | None
    """Pass as ``after`` for the next page; ``None`` on the last page."""
    stopped: BulkStop | None = None
    """Why the request stopped before the end of its page; ``None`` when it did not."""


def bulk_outcome(
    dry_run: bool,
    finished: Sequence[BulkItem],
    tasks: Sequence[Task],
    *,
    limit: int,
    stop: BulkStop | None = None,
) -> BulkResult:
    """The result of a bulk request over the page ``tasks`` that finished ``finished``.

    ``finished`` are the first tasks of the page, each retried or refused by
    a rule (final either way). A request that stopped early (``stop``) lists
    every other task of the page as not attempted, nothing changed for them,
    and its ``next_after`` is the last task finished: the ``after`` that goes
    on from where it stopped.
    """
    if stop is not None and len(finished) < len(tasks):
        rest = tasks[len(finished) :]
        detail = NOT_ATTEMPTED[stop]
        items = (
            *finished,
            *(BulkItem(task_id=t.id, retried=False, detail=detail, attempted=False) for t in rest),
        )
        last = finished[-1].task_id if finished else None
        return BulkResult(dry_run=dry_run, items=items, next_after=last, stopped=stop)
    next_after = tasks[-1].id if len(tasks) == limit else None
    return BulkResult(dry_run=dry_run, items=tuple(finished), next_after=next_after)


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


DISPATCH_FAILED = "The dispatcher failed; the outbox relay will deliver it"
"""What a response says of a failed dispatch: the dispatcher's own message (a broker's
address, a driver's words) is kept for the outbox and the logs, not shown to clients."""


def _dispatch_error(outcome: DispatchOutcome) -> str | None:
    return None if outcome.error is None else DISPATCH_FAILED


def dispatch_json(outcome: DispatchOutcome) -> dict[str, Any]:
    return {
        "status": outcome.status,
        "task_id": outcome.task_id,
        "attempt": outcome.attempt,
        "error": _dispatch_error(outcome),
    }


def retry_json(result: RetryResult) -> dict[str, Any]:
    return {
        "success": result.success,
        "task": task_json(result.task),
        "progress": progress_json(result.progress),
        "dispatch": dispatch_json(result.dispatch),
    }


# -- the retry's answer as JSON text, without the dicts in between -------------------

COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)
"""The API's JSON form: compact, UTF-8 text (not ``\\u`` escapes), one encoder reused."""


def _j(value: Any) -> str:
    """``COMPACT.encode(value)``, with the common scalar types written directly."""
    kind = type(value)
    if kind is str:
        return encode_basestring(value)
    if kind is int:
        return int.__repr__(value)
    if value is None:
        return "null"
    return COMPACT.encode(value)


def _tsj(value: datetime | None) -> str:
    return "null" if value is None else '"' + value.isoformat() + '"'


def retry_text(result: RetryResult) -> str:
    """Exactly ``COMPACT.encode(retry_json(result))``, built without the dicts.

    The retry endpoint answers every request with this; the test suite holds it
    equal to the dict form for generated tasks.
    """
    task, progress, dispatch = result.task, result.progress, result.dispatch
    reason = task.blocked_reason
    metadata = task.metadata
    return (
        f'{{"success":{"true" if result.success is True else _j(result.success)},'
        f'"task":{{"id":{_j(task.id)},"project_id":{_j(task.project_id)},'
        f'"title":{_j(task.title)},"status":{_j(task.status.value)},'
        f'"retry_count":{_j(task.retry_count)},"max_retries":{_j(task.max_retries)},'
        f'"retries_left":{_j(task.retries_left)},"error_message":{_j(task.error_message)},'
        f'"error_type":{_j(task.error_type)},'
        f'"blocked_reason":{"null" if reason is None else _j(reason.value)},'
        f'"blocked_by":{COMPACT.encode(list(task.blocked_by)) if task.blocked_by else "[]"},'
        f'"attempt":{_j(task.attempt)},"created_at":{_tsj(task.created_at)},'
        f'"updated_at":{_tsj(task.updated_at)},"started_at":{_tsj(task.started_at)},'
        f'"completed_at":{_tsj(task.completed_at)},'
        f'"lease_expires_at":{_tsj(task.lease_expires_at)},'
        f'"metadata":{COMPACT.encode(dict(metadata)) if metadata else "{}"}}},'
        f'"progress":{{"total":{_j(progress.total)},"completed":{_j(progress.completed)},'
        f'"in_progress":{_j(progress.in_progress)},"percent":{_j(progress.percent)},'
        f'"inbox":{_j(progress.inbox)},"assigned":{_j(progress.assigned)},'
        f'"review":{_j(progress.review)},"blocked":{_j(progress.blocked)},'
        f'"skipped":{_j(progress.skipped)},"done":{_j(progress.done)}}},'
        f'"dispatch":{{"status":{_j(dispatch.status)},"task_id":{_j(dispatch.task_id)},'
        f'"attempt":{_j(dispatch.attempt)},"error":{_j(_dispatch_error(dispatch))}}}}}'
    )


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


def check_json(check: RetryCheck) -> dict[str, Any]:
    return {"allowed": check.allowed, "code": check.code, "reason": check.reason}


def bulk_json(result: BulkResult) -> dict[str, Any]:
    """The bulk answer: ``retried`` counts what was retried, so a dry run says 0 and
    counts what it would retry in ``would_retry``, as its items do."""
    count = sum(item.retried for item in result.items)
    found: dict[str, Any] = {
        "dry_run": result.dry_run,
        "items": [
            {
                "task_id": item.task_id,
                ("would_retry" if result.dry_run else "retried"): item.retried,
                "detail": item.detail,
                "dispatch": item.dispatch,
                "attempted": item.attempted,
            }
            for item in result.items
        ],
        "retried": 0 if result.dry_run else count,
    }
    if result.dry_run:
        found["would_retry"] = count
    found["next_after"] = result.next_after
    found["stopped"] = result.stopped
    return found


def tasks_page_json(tasks: Sequence[Task], next_after: str | None) -> dict[str, Any]:
    return {"tasks": [task_json(t) for t in tasks], "next_after": next_after}


def project_json(project: Project) -> dict[str, Any]:
    return {"id": project.id, "status": project.status.value, "name": project.name}


def project_progress_json(project: Project, progress: Progress) -> dict[str, Any]:
    """A project with its progress (the progress route's body, an item of the project list)."""
    return {"project": project_json(project), "progress": progress_json(progress)}


def projects_page_json(
    summaries: Sequence[ProjectSummary], next_after: str | None
) -> dict[str, Any]:
    return {
        "projects": [project_progress_json(s.project, s.progress) for s in summaries],
        "next_after": next_after,
    }


def blocked_page_json(tasks: Sequence[Task], next_after: str | None) -> dict[str, Any]:
    """A page of blocked tasks across projects; ``next_after`` is the cursor's text form
    (:func:`~deepwork_retry._core.inputs.blocked_cursor`)."""
    return {"tasks": [task_json(t) for t in tasks], "next_after": next_after}
