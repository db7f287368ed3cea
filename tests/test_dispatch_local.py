"""The in-process dispatchers and the outbox relay, on real threads and event loops."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from deepwork_retry import (
    AsyncExecutorService,
    AsyncOutboxRelay,
    AsyncRetryService,
    DispatchEntry,
    DispatchState,
    ExecutorService,
    NoBackoff,
    OutboxRelay,
    RetryPolicy,
    RetryService,
    TaskError,
)
from deepwork_retry.dispatch.asyncio import AsyncioDispatcher
from deepwork_retry.dispatch.inline import AsyncInlineDispatcher, InlineDispatcher
from deepwork_retry.dispatch.threads import ThreadPoolDispatcher
from deepwork_retry.exceptions import DispatchError
from deepwork_retry.storage.memory import AsyncMemoryStorage, MemoryStorage
from deepwork_retry.testing import AsyncRecordingDispatcher, FakeClock, RecordingDispatcher

WAIT = 10.0
"""Upper bound on any wait for another thread (a bound, never an assertion on speed)."""

POLICY = RetryPolicy(backoff=NoBackoff())


def _entry(task_id: str = "t", attempt: int = 1) -> DispatchEntry:
    clock = FakeClock()
    return DispatchEntry(
        project_id="p",
        task_id=task_id,
        attempt=attempt,
        state=DispatchState.PENDING,
        available_at=clock.now(),
        created_at=clock.now(),
    )


def _blocked_task(storage: MemoryStorage, clock: FakeClock) -> None:
    executor = ExecutorService(storage, RecordingDispatcher(), policy=POLICY, clock=clock)
    executor.create_project("p")
    executor.add_task("p", "t", max_retries=0)
    executor.assign("p", "t")
    executor.start("p", "t", 1)
    executor.fail("p", "t", 1, TaskError(type="Boom", message="failed"))


# -- inline ------------------------------------------------------------------------


def test_inline_calls_function_with_entry() -> None:
    """InlineDispatcher delivers by calling its function with the entry, in the caller's thread."""
    seen: list[tuple[DispatchEntry, int]] = []
    dispatcher = InlineDispatcher(lambda e: seen.append((e, threading.get_ident())))
    entry = _entry()
    dispatcher.dispatch(entry)
    assert [(entry, threading.get_ident())] == seen


def test_inline_failure_leaves_entry_pending() -> None:
    """A raising inline function makes the retry's dispatch pending, and the relay delivers it."""
    clock = FakeClock()
    storage = MemoryStorage()
    _blocked_task(storage, clock)
    calls: list[tuple[str, str, int]] = []

    def flaky(entry: DispatchEntry) -> None:
        calls.append(entry.key)
        if len(calls) == 1:
            raise ConnectionError("broker down")

    dispatcher = InlineDispatcher(flaky)
    result = RetryService(storage, dispatcher, clock=clock).retry("p", "t")
    assert ("pending", "ConnectionError: broker down") == (
        result.dispatch.status,
        result.dispatch.error,
    )
    clock.advance(120)
    assert 1 == OutboxRelay(storage, dispatcher, clock=clock).run_once()
    assert [("p", "t", 2), ("p", "t", 2)] == calls
    entry = storage.dispatches("p", "t")[-1]
    assert (DispatchState.DELIVERED, 2) == (entry.state, entry.tries)


def test_async_inline_awaits_function() -> None:
    """AsyncInlineDispatcher awaits its function; a raise leaves the retry's dispatch pending."""

    async def main() -> tuple[str, str, list[tuple[str, str, int]]]:
        clock = FakeClock()
        sync = MemoryStorage()
        _blocked_task(sync, clock)
        seen: list[tuple[str, str, int]] = []
        healthy = True

        async def deliver(entry: DispatchEntry) -> None:
            await asyncio.sleep(0)
            if not healthy:
                raise ConnectionError("down")
            seen.append(entry.key)

        storage = AsyncMemoryStorage(sync)
        service = AsyncRetryService(storage, AsyncInlineDispatcher(deliver), clock=clock)
        healthy = False
        first = await service.retry("p", "t")
        healthy = True
        clock.advance(120)
        relay = AsyncOutboxRelay(storage, AsyncInlineDispatcher(deliver), clock=clock)
        await relay.run_once()
        return first.dispatch.status, sync.dispatches("p", "t")[-1].state.value, seen

    assert ("pending", "delivered", [("p", "t", 2)]) == asyncio.run(main())


# -- thread pool ----------------------------------------------------------------------


def test_thread_pool_runs_in_worker_threads() -> None:
    """Every dispatched entry runs once in a worker thread; shutdown waits for them."""
    lock = threading.Lock()
    pool_log: list[tuple[tuple[str, str, int], str]] = []

    def work(entry: DispatchEntry) -> None:
        with lock:
            pool_log.append((entry.key, threading.current_thread().name))

    dispatcher = ThreadPoolDispatcher(work, max_workers=4)
    entries = [_entry(f"t{i}") for i in range(20)]
    for entry in entries:
        dispatcher.dispatch(entry)
    dispatcher.shutdown(wait=True)
    assert sorted(e.key for e in entries) == sorted(key for key, _ in pool_log)
    assert all(name.startswith("deepwork-dispatch") for _, name in pool_log)


def test_thread_pool_refuses_after_shutdown() -> None:
    """A shut-down pool dispatcher raises DispatchError, so the outbox keeps the entry pending."""
    clock = FakeClock()
    storage = MemoryStorage()
    _blocked_task(storage, clock)
    dispatcher = ThreadPoolDispatcher(lambda e: None, max_workers=1)
    dispatcher.shutdown()
    with pytest.raises(DispatchError):
        dispatcher.dispatch(_entry())
    result = RetryService(storage, dispatcher, clock=clock).retry("p", "t")
    assert "pending" == result.dispatch.status
    assert DispatchState.PENDING == storage.dispatches("p", "t")[-1].state


def test_thread_pool_reports_work_errors() -> None:
    """An exception inside the dispatched work goes to on_error; the delivery still counts."""
    errors: list[tuple[tuple[str, str, int], str]] = []
    done = threading.Event()

    def on_error(entry: DispatchEntry, exc: BaseException) -> None:
        errors.append((entry.key, str(exc)))
        done.set()

    def work(entry: DispatchEntry) -> None:
        raise ValueError("executor crashed")

    with ThreadPoolDispatcher(work, max_workers=1, on_error=on_error) as dispatcher:
        dispatcher.dispatch(_entry())
        assert done.wait(WAIT)
    assert [(("p", "t", 1), "executor crashed")] == errors


def test_thread_pool_shared_executor_left_running() -> None:
    """With a host-owned executor, shutdown stops the dispatcher but not the pool."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        dispatcher = ThreadPoolDispatcher(lambda e: None, executor=pool)
        dispatcher.shutdown()
        assert 42 == pool.submit(lambda: 42).result(timeout=WAIT)
        with pytest.raises(DispatchError):
            dispatcher.dispatch(_entry())


# -- asyncio tasks ---------------------------------------------------------------------


def test_asyncio_dispatcher_schedules_and_awaits_tasks() -> None:
    """AsyncioDispatcher runs each entry as a task and aclose waits for all of them."""

    async def main() -> tuple[int, list[tuple[str, str, int]], bool]:
        gate = asyncio.Event()
        seen: list[tuple[str, str, int]] = []

        async def work(entry: DispatchEntry) -> None:
            await gate.wait()
            seen.append(entry.key)

        dispatcher = AsyncioDispatcher(work)
        for i in range(5):
            await dispatcher.dispatch(_entry(f"t{i}"))
        running = dispatcher.running
        gate.set()
        await dispatcher.aclose()
        try:
            await dispatcher.dispatch(_entry("late"))
        except DispatchError:
            refused = True
        else:
            refused = False
        return running, sorted(seen), refused

    running, seen, refused = asyncio.run(main())
    assert 5 == running
    assert [("p", f"t{i}", 1) for i in range(5)] == seen
    assert refused is True


def test_asyncio_dispatcher_reports_errors() -> None:
    """An exception inside a dispatched task goes to on_error and does not escape."""
    errors: list[str] = []

    async def main() -> None:
        async def work(entry: DispatchEntry) -> None:
            raise RuntimeError(f"bad {entry.task_id}")

        dispatcher = AsyncioDispatcher(work, on_error=lambda e, exc: errors.append(str(exc)))
        await dispatcher.dispatch(_entry("x"))
        await dispatcher.aclose()

    asyncio.run(main())
    assert ["bad x"] == errors


def test_asyncio_dispatcher_with_services() -> None:
    """The async services hand a manual retry's dispatch to an asyncio task."""

    async def main() -> tuple[str, list[tuple[str, str, int]]]:
        clock = FakeClock()
        sync = MemoryStorage()
        _blocked_task(sync, clock)
        seen: list[tuple[str, str, int]] = []

        async def work(entry: DispatchEntry) -> None:
            seen.append(entry.key)

        dispatcher = AsyncioDispatcher(work)
        service = AsyncRetryService(AsyncMemoryStorage(sync), dispatcher, clock=clock)
        result = await service.retry("p", "t")
        await dispatcher.aclose()
        return result.dispatch.status, seen

    assert ("dispatched", [("p", "t", 2)]) == asyncio.run(main())


def test_asyncio_dispatched_work_starts_before_the_delivery_is_recorded() -> None:
    """A task the AsyncioDispatcher scheduled takes its first step before the delivery
    is recorded, after a request's retry and in the relay, rather than waiting behind
    that write."""

    async def main() -> list[tuple[str, bool]]:
        clock = FakeClock()
        sync = MemoryStorage()
        _blocked_task(sync, clock)
        executor = ExecutorService(sync, RecordingDispatcher(), policy=POLICY, clock=clock)
        executor.add_task("p", "t2", max_retries=0)
        executor.assign("p", "t2")
        executor.start("p", "t2", 1)
        executor.fail("p", "t2", 1, TaskError(type="Boom", message="failed"))
        started: list[tuple[str, str, int]] = []
        recorded: list[tuple[str, bool]] = []

        class Recording(AsyncMemoryStorage):
            async def mark_delivered(self, entries: Sequence[DispatchEntry], *, now: Any) -> None:
                for entry in entries:
                    recorded.append((entry.task_id, entry.key in started))
                await super().mark_delivered(entries, now=now)

        async def work(entry: DispatchEntry) -> None:
            started.append(entry.key)

        storage = Recording(sync)
        dispatcher = AsyncioDispatcher(work)
        await AsyncRetryService(storage, dispatcher, clock=clock).retry("p", "t")
        # No dispatcher: the retry leaves its entry to the relay.
        await AsyncRetryService(storage, clock=clock).retry("p", "t2")
        assert 1 == await AsyncOutboxRelay(storage, dispatcher, clock=clock).run_once()
        await dispatcher.aclose()
        return recorded

    assert [("t", True), ("t2", True)] == asyncio.run(main())


# -- the outbox relay as a running component ---------------------------------------------


def test_relay_in_thread_delivers_failed_dispatch() -> None:
    """A relay running in a thread delivers an entry whose first delivery failed, then stops."""
    clock = FakeClock()
    storage = MemoryStorage()
    _blocked_task(storage, clock)
    dispatcher = RecordingDispatcher(failing=True)
    result = RetryService(storage, dispatcher, clock=clock).retry("p", "t")
    assert "pending" == result.dispatch.status
    delivered = threading.Event()

    def deliver(entry: DispatchEntry) -> None:
        dispatcher.dispatch(entry)
        delivered.set()

    dispatcher.failing = False
    clock.advance(120)
    relay = OutboxRelay(storage, InlineDispatcher(deliver), clock=clock, poll_interval=0.01)
    stop = threading.Event()
    worker = threading.Thread(target=relay.run, args=(stop,), name="relay")
    worker.start()
    try:
        assert delivered.wait(WAIT)
    finally:
        stop.set()
        worker.join(WAIT)
    assert not worker.is_alive()
    assert [("p", "t", 2)] == dispatcher.keys
    entry = storage.dispatches("p", "t")[-1]
    assert (DispatchState.DELIVERED, 2) == (entry.state, entry.tries)


def test_relay_in_asyncio_task_delivers_failed_dispatch() -> None:
    """A relay running as an asyncio task delivers an entry whose first delivery failed."""

    async def main() -> tuple[str, list[tuple[str, str, int]], DispatchState]:
        clock = FakeClock()
        sync = MemoryStorage()
        storage = AsyncMemoryStorage(sync)
        executor = AsyncExecutorService(storage, policy=POLICY, clock=clock)
        await executor.create_project("p")
        await executor.add_task("p", "t", max_retries=0)
        dispatcher = AsyncRecordingDispatcher(failing=True)
        live = AsyncExecutorService(storage, dispatcher, policy=POLICY, clock=clock)
        assigned = await live.assign("p", "t")
        dispatcher.failing = False
        clock.advance(120)
        relay = AsyncOutboxRelay(storage, dispatcher, clock=clock, poll_interval=0.01)
        stop = asyncio.Event()
        task = asyncio.create_task(relay.run(stop))
        for _ in range(1000):  # bounded: the relay needs one poll
            if dispatcher.keys:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, WAIT)
        return assigned.dispatches[0].status, dispatcher.keys, sync.dispatches("p", "t")[0].state

    status, keys, state = asyncio.run(main())
    assert ("pending", [("p", "t", 1)], DispatchState.DELIVERED) == (status, keys, state)
