"""Fixtures for the distributed tests: a shared store, real worker processes, queue cleanup.

The store is PostgreSQL (one fresh schema per test) when the PostgreSQL
storage is installed and the server is up, else SQLite on a file every process
opens. Worker processes are started in their own session so a test can kill
the whole process tree, and every one is stopped at teardown.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BIN = Path(sys.executable).parent
LEASE = 3.0
"""The lease the worker processes and the tests' services use (seconds)."""


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


@pytest.fixture
def storage_spec(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Where the test and its workers keep state: a fresh PostgreSQL schema, else SQLite."""
    if has_module("deepwork_retry.storage.postgres"):
        dsn: str = request.getfixturevalue("postgres_dsn")
        import psycopg

        from deepwork_retry.storage.postgres import migrate

        schema = f"dwdist_{uuid.uuid4().hex[:12]}"
        migrate(dsn, schema=schema)
        try:
            yield {"kind": "postgres", "dsn": dsn, "schema": schema}
        finally:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        return
    if not has_module("deepwork_retry.storage.sqlite"):
        pytest.skip("needs deepwork_retry.storage.postgres or deepwork_retry.storage.sqlite")
    yield {"kind": "sqlite", "path": str(tmp_path / "shared.db")}


@pytest.fixture
def storage(storage_spec: dict[str, Any]) -> Iterator[Any]:
    from dist_support import open_storage

    store = open_storage(storage_spec)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def queue_name() -> str:
    return f"dwtest_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def runs_path(tmp_path: Path) -> Path:
    return tmp_path / "runs.log"


class WorkerProcess:
    """One queue worker (a process tree in its own session) with its log file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, ready: str) -> None:
        self.argv = argv
        self.env = env
        self.log = log
        self.ready = ready
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=HERE,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while self.ready not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"worker did not start:\n{self.tail()}")
            time.sleep(0.1)
        return self

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the worker and every process it started."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None:
                self._signal_group(signal.SIGKILL)  # children a dead parent left behind
            return
        self._signal_group(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=15)
        self._signal_group(signal.SIGKILL)
        self.proc.wait(timeout=30)


class Workers:
    """Starts worker processes for one test and stops them all at teardown."""

    def __init__(self, tmp_path: Path, storage_spec: dict[str, Any], runs: Path) -> None:
        self.tmp_path = tmp_path
        self.storage_spec = storage_spec
        self.runs = runs
        self.started: list[WorkerProcess] = []
        self.extra_env: dict[str, str] = {}
        """More environment for the workers started from now on."""

    def env(self, broker: str, queue: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT)]),
            DEEPWORK_TEST_BROKER=broker,
            DEEPWORK_TEST_QUEUE=queue,
            DEEPWORK_TEST_STORAGE=json.dumps(self.storage_spec),
            DEEPWORK_TEST_LEASE=str(LEASE),
            DEEPWORK_TEST_RUNS=str(self.runs),
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        return env

    def celery(self, broker: str, queue: str) -> WorkerProcess:
        n = len(self.started)
        argv = [
            str(BIN / "celery"), "-A", "celery_app", "worker",
            "--pool=prefork", "--concurrency=1", "-Q", queue, "-n", f"w{n}-{queue}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel=INFO",
        ]  # fmt: skip
        return self._start(argv, broker, queue, "ready.")

    def dramatiq(self, broker: str, queue: str) -> WorkerProcess:
        argv = [str(BIN / "dramatiq"), "dramatiq_app", "-p", "1", "-t", "1", "-Q", queue]
        return self._start(argv, broker, queue, "ready for action")

    def _start(self, argv: list[str], broker: str, queue: str, ready: str) -> WorkerProcess:
        log = self.tmp_path / f"worker-{len(self.started)}.log"
        worker = WorkerProcess(argv, self.env(broker, queue), log, ready)
        self.started.append(worker)
        return worker.start()

    def stop_all(self) -> None:
        for worker in self.started:
            worker.stop()


@pytest.fixture
def queue_cleanup() -> Iterator[list[tuple[str, list[str]]]]:
    """``(broker_url, queue_names)`` to drop at teardown, after every worker has stopped."""
    pending: list[tuple[str, list[str]]] = []
    yield pending
    for url, names in pending:
        drop_queues(url, names)


@pytest.fixture
def workers(
    tmp_path: Path,
    storage_spec: dict[str, Any],
    runs_path: Path,
    queue_cleanup: list[tuple[str, list[str]]],
) -> Iterator[Workers]:
    pool = Workers(tmp_path, storage_spec, runs_path)
    try:
        yield pool
    finally:
        pool.stop_all()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pika_url(url: str) -> str:
    """``amqp://host//`` (kombu's spelling of the ``/`` vhost) as pika spells it."""
    if url.startswith("amqp") and url.endswith("//"):
        return url[:-1] + "%2F"
    return url


def drop_queues(broker: str, names: list[str]) -> None:
    """Remove a test's queues from a shared broker (best effort)."""
    try:
        if broker.startswith("redis"):
            import redis

            client = redis.Redis.from_url(broker, socket_timeout=5)
            # Celery's Redis transport also keeps a binding table per queue.
            bindings = [f"_kombu.binding{kind}.{n}" for n in names for kind in ("", "_permanent")]
            client.delete(*names, *bindings)
            client.close()
        else:
            import pika

            params = pika.URLParameters(pika_url(broker))
            params.socket_timeout = 5
            conn = pika.BlockingConnection(params)
            channel = conn.channel()
            for name in names:
                channel.queue_delete(queue=name)
            conn.close()
    except Exception as exc:  # noqa: BLE001 - cleanup must not hide the test's own result
        print(f"could not drop queues {names} on {broker}: {exc!r}")
