"""Hooks on the lifecycle events: the registry, and the event relay on a real storage.

Every event reaches every listener that hears it at least once; a listener
that never fails sees each task's events in order; a listener that raises is
retried with backoff, then parked, and never stops another listener or
another event; a parked delivery replayed is delivered.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepwork_retry import AsyncExecutorService, ExecutorService, NoBackoff, RetryPolicy, TaskError
from deepwork_retry.events import (
    AsyncEventRelay,
    Event,
    EventRelay,
    EventType,
    Hooks,
    retries_exhausted,
    run_events,
)
from deepwork_retry.exceptions import ConfigurationError, InvalidInput
from deepwork_retry.storage.memory import AsyncMemoryStorage, MemoryStorage
from deepwork_retry.testing.doubles import FakeClock

POLICY = RetryPolicy(backoff=NoBackoff())
AT = datetime(2026, 1, 2, tzinfo=timezone.utc)


def event(type_: EventType, **data: object) -> Event:
    return Event(project_id="p", seq=1, type=type_, task_id="t", at=AT, data=data)


# -- the registry ---------------------------------------------------------------------------


def listener_a(e: Event) -> None: ...


def test_listeners_are_named_by_module_and_qualname_or_as_given() -> None:
    hooks = Hooks()
    hooks.on(EventType.TASK_BLOCKED, listener_a)

    @hooks.on_any(name="audit")
    def audit(e: Event) -> None: ...

    assert [f"{__name__}:listener_a", "audit"] == [x.name for x in hooks]
    with pytest.raises(ConfigurationError, match="listener_a"):
        hooks.on_any(listener_a)
    with pytest.raises(InvalidInput):
        hooks.on("task.nope", listener_a, name="x")
    with pytest.raises(InvalidInput):
        hooks.on_any(listener_a, name="")


def test_which_listeners_hear_which_events() -> None:
    hooks = Hooks()
    hooks.on([EventType.TASK_BLOCKED, "task.retried"], lambda e: None, name="two")
    hooks.on_retries_exhausted(lambda e: None, name="exhausted")
    hooks.on_any(lambda e: None, name="any")
    exhausted = event(EventType.TASK_BLOCKED, reason="budget_exhausted", retries_exhausted=True)
    by_hand = event(EventType.TASK_BLOCKED, reason="manual", retries_exhausted=False)
    started = event(EventType.ATTEMPT_STARTED)
    assert ["two", "exhausted", "any"] == [x.name for x in hooks.matching(exhausted)]
    assert ["two", "any"] == [x.name for x in hooks.matching(by_hand)]
    assert ["any"] == [x.name for x in hooks.matching(started)]
    assert retries_exhausted(exhausted)
    assert not retries_exhausted(by_hand)


def test_the_sync_relay_refuses_a_coroutine_listener_and_an_async_storage() -> None:
    hooks = Hooks()

    async def notify(e: Event) -> None: ...

    hooks.on_any(notify, name="notify")
    with pytest.raises(ConfigurationError, match=r"notify.*AsyncEventRelay"):
        EventRelay(MemoryStorage(), hooks)
    with pytest.raises(ConfigurationError):
        EventRelay(AsyncMemoryStorage(), Hooks())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        AsyncEventRelay(MemoryStorage(), hooks)  # type: ignore[arg-type]


# -- a real storage with real moves --------------------------------------------------------


def make_moves(
    storage: MemoryStorage, clock: FakeClock, plan: list[tuple[str, int, int]]
) -> ExecutorService:
    """Tasks ``(id, max_retries, failures)``: each fails ``failures`` times, then succeeds
    (or is blocked when the budget runs out first). Moves of the tasks interleave."""
    ex = ExecutorService(storage, policy=POLICY, clock=clock)
    ex.create_project("p")
    for task_id, max_retries, _ in plan:
        ex.add_task("p", task_id, max_retries=max_retries)
    left = {task_id: failures for task_id, _, failures in plan}
    for task_id in left:
        ex.assign("p", task_id)
    active = list(left)
    while active:
        for task_id in list(active):
            task = storage.load("p", task_id)[1]
            if task.status.value != "assigned":
                active.remove(task_id)
                continue
            ex.start("p", task_id, task.attempt)
            if left[task_id] > 0:
                left[task_id] -= 1
                ex.fail("p", task_id, task.attempt, TaskError(type="Boom", message="boom"))
            else:
                ex.succeed("p", task_id, task.attempt)
        clock.advance(1)
    return ex


def all_events(storage: MemoryStorage) -> list[Event]:
    out: list[Event] = []
    while True:
        page = storage.events("p", after=out[-1].seq if out else 0, limit=100)
        if not page:
            return out
        out += page


class Recorder:
    """A listener that records what it got and raises while told to."""

    def __init__(self, fails: Callable[[Event, int], bool] = lambda e, n: False) -> None:
        self.calls: list[Event] = []
        self.ok: list[Event] = []
        self.fails = fails
        self._tries: dict[str, int] = defaultdict(int)

    def __call__(self, e: Event) -> None:
        self.calls.append(e)
        self._tries[e.id] += 1
        if self.fails(e, self._tries[e.id]):
            raise RuntimeError(f"listener down for {e.id}")
        self.ok.append(e)


def drain(relay: EventRelay, clock: FakeClock, *, passes: int = 5000) -> None:
    """Run passes, moving the clock past every backoff, until nothing is left."""
    for _ in range(passes):
        if relay.run_once() == 0:
            clock.advance(4000)  # past the longest backoff
            if relay.run_once() == 0:
                return
    raise AssertionError("the relay never ran out of work")


tasks_ = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5)), min_size=1, max_size=5).map(
    lambda xs: [(f"t{i}", r, f) for i, (r, f) in enumerate(xs)]
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plan=tasks_,
    flaky_tries=st.integers(0, 4),
    max_tries=st.integers(1, 5),
    batch=st.integers(1, 7),
    broken_types=st.sets(st.sampled_from(list(EventType)), max_size=3),
)
def test_every_event_reaches_every_listener_failures_retried_then_parked(
    plan: list[tuple[str, int, int]],
    flaky_tries: int,
    max_tries: int,
    batch: int,
    broken_types: set[EventType],
) -> None:
    clock = FakeClock()
    storage = MemoryStorage()
    make_moves(storage, clock, plan)
    events = all_events(storage)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))

    steady = Recorder()
    # Fails the first ``flaky_tries`` tries of every event, then succeeds.
    flaky = Recorder(lambda e, n: n <= flaky_tries)
    # Always fails on the events of ``broken_types``.
    broken = Recorder(lambda e, n: e.type in broken_types)
    blocked_only = Recorder()
    hooks = Hooks()
    hooks.on_any(steady, name="steady")
    hooks.on_any(flaky, name="flaky")
    hooks.on_any(broken, name="broken")
    hooks.on(EventType.TASK_BLOCKED, blocked_only, name="blocked")
    relay = EventRelay(storage, hooks, clock=clock, batch=batch, max_tries=max_tries)
    drain(relay, clock)

    ids = [e.id for e in events]
    # Every event reached every listener that hears it (a listener that kept
    # failing was called on it max_tries times), whatever the others did.
    assert ids == [e.id for e in steady.ok]  # once each, in order: nothing failed
    assert ids == sorted({e.id for e in flaky.calls}, key=ids.index)
    assert [e.id for e in events if e.type is EventType.TASK_BLOCKED] == [
        e.id for e in blocked_only.ok
    ]
    per_event = defaultdict(int)
    for e in flaky.calls:
        per_event[e.id] += 1
    assert {min(flaky_tries + 1, max_tries)} == set(per_event.values())
    flaky_delivered = {e.id for e in flaky.ok}
    assert flaky_delivered == (set(ids) if flaky_tries < max_tries else set())
    broken_calls = defaultdict(int)
    for e in broken.calls:
        broken_calls[e.id] += 1
    assert {e.id: (max_tries if e.type in broken_types else 1) for e in events} == dict(
        broken_calls
    )
    # What never got through is parked, under the listener's name, once per event.
    parked = storage.parked_events(limit=1000)
    want = {(i, "flaky") for i in ids if i not in flaky_delivered} | {
        (e.id, "broken") for e in events if e.type in broken_types
    }
    assert want == {(r.event.id, r.subscriber) for r in parked}
    assert all(r.tries == max_tries and r.parked for r in parked)
    # Per task, the steady listener saw the events in order.
    seen: dict[str | None, list[int]] = defaultdict(list)
    for e in steady.ok:
        seen[e.task_id].append(e.seq)
    assert all(s == sorted(s) for s in seen.values())


def test_a_parked_delivery_replayed_is_delivered_to_its_listener_only() -> None:
    clock = FakeClock()
    storage = MemoryStorage()
    make_moves(storage, clock, [("t1", 1, 2)])  # fails twice: blocked, budget exhausted
    down = {"on": True}
    exhausted = Recorder(lambda e, n: down["on"])
    other = Recorder()
    hooks = Hooks()
    hooks.on_retries_exhausted(exhausted, name="pager")
    hooks.on_any(other, name="other")
    relay = EventRelay(storage, hooks, clock=clock, max_tries=3)
    drain(relay, clock)
    parked = storage.parked_events(subscriber="pager")
    assert [("p", "pager", 3)] == [(r.event.project_id, r.subscriber, r.tries) for r in parked]
    assert parked[0].event.data["retries_exhausted"] is True
    assert "listener down" in (parked[0].last_error or "")
    assert 3 == len(exhausted.calls)
    before = len(other.calls)
    down["on"] = False
    assert 1 == storage.replay_parked(now=clock.now(), subscriber="pager")
    drain(relay, clock)
    assert [parked[0].event.id] == [e.id for e in exhausted.ok]
    assert before == len(other.calls)  # the replay went to the parked listener only
    assert [] == storage.parked_events()


def test_a_listener_that_raises_never_reaches_the_request() -> None:
    """Hooks run in the relay, after the commit: a move's caller never sees them."""
    clock = FakeClock()
    storage = MemoryStorage()
    calls: list[str] = []

    def explode(e: Event) -> None:
        calls.append(e.id)
        raise RuntimeError("hook down")

    hooks = Hooks()
    hooks.on_any(explode, name="explode")
    make_moves(storage, clock, [("t1", 0, 1)])  # the moves all succeed
    assert [] == calls
    assert run_events(storage, hooks, once=True, clock=clock) > 0
    assert calls


def test_run_events_stops_when_told() -> None:
    storage = MemoryStorage()
    clock = FakeClock()
    make_moves(storage, clock, [("t1", 0, 0)])
    got: list[str] = []
    hooks = Hooks()
    hooks.on_any(lambda e: got.append(e.id), name="got")
    stop = threading.Event()
    thread = threading.Thread(
        target=run_events, args=(storage, hooks), kwargs={"stop": stop, "poll_interval": 0.01}
    )
    thread.start()
    try:
        for _ in range(1000):
            if len(got) == len(all_events(storage)):
                break
            stop.wait(0.01)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert [e.id for e in all_events(storage)] == got


def test_the_async_relay_awaits_coroutines_and_runs_sync_listeners_in_threads() -> None:
    clock = FakeClock()
    sync_storage = MemoryStorage()
    make_moves(sync_storage, clock, [("t1", 1, 2), ("t2", 1, 0)])
    storage = AsyncMemoryStorage(sync_storage)
    seen_async: list[str] = []
    threads: set[int] = set()
    failing_once: set[str] = set()

    async def notify(e: Event) -> None:
        if e.id not in failing_once:
            failing_once.add(e.id)
            raise RuntimeError("first try fails")
        seen_async.append(e.id)

    def blocking(e: Event) -> None:
        threads.add(threading.get_ident())

    hooks = Hooks()
    hooks.on_any(notify, name="notify")
    hooks.on_any(blocking, name="blocking")
    relay = AsyncEventRelay(storage, hooks, clock=clock)

    async def main() -> None:
        for _ in range(10):
            if await relay.run_once() == 0:
                clock.advance(4000)

    asyncio.run(main())
    ids = [e.id for e in all_events(sync_storage)]
    assert sorted(ids) == sorted(seen_async)
    assert threading.get_ident() not in threads
    assert [] == sync_storage.parked_events()


def test_an_event_is_delivered_again_when_the_relay_died_before_settling() -> None:
    """A claim that lapses (the relay died mid-batch) gives the batch to the next relay:
    at least once."""
    clock = FakeClock()
    storage = MemoryStorage()
    make_moves(storage, clock, [("t1", 0, 0)])
    got: list[str] = []

    class Died(BaseException):
        pass

    def dies(e: Event) -> None:
        got.append(e.id)
        raise Died

    hooks = Hooks()
    hooks.on_any(dies, name="l")
    with pytest.raises(Died):
        EventRelay(storage, hooks, clock=clock, claim_timeout=30).run_once()
    first = list(got)
    hooks.remove("l")
    hooks.on_any(lambda e: got.append(e.id), name="l")
    relay = EventRelay(storage, hooks, clock=clock, claim_timeout=30)
    assert 0 == relay.deliver_events()  # still claimed by the dead relay
    clock.advance(31)
    drain(relay, clock)
    assert first[0] == got[len(first)]
    assert [e.id for e in all_events(storage)] == got[len(first) :]


def test_bad_settings_are_refused() -> None:
    for kwargs in ({"batch": 0}, {"batch": 1001}, {"max_tries": 0}, {"claim_timeout": 0}):
        with pytest.raises(InvalidInput):
            EventRelay(MemoryStorage(), Hooks(), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        Hooks().on_any(lambda e: None, max_tries=0)


class NoJitter:
    def random(self) -> float:
        return 0.0


def test_backoff_doubles_from_two_seconds_and_is_capped_at_an_hour() -> None:
    """A failed delivery is not due a moment before its backoff, and is due at it:
    2 s, 4 s, 8 s … then an hour at most."""
    clock = FakeClock()
    storage = MemoryStorage()
    make_moves(storage, clock, [("t1", 0, 0)])
    hooks = Hooks()
    hooks.on(EventType.ATTEMPT_STARTED, lambda e: 1 / 0, name="zero")
    relay = EventRelay(storage, hooks, clock=clock, max_tries=30, rng=NoJitter())
    relay.deliver_events()
    for tries in range(1, 16):
        wait = min(3600.0, 2.0 * 2 ** (tries - 1))
        clock.advance(wait - 0.01)
        assert 0 == relay.retry_failed()
        clock.advance(0.01)
        assert 1 == relay.retry_failed()


def test_run_relay_with_hooks_runs_both_relays_in_one_process() -> None:
    """``run_relay(..., hooks=)`` delivers the outbox and the events until stopped."""
    from deepwork_retry.dispatch.relay import run_relay
    from deepwork_retry.testing.doubles import RecordingDispatcher

    storage = MemoryStorage()
    ex = ExecutorService(storage, policy=POLICY)
    ex.create_project("p")
    ex.add_task("p", "t1")
    ex.assign("p", "t1")  # no dispatcher here: the entry waits for the relay
    got: list[str] = []
    hooks = Hooks()
    hooks.on_any(lambda e: got.append(e.id), name="got")
    dispatcher = RecordingDispatcher()
    assert 1 == run_relay(storage, dispatcher, once=True, hooks=hooks)
    assert [("p", "t1", 1)] == dispatcher.keys
    assert [e.id for e in all_events(storage)] == got

    ex.add_task("p", "t2")
    ex.assign("p", "t2")
    stop = threading.Event()
    thread = threading.Thread(
        target=run_relay,
        args=(storage, dispatcher),
        kwargs={"stop": stop, "poll_interval": 0.01, "hooks": hooks},
    )
    thread.start()
    try:
        for _ in range(2000):
            if len(dispatcher.keys) == 2 and len(got) == len(all_events(storage)):
                break
            stop.wait(0.01)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert [("p", "t1", 1), ("p", "t2", 1)] == dispatcher.keys
    assert [e.id for e in all_events(storage)] == got

    async def notify(e: Event) -> None: ...

    coroutines = Hooks()
    coroutines.on_any(notify, name="notify")
    with pytest.raises(ConfigurationError, match="notify"):
        run_relay(storage, dispatcher, once=True, hooks=coroutines)


def test_a_relay_stops_at_its_claim_and_has_recorded_each_event_it_delivered() -> None:
    """A batch slower than the claim is cut where the claim runs out: every event
    begun is recorded as delivered at once, the rest are left for the next claim, so
    no two relays ever hold one event at the same time."""
    clock = FakeClock()
    storage = MemoryStorage()
    executor = ExecutorService(storage, clock=clock)
    executor.create_project("p")
    for n in range(5):
        executor.add_task("p", f"t{n}")  # one project.progress event each
    calls: list[str] = []
    hooks = Hooks()

    @hooks.on_any
    def slow(e: Event) -> None:
        calls.append(e.id)
        clock.advance(12)  # each delivery takes 12 s of a 30 s claim

    relay = EventRelay(storage, hooks, clock=clock, claim_timeout=30.0)
    assert 5 == relay.deliver_events()
    assert ["p:1", "p:2", "p:3"] == calls  # begun at 0, 12 and 24 s; not at 36 s
    # The claim has run out: another relay takes exactly the events never begun.
    until = clock.now() + timedelta(seconds=30)
    taken = storage.claim_events(now=clock.now(), limit=10, claimed_until=until)
    assert [4, 5] == [e.seq for e in taken]


class CountingSettles(MemoryStorage):
    """A memory storage that records each ``settle_events`` write's events."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[list[int]] = []

    def settle_events(self, events, *, now, failures=()):  # type: ignore[no-untyped-def]
        self.writes.append([e.seq for e in events])
        super().settle_events(events, now=now, failures=failures)


def five_progress_events(storage: MemoryStorage, clock: FakeClock) -> None:
    executor = ExecutorService(storage, clock=clock)
    executor.create_project("p")
    for n in range(5):
        executor.add_task("p", f"t{n}")  # one project.progress event each


def test_a_batch_of_quick_deliveries_is_recorded_in_one_write() -> None:
    """Fast listeners cost one write per group, not one per event; every event and every
    failed delivery is recorded by it."""
    clock = FakeClock()
    storage = CountingSettles()
    five_progress_events(storage, clock)
    hooks = Hooks()
    hooks.on_any(lambda e: None, name="ok")
    hooks.on_any(lambda e: 1 / 0 if e.seq == 2 else None, name="fails")
    relay = EventRelay(storage, hooks, clock=clock, settle_within=20.0)
    assert 5 == relay.deliver_events()
    assert [[1, 2, 3, 4, 5]] == storage.writes
    assert [] == storage.claim_events(now=clock.now(), limit=10, claimed_until=clock.now())
    clock.advance(3600)
    assert [("p:2", "fails")] == [
        (r.event.id, r.subscriber)
        for r in storage.claim_event_retries(now=clock.now(), limit=10, claimed_until=clock.now())
    ]


def test_settle_within_zero_records_each_event_alone() -> None:
    clock = FakeClock()
    storage = CountingSettles()
    five_progress_events(storage, clock)
    hooks = Hooks()
    hooks.on_any(lambda e: None, name="ok")
    assert 5 == EventRelay(storage, hooks, clock=clock, settle_within=0).deliver_events()
    assert [[1], [2], [3], [4], [5]] == storage.writes


def test_a_group_is_recorded_once_its_first_delivery_is_settle_within_old() -> None:
    """By the relay's clock (here a slow listener on a fake clock) or by the wall clock."""
    clock = FakeClock()
    storage = CountingSettles()
    five_progress_events(storage, clock)
    hooks = Hooks()

    @hooks.on_any
    def slow(e: Event) -> None:
        clock.advance(0.25)

    assert 5 == EventRelay(storage, hooks, clock=clock, settle_within=0.5).deliver_events()
    assert [[1, 2], [3, 4], [5]] == storage.writes

    storage = CountingSettles()
    five_progress_events(storage, clock)
    walled = Hooks()
    walled.on_any(lambda e: time.sleep(0.02) if e.seq == 3 else None, name="sleeps")
    assert 5 == EventRelay(storage, walled, clock=clock, settle_within=0.015).deliver_events()
    assert [[1, 2, 3], [4, 5]] == storage.writes


def test_a_pass_ended_by_a_listener_records_what_it_delivered_first() -> None:
    """A BaseException from a listener (KeyboardInterrupt, a worker's shutdown) ends the
    pass; the events delivered before it are recorded, the one it broke is not."""
    clock = FakeClock()
    storage = CountingSettles()
    five_progress_events(storage, clock)

    class Stop(BaseException):
        pass

    def stops_at_three(e: Event) -> None:
        if e.seq == 3:
            raise Stop

    hooks = Hooks()
    hooks.on_any(stops_at_three, name="l")
    with pytest.raises(Stop):
        EventRelay(storage, hooks, clock=clock, settle_within=20.0).deliver_events()
    assert [[1, 2]] == storage.writes
    clock.advance(31)  # the claim lapses: the broken event and the rest come again
    later = clock.now() + timedelta(seconds=30)
    assert [3, 4, 5] == [
        e.seq for e in storage.claim_events(now=clock.now(), limit=10, claimed_until=later)
    ]


@pytest.mark.parametrize("within", [-0.1, float("nan"), float("inf"), 30.0, 45.0])
def test_a_settle_within_outside_zero_to_the_claim_is_refused(within: float) -> None:
    with pytest.raises(InvalidInput, match="settle_within"):
        EventRelay(MemoryStorage(), Hooks(), claim_timeout=30.0, settle_within=within)


def test_the_async_relay_records_a_quick_batch_in_one_write() -> None:
    writes: list[list[int]] = []

    class AsyncCounting(AsyncMemoryStorage):
        async def settle_events(self, events, *, now, failures=()):  # type: ignore[no-untyped-def]
            writes.append([e.seq for e in events])
            await super().settle_events(events, now=now, failures=failures)

    async def main() -> list[list[int]]:
        clock = FakeClock()
        storage = AsyncCounting()
        executor = AsyncExecutorService(storage, clock=clock)
        await executor.create_project("p")
        for n in range(4):
            await executor.add_task("p", f"t{n}")
        hooks = Hooks()

        async def heard(e: Event) -> None: ...

        hooks.on_any(heard, name="heard")
        relay = AsyncEventRelay(storage, hooks, clock=clock, settle_within=20.0)
        assert 4 == await relay.deliver_events()
        return writes

    assert [[1, 2, 3, 4]] == asyncio.run(main())
