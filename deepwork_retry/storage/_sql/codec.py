"""How the SQL storages without native types store values: timestamps as integer
microseconds since the epoch (exact, and ordered like the datetimes), JSON as
text, enumerations as their values, and the conversions back.

SQLite keeps them so, and a dialect without ``timestamptz``/``jsonb`` (MySQL,
MariaDB: ``BIGINT`` and ``LONGTEXT``) keeps the same encodings, so every such
dialect shares these functions and the decoders built on them.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from deepwork_retry._core.events import Event, EventRetry, EventType, data_text, data_value
from deepwork_retry._core.model import (
    Attempt,
    DispatchEntry,
    IdempotencyRecord,
    Progress,
    Project,
    Task,
)
from deepwork_retry._core.states import (
    BlockedReason,
    DispatchState,
    Outcome,
    ProjectStatus,
    RetryBudget,
    TaskStatus,
    Trigger,
)
from deepwork_retry.exceptions import InvalidInput
from deepwork_retry.storage._sql import common

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)

_TS_LAST: tuple[datetime | None, int] = (None, 0)
"""The last conversion: one write stores the same ``now`` in several columns."""


def ts(value: datetime) -> int:
    """Microseconds since the epoch: exact, and ordered like the datetimes."""
    global _TS_LAST
    last = _TS_LAST
    if last[0] is value:
        return last[1]
    if value.tzinfo is not timezone.utc and (value.tzinfo is None or value.utcoffset() is None):
        raise InvalidInput(f"timestamps must be timezone-aware, got {value!r}")
    micros = (value - EPOCH) // _MICROSECOND
    _TS_LAST = (value, micros)
    return micros


def ots(value: datetime | None) -> int | None:
    return None if value is None else ts(value)


def dt(value: int) -> datetime:
    return EPOCH + timedelta(0, 0, value)  # positional: cheaper than microseconds=value


def odt(value: int | None) -> datetime | None:
    return None if value is None else dt(value)


def text(value: str) -> str | bytes:
    """A str as a driver can bind it: lone surrogates survive as bytes (a BLOB)."""
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")
    return value


def otext(value: str | None) -> str | bytes | None:
    return None if value is None else text(value)


def to_str(value: str | bytes) -> str:
    return value.decode("utf-8", "surrogatepass") if isinstance(value, bytes) else value


def to_ostr(value: str | bytes | None) -> str | None:
    return None if value is None else to_str(value)


def valid_id(kind: str, value: str) -> str:
    """An id to store: ids are kept as UTF-8 text, so they must encode."""
    if not isinstance(value, str):
        raise InvalidInput(f"{kind} id must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{kind} id must be valid Unicode (no lone surrogates)") from None
    return value


def to_json(kind: str, value: Any) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{kind} must be JSON-serialisable: {exc}") from None


def blocked_by(value: str) -> tuple[str, ...]:
    return () if value == "[]" else tuple(json.loads(value))


def metadata(value: str) -> dict[str, Any]:
    return {} if value == "{}" else dict(json.loads(value))


_E = TypeVar("_E", bound=enum.Enum)


def members(kind: type[_E]) -> dict[object, _E]:
    """Stored value -> member, the table behind ``kind(value)`` without its call."""
    return {member.value: member for member in kind}


def values(kind: type[enum.Enum]) -> dict[object, str]:
    """Member (or its equal string) -> stored value."""
    return {member: member.value for member in kind}


def member(table: dict[object, _E], kind: type[_E], value: object) -> _E:
    """``kind(value)``, answered from ``table`` when it can be."""
    try:
        return table[value]
    except (KeyError, TypeError):
        return kind(value)


def value(table: dict[object, str], kind: type[enum.Enum], value: object) -> str:
    """``kind(value).value``, answered from ``table`` when it can be."""
    try:
        return table[value]
    except (KeyError, TypeError):
        return str(kind(value).value)


TASK_STATUSES = members(TaskStatus)
TASK_STATUS_VALUES = values(TaskStatus)
BLOCKED_REASONS = members(BlockedReason)
PROJECT_STATUSES = members(ProjectStatus)
TRIGGER_VALUES = values(Trigger)
BUDGET_VALUES = values(RetryBudget)
STATE_VALUES = values(DispatchState)


def reason(value: str | None) -> BlockedReason | None:
    return None if value is None else member(BLOCKED_REASONS, BlockedReason, value)


# -- rows to store ----------------------------------------------------------------------


def task_params(task: Task) -> tuple[Any, ...]:
    """``task`` as the parameters of its row (:data:`common.TASK_COLUMNS` order)."""
    return (
        task.project_id,
        task.id,
        text(task.title),
        value(TASK_STATUS_VALUES, TaskStatus, task.status),
        task.retry_count,
        task.max_retries,
        task.retries_left,
        otext(task.error_message),
        otext(task.error_type),
        None if task.blocked_reason is None else BlockedReason(task.blocked_reason).value,
        to_json("blocked_by", list(task.blocked_by)) if task.blocked_by else "[]",
        task.attempt,
        ots(task.lease_expires_at),
        ts(task.created_at),
        ts(task.updated_at),
        ots(task.started_at),
        ots(task.completed_at),
        task.version,
        to_json("metadata", dict(task.metadata)) if task.metadata else "{}",
    )


def project_params(project: Project) -> tuple[Any, ...]:
    return (
        project.id,
        ProjectStatus(project.status).value,
        text(project.name),
        ts(project.created_at),
        ts(project.updated_at),
        project.version,
    )


def attempt_params(attempt: Attempt) -> tuple[Any, ...]:
    return (
        attempt.project_id,
        attempt.task_id,
        attempt.number,
        value(TRIGGER_VALUES, Trigger, attempt.trigger),
        ts(attempt.dispatched_at),
        ts(attempt.available_at),
        otext(attempt.actor),
        otext(attempt.reason),
        None if attempt.budget is None else value(BUDGET_VALUES, RetryBudget, attempt.budget),
        ots(attempt.started_at),
        ots(attempt.finished_at),
        None if attempt.outcome is None else Outcome(attempt.outcome).value,
        otext(attempt.error_type),
        otext(attempt.error_message),
    )


def entry_params(entry: DispatchEntry) -> tuple[Any, ...]:
    return (
        entry.project_id,
        entry.task_id,
        entry.attempt,
        value(STATE_VALUES, DispatchState, entry.state),
        ts(entry.available_at),
        ts(entry.created_at),
        ots(entry.claimed_until),
        entry.tries,
        otext(entry.last_error),
        ots(entry.delivered_at),
        otext(entry.trace),
    )


def idem_params(record: IdempotencyRecord) -> tuple[Any, ...]:
    return (
        text(record.key),
        text(record.project_id),
        text(record.task_id),
        ts(record.created_at),
        record.status_code,
        otext(record.body),
        ts(record.expires_at),
    )


# -- rows read back, decoded by column name (see common.compile_decoder) ------------------

TASK_CODEC = {
    "title": "_str({0})",
    "status": "_member(_TASK_STATUSES, TaskStatus, {0})",
    "error_message": "_ostr({0})",
    "error_type": "_ostr({0})",
    "blocked_reason": "_reason({0})",
    "blocked_by": "_blocked_by({0})",  # the converters' work: a tuple of ids, a fresh dict
    "lease_expires_at": "_odt({0})",
    "created_at": "_dt({0})",
    "updated_at": "_dt({0})",
    "started_at": "_odt({0})",
    "completed_at": "_odt({0})",
    "metadata": "_metadata({0})",
}
"""How a stored task column becomes the field's value."""


def _optional(kind: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda stored: None if stored is None else kind(stored)


HELPERS: dict[str, object] = {
    "_str": to_str, "_ostr": to_ostr, "_dt": dt, "_odt": odt, "_member": member,
    "_TASK_STATUSES": TASK_STATUSES, "TaskStatus": TaskStatus, "_reason": reason,
    "_blocked_by": blocked_by, "_metadata": metadata,
    "_project_status": lambda v: member(PROJECT_STATUSES, ProjectStatus, v),
    "_trigger": Trigger, "_budget": _optional(RetryBudget), "_outcome": _optional(Outcome),
    "_state": DispatchState,
}  # fmt: skip
"""The names the decoders' conversions use."""

task: Callable[[Any], Task] = common.compile_decoder(
    Task, read=common.at(common.TASK_COLUMNS), codec=TASK_CODEC, helpers=HELPERS
)
"""The task of a row in :data:`common.TASK_COLUMNS` order."""
project: Callable[[Any], Project] = common.compile_decoder(
    Project,
    read=common.at(common.PROJECT_COLUMNS),
    codec={"status": "_project_status({0})", "name": "_str({0})", "created_at": "_dt({0})",
           "updated_at": "_dt({0})"},
    helpers=HELPERS,
)  # fmt: skip
attempt: Callable[[Any], Attempt] = common.compile_decoder(
    Attempt,
    read=common.at(common.ATTEMPT_COLUMNS),
    codec={"trigger": "_trigger({0})", "dispatched_at": "_dt({0})", "available_at": "_dt({0})",
           "actor": "_ostr({0})", "reason": "_ostr({0})", "budget": "_budget({0})",
           "started_at": "_odt({0})", "finished_at": "_odt({0})", "outcome": "_outcome({0})",
           "error_type": "_ostr({0})", "error_message": "_ostr({0})"},
    helpers=HELPERS,
)  # fmt: skip
entry: Callable[[Any], DispatchEntry] = common.compile_decoder(
    DispatchEntry,
    read=common.at(common.ENTRY_COLUMNS),
    codec={"project_id": "_str({0})", "task_id": "_str({0})", "state": "_state({0})",
           "available_at": "_dt({0})", "created_at": "_dt({0})", "claimed_until": "_odt({0})",
           "last_error": "_ostr({0})", "delivered_at": "_odt({0})", "trace": "_ostr({0})"},
    helpers=HELPERS,
)  # fmt: skip
idem: Callable[[Any], IdempotencyRecord] = common.compile_decoder(
    IdempotencyRecord,
    read=common.at(common.IDEM_COLUMNS),
    codec={"key": "_str({0})", "project_id": "_str({0})", "task_id": "_str({0})",
           "created_at": "_dt({0})", "body": "_ostr({0})", "expires_at": "_dt({0})"},
    helpers=HELPERS,
)  # fmt: skip


progress: Callable[[Any, str, int], Progress] = common.compile_decoder(
    Progress,
    read=common.at(("total", *common.STATUSES)),
    codec={},
    helpers={},
    given={"project_id": "project_id"},
    signature="row, project_id, at",
    offset="at",
)
"""``progress(row, project_id, at)``: the progress from the counters ``total, <each
status>`` starting at ``row[at]``."""


# -- lifecycle events ---------------------------------------------------------------------

EVENT_TYPES = members(EventType)


def event_params(event: Event, seq: int | None = None) -> tuple[Any, ...]:
    """``event`` as the parameters of its row (:data:`common.EVENT_COLUMNS`), numbered
    ``seq`` (by default its own)."""
    return (
        text(event.project_id),
        event.seq if seq is None else seq,
        event.type.value,
        otext(event.task_id),
        event.attempt,
        ts(event.at),
        data_text(event.data),
    )


def event(row: Any, at: int = 0) -> Event:
    """The event of a row whose :data:`common.EVENT_COLUMNS` start at ``row[at]``."""
    return Event(
        project_id=to_str(row[at]),
        seq=int(row[at + 1]),
        type=member(EVENT_TYPES, EventType, row[at + 2]),
        task_id=to_ostr(row[at + 3]),
        attempt=None if row[at + 4] is None else int(row[at + 4]),
        at=dt(row[at + 5]),
        data=data_value(row[at + 6]),
    )


def event_retry(row: Any) -> EventRetry:
    """A failed delivery from a row of :data:`common.EVENT_RETRY_COLUMNS`, then the
    event's :data:`common.EVENT_COLUMNS`."""
    width = len(common.EVENT_RETRY_COLUMNS)
    return EventRetry(
        event=event(row, width),
        subscriber=to_str(row[2]),
        tries=int(row[3]),
        retry_at=dt(row[4]),
        last_error=to_ostr(row[5]),
        parked=bool(row[6]),
        claimed_until=odt(row[7]),
    )
