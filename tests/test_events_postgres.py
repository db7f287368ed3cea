"""Lifecycle events in the PostgreSQL storages, on a real server.

Every move writes the core's events (``events_of``, ``manual_retry_events``,
``added``, ``dispatch_failed``) in its own statement, numbered per project in
commit order without gaps; these tests hold the storage to that with the
services driving it, with threads and processes writing at once, in a
host's transaction, and through the event log's claims, retries and prune.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import attrs
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pg_support import schema_dropped_after

from deepwork_retry import ExecutorService, RetryService
from deepwork_retry._core import decide
from deepwork_retry._core import events as ev
from deepwork_retry._core.events import Event, EventRetry, EventType
from deepwork_retry._core.model import DispatchEntry, Project, Task
from deepwork_retry._core.plans import Applied, Plan
from deepwork_retry._core.policy import RetryPolicy, TaskError
from deepwork_retry._core.retention import Retention
from deepwork_retry._core.states import DispatchState, ProjectStatus, RetryBudget, TaskStatus
from deepwork_retry.exceptions import DeepworkError, InvalidInput, ProjectNotFound
from deepwork_retry.ports import AsyncEventLog, EventLog
from deepwork_retry.storage.postgres import AsyncPostgresStorage, PostgresStorage

pytestmark = pytest.mark.postgres

T0 = datetime(2025, 6, 7, 8, 9, 10, 111_213, tzinfo=timezone.utc)
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01;vendor=x"
WORKER = Path(__file__).resolve().parent / "pg_events_worker.py"
_ids = itertools.count()


class StepClock:
    """A clock that moves a millisecond on every reading."""

    def __init__(self) -> None:
        self.t = T0
        self.lock = threading.Lock()

    def now(self) -> datetime:
        with self.lock:
            self.t += timedelta(milliseconds=1)
            return self.t


class Recording(PostgresStorage):
    """The PostgreSQL storage, keeping the events the core says each committed call makes."""

    expected: list[Event]

    def add_tasks(self, tasks: Sequence[Task]) -> None:
        super().add_tasks(tasks)
        self.expected.extend(ev.added(task) for task in tasks)

    def apply(self, plan: Plan) -> Applied:
        applied = super().apply(plan)
        self.expected.extend(ev.events_of(plan))
        return applied

    def retry_blocked(self, project_id: str, task_id: str, **kwargs: Any) -> Applied | None:
        applied = super().retry_blocked(project_id, task_id, **kwargs)
        if applied is not None:
            self.expected.extend(
                ev.manual_retry_events(
                    applied.task,
                    now=kwargs["now"],
                    actor=kwargs.get("actor"),
                    reason=kwargs.get("reason"),
                    budget=kwargs.get("budget", RetryBudget.ONE_MORE),
                    deferred=applied.deferred,
                )
            )
        return applied


@pytest.fixture(scope="module")
def schema(postgres_dsn: str) -> Iterator[str]:
    with schema_dropped_after(postgres_dsn, "ev") as name:
        PostgresStorage(postgres_dsn, schema=name, max_size=1).close()  # migrates
        yield name


@pytest.fixture(scope="module")
def pg(postgres_dsn: str, schema: str) -> Iterator[PostgresStorage]:
    storage = PostgresStorage(postgres_dsn, schema=schema, migrate=False, max_size=8)
    try:
        yield storage
    finally:
        storage.close()


@pytest.fixture(scope="module")
def recording(postgres_dsn: str, schema: str) -> Iterator[Recording]:
    storage = Recording(postgres_dsn, schema=schema, migrate=False, max_size=2)
    storage.expected = []
    try:
        yield storage
    finally:
        storage.close()


def new_pid(prefix: str = "p") -> str:
    return f"{prefix}{next(_ids)}"


def all_events(storage: PostgresStorage, pid: str) -> list[Event]:
    found: list[Event] = []
    while True:
        page = storage.events(pid, after=found[-1].seq if found else 0, limit=1000)
        if not page:
            return found
        found.extend(page)


def project_with(storage: PostgresStorage, pid: str, *tasks: Task) -> None:
    storage.create_project(Project(id=pid, created_at=T0, updated_at=T0))
    storage.add_tasks(list(tasks))


def blocked_task(pid: str, tid: str = "t", **changes: Any) -> Task:
    fields: dict[str, Any] = {
        "id": tid,
        "project_id": pid,
        "status": TaskStatus.BLOCKED,
        "max_retries": 2,
        "retries_left": 0,
        "retry_count": 2,
        "attempt": 0,
        "error_message": "boom",
        "error_type": "Boom",
        "created_at": T0,
        "updated_at": T0,
    }
    fields.update(changes)
    return Task(**fields)


def test_the_storages_are_event_logs(pg: PostgresStorage) -> None:
    assert isinstance(pg, EventLog)
    assert issubclass(AsyncPostgresStorage, AsyncEventLog)
    joined = PostgresStorage.joining
    assert joined is not None


# -- what a move writes: the core's events -------------------------------------------

moves = st.lists(
    st.tuples(
        st.sampled_from(
            ["assign", "start", "heartbeat", "succeed", "review", "approve", "fail",
             "fatal", "lose", "block", "skip", "retry", "retry_full", "pause", "resume"]
        ),
        st.integers(0, 2),
    ),
    min_size=1,
    max_size=25,
)  # fmt: skip


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=moves)
def test_every_committed_move_writes_the_core_events(
    recording: Recording, steps: list[tuple[str, int]]
) -> None:
    """Driven by the services through any sequence of moves (refusals included), the
    project's events are exactly the core's events of the calls that committed,
    numbered 1, 2, 3 ... in call order."""
    recording.expected = []
    clock = StepClock()
    policy = RetryPolicy()
    rng = random.Random(7)
    executor = ExecutorService(recording, clock=clock, policy=policy, rng=rng)
    retries = RetryService(recording, clock=clock, policy=policy, rng=rng)
    pid = new_pid("walk")
    executor.create_project(pid)
    for n in range(3):
        executor.add_task(pid, f"t{n}", max_retries=1, blocked_by=["t0"] if n == 2 else ())
    for move, n in steps:
        tid = f"t{n}"
        token = recording.load(pid, tid)[1].attempt
        try:
            if move == "assign":
                executor.assign(pid, tid)
            elif move == "start":
                executor.start(pid, tid, token)
            elif move == "heartbeat":
                executor.heartbeat(pid, tid, token)
            elif move in ("succeed", "review"):
                executor.succeed(pid, tid, token, review=move == "review")
            elif move == "approve":
                executor.approve(pid, tid)
            elif move == "fail":
                flaky = TaskError(type="Flaky", message="again", retryable=True)
                executor.fail(pid, tid, token, flaky)
            elif move == "fatal":
                fatal = TaskError(type="Bad", message="no", retryable=False)
                executor.fail(pid, tid, token, fatal)
            elif move == "lose":
                executor.lose(pid, tid)
            elif move == "block":
                executor.block(pid, tid, message="by hand")
            elif move == "skip":
                executor.skip(pid, tid)
            elif move.startswith("retry"):
                budget = RetryBudget.FULL if move == "retry_full" else RetryBudget.ONE_MORE
                retries.retry(pid, tid, actor="ana", reason="fixed", budget=budget)
            elif move == "pause":
                executor.set_project_status(pid, ProjectStatus.PAUSED)
            else:
                executor.set_project_status(pid, ProjectStatus.EXECUTING)
        except DeepworkError:
            pass
    expected = [e for e in recording.expected if e.project_id == pid]
    assert all_events(recording, pid) == list(ev.numbered(tuple(expected), 0))


# -- the one-step retry writes what the step-by-step retry writes --------------------------


def general_retry(storage: PostgresStorage, pid: str, now: datetime, **kwargs: Any) -> Applied:
    project, task = storage.load(pid, "t")
    plan = decide.manual_retry(
        task, project, now=now, blockers=storage.get_tasks(pid, task.blocked_by), **kwargs
    )
    if plan.dispatch is not None:
        plan = attrs.evolve(plan, dispatch=attrs.evolve(plan.dispatch, trace=TRACE))
    return storage.apply(plan)


def relabel(events: list[Event], pid: str) -> list[Event]:
    return [attrs.evolve(e, project_id=pid) for e in events]


@pytest.mark.parametrize("blocker", [None, TaskStatus.DONE, TaskStatus.INBOX], ids=str)
@pytest.mark.parametrize("budget", list(RetryBudget), ids=str)
@pytest.mark.parametrize("claimed", [False, True], ids=["unclaimed", "claimed"])
@pytest.mark.parametrize("keyed", [False, True], ids=["no-key", "key"])
def test_one_step_retry_writes_the_step_by_step_events(
    pg: PostgresStorage,
    blocker: TaskStatus | None,
    budget: RetryBudget,
    claimed: bool,
    keyed: bool,
) -> None:
    """retry_blocked (one statement) stores the events, and the outbox trace, that the
    core's plan applied step by step stores, ready or deferred, with any budget."""
    now = T0 + timedelta(hours=1)
    claim = now + timedelta(seconds=30) if claimed else None
    stored = []
    for one_step in (True, False):
        pid = new_pid("one" if one_step else "gen")
        blockers = [] if blocker is None else [Task(id="b", project_id=pid, status=blocker)]
        project_with(
            pg,
            pid,
            *blockers,
            blocked_task(pid, blocked_by=["b"] if blockers else [], retry_count=5),
        )
        options: dict[str, Any] = {
            "actor": "bé",
            "reason": "fixed the input",
            "budget": budget,
            "claimed_until": claim,
            "idempotency_key": f"{pid}-key" if keyed else None,
        }
        if one_step:
            applied = pg.retry_blocked(pid, "t", now=now, trace=TRACE, **options)
            assert applied is not None
        else:
            applied = general_retry(pg, pid, now, **options)
        assert applied.deferred is (blocker is TaskStatus.INBOX)
        assert pg.dispatches(pid, "t")[-1].trace == TRACE
        if applied.dispatches:
            assert applied.dispatches[0].trace == TRACE
        stored.append(relabel(all_events(pg, pid), "x"))
        expected = ev.manual_retry_events(
            applied.task, now=now, actor="bé", reason="fixed the input", budget=budget,
            deferred=applied.deferred,
        )  # fmt: skip
        added = len(blockers) + 1
        assert all_events(pg, pid)[added:] == list(ev.numbered(expected, added))
    assert stored[0] == stored[1]


def test_a_refused_one_step_retry_writes_no_event(pg: PostgresStorage) -> None:
    pid = new_pid()
    project_with(pg, pid, blocked_task(pid, status=TaskStatus.DONE))
    before = all_events(pg, pid)
    assert pg.retry_blocked(pid, "t", now=T0 + timedelta(hours=1)) is None
    assert all_events(pg, pid) == before
    with psycopg.connect(pg.pool.conninfo) as conn:
        row = conn.execute(
            psycopg.sql.SQL("SELECT event_seq FROM {}.projects WHERE id = %s").format(
                psycopg.sql.Identifier(pg.schema)
            ),
            (pid,),
        ).fetchone()
    assert row == (len(before),)


# -- add_tasks and mark_failed ------------------------------------------------------------


def test_add_tasks_numbers_each_project_on_its_own(pg: PostgresStorage) -> None:
    a, b = new_pid(), new_pid()
    for pid in (a, b):
        pg.create_project(Project(id=pid, created_at=T0, updated_at=T0))
    batch = [Task(id=f"t{n}", project_id=(a, b)[n % 2], created_at=T0) for n in range(5)]
    pg.add_tasks(batch)
    pg.add_tasks([Task(id="late", project_id=b, created_at=T0)])
    for pid in (a, b):
        mine = [t for t in batch if t.project_id == pid]
        if pid == b:
            mine.append(Task(id="late", project_id=b, created_at=T0))
        expected = ev.numbered(tuple(ev.added(t) for t in mine), 0)
        assert all_events(pg, pid) == list(expected)
    assert all_events(pg, a)[0].data == {"from": None, "to": "inbox"}


def test_mark_failed_writes_dispatch_failed(pg: PostgresStorage) -> None:
    pid = new_pid()
    project_with(pg, pid, blocked_task(pid))
    pg.retry_blocked(pid, "t", now=T0, trace=TRACE)
    (entry,) = pg.claim_due(now=T0, limit=10, claimed_until=T0 + timedelta(minutes=1))
    assert entry.trace == TRACE
    retry_at, now = T0 + timedelta(minutes=5), T0 + timedelta(seconds=2)
    pg.mark_failed(entry, error="queue down \ud800", retry_at=retry_at, now=now)
    last = all_events(pg, pid)[-1]
    expected = ev.dispatch_failed(entry, error="queue down \ufffd", retry_at=retry_at, now=now)
    assert last == attrs.evolve(expected, seq=last.seq)
    assert (last.type, last.data["tries"]) == (EventType.DISPATCH_FAILED, 1)
    (again,) = pg.dispatches(pid, "t")
    assert (again.tries, again.available_at, again.trace) == (1, retry_at, TRACE)
    gone = attrs.evolve(entry, task_id="nope")
    pg.mark_failed(gone, error="x", retry_at=retry_at, now=now)  # no entry: no event
    assert all_events(pg, pid)[-1] == last


def test_events_reads_check_their_arguments(pg: PostgresStorage) -> None:
    pid = new_pid()
    project_with(pg, pid, blocked_task(pid))
    with pytest.raises(ProjectNotFound):
        pg.events("no-such-project")
    with pytest.raises(InvalidInput):
        pg.events(pid, after=-1)
    with pytest.raises(InvalidInput):
        pg.events(pid, limit=0)
    assert pg.events(pid, after=1) == []
    assert [e.seq for e in pg.events(pid, after=0, limit=1)] == [1]


# -- concurrency: gapless, in commit order ----------------------------------------------


def test_concurrent_threads_number_events_gaplessly_in_commit_order(
    pg: PostgresStorage,
) -> None:
    """Eight threads move their own tasks of one project while a reader follows the
    events: the reader never sees a number before every smaller one (numbers commit
    in order), and in the end the numbers are 1..N with each task's moves in order."""
    pid, threads, rounds = new_pid("conc"), 8, 6
    clock = StepClock()
    executor = ExecutorService(pg, clock=clock)
    retries = RetryService(pg, clock=clock)
    executor.create_project(pid)
    for n in range(threads):
        executor.add_task(pid, f"t{n}")
        executor.assign(pid, f"t{n}")
    start_seq = len(all_events(pg, pid))
    done = threading.Event()
    errors: list[BaseException] = []
    seen: list[int] = []

    def mover(n: int) -> None:
        try:
            for _ in range(rounds):
                executor.block(pid, f"t{n}", message="stop")
                retries.retry(pid, f"t{n}", actor=f"w{n}")
        except DeepworkError as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader() -> None:
        last = start_seq
        while True:
            finished = done.is_set()
            page = pg.events(pid, after=last, limit=1000)
            for event in page:
                seen.append(event.seq)
                last = event.seq
            if finished and not page:
                return

    workers = [threading.Thread(target=mover, args=(n,)) for n in range(threads)]
    follower = threading.Thread(target=reader)
    follower.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    done.set()
    follower.join()
    assert errors == []
    final = all_events(pg, pid)
    moved = threads * rounds * 4  # block: blocked + progress; retry: retried + progress
    assert [e.seq for e in final] == list(range(1, start_seq + moved + 1))
    assert seen == list(range(start_seq + 1, start_seq + moved + 1))
    for n in range(threads):
        own = [e for e in final[start_seq:] if e.task_id == f"t{n}"]
        kinds = [EventType.TASK_BLOCKED, EventType.PROJECT_PROGRESS]
        kinds += [EventType.TASK_RETRIED, EventType.PROJECT_PROGRESS]
        assert [e.type for e in own] == kinds * rounds
        counts = [e.data["retry_count"] for e in own if e.type is EventType.TASK_RETRIED]
        assert counts == list(range(1, rounds + 1))


def test_two_processes_number_events_gaplessly(postgres_dsn: str, pg: PostgresStorage) -> None:
    """Two OS processes moving tasks of one project at once: numbers 1..N, no gap, no
    repeat, each task's events in the order of its moves."""
    pid, tasks, rounds = "p", 3, 5
    executor = ExecutorService(pg)
    with schema_dropped_after(postgres_dsn, "evp") as schema:
        storage = PostgresStorage(postgres_dsn, schema=schema, max_size=1)
        try:
            executor = ExecutorService(storage)
            executor.create_project(pid)
            for prefix in ("a", "b"):
                for n in range(tasks):
                    executor.add_task(pid, f"{prefix}{n}")
                    executor.assign(pid, f"{prefix}{n}")
            start_seq = len(all_events(storage, pid))
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
            procs = [
                subprocess.Popen(
                    [
                        sys.executable,
                        str(WORKER),
                        postgres_dsn,
                        schema,
                        prefix,
                        str(tasks),
                        str(rounds),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    env=env,
                )
                for prefix in ("a", "b")
            ]
            for proc in procs:
                assert proc.stdout is not None
                assert proc.stdout.readline().strip() == "ready"
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            outputs = [proc.communicate(timeout=300)[0] for proc in procs]
            assert [proc.returncode for proc in procs] == [0, 0]
            moves = sum(json.loads(out.strip().splitlines()[-1])["moves"] for out in outputs)
            assert moves == 2 * tasks * rounds * 2
            final = all_events(storage, pid)
            assert [e.seq for e in final] == list(range(1, start_seq + moves * 2 + 1))
            for prefix in ("a", "b"):
                for n in range(tasks):
                    own = [e for e in final[start_seq:] if e.task_id == f"{prefix}{n}"]
                    counts = [e.data["retry_count"] for e in own if e.data.get("actor")]
                    assert counts == list(range(1, rounds + 1))
        finally:
            storage.close()


# -- joined to a host's transaction -------------------------------------------------------


def test_host_rollback_leaves_no_event_and_commit_keeps_them(
    postgres_dsn: str, pg: PostgresStorage
) -> None:
    """Joined to the host's transaction, the events go with it: rolled back, none is left
    (and no number is used up); committed, they are there, numbered on."""
    pid = new_pid("host")
    project_with(pg, pid, blocked_task(pid))
    before = all_events(pg, pid)
    now = T0 + timedelta(hours=1)
    with psycopg.connect(postgres_dsn) as conn:
        joined = PostgresStorage.joining(conn, schema=pg.schema)
        conn.execute("SELECT 1")  # the host's transaction is open
        assert joined.retry_blocked(pid, "t", now=now, actor="host", trace=TRACE) is not None
        assert len(joined.events(pid)) > len(before)  # visible inside the transaction
        assert all_events(pg, pid) == before  # not outside it
        joined.rollback()
        assert all_events(pg, pid) == before
        conn.execute("SELECT 1")
        applied = joined.retry_blocked(pid, "t", now=now, actor="host", trace=TRACE)
        assert applied is not None
        joined.commit()
    after = all_events(pg, pid)
    expected = ev.manual_retry_events(
        applied.task, now=now, actor="host", reason=None, budget=RetryBudget.ONE_MORE,
        deferred=False,
    )  # fmt: skip
    assert after == before + list(ev.numbered(expected, len(before)))
    assert pg.dispatches(pid, "t")[-1].trace == TRACE


def test_joined_apply_and_add_tasks_roll_back_with_the_host(
    postgres_dsn: str, pg: PostgresStorage
) -> None:
    pid = new_pid("host")
    pg.create_project(Project(id=pid, created_at=T0, updated_at=T0))
    with psycopg.connect(postgres_dsn) as conn:
        joined = PostgresStorage.joining(conn, schema=pg.schema)
        with joined.transaction():
            ExecutorService(joined).add_task(pid, "t")
            ExecutorService(joined).block(pid, "t", message="m")
            assert len(joined.events(pid)) == 3
            raise psycopg.Rollback()  # the host rolls its transaction back
    assert all_events(pg, pid) == []
    ExecutorService(pg).add_task(pid, "t")
    assert [e.seq for e in all_events(pg, pid)] == [1]


# -- the event log: claims, settling, retries, parking, prune ---------------------------------


@pytest.fixture
def fresh(postgres_dsn: str) -> Iterator[PostgresStorage]:
    """A storage on a schema of its own: claims see every pending event of the schema."""
    with schema_dropped_after(postgres_dsn, "evl") as name:
        storage = PostgresStorage(postgres_dsn, schema=name, max_size=4)
        try:
            yield storage
        finally:
            storage.close()


def moved_tasks(storage: PostgresStorage, pid: str, tasks: int) -> list[Event]:
    ExecutorService(storage, clock=StepClock()).create_project(pid)
    service = ExecutorService(storage, clock=StepClock())
    for n in range(tasks):
        service.add_task(pid, f"t{n}")
    for n in range(tasks):
        service.assign(pid, f"t{n}")
    return all_events(storage, pid)


def test_claims_keep_each_task_in_order(fresh: PostgresStorage) -> None:
    """Claims come in (project_id, seq) order; a task's later event is not handed to a
    second caller while its earlier one is claimed by the first; an expired claim is
    taken again; a settled event is gone from the pending ones."""
    stored = moved_tasks(fresh, "a", 2) + moved_tasks(fresh, "b", 1)
    until = T0 + timedelta(minutes=1)
    first = fresh.claim_events(now=T0, limit=1, claimed_until=until)
    assert first == [attrs.evolve(stored[0])]
    # a's t0 has its "added" claimed; its "assigned" progress waits; a's t1 does not.
    second = fresh.claim_events(now=T0, limit=100, claimed_until=until)
    assert [(e.project_id, e.seq) for e in second] == sorted((e.project_id, e.seq) for e in second)
    assert all(e.task_id != "t0" or e.project_id == "b" for e in second)
    assert {(e.project_id, e.task_id) for e in second} == {("a", "t1"), ("b", "t0")}
    assert fresh.claim_events(now=T0, limit=100, claimed_until=until) == []
    # The first claim expires: t0's events come now, in order.
    later = until + timedelta(seconds=1)
    again = fresh.claim_events(now=later, limit=100, claimed_until=later + timedelta(minutes=1))
    assert [(e.project_id, e.seq) for e in again] == [
        (e.project_id, e.seq) for e in stored if e.project_id in ("a", "b")
    ]
    fresh.settle_events(again, now=later)
    assert fresh.claim_events(now=later + timedelta(hours=1), limit=100, claimed_until=later) == []


def test_concurrent_claimers_never_share_an_event(fresh: PostgresStorage) -> None:
    for n in range(4):
        moved_tasks(fresh, f"p{n}", 5)
    total = sum(len(all_events(fresh, f"p{n}")) for n in range(4))
    until = T0 + timedelta(hours=1)
    got: list[list[Event]] = [[] for _ in range(6)]

    def claimer(k: int) -> None:
        while True:
            batch = fresh.claim_events(now=T0, limit=3, claimed_until=until)
            if not batch:
                return
            got[k].extend(batch)
            fresh.settle_events(batch, now=T0)

    threads = [threading.Thread(target=claimer, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [e.id for batch in got for e in batch]
    assert len(ids) == len(set(ids)) == total


def test_failed_deliveries_retry_then_park_then_replay(fresh: PostgresStorage) -> None:
    stored = moved_tasks(fresh, "a", 2)
    now = T0 + timedelta(minutes=1)
    claimed = fresh.claim_events(now=now, limit=100, claimed_until=now + timedelta(minutes=1))
    failures = [
        EventRetry(event=claimed[0], subscriber="hook", tries=1, retry_at=now, last_error="e1"),
        EventRetry(event=claimed[1], subscriber="web", tries=1, retry_at=now + timedelta(hours=1)),
    ]
    fresh.settle_events(claimed, now=now, failures=failures)
    assert fresh.claim_events(now=now, limit=100, claimed_until=now) == []
    due = fresh.claim_event_retries(now=now, limit=10, claimed_until=now + timedelta(minutes=1))
    assert [(r.event, r.subscriber, r.tries, r.last_error) for r in due] == [
        (stored[0], "hook", 1, "e1")
    ]
    assert fresh.claim_event_retries(now=now, limit=10, claimed_until=now) == []  # claimed
    fresh.settle_event_retry(due[0], now=now, error="e2", retry_at=now + timedelta(seconds=5))
    soon = now + timedelta(seconds=5)
    (again,) = fresh.claim_event_retries(now=soon, limit=10, claimed_until=soon)
    assert (again.tries, again.last_error, again.retry_at) == (2, "e2", soon)
    fresh.settle_event_retry(again, now=soon, error="e3")  # no retry_at: parked
    parked = fresh.parked_events()
    assert [(r.event.id, r.subscriber, r.tries, r.parked) for r in parked] == [
        (stored[0].id, "hook", 3, True)
    ]
    assert fresh.parked_events(subscriber="web") == []
    assert (
        fresh.claim_event_retries(now=soon + timedelta(days=1), limit=10, claimed_until=soon)[
            0
        ].subscriber
        == "web"
    )  # the parked one is not due
    assert fresh.replay_parked(now=soon, subscriber="web") == 0
    assert (
        fresh.replay_parked(now=soon, event_ids=["a:999", "nonsense", "a:\u00b2", "a:\u0661"]) == 0
    )
    assert fresh.replay_parked(now=soon, event_ids=[stored[0].id]) == 1
    (back,) = fresh.claim_event_retries(now=soon, limit=10, claimed_until=soon)
    assert (back.subscriber, back.tries, back.parked) == ("hook", 0, False)
    fresh.settle_event_retry(back, now=soon)  # delivered: forgotten
    assert fresh.parked_events() == []
    assert fresh.claim_event_retries(now=soon, limit=10, claimed_until=soon) == []


def test_prune_removes_delivered_events_only(fresh: PostgresStorage) -> None:
    """Delivered events older than the period go, batch by batch; pending ones and those
    with a failed delivery kept stay; the project numbers on after a prune."""
    stored = moved_tasks(fresh, "a", 3)  # 6 events
    at = T0 + timedelta(days=1)
    claimed = fresh.claim_events(now=at, limit=4, claimed_until=at + timedelta(minutes=1))
    kept = EventRetry(event=claimed[0], subscriber="hook", tries=1, retry_at=at, parked=True)
    fresh.settle_events(claimed, now=at, failures=[kept])
    rule = Retention(delivered_outbox=timedelta(days=7)).rule(at + timedelta(days=7), batch=2)
    assert fresh.prune(Retention().rule(at + timedelta(days=6))).events == 0  # not old enough
    first = fresh.prune(rule)
    assert first.events == 2
    assert fresh.prune(rule).events == 1
    assert fresh.prune(rule).events == 0
    left = all_events(fresh, "a")
    assert [e.seq for e in left] == [claimed[0].seq, 5, 6]
    assert left == [stored[0], stored[4], stored[5]]
    ExecutorService(fresh, clock=StepClock()).add_task("a", "new")
    assert all_events(fresh, "a")[-1].seq == 7


# -- the async storage and SQLAlchemy on PostgreSQL -------------------------------------------


def test_async_storage_writes_and_serves_events(postgres_dsn: str, schema: str) -> None:
    pid = new_pid("async")

    async def main() -> tuple[list[Event], Applied | None, list[Event]]:
        async with AsyncPostgresStorage(postgres_dsn, schema=schema, migrate=False) as storage:
            await storage.create_project(Project(id=pid, created_at=T0, updated_at=T0))
            await storage.add_tasks([blocked_task(pid)])
            applied = await storage.retry_blocked(pid, "t", now=T0, actor="a", trace=TRACE)
            found = await storage.events(pid)
            claimed = await storage.claim_events(
                now=T0, limit=100, claimed_until=T0 + timedelta(minutes=1)
            )
            await storage.settle_events(claimed, now=T0)
            return found, applied, claimed

    found, applied, claimed = asyncio.run(main())
    assert applied is not None
    retried = ev.manual_retry_events(
        applied.task, now=T0, actor="a", reason=None, budget=RetryBudget.ONE_MORE, deferred=False
    )
    expected = (ev.added(blocked_task(pid)), *retried)
    assert found == list(ev.numbered(expected, 0))
    assert [e.id for e in claimed if e.project_id == pid] == [e.id for e in found]


def test_sqlalchemy_on_postgres_writes_the_events(postgres_dsn: str, pg: PostgresStorage) -> None:
    """The SQLAlchemy storage on PostgreSQL runs the joined PostgreSQL storage's
    statements: its moves write the same events, and roll back with the host."""
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from deepwork_retry.storage.sqlalchemy import SQLAlchemyStorage

    engine = sqlalchemy.create_engine(
        postgres_dsn.replace("postgresql://", "postgresql+psycopg://", 1)
    )
    try:
        storage = SQLAlchemyStorage(engine, schema=pg.schema, migrate=False)
        pid = new_pid("sqla")
        storage.create_project(Project(id=pid, created_at=T0, updated_at=T0))
        storage.add_tasks([blocked_task(pid)])
        applied = storage.retry_blocked(pid, "t", now=T0, actor="s")
        assert applied is not None
        retried = ev.manual_retry_events(
            applied.task, now=T0, actor="s", reason=None, budget=RetryBudget.ONE_MORE,
            deferred=False,
        )  # fmt: skip
        expected = (ev.added(blocked_task(pid)), *retried)
        assert all_events(pg, pid) == list(ev.numbered(expected, 0))
        with engine.connect() as conn, conn.begin() as tx:
            joined = SQLAlchemyStorage(conn, schema=pg.schema, migrate=False)
            ExecutorService(joined).block(pid, "t", message="m")
            tx.rollback()
        assert len(all_events(pg, pid)) == len(expected)
    finally:
        engine.dispose()


def test_released_entries_keep_their_trace(pg: PostgresStorage) -> None:
    """A deferred entry released by its blocker's success keeps the trace it was made with."""
    pid = new_pid("rel")
    project_with(
        pg,
        pid,
        Task(id="b", project_id=pid, created_at=T0),
        blocked_task(pid, blocked_by=["b"]),
    )
    applied = pg.retry_blocked(pid, "t", now=T0, trace=TRACE)
    assert applied is not None
    assert applied.deferred
    executor = ExecutorService(pg, clock=StepClock())
    executor.assign(pid, "b")
    token = pg.load(pid, "b")[1].attempt
    executor.start(pid, "b", token)
    executor.succeed(pid, "b", token)
    entry: DispatchEntry = pg.dispatches(pid, "t")[-1]
    assert (entry.state, entry.trace) == (DispatchState.PENDING, TRACE)


def test_sqlalchemy_postgres_ops_serve_the_event_log(
    postgres_dsn: str, pg: PostgresStorage
) -> None:
    """The SQL engine's entry points on PostgreSQL (PostgresOps) reach the joined
    PostgreSQL storage's event log on SQLAlchemy's connection."""
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from deepwork_retry.storage._sqlalchemy_pg import PostgresExecutor, PostgresOps

    pid = new_pid("ops")
    project_with(pg, pid, blocked_task(pid))
    ops = PostgresOps(pg.schema)
    engine = sqlalchemy.create_engine(
        postgres_dsn.replace("postgresql://", "postgresql+psycopg://", 1)
    )
    try:
        with engine.connect() as conn:
            ex = PostgresExecutor(conn, ops)
            assert ops.events(ex, pid) == all_events(pg, pid)
            for name in ("claim_events", "settle_events", "claim_event_retries",
                         "settle_event_retry", "parked_events", "replay_parked"):  # fmt: skip
                assert callable(getattr(ops, name))
            assert ops.parked_events(ex, subscriber="nobody") == []
            conn.rollback()
    finally:
        engine.dispose()


def test_settling_twice_or_an_unknown_event_changes_nothing(fresh: PostgresStorage) -> None:
    """An event settled again keeps its first delivery time; a failure of an event that
    does not exist (pruned, say) is dropped, not an error."""
    stored = moved_tasks(fresh, "a", 1)
    first, later = T0 + timedelta(days=1), T0 + timedelta(days=30)
    fresh.settle_events(stored, now=first)
    ghost = attrs.evolve(stored[0], seq=999)
    failure = EventRetry(event=ghost, subscriber="hook", tries=1, retry_at=later)
    fresh.settle_events(stored, now=later, failures=[failure])
    rule = Retention(delivered_outbox=timedelta(days=7)).rule(first + timedelta(days=8))
    assert fresh.prune(rule).events == len(stored)  # delivered at `first`, not `later`
    assert fresh.claim_event_retries(now=later, limit=10, claimed_until=later) == []
