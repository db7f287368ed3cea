"""The child processes of tests/test_events_kill9.py (run as a script).

``writer DB``: blocks every assigned task of project ``p`` (start, then fail
with no retries left), one commit per line ``committed TASK`` on stdout.
``relay DB OUT``: runs the event relay with a listener that appends each
event's id, type and task to OUT and fsyncs before returning.
"""

from __future__ import annotations

import os
import sys
import time

from deepwork_retry import ExecutorService, TaskError, TaskStatus
from deepwork_retry.events import Event, Hooks, run_events
from deepwork_retry.storage.sqlite import SQLiteStorage


def writer(db: str) -> None:
    storage = SQLiteStorage(db)
    ex = ExecutorService(storage)
    for task in storage.list_tasks("p", limit=1000):
        if task.status is TaskStatus.ASSIGNED:
            ex.start("p", task.id, task.attempt)
            print(f"started {task.id}", flush=True)
            task = storage.load("p", task.id)[1]
        if task.status is TaskStatus.IN_PROGRESS:
            ex.fail("p", task.id, task.attempt, TaskError(type="Boom", message="boom"))
            print(f"committed {task.id}", flush=True)
    print("done", flush=True)


def relay(db: str, out: str) -> None:
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(event: Event) -> None:
        os.write(fd, f"{event.id}\t{event.type.value}\t{event.task_id}\n".encode())
        os.fsync(fd)
        time.sleep(0.01)  # slower than the writer: a backlog builds, and kills land in batches

    hooks = Hooks()
    hooks.on_any(record, name="record")
    print("relaying", flush=True)
    run_events(SQLiteStorage(db), hooks, poll_interval=0.01, batch=7, claim_timeout=0.5)


if __name__ == "__main__":
    if sys.argv[1] == "writer":
        writer(sys.argv[2])
    else:
        relay(sys.argv[2], sys.argv[3])
