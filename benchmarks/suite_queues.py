"""End to end through Celery (Redis, RabbitMQ) and Dramatiq (RabbitMQ).

For each queue: ``POST .../tasks/T/retry`` over real HTTP to a uvicorn process
(``_queues_server.py``: the Starlette adapter over the demo's SQLite file,
``synchronous=FULL``, its dispatcher the library's Celery or Dramatiq one) up to
the moment the host's code starts the attempt in a real worker process
(``celery worker`` / ``dramatiq`` started here, ``_queues_app.py``), which
shares the SQLite file; then the same with a PostgreSQL schema shared instead
(``--quick`` keeps only Celery on Redis there). The floor goes through the same
server, broker, queue and worker: a bare Starlette endpoint commits one one-row
``UPDATE`` on the same storage and publishes a bare task with the queue's own
client; its end is the moment that task's body starts. A second floor's task
body also commits one one-row ``UPDATE`` before its end (a report row).
Requests are sequential, each retries a distinct blocked task, and the three
sides alternate in rounds. Every timestamp is ``time.monotonic()``, one clock
for all the processes; the worker reports its own through a Redis list after
the timed work.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _fixtures import add_blocked
from _harness import Figure, Row, alternate, unavailable
from suite_http import TOKEN, Server, free_port

from deepwork_retry.storage.sqlite import SQLiteStorage

HERE = Path(__file__).resolve().parent
GROUP = "queues"
TARGET = "≤ 1.2x"
REDIS_DB = int(os.environ.get("DEEPWORK_BENCH_QUEUES_REDIS_DB", "13"))
AMQP = os.environ.get("DEEPWORK_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
DSN = os.environ.get("DEEPWORK_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/test")
PIKA_AMQP = AMQP[:-2] + "/%2F" if AMQP.endswith("//") else AMQP
REPORTS = "bench_queues:reports"
LIB_PATH = "/api/deep-work/projects/p/tasks/%s/retry"
FLOOR_PATH = "/floor/projects/p/tasks/%s/retry"
FLOOR2_PATH = "/floor2/projects/p/tasks/%s/retry"
WARMUP = 5

# (label, kind, broker URL, queue name)
CONFIGS = [
    (
        "Celery on Redis",
        "celery-redis",
        f"redis://127.0.0.1:6379/{REDIS_DB}",
        "bench_queues_celery",
    ),
    ("Celery on RabbitMQ", "celery-amqp", AMQP, "bench_queues_celery"),
    # pika reads the vhost from the path, "/" being "%2F"; kombu's "//" means the same.
    ("Dramatiq on RabbitMQ", "dramatiq-amqp", PIKA_AMQP, "bench_queues_dramatiq"),
]


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def redis_client() -> Any:
    import redis

    return redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)


class Worker:
    """A queue worker process of ``_queues_app.py``, in its own process group."""

    def __init__(self, kind: str, queue: str, env: dict[str, str], log: Path) -> None:
        if kind.startswith("celery"):
            # One child process taking one message at a time (late acks), the
            # worker's chatter with other workers off.
            argv = [
                sys.executable, "-m", "celery", "-A", "_queues_app", "worker",
                "--pool", "prefork", "--concurrency", "1", "--prefetch-multiplier", "1",
                "--queues", queue, "--without-gossip", "--without-mingle",
                "--without-heartbeat", "--loglevel", "WARNING",
            ]  # fmt: skip
        else:
            argv = [
                sys.executable, "-m", "dramatiq", "_queues_app",
                "--processes", "1", "--threads", "1", "--queues", queue,
            ]  # fmt: skip
        self.argv = argv
        self.handle = log.open("wb")
        self.proc = subprocess.Popen(
            argv,
            stdout=self.handle,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=HERE,
            start_new_session=True,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.handle.close()


class Client:
    """Sequential requests on one keep-alive connection, each followed by its worker report."""

    def __init__(self, port: int, reports: Any) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.headers = {"Authorization": f"Bearer {TOKEN}", "Content-Length": "0"}
        self.reports = reports
        self.samples: dict[str, dict[str, float]] = {}

    def one(self, path: str, ident: str, side: str, wait: float = 30.0) -> dict[str, float]:
        t0 = time.monotonic()
        self.conn.request("POST", path % ident, headers=self.headers)
        response = self.conn.getresponse()
        payload = response.read()
        t_ans = time.monotonic()
        if response.status != 200:
            raise RuntimeError(f"{side} {ident}: HTTP {response.status} {payload[:200]!r}")
        got = self.reports.blpop([REPORTS], timeout=wait)
        if got is None:
            raise RuntimeError(f"{side} {ident}: no worker report within {wait:g}s")
        report = json.loads(got[1])
        if report["id"] != ident or report["side"] != side:
            raise RuntimeError(f"{side} {ident}: unexpected report {report}")
        sample = {"t0": t0, "t_ans": t_ans, **{k: v for k, v in report.items() if k[:2] == "t_"}}
        self.samples[ident] = sample
        return sample

    def times(self) -> dict[str, dict[str, float]]:
        self.conn.request("GET", "/bench/times")
        response = self.conn.getresponse()
        notes: dict[str, dict[str, float]] = json.loads(response.read())
        return notes

    def close(self) -> None:
        self.conn.close()


def prepare_db(path: Path, tasks: int) -> tuple[list[str], list[str], list[str]]:
    """The shared SQLite file: ``tasks`` blocked tasks, and the floors' table of rows."""
    storage = SQLiteStorage(str(path))
    lib_ids = add_blocked(storage, "p", tasks)
    storage.close()
    floor_ids = [f"f{i:07d}" for i in range(tasks)]
    floor2_ids = [f"g{i:07d}" for i in range(tasks)]
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("CREATE TABLE bench_queues_floor (id TEXT PRIMARY KEY, n INTEGER NOT NULL)")
        conn.executemany(
            "INSERT INTO bench_queues_floor VALUES (?, 0)", [(i,) for i in floor_ids + floor2_ids]
        )
    finally:
        conn.close()
    return lib_ids, floor_ids, floor2_ids


def drop_schema(schema: str) -> None:
    import psycopg

    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def prepare_pg(schema: str, tasks: int) -> tuple[list[str], list[str], list[str]]:
    """The shared PostgreSQL schema: as :func:`prepare_db`, in the schema ``schema``."""
    import psycopg

    from deepwork_retry.storage.postgres import PostgresStorage

    drop_schema(schema)
    storage = PostgresStorage(DSN, schema=schema, max_size=2)
    try:
        lib_ids = add_blocked(storage, "p", tasks)
    finally:
        storage.close()
    floor_ids = [f"f{i:07d}" for i in range(tasks)]
    floor2_ids = [f"g{i:07d}" for i in range(tasks)]
    with psycopg.connect(DSN) as conn:
        conn.execute(
            f'CREATE TABLE "{schema}".bench_queues_floor (id text PRIMARY KEY, n int NOT NULL)'
        )
        with conn.cursor() as cur:
            cur.executemany(
                f'INSERT INTO "{schema}".bench_queues_floor VALUES (%s, 0)',
                [(i,) for i in floor_ids + floor2_ids],
            )
    return lib_ids, floor_ids, floor2_ids


def pg_available() -> str | None:
    """Why PostgreSQL cannot be used, or ``None``."""
    try:
        import psycopg

        with psycopg.connect(DSN, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - the reason goes into the row
        return f"PostgreSQL at {DSN} unreachable ({type(exc).__name__})"
    return None


def cleanup_amqp(queue: str) -> dict[str, Any]:
    """Delete the queue(s) and exchange this run declared on RabbitMQ."""
    import kombu

    done: dict[str, Any] = {"deleted_queues": [], "deleted_exchanges": []}
    with kombu.Connection(AMQP, connect_timeout=5) as conn:
        channel = conn.channel()
        # Dramatiq declares a delay queue and a dead-letter queue beside the queue.
        for name in (queue, f"{queue}.DQ", f"{queue}.XQ", f"{queue}.DQ.XQ"):
            try:
                channel.queue_delete(name)
                done["deleted_queues"].append(name)
            except Exception:  # noqa: BLE001 - a queue that was never declared
                channel = conn.channel()
        try:
            channel.exchange_delete(queue)
            done["deleted_exchanges"].append(queue)
        except Exception:  # noqa: BLE001 - an exchange that was never declared
            pass
    return done


def spans(
    samples: list[dict[str, float]], notes: dict[str, dict[str, float]], ids: list[str]
) -> dict[str, list[float]]:
    """Per request, in µs: the end-to-end time and its parts."""
    out: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        out.setdefault(name, []).append(value * 1e6)

    for ident, s in zip(ids, samples, strict=True):
        n = notes.get(ident, {})
        end = s.get("t_host", s["t_body"])
        add("e2e", end - s["t0"])
        add("answer", s["t_ans"] - s["t0"])
        add("to_body", s["t_body"] - s["t0"])
        if "t_pub0" in n:
            committed = n.get("t_hand", n.get("t_c1", n["t_pub0"]))
            add("to_commit", committed - s["t0"])
            add("commit_to_publish", n["t_pub0"] - committed)
            add("publish", n["t_pub1"] - n["t_pub0"])
            add("publish_to_body", s["t_body"] - n["t_pub0"])
            add("answer_after_publish", s["t_ans"] - n["t_pub1"])
        if "t_mark0" in n:
            add("mark", n["t_mark1"] - n["t_mark0"])
            # How long the worker's start began while the web's delivery mark held on.
            add("start_under_mark", max(0.0, n["t_mark1"] - s["t_body"]))
        if "t_host" in s:
            add("start_commit", s["t_host"] - s["t_body"])
        if "t_started" in s:
            # The library's start: the call (load, the write, its commit), then
            # what run_attempt does before the host's code (the heartbeat thread).
            add("start_call", s["t_started"] - s["t_body"])
            add("started_to_host", s["t_host"] - s["t_started"])
        elif "t_c0" in n:
            add("start_commit", n["t_c1"] - n["t_c0"])
    return out


def one_queue(
    label: str,
    kind: str,
    broker: str,
    queue: str,
    store: str,
    rounds: int,
    per_round: int,
    scratch: Path,
    logs: Path,
) -> list[Row]:
    started = time.monotonic()
    tasks = WARMUP + rounds * per_round
    db = scratch / f"bench_queues_{kind}.db"
    schema = "bench_queues_" + kind.replace("-", "_")
    if store == "postgres":
        lib_ids, floor_ids, floor2_ids = prepare_pg(schema, tasks)
    else:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        lib_ids, floor_ids, floor2_ids = prepare_db(db, tasks)
    env = {
        "BENCH_QUEUES_STORE": store,
        "BENCH_QUEUES_DSN": DSN,
        "BENCH_QUEUES_SCHEMA": schema,
        **os.environ,
        "BENCH_QUEUES_KIND": kind,
        "BENCH_QUEUES_BROKER": broker,
        "BENCH_QUEUES_QUEUE": queue,
        "BENCH_QUEUES_DB": str(db),
        "BENCH_QUEUES_REPORT_DB": str(REDIS_DB),
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)]),
    }
    reports = redis_client()
    reports.delete(REPORTS)
    worker: Worker | None = None
    server: Server | None = None
    client: Client | None = None
    extra: dict[str, Any] = {"broker": broker.replace("guest:guest@", ""), "queue": queue}
    try:
        worker = Worker(kind, queue, env, logs / f"queues-{kind}-{store}-worker.log")
        port = free_port()
        server = Server(
            [sys.executable, str(HERE / "_queues_server.py"), str(port), TOKEN],
            port,
            logs / f"queues-{kind}-{store}-server.log",
            env=env,
        )
        client = Client(port, reports)
        # Readiness: the first floor request waits for the worker to take its
        # message (the worker may still be starting); then a few of each side
        # warm the connections, the pools and the worker.
        client.one(FLOOR_PATH, floor_ids[0], "floor", wait=60.0)
        for i in range(1, WARMUP):
            client.one(FLOOR_PATH, floor_ids[i], "floor")
        for i in range(WARMUP):
            client.one(LIB_PATH, lib_ids[i], "library")
            client.one(FLOOR2_PATH, floor2_ids[i], "floor2")
        extra["ready_s"] = round(time.monotonic() - started, 3)

        lib_used: list[str] = []
        floor_used: list[str] = []
        floor2_used: list[str] = []
        lib_fig = Figure("library", "us")
        floor_fig = Figure("floor", "us")
        floor2_fig = Figure("floor with a commit in the task body", "us")

        def side(
            path: str, ids: list[str], used: list[str], name: str
        ) -> Callable[[int], list[float]]:
            def run_round(r: int) -> list[float]:
                chunk = ids[WARMUP + r * per_round : WARMUP + (r + 1) * per_round]
                out = []
                for ident in chunk:
                    s = client.one(path, ident, name)  # type: ignore[union-attr]
                    used.append(ident)
                    out.append((s.get("t_host", s["t_body"]) - s["t0"]) * 1e6)
                return out

            return run_round

        alternate(
            [
                (lib_fig, side(LIB_PATH, lib_ids, lib_used, "library")),
                (floor_fig, side(FLOOR_PATH, floor_ids, floor_used, "floor")),
                (floor2_fig, side(FLOOR2_PATH, floor2_ids, floor2_used, "floor2")),
            ],
            rounds,
        )
        notes = client.times()
        lib_parts = spans([client.samples[i] for i in lib_used], notes, lib_used)
        floor_parts = spans([client.samples[i] for i in floor_used], notes, floor_used)
        floor2_parts = spans([client.samples[i] for i in floor2_used], notes, floor2_used)
        extra["seconds"] = round(time.monotonic() - started, 3)
        extra["rounds"] = rounds
        extra["per_round"] = per_round
        extra["worker"] = " ".join(worker.argv[2:])
        extra["storage"] = (
            f"PostgreSQL schema {schema}, shared by server and worker"
            if store == "postgres"
            else "SQLite file, synchronous=FULL, WAL, shared by server and worker"
        )
        lib_fig.extra.update(
            extra, parts=lib_parts, timestamps=[client.samples[i] for i in lib_used]
        )
        floor_fig.extra.update(
            extra, parts=floor_parts, timestamps=[client.samples[i] for i in floor_used]
        )
        floor2_fig.extra.update(
            extra, parts=floor2_parts, timestamps=[client.samples[i] for i in floor2_used]
        )
        overlapped = [x for x in lib_parts.get("start_under_mark", []) if x > 0]
        lib_fig.extra["starts_during_the_delivery_mark"] = len(overlapped)
        rows = [
            Row(
                GROUP,
                f"{label}: POST /retry → host code starts, vs commit + bare publish → task body",
                lib_fig,
                floor_fig,
                target=TARGET,
                bound=1.2,
            ),
            Row(
                GROUP,
                f"{label}: the same, vs the floor with one more commit in the task body",
                lib_fig,
                floor2_fig,
                target="report",
            ),
        ]
        parts = [
            ("answer", "HTTP answer (request → response)"),
            ("to_commit", "request → commit done (HTTP in, the transaction)"),
            ("commit_to_publish", "commit done → publish starts"),
            ("publish", "publish call (until the broker client returns)"),
            ("publish_to_body", "publish starts → task body starts (broker, worker)"),
            ("start_commit", "worker's start (its commit) vs a one-row commit in the task body"),
            ("mark", "the web's delivery mark (after the publish) vs the floor's commit"),
        ]

        def reference(key: str) -> Figure:
            if key == "start_commit":  # the floor with a commit in the task body: that commit
                return Figure("floor's task-body commit", "us", floor2_parts.get(key, []))
            if key == "mark":  # the floor's own commit, before its publish
                return Figure("floor's commit", "us", floor_parts.get("start_commit", []))
            return Figure("floor", "us", floor_parts.get(key, []))

        for key, name in parts:
            rows.append(
                Row(
                    GROUP,
                    f"{label}: {name}",
                    Figure("library", "us", lib_parts.get(key, [])),
                    reference(key),
                    target="report",
                )
            )
        return rows
    finally:
        if client is not None:
            client.close()
        if server is not None:
            server.stop()
        if worker is not None:
            worker.stop()
        reports.delete(REPORTS)
        if kind == "celery-redis":
            reports.flushdb()
        elif kind.endswith("amqp"):
            extra["cleanup"] = cleanup_amqp(queue)
        reports.close()
        if store == "postgres":
            drop_schema(schema)


def run(quick: bool, scratch: Path, logs: Path) -> list[Row]:
    """The group's rows (sizes smaller with ``quick``)."""
    rounds, per_round = (2, 10) if quick else (10, 25)
    try:
        reports = redis_client()
        reports.ping()
        if reports.dbsize():
            return [
                unavailable(GROUP, label, f"Redis db {REDIS_DB} is not empty", TARGET)
                for label, *_ in CONFIGS
            ]
        reports.close()
    except Exception as exc:  # noqa: BLE001 - no Redis: nothing here can run
        reason = f"Redis at 127.0.0.1:6379 unreachable ({type(exc).__name__})"
        return [unavailable(GROUP, label, reason, TARGET) for label, *_ in CONFIGS]
    rows: list[Row] = []
    no_pg = pg_available()
    for store, store_label in (("sqlite", "SQLite"), ("postgres", "PostgreSQL")):
        for label, kind, broker, queue in CONFIGS:
            name = f"{label}, {store_label}"
            if store == "postgres" and quick and kind != "celery-redis":
                continue  # the smoke run keeps one PostgreSQL queue
            if store == "postgres" and no_pg:
                rows.append(unavailable(GROUP, name, no_pg, TARGET))
                continue
            if kind.endswith("amqp") and not port_open("127.0.0.1", 5672):
                reason = "RabbitMQ at 127.0.0.1:5672 unreachable"
                rows.append(unavailable(GROUP, name, reason, TARGET))
                continue
            try:
                rows.extend(
                    one_queue(name, kind, broker, queue, store, rounds, per_round, scratch, logs)
                )
            except Exception as exc:  # noqa: BLE001 - one queue failing leaves the others
                rows.append(unavailable(GROUP, name, f"{type(exc).__name__}: {exc}"[:160], TARGET))
    return rows
