"""Crash safety: a process SIGKILLed between committing a retry and dispatching it.

The child process commits manual retries on an SQLite file and is killed by
SIGKILL from inside its dispatcher, before that dispatcher records anything:
the retry is durable but was never handed on. After the "restart" (a new
storage on the same file in this process) an outbox relay with a settable
clock delivers what the dead process left pending, exactly once.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from datetime import timedelta
from pathlib import Path

import pytest

from deepwork_retry import (
    DispatchState,
    ExecutorService,
    OutboxRelay,
    RetryService,
    TaskStatus,
)
from deepwork_retry._core.model import DispatchEntry
from deepwork_retry.storage.sqlite import SQLiteStorage
from deepwork_retry.testing.doubles import DEFAULT_START, FakeClock, RecordingDispatcher

pytestmark = pytest.mark.slow

SPAWN = multiprocessing.get_context("spawn")
CHILD_CLAIM = 30.0
"""How long the child's own (never finished) delivery claims its entry."""
RELAY_CLAIM = 5.0


class DeliverThenDie:
    """Records deliveries to a file; on call number ``die_on`` kills its own process first."""

    def __init__(self, path: str, die_on: int) -> None:
        self.path = path
        self.die_on = die_on
        self.calls = 0

    def dispatch(self, entry: DispatchEntry) -> None:
        self.calls += 1
        if self.calls == self.die_on:
            os.kill(os.getpid(), signal.SIGKILL)
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(f"{entry.task_id}\t{entry.attempt}\n")


def child_main(db: str, deliveries: str, task_ids: list[str], die_on: int) -> None:
    storage = SQLiteStorage(db)
    service = RetryService(
        storage,
        DeliverThenDie(deliveries, die_on),
        clock=FakeClock(DEFAULT_START),
        claim_timeout=CHILD_CLAIM,
    )
    for tid in task_ids:
        service.retry("p", tid, actor="operator")
    raise AssertionError("the dispatcher should have killed this process")


def make_blocked(db: Path, task_ids: list[str]) -> dict[str, int]:
    """Blocked tasks ``task_ids`` in project p; returns their retry counts."""
    storage = SQLiteStorage(db)
    ex = ExecutorService(storage, RecordingDispatcher(), clock=FakeClock(DEFAULT_START))
    ex.create_project("p")
    counts = {}
    for tid in task_ids:
        ex.add_task("p", tid, max_retries=0)
        ex.assign("p", tid)
        ex.start("p", tid, 1)
        counts[tid] = ex.fail("p", tid, 1, RuntimeError("boom")).task.retry_count
    storage.close()
    return counts


def kill_child(db: Path, deliveries: Path, task_ids: list[str], die_on: int) -> None:
    child = SPAWN.Process(target=child_main, args=(str(db), str(deliveries), task_ids, die_on))
    child.start()
    child.join(120)
    assert -signal.SIGKILL == child.exitcode


def delivered_lines(path: Path) -> list[tuple[str, int]]:
    if not path.exists():
        return []
    return [(t, int(a)) for t, a in (line.split("\t") for line in path.read_text().splitlines())]


def test_retry_committed_before_a_crash_is_delivered_once_after_restart(tmp_path: Path) -> None:
    """A retry whose process died before dispatching is delivered by the relay once, never twice."""
    db, deliveries = tmp_path / "crash.db", tmp_path / "deliveries.txt"
    counts = make_blocked(db, ["t"])

    kill_child(db, deliveries, ["t"], die_on=1)

    assert [] == delivered_lines(deliveries)
    storage = SQLiteStorage(db)
    task = storage.load("p", "t")[1]
    assert (TaskStatus.ASSIGNED, counts["t"] + 1, 2) == (
        task.status,
        task.retry_count,
        task.attempt,
    )
    (entry,) = [e for e in storage.dispatches("p", "t") if e.attempt == 2]
    assert (DispatchState.PENDING, 0) == (entry.state, entry.tries)

    clock = FakeClock(DEFAULT_START)
    dispatcher = RecordingDispatcher()
    relay = OutboxRelay(storage, dispatcher, clock=clock, claim_timeout=RELAY_CLAIM)
    assert 0 == relay.run_once()  # the dead process's claim has not lapsed yet
    clock.advance(CHILD_CLAIM + 1)
    assert 1 == relay.run_once()
    assert 0 == relay.run_once()
    clock.advance(RELAY_CLAIM + CHILD_CLAIM)
    assert 0 == relay.run_once()

    assert [("p", "t", 2)] == dispatcher.keys
    (entry,) = [e for e in storage.dispatches("p", "t") if e.attempt == 2]
    assert (DispatchState.DELIVERED, 1, None) == (entry.state, entry.tries, entry.claimed_until)
    assert [1, 2] == [a.number for a in storage.attempts("p", "t")]
    storage.close()


def test_crash_midway_through_several_retries_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """Killed at its third dispatch, a process's retries are each delivered exactly once overall."""
    ids = ["a", "b", "c", "d"]
    db, deliveries = tmp_path / "crash.db", tmp_path / "deliveries.txt"
    counts = make_blocked(db, ids)

    kill_child(db, deliveries, ids, die_on=3)

    before_restart = delivered_lines(deliveries)
    assert [("a", 2), ("b", 2)] == before_restart
    storage = SQLiteStorage(db)
    tasks = {tid: storage.load("p", tid)[1] for tid in ids}
    assert {"a": 1, "b": 1, "c": 1, "d": 0} == {
        tid: t.retry_count - counts[tid] for tid, t in tasks.items()
    }
    assert TaskStatus.BLOCKED == tasks["d"].status

    clock = FakeClock(DEFAULT_START + timedelta(seconds=CHILD_CLAIM + 1))
    dispatcher = RecordingDispatcher()
    relay = OutboxRelay(storage, dispatcher, clock=clock, claim_timeout=RELAY_CLAIM)
    assert 1 == relay.run_once()
    clock.advance(RELAY_CLAIM + 1)
    assert 0 == relay.run_once()

    delivered = before_restart + [(e.task_id, e.attempt) for e in dispatcher.delivered]
    assert [("a", 2), ("b", 2), ("c", 2)] == delivered
    for tid in ("a", "b", "c"):
        states = [(e.attempt, e.state) for e in storage.dispatches("p", tid)]
        assert [(1, DispatchState.DELIVERED), (2, DispatchState.DELIVERED)] == states
    storage.close()
