"""Hypothesis strategies for the library's values and for sequences of events.

Every strategy builds values the library accepts: ids pass the storage
checks, a task's dependencies name tasks of its own project created before
it (so there are no cycles), retry counters are consistent. Use
:func:`event_sequences` with :func:`apply_event` to put a project through a
random history using the real services.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Literal, Union

import attrs
from hypothesis import strategies as st

from deepwork_retry._core.model import Project, Task
from deepwork_retry._core.policy import (
    Backoff,
    ExponentialBackoff,
    FixedBackoff,
    NoBackoff,
    RetryPolicy,
    TaskError,
)
from deepwork_retry._core.results import ChangeResult, RetryResult
from deepwork_retry._core.states import BlockedReason, ProjectStatus, RetryBudget, TaskStatus
from deepwork_retry._sync.services import ExecutorService, RetryService
from deepwork_retry.exceptions import DeepworkError

__all__ = [
    "EXECUTOR_EVENTS",
    "MANUAL_EVENTS",
    "Event",
    "apply_event",
    "backoffs",
    "event_sequences",
    "events",
    "ids",
    "project_statuses",
    "projects",
    "retry_policies",
    "task_errors",
    "task_lists",
    "task_statuses",
    "tasks",
    "timestamps",
]

MAX_ID = 255

_ID_CHARS = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")


def ids(*, max_size: int = 40) -> st.SearchStrategy[str]:
    """Valid ids: non-empty, no NUL, no lone surrogates, at most ``max_size`` characters."""
    return st.text(_ID_CHARS, min_size=1, max_size=min(max_size, MAX_ID))


def timestamps() -> st.SearchStrategy[datetime]:
    """Timezone-aware UTC times between 2000 and 2100, with microseconds."""
    return st.datetimes(
        min_value=datetime(2000, 1, 1),
        max_value=datetime(2100, 1, 1),
        timezones=st.just(timezone.utc),
    )


def project_statuses() -> st.SearchStrategy[ProjectStatus]:
    return st.sampled_from(ProjectStatus)


def task_statuses() -> st.SearchStrategy[TaskStatus]:
    return st.sampled_from(TaskStatus)


@st.composite
def projects(
    draw: st.DrawFn,
    *,
    project_ids: st.SearchStrategy[str] | None = None,
    statuses: st.SearchStrategy[ProjectStatus] | None = None,
) -> Project:
    """Projects in any status (or those ``statuses`` draws)."""
    created = draw(timestamps())
    return Project(
        id=draw(project_ids if project_ids is not None else ids()),
        status=draw(statuses if statuses is not None else project_statuses()),
        name=draw(st.text(max_size=30)),
        created_at=created,
        updated_at=created + timedelta(seconds=draw(st.integers(0, 10_000))),
    )


@st.composite
def tasks(
    draw: st.DrawFn,
    project_id: str,
    *,
    task_ids: st.SearchStrategy[str] | None = None,
    statuses: st.SearchStrategy[TaskStatus] | None = None,
    blocked_by: Sequence[str] = (),
) -> Task:
    """A task of ``project_id`` with consistent counters for its status.

    ``blocked_by`` lists the ids it may depend on; a subset of them is drawn.
    """
    status = draw(statuses if statuses is not None else task_statuses())
    max_retries = draw(st.integers(0, 5))
    retry_count = draw(st.integers(0, 10)) if status is not TaskStatus.INBOX else 0
    attempt = 0 if status is TaskStatus.INBOX else retry_count + 1
    blocked = status is TaskStatus.BLOCKED
    created = draw(timestamps())
    return Task(
        id=draw(task_ids if task_ids is not None else ids()),
        project_id=project_id,
        title=draw(st.text(max_size=30)),
        status=status,
        retry_count=retry_count,
        max_retries=max_retries,
        retries_left=draw(st.integers(0, max_retries)),
        error_message=draw(st.text(min_size=1, max_size=40)) if blocked else None,
        error_type="Error" if blocked else None,
        blocked_reason=draw(st.sampled_from(BlockedReason)) if blocked else None,
        blocked_by=draw(st.lists(st.sampled_from(blocked_by), unique=True, max_size=3))
        if blocked_by
        else (),
        attempt=attempt,
        created_at=created,
        updated_at=created,
        metadata=draw(
            st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=3)
        ),
    )


@st.composite
def task_lists(
    draw: st.DrawFn,
    project_id: str,
    *,
    min_size: int = 0,
    max_size: int = 8,
    statuses: st.SearchStrategy[TaskStatus] | None = None,
) -> list[Task]:
    """Tasks of one project with unique ids; each may depend on tasks before it."""
    task_ids = draw(st.lists(ids(max_size=12), min_size=min_size, max_size=max_size, unique=True))
    out: list[Task] = []
    for i, task_id in enumerate(task_ids):
        task = draw(
            tasks(project_id, task_ids=st.just(task_id), statuses=statuses, blocked_by=task_ids[:i])
        )
        out.append(task)
    return out


def task_errors() -> st.SearchStrategy[TaskError]:
    """Errors an executor may report, retryable or not, some with a Retry-After delay."""
    return st.builds(
        TaskError,
        type=st.sampled_from(["TimeoutError", "ConnectionError", "ValueError", "Fatal"]),
        message=st.text(max_size=40),
        retryable=st.none() | st.booleans(),
        retry_after=st.none() | st.floats(0, 3600, allow_nan=False),
    )


def backoffs() -> st.SearchStrategy[Backoff]:
    delays = st.floats(0, 600, allow_nan=False)
    exponential = st.builds(
        ExponentialBackoff,
        wait_initial=delays,
        wait_max=delays,
        wait_jitter=st.floats(0, 10, allow_nan=False),
        wait_exp_base=st.floats(1, 4, allow_nan=False),
    )
    return st.one_of(exponential, st.builds(FixedBackoff, wait=delays), st.just(NoBackoff()))


def retry_policies() -> st.SearchStrategy[RetryPolicy]:
    """Retry policies with any backoff, some non-retryable types, maybe a timeout."""
    return st.builds(
        RetryPolicy,
        backoff=backoffs(),
        non_retryable=st.frozensets(st.sampled_from(["ValueError", "Fatal"])),
        respect_retry_after=st.booleans(),
        timeout=st.none() | st.floats(0, 86_400, allow_nan=False),
        lease=st.floats(1, 3600, allow_nan=False),
    )


ExecutorKind = Literal["assign", "start", "heartbeat", "succeed", "fail"]
ManualKind = Literal["manual_retry", "skip", "block"]

EXECUTOR_EVENTS: tuple[ExecutorKind, ...] = ("assign", "start", "heartbeat", "succeed", "fail")
MANUAL_EVENTS: tuple[ManualKind, ...] = ("manual_retry", "skip", "block")


@attrs.frozen(kw_only=True)
class Event:
    """One thing that happens to a task: an executor report or a person's action."""

    kind: Union[ExecutorKind, ManualKind]  # noqa: UP007 - attrs evaluates it at runtime on 3.10
    task_id: str
    stale_by: int = 0
    """Reports carry the current attempt number plus this (non-zero: a stale report)."""
    error: TaskError | None = None
    budget: RetryBudget = RetryBudget.ONE_MORE


@st.composite
def events(draw: st.DrawFn, task_ids: Sequence[str]) -> Event:
    """An event for one of ``task_ids``; legal or not for the task's state at the time."""
    kind = draw(st.sampled_from(EXECUTOR_EVENTS + MANUAL_EVENTS))
    return Event(
        kind=kind,
        task_id=draw(st.sampled_from(list(task_ids))),
        stale_by=draw(st.sampled_from([0, 0, 0, -1, 1])),
        error=draw(task_errors()) if kind == "fail" else None,
        budget=draw(st.sampled_from(RetryBudget)),
    )


def event_sequences(
    task_ids: Sequence[str], *, max_size: int = 30
) -> st.SearchStrategy[list[Event]]:
    """Lists of events over ``task_ids``, to play with :func:`apply_event`."""
    if not task_ids:
        raise ValueError("event_sequences needs at least one task id")
    return st.lists(events(task_ids), max_size=max_size)


def apply_event(
    executor: ExecutorService, retrier: RetryService, project_id: str, event: Event
) -> ChangeResult | RetryResult | DeepworkError:
    """Play ``event`` through the services; a refusal is returned, not raised.

    Reports carry the task's current attempt number (plus ``stale_by``).
    """
    try:
        if event.kind == "manual_retry":
            return retrier.retry(project_id, event.task_id, budget=event.budget)
        if event.kind == "skip":
            return executor.skip(project_id, event.task_id)
        if event.kind == "block":
            return executor.block(project_id, event.task_id, message="blocked by hand")
        if event.kind == "assign":
            return executor.assign(project_id, event.task_id)
        _, task = executor.storage.load(project_id, event.task_id)
        token = task.attempt + event.stale_by
        if event.kind == "start":
            return executor.start(project_id, event.task_id, token)
        if event.kind == "heartbeat":
            return executor.heartbeat(project_id, event.task_id, token)
        if event.kind == "succeed":
            return executor.succeed(project_id, event.task_id, token)
        error = event.error or TaskError(type="Error")
        return executor.fail(project_id, event.task_id, token, error)
    except DeepworkError as exc:
        return exc
