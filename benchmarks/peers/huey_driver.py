"""Drives Huey's manual re-run of a failed task; runs in the peer's own virtualenv.

    python huey_driver.py REDIS_URL            # the driver, spoken to over pipes
    python huey_driver.py REDIS_URL worker     # a real Huey consumer of the "worker" instance

Huey keeps no registry of failed tasks: a task that raised leaves its error in
the result store, and the caller re-runs it with ``Result.reschedule()``, which
revokes the old task id and enqueues a copy under a new id. That is the call
timed here. Commands, one per line on stdin, one JSON line answered:

- ``facts``: Huey's version and one Redis round trip (PING, median).
- ``setup QUEUE N``: enqueue N tasks on the Huey instance ``bench_qpeers_QUEUE``
  (``call`` or ``worker``) and fail each of them through Huey's own
  ``dequeue`` + ``execute`` in this process, as a consumer would (the error
  lands in the result store); answers ``{"ok": N}``.
- ``run K``: ``reschedule()`` the next K failed tasks of ``call``, timing each
  call; answers ``{"us": [...]}``.
- ``start worker K``: for each of the next K failed tasks of ``worker``: reschedule it
  and wait until the consumer process has started the task body (the body
  pushes ``time.monotonic_ns()`` first thing, one clock for every process on
  Linux) and has stored its error; answers ``{"us": [...], "call_us": [...]}``.
- ``quit``.

This file imports Huey only; the benchmark talks to it through pipes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from huey import RedisHuey
from redis import Redis

STARTED = "bench_qpeers:started"
URL = os.environ.get("BENCH_QPEERS_REDIS", "redis://127.0.0.1:6379/14")

hueys = {name: RedisHuey(f"bench_qpeers_{name}", url=URL) for name in ("call", "worker")}


def _body(huey: RedisHuey) -> None:
    now = time.monotonic_ns()
    huey.storage.conn.lpush(STARTED, now)
    raise RuntimeError("bench_qpeers: failing on purpose")


@hueys["call"].task()
def body_call() -> None:
    _body(hueys["call"])


@hueys["worker"].task()
def body_worker() -> None:
    _body(hueys["worker"])


def wait_error(huey: RedisHuey, task_id: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        if huey.storage.has_data_for_key(task_id):
            return
        time.sleep(0.0005)
    raise TimeoutError(f"task {task_id} did not fail again in time")


def ping_median(conn: Redis, n: int = 500) -> float:
    """One loopback round trip to Redis from this process (PING), median of ``n``, µs."""
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        conn.ping()
        samples.append((time.perf_counter_ns() - t0) / 1000)
    return sorted(samples)[n // 2]


def main() -> int:
    import huey_driver  # the consumer finds the tasks under this module's name

    logging.getLogger("huey").setLevel(logging.CRITICAL)
    if sys.argv[2:] == ["worker"]:
        # Huey's default consumer: one worker thread, blocking reads of the queue.
        consumer = huey_driver.hueys["worker"].create_consumer(workers=1, worker_type="thread")
        consumer.run()
        return 0
    tasks = {"call": huey_driver.body_call, "worker": huey_driver.body_worker}
    failed: dict[str, list] = {"call": [], "worker": []}
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "facts":
            conn = huey_driver.hueys["call"].storage.conn
            answer = {
                "huey": __import__("huey").__version__,
                "redis_ping_us_median": ping_median(conn),
            }
        elif cmd == "setup":
            name, n = args[0], int(args[1])
            huey = huey_driver.hueys[name]
            results = [tasks[name]() for _ in range(n)]
            for _ in range(n):
                task = huey.dequeue()
                if task is None:
                    break
                huey.execute(task)
            huey.storage.conn.delete(STARTED)
            failed[name] = [r for r in results if huey.storage.has_data_for_key(r.id)]
            answer = {"ok": len(failed[name])}
        elif cmd == "run":
            k = int(args[0])
            batch, failed["call"] = failed["call"][:k], failed["call"][k:]
            samples = []
            for result in batch:
                t0 = time.perf_counter_ns()
                result.reschedule()
                samples.append((time.perf_counter_ns() - t0) / 1000)
            answer = {"us": samples}
        elif cmd == "start":
            k = int(args[1])
            huey = huey_driver.hueys["worker"]
            conn = huey.storage.conn
            batch, failed["worker"] = failed["worker"][:k], failed["worker"][k:]
            e2e, calls = [], []
            for result in batch:
                t0 = time.monotonic_ns()
                again = result.reschedule()
                t1 = time.monotonic_ns()
                popped = conn.blpop([STARTED], timeout=30)
                if popped is None:
                    raise TimeoutError("the consumer did not start the task in 30 s")
                e2e.append((int(popped[1]) - t0) / 1000)
                calls.append((t1 - t0) / 1000)
                wait_error(huey, again.id, time.monotonic() + 30)
            answer = {"us": e2e, "call_us": calls}
        elif cmd == "quit":
            break
        else:
            answer = {"error": f"unknown command {cmd}"}
        print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
