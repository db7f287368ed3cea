"""The services' reads across projects: scope, one project, error type, pages and cursors."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepwork_retry import AsyncRetryService, ExecutorService, RetryService, TaskError
from deepwork_retry.exceptions import InvalidInput, OverviewNotKept
from deepwork_retry.storage._to_async import AsyncFromSyncEvents
from deepwork_retry.storage.memory import AsyncMemoryStorage, MemoryStorage
from deepwork_retry.testing import FakeClock


class World:
    """Projects ``a``, ``b``, ``bob-1``, ``bob-2``, each with blocked tasks ``x`` (error
    ``Fatal``) and ``y`` (error ``Other``) and a task ``z`` still in the inbox."""

    def __init__(self) -> None:
        self.storage = MemoryStorage()
        clock = FakeClock()
        self.executor = ExecutorService(self.storage, clock=clock)
        self.service = RetryService(self.storage, clock=clock)
        for pid in ("bob-2", "a", "bob-1", "b"):
            self.executor.create_project(pid)
            for tid, error in (("x", "Fatal"), ("y", "Other")):
                self.executor.add_task(pid, tid, max_retries=0)
                token = self.executor.assign(pid, tid).task.attempt
                self.executor.start(pid, tid, token)
                self.executor.fail(pid, tid, token, TaskError(type=error, retryable=False))
            self.executor.add_task(pid, "z")


def keys(tasks: list[Any]) -> list[tuple[str, str]]:
    return [(t.project_id, t.id) for t in tasks]


BOB = frozenset({"bob-1", "bob-2", "bob-3"})


def test_projects_are_paged_by_id_within_the_scope() -> None:
    w = World()
    page, next_after = w.service.projects()
    assert ["a", "b", "bob-1", "bob-2"] == [s.project.id for s in page]
    assert next_after is None
    assert [w.service.progress(s.project.id) for s in page] == [s.progress for s in page]
    page, next_after = w.service.projects(limit=2)
    assert (["a", "b"], "b") == ([s.project.id for s in page], next_after)
    page, next_after = w.service.projects(after="b", limit=2)
    assert (["bob-1", "bob-2"], "bob-2") == ([s.project.id for s in page], next_after)
    assert ([], None) == w.service.projects(after="bob-2", limit=2)
    page, _ = w.service.projects(scope=BOB)
    assert ["bob-1", "bob-2"] == [s.project.id for s in page]
    assert ([], None) == w.service.projects(scope=frozenset())


def test_blocked_tasks_are_paged_across_projects_within_the_scope() -> None:
    w = World()
    tasks, next_after = w.service.blocked_across()
    assert [(p, t) for p in ("a", "b", "bob-1", "bob-2") for t in ("x", "y")] == keys(tasks)
    assert next_after is None
    tasks, next_after = w.service.blocked_across(limit=3)
    assert ([("a", "x"), ("a", "y"), ("b", "x")], ("b", "x")) == (keys(tasks), next_after)
    tasks, next_after = w.service.blocked_across(after=next_after, limit=3)
    assert [("b", "y"), ("bob-1", "x"), ("bob-1", "y")] == keys(tasks)
    tasks, _ = w.service.blocked_across(scope=BOB, error_type="Other")
    assert [("bob-1", "y"), ("bob-2", "y")] == keys(tasks)
    assert ([], None) == w.service.blocked_across(scope=frozenset())


def test_one_project_is_narrowed_within_the_scope_never_beyond_it() -> None:
    """A project outside the scope gives an empty page, the same as one that does not exist."""
    w = World()
    tasks, _ = w.service.blocked_across(project_id="b")
    assert [("b", "x"), ("b", "y")] == keys(tasks)
    tasks, _ = w.service.blocked_across(scope=BOB, project_id="bob-2", error_type="Fatal")
    assert [("bob-2", "x")] == keys(tasks)
    assert ([], None) == w.service.blocked_across(scope=BOB, project_id="a")
    assert ([], None) == w.service.blocked_across(scope=BOB, project_id="bob-3")
    assert ([], None) == w.service.blocked_across(project_id="missing")


@pytest.mark.parametrize(
    "call",
    [
        {"limit": 0},
        {"limit": 1001},
        {"after": ("a",)},
        {"after": ("", "x")},
        {"after": ["a", "x"]},
        {"project_id": ""},
        {"project_id": "x" * 256},
        {"error_type": ""},
        {"error_type": "E" * 256},
        {"error_type": "a\x00"},
        {"scope": frozenset({""})},
        {"scope": "bob-1"},
    ],
    ids=repr,
)
def test_bad_inputs_to_the_blocked_list_are_refused(call: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        World().service.blocked_across(**call)


@pytest.mark.parametrize(
    "call",
    [{"limit": 0}, {"limit": 1001}, {"after": ""}, {"after": "a\x00"}, {"scope": frozenset({""})}],
    ids=repr,
)
def test_bad_inputs_to_the_project_list_are_refused(call: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        World().service.projects(**call)


class _NoOverview(AsyncFromSyncEvents[MemoryStorage]):
    """An async storage without the reads across projects."""


def test_a_storage_without_the_reads_raises_overview_not_kept() -> None:
    service = AsyncRetryService(_NoOverview(MemoryStorage(), offload=False))

    async def main() -> None:
        with pytest.raises(OverviewNotKept) as caught:
            await service.projects()
        assert "_NoOverview" in str(caught.value)
        assert "_NoOverview" not in caught.value.detail  # clients are not told the class
        with pytest.raises(OverviewNotKept):
            await service.blocked_across(scope=BOB, project_id="a")

    asyncio.run(main())


def test_the_async_service_reads_the_same() -> None:
    w = World()
    service = AsyncRetryService(AsyncMemoryStorage(w.storage))

    async def main() -> tuple[Any, Any]:
        return await service.projects(limit=2), await service.blocked_across(limit=3)

    projects, blocked = asyncio.run(main())
    assert projects == w.service.projects(limit=2)
    assert blocked == w.service.blocked_across(limit=3)


@settings(max_examples=30, deadline=None)
@given(
    scope=st.none() | st.frozensets(st.sampled_from(["a", "b", "bob-1", "bob-2", "c"])),
    project_id=st.none() | st.sampled_from(["a", "bob-1", "c"]),
    error_type=st.none() | st.sampled_from(["Fatal", "Other", "fatal"]),
    limit=st.integers(1, 4),
)
def test_pages_followed_by_their_cursor_give_the_whole_list_once(
    scope: frozenset[str] | None, project_id: str | None, error_type: str | None, limit: int
) -> None:
    w = World()
    everything = [
        (t.project_id, t.id, t.error_type)
        for t in w.storage.blocked_tasks(limit=1000)
        if (scope is None or t.project_id in scope)
        and (project_id is None or t.project_id == project_id)
        and (error_type is None or t.error_type == error_type)
    ]
    found: list[tuple[str, str, str | None]] = []
    after = None
    for _ in range(100):
        page, after = w.service.blocked_across(
            scope=scope, project_id=project_id, error_type=error_type, after=after, limit=limit
        )
        found += [(t.project_id, t.id, t.error_type) for t in page]
        if after is None:
            break
    assert everything == found
