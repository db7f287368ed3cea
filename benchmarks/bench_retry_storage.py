"""Per-operation cost of a manual retry through RetryService, by storage and project size.

    python benchmarks/bench_retry_storage.py [--retries 2000] [--sizes 10,100000]

For each storage and project size it builds a project of that many tasks (all
but the retried ones `done`, so progress has real numbers), blocks `--retries`
of them, then times `RetryService.retry` on each, alternating storages round by
round so that both see the same machine conditions. Prints one table: median,
p99 and mean per retry, and retries per second.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deepwork_retry import Project, RetryService, Task, TaskStatus
from deepwork_retry.ports import Storage
from deepwork_retry.storage.memory import MemoryStorage

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _storages(tmp: Path) -> dict[str, Callable[[str], Storage]]:
    found: dict[str, Callable[[str], Storage]] = {"memory": lambda _: MemoryStorage()}
    try:
        from deepwork_retry.storage.sqlite import SQLiteStorage
    except ImportError:  # pragma: no cover - the adapter ships with the package
        return found
    for sync in ("NORMAL", "FULL"):
        found[f"sqlite {sync}"] = lambda name, s=sync: SQLiteStorage(  # type: ignore[misc]
            tmp / f"{name}-{s}.db", synchronous=s
        )
    return found


def build(storage: Storage, pid: str, size: int, retries: int) -> list[str]:
    """A project of ``size`` tasks, ``retries`` of them blocked; returns their ids."""
    storage.create_project(Project(id=pid, created_at=NOW, updated_at=NOW))
    blocked = max(1, min(retries, size))
    batch: list[Task] = []
    ids = []
    for i in range(size):
        status = TaskStatus.BLOCKED if i < blocked else TaskStatus.DONE
        tid = f"t{i:07d}"
        if status is TaskStatus.BLOCKED:
            ids.append(tid)
        batch.append(
            Task(id=tid, project_id=pid, status=status, max_retries=1, retries_left=0,
                 error_message="boom", created_at=NOW, updated_at=NOW)
        )  # fmt: skip
        if len(batch) == 5000:
            storage.add_tasks(batch)
            batch = []
    if batch:
        storage.add_tasks(batch)
    return ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retries", type=int, default=2000)
    parser.add_argument("--sizes", default="10,100000")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        factories = _storages(Path(tmp))
        for size in sizes:
            per_project = min(args.retries, size)
            projects = max(1, args.retries // per_project)
            # Small projects: as many of them as it takes to block `--retries` tasks.
            storages = {name: factory(str(size)) for name, factory in factories.items()}
            queues: dict[str, list[tuple[str, str]]] = {name: [] for name in factories}
            for name, storage in storages.items():
                for p in range(projects):
                    pid = f"p{p}"
                    ids = build(storage, pid, size, per_project)
                    queues[name].extend((pid, tid) for tid in ids)
            services = {name: RetryService(storage) for name, storage in storages.items()}
            timings: dict[str, list[float]] = {name: [] for name in factories}
            total = len(queues["memory"])
            chunk = max(1, total // args.rounds)
            for start in range(0, total, chunk):
                for name in factories:  # alternate storages round by round
                    svc = services[name]
                    for pid, tid in queues[name][start : start + chunk]:
                        t0 = time.perf_counter()
                        svc.retry(pid, tid)
                        timings[name].append(time.perf_counter() - t0)
            for name, values in timings.items():
                values.sort()
                rows.append(
                    (
                        name,
                        size,
                        len(values),
                        statistics.median(values) * 1e6,
                        values[min(len(values) - 1, int(len(values) * 0.99))] * 1e6,
                        statistics.fmean(values) * 1e6,
                        len(values) / sum(values),
                    )
                )
            for storage in storages.values():
                storage.close()
    header = ("storage", "tasks/project", "retries", "median µs", "p99 µs", "mean µs", "retries/s")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, size, n, med, p99, mean, rate in rows:
        print(f"| {name} | {size:,} | {n} | {med:.1f} | {p99:.1f} | {mean:.1f} | {rate:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
