"""SQLAlchemy storage benchmarks: the library's manual retry against the same work
written as bare statements on the same engine.

On each database (SQLite file in WAL, MariaDB, PostgreSQL through psycopg) one
engine, one database, two projects of the same blocked tasks, both created
through the library: the library retries the tasks of one, the floor those of
the other. Both sides take a connection from the engine's pool per retry
(``engine.connect()``), as the storage does.

- library: ``RetryService(SQLAlchemyStorage(engine)).retry``;
- floor: one transaction of ``Connection.exec_driver_sql`` statements: the
  guarded task ``UPDATE``, the counters ``UPDATE``, the outbox and attempt
  ``INSERT … SELECT`` (the new attempt number read from the task row in the
  statement itself), then commit. On SQLite the transaction begins with
  ``BEGIN IMMEDIATE``, as any writer there must to keep the guard atomic; on
  PostgreSQL the counters update names the task's progress stripe;
- report rows, what bounds the ratio: the floor's statements as SQLAlchemy
  Core constructs; the library's own statements alone (parameters computed
  beforehand, nothing decided or decoded; SQLite and MariaDB); the retry's
  read-back ``SELECT`` through ``exec_driver_sql`` against the DBAPI cursor of
  the same connection; on MariaDB the floor's statements with ``pymysql``
  directly (one connection, no SQLAlchemy): SQLAlchemy's own cost; on SQLite
  ``SQLiteStorage`` (the same engine code on ``sqlite3``) on a file of its own.

MariaDB: ``$DEEPWORK_BENCH_MYSQL`` (default ``mysql+pymysql://root@127.0.0.1:3306``),
database ``bench_sqla`` (dropped and created). PostgreSQL: ``$DEEPWORK_BENCH_DSN``
(see suite_pg), schema ``bench_sqla`` (dropped and created).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _fixtures import add_blocked, chunks, floor_events
from _harness import Figure, Row, alternate, per_op, per_op_rounds, unavailable

from deepwork_retry import RetryService

DEFAULT_MYSQL = "mysql+pymysql://root@127.0.0.1:3306"
DATABASE = "bench_sqla"
SCHEMA = "bench_sqla"
TARGET = "≤ 1.5x"

# -- the floor's statements, per database --------------------------------------------------
# Parameters: update (now, pid, tid); counters (pid[, pid, tid]); outbox (now, now, seq, pid,
# tid); attempt (now, now, pid, tid). SQLite's are qmark, the others format.
_UPDATE = (
    "UPDATE tasks SET status = 'assigned', retry_count = retry_count + 1, "
    "retries_left = retries_left + 1, error_message = NULL, error_type = NULL, "
    "blocked_reason = NULL, attempt = attempt + 1, updated_at = {now}, version = version + 1 "
    "WHERE project_id = {p} AND id = {p} AND version = 1 AND status = 'blocked'"
)
_COUNTERS = "UPDATE projects SET blocked = blocked - 1, assigned = assigned + 1 WHERE id = {p}"
_OUTBOX = (
    "INSERT INTO outbox (project_id, task_id, attempt, state, available_at, created_at, tries, "
    "pending_seq) SELECT project_id, id, attempt, 'pending', {p}, {p}, 0, {p} FROM tasks "
    "WHERE project_id = {p} AND id = {p}"
)
_ATTEMPT = (
    "INSERT INTO attempts (project_id, task_id, number, triggered_by, dispatched_at, "
    "available_at, budget) SELECT project_id, id, attempt, 'manual_retry', {p}, {p}, "
    "'one_more' FROM tasks WHERE project_id = {p} AND id = {p}"
)
_PG_COUNTERS = (
    "UPDATE progress SET blocked = blocked - 1, assigned = assigned + 1 WHERE project_id = %s "
    "AND stripe = (SELECT stripe FROM tasks WHERE project_id = %s AND id = %s)"
)
_PG_OUTBOX = (
    "INSERT INTO outbox (project_id, task_id, attempt, state, available_at, created_at, tries, "
    "seq, pending_seq) SELECT project_id, id, attempt, 'pending', now(), now(), 0, "
    "nextval('outbox_order'), currval('outbox_order') FROM tasks "
    "WHERE project_id = %s AND id = %s"
)
_PG_ATTEMPT = (
    "INSERT INTO attempts (project_id, task_id, number, trigger, dispatched_at, available_at, "
    "budget) SELECT project_id, id, attempt, 'manual_retry', now(), now(), 'one_more' "
    "FROM tasks WHERE project_id = %s AND id = %s"
)


class FloorSQL:
    """The four statements of the bare retry, in the database's parameter style."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        if kind == "postgresql":
            self.update = _UPDATE.format(now="now()", p="%s")
            self.counters, self.outbox, self.attempt = _PG_COUNTERS, _PG_OUTBOX, _PG_ATTEMPT
        else:
            p = "?" if kind == "sqlite" else "%s"
            self.update = _UPDATE.format(now=p, p=p)
            self.counters = _COUNTERS.format(p=p)
            self.outbox = _OUTBOX.format(p=p)
            self.attempt = _ATTEMPT.format(p=p)
        self.seq = 1_000_000_000

    def params(self, pid: str, tid: str) -> list[tuple[Any, ...]]:
        """The parameters of the four statements, in order."""
        if self.kind == "postgresql":
            return [(pid, tid), (pid, pid, tid), (pid, tid), (pid, tid)]
        now = int(time.time() * 1e6)
        self.seq += 1
        return [(now, pid, tid), (pid,), (now, now, self.seq, pid, tid), (now, now, pid, tid)]


class EngineFloor:
    """The bare retry as ``exec_driver_sql`` statements on a connection of the engine."""

    def __init__(self, engine: Any, kind: str) -> None:
        self.engine = engine
        self.sql = FloorSQL(kind)
        self.immediate = kind == "sqlite"

    def retry(self, pid: str, tid: str) -> None:
        s = self.sql
        update, counters, outbox, attempt = s.params(pid, tid)
        with self.engine.connect() as conn:
            conn.begin()
            if self.immediate:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            if conn.exec_driver_sql(s.update, update).rowcount != 1:
                raise RuntimeError(f"task {tid} not blocked")
            conn.exec_driver_sql(s.counters, counters)
            conn.exec_driver_sql(s.outbox, outbox)
            conn.exec_driver_sql(s.attempt, attempt)
            conn.commit()


class CoreFloor:
    """The same four statements built with SQLAlchemy Core (``update()``,
    ``insert().from_select()``), run with ``Connection.execute``: what a host writing Core
    pays (compiled once, then from SQLAlchemy's statement cache)."""

    def __init__(self, engine: Any, kind: str) -> None:
        from sqlalchemy import bindparam, column, func, insert, literal, select, table, update

        self.engine = engine
        self.kind = kind
        self.immediate = kind == "sqlite"
        self.seq = 3_000_000_000
        pg = kind == "postgresql"
        now: Any = func.now() if pg else bindparam("now")
        pid: Any = bindparam("pid")
        tid: Any = bindparam("tid")
        tasks = table("tasks", *(column(c) for c in (
            "project_id", "id", "status", "retry_count", "retries_left", "error_message",
            "error_type", "blocked_reason", "attempt", "updated_at", "version", "stripe",
        )))  # fmt: skip
        c = tasks.c
        this = (c.project_id == pid, c.id == tid)
        self.update = (
            update(tasks)
            .where(*this, c.version == 1, c.status == "blocked")
            .values(
                status="assigned",
                retry_count=c.retry_count + 1,
                retries_left=c.retries_left + 1,
                error_message=None,
                error_type=None,
                blocked_reason=None,
                attempt=c.attempt + 1,
                updated_at=now,
                version=c.version + 1,
            )
        )
        if pg:
            progress = table(
                "progress", *(column(n) for n in ("project_id", "stripe", "blocked", "assigned"))
            )
            p = progress.c
            stripe = select(c.stripe).where(*this).scalar_subquery()
            self.counters = (
                update(progress)
                .where(p.project_id == pid, p.stripe == stripe)
                .values(blocked=p.blocked - 1, assigned=p.assigned + 1)
            )
        else:
            projects = table("projects", *(column(n) for n in ("id", "blocked", "assigned")))
            p = projects.c
            self.counters = (
                update(projects)
                .where(p.id == pid)
                .values(blocked=p.blocked - 1, assigned=p.assigned + 1)
            )
        outbox_cols = ["project_id", "task_id", "attempt", "state", "available_at", "created_at",
                       "tries"]  # fmt: skip
        values = [c.project_id, c.id, c.attempt, literal("pending"), now, now, literal(0)]
        if pg:
            outbox_cols += ["seq", "pending_seq"]
            values += [func.nextval("outbox_order"), func.currval("outbox_order")]
        else:
            outbox_cols += ["pending_seq"]
            values += [bindparam("seq")]
        outbox = table("outbox", *(column(n) for n in outbox_cols))
        self.outbox = insert(outbox).from_select(outbox_cols, select(*values).where(*this))
        trigger = "trigger" if pg else "triggered_by"
        attempt_cols = ["project_id", "task_id", "number", trigger, "dispatched_at",
                        "available_at", "budget"]  # fmt: skip
        attempts = table("attempts", *(column(n) for n in attempt_cols))
        self.attempt = insert(attempts).from_select(
            attempt_cols,
            select(
                c.project_id, c.id, c.attempt, literal("manual_retry"), now, now,
                literal("one_more"),
            ).where(*this),
        )  # fmt: skip

    def retry(self, pid: str, tid: str) -> None:
        self.seq += 1
        params = {"pid": pid, "tid": tid, "now": int(time.time() * 1e6), "seq": self.seq}
        with self.engine.connect() as conn:
            conn.begin()
            if self.immediate:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            if conn.execute(self.update, params).rowcount != 1:
                raise RuntimeError(f"task {tid} not blocked")
            conn.execute(self.counters, params)
            conn.execute(self.outbox, params)
            conn.execute(self.attempt, params)
            conn.commit()


class LibraryStatements:
    """The library's own retry statements alone on the engine: parameters computed
    beforehand, no decision, no checks, no decoding (SQLite and MariaDB).

    The storage's transaction start (``BEGIN IMMEDIATE`` / the writer turn), its
    executor over ``exec_driver_sql`` and the texts rendered from the core's
    description of the move: the SQL share of the library's retry.
    """

    def __init__(self, engine: Any, storage: Any) -> None:
        from deepwork_retry._core import effects
        from deepwork_retry.storage._sql import common, statements

        self.engine = engine
        self.bound = storage._bound
        self.r = storage._retry
        self.insert_events = storage._bound.engine.sql.insert_events(2)
        read_back = common.read_back(effects.MANUAL_RETRY)
        self.attempt_at = 1 + len(statements.COUNTERS) + read_back.index("attempt")

    def retry(self, pid: str, tid: str) -> None:
        from deepwork_retry.storage import _sqlalchemy_tx as tx
        from deepwork_retry.storage._sqlalchemy_sql import Executor

        r, kind = self.r, self.bound.kind
        now = int(time.time() * 1e6)
        with self.engine.connect() as conn:
            tx.begin(conn, kind, write=True)
            ex = Executor(conn, self.bound.dialect)
            if not ex.execute(r.update["blocked"], (False, now, pid, tid)).rowcount:
                raise RuntimeError(f"task {tid} not blocked")
            ex.execute(r.shift_events["blocked"], (2, pid))
            row = ex.execute(r.read, (pid, tid)).fetchall()[0]
            attempt, last = row[self.attempt_at], row[r.count_at + 1]
            ex.execute(r.insert_pending, (pid, tid, attempt, now, None, (last or 0) + 1, None))
            ex.execute(r.insert_attempt, (pid, tid, attempt, now, None, None, "one_more"))
            seq = row[r.count_at + 2] - 2
            ex.execute(self.insert_events, floor_events(pid, tid, attempt, now, seq))
            conn.commit()


def read_back_sides(
    engine: Any, storage: Any, items: list[list[tuple[str, str]]]
) -> tuple[Callable[[int], list[float]], Callable[[int], list[float]]]:
    """The library's read-back statement (its one ``SELECT`` of the retry) on one held
    connection: through ``exec_driver_sql`` and through the DBAPI cursor of the same
    connection. Read only: the same rows serve every round."""
    from deepwork_retry.storage._sqlalchemy_sql import Executor, _text

    bound = storage._bound
    read = storage._retry.read
    mysql = bound.kind == "mysql"

    def through_sqlalchemy(r: int) -> list[float]:
        with engine.connect() as conn:
            ex = Executor(conn, bound.dialect)
            return per_op(lambda pid, tid: ex.execute(read, (pid, tid)).fetchall(), items[r])

    def through_driver(r: int) -> list[float]:
        with engine.connect() as conn:
            cur = conn.connection.driver_connection.cursor()

            def op(pid: str, tid: str) -> object:
                cur.execute(read, bound.dialect.bind(read, (pid, tid)) if mysql else (pid, tid))
                rows = cur.fetchall()
                return [_text(row) for row in rows] if mysql else rows

            return per_op(op, items[r])

    return through_sqlalchemy, through_driver


class PyMySQLFloor:
    """The same statements with ``pymysql`` directly, on one connection."""

    def __init__(self, url: Any) -> None:
        import pymysql

        self.conn = pymysql.connect(
            host=url.host or "127.0.0.1", port=url.port or 3306, user=url.username or "root",
            password=url.password or "", database=url.database, autocommit=False,
            init_command="SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
        )  # fmt: skip
        self.sql = FloorSQL("mysql")
        self.sql.seq = 2_000_000_000

    def retry(self, pid: str, tid: str) -> None:
        s = self.sql
        update, counters, outbox, attempt = s.params(pid, tid)
        try:
            with self.conn.cursor() as cur:
                if cur.execute(s.update, update) != 1:
                    raise RuntimeError(f"task {tid} not blocked")
                cur.execute(s.counters, counters)
                cur.execute(s.outbox, outbox)
                cur.execute(s.attempt, attempt)
            self.conn.commit()
        except BaseException:
            self.conn.rollback()
            raise

    def close(self) -> None:
        self.conn.close()


# -- the databases ---------------------------------------------------------------------------
def _sqlite_engine(scratch: Path) -> tuple[Any, dict[str, Any]]:
    from sqlalchemy import create_engine, event

    path = scratch / "sqla.db"
    path.unlink(missing_ok=True)
    engine = create_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute("PRAGMA journal_mode = WAL")
        dbapi_conn.execute("PRAGMA synchronous = NORMAL")
        dbapi_conn.execute("PRAGMA busy_timeout = 5000")

    return engine, {}


def mysql_url() -> Any:
    from sqlalchemy.engine import make_url

    return make_url(os.environ.get("DEEPWORK_BENCH_MYSQL", DEFAULT_MYSQL))


def _mysql_engine(_scratch: Path) -> tuple[Any, dict[str, Any]]:
    import pymysql
    from sqlalchemy import create_engine

    url = mysql_url()
    server = pymysql.connect(
        host=url.host or "127.0.0.1", port=url.port or 3306, user=url.username or "root",
        password=url.password or "", autocommit=True, connect_timeout=3,
    )  # fmt: skip
    with server, server.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{DATABASE}`")
        cur.execute(f"CREATE DATABASE `{DATABASE}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    url = url.set(database=DATABASE)
    return create_engine(url, isolation_level="READ COMMITTED"), {}


def _postgres_engine(_scratch: Path) -> tuple[Any, dict[str, Any]]:
    import psycopg
    from sqlalchemy import create_engine
    from suite_pg import dsn

    with psycopg.connect(dsn(), autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE')
    url = dsn().replace("postgresql://", "postgresql+psycopg://", 1)
    # The floor's statements name their tables unqualified: the schema is first on the path.
    engine = create_engine(url, connect_args={"options": f"-c search_path={SCHEMA}"})
    return engine, {"schema": SCHEMA}


def _drop(kind: str) -> None:
    if kind == "mysql":
        import pymysql

        url = mysql_url()
        server = pymysql.connect(
            host=url.host or "127.0.0.1", port=url.port or 3306, user=url.username or "root",
            password=url.password or "", autocommit=True,
        )  # fmt: skip
        with server, server.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{DATABASE}`")
    elif kind == "postgresql":
        import psycopg
        from suite_pg import dsn

        with psycopg.connect(dsn(), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE')


def _outbox_entries(engine: Any) -> dict[str, int]:
    """Outbox entries per project after the run: every side's retries were made."""
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT project_id, COUNT(*) FROM outbox GROUP BY project_id"
        ).fetchall()
    return {(p.decode() if isinstance(p, bytes) else p): int(n) for p, n in rows}


def statements_per_retry(engine: Any, storage: Any, pid: str, tid: str, kind: str) -> int:
    """Statements one library retry sends (see :data:`_UNCOUNTED`).

    SQLAlchemy's ``before_cursor_execute`` event on SQLite and MariaDB; on
    PostgreSQL the storage runs the PostgreSQL storage's code on the psycopg
    connection itself, so psycopg's cursor executes are counted there.
    """
    if kind == "postgresql":
        from suite_pg import round_trips

        return round_trips(storage, pid, tid)
    from sqlalchemy import event

    seen: list[str] = []

    def count(*args: Any) -> None:
        seen.append(args[2])

    event.listen(engine, "before_cursor_execute", count)
    try:
        RetryService(storage).retry(pid, tid)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    return len(seen)


_MAKERS: dict[str, Callable[[Path], tuple[Any, dict[str, Any]]]] = {
    "sqlite": _sqlite_engine,
    "mysql": _mysql_engine,
    "postgresql": _postgres_engine,
}
_TITLES = {"sqlite": "SQLite (file, WAL, NORMAL)", "mysql": "MariaDB", "postgresql": "PostgreSQL"}
_FLOOR_STATEMENTS = {"sqlite": 5, "mysql": 4, "postgresql": 4}
_UNCOUNTED = {"sqlite": "COMMIT", "mysql": "COMMIT", "postgresql": "psycopg's BEGIN and COMMIT"}


def _sqlite_storage_side(
    scratch: Path, total: int, rounds: int
) -> tuple[Any, Callable[[int], list[float]]]:
    """``SQLiteStorage`` (``sqlite3`` directly) on a file of its own, same pragmas."""
    from deepwork_retry.storage.sqlite import SQLiteStorage

    path = scratch / "sqla-twin.db"
    path.unlink(missing_ok=True)
    storage = SQLiteStorage(path, synchronous="NORMAL")
    items = [("lib", tid) for tid in add_blocked(storage, "lib", total)]
    return storage, per_op_rounds(RetryService(storage).retry, chunks(items, rounds))


def _one(kind: str, rounds: int, per_round: int, scratch: Path) -> list[Row]:
    from deepwork_retry.storage.sqlalchemy import SQLAlchemyStorage

    title = _TITLES[kind]
    name = f"manual retry on {title} vs bare statements"
    try:
        engine, options = _MAKERS[kind](scratch)
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - the database is missing: the row says so
        reason = " ".join(f"{title}: {type(exc).__name__}: {exc}".split())[:150]
        return [unavailable("sqlalchemy", name, reason, TARGET)]
    rows: list[Row] = []
    closing: list[Any] = []
    try:
        storage = SQLAlchemyStorage(engine, **options)
        closing.append(storage)
        total = rounds * per_round

        def project(pid: str, extra: int = 0) -> Callable[[Callable[[str, str], object]], Any]:
            items = [(pid, tid) for tid in add_blocked(storage, pid, total + extra)]
            return lambda op: per_op_rounds(op, chunks(items[:total], rounds))

        lib_run = project("lib", extra=1)
        probe = ("lib", f"t{total:07d}")
        lib = Figure(f"RetryService(SQLAlchemyStorage(engine)).retry, {title}", "us")
        ref = Figure(f"bare exec_driver_sql transaction, {title}", "us")
        core = Figure(f"the same statements as SQLAlchemy Core constructs, {title}", "us")
        sides: list[tuple[Figure, Callable[[int], Any]]] = [
            (lib, lib_run(RetryService(storage).retry)),
            (ref, project("floor")(EngineFloor(engine, kind).retry)),
            (core, project("core")(CoreFloor(engine, kind).retry)),
        ]
        raw = twin = alone = read_sa = read_raw = None
        if kind != "postgresql":
            alone = Figure(f"the library's statements alone, {title}", "us")
            sides.append((alone, project("sql")(LibraryStatements(engine, storage).retry)))
            read_sa = Figure(f"the retry's read-back through exec_driver_sql, {title}", "us")
            read_raw = Figure(f"the same read through the DBAPI cursor, {title}", "us")
            on_sa, on_driver = read_back_sides(
                engine, storage, chunks([("lib", f"t{i:07d}") for i in range(total)], rounds)
            )
            sides += [(read_sa, on_sa), (read_raw, on_driver)]
        if kind == "mysql":
            direct = PyMySQLFloor(engine.url)
            closing.append(direct)
            raw = Figure("the same statements with pymysql directly, MariaDB", "us")
            sides.append((raw, project("direct")(direct.retry)))
        if kind == "sqlite":
            sqlite_storage, run = _sqlite_storage_side(scratch, total, rounds)
            closing.append(sqlite_storage)
            twin = Figure("RetryService(SQLiteStorage(NORMAL)).retry, own file", "us")
            sides.append((twin, run))
        alternate(sides, rounds)
        lib.extra["outbox_entries_by_project"] = _outbox_entries(engine)
        statements = statements_per_retry(engine, storage, *probe, kind)
        lib.extra["statements_per_retry"] = statements
        ref.extra["statements_per_retry"] = _FLOOR_STATEMENTS[kind]
        rows.append(
            Row(
                "sqlalchemy",
                name,
                lib,
                ref,
                target=TARGET,
                bound=1.5,
                note=f"statements per retry: library {statements}, floor "
                f"{_FLOOR_STATEMENTS[kind]} ({_UNCOUNTED[kind]} not counted, on both sides)",
            )
        )
        rows.append(
            Row(
                "sqlalchemy",
                f"{title}: Core constructs vs exec_driver_sql, same statements",
                core,
                ref,
                target="report",
                note="what a host writing the floor in Core pays (statement cache warm)",
            )
        )
        if alone is not None:
            rows.append(
                Row(
                    "sqlalchemy",
                    f"{title}: the library's statements alone vs the floor",
                    alone,
                    ref,
                    target="report",
                    note=f"the library's {statements} statements, parameters computed "
                    "beforehand: its SQL share",
                )
            )
        if read_sa is not None:
            rows.append(
                Row(
                    "sqlalchemy",
                    f"{title}: the retry's read-back, exec_driver_sql vs DBAPI cursor",
                    read_sa,
                    read_raw,
                    target="report",
                    note="its one SELECT (22 columns) on one held connection, same rows",
                )
            )
        if raw is not None:
            rows.append(
                Row(
                    "sqlalchemy",
                    "MariaDB floor: SQLAlchemy exec_driver_sql vs pymysql directly",
                    ref,
                    raw,
                    target="report",
                    note="the same four statements and commit; a pool checkout per retry "
                    "against one held connection",
                )
            )
        if twin is not None:
            rows.append(
                Row(
                    "sqlalchemy",
                    "SQLAlchemyStorage vs SQLiteStorage, same engine code and schema",
                    lib,
                    twin,
                    target="report",
                    note="the SQL engine both share, through SQLAlchemy against sqlite3 "
                    "directly (a file of its own, same pragmas)",
                )
            )
    finally:
        for thing in reversed(closing):
            thing.close()
        engine.dispose()
        _drop(kind)
    return rows


def sqlalchemy(rounds: int, per_round: int, scratch: Path) -> list[Row]:
    """The three databases in turn; a missing one is a row saying so."""
    try:
        import sqlalchemy  # noqa: F401
    except ImportError as exc:
        return [unavailable("sqlalchemy", "SQLAlchemy storage", f"extra not installed: {exc}")]
    rows: list[Row] = []
    for kind in ("sqlite", "mysql", "postgresql"):
        rows.extend(_one(kind, rounds, per_round, scratch))
    return rows
