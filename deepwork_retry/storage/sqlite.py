"""SQLite storage: the stdlib ``sqlite3`` driver, one file, many threads and processes.

- WAL journal, so readers never wait for the writer.
- One transaction per operation. Writes start with ``BEGIN IMMEDIATE``: the
  write lock is taken before anything is read, so a compare-and-set, its
  guards and the progress counters are checked and changed atomically against
  every other thread and process using the file. Waiting for the lock is
  bounded by ``timeout`` (SQLite's busy timeout); past it the operation raises
  :class:`~deepwork_retry.exceptions.StorageUnavailable` and changes nothing.
- The schema lives in ``sql/sqlite/NNNN_*.sql`` migrations, applied in order
  when a file is opened and tracked with ``PRAGMA user_version``;
  ``PRAGMA application_id`` marks the file as ours, so a database of another
  application is refused instead of altered.
- Driver errors become library errors in one place (:meth:`SQLiteStorage._translating`).

The semantics of every method are those of
:class:`~deepwork_retry.storage.memory.MemoryStorage`; both pass the same
conformance suite.
"""

from __future__ import annotations

import enum
import functools
import json
import os
import re
import sqlite3
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs
from typing_extensions import ParamSpec

from deepwork_retry._core import effects, machine, retention
from deepwork_retry._core.inputs import check_limit
from deepwork_retry._core.model import (
    Attempt,
    DispatchEntry,
    IdempotencyRecord,
    Progress,
    Project,
    Task,
)
from deepwork_retry._core.plans import Applied, AttemptUpdate, Plan, ProjectPlan, Release
from deepwork_retry._core.retention import Pruned, PruneRule
from deepwork_retry._core.states import (
    BlockedReason,
    DispatchState,
    Outcome,
    ProjectStatus,
    RetryBudget,
    TaskStatus,
    Trigger,
)
from deepwork_retry.exceptions import (
    AlreadyExists,
    DeepworkError,
    IdempotencyConflict,
    InvalidInput,
    ProjectNotFound,
    StorageCorrupt,
    StorageError,
    StorageMissing,
    StorageReadOnly,
    StorageUnavailable,
    TaskNotFound,
    VersionConflict,
)
from deepwork_retry.ports import REDELIVERED
from deepwork_retry.storage._sql import common
from deepwork_retry.storage._to_async import (
    DEFAULT_MAX_WAITING_WRITES,
    DEFAULT_READERS,
    DEFAULT_WRITERS,
    AsyncFromSyncOneStep,
)
from deepwork_retry.storage._validate import check_new_tasks

__all__ = ["APPLICATION_ID", "AsyncSQLiteStorage", "SQLiteStorage", "migrations"]

APPLICATION_ID = 0x64777274
"""``PRAGMA application_id`` of a deepwork_retry database ("dwrt")."""

_TABLES = frozenset({"projects", "tasks", "task_deps", "attempts", "outbox", "idempotency"})
_IN_CHUNK = 500
"""Ids per ``IN (...)`` list, well below SQLite's bound on parameters."""
_KEEP_IDLE = 8
"""Idle connections kept open for reuse; more are closed when returned."""

P = ParamSpec("P")
R = TypeVar("R")

_PID = os.getpid()
"""This process's id, kept current across fork: cheaper than a system call per operation."""


def _forked() -> None:
    global _PID
    _PID = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)

Synchronous = Literal["NORMAL", "FULL"]


def migrations() -> tuple[common.Migration, ...]:
    """The shipped migrations as ``(number, file name, SQL)``, in order (read once)."""
    return common.migrations("sqlite")


def _statements(script: str) -> list[str]:
    """Split a script into complete statements (executescript would commit first)."""
    out: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            out.append(pending.strip())
            pending = ""
    if pending.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in pending.splitlines()
    ):
        raise StorageCorrupt(f"incomplete SQL statement in a migration: {pending.strip()!r}")
    return out


# -- value conversions ------------------------------------------------------------


_TS_LAST: tuple[datetime | None, int] = (None, 0)
"""The last conversion: one write stores the same ``now`` in several columns."""


def _ts(value: datetime) -> int:
    """Microseconds since the epoch: exact, and ordered like the datetimes."""
    global _TS_LAST
    last = _TS_LAST
    if last[0] is value:
        return last[1]
    if value.tzinfo is not timezone.utc and (value.tzinfo is None or value.utcoffset() is None):
        raise InvalidInput(f"timestamps must be timezone-aware, got {value!r}")
    micros = (value - _EPOCH) // _MICROSECOND
    _TS_LAST = (value, micros)
    return micros


def _ots(value: datetime | None) -> int | None:
    return None if value is None else _ts(value)


def _dt(value: int) -> datetime:
    return _EPOCH + timedelta(0, 0, value)  # positional: cheaper than microseconds=value


def _odt(value: int | None) -> datetime | None:
    return None if value is None else _dt(value)


def _text(value: str) -> str | bytes:
    """A str as sqlite3 can bind it: lone surrogates survive as a BLOB."""
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")
    return value


def _otext(value: str | None) -> str | bytes | None:
    return None if value is None else _text(value)


def _str(value: str | bytes) -> str:
    return value.decode("utf-8", "surrogatepass") if isinstance(value, bytes) else value


def _ostr(value: str | bytes | None) -> str | None:
    return None if value is None else _str(value)


def _valid_id(kind: str, value: str) -> str:
    """An id to store: SQLite keeps ids as UTF-8 TEXT, so they must encode."""
    if not isinstance(value, str):
        raise InvalidInput(f"{kind} id must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{kind} id must be valid Unicode (no lone surrogates)") from None
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


def _after_bound(after: str) -> tuple[str, str]:
    """``id > after`` as a comparison SQLite can make on stored (encodable) ids
    (see :func:`common.after_bound`; SQLite stores NUL, not lone surrogates)."""
    return common.after_bound(after, _SURROGATE) if isinstance(after, str) else (">", after)


_E = TypeVar("_E", bound=enum.Enum)


def _members(kind: type[_E]) -> dict[object, _E]:
    """Stored value -> member, the table behind ``kind(value)`` without its call."""
    return {member.value: member for member in kind}


def _values(kind: type[enum.Enum]) -> dict[object, str]:
    """Member (or its equal string) -> stored value."""
    return {member: member.value for member in kind}


_TASK_STATUSES = _members(TaskStatus)
_TASK_STATUS_VALUES = _values(TaskStatus)
_BLOCKED_REASONS = _members(BlockedReason)
_PROJECT_STATUSES = _members(ProjectStatus)
_TRIGGER_VALUES = _values(Trigger)
_BUDGET_VALUES = _values(RetryBudget)
_STATE_VALUES = _values(DispatchState)


def _member(table: dict[object, _E], kind: type[_E], value: object) -> _E:
    """``kind(value)``, answered from ``table`` when it can be."""
    try:
        return table[value]
    except (KeyError, TypeError):
        return kind(value)


def _value(table: dict[object, str], kind: type[enum.Enum], value: object) -> str:
    """``kind(value).value``, answered from ``table`` when it can be."""
    try:
        return table[value]
    except (KeyError, TypeError):
        return str(kind(value).value)


def _json(kind: str, value: Any) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{kind} must be JSON-serialisable: {exc}") from None


_ATTEMPT_COLUMN = {"trigger": "triggered_by"}
"""Attempt fields whose SQLite column has another name."""
_TASK_COLUMNS = common.cols(common.TASK_COLUMNS)
_TASK_SET = ", ".join(f"{c} = ?" for c in common.TASK_COLUMNS[2:])
_PROJECT_COLUMNS = common.cols(common.PROJECT_COLUMNS)
_COUNTERS = ("total", *common.STATUSES)
_ATTEMPT_COLUMNS = common.cols(_ATTEMPT_COLUMN.get(c, c) for c in common.ATTEMPT_COLUMNS)
_ENTRY_COLUMNS = common.cols(common.ENTRY_COLUMNS)
_IDEM_COLUMNS = common.cols(common.IDEM_COLUMNS)
_SEQ_ENTRY = common.at(("seq", *common.ENTRY_COLUMNS))
"""``SELECT seq, {_ENTRY_COLUMNS}``'s row, by column name."""
_O_ENTRY_COLUMNS = ", ".join(f"o.{c.strip()}" for c in _ENTRY_COLUMNS.split(","))


_PENDING = common.literal(DispatchState.PENDING)
_DEFERRED = common.literal(DispatchState.DEFERRED)
_DELIVERED = common.literal(DispatchState.DELIVERED)
_AWAITING_START = common.literal(retention.AWAITING_START)
"""Only a task still awaiting its start has its delivered entry handed out again."""
_RUNNING = common.literal(TaskStatus.IN_PROGRESS)


def _all_text(*values: object) -> bool:
    return all(isinstance(v, str) for v in values)


def _marks(columns: str) -> str:
    return ", ".join("?" for _ in columns.split(","))


_PROJECT_WIDTH = len(_PROJECT_COLUMNS.split(","))
_LOAD = (
    f"SELECT {', '.join('p.' + c.strip() for c in _PROJECT_COLUMNS.split(','))}, "
    f"{', '.join('t.' + c.strip() for c in _TASK_COLUMNS.split(','))} "
    "FROM projects AS p LEFT JOIN tasks AS t ON t.project_id = p.id AND t.id = ? WHERE p.id = ?"
)
"""The project and one of its tasks in one statement (task columns NULL when it is missing)."""
_NEXT_PENDING_SEQ = (
    f"COALESCE((SELECT pending_seq FROM outbox WHERE state = {_PENDING} "
    "ORDER BY pending_seq DESC LIMIT 1), 0) + 1"
)
_INSERT_PENDING = (
    f"INSERT INTO outbox ({_ENTRY_COLUMNS}, pending_seq) "
    f"VALUES ({_marks(_ENTRY_COLUMNS)}, {_NEXT_PENDING_SEQ})"
)
_INSERT_ENTRY = (
    f"INSERT INTO outbox ({_ENTRY_COLUMNS}, pending_seq) VALUES ({_marks(_ENTRY_COLUMNS)}, NULL)"
)
_INSERT_NEXT_ATTEMPT = (
    f"INSERT INTO attempts ({_ATTEMPT_COLUMNS}) SELECT {_marks(_ATTEMPT_COLUMNS)} "
    "WHERE (SELECT COUNT(*) FROM attempts WHERE project_id = ? AND task_id = ?) = ?"
)
"""Insert an attempt only if it is the next one (the count of earlier attempts matches)."""
_UPDATE_TASK = f"UPDATE tasks SET {_TASK_SET} WHERE project_id = ? AND id = ? AND version = ?"
"""The compare-and-set: the write itself, taking effect only at the expected version."""
_SHIFT = {
    (old.value, new.value): f"UPDATE projects SET {old.value} = {old.value} - 1, "
    f"{new.value} = {new.value} + 1 WHERE id = ?"
    for old in TaskStatus
    for new in TaskStatus
    if old is not new
}
"""One task moving between two statuses, in the project's counters."""
_PlanParams = tuple[
    tuple[Any, ...],
    tuple[Any, ...] | None,
    tuple[Any, ...] | None,
    tuple[Any, ...] | None,
    int | None,
]
"""A plan's rows as bound parameters: task, new attempt, outbox entry, idempotency, claim."""

assert _COUNTERS == ("total", "inbox", "assigned", "in_progress", "review", "done", "blocked",
                     "skipped")  # fmt: skip


_new = object.__new__
_Setter = Callable[[Any, Any], None]


def _setters(cls: type, names: str) -> tuple[_Setter, ...]:
    """The slots of the attrs class ``cls``, in the order of ``names``, to be filled directly.

    Decoding a row builds the value without ``__init__`` (whose frozen
    ``__setattr__`` per field is most of a decode's cost): every field is
    set exactly once, already converted. That is what ``__init__`` would do
    for these classes, which have no validators and no
    ``__attrs_post_init__``; the checks here fail at import otherwise, or
    when a field is added that the decoder would not set.
    """
    fields = attrs.fields(cls)
    wanted = names.split()
    assert sorted(wanted) == sorted(f.name for f in fields), (cls, wanted)
    assert all(f.validator is None for f in fields)
    assert not hasattr(cls, "__attrs_post_init__")
    return tuple(getattr(cls, name).__set__ for name in wanted)


(_p_project_id, _p_total, _p_inbox, _p_assigned, _p_in_progress, _p_review, _p_done,
 _p_blocked, _p_skipped) = _setters(Progress, f"project_id {' '.join(_COUNTERS)}")  # fmt: skip


def _progress_of(project_id: str, c: Sequence[int]) -> Progress:
    """The progress from the counters in :data:`_COUNTERS` order."""
    progress = _new(Progress)
    _p_project_id(progress, project_id)
    _p_total(progress, c[0])
    _p_inbox(progress, c[1])
    _p_assigned(progress, c[2])
    _p_in_progress(progress, c[3])
    _p_review(progress, c[4])
    _p_done(progress, c[5])
    _p_blocked(progress, c[6])
    _p_skipped(progress, c[7])
    return progress


_SHIFT_RETURNING = {
    key: f"{sql} RETURNING version, {', '.join(_COUNTERS)}" for key, sql in _SHIFT.items()
}


# -- the manual retry in one transaction ------------------------------------------------
# Rendered from the core, never restated: the move's effects are the data of
# effects.MANUAL_RETRY (the task's new values, the attempt record), the states
# it leaves and reaches come from machine.TRANSITIONS, the project states that
# accept a retry and those that dispatch now from machine.PROJECT_RULES. A
# storage renders the move it is given when it is made (see _render_retry); a
# test holds the result equal to the core's decision applied by the general path.
#
# The statements avoid RETURNING, which costs SQLite more (a buffered result
# table per execution) than one SELECT of the changed rows afterwards.

_ACCEPTING = frozenset(s.value for s in machine.ACCEPTS_RETRY)
_DISPATCHING = frozenset(s.value for s in machine.DISPATCHES)
_INT64_MAX = 2**63 - 1


@attrs.frozen
class _RetrySQL:
    """The one-step retry's statements for one move, and the decoder of what it reads."""

    sources: tuple[str, ...]
    update: dict[str, str]
    """Per state the move leaves: the task changed as the core changes it, only from
    that state. Parameters: 1 the budget is ``full``, 2 now, 3 project id, 4 task id."""
    shift: dict[str, str]
    """Per state the move leaves: the project's counters moved along."""
    read: str
    """After the changes: the project's status and counters, the task's columns the
    move did not set to a value known beforehand, its attempt records counted and
    the last pending outbox position."""
    count_at: int
    decode: Callable[..., Task]
    """The task after the move, from :attr:`read`'s row and what the move set."""
    insert_pending: str
    insert_deferred: str
    insert_attempt: str


@functools.cache
def _render_retry(move: effects.Move) -> _RetrySQL:
    target = move.target.value
    sources = tuple(s.value for s in move.sources)
    change = common.set_clause(move, common.Spelling(column=str, now="?2", full="?1"))
    # Python's ints have no bound; SQLite's would turn REAL instead of failing.
    bounded = "".join(
        f" AND {name} <= {_INT64_MAX - delta}" for name, delta in move.increments().items()
    )
    update = {
        source: f"UPDATE tasks SET {change} WHERE project_id = ?3 AND id = ?4 "
        f"AND status = {common.literal(source)}{bounded}"
        for source in sources
    }
    read_back = common.read_back(move)
    task_at = 1 + len(_COUNTERS)
    read = (
        f"SELECT p.status, {common.cols(_COUNTERS, 'p.')}, {common.cols(read_back, 't.')}, "
        "(SELECT COUNT(*) FROM attempts WHERE project_id = ?1 AND task_id = ?2), "
        f"(SELECT pending_seq FROM outbox WHERE state = {_PENDING} "
        "ORDER BY pending_seq DESC LIMIT 1) "
        "FROM projects AS p, tasks AS t WHERE p.id = ?1 AND t.project_id = ?1 AND t.id = ?2"
    )
    given, consts = common.known_values(move, now="now")
    decode = common.compile_decoder(
        Task,
        read=common.at(read_back, task_at),
        codec=_TASK_CODEC,
        helpers={**_CODEC_HELPERS, **consts},
        given={"project_id": "project_id", "id": "task_id", **given},
        signature="row, project_id, task_id, now",
    )
    # The new attempt: ?1 project, ?2 task, ?3 number, ?4 now, ?5 actor, ?6 reason, ?7 budget.
    spelling = common.Spelling(
        column=str, now="?4", full=f"?7 = {common.literal(RetryBudget.FULL)}",
        args={"actor": "?5", "reason": "?6", "budget": "?7"},
    )  # fmt: skip
    fields = common.ATTEMPT_COLUMNS[3:]
    record = common.record_values(move, spelling, fields)
    available = common.render(dict(move.attempt)["available_at"], spelling)
    insert_attempt = (
        f"INSERT INTO attempts (project_id, task_id, number, "
        f"{common.cols(_ATTEMPT_COLUMN.get(f, f) for f in fields)}) "
        f"VALUES (?1, ?2, ?3, {', '.join(record)})"
    )
    entry = f"INSERT INTO outbox ({_ENTRY_COLUMNS}, pending_seq) VALUES (?1, ?2, ?3"
    return _RetrySQL(
        sources=sources,
        update=update,
        shift={source: _SHIFT[(source, target)] for source in sources},
        read=read,
        count_at=task_at + len(read_back),
        decode=decode,
        insert_pending=f"{entry}, '{DispatchState.PENDING.value}', {available}, ?4, ?5, 0, "
        "NULL, NULL, ?6)",
        insert_deferred=f"{entry}, '{DispatchState.DEFERRED.value}', {available}, ?4, NULL, 0, "
        "NULL, NULL, NULL)",
        insert_attempt=insert_attempt,
    )


_INSERT_NEW_IDEM = (
    f"INSERT INTO idempotency ({_IDEM_COLUMNS}) VALUES (?1, ?2, ?3, ?4, NULL, NULL, ?5) "
    "ON CONFLICT (key) DO UPDATE SET project_id = ?2, task_id = ?3, created_at = ?4, "
    "status_code = NULL, body = NULL, expires_at = ?5 WHERE expires_at <= ?4"
)
"""Reserve a key unless it is taken by a record that has not expired (then
nothing is written); an expired record gives its key up."""
_UPSERT_IDEM = (
    f"INSERT INTO idempotency ({_IDEM_COLUMNS}) VALUES ({_marks(_IDEM_COLUMNS)}) "
    "ON CONFLICT (key) DO UPDATE SET project_id = excluded.project_id, "
    "task_id = excluded.task_id, created_at = excluded.created_at, "
    "status_code = excluded.status_code, body = excluded.body, expires_at = excluded.expires_at"
)


def _expiry(now: datetime, expires_at: datetime | None) -> int:
    """When a key reserved at ``now`` expires: ``expires_at``, or the default period on."""
    if expires_at is not None:
        return _ts(expires_at)
    return _ts(IdempotencyRecord(key="", project_id="", task_id="", created_at=now).expires_at)


# -- retention: the prune rule (deepwork_retry._core.retention) rendered ------------------
_PRUNE_IDEMPOTENCY = (
    "DELETE FROM idempotency WHERE key IN (SELECT key FROM idempotency "
    "WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)"
)
_PRUNE_OUTBOX = (
    "DELETE FROM outbox WHERE seq IN (SELECT o.seq FROM outbox AS o "
    f"WHERE o.state = '{retention.PRUNED_ENTRY_STATE.value}' AND o.delivered_at <= ?1 "
    "AND NOT EXISTS (SELECT 1 FROM tasks AS t WHERE t.project_id = o.project_id "
    f"AND t.id = o.task_id AND t.status = '{retention.AWAITING_START.value}' "
    "AND t.attempt = o.attempt) "
    "ORDER BY o.delivered_at LIMIT ?2)"
)
_PRUNE_ATTEMPTS = (
    "DELETE FROM attempts WHERE (project_id, task_id, number) IN ("
    "SELECT a.project_id, a.task_id, a.number FROM attempts AS a "
    "JOIN tasks AS t ON t.project_id = a.project_id AND t.id = a.task_id "
    "WHERE a.dispatched_at <= ?1 AND t.updated_at <= ?1 "
    f"AND t.status IN ({', '.join(sorted(repr(s.value) for s in retention.FINISHED))}) "
    "ORDER BY a.dispatched_at LIMIT ?2)"
)


def _prune_statements(rule: PruneRule) -> list[tuple[str, tuple[int, int] | None]]:
    """Each table's delete for ``rule``, with its parameters (``None``: nothing to do)."""

    def bound(cutoff: datetime | None) -> tuple[int, int] | None:
        return None if cutoff is None else (_ts(cutoff), rule.batch)

    return [
        (_PRUNE_IDEMPOTENCY, bound(rule.now)),
        (_PRUNE_OUTBOX, bound(rule.delivered_before)),
        (_PRUNE_ATTEMPTS, bound(rule.finished_before)),
    ]


def _task_params(task: Task) -> tuple[Any, ...]:
    return (
        task.project_id,
        task.id,
        _text(task.title),
        _value(_TASK_STATUS_VALUES, TaskStatus, task.status),
        task.retry_count,
        task.max_retries,
        task.retries_left,
        _otext(task.error_message),
        _otext(task.error_type),
        None if task.blocked_reason is None else BlockedReason(task.blocked_reason).value,
        _json("blocked_by", list(task.blocked_by)) if task.blocked_by else "[]",
        task.attempt,
        _ots(task.lease_expires_at),
        _ts(task.created_at),
        _ts(task.updated_at),
        _ots(task.started_at),
        _ots(task.completed_at),
        task.version,
        _json("metadata", dict(task.metadata)) if task.metadata else "{}",
    )


def _blocked_by(value: str) -> tuple[str, ...]:
    return () if value == "[]" else tuple(json.loads(value))


def _metadata(value: str) -> dict[str, Any]:
    return {} if value == "{}" else dict(json.loads(value))


def _reason(value: str | None) -> BlockedReason | None:
    return None if value is None else _member(_BLOCKED_REASONS, BlockedReason, value)


_TASK_CODEC = {
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
"""How a stored task column becomes the field's value (see :func:`common.compile_decoder`)."""
_CODEC_HELPERS: dict[str, object] = {
    "_str": _str, "_ostr": _ostr, "_dt": _dt, "_odt": _odt, "_member": _member,
    "_TASK_STATUSES": _TASK_STATUSES, "TaskStatus": TaskStatus, "_reason": _reason,
    "_blocked_by": _blocked_by, "_metadata": _metadata,
}  # fmt: skip
_task: Callable[[Any], Task] = common.compile_decoder(
    Task, read=common.at(common.TASK_COLUMNS), codec=_TASK_CODEC, helpers=_CODEC_HELPERS
)
"""The task of a row in :data:`_TASK_COLUMNS` order, decoded by column name."""


def _project_params(project: Project) -> tuple[Any, ...]:
    return (
        project.id,
        ProjectStatus(project.status).value,
        _text(project.name),
        _ts(project.created_at),
        _ts(project.updated_at),
        project.version,
    )


def _attempt_params(attempt: Attempt) -> tuple[Any, ...]:
    return (
        attempt.project_id,
        attempt.task_id,
        attempt.number,
        _value(_TRIGGER_VALUES, Trigger, attempt.trigger),
        _ts(attempt.dispatched_at),
        _ts(attempt.available_at),
        _otext(attempt.actor),
        _otext(attempt.reason),
        None if attempt.budget is None else _value(_BUDGET_VALUES, RetryBudget, attempt.budget),
        _ots(attempt.started_at),
        _ots(attempt.finished_at),
        None if attempt.outcome is None else Outcome(attempt.outcome).value,
        _otext(attempt.error_type),
        _otext(attempt.error_message),
    )


def _entry_params(entry: DispatchEntry) -> tuple[Any, ...]:
    return (
        entry.project_id,
        entry.task_id,
        entry.attempt,
        _value(_STATE_VALUES, DispatchState, entry.state),
        _ts(entry.available_at),
        _ts(entry.created_at),
        _ots(entry.claimed_until),
        entry.tries,
        _otext(entry.last_error),
        _ots(entry.delivered_at),
    )


def _idem_params(record: IdempotencyRecord) -> tuple[Any, ...]:
    return (
        _text(record.key),
        _text(record.project_id),
        _text(record.task_id),
        _ts(record.created_at),
        record.status_code,
        _otext(record.body),
        _ts(record.expires_at),
    )


def _optional(kind: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else kind(value)


_HELPERS: dict[str, object] = {
    **_CODEC_HELPERS,
    "_project_status": lambda v: _member(_PROJECT_STATUSES, ProjectStatus, v),
    "_trigger": Trigger, "_budget": _optional(RetryBudget), "_outcome": _optional(Outcome),
    "_state": DispatchState,
}  # fmt: skip
# Every other row decoded by column name, as tasks are (see common.compile_decoder).
_project: Callable[[Any], Project] = common.compile_decoder(
    Project,
    read=common.at(common.PROJECT_COLUMNS),
    codec={"status": "_project_status({0})", "name": "_str({0})", "created_at": "_dt({0})",
           "updated_at": "_dt({0})"},
    helpers=_HELPERS,
)  # fmt: skip
_attempt: Callable[[Any], Attempt] = common.compile_decoder(
    Attempt,
    read=common.at(common.ATTEMPT_COLUMNS),
    codec={"trigger": "_trigger({0})", "dispatched_at": "_dt({0})", "available_at": "_dt({0})",
           "actor": "_ostr({0})", "reason": "_ostr({0})", "budget": "_budget({0})",
           "started_at": "_odt({0})", "finished_at": "_odt({0})", "outcome": "_outcome({0})",
           "error_type": "_ostr({0})", "error_message": "_ostr({0})"},
    helpers=_HELPERS,
)  # fmt: skip
_entry: Callable[[Any], DispatchEntry] = common.compile_decoder(
    DispatchEntry,
    read=common.at(common.ENTRY_COLUMNS),
    codec={"project_id": "_str({0})", "task_id": "_str({0})", "state": "_state({0})",
           "available_at": "_dt({0})", "created_at": "_dt({0})", "claimed_until": "_odt({0})",
           "last_error": "_ostr({0})", "delivered_at": "_odt({0})"},
    helpers=_HELPERS,
)  # fmt: skip
_idem: Callable[[Any], IdempotencyRecord] = common.compile_decoder(
    IdempotencyRecord,
    read=common.at(common.IDEM_COLUMNS),
    codec={"key": "_str({0})", "project_id": "_str({0})", "task_id": "_str({0})",
           "created_at": "_dt({0})", "body": "_ostr({0})", "expires_at": "_dt({0})"},
    helpers=_HELPERS,
)  # fmt: skip


# -- error translation ----------------------------------------------------------------

# Primary result codes (https://sqlite.org/rescode.html).
_BUSY = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED
_CORRUPT = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB
_READONLY = {8}  # SQLITE_READONLY
_CANTOPEN = {14}  # SQLITE_CANTOPEN
_UNAVAILABLE = {3, 10, 13, 15}  # SQLITE_PERM, SQLITE_IOERR, SQLITE_FULL, SQLITE_PROTOCOL


def _code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11
    if isinstance(code, int):
        return code & 0xFF
    text = str(exc).lower()  # Python 3.10: only the message tells
    for fragment, guessed in (
        ("locked", 5),
        ("busy", 5),
        ("not a database", 26),
        ("malformed", 11),
        ("readonly", 8),
        ("read-only", 8),
        ("unable to open", 14),
        ("disk i/o", 10),
        ("disk is full", 13),
    ):
        if fragment in text:
            return guessed
    return None


class _Connection(sqlite3.Connection):
    """A pooled connection that keeps the cursors it made until it goes back to the pool.

    A cursor left open (its statement failed, or was not read to the end)
    resets its statement when it is freed, and that takes the connection's
    mutex. An exception's traceback keeps such a cursor alive past the
    operation, and is often freed on another thread (an event loop); if the
    connection is lent out again meanwhile and waiting in SQLite's busy
    handler, that thread would stall for the whole busy timeout. So every
    cursor is closed by :meth:`release`, on the thread that used it, before
    the connection is lent again or closed. (They are held weakly: one freed
    at once, as most are, was reset then, on the thread that used it.)
    """

    __slots__ = ("busy_ms", "cursors")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cursors: list[weakref.ref[sqlite3.Cursor]] = []
        self.busy_ms = 0
        """The busy timeout set on the connection, in milliseconds."""

    def open_cursor(self) -> sqlite3.Cursor:
        cursor = sqlite3.Cursor(self)
        self.cursors.append(weakref.ref(cursor))
        return cursor

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        return self.open_cursor().execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        return self.open_cursor().executemany(sql, parameters)

    def wait_at_most(self, seconds: float) -> None:
        """Let the next statement wait ``seconds`` for a lock (SQLite's busy timeout)."""
        wanted = max(0, int(seconds * 1000))
        if abs(wanted - self.busy_ms) > _BUSY_SLACK_MS:
            self.open_cursor().execute(f"PRAGMA busy_timeout = {wanted}")
            self.busy_ms = wanted

    def reset(self, busy_ms: int) -> bool:
        """Ready to lend again: the busy timeout back to ``busy_ms`` (a write may have
        shortened it) and every cursor closed; False if the connection is unusable."""
        if self.busy_ms != busy_ms:
            try:
                self.open_cursor().execute(f"PRAGMA busy_timeout = {busy_ms}")
            except sqlite3.Error:
                self.release()
                return False
            self.busy_ms = busy_ms
        return self.release()

    def release(self) -> bool:
        """Close every cursor this connection made; False if it is unusable."""
        cursors, self.cursors = self.cursors, []
        try:
            for ref in cursors:
                cursor = ref()
                if cursor is not None:
                    cursor.close()
        except sqlite3.Error:
            return False
        return True


_BUSY_SLACK_MS = 20
"""A write's lock wait is shortened only when it waited this long for its turn already."""


class SQLiteStorage:
    """A :class:`~deepwork_retry.ports.Storage` in one SQLite file.

    ``timeout`` bounds the wait for another writer (seconds); ``synchronous``
    ``"FULL"`` makes every commit durable across power loss, ``"NORMAL"``
    only across process crashes (faster). ``read_only=True`` opens the file
    for reading: reads work, every write raises
    :class:`~deepwork_retry.exceptions.StorageReadOnly`. ``create=False``
    opens only an existing, fully migrated database: a missing file, or one
    without the current schema, raises
    :class:`~deepwork_retry.exceptions.StorageMissing` and nothing is created
    or changed (``read_only=True`` never creates the file either).

    Safe to share between threads and to open from several processes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 5.0,
        synchronous: Synchronous = "FULL",
        read_only: bool = False,
        create: bool = True,
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise InvalidInput("synchronous must be 'NORMAL' or 'FULL'")
        if not isinstance(timeout, (int, float)) or not timeout >= 0:
            raise InvalidInput("timeout must be a number of seconds >= 0")
        self.path = Path(path)
        if str(path) in ("", ":memory:") or str(path).startswith("file:"):
            raise InvalidInput(
                "SQLiteStorage needs a file path; use MemoryStorage for in-memory storage"
            )
        self.timeout = float(timeout)
        self._busy_ms = int(self.timeout * 1000)
        self.synchronous: Synchronous = synchronous
        self.read_only = read_only
        self.create = create
        # A pool of connections rather than one per thread: any thread (the
        # event loop's worker threads included) borrows one for one
        # operation, so their number is bounded by the real concurrency, and
        # close() can reach every one of them. sqlite3 connections are not
        # safe to use from two threads at once; the pool never lends one
        # connection twice.
        self._lock = threading.Lock()
        self._idle: list[_Connection] = []
        self._keep_idle = _KEEP_IDLE
        self._closed = False
        self._pid = _PID
        self._immutable = False
        # Threads of this process take turns for the write lock here, in a
        # queue, rather than in SQLite's busy handler, which sleeps and
        # retries with growing pauses: under contention that turned a
        # millisecond's wait into pauses of a second or more. Other processes
        # still meet at SQLite's own lock, bounded by `timeout`.
        self._writer = threading.Lock()
        self._writer_pid = _PID
        # When a caller queued this thread's write before running it (see
        # AsyncSQLiteStorage), the time its wait for the lock must end by.
        self._due = threading.local()
        # The one-step retry, rendered from the core's description of the move.
        self._retry = _render_retry(effects.MANUAL_RETRY)
        self._open()

    # -- connections -----------------------------------------------------------
    def _uri(self) -> str:
        mode = "ro" if self.read_only else "rwc" if self.create else "rw"
        if self._immutable:
            mode += "&immutable=1"
        return f"file:{urllib.parse.quote(str(self.path.absolute()))}?mode={mode}"

    def _connect(self) -> _Connection:
        conn = sqlite3.connect(
            self._uri(),
            uri=True,
            timeout=self.timeout,
            isolation_level=None,  # transactions are explicit: BEGIN ... COMMIT
            check_same_thread=False,  # the pool hands a connection to one thread at a time
            factory=_Connection,
        )
        conn.busy_ms = self._busy_ms
        try:
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            if self.read_only:
                conn.execute("PRAGMA query_only = 1")
        except BaseException:
            conn.release()
            conn.close()
            raise
        return conn

    def _open(self) -> None:
        if (self.read_only or not self.create) and not self.path.exists():
            how = "read-only" if self.read_only else "without creating it"
            raise StorageMissing(
                f"Cannot open SQLite database {str(self.path)!r} {how}: it does not exist"
            )
        if not self.path.parent.is_dir():
            raise StorageUnavailable(
                f"Cannot open SQLite database {str(self.path)!r}: "
                f"directory {str(self.path.parent)!r} does not exist"
            )
        if self.path.is_dir():
            raise StorageUnavailable(
                f"Cannot open SQLite database {str(self.path)!r}: it is a directory"
            )
        with self._translating():
            try:
                conn = self._prepared()
            except sqlite3.OperationalError as exc:
                if _code(exc) not in _READONLY | _CANTOPEN or self._writable():
                    raise
                # A WAL file needs its -shm index to be read; where neither the
                # file nor its directory may be written, it cannot be created,
                # so the file is read as immutable: reads work, writes raise
                # StorageReadOnly. (No writer can be using it from here either.)
                self.read_only = True
                self._immutable = True
                conn = self._prepared()
            conn.release()
        self._idle.append(conn)

    def _writable(self) -> bool:
        return os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK)

    def _prepared(self) -> _Connection:
        conn = self._connect()
        try:
            if not self.create:
                # Checked before anything is written: switching a file to WAL
                # writes its header, which must not happen to a file refused.
                self._migrate(conn)
            if not self.read_only:
                self._use_wal(conn)
            if self.create:
                self._migrate(conn)
        except BaseException:
            conn.release()
            conn.close()
            raise
        return conn

    def _use_wal(self, conn: sqlite3.Connection) -> None:
        """Switch the file to WAL (once; it persists), waiting out concurrent openers.

        Changing the journal mode does not wait on SQLite's busy handler, so
        several processes opening one new file at once retry here, within
        ``timeout``.
        """
        deadline = time.monotonic() + self.timeout
        pause = 0.001
        while True:
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if _code(exc) not in _BUSY or time.monotonic() >= deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Bring the schema up to date in one transaction, or refuse the file.

        ``BEGIN IMMEDIATE`` serialises processes opening a new file at once:
        the first applies the migrations, the others find them applied.
        """
        shipped = migrations()
        latest = shipped[-1][0] if shipped else 0
        conn.execute("BEGIN" if self.read_only else "BEGIN IMMEDIATE")
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {
                row[0]
                for row in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' "
                    "AND name NOT LIKE 'sqlite_%'"
                )
            }
            if app_id != APPLICATION_ID and (app_id != 0 or tables or version != 0):
                listed = ", ".join(sorted(tables)) or "none"
                raise StorageCorrupt(
                    f"{str(self.path)!r} is an SQLite database of another application "
                    f"(application_id {app_id}, tables: {listed}); "
                    "deepwork_retry will not use or change it"
                )
            if version > latest:
                raise StorageCorrupt(
                    f"{str(self.path)!r} has schema version {version}, newer than this "
                    f"deepwork_retry knows ({latest}); upgrade deepwork_retry"
                )
            pending = common.pending(shipped, range(version + 1))
            if pending and not self.create:
                lacks = (
                    "has no deepwork_retry schema"
                    if version == 0
                    else (f"lacks schema migrations {', '.join(m.file for m in pending)}")
                )
                raise StorageMissing(f"SQLite database {str(self.path)!r} {lacks}")
            if pending and self.read_only:
                raise StorageReadOnly(
                    f"{str(self.path)!r} needs schema migrations "
                    f"({', '.join(m.file for m in pending)}) but is opened read-only"
                )
            for number, _file, sql in pending:
                for statement in _statements(sql):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {int(number)}")
            if pending:
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                tables = {
                    row[0] for row in conn.execute("SELECT name FROM sqlite_master")
                } & _TABLES
            missing = _TABLES - tables
            if missing:
                raise StorageCorrupt(
                    f"{str(self.path)!r} is damaged: tables {', '.join(sorted(missing))} "
                    "are missing"
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _checkout(self) -> _Connection:
        with self._lock:
            if self._closed:
                raise StorageUnavailable(f"SQLite storage {str(self.path)!r} is closed")
            if self._pid != _PID:
                # A forked child must not use its parent's connections; they are
                # dropped unclosed (closing could disturb the parent's locks).
                _ABANDONED.extend(self._idle)
                self._idle = []
                self._pid = _PID
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _checkin(self, conn: _Connection) -> None:
        """Take ``conn`` back, reset first (see :class:`_Connection`)."""
        if conn.reset(self._busy_ms):
            with self._lock:
                if not self._closed and len(self._idle) < self._keep_idle and self._pid == _PID:
                    self._idle.append(conn)
                    return
        conn.close()

    def _discard(self, conn: _Connection) -> None:
        """Close ``conn``, in an unknown state: it is never lent again."""
        conn.release()
        conn.close()

    @contextmanager
    def _translating(self) -> Iterator[None]:
        """The one place driver errors become library errors (``__cause__`` kept)."""
        try:
            yield
        except (sqlite3.Error, OverflowError, UnicodeEncodeError) as exc:
            raise self._translated(exc) from exc

    def _translated(self, exc: sqlite3.Error | OverflowError | UnicodeEncodeError) -> Exception:
        """The library error for a driver error (see :meth:`_translating`)."""
        where = repr(str(self.path))
        if isinstance(exc, OverflowError):
            return InvalidInput("a number is out of SQLite's 64-bit range")
        if isinstance(exc, UnicodeEncodeError):
            return InvalidInput("text SQLite cannot store (lone surrogates)")
        code = _code(exc)
        if code in _BUSY:
            return StorageUnavailable(
                f"SQLite database {where} is locked by another writer "
                f"(waited {self.timeout:g}s): {exc}"
            )
        if code in _CORRUPT:
            return StorageCorrupt(
                f"SQLite database {where} is damaged or not a deepwork_retry database: {exc}"
            )
        if code in _READONLY:
            return StorageReadOnly(
                f"SQLite database {where} is read-only; nothing was changed: {exc}"
            )
        if code in _CANTOPEN:
            return StorageUnavailable(f"Cannot open SQLite database {where}: {exc}")
        if code in _UNAVAILABLE:
            return StorageUnavailable(f"SQLite database {where} failed: {exc}")
        if "no such table" in str(exc) or "no such column" in str(exc):
            return StorageCorrupt(
                f"SQLite database {where} does not have the expected schema: {exc}"
            )
        return StorageError(f"SQLite database {where} failed: {exc}")

    def _write_turn(self) -> tuple[threading.Lock, float]:
        """This process's writer lock, taken, and the time the wait for SQLite's lock must
        end by; ``StorageUnavailable`` when the write has waited ``timeout`` in all.

        The one wait is shared by the turn among this process's writers, SQLite's
        lock, and the time the write was queued before it ran (:meth:`_due_by`).
        """
        if self._writer_pid != _PID:
            # A forked child may have copied the lock held by a parent's thread.
            self._writer = threading.Lock()
            self._writer_pid = _PID
        writer = self._writer
        due: float | None = getattr(self._due, "at", None)
        if due is None:
            if writer.acquire(False):
                return writer, time.monotonic() + self.timeout
            due = time.monotonic() + self.timeout
        left = due - time.monotonic()
        if not writer.acquire(False) and (left <= 0 or not writer.acquire(timeout=left)):
            raise StorageUnavailable(
                f"SQLite database {str(self.path)!r} is busy: no write turn within "
                f"{self.timeout:g} s"
            )
        return writer, due

    @contextmanager
    def _due_by(self, at: float) -> Iterator[None]:
        """Writes this thread starts in the block wait for their lock until ``at`` at most
        (``time.monotonic()``), rather than ``timeout`` from their start."""
        self._due.at = at
        try:
            yield
        finally:
            self._due.at = None

    def _begin_write(self, cursor: sqlite3.Cursor | _Connection, due: float) -> None:
        """``BEGIN IMMEDIATE``, waiting for SQLite's write lock until ``due`` at most."""
        conn = cursor if isinstance(cursor, _Connection) else cursor.connection
        assert isinstance(conn, _Connection)
        conn.wait_at_most(due - time.monotonic())
        cursor.execute("BEGIN IMMEDIATE")

    @contextmanager
    def _tx(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction on a borrowed connection; rolled back on any error, and the
        connection's cursors closed, before the error leaves."""
        writer, due = self._write_turn() if write else (None, 0.0)
        try:
            with self._translating():
                conn = self._checkout()
                reusable = True
                try:
                    if write:
                        self._begin_write(conn, due)
                    else:
                        conn.execute("BEGIN")
                    yield conn
                    conn.execute("COMMIT")
                finally:
                    if conn.in_transaction:
                        try:
                            conn.execute("ROLLBACK")
                        except sqlite3.Error:
                            reusable = False  # in an unknown state: never lend it again
                    if reusable:
                        self._checkin(conn)
                    else:
                        self._discard(conn)
        finally:
            if writer is not None:
                writer.release()

    # -- setup -------------------------------------------------------------
    def create_project(self, project: Project) -> None:
        _valid_id("project", project.id)
        params = _project_params(project)
        with self._tx(write=True) as c:
            if c.execute("SELECT 1 FROM projects WHERE id = ?", (project.id,)).fetchone():
                raise AlreadyExists(f"Project {project.id!r} exists already")
            c.execute(
                f"INSERT INTO projects ({_PROJECT_COLUMNS}) VALUES ({_marks(_PROJECT_COLUMNS)})",
                params,
            )

    def add_tasks(self, tasks: Sequence[Task]) -> None:
        check_new_tasks(tasks)
        for task in tasks:
            _valid_id("project", task.project_id)
            _valid_id("task", task.id)
        rows = [_task_params(task) for task in tasks]
        with self._tx(write=True) as c:
            known: set[str] = set()
            for task in tasks:
                if task.project_id not in known:
                    if not c.execute(
                        "SELECT 1 FROM projects WHERE id = ?", (task.project_id,)
                    ).fetchone():
                        raise ProjectNotFound(task.project_id)
                    known.add(task.project_id)
                if c.execute(
                    "SELECT 1 FROM tasks WHERE project_id = ? AND id = ?",
                    (task.project_id, task.id),
                ).fetchone():
                    raise AlreadyExists(f"Task {task.id!r} exists already in {task.project_id!r}")
            c.executemany(
                f"INSERT INTO tasks ({_TASK_COLUMNS}) VALUES ({_marks(_TASK_COLUMNS)})", rows
            )
            c.executemany(
                "INSERT OR IGNORE INTO task_deps (project_id, blocker_id, task_id) "
                "VALUES (?, ?, ?)",
                [(t.project_id, _text(dep), t.id) for t in tasks for dep in t.blocked_by],
            )
            added: dict[str, dict[str, int]] = {}
            for task in tasks:
                counts = added.setdefault(task.project_id, {})
                status = TaskStatus(task.status).value
                counts[status] = counts.get(status, 0) + 1
            for pid, counts in added.items():
                sets = ", ".join(f"{s} = {s} + ?" for s in counts)
                c.execute(
                    f"UPDATE projects SET total = total + ?, {sets} WHERE id = ?",
                    (sum(counts.values()), *counts.values(), pid),
                )

    # -- reads ---------------------------------------------------------------
    def _get_project(self, c: sqlite3.Connection, project_id: str) -> Project:
        if not isinstance(project_id, str):
            raise ProjectNotFound(project_id)
        row = c.execute(
            f"SELECT {_PROJECT_COLUMNS} FROM projects WHERE id = ?", (_text(project_id),)
        ).fetchone()
        if row is None:
            raise ProjectNotFound(project_id)
        return _project(row)

    def _get_task(self, c: sqlite3.Connection, project_id: str, task_id: str) -> Task:
        if not isinstance(project_id, str) or not isinstance(task_id, str):
            raise TaskNotFound(project_id, task_id)
        row = c.execute(
            f"SELECT {_TASK_COLUMNS} FROM tasks WHERE project_id = ? AND id = ?",
            (_text(project_id), _text(task_id)),
        ).fetchone()
        if row is None:
            raise TaskNotFound(project_id, task_id)
        return _task(row)

    def get_project(self, project_id: str) -> Project:
        with self._tx(write=False) as c:
            return self._get_project(c, project_id)

    def load(self, project_id: str, task_id: str) -> tuple[Project, Task]:
        if not _all_text(project_id, task_id):  # odd ids: the step-by-step lookups report them
            with self._tx(write=False) as c:
                return self._get_project(c, project_id), self._get_task(c, project_id, task_id)
        # One statement, so one implicit read transaction: no BEGIN/COMMIT round.
        with self._translating():
            conn = self._checkout()
            try:
                rows = conn.execute(_LOAD, (_text(task_id), _text(project_id))).fetchall()
            finally:
                self._checkin(conn)
        if not rows:
            raise ProjectNotFound(project_id)
        row = rows[0]
        if row[_PROJECT_WIDTH] is None:
            raise TaskNotFound(project_id, task_id)
        return _project(row[:_PROJECT_WIDTH]), _task(row[_PROJECT_WIDTH:])

    def get_tasks(self, project_id: str, task_ids: Sequence[str]) -> dict[str, Task]:
        with self._tx(write=False) as c:
            return self._get_tasks(c, project_id, task_ids)

    def _get_tasks(
        self, c: sqlite3.Connection, project_id: str, task_ids: Sequence[str]
    ) -> dict[str, Task]:
        ids = [_text(tid) for tid in dict.fromkeys(task_ids)]
        found: dict[str, Task] = {}
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start : start + _IN_CHUNK]
            rows = c.execute(
                f"SELECT {_TASK_COLUMNS} FROM tasks WHERE project_id = ? "
                f"AND id IN ({', '.join('?' for _ in chunk)})",
                (_text(project_id), *chunk),
            )
            for row in rows:
                found[row[1]] = _task(row)
        return {tid: found[tid] for tid in dict.fromkeys(task_ids) if tid in found}

    def dependants(self, project_id: str, task_id: str) -> list[Task]:
        with self._tx(write=False) as c:
            rows = c.execute(
                f"SELECT {', '.join('t.' + col.strip() for col in _TASK_COLUMNS.split(','))} "
                "FROM task_deps AS d JOIN tasks AS t "
                "ON t.project_id = d.project_id AND t.id = d.task_id "
                "WHERE d.project_id = ? AND d.blocker_id = ? ORDER BY d.task_id",
                (_text(project_id), _text(task_id)),
            )
            return [_task(row) for row in rows]

    def list_tasks(
        self,
        project_id: str,
        *,
        status: TaskStatus | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[Task]:
        check_limit(limit)
        where = "project_id = ?"
        params: list[Any] = [_text(project_id)]
        if status is not None:
            where += " AND status = ?"
            params.append(TaskStatus(status).value)
        if after is not None:
            op, bound = _after_bound(after)
            where += f" AND id {op} ?"
            params.append(bound)
        with self._tx(write=False) as c:
            self._get_project(c, project_id)
            rows = c.execute(
                f"SELECT {_TASK_COLUMNS} FROM tasks WHERE {where} ORDER BY id LIMIT ?",
                (*params, limit),
            )
            return [_task(row) for row in rows]

    def progress(self, project_id: str) -> Progress:
        with self._tx(write=False) as c:
            return self._progress(c, project_id)

    def _progress(self, c: sqlite3.Connection, project_id: str) -> Progress:
        row = c.execute(
            f"SELECT {', '.join(_COUNTERS)} FROM projects WHERE id = ?", (_text(project_id),)
        ).fetchone()
        if row is None:
            raise ProjectNotFound(project_id)
        return Progress(project_id=project_id, **dict(zip(_COUNTERS, row, strict=True)))

    def attempts(self, project_id: str, task_id: str) -> list[Attempt]:
        with self._tx(write=False) as c:
            self._get_task(c, project_id, task_id)
            rows = c.execute(
                f"SELECT {_ATTEMPT_COLUMNS} FROM attempts WHERE project_id = ? AND task_id = ? "
                "ORDER BY number",
                (project_id, task_id),
            )
            return [_attempt(row) for row in rows]

    def dispatches(self, project_id: str, task_id: str) -> list[DispatchEntry]:
        with self._tx(write=False) as c:
            task = self._get_task(c, project_id, task_id)
            rows = c.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM outbox WHERE project_id = ? AND task_id = ? "
                "AND attempt BETWEEN 1 AND ? ORDER BY attempt",
                (project_id, task_id, task.attempt),
            )
            return [_entry(row) for row in rows]

    def deferred(self, project_id: str) -> list[DispatchEntry]:
        with self._tx(write=False) as c:
            rows = c.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM outbox WHERE project_id = ? "
                f"AND state = {_DEFERRED} ORDER BY seq",
                (_text(project_id),),
            )
            return [_entry(row) for row in rows]

    # -- writes ----------------------------------------------------------------
    def _version(self, c: sqlite3.Connection, project_id: str, task_id: str) -> int | None:
        row = c.execute(
            "SELECT version FROM tasks WHERE project_id = ? AND id = ?",
            (_text(project_id), _text(task_id)),
        ).fetchone()
        return None if row is None else int(row[0])

    def _check_guards(
        self, c: sqlite3.Connection, project_id: str, plan: Plan | ProjectPlan
    ) -> None:
        for guard in plan.guards:
            found = self._version(c, project_id, guard.task_id)
            if found != guard.version:
                raise VersionConflict(guard.task_id, guard.version, found)

    def apply(self, plan: Plan) -> Applied:
        params = self._plan_params(plan)
        with self._tx(write=True) as c:
            return self._apply_in(c, plan, params)

    def _plan_params(self, plan: Plan) -> _PlanParams:
        """Serialise everything first: a value SQLite cannot hold fails before any write."""
        before, after = plan.before, plan.after
        if after.id != before.id or after.project_id != before.project_id:
            raise InvalidInput("a plan cannot change a task's id or project")
        return (
            _task_params(after),
            None if plan.new_attempt is None else _attempt_params(plan.new_attempt),
            None if plan.dispatch is None else _entry_params(plan.dispatch),
            None if plan.idempotency is None else _idem_params(plan.idempotency),
            None if plan.claimed_until is None else _ts(plan.claimed_until),
        )

    def _apply_in(
        self,
        c: sqlite3.Connection,
        plan: Plan,
        params: _PlanParams,
    ) -> Applied:
        """Apply ``plan`` in the open write transaction ``c``."""
        before, after = plan.before, plan.after
        pid, tid = before.project_id, before.id
        task_row, new_attempt, entry, idem, claimed_until = params
        # The compare-and-set is the write itself; any refusal below rolls
        # the whole transaction back, so checks and writes may interleave.
        written = c.execute(_UPDATE_TASK, (*task_row[2:], pid, tid, before.version)).rowcount
        if written != 1:
            current = self._version(c, pid, tid)
            if current is None:
                raise TaskNotFound(pid, tid)
            raise VersionConflict(tid, before.version, current)
        if plan.guards:
            self._check_guards(c, pid, plan)
        moved = before.status != after.status
        counters: tuple[Any, ...] | None = None
        if plan.idempotency is not None or not moved:
            # The project's version is checked before the idempotency key.
            if plan.project_version is not None:
                row = c.execute("SELECT version FROM projects WHERE id = ?", (pid,)).fetchone()
                if row[0] != plan.project_version:
                    raise VersionConflict(tid, before.version, before.version)
            if plan.idempotency is not None:
                existing = self._get_idempotency(c, plan.idempotency.key)
                if existing is not None and not existing.expired(plan.idempotency.created_at):
                    raise IdempotencyConflict(existing)
        if moved:
            old = _value(_TASK_STATUS_VALUES, TaskStatus, before.status)
            new = _value(_TASK_STATUS_VALUES, TaskStatus, after.status)
            row = c.execute(_SHIFT_RETURNING[(old, new)], (pid,)).fetchall()[0]
            if (
                plan.idempotency is None
                and plan.project_version is not None
                and row[0] != plan.project_version
            ):
                raise VersionConflict(tid, before.version, before.version)
            counters = row[1:]
        made: list[DispatchEntry] = []
        dispatch = plan.dispatch
        if dispatch is not None and entry is not None:
            pending = dispatch.state is DispatchState.PENDING
            try:
                c.execute(_INSERT_PENDING if pending else _INSERT_ENTRY, entry)
            except sqlite3.IntegrityError:
                # The (task, attempt) entry exists already: the plan is stale.
                raise VersionConflict(tid, before.version, before.version) from None
            if pending and dispatch.claimed_until:
                made.append(dispatch)
        if plan.new_attempt is not None and new_attempt is not None:
            number = plan.new_attempt.number
            if not c.execute(_INSERT_NEXT_ATTEMPT, (*new_attempt, pid, tid, number - 1)).rowcount:
                raise InvalidInput(f"Task {tid!r}: attempt {number} is not next")
        if after.blocked_by:
            new_deps = [d for d in dict.fromkeys(after.blocked_by) if d not in before.blocked_by]
            if new_deps:
                c.executemany(
                    "INSERT OR IGNORE INTO task_deps (project_id, blocker_id, task_id) "
                    "VALUES (?, ?, ?)",
                    [(pid, _text(dep), tid) for dep in new_deps],
                )
        if plan.attempt_update is not None:
            self._update_attempt(c, pid, tid, plan.attempt_update)
        if plan.releases:
            made.extend(self._release(c, pid, plan.releases, claimed_until))
        if idem is not None:
            c.execute(_UPSERT_IDEM, idem)  # the key is free: absent, or its record expired
        progress = self._progress(c, pid) if counters is None else _progress_of(pid, counters)
        return Applied(
            task=after,
            progress=progress,
            dispatches=tuple(made),
            deferred=dispatch is not None and dispatch.state is DispatchState.DEFERRED,
        )

    def retry_blocked(
        self,
        project_id: str,
        task_id: str,
        *,
        now: datetime,
        actor: str | None = None,
        reason: str | None = None,
        budget: RetryBudget = RetryBudget.ONE_MORE,
        claimed_until: datetime | None = None,
        idempotency_key: str | None = None,
        idempotency_expires_at: datetime | None = None,
    ) -> Applied | None:
        """The manual retry decided and applied in one write transaction.

        :func:`~deepwork_retry._core.decide.manual_retry`'s change is made by
        :meth:`_RetrySQL.update`, rendered from the core's description of the move
        (:data:`~deepwork_retry._core.effects.MANUAL_RETRY`), only from a state the
        core lets a retry leave;
        the rest of its checks and choices are made on one read of what
        changed (:attr:`_RetrySQL.read`), and each insert refuses what
        :meth:`apply` would refuse (a taken idempotency key, an existing
        outbox entry, an attempt that is not next). The write lock is held
        throughout, so nothing read can go stale. ``None`` (nothing changed,
        all rolled back) whenever anything refuses; the caller's step-by-step
        path then raises the core's own error.
        """
        if not _all_text(project_id, task_id):
            return None
        if budget.__class__ is not RetryBudget:
            budget = RetryBudget(budget)
        # What _tx does, written out: this is the hot path.
        writer, due = self._write_turn()
        try:
            c = self._checkout()
        except sqlite3.Error as exc:
            writer.release()
            raise self._translated(exc) from exc
        except BaseException:
            writer.release()
            raise
        reusable = True
        try:
            at = _ts(now)
            pid, tid = _text(project_id), _text(task_id)
            # One cursor for every statement: cheaper than a new one per execute.
            cur = c.open_cursor()
            self._begin_write(cur, due)
            if idempotency_key is not None and not (
                cur.execute(
                    _INSERT_NEW_IDEM,
                    (_text(idempotency_key), pid, tid, at, _expiry(now, idempotency_expires_at)),
                ).rowcount
            ):
                return None  # the key is taken
            full = budget is RetryBudget.FULL
            r = self._retry
            for source in r.sources:
                if cur.execute(r.update[source], (full, at, pid, tid)).rowcount:
                    break
            else:
                return None  # no such task, or not in a state a retry leaves
            cur.execute(r.shift[source], (pid,))
            rows = cur.execute(r.read, (pid, tid)).fetchall()
            if not rows or rows[0][0] not in _ACCEPTING:
                return None  # the project does not accept retries
            row = rows[0]
            task = r.decode(row, project_id, task_id, now)
            number = task.attempt
            if row[r.count_at] != number - 1:
                return None  # the attempt is not next
            ready = row[0] in _DISPATCHING and (
                not task.blocked_by or self._dependencies_met(c, task)
            )
            try:
                if ready:
                    last = row[r.count_at + 1]  # pending after every pending entry
                    seq = 1 if last is None else last + 1
                    until = _ots(claimed_until)
                    cur.execute(r.insert_pending, (pid, tid, number, at, until, seq))
                else:
                    cur.execute(r.insert_deferred, (pid, tid, number, at))
                cur.execute(
                    r.insert_attempt,
                    (pid, tid, number, at, _otext(actor), _otext(reason), _BUDGET_VALUES[budget]),
                )
            except sqlite3.IntegrityError:
                return None  # the (task, attempt) outbox entry or attempt exists already
            cur.execute("COMMIT")
        except (sqlite3.Error, OverflowError, UnicodeEncodeError) as exc:
            raise self._translated(exc) from exc
        except StorageError:
            raise
        except DeepworkError:
            return None  # rolled back below; the general path raises it again
        finally:
            if c.in_transaction:
                try:
                    c.execute("ROLLBACK")
                except sqlite3.Error:
                    reusable = False  # in an unknown state: never lend it again
            if reusable:
                self._checkin(c)
            else:
                self._discard(c)
            writer.release()
        made: tuple[DispatchEntry, ...] = ()
        if ready and claimed_until:
            made = (
                DispatchEntry(
                    project_id=project_id, task_id=task_id, attempt=number,
                    state=DispatchState.PENDING, available_at=now, created_at=now,
                    claimed_until=claimed_until,
                ),
            )  # fmt: skip
        return Applied(
            task=task, progress=_progress_of(project_id, row[1 : 1 + len(_COUNTERS)]),
            dispatches=made, deferred=not ready,
        )  # fmt: skip

    def _dependencies_met(self, c: sqlite3.Connection, task: Task) -> bool:
        """Whether every task ``task`` waits for is finished (a missing one is not).

        Read after ``task`` itself changed; it is never among its own
        blockers, and would count as unfinished before the change as after.
        """
        found = self._get_tasks(c, task.project_id, task.blocked_by)
        return machine.dependencies_met(task, {tid: t.status for tid, t in found.items()})

    def _update_attempt(
        self, c: sqlite3.Connection, pid: str, tid: str, update: AttemptUpdate
    ) -> None:
        if update.number <= 0:
            return
        row = c.execute(
            f"SELECT {_ATTEMPT_COLUMNS} FROM attempts "
            "WHERE project_id = ? AND task_id = ? AND number = ?",
            (pid, tid, update.number),
        ).fetchone()
        if row is None:
            return
        old = _attempt(row)
        # A falsy field of the update keeps the stored value, as in MemoryStorage.
        c.execute(
            "UPDATE attempts SET started_at = ?, finished_at = ?, outcome = ?, error_type = ?, "
            "error_message = ? WHERE project_id = ? AND task_id = ? AND number = ?",
            (
                _ots(update.started_at or old.started_at),
                _ots(update.finished_at or old.finished_at),
                None
                if not (update.outcome or old.outcome)
                else Outcome(update.outcome or old.outcome).value,
                _otext(update.error_type or old.error_type),
                _otext(update.error_message or old.error_message),
                pid,
                tid,
                update.number,
            ),
        )

    def _next_pending(self, c: sqlite3.Connection) -> int:
        """A pending_seq after every pending entry: claim order is the order made pending."""
        row = c.execute(
            f"SELECT pending_seq FROM outbox WHERE state = {_PENDING} "
            "ORDER BY pending_seq DESC LIMIT 1"
        ).fetchone()
        return 1 if row is None or row[0] is None else int(row[0]) + 1

    def _release(
        self,
        c: sqlite3.Connection,
        pid: str,
        releases: Sequence[Release],
        claimed_until: int | None,
    ) -> list[DispatchEntry]:
        made = []
        for rel in releases:
            row = c.execute(
                f"SELECT seq, {_ENTRY_COLUMNS} FROM outbox "
                "WHERE project_id = ? AND task_id = ? AND attempt = ?",
                (pid, _text(rel.task_id), rel.attempt),
            ).fetchone()
            if row is None or row[_SEQ_ENTRY["state"]] != DispatchState.DEFERRED.value:
                continue
            c.execute(
                f"UPDATE outbox SET state = {_PENDING}, claimed_until = ?, pending_seq = ? "
                "WHERE seq = ?",
                (claimed_until, self._next_pending(c), row[0]),
            )
            if claimed_until is not None:
                made.append(
                    attrs.evolve(
                        _entry(row[1:]),
                        state=DispatchState.PENDING,
                        claimed_until=_dt(claimed_until),
                    )
                )
        return made

    def apply_project(self, plan: ProjectPlan) -> tuple[Project, list[DispatchEntry]]:
        pid = plan.before.id
        if plan.after.id != pid:
            raise InvalidInput("a plan cannot change a project's id")
        row = _project_params(plan.after)
        claimed_until = _ots(plan.claimed_until)
        with self._tx(write=True) as c:
            current = self._get_project(c, pid)
            if current.version != plan.before.version:
                raise VersionConflict(pid, plan.before.version, current.version)
            self._check_guards(c, pid, plan)
            c.execute(
                "UPDATE projects SET status = ?, name = ?, created_at = ?, updated_at = ?, "
                "version = ? WHERE id = ?",
                (*row[1:], pid),
            )
            return plan.after, self._release(c, pid, plan.releases, claimed_until)

    # -- outbox ------------------------------------------------------------------
    def claim_due(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[DispatchEntry]:
        check_limit(limit)
        at, until = _ts(now), _ts(claimed_until)
        with self._tx(write=True) as c:
            rows = c.execute(
                f"SELECT seq, {_ENTRY_COLUMNS} FROM outbox WHERE state = {_PENDING} "
                "AND available_at <= ? AND (claimed_until IS NULL OR claimed_until <= ?) "
                "ORDER BY pending_seq LIMIT ?",
                (at, at, limit),
            ).fetchall()
            c.executemany(
                "UPDATE outbox SET claimed_until = ? WHERE seq = ?", [(until, r[0]) for r in rows]
            )
            return [attrs.evolve(_entry(r[1:]), claimed_until=claimed_until) for r in rows]

    def mark_delivered(self, entries: Sequence[DispatchEntry], *, now: datetime) -> None:
        at = _ts(now)
        keys = [(_text(e.project_id), _text(e.task_id), e.attempt) for e in entries]
        with self._tx(write=True) as c:
            c.executemany(
                f"UPDATE outbox SET state = {_DELIVERED}, delivered_at = ?, tries = tries + 1, "
                "claimed_until = NULL, pending_seq = NULL "
                f"WHERE project_id = ? AND task_id = ? AND attempt = ? AND state = {_PENDING}",
                [(at, *key) for key in keys],
            )

    def mark_failed(self, entry: DispatchEntry, *, error: str, retry_at: datetime) -> None:
        params = (_text(error), _ts(retry_at), _text(entry.project_id), _text(entry.task_id))
        with self._tx(write=True) as c:
            c.execute(
                "UPDATE outbox SET tries = tries + 1, last_error = ?, available_at = ?, "
                "claimed_until = NULL "
                f"WHERE project_id = ? AND task_id = ? AND attempt = ? AND state = {_PENDING}",
                (*params, entry.attempt),
            )

    def redeliver_stale(
        self, *, now: datetime, delivered_before: datetime, limit: int
    ) -> list[DispatchEntry]:
        check_limit(limit)
        at, error = _ts(now), _text(REDELIVERED)
        with self._tx(write=True) as c:
            # Driven by the assigned tasks (few), not by the delivered entries (all history).
            rows = c.execute(
                f"SELECT o.seq, {_O_ENTRY_COLUMNS} FROM tasks AS t JOIN outbox AS o "
                "ON o.project_id = t.project_id AND o.task_id = t.id AND o.attempt = t.attempt "
                f"WHERE t.status = {_AWAITING_START} AND o.state = {_DELIVERED} "
                "AND o.delivered_at <= ? "
                "ORDER BY o.delivered_at, o.project_id, o.task_id, o.attempt LIMIT ?",
                (_ts(delivered_before), limit),
            ).fetchall()
            first = self._next_pending(c)
            c.executemany(
                f"UPDATE outbox SET state = {_PENDING}, available_at = ?, claimed_until = NULL, "
                "last_error = ?, pending_seq = ? WHERE seq = ?",
                [(at, error, first + n, row[0]) for n, row in enumerate(rows)],
            )
        return [
            attrs.evolve(
                _entry(row[1:]),
                state=DispatchState.PENDING,
                available_at=now,
                claimed_until=None,
                last_error=REDELIVERED,
            )
            for row in rows
        ]

    # -- leases --------------------------------------------------------------------
    def expired_leases(self, *, now: datetime, limit: int) -> list[Task]:
        check_limit(limit)
        at = _ts(now)
        with self._tx(write=False) as c:
            rows = c.execute(
                f"SELECT {_TASK_COLUMNS} FROM tasks WHERE status = {_RUNNING} "
                "AND lease_expires_at <= ? ORDER BY lease_expires_at, project_id, id LIMIT ?",
                (at, limit),
            )
            return [_task(row) for row in rows]

    # -- idempotency -----------------------------------------------------------------
    def _get_idempotency(self, c: sqlite3.Connection, key: str) -> IdempotencyRecord | None:
        row = c.execute(
            f"SELECT {_IDEM_COLUMNS} FROM idempotency WHERE key = ?", (_text(key),)
        ).fetchone()
        return None if row is None else _idem(row)

    def get_idempotency(self, key: str, *, now: datetime | None = None) -> IdempotencyRecord | None:
        with self._tx(write=False) as c:
            record = self._get_idempotency(c, key)
        if record is not None and now is not None and record.expired(now):
            return None
        return record

    def save_idempotency(self, record: IdempotencyRecord) -> IdempotencyRecord:
        params = _idem_params(record)
        with self._tx(write=True) as c:
            existing = self._get_idempotency(c, record.key)
            if (
                existing is not None
                and not existing.expired(record.created_at)
                and (existing.status_code is not None or existing.created_at != record.created_at)
            ):
                return existing
            c.execute(_UPSERT_IDEM, params)
            return record

    # -- retention -------------------------------------------------------------------
    def prune(self, rule: PruneRule) -> Pruned:
        """One batch per table of what ``rule`` removes, each its own write transaction.

        Each batch is a range read of its table's retention index, oldest
        first (see migration 0003), and a delete by primary key.
        """
        counts = []
        for statement, params in _prune_statements(rule):
            if params is None:
                counts.append(0)
                continue
            with self._tx(write=True) as c:
                counts.append(c.execute(statement, params).rowcount)
        return Pruned(idempotency=counts[0], outbox=counts[1], attempts=counts[2], batches=1)

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Close every idle connection; later calls raise ``StorageUnavailable``."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __enter__(self) -> SQLiteStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SQLiteStorage({str(self.path)!r})"


_ABANDONED: list[sqlite3.Connection] = []
"""Connections inherited through fork: kept referenced so they are never closed in the child."""


class AsyncSQLiteStorage(AsyncFromSyncOneStep[SQLiteStorage]):
    """:class:`SQLiteStorage` behind the :class:`~deepwork_retry.ports.AsyncStorage` port.

    ``sqlite3`` blocks, so every call runs in a worker thread the storage
    owns: reads on up to ``readers`` threads (WAL lets them run beside the
    writer), writes on up to ``writers`` threads, which take turns for the
    write lock in order of arrival. ``timeout`` bounds a
    write's whole wait, from the moment it is sent: queued behind other
    writes, then for SQLite's lock; at most ``max_waiting_writes`` writes
    wait at once, and one more is refused at once. Either way the write
    raises :class:`~deepwork_retry.exceptions.StorageUnavailable` and
    changes nothing. :meth:`close` stops the threads.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 5.0,
        synchronous: Synchronous = "FULL",
        read_only: bool = False,
        readers: int = DEFAULT_READERS,
        writers: int = DEFAULT_WRITERS,
        max_waiting_writes: int = DEFAULT_MAX_WAITING_WRITES,
        create: bool = True,
    ) -> None:
        sync = SQLiteStorage(
            path, timeout=timeout, synchronous=synchronous, read_only=read_only, create=create
        )
        try:
            super().__init__(
                sync,
                offload=True,
                readers=readers,
                writers=writers,
                max_waiting_writes=max_waiting_writes,
                write_timeout=sync.timeout,
            )
        except BaseException:
            sync.close()
            raise
        # Every thread may keep a connection: none is closed only to be opened again.
        sync._keep_idle = max(sync._keep_idle, readers + writers)

    def _write(self, sent: float, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """The write's wait for SQLite's lock ends ``timeout`` after it was sent."""
        with self.sync._due_by(sent + self.sync.timeout):
            return super()._write(sent, fn, *args, **kwargs)
