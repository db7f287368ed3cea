"""Drives RQ's manual requeue of failed jobs; runs in the peer's own virtualenv.

    python rq_driver.py REDIS_URL            # the driver, spoken to over pipes
    python rq_driver.py REDIS_URL worker     # RQ's default Worker on the "worker" queue
    python rq_driver.py REDIS_URL simple     # RQ's SimpleWorker on the "simple" queue

The driver reads one command per line on stdin and answers one JSON line:

- ``facts``: the Redis server's version and persistence settings, and one
  round trip (PING, median).
- ``setup QUEUE N``: enqueue N jobs on ``bench_qpeers_QUEUE`` and fail each of
  them through RQ's own ``SimpleWorker`` (burst mode, in this process), so they
  sit in the queue's ``FailedJobRegistry`` as a worker leaves them; answers
  ``{"ok": N}``.
- ``run K``: requeue the next K failed jobs of queue ``call`` with
  ``FailedJobRegistry.requeue``, timing each call; answers ``{"us": [...]}``.
- ``start QUEUE K``: for each of the next K failed jobs of ``QUEUE`` (``worker``
  or ``simple``): requeue
  it and wait until the worker process has started the job body (the body
  pushes ``time.monotonic_ns()`` first thing, one clock for every process on
  Linux) and has finished with the job; answers ``{"us": [...], "call_us": [...]}``
  (requeue call → body start, and the requeue call alone).
- ``quit``.

This file imports RQ only; the benchmark talks to it through pipes.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from redis import Redis
from rq import Queue, SimpleWorker, Worker, get_current_job
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry

STARTED = "bench_qpeers:started"


def body() -> None:
    """The job: note when it starts, then fail (so setup leaves it failed)."""
    now = time.monotonic_ns()
    job = get_current_job()
    assert job is not None
    job.connection.lpush(STARTED, now)
    raise RuntimeError("bench_qpeers: failing on purpose")


def worker(url: str, kind: str) -> int:
    conn = Redis.from_url(url)
    queue = Queue(f"bench_qpeers_{kind}", connection=conn)
    # RQ's default Worker forks a work horse for each job; SimpleWorker runs it in place.
    cls = Worker if kind == "worker" else SimpleWorker
    cls([queue], connection=conn).work(logging_level="CRITICAL", with_scheduler=False)
    return 0


def wait_failed(job: Job, deadline: float) -> None:
    while time.monotonic() < deadline:
        if job.get_status(refresh=True) == JobStatus.FAILED:
            return
        time.sleep(0.0005)
    raise TimeoutError(f"job {job.id} did not fail again in time")


def ping_median(conn: Redis, n: int = 500) -> float:
    """One loopback round trip to Redis from this process (PING), median of ``n``, µs."""
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        conn.ping()
        samples.append((time.perf_counter_ns() - t0) / 1000)
    return sorted(samples)[n // 2]


def main() -> int:
    url = sys.argv[1]
    if sys.argv[2:] in (["worker"], ["simple"]):
        return worker(url, sys.argv[2])
    import rq_driver  # the jobs must name an importable function, not __main__'s

    logging.getLogger("rq").setLevel(logging.CRITICAL)
    conn = Redis.from_url(url)
    failed: dict[str, list[str]] = {}
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "facts":
            info = conn.info("server")
            config = conn.config_get("*")
            answer = {
                "redis_version": info.get("redis_version"),
                **{k: config.get(k) for k in ("appendonly", "appendfsync", "save")},
                "rq": __import__("rq").__version__,
                "redis_ping_us_median": ping_median(conn),
            }
        elif cmd == "setup":
            name, n = args[0], int(args[1])
            queue = Queue(f"bench_qpeers_{name}", connection=conn)
            jobs = [queue.enqueue(rq_driver.body) for _ in range(n)]
            SimpleWorker([queue], connection=conn).work(
                burst=True, logging_level="CRITICAL", with_scheduler=False
            )
            conn.delete(STARTED)
            registry = FailedJobRegistry(queue=queue)
            ids = set(registry.get_job_ids())
            failed[name] = [job.id for job in jobs if job.id in ids]
            answer = {"ok": len(failed[name])}
        elif cmd == "run":
            k = int(args[0])
            batch, failed["call"] = failed["call"][:k], failed["call"][k:]
            registry = FailedJobRegistry("bench_qpeers_call", connection=conn)
            samples = []
            for job_id in batch:
                t0 = time.perf_counter_ns()
                registry.requeue(job_id)
                samples.append((time.perf_counter_ns() - t0) / 1000)
            answer = {"us": samples}
        elif cmd == "start":
            name, k = args[0], int(args[1])
            batch, failed[name] = failed[name][:k], failed[name][k:]
            registry = FailedJobRegistry(f"bench_qpeers_{name}", connection=conn)
            e2e, calls = [], []
            for job_id in batch:
                t0 = time.monotonic_ns()
                job = registry.requeue(job_id)
                t1 = time.monotonic_ns()
                popped = conn.blpop([STARTED], timeout=30)
                if popped is None:
                    raise TimeoutError("the worker did not start the job in 30 s")
                e2e.append((int(popped[1]) - t0) / 1000)
                calls.append((t1 - t0) / 1000)
                wait_failed(job, time.monotonic() + 30)
            answer = {"us": e2e, "call_us": calls}
        elif cmd == "quit":
            break
        else:
            answer = {"error": f"unknown command {cmd}"}
        print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
