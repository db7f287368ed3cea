"""Bulk retry's one deadline and its stop on a storage failure (the service, real storage).

The rule: tasks are retried one by one in id order; a rule's refusal is
reported and passed; a storage error stops the request (raised when nothing was
retried, otherwise the tasks retried are kept and the rest listed as not
attempted, with ``next_after`` the last task finished); no task is started once
the time budget is spent, the first excepted.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepwork_retry import ExecutorService, NoBackoff, RetryPolicy, RetryService, TaskError
from deepwork_retry._core.results import NOT_ATTEMPTED, OUT_OF_TIME, STORAGE_STOPPED
from deepwork_retry.exceptions import STORAGE_DETAIL, StorageUnavailable
from deepwork_retry.storage.memory import MemoryStorage
from deepwork_retry.testing import RecordingDispatcher

SECRET = "PostgreSQL at postgresql://app:hunter2@db.internal/prod: server closed the connection"


class WritesFail:
    """``MemoryStorage`` whose ``apply`` fails once ``applies_left`` has run out."""

    def __init__(self, inner: MemoryStorage, applies_left: int | None) -> None:
        self.inner = inner
        self.applies_left = applies_left

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def apply(self, plan: Any) -> Any:
        if self.applies_left is not None:
            if self.applies_left <= 0:
                raise StorageUnavailable(SECRET)
            self.applies_left -= 1
        return self.inner.apply(plan)


class SlowDispatcher(RecordingDispatcher):
    def __init__(self, pause: float) -> None:
        super().__init__()
        self.pause = pause

    def dispatch(self, entry: Any) -> None:
        time.sleep(self.pause)
        super().dispatch(entry)


def blocked_world(count: int) -> tuple[MemoryStorage, list[str]]:
    memory = MemoryStorage()
    ex = ExecutorService(memory, policy=RetryPolicy(backoff=NoBackoff()))
    ex.create_project("p")
    ids = [f"t{n:02d}" for n in range(count)]
    for tid in ids:
        ex.add_task("p", tid, max_retries=0)
        ex.assign("p", tid)
        ex.start("p", tid, 1)
        ex.fail("p", tid, 1, TaskError(type="E", message="boom"))
    return memory, ids


def statuses(memory: MemoryStorage) -> dict[str, str]:
    return {t.id: t.status.value for t in memory.list_tasks("p", limit=1000)}


@settings(max_examples=60, deadline=None)
@given(count=st.integers(0, 8), applies=st.none() | st.integers(0, 9), limit=st.integers(1, 9))
def test_a_storage_failure_stops_the_bulk_retry_and_nothing_is_misreported(
    count: int, applies: int | None, limit: int
) -> None:
    """Whatever task the storage fails on, the answer lists every task of the page exactly
    as it stands: retried ones are assigned, the others untouched and marked not attempted;
    with nothing retried the error is raised; going on from next_after finishes the page."""
    memory, ids = blocked_world(count)
    page = ids[:limit]
    storage = WritesFail(memory, applies)
    service = RetryService(storage, RecordingDispatcher())
    if page and applies == 0:
        with pytest.raises(StorageUnavailable):
            service.bulk_retry("p", limit=limit)
        assert set(statuses(memory).values()) == {"blocked"}
        return
    result = service.bulk_retry("p", limit=limit)
    assert page == [item.task_id for item in result.items]
    done = len(page) if applies is None else min(applies, len(page))
    assert [True] * done + [False] * (len(page) - done) == [i.retried for i in result.items]
    assert [i.retried for i in result.items] == [i.attempted for i in result.items]
    for item in result.items:
        assert statuses(memory)[item.task_id] == ("assigned" if item.retried else "blocked")
        assert SECRET not in (item.detail or "")
        if not item.attempted:
            assert NOT_ATTEMPTED[STORAGE_STOPPED] == item.detail
    if done < len(page):
        assert (STORAGE_STOPPED, page[done - 1]) == (result.stopped, result.next_after)
        storage.applies_left = None
        rest = service.bulk_retry("p", after=result.next_after, limit=limit)
        assert page[done:] == [i.task_id for i in rest.items if i.retried][: len(page) - done]
    else:
        assert None is result.stopped
        assert (page[-1] if len(page) == limit else None) == result.next_after


def test_storage_error_detail_is_fixed_text() -> None:
    """A storage error's detail, what clients see, never carries its message."""
    exc = StorageUnavailable(SECRET)
    assert (STORAGE_DETAIL, SECRET) == (exc.detail, str(exc))


def test_bulk_retry_starts_no_task_once_its_time_budget_is_spent() -> None:
    """Retries that take long (a slow dispatcher): the request stops starting tasks when its
    budget is spent, keeps what it retried, and lists the rest as not attempted."""
    memory, ids = blocked_world(6)
    service = RetryService(memory, SlowDispatcher(0.3))
    started = time.monotonic()
    result = service.bulk_retry("p", time_budget=0.5)
    elapsed = time.monotonic() - started
    retried = [i.task_id for i in result.items if i.retried]
    assert 1 <= len(retried) < len(ids), elapsed
    assert ids[: len(retried)] == retried
    assert (OUT_OF_TIME, retried[-1]) == (result.stopped, result.next_after)
    assert all(i.detail == NOT_ATTEMPTED[OUT_OF_TIME] for i in result.items if not i.retried)
    assert elapsed < 3.0


def test_bulk_retry_always_attempts_its_first_task() -> None:
    """Even a spent budget retries the first task, so a stopped answer always names where
    to go on from."""
    memory, ids = blocked_world(3)
    result = RetryService(memory, RecordingDispatcher()).bulk_retry("p", time_budget=0)
    assert [True, False, False] == [i.retried for i in result.items]
    assert (OUT_OF_TIME, ids[0]) == (result.stopped, result.next_after)
