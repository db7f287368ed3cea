"""A message lost by the broker: the reaper hands the attempt out again and a worker runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import LEASE, Workers
from dist_support import TASK_NAME, history, runs, status_of, wait_for

from deepwork_retry import ExecutorService, NoBackoff, RetryPolicy
from deepwork_retry.dispatch.reaper import run_reaper
from deepwork_retry.dispatch.relay import run_relay

celery = pytest.importorskip("celery")
redis = pytest.importorskip("redis")

from deepwork_retry.dispatch.celery import CeleryDispatcher  # noqa: E402 - after the importorskip

pytestmark = pytest.mark.slow

START = 1.0
"""Seconds a delivered attempt may wait to be started (short, for the test)."""


def test_purged_message_is_redelivered_and_runs_once(
    redis_url: str,
    queue_name: str,
    storage: Any,
    workers: Workers,
    runs_path: Path,
    queue_cleanup: list[tuple[str, list[str]]],
) -> None:
    """A delivery purged from Redis before any worker took it is sent again once the start
    timeout passes; a worker then runs the attempt exactly once."""
    queue_cleanup.append((redis_url, [queue_name]))
    app = celery.Celery("deepwork_test_client", broker=redis_url)
    app.conf.update(task_default_queue=queue_name, broker_connection_retry_on_startup=False)
    dispatcher = CeleryDispatcher(app, task_name=TASK_NAME)
    policy = RetryPolicy(backoff=NoBackoff(), lease=LEASE, start_timeout=START)
    svc = ExecutorService(storage, dispatcher, policy=policy)
    svc.create_project("p")
    svc.add_task("p", "t")
    assert "dispatched" == svc.assign("p", "t").dispatches[0].status

    broker = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        assert 1 == broker.llen(queue_name)
        broker.delete(queue_name)  # the broker forgets the message
    finally:
        broker.close()
    workers.celery(redis_url, queue_name)

    def done() -> bool:
        if status_of(storage, "p", "t") == "assigned":
            run_reaper(storage, once=True, policy=policy)
            run_relay(storage, dispatcher, once=True)
        return status_of(storage, "p", "t") == "done"

    wait_for("the redelivered attempt to finish", done, timeout=60, every=0.25)
    assert [(1, "initial", "succeeded")] == history(storage, "p", "t")
    assert {("t", 1): 1} == dict(runs(runs_path))
