"""Frozen values: projects, tasks, attempts, outbox entries, progress.

All are keyword-only attrs classes; change them with :func:`attrs.evolve`
(or, on hot paths, with the equivalent ``evolve_*`` functions below).
Timestamps are timezone-aware UTC :class:`~datetime.datetime` values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

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

IDEMPOTENCY_PERIOD = timedelta(hours=24)
"""How long an idempotency key lives by default (see :mod:`deepwork_retry._core.retention`)."""


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
    """One execution of a task, kept as its history (see :mod:`~deepwork_retry._core.retention`)."""

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
    trace: str | None = None
    """The W3C trace context of the request that made the attempt
    (``traceparent``, then ``;`` and ``tracestate`` when there is one), so the
    worker's attempt continues that trace; ``None`` without telemetry."""

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
        if before is after:
            return self
        changes: dict[str, int] = {}
        if before is not None:
            changes[before._value_] = getattr(self, before._value_) - 1
        if after is not None:
            changes[after._value_] = getattr(self, after._value_) + 1
        total = self.total + (after is not None) - (before is not None)
        return evolve_progress(self, total=total, **changes)

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
class ProjectSummary:
    """A project with its progress, as the cross-project listing returns it."""

    project: Project
    progress: Progress


def _expiry(record: IdempotencyRecord) -> datetime:
    try:
        return record.created_at + IDEMPOTENCY_PERIOD
    except OverflowError:
        return datetime.max.replace(tzinfo=record.created_at.tzinfo)


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
    expires_at: datetime = attrs.field(default=attrs.Factory(_expiry, takes_self=True))
    """From this moment the record is absent: its key is free again (24 hours
    after ``created_at`` unless the service was given another period)."""

    def expired(self, now: datetime) -> bool:
        """Whether the record has expired at ``now`` (then it counts as absent)."""
        return self.expires_at <= now


# -- copying with changes ----------------------------------------------------------------
_T = TypeVar("_T", bound=attrs.AttrsInstance)
_KEEP: Any = object()


def _evolver(cls: type[_T]) -> Callable[..., _T]:
    """A function doing what ``attrs.evolve(value, **changes)`` does for ``cls``, faster.

    ``attrs.evolve`` inspects the class and builds a keyword dict on every
    call; this writes each slot once, in generated code, and runs each
    field's converter as ``__init__`` would. The classes here have no
    validators and no ``__attrs_post_init__``, which this relies on.
    """
    fields = attrs.fields(cls)
    assert all(f.init and f.validator is None for f in fields)
    assert not hasattr(cls, "__attrs_post_init__")
    names = [f.name for f in fields]
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": cls, "_KEEP": _KEEP}
    lines = [f"def evolve(self, *, {', '.join(f'{n}=_KEEP' for n in names)}):"]
    lines.append("    new = _new(_cls)")
    for field in fields:
        name = field.name
        namespace[f"_set_{name}"] = getattr(cls, name).__set__  # the slot itself
        value = f"self.{name} if {name} is _KEEP else {name}"
        if field.converter is not None:
            namespace[f"_convert_{name}"] = field.converter
            value = f"_convert_{name}({value})"
        lines.append(f"    _set_{name}(new, {value})")
    lines.append("    return new")
    exec("\n".join(lines), namespace)  # code generated from the class's own fields
    function: Callable[..., _T] = namespace["evolve"]
    function.__doc__ = f"``attrs.evolve`` for :class:`{cls.__name__}`."
    return function


evolve_task: Callable[..., Task] = _evolver(Task)
evolve_progress: Callable[..., Progress] = _evolver(Progress)
evolve_entry: Callable[..., DispatchEntry] = _evolver(DispatchEntry)
