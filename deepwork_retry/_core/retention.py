"""Retention: how long the rows that grow with traffic are kept, and which a prune removes.

Three tables grow with traffic; each has one rule, written here and nowhere
else (the storages render :class:`PruneRule` into their own statements, and
the conformance suite holds them to the predicates below):

- **idempotency records** expire: each is stored with its ``expires_at``
  (``created_at`` plus :attr:`Retention.idempotency`, 24 hours by default).
  An expired record is absent everywhere, before any prune has run: a
  lookup does not find it and a new request may take its key. A prune
  deletes expired records.
- **delivered outbox entries** are removed once delivered longer ago than
  :attr:`Retention.delivered_outbox` (7 days by default), except the entry of
  an attempt still waiting to be started (its task ``assigned`` at that
  attempt), which the reaper may have to hand out again. Pending and
  deferred entries are work still to do: never removed.
- **attempt records** are kept by default (:attr:`Retention.attempts` is
  ``None``). When a period is given, the records of *finished* tasks
  (:data:`~deepwork_retry._core.states.TERMINAL`, which no move leaves) are
  removed once both the record was dispatched and the task last changed
  longer ago than that period: a task's history goes as a whole, and the
  history of a task that can still move is never touched.
- **lifecycle events** (:mod:`~deepwork_retry._core.events`) go as delivered
  outbox entries do: once delivered to every subscriber longer ago than
  :attr:`Retention.delivered_outbox`, except an event whose delivery to
  some subscriber failed and is still to be retried or parked (it goes when
  that delivery succeeds). Pending events are never removed. A project
  keeps numbering its events where it was.

Prunes run in small batches, each its own short transaction, so they never
hold a lock for long; :class:`PruneRule` carries the batch size.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import attrs

from deepwork_retry._core.model import (
    IDEMPOTENCY_PERIOD,
    Attempt,
    DispatchEntry,
    IdempotencyRecord,
    Task,
)
from deepwork_retry._core.states import TERMINAL, DispatchState, TaskStatus
from deepwork_retry.exceptions import InvalidInput

DELIVERED_OUTBOX_PERIOD = timedelta(days=7)
"""How long a delivered outbox entry is kept by default."""

PRUNE_BATCH = 500
"""Rows removed per table per transaction by default."""

FINISHED = TERMINAL
"""The task states whose attempt records a prune may remove (no move leaves them)."""

PRUNED_ENTRY_STATE = DispatchState.DELIVERED
"""The only outbox state a prune removes: pending and deferred entries are work to do."""

AWAITING_START = TaskStatus.ASSIGNED
"""A task in this state keeps the delivered entry of its current attempt: the
reaper hands it out again if the attempt is not started in time
(:meth:`~deepwork_retry.ports.Storage.redeliver_stale`)."""


def _period(name: str, value: object, *, optional: bool, zero: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, timedelta):
        kind = "a timedelta or None" if optional else "a timedelta"
        raise InvalidInput(f"Retention.{name} must be {kind}, got {value!r}")
    if value < timedelta(0) or (value == timedelta(0) and not zero):
        raise InvalidInput(
            f"Retention.{name} must be {'at least zero' if zero else 'positive'}, got {value}"
        )


def _cutoff(now: datetime, period: timedelta | None) -> datetime | None:
    """``now - period``; ``None`` (nothing is that old) for no period or one past the calendar."""
    if period is None:
        return None
    try:
        return now - period
    except OverflowError:
        return None


@attrs.frozen(kw_only=True)
class Retention:
    """How long each table that grows with traffic keeps its rows (see the module text).

    ``idempotency``: the life of a new idempotency key (positive; keep it well
    above the longest request and the API's ``abandoned_after``, 60 s, or a
    repeat may arrive after the key it should replay has expired).
    ``delivered_outbox``: how long a delivered outbox entry is kept, ``None``
    to keep them all. ``attempts``: how long the attempt records of a finished
    task are kept after it finished, ``None`` (the default) to keep them all.
    """

    idempotency: timedelta = IDEMPOTENCY_PERIOD
    delivered_outbox: timedelta | None = DELIVERED_OUTBOX_PERIOD
    attempts: timedelta | None = None

    def __attrs_post_init__(self) -> None:
        _period("idempotency", self.idempotency, optional=False, zero=False)
        _period("delivered_outbox", self.delivered_outbox, optional=True, zero=True)
        _period("attempts", self.attempts, optional=True, zero=True)

    def expires_at(self, now: datetime) -> datetime:
        """When an idempotency key taken at ``now`` expires."""
        try:
            return now + self.idempotency
        except OverflowError:
            return datetime.max.replace(tzinfo=now.tzinfo)

    def rule(self, now: datetime, *, batch: int = PRUNE_BATCH) -> PruneRule:
        """What a prune at ``now`` may remove, in batches of at most ``batch`` rows."""
        return PruneRule(
            now=now,
            delivered_before=_cutoff(now, self.delivered_outbox),
            finished_before=_cutoff(now, self.attempts),
            batch=batch,
        )


def _batch(instance: object, attribute: object, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 100_000:
        raise InvalidInput(f"a prune batch must be an int from 1 to 100000, got {value!r}")


@attrs.frozen(kw_only=True)
class PruneRule:
    """The rows a prune at ``now`` may remove: :class:`Retention` resolved to cut-offs.

    A storage removes exactly the rows the three predicates accept, at most
    :attr:`batch` of each table per call, each table in its own transaction.
    """

    now: datetime
    """Idempotency records with ``expires_at <= now`` have expired."""
    delivered_before: datetime | None
    """Delivered entries with ``delivered_at <= delivered_before`` may go; ``None``: none."""
    finished_before: datetime | None
    """Attempt records older than this of tasks finished before it may go; ``None``: none."""
    batch: int = attrs.field(default=PRUNE_BATCH, validator=_batch)

    def removes_idempotency(self, record: IdempotencyRecord) -> bool:
        return record.expired(self.now)

    def removes_entry(self, entry: DispatchEntry, task: Task) -> bool:
        """Whether ``entry`` (of ``task``, as it stands) may be removed."""
        return (
            self.delivered_before is not None
            and entry.state is PRUNED_ENTRY_STATE
            and entry.delivered_at is not None
            and entry.delivered_at <= self.delivered_before
            and not (task.status is AWAITING_START and task.attempt == entry.attempt)
        )

    def removes_event(self, delivered_at: datetime | None, *, retries: int) -> bool:
        """Whether an event delivered at ``delivered_at`` (``None``: still pending)
        with ``retries`` failed deliveries kept (to retry or parked) may be removed."""
        return (
            self.delivered_before is not None
            and delivered_at is not None
            and delivered_at <= self.delivered_before
            and retries == 0
        )

    def removes_attempts_of(self, task: Task) -> bool:
        """Whether some attempt record of ``task`` (as it stands) may be removed: the
        task finished before :attr:`finished_before`. Which ones: :meth:`removes_attempt`."""
        return (
            self.finished_before is not None
            and task.status in FINISHED
            and task.updated_at <= self.finished_before
        )

    def removes_attempt(self, attempt: Attempt, task: Task) -> bool:
        """Whether ``attempt`` (of ``task``, as it stands) may be removed."""
        return (
            self.removes_attempts_of(task)
            and self.finished_before is not None
            and attempt.dispatched_at <= self.finished_before
        )


@attrs.frozen(kw_only=True)
class Pruned:
    """How many rows a prune removed from each table.

    ``complete`` is false when the prune stopped at its batch limit with
    rows perhaps left to remove.
    """

    idempotency: int = 0
    outbox: int = 0
    attempts: int = 0
    events: int = 0
    batches: int = 0
    complete: bool = True

    @property
    def total(self) -> int:
        return self.idempotency + self.outbox + self.attempts + self.events

    def full(self, batch: int) -> bool:
        """Whether some table gave a whole batch (so more rows may be waiting)."""
        return max(self.idempotency, self.outbox, self.attempts, self.events) >= batch

    def __add__(self, other: Pruned) -> Pruned:
        return Pruned(
            idempotency=self.idempotency + other.idempotency,
            outbox=self.outbox + other.outbox,
            attempts=self.attempts + other.attempts,
            events=self.events + other.events,
            batches=self.batches + other.batches,
            complete=other.complete,
        )


__all__ = [
    "AWAITING_START",
    "DELIVERED_OUTBOX_PERIOD",
    "FINISHED",
    "PRUNED_ENTRY_STATE",
    "PRUNE_BATCH",
    "PruneRule",
    "Pruned",
    "Retention",
]
