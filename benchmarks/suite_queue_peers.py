"""RQ and Huey, the Redis task queues a user might pick instead, against the library.

Each peer runs in its own virtualenv (``benchmarks/.peers/rq``, ``.../huey``) behind a
driver script in ``benchmarks/peers/`` spoken to over pipes; every peer-side time is
taken in the peer's own process. Both peers use one Redis database of this group's
own (``redis://127.0.0.1:6379/14`` unless ``$DEEPWORK_BENCH_QPEERS_REDIS`` says
otherwise), flushed before and after.

- manual retry latency: the library's ``RetryService.retry`` of a blocked task on
  SQLite ``synchronous=NORMAL`` (the nearest durability to a Redis that keeps nothing
  on disk), SQLite ``FULL`` and PostgreSQL, against RQ's
  ``FailedJobRegistry.requeue(job_id)`` of a failed job and Huey's
  ``Result.reschedule()`` of a failed task; all sides in the same alternating rounds.
- retry → worker start: from the call until the job body starts running. Peers: a
  real worker process of the peer (RQ's default ``Worker``, which forks a work horse
  per job, and RQ's ``SimpleWorker``, which does not; Huey's consumer with one
  worker thread) picks the job from Redis; the body's first line takes
  ``time.monotonic_ns()``. Library: ``RetryService(SQLiteStorage(NORMAL),
  ThreadPoolDispatcher(fn))``, in one process; ``fn``'s first line takes the time.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import _peers
import suite_local
import suite_pg
from _fixtures import add_blocked, chunks
from _harness import Figure, Row, alternate, per_op_rounds, unavailable

from deepwork_retry import RetryService
from deepwork_retry.dispatch.threads import ThreadPoolDispatcher
from deepwork_retry.storage.sqlite import SQLiteStorage

GROUP = "queue-peers"
HERE = Path(__file__).resolve().parent
PEERS = ("rq", "huey")
CALLS = {
    "rq": "RQ FailedJobRegistry.requeue",
    "huey": "Huey Result.reschedule",
}
WORKERS = (  # (peer, queue and worker kind, what the worker is)
    ("rq", "worker", "RQ Worker (forks a work horse per job)"),
    ("rq", "simple", "RQ SimpleWorker (no fork)"),
    ("huey", "worker", "Huey consumer (1 worker thread)"),
)
PG_SCHEMA = "bench_qpeers_pg"
WARMUP = 5


def redis_url() -> str:
    return os.environ.get("DEEPWORK_BENCH_QPEERS_REDIS", "redis://127.0.0.1:6379/14")


def flush_redis() -> str | None:
    """Empty this group's Redis database; ``None`` when done, else why not."""
    try:
        import redis

        conn = redis.Redis.from_url(redis_url(), socket_timeout=5)
        conn.flushdb()
        conn.close()
    except Exception as exc:  # noqa: BLE001 - any failure makes the peers unavailable
        return f"Redis at {redis_url()} unusable: {type(exc).__name__}: {exc}"[:160]
    return None


class PeerDriver:
    """One peer's driver process (``peers/<name>_driver.py``), spoken to over pipes."""

    def __init__(self, name: str, python: Path, logs: Path) -> None:
        self.name = name
        self.log = (logs / f"queue-peers-{name}.log").open("wb")
        self.proc = subprocess.Popen(
            [str(python), str(HERE / "peers" / f"{name}_driver.py"), redis_url()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=HERE / "peers",
            env={**os.environ, "BENCH_QPEERS_REDIS": redis_url()},
        )

    def ask(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"{self.name} driver exited; see {self.log.name}")
        result: dict[str, Any] = json.loads(answer)
        if "error" in result:
            raise RuntimeError(f"{self.name} driver: {result['error']}")
        return result

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, BrokenPipeError, ValueError, OSError):
            self.ask("quit")
        stop(self.proc)
        self.log.close()


def stop(proc: subprocess.Popen[Any]) -> None:
    """End a process this group started: SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def start_worker(
    name: str, kind: str, python: Path, logs: Path
) -> tuple[subprocess.Popen[Any], Any]:
    log = (logs / f"queue-peers-{name}-{kind}.log").open("wb")
    proc = subprocess.Popen(
        [str(python), str(HERE / "peers" / f"{name}_driver.py"), redis_url(), kind],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=HERE / "peers",
        env={**os.environ, "BENCH_QPEERS_REDIS": redis_url()},
    )
    return proc, log


class InProcessStart:
    """The library's retry → executor start: a thread pool dispatcher whose ``fn`` notes
    the time it starts (``perf_counter_ns``, one process) and hands it back."""

    def __init__(self, storage: SQLiteStorage) -> None:
        self.started: list[int] = []
        self.ready = threading.Semaphore(0)
        self.dispatcher = ThreadPoolDispatcher(self._fn, max_workers=1)
        self.service = RetryService(storage, self.dispatcher)
        self.call_us: list[float] = []

    def _fn(self, _entry: object) -> None:
        self.started.append(time.perf_counter_ns())
        self.ready.release()

    def one(self, pid: str, tid: str) -> float:
        t0 = time.perf_counter_ns()
        self.service.retry(pid, tid)
        t1 = time.perf_counter_ns()
        if not self.ready.acquire(timeout=30):
            raise TimeoutError("the executor did not start in 30 s")
        self.call_us.append((t1 - t0) / 1000)
        return (self.started[-1] - t0) / 1000

    def round(self, items: list[tuple[str, str]]) -> list[float]:
        return [self.one(pid, tid) for pid, tid in items]

    def close(self) -> None:
        self.dispatcher.shutdown()


def _sizes(quick: bool) -> tuple[int, int, int, int, int]:
    """(rounds, per round, FULL and PostgreSQL per round, worker rounds, worker per round)."""
    return (6, 50, 10, 3, 10) if quick else (20, 150, 40, 10, 25)


def run(quick: bool, scratch: Path, logs: Path) -> list[Row]:
    """The group's rows (sizes smaller with ``quick``)."""
    rounds, per_round, full_per_round, w_rounds, w_per_round = _sizes(quick)
    pythons: dict[str, Path] = {}
    rows: list[Row] = []
    for name in PEERS:
        got = _peers.ensure(name)
        if isinstance(got, str):
            rows.append(unavailable(GROUP, f"manual retry vs {CALLS[name]}", got, "≤ 1.0x"))
        else:
            pythons[name] = got
    if not pythons:
        return rows
    reason = flush_redis()
    if reason:
        return rows + [
            unavailable(GROUP, f"manual retry vs {CALLS[n]}", reason, "≤ 1.0x") for n in pythons
        ]
    drivers: dict[str, PeerDriver] = {}
    workers: list[tuple[subprocess.Popen[Any], Any]] = []
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        for name, python in pythons.items():
            drivers[name] = PeerDriver(name, python, logs)
        rows += latency(drivers, rounds, per_round, full_per_round, scratch)
        seconds["manual retry latency"] = time.perf_counter() - t0
        # Failed first, by each driver, then the workers start: none takes a job early.
        for name, kind, _ in WORKERS:
            if name in drivers:
                _failed_jobs({name: drivers[name]}, kind, WARMUP + w_rounds * w_per_round)
        for name, kind, _ in WORKERS:
            if name in pythons:
                workers.append(start_worker(name, kind, pythons[name], logs))
        seconds["worker setup"] = time.perf_counter() - t0 - sum(seconds.values())
        rows += worker_start(drivers, w_rounds, w_per_round, scratch)
        seconds["retry to worker start"] = time.perf_counter() - t0 - sum(seconds.values())
        for row in rows:
            if row.library is not None:
                row.library.extra["group_seconds"] = seconds
    finally:
        for driver in drivers.values():
            driver.close()
        for proc, log in workers:
            stop(proc)
            log.close()
        flush_redis()
    return rows


def _failed_jobs(drivers: dict[str, PeerDriver], queue: str, count: int) -> dict[str, int]:
    made = {}
    for name, driver in drivers.items():
        made[name] = driver.ask(f"setup {queue} {count}")["ok"]
        if made[name] < count:
            raise RuntimeError(f"{name}: only {made[name]} of {count} jobs failed in setup")
    return made


def latency(
    drivers: dict[str, PeerDriver],
    rounds: int,
    per_round: int,
    full_per_round: int,
    scratch: Path,
) -> list[Row]:
    """The manual retry call alone, every side in the same alternating rounds."""
    started = time.perf_counter()
    facts = {name: driver.ask("facts") for name, driver in drivers.items()}
    made = _failed_jobs(drivers, "call", rounds * per_round)
    sides: list[tuple[Figure, Any]] = []
    libs: dict[str, Figure] = {}
    closers: list[Any] = []
    for sync, count in (("NORMAL", per_round), ("FULL", full_per_round)):
        storage = SQLiteStorage(scratch / f"qpeers-{sync}.db", synchronous=sync)  # type: ignore[arg-type]
        closers.append(storage.close)
        items = [("p", tid) for tid in add_blocked(storage, "p", rounds * count)]
        fig = Figure(f"RetryService(SQLiteStorage({sync})).retry", "us")
        fig.extra.update(per_round=count, rounds=rounds, journal="WAL", synchronous=sync)
        libs[sync] = fig
        sides.append((fig, per_op_rounds(RetryService(storage).retry, chunks(items, rounds))))
    # Where the NORMAL retry's time goes, on twin files of the same content: the sqlite
    # group's bare retry transaction, and the library's own statements alone.
    twin, floor_path, items = suite_local._sqlite_twins(
        scratch, "qpeers-twins", "NORMAL", 1, rounds * per_round, extra=("sql",)
    )
    twin.close()
    floor = suite_local.SQLiteFloor(floor_path, "NORMAL")
    bare = suite_local.LibraryStatements(scratch / "qpeers-twins-sql.db", "NORMAL")
    closers += [floor.close, bare.close]
    parts = {
        "floor": Figure("bare sqlite3 retry transaction (NORMAL), 5 statements", "us"),
        "sql": Figure("the library's statements alone (NORMAL)", "us"),
    }
    for key, op in (("floor", floor.retry), ("sql", bare.retry)):
        parts[key].extra.update(per_round=per_round, rounds=rounds)
        sides.append((parts[key], per_op_rounds(op, chunks(items, rounds))))
    pg_reason = suite_pg.reachable()
    if pg_reason is None:
        storage = suite_pg.pg_storage(PG_SCHEMA)
        closers.append(storage.close)
        closers.append(lambda: suite_pg.drop_schema(PG_SCHEMA))
        items = [("p", tid) for tid in add_blocked(storage, "p", rounds * full_per_round)]
        fig = Figure("RetryService(PostgresStorage).retry", "us")
        fig.extra.update(per_round=full_per_round, rounds=rounds, dsn=suite_pg.dsn())
        libs["PostgreSQL"] = fig
        sides.append((fig, per_op_rounds(RetryService(storage).retry, chunks(items, rounds))))
    refs: dict[str, Figure] = {}
    for name, driver in drivers.items():
        fig = Figure(CALLS[name], "us")
        fig.extra.update(per_round=per_round, rounds=rounds, failed_jobs=made[name], **facts[name])
        refs[name] = fig
        sides.append((fig, lambda _r, d=driver: d.ask(f"run {per_round}")["us"]))
    try:
        setup = time.perf_counter() - started
        alternate(sides, rounds)
        measured = time.perf_counter() - started - setup
        for fig, _ in sides:
            fig.extra.update(setup_seconds=setup, measured_seconds=measured)
    finally:
        for close in reversed(closers):
            close()
    rows = []
    for name, ref in refs.items():
        for storage_name, lib in libs.items():
            nearest = storage_name == "NORMAL"
            rows.append(
                Row(
                    GROUP,
                    f"manual retry ({storage_name}) vs {CALLS[name]}",
                    lib,
                    ref,
                    target="≤ 1.0x latency" if nearest else "report",
                    bound=1.0 if nearest else None,
                    note="Redis here: no AOF, no RDB; a requeue acknowledged is not on disk",
                )
            )
        if pg_reason is not None:
            rows.append(
                unavailable(GROUP, f"manual retry (PostgreSQL) vs {CALLS[name]}", pg_reason)
            )
        for key, what in (("floor", "bare SQLite retry"), ("sql", "library's SQL alone")):
            rows.append(
                Row(
                    GROUP,
                    f"{what} (NORMAL) vs {CALLS[name]}",
                    parts[key],
                    ref,
                    target="report",
                    note="what bounds the NORMAL row: the storage's own work without the library",
                )
            )
    return rows


def worker_start(
    drivers: dict[str, PeerDriver], rounds: int, per_round: int, scratch: Path
) -> list[Row]:
    """Retry → the job body starts, in alternating rounds; a warm-up round first."""
    storage = SQLiteStorage(scratch / "qpeers-start.db", synchronous="NORMAL")
    ours = InProcessStart(storage)
    try:
        items = [("p", tid) for tid in add_blocked(storage, "p", WARMUP + rounds * per_round)]
        ours.round(items[:WARMUP])
        ours.call_us.clear()
        lib = Figure("retry → ThreadPoolDispatcher fn starts (SQLite NORMAL)", "us")
        refs: dict[str, Figure] = {}
        calls: dict[str, list[float]] = {}
        slices = chunks(items[WARMUP:], rounds)
        sides: list[tuple[Figure, Any]] = [(lib, lambda r: ours.round(slices[r]))]
        for name, kind, what in WORKERS:
            if name not in drivers:
                continue
            driver = drivers[name]
            driver.ask(f"start {kind} {WARMUP}")  # the worker is up and has run once
            refs[what] = Figure(f"{CALLS[name]} → {what} starts the body", "us")
            calls[what] = []

            def side(
                _r: int, d: PeerDriver = driver, k: str = kind, into: list[float] = calls[what]
            ) -> Any:
                answer = d.ask(f"start {k} {per_round}")
                into.extend(answer["call_us"])
                return answer["us"]

            sides.append((refs[what], side))
        alternate(sides, rounds)
        lib.extra.update(rounds=rounds, per_round=per_round, retry_call_us=list(ours.call_us))
    finally:
        ours.close()
        storage.close()
    rows = []
    for what, ref in refs.items():
        ref.extra.update(rounds=rounds, per_round=per_round, requeue_call_us=calls[what])
        rows.append(
            Row(
                GROUP,
                f"retry → worker start vs {what}",
                lib,
                ref,
                target="report",
                note="ours in one process (thread pool); the peer's worker is another "
                "process reading Redis",
            )
        )
    return rows
