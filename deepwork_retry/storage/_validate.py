"""Checks every storage adapter runs on its inputs, so all reject the same things.

The id and limit rules are the core's (:mod:`deepwork_retry._core.inputs`);
the batch check is the storages' own.
"""

from __future__ import annotations

from collections.abc import Sequence

from deepwork_retry._core.inputs import check_id
from deepwork_retry._core.model import Task
from deepwork_retry.exceptions import InvalidInput


def check_new_tasks(tasks: Sequence[Task]) -> None:
    """Ids well formed, unique in the batch, budgets non-negative, no self-dependency."""
    seen: set[tuple[str, str]] = set()
    for task in tasks:
        check_id("task", task.id)
        check_id("project", task.project_id)
        key = (task.project_id, task.id)
        if key in seen:
            raise InvalidInput(f"Task {task.id!r} appears twice in one batch")
        seen.add(key)
        if task.max_retries < 0 or task.retries_left < 0 or task.retry_count < 0:
            raise InvalidInput(f"Task {task.id!r}: retry counts must be >= 0")
        if task.id in task.blocked_by:
            raise InvalidInput(f"Task {task.id!r} cannot be blocked by itself")
        for dep in task.blocked_by:
            check_id("blocked_by task", dep)


__all__ = ["check_new_tasks"]
