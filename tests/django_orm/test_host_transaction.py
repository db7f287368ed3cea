"""A retry inside the host's own ``transaction.atomic()`` block, on SQLite and PostgreSQL.

The host writes a row of its own (an auth ``Group``) and retries a task in the
same atomic block. The dispatcher records, at each dispatch, whether the host's
block was still open and what another connection (another thread's) saw.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext

import pytest
from django.contrib.auth.models import Group
from django.db import connections, transaction
from django_support import empty
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepwork_retry import (
    ExecutorService,
    JoinsHostTransaction,
    RetryService,
    TaskError,
    TaskNotBlocked,
)
from deepwork_retry._core import decide
from deepwork_retry._core.model import DispatchEntry
from deepwork_retry.exceptions import VersionConflict
from deepwork_retry.testing import RecordingDispatcher
from deepwork_retry.web.django.storage import DjangoStorage


class Watching(RecordingDispatcher):
    """Records, per dispatch, whether the host's block was open and the task's status
    as another thread's connection saw it."""

    def __init__(self, storage: DjangoStorage) -> None:
        super().__init__()
        self.storage = storage
        self.in_block: list[bool] = []
        self.seen: list[str] = []

    def dispatch(self, entry: DispatchEntry) -> None:
        self.in_block.append(connections[self.storage.using].in_atomic_block)
        found: list[str] = []

        def observe() -> None:
            try:
                _, task = self.storage.load(entry.project_id, entry.task_id)
                found.append(task.status.value)
            finally:
                connections[self.storage.using].close()

        thread = threading.Thread(target=observe)
        thread.start()
        thread.join(60)
        self.seen.extend(found)
        super().dispatch(entry)


@pytest.fixture(autouse=True)
def _no_host_rows(storage: DjangoStorage) -> None:
    Group.objects.using(storage.using).all().delete()


def blocked_task(storage: DjangoStorage, pid: str = "p", tid: str = "t") -> None:
    executor = ExecutorService(storage)
    executor.create_project(pid)
    executor.add_task(pid, tid, max_retries=0)
    executor.assign(pid, tid)
    executor.start(pid, tid, token=1)
    executor.fail(pid, tid, 1, TaskError(type="Timeout", message="upstream timed out"))


def test_the_storage_joins_host_transactions(storage: DjangoStorage) -> None:
    """DjangoStorage has the host-transaction capability the services look for."""
    assert isinstance(storage, JoinsHostTransaction)


def test_host_commit_keeps_both_and_dispatches_once_after_it(storage: DjangoStorage) -> None:
    """The host's row and the retry commit together; the dispatch happens once, after the
    commit, when another connection already sees the task assigned."""
    blocked_task(storage)
    dispatcher = Watching(storage)
    service = RetryService(storage, dispatcher)
    with transaction.atomic(using=storage.using):
        Group.objects.using(storage.using).create(name="host-row")
        result = service.retry("p", "t", actor="alice", reason="fixed", idempotency_key="k1")
        assert "pending" == result.dispatch.status  # the host has not committed yet
        assert [] == dispatcher.keys
    assert [("p", "t", 2)] == dispatcher.keys
    assert [False] == dispatcher.in_block
    assert ["assigned"] == dispatcher.seen
    assert Group.objects.using(storage.using).filter(name="host-row").exists()
    _, task = storage.load("p", "t")
    assert ("assigned", 1) == (task.status.value, task.retry_count)
    assert ["delivered"] == [e.state.value for e in storage.dispatches("p", "t")][1:]
    assert storage.get_idempotency("k1") is not None


def test_host_rollback_after_the_retry_leaves_nothing_and_dispatches_nothing(
    storage: DjangoStorage,
) -> None:
    """A rollback after the retry's statements succeeded removes the host's row and every
    trace of the retry (task, attempt, outbox entry, idempotency record); nothing is sent."""
    blocked_task(storage)
    before = storage.load("p", "t")[1]
    attempts, entries = storage.attempts("p", "t"), storage.dispatches("p", "t")
    progress = storage.progress("p")
    dispatcher = Watching(storage)
    service = RetryService(storage, dispatcher)

    class Abandoned(Exception):
        pass

    def host_work() -> None:
        with transaction.atomic(using=storage.using):
            Group.objects.using(storage.using).create(name="host-row")
            result = service.retry("p", "t", actor="alice", idempotency_key="k1")
            assert "assigned" == result.task.status.value  # the retry's statements succeeded
            raise Abandoned

    with pytest.raises(Abandoned):
        host_work()
    assert not Group.objects.using(storage.using).filter(name="host-row").exists()
    after = storage.load("p", "t")[1]
    assert (before.status, before.version) == (after.status, after.version)
    assert attempts == storage.attempts("p", "t")
    assert entries == storage.dispatches("p", "t")
    assert progress == storage.progress("p")
    assert storage.get_idempotency("k1") is None
    assert [] == dispatcher.keys


def test_a_refused_retry_does_not_spoil_the_host_transaction(storage: DjangoStorage) -> None:
    """A retry the rules refuse (the task is not blocked) and a stale plan (a version
    conflict) inside the host's block roll back only themselves: the host's rows commit."""
    blocked_task(storage)
    executor = ExecutorService(storage)
    executor.add_task("p", "other")
    service = RetryService(storage, RecordingDispatcher())
    project, task = storage.load("p", "t")
    stale = decide.manual_retry(task, project, now=task.updated_at, blockers={})
    with transaction.atomic(using=storage.using):
        Group.objects.using(storage.using).create(name="first")
        with pytest.raises(TaskNotBlocked):
            service.retry("p", "other")
        service.retry("p", "t")
        with pytest.raises(VersionConflict):
            storage.apply(stale)
        Group.objects.using(storage.using).create(name="second")
    names = set(Group.objects.using(storage.using).values_list("name", flat=True))
    assert {"first", "second"} <= names
    assert "assigned" == storage.load("p", "t")[1].status.value


def test_outside_a_host_transaction_the_dispatch_is_at_once(storage: DjangoStorage) -> None:
    """Without a host block the retry commits on its own and is dispatched before the call
    returns, and the answer says so."""
    blocked_task(storage)
    dispatcher = Watching(storage)
    result = RetryService(storage, dispatcher).retry("p", "t")
    assert "dispatched" == result.dispatch.status
    assert [("p", "t", 2)] == dispatcher.keys
    assert [False] == dispatcher.in_block
    assert "delivered" == storage.dispatches("p", "t")[-1].state.value


def test_two_host_blocks_retrying_one_task_apply_it_once(storage: DjangoStorage) -> None:
    """Two host blocks on two threads retry one task at once: exactly one retry applies;
    the other is refused by the rules once the first has committed, and its host's own
    row still commits."""
    blocked_task(storage)
    dispatcher = Watching(storage)
    barrier = threading.Barrier(2)
    outcomes: dict[str, str] = {}

    def host(name: str) -> None:
        service = RetryService(storage, dispatcher)
        try:
            barrier.wait(30)  # (inside the blocks, SQLite's hosts would wait for each other)
            with transaction.atomic(using=storage.using):
                Group.objects.using(storage.using).create(name=name)
                try:
                    service.retry("p", "t", actor=name)
                    outcomes[name] = "retried"
                except TaskNotBlocked:
                    outcomes[name] = "refused"
        finally:
            connections[storage.using].close()

    threads = [threading.Thread(target=host, args=(name,)) for name in ("h1", "h2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert ["refused", "retried"] == sorted(outcomes.values())
    assert {"h1", "h2"} == set(Group.objects.using(storage.using).values_list("name", flat=True))
    _, task = storage.load("p", "t")
    assert (1, 2) == (task.retry_count, task.attempt)
    assert [("p", "t", 2)] == dispatcher.keys


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.booleans(), st.booleans()),
        min_size=1,
        max_size=6,
    )
)
def test_each_retry_is_dispatched_once_after_its_commit_and_only_then(
    storage: DjangoStorage, steps: list[tuple[str, bool, bool]]
) -> None:
    """For any sequence of host blocks (each retrying one task, then committing or rolling
    back, some nested in an outer block): a retry is dispatched once, after its commit,
    exactly when its block committed; a rolled-back retry leaves the task blocked."""
    empty(storage.using)
    Group.objects.using(storage.using).all().delete()
    blocked_task(storage, "p", "a")
    executor = ExecutorService(storage)
    for tid in ("b", "c"):
        executor.add_task("p", tid, max_retries=0)
        executor.assign("p", tid)
        executor.start("p", tid, token=1)
        executor.fail("p", tid, 1, TaskError(type="Timeout", message="timed out"))
    dispatcher = Watching(storage)
    service = RetryService(storage, dispatcher)
    retried: set[str] = set()
    expected: list[tuple[str, str, int]] = []

    class Abandoned(Exception):
        pass

    for step, (tid, commit, nested) in enumerate(steps):
        try:
            with transaction.atomic(using=storage.using):
                Group.objects.using(storage.using).create(name=f"outer-{step}")
                inner = transaction.atomic(using=storage.using) if nested else nullcontext()
                with inner:
                    try:
                        service.retry("p", tid)
                    except TaskNotBlocked:
                        assert tid in retried
                    assert [] == dispatcher.in_block[len(expected) :]
                    if not commit:
                        raise Abandoned
        except Abandoned:
            pass
        if commit and tid not in retried:
            retried.add(tid)
            expected.append(("p", tid, 2))
        assert expected == dispatcher.keys
        assert all(seen == "assigned" for seen in dispatcher.seen)
        for one in ("a", "b", "c"):
            status = storage.load("p", one)[1].status.value
            assert ("assigned" if one in retried else "blocked") == status
