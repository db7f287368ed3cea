"""Lifecycle events in DjangoStorage, on Django's SQLite and PostgreSQL backends.

The events a move stores are the core's (``events_of`` of each applied plan,
``added`` of each task added, ``dispatch_failed`` of each released delivery),
numbered per project 1, 2, 3 … without gaps in commit order, and written with
the move or not at all; the event log's claims keep each task's events in
order, failed deliveries are retried, parked and replayed, and a prune removes
exactly what the retention rule allows.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone

import attrs
import pytest
from django.db import connections, transaction
from django_support import empty
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test
from pg_support import finished_tasks

from deepwork_retry import ExecutorService, OutboxRelay, RetryService, TaskError
from deepwork_retry._core import decide
from deepwork_retry._core import events as ev
from deepwork_retry._core.events import Event, EventRetry, EventType
from deepwork_retry._core.model import DispatchEntry, Task
from deepwork_retry._core.plans import Applied, Plan
from deepwork_retry._core.retention import Pruned, PruneRule
from deepwork_retry._core.states import DispatchState
from deepwork_retry.exceptions import InvalidInput, ProjectNotFound, VersionConflict
from deepwork_retry.ports import EventLog, Storage
from deepwork_retry.testing import FakeClock, RecordingDispatcher, storage_machine
from deepwork_retry.web.django import models as m
from deepwork_retry.web.django.storage import DjangoStorage

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
MACHINE_SETTINGS = settings(
    max_examples=6,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def in_thread(alias: str, body: Callable[[], None]) -> threading.Thread:
    """A real thread running ``body`` on its own Django connection (closed after)."""

    def run() -> None:
        try:
            body()
        finally:
            connections[alias].close()

    return threading.Thread(target=run)


def blocked_task(storage: DjangoStorage, pid: str = "p", tid: str = "t") -> ExecutorService:
    executor = ExecutorService(storage, clock=FakeClock(T0))
    executor.create_project(pid)
    executor.add_task(pid, tid, max_retries=0)
    executor.assign(pid, tid)
    executor.start(pid, tid, token=1)
    executor.fail(pid, tid, 1, TaskError(type="Timeout", message="upstream timed out"))
    return executor


def all_events(storage: DjangoStorage, pid: str) -> list[Event]:
    found: list[Event] = []
    while True:
        page = storage.events(pid, after=found[-1].seq if found else 0, limit=1000)
        if not page:
            return found
        found.extend(page)


# -- what is stored is the core's ----------------------------------------------------


class Expecting(DjangoStorage):
    """A DjangoStorage that also keeps, per project, the core's events of each call that
    succeeded (what the storage must have stored, in that order)."""

    def __init__(self, using: str) -> None:
        super().__init__(using)
        self.expected: dict[str, list[Event]] = {}

    def _expect(self, events: Sequence[Event]) -> None:
        for event in events:
            self.expected.setdefault(event.project_id, []).append(event)

    def add_tasks(self, tasks: Sequence[Task]) -> None:
        super().add_tasks(tasks)
        self._expect([ev.added(t) for t in tasks])

    def apply(self, plan: Plan) -> Applied:
        applied = super().apply(plan)
        self._expect(ev.events_of(plan))
        return applied

    def mark_failed(
        self,
        entry: DispatchEntry,
        *,
        error: str,
        retry_at: datetime,
        now: datetime | None = None,
    ) -> None:
        stored = [
            e
            for e in m.OutboxEntry.objects.using(self.using).filter(
                project_id=entry.project_id, task_id=entry.task_id, attempt=entry.attempt
            )
            if e.state == DispatchState.PENDING.value
        ]
        # The relay passes no ``now`` (the storage then reads the wall clock): read it here.
        now = datetime.now(timezone.utc) if now is None else now
        super().mark_failed(entry, error=error, retry_at=retry_at, now=now)
        if stored:
            self._expect(
                [
                    ev.dispatch_failed(
                        attrs.evolve(entry, tries=stored[0].tries),
                        error=error,
                        retry_at=retry_at,
                        now=now,
                    )
                ]
            )


def check_expected(storage: Storage) -> None:
    assert isinstance(storage, Expecting)
    stored_projects = set(
        m.Project.objects.using(storage.using).values_list("id", flat=True)
    ) | set(m.Event.objects.using(storage.using).values_list("project_id", flat=True))
    assert set(storage.expected) <= stored_projects
    for pid in stored_projects:
        stored = all_events(storage, pid)
        assert stored == list(ev.numbered(tuple(storage.expected.get(pid, ())), 0))
        assert [e.seq for e in stored] == list(range(1, len(stored) + 1))
        last = m.Project.objects.using(storage.using).get(id=pid).event_seq
        assert last == len(stored)


def test_events_of_every_move_are_the_cores(alias: str) -> None:
    """Over random service runs (the kit's state machine), the stored events of each
    project are exactly the core's events of the calls that succeeded, numbered 1..n."""

    def make() -> Storage:
        empty(alias)
        return Expecting(alias)

    run_state_machine_as_test(
        storage_machine(make, teardown=check_expected), settings=MACHINE_SETTINGS
    )


def test_the_storage_is_an_event_log(storage: DjangoStorage) -> None:
    assert isinstance(storage, EventLog)


def test_a_blocked_task_and_its_manual_retry(storage: DjangoStorage) -> None:
    """The events of adding, assigning, starting, failing for good and retrying by hand."""
    blocked_task(storage)
    RetryService(storage, clock=FakeClock(T0)).retry("p", "t", actor="ann", reason="fixed")
    kinds = [(e.seq, e.type, e.data.get("to")) for e in storage.events("p")]
    assert kinds == [
        (1, EventType.PROJECT_PROGRESS, "inbox"),
        (2, EventType.PROJECT_PROGRESS, "assigned"),
        (3, EventType.ATTEMPT_STARTED, None),
        (4, EventType.PROJECT_PROGRESS, "in_progress"),
        (5, EventType.ATTEMPT_FAILED, None),
        (6, EventType.TASK_BLOCKED, None),
        (7, EventType.PROJECT_PROGRESS, "blocked"),
        (8, EventType.TASK_RETRIED, None),
        (9, EventType.PROJECT_PROGRESS, "assigned"),
    ]
    blocked = storage.events("p", after=5, limit=1)[0]
    assert blocked.data["retries_exhausted"] is True
    assert blocked.data["error_message"] == "upstream timed out"
    retried = storage.events("p", after=7, limit=1)[0]
    assert (retried.data["actor"], retried.data["reason"]) == ("ann", "fixed")
    assert retried.id == "p:8"


def test_reading_events(storage: DjangoStorage) -> None:
    blocked_task(storage)
    assert [e.seq for e in storage.events("p", after=2, limit=3)] == [3, 4, 5]
    assert storage.events("p", after=99) == []
    with pytest.raises(ProjectNotFound):
        storage.events("nope")
    with pytest.raises(InvalidInput):
        storage.events("p", after=-1)
    with pytest.raises(InvalidInput):
        storage.events("p", limit=0)


# -- written with the move or not at all --------------------------------------------


def test_a_refused_plan_writes_no_event(storage: DjangoStorage) -> None:
    blocked_task(storage)
    project, task = storage.load("p", "t")
    plan = decide.manual_retry(task, project, now=T0, blockers={})
    storage.apply(plan)
    before = all_events(storage, "p")
    with pytest.raises(VersionConflict):
        storage.apply(plan)  # stale: the task moved on
    assert all_events(storage, "p") == before


def test_a_host_rollback_leaves_no_event(storage: DjangoStorage) -> None:
    blocked_task(storage)
    before = all_events(storage, "p")
    inside: list[int] = []

    def host() -> None:
        with transaction.atomic(using=storage.using):
            RetryService(storage, clock=FakeClock(T0)).retry("p", "t", actor="ann")
            inside.append(len(all_events(storage, "p")))
            raise RuntimeError("the host's own write failed")

    with pytest.raises(RuntimeError):
        host()
    assert inside == [len(before) + 2]  # seen inside the block
    assert all_events(storage, "p") == before
    assert m.Project.objects.using(storage.using).get(id="p").event_seq == len(before)
    # The numbers the rollback took are taken again: no gap.
    RetryService(storage, clock=FakeClock(T0)).retry("p", "t", actor="bob")
    assert [e.seq for e in all_events(storage, "p")] == list(range(1, len(before) + 3))


def test_a_refused_call_in_a_committing_host_block_leaves_no_event(
    storage: DjangoStorage,
) -> None:
    blocked_task(storage)
    project, task = storage.load("p", "t")
    plan = decide.manual_retry(task, project, now=T0, blockers={})
    storage.apply(plan)
    before = all_events(storage, "p")
    with transaction.atomic(using=storage.using), pytest.raises(VersionConflict):
        storage.apply(plan)
    assert all_events(storage, "p") == before


def test_mark_failed_writes_dispatch_failed(storage: DjangoStorage) -> None:
    """A refused delivery is released with its ``dispatch.failed`` event; an entry
    that is no longer pending is left alone, with no event."""
    clock = FakeClock(T0)
    executor = ExecutorService(storage, clock=clock)  # no dispatcher: the relay delivers
    executor.create_project("p")
    executor.add_task("p", "t")
    executor.assign("p", "t")
    entry = storage.dispatches("p", "t")[0]
    later = T0 + timedelta(minutes=1)
    before = len(all_events(storage, "p"))
    storage.mark_failed(entry, error="broker down", retry_at=later, now=T0)
    failed = all_events(storage, "p")[before:]
    assert failed == [
        attrs.evolve(
            ev.dispatch_failed(entry, error="broker down", retry_at=later, now=T0),
            seq=before + 1,
        )
    ]
    assert failed[0].data == {"error": "broker down", "tries": 1, "retry_at": later.isoformat()}
    assert storage.dispatches("p", "t")[0].tries == 1
    storage.mark_delivered([entry], now=T0)
    storage.mark_failed(entry, error="late", retry_at=later, now=T0)
    assert len(all_events(storage, "p")) == before + 1
    # Without ``now`` the wall clock dates the event.
    storage.mark_failed(
        attrs.evolve(entry, project_id="nope"), error="x", retry_at=later
    )  # unknown project: nothing, no error


def test_the_relay_releasing_a_refused_delivery(storage: DjangoStorage) -> None:
    """The relay's own mark_failed (no ``now``: the wall clock) writes the event too."""
    clock = FakeClock(T0)
    executor = ExecutorService(storage, clock=clock)
    executor.create_project("p")
    executor.add_task("p", "t")
    executor.assign("p", "t")
    relay = OutboxRelay(storage, RecordingDispatcher(failing=True), clock=clock)
    relay.run_once()
    last = all_events(storage, "p")[-1]
    assert (last.type, last.task_id, last.attempt) == (EventType.DISPATCH_FAILED, "t", 1)
    assert "refused" in last.data["error"]


def test_the_outbox_keeps_the_trace(storage: DjangoStorage) -> None:
    blocked_task(storage)
    project, task = storage.load("p", "t")
    plan = decide.manual_retry(task, project, now=T0, blockers={})
    assert plan.dispatch is not None
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01;congo=t61rcWkgMzE"
    storage.apply(attrs.evolve(plan, dispatch=attrs.evolve(plan.dispatch, trace=trace)))
    assert [e.trace for e in storage.dispatches("p", "t")] == [None, trace]
    claimed = storage.claim_due(now=T0, limit=10, claimed_until=T0)
    assert {e.attempt: e.trace for e in claimed} == {1: None, 2: trace}


# -- numbering under concurrency ------------------------------------------------------


def test_concurrent_writers_number_without_gaps_in_commit_order(storage: DjangoStorage) -> None:
    """Threads moving tasks of one project at once: the events are numbered 1..n, each
    task's in the order of its moves, and a reader following the log while they write
    never sees a number before an earlier one has committed (no gap ever shows)."""
    alias = storage.using
    executor = ExecutorService(storage)
    executor.create_project("p")
    workers, moves = 4, 6
    for n in range(workers):
        for k in range(moves):
            executor.add_task("p", f"t{n}-{k}")
    added = len(all_events(storage, "p"))
    errors: list[BaseException] = []
    done = threading.Event()
    seen: list[int] = []

    def work(n: int) -> None:
        mine = ExecutorService(DjangoStorage(alias))
        try:
            for k in range(moves):
                tid = f"t{n}-{k}"
                mine.assign("p", tid)
                mine.start("p", tid, token=1)
                mine.succeed("p", tid, 1)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    def follow() -> None:
        reader = DjangoStorage(alias)
        cursor = added
        try:
            while True:
                finished = done.is_set()
                page = reader.events("p", after=cursor, limit=1000)
                assert [e.seq for e in page] == list(range(cursor + 1, cursor + 1 + len(page)))
                seen.extend(e.seq for e in page)
                cursor += len(page)
                if finished and not page:
                    return
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [in_thread(alias, lambda n=n: work(n)) for n in range(workers)]
    reader = in_thread(alias, follow)
    reader.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    done.set()
    reader.join(300)
    assert not errors, errors
    stored = all_events(storage, "p")
    assert [e.seq for e in stored] == list(range(1, len(stored) + 1))
    assert seen == list(range(added + 1, len(stored) + 1))
    # Each task: assigned, started, in progress, succeeded, done, in this order.
    for n in range(workers):
        for k in range(moves):
            mine = [(e.type, e.data.get("to")) for e in stored if e.task_id == f"t{n}-{k}"]
            assert mine == [
                (EventType.PROJECT_PROGRESS, "inbox"),
                (EventType.PROJECT_PROGRESS, "assigned"),
                (EventType.ATTEMPT_STARTED, None),
                (EventType.PROJECT_PROGRESS, "in_progress"),
                (EventType.ATTEMPT_SUCCEEDED, None),
                (EventType.PROJECT_PROGRESS, "done"),
            ]
    assert len(stored) == workers * moves * 6


# -- claims ----------------------------------------------------------------------------


def three_tasks(storage: DjangoStorage) -> None:
    executor = ExecutorService(storage, clock=FakeClock(T0))
    executor.create_project("p")
    for tid in ("a", "b", "c"):
        executor.add_task("p", tid)
    executor.assign("p", "a")
    executor.assign("p", "b")
    executor.start("p", "a", token=1)


def test_claims_keep_each_tasks_events_in_order(storage: DjangoStorage) -> None:
    three_tasks(storage)
    # p:1 a added, p:2 b added, p:3 c added, p:4 a assigned, p:5 b assigned,
    # p:6 a started, p:7 a in progress
    until = T0 + timedelta(minutes=5)
    first = storage.claim_events(now=T0, limit=1, claimed_until=until)
    assert [e.seq for e in first] == [1]
    # a's later events wait for p:1, which another caller holds.
    second = storage.claim_events(now=T0, limit=10, claimed_until=until)
    assert [e.seq for e in second] == [2, 3, 5]
    assert storage.claim_events(now=T0, limit=10, claimed_until=until) == []
    storage.settle_events(first, now=T0)
    assert [e.seq for e in storage.claim_events(now=T0, limit=10, claimed_until=until)] == [
        4,
        6,
        7,
    ]
    # An expired claim is claimed again (at least once), earliest first.
    expired = storage.claim_events(now=until, limit=10, claimed_until=until + timedelta(1))
    assert [e.seq for e in expired] == [2, 3, 4, 5, 6, 7]
    storage.settle_events(expired, now=until)
    assert storage.claim_events(now=until, limit=10, claimed_until=until) == []
    assert all(e.delivered_at is not None for e in m.Event.objects.using(storage.using).all())


def test_claims_across_projects_go_in_project_then_seq_order(storage: DjangoStorage) -> None:
    executor = ExecutorService(storage, clock=FakeClock(T0))
    for pid in ("q", "p"):
        executor.create_project(pid)
        executor.add_task(pid, "t")
    claimed = storage.claim_events(now=T0, limit=10, claimed_until=T0 + timedelta(1))
    assert [e.id for e in claimed] == ["p:1", "q:1"]


def test_concurrent_claims_never_share_an_event_and_keep_task_order(
    storage: DjangoStorage,
) -> None:
    """Real threads claiming and settling at once: every event is delivered once, and
    an event is claimed only after every earlier event of its task was settled (or in
    the same claim, before it)."""
    alias = storage.using
    executor = ExecutorService(storage, clock=FakeClock(T0))
    executor.create_project("p")
    for k in range(6):
        tid = f"t{k}"
        executor.add_task("p", tid)
        executor.assign("p", tid)
        executor.start("p", tid, token=1)
        executor.succeed("p", tid, 1)
    stored = all_events(storage, "p")
    lock = threading.Lock()
    settled: set[int] = set()
    claimed: list[int] = []
    errors: list[BaseException] = []
    until = T0 + timedelta(days=1)

    def relay() -> None:
        mine = DjangoStorage(alias)
        try:
            while True:
                batch = mine.claim_events(now=T0, limit=2, claimed_until=until)
                with lock:
                    if not batch and len(settled) == len(stored):
                        return
                    for n, event in enumerate(batch):
                        earlier = {e.seq for e in batch[:n] if e.task_id == event.task_id}
                        for other in stored:
                            if other.task_id == event.task_id and other.seq < event.seq:
                                assert other.seq in settled | earlier, (event, other)
                    claimed.extend(e.seq for e in batch)
                    settled.update(e.seq for e in batch)  # before the database: a superset
                mine.settle_events(batch, now=T0)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [in_thread(alias, relay) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    assert sorted(claimed) == [e.seq for e in stored]


# -- failed deliveries ---------------------------------------------------------------------


def test_failed_deliveries_are_retried_parked_and_replayed(storage: DjangoStorage) -> None:
    three_tasks(storage)
    events = storage.claim_events(now=T0, limit=2, claimed_until=T0 + timedelta(1))
    soon = T0 + timedelta(seconds=30)
    failures = [
        EventRetry(event=events[0], subscriber="hook", tries=1, retry_at=soon, last_error="500"),
        EventRetry(event=events[1], subscriber="hook", tries=1, retry_at=T0, last_error="503"),
        EventRetry(event=events[1], subscriber="web", tries=1, retry_at=soon, last_error="x"),
    ]
    storage.settle_events(events, now=T0, failures=failures)
    # Settled: the events are delivered; their failed deliveries kept.
    assert storage.claim_events(now=T0, limit=2, claimed_until=T0)[0].seq == 3
    due = storage.claim_event_retries(now=T0, limit=10, claimed_until=T0 + timedelta(1))
    assert [(r.event.id, r.subscriber, r.tries, r.last_error) for r in due] == [
        ("p:2", "hook", 1, "503")
    ]
    assert due[0].event == events[1]
    # Claimed: not handed out again until the claim expires.
    assert storage.claim_event_retries(now=T0, limit=10, claimed_until=soon) == []
    later = storage.claim_event_retries(now=soon, limit=10, claimed_until=soon)
    assert [(r.event.id, r.subscriber) for r in later] == [("p:1", "hook"), ("p:2", "web")]
    hook1, web2 = later
    storage.settle_event_retry(hook1, now=soon, error="500 again", retry_at=soon)
    storage.settle_event_retry(web2, now=soon)  # delivered: forgotten
    storage.settle_event_retry(due[0], now=soon, error="gone")  # no retry_at: parked
    again = storage.claim_event_retries(now=soon, limit=10, claimed_until=soon + timedelta(1))
    assert [(r.event.id, r.tries, r.last_error) for r in again] == [("p:1", 2, "500 again")]
    parked = storage.parked_events()
    assert [(r.event.id, r.subscriber, r.tries, r.parked) for r in parked] == [
        ("p:2", "hook", 2, True)
    ]
    assert storage.parked_events(subscriber="web") == []
    assert storage.replay_parked(now=soon, subscriber="web") == 0
    assert storage.replay_parked(now=soon, event_ids=["p:1", "p:x", "bad"]) == 0
    assert storage.replay_parked(now=soon, event_ids=["p:2"]) == 1
    assert storage.parked_events() == []
    replayed = storage.claim_event_retries(
        now=soon, limit=10, claimed_until=soon + timedelta(seconds=1)
    )
    assert [(r.event.id, r.subscriber, r.tries, r.parked) for r in replayed] == [
        ("p:2", "hook", 0, False)
    ]


def test_replay_parked_by_subscriber(storage: DjangoStorage) -> None:
    three_tasks(storage)
    events = storage.claim_events(now=T0, limit=3, claimed_until=T0)
    failures = [
        EventRetry(event=e, subscriber=s, tries=5, retry_at=T0, parked=True, last_error="no")
        for e in events
        for s in ("hook", "web")
    ]
    storage.settle_events(events, now=T0, failures=failures)
    assert [(r.event.seq, r.subscriber) for r in storage.parked_events(limit=3)] == [
        (1, "hook"),
        (1, "web"),
        (2, "hook"),
    ]
    assert storage.claim_event_retries(now=T0, limit=10, claimed_until=T0) == []
    assert storage.replay_parked(now=T0, subscriber="web") == 3
    assert {r.subscriber for r in storage.parked_events()} == {"hook"}
    assert storage.replay_parked(now=T0) == 3
    assert storage.parked_events() == []


# -- retention ----------------------------------------------------------------------------


@st.composite
def event_states(draw: st.DrawFn) -> list[tuple[int | None, int]]:
    """Per event: delivered how many days after T0 (``None``: pending), failed deliveries."""
    return draw(
        st.lists(
            st.tuples(st.none() | st.integers(0, 10), st.integers(0, 2)),
            min_size=1,
            max_size=12,
        )
    )


@given(states=event_states(), cutoff=st.integers(0, 10), batch=st.integers(1, 5))
@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_prune_removes_exactly_what_the_rule_allows(
    storage: DjangoStorage, states: list[tuple[int | None, int]], cutoff: int, batch: int
) -> None:
    empty(storage.using)
    executor = ExecutorService(storage, clock=FakeClock(T0))
    executor.create_project("p")
    for n in range(len(states)):
        executor.add_task("p", f"t{n:02}")
    events = all_events(storage, "p")
    for event, (days, retries) in zip(events, states, strict=True):
        if days is None:
            continue
        delivered = T0 + timedelta(days=days)
        failures = [
            EventRetry(event=event, subscriber=f"s{k}", tries=1, retry_at=delivered)
            for k in range(retries)
        ]
        storage.settle_events([event], now=delivered, failures=failures)
    rule = PruneRule(
        now=T0 + timedelta(days=20),
        delivered_before=T0 + timedelta(days=cutoff),
        finished_before=None,
        batch=batch,
    )
    allowed = [
        e.seq
        for e, (days, retries) in zip(events, states, strict=True)
        if rule.removes_event(None if days is None else T0 + timedelta(days=days), retries=retries)
    ]
    pruned = storage.prune(rule)
    assert pruned.events == min(batch, len(allowed))
    left = {e.seq for e in all_events(storage, "p")}
    removed = {e.seq for e in events} - left
    assert removed <= set(allowed)
    # Oldest delivered first.
    days_of = {e.seq: d for e, (d, _) in zip(events, states, strict=True)}
    if removed and set(allowed) - removed:
        assert max(days_of[s] or 0 for s in removed) <= min(
            days_of[s] or 0 for s in set(allowed) - removed
        )
    while storage.prune(rule).events:
        pass
    assert {e.seq for e in events} - {e.seq for e in all_events(storage, "p")} == set(allowed)
    # A project numbers on where it was.
    executor.add_task("p", "new")
    assert all_events(storage, "p")[-1].seq == len(events) + 1


def test_pg_attempt_prune_reads_attempts_not_every_finished_task(django_pg: str) -> None:
    """A batch of attempt records reads the attempts past the cut-off; it does not read every
    finished task (never deleted, so they outnumber the history left to prune)."""
    empty(django_pg)
    storage = DjangoStorage(using=django_pg)
    finished_tasks(ExecutorService(storage, clock=FakeClock(T0)), "p", "old-0", "old-1", "seed")
    table = m.Task._meta.db_table
    columns = [f.column for f in m.Task._meta.concrete_fields if not f.primary_key]
    quoted = [f'"{c}"' for c in columns]
    copied = ["'many-' || g" if c == "task_id" else f'"{c}"' for c in columns]
    rule = PruneRule(
        now=T0 + timedelta(days=3),
        delivered_before=None,
        finished_before=T0 + timedelta(days=1),
        batch=500,
    )
    with transaction.atomic(using=django_pg), connections[django_pg].cursor() as cursor:
        # many finished tasks whose history is already gone, as after earlier prunes
        cursor.execute(
            f"INSERT INTO {table} ({', '.join(quoted)})"
            f" SELECT {', '.join(copied)} FROM {table}, generate_series(1, 5000) g"
            " WHERE task_id = 'seed'"
        )

        def task_rows_read() -> int:
            cursor.execute(
                "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)"
                " FROM pg_stat_xact_user_tables WHERE relname = %s",
                [table],
            )
            count: int = cursor.fetchone()[0]
            return count

        before = task_rows_read()
        pruned = storage.prune(rule)
        read = task_rows_read() - before
        transaction.set_rollback(True, using=django_pg)
    assert pruned.attempts == 3
    assert read <= 50, f"the batch read {read} task rows"


def test_prune_keeps_events_without_a_delivery_period(storage: DjangoStorage) -> None:
    three_tasks(storage)
    events = storage.claim_events(now=T0, limit=10, claimed_until=T0)
    storage.settle_events(events, now=T0)
    rule = PruneRule(now=T0 + timedelta(days=30), delivered_before=None, finished_before=None)
    assert storage.prune(rule) == Pruned(batches=1)
    assert len(all_events(storage, "p")) == len(events)
