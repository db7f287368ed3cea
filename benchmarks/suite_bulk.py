"""Bulk retry of all the blocked tasks of one project against one set-based transaction.

One project holds N blocked tasks (100,000; 10,000 with ``quick``), on SQLite
(a file, WAL, ``synchronous=FULL``: the demo's settings) and on PostgreSQL
(a schema of its own). Every store is a twin of the others: the library's
migrations, then the tasks copied from one template row that the library
wrote, with one ``INSERT … SELECT`` (and the counters moved to match).

- library, service: ``RetryService.bulk_retry(pid, limit=1000, after=...)``
  page after page until ``next_after`` is ``None``;
- library, HTTP: ``POST /api/deep-work/projects/{pid}/retry-blocked`` with
  ``{"limit": 1000, "after": ...}`` (the route's largest page) to the Starlette
  adapter on uvicorn (``bulk_server.py``), page after page, one keep-alive
  connection;
- floor: one transaction of bare SQL that writes what the library writes for
  the same tasks: the tasks' update (status, retry count, attempt, error
  cleared, version), the progress counters (per stripe on PostgreSQL), one
  outbox entry and one attempt record per task, the two lifecycle events per
  task (``task.retried`` with its JSON data, ``project.progress``) numbered
  from the project's event counter, and the counter moved. Set-based: a
  handful of statements whatever N is.

While each library run goes on, a second thread retries single tasks of
ANOTHER project (one every ``PACE`` seconds; through the same server for the
HTTP path) and a third polls the bulk project's progress; the singles' p99 is
reported beside the same singles with no bulk running, and the poller counts
the distinct progress values it saw. Memory: the peak resident size reached
during the run above the size before it (``VmHWM`` after resetting it through
``/proc/PID/clear_refs``) of the process that runs the bulk (the benchmark
for the service path, the server for the HTTP path), at N and at N/10.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import sqlite3
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from _fixtures import add_blocked, floor_events
from _harness import Figure, Row, unavailable
from suite_http import Server, free_port
from suite_local import LibraryStatements
from suite_pg import drop_schema, dsn, reachable

from deepwork_retry import RetryService

HERE = Path(__file__).resolve().parent
TOKEN = "bench-bulk-token-0123456789abcdef"
PREFIX = "/api/deep-work"
PAGE = 1000
"""The largest page the bulk route takes (``limit`` up to ``MAX_LIMIT``)."""
PACE = 0.01
"""Seconds between two single retries of the other project."""
SINGLES = 200
"""Single retries of the reference run (no bulk)."""
POLL = 0.02
"""Seconds between two progress reads."""
BULK = "bulk"
OTHER = "other"
ACTOR = "bench"


# -- memory of a process ---------------------------------------------------------------------
def _status(pid: int | str, field: str) -> int:
    """``field`` of ``/proc/PID/status`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Peak:
    """The peak resident size of process ``pid`` during a block, above its size before it."""

    def __init__(self, pid: int | str = "self") -> None:
        self.pid = pid
        self.before_kib = 0
        self.peak_kib = 0
        self.resettable = True

    def __enter__(self) -> Peak:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            self.resettable = False
        self.before_kib = _status(self.pid, "VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_kib = _status(self.pid, "VmHWM")

    @property
    def growth_kib(self) -> int:
        return self.peak_kib - self.before_kib


# -- twins -----------------------------------------------------------------------------------
def _copy_sqlite(path: Path, pid: str, count: int) -> None:
    """Make ``count`` blocked tasks of ``pid`` from its one task ``t0000000``."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        cols = [r[1] for r in conn.execute("PRAGMA table_info(tasks)")]
        picked = ", ".join("printf('t%07d', x)" if c == "id" else c for c in cols)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x + 1 < ?) "
            f"INSERT INTO tasks ({', '.join(cols)}) SELECT {picked} FROM c, tasks "
            "WHERE project_id = ? AND id = 't0000000'",
            (count, pid),
        )
        conn.execute(
            "UPDATE projects SET total = total + ?, blocked = blocked + ? WHERE id = ?",
            (count - 1, count - 1, pid),
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def _copy_postgres(schema: str, pid: str, count: int) -> None:
    import psycopg

    from deepwork_retry.storage._postgres_sql import STRIPES

    s = f'"{schema}"'
    with psycopg.connect(dsn()) as conn:
        conn.execute("SET LOCAL synchronous_commit = off")
        cols = [
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = 'tasks' ORDER BY ordinal_position",
                (schema,),
            )
        ]
        made = {"id": "'t' || lpad(x::text, 7, '0')", "stripe": f"x %% {STRIPES}"}
        picked = ", ".join(made.get(c, c) for c in cols)
        conn.execute(
            f"INSERT INTO {s}.tasks ({', '.join(cols)}) SELECT {picked} "
            f"FROM generate_series(1, %s - 1) AS x, {s}.tasks "
            "WHERE project_id = %s AND id = 't0000000'",
            (count, pid),
        )
        # The template's own stripe keeps its count; the copies' stripes take theirs.
        conn.execute(
            f"UPDATE {s}.progress p SET total = p.total + c.k, blocked = p.blocked + c.k "
            f"FROM (SELECT stripe, count(*) AS k FROM {s}.tasks "
            "WHERE project_id = %s AND id <> 't0000000' GROUP BY stripe) c "
            "WHERE p.project_id = %s AND p.stripe = c.stripe",
            (pid, pid),
        )
        conn.commit()
        conn.autocommit = True
        conn.execute(f"ANALYZE {s}.tasks")


def _fill(storage: Any, copy: Callable[[str, int], None], count: int, singles: int) -> None:
    """The bulk project with ``count`` blocked tasks, the other with ``singles``."""
    add_blocked(storage, BULK, 1)
    copy(BULK, count)
    add_blocked(storage, OTHER, singles)


# -- the floor -------------------------------------------------------------------------------
def _iso(now: datetime) -> str:
    return now.isoformat()


def sqlite_floor(path: Path, pid: str) -> int:
    """The set-based retry of every blocked task of ``pid`` in one transaction; the count."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        now_dt = datetime.now(timezone.utc)
        now = int(now_dt.timestamp() * 1e6)
        conn.execute("BEGIN IMMEDIATE")
        seq0, ps0 = conn.execute(
            "SELECT event_seq, (SELECT coalesce(max(pending_seq), 0) FROM outbox) "
            "FROM projects WHERE id = ?",
            (pid,),
        ).fetchone()
        blocked = (
            "SELECT project_id, id, attempt + 1 AS att, retry_count + 1 AS rc, "
            "row_number() OVER (ORDER BY id) AS rn FROM tasks "
            "WHERE project_id = :pid AND status = 'blocked'"
        )
        args = {"pid": pid, "now": now, "seq0": seq0, "ps0": ps0, "actor": ACTOR}
        conn.execute(
            f"WITH b AS ({blocked}) INSERT INTO outbox (project_id, task_id, attempt, state, "
            "available_at, created_at, tries, pending_seq) "
            "SELECT project_id, id, att, 'pending', :now, :now, 0, :ps0 + rn FROM b",
            args,
        )
        conn.execute(
            f"WITH b AS ({blocked}) INSERT INTO attempts (project_id, task_id, number, "
            "triggered_by, dispatched_at, available_at, actor, reason, budget) "
            "SELECT project_id, id, att, 'manual_retry', :now, :now, :actor, NULL, 'one_more' "
            "FROM b",
            args,
        )
        conn.execute(
            f"WITH b AS ({blocked}) INSERT INTO events (project_id, seq, type, task_id, "
            "attempt, at, data) "
            "SELECT project_id, :seq0 + 2 * rn - 1, 'task.retried', id, att, :now, "
            "json_object('actor', :actor, 'available_at', :iso, 'budget', 'one_more', "
            "'reason', NULL, 'retry_count', rc, 'trigger', 'manual_retry') FROM b "
            "UNION ALL SELECT project_id, :seq0 + 2 * rn, 'project.progress', id, att, :now, "
            """'{"from":"blocked","to":"assigned"}' FROM b""",
            {**args, "iso": _iso(now_dt)},
        )
        n = conn.execute(
            "UPDATE tasks SET status = 'assigned', retry_count = retry_count + 1, "
            "error_message = NULL, error_type = NULL, blocked_reason = NULL, "
            "attempt = attempt + 1, updated_at = :now, version = version + 1 "
            "WHERE project_id = :pid AND status = 'blocked'",
            args,
        ).rowcount
        conn.execute(
            "UPDATE projects SET blocked = blocked - :n, assigned = assigned + :n, "
            "event_seq = event_seq + 2 * :n WHERE id = :pid",
            {"n": n, "pid": pid},
        )
        conn.execute("COMMIT")
        return n
    finally:
        conn.close()


def postgres_floor(schema: str, pid: str) -> int:
    import psycopg

    s = f'"{schema}"'
    now = datetime.now(timezone.utc)
    with psycopg.connect(dsn()) as conn:
        (seq0,) = conn.execute(
            f"SELECT event_seq FROM {s}.projects WHERE id = %s FOR UPDATE", (pid,)
        ).fetchone()  # type: ignore[misc]
        (n,) = conn.execute(
            f"WITH u AS (UPDATE {s}.tasks SET status = 'assigned', "
            "retry_count = retry_count + 1, error_message = NULL, error_type = NULL, "
            "blocked_reason = NULL, attempt = attempt + 1, updated_at = %(now)s, "
            "version = version + 1 WHERE project_id = %(pid)s AND status = 'blocked' "
            "RETURNING project_id, id, attempt, retry_count, stripe), "
            "n AS (SELECT u.*, row_number() OVER (ORDER BY id) AS rn FROM u), "
            f"o AS (INSERT INTO {s}.outbox (project_id, task_id, attempt, state, available_at, "
            "created_at, tries, seq, pending_seq) "
            "SELECT project_id, id, attempt, 'pending', %(now)s, %(now)s, 0, x, x FROM "
            f"(SELECT project_id, id, attempt, nextval('{s}.outbox_order') AS x "
            "FROM (SELECT * FROM n ORDER BY id) w) z), "
            f"a AS (INSERT INTO {s}.attempts (project_id, task_id, number, trigger, "
            "dispatched_at, available_at, actor, reason, budget) "
            "SELECT project_id, id, attempt, 'manual_retry', %(now)s, %(now)s, %(actor)s, "
            "NULL, 'one_more' FROM n), "
            f"e AS (INSERT INTO {s}.events (project_id, seq, type, task_id, attempt, at, data) "
            "SELECT project_id, %(seq0)s + 2 * rn - 1, 'task.retried', id, attempt, %(now)s, "
            "jsonb_build_object('actor', %(actor)s::text, 'available_at', %(iso)s::text, "
            "'budget', 'one_more', 'reason', NULL, 'retry_count', retry_count, "
            "'trigger', 'manual_retry') FROM n "
            "UNION ALL SELECT project_id, %(seq0)s + 2 * rn, 'project.progress', id, attempt, "
            """%(now)s, '{"from": "blocked", "to": "assigned"}'::jsonb FROM n), """
            f"g AS (UPDATE {s}.progress p SET blocked = p.blocked - c.k, "
            "assigned = p.assigned + c.k "
            "FROM (SELECT stripe, count(*) AS k FROM n GROUP BY stripe) c "
            "WHERE p.project_id = %(pid)s AND p.stripe = c.stripe), "
            f"pr AS (UPDATE {s}.projects SET event_seq = event_seq + 2 * (SELECT count(*) FROM n) "
            "WHERE id = %(pid)s) "
            "SELECT count(*) FROM n",
            {"now": now, "pid": pid, "actor": ACTOR, "seq0": seq0, "iso": _iso(now)},
        ).fetchone()  # type: ignore[misc]
        conn.commit()
    return int(n)


# -- what runs beside the bulk ---------------------------------------------------------------
class Beside:
    """Single retries of the other project and progress reads of the bulk project, on
    threads, while a bulk runs (or, for the reference, ``SINGLES`` singles alone)."""

    def __init__(
        self,
        single: Callable[[str], object],
        progress: Callable[[], tuple[int, ...]],
        ids: list[str],
    ) -> None:
        self.single = single
        self.progress = progress
        self.ids = ids
        self.next = 0
        self.latencies: list[float] = []
        self.seen: set[tuple[int, ...]] = set()
        self.reads = 0
        self.errors: list[str] = []

    def _singles(self, stop: threading.Event, limit: int | None) -> None:
        clock = time.perf_counter_ns
        done = 0
        while not stop.is_set() and self.next < len(self.ids):
            if limit is not None and done >= limit:
                return
            tid = self.ids[self.next]
            self.next += 1
            t0 = clock()
            try:
                self.single(tid)
            except Exception as exc:  # noqa: BLE001 - counted, reported in the JSON
                self.errors.append(f"{type(exc).__name__}: {exc}"[:200])
            self.latencies.append((clock() - t0) / 1000)
            done += 1
            stop.wait(PACE)

    def _poll(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.seen.add(self.progress())
                self.reads += 1
            except Exception as exc:  # noqa: BLE001
                self.errors.append(f"progress: {type(exc).__name__}: {exc}"[:200])
            stop.wait(POLL)

    def reference(self) -> list[float]:
        """``SINGLES`` single retries, paced, with nothing else running."""
        start = len(self.latencies)
        self._singles(threading.Event(), SINGLES)
        return self.latencies[start:]

    @contextlib.contextmanager
    def during(self) -> Iterator[list[float]]:
        start = len(self.latencies)
        stop = threading.Event()
        workers = [
            threading.Thread(target=self._singles, args=(stop, None)),
            threading.Thread(target=self._poll, args=(stop,)),
        ]
        for t in workers:
            t.start()
        out: list[float] = []
        try:
            yield out
        finally:
            stop.set()
            for t in workers:
                t.join()
            out.extend(self.latencies[start:])


# -- the two library paths -------------------------------------------------------------------
def service_bulk(service: RetryService, cap: float) -> tuple[int, int]:
    """Every page of the bulk project, or those started within ``cap`` seconds;
    (tasks retried, pages)."""
    after: str | None = None
    retried = pages = 0
    deadline = time.monotonic() + cap
    while time.monotonic() < deadline:
        result = service.bulk_retry(BULK, actor=ACTOR, after=after, limit=PAGE)
        pages += 1
        retried += sum(item.retried for item in result.items)
        after = result.next_after
        if after is None:
            break
    return retried, pages


class Client:
    """One keep-alive HTTP connection to the API."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        self.conn.request(method, PREFIX + path, body=data, headers=self.headers)
        response = self.conn.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: {response.status} {payload[:200]!r}")
        return json.loads(payload)

    def close(self) -> None:
        self.conn.close()


def http_bulk(client: Client, cap: float) -> tuple[int, int]:
    after: str | None = None
    retried = pages = 0
    deadline = time.monotonic() + cap
    while time.monotonic() < deadline:
        body: dict[str, Any] = {"limit": PAGE}
        if after is not None:
            body["after"] = after
        answer = client.call("POST", f"/projects/{BULK}/retry-blocked", body)
        pages += 1
        retried += answer["retried"]
        after = answer["next_after"]
        if after is None:
            break
    return retried, pages


# -- what one transaction per page would cost -------------------------------------------------
class PagedStatements(LibraryStatements):
    """The SQLite storage's own retry statements for each task (as ``suite_local`` runs them
    one transaction per task), here one transaction per page of blocked tasks."""

    def page(self, pid: str, after: str) -> int:
        r = self.statements
        cur = self.conn.cursor()
        now = int(time.time() * 1e6)
        cur.execute("BEGIN IMMEDIATE")
        try:
            ids = [
                row[0]
                for row in cur.execute(
                    "SELECT id FROM tasks WHERE project_id = ? AND status = 'blocked' "
                    "AND id > ? ORDER BY id LIMIT ?",
                    (pid, after, PAGE),
                ).fetchall()
            ]
            for tid in ids:
                if not cur.execute(r.update["blocked"], (False, now, pid, tid)).rowcount:
                    raise RuntimeError(f"task {tid} not blocked")
                cur.execute(r.shift_events["blocked"], (2, pid))
                row = cur.execute(r.read, (pid, tid)).fetchall()[0]
                attempt, last = row[self.attempt_at], row[r.count_at + 1]
                cur.execute(r.insert_pending, (pid, tid, attempt, now, None, (last or 0) + 1, None))
                cur.execute(r.insert_attempt, (pid, tid, attempt, now, ACTOR, None, "one_more"))
                seq = row[r.count_at + 2] - 2
                cur.execute(self.insert_events, floor_events(pid, tid, attempt, now, seq))
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        return len(ids)


def sqlite_paged(path: Path, cap: float) -> tuple[int, int]:
    bare = PagedStatements(path, "FULL")
    try:
        after, retried, pages = "", 0, 0
        deadline = time.monotonic() + cap
        while time.monotonic() < deadline:
            n = bare.page(BULK, after)
            pages += 1
            retried += n
            if n < PAGE:
                break
            after = f"t{retried - 1:07d}"
        return retried, pages
    finally:
        bare.close()


def postgres_paged(schema: str, cap: float) -> tuple[int, int]:
    """The PostgreSQL storage's own one-step retry statement (text and values as it
    renders them) for each task of a page, the page's statements pipelined in one
    transaction, page after page."""
    import psycopg

    from deepwork_retry._core.states import RetryBudget
    from deepwork_retry.storage import _postgres_sql as q

    queries = q.Queries(schema)
    query = queries.retry_blocked(keyed=False, claimed=False)
    s = f'"{schema}"'
    with psycopg.connect(dsn()) as conn:
        raw = psycopg.RawCursor(conn)
        after, retried, pages = "", 0, 0
        deadline = time.monotonic() + cap
        while time.monotonic() < deadline:
            ids = [
                row[0]
                for row in conn.execute(
                    f"SELECT id FROM {s}.tasks WHERE project_id = %s AND status = 'blocked' "
                    "AND id > %s ORDER BY id LIMIT %s",
                    (BULK, after, PAGE),
                )
            ]
            now = datetime.now(timezone.utc)
            with conn.pipeline():
                for tid in ids:
                    params = q.retry_params(
                        BULK, tid, now=now, actor=ACTOR, reason=None,
                        budget=RetryBudget.ONE_MORE, claimed_until=None, idempotency_key=None,
                    )  # fmt: skip
                    params.update(
                        queries.retry_events(
                            BULK, tid, now=now, actor=ACTOR, reason=None,
                            budget=RetryBudget.ONE_MORE,
                        )
                    )  # fmt: skip
                    raw.execute(query.text, query.values(params), prepare=True)
            conn.commit()
            pages += 1
            if len(ids) < PAGE:
                break
            after = ids[-1]
        (retried,) = conn.execute(
            f"SELECT count(*) FROM {s}.tasks WHERE project_id = %s AND status = 'assigned'",
            (BULK,),
        ).fetchone()  # type: ignore[misc]
        return int(retried), pages


# -- one database ----------------------------------------------------------------------------
class Store:
    """How to make, open and serve twins on one database."""

    name = ""

    def make(self, side: str, count: int, singles: int) -> Any:
        """A twin named ``side``: its handle for the other methods."""
        raise NotImplementedError

    def storage(self, where: Any) -> Any:
        raise NotImplementedError

    def floor(self, where: Any) -> int:
        raise NotImplementedError

    def server(self, where: Any, logs: Path) -> Server:
        raise NotImplementedError

    def drop(self, where: Any) -> None:
        raise NotImplementedError

    def paged(self, where: Any, cap: float) -> tuple[int, int]:
        """Every blocked task of the bulk project, one transaction per page; (retried, pages)."""
        raise NotImplementedError

    paged_label = ""


class SQLiteStore(Store):
    name = "sqlite"

    def __init__(self, scratch: Path) -> None:
        self.dir = scratch / "bulk"
        self.dir.mkdir(parents=True, exist_ok=True)

    def make(self, side: str, count: int, singles: int) -> Path:
        path = self.dir / f"{side}.db"
        for p in self.dir.glob(f"{side}.db*"):
            p.unlink()
        storage = self.storage(path)
        try:
            _fill(storage, lambda pid, n: _copy_sqlite(path, pid, n), count, singles)
        finally:
            storage.close()
        return path

    def storage(self, where: Path) -> Any:
        from deepwork_retry.storage.sqlite import SQLiteStorage

        return SQLiteStorage(where)  # WAL, synchronous=FULL: the demo's settings

    def floor(self, where: Path) -> int:
        return sqlite_floor(where, BULK)

    def server(self, where: Path, logs: Path) -> Server:
        port = free_port()
        argv = [sys.executable, str(HERE / "bulk_server.py"), "sqlite", str(port), TOKEN]
        return Server([*argv, str(where)], port, logs / "bulk-sqlite.log")

    paged_label = "the storage's own statements per task, one transaction per page of 1,000"

    def paged(self, where: Path, cap: float) -> tuple[int, int]:
        return sqlite_paged(where, cap)

    def drop(self, where: Path) -> None:
        for p in self.dir.glob(f"{where.name}*"):
            p.unlink()


class PostgresStore(Store):
    name = "postgres"

    def make(self, side: str, count: int, singles: int) -> str:
        schema = f"bench_bulk_{side}"
        drop_schema(schema)
        storage = self.storage(schema)
        try:
            _fill(storage, lambda pid, n: _copy_postgres(schema, pid, n), count, singles)
        finally:
            storage.close()
        return schema

    def storage(self, where: str) -> Any:
        from deepwork_retry.storage.postgres import PostgresStorage

        return PostgresStorage(dsn(), schema=where, min_size=1, max_size=2)

    def floor(self, where: str) -> int:
        return postgres_floor(where, BULK)

    def server(self, where: str, logs: Path) -> Server:
        port = free_port()
        argv = [sys.executable, str(HERE / "bulk_server.py"), "postgres", str(port), TOKEN]
        return Server([*argv, dsn(), where], port, logs / "bulk-postgres.log")

    paged_label = "the storage's one-step statement per task, one transaction per page of 1,000"

    def paged(self, where: str, cap: float) -> tuple[int, int]:
        return postgres_paged(where, cap)

    def drop(self, where: str) -> None:
        drop_schema(where)


def _progress_of(storage: Any) -> Callable[[], tuple[int, ...]]:
    def read() -> tuple[int, ...]:
        p = storage.progress(BULK)
        return (p.blocked, p.assigned)

    return read


def _library_run(
    store: Store, path: str, count: int, logs: Path, cap: float, reference: bool = True
) -> tuple[float, dict[str, Any], list[float], list[float], Beside]:
    """One bulk of ``count`` tasks by ``path`` ("service" or "http") on a fresh twin:
    (seconds, side facts, singles alone, singles during, what ran beside)."""
    singles = SINGLES + max(count // 10, 500)
    t_fill = time.perf_counter()
    where = store.make(f"{path}_{count}", count, singles)
    fill_s = time.perf_counter() - t_fill
    others: list[Any] = []
    server: Server | None = None
    try:
        other_ids = [f"t{i:07d}" for i in range(singles)]
        if path == "service":
            storage = store.storage(where)
            others.append(storage)
            side = store.storage(where)  # the other thread's own handle, as another user's
            others.append(side)
            reader = store.storage(where)
            others.append(reader)
            service = RetryService(storage)
            other = RetryService(side)
            beside = Beside(lambda tid: other.retry(OTHER, tid), _progress_of(reader), other_ids)
            alone = beside.reference() if reference else []
            peak = Peak()
            with beside.during() as during, peak:
                t0 = time.perf_counter()
                retried, pages = service_bulk(service, cap)
                elapsed = time.perf_counter() - t0
        else:
            server = store.server(where, logs)
            bulk, single, poll = Client(server.port), Client(server.port), Client(server.port)
            others.extend((bulk, single, poll))

            def progress() -> tuple[int, ...]:
                answer = poll.call("GET", f"/projects/{BULK}/progress")
                p = answer.get("progress", answer)
                return (p["blocked"], p["assigned"])

            beside = Beside(
                lambda tid: single.call("POST", f"/projects/{OTHER}/tasks/{tid}/retry", {}),
                progress,
                other_ids,
            )
            alone = beside.reference() if reference else []
            peak = Peak(server.proc.pid)
            with beside.during() as during, peak:
                t0 = time.perf_counter()
                retried, pages = http_bulk(bulk, cap)
                elapsed = time.perf_counter() - t0
        facts = {
            "tasks": count,
            "retried": retried,
            "complete": retried == count,
            "cap_seconds": cap,
            "projected_seconds": elapsed * count / max(retried, 1),
            "pages": pages,
            "page_size": PAGE,
            "seconds": elapsed,
            "us_per_task": elapsed * 1e6 / max(retried, 1),
            "fill_seconds": fill_s,
            "rss_before_kib": peak.before_kib,
            "rss_peak_kib": peak.peak_kib,
            "rss_growth_kib": peak.growth_kib,
            "rss_peak_reset": peak.resettable,
            "singles_during": len(during),
            "singles_alone": len(alone),
            "singles_ran_out": beside.next >= len(other_ids),
            "single_max_us_during": max(during, default=float("nan")),
            "progress_reads": beside.reads,
            "progress_distinct": len(beside.seen),
            "errors": beside.errors[:20],
            "error_count": len(beside.errors),
        }
        return elapsed, facts, alone, during, beside
    finally:
        for handle in others:
            handle.close()
        if server is not None:
            server.stop()
        store.drop(where)


def _paged_run(store: Store, count: int, cap: float) -> tuple[float, dict[str, Any]]:
    where = store.make(f"paged_{count}", count, 1)
    try:
        t0 = time.perf_counter()
        retried, pages = store.paged(where, cap)
        elapsed = time.perf_counter() - t0
    finally:
        store.drop(where)
    return elapsed, {
        "tasks": count,
        "retried": retried,
        "complete": retried == count,
        "pages": pages,
        "seconds": elapsed,
        "projected_seconds": elapsed * count / max(retried, 1),
        "us_per_task": elapsed * 1e6 / max(retried, 1),
    }


def _floor_run(store: Store, count: int, label: str) -> tuple[float, dict[str, Any]]:
    where = store.make(f"floor_{label}", count, 1)
    try:
        t0 = time.perf_counter()
        n = store.floor(where)
        elapsed = time.perf_counter() - t0
    finally:
        store.drop(where)
    return elapsed, {"tasks": count, "retried": n, "seconds": elapsed}


def _database(store: Store, count: int, logs: Path, cap: float) -> list[Row]:
    g, db = "bulk", store.name
    small = count // 10
    floor = Figure(f"set-based floor, {count:,} tasks in one transaction", "us")
    floor.extra["runs"] = []
    runs: dict[str, tuple[float, dict[str, Any], list[float], list[float]]] = {}
    memory: dict[str, dict[str, Any]] = {}
    # Floor, service, HTTP, per page, floor: the floor on both sides of the library's runs.
    order = ["floor", "service", "http", "paged", "floor"]
    paged: tuple[float, dict[str, Any]] = (0.0, {})
    for i, what in enumerate(order):
        if what == "paged":
            paged = _paged_run(store, count, cap)
        elif what == "floor":
            seconds, facts = _floor_run(store, count, str(i))
            floor.samples.append(seconds * 1e6)
            floor.extra["runs"].append(facts)
        else:
            seconds, facts, alone, during, _ = _library_run(store, what, count, logs, cap)
            runs[what] = (seconds, facts, alone, during)
    for what in ("service", "http"):
        _, facts, _, _, _ = _library_run(store, what, small, logs, cap / 5, reference=False)
        memory[what] = facts
    rows: list[Row] = []
    names = {
        "service": "RetryService.bulk_retry, pages of 1,000",
        "http": "POST …/retry-blocked over uvicorn, pages of 1,000",
    }
    for what in ("service", "http"):
        seconds, facts, alone, during = runs[what]
        # A run stopped by the cap counts its measured time per task times the tasks.
        total = seconds if facts["complete"] else facts["projected_seconds"]
        lib = Figure(names[what], "us", [total * 1e6], dict(facts))
        stopped = (
            ""
            if facts["complete"]
            else f"; STOPPED at {cap:.0f} s after {facts['retried']:,} tasks: "
            f"the total is projected from their rate"
        )
        rows.append(
            Row(
                g,
                f"{db}: {names[what]}, {count:,} tasks, total time",
                lib,
                floor,
                target="≤ 3x",
                bound=3.0,
                note=f"{facts['us_per_task']:.0f} µs per task; floor: "
                f"{floor.median / count:.1f} µs per task{stopped}",
            )
        )
        during_fig = Figure(f"single retries of another project during the {what} bulk", "us")
        during_fig.samples = during
        during_fig.extra.update(
            max_us=facts["single_max_us_during"],
            page_ms=facts["seconds"] * 1000 / max(facts["pages"], 1),
            ran_out=facts["singles_ran_out"],
            errors=facts["error_count"],
        )
        alone_fig = Figure("the same single retries, no bulk running", "us", alone)
        rows.append(
            Row(
                g,
                f"{db}: single retries beside the {what} bulk vs alone",
                during_fig,
                alone_fig,
                target="report",
                note=f"max {facts['single_max_us_during'] / 1000:.1f} ms; one page took "
                f"{during_fig.extra['page_ms']:.0f} ms",
            )
        )
        seen = Figure("distinct progress values seen", "values", [facts["progress_distinct"]])
        reads = Figure("progress reads during the bulk", "reads", [facts["progress_reads"]])
        rows.append(
            Row(
                g,
                f"{db}: progress polled during the {what} bulk",
                seen,
                reads,
                target="> 1 value",
                bound=1 / max(facts["progress_reads"], 1) + 1e-9,
                sense="min",
                note="every POLL s a reader asks for the project's progress",
            )
        )
        big = Figure(f"peak RSS growth, {count:,} tasks", "KiB", [facts["rss_growth_kib"]])
        little = Figure(
            f"peak RSS growth, {small:,} tasks", "KiB", [memory[what]["rss_growth_kib"]]
        )
        big.extra.update(facts)
        little.extra.update(memory[what])
        # Flat: the growth does not follow the tasks. Per task retried beyond the smaller
        # run (a list of one pointer per task would be 8 bytes a task).
        extra_tasks = facts["retried"] - memory[what]["retried"]
        per_task = (
            (facts["rss_growth_kib"] - memory[what]["rss_growth_kib"]) * 1024 / extra_tasks
            if extra_tasks > 0
            else float("nan")
        )
        big.extra["bytes_per_extra_task"] = per_task
        rows.append(
            Row(
                g,
                f"{db}: memory of the {what} bulk, {count:,} vs {small:,} tasks",
                big,
                little,
                target="report (flat)",
                note=f"{per_task:.1f} bytes per extra task retried; process running the bulk: "
                + ("the benchmark" if what == "service" else "the uvicorn server"),
            )
        )
    seconds, facts = paged
    total = seconds if facts["complete"] else facts["projected_seconds"]
    rows.append(
        Row(
            g,
            f"{db}: {store.paged_label}, {count:,} tasks, total time",
            Figure(store.paged_label, "us", [total * 1e6], facts),
            floor,
            target="report",
            note=f"{facts['us_per_task']:.0f} µs per task: what batching the commits gives"
            + ("" if facts["complete"] else f"; STOPPED at {cap:.0f} s, total projected"),
        )
    )
    return rows


def run(quick: bool, scratch: Path, logs: Path) -> list[Row]:
    """The group's rows (10,000 tasks with ``quick``, else 100,000)."""
    count = 10_000 if quick else 100_000
    cap = 10.0 if quick else 55.0
    rows: list[Row] = []
    for name, make in (("sqlite", lambda: SQLiteStore(scratch)), ("postgres", PostgresStore)):
        why = reachable() if name == "postgres" else None
        if why is not None:
            rows.append(unavailable("bulk", f"{name}: bulk retry", why, "≤ 3x"))
            continue
        try:
            rows.extend(_database(make(), count, logs, cap))
        except Exception as exc:  # noqa: BLE001 - one database failing keeps the other's rows
            traceback.print_exc()
            reason = f"{type(exc).__name__}: {exc}"[:160]
            rows.append(unavailable("bulk", f"{name}: bulk retry", reason, "≤ 3x"))
    return rows
