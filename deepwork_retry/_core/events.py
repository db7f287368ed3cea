"""Lifecycle events: what a host is told about, decided once, from the plan.

A move that a host cares about (a task blocked, retried, an attempt started,
succeeded, failed or lost, a dispatch failed or deferred, a project's
progress changed) yields one :class:`Event` per fact. The events of a move
are a pure function of its :class:`~deepwork_retry._core.plans.Plan`
(:func:`events_of`); every storage writes them in the same transaction as
the move itself, so an event exists exactly when its move committed, and
numbers them per project: ``seq`` 1, 2, 3 … in commit order, no gaps. The
pair ``(project_id, seq)`` (:attr:`Event.id`) is what a consumer
deduplicates on, and what a live stream resumes from.

Storages never restate which events a move yields or what they carry: the
step-by-step apply calls :func:`events_of`, the one-step retries call
:func:`manual_retry_events`, and an outbox delivery failure
:func:`dispatch_failed`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import attrs

from deepwork_retry._core.model import DispatchEntry, Task, _evolver, evolve_task
from deepwork_retry._core.plans import Plan
from deepwork_retry._core.states import (
    BlockedReason,
    DispatchState,
    Outcome,
    RetryBudget,
    TaskEvent,
    TaskStatus,
    Trigger,
    _StrEnum,
)


class EventType(_StrEnum):
    """The kinds of lifecycle event; the value is the wire name."""

    TASK_BLOCKED = "task.blocked"
    """The task is ``blocked``: ``data.reason`` says why (``budget_exhausted``,
    ``non_retryable``, ``timeout``, ``manual``), ``data.cause`` which move
    (``fail``, ``lose``: the executor was lost, ``block``: by hand)."""
    TASK_RETRIED = "task.retried"
    """A new attempt was made: ``data.trigger`` is ``manual_retry`` (with
    ``actor``, ``reason``, ``budget``) or ``auto_retry`` (with ``available_at``)."""
    ATTEMPT_STARTED = "attempt.started"
    ATTEMPT_SUCCEEDED = "attempt.succeeded"
    """The attempt succeeded; ``data.status`` is ``done``, or ``review`` when it
    waits for approval."""
    ATTEMPT_FAILED = "attempt.failed"
    ATTEMPT_LOST = "attempt.lost"
    """The executor stopped heartbeating: the lease expired."""
    DISPATCH_FAILED = "dispatch.failed"
    """The dispatcher refused the attempt; the outbox tries again at ``data.retry_at``."""
    DISPATCH_DEFERRED = "dispatch.deferred"
    """The attempt waits for unfinished dependencies or a paused project."""
    PROJECT_PROGRESS = "project.progress"
    """A task of the project changed status: ``data.from`` and ``data.to``
    (``null`` for a task added). Applied to a progress read, the counters
    follow exactly."""


RETRIES_EXHAUSTED = BlockedReason.BUDGET_EXHAUSTED
"""The ``task.blocked`` reason of a task whose automatic retries ran out."""


def _data(value: Any) -> dict[str, Any]:
    return dict(value)


@attrs.frozen(kw_only=True)
class Event:
    """One lifecycle event, as stored and delivered.

    ``seq`` is 0 until a storage numbers it in the move's transaction.
    ``data`` holds JSON values only (strings, numbers, booleans, ``None``).
    """

    project_id: str
    seq: int = 0
    type: EventType
    task_id: str | None = None
    attempt: int | None = None
    at: datetime
    data: Mapping[str, Any] = attrs.field(factory=dict, converter=_data, eq=True, hash=False)

    @property
    def id(self) -> str:
        """``"{project_id}:{seq}"``: unique, what a consumer deduplicates on."""
        return f"{self.project_id}:{self.seq}"

    def to_json(self) -> dict[str, Any]:
        """The event's wire form (webhook body, stream data)."""
        return {
            "id": self.id,
            "type": self.type.value,
            "project_id": self.project_id,
            "seq": self.seq,
            "task_id": self.task_id,
            "attempt": self.attempt,
            "at": self.at.isoformat(),
            "data": dict(self.data),
        }

    def dumps(self) -> str:
        """:meth:`to_json` as compact JSON text."""
        return _ENCODE(self.to_json())


@attrs.frozen(kw_only=True)
class EventRetry:
    """A delivery of ``event`` to the subscriber ``subscriber`` that failed.

    It is tried again at ``retry_at`` until the subscriber's limit of
    ``tries``; then it is ``parked``: kept, listed and replayable by hand.
    """

    event: Event
    subscriber: str
    tries: int
    retry_at: datetime
    last_error: str | None = None
    parked: bool = False
    claimed_until: datetime | None = None


def _maker() -> Callable[[str, EventType, str | None, int | None, datetime, dict[str, Any]], Event]:
    """A constructor of unnumbered events for the core's own use, faster than ``Event(...)``.

    It writes each slot once, as :func:`~deepwork_retry._core.model._evolver`
    does, and keeps ``data`` as given: the core passes a dict it has just built
    and nobody else holds, which the converter would copy again. (``Event`` has
    no validators and no ``__attrs_post_init__``, which this relies on.)
    """
    fields = attrs.fields(Event)
    assert all(f.init and f.validator is None for f in fields)
    assert not hasattr(Event, "__attrs_post_init__")
    slot = {f.name: getattr(Event, f.name).__set__ for f in fields}
    # Every field is written below: a new one must be added there too.
    assert set(slot) == {"project_id", "seq", "type", "task_id", "attempt", "at", "data"}
    new = object.__new__
    set_project, set_seq, set_type = slot["project_id"], slot["seq"], slot["type"]
    set_task, set_attempt, set_at, set_data = (
        slot["task_id"], slot["attempt"], slot["at"], slot["data"]
    )  # fmt: skip

    def make(
        project_id: str,
        kind: EventType,
        task_id: str | None,
        attempt: int | None,
        at: datetime,
        data: dict[str, Any],
    ) -> Event:
        event: Event = new(Event)
        set_project(event, project_id)
        set_seq(event, 0)
        set_type(event, kind)
        set_task(event, task_id)
        set_attempt(event, attempt)
        set_at(event, at)
        set_data(event, data)
        return event

    return make


_make = _maker()


_ENCODE = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode
"""Compact JSON, keys sorted (one encoder made once: ``json.dumps`` with options
builds a new one on every call)."""


def data_text(data: Mapping[str, Any]) -> str:
    """``data`` as the text a storage keeps (compact, keys sorted)."""
    return _ENCODE(data if data.__class__ is dict else dict(data))


def data_value(text: str | bytes | Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``data`` mapping back from what a storage kept."""
    if text is None:
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("event data is not a JSON object")
    return value


def _ts(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _enum(value: Any) -> Any:
    if value is None:
        return None
    try:
        # The member's value, without the ``value`` property's lookup.
        return value._value_
    except AttributeError:
        return str(value)


def progress(task: Task, before: TaskStatus | None, at: datetime) -> Event:
    """``project.progress`` for ``task`` moving from ``before`` to its status."""
    return _make(
        task.project_id,
        EventType.PROJECT_PROGRESS,
        task.id,
        task.attempt or None,
        at,
        {"from": _enum(before), "to": task.status._value_},
    )


def _event(task: Task, kind: EventType, at: datetime, **data: Any) -> Event:
    # ``data`` is a new dict made for this call: kept, not copied.
    return _make(task.project_id, kind, task.id, task.attempt or None, at, data)


_MANUAL_RETRY = Trigger.MANUAL_RETRY.value


def manual_retry_events(
    after: Task,
    *,
    now: datetime,
    actor: str | None,
    reason: str | None,
    budget: RetryBudget,
    deferred: bool,
    before: TaskStatus = TaskStatus.BLOCKED,
) -> tuple[Event, ...]:
    """The events of a manual retry that left ``after`` (what the one-step retries
    write; :func:`events_of` gives the same for the step-by-step plan)."""
    events = [
        _event(
            after,
            EventType.TASK_RETRIED,
            now,
            trigger=_MANUAL_RETRY,
            actor=actor,
            reason=reason,
            budget=_enum(budget),
            retry_count=after.retry_count,
            available_at=_ts(now),
        )
    ]
    if deferred:
        events.append(_event(after, EventType.DISPATCH_DEFERRED, now))
    events.append(progress(after, before, now))
    return tuple(events)


def _blocked(after: Task, cause: TaskEvent, now: datetime) -> Event:
    return _event(
        after,
        EventType.TASK_BLOCKED,
        now,
        reason=_enum(after.blocked_reason),
        cause=cause.value,
        retries_exhausted=after.blocked_reason is RETRIES_EXHAUSTED,
        retry_count=after.retry_count,
        error_type=after.error_type,
        error_message=after.error_message,
    )


def events_of(plan: Plan) -> tuple[Event, ...]:
    """The lifecycle events of ``plan``, in the order they happened (unnumbered)."""
    before, after, kind = plan.before, plan.after, plan.event
    now = after.updated_at
    if kind is TaskEvent.HEARTBEAT:
        return ()
    if kind is TaskEvent.MANUAL_RETRY and plan.new_attempt is not None:
        attempt = plan.new_attempt
        return manual_retry_events(
            after,
            now=now,
            actor=attempt.actor,
            reason=attempt.reason,
            budget=attempt.budget or RetryBudget.ONE_MORE,
            deferred=plan.dispatch is not None and plan.dispatch.state is DispatchState.DEFERRED,
            before=before.status,
        )
    events: list[Event] = []
    update = plan.attempt_update
    if kind is TaskEvent.START:
        events.append(_event(after, EventType.ATTEMPT_STARTED, now))
    elif kind in (TaskEvent.SUCCEED, TaskEvent.SUBMIT_REVIEW):
        events.append(_event(after, EventType.ATTEMPT_SUCCEEDED, now, status=after.status.value))
    elif kind in (TaskEvent.FAIL, TaskEvent.LOSE) and update is not None:
        # The closed attempt is the one before the move (a retry opens the next).
        closed = evolve_task(after, attempt=update.number)
        if update.outcome is Outcome.LOST:
            events.append(_event(closed, EventType.ATTEMPT_LOST, now))
        else:
            events.append(
                _event(
                    closed,
                    EventType.ATTEMPT_FAILED,
                    now,
                    error_type=update.error_type,
                    error_message=update.error_message,
                )
            )
    if after.status is TaskStatus.BLOCKED and before.status is not TaskStatus.BLOCKED:
        events.append(_blocked(after, kind, now))
    opened = plan.new_attempt
    if opened is not None and opened.trigger is Trigger.AUTO_RETRY:
        events.append(
            _event(
                after,
                EventType.TASK_RETRIED,
                now,
                trigger=Trigger.AUTO_RETRY.value,
                retry_count=after.retry_count,
                retries_left=after.retries_left,
                available_at=_ts(opened.available_at),
            )
        )
    if plan.dispatch is not None and plan.dispatch.state is DispatchState.DEFERRED:
        events.append(_event(after, EventType.DISPATCH_DEFERRED, now))
    if before.status is not after.status:
        events.append(progress(after, before.status, now))
    return tuple(events)


def added(task: Task) -> Event:
    """``project.progress`` for a task added to its project."""
    return progress(task, None, task.created_at)


def dispatch_failed(
    entry: DispatchEntry, *, error: str, retry_at: datetime, now: datetime
) -> Event:
    """The event of an outbox delivery that failed (written with the entry's release)."""
    return Event(
        project_id=entry.project_id,
        type=EventType.DISPATCH_FAILED,
        task_id=entry.task_id,
        attempt=entry.attempt,
        at=now,
        data={"error": error, "tries": entry.tries + 1, "retry_at": _ts(retry_at)},
    )


evolve_event: Callable[..., Event] = _evolver(Event)
"""``attrs.evolve`` for :class:`Event`, faster (see :mod:`~deepwork_retry._core.model`)."""


def numbered(events: tuple[Event, ...], last: int) -> tuple[Event, ...]:
    """``events`` numbered after ``last``, the project's sequence before them."""
    return tuple(evolve_event(e, seq=last + n) for n, e in enumerate(events, 1))


__all__ = [
    "RETRIES_EXHAUSTED",
    "Event",
    "EventRetry",
    "EventType",
    "added",
    "data_text",
    "data_value",
    "dispatch_failed",
    "events_of",
    "manual_retry_events",
    "numbered",
]
