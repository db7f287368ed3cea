"""Service behaviours across several calls: dependencies, paused projects, budgets, bulk."""

from __future__ import annotations

import pytest

from deepwork_retry import (
    ExecutorService,
    FixedBackoff,
    NoBackoff,
    OutboxRelay,
    ProjectNotRunnable,
    RetryBudget,
    RetryPolicy,
    RetryService,
    TaskError,
)
from deepwork_retry.storage.memory import MemoryStorage
from deepwork_retry.testing import FakeClock, RecordingDispatcher


class World:
    def __init__(self, policy: RetryPolicy | None = None) -> None:
        self.storage = MemoryStorage()
        self.clock = FakeClock()
        self.dispatcher = RecordingDispatcher()
        policy = policy or RetryPolicy(backoff=NoBackoff())
        self.executor = ExecutorService(
            self.storage, self.dispatcher, clock=self.clock, policy=policy
        )
        self.retries = RetryService(self.storage, self.dispatcher, clock=self.clock, policy=policy)
        self.relay = OutboxRelay(self.storage, self.dispatcher, clock=self.clock)
        self.executor.create_project("p")

    def block(
        self, task_id: str, *, max_retries: int = 0, blocked_by: tuple[str, ...] = ()
    ) -> None:
        self.executor.add_task("p", task_id, max_retries=max_retries, blocked_by=blocked_by)
        self.executor.assign("p", task_id)
        for token in range(1, max_retries + 2):
            self.executor.start("p", task_id, token)
            self.executor.fail("p", task_id, token, TaskError(type="E", message=f"fail {token}"))


def test_dependant_is_deferred_then_dispatched_when_its_blocker_finishes() -> None:
    """A task waiting on an unfinished blocker is recorded deferred and released on success."""
    w = World()
    w.executor.add_task("p", "a")
    w.executor.add_task("p", "b", blocked_by=["a"])
    w.executor.assign("p", "a")
    deferred = w.executor.assign("p", "b")
    assert ["deferred"] == [d.status for d in deferred.dispatches]
    w.executor.start("p", "a", 1)
    done = w.executor.succeed("p", "a", 1)
    assert [("b", "dispatched")] == [(d.task_id, d.status) for d in done.dispatches]
    assert [("p", "a", 1), ("p", "b", 1)] == w.dispatcher.keys


def test_manual_retry_of_a_task_with_an_unfinished_blocker_is_deferred() -> None:
    """Retrying a blocked task whose dependency is unfinished answers `deferred`."""
    w = World()
    w.executor.add_task("p", "a")
    w.block("b", blocked_by=("a",))
    result = w.retries.retry("p", "b")
    assert ("assigned", "deferred") == (result.task.status, result.dispatch.status)


def test_paused_project_defers_and_resuming_releases() -> None:
    """In a paused project a retry is deferred; resuming the project dispatches it."""
    w = World()
    w.block("t")
    w.executor.set_project_status("p", "paused")
    assert "deferred" == w.retries.retry("p", "t").dispatch.status
    _, released = w.executor.set_project_status("p", "executing")
    assert [("t", 2, "dispatched")] == [(d.task_id, d.attempt, d.status) for d in released]


@pytest.mark.parametrize("status", ["cancelled", "completed", "failed", "draft"])
def test_project_that_cannot_take_work_refuses_the_retry(status: str) -> None:
    """A retry in a project that cannot take work raises ProjectNotRunnable and changes nothing."""
    w = World()
    w.block("t")
    w.executor.set_project_status("p", status)
    before = w.storage.load("p", "t")[1]
    with pytest.raises(ProjectNotRunnable, match=f"Cannot retry tasks in a '{status}' project"):
        w.retries.retry("p", "t")
    assert before == w.storage.load("p", "t")[1]


def test_budget_one_more_blocks_again_after_one_failure() -> None:
    """After a `one_more` retry, the next failure blocks the task again."""
    w = World()
    w.block("t", max_retries=1)
    w.retries.retry("p", "t", budget=RetryBudget.ONE_MORE)
    w.executor.start("p", "t", 3)
    failed = w.executor.fail("p", "t", 3, TaskError(type="E", message="again"))
    assert ("blocked", 2, "budget_exhausted") == (
        failed.task.status, failed.task.retry_count, failed.task.blocked_reason
    )  # fmt: skip


def test_budget_full_restores_the_automatic_retries() -> None:
    """After a `full` retry, failures are retried automatically up to max_retries again."""
    w = World()
    w.block("t", max_retries=1)
    w.retries.retry("p", "t", budget="full")
    w.executor.start("p", "t", 3)
    failed = w.executor.fail("p", "t", 3, TaskError(type="E", message="again"))
    assert ("assigned", 3, 0) == (
        failed.task.status, failed.task.retry_count, failed.task.retries_left
    )  # fmt: skip


def test_released_entry_inside_its_backoff_waits_for_the_relay() -> None:
    """An auto-retry deferred by a pause is not delivered before its backoff ends."""
    w = World(RetryPolicy(backoff=FixedBackoff(wait=60)))
    w.executor.add_task("p", "t", max_retries=2)
    w.executor.assign("p", "t")
    w.executor.start("p", "t", 1)
    w.executor.set_project_status("p", "paused")
    w.executor.fail("p", "t", 1, TaskError(type="E", message="boom"))
    _, released = w.executor.set_project_status("p", "executing")
    assert [("t", 2, "pending")] == [(d.task_id, d.attempt, d.status) for d in released]
    assert [("p", "t", 1)] == w.dispatcher.keys
    w.clock.advance(61)
    assert 1 == w.relay.run_once()
    assert [("p", "t", 1), ("p", "t", 2)] == w.dispatcher.keys


def test_bulk_dry_run_reports_without_retrying_and_the_real_run_retries() -> None:
    """A dry run says which blocked tasks would be retried; the real run retries them."""
    w = World()
    w.block("a")
    w.block("b")
    dry = w.retries.bulk_retry("p", dry_run=True)
    assert [("a", True), ("b", True)] == [(i.task_id, i.retried) for i in dry.items]
    assert ["a", "b"] == [t.id for t in w.retries.blocked("p")[0]]
    real = w.retries.bulk_retry("p", actor="ops", reason="fixed")
    assert [("a", "dispatched"), ("b", "dispatched")] == [
        (i.task_id, i.dispatch) for i in real.items
    ]
    assert [] == w.retries.blocked("p")[0]


def test_dispatcher_failure_leaves_the_retry_pending_and_the_relay_delivers_it() -> None:
    """A dispatcher that raises gives `pending`; the relay delivers once redelivery is due."""
    w = World()
    w.block("t")
    w.dispatcher.failing = True
    result = w.retries.retry("p", "t")
    assert ("pending", True) == (result.dispatch.status, result.dispatch.error is not None)
    w.dispatcher.failing = False
    w.clock.advance(120)
    assert 1 == w.relay.run_once()
    assert ("p", "t", 2) == w.dispatcher.keys[-1]
    assert 0 == w.relay.run_once()
