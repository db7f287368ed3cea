"""Real threads and real processes retrying tasks on one SQLite file at the same moment.

Each process opens its own :class:`SQLiteStorage` on the file and runs several
threads over it; every thread waits on one barrier shared by all processes, so
the retries really race. Deliveries are appended to files, one per process, so
the test can count what every process handed to its dispatcher.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import threading
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from deepwork_retry import (
    BlockedReason,
    DispatchState,
    ExecutorService,
    Progress,
    Project,
    RetryService,
    Task,
    TaskNotBlocked,
    TaskStatus,
)
from deepwork_retry._core.model import DispatchEntry
from deepwork_retry.storage.sqlite import SQLiteStorage, migrations
from deepwork_retry.testing.doubles import RecordingDispatcher

pytestmark = pytest.mark.slow

SPAWN = multiprocessing.get_context("spawn")
BUSY_TIMEOUT = 60.0
"""Generous: 50 writers queue for one lock on a 2-core machine."""
JOIN_TIMEOUT = 120.0
NOW = datetime(2025, 6, 1, 9, 30, tzinfo=timezone.utc)


class FileDispatcher:
    """Accepts an entry by appending its key to a file (one short O_APPEND write)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def dispatch(self, entry: DispatchEntry) -> None:
        line = f"{entry.project_id}\t{entry.task_id}\t{entry.attempt}\n".encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def run_retries(
    db: str, out_dir: str, name: str, pid: str, work: Sequence[Sequence[str]], barrier: Any
) -> list[list[Any]]:
    """One thread per item of ``work``, each retrying its task ids after the barrier."""
    storage = SQLiteStorage(db, timeout=BUSY_TIMEOUT)
    service = RetryService(storage, FileDispatcher(os.path.join(out_dir, f"deliveries-{name}")))
    results: list[list[Any]] = [[] for _ in work]

    def thread_main(slot: int) -> None:
        try:
            barrier.wait(timeout=JOIN_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - reported as a result, so the test fails clearly
            results[slot].append(["error", "", type(exc).__name__, str(exc)])
            return
        for tid in work[slot]:
            try:
                result = service.retry(pid, tid, actor=name)
            except TaskNotBlocked as exc:
                results[slot].append(["not_blocked", tid, exc.status, str(exc)])
            except Exception as exc:  # noqa: BLE001 - any other error is a finding
                results[slot].append(["error", tid, type(exc).__name__, str(exc)])
            else:
                results[slot].append(["ok", tid, result.task.retry_count, result.dispatch.status])

    threads = [threading.Thread(target=thread_main, args=(i,)) for i in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
    storage.close()
    return [item for slot in results for item in slot]


def child_main(
    db: str, out_dir: str, name: str, pid: str, work: Sequence[Sequence[str]], barrier: Any
) -> None:
    results = run_retries(db, out_dir, name, pid, work, barrier)
    Path(out_dir, f"results-{name}.json").write_text(json.dumps(results))


def race(
    db: Path,
    out_dir: Path,
    pid: str,
    parent_work: list[list[str]],
    child_work: list[list[list[str]]],
) -> tuple[list[list[Any]], list[tuple[str, str, int]]]:
    """Run the retries in this process and in one spawned process per ``child_work`` item."""
    parties = len(parent_work) + sum(len(work) for work in child_work)
    barrier = SPAWN.Barrier(parties)
    children = [
        SPAWN.Process(
            target=child_main, args=(str(db), str(out_dir), f"child{i}", pid, work, barrier)
        )
        for i, work in enumerate(child_work)
    ]
    for child in children:
        child.start()
    results = run_retries(str(db), str(out_dir), "parent", pid, parent_work, barrier)
    for child in children:
        child.join(JOIN_TIMEOUT)
        assert 0 == child.exitcode
    for i in range(len(child_work)):
        results += json.loads(Path(out_dir, f"results-child{i}.json").read_text())
    deliveries = []
    for path in sorted(out_dir.glob("deliveries-*")):
        for line in path.read_text().splitlines():
            project, task, attempt = line.split("\t")
            deliveries.append((project, task, int(attempt)))
    return results, deliveries


def recount(storage: SQLiteStorage, pid: str) -> Progress:
    return Progress.recount(pid, (t.status for t in storage.list_tasks(pid, limit=1000)))


def test_fifty_concurrent_retries_of_one_task(tmp_path: Path) -> None:
    """Of 50 racing retries of one blocked task (threads in 4 processes) exactly one wins."""
    db = tmp_path / "race.db"
    storage = SQLiteStorage(db, timeout=BUSY_TIMEOUT)
    ex = ExecutorService(storage, RecordingDispatcher())
    ex.create_project("p")
    ex.add_task("p", "t", max_retries=0)
    ex.assign("p", "t")
    ex.start("p", "t", 1)
    blocked = ex.fail("p", "t", 1, RuntimeError("boom")).task
    assert TaskStatus.BLOCKED == blocked.status

    results, deliveries = race(
        db, tmp_path, "p", parent_work=[["t"]] * 20, child_work=[[["t"]] * 10] * 3
    )

    assert 50 == len(results)
    assert [["ok", "t", blocked.retry_count + 1, "dispatched"]] == [
        r for r in results if r[0] == "ok"
    ]
    message = "Can only retry tasks with status 'blocked', got 'assigned'"
    assert [["not_blocked", "t", "assigned", message]] * 49 == [r for r in results if r[0] != "ok"]
    assert [("p", "t", 2)] == deliveries
    task = storage.load("p", "t")[1]
    assert (TaskStatus.ASSIGNED, blocked.retry_count + 1, 2) == (
        task.status,
        task.retry_count,
        task.attempt,
    )
    assert [1, 2] == [a.number for a in storage.attempts("p", "t")]
    entries = storage.dispatches("p", "t")
    assert [(2, DispatchState.DELIVERED, 1)] == [
        (e.attempt, e.state, e.tries) for e in entries if e.attempt == 2
    ]
    assert recount(storage, "p") == storage.progress("p")
    storage.close()


def test_two_hundred_tasks_retried_concurrently(tmp_path: Path) -> None:
    """200 blocked tasks retried by 30 racing threads in 3 processes: 200 wins, no lost update."""
    db = tmp_path / "many.db"
    storage = SQLiteStorage(db, timeout=BUSY_TIMEOUT)
    storage.create_project(Project(id="p", created_at=NOW, updated_at=NOW))
    ids = [f"t{i:03d}" for i in range(200)]
    storage.add_tasks(
        [
            Task(id=tid, project_id="p", status=TaskStatus.BLOCKED, max_retries=0,
                 retries_left=0, error_message="boom", error_type="RuntimeError",
                 blocked_reason=BlockedReason.BUDGET_EXHAUSTED, created_at=NOW, updated_at=NOW)
            for tid in ids
        ]
    )  # fmt: skip
    slots = [ids[i::30] for i in range(30)]

    results, deliveries = race(
        db, tmp_path, "p", parent_work=slots[:10], child_work=[slots[10:20], slots[20:]]
    )

    assert sorted(["ok", tid, 1, "dispatched"] for tid in ids) == sorted(results)
    assert sorted(("p", tid, 1) for tid in ids) == sorted(deliveries)
    tasks = storage.list_tasks("p", limit=1000)
    assert [(tid, TaskStatus.ASSIGNED, 1, 1, 2, None) for tid in ids] == [
        (t.id, t.status, t.retry_count, t.attempt, t.version, t.error_message) for t in tasks
    ]
    assert Progress(project_id="p", total=200, assigned=200) == storage.progress("p")
    assert recount(storage, "p") == storage.progress("p")
    for tid in ids[::37]:
        assert [(1, DispatchState.DELIVERED, 1)] == [
            (e.attempt, e.state, e.tries) for e in storage.dispatches("p", tid)
        ]
    storage.close()


def open_main(db: str, out_dir: str, index: int, barrier: Any) -> None:
    barrier.wait(timeout=JOIN_TIMEOUT)
    outcome = "ok"
    try:
        storage = SQLiteStorage(db, timeout=BUSY_TIMEOUT)
        storage.create_project(Project(id=f"p{index}", created_at=NOW, updated_at=NOW))
        storage.close()
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        outcome = f"{type(exc).__name__}: {exc}"
    Path(out_dir, f"open-{index}").write_text(outcome)


def test_processes_opening_a_new_file_at_once(tmp_path: Path) -> None:
    """Six processes opening one new file at the same moment all succeed; migrations run once."""
    db = tmp_path / "fresh.db"
    barrier = SPAWN.Barrier(6)
    children = [
        SPAWN.Process(target=open_main, args=(str(db), str(tmp_path), i, barrier)) for i in range(6)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(JOIN_TIMEOUT)
        assert 0 == child.exitcode
    assert ["ok"] * 6 == [(tmp_path / f"open-{i}").read_text() for i in range(6)]
    conn = sqlite3.connect(db)
    try:
        assert migrations()[-1][0] == conn.execute("PRAGMA user_version").fetchone()[0]
        assert [f"p{i}" for i in range(6)] == [
            row[0] for row in conn.execute("SELECT id FROM projects ORDER BY id")
        ]
    finally:
        conn.close()


def test_threads_share_one_storage_without_losing_updates(tmp_path: Path) -> None:
    """Eight threads over one SQLiteStorage object add and retry tasks; every write is kept."""
    storage = SQLiteStorage(tmp_path / "threads.db", timeout=BUSY_TIMEOUT)
    ex = ExecutorService(storage, RecordingDispatcher())
    rs = RetryService(storage, RecordingDispatcher())
    ex.create_project("p")
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            barrier.wait(timeout=JOIN_TIMEOUT)
            for i in range(10):
                tid = f"w{n}-{i}"
                ex.add_task("p", tid, max_retries=0)
                ex.assign("p", tid)
                ex.start("p", tid, 1)
                ex.fail("p", tid, 1, RuntimeError("x"))
                rs.retry("p", tid)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT)
    assert [] == errors
    assert Progress(project_id="p", total=80, assigned=80) == storage.progress("p")
    assert recount(storage, "p") == storage.progress("p")
    storage.close()
