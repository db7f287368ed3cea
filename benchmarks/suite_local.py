"""In-process benchmarks: in-memory and SQLite manual retry against their floors.

- memory: ``RetryService(MemoryStorage()).retry`` against a bare dict
  compare-and-set plus a counter update under a lock.
  Report rows show what bounds it: the pure decision alone
  (``decide.manual_retry``, no storage), the creation of one frozen ``Task``,
  and the four values every retry records or returns (the new task, its
  attempt record, its outbox entry, the shifted progress) built with no logic.
- sqlite: ``RetryService(SQLiteStorage(synchronous=S)).retry`` against the bare
  retry transaction written with ``sqlite3`` directly (``BEGIN IMMEDIATE``, one
  ``UPDATE ... RETURNING``, one counters update, one outbox insert,
  ``COMMIT``) on a twin file of the same schema and content, WAL, same
  ``synchronous``. A report row runs the library's own statements alone (same
  texts, parameters computed beforehand, no decision and no row decoding), on
  a third twin file: the SQL part of the library's cost.
- sqlite scale: the library's retry in projects of 10 .. 1,000,000 tasks,
  each size alternated with the 10-task project.
- sqlite / memory concurrency: retries per second from 1..16 threads.
"""

from __future__ import annotations

import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from _fixtures import NOW, add_blocked, chunks, fill_sqlite, floor_events
from _harness import Figure, Row, alternate, per_op_rounds, rate_rounds

from deepwork_retry import RetryService, Task, TaskStatus
from deepwork_retry._core import decide, effects
from deepwork_retry._core import events as lifecycle
from deepwork_retry._core.model import Attempt, DispatchEntry, evolve_task
from deepwork_retry._core.states import DispatchState, RetryBudget, Trigger
from deepwork_retry.storage import sqlite as sqlite_storage
from deepwork_retry.storage._sql import common, statements
from deepwork_retry.storage.memory import MemoryStorage
from deepwork_retry.storage.sqlite import SQLiteStorage

MEMORY_BATCH = 20
"""In-memory operations are timed in batches: one call is too short for the clock alone."""


# -- in-memory -------------------------------------------------------------------------------
class DictFloor:
    """The least an in-memory retry can do: compare-and-set one record, move two counters."""

    def __init__(self, ids: Iterable[str]) -> None:
        self.lock = threading.Lock()
        self.tasks: dict[str, tuple[int, str, int]] = {tid: (1, "blocked", 0) for tid in ids}
        self.counters = {"blocked": len(self.tasks), "assigned": 0}

    def retry_task(self, _pid: str, tid: str) -> object:
        return self.retry(tid, 1)

    def retry(self, tid: str, version: int) -> tuple[int, str, int]:
        with self.lock:
            current = self.tasks[tid]
            if current[0] != version or current[1] != "blocked":
                raise RuntimeError("conflict")
            new = (version + 1, "assigned", current[2] + 1)
            self.tasks[tid] = new
            counters = self.counters
            counters["blocked"] -= 1
            counters["assigned"] += 1
            return new


def _batched(op: Callable[[str], object], ids: list[str]) -> list[float]:
    samples = []
    clock = time.perf_counter_ns
    for start in range(0, len(ids) - MEMORY_BATCH + 1, MEMORY_BATCH):
        batch = ids[start : start + MEMORY_BATCH]
        t0 = clock()
        for tid in batch:
            op(tid)
        samples.append((clock() - t0) / 1000 / MEMORY_BATCH)
    return samples


def memory(rounds: int, per_round: int) -> list[Row]:
    total = rounds * per_round
    storage = MemoryStorage()
    ids = add_blocked(storage, "p", total)
    service = RetryService(storage)
    floor = DictFloor(ids)
    slices = [ids[r * per_round : (r + 1) * per_round] for r in range(rounds)]
    # What bounds it: the decision alone on a blocked task (pure, so it can be
    # repeated on the same value), and one frozen Task built with the fields a
    # retry sets.
    spare = MemoryStorage()
    project, task = spare.load("q", add_blocked(spare, "q", 1)[0])

    def decision(_tid: str) -> object:
        return decide.manual_retry(task, project, now=NOW, blockers={})

    def one_task(tid: str) -> object:
        return Task(
            id=tid, project_id="p", status=TaskStatus.ASSIGNED, retry_count=2, max_retries=1,
            retries_left=0, attempt=1, created_at=NOW, updated_at=NOW, version=2,
        )  # fmt: skip

    progress = spare.progress("q")

    def four_values(tid: str) -> object:
        after = evolve_task(
            task, status=TaskStatus.ASSIGNED, retry_count=task.retry_count + 1, retries_left=0,
            attempt=task.attempt + 1, updated_at=NOW, version=task.version + 1,
        )  # fmt: skip
        record = Attempt(
            task_id=tid, project_id="q", number=after.attempt, trigger=Trigger.MANUAL_RETRY,
            dispatched_at=NOW, available_at=NOW, budget=RetryBudget.ONE_MORE,
        )  # fmt: skip
        entry = DispatchEntry(
            project_id="q", task_id=tid, attempt=after.attempt, state=DispatchState.PENDING,
            available_at=NOW, created_at=NOW,
        )  # fmt: skip
        return after, record, entry, progress.shifted(TaskStatus.BLOCKED, TaskStatus.ASSIGNED)

    plan = decide.manual_retry(task, project, now=NOW, blockers={})

    def retry_events(_tid: str) -> object:
        return lifecycle.events_of(plan)

    lib = Figure("RetryService(MemoryStorage).retry", "us")
    ref = Figure("dict CAS + counters under a lock", "us")
    pure = Figure("decide.manual_retry alone (no storage, no service)", "us")
    evs = Figure("events_of(plan) alone: the retry's two lifecycle events", "us")
    value = Figure("one frozen Task(...)", "us")
    values = Figure("new Task, Attempt, DispatchEntry and Progress, no logic", "us")
    alternate(
        [
            (lib, lambda r: _batched(lambda tid: service.retry("p", tid), slices[r])),
            (ref, lambda r: _batched(lambda tid: floor.retry(tid, 1), slices[r])),
            (pure, lambda r: _batched(decision, slices[r])),
            (evs, lambda r: _batched(retry_events, slices[r])),
            (value, lambda r: _batched(one_task, slices[r])),
            (values, lambda r: _batched(four_values, slices[r])),
        ],
        rounds,
    )
    for fig in (lib, ref, pure, evs, value, values):
        fig.extra["batch"] = MEMORY_BATCH
    return [
        Row(
            "memory",
            "manual retry vs dict floor",
            lib,
            ref,
            target="≤ 10x",
            bound=10.0,
            note=f"{total} retries each side, timed in batches of {MEMORY_BATCH}",
        ),
        Row(
            "memory",
            "pure decision alone vs dict floor",
            pure,
            ref,
            target="report",
            note="decide.manual_retry on a blocked task: new task, attempt, outbox entry, plan",
        ),
        Row(
            "memory",
            "the retry's lifecycle events alone vs dict floor",
            evs,
            ref,
            target="report",
            note="events_of(plan): task.retried and project.progress, built, not stored",
        ),
        Row(
            "memory",
            "one frozen Task instance vs dict floor",
            value,
            ref,
            target="report",
            note="attrs frozen slotted class, 10 keyword arguments",
        ),
        Row(
            "memory",
            "the four values a retry keeps or returns vs dict floor",
            values,
            ref,
            target="report",
            note="what any retry returning values must build: the task, attempt, entry, progress",
        ),
    ]


# -- SQLite ----------------------------------------------------------------------------------
FLOOR_UPDATE = (
    "UPDATE tasks SET status = 'assigned', retry_count = retry_count + 1, "
    "retries_left = retries_left + 1, error_message = NULL, error_type = NULL, "
    "blocked_reason = NULL, attempt = attempt + 1, updated_at = ?, version = version + 1 "
    "WHERE project_id = ? AND id = ? AND version = ? AND status = 'blocked' "
    "RETURNING attempt, version"
)
FLOOR_COUNTERS = "UPDATE projects SET blocked = blocked - 1, assigned = assigned + 1 WHERE id = ?"
FLOOR_OUTBOX = (
    "INSERT INTO outbox (project_id, task_id, attempt, state, available_at, created_at, tries, "
    "pending_seq) VALUES (?, ?, ?, 'pending', ?, ?, 0, ?)"
)


class LibraryStatements:
    """The library's one-step retry statements alone, parameters computed beforehand.

    The same texts the SQLite storage runs, on one cursor as it does
    (``BEGIN IMMEDIATE``, the guarded task update, the counters update, the
    read back of what changed, the outbox and attempt inserts, ``COMMIT``)
    without the checks, the encoding and the decoding: the SQL share of the
    library's retry.
    """

    def __init__(self, path: Path, synchronous: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute(f"PRAGMA synchronous = {synchronous}")
        self.conn.execute("PRAGMA busy_timeout = 5000")
        # The library's own statements, rendered from the core's description of the move.
        self.statements = sqlite_storage._ENGINE.retry_sql(effects.MANUAL_RETRY)
        self.insert_events = sqlite_storage._ENGINE.sql.insert_events(2)
        read_back = common.read_back(effects.MANUAL_RETRY)
        self.attempt_at = 1 + len(statements.COUNTERS) + read_back.index("attempt")

    def retry(self, pid: str, tid: str) -> None:
        r = self.statements
        cur = self.conn.cursor()
        now = int(time.time() * 1e6)
        cur.execute("BEGIN IMMEDIATE")
        try:
            if not cur.execute(r.update["blocked"], (False, now, pid, tid)).rowcount:
                raise RuntimeError(f"task {tid} not blocked")
            cur.execute(r.shift_events["blocked"], (2, pid))
            row = cur.execute(r.read, (pid, tid)).fetchall()[0]
            attempt, last = row[self.attempt_at], row[r.count_at + 1]
            cur.execute(r.insert_pending, (pid, tid, attempt, now, None, (last or 0) + 1, None))
            cur.execute(r.insert_attempt, (pid, tid, attempt, now, None, None, "one_more"))
            seq = row[r.count_at + 2] - 2
            cur.execute(self.insert_events, floor_events(pid, tid, attempt, now, seq))
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.conn.close()


class SQLiteFloor:
    """The bare retry transaction with ``sqlite3`` on a file of the library's schema."""

    def __init__(self, path: Path, synchronous: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute(f"PRAGMA synchronous = {synchronous}")
        self.conn.execute("PRAGMA busy_timeout = 5000")
        self.seq = 1_000_000

    def retry(self, pid: str, tid: str) -> None:
        conn = self.conn
        now = int(time.time() * 1e6)
        self.seq += 1
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(FLOOR_UPDATE, (now, pid, tid, 1)).fetchone()
            if row is None:
                raise RuntimeError(f"task {tid} not blocked")
            conn.execute(FLOOR_COUNTERS, (pid,))
            conn.execute(FLOOR_OUTBOX, (pid, tid, row[0], now, now, self.seq))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.conn.close()


def _sqlite_twins(
    tmp: Path,
    name: str,
    synchronous: str,
    projects: int,
    per_project: int,
    filler: int = 0,
    extra: tuple[str, ...] = (),
) -> tuple[SQLiteStorage, Path, list[tuple[str, str]]]:
    """Files of identical content: one for the library, one for the floor (and ``extra``)."""
    items: list[tuple[str, str]] = []
    storage: SQLiteStorage | None = None
    for side in ("lib", "floor", *extra):
        path = tmp / f"{name}-{side}.db"
        st = SQLiteStorage(path, synchronous=synchronous)  # type: ignore[arg-type]
        items = []
        for p in range(projects):
            pid = f"p{p:05d}"
            items.extend((pid, tid) for tid in add_blocked(st, pid, per_project))
            fill_sqlite(path, pid, filler)
        if side == "lib":
            storage = st
        else:
            st.close()
    assert storage is not None
    return storage, tmp / f"{name}-floor.db", items


def sqlite(rounds: int, per_round: int, tmp: Path) -> list[Row]:
    rows = []
    for synchronous in ("NORMAL", "FULL"):
        count = per_round if synchronous == "NORMAL" else max(50, per_round // 4)
        storage, floor_path, items = _sqlite_twins(
            tmp, f"tx-{synchronous}", synchronous, 1, rounds * count, extra=("sql",)
        )
        service = RetryService(storage)
        floor = SQLiteFloor(floor_path, synchronous)
        bare = LibraryStatements(tmp / f"tx-{synchronous}-sql.db", synchronous)
        slices = chunks(items, rounds)
        lib = Figure(f"RetryService(SQLiteStorage({synchronous})).retry", "us")
        ref = Figure(f"bare sqlite3 retry transaction ({synchronous})", "us")
        sql = Figure(f"the library's statements alone ({synchronous})", "us")
        alternate(
            [
                (lib, per_op_rounds(service.retry, slices)),
                (ref, per_op_rounds(floor.retry, slices)),
                (sql, per_op_rounds(bare.retry, slices)),
            ],
            rounds,
        )
        statements = _count_statements(storage)
        lib.extra["statements_per_retry"] = statements
        ref.extra["statements_per_retry"] = 5
        rows.append(
            Row(
                "sqlite",
                f"manual retry, synchronous={synchronous}",
                lib,
                ref,
                target="≤ 1.5x",
                bound=1.5,
                note=f"WAL; library runs {statements} SQL statements per retry, floor 5",
            )
        )
        rows.append(
            Row(
                "sqlite",
                f"library's SQL alone, synchronous={synchronous}",
                sql,
                ref,
                target="report",
                note=f"the library's {statements} statements with precomputed parameters",
            )
        )
        storage.close()
        floor.close()
        bare.close()
    return rows


def _count_statements(storage: SQLiteStorage) -> int:
    """SQL statements one library retry executes (sqlite3's trace callback)."""
    pid, ids = "count", None
    ids = add_blocked(storage, pid, 1)
    seen: list[str] = []
    conn = storage._checkout()
    conn.set_trace_callback(seen.append)
    storage._checkin(conn)
    try:
        RetryService(storage).retry(pid, ids[0])
    finally:
        conn.set_trace_callback(None)
    return len(seen)


def sqlite_scale(rounds: int, per_round: int, sizes: list[int], tmp: Path) -> list[Row]:
    """Retry cost by project size (NORMAL), each size alternated with the 10-task baseline."""
    rows = []
    small_projects = max(1, (rounds * per_round) // 10)
    base = SQLiteStorage(tmp / "scale-10.db", synchronous="NORMAL")
    base_items: list[tuple[str, str]] = []
    for p in range(small_projects * max(1, len([s for s in sizes if s != 10]))):
        pid = f"s{p:06d}"
        base_items.extend((pid, tid) for tid in add_blocked(base, pid, 10))
    base_service = RetryService(base)
    used = 0
    for size in sizes:
        if size == 10:
            continue
        path = tmp / f"scale-{size}.db"
        st = SQLiteStorage(path, synchronous="NORMAL")
        t0 = time.perf_counter()
        ids = add_blocked(st, "big", rounds * per_round)
        fill_sqlite(path, "big", size - len(ids))
        built = time.perf_counter() - t0
        service = RetryService(st)
        big = chunks([("big", tid) for tid in ids], rounds)
        small = chunks(base_items[used : used + rounds * per_round], rounds)
        used += rounds * per_round
        lib = Figure(f"SQLite retry, {size:,} tasks/project", "us", extra={"build_s": built})
        ref = Figure("SQLite retry, 10 tasks/project", "us")
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
                f"sqlite {size:,} vs 10 tasks/project",
                lib,
                ref,
                target="≤ 1.2x" if size >= 1_000_000 else "flat",
                bound=1.2,
                note="synchronous=NORMAL",
            )
        )
        st.close()
    base.close()
    return rows


def _split(
    items: list[tuple[str, str]], projects: int, n: int, rounds: int, per_client: int
) -> list[list[list[tuple[str, str]]]]:
    """``[round][client]`` slices: one shared project, or one project per client."""
    if projects == 1:
        return [
            [items[(r * n + c) * per_client : (r * n + c + 1) * per_client] for c in range(n)]
            for r in range(rounds)
        ]
    size = len(items) // projects
    own = [items[c * size : (c + 1) * size] for c in range(n)]
    return [
        [own[c][r * per_client : (r + 1) * per_client] for c in range(n)] for r in range(rounds)
    ]


def sqlite_concurrency(rounds: int, per_client: int, clients: list[int], tmp: Path) -> list[Row]:
    """Retries/s from N threads, library against the bare transaction, NORMAL."""
    rows = []
    for layout in ("same project", "separate projects"):
        for n in clients:
            projects = 1 if layout == "same project" else n
            storage, floor_path, items = _sqlite_twins(
                tmp,
                f"conc-{layout[:4]}-{n}",
                "NORMAL",
                projects,
                rounds * per_client * n // projects,
            )
            service = RetryService(storage)
            floors = [SQLiteFloor(floor_path, "NORMAL") for _ in range(n)]
            work = _split(items, projects, n, rounds, per_client)
            lib = Figure(f"SQLite library, {n} threads, {layout}", "ops/s")
            ref = Figure(f"bare sqlite3 transaction, {n} threads, {layout}", "ops/s")
            lib_ops: list[Callable[[str, str], object]] = [service.retry] * n
            floor_ops: list[Callable[[str, str], object]] = [f.retry for f in floors]
            alternate(
                [
                    (lib, rate_rounds(work, lib_ops)),
                    (ref, rate_rounds(work, floor_ops)),
                ],
                rounds,
            )
            rows.append(
                Row(
                    "concurrency",
                    f"sqlite NORMAL, {n} clients, {layout}",
                    lib,
                    ref,
                    target="report",
                    sense="min",
                    note="threads of one process; SQLite admits one writer at a time",
                )
            )
            storage.close()
            for f in floors:
                f.close()
    return rows


def memory_concurrency(rounds: int, per_client: int, clients: list[int]) -> list[Row]:
    rows = []
    for n in clients:
        storage = MemoryStorage()
        ids = add_blocked(storage, "p", rounds * n * per_client)
        floor = DictFloor(ids)
        service = RetryService(storage)
        work = _split([("p", tid) for tid in ids], 1, n, rounds, per_client)
        lib = Figure(f"memory library, {n} threads", "ops/s")
        ref = Figure(f"dict floor, {n} threads", "ops/s")
        lib_ops: list[Callable[[str, str], object]] = [service.retry] * n
        floor_ops: list[Callable[[str, str], object]] = [floor.retry_task] * n
        alternate(
            [
                (lib, rate_rounds(work, lib_ops)),
                (ref, rate_rounds(work, floor_ops)),
            ],
            rounds,
        )
        rows.append(
            Row(
                "concurrency",
                f"memory, {n} clients, same project",
                lib,
                ref,
                target="report",
                sense="min",
                note="threads share one interpreter lock",
            )
        )
    return rows


def scratch() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="deepwork-bench-")


_ = NOW
