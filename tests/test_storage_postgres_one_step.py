"""The PostgreSQL one-statement manual retry, checked against the core.

:meth:`PostgresStorage.retry_blocked` renders the decision of
:func:`deepwork_retry._core.decide.manual_retry` into SQL. These tests hold it
to the core: from the same initial state, it changes exactly what the core's
plan applied to :class:`MemoryStorage` changes, and changes nothing whenever
the core refuses.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pg_support import schema_dropped_after

from deepwork_retry import RetryService
from deepwork_retry._core import decide
from deepwork_retry._core.model import IdempotencyRecord, Project, Task
from deepwork_retry._core.states import (
    BlockedReason,
    ProjectStatus,
    RetryBudget,
    TaskStatus,
)
from deepwork_retry.exceptions import DeepworkError
from deepwork_retry.ports import AsyncRetryInOneStep, RetryInOneStep, Storage
from deepwork_retry.storage.memory import MemoryStorage
from deepwork_retry.storage.postgres import AsyncPostgresStorage, PostgresStorage

pytestmark = pytest.mark.postgres

T0 = datetime(2025, 6, 7, 8, 9, 10, 111_213, tzinfo=timezone.utc)
NOW = T0 + timedelta(hours=1, microseconds=7)
MISSING = "missing"  # a blocker named in blocked_by that does not exist
_projects = itertools.count()


class FixedClock:
    def now(self) -> datetime:
        return NOW


@pytest.fixture(scope="module")
def pg(postgres_dsn: str) -> Iterator[PostgresStorage]:
    with schema_dropped_after(postgres_dsn, "one") as schema:
        storage = PostgresStorage(postgres_dsn, schema=schema, max_size=2)
        try:
            yield storage
        finally:
            storage.close()


# Finished blockers are common, so that "all finished" (the dispatching case) is too.
blocker_states = st.one_of(
    st.sampled_from([TaskStatus.DONE, TaskStatus.SKIPPED]), st.sampled_from([*TaskStatus, MISSING])
)


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    """A project, a task (usually blocked), its blockers and the retry's arguments."""
    status = draw(st.one_of(st.just(TaskStatus.BLOCKED), st.sampled_from(TaskStatus)))
    max_retries = draw(st.integers(0, 3))
    return {
        "project": draw(
            st.one_of(
                st.sampled_from([ProjectStatus.EXECUTING, ProjectStatus.PAUSED]),
                st.sampled_from(ProjectStatus),
            )
        ),
        "status": status,
        "max_retries": max_retries,
        "retries_left": draw(st.integers(0, max_retries)),
        "retry_count": draw(st.integers(0, 4)),
        "attempt": draw(st.sampled_from([0, 0, 0, 2])),  # 2 has no attempt records
        "started_at": draw(st.sampled_from([None, T0])),
        "blocked_reason": draw(st.sampled_from([None, *BlockedReason])),
        "blockers": draw(st.lists(blocker_states, max_size=3)),
        "budget": draw(st.sampled_from(RetryBudget)),
        "actor": draw(st.sampled_from([None, "ana", "bé"])),
        "reason": draw(st.sampled_from([None, "fixed the input"])),
        "claim": draw(st.booleans()),
        "key": draw(st.sampled_from([None, "fresh", "taken"])),
        "metadata": draw(st.sampled_from([{}, {"k": [1, "two"]}])),
    }


def setup(storage: Storage, pid: str, sc: dict[str, Any]) -> None:
    """The scenario's initial state, written through the storage's own methods."""
    storage.create_project(Project(id=pid, status=sc["project"], created_at=T0, updated_at=T0))
    blockers = []
    for n, state in enumerate(sc["blockers"]):
        if state != MISSING:
            blockers.append(
                Task(id=f"b{n}", project_id=pid, status=state, created_at=T0, updated_at=T0)
            )
    task = Task(
        id="t",
        project_id=pid,
        status=sc["status"],
        max_retries=sc["max_retries"],
        retries_left=sc["retries_left"],
        retry_count=sc["retry_count"],
        error_message="boom" if sc["status"] is TaskStatus.BLOCKED else None,
        error_type="Boom" if sc["status"] is TaskStatus.BLOCKED else None,
        blocked_reason=sc["blocked_reason"],
        blocked_by=[f"b{n}" for n in range(len(sc["blockers"]))],
        attempt=sc["attempt"],
        started_at=sc["started_at"],
        created_at=T0,
        updated_at=T0,
        metadata=sc.get("metadata", {"k": [1, "two"]}),
    )
    storage.add_tasks([*blockers, task])
    if sc["key"] == "taken":
        storage.save_idempotency(
            IdempotencyRecord(key=f"{pid}-taken", project_id=pid, task_id="b0", created_at=T0)
        )


def key_of(pid: str, sc: dict[str, Any]) -> str | None:
    return None if sc["key"] is None else f"{pid}-{sc['key']}"


def snapshot(storage: Storage, pid: str, key: str | None) -> tuple[Any, ...]:
    """Everything the retry could have changed."""
    tasks = storage.list_tasks(pid, limit=100)
    return (
        storage.get_project(pid),
        tasks,
        [t.metadata for t in tasks],
        [storage.attempts(pid, t.id) for t in tasks],
        [storage.dispatches(pid, t.id) for t in tasks],
        storage.deferred(pid),
        storage.progress(pid),
        None if key is None else storage.get_idempotency(key),
    )


def core_retry(storage: MemoryStorage, pid: str, sc: dict[str, Any], claim: datetime | None) -> Any:
    """The general path: load, decide with the core, apply."""
    project, task = storage.load(pid, "t")
    plan = decide.manual_retry(
        task,
        project,
        now=NOW,
        blockers=storage.get_tasks(pid, task.blocked_by),
        actor=sc["actor"],
        reason=sc["reason"],
        budget=sc["budget"],
        claimed_until=claim,
        idempotency_key=key_of(pid, sc),
    )
    return storage.apply(plan)


def test_postgres_storage_has_the_capability(pg: PostgresStorage) -> None:
    """Both PostgreSQL storages offer the one-step retry; memory storage does not."""
    assert isinstance(pg, RetryInOneStep)
    assert issubclass(AsyncPostgresStorage, AsyncRetryInOneStep)
    assert not isinstance(MemoryStorage(), RetryInOneStep)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sc=scenarios())
def test_one_step_retry_equals_the_core(pg: PostgresStorage, sc: dict[str, Any]) -> None:
    """From any state, the one-statement retry changes what the core's plan changes, or nothing."""
    pid = f"p{next(_projects)}"
    memory = MemoryStorage()
    setup(memory, pid, sc)
    setup(pg, pid, sc)
    key = key_of(pid, sc)
    claim = NOW + timedelta(seconds=30) if sc["claim"] else None
    assert snapshot(memory, pid, key) == snapshot(pg, pid, key)
    before = snapshot(pg, pid, key)

    applied = pg.retry_blocked(
        pid, "t", now=NOW, actor=sc["actor"], reason=sc["reason"], budget=sc["budget"],
        claimed_until=claim, idempotency_key=key,
    )  # fmt: skip
    try:
        expected = core_retry(memory, pid, sc, claim)
    except DeepworkError as exc:
        refused: DeepworkError | None = exc
    else:
        refused = None
    if refused is not None:
        assert (None, before) == (applied, snapshot(pg, pid, key))
        # The service then takes the general path and raises the core's error.
        service = RetryService(pg, clock=FixedClock())
        with pytest.raises(type(refused)) as raised:
            service.retry(
                pid, "t", actor=sc["actor"], reason=sc["reason"], budget=sc["budget"],
                idempotency_key=key,
            )  # fmt: skip
        assert refused.detail == raised.value.detail
    else:
        assert expected == applied
        assert snapshot(memory, pid, key) == snapshot(pg, pid, key)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sc=scenarios())
def test_service_retry_equals_memory_service(pg: PostgresStorage, sc: dict[str, Any]) -> None:
    """RetryService.retry on PostgreSQL (one step) answers and stores what it does on memory."""
    pid = f"s{next(_projects)}"
    memory = MemoryStorage()
    setup(memory, pid, sc)
    setup(pg, pid, sc)
    key = key_of(pid, sc)
    outcomes: list[object] = []
    for storage in (memory, pg):
        service = RetryService(storage, clock=FixedClock())
        options = {"actor": sc["actor"], "reason": sc["reason"], "budget": sc["budget"]}
        try:
            outcomes.append(service.retry(pid, "t", idempotency_key=key, **options))
        except DeepworkError as exc:
            outcomes.append((type(exc), exc.detail))
    assert outcomes[0] == outcomes[1]
    assert snapshot(memory, pid, key) == snapshot(pg, pid, key)


@pytest.mark.parametrize("keyed", [False, True], ids=["no-key", "key"])
@pytest.mark.parametrize("claimed", [False, True], ids=["unclaimed", "claimed"])
@pytest.mark.parametrize(
    "blockers", [[], [TaskStatus.DONE], [MISSING]], ids=["free", "done", "missing"]
)
def test_each_statement_variant_equals_the_core(
    pg: PostgresStorage, keyed: bool, claimed: bool, blockers: list[Any]
) -> None:
    """Each of the retry's statement texts (with or without a key and a claim) applies
    what the core's plan applies, with and without blockers."""
    pid = f"v{next(_projects)}"
    sc: dict[str, Any] = {
        "project": ProjectStatus.EXECUTING,
        "status": TaskStatus.BLOCKED,
        "max_retries": 2,
        "retries_left": 0,
        "retry_count": 1,
        "attempt": 0,
        "started_at": T0,
        "blocked_reason": BlockedReason.BUDGET_EXHAUSTED,
        "blockers": blockers,
        "budget": RetryBudget.FULL,
        "actor": "ana",
        "reason": None,
        "claim": claimed,
        "key": "fresh" if keyed else None,
        "metadata": {} if claimed else {"k": [1, "two"]},
    }
    memory = MemoryStorage()
    setup(memory, pid, sc)
    setup(pg, pid, sc)
    key = key_of(pid, sc)
    claim = NOW + timedelta(seconds=30) if claimed else None
    applied = pg.retry_blocked(
        pid, "t", now=NOW, actor="ana", budget=RetryBudget.FULL, claimed_until=claim,
        idempotency_key=key,
    )  # fmt: skip
    expected = core_retry(memory, pid, sc, claim)
    assert applied is not None
    assert expected == applied
    assert dict(expected.task.metadata) == dict(applied.task.metadata)
    assert snapshot(memory, pid, key) == snapshot(pg, pid, key)


def test_naive_now_declines_and_changes_nothing(pg: PostgresStorage) -> None:
    """A ``now`` without a time zone is left to the general path (nothing is written)."""
    pid = f"n{next(_projects)}"
    sc: dict[str, Any] = {
        "project": ProjectStatus.EXECUTING, "status": TaskStatus.BLOCKED, "max_retries": 1,
        "retries_left": 0, "retry_count": 1, "attempt": 0, "started_at": None,
        "blocked_reason": None, "blockers": [], "key": None,
    }  # fmt: skip
    setup(pg, pid, sc)
    before = snapshot(pg, pid, None)
    assert pg.retry_blocked(pid, "t", now=NOW.replace(tzinfo=None)) is None
    assert before == snapshot(pg, pid, None)
