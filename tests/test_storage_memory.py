"""The in-memory storage against the shipped conformance suite and state machine."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deepwork_retry import (
    AsyncStorage,
    ExecutorService,
    Project,
    Retention,
    RetryService,
    Task,
    TaskStatus,
)
from deepwork_retry._core.model import Attempt, DispatchEntry
from deepwork_retry._core.states import DispatchState
from deepwork_retry.storage import memory
from deepwork_retry.storage.memory import AsyncMemoryStorage, MemoryStorage
from deepwork_retry.testing import (
    AsyncStorageContract,
    RecordingDispatcher,
    StorageContract,
    async_storage_machine,
    storage_machine,
)
from deepwork_retry.testing.strategies import any_attempts, any_tasks, ids, timestamps


@pytest.fixture
def storage() -> Iterator[MemoryStorage]:
    store = MemoryStorage()
    yield store
    store.close()


@pytest.fixture
def async_storage_factory() -> object:
    async def make() -> AsyncStorage:
        return AsyncMemoryStorage()

    return make


class TestMemoryStorage(StorageContract):
    pass


class TestAsyncMemoryStorage(AsyncStorageContract):
    pass


TestMemoryMachine = storage_machine(MemoryStorage).TestCase


async def _make_async() -> AsyncStorage:
    return AsyncMemoryStorage()


TestAsyncMemoryMachine = async_storage_machine(_make_async).TestCase


# -- the history kept as rows --------------------------------------------------------------
_maybe = st.none() | st.text(max_size=20)


@given(
    attempt=any_attempts(texts=ids(), times=timestamps()),
    entry=st.builds(
        DispatchEntry,
        project_id=ids(),
        task_id=ids(),
        attempt=st.integers(min_value=1, max_value=10**6),
        state=st.sampled_from(DispatchState),
        available_at=timestamps(),
        created_at=timestamps(),
        claimed_until=st.none() | timestamps(),
        tries=st.integers(min_value=0, max_value=1000),
        last_error=_maybe,
        delivered_at=st.none() | timestamps(),
    ),
)
def test_history_rows_give_back_the_values(attempt: Attempt, entry: DispatchEntry) -> None:
    back_attempt = memory._attempt(memory._attempt_row(attempt))
    back_entry = memory._entry(memory._entry_row(entry))
    assert (attempt, entry) == (back_attempt, back_entry)
    assert back_attempt.trigger is attempt.trigger  # members, not their strings
    assert back_entry.state is entry.state


def test_the_history_leaves_the_cycle_collectors_view() -> None:
    """After two full collections the outbox and the attempt records are no longer tracked.

    A tuple leaves the collector's view once its items have, so the tuple of a
    task's attempt rows goes in the pass after its rows; a dict goes once all
    it holds has.
    """
    store = MemoryStorage()
    store.create_project(Project(id="p"))
    store.add_tasks(
        [Task(id=f"t{i}", project_id="p", status=TaskStatus.BLOCKED) for i in range(50)]
    )
    service = RetryService(store)
    for i in range(50):
        service.retry("p", f"t{i}", actor="ops", reason="disk full")
    gc.collect()
    gc.collect()
    tracked = {
        "outbox": gc.is_tracked(store._outbox),
        "attempts": gc.is_tracked(store._attempts),
        "pending": gc.is_tracked(store._pending),
    }
    assert {"outbox": False, "attempts": False, "pending": False} == tracked
    # and nothing was lost on the way
    assert 50 == sum(len(store.dispatches("p", f"t{i}")) for i in range(50))
    assert [1] == [a.number for a in store.attempts("p", "t7")]
    assert "ops" == store.attempts("p", "t7")[0].actor


@given(task=any_tasks())
def test_task_rows_give_back_the_values(task: Task) -> None:
    back = memory._task_of(memory._task_row(task))
    assert task == back
    assert task.metadata == back.metadata  # not part of equality
    assert back.status is task.status  # members, not their strings
    assert back.blocked_reason is task.blocked_reason


def test_finished_tasks_events_and_keys_leave_the_cycle_collectors_view() -> None:
    """Finished tasks, the events and the idempotency records are kept as rows: after
    three full collections the collector no longer tracks them.

    Kept as frozen values (or as rows holding a dict) they stay tracked for
    ever, and every full collection walks all of them. A tuple leaves the
    collector's view in the pass after its items have: the pairs of a task's
    metadata, then the tuple of them, then the row.
    """
    store = MemoryStorage()
    store.create_project(Project(id="p"))
    store.add_tasks(
        [
            Task(id=f"t{i}", project_id="p", status=TaskStatus.BLOCKED, metadata={"n": i})
            for i in range(50)
        ]
    )
    service, executor = RetryService(store), ExecutorService(store)
    for i in range(50):
        retried = service.retry(
            "p", f"t{i}", actor="ops", reason="disk full", idempotency_key=f"k{i}"
        )
        attempt = retried.task.attempt
        if i % 2 == 0:
            executor.start("p", f"t{i}", attempt)
            executor.succeed("p", f"t{i}", attempt)
    for _ in range(3):
        gc.collect()
    kept = store._tasks["p"]
    assert [False] * 25 == [gc.is_tracked(kept[f"t{i}"]) for i in range(0, 50, 2)]
    assert not gc.is_tracked(store._events["p"])
    assert not gc.is_tracked(store._idempotency)
    # and the values come back whole
    assert "t3" == store.get_idempotency("k3").task_id  # type: ignore[union-attr]
    done = store.load("p", "t4")[1]
    assert (TaskStatus.DONE, 1, {"n": 4}) == (done.status, done.attempt, dict(done.metadata))
    assert store.get_tasks("p", ["t4"]) == {"t4": done}
    assert TaskStatus.ASSIGNED is store.load("p", "t5")[1].status
    assert {"reason": "disk full"}.items() <= store.events("p", after=50)[0].data.items()


@given(
    attempt=any_attempts(texts=ids(), times=timestamps()),
    task=any_tasks(),
    now=timestamps(),
    period=st.none() | st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=30)),
)
def test_an_attempt_goes_only_with_its_tasks_history(
    attempt: Attempt, task: Task, now: datetime, period: timedelta | None
) -> None:
    """The memory storage skips a task's rows when ``removes_attempts_of`` says none goes."""
    rule = Retention(attempts=period).rule(now)
    if rule.removes_attempt(attempt, task):
        assert rule.removes_attempts_of(task)


def test_prune_removes_the_oldest_batch_of_each_table() -> None:
    """A prune removes the oldest ``batch`` rows of what the rule allows, and the next the rest."""
    store = MemoryStorage()
    store.create_project(Project(id="p"))
    store.add_tasks(
        [Task(id=f"t{i}", project_id="p", status=TaskStatus.BLOCKED) for i in range(30)]
    )
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    executor = ExecutorService(store, RecordingDispatcher())
    service = RetryService(store, RecordingDispatcher())
    for i in reversed(range(30)):  # t29 is retried and finished first: the oldest
        at = start + timedelta(seconds=30 - i)
        service.clock = executor.clock = _At(at)
        attempt = service.retry("p", f"t{i}").task.attempt
        executor.start("p", f"t{i}", attempt)
        executor.succeed("p", f"t{i}", attempt)
    rule = Retention(delivered_outbox=timedelta(0), attempts=timedelta(0)).rule(
        start + timedelta(days=1), batch=10
    )
    first = store.prune(rule)
    assert (10, 10) == (first.outbox, first.attempts)
    assert [] == store.attempts("p", "t29") == store.dispatches("p", "t29")
    assert [] != store.attempts("p", "t0")
    store.prune(rule)
    store.prune(rule)
    assert [] == store.attempts("p", "t0") == store.dispatches("p", "t0")
    assert 0 == store.prune(rule).total


class _At:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def now(self) -> datetime:
        return self.at
