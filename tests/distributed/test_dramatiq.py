"""Dramatiq end to end: real worker processes on RabbitMQ and on Redis, a shared store, HTTP."""

from __future__ import annotations

import contextlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import LEASE, Workers, free_port, pika_url
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

from deepwork_retry import DispatchEntry, DispatchState, ExecutorService
from deepwork_retry.dispatch.reaper import run_reaper
from deepwork_retry.exceptions import DispatchError

dramatiq = pytest.importorskip("dramatiq")

from deepwork_retry.dispatch.dramatiq import (  # noqa: E402 - after the importorskip
    AsyncDramatiqDispatcher,
    DramatiqDispatcher,
)

pytestmark = pytest.mark.slow


def make_broker(url: str) -> Any:
    if url.startswith("redis"):
        from dramatiq.brokers.redis import RedisBroker

        return RedisBroker(url=url)
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    return RabbitmqBroker(url=url, confirm_delivery=True)


def queues(url: str, queue: str) -> list[str]:
    """The names Dramatiq uses for ``queue`` (and its delay and dead-letter queues)."""
    if url.startswith("redis"):
        names = [queue, f"{queue}.DQ", f"{queue}.XQ"]
        return [f"dramatiq:{name}{suffix}" for name in names for suffix in ("", ".msgs", ".acks")]
    return [queue, f"{queue}.DQ", f"{queue}.XQ"]


@pytest.fixture(params=["rabbitmq", "redis"])
def broker_url(
    request: pytest.FixtureRequest, queue_name: str, queue_cleanup: list[tuple[str, list[str]]]
) -> str:
    url = pika_url(request.getfixturevalue(f"{request.param}_url"))
    queue_cleanup.append((url, queues(url, queue_name)))
    return url


def dispatcher_for(url: str, queue: str) -> tuple[Any, DramatiqDispatcher]:
    broker = make_broker(url)
    return broker, DramatiqDispatcher(broker, actor_name=TASK_NAME, queue_name=queue)


def test_retry_flow(
    broker_url: str, queue_name: str, storage: Any, workers: Workers, runs_path: Path
) -> None:
    """Fail, automatic retry, block, manual retry over HTTP, done: each attempt ran once."""
    workers.dramatiq(broker_url, queue_name)
    broker, dispatcher = dispatcher_for(broker_url, queue_name)
    try:
        with serve_api(storage, AsyncDramatiqDispatcher(dispatcher)) as http_retry:
            check_retry_flow(storage, dispatcher, runs_path, http_retry)
    finally:
        broker.close()


def test_killed_worker_attempt_is_reaped_and_retried(
    rabbitmq_url: str,
    queue_name: str,
    storage: Any,
    workers: Workers,
    runs_path: Path,
    queue_cleanup: list[tuple[str, list[str]]],
) -> None:
    """Killed mid-attempt: the reaper fails it as lost, the policy retries, a new worker ends it."""
    rabbitmq_url = pika_url(rabbitmq_url)
    queue_cleanup.append((rabbitmq_url, queues(rabbitmq_url, queue_name)))
    broker, dispatcher = dispatcher_for(rabbitmq_url, queue_name)
    try:
        worker = workers.dramatiq(rabbitmq_url, queue_name)
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
        workers.dramatiq(rabbitmq_url, queue_name)
        wait_for("attempt 2 to finish", lambda: status_of(storage, "p", "long") == "done")
        expected = [(1, "initial", "lost"), (2, "auto_retry", "succeeded")]
        assert expected == history(storage, "p", "long")
        assert {("long", 1): 1, ("long", 2): 1} == dict(runs(runs_path))
    finally:
        broker.close()


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_unreachable_broker_raises_dispatch_error(scheme: str, queue_name: str) -> None:
    """Enqueueing on a broker nobody listens on raises DispatchError carrying the client's error."""
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0" if scheme == "redis" else f"amqp://127.0.0.1:{port}/%2F"
    broker, dispatcher = dispatcher_for(url, queue_name)
    now = datetime.now(timezone.utc)
    entry = DispatchEntry(
        project_id="p", task_id="t", attempt=1, state=DispatchState.PENDING,
        available_at=now, created_at=now,
    )  # fmt: skip
    try:
        with pytest.raises(DispatchError) as caught:
            dispatcher.dispatch(entry)
    finally:
        with contextlib.suppress(Exception):
            broker.close()
    assert caught.value.__cause__ is not None
    assert "attempt 1 of task 't'" in str(caught.value)
