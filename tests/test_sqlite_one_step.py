"""The SQLite one-transaction manual retry, checked against the general path.

:meth:`SQLiteStorage.retry_blocked` loads, decides (with the core's
:func:`~deepwork_retry._core.decide.manual_retry`) and applies inside one
write transaction. From the same initial state it must change exactly what
the load, decide and apply path changes on :class:`MemoryStorage`, and change
nothing (returning ``None``) whenever that path refuses.
"""

from __future__ import annotations

import itertools
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
from deepwork_retry.exceptions import DeepworkError
from deepwork_retry.ports import AsyncRetryInOneStep, RetryInOneStep, Storage
from deepwork_retry.storage.memory import MemoryStorage
from deepwork_retry.storage.sqlite import AsyncSQLiteStorage, SQLiteStorage

T0 = datetime(2025, 3, 4, 5, 6, 7, 890_123, tzinfo=timezone.utc)
NOW = T0 + timedelta(minutes=5, microseconds=3)
ABSENT = "absent"  # a blocker named in blocked_by that was never created
_ids = itertools.count()


class FixedClock:
    def now(self) -> datetime:
        return NOW


@pytest.fixture(scope="module")
def lite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SQLiteStorage]:
    path: Path = tmp_path_factory.mktemp("one-step") / "one.db"
    storage = SQLiteStorage(path, synchronous="NORMAL")
    try:
        yield storage
    finally:
        storage.close()


@st.composite
def cases(draw: st.DrawFn) -> dict[str, Any]:
    """A project, a task (mostly blocked), its blockers, and the retry's arguments."""
    max_retries = draw(st.integers(0, 2))
    return {
        "project": draw(
            st.one_of(st.just(ProjectStatus.EXECUTING), st.sampled_from(ProjectStatus))
        ),
        "status": draw(st.one_of(st.just(TaskStatus.BLOCKED), st.sampled_from(TaskStatus))),
        "max_retries": max_retries,
        "retries_left": draw(st.integers(0, max_retries)),
        "attempt": draw(st.sampled_from([0, 0, 3])),  # 3 has no attempt records
        "started_at": draw(st.sampled_from([None, T0])),
        "blocked_reason": draw(st.sampled_from([None, *BlockedReason])),
        "blockers": draw(
            st.lists(st.sampled_from([TaskStatus.DONE, *TaskStatus, ABSENT]), max_size=2)
        ),
        "budget": draw(st.sampled_from(RetryBudget)),
        "actor": draw(st.sampled_from([None, "zoë"])),
        "claim": draw(st.booleans()),
        "key": draw(st.sampled_from([None, "new", "used"])),
    }


def build(storage: Storage, pid: str, case: dict[str, Any]) -> None:
    """The case's initial state, written through the storage's own methods."""
    storage.create_project(Project(id=pid, status=case["project"], created_at=T0, updated_at=T0))
    blockers = [
        Task(id=f"b{n}", project_id=pid, status=state, created_at=T0, updated_at=T0)
        for n, state in enumerate(case["blockers"])
        if state != ABSENT
    ]
    blocked = case["status"] is TaskStatus.BLOCKED
    task = Task(
        id="t",
        project_id=pid,
        status=case["status"],
        max_retries=case["max_retries"],
        retries_left=case["retries_left"],
        retry_count=1,
        error_message="failed" if blocked else None,
        error_type="Failure" if blocked else None,
        blocked_reason=case["blocked_reason"],
        blocked_by=[f"b{n}" for n in range(len(case["blockers"]))],
        attempt=case["attempt"],
        started_at=case["started_at"],
        created_at=T0,
        updated_at=T0,
        metadata={"m": [1]},
    )
    storage.add_tasks([*blockers, task])
    if case["key"] == "used":
        storage.save_idempotency(
            IdempotencyRecord(key=f"{pid}-used", project_id=pid, task_id="t", created_at=T0)
        )


def key_for(pid: str, case: dict[str, Any]) -> str | None:
    return None if case["key"] is None else f"{pid}-{case['key']}"


def state(storage: Storage, pid: str, key: str | None) -> tuple[Any, ...]:
    """Everything a retry could change."""
    tasks = storage.list_tasks(pid, limit=10)
    return (
        storage.get_project(pid),
        tasks,
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


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_one_step_retry_equals_load_decide_apply(lite: SQLiteStorage, case: dict[str, Any]) -> None:
    """From any state, the one-transaction retry changes what the general path does, or nothing."""
    pid = f"p{next(_ids)}"
    reference = MemoryStorage()
    build(reference, pid, case)
    build(lite, pid, case)
    key = key_for(pid, case)
    claim = NOW + timedelta(seconds=30) if case["claim"] else None
    before = state(lite, pid, key)
    assert state(reference, pid, key) == before

    applied = lite.retry_blocked(
        pid, "t", now=NOW, actor=case["actor"], budget=case["budget"], claimed_until=claim,
        idempotency_key=key,
    )  # fmt: skip
    project, task = reference.load(pid, "t")
    refused: DeepworkError | None = None
    try:
        plan = decide.manual_retry(
            task, project, now=NOW, blockers=reference.get_tasks(pid, task.blocked_by),
            actor=case["actor"], budget=case["budget"], claimed_until=claim, idempotency_key=key,
        )  # fmt: skip
        expected = reference.apply(plan)
    except DeepworkError as exc:
        refused = exc
    if refused is None:
        assert expected == applied
        assert state(reference, pid, key) == state(lite, pid, key)
        return
    assert (None, before) == (applied, state(lite, pid, key))
    # The service then takes the general path and raises the same error.
    service = RetryService(lite, clock=FixedClock())
    with pytest.raises(type(refused)) as raised:
        service.retry(pid, "t", actor=case["actor"], budget=case["budget"], idempotency_key=key)
    assert refused.detail == raised.value.detail


def test_one_step_retry_of_odd_ids_declines(lite: SQLiteStorage) -> None:
    """Ids that are not text leave the retry to the general path, which reports them."""
    assert None is lite.retry_blocked(1, "t", now=NOW)  # type: ignore[arg-type]
