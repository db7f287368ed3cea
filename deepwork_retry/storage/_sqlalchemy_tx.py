"""How the SQLAlchemy storage begins, joins and ends transactions on a sync ``Connection``.

Everything here runs on a sync :class:`~sqlalchemy.engine.Connection`: the
sync storage calls it directly, the async one through
``AsyncConnection.run_sync``, so both share one copy.

- **Its own transaction** (the storage was given an engine, or the host has no
  transaction open): begun, the operation run, committed; rolled back on any
  error. On SQLite a write begins with ``BEGIN IMMEDIATE``, as
  :class:`~deepwork_retry.storage.sqlite.SQLiteStorage` does, so its checks
  and writes are atomic against every other writer of the file. On MySQL a
  write first locks the one row of ``writer_turn``: writes take turns as on
  SQLite, so checks, writes and the outbox order need no gap locks.
- **Joining the host's transaction**: the operation runs inside a SAVEPOINT
  (``Connection.begin_nested()``), released when it succeeds and rolled back
  when it fails, so a refused call leaves the host's transaction usable. The
  host's transaction is never committed or rolled back here.
- **After the host's commit** (:class:`AfterCommit`): the callbacks a joined
  storage was given run once the host's transaction has committed, never if
  it rolls back, and not if a savepoint of the host that held the storage's
  work is rolled back.
"""

from __future__ import annotations

import contextvars
import re
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, SessionTransaction

from deepwork_retry.exceptions import InvalidInput

T = TypeVar("T")

Kind = Literal["sqlite", "mysql", "postgresql"]

SUPPORTED = (
    "sqlite (pysqlite, aiosqlite), mysql/mariadb (pymysql, aiomysql, …) or postgresql+psycopg"
)


def kind_of(engine: Engine) -> Kind:
    """Which of the storage's databases ``engine`` talks to, or ``InvalidInput``."""
    name, driver = engine.dialect.name, engine.dialect.driver
    if name == "sqlite":
        return "sqlite"
    if name in ("mysql", "mariadb"):
        return "mysql"
    if name == "postgresql":
        if driver != "psycopg":
            raise InvalidInput(
                f"the SQLAlchemy storage runs PostgreSQL only through psycopg 3 "
                f"(postgresql+psycopg://…), not {name}+{driver}"
            )
        return "postgresql"
    raise InvalidInput(f"the SQLAlchemy storage does not support {name}+{driver}; use {SUPPORTED}")


# -- transactions ---------------------------------------------------------------------

AFTER_COMMIT: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "deepwork_after_commit", default=False
)
"""True while after-commit callbacks run: their calls take a short transaction of
their own (the host's transaction has ended, or is ending)."""

_WRITER_TURN = "SELECT id FROM writer_turn WHERE id = 1 FOR UPDATE"
_READ_COMMITTED = frozenset({"READ COMMITTED", "SERIALIZABLE"})


def _sqlite_in_transaction(conn: Connection) -> bool:
    """Whether the SQLite connection has a transaction open in the database itself
    (pysqlite and aiosqlite begin one lazily, after SQLAlchemy's own begin)."""
    return bool(getattr(conn.connection.driver_connection, "in_transaction", False))


def begin(conn: Connection, kind: Kind, *, write: bool) -> None:
    """Start the database's transaction on ``conn`` as the storage needs it."""
    if kind == "sqlite":
        if not conn.in_transaction():
            conn.begin()  # first: an engine that emits its own BEGIN does so here
        if not _sqlite_in_transaction(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
    elif kind == "mysql" and write:
        conn.exec_driver_sql(_WRITER_TURN)


def own(conn: Connection, kind: Kind, write: bool, fn: Callable[[Connection], T]) -> T:
    """``fn`` in a transaction of its own on ``conn``, committed, or rolled back on error."""
    try:
        begin(conn, kind, write=write)
        result = fn(conn)
        conn.commit()
    except BaseException:
        if conn.in_transaction():
            conn.rollback()
        raise
    return result


def joined(
    conn: Connection, kind: Kind, write: bool, fn: Callable[[Connection], T], checked: set[int]
) -> tuple[T, int]:
    """``fn`` inside a SAVEPOINT of the host's open transaction on ``conn``; the result
    and the savepoint's number (see :meth:`AfterCommit.add`). ``checked``: the DBAPI
    connections whose isolation level was found fit already.

    On PostgreSQL, once the driver's transaction is open, the savepoint is the
    joined PostgreSQL storage's own (sent with each statement, one round trip,
    and rolled back to when the call fails): the number is then the one of the
    host's last savepoint, so that a later one rolled back keeps the call's work
    and one open around it drops it, as for a savepoint of its own.
    """
    if kind == "postgresql":
        last = _last_savepoint(conn)
        if last is not None and _postgres_in_transaction(conn):
            return fn(conn), last
    if kind == "sqlite" and not _sqlite_in_transaction(conn):
        # A SAVEPOINT outside a transaction would start one, and releasing it
        # would commit the host's work: open the real transaction first.
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    elif kind == "mysql":
        if id(conn.connection.dbapi_connection) not in checked:
            check_isolation(conn)
            checked.add(id(conn.connection.dbapi_connection))
        if write:
            conn.exec_driver_sql(_WRITER_TURN)  # held until the host's transaction ends
    savepoint = conn.begin_nested()
    try:
        result = fn(conn)
        savepoint.commit()
    except BaseException as exc:
        if savepoint.is_active:
            try:
                savepoint.rollback()
            except Exception:  # noqa: BLE001
                # MySQL ends the whole transaction on a deadlock, its savepoints with
                # it: what ended it is the error to report.
                raise exc from None
        raise
    return result, savepoint_number(savepoint._savepoint)


def _last_savepoint(conn: Connection) -> int | None:
    """The number of the last savepoint SQLAlchemy opened on ``conn`` (0: none yet), or
    ``None`` where its counter is not found."""
    last = getattr(conn, "_Connection__savepoint_seq", None)
    return last if isinstance(last, int) else None


def _postgres_in_transaction(conn: Connection) -> bool:
    """Whether psycopg has begun the transaction SQLAlchemy began (it does so with the
    first statement: until then a block of the storage's own would commit)."""
    status = getattr(conn.connection.driver_connection, "info", None)
    return status is not None and status.transaction_status.name in ("INTRANS", "INERROR")


def check_isolation(conn: Connection) -> None:
    """Refuse to join a MySQL transaction whose plain reads see an old snapshot.

    Under REPEATABLE READ (MySQL's default) a read sees the database as of the
    transaction's first read, possibly before the writer turn was taken, so a
    guard or an idempotency key changed since would go unseen.
    """
    level = conn.get_isolation_level()
    if level not in _READ_COMMITTED:
        raise InvalidInput(
            f"the SQLAlchemy storage joins a MySQL transaction only at READ COMMITTED "
            f"(or SERIALIZABLE), not {level}: create the engine with "
            "isolation_level='READ COMMITTED', or use "
            "connection.execution_options(isolation_level='READ COMMITTED')"
        )


_NUMBER = re.compile(r"(\d+)$")


def savepoint_number(name: str | None) -> int:
    """The sequence number in SQLAlchemy's savepoint name ``sa_savepoint_N`` (0: none).

    A connection numbers its savepoints in the order it opens them, so one
    rolled back with a smaller number was open around every later one.
    """
    found = _NUMBER.search(name or "")
    return int(found[1]) if found else 0


@contextmanager
def after_commit_calls() -> Iterator[None]:
    """Calls made in the block take their own transactions (see :data:`AFTER_COMMIT`)."""
    token = AFTER_COMMIT.set(True)
    try:
        yield
    finally:
        AFTER_COMMIT.reset(token)


# -- after the host's commit ------------------------------------------------------------


class AfterCommit:
    """Callbacks to run once the host's transaction commits.

    ``run`` calls one callback (the sync storage calls it; the async one
    schedules its coroutine on the loop). Hooked on the host's ``Session``
    (``after_commit`` of the outermost transaction, ``after_transaction_end``)
    or, for a bare ``Connection``, on its ``commit`` and ``rollback`` events;
    on both, ``rollback_savepoint`` drops the callbacks of work that a rolled
    back savepoint held.

    A ``Connection`` announces its commit before making it: there the DBAPI
    connection is committed first, in the event, and the callbacks run only
    when that succeeded (SQLAlchemy's own commit then finds nothing to do).
    """

    def __init__(self, run: Callable[[Any], None]) -> None:
        self._run = run
        self._lock = threading.Lock()
        self._waiting: list[tuple[int, Any]] = []
        self._hooked: weakref.WeakSet[Any] = weakref.WeakSet()
        self._commits: weakref.WeakSet[Connection] = weakref.WeakSet()
        self._outer = False
        """The session committed into an outer transaction of its connection: the
        callbacks wait for that one."""

    def add(self, callback: Any, number: int) -> None:
        """Wait for the commit to run ``callback`` (registered after a call whose
        savepoint had ``number``)."""
        with self._lock:
            self._waiting.append((number, callback))

    # -- hooks --------------------------------------------------------------------
    def hook_session(self, session: Session) -> None:
        if session in self._hooked:
            return
        self._hooked.add(session)
        event.listen(session, "after_commit", self._session_committed)
        event.listen(session, "after_transaction_end", self._session_ended)

    def hook_connection(self, conn: Connection, *, commits: bool) -> None:
        """Watch ``conn``'s savepoints; with ``commits``, its commit and rollback too."""
        if conn not in self._hooked:
            self._hooked.add(conn)
            event.listen(conn, "rollback_savepoint", self._savepoint_rolled_back)
        if commits and conn not in self._commits:
            self._commits.add(conn)
            event.listen(conn, "commit", self._connection_commits)
            event.listen(conn, "rollback", self._rolled_back)

    # -- events ----------------------------------------------------------------------
    def _take(self) -> list[Any]:
        with self._lock:
            taken, self._waiting = self._waiting, []
            self._outer = False
        return [callback for _, callback in taken]

    def _fire(self) -> None:
        callbacks = self._take()
        if callbacks:
            with after_commit_calls():
                for callback in callbacks:
                    self._run(callback)

    def _session_committed(self, session: Session) -> None:
        if session.in_nested_transaction():
            return  # a savepoint's release commits nothing
        bind = session.get_bind()
        if isinstance(bind, Connection) and bind.in_transaction():
            # A session joined to an outer transaction of a Connection (the usual
            # test-suite recipe): its commit is a savepoint's; wait for the outer one.
            self.hook_connection(bind, commits=True)
            self._outer = True
            return
        self._fire()

    def _session_ended(self, session: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is None and not self._outer:
            self._take()  # ended without a commit (after one, nothing is left)

    def _connection_commits(self, conn: Connection) -> None:
        if not self._waiting:
            return
        conn.connection.dbapi_connection.commit()  # type: ignore[union-attr]
        self._fire()

    def _rolled_back(self, conn: Connection) -> None:
        self._take()

    def _savepoint_rolled_back(self, conn: Connection, name: str, context: object) -> None:
        rolled_back = savepoint_number(name)
        with self._lock:
            # Unknown names (0) drop everything: a delivery left to the relay
            # comes late, one made for work that was undone is wrong.
            self._waiting = [
                (number, callback)
                for number, callback in self._waiting
                if rolled_back and number < rolled_back
            ]
