"""Hypothesis strategies for the library's values and for sequences of events.

Every strategy builds values the library accepts: ids pass the storage
checks, a task's dependencies name tasks of its own project created before
it (so there are no cycles), retry counters are consistent. Use
:func:`event_sequences` with :func:`apply_event` to put a project through a
random history using the real services.

The ``any_*`` strategies and :func:`retry_results` build records with any
field values, consistent or not (any text, any count, naive times on
request): for code that only writes values out, such as the JSON answers
and the wire format, never for a storage, which refuses many of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Literal, Union, get_args

import attrs
from hypothesis import strategies as st

from deepwork_retry._core.model import Attempt, Progress, Project, Task
from deepwork_retry._core.policy import (
    Backoff,
    ExponentialBackoff,
    FixedBackoff,
    NoBackoff,
    RetryPolicy,
    TaskError,
)
from deepwork_retry._core.results import ChangeResult, DispatchOutcome, DispatchStatus, RetryResult
from deepwork_retry._core.states import (
    BlockedReason,
    Outcome,
    ProjectStatus,
    RetryBudget,
    TaskStatus,
    Trigger,
)
from deepwork_retry._sync.services import ExecutorService, RetryService
from deepwork_retry.exceptions import DeepworkError

__all__ = [
    "EXECUTOR_EVENTS",
    "MANUAL_EVENTS",
    "Event",
    "any_attempts",
    "any_tasks",
    "any_timestamps",
    "apply_event",
    "backoffs",
    "dispatch_outcomes",
    "event_sequences",
    "events",
    "ids",
    "json_values",
    "progresses",
    "project_statuses",
    "projects",
    "retry_policies",
    "retry_results",
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


# -- records with any field values, for code that writes them out ----------------------------

_TEXTS = st.text(max_size=30)
_COUNTS = st.integers(min_value=0, max_value=10**12)
_ZONES = (timezone.utc, timezone(timedelta(hours=5, minutes=30)))


def any_timestamps(*, naive: bool = False) -> st.SearchStrategy[datetime]:
    """Times from 1970 to 2200 with microseconds, in UTC or at +05:30; naive ones too
    with ``naive``."""
    zones = st.sampled_from([*_ZONES, None] if naive else list(_ZONES))
    return st.builds(
        lambda moment, zone: moment.replace(tzinfo=zone),
        st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1)),
        zones,
    )


def json_values(*, max_leaves: int = 8) -> st.SearchStrategy[object]:
    """JSON data: null, booleans, integers, finite floats and text, in lists and objects."""
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXTS,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXTS, inner, max_size=3),
        max_leaves=max_leaves,
    )


def any_tasks(*, naive: bool = False) -> st.SearchStrategy[Task]:
    """Tasks with any field values (see the module's note); ``naive`` as in
    :func:`any_timestamps`."""
    times = any_timestamps(naive=naive)
    return st.builds(
        Task,
        id=_TEXTS,
        project_id=_TEXTS,
        title=_TEXTS,
        status=st.sampled_from(TaskStatus),
        retry_count=_COUNTS,
        max_retries=_COUNTS,
        retries_left=_COUNTS,
        error_message=st.none() | _TEXTS,
        error_type=st.none() | _TEXTS,
        blocked_reason=st.none() | st.sampled_from(BlockedReason),
        blocked_by=st.lists(_TEXTS, max_size=3),
        attempt=_COUNTS,
        lease_expires_at=st.none() | times,
        created_at=times,
        updated_at=times,
        started_at=st.none() | times,
        completed_at=st.none() | times,
        metadata=st.dictionaries(_TEXTS, json_values(), max_size=3),
    )


@st.composite
def progresses(draw: st.DrawFn) -> Progress:
    """A project's counts by status, any size; the total is their sum."""
    counts = {status.value: draw(st.integers(0, 10**6)) for status in TaskStatus}
    return Progress(project_id=draw(_TEXTS), total=sum(counts.values()), **counts)


def dispatch_outcomes() -> st.SearchStrategy[DispatchOutcome]:
    """What became of a move's dispatch, in any of its statuses."""
    return st.builds(
        DispatchOutcome,
        status=st.sampled_from(get_args(DispatchStatus)),
        task_id=_TEXTS,
        attempt=_COUNTS,
        error=st.none() | _TEXTS,
    )


def retry_results(*, naive: bool = False) -> st.SearchStrategy[RetryResult]:
    """A retry's answer built of :func:`any_tasks`, :func:`progresses` and
    :func:`dispatch_outcomes`."""
    return st.builds(
        RetryResult,
        task=any_tasks(naive=naive),
        progress=progresses(),
        dispatch=dispatch_outcomes(),
    )


def any_attempts(
    *,
    texts: st.SearchStrategy[str] = _TEXTS,
    times: st.SearchStrategy[datetime] | None = None,
) -> st.SearchStrategy[Attempt]:
    """Attempt records with any field values; ``texts`` draws the ids and messages,
    ``times`` the times (by default :func:`any_timestamps`)."""
    times = any_timestamps() if times is None else times
    maybe = st.none() | texts
    return st.builds(
        Attempt,
        task_id=texts,
        project_id=texts,
        number=_COUNTS,
        trigger=st.sampled_from(Trigger),
        dispatched_at=times,
        available_at=times,
        actor=maybe,
        reason=maybe,
        budget=st.none() | st.sampled_from(RetryBudget),
        started_at=st.none() | times,
        finished_at=st.none() | times,
        outcome=st.none() | st.sampled_from(Outcome),
        error_type=maybe,
        error_message=maybe,
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
