"""PostgreSQL benchmarks: the library's manual retry against psycopg floors and procrastinate.

- floors: a bare ``SELECT 1`` round trip and the bare single-statement retry
  (one CTE: task update, counters update, outbox insert, returning the task
  and the progress) with psycopg on an autocommit connection, durable
  (``synchronous_commit`` as the server has it, ``on`` by default);
- library: ``RetryService(PostgresStorage(...)).retry`` on a twin schema of the
  same content;
- peer: procrastinate's ``JobManager.retry_job_by_id`` on failed jobs, in its
  own database on the same server, driven from its own virtualenv;
- scale and concurrency curves.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _fixtures import add_blocked, chunks, fill_postgres
from _harness import Figure, Row, alternate, per_op_rounds, unavailable

from deepwork_retry import RetryService

HERE = Path(__file__).resolve().parent
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def dsn() -> str:
    return os.environ.get("DEEPWORK_BENCH_DSN", DEFAULT_DSN)


def reachable() -> str | None:
    """``None`` when PostgreSQL answers, else why not."""
    try:
        import psycopg

        with psycopg.connect(dsn(), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any failure makes the group unavailable
        return f"PostgreSQL at {dsn()} unreachable: {type(exc).__name__}"
    try:
        import deepwork_retry.storage.postgres  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"PostgreSQL storage not importable: {type(exc).__name__}: {exc}"
    return None


def drop_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(dsn(), autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def pg_storage(schema: str, max_size: int = 4) -> Any:
    from deepwork_retry.storage.postgres import PostgresStorage

    drop_schema(schema)
    return PostgresStorage(dsn(), schema=schema, max_size=max_size)


def floor_cte(schema: str) -> str:
    s = f'"{schema}"'
    return (
        f"WITH t AS (UPDATE {s}.tasks SET status = 'assigned', retry_count = retry_count + 1, "
        "retries_left = retries_left + 1, error_message = NULL, error_type = NULL, "
        "blocked_reason = NULL, attempt = attempt + 1, updated_at = now(), "
        "version = version + 1 "
        "WHERE project_id = %(pid)s AND id = %(tid)s AND version = %(version)s "
        "AND status = 'blocked' RETURNING project_id, id, attempt, version, status), "
        f"p AS (UPDATE {s}.progress SET blocked = blocked - 1, assigned = assigned + 1 "
        "WHERE project_id = (SELECT project_id FROM t) RETURNING *), "
        f"o AS (INSERT INTO {s}.outbox (project_id, task_id, attempt, state, available_at, "
        "created_at, tries, seq, pending_seq) "
        f"SELECT project_id, id, attempt, 'pending', now(), now(), 0, "
        f"nextval('{s}.outbox_order'), currval('{s}.outbox_order') FROM t RETURNING 1) "
        "SELECT t.*, p.*, (SELECT count(*) FROM o) FROM t, p"
    )


# The two event rows a manual retry writes (``task.retried`` and ``project.progress``),
# as the library stores them: compact JSON, keys sorted.
_RETRIED = (
    '{{"actor":null,"available_at":"{at}","budget":"one_more","reason":null,'
    '"retry_count":{n},"trigger":"manual_retry"}}'
)
_PROGRESS = '{"from":"blocked","to":"assigned"}'


def floor_cte_events(schema: str) -> str:
    """:func:`floor_cte` plus the retry's two event rows, numbered on the project's row.

    The contract asks for them: a manual retry writes ``task.retried`` and
    ``project.progress``, numbered after the project's last event in the same
    transaction (``projects.event_seq``). Bare SQL: one more ``UPDATE`` and one
    two-row ``INSERT`` in the same statement, the data as JSON text.
    """
    s = f'"{schema}"'
    base = floor_cte(schema).rsplit(" SELECT t.*", 1)[0]
    return (
        f"{base}, "
        f"e AS (UPDATE {s}.projects SET event_seq = event_seq + 2 "
        "WHERE id = (SELECT project_id FROM p) RETURNING event_seq), "
        f"ei AS (INSERT INTO {s}.events (project_id, seq, type, task_id, attempt, at, data) "
        "SELECT t.project_id, e.event_seq - 2 + v.k, v.type, t.id, t.attempt, now(), v.data "
        "FROM t, e, (VALUES (1, 'task.retried', %(d1)s::jsonb), "
        "(2, 'project.progress', %(d2)s::jsonb)) AS v(k, type, data) RETURNING 1) "
        "SELECT t.*, p.*, (SELECT count(*) FROM o), (SELECT count(*) FROM ei) FROM t, p"
    )


class PgFloor:
    """psycopg directly, one autocommit connection."""

    def __init__(self, schema: str) -> None:
        import psycopg

        self.conn = psycopg.connect(dsn(), autocommit=True)
        self.query = floor_cte(schema).encode()
        self.query_events = floor_cte_events(schema).encode()
        self.conn.execute("SELECT 1")

    def select1(self, _pid: str = "", _tid: str = "") -> None:
        self.conn.execute(b"SELECT 1").fetchone()

    def retry(self, pid: str, tid: str) -> None:
        row = self.conn.execute(self.query, {"pid": pid, "tid": tid, "version": 1}).fetchone()
        if row is None:
            raise RuntimeError(f"task {tid} not blocked")

    def retry_events(self, pid: str, tid: str) -> None:
        now = datetime.now(UTC)
        params = {
            "pid": pid,
            "tid": tid,
            "version": 1,
            "d1": _RETRIED.format(at=now.isoformat(), n=1),
            "d2": _PROGRESS,
        }
        row = self.conn.execute(self.query_events, params).fetchone()
        if row is None:
            raise RuntimeError(f"task {tid} not blocked")

    def close(self) -> None:
        self.conn.close()


def _twins(
    name: str, projects: int, per_project: int, max_size: int = 4, filler: int = 0
) -> tuple[Any, str, list[tuple[str, str]]]:
    lib_schema, floor_schema = f"bench_{name}_lib", f"bench_{name}_floor"
    items: list[tuple[str, str]] = []
    storage = None
    for schema in (lib_schema, floor_schema):
        st = pg_storage(schema, max_size=max_size)
        items = []
        for p in range(projects):
            pid = f"p{p:05d}"
            items.extend((pid, tid) for tid in add_blocked(st, pid, per_project))
            fill_postgres(dsn(), schema, pid, filler)
        if schema == lib_schema:
            storage = st
        else:
            st.close()
            one_progress_row(floor_schema)
    return storage, floor_schema, items


def one_progress_row(schema: str) -> None:
    """Fold each project's progress stripes into one row (stripe 0), as the floor expects.

    The floor CTE updates its project's progress row; the library spreads a
    project's counters over several rows, and the floor must not pay for them.
    """
    import psycopg

    counters = ("total", "inbox", "assigned", "in_progress", "review", "done", "blocked", "skipped")
    sums = ", ".join(f"sum({c}) AS {c}" for c in counters)
    sets = ", ".join(f"{c} = s.{c}" for c in counters)
    with psycopg.connect(dsn(), autocommit=True) as conn:
        with conn.transaction():
            conn.execute(
                f'WITH s AS (SELECT project_id, {sums} FROM "{schema}".progress'
                f' GROUP BY project_id) UPDATE "{schema}".progress AS p SET {sets} FROM s'
                " WHERE p.project_id = s.project_id AND p.stripe = 0"
            )
            conn.execute(f'DELETE FROM "{schema}".progress WHERE stripe <> 0')
        conn.execute(f'VACUUM ANALYZE "{schema}".progress')


def round_trips(storage: Any, pid: str, tid: str) -> int:
    """Statements sent to the server by one library retry (psycopg cursor executes)."""
    import psycopg

    count = 0
    originals = {cls: cls.execute for cls in (psycopg.Cursor, psycopg.ClientCursor)}

    def counting(original: Callable[..., Any]) -> Callable[..., Any]:
        def execute(self: Any, *args: Any, **kwargs: Any) -> Any:
            nonlocal count
            count += 1
            return original(self, *args, **kwargs)

        return execute

    for cls, original in originals.items():
        cls.execute = counting(original)  # type: ignore[method-assign]
    try:
        RetryService(storage).retry(pid, tid)
    finally:
        for cls, original in originals.items():
            cls.execute = original  # type: ignore[method-assign]
    return count


def postgres(rounds: int, per_round: int) -> list[Row]:
    reason = reachable()
    targets = ["≤ 1.3x, 1 round trip", "≥ 0.9x throughput"]
    if reason:
        return [unavailable("postgres", "manual retry vs bare CTE", reason, targets[0])]
    need = rounds * per_round
    storage, floor_schema, items = _twins("tx", 1, 2 * need + 1)
    probe = items.pop()
    service = RetryService(storage)
    floor = PgFloor(floor_schema)
    # The floor with events retries the second half (each task is retried once).
    slices = chunks(items[:need], rounds)
    slices_ev = chunks(items[need:], rounds)
    lib = Figure("RetryService(PostgresStorage).retry", "us")
    cte = Figure("bare retry CTE, psycopg", "us")
    cte_ev = Figure("bare retry CTE with the two event rows, psycopg", "us")
    sel = Figure("bare SELECT 1, psycopg", "us")
    alternate(
        [
            (lib, per_op_rounds(service.retry, slices)),
            (cte, per_op_rounds(floor.retry, slices)),
            (cte_ev, per_op_rounds(floor.retry_events, slices_ev)),
            (sel, per_op_rounds(floor.select1, slices)),
        ],
        rounds,
    )
    trips = round_trips(storage, *probe)
    lib.extra["round_trips"] = trips
    storage.close()
    floor.close()
    drop_schema("bench_tx_lib")
    drop_schema(floor_schema)
    return [
        Row(
            "postgres",
            "manual retry vs bare retry CTE",
            lib,
            cte,
            target="≤ 1.3x",
            bound=1.3,
            note=f"library: {trips} round trips per retry (target 1)",
        ),
        Row(
            "postgres",
            "manual retry vs bare retry CTE with its two event rows",
            lib,
            cte_ev,
            target="report",
            note="the floor also numbers and inserts task.retried and project.progress",
        ),
        Row(
            "postgres",
            "bare retry CTE with its two event rows vs without",
            cte_ev,
            cte,
            target="report",
            note="what the events cost as bare SQL",
        ),
        Row(
            "postgres",
            "manual retry vs bare SELECT 1",
            lib,
            sel,
            target="report",
            note="the round-trip floor",
        ),
    ]


# -- concurrent clients, each an OS process -------------------------------------------------
def _client(pipe: Any, conninfo: str) -> None:
    """One client process: opens a library or floor client, runs the items it is sent.

    Messages: ``("open", "lib" | "floor", schema)``, ``("run", items[, "events"])`` (the
    floor's retry with its event rows when ``"events"``; answers
    ``"ready"``, waits for ``"go"``, runs, answers the monotonic end time),
    ``("close",)`` and ``None`` (exit). Errors are answered as ``("error", text)``.
    """
    os.environ["DEEPWORK_BENCH_DSN"] = conninfo
    if os.environ.get("DEEPWORK_BENCH_VARIANT"):  # an experiment of misses.py
        import misses

        misses.patch(os.environ["DEEPWORK_BENCH_VARIANT"])
    client: Any = None
    op: Callable[[str, str], object] | None = None
    while True:
        msg = pipe.recv()
        if msg is None:
            break
        try:
            if msg[0] == "open":
                if msg[1] == "lib":
                    from deepwork_retry.storage.postgres import PostgresStorage

                    client = PostgresStorage(
                        conninfo, schema=msg[2], min_size=1, max_size=1, migrate=False
                    )
                    op = RetryService(client).retry
                else:
                    client = PgFloor(msg[2])
                    op = client.retry
                pipe.send("ok")
            elif msg[0] == "run":
                assert op is not None
                items = msg[1]
                run = client.retry_events if msg[2:] == ("events",) else op
                pipe.send("ready")
                assert pipe.recv() == "go"
                for pid, tid in items:
                    run(pid, tid)
                pipe.send(time.monotonic())
            elif msg[0] == "close":
                if client is not None:
                    client.close()
                client = op = None
                pipe.send("ok")
        except Exception as exc:  # noqa: BLE001 - reported by the parent
            pipe.send(("error", f"{type(exc).__name__}: {exc}"))


class Clients:
    """``size`` client processes (spawned, so none inherits a connection)."""

    def __init__(self, size: int) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.pipes = []
        self.procs = []
        for _ in range(size):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_client, args=(there, dsn()), daemon=True)
            proc.start()
            self.pipes.append(here)
            self.procs.append(proc)

    def _ask(self, pipes: list[Any], msg: Any) -> list[Any]:
        for pipe in pipes:
            pipe.send(msg)
        answers = [pipe.recv() for pipe in pipes]
        for answer in answers:
            if isinstance(answer, tuple) and answer[0] == "error":
                raise RuntimeError(f"client process: {answer[1]}")
        return answers

    def open(self, n: int, kind: str, schema: str) -> list[Any]:
        """``n`` clients of ``kind`` on ``schema`` (from the free processes)."""
        busy = getattr(self, "_busy", 0)
        pipes = self.pipes[busy : busy + n]
        if len(pipes) < n:
            raise RuntimeError("not enough client processes")
        self._busy = busy + n
        self._ask(pipes, ("open", kind, schema))
        return pipes

    def rate(
        self, pipes: list[Any], work: list[list[tuple[str, str]]], events: bool = False
    ) -> float:
        """Operations per second of ``pipes[i]`` running ``work[i]``, all started together."""
        for pipe, items in zip(pipes, work, strict=True):
            pipe.send(("run", items, "events") if events else ("run", items))
        for pipe in pipes:
            if pipe.recv() != "ready":
                raise RuntimeError("client process not ready")
        t0 = time.monotonic()
        ends = self._ask(pipes, "go")
        return sum(len(w) for w in work) / (max(ends) - t0)

    def close_all(self) -> None:
        self._ask(self.pipes[: getattr(self, "_busy", 0)], ("close",))
        self._busy = 0

    def shutdown(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError, BrokenPipeError):
                pipe.send(None)
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


def concurrency(rounds: int, per_client: int, clients: list[int]) -> list[Row]:
    """Retries per second from n client processes, library against the bare CTE.

    Every client, on both sides, is an OS process of its own with one
    connection, so neither side shares an interpreter lock between clients.
    """
    reason = reachable()
    if reason:
        return [unavailable("concurrency", "postgres clients", reason)]
    rows = []
    pool = Clients(2 * max(clients))
    try:
        for layout in ("same project", "separate projects"):
            for n in clients:
                projects = 1 if layout == "same project" else n
                # Twice the tasks: the floor with events retries the second half.
                storage, floor_schema, items = _twins(
                    "conc", projects, 2 * rounds * per_client * n // projects, max_size=2
                )
                storage.close()
                size = len(items) // projects
                if projects == 1:
                    work_all = [
                        [
                            items[(r * n + c) * per_client : (r * n + c + 1) * per_client]
                            for c in range(n)
                        ]
                        for r in range(2 * rounds)
                    ]
                else:
                    own = [items[c * size : (c + 1) * size] for c in range(n)]
                    work_all = [
                        [own[c][r * per_client : (r + 1) * per_client] for c in range(n)]
                        for r in range(2 * rounds)
                    ]
                work, work_ev = work_all[:rounds], work_all[rounds:]
                lib_clients = pool.open(n, "lib", "bench_conc_lib")
                floor_clients = pool.open(n, "floor", floor_schema)
                lib = Figure(f"PostgreSQL library, {n} processes, {layout}", "ops/s")
                ref = Figure(f"bare retry CTE, {n} processes, {layout}", "ops/s")
                ref_ev = Figure(
                    f"bare retry CTE with its two event rows, {n} processes, {layout}", "ops/s"
                )
                alternate(
                    [
                        (lib, lambda r, p=lib_clients, w=work: [pool.rate(p, w[r])]),
                        (ref, lambda r, p=floor_clients, w=work: [pool.rate(p, w[r])]),
                        (
                            ref_ev,
                            lambda r, p=floor_clients, w=work_ev: [pool.rate(p, w[r], True)],
                        ),
                    ],
                    rounds,
                )
                pool.close_all()
                key = n == 8 and layout == "same project"
                rows.append(
                    Row(
                        "concurrency",
                        f"postgres, {n} clients, {layout}",
                        lib,
                        ref,
                        target="≥ 0.9x" if key else "report",
                        bound=0.9 if key else None,
                        sense="min",
                        note="each client an OS process with one connection, on both sides",
                    )
                )
                rows.append(
                    Row(
                        "concurrency",
                        f"postgres, {n} clients, {layout}, vs the floor with events",
                        lib,
                        ref_ev,
                        target="report",
                        sense="min",
                        note="the floor also numbers and inserts the retry's two event rows",
                    )
                )
                drop_schema("bench_conc_lib")
                drop_schema(floor_schema)
    finally:
        pool.shutdown()
    return rows


def scale(rounds: int, per_round: int, sizes: list[int]) -> list[Row]:
    reason = reachable()
    if reason:
        return [unavailable("scale", "postgres project sizes", reason)]
    rows = []
    need = rounds * per_round
    small_count = max(1, need // 10) * max(1, len([s for s in sizes if s != 10]))
    base = pg_storage("bench_scale_10")
    base_items: list[tuple[str, str]] = []
    for p in range(small_count):
        pid = f"s{p:06d}"
        base_items.extend((pid, tid) for tid in add_blocked(base, pid, 10))
    base_service = RetryService(base)
    used = 0
    for size in sizes:
        if size == 10:
            continue
        schema = f"bench_scale_{size}"
        st = pg_storage(schema)
        t0 = time.perf_counter()
        ids = add_blocked(st, "big", need)
        fill_postgres(dsn(), schema, "big", size - len(ids))
        built = time.perf_counter() - t0
        service = RetryService(st)
        big = chunks([("big", tid) for tid in ids], rounds)
        small = chunks(base_items[used : used + need], rounds)
        used += need
        lib = Figure(f"PostgreSQL retry, {size:,} tasks/project", "us", extra={"build_s": built})
        ref = Figure("PostgreSQL retry, 10 tasks/project", "us")
        alternate(
            [
                (lib, per_op_rounds(service.retry, big)),
                (ref, per_op_rounds(base_service.retry, small)),
            ],
            rounds,
        )
        rows.append(
            Row(
                "scale",
                f"postgres {size:,} vs 10 tasks/project",
                lib,
                ref,
                target="≤ 1.2x" if size >= 1_000_000 else "flat",
                bound=1.2,
            )
        )
        st.close()
        drop_schema(schema)
    base.close()
    drop_schema("bench_scale_10")
    return rows


# -- procrastinate ---------------------------------------------------------------------------
class Driver:
    """The procrastinate driver process, spoken to over pipes."""

    def __init__(self, python: Path, conninfo: str, log: Path) -> None:
        self.log = log.open("wb")
        self.proc = subprocess.Popen(
            [str(python), str(HERE / "peers" / "procrastinate_driver.py"), conninfo],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )

    def ask(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError("procrastinate driver exited; see " + self.log.name)
        result: dict[str, Any] = json.loads(answer)
        return result

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, BrokenPipeError, ValueError):
            self.ask("quit")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def procrastinate(rounds: int, per_round: int, python: Path | str, logs: Path) -> list[Row]:
    target = "≤ 1.0x latency"
    name = "manual retry vs procrastinate retry_job_by_id"
    if isinstance(python, str):
        return [unavailable("peers", name, python, target)]
    reason = reachable()
    if reason:
        return [unavailable("peers", name, reason, target)]
    import psycopg

    database = "bench_procrastinate"
    with psycopg.connect(dsn(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {database}")
        conn.execute(f"CREATE DATABASE {database}")
    peer_dsn = psycopg.conninfo.make_conninfo(dsn(), dbname=database)
    driver = Driver(Path(python), peer_dsn, logs / "procrastinate.log")
    try:
        total = rounds * per_round
        driver.ask(f"setup {total}")
        storage = pg_storage("bench_peer_lib")
        items = [("p", tid) for tid in add_blocked(storage, "p", total)]
        service = RetryService(storage)
        slices = chunks(items, rounds)
        lib = Figure("RetryService(PostgresStorage).retry", "us")
        ref = Figure("procrastinate JobManager.retry_job_by_id", "us")
        alternate(
            [
                (lib, per_op_rounds(service.retry, slices)),
                (ref, lambda r: driver.ask(f"run {per_round}")["us"]),
            ],
            rounds,
        )
        storage.close()
        drop_schema("bench_peer_lib")
    finally:
        driver.close()
    return [
        Row(
            "peers",
            name,
            lib,
            ref,
            target=target,
            bound=1.0,
            note="library also returns progress and records attempt + outbox entry",
        )
    ]
