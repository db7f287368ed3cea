"""The in-memory storage against the shipped conformance suite and state machine."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import example, given, settings
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
from deepwork_retry._core.events import EventRetry
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


def _prunable(store: MemoryStorage, rule: object) -> dict[str, set[object]]:
    """What ``rule`` removes, found by asking it about every row (no index)."""
    assert isinstance(rule, memory.PruneRule)
    held: dict[tuple[str, int], int] = {}
    for key in store._event_retries:
        held[key[:2]] = held.get(key[:2], 0) + 1
    return {
        "idempotency": {
            k for k, r in store._idempotency.items()
            if rule.removes_idempotency(memory._idempotency(r))
        },
        "outbox": {
            k for k, r in store._outbox.items()
            if r[memory._E_STATE] == memory._DELIVERED
            and rule.removes_entry(memory._entry(r), store._task(r[0], r[1]))
        },
        "attempts": {
            (k, r[2]) for k, rows in store._attempts.items() for r in rows
            if rule.removes_attempt(memory._attempt(r), store._task(*k))
        },
        "events": {
            (pid, seq) for pid, rows in store._events.items() for seq, r in rows.items()
            if rule.removes_event(r[memory._EV_DELIVERED], retries=held.get((pid, seq), 0))
        },
    }  # fmt: skip


def _rows(store: MemoryStorage) -> dict[str, set[object]]:
    return {
        "idempotency": set(store._idempotency),
        "outbox": set(store._outbox),
        "attempts": {(k, r[2]) for k, rows in store._attempts.items() for r in rows},
        "events": {(pid, seq) for pid, rows in store._events.items() for seq in rows},
    }


@settings(max_examples=150, deadline=None)
@example(  # an event kept for its failed delivery, removable once that is done with
    steps=[("new", 0, 0), ("events", 20, 0), ("new", 0, 10), ("forget", 5, 10), ("new", 0, 3)],
    periods=(1, 0, None), batch=3,
)  # fmt: skip
@example(  # an entry kept while its attempt waits to start, removable once it started
    steps=[("new", 0, 0), ("hold", 0, 0), ("new", 0, 10), ("resume", 0, 3), ("new", 0, 3)],
    periods=(1, 0, None), batch=3,
)  # fmt: skip
@example(  # attempts of tasks finished at different times, in small batches
    steps=[("new", 0, 0), ("finish", 0, 0), ("new", 0, 3), ("finish", 0, 6), ("retry", 0, 3),
           ("new", 0, 30), ("new", 0, 3)],
    periods=(1, 0, 5), batch=1,
)  # fmt: skip
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(
                    ["new", "retry", "finish", "hold", "resume", "events", "forget", "redeliver"]
                ),
                  st.integers(0, 5), st.integers(0, 400)),
        min_size=1, max_size=60,
    ),
    periods=st.tuples(st.integers(1, 600), st.integers(0, 600), st.none() | st.integers(0, 600)),
    batch=st.integers(1, 7),
)  # fmt: skip
def test_indexed_prune_removes_what_the_rule_accepts_oldest_first(
    steps: list[tuple[str, int, int]],
    periods: tuple[int, int, int | None],
    batch: int,
) -> None:
    """Whatever the history and wherever prunes fall in it, a prune run to the end removes
    exactly the rows its rule accepts (asked about every row), at most ``batch`` of each
    table per call, each table's batch before any row it leaves of earlier time."""
    from deepwork_retry.testing.doubles import FakeClock

    clock = FakeClock()
    store = MemoryStorage()
    retention = Retention(
        idempotency=timedelta(seconds=periods[0]),
        delivered_outbox=timedelta(seconds=periods[1]),
        attempts=None if periods[2] is None else timedelta(seconds=periods[2]),
    )
    dispatcher = RecordingDispatcher()
    service = RetryService(store, dispatcher, clock=clock)
    executor = ExecutorService(store, dispatcher, clock=clock)
    executor.create_project("p")
    made = 0
    for n, (kind, which, seconds) in enumerate(steps):
        clock.advance(seconds)
        blocked = store.list_tasks("p", status=TaskStatus.BLOCKED)
        held = store.list_tasks("p", status=TaskStatus.ASSIGNED)
        if kind == "resume" and held:  # a held task starts at last: its entry may go now
            task = held[which % len(held)]
            executor.start("p", task.id, task.attempt)
            executor.fail("p", task.id, task.attempt, RuntimeError("x"))
        elif kind == "forget":  # failed deliveries done with: their events may go now
            now = clock.now()
            for retry in store.claim_event_retries(now=now, limit=1 + which, claimed_until=now):
                store.settle_event_retry(retry, now=now)
        elif kind in ("new", "resume") or not blocked:
            made += 1
            executor.add_task("p", f"t{made}", max_retries=0)
            executor.assign("p", f"t{made}")
            executor.start("p", f"t{made}", 1)
            executor.fail("p", f"t{made}", 1, RuntimeError("x"))
        elif kind in ("retry", "finish", "hold"):
            task = blocked[which % len(blocked)]
            attempt = service.retry("p", task.id, idempotency_key=f"k{n}").task.attempt
            if kind != "hold":  # held: delivered, not started, so its entry must stay
                executor.start("p", task.id, attempt)
                if kind == "finish":
                    executor.succeed("p", task.id, attempt)
                else:
                    executor.fail("p", task.id, attempt, RuntimeError("x"))
        elif kind == "events":
            now = clock.now()
            claimed = store.claim_events(now=now, limit=1 + which, claimed_until=now)
            failures = [  # a listener failed every third: kept, to retry
                EventRetry(event=e, subscriber="l", tries=1, retry_at=now, last_error="x")
                for e in claimed
                if e.seq % 3 == 0
            ]
            store.settle_events(claimed, now=now, failures=failures)
        else:
            store.redeliver_stale(now=clock.now(), delivered_before=clock.now(), limit=3)
        if seconds % 3 == 0:  # a prune here, run to its end
            rule = retention.rule(clock.now(), batch=batch)
            while True:
                expected = _prunable(store, rule)
                times = {
                    "idempotency": {k: r[memory._I_EXPIRES] for k, r in store._idempotency.items()},
                    "outbox": {k: r[memory._E_DELIVERED] for k, r in store._outbox.items()},
                    "events": {
                        (pid, q): r[memory._EV_DELIVERED]
                        for pid, rows in store._events.items()
                        for q, r in rows.items()
                    },
                }
                before = _rows(store)
                got = store.prune(rule)
                after = _rows(store)
                for table, count in (
                    ("idempotency", got.idempotency), ("outbox", got.outbox),
                    ("attempts", got.attempts), ("events", got.events),
                ):  # fmt: skip
                    removed = before[table] - after[table]
                    assert count == len(removed) <= batch
                    assert removed <= expected[table]
                    if count < batch:
                        assert removed == expected[table]
                    elif table in times:  # oldest first: nothing left is older
                        at = times[table]
                        left = [at[k] for k in expected[table] - removed]
                        assert not left or max(at[k] for k in removed) <= min(left)
                if got.total == 0:
                    break
            assert _prunable(store, rule) == {t: set() for t in expected}
