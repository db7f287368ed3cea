"""The services on a storage that joins the host's transaction (``JoinsHostTransaction``).

The storage here is the in-memory one inside a host transaction of its own
making: ``begin`` snapshots the state, ``rollback`` restores it and
``commit`` runs what was registered with ``after_commit``. The storages that
join a real database's transaction have their own tests against the server.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from deepwork_retry import (
    AsyncExecutorService,
    AsyncJoinsHostTransaction,
    AsyncRetryService,
    ExecutorService,
    JoinsHostTransaction,
    OutboxRelay,
    RetryService,
    TaskError,
    TaskNotBlocked,
)
from deepwork_retry.storage.memory import AsyncMemoryStorage, MemoryStorage
from deepwork_retry.testing import AsyncRecordingDispatcher, FakeClock, RecordingDispatcher


class HostMemory(MemoryStorage):
    """A :class:`MemoryStorage` whose calls run inside a host transaction when one is open."""

    def __init__(self) -> None:
        super().__init__()
        self.snapshot: dict[str, Any] | None = None
        self.callbacks: list[Callable[[], Any]] = []

    def begin(self) -> None:
        assert self.snapshot is None
        self.snapshot = {
            name: copy.deepcopy(value)
            for name, value in vars(self).items()
            if name not in ("_lock", "snapshot", "callbacks")
        }

    def commit(self) -> list[Callable[[], Any]]:
        self.snapshot = None
        callbacks, self.callbacks = self.callbacks, []
        return callbacks

    def rollback(self) -> None:
        assert self.snapshot is not None
        vars(self).update(self.snapshot)
        self.snapshot = None
        self.callbacks = []

    def after_commit(self, callback: Callable[[], None]) -> None:
        if self.snapshot is None:
            callback()
        else:
            self.callbacks.append(callback)


class SyncHost(HostMemory):
    def commit(self) -> list[Callable[[], Any]]:
        callbacks = super().commit()
        for callback in callbacks:
            callback()
        return callbacks


class AsyncHost(AsyncMemoryStorage):
    def __init__(self) -> None:
        super().__init__(HostMemory())
        self.host: HostMemory = self.sync  # type: ignore[assignment]
        self.tasks: list[asyncio.Task[None]] = []

    def after_commit(self, callback: Callable[[], Awaitable[None]]) -> None:
        self.host.after_commit(lambda: self._schedule(callback))

    def _schedule(self, callback: Callable[[], Awaitable[None]]) -> None:
        async def run() -> None:
            await callback()

        self.tasks.append(asyncio.get_running_loop().create_task(run()))

    async def commit(self) -> None:
        for callback in self.host.commit():
            callback()
        await asyncio.gather(*self.tasks)


class World:
    def __init__(self) -> None:
        self.storage = SyncHost()
        self.clock = FakeClock()
        self.dispatcher = RecordingDispatcher()
        self.executor = ExecutorService(self.storage, self.dispatcher, clock=self.clock)
        self.retries = RetryService(self.storage, self.dispatcher, clock=self.clock)
        self.executor.create_project("p")
        self.executor.add_task("p", "t", max_retries=0)
        self.executor.assign("p", "t")
        self.executor.start("p", "t", 1)
        self.executor.fail("p", "t", 1, TaskError(type="E", message="boom"))
        self.dispatcher.delivered.clear()


def test_the_protocols_recognise_a_joined_storage_and_nothing_else() -> None:
    """A storage with ``after_commit`` joins host transactions; the plain ones do not."""
    assert isinstance(SyncHost(), JoinsHostTransaction)
    assert isinstance(AsyncHost(), AsyncJoinsHostTransaction)
    assert not isinstance(MemoryStorage(), JoinsHostTransaction)
    assert not isinstance(AsyncMemoryStorage(), AsyncJoinsHostTransaction)


def test_a_retry_in_the_host_transaction_is_dispatched_only_after_the_commit() -> None:
    """The retry answers `pending` and the dispatcher gets it once, when the host commits."""
    w = World()
    w.storage.begin()
    result = w.retries.retry("p", "t", idempotency_key="k")
    assert ("assigned", "pending") == (result.task.status, result.dispatch.status)
    assert [] == w.dispatcher.keys
    w.storage.commit()
    assert [("p", "t", 2)] == w.dispatcher.keys
    [entry] = [e for e in w.storage.dispatches("p", "t") if e.attempt == 2]
    assert "delivered" == entry.state


def test_a_host_rollback_leaves_nothing_of_the_retry_and_dispatches_nothing() -> None:
    """After the host rolls back: task still blocked, no attempt, entry or key; no dispatch."""
    w = World()
    before = (w.storage.load("p", "t")[1], w.storage.attempts("p", "t"))
    entries = w.storage.dispatches("p", "t")
    w.storage.begin()
    w.retries.retry("p", "t", idempotency_key="k")
    w.storage.rollback()
    assert before == (w.storage.load("p", "t")[1], w.storage.attempts("p", "t"))
    assert entries == w.storage.dispatches("p", "t")
    assert w.storage.get_idempotency("k") is None
    assert [] == w.dispatcher.keys
    w.storage.begin()
    w.storage.commit()  # a later commit does not run what the rollback dropped
    assert [] == w.dispatcher.keys


def test_without_a_host_transaction_the_retry_is_dispatched_at_once() -> None:
    """``after_commit`` outside a host transaction runs at once: dispatched as usual."""
    w = World()
    assert [] == w.dispatcher.keys
    result = w.retries.retry("p", "t")
    assert "dispatched" == result.dispatch.status
    assert [("p", "t", 2)] == w.dispatcher.keys


def test_a_refused_retry_registers_no_delivery() -> None:
    """A retry the rules refuse raises as usual and leaves nothing to run after the commit."""
    w = World()
    w.storage.begin()
    w.retries.retry("p", "t")
    with pytest.raises(TaskNotBlocked):
        w.retries.retry("p", "t")
    assert 1 == len(w.storage.callbacks)
    w.storage.commit()
    assert [("p", "t", 2)] == w.dispatcher.keys


def test_executor_moves_and_project_releases_wait_for_the_commit_too() -> None:
    """Every service move that makes work pending delivers it after the commit only."""
    w = World()
    w.executor.add_task("p", "a")
    w.executor.add_task("p", "b", blocked_by=["a"])
    w.storage.begin()
    assert ["pending"] == [d.status for d in w.executor.assign("p", "a").dispatches]
    w.executor.set_project_status("p", "paused")
    assert ["deferred"] == [d.status for d in w.executor.assign("p", "b").dispatches]
    _, released = w.executor.set_project_status("p", "executing")
    assert [] == w.dispatcher.keys
    w.storage.commit()
    assert [("p", "a", 1)] == w.dispatcher.keys
    assert [] == [d.status for d in released]  # b still waits for a


def test_the_relay_delivers_what_a_dispatcherless_retry_left_after_the_commit() -> None:
    """Without a dispatcher the entry is left unclaimed for the relay, as on any storage."""
    w = World()
    retries = RetryService(w.storage, clock=w.clock)
    w.storage.begin()
    assert "pending" == retries.retry("p", "t").dispatch.status
    assert [] == w.storage.callbacks
    w.storage.commit()
    assert 1 == OutboxRelay(w.storage, w.dispatcher, clock=w.clock).run_once()
    assert [("p", "t", 2)] == w.dispatcher.keys


def test_async_retry_is_dispatched_after_the_commit_and_not_after_a_rollback() -> None:
    """The async services register a coroutine that the storage runs once the host commits."""

    async def main() -> None:
        storage = AsyncHost()
        clock = FakeClock()
        dispatcher = AsyncRecordingDispatcher()
        executor = AsyncExecutorService(storage, dispatcher, clock=clock)
        retries = AsyncRetryService(storage, dispatcher, clock=clock)
        await executor.create_project("p")
        for task_id in ("t", "u"):
            await executor.add_task("p", task_id, max_retries=0)
            await executor.assign("p", task_id)
            await executor.start("p", task_id, 1)
            await executor.fail("p", task_id, 1, TaskError(type="E", message="boom"))
        await asyncio.gather(*storage.tasks)
        dispatcher.delivered.clear()
        storage.host.begin()
        assert "pending" == (await retries.retry("p", "t")).dispatch.status
        storage.host.rollback()
        storage.host.begin()
        assert "pending" == (await retries.retry("p", "u")).dispatch.status
        await asyncio.sleep(0)
        assert [] == dispatcher.keys
        await storage.commit()
        assert [("p", "u", 2)] == dispatcher.keys
        assert "blocked" == (await storage.load("p", "t"))[1].status

    asyncio.run(main())
