"""The queue-independent worker step (start, heartbeat, run, report) on in-memory storage."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from deepwork_retry import (
    DispatchEntry,
    ExecutorService,
    NoBackoff,
    RetryPolicy,
    Task,
    TaskStatus,
)
from deepwork_retry.dispatch._worker import DeliveryOutcome, ExecutorSource, run_attempt
from deepwork_retry.dispatch.reaper import run_reaper
from deepwork_retry.dispatch.relay import run_relay
from deepwork_retry.storage.memory import MemoryStorage


class Recorder:
    """A dispatcher that accepts every entry and remembers it."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, int]] = []

    def dispatch(self, entry: DispatchEntry) -> None:
        self.sent.append(entry.key)


class ManualClock:
    def __init__(self) -> None:
        self.at = datetime(2024, 1, 1, tzinfo=timezone.utc)

    def now(self) -> datetime:
        return self.at


def service(
    lease: float = 300.0, clock: ManualClock | None = None
) -> tuple[ExecutorService, Recorder]:
    recorder = Recorder()
    policy = RetryPolicy(backoff=NoBackoff(), lease=lease)
    svc = ExecutorService(MemoryStorage(), recorder, policy=policy, clock=clock)
    svc.create_project("p")
    svc.add_task("p", "t", max_retries=1)
    svc.assign("p", "t")
    return svc, recorder


def test_success_is_reported() -> None:
    """A host function that returns marks the attempt done and ran once with the token."""
    svc, _ = service()
    seen: list[tuple[str, int]] = []
    outcome = run_attempt(svc, lambda task, token: seen.append((task.id, token)), "p", "t", 1)
    assert DeliveryOutcome.SUCCEEDED == outcome
    assert [("t", 1)] == seen
    assert TaskStatus.DONE == svc.storage.load("p", "t")[1].status


def test_failure_follows_the_library_policy() -> None:
    """A raising host function is reported as failed and the policy dispatches attempt 2."""
    svc, recorder = service()

    def boom(task: Task, token: int) -> None:
        raise ValueError("bad input")

    assert DeliveryOutcome.FAILED == run_attempt(svc, boom, "p", "t", 1)
    _, task = svc.storage.load("p", "t")
    assert (TaskStatus.ASSIGNED, 2, "bad input") == (task.status, task.attempt, task.error_message)
    assert [("p", "t", 1), ("p", "t", 2)] == recorder.sent


def test_duplicate_delivery_runs_nothing() -> None:
    """A second delivery of a started or finished attempt is skipped without running the code."""
    svc, _ = service()
    calls: list[int] = []
    assert DeliveryOutcome.SUCCEEDED == run_attempt(svc, lambda t, n: calls.append(n), "p", "t", 1)
    assert DeliveryOutcome.SKIPPED == run_attempt(svc, lambda t, n: calls.append(n), "p", "t", 1)
    assert DeliveryOutcome.SKIPPED == run_attempt(svc, lambda t, n: calls.append(n), "p", "t", 7)
    assert [1] == calls


@pytest.mark.parametrize(
    "message",
    [("p", "t", "1"), ("p", 5, 1), (None, "t", 1), ("p", "t", 0), ("p", "t", True)],
)
def test_malformed_message_is_dropped(message: tuple[object, object, object]) -> None:
    """A message that is not (str, str, positive int) runs nothing and changes nothing."""
    svc, _ = service()
    calls: list[int] = []
    assert DeliveryOutcome.MALFORMED == run_attempt(svc, lambda t, n: calls.append(n), *message)
    assert ([], TaskStatus.ASSIGNED) == (calls, svc.storage.load("p", "t")[1].status)


def test_unknown_task_is_skipped() -> None:
    """A delivery for a task that does not exist is skipped."""
    svc, _ = service()
    assert DeliveryOutcome.SKIPPED == run_attempt(svc, lambda t, n: None, "p", "nope", 1)


def test_heartbeat_extends_the_lease() -> None:
    """While the host code runs, the heartbeat keeps moving the lease forward."""
    svc, _ = service(lease=30.0)
    leases = []

    def work(task: Task, token: int) -> None:
        deadline = time.monotonic() + 10
        while len(leases) < 2 and time.monotonic() < deadline:
            lease = svc.storage.load("p", "t")[1].lease_expires_at
            if lease not in leases:
                leases.append(lease)
            time.sleep(0.01)

    assert DeliveryOutcome.SUCCEEDED == run_attempt(svc, work, "p", "t", 1, heartbeat_interval=0.02)
    assert 2 == len(leases)
    assert leases[0] < leases[1]


def test_attempt_reaped_while_running_is_stale() -> None:
    """If the attempt is failed as lost while the code runs, its late report is dropped."""
    clock = ManualClock()
    svc, _ = service(lease=1.0, clock=clock)
    reaped = threading.Event()

    def work(task: Task, token: int) -> None:
        clock.at += timedelta(seconds=5)
        assert 1 == run_reaper(svc.storage, once=True, policy=svc.policy, clock=clock)
        reaped.set()

    assert DeliveryOutcome.STALE == run_attempt(svc, work, "p", "t", 1, heartbeat_interval=60)
    assert reaped.is_set()
    attempts = svc.storage.attempts("p", "t")
    assert ["lost", None] == [a.outcome and a.outcome.value for a in attempts]


def test_relay_delivers_pending_entries_once() -> None:
    """run_relay(once=True) delivers what is due and reports the count."""
    recorder = Recorder()
    svc = ExecutorService(MemoryStorage())  # no dispatcher: entries stay pending
    svc.create_project("p")
    for task_id in ("a", "b"):
        svc.add_task("p", task_id)
        svc.assign("p", task_id)
    assert 2 == run_relay(svc.storage, recorder, once=True)
    assert 0 == run_relay(svc.storage, recorder, once=True)
    assert [("p", "a", 1), ("p", "b", 1)] == sorted(recorder.sent)


def test_loops_stop_when_asked() -> None:
    """run_reaper and run_relay return once their stop event is set."""
    storage = MemoryStorage()
    stop = threading.Event()
    stop.set()
    assert 0 == run_reaper(storage, interval=0.01, stop=stop)
    assert 0 == run_relay(storage, Recorder(), poll_interval=0.01, stop=stop)


def test_executor_source_builds_once_per_process() -> None:
    """The factory runs on first use and its service is reused afterwards."""
    built: list[int] = []

    def factory() -> ExecutorService:
        built.append(1)
        return ExecutorService(MemoryStorage())

    source = ExecutorSource(factory)
    assert source.get() is source.get()
    assert [1] == built


@pytest.mark.parametrize(
    ("module", "package", "extra"),
    [
        ("deepwork_retry.dispatch.celery", "celery", "celery"),
        ("deepwork_retry.dispatch.dramatiq", "dramatiq", "dramatiq"),
    ],
)
def test_missing_queue_package_names_the_extra(module: str, package: str, extra: str) -> None:
    """Importing a dispatcher without its queue package raises ImportError naming the extra."""
    code = (
        f"import sys; sys.modules[{package!r}] = None\n"
        f"try:\n    import {module}\n"
        "except ImportError as exc:\n    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert f"pip install 'deepwork-retry[{extra}]'" in out.stdout


def test_dramatiq_actor_logs_no_warning_per_delivery(caplog: pytest.LogCaptureFixture) -> None:
    """A Dramatiq worker without a results backend runs the actor without a warning.

    Dramatiq warns on every message whose actor returns a value when the
    broker has no Results middleware; the library's actor returns nothing.
    """
    dramatiq = pytest.importorskip("dramatiq")
    from dramatiq.brokers.stub import StubBroker

    from deepwork_retry.dispatch.dramatiq import DramatiqDispatcher, deepwork_actor

    broker = StubBroker()
    broker.emit_after("process_boot")
    storage = MemoryStorage()
    ran: list[int] = []

    def make_executor() -> ExecutorService:
        dispatcher = DramatiqDispatcher(broker, actor_name="dw_stub", queue_name="dw_stub")
        return ExecutorService(storage, dispatcher, policy=RetryPolicy(backoff=NoBackoff()))

    deepwork_actor(broker, make_executor, actor_name="dw_stub", queue_name="dw_stub")(
        lambda task, token: ran.append(token)
    )
    svc = make_executor()
    svc.create_project("p")
    svc.add_task("p", "t")
    worker = dramatiq.Worker(broker, worker_timeout=100)
    worker.start()
    try:
        with caplog.at_level("WARNING", logger="dramatiq"):
            svc.assign("p", "t")
            broker.join("dw_stub", timeout=30_000)
            worker.join()
    finally:
        worker.stop()
    assert ([1], TaskStatus.DONE) == (ran, storage.load("p", "t")[1].status)
    assert [] == [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
