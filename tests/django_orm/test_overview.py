"""The reads across projects on DjangoStorage (SQLite and PostgreSQL aliases): pages in
Python's str order whatever the ids hold, drawn by Hypothesis against the data set of
``overview_support``."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from overview_support import (
    BLOCKED,
    ERROR_TYPES,
    IDS,
    SETS,
    SETTINGS,
    TEXT,
    expected_blocked,
    expected_projects,
    fill,
    progress,
)

from deepwork_retry.exceptions import InvalidInput
from deepwork_retry.web.django.storage import DjangoStorage


@pytest.fixture
def filled(storage: DjangoStorage) -> DjangoStorage:
    fill(storage)
    return storage


def test_pages_walk_every_project_and_blocked_task_in_order(filled: DjangoStorage) -> None:
    projects: list[str] = []
    after: str | None = None
    while page := filled.list_projects(after=after, limit=4):
        assert all(s.progress == progress(s.project.id) for s in page)
        projects += [s.project.id for s in page]
        after = page[-1].project.id
    assert projects == sorted(IDS)
    tasks: list[tuple[str, str]] = []
    cursor: tuple[str, str] | None = None
    while found := filled.blocked_tasks(after=cursor, limit=3):
        tasks += [(t.project_id, t.id) for t in found]
        cursor = tasks[-1]
    assert tasks == [(t.project_id, t.id) for t in BLOCKED]


@SETTINGS
@given(
    after=st.one_of(st.none(), TEXT),
    cursor=st.one_of(st.none(), st.tuples(TEXT, TEXT)),
    limit=st.integers(1, 30),
    projects=SETS,
    error_type=ERROR_TYPES,
)
def test_a_page_is_pythons(
    filled: DjangoStorage,
    after: str | None,
    cursor: tuple[str, str] | None,
    limit: int,
    projects: frozenset[str] | None,
    error_type: str | None,
) -> None:
    page = filled.list_projects(projects=projects, after=after, limit=limit)
    assert [s.project.id for s in page] == expected_projects(projects, after)[:limit]
    tasks = filled.blocked_tasks(
        projects=projects, error_type=error_type, after=cursor, limit=limit
    )
    expected = expected_blocked(projects, error_type, cursor)[:limit]
    assert [(t.project_id, t.id) for t in tasks] == expected


def test_a_set_longer_than_one_query_is_read_in_runs(filled: DjangoStorage) -> None:
    many = frozenset({*IDS, *(f"missing {n:04}" for n in range(1200))})
    assert [s.project.id for s in filled.list_projects(projects=many, limit=1000)] == sorted(IDS)
    assert filled.list_projects(projects=frozenset()) == []
    assert filled.blocked_tasks(projects=frozenset()) == []


@pytest.mark.parametrize("after", [("a",), ["a", "b"], ("a", 1), "a"])
def test_a_malformed_cursor_is_refused(storage: DjangoStorage, after: Any) -> None:
    with pytest.raises(InvalidInput):
        storage.blocked_tasks(after=after)
