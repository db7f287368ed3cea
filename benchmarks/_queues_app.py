"""The queue side of the ``queues`` group: one module for the worker and the server.

Read by the worker (``celery -A _queues_app worker`` or ``dramatiq _queues_app``)
and imported by ``_queues_server.py``, so both sides build the same Celery app
or Dramatiq broker. The environment chooses the queue:

    BENCH_QUEUES_KIND       celery-redis, celery-amqp or dramatiq-amqp
    BENCH_QUEUES_BROKER     the broker URL
    BENCH_QUEUES_QUEUE      the queue name (``bench_queues_*``)
    BENCH_QUEUES_STORE      sqlite (the default) or postgres
    BENCH_QUEUES_DB         the SQLite file the library's tasks live in
    BENCH_QUEUES_DSN        with postgres: the server, and BENCH_QUEUES_SCHEMA the schema
    BENCH_QUEUES_REPORT_DB  the Redis db number the worker reports its timestamps to

Two tasks share the queue and the worker: the library's (``deepwork_task`` /
``deepwork_actor``, starting the attempt through ``ExecutorService.start`` on
the shared SQLite file) and the floor's, a bare task whose body only takes the
time. Every timestamp is ``time.monotonic()`` (CLOCK_MONOTONIC, one clock for
every process of the machine) and is sent to a Redis list once the work it
times is over, so the report is outside the timed path.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from deepwork_retry import ExecutorService, Task
from deepwork_retry.storage.sqlite import SQLiteStorage

KIND = os.environ["BENCH_QUEUES_KIND"]
BROKER = os.environ["BENCH_QUEUES_BROKER"]
QUEUE = os.environ["BENCH_QUEUES_QUEUE"]
DB = os.environ["BENCH_QUEUES_DB"]
STORE = os.environ.get("BENCH_QUEUES_STORE", "sqlite")
DSN = os.environ.get("BENCH_QUEUES_DSN", "")
SCHEMA = os.environ.get("BENCH_QUEUES_SCHEMA", "")
REPORT_DB = int(os.environ["BENCH_QUEUES_REPORT_DB"])
REPORTS = "bench_queues:reports"
LIB_TASK = "bench_queues_lib"
FLOOR_TASK = "bench_queues_floor"
FLOOR2_TASK = "bench_queues_floor2"

_client: tuple[int, redis.Redis] | None = None


def report(**fields: Any) -> None:
    """Push one report to the Redis list (one client per process: workers fork)."""
    global _client
    if _client is None or _client[0] != os.getpid():
        _client = (os.getpid(), redis.Redis(host="127.0.0.1", port=6379, db=REPORT_DB))
    _client[1].rpush(REPORTS, json.dumps(fields))


class TimedExecutor(ExecutorService):
    """The worker's executor service, noting when a delivery reaches ``start``.

    ``start`` is the first thing the library's task body does with a valid
    message, so its entry is the library's "task body starts"; the report
    goes out after ``succeed``, when the attempt is over.
    """

    body: ClassVar[dict[tuple[str, int], float]] = {}
    started: ClassVar[dict[tuple[str, int], float]] = {}
    host: ClassVar[dict[tuple[str, int], float]] = {}

    def start(self, project_id: str, task_id: str, token: int) -> Any:
        self.body[(task_id, token)] = time.monotonic()
        result = super().start(project_id, task_id, token)
        self.started[(task_id, token)] = time.monotonic()
        return result

    def succeed(self, project_id: str, task_id: str, token: int) -> Any:
        result = super().succeed(project_id, task_id, token)
        key = (task_id, token)
        report(
            side="library",
            id=task_id,
            t_body=self.body.pop(key),
            t_started=self.started.pop(key),
            t_host=self.host.pop(key),
            t_done=time.monotonic(),
            pid=os.getpid(),
        )
        return result


def executor() -> ExecutorService:
    if STORE == "postgres":
        from deepwork_retry.storage.postgres import PostgresStorage

        return TimedExecutor(PostgresStorage(DSN, schema=SCHEMA, max_size=2, migrate=False))
    return TimedExecutor(SQLiteStorage(DB))


def attempt(task: Task, token: int) -> None:
    """The host's code: the moment it starts is the end of the library's path."""
    TimedExecutor.host[(task.id, token)] = time.monotonic()


def floor_body(ident: str) -> None:
    """The floor's task body: the moment it starts is the end of the floor's path."""
    t_body = time.monotonic()
    report(side="floor", id=ident, t_body=t_body, t_done=t_body, pid=os.getpid())


def floor_commit() -> Callable[[str], None]:
    """One one-row ``UPDATE``, committed durably, on the storage the library uses."""
    if STORE == "postgres":
        import psycopg

        pg = psycopg.connect(DSN)
        sql = f'UPDATE "{SCHEMA}".bench_queues_floor SET n = n + 1 WHERE id = %s'

        def commit_pg(ident: str) -> None:
            pg.execute(sql, (ident,))
            pg.commit()

        return commit_pg
    conn = sqlite3.connect(DB, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA busy_timeout = 5000")

    def commit_sqlite(ident: str) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE bench_queues_floor SET n = n + 1 WHERE id = ?", (ident,))
        conn.execute("COMMIT")

    return commit_sqlite


_commit: tuple[int, Callable[[str], None]] | None = None


def floor2_body(ident: str) -> None:
    """The floor with the worker's commit: its body commits one one-row ``UPDATE``
    on the shared storage (SQLite ``synchronous=FULL``, or PostgreSQL) before its
    end is taken."""
    global _commit
    t_body = time.monotonic()
    if _commit is None or _commit[0] != os.getpid():
        _commit = (os.getpid(), floor_commit())
    _commit[1](ident)
    t_host = time.monotonic()
    report(side="floor2", id=ident, t_body=t_body, t_host=t_host, t_done=t_host, pid=os.getpid())


app: Any = None
broker: Any = None

if KIND.startswith("celery"):
    from celery import Celery

    from deepwork_retry.dispatch.celery import deepwork_task

    app = Celery("bench_queues", broker=BROKER)
    app.conf.update(
        task_default_queue=QUEUE,
        task_default_exchange=QUEUE,
        task_default_routing_key=QUEUE,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    deepwork_task(app, executor, name=LIB_TASK, queue=QUEUE)(attempt)
    # The floor task has the library task's options (late acks, requeue on a
    # lost worker, no result, no retries): same worker, same settings.
    app.task(
        name=FLOOR_TASK,
        queue=QUEUE,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        max_retries=0,
    )(floor_body)
    app.task(
        name=FLOOR2_TASK,
        queue=QUEUE,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        max_retries=0,
    )(floor2_body)
elif KIND == "dramatiq-amqp":
    import dramatiq
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    from deepwork_retry.dispatch.dramatiq import deepwork_actor

    broker = RabbitmqBroker(url=BROKER, confirm_delivery=True)
    dramatiq.set_broker(broker)
    deepwork_actor(broker, executor, actor_name=LIB_TASK, queue_name=QUEUE)(attempt)
    dramatiq.actor(actor_name=FLOOR_TASK, queue_name=QUEUE, broker=broker, max_retries=0)(
        floor_body
    )
    dramatiq.actor(actor_name=FLOOR2_TASK, queue_name=QUEUE, broker=broker, max_retries=0)(
        floor2_body
    )
else:
    raise SystemExit(f"unknown BENCH_QUEUES_KIND {KIND!r}")
