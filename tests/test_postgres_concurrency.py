"""Many OS processes and threads changing the tasks of one project on one PostgreSQL schema."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pg_stripes import assert_stripes_exact, stripes
from pg_support import schema_dropped_after
from psycopg import sql

from deepwork_retry import (
    ExecutorService,
    NoBackoff,
    RetryPolicy,
    RetryService,
    TaskError,
    TaskStatus,
    Trigger,
)
from deepwork_retry._core.model import Progress, Task
from deepwork_retry._core.states import DispatchState
from deepwork_retry.exceptions import DeepworkError
from deepwork_retry.storage.postgres import PostgresStorage

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

WORKER = Path(__file__).resolve().parent / "pg_retry_worker.py"
PROCESSES = 4
RETRIES_PER_PROCESS = 50
TASKS = 20


@pytest.fixture
def store(postgres_dsn: str) -> Iterator[PostgresStorage]:
    with schema_dropped_after(postgres_dsn, "c") as schema:
        storage = PostgresStorage(postgres_dsn, schema=schema, max_size=2)
        try:
            yield storage
        finally:
            storage.close()


def test_processes_racing_retries_win_once_per_task(
    postgres_dsn: str, store: PostgresStorage
) -> None:
    """4 processes x 50 concurrent retries of 20 blocked tasks: exactly 20 win, 20 outbox
    entries are written and delivered once each, and the counters equal a recount."""
    ex = ExecutorService(store, policy=RetryPolicy(backoff=NoBackoff()))
    ex.create_project("p")
    ids = [f"t{n:02d}" for n in range(TASKS)]
    for tid in ids:
        ex.add_task("p", tid, max_retries=0)
        ex.assign("p", tid)
        ex.start("p", tid, 1)
        ex.fail("p", tid, 1, TaskError(type="Fatal", message="boom", retryable=False))
    with store.pool.connection() as conn:
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (project_id text, task_id text, attempt bigint, worker int)"
            ).format(sql.Identifier(store.schema, "deliveries"))
        )

    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                postgres_dsn,
                store.schema,
                str(n * 5),
                str(RETRIES_PER_PROCESS),
                str(TASKS),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(PROCESSES)
    ]
    try:
        for proc in procs:  # every process connected before any retries
            assert proc.stdout is not None
            assert "ready" == proc.stdout.readline().strip()
        summaries = []
        for proc in procs:
            out, err = proc.communicate("go\n", timeout=120)
            assert 0 == proc.returncode, err
            summaries.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)

    succeeded = sorted(tid for s in summaries for tid, _ in s["succeeded"])
    assert [] == [e for s in summaries for e in s["errors"]]
    assert ids == succeeded
    assert {"dispatched"} == {status for s in summaries for _, status in s["succeeded"]}
    assert PROCESSES * RETRIES_PER_PROCESS - TASKS == sum(s["not_blocked"] for s in summaries)

    entries = [e for tid in ids for e in store.dispatches("p", tid)]
    manual = [e for e in entries if e.attempt == 2]
    assert TASKS == len(manual)
    assert {DispatchState.DELIVERED} == {e.state for e in manual}
    assert {1} == {e.tries for e in manual}
    for tid in ids:
        history = store.attempts("p", tid)
        assert [Trigger.INITIAL, Trigger.MANUAL_RETRY] == [a.trigger for a in history]

    with store.pool.connection() as conn:
        delivered = conn.execute(
            sql.SQL("SELECT task_id, attempt FROM {} ORDER BY task_id").format(
                sql.Identifier(store.schema, "deliveries")
            )
        ).fetchall()
    assert [(tid, 2) for tid in ids] == delivered

    tasks = store.list_tasks("p", limit=1000)
    assert {TaskStatus.ASSIGNED} == {t.status for t in tasks}
    assert {1} == {t.retry_count for t in tasks}
    assert Progress.recount("p", [t.status for t in tasks]) == store.progress("p")
    assert_stripes_exact(store, "p")


def valid(progress: Progress) -> bool:
    """Counters a reader could have seen: none negative, and the total their sum."""
    counts = [progress.count(status) for status in TaskStatus]
    return min(counts) >= 0 and sum(counts) == progress.total


STEPS_PER_THREAD = 150
THREADS = 8


def test_threads_moving_tasks_of_one_project_keep_every_stripe_exact(
    postgres_dsn: str, store: PostgresStorage
) -> None:
    """8 threads, each with its own connection, race executor events and manual retries
    over the same tasks of one project, while more tasks are added to it: every progress
    returned is a possible one, and at the end every stripe equals a recount of its tasks
    and the project's progress equals a recount of all of them."""
    ex = ExecutorService(store, policy=RetryPolicy(backoff=NoBackoff()))
    ex.create_project("p")
    ids = [f"t{n:03d}" for n in range(48)]
    for tid in ids:
        ex.add_task("p", tid, max_retries=1)
    assert all(counts["total"] for counts in stripes(store, "p")[1].values())  # every stripe used
    start = threading.Barrier(THREADS)
    failures: list[BaseException] = []
    seen: list[Progress] = []
    moves = [0] * THREADS

    def step(
        executor: ExecutorService, retry: RetryService, task: Task, rng: random.Random
    ) -> Progress | None:
        status, tid = task.status, task.id
        if status is TaskStatus.INBOX:
            return executor.assign("p", tid).progress
        if status is TaskStatus.ASSIGNED:
            return executor.start("p", tid, task.attempt).progress
        if status is TaskStatus.IN_PROGRESS:
            if rng.random() < 0.2:
                return executor.succeed("p", tid, task.attempt).progress
            error = TaskError(type="E", message="boom", retryable=rng.random() < 0.5)
            return executor.fail("p", tid, task.attempt, error).progress
        if status is TaskStatus.BLOCKED:
            return retry.retry("p", tid).progress
        return None

    def run(n: int) -> None:
        rng = random.Random(n)
        own = PostgresStorage(postgres_dsn, schema=store.schema, max_size=1, migrate=False)
        try:
            executor = ExecutorService(own, policy=RetryPolicy(backoff=NoBackoff()))
            retry = RetryService(own)
            start.wait(timeout=60)
            for k in range(STEPS_PER_THREAD):
                if k % 50 == 25:  # new tasks while the others move
                    executor.add_task("p", f"n{n}-{k:03d}")
                    continue
                task = own.get_tasks("p", [rng.choice(ids)])
                try:
                    progress = step(executor, retry, next(iter(task.values())), rng)
                except DeepworkError:
                    continue  # another thread moved the task first
                if progress is not None:
                    seen.append(progress)
                    moves[n] += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)
        finally:
            own.close()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert [] == failures
    assert sum(moves) >= THREADS * STEPS_PER_THREAD // 4
    assert [] == [p for p in seen if not valid(p)]

    tasks = store.list_tasks("p", limit=1000)
    assert len(ids) + THREADS * (STEPS_PER_THREAD // 50) == len(tasks)
    assert Progress.recount("p", [t.status for t in tasks]) == store.progress("p")
    assert_stripes_exact(store, "p")
