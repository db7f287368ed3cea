"""The SQLite one-transaction manual retry, checked against the general path.

:meth:`SQLiteStorage.retry_blocked` renders the decision of
:func:`~deepwork_retry._core.decide.manual_retry` into its statements (the
task's change, made only where the core allows it) and makes the rest of the
core's checks on what they read back. From the same initial state it must
change exactly what the load, decide and apply path changes on
:class:`MemoryStorage`, return what that path returns, and change nothing
(returning ``None``) whenever that path refuses.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepwork_retry import RetryService
from deepwork_retry._core import decide
from deepwork_retry._core.model import IdempotencyRecord, Project, Task
from deepwork_retry._core.states import BlockedReason, ProjectStatus, RetryBudget, TaskStatus
from deepwork_retry.exceptions import DeepworkError, InvalidInput
from deepwork_retry.ports import AsyncRetryInOneStep, RetryInOneStep, Storage
from deepwork_retry.storage.memory import MemoryStorage
from deepwork_retry.storage.sqlite import AsyncSQLiteStorage, SQLiteStorage

T0 = datetime(2025, 3, 4, 5, 6, 7, 890_123, tzinfo=timezone.utc)
NOW = T0 + timedelta(minutes=5, microseconds=3)
ABSENT = "absent"  # a blocker named in blocked_by that was never created
ODD = "odd"  # an absent blocker whose id SQLite cannot hold as text (a lone surrogate)
INT64_MAX = 2**63 - 1
_ids = itertools.count()


class FixedClock:
    def __init__(self, now: datetime = NOW) -> None:
        self.at = now

    def now(self) -> datetime:
        return self.at


@pytest.fixture(scope="module")
def lite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SQLiteStorage]:
    path: Path = tmp_path_factory.mktemp("one-step") / "one.db"
    storage = SQLiteStorage(path, synchronous="NORMAL")
    try:
        yield storage
    finally:
        storage.close()


# Finished blockers are common, so that "all finished" (the dispatching case) is too.
blocker_states = st.one_of(
    st.sampled_from([TaskStatus.DONE, TaskStatus.SKIPPED]),
    st.sampled_from([*TaskStatus, ABSENT, ODD]),
)


@st.composite
def cases(draw: st.DrawFn) -> dict[str, Any]:
    """A project, a task (mostly blocked), its blockers, its history and the retry's arguments."""
    max_retries = draw(st.integers(0, 3))
    return {
        "project": draw(
            st.one_of(
                st.sampled_from([ProjectStatus.EXECUTING, ProjectStatus.PAUSED]),
                st.sampled_from(ProjectStatus),
            )
        ),
        "status": draw(st.one_of(st.just(TaskStatus.BLOCKED), st.sampled_from(TaskStatus))),
        "max_retries": max_retries,
        "retries_left": draw(st.integers(0, max_retries)),
        "retry_count": draw(st.sampled_from([0, 1, 4])),
        # 3 has no attempt records; "history" is attempt 1 with its record and
        # outbox entry, made by assigning the task and then blocking it.
        "attempt": draw(st.sampled_from([0, 0, 3, "history"])),
        "started_at": draw(st.sampled_from([None, T0])),
        "completed_at": draw(st.sampled_from([None, T0])),
        "lease": draw(st.sampled_from([None, T0])),
        "blocked_reason": draw(st.sampled_from([None, *BlockedReason])),
        "blockers": draw(st.lists(blocker_states, max_size=3)),
        "title": draw(st.sampled_from(["", "zoë's task", "odd \ud800 title"])),
        "metadata": draw(st.sampled_from([{}, {"m": [1, "two"], "n": None}])),
        "task_id": draw(st.sampled_from(["t", "tâche"])),
        "budget": draw(st.sampled_from(RetryBudget)),
        "actor": draw(st.sampled_from([None, "zoë", "\udc80"])),
        "reason": draw(st.sampled_from([None, "fixed the input"])),
        "claim": draw(st.booleans()),
        "key": draw(st.sampled_from([None, "new", "used"])),
        "offset": draw(st.sampled_from([0, 2])),  # hours east of UTC of the clock's `now`
    }


def blocker_id(n: int, state: object) -> str:
    return f"b{n}\ud800" if state == ODD else f"b{n}"


def build(storage: Storage, pid: str, case: dict[str, Any]) -> None:
    """The case's initial state, written through the storage's own methods and the core."""
    storage.create_project(Project(id=pid, status=case["project"], created_at=T0, updated_at=T0))
    blockers = [
        Task(id=blocker_id(n, state), project_id=pid, status=state, created_at=T0, updated_at=T0)
        for n, state in enumerate(case["blockers"])
        if state not in (ABSENT, ODD)
    ]
    history = case["attempt"] == "history"
    blocked = case["status"] is TaskStatus.BLOCKED and not history
    task = Task(
        id=case["task_id"],
        project_id=pid,
        title=case["title"],
        status=TaskStatus.INBOX if history else case["status"],
        max_retries=case["max_retries"],
        retries_left=case["retries_left"],
        retry_count=case["retry_count"],
        error_message="failed" if blocked else None,
        error_type="Failure" if blocked else None,
        blocked_reason=case["blocked_reason"],
        blocked_by=[blocker_id(n, state) for n, state in enumerate(case["blockers"])],
        attempt=0 if history else case["attempt"],
        lease_expires_at=case["lease"],
        started_at=case["started_at"],
        completed_at=case["completed_at"],
        created_at=T0,
        updated_at=T0,
        metadata=case["metadata"],
    )
    storage.add_tasks([*blockers, task])
    if history:
        project, task = storage.load(pid, task.id)
        blocker_tasks = storage.get_tasks(pid, task.blocked_by)
        storage.apply(decide.assign(task, project, now=T0, blockers=blocker_tasks))
        if case["status"] is TaskStatus.BLOCKED:
            _, task = storage.load(pid, task.id)
            storage.apply(decide.block(task, now=T0, message="stuck"))
    if case["key"] == "used":
        storage.save_idempotency(
            IdempotencyRecord(key=f"{pid}-used", project_id=pid, task_id="b0", created_at=T0)
        )


def key_for(pid: str, case: dict[str, Any]) -> str | None:
    return None if case["key"] is None else f"{pid}-{case['key']}"


def now_for(case: dict[str, Any]) -> datetime:
    return NOW.astimezone(timezone(timedelta(hours=case["offset"])))


def state(storage: Storage, pid: str, key: str | None) -> tuple[Any, ...]:
    """Everything a retry could change."""
    tasks = storage.list_tasks(pid, limit=10)
    return (
        storage.get_project(pid),
        tasks,
        [(t.title, t.metadata) for t in tasks],  # metadata takes no part in Task equality
        [storage.attempts(pid, t.id) for t in tasks],
        [storage.dispatches(pid, t.id) for t in tasks],
        storage.deferred(pid),
        storage.progress(pid),
        None if key is None else storage.get_idempotency(key),
    )


def test_sqlite_storages_have_the_capability(lite: SQLiteStorage) -> None:
    """Both SQLite storages offer the one-step retry."""
    assert (True, True) == (
        isinstance(lite, RetryInOneStep),
        issubclass(AsyncSQLiteStorage, AsyncRetryInOneStep),
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_one_step_retry_equals_load_decide_apply(lite: SQLiteStorage, case: dict[str, Any]) -> None:
    """From any state, the one-transaction retry changes what the general path does, or nothing."""
    pid = f"p{next(_ids)}"
    tid = case["task_id"]
    reference = MemoryStorage()
    build(reference, pid, case)
    build(lite, pid, case)
    key = key_for(pid, case)
    now = now_for(case)
    claim = now + timedelta(seconds=30) if case["claim"] else None
    before = state(lite, pid, key)
    assert state(reference, pid, key) == before

    applied = lite.retry_blocked(
        pid, tid, now=now, actor=case["actor"], reason=case["reason"], budget=case["budget"],
        claimed_until=claim, idempotency_key=key,
    )  # fmt: skip
    project, task = reference.load(pid, tid)
    refused: DeepworkError | None = None
    try:
        plan = decide.manual_retry(
            task, project, now=now, blockers=reference.get_tasks(pid, task.blocked_by),
            actor=case["actor"], reason=case["reason"], budget=case["budget"],
            claimed_until=claim, idempotency_key=key,
        )  # fmt: skip
        expected = reference.apply(plan)
    except DeepworkError as exc:
        refused = exc
    if refused is None:
        assert expected == applied
        assert applied is not None
        assert (applied.task.title, applied.task.metadata) == (
            expected.task.title,
            expected.task.metadata,
        )
        assert state(reference, pid, key) == state(lite, pid, key)
        return
    assert (None, before) == (applied, state(lite, pid, key))
    # The service then takes the general path and raises the same error.
    service = RetryService(lite, clock=FixedClock(now))
    with pytest.raises(type(refused)) as raised:
        service.retry(
            pid, tid, actor=case["actor"], reason=case["reason"], budget=case["budget"],
            idempotency_key=key,
        )  # fmt: skip
    assert refused.detail == raised.value.detail


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_service_retry_equals_memory_service(lite: SQLiteStorage, case: dict[str, Any]) -> None:
    """RetryService.retry on SQLite (one step) answers and stores what it does on memory."""
    pid = f"s{next(_ids)}"
    reference = MemoryStorage()
    build(reference, pid, case)
    build(lite, pid, case)
    key = key_for(pid, case)
    outcomes: list[object] = []
    for storage in (reference, lite):
        service = RetryService(storage, clock=FixedClock(now_for(case)))
        options = {"actor": case["actor"], "reason": case["reason"], "budget": case["budget"]}
        try:
            outcomes.append(service.retry(pid, case["task_id"], idempotency_key=key, **options))
        except DeepworkError as exc:
            outcomes.append((type(exc), exc.detail))
    assert outcomes[0] == outcomes[1]
    assert state(reference, pid, key) == state(lite, pid, key)


def test_one_step_retry_of_odd_ids_declines(lite: SQLiteStorage) -> None:
    """Ids that are not text leave the retry to the general path, which reports them."""
    assert None is lite.retry_blocked(1, "t", now=NOW)  # type: ignore[arg-type]


def blocked_in(storage: Storage, pid: str, **fields: Any) -> None:
    storage.create_project(Project(id=pid, created_at=T0, updated_at=T0))
    storage.add_tasks(
        [
            Task(
                id="t", project_id=pid, status=TaskStatus.BLOCKED, created_at=T0, updated_at=T0,
                **fields,
            )
        ]
    )  # fmt: skip


@pytest.mark.parametrize("field", ["retry_count", "attempt", "version"])
def test_one_step_retry_declines_counts_at_sqlites_bound(lite: SQLiteStorage, field: str) -> None:
    """A count that would pass SQLite's 64-bit bound changes nothing; the general path refuses."""
    pid = f"big{next(_ids)}"
    blocked_in(lite, pid, **{field: INT64_MAX})
    before = state(lite, pid, None)
    assert lite.retry_blocked(pid, "t", now=NOW) is None
    assert state(lite, pid, None) == before
    with pytest.raises(InvalidInput):
        RetryService(lite, clock=FixedClock()).retry(pid, "t")


def test_one_step_retry_declines_a_taken_outbox_entry(lite: SQLiteStorage) -> None:
    """An outbox entry for the next attempt already there: nothing changes."""
    pid = f"taken{next(_ids)}"
    blocked_in(lite, pid)
    with sqlite3.connect(lite.path) as conn:
        conn.execute(
            "INSERT INTO outbox (project_id, task_id, attempt, state, available_at, created_at, "
            "tries) VALUES (?, 't', 1, 'delivered', 0, 0, 1)",
            (pid,),
        )
    conn.close()
    before = state(lite, pid, None)
    assert lite.retry_blocked(pid, "t", now=NOW) is None
    assert state(lite, pid, None) == before


def test_one_step_retry_declines_a_naive_now(lite: SQLiteStorage) -> None:
    """A timestamp without a zone changes nothing; the general path reports it."""
    pid = f"naive{next(_ids)}"
    blocked_in(lite, pid)
    before = state(lite, pid, None)
    naive = NOW.replace(tzinfo=None)
    assert lite.retry_blocked(pid, "t", now=naive) is None
    assert state(lite, pid, None) == before
    with pytest.raises(InvalidInput):
        RetryService(lite, clock=FixedClock(naive)).retry(pid, "t")


def test_one_step_retry_queues_after_every_pending_entry(tmp_path: Path) -> None:
    """The retried entry is claimed after every entry made pending before it, as on memory."""
    orders = []
    lite = SQLiteStorage(tmp_path / "order.db")
    for storage in (MemoryStorage(), lite):
        pid = f"order{next(_ids)}"
        storage.create_project(Project(id=pid, created_at=T0, updated_at=T0))
        storage.add_tasks(
            [Task(id="x", project_id=pid, created_at=T0, updated_at=T0)]
            + [
                Task(id=tid, project_id=pid, status=TaskStatus.BLOCKED, created_at=T0,
                     updated_at=T0)
                for tid in ("y", "z")
            ]
        )  # fmt: skip
        project, task = storage.load(pid, "x")
        storage.apply(decide.assign(task, project, now=T0, blockers={}))
        until = NOW + timedelta(seconds=30)
        storage.mark_delivered(storage.claim_due(now=T0, limit=10, claimed_until=until), now=T0)
        service = RetryService(storage, clock=FixedClock())
        service.retry(pid, "y")  # pending first
        storage.redeliver_stale(now=NOW, delivered_before=NOW, limit=10)  # x pending again
        service.retry(pid, "z")  # pending last
        claimed = storage.claim_due(now=NOW + timedelta(hours=1), limit=10, claimed_until=until)
        orders.append([(e.task_id, e.attempt) for e in claimed])
    lite.close()
    assert orders[0] == orders[1] == [("y", 1), ("x", 1), ("z", 1)]
