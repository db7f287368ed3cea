"""Lost messages: a delivered attempt that is never started is handed out again.

The storage side is pinned by the conformance suite (every adapter); these
tests pin the policy setting, the sync services and command-line style loops
on a real SQLite file, and PostgreSQL's behaviour under concurrent reapers.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pg_support import schema_dropped_after

from deepwork_retry import (
    DispatchEntry,
    ExecutorService,
    FixedBackoff,
    RetryPolicy,
    Task,
    TaskStatus,
)
from deepwork_retry.dispatch._worker import DeliveryOutcome, run_attempt
from deepwork_retry.dispatch.reaper import run_reaper
from deepwork_retry.dispatch.relay import run_relay
from deepwork_retry.exceptions import InvalidInput
from deepwork_retry.ports import REDELIVERED
from deepwork_retry.storage.postgres import PostgresStorage
from deepwork_retry.storage.sqlite import SQLiteStorage
from deepwork_retry.testing.doubles import FakeClock, RecordingDispatcher

START = 60.0


def _policy(start_timeout: float | None = START) -> RetryPolicy:
    return RetryPolicy(backoff=FixedBackoff(wait=5), lease=300.0, start_timeout=start_timeout)


@pytest.mark.parametrize("bad", [-1.0, -0.001, float("nan")])
def test_start_timeout_rejects_bad_numbers(bad: float) -> None:
    """A negative or NaN start_timeout raises InvalidInput."""
    with pytest.raises(InvalidInput):
        RetryPolicy(start_timeout=bad)


def test_start_timeout_default_and_off() -> None:
    """start_timeout defaults to ten minutes; 0 and None (never redeliver) are accepted."""
    assert (600.0, 0.0, None) == (
        RetryPolicy().start_timeout,
        RetryPolicy(start_timeout=0).start_timeout,
        RetryPolicy(start_timeout=None).start_timeout,
    )


@pytest.fixture
def sqlite_storage(tmp_path: Path) -> Iterator[SQLiteStorage]:
    store = SQLiteStorage(tmp_path / "lost.db")
    try:
        yield store
    finally:
        store.close()


def test_lost_message_redelivered_and_run_once(sqlite_storage: SQLiteStorage) -> None:
    """A message lost after delivery is sent again by reaper then relay; the attempt runs once and
    the original message, turning up late, is skipped."""
    clock = FakeClock()
    queue = RecordingDispatcher()  # the "broker": nothing consumes it until told to
    svc = ExecutorService(sqlite_storage, queue, policy=_policy(), clock=clock)
    svc.create_project("p")
    svc.add_task("p", "t")
    svc.assign("p", "t")
    assert [("p", "t", 1)] == queue.keys
    clock.advance(START - 1)
    assert (0, 0) == (
        run_reaper(sqlite_storage, once=True, policy=_policy(), clock=clock),
        run_relay(sqlite_storage, queue, once=True, clock=clock),
    )
    clock.advance(1)
    assert (0, 1) == (
        run_reaper(sqlite_storage, once=True, policy=_policy(), clock=clock),
        run_relay(sqlite_storage, queue, once=True, clock=clock),
    )
    assert [("p", "t", 1), ("p", "t", 1)] == queue.keys

    ran: list[int] = []

    def work(task: Task, token: int) -> None:
        ran.append(token)

    outcomes = [run_attempt(svc, work, *entry.key) for entry in reversed(queue.delivered)]
    assert [DeliveryOutcome.SUCCEEDED, DeliveryOutcome.SKIPPED] == outcomes
    assert [1] == ran
    assert TaskStatus.DONE == svc.storage.load("p", "t")[1].status
    (entry,) = sqlite_storage.dispatches("p", "t")
    assert (2, REDELIVERED) == (entry.tries, entry.last_error)


def test_redeliver_ignores_started_and_disabled(sqlite_storage: SQLiteStorage) -> None:
    """A started attempt is never redelivered, and with start_timeout None nothing is."""
    clock = FakeClock()
    queue = RecordingDispatcher()
    svc = ExecutorService(sqlite_storage, queue, policy=_policy(), clock=clock)
    off = ExecutorService(sqlite_storage, queue, policy=_policy(None), clock=clock)
    svc.create_project("p")
    for tid in ("started", "idle"):
        svc.add_task("p", tid)
        svc.assign("p", tid)
    svc.start("p", "started", 1)
    clock.advance(10 * START)
    assert [] == off.redeliver()
    assert [("p", "idle", 1)] == [e.key for e in svc.redeliver()]
    assert [] == svc.redeliver()


# -- PostgreSQL: several reapers at once ---------------------------------------------------


@pytest.fixture
def pg_storage(postgres_dsn: str) -> Iterator[PostgresStorage]:
    with schema_dropped_after(postgres_dsn) as schema:
        store = PostgresStorage(postgres_dsn, schema=schema, max_size=4)
        try:
            yield store
        finally:
            store.close()


@pytest.mark.postgres
def test_postgres_concurrent_reapers_split_stale_entries(pg_storage: PostgresStorage) -> None:
    """Reapers racing on PostgreSQL turn back every stale entry exactly once between them,
    and wake listening relays."""
    clock = FakeClock()
    svc = ExecutorService(pg_storage, RecordingDispatcher(), policy=_policy(), clock=clock)
    svc.create_project("p")
    ids = [f"t{n:02d}" for n in range(40)]
    for tid in ids:
        svc.add_task("p", tid)
        svc.assign("p", tid)
    clock.advance(START)
    pg_storage.wait_for_work(0.01)  # starts listening
    now = clock.now()
    taken: list[list[DispatchEntry]] = [[] for _ in range(4)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def reaper(n: int) -> None:
        try:
            barrier.wait(timeout=30)
            for _ in range(40):  # bounded: 40 entries, at least one per round until empty
                got = pg_storage.redeliver_stale(
                    now=now, delivered_before=now - timedelta(seconds=START), limit=3
                )
                if not got:
                    return
                taken[n].extend(got)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=reaper, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [] == errors
    keys = Counter(e.task_id for batch in taken for e in batch)
    assert {tid: 1 for tid in ids} == dict(keys)
    assert pg_storage.wait_for_work(10.0) is True
    claimed = pg_storage.claim_due(now=now, limit=100, claimed_until=now + timedelta(seconds=30))
    assert sorted(ids) == sorted(e.task_id for e in claimed)
