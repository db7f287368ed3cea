"""Celery end to end: real worker processes on Redis and on RabbitMQ, a shared store, HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import LEASE, Workers
from dist_support import (
    TASK_NAME,
    check_retry_flow,
    history,
    policy,
    runs,
    serve_api,
    status_of,
    wait_for,
)

from deepwork_retry import ExecutorService
from deepwork_retry.dispatch.reaper import run_reaper

celery = pytest.importorskip("celery")

from deepwork_retry.dispatch.celery import (  # noqa: E402 - after the importorskip
    AsyncCeleryDispatcher,
    CeleryDispatcher,
)

pytestmark = pytest.mark.slow


def celery_app(broker: str, queue: str) -> Any:
    app = celery.Celery("deepwork_test_client", broker=broker)
    app.conf.update(task_default_queue=queue, broker_connection_retry_on_startup=False)
    return app


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(
    request: pytest.FixtureRequest, queue_name: str, queue_cleanup: list[tuple[str, list[str]]]
) -> str:
    url: str = request.getfixturevalue(f"{request.param}_url")
    queue_cleanup.append((url, [queue_name]))
    return url


def test_retry_flow(
    broker: str, queue_name: str, storage: Any, workers: Workers, runs_path: Path
) -> None:
    """Fail, automatic retry, block, manual retry over HTTP, done: each attempt ran once."""
    workers.celery(broker, queue_name)
    dispatcher = CeleryDispatcher(celery_app(broker, queue_name), task_name=TASK_NAME)
    with serve_api(storage, AsyncCeleryDispatcher(dispatcher)) as http_retry:
        check_retry_flow(storage, dispatcher, runs_path, http_retry)


def test_killed_worker_attempt_is_reaped_and_retried(
    rabbitmq_url: str,
    queue_name: str,
    storage: Any,
    workers: Workers,
    runs_path: Path,
    queue_cleanup: list[tuple[str, list[str]]],
) -> None:
    """Killed mid-attempt: the reaper fails it as lost, the policy retries, a new worker ends it."""
    queue_cleanup.append((rabbitmq_url, [queue_name]))
    worker = workers.celery(rabbitmq_url, queue_name)
    dispatcher = CeleryDispatcher(celery_app(rabbitmq_url, queue_name), task_name=TASK_NAME)
    svc = ExecutorService(storage, dispatcher, policy=policy(LEASE))
    svc.create_project("p")
    svc.add_task("p", "long", max_retries=1, metadata={"sleep_on": [1], "sleep": 120})
    svc.assign("p", "long")
    wait_for("attempt 1 to run", lambda: runs(runs_path)[("long", 1)] == 1)
    worker.kill()

    def reaped() -> bool:
        run_reaper(storage, once=True, policy=policy(LEASE), dispatcher=dispatcher)
        return history(storage, "p", "long")[0][2] == "lost"

    wait_for("the reaper to fail attempt 1 as lost", reaped, timeout=LEASE + 30, every=0.5)
    assert "assigned" == status_of(storage, "p", "long")
    workers.celery(rabbitmq_url, queue_name)
    wait_for("attempt 2 to finish", lambda: status_of(storage, "p", "long") == "done")
    expected = [(1, "initial", "lost"), (2, "auto_retry", "succeeded")]
    assert expected == history(storage, "p", "long")
    assert {("long", 1): 1, ("long", 2): 1} == dict(runs(runs_path))
