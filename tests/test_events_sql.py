"""Lifecycle events in the SQL engine's storages: SQLite files, and the SQLAlchemy storage
on SQLite and on MariaDB (the MySQL dialect).

Every move writes the core's events (:func:`~deepwork_retry._core.events.events_of`,
``manual_retry_events``, ``added``, ``dispatch_failed``) in its own transaction,
numbered per project 1, 2, 3 … without gaps in commit order; the event log hands
them out per task in order, keeps failed deliveries, parks and replays them, and
retention removes what was delivered.
"""

from __future__ import annotations

import asyncio
import collections
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mysql_support import create_database, database_dropped_after, drop_database, new_database_name
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from deepwork_retry import ExecutorService, RetryService, TaskError
from deepwork_retry._core import decide
from deepwork_retry._core import events as lifecycle
from deepwork_retry._core.events import Event, EventRetry, EventType
from deepwork_retry._core.model import Project, Task
from deepwork_retry._core.plans import Applied, Plan
from deepwork_retry._core.policy import RetryPolicy
from deepwork_retry._core.retention import PruneRule
from deepwork_retry._core.states import DispatchState, RetryBudget, TaskStatus
from deepwork_retry.exceptions import (
    AlreadyExists,
    DeepworkError,
    InvalidInput,
    ProjectNotFound,
    VersionConflict,
)
from deepwork_retry.ports import AsyncEventLog, EventLog
from deepwork_retry.storage.sqlalchemy import AsyncSQLAlchemyStorage, SQLAlchemyStorage
from deepwork_retry.storage.sqlite import AsyncSQLiteStorage, SQLiteStorage

T0 = datetime(2026, 1, 2, 3, 4, 5, 678_901, tzinfo=timezone.utc)
TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Clock:
    def __init__(self, at: datetime = T0) -> None:
        self.at = at

    def now(self) -> datetime:
        self.at += timedelta(milliseconds=1)
        return self.at


class _Recording:
    """A storage that records the plans it applied (after their commit) and has no
    one-step retry (``None``: the services take the step-by-step path)."""

    plans: list[Plan]
    _recorded: threading.Lock

    def _start_recording(self) -> None:
        self.plans = []
        self._recorded = threading.Lock()

    def apply(self, plan: Plan) -> Applied:
        applied: Applied = super().apply(plan)  # type: ignore[misc]
        with self._recorded:
            self.plans.append(plan)
        return applied

    def retry_blocked(self, *args: Any, **kwargs: Any) -> None:
        return None


class RecordingSQLite(_Recording, SQLiteStorage):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._start_recording()


class RecordingSQLAlchemy(_Recording, SQLAlchemyStorage):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._start_recording()


Make = Callable[..., Any]
"""``make(recording=False)``: a new storage on the test's database."""

BACKENDS = ["sqlite", "sqla-sqlite", pytest.param("sqla-mariadb", marks=pytest.mark.mysql)]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Make]]:
    """The backend's name and a maker of storages on one new database of it."""
    made: list[Any] = []
    engines: list[Any] = []

    def keep(storage: Any) -> Any:
        made.append(storage)
        return storage

    if request.param == "sqlite":

        def make(recording: bool = False) -> Any:
            cls = RecordingSQLite if recording else SQLiteStorage
            return keep(cls(tmp_path / "events.db", synchronous="NORMAL"))

        yield "sqlite", make
    else:
        if request.param == "sqla-sqlite":
            url = f"sqlite:///{tmp_path / 'events.db'}"
            context: Any = None
        else:
            context = database_dropped_after(request.getfixturevalue("mysql_url"), "events")
            url = context.__enter__().render_as_string(hide_password=False)
        engine = create_engine(url, pool_size=16) if context else create_engine(url)
        engines.append(engine)

        def make(recording: bool = False) -> Any:
            cls = RecordingSQLAlchemy if recording else SQLAlchemyStorage
            return keep(cls(engine))

        try:
            yield request.param, make
        finally:
            for storage in made:
                storage.close()
            engine.dispose()
            if context is not None:
                context.__exit__(None, None, None)
        return
    for storage in made:
        storage.close()


def _numbered(events: list[Event]) -> list[Event]:
    """``events`` numbered from 1 (the order a project's events are stored in)."""
    return list(lifecycle.numbered(tuple(events), 0))


def _expected(tasks: list[Task], plans: list[Plan]) -> list[Event]:
    made = [lifecycle.added(t) for t in tasks]
    for plan in plans:
        made.extend(lifecycle.events_of(plan))
    return _numbered(made)


def _all_events(storage: Any, project_id: str) -> list[Event]:
    found: list[Event] = []
    while True:
        page = storage.events(project_id, after=found[-1].seq if found else 0, limit=7)
        found.extend(page)
        if len(page) < 7:
            return found


# -- what is written ---------------------------------------------------------------------


def test_every_storage_has_the_capability(backend: tuple[str, Make]) -> None:
    _, make = backend
    assert isinstance(make(), EventLog)


def test_service_moves_write_the_events_of_their_plans(backend: tuple[str, Make]) -> None:
    """Adding tasks, assigning, starting, failing (an automatic retry, then blocked), a
    manual retry and success: the stored events are the core's events of each plan
    applied, numbered 1..n, read back in pages."""
    _, make = backend
    storage = make(recording=True)
    clock = Clock()
    policy = RetryPolicy(lease=60)
    ex = ExecutorService(storage, clock=clock, policy=policy)
    retry = RetryService(storage, clock=clock, policy=policy)
    ex.create_project("p")
    tasks = [ex.add_task("p", "a", max_retries=1), ex.add_task("p", "b", blocked_by=["a"])]
    ex.assign("p", "a")
    ex.start("p", "a", 1)
    ex.fail("p", "a", 1, TaskError(type="Boom", message="first"))  # retried automatically
    ex.start("p", "a", 2)
    ex.fail("p", "a", 2, TaskError(type="Boom", message="second"))  # budget exhausted
    retry.retry("p", "a", actor="ann", reason="fixed it")
    ex.start("p", "a", 3)
    ex.succeed("p", "a", 3)
    ex.assign("p", "b")
    ex.block("p", "b", message="by hand")

    stored = _all_events(storage, "p")
    assert _expected(tasks, storage.plans) == stored
    kinds = [e.type for e in stored]
    assert kinds.count(EventType.TASK_BLOCKED) == 2
    assert EventType.TASK_RETRIED in kinds
    assert EventType.ATTEMPT_LOST not in kinds
    blocked = next(e for e in stored if e.type is EventType.TASK_BLOCKED)
    assert blocked.data["retries_exhausted"] is True
    assert blocked.task_id == "a"
    assert list(range(1, len(stored) + 1)) == [e.seq for e in stored]
    assert [] == storage.events("p", after=len(stored))
    assert stored[3:5] == storage.events("p", after=3, limit=2)


def test_one_step_retry_writes_what_the_step_by_step_retry_writes(
    backend: tuple[str, Make],
) -> None:
    """The one-step retry's events equal those of the core's plan applied step by step,
    dispatched at once and deferred (an unfinished blocker), with actor, reason and
    budget; the trace goes on the outbox entry."""
    _, make = backend
    storage = make()
    now = T0 + timedelta(hours=1)
    for pid in ("one", "steps"):
        storage.create_project(Project(id=pid, created_at=T0, updated_at=T0))
        storage.add_tasks(
            [
                Task(id="blocker", project_id=pid, created_at=T0, updated_at=T0),
                Task(
                    id="ready", project_id=pid, status=TaskStatus.BLOCKED, retry_count=3,
                    retries_left=0, created_at=T0, updated_at=T0,
                ),
                Task(
                    id="waits", project_id=pid, status=TaskStatus.BLOCKED, retry_count=1,
                    blocked_by=("blocker",), created_at=T0, updated_at=T0,
                ),
            ]
        )  # fmt: skip
    for tid, budget in (("ready", RetryBudget.FULL), ("waits", RetryBudget.ONE_MORE)):
        applied = storage.retry_blocked(
            "one", tid, now=now, actor="ann", reason="why", budget=budget,
            claimed_until=now + timedelta(seconds=30), trace=TRACE,
        )  # fmt: skip
        assert applied is not None
        project, task = storage.load("steps", tid)
        blockers = storage.get_tasks("steps", task.blocked_by)
        plan = decide.manual_retry(
            task, project, now=now, actor="ann", reason="why", budget=budget,
            blockers=blockers, claimed_until=now + timedelta(seconds=30),
        )  # fmt: skip
        storage.apply(plan)

    one, steps = _all_events(storage, "one"), _all_events(storage, "steps")
    assert [e.seq for e in one] == list(range(1, 3 + 2 + 3 + 1))  # added, ready, deferred
    assert [attrs_without_project(e) for e in one] == [attrs_without_project(e) for e in steps]
    assert EventType.DISPATCH_DEFERRED in [e.type for e in one if e.task_id == "waits"]
    assert EventType.DISPATCH_DEFERRED not in [e.type for e in one if e.task_id == "ready"]
    assert TRACE == storage.dispatches("one", "ready")[-1].trace
    assert TRACE == storage.deferred("one")[0].trace
    assert None is storage.dispatches("steps", "ready")[-1].trace


def attrs_without_project(event: Event) -> dict[str, Any]:
    found = event.to_json()
    del found["id"], found["project_id"]
    return found


def test_trace_and_dispatch_failed(backend: tuple[str, Make]) -> None:
    """The plan's outbox entry keeps its trace (claimed and listed); ``mark_failed``
    writes ``dispatch.failed`` at ``now`` with the entry, only while it is pending."""
    _, make = backend
    storage = make()
    storage.create_project(Project(id="p", created_at=T0, updated_at=T0))
    task = Task(id="t", project_id="p", created_at=T0, updated_at=T0)
    storage.add_tasks([task])
    plan = decide.assign(task, storage.get_project("p"), now=T0, blockers={})
    assert plan.dispatch is not None
    plan = attrs.evolve(plan, dispatch=attrs.evolve(plan.dispatch, trace=TRACE))
    storage.apply(plan)
    claimed = storage.claim_due(now=T0, limit=10, claimed_until=T0 + timedelta(seconds=5))
    assert [TRACE] == [e.trace for e in claimed]
    retry_at = T0 + timedelta(seconds=9)
    at = T0 + timedelta(seconds=1)
    storage.mark_failed(claimed[0], error="broker down", retry_at=retry_at, now=at)
    last = storage.events("p", after=0, limit=100)[-1]
    assert (
        last
        == lifecycle.numbered(
            (
                lifecycle.dispatch_failed(
                    claimed[0], error="broker down", retry_at=retry_at, now=at
                ),
            ),
            last.seq - 1,
        )[0]
    )
    assert {"error": "broker down", "tries": 1, "retry_at": retry_at.isoformat()} == last.data
    storage.mark_delivered(
        storage.claim_due(now=retry_at, limit=10, claimed_until=retry_at), now=retry_at
    )
    before = len(_all_events(storage, "p"))
    storage.mark_failed(claimed[0], error="late", retry_at=retry_at)  # delivered: nothing
    assert before == len(_all_events(storage, "p"))
    assert TRACE == storage.dispatches("p", "t")[0].trace


# -- atomicity -----------------------------------------------------------------------------


def test_a_refused_write_leaves_no_event_and_no_gap(backend: tuple[str, Make]) -> None:
    """A stale plan (version conflict), a taken task id and a one-step retry that
    refuses write nothing: the next event takes the next number."""
    _, make = backend
    storage = make()
    storage.create_project(Project(id="p", created_at=T0, updated_at=T0))
    task = Task(id="t", project_id="p", created_at=T0, updated_at=T0)
    storage.add_tasks([task])
    plan = decide.assign(task, storage.get_project("p"), now=T0, blockers={})
    storage.apply(plan)
    with pytest.raises(VersionConflict):
        storage.apply(plan)
    with pytest.raises(AlreadyExists):
        storage.add_tasks([Task(id="u", project_id="p"), Task(id="t", project_id="p")])
    assert None is storage.retry_blocked("p", "t", now=T0)  # not blocked
    count = len(lifecycle.events_of(plan)) + 1
    assert list(range(1, count + 1)) == [e.seq for e in _all_events(storage, "p")]
    storage.add_tasks([Task(id="u", project_id="p", created_at=T0, updated_at=T0)])
    assert count + 1 == _all_events(storage, "p")[-1].seq


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("mariadb", marks=pytest.mark.mysql)])
def test_a_host_transaction_rolled_back_leaves_no_event(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The storage joined to the host's connection writes its events in the host's
    transaction: rolled back, none remains; committed, all do, numbered on."""
    context: Any = None
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'host.db'}"
    else:
        context = database_dropped_after(request.getfixturevalue("mysql_url"), "events")
        url = context.__enter__().render_as_string(hide_password=False)
    engine = create_engine(url, isolation_level="READ COMMITTED" if context else None)
    try:
        own = SQLAlchemyStorage(engine)
        ExecutorService(own, clock=Clock()).create_project("p")
        own.add_tasks([Task(id="t", project_id="p", created_at=T0, updated_at=T0)])
        for commit in (False, True):
            with engine.connect() as conn:
                conn.begin()
                joined = SQLAlchemyStorage(conn)
                ExecutorService(joined, clock=Clock()).assign("p", "t")
                assert 1 < len(joined.events("p"))  # seen inside the host's transaction
                if commit:
                    conn.commit()
                else:
                    conn.rollback()
            stored = own.events("p")
            assert [e.seq for e in stored] == list(range(1, len(stored) + 1))
            assert (len(stored) > 1) is commit
        own.close()
    finally:
        engine.dispose()
        if context is not None:
            context.__exit__(None, None, None)


def test_concurrent_writers_number_every_event_once_in_commit_order(
    backend: tuple[str, Make],
) -> None:
    """Threads (each its own connection) add and move tasks of one project at once
    while a reader pages through the events: the reader never sees a number before
    every smaller one is visible (numbers commit in order), and in the end every
    event of every committed move is stored once, numbered 1..n."""
    _, make = backend
    storage = make(recording=True)
    clock_lock = threading.Lock()
    ticks = [T0]

    class SharedClock:
        def now(self) -> datetime:
            with clock_lock:
                ticks[0] += timedelta(microseconds=1)
                return ticks[0]

    ExecutorService(storage, clock=SharedClock()).create_project("p")
    added: list[Task] = []
    added_lock = threading.Lock()
    errors: list[BaseException] = []
    done = threading.Event()
    gaps: list[list[int]] = []

    def writer(n: int) -> None:
        try:
            ex = ExecutorService(storage, clock=SharedClock(), max_conflicts=1000)
            for i in range(6):
                task = ex.add_task("p", f"w{n}-{i}", max_retries=0)
                with added_lock:
                    added.append(task)
                ex.assign("p", task.id)
                ex.start("p", task.id, 1)
                if i % 2:
                    ex.succeed("p", task.id, 1)
                else:
                    ex.fail("p", task.id, 1, TaskError(type="E", message="x"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def reader() -> None:
        while not done.is_set():
            seqs = [e.seq for e in storage.events("p", limit=1000)]
            if seqs != list(range(1, len(seqs) + 1)):
                gaps.append(seqs)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert [] == errors
    assert [] == gaps
    stored = _all_events(storage, "p")
    assert list(range(1, len(stored) + 1)) == [e.seq for e in stored]
    made = [lifecycle.added(t) for t in added]
    for plan in storage.plans:
        made.extend(lifecycle.events_of(plan))
    key = lambda e: (e.type.value, e.task_id, e.attempt, e.at, tuple(sorted(e.data.items())))  # noqa: E731
    assert collections.Counter(map(key, made)) == collections.Counter(map(key, stored))
    # Each task's own events are numbered in the order its moves were made.
    by_task: dict[str | None, list[Event]] = collections.defaultdict(list)
    for event in stored:
        by_task[event.task_id].append(event)
    for task_id, events in by_task.items():
        assert events[0].type is EventType.PROJECT_PROGRESS
        assert events[0].data["from"] is None
        assert events[-1].type in (EventType.PROJECT_PROGRESS,), task_id


# -- the event log -------------------------------------------------------------------------


def _two_tasks_events(storage: Any) -> list[Event]:
    """Events of tasks a and b interleaved: a1 b1 a2 b2 a3 b3 a4 b4 (a's first is seq 1)."""
    storage.create_project(Project(id="p", created_at=T0, updated_at=T0))
    for tid in ("a", "b"):
        storage.add_tasks([Task(id=tid, project_id="p", created_at=T0, updated_at=T0)])
    for tid in ("a", "b"):
        _, task = storage.load("p", tid)
        storage.apply(decide.assign(task, storage.get_project("p"), now=T0, blockers={}))
    return _all_events(storage, "p")


def test_claims_keep_each_tasks_order(backend: tuple[str, Make]) -> None:
    """An event is not handed out while an earlier pending event of its task is claimed
    by another caller; events of other tasks are; an expired claim frees them."""
    _, make = backend
    storage = make()
    events = _two_tasks_events(storage)
    a = [e for e in events if e.task_id == "a"]
    b = [e for e in events if e.task_id == "b"]
    assert len(a) >= 2
    assert len(b) >= 2
    until = T0 + timedelta(seconds=30)
    first = storage.claim_events(now=T0, limit=1, claimed_until=until)
    assert [events[0]] == first
    assert first[0].task_id == "a"
    second = storage.claim_events(now=T0, limit=100, claimed_until=until)
    assert b == second  # none of a's: its first is held by the first caller
    assert [] == storage.claim_events(now=T0, limit=100, claimed_until=until)
    storage.settle_events(first, now=T0)
    assert a[1:] == storage.claim_events(now=T0, limit=100, claimed_until=until)
    # Claims expire: everything not delivered is handed out again, in order.
    again = storage.claim_events(now=until, limit=100, claimed_until=until + timedelta(1))
    assert sorted(a[1:] + b, key=lambda e: e.seq) == again


def test_claims_page_past_events_that_wait(backend: tuple[str, Make]) -> None:
    """With a limit of one, a claim looks past a task's waiting events for a free one."""
    _, make = backend
    storage = make()
    events = _two_tasks_events(storage)
    until = T0 + timedelta(seconds=30)
    a, b = ([e.seq for e in events if e.task_id == tid] for tid in "ab")
    assert [a[0]] == [e.seq for e in storage.claim_events(now=T0, limit=1, claimed_until=until)]
    second = storage.claim_events(now=T0, limit=1, claimed_until=until)
    assert [b[0]] == [e.seq for e in second]
    storage.settle_events(second, now=T0)
    # a's second event waits behind a's first (held); b's second is free.
    assert a[1] < b[1]
    assert [b[1]] == [e.seq for e in storage.claim_events(now=T0, limit=1, claimed_until=until)]
    assert [] == storage.claim_events(now=T0, limit=1, claimed_until=until)


def test_concurrent_claimers_never_share_an_event(backend: tuple[str, Make]) -> None:
    """Threads claiming and settling at once: each event is received exactly once, and
    each task's events are received in order."""
    _, make = backend
    storage = make()
    storage.create_project(Project(id="p", created_at=T0, updated_at=T0))
    storage.add_tasks(
        [Task(id=f"t{i}", project_id="p", created_at=T0, updated_at=T0) for i in range(30)]
    )
    for i in range(30):
        _, task = storage.load("p", f"t{i}")
        storage.apply(decide.assign(task, storage.get_project("p"), now=T0, blockers={}))
    total = len(_all_events(storage, "p"))
    received: list[Event] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def claimer() -> None:
        try:
            while True:
                got = storage.claim_events(now=T0, limit=3, claimed_until=T0 + timedelta(hours=1))
                if not got:
                    with lock:
                        if len(received) >= total:
                            return
                    continue
                with lock:
                    received.extend(got)
                storage.settle_events(got, now=T0)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=claimer) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert [] == errors
    assert sorted(e.seq for e in received) == list(range(1, total + 1))
    per_task: dict[str | None, list[int]] = collections.defaultdict(list)
    for event in received:
        per_task[event.task_id].append(event.seq)
    assert all(seqs == sorted(seqs) for seqs in per_task.values())


def test_failed_deliveries_are_retried_parked_and_replayed(backend: tuple[str, Make]) -> None:
    _, make = backend
    storage = make()
    events = _two_tasks_events(storage)
    until = T0 + timedelta(seconds=30)
    claimed = storage.claim_events(now=T0, limit=2, claimed_until=until)
    e1, e2 = claimed
    due = T0 + timedelta(seconds=10)
    failures = [
        EventRetry(event=e1, subscriber="hook", tries=1, retry_at=due, last_error="500"),
        EventRetry(event=e2, subscriber="hook", tries=1, retry_at=due, last_error="500"),
        EventRetry(event=e2, subscriber="web", tries=1, retry_at=due + timedelta(1)),
    ]
    storage.settle_events(claimed, now=T0, failures=failures)
    assert events[2] == storage.claim_events(now=T0, limit=1, claimed_until=until)[0]
    assert [] == storage.claim_event_retries(now=T0, limit=10, claimed_until=until)
    got = storage.claim_event_retries(now=due, limit=10, claimed_until=due + timedelta(5))
    assert [(e1.seq, "hook"), (e2.seq, "hook")] == [(r.event.seq, r.subscriber) for r in got]
    assert got[0].event == e1
    assert got[0].last_error == "500"
    assert got[0].tries == 1
    assert all(r.claimed_until == due + timedelta(5) for r in got)
    assert [] == storage.claim_event_retries(now=due, limit=10, claimed_until=due)  # claimed
    later = due + timedelta(minutes=1)
    storage.settle_event_retry(got[0], now=due, error="502", retry_at=later)
    storage.settle_event_retry(got[1], now=due, error="gave up")  # parked
    parked = storage.parked_events()
    assert [(e2.seq, "hook", 2, "gave up", True)] == [
        (r.event.seq, r.subscriber, r.tries, r.last_error, r.parked) for r in parked
    ]
    assert [] == storage.parked_events(subscriber="web")
    assert [] == storage.claim_event_retries(now=due, limit=10, claimed_until=later)
    again = storage.claim_event_retries(now=later, limit=10, claimed_until=later)
    assert [(e1.seq, "hook", 2, "502")] == [
        (r.event.seq, r.subscriber, r.tries, r.last_error) for r in again
    ]
    storage.settle_event_retry(again[0], now=later)  # delivered: forgotten
    # Replays: of another subscriber, of an unknown or malformed id: nothing.
    assert 0 == storage.replay_parked(now=later, subscriber="web")
    assert 0 == storage.replay_parked(now=later, event_ids=["p:999", "nonsense", "p:x"])
    assert 1 == storage.replay_parked(now=later, subscriber="hook", event_ids=[e2.id])
    assert [] == storage.parked_events()
    next_day = due + timedelta(1)  # the web subscriber's delivery is due then
    back = storage.claim_event_retries(
        now=later, limit=10, claimed_until=next_day + timedelta(hours=1)
    )
    assert [(e2.seq, "hook", 0)] == [(r.event.seq, r.subscriber, r.tries) for r in back]
    [web] = storage.claim_event_retries(now=next_day, limit=10, claimed_until=next_day)
    assert (e2, "web", 1, None) == (web.event, web.subscriber, web.tries, web.last_error)


def test_prune_removes_delivered_events_only(backend: tuple[str, Make]) -> None:
    """Delivered before the cutoff and no failed delivery kept: removed, in batches;
    pending ones and those with a retry or parked delivery stay; numbering goes on."""
    _, make = backend
    storage = make()
    events = _two_tasks_events(storage)
    n = len(events)
    until = T0 + timedelta(seconds=30)
    claimed = storage.claim_events(now=T0, limit=n - 1, claimed_until=until)
    kept = claimed[-1]
    retry = EventRetry(event=kept, subscriber="hook", tries=1, retry_at=T0, parked=True)
    storage.settle_events(claimed, now=T0, failures=[retry])
    rule = PruneRule(now=until, delivered_before=T0, finished_before=None, batch=2)
    first = storage.prune(rule)
    assert 2 == first.events
    total = first.events
    while True:
        pruned = storage.prune(rule)
        total += pruned.events
        if pruned.events < rule.batch:
            break
    assert n - 2 == total  # all delivered but the one with a parked delivery
    left = _all_events(storage, "p")
    assert [kept.seq, events[-1].seq] == [e.seq for e in left]
    early = PruneRule(now=until, delivered_before=T0 - timedelta(1), finished_before=None)
    assert 0 == storage.prune(early).events
    storage.add_tasks([Task(id="c", project_id="p", created_at=T0, updated_at=T0)])
    assert n + 1 == _all_events(storage, "p")[-1].seq


def test_limits_and_lookups_are_checked(backend: tuple[str, Make]) -> None:
    _, make = backend
    storage = make()
    storage.create_project(Project(id="p", created_at=T0, updated_at=T0))
    for bad in (0, 1001, -1):
        with pytest.raises(InvalidInput):
            storage.events("p", limit=bad)
        with pytest.raises(InvalidInput):
            storage.claim_events(now=T0, limit=bad, claimed_until=T0)
        with pytest.raises(InvalidInput):
            storage.claim_event_retries(now=T0, limit=bad, claimed_until=T0)
        with pytest.raises(InvalidInput):
            storage.parked_events(limit=bad)
    with pytest.raises(InvalidInput):
        storage.events("p", after=-1)
    with pytest.raises(ProjectNotFound):
        storage.events("nope")
    assert [] == storage.events("p")


# -- hypothesis: any sequence of service calls --------------------------------------------

OPS = st.lists(
    st.tuples(
        st.sampled_from(["assign", "start", "fail", "succeed", "retry", "block", "lose", "skip"]),
        st.sampled_from(["a", "b", "c"]),
    ),
    max_size=25,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, budgets=st.lists(st.integers(0, 2), min_size=3, max_size=3))
def test_any_sequence_of_moves_stores_the_events_of_its_plans(
    ops: list[tuple[str, str]], budgets: list[int]
) -> None:
    """Whatever the services are asked (refusals included), the SQLite file holds the
    events of exactly the plans that committed, numbered 1..n."""
    folder = Path(tempfile.mkdtemp(prefix="dw-events-"))
    try:
        storage = RecordingSQLite(folder / "e.db", synchronous="NORMAL")
        clock = Clock()
        policy = RetryPolicy(lease=0)
        ex = ExecutorService(storage, clock=clock, policy=policy)
        retry = RetryService(storage, clock=clock, policy=policy)
        ex.create_project("p")
        tasks = [
            ex.add_task("p", tid, max_retries=n, blocked_by=["a"] if tid == "c" else [])
            for tid, n in zip("abc", budgets, strict=False)
        ]
        for op, tid in ops:
            token = storage.load("p", tid)[1].attempt
            try:
                if op == "assign":
                    ex.assign("p", tid)
                elif op == "start":
                    ex.start("p", tid, token)
                elif op == "fail":
                    ex.fail("p", tid, token, TaskError(type="E", message="m"))
                elif op == "succeed":
                    ex.succeed("p", tid, token)
                elif op == "retry":
                    retry.retry("p", tid, actor="me")
                elif op == "block":
                    ex.block("p", tid, message="stop")
                elif op == "lose":
                    ex.lose("p", tid)
                else:
                    ex.skip("p", tid)
            except DeepworkError:
                pass
        assert _expected(tasks, storage.plans) == _all_events(storage, "p")
        storage.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- the async storages ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "sqla-sqlite"])
def test_async_storages_have_the_event_log(kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "async.db"
        storage: Any = (
            AsyncSQLiteStorage(path, synchronous="NORMAL")
            if kind == "sqlite"
            else AsyncSQLAlchemyStorage.from_url(f"sqlite+aiosqlite:///{path}")
        )
        try:
            assert isinstance(storage, AsyncEventLog)
            await storage.create_project(Project(id="p", created_at=T0, updated_at=T0))
            task = Task(id="t", project_id="p", status=TaskStatus.BLOCKED, created_at=T0,
                        updated_at=T0)  # fmt: skip
            await storage.add_tasks([task])
            applied = await storage.retry_blocked(
                "p", "t", now=T0, claimed_until=T0 + timedelta(seconds=5), trace=TRACE
            )
            assert applied is not None
            assert applied.dispatches[0].trace == TRACE
            entry = applied.dispatches[0]
            await storage.mark_failed(entry, error="e", retry_at=T0, now=T0)
            events = await storage.events("p")
            assert [1, 2, 3, 4] == [e.seq for e in events]
            assert EventType.DISPATCH_FAILED is events[-1].type
            claimed = await storage.claim_events(now=T0, limit=10, claimed_until=T0)
            assert events == claimed
            retry = EventRetry(event=claimed[0], subscriber="s", tries=1, retry_at=T0)
            await storage.settle_events(claimed, now=T0, failures=[retry])
            [got] = await storage.claim_event_retries(now=T0, limit=5, claimed_until=T0)
            await storage.settle_event_retry(got, now=T0, error="no")
            assert 1 == len(await storage.parked_events(subscriber="s"))
            assert 1 == await storage.replay_parked(now=T0)
            assert DispatchState.PENDING is (await storage.dispatches("p", "t"))[-1].state
        finally:
            await storage.close()

    asyncio.run(main())


@pytest.mark.mysql
def test_mariadb_migrations_add_the_event_tables(mysql_url: str) -> None:
    """A database at migration 1 (with work in it) gets the event tables and
    ``event_seq`` 0 for its projects; numbering starts at 1."""
    name = new_database_name("evmig")
    url = create_database(mysql_url, name)
    engine = create_engine(url.render_as_string(hide_password=False))
    try:
        from deepwork_retry.storage._sql import common
        from deepwork_retry.storage._sql.engine import split_script

        first = common.migrations("mysql")[0]
        with engine.begin() as conn:
            for statement in split_script(first.text):
                conn.exec_driver_sql(statement)
            conn.exec_driver_sql(
                "CREATE TABLE schema_migrations (number INTEGER NOT NULL PRIMARY KEY, "
                "name VARCHAR(200) NOT NULL, applied_at BIGINT NOT NULL)"
            )
            conn.exec_driver_sql("INSERT INTO schema_migrations VALUES (1, 'initial', 0)")
            conn.exec_driver_sql(
                "INSERT INTO projects (id, status, name, created_at, updated_at, version) "
                "VALUES ('old', 'executing', '', 0, 0, 1)"
            )
        storage = SQLAlchemyStorage(engine)
        storage.add_tasks([Task(id="t", project_id="old", created_at=T0, updated_at=T0)])
        assert [1] == [e.seq for e in storage.events("old")]
        storage.close()
    finally:
        engine.dispose()
        drop_database(mysql_url, make_url(url).database or name)


def test_sqlite_migration_adds_the_event_tables_to_a_file_in_use(tmp_path: Path) -> None:
    """A file at migration 0003 with a project in it is migrated when opened: its
    projects number their events from 1, its outbox entries have no trace."""
    import sqlite3

    from deepwork_retry.storage.sqlite import APPLICATION_ID, migrations

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for number, _name, text in migrations()[:3]:
        conn.executescript(text)
        conn.execute(f"PRAGMA user_version = {number}")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute(
        "INSERT INTO projects (id, status, name, created_at, updated_at, version) "
        "VALUES ('old', 'executing', '', 0, 0, 1)"
    )
    conn.execute(
        "INSERT INTO outbox (project_id, task_id, attempt, state, available_at, created_at, "
        "tries) VALUES ('old', 'gone', 1, 'delivered', 0, 0, 1)"
    )
    conn.commit()
    conn.close()
    storage = SQLiteStorage(path, synchronous="NORMAL")
    try:
        storage.add_tasks([Task(id="t", project_id="old", created_at=T0, updated_at=T0)])
        assert [1] == [e.seq for e in storage.events("old")]
        claimed = storage.claim_due(now=T0, limit=10, claimed_until=T0)
        assert [] == claimed  # delivered, and readable with the new column
        assert [None] == [
            row[0] for row in sqlite3.connect(path).execute("SELECT trace FROM outbox")
        ]
    finally:
        storage.close()
