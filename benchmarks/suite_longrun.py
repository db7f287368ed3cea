"""Resident memory and collector pauses over a long run of retries with pruning on.

Each storage runs the same loop in a child process of its own (so its RSS and
its collector are the loop's alone):

- a pool of ``POOL`` live tasks (fewer in a short run, see ``_pool``) in
  ``PROJECTS`` projects; every task fails, is blocked, is retried by hand
  (``RetryService.retry`` with an idempotency key), is started, and fails
  again; on its ``RETRIES_PER_TASK``-th manual retry it succeeds instead
  (``done``) and a new task takes its place (added, assigned, started,
  failed to ``blocked``);
- a dispatcher that accepts every entry, so each retry's outbox entry is
  delivered at once; an :class:`EventRelay` with one listener that does
  nothing delivers the lifecycle events every ``EVENT_EVERY`` cycles;
- a :class:`Pruner` with retention periods of 1/``WINDOW`` of the run
  (simulated time: the clock moves ``STEP_MS`` per cycle), called
  ``PRUNES_PER_WINDOW`` times per period, as the relay or the reaper would
  with ``prune_every``: idempotency records, delivered outbox entries,
  delivered events and the attempt records of finished tasks are removed
  once older than the period;
- on PostgreSQL, ``WORKERS`` threads make the retries at once, each on its
  own share of the pool (one thread elsewhere: the memory storage and SQLite
  are bound by the one core Python runs on), and where the server has
  autovacuum off, the loop runs ``VACUUM`` on the schema's tables after each
  prune, as autovacuum would (timed apart, in ``vacuum_us``).

So the history grows and pruning keeps it bounded; what stays is the tasks
themselves (a storage never removes a task). The child reads RSS from
``/proc/self/statm`` ``RSS_SAMPLES`` times over the run and times every
collection with ``gc.callbacks`` (per generation).

The floor is the same loop over a plain dict of tuples (one tuple per task,
per attempt, per entry, per event, with the same pruning), in its own child.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

HERE = Path(__file__).resolve().parent
PROJECTS = 10
POOL = 1000
RETRIES_PER_TASK = 10
STEP_MS = 5
WINDOW = 50
"""Rows are kept for 1/WINDOW of the run (simulated time), so the history reaches its
steady size within the first tenth, whatever the run's length."""
PRUNES_PER_WINDOW = 5
EVENT_EVERY = 20
RSS_SAMPLES = 200
WORKERS = {"postgres": 4}
"""Threads making retries at once (each owns a share of the pool's slots); one elsewhere."""
FULL = {"memory": 1_000_000, "sqlite": 1_000_000, "postgres": 1_000_000}
"""Retries per storage in the full run: a million on each. Measured here: the memory storage
made them in 265 s, SQLite in 1,330 s, PostgreSQL (four workers) in 6,027 s."""
QUICK = {"memory": 60_000, "sqlite": 8_000, "postgres": 500}


# -- the child ------------------------------------------------------------------------------
class _Probe:
    """RSS samples and the collector's pauses, per generation."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.pauses: list[tuple[int, float, float, float]] = []  # (generation, µs, at s, CPU µs)
        self.rss: list[tuple[int, float, float]] = []  # (retries, MiB, at s)
        self.db: list[tuple[int, float]] = []  # (retries, MiB the database holds)
        self.db_size: Any = None  # a callable giving the database's size in bytes
        self.t0 = time.perf_counter()
        self._start = 0.0
        self._cpu = 0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        now, cpu = time.perf_counter(), time.thread_time_ns()
        if phase == "start":
            self._start, self._cpu = now, cpu
        else:
            self.pauses.append(
                (info["generation"], (now - self._start) * 1e6, now - self.t0,
                 (cpu - self._cpu) / 1000)
            )  # fmt: skip

    def sample(self, done: int) -> None:
        with open("/proc/self/statm") as f:
            resident = int(f.read().split()[1])
        self.rss.append((done, resident * self.page / 2**20, time.perf_counter() - self.t0))
        if self.db_size is not None:
            self.db.append((done, self.db_size() / 2**20))

    def close(self) -> None:
        gc.callbacks.remove(self._callback)


def _tracked_by_type(top: int = 12) -> dict[str, int]:
    counts: dict[str, int] = {}
    for obj in gc.get_objects():
        name = type(obj).__name__
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:top])


def _pool(retries: int) -> int:
    """Live tasks: at most ``POOL``, few enough that each slot sees 50 retries (5 tasks)."""
    return max(10, min(POOL, retries // (5 * RETRIES_PER_TASK)))


def _window(retries: int) -> tuple[float, int]:
    """Retention (simulated seconds) and prune interval (cycles) for a run of ``retries``."""
    cycles = max(500, retries // WINDOW)
    return cycles * STEP_MS / 1000, max(1, cycles // PRUNES_PER_WINDOW)


def _library_loop(kind: str, retries: int, where: str, probe: _Probe) -> dict[str, Any]:
    from datetime import datetime, timedelta, timezone

    from deepwork_retry import ExecutorService, Pruner, Retention, RetryService
    from deepwork_retry.events import EventRelay, Hooks

    vacuum: Callable[[], None] | None = None  # PostgreSQL: VACUUM of the schema after a prune
    if kind == "memory":
        from deepwork_retry.storage.memory import MemoryStorage

        storage: Any = MemoryStorage()
    elif kind == "sqlite":
        from deepwork_retry.storage.sqlite import SQLiteStorage

        storage = SQLiteStorage(where, synchronous="NORMAL")

        def sqlite_bytes() -> int:  # the file and its write-ahead log
            return sum(os.path.getsize(f"{where}{s}") for s in ("", "-wal") if
                       os.path.exists(f"{where}{s}"))  # fmt: skip

        probe.db_size = sqlite_bytes
    else:
        import psycopg

        from deepwork_retry.storage.postgres import PostgresStorage

        dsn, schema = where.split("|")
        storage = PostgresStorage(dsn, schema=schema, max_size=WORKERS["postgres"] + 2)
        sizes = psycopg.connect(dsn, autocommit=True)

        def postgres_bytes() -> int:  # every table of the schema, with indexes and TOAST
            row = sizes.execute(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = %s AND c.relkind = 'r'", (schema,),
            ).fetchone()  # fmt: skip
            return int(row[0]) if row else 0

        probe.db_size = postgres_bytes
        tables = [r[0] for r in sizes.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relkind = 'r'", (schema,))]  # fmt: skip

        def vacuum_tables() -> None:
            for table in tables:
                sizes.execute(f'VACUUM "{schema}"."{table}"')

        vacuum = vacuum_tables if sizes.execute("SHOW autovacuum").fetchone() == ("off",) else None

    class Accept:
        def dispatch(self, entry: object) -> None:
            return None

    class Clock:  # simulated time (the testing package would import Hypothesis)
        def __init__(self) -> None:
            self.at = datetime(2026, 1, 1, tzinfo=timezone.utc)

        def now(self) -> datetime:
            return self.at

        def advance(self, seconds: float) -> None:
            self.at += timedelta(seconds=seconds)

    clock = Clock()
    retention_s, prune_every = _window(retries)
    retention = Retention(
        idempotency=timedelta(seconds=retention_s),
        delivered_outbox=timedelta(seconds=retention_s),
        attempts=timedelta(seconds=retention_s),
    )
    dispatcher = Accept()
    service = RetryService(storage, dispatcher, clock=clock, retention=retention)
    executor = ExecutorService(storage, dispatcher, clock=clock, retention=retention)
    hooks = Hooks()
    hooks.on_any(lambda event: None)
    relay = EventRelay(storage, hooks, clock=clock, batch=1000)
    pruner = Pruner(storage, retention, clock=clock, every=1.0, max_batches=None)
    error = RuntimeError("boom")

    made = itertools.count(1)
    workers = WORKERS.get(kind, 1)

    def new_task(pid: str) -> str:
        tid = f"t{next(made)}"
        executor.add_task(pid, tid, max_retries=0)
        executor.assign(pid, tid)
        executor.start(pid, tid, 1)
        executor.fail(pid, tid, 1, error)
        return tid

    pids = [f"p{i}" for i in range(PROJECTS)]
    for pid in pids:
        executor.create_project(pid)
    pool: list[tuple[str, str, int]] = []  # (project, task, manual retries so far)
    for i in range(_pool(retries)):
        pool.append((pids[i % PROJECTS], new_task(pids[i % PROJECTS]), 0))
    relay.deliver_events()
    every = max(1, retries // RSS_SAMPLES)
    pruned = {"idempotency": 0, "outbox": 0, "attempts": 0, "events": 0}
    prunes: list[float] = []  # µs per Pruner.prune() (each batch holds the storage's lock)
    vacuums: list[float] = []  # µs per VACUUM of the schema's tables (PostgreSQL)
    numbers = itertools.count(1)  # the retries, in the order the workers take them
    tick = threading.Lock()  # the clock moves one step per retry
    chores = threading.Lock()  # one worker at a time delivers events, prunes or samples
    failures: list[BaseException] = []

    def chore(n: int) -> None:
        if n % EVENT_EVERY == 0:
            while relay.deliver_events() >= 1000:
                pass
        if n % prune_every == 0:
            t1 = time.perf_counter()
            got = pruner.prune()
            prunes.append((time.perf_counter() - t1) * 1e6)
            pruned["idempotency"] += got.idempotency
            pruned["outbox"] += got.outbox
            pruned["attempts"] += got.attempts
            pruned["events"] += got.events
            if vacuum is not None:  # what autovacuum does, where the server has it off
                t1 = time.perf_counter()
                vacuum()
                vacuums.append((time.perf_counter() - t1) * 1e6)
        if n % every == 0:
            probe.sample(n)

    def work(first: int) -> None:
        mine = range(first, len(pool), workers)  # the slots this worker owns
        k = 0
        try:
            while (n := next(numbers)) <= retries:
                slot = mine[k % len(mine)]
                k += 1
                pid, tid, count = pool[slot]
                with tick:
                    clock.advance(STEP_MS / 1000)
                res = service.retry(
                    pid, tid, actor="ops", reason="long run", idempotency_key=f"k{n}"
                )
                attempt = res.task.attempt
                executor.start(pid, tid, attempt)
                count += 1
                if count >= RETRIES_PER_TASK:
                    executor.succeed(pid, tid, attempt)
                    pool[slot] = (pid, new_task(pid), 0)
                else:
                    executor.fail(pid, tid, attempt, error)
                    pool[slot] = (pid, tid, count)
                with chores:
                    chore(n)
        except BaseException as exc:  # the run stops; the parent sees the child fail
            failures.append(exc)
            raise

    gc.collect()
    gc.freeze()  # what set-up made (imports, pool, first tasks) is not walked again
    probe.pauses.clear()  # the loop's collections only, not those of imports and set-up
    probe.sample(0)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    elapsed = time.perf_counter() - t0
    facts: dict[str, Any] = {
        "elapsed_s": elapsed, "tasks_made": next(made) - 1, "pruned": pruned, "prune_us": prunes,
        "vacuum_us": vacuums,
        "settings": {
            "projects": PROJECTS, "pool": len(pool), "retries_per_task": RETRIES_PER_TASK,
            "step_ms": STEP_MS, "retention_s": retention_s, "prune_every": prune_every,
            "event_every": EVENT_EVERY, "workers": workers,
        },
    }  # fmt: skip
    if kind == "memory":
        facts["rows_kept"] = {
            "tasks": sum(len(t) for t in storage._tasks.values()),
            "attempts": sum(len(h) for h in storage._attempts.values()),
            "outbox": len(storage._outbox),
            "events": sum(len(e) for e in storage._events.values()),
            "idempotency": len(storage._idempotency),
        }
    storage.close()
    return facts


def _floor_loop(retries: int, probe: _Probe) -> dict[str, Any]:
    """The same moves over plain dicts of tuples, pruned the same way."""
    retention_s, prune_every = _window(retries)
    tasks: dict[tuple[str, str], tuple[Any, ...]] = {}
    attempts: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
    outbox: dict[tuple[str, str, int], tuple[Any, ...]] = {}
    events: dict[int, tuple[Any, ...]] = {}
    idem: dict[str, float] = {}
    finished: dict[tuple[str, str], float] = {}
    seq = 0
    now = 0.0
    made = 0

    def event(pid: str, tid: str, kind: str) -> None:
        nonlocal seq
        seq += 1
        events[seq] = (pid, seq, kind, tid, now, None)

    def move(pid: str, tid: str, status: str, attempt: int) -> None:
        tasks[(pid, tid)] = (pid, tid, status, attempt, now)
        event(pid, tid, status)

    def new_task(pid: str) -> str:
        nonlocal made
        made += 1
        tid = f"t{made}"
        move(pid, tid, "inbox", 0)
        move(pid, tid, "assigned", 1)
        attempts[(pid, tid)] = [(pid, tid, 1, "auto", now, None)]
        outbox[(pid, tid, 1)] = (pid, tid, 1, "delivered", now)
        move(pid, tid, "in_progress", 1)
        move(pid, tid, "blocked", 1)
        return tid

    pids = [f"p{i}" for i in range(PROJECTS)]
    pool = [(pids[i % PROJECTS], new_task(pids[i % PROJECTS]), 0) for i in range(_pool(retries))]
    every = max(1, retries // RSS_SAMPLES)
    gc.collect()
    gc.freeze()  # what set-up made (imports, pool, first tasks) is not walked again
    probe.pauses.clear()  # the loop's collections only, not those of imports and set-up
    probe.sample(0)
    t0 = time.perf_counter()
    for n in range(1, retries + 1):
        slot = n % len(pool)
        pid, tid, count = pool[slot]
        now += STEP_MS / 1000
        attempt = tasks[(pid, tid)][3] + 1
        idem[f"k{n}"] = now + retention_s
        move(pid, tid, "assigned", attempt)
        attempts[(pid, tid)].append((pid, tid, attempt, "manual", now, "ops", "long run"))
        outbox[(pid, tid, attempt)] = (pid, tid, attempt, "delivered", now)
        move(pid, tid, "in_progress", attempt)
        count += 1
        if count >= RETRIES_PER_TASK:
            move(pid, tid, "done", attempt)
            finished[(pid, tid)] = now
            pool[slot] = (pid, new_task(pid), 0)
        else:
            move(pid, tid, "blocked", attempt)
            pool[slot] = (pid, tid, count)
        if n % prune_every == 0:
            cut = now - retention_s
            for key in [k for k, v in idem.items() if v <= now]:
                del idem[key]
            for key in [k for k, v in outbox.items() if v[4] <= cut]:
                del outbox[key]
            for key in [k for k, v in events.items() if v[4] <= cut]:
                del events[key]
            for key in [k for k, at in finished.items() if at <= cut]:
                attempts.pop(key, None)
                del finished[key]
        if n % every == 0:
            probe.sample(n)
    return {"elapsed_s": time.perf_counter() - t0, "tasks_made": made}


def child(kind: str, retries: int, where: str, out: str) -> None:
    if kind != "floor":
        sys.path.insert(0, str(HERE.parent))
    probe = _Probe()
    if kind == "floor":
        facts = _floor_loop(retries, probe)
    else:
        facts = _library_loop(kind, retries, where, probe)
    probe.close()
    facts["gc_stats"] = gc.get_stats()
    facts["gc_threshold"] = gc.get_threshold()
    facts["tracked_by_type"] = _tracked_by_type()
    facts["tracked"] = len(gc.get_objects())
    facts["retries"] = retries
    facts["rss"] = probe.rss
    facts["db"] = probe.db
    facts["pauses"] = probe.pauses
    Path(out).write_text(json.dumps(facts))


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "child":
    child(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
    sys.exit(0)


# -- the parent ------------------------------------------------------------------------------
from _harness import Figure, Row, percentile, unavailable  # noqa: E402


def _spawn(kind: str, retries: int, where: str, scratch: Path, logs: Path) -> dict[str, Any]:
    out = scratch / f"longrun_{kind}.json"
    out.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    with open(logs / f"longrun_{kind}.log", "w") as log:
        subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "child", kind, str(retries), where,
             str(out)],
            check=True, stdout=log, stderr=subprocess.STDOUT, env=env,
            timeout=900 + retries // 20,
        )  # fmt: skip
    return json.loads(out.read_text())


def _deciles(samples: list[Any], total: int) -> tuple[list[float], list[float], list[float]]:
    """The values of ``(retries, value, ...)`` samples in the first, second and last tenth
    of a run of ``total`` retries."""
    first = [s[1] for s in samples if s[0] <= total / 10]
    second = [s[1] for s in samples if total / 10 < s[0] <= total / 5]
    last = [s[1] for s in samples if s[0] > total * 9 / 10]
    return first, second, last


def _tenths(
    what: str, samples: list[Any], total: int, extra: dict[str, Any]
) -> tuple[Figure, Figure]:
    """The last tenth's ``what`` (MiB) against the second tenth's, as a row's two sides."""
    first, second, last = _deciles(samples, total)
    return (
        Figure(f"{what} MiB, last tenth", "MiB", last, extra),
        Figure(f"{what} MiB, second tenth", "MiB", second, {"first_tenth": first}),
    )


def _rows(label: str, facts: dict[str, Any], floor: dict[str, Any]) -> list[Row]:
    group = "longrun"
    n = facts["retries"]
    side_facts = {k: v for k, v in facts.items() if k not in ("rss", "pauses", "db")}
    _, second, last = _deciles(facts["rss"], n)
    _, f_second, f_last = _deciles(floor["rss"], floor["retries"])
    rss = _tenths("RSS", facts["rss"], n, {**side_facts, "rss": facts["rss"]})
    rows = [
        Row(group, f"{label}: RSS, last vs second tenth of {n:,} retries", *rss,
            target="≤ 1.1x", bound=1.1),
    ]  # fmt: skip

    # What grows is the tasks (one finished per RETRIES_PER_TASK retries, never removed):
    # RSS growth between the second and the last tenth, per task finished between them.
    def per_task(second: list[float], last: list[float], retries: int) -> float:
        if not second or not last:
            return float("nan")
        tasks = 0.8 * retries / RETRIES_PER_TASK  # from 15 % to 95 % of the run
        return (median(last) - median(second)) * 2**20 / tasks

    rows.append(
        Row(group, f"{label}: RSS growth per finished task kept (the tasks stay)",
            Figure("bytes per finished task", "B", [per_task(second, last, n)]),
            Figure("dict floor, bytes per finished task", "B",
                   [per_task(f_second, f_last, floor["retries"])]),
            target="report")
    )  # fmt: skip
    pauses = [p[1] for p in facts["pauses"]]
    fpauses = [p[1] for p in floor["pauses"]]
    per_gen = {
        g: {
            "n": len([1 for gen, *_ in facts["pauses"] if gen == g]),
            "p99_us": percentile([us for gen, us, *_ in facts["pauses"] if gen == g], 99),
            "max_us": max([us for gen, us, *_ in facts["pauses"] if gen == g], default=0.0),
        }
        for g in (0, 1, 2)
    }
    lib = Figure(
        "collector pauses", "us", pauses,
        {
            "max_us": max(pauses, default=0.0), "per_generation": per_gen,
            "cpu_p99_us": percentile([p[3] for p in facts["pauses"]], 99),
            "cpu_max_us": max([p[3] for p in facts["pauses"]], default=0.0),
            "prune_p99_us": percentile(facts.get("prune_us", []), 99),
            "prune_max_us": max(facts.get("prune_us", []), default=0.0),
            "pauses": facts["pauses"],
        },
    )  # fmt: skip
    ref = Figure(
        "collector pauses, dict floor", "us", fpauses,
        {"max_us": max(fpauses, default=0.0), "pauses": floor["pauses"]},
    )  # fmt: skip
    p99 = lib.p99
    rows.append(
        Row(group, f"{label}: collector pause p99 (max {max(pauses, default=0) / 1000:,.1f} ms)"
            " vs 20 ms", lib, ref, target="p99 < 20 ms", bound=1.0,
            ratio_override=p99 / 20_000 if pauses else None,
            note="ratio: library p99 / 20 ms")
    )  # fmt: skip
    if facts.get("db"):
        db = _tenths("database", facts["db"], n, {"db": facts["db"]})
        rows.append(Row(group, f"{label}: database size, last vs second tenth (tables, indexes, "
                        "log)", *db, target="report"))  # fmt: skip
    rate = Figure("retries/s", "ops/s", [n / facts["elapsed_s"]])
    frate = Figure("retries/s, dict floor", "ops/s", [floor["retries"] / floor["elapsed_s"]])
    rows.append(Row(group, f"{label}: retries/s over the run (retry, start, fail)", rate, frate,
                     target="report"))  # fmt: skip
    f_rss = _tenths("floor RSS", floor["rss"], floor["retries"], {"rss": floor["rss"]})
    rows.append(Row(group, f"{label}: dict floor RSS, last vs second tenth", *f_rss,
                    target="report"))  # fmt: skip
    return rows


def run(quick: bool, scratch: Path, logs: Path) -> list[Row]:
    """The group's rows (sizes smaller with ``quick``)."""
    import suite_pg

    scratch.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    sizes = dict(QUICK if quick else FULL)
    # DEEPWORK_LONGRUN_RETRIES="memory=1000000,sqlite=1000000" runs other counts.
    for part in filter(None, os.environ.get("DEEPWORK_LONGRUN_RETRIES", "").split(",")):
        kind, _, count = part.partition("=")
        sizes[kind.strip()] = int(count)
    rows: list[Row] = []
    floors: dict[int, dict[str, Any]] = {}
    for kind, retries in sizes.items():
        where = ""
        if kind == "sqlite":
            db = scratch / "longrun.sqlite"
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
            where = str(db)
        elif kind == "postgres":
            reason = suite_pg.reachable()
            if reason is not None:
                rows.append(unavailable("longrun", "postgres", reason))
                continue
            schema = "bench_longrun_pg"
            suite_pg.drop_schema(schema)
            where = f"{suite_pg.dsn()}|{schema}"
        try:
            if retries not in floors:
                floors[retries] = _spawn("floor", retries, "", scratch, logs)
            facts = _spawn(kind, retries, where, scratch, logs)
        except (subprocess.SubprocessError, OSError, ValueError) as exc:
            rows.append(unavailable("longrun", kind, f"{type(exc).__name__}: {exc}"))
            continue
        finally:
            if kind == "postgres":
                suite_pg.drop_schema("bench_longrun_pg")
        rows.extend(_rows(kind, facts, floors[retries]))
    return rows
