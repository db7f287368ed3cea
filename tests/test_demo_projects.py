"""The demo projects: the seed's picture, and a task blocked in each way the events name."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepwork_retry import RetryService
from deepwork_retry._core.events import EventType
from deepwork_retry._core.states import BlockedReason, TaskStatus
from deepwork_retry._sync.services import ExecutorService
from deepwork_retry.demo import (
    DEMO_POLICY,
    NIGHTLY_TASKS,
    create_demo_project,
    create_nightly_project,
    run_attempt,
)
from deepwork_retry.ports import Storage
from deepwork_retry.storage.memory import MemoryStorage
from deepwork_retry.storage.sqlite import SQLiteStorage


@pytest.fixture(params=["memory", "sqlite"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "memory":
        return MemoryStorage()
    return SQLiteStorage(str(tmp_path / "demo.db"))


def _blocked(storage: Storage, project_id: str) -> dict[str, tuple[str | None, str | None]]:
    return {
        t.id: (t.blocked_reason and t.blocked_reason.value, t.error_type)
        for t in storage.list_tasks(project_id, status=TaskStatus.BLOCKED)
    }


def test_the_nightly_project_blocks_a_task_in_each_way(storage: Storage) -> None:
    create_nightly_project(storage, "nightly-1")
    assert _blocked(storage, "nightly-1") == {
        "transform-orders": (BlockedReason.BUDGET_EXHAUSTED.value, "TimeoutError"),
        "load-warehouse": (BlockedReason.BUDGET_EXHAUSTED.value, "LeaseExpired"),
        "send-report": (BlockedReason.NON_RETRYABLE.value, "SchemaError"),
    }
    report = storage.load("nightly-1", "send-report")[1]
    assert report.error_message is not None
    assert report.error_message.startswith("Traceback (most recent call last):")
    waiting = storage.load("nightly-1", "publish-dashboard")[1]
    assert waiting.status is TaskStatus.ASSIGNED
    assert waiting.blocked_by == ("send-report",)
    # The event log tells each way apart, as the dashboard and hooks see it.
    events = storage.events("nightly-1", limit=1000)  # type: ignore[attr-defined]
    blocked = {e.task_id: e.data for e in events if e.type is EventType.TASK_BLOCKED}
    assert blocked["load-warehouse"]["cause"] == "lose"
    assert blocked["transform-orders"]["retries_exhausted"] is True
    assert blocked["send-report"]["reason"] == "non_retryable"


def test_both_projects_live_side_by_side(storage: Storage) -> None:
    create_demo_project(storage, "proj-1")
    create_nightly_project(storage, "nightly-1")
    assert set(_blocked(storage, "proj-1")) == {"task-3", "task-7"}
    progress = storage.progress("proj-1")
    assert (progress.total, progress.done, progress.blocked) == (8, 4, 2)


@pytest.mark.parametrize("task_id", [t.id for t in NIGHTLY_TASKS if t.failures or t.lost])
def test_each_nightly_task_runs_to_done_once_retried(storage: Storage, task_id: str) -> None:
    """A person retrying a blocked nightly task sees it run and finish."""
    create_nightly_project(storage, "nightly-1")
    queue: list[object] = []

    class Collect:
        def dispatch(self, entry: object) -> None:
            queue.append(entry)

    executor = ExecutorService(storage, Collect(), policy=DEMO_POLICY)
    result = RetryService(storage, Collect(), policy=DEMO_POLICY).retry(
        "nightly-1", task_id, actor="operator", budget="full"
    )
    assert result.task.status is TaskStatus.ASSIGNED
    while queue:
        run_attempt(executor, queue.pop(0))  # type: ignore[arg-type]
    assert storage.load("nightly-1", task_id)[1].status is TaskStatus.DONE
