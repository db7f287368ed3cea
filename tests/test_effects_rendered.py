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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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


# -- any move of the vocabulary renders alike in Python and in each dialect --------------

_INTS = ("retry_count", "max_retries", "retries_left")
_TEXTS = ("error_message", "error_type")
_TIMES = ("lease_expires_at", "started_at", "completed_at")


def _leaf(draw: st.DrawFn, name: str) -> effects.Expr:
    if name in _INTS:
        return draw(
            st.one_of(
                st.builds(Const, st.integers(0, 9)),
                st.sampled_from([Field(n) for n in _INTS]),
                st.builds(Plus, st.sampled_from(_INTS), st.integers(0, 3)),
            )
        )
    if name in _TEXTS:
        return draw(
            st.one_of(
                st.builds(Const, st.sampled_from([None, "", "it's set", "zoë"])),
                st.sampled_from([Field(n) for n in _TEXTS]),
            )
        )
    if name == "blocked_reason":
        return Const(draw(st.sampled_from([None, *BlockedReason])))
    if name == "title":
        titles: list[effects.Expr] = [Const("renamed"), Field("title")]
        return draw(st.sampled_from(titles))
    times: list[effects.Expr] = [Const(None), Now(), *(Field(n) for n in _TIMES)]
    return draw(st.sampled_from(times))


@st.composite
def moves(draw: st.DrawFn) -> Move:
    """The manual retry with any of its free task effects replaced, dropped or added."""
    updated: list[effects.Expr] = [Now(), Field("updated_at")]
    task: list[tuple[str, effects.Expr]] = [
        ("status", Const(TaskStatus.ASSIGNED)),
        ("attempt", Plus("attempt", 1)),  # the attempt record numbers follow it
        ("version", Plus("version", 1)),
        ("updated_at", draw(st.sampled_from(updated))),
    ]
    for name in ("title", *_INTS, *_TEXTS, "blocked_reason", *_TIMES):
        how = draw(st.sampled_from(["keep", "set", "by budget"]))
        if how == "set":
            task.append((name, _leaf(draw, name)))
        elif how == "by budget":
            task.append((name, ByBudget(full=_leaf(draw, name), one_more=_leaf(draw, name))))
    attempt = dict(BASE.attempt)
    reasons: list[effects.Expr] = [effects.Arg("reason"), Const("by hand")]
    attempt["reason"] = draw(st.sampled_from(reasons))
    return attrs.evolve(BASE, task=tuple(task), attempt=tuple(attempt.items()))


def _check_rendered_alike(make: Callable[[], Storage], move: Move, budget: RetryBudget) -> None:
    try:
        effects.MANUAL_RETRY = move
        wanted = comparable(expected(budget))
        storage = make()
        try:
            assert comparable(one_step(storage, budget)) == wanted
        finally:
            close = getattr(storage, "close", None)
            if close is not None:
                close()
    finally:
        effects.MANUAL_RETRY = BASE


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(move=moves(), budget=st.sampled_from(RetryBudget))
def test_any_move_renders_into_sqlite_as_into_python(
    tmp_path_factory: pytest.TempPathFactory, move: Move, budget: RetryBudget
) -> None:
    """SQLite's one-step retry of any move does what the move's Python rendering does."""
    folder = tmp_path_factory.mktemp("moves")
    _check_rendered_alike(
        lambda: SQLiteStorage(folder / "m.db", synchronous="NORMAL"), move, budget
    )


@pytest.mark.postgres
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(move=moves(), budget=st.sampled_from(RetryBudget))
def test_any_move_renders_into_postgres_as_into_python(
    postgres_schema_for_moves: tuple[str, str], move: Move, budget: RetryBudget
) -> None:
    """PostgreSQL's one-step retry of any move does what the move's Python rendering does."""
    from deepwork_retry.storage.postgres import PostgresStorage

    dsn, schema = postgres_schema_for_moves
    _check_rendered_alike(
        lambda: PostgresStorage(dsn, schema=schema, min_size=1, max_size=1), move, budget
    )


@pytest.fixture(scope="module")
def postgres_schema_for_moves(postgres_dsn: str) -> Iterator[tuple[str, str]]:
    with schema_dropped_after(postgres_dsn, "mv") as schema:
        yield postgres_dsn, schema
