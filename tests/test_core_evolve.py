"""The generated ``evolve_*`` functions do what ``attrs.evolve`` does."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepwork_retry._core.model import (
    DispatchEntry,
    Progress,
    Task,
    evolve_entry,
    evolve_progress,
    evolve_task,
)
from deepwork_retry._core.states import BlockedReason, DispatchState, TaskStatus

STAMP = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)

task_changes = st.fixed_dictionaries(
    {},
    optional={
        "status": st.sampled_from(TaskStatus),
        "retry_count": st.integers(0, 9),
        "retries_left": st.integers(0, 9),
        "error_message": st.one_of(st.none(), st.text(max_size=5)),
        "blocked_reason": st.one_of(st.none(), st.sampled_from(BlockedReason)),
        "blocked_by": st.lists(st.text(min_size=1, max_size=3), max_size=3),
        "attempt": st.integers(0, 9),
        "lease_expires_at": st.one_of(st.none(), st.just(STAMP)),
        "updated_at": st.just(STAMP),
        "version": st.integers(1, 9),
        "metadata": st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    },
)


@settings(max_examples=100, deadline=None)
@given(changes=task_changes, blocked_by=st.lists(st.text(min_size=1, max_size=3), max_size=2))
def test_evolve_task_equals_attrs_evolve(changes: dict[str, Any], blocked_by: list[str]) -> None:
    """Any set of changes gives the same task, converters applied, metadata copied."""
    task = Task(id="t", project_id="p", blocked_by=blocked_by, metadata={"a": 1})
    expected = attrs.evolve(task, **changes)
    actual = evolve_task(task, **changes)
    assert (expected, attrs.asdict(expected)) == (actual, attrs.asdict(actual))
    assert type(expected.blocked_by) is type(actual.blocked_by)
    assert task.metadata is not actual.metadata


def test_evolve_progress_and_entry_equal_attrs_evolve() -> None:
    """The progress and outbox-entry evolvers match ``attrs.evolve`` too."""
    progress = Progress(project_id="p", total=3, blocked=2, assigned=1)
    entry = DispatchEntry(
        project_id="p",
        task_id="t",
        attempt=1,
        state=DispatchState.DEFERRED,
        available_at=STAMP,
        created_at=STAMP,
    )
    assert (
        attrs.evolve(progress, blocked=1, assigned=2),
        attrs.evolve(entry, state=DispatchState.PENDING, claimed_until=STAMP),
    ) == (
        evolve_progress(progress, blocked=1, assigned=2),
        evolve_entry(entry, state=DispatchState.PENDING, claimed_until=STAMP),
    )


def test_evolve_rejects_unknown_fields() -> None:
    """A field the class does not have is a TypeError, as with ``attrs.evolve``."""
    with pytest.raises(TypeError):
        evolve_task(Task(id="t", project_id="p"), colour="red")


def test_evolved_task_stays_frozen() -> None:
    """The copy is as frozen as the original."""
    copy = evolve_task(Task(id="t", project_id="p"), attempt=2)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        copy.attempt = 3  # type: ignore[misc]
