"""A move's effects are written once, in the core, and every storage renders them.

:data:`deepwork_retry._core.effects.MANUAL_RETRY` describes what a manual retry
changes. The in-memory apply (``decide.manual_retry``) and the one-step
statements of SQLite and PostgreSQL are rendered from it; so a change to one
effect, made in the core alone, reaches all three: each storage made after the
change does exactly what the core's plan applied to memory does, and what it
did before the change it no longer does.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest
from pg_support import schema_dropped_after

from deepwork_retry._core import decide, effects
from deepwork_retry._core.effects import ByBudget, Const, Field, Move, Now, Plus
from deepwork_retry._core.model import Project, Task
from deepwork_retry._core.plans import Applied
from deepwork_retry._core.states import BlockedReason, RetryBudget, TaskStatus
from deepwork_retry.ports import RetryInOneStep, Storage
from deepwork_retry.storage.memory import MemoryStorage
from deepwork_retry.storage.sqlite import SQLiteStorage

T0 = datetime(2025, 1, 2, 3, 4, 5, 678_901, tzinfo=timezone.utc)
NOW = T0 + timedelta(minutes=7)
_ids = itertools.count()


def with_task(move: Move, name: str, expr: effects.Expr | None) -> Move:
    """``move`` with the effect on the task field ``name`` replaced (``None``: dropped)."""
    task = tuple((n, e) for n, e in move.task if n != name)
    if expr is not None:
        task += ((name, expr),)
    return attrs.evolve(move, task=task)


def with_attempt(move: Move, name: str, expr: effects.Expr) -> Move:
    attempt = (*((n, e) for n, e in move.attempt if n != name), (name, expr))
    return attrs.evolve(move, attempt=attempt)


BASE = effects.MANUAL_RETRY
CHANGES: dict[str, Callable[[Move], Move]] = {
    "one_more leaves one automatic retry": lambda m: with_task(
        m, "retries_left", ByBudget(full=Field("max_retries"), one_more=Const(1))
    ),
    "the error is kept": lambda m: with_task(
        with_task(m, "error_message", None), "error_type", None
    ),
    "the error is replaced by a constant": lambda m: with_task(
        m, "error_message", Const("retried by hand, it's fine")
    ),
    "a retry counts twice": lambda m: with_task(m, "retry_count", Plus("retry_count", 2)),
    "started_at restarts now": lambda m: with_task(m, "started_at", Now()),
    "the blocked reason stays": lambda m: with_task(m, "blocked_reason", None),
    "the attempt records a fixed reason": lambda m: with_attempt(m, "reason", Const("by hand")),
}


def blocked(pid: str) -> tuple[Project, Task]:
    project = Project(id=pid, created_at=T0, updated_at=T0)
    task = Task(
        id="t", project_id=pid, status=TaskStatus.BLOCKED, title="it's blocked", max_retries=3,
        retries_left=0, retry_count=2, error_message="boom", error_type="Boom",
        blocked_reason=BlockedReason.BUDGET_EXHAUSTED, attempt=0, started_at=T0,
        created_at=T0, updated_at=T0, metadata={"k": "v"},
    )  # fmt: skip
    return project, task


def expected(budget: RetryBudget) -> tuple[Applied, list[Any]]:
    """The core's plan for the current ``effects.MANUAL_RETRY`` applied to memory."""
    memory = MemoryStorage()
    pid = f"m{next(_ids)}"
    project, task = blocked(pid)
    memory.create_project(project)
    memory.add_tasks([task])
    plan = decide.manual_retry(
        task, project, now=NOW, blockers={}, actor="zoë", reason="fixed", budget=budget
    )
    return memory.apply(plan), memory.attempts(pid, "t")


def one_step(storage: Storage, budget: RetryBudget) -> tuple[Applied, list[Any]]:
    assert isinstance(storage, RetryInOneStep)
    pid = f"s{next(_ids)}"
    project, task = blocked(pid)
    storage.create_project(project)
    storage.add_tasks([task])
    applied = storage.retry_blocked(pid, "t", now=NOW, actor="zoë", reason="fixed", budget=budget)
    assert applied is not None
    assert applied.task == storage.load(pid, "t")[1]
    return applied, storage.attempts(pid, "t")


def comparable(result: tuple[Applied, list[Any]]) -> tuple[Any, ...]:
    applied, attempts = result
    task = attrs.evolve(applied.task, project_id="")
    progress = attrs.evolve(applied.progress, project_id="")
    return task, dict(task.metadata), progress, [attrs.evolve(a, project_id="") for a in attempts]


@pytest.fixture
def sqlite_factory(tmp_path: Path) -> Iterator[Callable[[], Storage]]:
    made: list[SQLiteStorage] = []

    def make() -> Storage:
        made.append(SQLiteStorage(tmp_path / f"{next(_ids)}.db", synchronous="NORMAL"))
        return made[-1]

    yield make
    for storage in made:
        storage.close()


@pytest.fixture
def postgres_factory(request: pytest.FixtureRequest) -> Iterator[Callable[[], Storage]]:
    dsn: str = request.getfixturevalue("postgres_dsn")
    from deepwork_retry.storage.postgres import PostgresStorage

    with schema_dropped_after(dsn, "fx") as schema:
        made: list[PostgresStorage] = []

        def make() -> Storage:
            made.append(PostgresStorage(dsn, schema=schema, max_size=2))
            return made[-1]

        try:
            yield make
        finally:
            for storage in made:
                storage.close()


@pytest.mark.parametrize(
    "dialect", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_change_to_one_effect_in_the_core_reaches_every_storage(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, dialect: str, change: str
) -> None:
    """Changed in ``effects`` alone, the retry's effect changes in memory and in SQL alike."""
    factory: Callable[[], Storage] = request.getfixturevalue(f"{dialect}_factory")
    before = {budget: comparable(expected(budget)) for budget in RetryBudget}
    old = factory()
    assert {budget: comparable(one_step(old, budget)) for budget in RetryBudget} == before
    monkeypatch.setattr(effects, "MANUAL_RETRY", CHANGES[change](BASE))
    after = {budget: comparable(expected(budget)) for budget in RetryBudget}
    assert after != before  # the change shows in the core's own plan
    new = factory()
    assert {budget: comparable(one_step(new, budget)) for budget in RetryBudget} == after


def test_a_move_refuses_what_no_storage_could_render() -> None:
    """A move names task fields, arguments and a target the transition table allows."""
    bad_moves: list[Callable[[], Move]] = [
        lambda: with_task(BASE, "colour", Const(1)),
        lambda: with_task(BASE, "id", Const("x")),
        lambda: with_task(BASE, "retry_count", Plus("colour", 1)),
        lambda: with_task(BASE, "status", Const(TaskStatus.DONE)),
        lambda: with_attempt(BASE, "actor", effects.Arg("whoever")),
        lambda: with_attempt(BASE, "actor", Field("title")),
        lambda: with_task(BASE, "title", Const(1.5)),
    ]
    for bad in bad_moves:
        with pytest.raises((ValueError, TypeError)):
            bad()
