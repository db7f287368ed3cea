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
- What each operation reads and writes is the shared SQL engine's
  (:mod:`deepwork_retry.storage._sql.engine`), run inside this file's
  transactions; this module holds what is SQLite's own: connections, locking,
  migrations on open and the error codes (:class:`SQLiteDialect`), which
  become library errors in one place (:meth:`SQLiteStorage._translating`).

The semantics of every method are those of
:class:`~deepwork_retry.storage.memory.MemoryStorage`; both pass the same
conformance suite.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from typing_extensions import ParamSpec

from deepwork_retry._core import effects
from deepwork_retry._core.events import Event, EventRetry
from deepwork_retry._core.model import (
    Attempt,
    DispatchEntry,
    IdempotencyRecord,
    Progress,
    Project,
    ProjectSummary,
    Task,
)
from deepwork_retry._core.plans import Applied, Plan, ProjectPlan
from deepwork_retry._core.retention import Pruned, PruneRule
from deepwork_retry._core.states import RetryBudget, TaskStatus
from deepwork_retry.exceptions import (
    DeepworkError,
    InvalidInput,
    StorageCorrupt,
    StorageError,
    StorageMissing,
    StorageReadOnly,
    StorageUnavailable,
)
from deepwork_retry.storage._sql import common
from deepwork_retry.storage._sql.dialect import Dialect, Kind, translate
from deepwork_retry.storage._sql.engine import Engine, all_text
from deepwork_retry.storage._to_async import (
    DEFAULT_MAX_WAITING_WRITES,
    DEFAULT_READERS,
    DEFAULT_WRITERS,
    AsyncFromSyncOneStepEventsOverview,
)

__all__ = ["APPLICATION_ID", "AsyncSQLiteStorage", "SQLiteDialect", "SQLiteStorage", "migrations"]

APPLICATION_ID = 0x64777274
"""``PRAGMA application_id`` of a deepwork_retry database ("dwrt")."""

_TABLES = frozenset(
    {"projects", "tasks", "task_deps", "attempts", "outbox", "idempotency", "events",
     "event_retries"}
)  # fmt: skip
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


_SURROGATE = re.compile("[\ud800-\udfff]")


def _after_bound(after: str) -> tuple[str, str]:
    """``id > after`` as a comparison SQLite can make on stored (encodable) ids
    (see :func:`common.after_bound`; SQLite stores NUL, not lone surrogates)."""
    return common.after_bound(after, _SURROGATE) if isinstance(after, str) else (">", after)


# -- the dialect: SQLite's error codes ------------------------------------------------


class SQLiteDialect(Dialect):
    """SQLite through ``sqlite3`` (the engine's statements as written, ``?`` parameters).

    Every write holds the whole file (``BEGIN IMMEDIATE``), so reads need no row lock.
    """

    # Primary result codes (https://sqlite.org/rescode.html).
    errors: ClassVar[dict[int | str, Kind]] = {
        5: Kind.BUSY,  # SQLITE_BUSY
        6: Kind.BUSY,  # SQLITE_LOCKED
        11: Kind.CORRUPT,  # SQLITE_CORRUPT
        26: Kind.CORRUPT,  # SQLITE_NOTADB
        8: Kind.READ_ONLY,  # SQLITE_READONLY
        14: Kind.CANNOT_OPEN,  # SQLITE_CANTOPEN
        3: Kind.UNAVAILABLE,  # SQLITE_PERM
        10: Kind.UNAVAILABLE,  # SQLITE_IOERR
        13: Kind.UNAVAILABLE,  # SQLITE_FULL
        15: Kind.UNAVAILABLE,  # SQLITE_PROTOCOL
        19: Kind.CONFLICT,  # SQLITE_CONSTRAINT
    }
    _GUESSED = (
        ("locked", 5),
        ("busy", 5),
        ("not a database", 26),
        ("malformed", 11),
        ("readonly", 8),
        ("read-only", 8),
        ("unable to open", 14),
        ("disk i/o", 10),
        ("disk is full", 13),
    )

    def error_code(self, exc: BaseException) -> int | str | None:
        code = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11
        if isinstance(code, int):
            return code & 0xFF
        if isinstance(exc, sqlite3.IntegrityError):
            return 19
        text = str(exc).lower()  # Python 3.10: only the message tells
        for fragment, guessed in self._GUESSED:
            if fragment in text:
                return guessed
        return None

    def classify(self, exc: BaseException) -> Kind | None:
        kind = super().classify(exc)
        if kind is None and ("no such table" in str(exc) or "no such column" in str(exc)):
            return Kind.SCHEMA
        return kind


SQLITE = SQLiteDialect()
"""The dialect of every SQLite database (used by any storage that opens one)."""
_ENGINE = Engine(SQLITE)
_prune_statements = _ENGINE.prune_statements


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

    Cursors are made with :meth:`cursor`, never ``sqlite3.Cursor(conn)``:
    CPython's connection keeps a weak reference to every cursor made on it
    and drops the dead ones only in :meth:`cursor`, so cursors made directly
    grew that list by one reference per statement for the connection's life
    (about 3 MiB per 1,000 retries of a long-running process).
    """

    __slots__ = ("busy_ms", "cursors")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cursors: list[weakref.ref[sqlite3.Cursor]] = []
        self.busy_ms = 0
        """The busy timeout set on the connection, in milliseconds."""

    def open_cursor(self) -> sqlite3.Cursor:
        cursor = self.cursor()  # not sqlite3.Cursor(self): see the class text
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
    only across process crashes (faster). The outbox's claims and delivery
    marks are always committed as with ``"NORMAL"``: losing one only lets a
    relay deliver the entry again, which the attempt's fencing token makes
    harmless.
    ``read_only=True`` opens the file for reading: reads work, every write raises
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
        self._retry = _ENGINE.retry_sql(effects.MANUAL_RETRY)
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
                cannot = SQLITE.classify(exc) in (Kind.READ_ONLY, Kind.CANNOT_OPEN)
                if not cannot or self._writable():
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
                if SQLITE.classify(exc) is not Kind.BUSY or time.monotonic() >= deadline:
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
        return translate(SQLITE, exc, where=repr(str(self.path)), waited=self.timeout)

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
    def _tx(self, *, write: bool, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction on a borrowed connection; rolled back on any error, and the
        connection's cursors closed, before the error leaves.

        ``durable=False`` commits a write with ``synchronous = NORMAL`` (no wait
        for the disk; with WAL still atomic, and made durable by the next
        ``FULL`` commit of any connection); the connection is back to
        ``synchronous`` before it is lent again."""
        writer, due = self._write_turn() if write else (None, 0.0)
        relaxed = write and not durable and self.synchronous != "NORMAL"
        try:
            with self._translating():
                conn = self._checkout()
                reusable = True
                try:
                    if relaxed:
                        conn.execute("PRAGMA synchronous = NORMAL")
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
                    if relaxed and reusable:
                        try:
                            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
                        except sqlite3.Error:
                            reusable = False  # it might commit without syncing: never lend it
                    if reusable:
                        self._checkin(conn)
                    else:
                        self._discard(conn)
        finally:
            if writer is not None:
                writer.release()

    # -- the operations: the shared engine, in this storage's transactions -------------
    def create_project(self, project: Project) -> None:
        with self._tx(write=True) as c:
            _ENGINE.create_project(c, project)

    def add_tasks(self, tasks: Sequence[Task]) -> None:
        with self._tx(write=True) as c:
            _ENGINE.add_tasks(c, tasks)

    def get_project(self, project_id: str) -> Project:
        with self._tx(write=False) as c:
            return _ENGINE.get_project(c, project_id)

    def load(self, project_id: str, task_id: str) -> tuple[Project, Task]:
        # One statement, so one implicit read transaction: no BEGIN/COMMIT round.
        with self._translating():
            conn = self._checkout()
            try:
                return _ENGINE.load(conn, project_id, task_id)
            finally:
                self._checkin(conn)

    def get_tasks(self, project_id: str, task_ids: Sequence[str]) -> dict[str, Task]:
        with self._tx(write=False) as c:
            return _ENGINE.get_tasks(c, project_id, task_ids)

    def dependants(self, project_id: str, task_id: str) -> list[Task]:
        with self._tx(write=False) as c:
            return _ENGINE.dependants(c, project_id, task_id)

    def list_tasks(
        self,
        project_id: str,
        *,
        status: TaskStatus | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[Task]:
        with self._tx(write=False) as c:
            return _ENGINE.list_tasks(
                c, project_id, status=status, after=after, limit=limit, after_bound=_after_bound
            )

    def progress(self, project_id: str) -> Progress:
        with self._tx(write=False) as c:
            return _ENGINE.progress(c, project_id)

    # -- reads across projects (the ProjectOverview port) ----------------------------------
    def list_projects(
        self,
        *,
        projects: frozenset[str] | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[ProjectSummary]:
        """Projects by id with their progress (the counters are the project row's own)."""
        with self._tx(write=False) as c:
            return _ENGINE.list_projects(
                c, projects=projects, after=after, limit=limit, after_bound=_after_bound
            )

    def blocked_tasks(
        self,
        *,
        projects: frozenset[str] | None = None,
        error_type: str | None = None,
        after: tuple[str, str] | None = None,
        limit: int = 100,
    ) -> list[Task]:
        """Blocked tasks across projects by ``(project_id, id)``, from the partial index
        of blocked tasks (``tasks_blocked``)."""
        with self._tx(write=False) as c:
            return _ENGINE.blocked_tasks(
                c, projects=projects, error_type=error_type, after=after, limit=limit,
                after_bound=_after_bound,
            )  # fmt: skip

    def attempts(self, project_id: str, task_id: str) -> list[Attempt]:
        with self._tx(write=False) as c:
            return _ENGINE.attempts(c, project_id, task_id)

    def dispatches(self, project_id: str, task_id: str) -> list[DispatchEntry]:
        with self._tx(write=False) as c:
            return _ENGINE.dispatches(c, project_id, task_id)

    def deferred(self, project_id: str) -> list[DispatchEntry]:
        with self._tx(write=False) as c:
            return _ENGINE.deferred(c, project_id)

    def apply(self, plan: Plan) -> Applied:
        params = _ENGINE.plan_params(plan)
        with self._tx(write=True) as c:
            return _ENGINE.apply(c, plan, params)

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
        trace: str | None = None,
    ) -> Applied | None:
        """The manual retry decided and applied in one write transaction
        (:meth:`Engine.retry_blocked <deepwork_retry.storage._sql.engine.Engine.retry_blocked>`).

        The write lock is held throughout, so nothing read can go stale.
        ``None`` (nothing changed, all rolled back) whenever anything refuses;
        the caller's step-by-step path then raises the core's own error.
        """
        if not all_text(project_id, task_id):
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
            # One cursor for every statement: cheaper than a new one per execute.
            cur = c.open_cursor()
            self._begin_write(cur, due)
            applied = _ENGINE.retry_blocked(
                cur, self._retry, project_id, task_id, now=now, actor=actor, reason=reason,
                budget=budget, claimed_until=claimed_until, idempotency_key=idempotency_key,
                idempotency_expires_at=idempotency_expires_at, trace=trace,
            )  # fmt: skip
            if applied is not None:
                cur.execute("COMMIT")
            return applied
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

    def retry_blocked_many(
        self,
        project_id: str,
        task_ids: Sequence[str],
        *,
        now: datetime,
        actor: str | None = None,
        reason: str | None = None,
        budget: RetryBudget = RetryBudget.ONE_MORE,
        claimed_until: datetime | None = None,
    ) -> list[Applied | None]:
        """Each of ``task_ids`` retried as :meth:`retry_blocked` retries it, all in one
        write transaction (one commit): each task within a savepoint, rolled back when
        it declines (``None`` in its place, nothing changed for it).

        A storage error rolls the whole transaction back and is raised.
        """
        if budget.__class__ is not RetryBudget:
            budget = RetryBudget(budget)
        results: list[Applied | None] = []
        with self._tx(write=True) as c:
            cur = c.cursor()
            try:
                for task_id in task_ids:
                    if not all_text(project_id, task_id):
                        results.append(None)
                        continue
                    cur.execute("SAVEPOINT retry_one")
                    try:
                        applied = _ENGINE.retry_blocked(
                            cur, self._retry, project_id, task_id, now=now, actor=actor,
                            reason=reason, budget=budget, claimed_until=claimed_until,
                            idempotency_key=None, idempotency_expires_at=None,
                        )  # fmt: skip
                    except StorageError:
                        raise
                    except DeepworkError:
                        applied = None
                    if applied is None:
                        cur.execute("ROLLBACK TO retry_one")
                    cur.execute("RELEASE retry_one")
                    results.append(applied)
            except (OverflowError, UnicodeEncodeError) as exc:
                raise self._translated(exc) from exc
            finally:
                cur.close()
        return results

    def apply_project(self, plan: ProjectPlan) -> tuple[Project, list[DispatchEntry]]:
        params = _ENGINE.project_params(plan)
        with self._tx(write=True) as c:
            return _ENGINE.apply_project(c, plan, params)

    # -- outbox ------------------------------------------------------------------
    def claim_due(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[DispatchEntry]:
        # As the delivery mark below: a claim lost to a power cut only lets the
        # entry be delivered again, which the fencing token makes run nothing.
        with self._tx(write=True, durable=False) as c:
            return _ENGINE.claim_due(c, now=now, limit=limit, claimed_until=claimed_until)

    def mark_delivered(self, entries: Sequence[DispatchEntry], *, now: datetime) -> None:
        # Not worth a wait for the disk: a mark lost to a power cut (as one never
        # written after a crash between the publish and here) only lets a relay
        # deliver the entry again once its claim lapses, and the attempt's
        # fencing token makes that second delivery run nothing. Meanwhile this
        # commit holds the one write lock the worker's ``start`` needs.
        with self._tx(write=True, durable=False) as c:
            _ENGINE.mark_delivered(c, entries, now=now)

    def mark_failed(
        self,
        entry: DispatchEntry,
        *,
        error: str,
        retry_at: datetime,
        now: datetime | None = None,
    ) -> None:
        with self._tx(write=True) as c:
            _ENGINE.mark_failed(c, entry, error=error, retry_at=retry_at, now=now)

    def redeliver_stale(
        self, *, now: datetime, delivered_before: datetime, limit: int
    ) -> list[DispatchEntry]:
        with self._tx(write=True) as c:
            return _ENGINE.redeliver_stale(
                c, now=now, delivered_before=delivered_before, limit=limit
            )

    # -- lifecycle events (the EventLog capability) ---------------------------------
    def events(self, project_id: str, *, after: int = 0, limit: int = 100) -> list[Event]:
        with self._tx(write=False) as c:
            return _ENGINE.events(c, project_id, after=after, limit=limit)

    def claim_events(self, *, now: datetime, limit: int, claimed_until: datetime) -> list[Event]:
        """Claims are writes: SQLite's one writer at a time keeps the per-task order."""
        with self._tx(write=True) as c:
            return _ENGINE.claim_events(c, now=now, limit=limit, claimed_until=claimed_until)

    def settle_events(
        self, events: Sequence[Event], *, now: datetime, failures: Sequence[EventRetry] = ()
    ) -> None:
        with self._tx(write=True) as c:
            _ENGINE.settle_events(c, events, now=now, failures=failures)

    def claim_event_retries(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[EventRetry]:
        with self._tx(write=True) as c:
            return _ENGINE.claim_event_retries(c, now=now, limit=limit, claimed_until=claimed_until)

    def settle_event_retry(
        self,
        retry: EventRetry,
        *,
        now: datetime,
        error: str | None = None,
        retry_at: datetime | None = None,
    ) -> None:
        with self._tx(write=True) as c:
            _ENGINE.settle_event_retry(c, retry, now=now, error=error, retry_at=retry_at)

    def parked_events(self, *, subscriber: str | None = None, limit: int = 100) -> list[EventRetry]:
        with self._tx(write=False) as c:
            return _ENGINE.parked_events(c, subscriber=subscriber, limit=limit)

    def replay_parked(
        self,
        *,
        now: datetime,
        subscriber: str | None = None,
        event_ids: Sequence[str] | None = None,
    ) -> int:
        with self._tx(write=True) as c:
            return _ENGINE.replay_parked(c, now=now, subscriber=subscriber, event_ids=event_ids)

    # -- leases --------------------------------------------------------------------
    def expired_leases(self, *, now: datetime, limit: int) -> list[Task]:
        with self._tx(write=False) as c:
            return _ENGINE.expired_leases(c, now=now, limit=limit)

    # -- idempotency -----------------------------------------------------------------
    def get_idempotency(self, key: str, *, now: datetime | None = None) -> IdempotencyRecord | None:
        with self._tx(write=False) as c:
            record = _ENGINE.get_idempotency(c, key)
        if record is not None and now is not None and record.expired(now):
            return None
        return record

    def save_idempotency(self, record: IdempotencyRecord) -> IdempotencyRecord:
        with self._tx(write=True) as c:
            return _ENGINE.save_idempotency(c, record)

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
        return _ENGINE.pruned(counts)

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


class AsyncSQLiteStorage(AsyncFromSyncOneStepEventsOverview[SQLiteStorage]):
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

    async def retry_blocked_many(
        self,
        project_id: str,
        task_ids: Sequence[str],
        *,
        now: datetime,
        actor: str | None = None,
        reason: str | None = None,
        budget: RetryBudget = RetryBudget.ONE_MORE,
        claimed_until: datetime | None = None,
    ) -> list[Applied | None]:
        """:meth:`SQLiteStorage.retry_blocked_many`, run as one write."""
        return await self._call(
            self.sync.retry_blocked_many, project_id, task_ids, now=now, actor=actor,
            reason=reason, budget=budget, claimed_until=claimed_until,
        )  # fmt: skip

    def _write(self, sent: float, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """The write's wait for SQLite's lock ends ``timeout`` after it was sent."""
        with self.sync._due_by(sent + self.sync.timeout):
            return super()._write(sent, fn, *args, **kwargs)
