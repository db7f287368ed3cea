"""What the sync and async PostgreSQL storages share: SQL, codecs, error translation.

The storages themselves (``deepwork_retry.storage._async_postgres`` and its
generated sync twin ``_sync_postgres``) only move these statements and values
over a connection.
"""

from __future__ import annotations

import json
import re
import select
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from types import TracebackType
from typing import Any, ClassVar

import attrs
import psycopg
from psycopg import sql

from deepwork_retry._core import effects, events, machine, retention
from deepwork_retry._core.events import Event, EventRetry, EventType
from deepwork_retry._core.model import (
    Attempt,
    DispatchEntry,
    IdempotencyRecord,
    Progress,
    Project,
    Task,
)
from deepwork_retry._core.plans import Applied, Guard, Plan, ProjectPlan, Release
from deepwork_retry._core.retention import PruneRule
from deepwork_retry._core.states import (
    TERMINAL,
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
    StorageUnavailable,
    TaskNotFound,
    VersionConflict,
)
from deepwork_retry.storage._sql import common
from deepwork_retry.storage._sql.dialect import Dialect, Kind

DEFAULT_SCHEMA = "deepwork"
_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,49}")
LOCK_CLASS = 0x6477
"""First key of the advisory lock that serialises migrations (the second is the schema's hash)."""


PIPELINE = psycopg.capabilities.has_pipeline()
"""Whether libpq can pipeline (version 14 or later)."""

_PLACEHOLDER = re.compile(rb"%\((\w+)\)s")
_SPACE = re.compile(r"\s+")


def check_schema(schema: object) -> str:
    """A schema name the storage accepts: lowercase letters, digits, ``_``; at most 50."""
    if not isinstance(schema, str) or not _SCHEMA_RE.fullmatch(schema):
        raise InvalidInput(
            "schema must be 1-50 characters of a-z, 0-9 and '_', not starting with a digit"
        )
    return schema


def channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel on which writes announce pending outbox entries."""
    return f"{schema}_outbox"


# -- migrations ----------------------------------------------------------------


Migration = common.Migration


def _sql_dir() -> Any:
    return common.sql_folder("postgres")


def migrations() -> list[Migration]:
    """The numbered migrations shipped with the package, in order."""
    return list(common.migrations("postgres"))


def schema_sql() -> str:
    """``schema.sql``: the schema as it stands after every migration."""
    text: str = _sql_dir().joinpath("schema.sql").read_text(encoding="utf-8")
    return text


# -- error translation -------------------------------------------------------------


class DriverErrors:
    """The one place where driver errors become library errors (``__cause__`` kept).

    A context manager for both ``with`` and ``async with``, so that the async
    storage and its generated sync twin hold it in the same ``with`` line as
    the connection. ``conflict`` builds the error for a transaction PostgreSQL
    aborted to resolve a deadlock or a serialisation failure: for a write the
    caller can decide again (the services do, on :class:`VersionConflict`),
    so it is a conflict there; elsewhere it is :class:`StorageUnavailable`.
    """

    def __init__(self, conflict: Callable[[], VersionConflict] | None = None) -> None:
        self._conflict = conflict

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, Exception) and not isinstance(exc, DeepworkError):
            error = self.translate(exc)
            if error is not None:
                raise error from exc

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def translate(self, exc: Exception) -> DeepworkError | None:
        """The library error for ``exc``, or ``None`` to let it through."""
        kind = POSTGRES.classify(exc)
        if kind is Kind.DEADLOCK:
            if self._conflict is not None:
                return self._conflict()
            return StorageUnavailable(
                "PostgreSQL aborted the transaction to resolve a conflict; try again",
                retry_after=1,
            )
        if kind is Kind.TIMEOUT:
            return StorageUnavailable("PostgreSQL did not answer in time", retry_after=1)
        if kind is Kind.SCHEMA:
            return StorageCorrupt(
                f"The PostgreSQL schema is missing or out of date ({_first_line(exc)}); "
                "run: deepwork-retry migrate"
            )
        if kind is Kind.CONFLICT:
            return AlreadyExists("A row with this key exists already")
        if kind is Kind.INVALID:
            return InvalidInput(f"PostgreSQL cannot store this value: {_first_line(exc)}")
        if isinstance(exc, UnicodeEncodeError):
            return InvalidInput("text must be valid Unicode (no lone surrogates)")
        if kind is Kind.UNAVAILABLE:
            return StorageUnavailable(
                f"PostgreSQL is unavailable: {_first_line(exc)}", retry_after=1
            )
        return None


class PostgresDialect(Dialect):
    """PostgreSQL's error table, in the shape every SQL storage shares (its statements
    are its own: one-round-trip CTEs, below)."""

    name = "postgres"
    title = "PostgreSQL"
    errors: ClassVar[dict[int | str, Kind]] = {
        "40001": Kind.DEADLOCK,  # serialization_failure
        "40P01": Kind.DEADLOCK,  # deadlock_detected
        "57014": Kind.TIMEOUT,  # query_canceled
        "42P01": Kind.SCHEMA,  # undefined_table
        "3F000": Kind.SCHEMA,  # invalid_schema_name
        "23505": Kind.CONFLICT,  # unique_violation
        "23": Kind.INVALID,  # integrity_constraint_violation (the class)
        "22": Kind.INVALID,  # data_exception (the class)
    }

    def error_code(self, exc: BaseException) -> int | str | None:
        return getattr(exc, "sqlstate", None) if isinstance(exc, psycopg.Error) else None

    def classify(self, exc: BaseException) -> Kind | None:
        code = self.error_code(exc)
        if isinstance(code, str):
            kind = self.errors.get(code) or self.errors.get(code[:2])
            if kind is not None:
                return kind
        if isinstance(exc, (psycopg.IntegrityError, psycopg.DataError)):
            return Kind.INVALID  # raised by the driver itself (a NUL in text), no SQLSTATE
        if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
            return Kind.UNAVAILABLE
        return None


POSTGRES = PostgresDialect()


def open_async_now(opener: Callable[[], Awaitable[None]]) -> None:
    """Nothing to do at construction: the async storage's pool opens inside the
    running loop (``await storage.open()`` or ``async with``)."""


def open_sync_now(opener: Callable[[], None]) -> None:
    """The sync storage opens its pool at construction, ready without ``open()``."""
    opener()


def server_spoke(conn: psycopg.BaseConnection[Any]) -> bool:
    """Whether the server sent something to an idle connection, or it is closed.

    An idle autocommit connection has nothing to read unless its server ended
    it: a terminated backend (``pg_terminate_backend``, a restart, an idle
    timeout) sends its FATAL message and closes the socket. Asking costs one
    ``poll`` and no round trip.
    """
    if conn.closed:
        return True
    try:
        fd = conn.fileno()
    except psycopg.Error:
        return True
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    readable, _, _ = select.select([fd], [], [], 0)  # pragma: no cover - Windows
    return bool(readable)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- values in and out -------------------------------------------------------------


def findable(value: object) -> bool:
    """Whether ``value`` could be a stored id (anything else is simply not found)."""
    if not isinstance(value, str) or "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def diagnostic(value: str | None) -> str | None:
    """Error text as PostgreSQL can hold it: NUL and lone surrogates become U+FFFD.

    Error messages come from executors and dispatchers the library does not
    control; losing one unprintable character beats losing the report.
    """
    if value is None:
        return None
    return _UNSTORABLE.sub("\ufffd", value)


def after_bound(after: str) -> tuple[str, str]:
    """``(operator, value)`` selecting ids ``> after`` where ``after`` is not storable
    (see :func:`common.after_bound`)."""
    return common.after_bound(after, _UNSTORABLE)


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(timezone.utc)


def _req_utc(value: datetime) -> datetime:
    return value.astimezone(timezone.utc)


def metadata_json(metadata: Mapping[str, Any]) -> str:
    try:
        return json.dumps(dict(metadata), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"task metadata must be JSON-serialisable: {exc}") from exc


def _value(enum_value: Any) -> Any:
    return None if enum_value is None else enum_value.value


TASK_COLS = common.TASK_COLUMNS
PROJECT_COLS = common.PROJECT_COLUMNS
PROGRESS_COLS = ("project_id", *common.STATUSES, "total")
COUNTERS = PROGRESS_COLS[1:]

STRIPES = 4
"""How many progress rows ("stripes") each project has; the schema's checks
allow stripes ``0`` to ``STRIPES - 1`` (migration 0003). A task's moves change
its own stripe's counters only, so concurrent moves of different tasks of one
project wait for each other only when their tasks share a stripe; a project's
progress is the sum of its stripes. Every move also reads the other stripes
to return the project's progress, so more stripes cost every move a little:
four already take the wait for the counters out of the way of eight clients
moving tasks of one project."""


def stripe_of(task_id: str) -> int:
    """The progress stripe of a new task: a stable hash of its id.

    Stored with the task (``tasks.stripe``), so the choice only has to spread
    a project's tasks evenly, never to be recomputed.
    """
    return zlib.crc32(task_id.encode("utf-8", "surrogatepass")) % STRIPES


ATTEMPT_COLS = common.ATTEMPT_COLUMNS
OUTBOX_COLS = common.ENTRY_COLUMNS
IDEM_COLS = common.IDEM_COLUMNS

Row = Sequence[Any]


def task_params(task: Task) -> dict[str, Any]:
    return {
        "t_project_id": task.project_id,
        "t_id": task.id,
        "t_title": task.title,
        "t_status": task.status.value,
        "t_retry_count": task.retry_count,
        "t_max_retries": task.max_retries,
        "t_retries_left": task.retries_left,
        "t_error_message": diagnostic(task.error_message),
        "t_error_type": diagnostic(task.error_type),
        "t_blocked_reason": _value(task.blocked_reason),
        "t_blocked_by": list(task.blocked_by),
        "t_attempt": task.attempt,
        "t_lease_expires_at": task.lease_expires_at,
        "t_created_at": task.created_at,
        "t_updated_at": task.updated_at,
        "t_started_at": task.started_at,
        "t_completed_at": task.completed_at,
        "t_version": task.version,
        "t_metadata": metadata_json(task.metadata),
    }


def new_task_params(task: Task) -> dict[str, Any]:
    """:func:`task_params` plus the progress stripe of a task being added."""
    params = task_params(task)
    params["t_stripe"] = stripe_of(task.id)
    return params


def progress_deltas(tasks: Sequence[Task]) -> tuple[list[Any], ...]:
    """Per project and stripe, how many new tasks of each status (``add_progress``'s arrays).

    In key order, the order in which ``add_progress`` locks the stripes.
    """
    counts: dict[tuple[str, int], dict[str, int]] = {}
    for task in tasks:
        row = counts.setdefault((task.project_id, stripe_of(task.id)), dict.fromkeys(COUNTERS, 0))
        row[task.status.value] += 1
        row["total"] += 1
    keys = sorted(counts)
    columns = [[counts[key][col] for key in keys] for col in COUNTERS]
    return ([key[0] for key in keys], [key[1] for key in keys], *columns)


def project_params(project: Project) -> dict[str, Any]:
    return {
        "p_id": project.id,
        "p_status": project.status.value,
        "p_name": project.name,
        "p_created_at": project.created_at,
        "p_updated_at": project.updated_at,
        "p_version": project.version,
    }


def attempt_params(attempt: Attempt) -> dict[str, Any]:
    return {
        "n_number": attempt.number,
        "n_trigger": attempt.trigger.value,
        "n_dispatched_at": attempt.dispatched_at,
        "n_available_at": attempt.available_at,
        "n_actor": attempt.actor,
        "n_reason": attempt.reason,
        "n_budget": _value(attempt.budget),
        "n_started_at": attempt.started_at,
        "n_finished_at": attempt.finished_at,
        "n_outcome": _value(attempt.outcome),
        "n_error_type": diagnostic(attempt.error_type),
        "n_error_message": diagnostic(attempt.error_message),
    }


def entry_params(entry: DispatchEntry) -> dict[str, Any]:
    return {
        "d_project_id": entry.project_id,
        "d_task_id": entry.task_id,
        "d_attempt": entry.attempt,
        "d_state": entry.state.value,
        "d_available_at": entry.available_at,
        "d_created_at": entry.created_at,
        "d_claimed_until": entry.claimed_until,
        "d_tries": entry.tries,
        "d_last_error": diagnostic(entry.last_error),
        "d_delivered_at": entry.delivered_at,
        "d_trace": entry.trace,
    }


def idem_params(record: IdempotencyRecord) -> dict[str, Any]:
    return {
        "i_key": record.key,
        "i_project_id": record.project_id,
        "i_task_id": record.task_id,
        "i_created_at": record.created_at,
        "i_status_code": record.status_code,
        "i_body": record.body,
        "i_expires_at": record.expires_at,
    }


def _optional(kind: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else kind(value)


_HELPERS: dict[str, object] = {
    "_utc": _utc, "_req_utc": _req_utc, "_UTC": timezone.utc,
    "_task_status": TaskStatus, "_reason": _optional(BlockedReason), "_tuple": tuple,
    "_dict": dict, "_project_status": ProjectStatus, "_trigger": Trigger,
    "_budget": _optional(RetryBudget), "_outcome": _optional(Outcome), "_state": DispatchState,
}  # fmt: skip
_TASK_CODEC = {
    "status": "_task_status({0})", "blocked_reason": "_reason({0})",
    "blocked_by": "_tuple({0})", "metadata": "_dict({0})",
    "lease_expires_at": "_utc({0})", "created_at": "_req_utc({0})",
    "updated_at": "_req_utc({0})", "started_at": "_utc({0})", "completed_at": "_utc({0})",
}  # fmt: skip
"""How a selected task column becomes the field's value (see :func:`common.compile_decoder`)."""


def _decoder(cls: type, columns: Sequence[str], codec: Mapping[str, str]) -> Callable[..., Any]:
    """``decode(row, at=0)``: a ``cls`` from the row's columns from ``at`` on, by name."""
    return common.compile_decoder(
        cls, read=common.at(columns), codec=codec, helpers=_HELPERS, signature="row, at=0",
        offset="at",
    )  # fmt: skip


# Every row decoded by column name (the indexes are the column lists').
decode_task: Callable[..., Task] = _decoder(Task, TASK_COLS, _TASK_CODEC)
decode_project: Callable[..., Project] = _decoder(
    Project,
    PROJECT_COLS,
    {"status": "_project_status({0})", "created_at": "_req_utc({0})",
     "updated_at": "_req_utc({0})"},
)  # fmt: skip
decode_attempt: Callable[..., Attempt] = _decoder(
    Attempt,
    ATTEMPT_COLS,
    {"trigger": "_trigger({0})", "dispatched_at": "_req_utc({0})",
     "available_at": "_req_utc({0})", "budget": "_budget({0})", "started_at": "_utc({0})",
     "finished_at": "_utc({0})", "outcome": "_outcome({0})"},
)  # fmt: skip
decode_entry: Callable[..., DispatchEntry] = _decoder(
    DispatchEntry,
    OUTBOX_COLS,
    {"state": "_state({0})", "available_at": "_req_utc({0})", "created_at": "_req_utc({0})",
     "claimed_until": "_utc({0})", "delivered_at": "_utc({0})"},
)  # fmt: skip
decode_idem: Callable[..., IdempotencyRecord] = _decoder(
    IdempotencyRecord,
    IDEM_COLS,
    {"created_at": "_req_utc({0})", "expires_at": "_req_utc({0})"},
)  # fmt: skip
decode_progress: Callable[..., Progress] = _decoder(Progress, PROGRESS_COLS, {})


def _released(project_id: str, row: Row, at: int) -> list[DispatchEntry]:
    """Entries from the parallel arrays ``task_id, attempt, available_at, created_at,
    claimed_until, tries, last_error, delivered_at, trace`` (``None`` when nothing was
    released)."""
    if row[at] is None:
        return []
    columns = row[at : at + 9]
    return [
        DispatchEntry(
            project_id=project_id,
            task_id=task_id,
            attempt=attempt,
            state=DispatchState.PENDING,
            available_at=_req_utc(available_at),
            created_at=_req_utc(created_at),
            claimed_until=_utc(claimed_until),
            tries=tries,
            last_error=last_error,
            delivered_at=_utc(delivered_at),
            trace=trace,
        )
        for task_id, attempt, available_at, created_at, claimed_until, tries, last_error,
        delivered_at, trace in zip(*columns, strict=True)
    ]  # fmt: skip


# -- statements --------------------------------------------------------------------


def _cols(names: Sequence[str], prefix: str = "") -> str:
    return ", ".join(f"{prefix}{name}" for name in names)


def _sums(names: Sequence[str] = COUNTERS) -> str:
    """Each counter summed over the stripes read (0 when none), as ``bigint``."""
    return ", ".join(f"COALESCE(sum({name}), 0)::bigint AS {name}" for name in names)


def _plus(one: str, others: str, names: Sequence[str] = COUNTERS) -> str:
    """Each counter of stripe ``one`` plus the sum ``others`` of the other stripes."""
    return ", ".join(f"{one}.{name} + {others}.{name} AS {name}" for name in names)


_GUARD_CTES = """
gl AS (
    SELECT id, version FROM {s}.tasks
    WHERE project_id = %(pid)s AND id = ANY(%(g_ids)s::text[])
    ORDER BY id
    FOR SHARE
),
gbad AS (
    SELECT g.id, g.version AS expected, gl.version AS found
    FROM unnest(%(g_ids)s::text[], %(g_versions)s::bigint[]) WITH ORDINALITY AS g(id, version, ord)
    LEFT JOIN gl ON gl.id = g.id
    WHERE gl.version IS DISTINCT FROM g.version
    ORDER BY g.ord
    LIMIT 1
),"""

_RELEASE_CTE = """
rel AS (
    UPDATE {s}.outbox AS o
    SET state = {pending}, claimed_until = %(claimed_until)s::timestamptz,
        pending_seq = nextval({order})
    FROM unnest(%(r_task_ids)s::text[], %(r_attempts)s::bigint[]) WITH ORDINALITY
        AS r(task_id, attempt, ord)
    WHERE o.project_id = %(pid)s AND o.task_id = r.task_id AND o.attempt = r.attempt
      AND o.state = {deferred} AND EXISTS (SELECT 1 FROM upd)
    RETURNING r.ord, o.task_id, o.attempt, o.available_at, o.created_at, o.claimed_until,
              o.tries, o.last_error, o.delivered_at, o.trace
),"""

_RELEASED_ARRAYS = """
    (SELECT array_agg(task_id ORDER BY ord) FROM rel),
    (SELECT array_agg(attempt ORDER BY ord) FROM rel),
    (SELECT array_agg(available_at ORDER BY ord) FROM rel),
    (SELECT array_agg(created_at ORDER BY ord) FROM rel),
    (SELECT array_agg(claimed_until ORDER BY ord) FROM rel),
    (SELECT array_agg(tries ORDER BY ord) FROM rel),
    (SELECT array_agg(last_error ORDER BY ord) FROM rel),
    (SELECT array_agg(delivered_at ORDER BY ord) FROM rel),
    (SELECT array_agg(trace ORDER BY ord) FROM rel)"""

_NO_RELEASES = ", ".join(["NULL"] * 9)

_TAKE_EXPIRED = (
    ", ".join(f"{c} = EXCLUDED.{c}" for c in IDEM_COLS[1:])
    + " WHERE idempotency.expires_at <= EXCLUDED.created_at"
)
"""An idempotency insert's conflict clause: a key whose record has expired is free."""


@attrs.frozen
class _Shape:
    """What one apply statement has to do; one statement text per shape."""

    guards: bool
    project: bool
    idempotency: bool
    new_attempt: bool
    dispatch: bool
    attempt_update: bool
    releases: bool
    status: tuple[str, str] | None
    notify_own: bool
    notify_released: bool
    events: bool


_APPLY_ROW = common.at(
    (
        "found", "guard_bad", "guard_id", "guard_expected", "guard_found", "project_version",
        *(f"idem.{c}" for c in IDEM_COLS), "duplicate", "next", *(f"task.{c}" for c in TASK_COLS),
        *(f"progress.{c}" for c in PROGRESS_COLS), "released",
    )
)  # fmt: skip
"""The apply statement's result row, by column name (see :func:`_apply_text`)."""
_PROJECT_ROW = common.at(
    (
        "found", "guard_bad", "guard_id", "guard_expected", "guard_found",
        *(f"project.{c}" for c in PROJECT_COLS), "released",
    )
)  # fmt: skip
"""The apply_project statement's result row, by column name."""
_A_FOUND, _A_GBAD = _APPLY_ROW["found"], _APPLY_ROW["guard_bad"]
_A_GID, _A_GEXP = _APPLY_ROW["guard_id"], _APPLY_ROW["guard_expected"]
_A_GFOUND, _A_PVER = _APPLY_ROW["guard_found"], _APPLY_ROW["project_version"]
_A_IDEM, _A_DUP = _APPLY_ROW["idem.key"], _APPLY_ROW["duplicate"]
_A_NEXT, _A_TASK = _APPLY_ROW["next"], _APPLY_ROW["task.project_id"]
_A_PROGRESS, _A_RELEASED = _APPLY_ROW["progress.project_id"], _APPLY_ROW["released"]


@attrs.frozen
class ApplyOutcome:
    """The result of the apply statement: what happened, or why nothing did."""

    applied: Applied | None
    error: DeepworkError | None
    reread_idempotency: bool = False
    """The key was taken by a transaction that committed during the statement."""


_STATES = {
    name: sql.SQL(common.literal(value))
    for name, value in {
        "pending": DispatchState.PENDING,
        "deferred": DispatchState.DEFERRED,
        "delivered": DispatchState.DELIVERED,
        "awaiting_start": retention.AWAITING_START,
        "running": TaskStatus.IN_PROGRESS,
        "blocked": TaskStatus.BLOCKED,
    }.items()
}
"""The core's states the statements name, as ``{pending}`` and so on: an outbox entry
turns pending when released or redelivered, delivered when handed over; only a
task still awaiting its start (:data:`~deepwork_retry._core.retention.AWAITING_START`)
has its delivered entry handed out again."""


_RELAX = "relax AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true))"
"""A statement naming ``relax`` commits without waiting for the WAL flush.

For the outbox's claims and delivery marks only, on the storage's own
connections (never in a host's transaction): losing one to a server crash
is the same as the relay crashing before it, so the entry is delivered again
and the attempt's fencing token makes the second delivery run nothing. The
commit is visible to other sessions at once either way.
"""


class Queries:
    """Every statement of the storage, rendered once for one schema."""

    def __init__(self, schema: str) -> None:
        self.schema = check_schema(schema)
        self.channel = channel(schema)
        self._apply_cache: dict[_Shape, tuple[bytes, frozenset[str]]] = {}
        self._project_cache: dict[tuple[bool, bool, bool], bytes] = {}
        self._list_cache: dict[tuple[bool, str | None], bytes] = {}
        self._projects_cache: dict[tuple[bool, str | None], bytes] = {}
        self._blocked_cache: dict[tuple[bool, bool, str | None, str | None], bytes] = {}
        q = self.render
        self.lock = q("SELECT pg_advisory_xact_lock(%s, hashtext(%s))")
        self.bootstrap = q(
            "CREATE SCHEMA IF NOT EXISTS {s};"
            " CREATE TABLE IF NOT EXISTS {s}.schema_migrations ("
            " number integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        self.applied_migrations = q("SELECT number FROM {s}.schema_migrations ORDER BY number")
        self.schema_present = q(
            "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = %s),"
            " to_regclass(%s) IS NOT NULL"
        )
        self.search_path = q("SET LOCAL search_path TO {s}")
        self.record_migration = q(
            "INSERT INTO {s}.schema_migrations (number, name) VALUES (%s, %s)"
        )
        self.configure = q(
            "SELECT set_config('TimeZone', 'UTC', false),"
            " set_config('statement_timeout', %s, false)"
        )
        project_values = ", ".join(f"%(p_{c})s" for c in PROJECT_COLS)
        self.create_project = q(
            f"WITH p AS (INSERT INTO {{s}}.projects ({_cols(PROJECT_COLS)})"
            f" VALUES ({project_values}) ON CONFLICT (id) DO NOTHING RETURNING id)"
            " INSERT INTO {s}.progress (project_id, stripe)"
            f" SELECT id, stripe FROM p, generate_series(0, {STRIPES - 1}) AS g(stripe)"
            " RETURNING project_id"
        )
        self.get_project = q(f"SELECT {_cols(PROJECT_COLS)} FROM {{s}}.projects WHERE id = %s")
        self.load = q(
            f"SELECT {_cols(PROJECT_COLS, 'p.')}, {_cols(TASK_COLS, 't.')}"
            " FROM {s}.projects AS p LEFT JOIN {s}.tasks AS t"
            " ON t.project_id = p.id AND t.id = %(tid)s WHERE p.id = %(pid)s"
        )
        self.get_tasks = q(
            f"SELECT {_cols(TASK_COLS)} FROM {{s}}.tasks"
            " WHERE project_id = %s AND id = ANY(%s::text[])"
        )
        self.dependants = q(
            f"SELECT {_cols(TASK_COLS)} FROM {{s}}.tasks"
            " WHERE project_id = %s AND blocked_by @> ARRAY[%s::text] ORDER BY id"
        )
        self.progress = q(
            f"SELECT project_id, {_sums()} FROM {{s}}.progress"
            " WHERE project_id = %s GROUP BY project_id"
        )
        self.attempts = q(
            f"SELECT t.id, {_cols(ATTEMPT_COLS, 'a.')} FROM {{s}}.tasks AS t"
            " LEFT JOIN {s}.attempts AS a ON a.project_id = t.project_id AND a.task_id = t.id"
            " WHERE t.project_id = %s AND t.id = %s ORDER BY a.number"
        )
        self.dispatches = q(
            f"SELECT t.id, {_cols(OUTBOX_COLS, 'o.')} FROM {{s}}.tasks AS t"
            " LEFT JOIN {s}.outbox AS o ON o.project_id = t.project_id AND o.task_id = t.id"
            " AND o.attempt BETWEEN 1 AND t.attempt"
            " WHERE t.project_id = %s AND t.id = %s ORDER BY o.attempt"
        )
        self.deferred = q(
            f"SELECT {_cols(OUTBOX_COLS)} FROM {{s}}.outbox"
            " WHERE project_id = %s AND state = {deferred} ORDER BY seq"
        )
        self.existing_projects = q(
            "SELECT id FROM {s}.projects WHERE id = ANY(%s::text[]) FOR KEY SHARE"
        )
        self.existing_tasks = q(
            "SELECT t.project_id, t.id FROM {s}.tasks AS t"
            " JOIN unnest(%s::text[], %s::text[]) AS k(project_id, id)"
            " ON t.project_id = k.project_id AND t.id = k.id"
        )
        task_values = ", ".join(f"%(t_{c})s" for c in TASK_COLS)
        self.insert_task = q(
            f"INSERT INTO {{s}}.tasks ({_cols(TASK_COLS)}, stripe)"
            f" VALUES ({task_values}, %(t_stripe)s)"
        ).replace(b"%(t_metadata)s", b"%(t_metadata)s::jsonb")
        # The stripes are locked in key order first, so that two batches
        # adding tasks to one project never wait for each other in a cycle.
        counters = ", ".join(f"{c} = p.{c} + d.{c}" for c in COUNTERS)
        self.add_progress = q(
            "WITH d AS (SELECT * FROM"
            f" unnest(%s::text[], %s::smallint[], {', '.join(['%s::bigint[]'] * len(COUNTERS))})"
            f" AS d(project_id, stripe, {_cols(COUNTERS)})),"
            " l AS (SELECT p.project_id FROM {s}.progress AS p"
            " JOIN d ON p.project_id = d.project_id AND p.stripe = d.stripe"
            " ORDER BY p.project_id, p.stripe FOR NO KEY UPDATE OF p)"
            f" UPDATE {{s}}.progress AS p SET {counters} FROM d"
            " WHERE p.project_id = d.project_id AND p.stripe = d.stripe"
            " AND (SELECT count(*) FROM l) >= 0"
        )
        claim = (
            "c AS (SELECT project_id, task_id, attempt FROM {s}.outbox"
            " WHERE state = {pending} AND available_at <= %(now)s"
            " AND (claimed_until IS NULL OR claimed_until <= %(now)s)"
            " ORDER BY pending_seq LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
            " UPDATE {s}.outbox AS o SET claimed_until = %(until)s FROM c{also}"
            " WHERE o.project_id = c.project_id AND o.task_id = c.task_id"
            f" AND o.attempt = c.attempt RETURNING o.pending_seq, {_cols(OUTBOX_COLS, 'o.')}"
        )
        self.claim_due = q("WITH " + claim.replace("{also}", ""))
        self.claim_due_relaxed = q(f"WITH {_RELAX}, " + claim.replace("{also}", ", relax"))
        delivered = (
            "UPDATE {s}.outbox AS o SET state = {delivered}, delivered_at = %s,"
            " tries = o.tries + 1, claimed_until = NULL, pending_seq = NULL"
            " FROM unnest(%s::text[], %s::text[], %s::bigint[]) AS k(project_id, task_id, attempt)"
            "{also} WHERE o.project_id = k.project_id AND o.task_id = k.task_id"
            " AND o.attempt = k.attempt AND o.state = {pending}"
        )
        self.mark_delivered = q(delivered.replace("{also}", ""))
        self.mark_delivered_relaxed = q(f"WITH {_RELAX} " + delivered.replace("{also}", ", relax"))
        self.mark_failed = q(
            "UPDATE {s}.outbox SET tries = tries + 1, last_error = %s, available_at = %s,"
            " claimed_until = NULL"
            " WHERE project_id = %s AND task_id = %s AND attempt = %s AND state = {pending}"
        )
        # Driven by the assigned tasks; the entry row is locked (skipped when
        # another reaper holds it) and so is the task's, so a start committing
        # meanwhile is seen and its entry left alone. Every turned-back entry is
        # due at once: relays are woken.
        self.redeliver_stale = q(
            "WITH s AS (SELECT o.project_id, o.task_id, o.attempt FROM {s}.tasks AS t"
            " JOIN {s}.outbox AS o ON o.project_id = t.project_id AND o.task_id = t.id"
            " AND o.attempt = t.attempt"
            " WHERE t.status = {awaiting_start} AND o.state = {delivered}"
            " AND o.delivered_at <= %(before)s"
            " ORDER BY o.delivered_at, o.project_id, o.task_id, o.attempt LIMIT %(limit)s"
            " FOR NO KEY UPDATE OF o SKIP LOCKED FOR SHARE OF t SKIP LOCKED)"
            " UPDATE {s}.outbox AS o SET state = {pending}, available_at = %(now)s,"
            " claimed_until = NULL, last_error = %(error)s, pending_seq = nextval({order})"
            " FROM s WHERE o.project_id = s.project_id AND o.task_id = s.task_id"
            f" AND o.attempt = s.attempt RETURNING {_cols(OUTBOX_COLS, 'o.')},"
            " pg_notify(%(channel)s, '') IS NULL"
        )
        self.expired_leases = q(
            f"SELECT {_cols(TASK_COLS)} FROM {{s}}.tasks"
            " WHERE status = {running} AND lease_expires_at <= %s"
            " ORDER BY lease_expires_at, project_id, id LIMIT %s"
        )
        self.get_idempotency = q(f"SELECT {_cols(IDEM_COLS)} FROM {{s}}.idempotency WHERE key = %s")
        idem_values = ", ".join(f"%(i_{c})s" for c in IDEM_COLS)
        idem_set = ", ".join(f"{c} = EXCLUDED.{c}" for c in IDEM_COLS[1:])
        # Completes the reservation this record answers, or takes an expired key.
        self.save_idempotency = q(
            f"WITH ins AS (INSERT INTO {{s}}.idempotency ({_cols(IDEM_COLS)})"
            f" VALUES ({idem_values}) ON CONFLICT (key) DO UPDATE SET {idem_set}"
            f" WHERE (idempotency.status_code IS NULL"
            " AND idempotency.created_at = EXCLUDED.created_at)"
            " OR idempotency.expires_at <= EXCLUDED.created_at"
            f" RETURNING {_cols(IDEM_COLS)})"
            f" SELECT true, {_cols(IDEM_COLS)} FROM ins UNION ALL"
            f" SELECT false, {_cols(IDEM_COLS)} FROM {{s}}.idempotency"
            " WHERE key = %(i_key)s AND NOT EXISTS (SELECT 1 FROM ins)"
        )
        self.listen = q("LISTEN {c}")
        self._prune = tuple(q(text) for text in (*_PRUNE, _PRUNE_EVENTS))
        self.event_lock = q(f"SELECT pg_advisory_xact_lock({EVENT_LOCK}, hashtext(%s))")
        ev = {name: q(text) for name, text in _EVENT_TEXTS.items()}
        self.events = ev["events"]
        self.claim_events = ev["claim_events"]
        self.settle_events = ev["settle_events"]
        self.claim_event_retries = ev["claim_event_retries"]
        self.forget_event_retry = ev["forget_event_retry"]
        self.fail_event_retry = ev["fail_event_retry"]
        self.parked_events = ev["parked_events"]
        self.replay_parked = ev["replay_parked"]
        self.add_events = ev["add_events"]
        self.mark_failed_event = ev["mark_failed"]
        # The one-step retry, rendered from the core's description of the move.
        move = effects.MANUAL_RETRY
        self._retry = {
            (keyed, claimed): raw_query(q(_retry_text(move, keyed=keyed, claimed=claimed)))
            for keyed in (False, True)
            for claimed in (False, True)
        }
        self.retried = RetryReader(move)
        self._retry_template = _retry_template(move)

    def retry_events(
        self,
        project_id: str,
        task_id: str,
        *,
        now: datetime,
        actor: str | None,
        reason: str | None,
        budget: RetryBudget,
    ) -> dict[str, Any]:
        """The one-step retry's events (see the comment on ``_SENTINEL``): the core's
        :func:`~deepwork_retry._core.events.manual_retry_events` of a template task,
        for a retry that dispatches and one deferred, merged."""
        fields, source = self._retry_template
        template = Task(project_id=project_id, id=task_id, **fields(now))
        ready, deferred = (
            events.manual_retry_events(
                template, now=now, actor=actor, reason=reason, budget=budget,
                deferred=case, before=source,
            )
            for case in (False, True)
        )  # fmt: skip
        merged = _merge(ready, deferred)
        params = event_params([event for event, _ in merged])
        params["e_data"] = f"[{','.join(params['e_data'])}]"  # see _retry_events_ctes
        params["e_when"] = [when for _, when in merged]
        return params

    def render(self, text: str) -> bytes:
        """``text`` for this schema, its whitespace collapsed.

        Short texts stay within psycopg's cache of converted queries (4,096
        bytes), so a statement is not parsed again on every call.
        """
        order = sql.Literal(f'"{self.schema}".outbox_order')
        composed = sql.SQL(_SPACE.sub(" ", text).strip()).format(
            s=sql.Identifier(self.schema),
            c=sql.Identifier(self.channel),
            chan=sql.Literal(self.channel),
            order=sql.SQL("{}::regclass").format(order),
            **_STATES,
        )
        return composed.as_bytes(None)

    def prune(self, rule: PruneRule) -> list[tuple[bytes, dict[str, Any] | None]]:
        """Each table's delete for ``rule`` and its parameters (``None``: nothing to do)."""
        cutoffs = (rule.now, rule.delivered_before, rule.finished_before, rule.delivered_before)
        return [
            (query, None if cutoff is None else {"before": cutoff, "n": rule.batch})
            for query, cutoff in zip(self._prune, cutoffs, strict=True)
        ]

    def retry_blocked(self, *, keyed: bool, claimed: bool) -> RawQuery:
        """The one-step manual retry for a call with (or without) a key and a claim."""
        return self._retry[keyed, claimed]

    # -- list_tasks ----------------------------------------------------------------
    def list_tasks(
        self,
        project_id: str,
        status: TaskStatus | None,
        after: str | None,
        limit: int,
    ) -> tuple[bytes, dict[str, Any]]:
        op = None
        params: dict[str, Any] = {"pid": project_id, "limit": limit}
        if after is not None:
            op, params["after"] = after_bound(after)
        if status is not None:
            params["status"] = status.value
        key = (status is not None, op)
        query = self._list_cache.get(key)
        if query is None:
            where = ["t.project_id = p.id"]
            if status is not None:
                where.append("t.status = %(status)s")
            if op is not None:
                where.append(f"t.id {op} %(after)s")
            query = self.render(
                f"SELECT {_cols(TASK_COLS, 'l.')} FROM {{s}}.projects AS p LEFT JOIN LATERAL"
                f" (SELECT {_cols(TASK_COLS, 't.')} FROM {{s}}.tasks AS t"
                f" WHERE {' AND '.join(where)} ORDER BY t.id LIMIT %(limit)s) AS l ON true"
                " WHERE p.id = %(pid)s"
            )
            self._list_cache[key] = query
        return query, params

    # -- reads across projects ---------------------------------------------------------
    def list_projects(
        self, projects: Sequence[str] | None, after: str | None, limit: int
    ) -> tuple[bytes, dict[str, Any]]:
        """A page of projects by id, each joined to the sum of its progress stripes
        (project columns, then :data:`PROGRESS_COLS`); ``projects`` (storable ids)
        keeps only those."""
        op = None
        params: dict[str, Any] = {"limit": limit}
        if after is not None:
            op, params["after"] = after_bound(after)
        if projects is not None:
            params["ids"] = list(projects)
        key = (projects is not None, op)
        query = self._projects_cache.get(key)
        if query is None:
            where = []
            if projects is not None:
                where.append("id = ANY(%(ids)s::text[])")
            if op is not None:
                where.append(f"id {op} %(after)s")
            query = self.render(
                f"SELECT {_cols(PROJECT_COLS, 'p.')}, p.id, {_cols(COUNTERS, 'g.')}"
                f" FROM (SELECT {_cols(PROJECT_COLS)} FROM {{s}}.projects"
                f"{' WHERE ' + ' AND '.join(where) if where else ''}"
                " ORDER BY id LIMIT %(limit)s) AS p CROSS JOIN LATERAL"
                f" (SELECT {_sums()} FROM {{s}}.progress WHERE project_id = p.id) AS g"
                " ORDER BY p.id"
            )
            self._projects_cache[key] = query
        return query, params

    def blocked_tasks(
        self,
        projects: Sequence[str] | None,
        error_type: str | None,
        after: tuple[str, str] | None,
        limit: int,
    ) -> tuple[bytes, dict[str, Any]]:
        """A page of blocked tasks by ``(project_id, id)`` from the partial index of
        blocked tasks (``tasks_blocked``); ``projects`` (storable ids) keeps only those,
        ``error_type`` (storable) only the tasks whose error type it is."""
        params: dict[str, Any] = {"limit": limit}
        after_project = after_task = None
        if after is not None:
            after_project, params["pid"] = after_bound(after[0])
            if after_project == ">" and params["pid"] == after[0]:  # a storable project id
                after_project = "="
                after_task, params["tid"] = after_bound(after[1])
        if projects is not None:
            params["ids"] = list(projects)
        if error_type is not None:
            params["error"] = error_type
        key = (projects is not None, error_type is not None, after_project, after_task)
        query = self._blocked_cache.get(key)
        if query is None:
            where = ["status = {blocked}"]  # the partial index's own condition
            if projects is not None:
                where.append("project_id = ANY(%(ids)s::text[])")
            if error_type is not None:
                where.append("error_type = %(error)s")
            if after_project == "=":
                where.append(f"(project_id, id) {after_task} (%(pid)s, %(tid)s)")
            elif after_project is not None:
                where.append(f"project_id {after_project} %(pid)s")
            query = self.render(
                f"SELECT {_cols(TASK_COLS)} FROM {{s}}.tasks WHERE {' AND '.join(where)}"
                " ORDER BY project_id, id LIMIT %(limit)s"
            )
            self._blocked_cache[key] = query
        return query, params

    # -- apply -----------------------------------------------------------------------
    def apply(self, plan: Plan) -> tuple[bytes, dict[str, Any]]:
        before, after = plan.before, plan.after
        found = events.events_of(plan)
        dispatch = plan.dispatch
        own_due = (
            dispatch is not None
            and dispatch.state is DispatchState.PENDING
            and dispatch.claimed_until is None
            and dispatch.available_at <= dispatch.created_at
        )
        shape = _Shape(
            guards=bool(plan.guards),
            project=plan.project_version is not None,
            idempotency=plan.idempotency is not None,
            new_attempt=plan.new_attempt is not None,
            dispatch=dispatch is not None,
            attempt_update=plan.attempt_update is not None,
            releases=bool(plan.releases),
            status=None
            if before.status is after.status
            else (before.status.value, after.status.value),
            notify_own=own_due,
            notify_released=bool(plan.releases) and plan.claimed_until is None,
            events=bool(found),
        )
        cached = self._apply_cache.get(shape)
        if cached is None:
            text = self.render(_apply_text(shape))
            names = frozenset(name.decode() for name in _PLACEHOLDER.findall(text))
            cached = self._apply_cache[shape] = (text, names)
        query, names = cached
        params: dict[str, Any] = {
            "pid": before.project_id,
            "tid": before.id,
            "expected": before.version,
            "claimed_until": plan.claimed_until,
            "channel": self.channel,
        }
        params.update(task_params(after))
        params.update(_guard_params(plan.guards))
        params["pver"] = plan.project_version
        if plan.idempotency is not None:
            params.update(idem_params(plan.idempotency))
        if plan.new_attempt is not None:
            params.update(attempt_params(plan.new_attempt))
        if dispatch is not None:
            params.update(entry_params(dispatch))
        update = plan.attempt_update
        if update is not None:
            params.update(
                u_number=update.number,
                u_started_at=update.started_at or None,
                u_finished_at=update.finished_at or None,
                u_outcome=_value(update.outcome or None),
                u_error_type=diagnostic(update.error_type or None),
                u_error_message=diagnostic(update.error_message or None),
            )
        params.update(_release_params(plan.releases))
        if found:
            params.update(event_params(found))
        # Only the values the statement uses: psycopg caches the conversion of
        # statements with at most 50 parameters.
        return query, {name: params[name] for name in names}

    def apply_project(self, plan: ProjectPlan) -> tuple[bytes, dict[str, Any]]:
        key = (
            bool(plan.guards),
            bool(plan.releases),
            bool(plan.releases) and plan.claimed_until is None,
        )
        query = self._project_cache.get(key)
        if query is None:
            query = self._project_cache[key] = self.render(_apply_project_text(*key))
        params: dict[str, Any] = {
            "pid": plan.before.id,
            "expected": plan.before.version,
            "claimed_until": plan.claimed_until,
            "channel": self.channel,
        }
        params.update(project_params(plan.after))
        params.update(_guard_params(plan.guards))
        params.update(_release_params(plan.releases))
        return query, params


def _guard_params(guards: Sequence[Guard]) -> dict[str, Any]:
    return {"g_ids": [g.task_id for g in guards], "g_versions": [g.version for g in guards]}


def _release_params(releases: Sequence[Release]) -> dict[str, Any]:
    return {
        "r_task_ids": [r.task_id for r in releases],
        "r_attempts": [r.attempt for r in releases],
    }


def _apply_text(shape: _Shape) -> str:
    """The one statement that applies a plan: every check, every write, and the result.

    Data-modifying CTEs all run, so each write is gated: the task update runs
    only when every check passed (and the idempotency key was inserted), and
    every other write only when the task update returned its row.
    """
    ctes = [
        """cur AS (
    SELECT version, stripe FROM {s}.tasks WHERE project_id = %(pid)s AND id = %(tid)s
    FOR NO KEY UPDATE
),"""
    ]
    ok = ["(SELECT version FROM cur) = %(expected)s"]
    if shape.guards:
        ctes.append(_GUARD_CTES)
        ok.append("NOT EXISTS (SELECT 1 FROM gbad)")
        guard_cols = (
            "EXISTS (SELECT 1 FROM gbad), (SELECT id FROM gbad),"
            " (SELECT expected FROM gbad), (SELECT found FROM gbad)"
        )
    else:
        guard_cols = "false, NULL, NULL, NULL"
    if shape.project:
        ctes.append(
            """
pv AS (SELECT version FROM {s}.projects WHERE id = %(pid)s FOR KEY SHARE),"""
        )
        ok.append("(SELECT version FROM pv) = %(pver)s")
        project_col = "(SELECT version FROM pv)"
    else:
        project_col = "NULL"
    if shape.idempotency:
        ctes.append(
            f"""
idem AS (SELECT {_cols(IDEM_COLS)} FROM {{s}}.idempotency WHERE key = %(i_key)s
    AND expires_at > %(i_created_at)s::timestamptz),"""
        )
        ok.append("NOT EXISTS (SELECT 1 FROM idem)")
        idem_cols = ", ".join(f"idem.{c}" for c in IDEM_COLS)
    else:
        idem_cols = ", ".join(["NULL"] * len(IDEM_COLS))
    if shape.dispatch:
        ctes.append(
            """
dup AS (SELECT EXISTS (SELECT 1 FROM {s}.outbox WHERE project_id = %(d_project_id)s
        AND task_id = %(d_task_id)s AND attempt = %(d_attempt)s) AS v),"""
        )
        ok.append("NOT (SELECT v FROM dup)")
        dup_col = "(SELECT v FROM dup)"
    else:
        dup_col = "false"
    if shape.new_attempt:
        ctes.append(
            """
nxt AS (SELECT NOT EXISTS (SELECT 1 FROM {s}.attempts WHERE project_id = %(pid)s
            AND task_id = %(tid)s AND number = %(n_number)s::bigint)
        AND (%(n_number)s::bigint = 1 OR EXISTS (SELECT 1 FROM {s}.attempts
            WHERE project_id = %(pid)s AND task_id = %(tid)s
            AND number = %(n_number)s::bigint - 1)) AS v),"""
        )
        ok.append("(SELECT v FROM nxt)")
        next_col = "(SELECT v FROM nxt)"
    else:
        next_col = "true"
    ctes.append(
        f"""
ok AS (SELECT COALESCE({" AND ".join(ok)}, false) AS v),"""
    )
    gate = "(SELECT v FROM ok)"
    if shape.idempotency:
        ctes.append(
            f"""
ins_idem AS (
    INSERT INTO {{s}}.idempotency ({_cols(IDEM_COLS)})
    SELECT %(i_key)s::text, %(i_project_id)s::text, %(i_task_id)s::text,
           %(i_created_at)s::timestamptz, %(i_status_code)s::bigint, %(i_body)s::text,
           %(i_expires_at)s::timestamptz
    WHERE {gate}
    ON CONFLICT (key) DO UPDATE SET {_TAKE_EXPIRED}
    RETURNING 1
),"""
        )
        gate += " AND EXISTS (SELECT 1 FROM ins_idem)"
    sets = ",\n        ".join(
        f"{c} = %(t_{c})s" + _CASTS.get(c, "") for c in TASK_COLS if c not in ("project_id", "id")
    )
    ctes.append(
        f"""
upd AS (
    UPDATE {{s}}.tasks SET
        {sets}
    WHERE project_id = %(pid)s AND id = %(tid)s AND version = %(expected)s AND {gate}
    RETURNING {_cols(TASK_COLS)}
),"""
    )
    done = "EXISTS (SELECT 1 FROM upd)"
    if shape.attempt_update:
        ctes.append(
            f"""
att_upd AS (
    UPDATE {{s}}.attempts SET
        started_at = COALESCE(%(u_started_at)s::timestamptz, started_at),
        finished_at = COALESCE(%(u_finished_at)s::timestamptz, finished_at),
        outcome = COALESCE(%(u_outcome)s::text, outcome),
        error_type = COALESCE(%(u_error_type)s::text, error_type),
        error_message = COALESCE(%(u_error_message)s::text, error_message)
    WHERE project_id = %(pid)s AND task_id = %(tid)s AND number = %(u_number)s::bigint
      AND {done}
),"""
        )
    if shape.new_attempt:
        ctes.append(
            f"""
att_ins AS (
    INSERT INTO {{s}}.attempts ({_cols(ATTEMPT_COLS)})
    SELECT %(pid)s::text, %(tid)s::text, %(n_number)s::bigint, %(n_trigger)s::text,
           %(n_dispatched_at)s::timestamptz, %(n_available_at)s::timestamptz,
           %(n_actor)s::text, %(n_reason)s::text, %(n_budget)s::text,
           %(n_started_at)s::timestamptz, %(n_finished_at)s::timestamptz,
           %(n_outcome)s::text, %(n_error_type)s::text, %(n_error_message)s::text
    WHERE {done}
),"""
        )
    if shape.dispatch:
        ctes.append(
            f"""
disp AS (
    INSERT INTO {{s}}.outbox ({_cols(OUTBOX_COLS)}, seq, pending_seq)
    SELECT %(d_project_id)s::text, %(d_task_id)s::text, %(d_attempt)s::bigint,
           %(d_state)s::text, %(d_available_at)s::timestamptz, %(d_created_at)s::timestamptz,
           %(d_claimed_until)s::timestamptz, %(d_tries)s::bigint, %(d_last_error)s::text,
           %(d_delivered_at)s::timestamptz, %(d_trace)s::text, n.v,
           CASE WHEN %(d_state)s::text = {{pending}} THEN n.v END
    FROM (SELECT nextval({{order}}) AS v) AS n
    WHERE {done}
),"""
        )
    if shape.releases:
        ctes.append(_RELEASE_CTE)
        released = _RELEASED_ARRAYS
    else:
        released = _NO_RELEASES
    if shape.status is None:
        ctes.append(
            f"""
prog AS (SELECT project_id, {_sums()} FROM {{s}}.progress
    WHERE project_id = %(pid)s GROUP BY project_id)"""
        )
    else:
        # The task's own stripe as updated, plus the other stripes as of the
        # statement's snapshot.
        was, now = shape.status
        ctes.append(
            f"""
mine AS (
    UPDATE {{s}}.progress SET {was} = {was} - 1, {now} = {now} + 1
    WHERE project_id = %(pid)s AND stripe = (SELECT stripe FROM cur) AND {done}
    RETURNING project_id, stripe, {_cols(COUNTERS)}
),
prog AS (
    SELECT mine.project_id, {_plus("mine", "rest")}
    FROM mine, LATERAL (SELECT {_sums()} FROM {{s}}.progress
        WHERE project_id = %(pid)s AND stripe <> mine.stripe) AS rest
)"""
        )
    if shape.events:
        # Last, so that the project's row is held from here to the commit only.
        gate = done if shape.status is None else f"{done} AND EXISTS (SELECT 1 FROM mine)"
        ctes.append("," + _events_ctes("%(pid)s::text", gate))
    notify = []
    if shape.notify_own:
        notify.append("true")
    if shape.notify_released:
        notify.append("EXISTS (SELECT 1 FROM rel)")
    notify_col = (
        f"CASE WHEN {done} AND ({' OR '.join(notify)}) THEN pg_notify(%(channel)s, '') IS NULL END"
        if notify
        else "NULL"
    )
    return f"""WITH {"".join(ctes)}
SELECT (SELECT version FROM cur), {guard_cols}, {project_col},
    {idem_cols}, {dup_col}, {next_col},
    {_cols(TASK_COLS, "upd.")},
    {_cols(PROGRESS_COLS, "prog.")},
    {released},
    {notify_col}
FROM (SELECT 1) AS one
    LEFT JOIN upd ON true
    LEFT JOIN prog ON true
{"LEFT JOIN idem ON true" if shape.idempotency else ""}"""


_CASTS = {
    "blocked_by": "::text[]",
    "metadata": "::jsonb",
    "lease_expires_at": "::timestamptz",
    "started_at": "::timestamptz",
    "completed_at": "::timestamptz",
    "error_message": "::text",
    "error_type": "::text",
    "blocked_reason": "::text",
}


def _apply_project_text(guards: bool, releases: bool, notify: bool) -> str:
    ctes = ["""cur AS (SELECT version FROM {s}.projects WHERE id = %(pid)s FOR UPDATE),"""]
    ok = ["(SELECT version FROM cur) = %(expected)s"]
    if guards:
        ctes.append(_GUARD_CTES)
        ok.append("NOT EXISTS (SELECT 1 FROM gbad)")
        guard_cols = (
            "EXISTS (SELECT 1 FROM gbad), (SELECT id FROM gbad),"
            " (SELECT expected FROM gbad), (SELECT found FROM gbad)"
        )
    else:
        guard_cols = "false, NULL, NULL, NULL"
    sets = ", ".join(f"{c} = %(p_{c})s" for c in PROJECT_COLS if c != "id")
    ctes.append(
        f"""
upd AS (
    UPDATE {{s}}.projects SET {sets}
    WHERE id = %(pid)s AND version = %(expected)s AND COALESCE({" AND ".join(ok)}, false)
    RETURNING {_cols(PROJECT_COLS)}
)"""
    )
    if releases:
        ctes[-1] += ","
        ctes.append(_RELEASE_CTE.rstrip(","))
    notify_col = (
        "CASE WHEN EXISTS (SELECT 1 FROM upd) AND EXISTS (SELECT 1 FROM rel)"
        " THEN pg_notify(%(channel)s, '') IS NULL END"
        if notify
        else "NULL"
    )
    return f"""WITH {"".join(ctes)}
SELECT (SELECT version FROM cur), {guard_cols},
    {_cols(PROJECT_COLS, "upd.")},
    {_RELEASED_ARRAYS if releases else _NO_RELEASES},
    {notify_col}
FROM (SELECT 1) AS one LEFT JOIN upd ON true"""


# -- the manual retry in one statement ---------------------------------------------


def _in(values: Iterable[str]) -> str:
    """``'a', 'b'`` for ``IN (...)``; ``NULL`` (matching nothing) when empty."""
    quoted = sorted(common.literal(v) for v in values)
    return ", ".join(quoted) if quoted else "NULL"


_RETRY_COUNTERS = COUNTERS
_NOW = "%(n)s::timestamptz"
_FULL = f"%(b)s::text = {common.literal(RetryBudget.FULL)}"
_ARGS = {"actor": "%(a)s::text", "reason": "%(r)s::text", "budget": "%(b)s::text"}
_COLUMN_TYPES = {
    **dict.fromkeys(("title", "status", "error_message", "error_type", "blocked_reason"), "text"),
    **dict.fromkeys(("retry_count", "max_retries", "retries_left", "attempt", "version"), "bigint"),
    **dict.fromkeys(
        ("lease_expires_at", "created_at", "updated_at", "started_at", "completed_at"),
        "timestamptz",
    ),
    **dict.fromkeys(("trigger", "actor", "reason", "budget", "outcome"), "text"),
    **dict.fromkeys(("dispatched_at", "available_at", "finished_at"), "timestamptz"),
}
"""The types of the task and attempt columns a move may set (schema.sql)."""
_RETURNED = {
    "blocked_by": "NULLIF(u.blocked_by, '{{}}'::text[])",
    "metadata": "NULLIF(u.metadata, '{{}}'::jsonb)",
}
"""Read-back columns returned as NULL when empty (fewer bytes to send and decode)."""


def _retry_text(move: effects.Move, *, keyed: bool, claimed: bool) -> str:
    """The manual retry decided and applied in one statement.

    The checks and choices of :func:`deepwork_retry._core.decide.manual_retry`
    are rendered from the core, never copied: what the move changes (``move``,
    the data of :data:`~deepwork_retry._core.effects.MANUAL_RETRY`: the task's
    new values and the attempt record), the states a manual
    retry leaves (:data:`~deepwork_retry._core.machine.TRANSITIONS`), the
    project states that accept a retry and those that dispatch now
    (:data:`~deepwork_retry._core.machine.PROJECT_RULES`) and the finished
    states (:data:`~deepwork_retry._core.states.TERMINAL`). The task is locked
    and read at its latest version, the project and the blockers are locked
    for share (so neither can change before the commit); a blocker that does
    not exist counts as unfinished. Every write is gated on the checks, so
    when any fails nothing changes and the row holds only NULLs.

    One text per shape of the call, so that each plans and binds only what it
    uses: ``keyed`` (an idempotency key is given: probe for it and reserve
    it) and ``claimed`` (the caller claims the outbox entry to deliver it
    itself: no notification). The progress stripe of the task, which the
    project's other retries of tasks in the same stripe update too, is
    updated last, after the attempt and outbox inserts, so that they wait for
    it as briefly as they can. The progress returned is that stripe as
    updated plus the project's other stripes as of the statement's snapshot.
    """
    target = move.target
    sources = [s.value for s in move.sources]
    accepting = _in(s.value for s in machine.ACCEPTS_RETRY)
    dispatching = _in(s.value for s in machine.DISPATCHES)
    finished = _in(s.value for s in TERMINAL)
    spelling = common.Spelling(
        column="t.{}".format, now=_NOW, full=_FULL, args=_ARGS, types=_COLUMN_TYPES
    )
    change = common.set_clause(move, spelling)
    read_back = common.read_back(move)
    fields = [name for name, _ in move.attempt]  # the others are NULL
    record = ", ".join(common.record_values(move, spelling, fields))
    available = common.render(dict(move.attempt)["available_at"], spelling)
    pending, deferred = DispatchState.PENDING.value, DispatchState.DEFERRED.value
    moved = ", ".join(
        [f"{c} = {c} - (c.status = '{c}')::int" for c in sorted(sources)]
        + [f"{target.value} = {target.value} + 1"]
    )
    this = "project_id = %(p)s AND task_id = %(t)s"
    if keyed:
        key_probe = (
            "AND NOT EXISTS (SELECT FROM {s}.idempotency WHERE key = %(k)s::text"
            " AND expires_at > %(n)s::timestamptz)"
        )
        reserve = f"""
i AS (INSERT INTO {{s}}.idempotency ({_cols(IDEM_COLS)})
    SELECT %(k)s::text, %(p)s::text, %(t)s::text, %(n)s::timestamptz, NULL, NULL,
        %(x)s::timestamptz
    FROM ok WHERE ok.v ON CONFLICT (key) DO UPDATE SET {_TAKE_EXPIRED} RETURNING 1),"""
        reserved = "AND EXISTS (SELECT FROM i)"
    else:
        key_probe = reserve = reserved = ""
    claim = "CASE WHEN ok.ready THEN %(c)s::timestamptz END" if claimed else "NULL"
    # Relays are woken only for entries nobody claimed.
    notify = (
        "NULL"
        if claimed
        else "CASE WHEN u.id IS NOT NULL AND ok.ready THEN pg_notify({chan}, '') IS NULL END"
    )
    returned = ", ".join(_RETURNED.get(c, f"u.{c}") for c in read_back)
    # Parameters: p project, t task, n now, k idempotency key, b budget, a actor,
    # r reason, c claimed_until. The task is looked up with the states it may
    # leave, as the floor's statement does: an exact key of both the primary key
    # and tasks_by_status, so that the planner, which cannot tell the two apart
    # before the table has statistics, never scans a project's tasks by status.
    # A task in another state reads as missing, and the general path raises the
    # core's error for it. The attempt check is one index range read: no
    # record numbered next (c.nxt), and the one before it exists unless next is
    # the first; that is, the highest number in [nxt - 1, nxt] is nxt - 1 (0 for none).
    return f"""WITH
c AS (SELECT status, version, attempt + 1 AS nxt, blocked_by, stripe FROM {{s}}.tasks
    WHERE project_id = %(p)s AND status IN ({_in(sources)}) AND id = %(t)s FOR NO KEY UPDATE),
j AS (SELECT status FROM {{s}}.projects WHERE id = %(p)s FOR KEY SHARE),
d AS (SELECT id, status FROM {{s}}.tasks
    WHERE project_id = %(p)s AND id = ANY((SELECT blocked_by FROM c)::text[] COLLATE "C")
    ORDER BY id FOR SHARE),
ok AS (SELECT COALESCE(c.status IN ({_in(sources)}) AND j.status IN ({accepting})
    {key_probe}
    AND NOT EXISTS (SELECT FROM {{s}}.outbox WHERE {this} AND attempt = c.nxt)
    AND COALESCE((SELECT max(number) FROM {{s}}.attempts
        WHERE {this} AND number BETWEEN c.nxt - 1 AND c.nxt), 0) = c.nxt - 1,
    false) AS v,
    COALESCE(j.status IN ({dispatching}), false)
    AND NOT EXISTS (SELECT FROM unnest(c.blocked_by) AS b(id) LEFT JOIN d ON d.id = b.id
        WHERE d.status IS NULL OR d.status NOT IN ({finished})) AS ready
    FROM (SELECT) AS one LEFT JOIN c ON true LEFT JOIN j ON true),{reserve}
u AS (UPDATE {{s}}.tasks AS t SET {change}
    FROM c, ok WHERE t.project_id = %(p)s AND t.status IN ({_in(sources)}) AND t.id = %(t)s
    AND t.version = c.version AND ok.v
    {reserved}
    RETURNING t.project_id, t.id, {_cols(read_back, "t.")}),
a AS (INSERT INTO {{s}}.attempts (project_id, task_id, number, {_cols(fields)})
    SELECT project_id, id, attempt, {record} FROM u RETURNING 1),
o AS (INSERT INTO {{s}}.outbox ({_cols(OUTBOX_COLS)}, seq, pending_seq)
    SELECT x.project_id, x.id, x.attempt, CASE WHEN ok.ready THEN '{pending}' ELSE '{deferred}' END,
        {available}, {_NOW}, {claim}, 0, NULL, NULL, %(tr)s::text,
        x.seq, CASE WHEN ok.ready THEN x.seq END
    FROM (SELECT project_id, id, attempt, nextval({{order}}) AS seq FROM u) AS x, ok
    RETURNING 1),
g AS (UPDATE {{s}}.progress AS g SET {moved} FROM c
    WHERE g.project_id = %(p)s AND g.stripe = c.stripe
    AND EXISTS (SELECT FROM a) AND EXISTS (SELECT FROM o)
    RETURNING g.stripe, {_cols(_RETRY_COUNTERS, "g.")}),{_retry_events_ctes(move)}
SELECT {returned}, {_plus("g", "x", _RETRY_COUNTERS)}, ok.ready, {notify}
FROM ok LEFT JOIN u ON true LEFT JOIN g ON true
    LEFT JOIN LATERAL (SELECT {_sums(_RETRY_COUNTERS)} FROM {{s}}.progress
        WHERE project_id = %(p)s AND stripe <> g.stripe) AS x ON true"""


@attrs.frozen
class RawQuery:
    """A statement with PostgreSQL's own ``$n`` placeholders, run on a raw cursor.

    The driver converts a ``%(name)s`` statement to ``$n`` on every execution,
    and caches the conversion only for texts up to 4,096 bytes: the one-step
    retry, events included, is longer. Converted once here, it is sent as it
    is (:meth:`values` orders a call's parameters)."""

    text: bytes
    names: tuple[str, ...]

    def values(self, params: Mapping[str, Any]) -> list[Any]:
        return [params[name] for name in self.names]


def raw_query(text: bytes) -> RawQuery:
    """``text`` with each ``%(name)s`` replaced by ``$n`` (one number per name)."""
    names: dict[bytes, int] = {}

    def number(match: re.Match[bytes]) -> bytes:
        return b"$%d" % names.setdefault(match.group(1), len(names) + 1)

    converted = _PLACEHOLDER.sub(number, text)
    if b"%" in converted:
        raise ValueError("a raw statement holds a % that is not a named placeholder")
    return RawQuery(converted, tuple(name.decode() for name in names))


def _retry_events_ctes(move: effects.Move) -> str:
    """The one-step retry's events (see :meth:`Queries.retry_events`): those of its case,
    numbered after the project's last, with the after-row's values patched in."""
    data = _patched("kv.v", move, json=True)
    # The events' data come as one JSON array (element i - 1 is event i's), which
    # the server parses once when it binds it: a text array of JSON texts costs
    # the driver an escape of every quote in them on every call.
    return f"""
ek AS (SELECT e.type, e.task_id, e.attempt, e.at, %(e_data)s::jsonb -> (e.ord::int - 1) AS data,
        row_number() OVER (ORDER BY e.ord) AS k, count(*) OVER () AS n
    FROM ok, unnest(%(e_type)s::text[], %(e_task)s::text[], %(e_attempt)s::bigint[],
        %(e_at)s::timestamptz[], %(e_when)s::boolean[])
        WITH ORDINALITY AS e(type, task_id, attempt, at, deferred, ord)
    WHERE e.deferred IS NULL OR e.deferred = NOT ok.ready),
es AS (UPDATE {{s}}.projects SET event_seq = event_seq + (SELECT count(*) FROM ek)
    WHERE id = %(p)s AND EXISTS (SELECT FROM g) RETURNING event_seq),
ei AS ({_EVENT_INSERT}
    SELECT %(p)s::text, es.event_seq - ek.n + ek.k, ek.type, ek.task_id,
        {_patched("ek.attempt", move)}, ek.at,
        COALESCE((SELECT jsonb_object_agg(kv.key, {data})
            FROM jsonb_each(ek.data) AS kv(key, v)), jsonb_build_object())
    FROM es, ek, u RETURNING 1)"""


def retry_params(
    project_id: str,
    task_id: str,
    *,
    now: datetime,
    actor: str | None,
    reason: str | None,
    budget: RetryBudget,
    claimed_until: datetime | None,
    idempotency_key: str | None,
    idempotency_expires_at: datetime | None = None,
    trace: str | None = None,
) -> dict[str, Any]:
    """The values of the statement :meth:`Queries.retry_blocked` picks for them (its
    events' aside: :meth:`Queries.retry_events`)."""
    params = {
        "p": project_id,
        "t": task_id,
        "n": now,
        "b": budget.value,
        "a": actor,
        "r": reason,
        "tr": trace,
    }
    if idempotency_key is not None:
        params["k"] = idempotency_key
        params["x"] = (
            IdempotencyRecord(key="", project_id="", task_id="", created_at=now).expires_at
            if idempotency_expires_at is None
            else idempotency_expires_at
        )
    if claimed_until is not None:
        params["c"] = claimed_until
    return params


def _pg_blocked_by(value: list[str] | None) -> tuple[str, ...]:
    return () if value is None else tuple(value)


def _pg_metadata(value: dict[str, Any] | None) -> dict[str, Any]:
    return {} if value is None else dict(value)


_RETRY_CODEC = {**_TASK_CODEC, "blocked_by": "_blocked_by({0})", "metadata": "_metadata({0})"}
"""The one-step retry returns an empty ``blocked_by`` and ``metadata`` as NULL."""
_RETRY_HELPERS = {**_HELPERS, "_blocked_by": _pg_blocked_by, "_metadata": _pg_metadata}


class RetryReader:
    """Reads the one-step retry's row for one move: what :meth:`Storage.apply` would
    return, or ``None`` when the statement changed nothing."""

    def __init__(self, move: effects.Move) -> None:
        read_back = common.read_back(move)
        given, consts = common.known_values(
            move, now="(now if now.tzinfo is _UTC else _req_utc(now))"
        )
        self._decode = common.compile_decoder(
            Task,
            read=common.at(read_back),
            codec=_RETRY_CODEC,
            helpers={**_RETRY_HELPERS, **consts},
            given={"project_id": "project_id", "id": "task_id", **given},
            signature="row, project_id, task_id, now",
        )
        self._counters = len(read_back)
        self._ready = self._counters + len(_RETRY_COUNTERS)

    def __call__(
        self,
        project_id: str,
        task_id: str,
        row: Row,
        *,
        now: datetime,
        claimed_until: datetime | None,
        trace: str | None = None,
    ) -> Applied | None:
        """``now`` must be timezone-aware (it is what the statement stored as
        ``updated_at``, read back as UTC)."""
        counters, ready_at = self._counters, self._ready
        if row[counters] is None:
            return None  # nothing written: no progress stripe was moved
        task: Task = self._decode(row, project_id, task_id, now)
        ready = bool(row[ready_at])
        made: tuple[DispatchEntry, ...] = ()
        if ready and claimed_until is not None:
            made = (
                DispatchEntry(
                    project_id=project_id,
                    task_id=task_id,
                    attempt=task.attempt,
                    state=DispatchState.PENDING,
                    available_at=now,
                    created_at=now,
                    claimed_until=claimed_until,
                    trace=trace,
                ),
            )
        return Applied(
            task=task,
            progress=Progress(
                project_id=project_id,
                **dict(zip(_RETRY_COUNTERS, row[counters:ready_at], strict=True)),
            ),
            dispatches=made,
            deferred=not ready,
        )


def apply_outcome(plan: Plan, row: Row) -> ApplyOutcome:
    """Read the apply statement's row: the result, or the error memory storage would raise."""
    before = plan.before
    found = row[_A_FOUND]
    if row[_A_TASK] is not None:
        made: list[DispatchEntry] = []
        own = plan.dispatch
        if own is not None and own.state is DispatchState.PENDING and own.claimed_until:
            made.append(own)
        if plan.claimed_until is not None:
            made.extend(_released(before.project_id, row, _A_RELEASED))
        applied = Applied(
            task=decode_task(row, _A_TASK),
            progress=decode_progress(row, _A_PROGRESS),
            dispatches=tuple(made),
            deferred=own is not None and own.state is DispatchState.DEFERRED,
        )
        return ApplyOutcome(applied=applied, error=None)
    conflict = VersionConflict(before.id, before.version, found)
    if found is None:
        return ApplyOutcome(None, TaskNotFound(before.project_id, before.id))
    if found != before.version:
        return ApplyOutcome(None, conflict)
    if row[_A_GBAD]:
        return ApplyOutcome(None, VersionConflict(row[_A_GID], row[_A_GEXP], row[_A_GFOUND]))
    if plan.project_version is not None and row[_A_PVER] != plan.project_version:
        return ApplyOutcome(None, conflict)
    if row[_A_IDEM] is not None:
        return ApplyOutcome(None, IdempotencyConflict(decode_idem(row, _A_IDEM)))
    if row[_A_DUP]:
        return ApplyOutcome(None, conflict)
    if not row[_A_NEXT]:
        number = plan.new_attempt.number if plan.new_attempt else 0
        return ApplyOutcome(None, InvalidInput(f"Task {before.id!r}: attempt {number} is not next"))
    # Every check passed on the statement's snapshot, yet nothing was written:
    # the idempotency key was taken by a transaction that committed meanwhile.
    return ApplyOutcome(None, conflict, reread_idempotency=plan.idempotency is not None)


def apply_project_outcome(
    plan: ProjectPlan, row: Row
) -> tuple[Project, list[DispatchEntry]] | DeepworkError:
    """Read the apply_project statement's row, as :func:`apply_outcome` does."""
    at = _PROJECT_ROW
    found, guard_bad = row[at["found"]], row[at["guard_bad"]]
    if row[at["project.id"]] is not None:
        released = _released(plan.before.id, row, at["released"])
        project = decode_project(row, at["project.id"])
        return project, released if plan.claimed_until is not None else []
    if found is None:
        return ProjectNotFound(plan.before.id)
    if found == plan.before.version and guard_bad:
        guard = row[at["guard_id"]], row[at["guard_expected"]], row[at["guard_found"]]
        return VersionConflict(*guard)
    return VersionConflict(plan.before.id, plan.before.version, found)


# -- retention: the prune rule (deepwork_retry._core.retention) rendered ------------------
# One batch per table: the oldest rows the rule removes, found by a range read
# of the table's retention index (migration 0004), locked without waiting
# (rows another transaction holds are left for the next batch) and deleted
# by their physical address, in one statement and so one short transaction.
_FINISHED = _in(s.value for s in retention.FINISHED)
_PRUNE = (
    """DELETE FROM {s}.idempotency WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM {s}.idempotency WHERE expires_at <= %(before)s
    ORDER BY expires_at LIMIT %(n)s FOR UPDATE SKIP LOCKED))""",
    f"""DELETE FROM {{s}}.outbox WHERE ctid = ANY(ARRAY(
    SELECT o.ctid FROM {{s}}.outbox AS o
    WHERE o.state = '{retention.PRUNED_ENTRY_STATE.value}' AND o.delivered_at <= %(before)s
    AND NOT EXISTS (SELECT FROM {{s}}.tasks AS t WHERE t.project_id = o.project_id
        AND t.id = o.task_id AND t.status = '{retention.AWAITING_START.value}'
        AND t.attempt = o.attempt)
    ORDER BY o.delivered_at LIMIT %(n)s FOR UPDATE OF o SKIP LOCKED))""",
    # The task is asked by a scalar subquery, not EXISTS or a join: the planner may
    # turn those into a join driven by the tasks, reading every finished task (none
    # is ever deleted) for each batch; this one it can only run per attempt row read.
    f"""DELETE FROM {{s}}.attempts WHERE ctid = ANY(ARRAY(
    SELECT a.ctid FROM {{s}}.attempts AS a
    WHERE a.dispatched_at <= %(before)s
    AND (SELECT t.status IN ({_FINISHED}) AND t.updated_at <= %(before)s
        FROM {{s}}.tasks AS t WHERE t.project_id = a.project_id AND t.id = a.task_id)
    ORDER BY a.dispatched_at LIMIT %(n)s FOR UPDATE OF a SKIP LOCKED))""",
)


# -- lifecycle events (deepwork_retry._core.events) ------------------------------------
# The core computes every event a move makes; the statements only number them
# (the project's events.event_seq, bumped in the move's own statement) and
# store them. The bump is the last write of each statement, so the project's
# row, which every writer of the project's events waits for, is held from the
# bump to the commit only.

EVENT_COLS = ("project_id", "seq", "type", "task_id", "attempt", "at", "data")
RETRY_COLS = ("subscriber", "tries", "retry_at", "last_error", "parked", "claimed_until")
EVENT_LOCK = 0x6478
"""First key of the advisory lock that serialises :meth:`claim_events` (the second is the
schema's hash)."""

_EVENT_ARRAYS = (
    "unnest(%(e_type)s::text[], %(e_task)s::text[], %(e_attempt)s::bigint[],"
    " %(e_at)s::timestamptz[], %(e_data)s::text[])"
    " WITH ORDINALITY AS e(type, task_id, attempt, at, data, ord)"
)
_EVENT_INSERT = "INSERT INTO {s}.events (project_id, seq, type, task_id, attempt, at, data)"


def event_params(found: Sequence[Event]) -> dict[str, Any]:
    """The parallel arrays of ``found`` (unnumbered) that the statements number and store."""
    return {
        "e_type": [e.type.value for e in found],
        "e_task": [e.task_id for e in found],
        "e_attempt": [e.attempt for e in found],
        "e_at": [e.at for e in found],
        "e_data": [_data_text(e.data) for e in found],
    }


_UNSTORABLE_ESCAPE = re.compile(r"\\u(0000|d[89a-f])", re.IGNORECASE)
"""An escape in JSON text that jsonb refuses (NUL, a surrogate: perhaps a lone one)."""


def _data_text(data: Mapping[str, Any]) -> str:
    """:func:`~deepwork_retry._core.events.data_text`, its text made storable when it
    has to be (rarely: the check is one search of the text)."""
    text = events.data_text(data)
    if _UNSTORABLE_ESCAPE.search(text) is None:
        return text
    return events.data_text(_storable(data))


def _storable(value: Any) -> Any:
    """``value`` with its text as jsonb holds it (see :func:`diagnostic`: no NUL, no
    lone surrogate), as the task's own error text is stored."""
    if isinstance(value, str):
        return diagnostic(value)
    if isinstance(value, Mapping):
        return {_storable(k): _storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_storable(v) for v in value]
    return value


def _events_ctes(project: str, gate: str) -> str:
    """Number and store the events of :func:`event_params` for ``project`` when ``gate``
    holds: the project's sequence bumped by their count, then the rows."""
    count = "cardinality(%(e_type)s::text[])"
    return f"""
ev_seq AS (UPDATE {{s}}.projects SET event_seq = event_seq + {count}
    WHERE id = {project} AND {gate} RETURNING event_seq),
ev_ins AS ({_EVENT_INSERT}
    SELECT {project}, ev_seq.event_seq - {count} + e.ord, e.type, e.task_id, e.attempt,
        e.at, e.data::jsonb
    FROM ev_seq, {_EVENT_ARRAYS} RETURNING 1)"""


def added_params(tasks: Sequence[Task]) -> dict[str, Any]:
    """:func:`event_params` of the tasks added, with each event's project and its rank
    among the batch's events of that project."""
    found = [events.added(task) for task in tasks]
    ranks: dict[str, int] = {}
    rank = []
    for event in found:
        ranks[event.project_id] = ranks.get(event.project_id, 0) + 1
        rank.append(ranks[event.project_id])
    params = event_params(found)
    params["e_project"] = [e.project_id for e in found]
    params["e_rank"] = rank
    return params


_ADD_EVENTS = f"""WITH
n AS (SELECT project_id, count(*) AS n FROM unnest(%(e_project)s::text[]) AS x(project_id)
    GROUP BY project_id),
l AS (SELECT id FROM {{s}}.projects WHERE id IN (SELECT project_id FROM n)
    ORDER BY id FOR NO KEY UPDATE),
b AS (UPDATE {{s}}.projects AS p SET event_seq = p.event_seq + n.n FROM n
    WHERE p.id = n.project_id AND (SELECT count(*) FROM l) >= 0
    RETURNING p.id, p.event_seq, n.n)
{_EVENT_INSERT}
SELECT b.id, b.event_seq - b.n + r.rank, e.type, e.task_id, e.attempt, e.at, e.data::jsonb
FROM {_EVENT_ARRAYS}
    JOIN unnest(%(e_project)s::text[], %(e_rank)s::bigint[]) WITH ORDINALITY
        AS r(project_id, rank, ord) ON r.ord = e.ord
    JOIN b ON b.id = r.project_id"""
"""The events of an ``add_tasks`` batch; the projects' rows are locked in key order, so
two batches never wait for each other in a cycle."""


_MARK_FAILED = f"""WITH
m AS (UPDATE {{s}}.outbox SET tries = tries + 1, last_error = %(error)s, available_at = %(at)s,
    claimed_until = NULL
    WHERE project_id = %(pid)s AND task_id = %(tid)s AND attempt = %(n)s AND state = {{pending}}
    RETURNING 1),{_events_ctes("%(pid)s::text", "EXISTS (SELECT FROM m)")}
SELECT count(*) FROM ev_ins"""
"""An outbox delivery failed: the entry released, due again at ``at``, and its event."""


# The events of the one-step manual retry are computed by the core before the
# statement decides. The statement alone knows the task's counters after the
# move (retry_count, attempt, ...) and whether its entry is deferred, so the
# core's manual_retry_events runs on a template task whose read-back integer
# fields hold sentinels, once for a retry that dispatches and once for one
# deferred; the statement keeps the events of its case (e_when: NULL both,
# true only deferred, false only ready) and puts the after-row's values where
# the sentinels are (an event's attempt, any top-level data value). A second
# statement pipelined after the retry would need a transaction around the two
# (three more commands on an autocommit connection); this keeps the retry one
# autocommit statement, one round trip.
_SENTINEL = 9_007_199_254_740_000
"""Template values for the read-back counters: far beyond any real counter."""


def _sentinels(move: effects.Move) -> dict[str, int]:
    """The read-back integer fields of ``move`` and each one's sentinel."""
    ints = [
        f.name
        for f in attrs.fields(Task)
        if f.name in common.read_back(move) and f.type in ("int", int)
    ]
    return {name: _SENTINEL + n for n, name in enumerate(ints)}


def _retry_template(
    move: effects.Move,
) -> tuple[Callable[[datetime], dict[str, Any]], TaskStatus]:
    """The template task's fields at ``now`` (ids aside), and the one state the move leaves."""
    (source,) = move.sources  # a progress event's "from": the statement checks it
    known = move.known()
    consts = {n: e.value for n, e in known.items() if not isinstance(e, effects.Now)}
    nows = [n for n, e in known.items() if isinstance(e, effects.Now)]
    fixed = {**consts, **_sentinels(move)}

    def fields(now: datetime) -> dict[str, Any]:
        return {**fixed, **dict.fromkeys(nows, now)}

    return fields, source


def _patched(value: str, move: effects.Move, *, json: bool = False) -> str:
    """SQL for ``value`` (an integer, or a jsonb value when ``json``) with each sentinel
    replaced by the after-row's field (``u.``)."""
    cases = []
    for name, sentinel in _sentinels(move).items():
        if json:
            cases.append(f"WHEN '{sentinel}'::jsonb THEN to_jsonb(u.{name})")
        else:
            cases.append(f"WHEN {sentinel} THEN u.{name}")
    whens = " ".join(cases)
    return f"CASE {value} {whens} ELSE {value} END" if whens else value


def _merge(ready: Sequence[Event], deferred: Sequence[Event]) -> list[tuple[Event, bool | None]]:
    """One list holding both sequences in order: each event with ``None`` (in both),
    ``True`` (only the deferred case's) or ``False`` (only the ready case's)."""
    merged: list[tuple[Event, bool | None]] = []
    i = 0
    for event in deferred:
        if i < len(ready) and ready[i] == event:
            merged.append((event, None))
            i += 1
        elif event in ready[i:]:
            while ready[i] != event:
                merged.append((ready[i], False))
                i += 1
            merged.append((event, None))
            i += 1
        else:
            merged.append((event, True))
    merged.extend((event, False) for event in ready[i:])
    return merged


def decode_event(row: Row, at: int = 0) -> Event:
    project_id, seq, kind, task_id, attempt, when, data = row[at : at + len(EVENT_COLS)]
    return Event(
        project_id=project_id,
        seq=seq,
        type=EventType(kind),
        task_id=task_id,
        attempt=attempt,
        at=_req_utc(when),
        data=events.data_value(data),
    )


def decode_event_retry(row: Row) -> EventRetry:
    """A row of :data:`RETRY_COLS` then :data:`EVENT_COLS`."""
    subscriber, tries, retry_at, last_error, parked, claimed_until = row[: len(RETRY_COLS)]
    return EventRetry(
        event=decode_event(row, len(RETRY_COLS)),
        subscriber=subscriber,
        tries=tries,
        retry_at=_req_utc(retry_at),
        last_error=last_error,
        parked=parked,
        claimed_until=_utc(claimed_until),
    )


def event_key(event_id: str) -> tuple[str, int] | None:
    """``(project_id, seq)`` of an :attr:`Event.id`, ``None`` when it names no event."""
    project_id, sep, seq = event_id.rpartition(":")
    if not sep or not (seq.isascii() and seq.isdigit()) or not findable(project_id):
        return None
    return project_id, int(seq)


_EV = _cols(EVENT_COLS, "e.")
_EVENT_TEXTS = {
    "events": f"""SELECT p.id, {_cols(EVENT_COLS, "x.")} FROM {{s}}.projects AS p
    LEFT JOIN LATERAL (SELECT {_EV} FROM {{s}}.events AS e
        WHERE e.project_id = p.id AND e.seq > %(after)s ORDER BY e.seq LIMIT %(limit)s) AS x
    ON true WHERE p.id = %(pid)s ORDER BY x.seq""",
    # Run after the advisory lock, in its transaction: the snapshot sees every
    # claim committed before, so a task's earlier event claimed by another
    # caller holds its later ones back.
    "claim_events": f"""WITH c AS (SELECT e.project_id, e.seq FROM {{s}}.events AS e
    WHERE e.delivered_at IS NULL AND (e.claimed_until IS NULL OR e.claimed_until <= %(now)s)
    AND NOT EXISTS (SELECT FROM {{s}}.events AS b WHERE b.delivered_at IS NULL
        AND b.project_id = e.project_id AND b.task_id = e.task_id AND b.seq < e.seq
        AND b.claimed_until > %(now)s)
    ORDER BY e.project_id, e.seq LIMIT %(limit)s FOR UPDATE)
UPDATE {{s}}.events AS e SET claimed_until = %(until)s FROM c
    WHERE e.project_id = c.project_id AND e.seq = c.seq RETURNING {_EV}""",
    "settle_events": """WITH
d AS (UPDATE {s}.events AS e SET delivered_at = %(now)s, claimed_until = NULL
    FROM unnest(%(pids)s::text[], %(seqs)s::bigint[]) AS k(project_id, seq)
    WHERE e.project_id = k.project_id AND e.seq = k.seq AND e.delivered_at IS NULL
    RETURNING 1),
f AS (INSERT INTO {s}.event_retries AS r
    (project_id, seq, subscriber, tries, retry_at, last_error, parked, claimed_until)
    SELECT f.* FROM unnest(%(f_pids)s::text[], %(f_seqs)s::bigint[], %(f_subs)s::text[],
        %(f_tries)s::bigint[], %(f_at)s::timestamptz[], %(f_errors)s::text[],
        %(f_parked)s::boolean[], %(f_claims)s::timestamptz[])
        AS f(project_id, seq, subscriber, tries, retry_at, last_error, parked, claimed_until)
    JOIN {s}.events AS e ON e.project_id = f.project_id AND e.seq = f.seq
    ON CONFLICT (project_id, seq, subscriber) DO UPDATE SET tries = EXCLUDED.tries,
        retry_at = EXCLUDED.retry_at, last_error = EXCLUDED.last_error,
        parked = EXCLUDED.parked, claimed_until = EXCLUDED.claimed_until
    RETURNING 1)
SELECT (SELECT count(*) FROM d), (SELECT count(*) FROM f)""",
    "claim_event_retries": f"""WITH c AS (SELECT project_id, seq, subscriber
    FROM {{s}}.event_retries WHERE NOT parked AND retry_at <= %(now)s
    AND (claimed_until IS NULL OR claimed_until <= %(now)s)
    ORDER BY retry_at, project_id, seq, subscriber LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
UPDATE {{s}}.event_retries AS r SET claimed_until = %(until)s FROM c, {{s}}.events AS e
    WHERE r.project_id = c.project_id AND r.seq = c.seq AND r.subscriber = c.subscriber
    AND e.project_id = r.project_id AND e.seq = r.seq
    RETURNING {_cols(RETRY_COLS, "r.")}, {_EV}""",
    "forget_event_retry": """DELETE FROM {s}.event_retries
    WHERE project_id = %(pid)s AND seq = %(seq)s AND subscriber = %(sub)s""",
    "fail_event_retry": """UPDATE {s}.event_retries SET tries = tries + 1,
    last_error = %(error)s, retry_at = COALESCE(%(at)s::timestamptz, %(now)s),
    parked = %(at)s::timestamptz IS NULL, claimed_until = NULL
    WHERE project_id = %(pid)s AND seq = %(seq)s AND subscriber = %(sub)s""",
    "parked_events": f"""SELECT {_cols(RETRY_COLS, "r.")}, {_EV}
    FROM {{s}}.event_retries AS r JOIN {{s}}.events AS e
        ON e.project_id = r.project_id AND e.seq = r.seq
    WHERE r.parked AND (%(sub)s::text IS NULL OR r.subscriber = %(sub)s::text)
    ORDER BY r.project_id, r.seq, r.subscriber LIMIT %(limit)s""",
    "replay_parked": """UPDATE {s}.event_retries AS r SET parked = false, tries = 0,
    retry_at = %(now)s, claimed_until = NULL
    WHERE r.parked AND (%(sub)s::text IS NULL OR r.subscriber = %(sub)s::text)
    AND (NOT %(some)s OR (r.project_id, r.seq) IN
        (SELECT * FROM unnest(%(pids)s::text[], %(seqs)s::bigint[])))""",
    "add_events": _ADD_EVENTS,
    "mark_failed": _MARK_FAILED,
}

_PRUNE_EVENTS = """DELETE FROM {s}.events WHERE ctid = ANY(ARRAY(
    SELECT e.ctid FROM {s}.events AS e WHERE e.delivered_at <= %(before)s
    AND NOT EXISTS (SELECT FROM {s}.event_retries AS r
        WHERE r.project_id = e.project_id AND r.seq = e.seq)
    ORDER BY e.delivered_at LIMIT %(n)s FOR UPDATE OF e SKIP LOCKED))"""
"""Delivered events (:meth:`~deepwork_retry._core.retention.PruneRule.removes_event`): none
with a failed delivery kept (to retry or parked)."""


def failure_params(failures: Sequence[EventRetry]) -> dict[str, Any]:
    return {
        "f_pids": [f.event.project_id for f in failures],
        "f_seqs": [f.event.seq for f in failures],
        "f_subs": [f.subscriber for f in failures],
        "f_tries": [f.tries for f in failures],
        "f_at": [f.retry_at for f in failures],
        "f_errors": [diagnostic(f.last_error) for f in failures],
        "f_parked": [f.parked for f in failures],
        "f_claims": [f.claimed_until for f in failures],
    }
