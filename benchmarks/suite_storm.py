"""10,000 attempts failing at once, re-dispatched with backoff.

Every task of one project is running (attempt 1, bulk-added through the
storage's ``add_tasks`` with its attempt record copied in by one
``INSERT … SELECT``). Four threads then report every attempt failed with a
retryable error as fast as they can, and an outbox relay (``OutboxRelay``,
``poll_interval`` 0.05 s, in a thread of the same process) delivers the
automatic retries as their backoff passes, to a dispatcher that notes when each
arrived.

- library: ``ExecutorService(storage, policy=POLICY).fail(...)`` (no
  dispatcher on the service: the retry waits in the outbox for its backoff);
- floor: the same state changes as bare statements on a twin of the same
  content, durable the same way: the task moved to ``assigned`` with its
  counters, attempt 1 closed, attempt 2 and its pending outbox entry
  inserted (due after a delay drawn from the same distribution), the
  project's counters moved and its three events written (PostgreSQL: one
  statement; SQLite: one ``BEGIN IMMEDIATE`` transaction).

The policy is ``ExponentialBackoff(wait_initial=0.5, wait_jitter=1.0)``: the
first retry waits ``0.5 + U(0, 1) * 1.0`` seconds, uniform on [0.5, 1.5].
Spread rows compare the quantiles (1 %..99 %) of the observed delays, from
the failure to the entry's ``available_at`` and from the failure to its
delivery by the relay, to that distribution's, and report the largest gap.
SQLite runs with ``synchronous = NORMAL`` on both sides (WAL; a durable
commit per failure would make the run too long for its budget).
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from _harness import Figure, Row, alternate, percentile, unavailable
from suite_pg import dsn
from suite_pg import reachable as pg_reachable

from deepwork_retry import (
    ExecutorService,
    OutboxRelay,
    Project,
    RetryPolicy,
    Task,
    TaskError,
    TaskStatus,
)
from deepwork_retry._core.policy import ExponentialBackoff

GROUP = "storm"
PID = "storm"
THREADS = 4
INITIAL, JITTER = 0.5, 1.0
POLICY = RetryPolicy(backoff=ExponentialBackoff(wait_initial=INITIAL, wait_jitter=JITTER))
ERROR = TaskError(type="ConnectionError", message="upstream went away")
QUANTILES = [q / 100 for q in range(1, 100)]
_EVENT_FAILED = '{"error_message":"upstream went away","error_type":"ConnectionError"}'
_EVENT_PROGRESS = '{"from":"in_progress","to":"assigned"}'


def running_tasks(count: int, now: datetime) -> list[Task]:
    return [
        Task(
            id=f"t{i:07d}",
            project_id=PID,
            status=TaskStatus.IN_PROGRESS,
            max_retries=3,
            retries_left=3,
            attempt=1,
            started_at=now,
            lease_expires_at=now + timedelta(hours=1),
            created_at=now,
            updated_at=now,
        )
        for i in range(count)
    ]


def fill(storage: Any, count: int) -> list[str]:
    now = datetime.now(timezone.utc)
    storage.create_project(Project(id=PID, created_at=now, updated_at=now))
    tasks = running_tasks(count, now)
    for start in range(0, count, 5000):
        storage.add_tasks(tasks[start : start + 5000])
    return [t.id for t in tasks]


def retry_at(now: datetime, rng: random.Random) -> datetime:
    """The floor's draw: the policy's first backoff, written out."""
    return now + timedelta(seconds=INITIAL + rng.random() * JITTER)


def retried_data(at: datetime) -> str:
    return (
        f'{{"available_at":"{at.isoformat()}","retries_left":2,"retry_count":1,'
        '"trigger":"auto_retry"}'
    )


# -- PostgreSQL ---------------------------------------------------------------------


def pg_side(schema: str, count: int) -> tuple[Any, list[str]]:
    import psycopg

    from deepwork_retry.storage.postgres import PostgresStorage

    with psycopg.connect(dsn(), autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    storage = PostgresStorage(dsn(), schema=schema, max_size=THREADS)
    ids = fill(storage, count)
    with psycopg.connect(dsn(), autocommit=True) as conn:
        conn.execute(
            f'INSERT INTO "{schema}".attempts (project_id, task_id, number, trigger,'
            " dispatched_at, available_at, started_at) SELECT project_id, id, attempt,"
            f" 'initial', started_at, started_at, started_at FROM \"{schema}\".tasks"
        )
        conn.execute(f'VACUUM ANALYZE "{schema}".tasks, "{schema}".attempts')
    return storage, ids


def pg_floor_sql(schema: str) -> bytes:
    s = f'"{schema}"'
    return (
        f"WITH t AS (UPDATE {s}.tasks SET status = 'assigned', retry_count = retry_count + 1,"
        " retries_left = retries_left - 1, error_message = %(msg)s, error_type = %(typ)s,"
        " attempt = attempt + 1, lease_expires_at = NULL, updated_at = %(now)s,"
        " version = version + 1"
        " WHERE project_id = %(pid)s AND id = %(tid)s AND status = 'in_progress'"
        " AND attempt = %(token)s RETURNING project_id, id, attempt, stripe),"
        f" a1 AS (UPDATE {s}.attempts SET finished_at = %(now)s, outcome = 'failed',"
        " error_type = %(typ)s, error_message = %(msg)s"
        " WHERE project_id = %(pid)s AND task_id = %(tid)s AND number = %(token)s"
        " AND EXISTS (SELECT FROM t) RETURNING 1),"
        f" a2 AS (INSERT INTO {s}.attempts (project_id, task_id, number, trigger,"
        " dispatched_at, available_at) SELECT project_id, id, attempt, 'auto_retry',"
        " %(now)s, %(at)s FROM t RETURNING 1),"
        f" o AS (INSERT INTO {s}.outbox (project_id, task_id, attempt, state, available_at,"
        " created_at, tries, seq, pending_seq) SELECT project_id, id, attempt, 'pending',"
        f" %(at)s, %(now)s, 0, nextval('{s}.outbox_order'), currval('{s}.outbox_order')"
        " FROM t RETURNING 1),"
        f" p AS (UPDATE {s}.progress SET in_progress = in_progress - 1,"
        " assigned = assigned + 1 WHERE project_id = %(pid)s"
        " AND stripe = (SELECT stripe FROM t) RETURNING 1),"
        f" es AS (UPDATE {s}.projects SET event_seq = event_seq + 3"
        " WHERE id = %(pid)s AND EXISTS (SELECT FROM t) RETURNING event_seq),"
        f" e AS (INSERT INTO {s}.events (project_id, seq, type, task_id, attempt, at, data)"
        " SELECT %(pid)s, es.event_seq - 3 + v.k, v.type, %(tid)s, v.n, %(now)s, v.data::jsonb"
        " FROM es, (VALUES (1, 'attempt.failed', %(token)s::bigint, %(d1)s),"
        " (2, 'task.retried', %(token)s::bigint + 1, %(d2)s),"
        " (3, 'project.progress', %(token)s::bigint + 1, %(d3)s)) AS v(k, type, n, data)"
        " RETURNING 1)"
        " SELECT (SELECT count(*) FROM t), (SELECT count(*) FROM a1), (SELECT count(*) FROM a2),"
        " (SELECT count(*) FROM o), (SELECT count(*) FROM p), (SELECT count(*) FROM e)"
    ).encode()


class PgFloor:
    """One autocommit psycopg connection per thread, one statement per failure."""

    def __init__(self, schema: str) -> None:
        import psycopg

        self.conns = [psycopg.connect(dsn(), autocommit=True) for _ in range(THREADS)]
        self.sql = pg_floor_sql(schema)
        self.rng = random.Random()

    def op(self, i: int) -> Callable[[str], None]:
        conn, sql, rng = self.conns[i], self.sql, self.rng

        def fail(tid: str) -> None:
            now = datetime.now(timezone.utc)
            at = retry_at(now, rng)
            row = conn.execute(sql, {
                "pid": PID, "tid": tid, "token": 1, "now": now, "at": at,
                "msg": ERROR.message, "typ": ERROR.type,
                "d1": _EVENT_FAILED, "d2": retried_data(at), "d3": _EVENT_PROGRESS,
            }).fetchone()  # fmt: skip
            if row != (1, 1, 1, 1, 1, 3):
                raise RuntimeError(f"floor fail of {tid} wrote {row}")

        return fail

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


def pg_delays(schema: str) -> list[tuple[str, float, float]]:
    """``(task, failed_at, available_at)`` (epoch seconds) of every automatic retry."""
    import psycopg

    with psycopg.connect(dsn(), autocommit=True) as conn:
        rows = conn.execute(
            f"SELECT task_id, extract(epoch FROM dispatched_at)::float8,"
            f' extract(epoch FROM available_at)::float8 FROM "{schema}".attempts'
            " WHERE number = 2"
        ).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


# -- SQLite -------------------------------------------------------------------------


def sqlite_side(path: Path, count: int) -> tuple[Any, list[str]]:
    from deepwork_retry.storage.sqlite import SQLiteStorage

    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    storage = SQLiteStorage(path, synchronous="NORMAL")
    ids = fill(storage, count)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(
            "INSERT INTO attempts (project_id, task_id, number, triggered_by, dispatched_at,"
            " available_at, started_at) SELECT project_id, id, attempt, 'initial', started_at,"
            " started_at, started_at FROM tasks"
        )
    finally:
        conn.close()
    return storage, ids


def _us(at: datetime) -> int:
    return round(at.timestamp() * 1_000_000)


class SqliteFloor:
    """One sqlite3 connection per thread, one ``BEGIN IMMEDIATE`` transaction per failure."""

    def __init__(self, path: Path) -> None:
        self.conns = []
        for _ in range(THREADS):
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 10000")
            conn.execute("PRAGMA synchronous = NORMAL")
            self.conns.append(conn)
        self.rng = random.Random()

    def op(self, i: int) -> Callable[[str], None]:
        conn, rng = self.conns[i], self.rng

        def fail(tid: str) -> None:
            now = datetime.now(timezone.utc)
            at = retry_at(now, rng)
            n, a = _us(now), _us(at)
            conn.execute("BEGIN IMMEDIATE")
            try:
                cur = conn.execute(
                    "UPDATE tasks SET status = 'assigned', retry_count = retry_count + 1,"
                    " retries_left = retries_left - 1, error_message = ?, error_type = ?,"
                    " attempt = attempt + 1, lease_expires_at = NULL, updated_at = ?,"
                    " version = version + 1 WHERE project_id = ? AND id = ?"
                    " AND status = 'in_progress' AND attempt = 1",
                    (ERROR.message, ERROR.type, n, PID, tid),
                )
                if cur.rowcount != 1:
                    raise RuntimeError(f"floor fail of {tid}: task not running")
                conn.execute(
                    "UPDATE attempts SET finished_at = ?, outcome = 'failed', error_type = ?,"
                    " error_message = ? WHERE project_id = ? AND task_id = ? AND number = 1",
                    (n, ERROR.type, ERROR.message, PID, tid),
                )
                conn.execute(
                    "INSERT INTO attempts (project_id, task_id, number, triggered_by,"
                    " dispatched_at, available_at) VALUES (?, ?, 2, 'auto_retry', ?, ?)",
                    (PID, tid, n, a),
                )
                conn.execute(
                    "INSERT INTO outbox (project_id, task_id, attempt, state, available_at,"
                    " created_at, tries, pending_seq) VALUES (?, ?, 2, 'pending', ?, ?, 0,"
                    " COALESCE((SELECT pending_seq FROM outbox WHERE state = 'pending'"
                    " ORDER BY pending_seq DESC LIMIT 1), 0) + 1)",
                    (PID, tid, a, n),
                )
                seq = conn.execute(
                    "UPDATE projects SET in_progress = in_progress - 1, assigned = assigned + 1,"
                    " event_seq = event_seq + 3 WHERE id = ? RETURNING event_seq",
                    (PID,),
                ).fetchone()[0]
                conn.executemany(
                    "INSERT INTO events (project_id, seq, type, task_id, attempt, at, data)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (PID, seq - 2, "attempt.failed", tid, 1, n, _EVENT_FAILED),
                        (PID, seq - 1, "task.retried", tid, 2, n, retried_data(at)),
                        (PID, seq, "project.progress", tid, 2, n, _EVENT_PROGRESS),
                    ],
                )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

        return fail

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


def sqlite_delays(path: Path) -> list[tuple[str, float, float]]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT task_id, dispatched_at, available_at FROM attempts WHERE number = 2"
        ).fetchall()
    finally:
        conn.close()
    return [(r[0], r[1] / 1e6, r[2] / 1e6) for r in rows]


# -- the storm ----------------------------------------------------------------------


class Recorder:
    """A dispatcher noting the wall-clock time each entry arrived, and repeats."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.repeats = 0

    def dispatch(self, entry: Any) -> None:
        if entry.task_id in self.at:
            self.repeats += 1
        else:
            self.at[entry.task_id] = time.time()


def storm(
    ids: Sequence[str], ops: Sequence[Callable[[str], None]], relay_storage: Any, count: int
) -> dict[str, Any]:
    """Fail every task from ``THREADS`` threads while a relay delivers the retries."""
    recorder = Recorder()
    relay = OutboxRelay(relay_storage, recorder, batch=100, poll_interval=0.05)
    stop = threading.Event()
    relay_thread = threading.Thread(target=relay.run, args=(stop,), name="storm-relay")
    relay_thread.start()
    latencies: list[list[float]] = [[] for _ in range(THREADS)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(THREADS + 1)

    def work(i: int) -> None:
        op, mine, clock = ops[i], ids[i::THREADS], time.perf_counter_ns
        barrier.wait()
        try:
            for tid in mine:
                t0 = clock()
                op(tid)
                latencies[i].append((clock() - t0) / 1000)
        except BaseException as exc:  # noqa: BLE001 - reported after the run
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    try:
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        deadline = time.monotonic() + INITIAL + JITTER + 15
        while len(recorder.at) < count and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        relay_thread.join(timeout=30)
    if errors:
        raise errors[0]
    return {
        "seconds": elapsed,
        "rate": count / elapsed,
        "latency_us": [x for lat in latencies for x in lat],
        "delivered_at": recorder.at,
        "repeats": recorder.repeats,
    }


def quantile_error(delays: Sequence[float]) -> tuple[float, list[float]]:
    """Largest gap (s) between the quantiles of ``delays`` and the policy's, and the quantiles."""
    observed = [percentile(delays, q * 100) for q in QUANTILES]
    gaps = [abs(o - (INITIAL + q * JITTER)) for o, q in zip(observed, QUANTILES, strict=True)]
    return max(gaps) if gaps else float("nan"), observed


def sampling_error(size: int, draws: int = 20) -> float:
    """The median of :func:`quantile_error` over ``draws`` samples of ``size`` drawn from the
    policy's distribution itself: the gap that sampling alone gives at this size."""
    rng = random.Random(14)
    errors = sorted(
        quantile_error([INITIAL + rng.random() * JITTER for _ in range(size)])[0]
        for _ in range(draws)
    )
    return errors[len(errors) // 2]


def spread_rows(store: str, count: int, result: dict[str, Any], delays: list[Any]) -> list[Row]:
    """The library's re-dispatch delays against the policy's distribution."""
    intended = [avail - failed for _, failed, avail in delays]
    delivered_at = result["delivered_at"]
    delivered = [delivered_at[t] - failed for t, failed, _ in delays if t in delivered_at]
    lag = [delivered_at[t] - avail for t, _, avail in delays if t in delivered_at]
    policy = Figure("policy: 0.5 s + U(0,1) x 1.0 s (quantiles)", "us")
    policy.samples = [(INITIAL + q * JITTER) * 1e6 for q in QUANTILES]
    rows = []
    for name, values in (
        ("failure -> available_at", intended),
        ("failure -> delivered by relay", delivered),
    ):
        error, observed = quantile_error(values)
        reference = sampling_error(len(values))
        fig = Figure(f"observed {name}", "us", [v * 1e6 for v in values])
        fig.extra.update(
            count=len(values),
            expected=count,
            quantiles_s=observed,
            max_quantile_error_s=error,
            max_quantile_error_of_jitter=error / JITTER,
            sampling_error_s=reference,
        )
        if "delivered" in name:
            fig.extra.update(
                missing=count - len(values),
                repeats=result["repeats"],
                lag_after_available_s={
                    "p50": percentile(lag, 50),
                    "p99": percentile(lag, 99),
                    "max": max(lag) if lag else float("nan"),
                },
                relay_poll_interval_s=0.05,
            )
        note = (
            f"max quantile error {error * 1000:.1f} ms ({error / JITTER:.1%} of the jitter;"
            f" sampling alone gives {reference * 1000:.1f} ms at this size)"
        )
        if "delivered" in name:
            note += (
                f"; relay lag after available_at p50 {percentile(lag, 50) * 1000:.0f} ms,"
                f" p99 {percentile(lag, 99) * 1000:.0f} ms; {count - len(values)} missing,"
                f" {result['repeats']} repeats"
            )
        rows.append(
            Row(GROUP, f"storm spread {name}, {store}", fig, policy,
                target="report: max quantile error", note=note)
        )  # fmt: skip
    return rows


def compare(
    store: str,
    count: int,
    lib_setup: Callable[[], tuple[Any, list[str]]],
    floor_setup: Callable[[], tuple[Any, list[str], Any]],
    delays_of: Callable[[str], list[Any]],
) -> list[Row]:
    """Library and floor storms on twin stores, then the spread of the library's retries."""
    t0 = time.perf_counter()
    storage, ids = lib_setup()
    floor_relay_storage, floor_ids, floor = floor_setup()
    setup_s = time.perf_counter() - t0
    lib = Figure(f"ExecutorService.fail x{THREADS} threads", "failures/s")
    ref = Figure(f"bare statements x{THREADS} threads", "failures/s")
    results: dict[str, dict[str, Any]] = {}
    service = ExecutorService(storage, policy=POLICY)

    def lib_op(_i: int) -> Callable[[str], None]:
        return lambda tid: (service.fail(PID, tid, 1, ERROR), None)[1]

    def run_side(fig: Figure, name: str, ops: Any, relay_storage: Any, ids: list[str]) -> Any:
        def run(_r: int) -> list[float]:
            result = storm(ids, [ops(i) for i in range(THREADS)], relay_storage, count)
            results[name] = result
            lat = result["latency_us"]
            fig.extra.update(
                failures=count, threads=THREADS, seconds=result["seconds"], setup_s=setup_s,
                latency_p50_us=percentile(lat, 50), latency_p99_us=percentile(lat, 99),
                latency_us=lat, relay_delivered=len(result["delivered_at"]),
                relay_repeats=result["repeats"],
            )  # fmt: skip
            return [result["rate"]]

        return run

    try:
        alternate(
            [
                (lib, run_side(lib, "lib", lib_op, storage, ids)),
                (ref, run_side(ref, "floor", floor.op, floor_relay_storage, floor_ids)),
            ],
            1,
        )
        rows = [
            Row(GROUP, f"storm: {count:,} failures at once, {store}", lib, ref,
                target="report", note=f"{THREADS} threads; relay delivering meanwhile")
        ]  # fmt: skip
        rows += spread_rows(store, count, results["lib"], delays_of("lib"))
        floor_delays = delays_of("floor")
        error, _ = quantile_error([a - f for _, f, a in floor_delays])
        ref.extra["floor_available_at_max_quantile_error_s"] = error
        return rows
    finally:
        floor.close()
        for st in (storage, floor_relay_storage):
            with contextlib.suppress(Exception):
                st.close()


def run(quick: bool, scratch: Path, logs: Path) -> list[Row]:
    """The group's rows (sizes smaller with ``quick``)."""
    count = 2_500 if quick else 10_000
    rows: list[Row] = []
    reason = pg_reachable()
    if reason:
        rows.append(unavailable(GROUP, f"storm: {count:,} failures at once, PostgreSQL", reason))
    else:
        import psycopg

        from deepwork_retry.storage.postgres import PostgresStorage

        schemas = {"lib": "bench_storm_lib", "floor": "bench_storm_floor"}

        def pg_floor() -> tuple[Any, list[str], Any]:
            storage, ids = pg_side(schemas["floor"], count)
            storage.close()
            relay_storage = PostgresStorage(dsn(), schema=schemas["floor"], min_size=1, max_size=1)
            return relay_storage, ids, PgFloor(schemas["floor"])

        try:
            rows += compare(
                "PostgreSQL", count, lambda: pg_side(schemas["lib"], count), pg_floor,
                lambda side: pg_delays(schemas[side]),
            )  # fmt: skip
        except psycopg.OperationalError as exc:
            # The server's connections are shared: a full server leaves the SQLite rows to run.
            rows.append(
                unavailable(GROUP, f"storm: {count:,} failures at once, PostgreSQL",
                            f"{type(exc).__name__}: {exc}")
            )  # fmt: skip
        finally:
            with psycopg.connect(dsn(), autocommit=True) as conn:
                for schema in schemas.values():
                    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    paths = {"lib": scratch / "storm_lib.db", "floor": scratch / "storm_floor.db"}

    def sqlite_floor() -> tuple[Any, list[str], Any]:
        storage, ids = sqlite_side(paths["floor"], count)
        return storage, ids, SqliteFloor(paths["floor"])

    rows += compare(
        "SQLite NORMAL", count, lambda: sqlite_side(paths["lib"], count), sqlite_floor,
        lambda side: sqlite_delays(paths[side]),
    )  # fmt: skip
    return rows
