"""Checks every storage adapter runs on its inputs, so all reject the same things."""

from __future__ import annotations

from collections.abc import Sequence

from deepwork_retry._core.model import Project, Task
from deepwork_retry.exceptions import InvalidInput

MAX_ID_LENGTH = 255
MAX_LIMIT = 1000


def check_id(kind: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{kind} id must be a non-empty string")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidInput(f"{kind} id is longer than {MAX_ID_LENGTH} characters")
    if "\x00" in value:
        raise InvalidInput(f"{kind} id must not contain NUL characters")
    return value


def check_project(project: Project) -> None:
    check_id("project", project.id)


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


def check_limit(limit: int) -> None:
    if not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be an integer from 1 to {MAX_LIMIT}")
