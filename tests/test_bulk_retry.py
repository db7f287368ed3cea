"""Bulk retry's one deadline and its stop on a storage failure (the service, real storage).

The rule: tasks are retried one by one in id order; a rule's refusal is
reported and passed; a storage error stops the request (raised when nothing was
retried, otherwise the tasks retried are kept and the rest listed as not
attempted, with ``next_after`` the last task finished); no task is started once
the time budget is spent, the first excepted.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepwork_retry import ExecutorService, NoBackoff, RetryPolicy, RetryService, TaskError
from deepwork_retry._core.results import NOT_ATTEMPTED, OUT_OF_TIME, STORAGE_STOPPED
from deepwork_retry._sync import services as sync_services
from deepwork_retry.exceptions import STORAGE_DETAIL, StorageError, StorageUnavailable
from deepwork_retry.storage import sqlite as sync_sqlite
from deepwork_retry.storage.memory import MemoryStorage
from deepwork_retry.storage.sqlite import SQLiteStorage
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


# -- batches on a storage that retries several tasks in one transaction (SQLite) ----------


class Races(SQLiteStorage):
    """SQLite whose listing of blocked tasks is followed, before any retry, by another
    client's retry of the tasks in ``raced`` (so the bulk finds them no longer blocked)."""

    raced: tuple[str, ...] = ()
    status: str | None = None
    """The project's status set after the listing, when not ``None``."""

    def list_tasks(self, *args: Any, **kwargs: Any) -> Any:
        found = super().list_tasks(*args, **kwargs)
        other = RetryService(SQLiteStorage(self.path))
        for task_id in self.raced:
            other.retry("p", task_id)
        if self.status is not None:
            ExecutorService(other.storage).set_project_status("p", self.status)
        other.storage.close()
        return found


def sqlite_world(path: Path, count: int, storage: type[SQLiteStorage]) -> tuple[Any, list[str]]:
    sqlite = storage(path, synchronous="NORMAL")
    ex = ExecutorService(sqlite, policy=RetryPolicy(backoff=NoBackoff()))
    ex.create_project("p")
    ids = [f"t{n:02d}" for n in range(count)]
    for tid in ids:
        ex.add_task("p", tid, max_retries=0)
        ex.assign("p", tid)
        ex.start("p", tid, 1)
        ex.fail("p", tid, 1, TaskError(type="E", message="boom"))
    return sqlite, ids


def stored(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row a retry writes, times left out (the two runs differ only in when)."""
    conn = sqlite3.connect(path)
    try:
        return {
            "tasks": conn.execute(
                "SELECT id, status, retry_count, retries_left, attempt, version, error_message "
                "FROM tasks ORDER BY id"
            ).fetchall(),
            "projects": conn.execute(
                "SELECT id, status, version, total, inbox, assigned, in_progress, review, done, "
                "blocked, skipped, event_seq FROM projects"
            ).fetchall(),
            "outbox": conn.execute(
                "SELECT seq, task_id, attempt, state, claimed_until IS NULL, pending_seq "
                "FROM outbox ORDER BY seq"
            ).fetchall(),
            "attempts": conn.execute(
                "SELECT task_id, number, triggered_by, actor, reason, budget FROM attempts "
                "ORDER BY task_id, number"
            ).fetchall(),
            "events": conn.execute(
                "SELECT seq, type, task_id, attempt, json_remove(data, '$.available_at') "
                "FROM events ORDER BY seq"
            ).fetchall(),
        }
    finally:
        conn.close()


@settings(max_examples=25, deadline=None)
@given(
    count=st.integers(0, 7),
    raced=st.sets(st.integers(0, 6), max_size=4),
    batch=st.integers(1, 4),
    limit=st.integers(1, 8),
    dispatcher=st.booleans(),
    budget=st.sampled_from(["one_more", "full"]),
    status=st.sampled_from([None, "paused", "cancelled", "completed"]),
)
def test_batches_answer_and_store_exactly_what_task_by_task_retries_do(
    tmp_path_factory: pytest.TempPathFactory,
    count: int,
    raced: set[int],
    batch: int,
    limit: int,
    dispatcher: bool,
    budget: str,
    status: str | None,
) -> None:
    """Committed in batches (RetryManyInOneStep) or task by task, a bulk retry answers the
    same items and leaves the same rows: tasks, counters, outbox entries, attempts and
    events, numbered alike; a task another client retried first, or in a project whose
    status changed after the listing, is refused (or deferred) alike."""
    outcomes = []
    for batched in (True, False):
        path = tmp_path_factory.mktemp("bulk") / "b.db"
        storage, ids = sqlite_world(path, count, Races)
        storage.raced = tuple(ids[i] for i in sorted(raced) if i < min(count, limit))
        storage.status = status
        service = RetryService(storage, RecordingDispatcher() if dispatcher else None)
        assert service._many_storage() is storage
        if not batched:
            service._many_storage = lambda: None  # type: ignore[method-assign]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sync_services, "BULK_BATCH", batch)
            result = service.bulk_retry("p", limit=limit, actor="ann", reason="r", budget=budget)
        storage.close()
        outcomes.append((result, stored(path)))
    (batched_result, batched_rows), (single_result, single_rows) = outcomes
    assert single_result == batched_result
    assert single_rows == batched_rows


class FailsOnBatch(SQLiteStorage):
    """SQLite whose ``fail_at``-th batch fails with a storage error after its first retry
    was written (so the rollback has something to undo)."""

    fail_at = 1
    batches = 0

    def retry_blocked_many(self, project_id: str, task_ids: Any, **options: Any) -> Any:
        self.batches += 1
        if self.batches != self.fail_at:
            return super().retry_blocked_many(project_id, task_ids, **options)

        def fail_after_one(*args: Any, **kwargs: Any) -> Any:
            real(*args, **kwargs)
            raise sqlite3.OperationalError("disk I/O error")

        real = sync_sqlite._ENGINE.retry_blocked
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sync_sqlite._ENGINE, "retry_blocked", fail_after_one)
            return super().retry_blocked_many(project_id, task_ids, **options)


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_a_batch_that_fails_commits_nothing_and_the_bulk_stops_there(
    tmp_path: Path, fail_at: int
) -> None:
    """A storage error in a batch rolls the whole batch back: the batches before it stay
    retried, the failed batch and the rest are listed as not attempted (raised when
    nothing was retried), and going on from next_after retries them."""
    storage, ids = sqlite_world(tmp_path / "f.db", 7, FailsOnBatch)
    storage.fail_at = fail_at
    service = RetryService(storage, RecordingDispatcher())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sync_services, "BULK_BATCH", 3)
        if fail_at == 1:
            with pytest.raises(StorageError):
                service.bulk_retry("p")
            assert {t.status.value for t in storage.list_tasks("p", limit=100)} == {"blocked"}
            return
        result = service.bulk_retry("p")
        kept = 3 * (fail_at - 1)
        assert [True] * kept + [False] * (7 - kept) == [i.retried for i in result.items]
        assert (STORAGE_STOPPED, ids[kept - 1]) == (result.stopped, result.next_after)
        now = {t.id: t.status.value for t in storage.list_tasks("p", limit=100)}
        assert [now[t] for t in ids] == ["assigned"] * kept + ["blocked"] * (7 - kept)
        storage.fail_at = 0
        rest = service.bulk_retry("p", after=result.next_after)
        assert ids[kept:] == [i.task_id for i in rest.items if i.retried]
    storage.close()
