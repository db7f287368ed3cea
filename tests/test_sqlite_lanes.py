"""AsyncSQLiteStorage while another process holds the write lock: reads go on, writes are bounded.

Real threads, a real file, and a second process holding ``BEGIN IMMEDIATE``.
The bounds asserted are generous functional ones (a read within a second, not
after the writes' lock waits).
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlite_lock import write_lock_held

from deepwork_retry import AsyncRetryService, ExecutorService, NoBackoff, RetryPolicy
from deepwork_retry._core.model import IdempotencyRecord, Progress
from deepwork_retry.exceptions import InvalidInput, StorageUnavailable
from deepwork_retry.storage._to_async import AsyncFromSync
from deepwork_retry.storage.sqlite import AsyncSQLiteStorage, SQLiteStorage

pytestmark = pytest.mark.slow

T = TypeVar("T")

LOCK_WAIT = 2.0
"""The storage's ``timeout`` in these tests, in seconds."""


def blocked_project(db: Path, count: int) -> list[str]:
    store = SQLiteStorage(db, synchronous="NORMAL")
    try:
        ex = ExecutorService(store, policy=RetryPolicy(backoff=NoBackoff()))
        ex.create_project("p")
        ids = [f"t{n:02d}" for n in range(count)]
        for tid in ids:
            ex.add_task("p", tid, max_retries=0)
            ex.assign("p", tid)
            ex.start("p", tid, 1)
            ex.fail("p", tid, 1, RuntimeError("boom"))
        return ids
    finally:
        store.close()


async def timed(call: Awaitable[T]) -> tuple[float, T | BaseException]:
    started = time.monotonic()
    try:
        result: T | BaseException = await call
    except Exception as exc:  # noqa: BLE001 - the outcome is what is checked
        result = exc
    return time.monotonic() - started, result


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(scenario())  # type: ignore[arg-type]


def test_reads_answer_while_writes_wait_for_the_lock(tmp_path: Path) -> None:
    """With the write lock held elsewhere and 30 retries waiting, every kind of read
    answers at once; each retry then fails within about one lock wait, changing nothing."""
    db = tmp_path / "retry.db"
    ids = blocked_project(db, 30)

    async def scenario() -> None:
        storage = AsyncSQLiteStorage(db, timeout=LOCK_WAIT)
        service = AsyncRetryService(storage)
        try:
            before = await storage.progress("p")
            with write_lock_held(db):
                await reads_while_writes_wait(storage, service, ids)
            assert before == await storage.progress("p")
        finally:
            await storage.close()

    run(scenario)


async def reads_while_writes_wait(
    storage: AsyncSQLiteStorage, service: AsyncRetryService, ids: list[str]
) -> None:
    """Retry every task of ``ids`` at once, read meanwhile, and check both bounds."""
    writes = [asyncio.ensure_future(timed(service.retry("p", tid))) for tid in ids]
    await asyncio.sleep(0.3)
    reads: list[Callable[[], Awaitable[Any]]] = [
        lambda: storage.progress("p"),
        lambda: storage.get_project("p"),
        lambda: storage.load("p", "t00"),
        lambda: storage.get_tasks("p", ["t00", "t01"]),
        lambda: storage.list_tasks("p", limit=5),
        lambda: storage.attempts("p", "t00"),
        lambda: storage.dispatches("p", "t00"),
        lambda: storage.deferred("p"),
        lambda: storage.dependants("p", "t00"),
        lambda: storage.get_idempotency("no-such-key"),
        lambda: service.get_task("p", "t00"),
    ]
    for read in reads * 2:
        elapsed, result = await timed(read())
        assert not isinstance(result, BaseException), result
        assert elapsed < 1.0, f"a read took {elapsed:.1f} s"
    outcomes = await asyncio.gather(*writes)
    assert all(isinstance(result, StorageUnavailable) for _, result in outcomes)
    slowest = max(elapsed for elapsed, _ in outcomes)
    assert slowest < LOCK_WAIT + 1.5, f"a write waited {slowest:.1f} s"


def test_writes_past_the_limit_are_refused_at_once(tmp_path: Path) -> None:
    """At most ``max_waiting_writes`` writes wait; one more is refused at once, and once
    the lock is free the storage writes again."""
    db = tmp_path / "retry.db"
    ids = blocked_project(db, 6)

    async def scenario() -> None:
        storage = AsyncSQLiteStorage(db, timeout=LOCK_WAIT, max_waiting_writes=4)
        service = AsyncRetryService(storage)
        try:
            with write_lock_held(db):
                waiting = [asyncio.ensure_future(timed(service.retry("p", t))) for t in ids[:4]]
                await asyncio.sleep(0.3)
                elapsed, result = await timed(service.retry("p", ids[4]))
                assert isinstance(result, StorageUnavailable)
                assert elapsed < 0.5, f"refused after {elapsed:.1f} s"
                assert all(
                    isinstance(r, StorageUnavailable) for _, r in await asyncio.gather(*waiting)
                )
            done = await service.retry("p", ids[5])
            assert ("assigned", 1) == (done.task.status.value, done.task.retry_count)
            progress = await storage.progress("p")
            assert (1, 5) == (progress.assigned, progress.blocked)
        finally:
            await storage.close()

    run(scenario)


def test_a_queued_write_waits_timeout_in_all(tmp_path: Path) -> None:
    """Writes queued behind one waiting for the lock fail ``timeout`` after they were sent,
    not one lock wait after another; the idempotency record is not written either."""
    db = tmp_path / "retry.db"
    blocked_project(db, 1)
    record = IdempotencyRecord(
        key="k",
        project_id="p",
        task_id="t00",
        created_at=ExecutorService(SQLiteStorage(db)).clock.now(),
    )

    async def scenario() -> list[float]:
        storage = AsyncSQLiteStorage(db, timeout=LOCK_WAIT)
        try:
            with write_lock_held(db):
                outcomes = await asyncio.gather(
                    *(timed(storage.save_idempotency(record)) for _ in range(6))
                )
            assert all(isinstance(result, StorageUnavailable) for _, result in outcomes)
            assert None is await storage.get_idempotency("k")
            return [elapsed for elapsed, _ in outcomes]
        finally:
            await storage.close()

    waits = run(scenario)
    assert max(waits) < LOCK_WAIT + 1.0, f"waits: {waits}"


def test_a_write_whose_lock_wait_was_shortened_leaves_no_shorter_wait_behind(
    tmp_path: Path,
) -> None:
    """Two threads write while another process holds the lock for a second: the second
    writer's wait for SQLite's lock is what is left of its timeout, and the pooled
    connections all wait the full timeout again afterwards."""
    db = tmp_path / "retry.db"
    blocked_project(db, 1)
    storage = SQLiteStorage(db, timeout=LOCK_WAIT + 1)
    now = ExecutorService(storage).clock.now()
    records = [
        IdempotencyRecord(key=k, project_id="p", task_id="t00", created_at=now) for k in "ab"
    ]
    try:
        with ThreadPoolExecutor(2) as pool:
            with write_lock_held(db):
                saved = [pool.submit(storage.save_idempotency, r) for r in records]
                time.sleep(1.0)
            assert records == [future.result() for future in saved]
        pooled = [c.execute("PRAGMA busy_timeout").fetchone()[0] for c in storage._idle]
        assert {int((LOCK_WAIT + 1) * 1000)} == set(pooled)
    finally:
        storage.close()


def test_closed_storage_refuses_and_stops_its_threads(tmp_path: Path) -> None:
    """After close(), reads and writes raise StorageUnavailable; close() may be repeated."""
    db = tmp_path / "retry.db"
    blocked_project(db, 1)

    async def scenario() -> None:
        storage = AsyncSQLiteStorage(db)
        assert Progress(project_id="p", total=1, blocked=1) == await storage.progress("p")
        await storage.close()
        await storage.close()
        with pytest.raises(StorageUnavailable):
            await storage.progress("p")
        with pytest.raises(StorageUnavailable):
            await AsyncRetryService(storage).retry("p", "t00")

    run(scenario)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_thread_and_queue_sizes_are_checked(tmp_path: Path, bad: Any) -> None:
    """A thread count or write queue limit that is not a positive integer is refused."""
    with pytest.raises(InvalidInput):
        AsyncSQLiteStorage(tmp_path / "a.db", readers=bad)
    with pytest.raises(InvalidInput):
        AsyncSQLiteStorage(tmp_path / "b.db", max_waiting_writes=bad)
    with pytest.raises(InvalidInput):
        AsyncSQLiteStorage(tmp_path / "c.db", writers=bad)


def test_dropping_a_failed_writes_error_never_waits_for_the_connection(tmp_path: Path) -> None:
    """The error of a retry that timed out on the lock holds nothing of the connection:
    freeing it on the event loop, while the next write waits for the lock on the same pooled
    connection, takes no time (it used to wait out that write's busy timeout)."""
    db = tmp_path / "retry.db"
    blocked_project(db, 1)

    async def scenario() -> float:
        storage = AsyncSQLiteStorage(db, timeout=LOCK_WAIT)
        kept: list[BaseException] = []
        try:
            with write_lock_held(db):
                now = ExecutorService(storage.sync).clock.now()
                try:
                    await storage.retry_blocked("p", "t00", now=now)
                except StorageUnavailable as exc:
                    kept.append(exc)
                assert kept, "the retry should have timed out"
                waiting = asyncio.ensure_future(
                    timed(storage.claim_due(now=now, limit=10, claimed_until=now))
                )
                await asyncio.sleep(0.5)  # the claim is in SQLite's busy handler now
                gc.collect()  # anything else collectable goes first, outside the measure
                started = time.monotonic()
                kept.clear()  # the error is freed here (reference counting)
                elapsed = time.monotonic() - started
                await waiting
            return elapsed
        finally:
            await storage.close()

    elapsed = run(scenario)
    assert elapsed < 0.5, f"freeing the error took {elapsed:.1f} s"


class Gate:
    """A sync "storage" whose writes wait for ``opened``, then return or raise."""

    def __init__(self) -> None:
        self.opened = threading.Event()

    def apply(self, outcome: str) -> str:
        self.opened.wait(10)
        if outcome == "fail":
            raise StorageUnavailable("failed")
        return outcome

    def close(self) -> None:
        return None


@settings(max_examples=30, deadline=None)
@given(
    outcomes=st.lists(st.sampled_from(["ok", "fail", "cancel"]), max_size=8),
    limit=st.integers(1, 4),
    writers=st.integers(1, 2),
)
def test_the_write_bound_counts_every_write_until_it_is_done(
    outcomes: list[str], limit: int, writers: int
) -> None:
    """Writes sent at once beyond ``max_waiting_writes`` are refused at once and only
    those; once every write returned, failed or was given up by its caller, the count of
    waiting writes is back to zero, so the bound never leaks."""
    gate = Gate()

    async def scenario() -> None:
        store = AsyncFromSync(
            gate,  # type: ignore[type-var]
            offload=True,
            writers=writers,
            max_waiting_writes=limit,
        )
        try:
            sent = [asyncio.ensure_future(store.apply(o)) for o in outcomes]  # type: ignore[arg-type]
            await asyncio.sleep(0.05)
            refused = [f.done() for f in sent]
            assert [False] * min(limit, len(sent)) + [True] * max(0, len(sent) - limit) == refused
            for future, outcome in zip(sent, outcomes, strict=True):
                if outcome == "cancel" and not future.done():
                    future.cancel()
            gate.opened.set()
            results: list[object] = list(await asyncio.gather(*sent, return_exceptions=True))
            for outcome, was_refused, result in zip(outcomes, refused, results, strict=True):
                if was_refused or outcome == "fail":
                    assert isinstance(result, StorageUnavailable)
                elif outcome == "ok":
                    assert "ok" == result
            for _ in range(200):
                if store._writes == 0:
                    break
                await asyncio.sleep(0.01)
            assert 0 == store._writes
        finally:
            gate.opened.set()
            await store.close()

    asyncio.run(scenario())
