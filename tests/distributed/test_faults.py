"""Faults around a retry: the broker is down, the database is unreachable."""

from __future__ import annotations

import importlib.util
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import LEASE, Workers, free_port
from dist_support import (
    TASK_NAME,
    history,
    policy,
    runs,
    serve_api,
    status_of,
    wait_for,
)
from private_services import PrivateRedis

from deepwork_retry import ExecutorService, RetryService, StorageUnavailable
from deepwork_retry.dispatch.relay import run_relay

celery = pytest.importorskip("celery")

from deepwork_retry.dispatch.celery import (  # noqa: E402 - after the importorskip
    AsyncCeleryDispatcher,
    CeleryDispatcher,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(free_port(), tmp_path)
    try:
        yield server
    finally:
        server.cleanup()


def blocked_task(storage: Any) -> ExecutorService:
    svc = ExecutorService(storage, policy=policy(LEASE))
    svc.create_project("p")
    svc.add_task("p", "t", max_retries=0)
    svc.block("p", "t", message="waiting for a person")
    return svc


def test_broker_down_retry_is_pending_until_the_relay_delivers(
    private_redis: PrivateRedis, storage: Any, workers: Workers, runs_path: Path
) -> None:
    """A retry while the broker is down is dispatch pending; once it is up the relay sends it."""
    queue = f"dwtest_{uuid.uuid4().hex[:10]}"
    blocked_task(storage)
    app = celery.Celery("deepwork_test_client", broker=private_redis.url)
    dispatcher = CeleryDispatcher(app, task_name=TASK_NAME, queue=queue)

    with serve_api(storage, AsyncCeleryDispatcher(dispatcher)) as http_retry:
        body = http_retry("p", "t")
    assert (200, "assigned", "pending") == (
        body["http_status"], body["task"]["status"], body["dispatch"]["status"]
    )  # fmt: skip
    entry = storage.dispatches("p", "t")[-1]
    assert ("pending", 1, 1) == (entry.state.value, entry.attempt, entry.tries)
    assert "OperationalError" in (entry.last_error or "")

    private_redis.start()
    workers.celery(private_redis.url, queue)
    delivered: list[int] = []

    def relayed() -> bool:
        delivered.append(run_relay(storage, dispatcher, once=True))
        return sum(delivered) > 0

    wait_for("the relay to deliver the pending entry", relayed, timeout=60, every=0.5)
    wait_for("the retried attempt to finish", lambda: status_of(storage, "p", "t") == "done")
    assert [(1, "manual_retry", "succeeded")] == history(storage, "p", "t")
    assert {("t", 1): 1} == dict(runs(runs_path))
    assert "delivered" == storage.dispatches("p", "t")[-1].state.value


@pytest.mark.skipif(
    importlib.util.find_spec("deepwork_retry.storage.postgres") is None,
    reason="needs deepwork_retry.storage.postgres",
)
def test_unreachable_database_answers_503_and_changes_nothing(
    storage_spec: dict[str, Any], storage: Any
) -> None:
    """A retry against an unreachable PostgreSQL is a 503 and leaves the task as it was."""
    from deepwork_retry.storage.postgres import PostgresStorage

    blocked_task(storage)
    _, before = storage.load("p", "t")
    attempts_before = storage.attempts("p", "t")
    dispatches_before = storage.dispatches("p", "t")

    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/test?connect_timeout=2"
    # migrate=False: the pool opens without waiting, so the failure comes during the retry.
    unreachable = PostgresStorage(dsn, schema=storage_spec["schema"], migrate=False, timeout=2)
    app = celery.Celery("deepwork_test_client", broker=f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(StorageUnavailable):
            RetryService(unreachable).retry("p", "t")
        with serve_api(unreachable, AsyncCeleryDispatcher(CeleryDispatcher(app))) as http_retry:
            body = http_retry("p", "t")
    finally:
        unreachable.close()
    assert 503 == body["http_status"]
    assert body["http_retry_after"] is not None
    assert isinstance(body["detail"], str)
    _, after = storage.load("p", "t")
    assert (before, attempts_before, dispatches_before) == (
        after, storage.attempts("p", "t"), storage.dispatches("p", "t")
    )  # fmt: skip
