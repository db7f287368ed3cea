"""Dispatch attempts through Celery, and run them in Celery workers.

Install with ``pip install 'deepwork-retry[celery]'``, plus ``celery[redis]`` for a
Redis broker (RabbitMQ needs nothing more); see ``docs/install.md``.

The sending side, :class:`CeleryDispatcher`, publishes one message per
attempt carrying only ``[project_id, task_id, attempt]``; the task's state
stays in storage. The worker side, :func:`deepwork_task`, registers the Celery
task that starts the attempt, runs the host's function with a heartbeat and
reports the outcome through an :class:`~deepwork_retry.ExecutorService`.

Retries are the library's: the task never uses Celery's ``retry`` or
``autoretry_for``. A failure reported by the worker creates the next attempt
(after the policy's backoff) and its outbox entry, which the service's
dispatcher or an outbox relay delivers as a new message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

try:
    import celery
    from celery.exceptions import Reject
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    from deepwork_retry.exceptions import missing_extra

    raise missing_extra("celery", __name__, exc) from exc

from deepwork_retry._core.model import DispatchEntry
from deepwork_retry.dispatch._to_async import AsyncFromSyncDispatcher
from deepwork_retry.dispatch._worker import (
    DEFAULT_TASK_NAME,
    DeliveryOutcome,
    ExecutorFactory,
    ExecutorSource,
    HostFunction,
    run_attempt,
)
from deepwork_retry.exceptions import DispatchError

__all__ = [
    "DEFAULT_TASK_NAME",
    "AsyncCeleryDispatcher",
    "CeleryDispatcher",
    "DeliveryOutcome",
    "deepwork_task",
]

REQUEUE_DELAY = 1.0
"""Seconds a worker waits before handing back a message it could not start."""


class CeleryDispatcher:
    """A :class:`~deepwork_retry.Dispatcher` that sends each attempt as a Celery message.

    ``connect_timeout`` and ``connect_retries`` bound how long a dispatch
    waits for a broker that is down; the dispatch then raises
    :class:`~deepwork_retry.exceptions.DispatchError` and the outbox keeps the
    entry pending for the relay, instead of blocking the caller.
    """

    def __init__(
        self,
        app: celery.Celery,
        *,
        task_name: str = DEFAULT_TASK_NAME,
        queue: str | None = None,
        connect_timeout: float = 2.0,
        connect_retries: int = 1,
    ) -> None:
        self.app = app
        self.task_name = task_name
        self.queue = queue
        self.connect_timeout = connect_timeout
        self.connect_retries = connect_retries

    def dispatch(self, entry: DispatchEntry) -> None:
        options: dict[str, Any] = {}
        if self.queue is not None:
            options["queue"] = self.queue
        try:
            with self.app.pool.acquire(block=True, timeout=self.connect_timeout) as conn:
                conn.ensure_connection(
                    max_retries=self.connect_retries,
                    interval_start=0,
                    interval_step=0.2,
                    timeout=self.connect_timeout,
                )
                self.app.send_task(
                    self.task_name,
                    args=[entry.project_id, entry.task_id, entry.attempt],
                    # The trace context only when there is one: the message
                    # stays what workers without telemetry have always read.
                    kwargs=None if entry.trace is None else {"trace": entry.trace},
                    connection=conn,
                    retry=False,
                    ignore_result=True,
                    add_to_parent=False,
                    **options,
                )
        except Exception as exc:  # any broker client failure means "not accepted"
            raise DispatchError(
                f"could not publish attempt {entry.attempt} of task {entry.task_id!r} "
                f"to Celery task {self.task_name!r}: {type(exc).__name__}: {exc}"
            ) from exc


class AsyncCeleryDispatcher(AsyncFromSyncDispatcher[CeleryDispatcher]):
    """The :class:`~deepwork_retry.AsyncDispatcher` twin: publishes from a worker thread."""


def deepwork_task(
    app: celery.Celery,
    executor_factory: ExecutorFactory,
    *,
    name: str = DEFAULT_TASK_NAME,
    heartbeat_interval: float | None = None,
    **task_options: Any,
) -> Callable[[HostFunction], celery.Task]:
    """Register the host's ``fn(task, token)`` as the Celery task ``name``.

    ``executor_factory`` builds the :class:`~deepwork_retry.ExecutorService`
    (its storage, policy and dispatcher) once in each worker process. The
    heartbeat runs every ``heartbeat_interval`` seconds, by default a third of
    the policy's lease. ``task_options`` go to ``app.task`` (for example
    ``queue``); retry options are refused because retries belong to the policy.

    The task acknowledges late and rejects (requeues) its message when the
    worker process dies, so a delivery is never lost before the attempt
    starts; a second delivery of a started attempt runs nothing.
    """
    refused = {"autoretry_for", "max_retries", "retry_backoff", "retry_kwargs", "bind"}
    if refused & task_options.keys():
        raise ValueError(
            f"deepwork_task does not take {sorted(refused & task_options.keys())}: "
            "retries follow the library's retry policy"
        )

    def register(fn: HostFunction) -> celery.Task:
        source = ExecutorSource(executor_factory)

        def execute(
            project_id: object, task_id: object, attempt: object, trace: object = None
        ) -> str:
            outcome = run_attempt(
                source.get(), fn, project_id, task_id, attempt,
                heartbeat_interval=heartbeat_interval, trace=trace,
            )  # fmt: skip
            if outcome is DeliveryOutcome.RETRY_LATER:
                # Storage was down before the attempt started: hand the message
                # back to the broker, paced so a long outage is not a busy loop.
                time.sleep(REQUEUE_DELAY)
                raise Reject("storage unavailable", requeue=True)
            return str(outcome.value)

        execute.__name__ = getattr(fn, "__name__", execute.__name__)
        execute.__doc__ = getattr(fn, "__doc__", None)
        options: dict[str, Any] = {
            "acks_late": True,
            "reject_on_worker_lost": True,
            "ignore_result": True,
            "max_retries": 0,
            **task_options,
        }
        task: celery.Task = app.task(name=name, **options)(execute)
        return task

    return register
