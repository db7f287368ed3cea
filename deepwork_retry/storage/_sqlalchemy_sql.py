"""The SQL engine on a SQLAlchemy connection: the executor, the dialect of each database
and the schema's migrations.

Sync code only: the sync storage calls it on its ``Connection``, the async one
through ``AsyncConnection.run_sync``.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, cast

import attrs
from sqlalchemy.engine import Connection, Engine

from deepwork_retry._core.plans import Applied
from deepwork_retry.exceptions import (
    InvalidInput,
    StorageCorrupt,
    StorageMissing,
    StorageUnavailable,
    VersionConflict,
)
from deepwork_retry.storage._sql import common
from deepwork_retry.storage._sql.dialect import Dialect, translate
from deepwork_retry.storage._sql.engine import Engine as SQLEngine
from deepwork_retry.storage._sql.engine import Result, split_script
from deepwork_retry.storage._sql.mysql import MySQLDialect
from deepwork_retry.storage._sqlalchemy_tx import Kind, begin, kind_of
from deepwork_retry.storage.sqlite import APPLICATION_ID, SQLITE

__all__ = ["TABLES", "Bound", "Refused", "bound_to", "check_schema", "migrate_schema"]

TABLES = frozenset(
    {"projects", "tasks", "task_deps", "attempts", "outbox", "idempotency", "writer_turn",
     "schema_migrations", "events", "event_retries"}
)  # fmt: skip
"""The storage's tables (in any of its databases): for a host's Alembic autogenerate
to leave alone."""


_SURROGATE = re.compile("[\ud800-\udfff]")


class Refused(Exception):
    """The one-step retry changed nothing it may keep: its transaction is rolled back."""


class Executor:
    """The engine's executor over ``Connection.exec_driver_sql`` (the driver's paramstyle)."""

    __slots__ = ("_conn", "_dialect", "_format")

    def __init__(self, conn: Connection, dialect: Dialect) -> None:
        self._conn = conn
        self._dialect = dialect
        self._format = dialect.paramstyle == "format"

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Result:
        if not parameters:
            # Without parameters the driver does not format the text: undo the doubling.
            result = self._conn.exec_driver_sql(sql.replace("%%", "%") if self._format else sql)
        else:
            if self._format:
                parameters = self._dialect.bind(sql, parameters)
            result = self._conn.exec_driver_sql(sql, tuple(parameters))
        return _TextRows(result) if self._format else result

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Any:
        bind = self._dialect.bind
        rows = [tuple(bind(sql, row)) for row in parameters]
        return self._conn.exec_driver_sql(sql, rows) if rows else None


class _TextRows:
    """A MySQL result whose ids (``VARBINARY``: their UTF-8 bytes) are read back as text."""

    __slots__ = ("_result",)

    def __init__(self, result: Result) -> None:
        self._result = result

    @property
    def rowcount(self) -> int:
        return self._result.rowcount

    def fetchone(self) -> Any:
        row = self._result.fetchone()
        return None if row is None else _text(row)

    def fetchall(self) -> list[Any]:
        return [_text(row) for row in self._result.fetchall()]


def _text(row: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(v.decode("utf-8") if v.__class__ is bytes else v for v in row)


_ENGINES: dict[Kind, SQLEngine] = {}
_ENGINES_LOCK = threading.Lock()


def _sql_engine(kind: Kind) -> SQLEngine:
    """The SQL engine of ``kind`` (its statements rendered once per process)."""
    with _ENGINES_LOCK:
        if kind not in _ENGINES:
            _ENGINES[kind] = SQLEngine(MySQLDialect() if kind == "mysql" else SQLITE)
        return _ENGINES[kind]


@attrs.define(eq=False)
class Bound:
    """The SQL engine for one SQLAlchemy engine's database."""

    kind: Kind
    engine: SQLEngine
    """The :class:`~deepwork_retry.storage._sql.engine.Engine` of the dialect, or on
    PostgreSQL a :class:`~deepwork_retry.storage._sqlalchemy_pg.PostgresOps` with the
    same entry points."""
    where: str
    """The database, for messages (its URL without the password)."""
    schema_ok: bool = False
    """The schema was found migrated (or migrated) once: later storages skip the check."""

    @property
    def dialect(self) -> Dialect:
        return self.engine.dialect if self.kind != "postgresql" else _POSTGRES

    def call(
        self,
        op: Callable[..., Any],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        conn: Connection,
    ) -> Any:
        """``op(executor, *args, **kwargs)`` on ``conn`` (in the transaction open there)."""
        if self.kind == "postgresql":
            from deepwork_retry.storage._sqlalchemy_pg import PostgresExecutor

            return op(PostgresExecutor(conn, cast(Any, self.engine)), *args, **kwargs)
        return op(Executor(conn, self.dialect), *args, **kwargs)

    def one_step(self, ex: Executor, *args: Any, **kwargs: Any) -> Applied:
        """The engine's one-step retry; :class:`Refused` (rolling back) instead of ``None``."""
        applied = self.engine.retry_blocked(ex, *args, **kwargs)
        if applied is None:
            raise Refused
        return applied

    @staticmethod
    def after_bound(after: str) -> tuple[str, str]:
        """``id > after`` as the database can compare it: no stored id holds a lone
        surrogate (see :func:`common.after_bound`)."""
        return common.after_bound(after, _SURROGATE) if isinstance(after, str) else (">", after)

    @staticmethod
    def rowcount(ex: Executor, statement: str, params: Sequence[Any]) -> int:
        return ex.execute(statement, params).rowcount

    def translated(
        self, exc: BaseException, conflict: Callable[[], VersionConflict] | None = None
    ) -> Exception:
        """The library error for ``exc``; ``conflict`` builds the one for a transaction the
        database aborted to resolve a deadlock (see :func:`.dialect.translate`)."""
        if self.kind == "postgresql":
            from deepwork_retry.storage._sqlalchemy_pg import translate_postgres

            return translate_postgres(exc, self.where, conflict)
        return translate(self.dialect, exc, where=self.where, conflict=conflict)


_BOUND: weakref.WeakKeyDictionary[Engine, dict[str | None, Bound]] = weakref.WeakKeyDictionary()


def bound_to(engine: Engine, schema: str | None = None) -> Bound:
    """The :class:`Bound` of ``engine`` (and on PostgreSQL ``schema``): one each;
    ``InvalidInput`` for a database the storage does not support."""
    with _ENGINES_LOCK:
        found = _BOUND.get(engine, {}).get(schema)
    if found is None:
        kind = kind_of(engine)
        ops: Any
        if kind == "postgresql":
            from deepwork_retry.storage._postgres_sql import DEFAULT_SCHEMA
            from deepwork_retry.storage._sqlalchemy_pg import PostgresOps

            ops = PostgresOps(schema or DEFAULT_SCHEMA)  # the engine's entry points
        elif schema is not None:
            raise InvalidInput("schema= is for PostgreSQL; SQLite and MySQL use the database given")
        else:
            ops = _sql_engine(kind)
        where = engine.url.render_as_string(hide_password=True)
        found = Bound(kind=kind, engine=cast(SQLEngine, ops), where=repr(where))
        with _ENGINES_LOCK:
            found = _BOUND.setdefault(engine, {}).setdefault(schema, found)
    return found


# -- migrations -------------------------------------------------------------------------


def migrate_schema(conn: Connection, bound: Bound, *, own: bool = True) -> list[int]:
    """Apply the pending migrations; the numbers applied. With ``own=False`` they run
    in the transaction open on ``conn`` (an Alembic revision's), which the caller
    commits (MySQL commits DDL by itself whatever the caller does)."""
    applied = _SCHEMA[bound.kind](conn, bound, True, own)
    bound.schema_ok = own  # else only once the caller commits, which is not seen here
    return applied


def check_schema(conn: Connection, bound: Bound) -> None:
    """``StorageMissing`` unless every migration is applied (nothing is created)."""
    if not bound.schema_ok:
        _SCHEMA[bound.kind](conn, bound, False, True)
        bound.schema_ok = True


def _missing(bound: Bound, pending: Sequence[common.Migration], none: bool) -> StorageMissing:
    lacks = "has no deepwork_retry schema" if none else (
        f"lacks schema migrations {', '.join(m.file for m in pending)}"
    )  # fmt: skip
    return StorageMissing(
        f"{bound.dialect.title} database {bound.where} {lacks}; run the storage with "
        "migrate=True, or deepwork_retry.storage.sqlalchemy.migrate()"
    )


def _sqlite(conn: Connection, bound: Bound, apply: bool, own: bool) -> list[int]:
    """SQLite's migrations exactly as :class:`~deepwork_retry.storage.sqlite.SQLiteStorage`
    applies them (``PRAGMA user_version``, ``application_id``), so one file serves
    both; the host's own tables may share the file."""
    shipped = common.migrations("sqlite")
    latest = shipped[-1].number if shipped else 0
    try:
        begin(conn, "sqlite", write=apply)
        app_id = conn.exec_driver_sql("PRAGMA application_id").scalar()
        version = int(conn.exec_driver_sql("PRAGMA user_version").scalar() or 0)
        if app_id not in (0, APPLICATION_ID):
            raise StorageCorrupt(
                f"SQLite database {bound.where} belongs to another application "
                f"(application_id {app_id}); deepwork_retry will not use or change it"
            )
        if version > latest:
            raise StorageCorrupt(
                f"SQLite database {bound.where} has schema version {version}, newer than "
                f"this deepwork_retry knows ({latest}); upgrade deepwork_retry"
            )
        pending = common.pending(shipped, range(version + 1))
        if pending and not apply:
            raise _missing(bound, pending, version == 0)
        for migration in pending:
            for statement in split_script(migration.text):
                conn.exec_driver_sql(statement)
            conn.exec_driver_sql(f"PRAGMA user_version = {int(migration.number)}")
        if pending:
            conn.exec_driver_sql(f"PRAGMA application_id = {APPLICATION_ID}")
        if own:
            conn.commit()
    except BaseException:
        if own and conn.in_transaction():
            conn.rollback()
        raise
    return [m.number for m in pending]


_MYSQL_LOCK = "deepwork_retry_migrate"


def _mysql(conn: Connection, bound: Bound, apply: bool, own: bool) -> list[int]:
    """MySQL's migrations by the engine's shared runner (recorded in
    ``schema_migrations``), under a named lock, so several processes may migrate at
    once. MySQL commits each DDL statement by itself: a failed run resumes at the
    migration that failed."""
    ex = Executor(conn, bound.dialect)
    if not apply:
        recorded = _recorded(conn, bound)
        pending = bound.engine.pending_migrations(ex) if recorded else list(_shipped(bound))
        if own:
            conn.rollback()
        if pending:
            raise _missing(bound, pending, not recorded)
        return []
    if not conn.exec_driver_sql("SELECT GET_LOCK(%s, 60)", (_MYSQL_LOCK,)).scalar():
        raise StorageUnavailable(
            f"MySQL database {bound.where}: another process is migrating it (waited 60s)"
        )
    try:
        _recorded(conn, bound)
        applied = bound.engine.migrate(ex, now=datetime.now(timezone.utc))
        if own:
            conn.commit()
    finally:
        if own:
            conn.rollback()
        conn.exec_driver_sql("SELECT RELEASE_LOCK(%s)", (_MYSQL_LOCK,))
        if own:
            conn.commit()
    return applied


def _recorded(conn: Connection, bound: Bound) -> bool:
    """Whether migrations are recorded; ``StorageCorrupt`` when one is newer than this
    release knows."""
    if not conn.exec_driver_sql(
        "SELECT COUNT(*) FROM information_schema.tables "
        "WHERE table_schema = DATABASE() AND table_name = 'schema_migrations'"
    ).scalar():
        return False
    latest = max((m.number for m in _shipped(bound)), default=0)
    newest = conn.exec_driver_sql("SELECT MAX(number) FROM schema_migrations").scalar()
    if newest is not None and newest > latest:
        raise StorageCorrupt(
            f"MySQL database {bound.where} has schema migration {newest}, newer than this "
            f"deepwork_retry knows ({latest}); upgrade deepwork_retry"
        )
    return True


def _shipped(bound: Bound) -> tuple[common.Migration, ...]:
    return common.migrations(bound.dialect.name)


def _postgres(conn: Connection, bound: Bound, apply: bool, own: bool) -> list[int]:
    from deepwork_retry.storage._sqlalchemy_pg import migrate_postgres

    if not own:
        conn.exec_driver_sql("SELECT 1")  # the caller's transaction, open on the server
    return migrate_postgres(conn, cast(Any, bound.engine), apply)


class _PostgresDialect(Dialect):
    name = "postgres"
    title = "PostgreSQL"


_POSTGRES = _PostgresDialect()
"""For messages only: on PostgreSQL the PostgreSQL storage runs its own statements."""

_SCHEMA: dict[str, Callable[[Connection, Bound, bool, bool], list[int]]] = {
    "postgresql": _postgres,
    "sqlite": _sqlite,
    "mysql": _mysql,
}
