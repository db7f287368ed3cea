"""Done when: a host subscribed to ``task.blocked`` gets it exactly once per block after
deduplication, even across ``kill -9``.

Real processes on one SQLite file: a writer blocks tasks, one commit at a time,
and is SIGKILLed right after commits; an event relay whose listener appends each
event's id to a file (fsynced) is SIGKILLed while it delivers. Both are
restarted until the work is done. In the end every event (every ``task.blocked``
among them) is in the file at least once, none is missing, the ids deduplicate
to exactly the stored events, and each task's events first arrived in order.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from deepwork_retry import ExecutorService
from deepwork_retry.events import EventType
from deepwork_retry.storage.sqlite import SQLiteStorage

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not hasattr(SQLiteStorage, "claim_events"),
        reason="needs the SQLite storage's event log (merged separately)",
    ),
]

CHILD = Path(__file__).resolve().parent / "events_kill9_child.py"
TASKS = 40
BOUND = 120.0
"""Seconds the whole run may take: a functional bound, far above what it needs."""


def spawn(*args: str) -> subprocess.Popen[str]:
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, str(CHILD), *args], stdout=subprocess.PIPE, text=True, env=env
    )


def kill(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.stdout is not None
    process.stdout.close()


def lines(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    # A line cut by the kill (no newline yet) is not counted: it was not delivered.
    text = path.read_text()
    return [line.split("\t") for line in text.splitlines(keepends=True) if line.endswith("\n")]


def test_every_blocked_event_is_delivered_once_after_dedup_across_kill_9(tmp_path: Path) -> None:
    db = str(tmp_path / "events.db")
    out = tmp_path / "delivered.tsv"
    storage = SQLiteStorage(db)
    ex = ExecutorService(storage)
    ex.create_project("p")
    for n in range(TASKS):
        ex.add_task("p", f"t{n:02}", max_retries=0)
        ex.assign("p", f"t{n:02}")
    rng = random.Random(12)
    deadline = time.monotonic() + BOUND
    relay_kills = writer_kills = 0

    relay = spawn("relay", db, str(out))

    def kill_relay_while_it_delivers() -> None:
        """Wait for the listener to write a line, then SIGKILL the relay at once (it
        is then inside a batch, before settling it) and start a new one."""
        nonlocal relay, relay_kills
        before = len(lines(out))
        while len(lines(out)) == before:
            if time.monotonic() > deadline or relay.poll() is not None:
                return
            time.sleep(0.001)
        kill(relay)
        relay_kills += 1
        relay = spawn("relay", db, str(out))

    writer = spawn("writer", db)
    assert writer.stdout is not None
    # The writer: killed right after some of its commits, then started again.
    while True:
        assert time.monotonic() < deadline, "the writer never finished"
        line = writer.stdout.readline()
        if line == "done\n" or (line == "" and writer.poll() is not None):
            assert 0 == writer.wait(timeout=60)
            writer.stdout.close()
            break
        if line.startswith("committed") and rng.random() < 0.25:
            kill(writer)
            writer_kills += 1
            writer = spawn("writer", db)
            assert writer.stdout is not None
        if line.startswith("committed") and rng.random() < 0.1:
            kill_relay_while_it_delivers()

    stored = []
    while page := storage.events("p", after=stored[-1].seq if stored else 0, limit=1000):
        stored += page
    blocked = {e.id for e in stored if e.type is EventType.TASK_BLOCKED}
    assert TASKS == len(blocked)  # one block per task, each one event

    # More kills while the backlog is being delivered.
    for _ in range(6):
        kill_relay_while_it_delivers()
    try:
        while {row[0] for row in lines(out)} != {e.id for e in stored}:
            assert time.monotonic() < deadline, "some events were never delivered"
            time.sleep(0.05)
    finally:
        kill(relay)

    got = lines(out)
    ids = [row[0] for row in got]
    assert blocked == {row[0] for row in got if row[1] == EventType.TASK_BLOCKED.value}
    assert {e.id for e in stored} == set(ids)  # after dedup: exactly the stored events
    assert writer_kills >= 3
    assert relay_kills >= 3
    # Each task's events arrived in order (first arrivals; repeats are redeliveries).
    first: dict[str, list[int]] = defaultdict(list)
    seen: set[str] = set()
    for event_id, _, task in got:
        if event_id not in seen:
            seen.add(event_id)
            first[task.strip()].append(int(event_id.split(":")[1]))
    assert all(seqs == sorted(seqs) for seqs in first.values())
    storage.close()
