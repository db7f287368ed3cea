"""Dispatch attempts through Dramatiq, and run them in Dramatiq workers.

Install with ``pip install 'deepwork-retry[dramatiq]'``, plus ``dramatiq[rabbitmq]`` or
``dramatiq[redis]`` for the broker; see ``docs/install.md``.

:class:`DramatiqDispatcher` enqueues one message per attempt carrying only
``(project_id, task_id, attempt)``; :func:`deepwork_actor` declares the actor
that starts the attempt, runs the host's function with a heartbeat and
reports the outcome through an :class:`~deepwork_retry.ExecutorService`.

The actor has ``max_retries=0``: retries are the library's. A reported
failure creates the next attempt and its outbox entry, delivered as a new
message by the service's dispatcher or by an outbox relay.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

try:
    import dramatiq
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    from deepwork_retry.exceptions import missing_extra

    raise missing_extra("dramatiq", __name__, exc) from exc

from deepwork_retry._core.model import DispatchEntry
from deepwork_retry._log import emit
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
    "AsyncDramatiqDispatcher",
    "DeliveryOutcome",
    "DramatiqDispatcher",
    "deepwork_actor",
]

log = logging.getLogger("deepwork_retry.worker")

REQUEUE_DELAY_MS = 1000
"""Milliseconds before a message that could not start (storage down) is delivered again."""


def _message(
    actor_name: str, queue_name: str, args: tuple[str, str, int], trace: str | None = None
) -> dramatiq.Message[Any]:
    # The trace context is a keyword argument, and only when there is one: an
    # actor reads its arguments, not the message's options, without a middleware.
    kwargs = {} if trace is None else {"trace": trace}
    return dramatiq.Message(
        queue_name=queue_name, actor_name=actor_name, args=args, kwargs=kwargs, options={}
    )


class DramatiqDispatcher:
    """A :class:`~deepwork_retry.Dispatcher` that enqueues each attempt on a Dramatiq broker.

    A broker that refuses the message or cannot be reached raises
    :class:`~deepwork_retry.exceptions.DispatchError` (the broker client's
    error as ``__cause__``) and the outbox keeps the entry pending. With
    RabbitMQ, create the broker with ``confirm_delivery=True`` so "accepted"
    means the broker confirmed it.
    """

    def __init__(
        self,
        broker: dramatiq.Broker,
        *,
        actor_name: str = DEFAULT_TASK_NAME,
        queue_name: str = "default",
    ) -> None:
        self.broker = broker
        self.actor_name = actor_name
        self.queue_name = queue_name

    def dispatch(self, entry: DispatchEntry) -> None:
        message = _message(
            self.actor_name,
            self.queue_name,
            (entry.project_id, entry.task_id, entry.attempt),
            entry.trace,
        )
        try:
            self.broker.enqueue(message)
        except Exception as exc:  # any broker client failure means "not accepted"
            raise DispatchError(
                f"could not enqueue attempt {entry.attempt} of task {entry.task_id!r} "
                f"for Dramatiq actor {self.actor_name!r}: {type(exc).__name__}: {exc}"
            ) from exc


class AsyncDramatiqDispatcher(AsyncFromSyncDispatcher[DramatiqDispatcher]):
    """The :class:`~deepwork_retry.AsyncDispatcher` twin: enqueues from a worker thread."""


def deepwork_actor(
    broker: dramatiq.Broker,
    executor_factory: ExecutorFactory,
    *,
    actor_name: str = DEFAULT_TASK_NAME,
    queue_name: str = "default",
    heartbeat_interval: float | None = None,
    **actor_options: Any,
) -> Callable[[HostFunction], dramatiq.Actor[..., None]]:
    """Declare the host's ``fn(task, token)`` as the Dramatiq actor ``actor_name``.

    ``executor_factory`` builds the :class:`~deepwork_retry.ExecutorService`
    once in each worker process. The heartbeat runs every
    ``heartbeat_interval`` seconds, by default a third of the policy's lease.
    ``actor_options`` go to :func:`dramatiq.actor` (for example
    ``time_limit``); ``max_retries`` is always 0.
    """
    if "max_retries" in actor_options or "retry_when" in actor_options:
        raise ValueError(
            "deepwork_actor does not take max_retries or retry_when: "
            "retries follow the library's retry policy"
        )

    def register(fn: HostFunction) -> dramatiq.Actor[..., None]:
        source = ExecutorSource(executor_factory)

        def execute(
            project_id: object, task_id: object, attempt: object, trace: object = None
        ) -> None:
            outcome = run_attempt(
                source.get(), fn, project_id, task_id, attempt,
                heartbeat_interval=heartbeat_interval, trace=trace,
            )  # fmt: skip
            if outcome is DeliveryOutcome.RETRY_LATER:
                # Storage was down before the attempt started: deliver the same
                # attempt again a little later rather than drop it.
                assert isinstance(project_id, str)
                assert isinstance(task_id, str)
                assert isinstance(attempt, int)
                carried = trace if isinstance(trace, str) else None
                broker.enqueue(
                    _message(actor_name, queue_name, (project_id, task_id, attempt), carried),
                    delay=REQUEUE_DELAY_MS,
                )
            # Nothing is returned: without a results backend Dramatiq warns about
            # every returned value, and the outcome is already in storage.
            emit(
                log, logging.DEBUG, "deepwork.delivery_outcome",
                "delivery of %r: %s", (project_id, task_id, attempt), outcome.value,
                project_id=project_id if isinstance(project_id, str) else None,
                task_id=task_id if isinstance(task_id, str) else None,
                attempt=attempt if type(attempt) is int else None,
            )  # fmt: skip

        execute.__name__ = getattr(fn, "__name__", execute.__name__)
        execute.__doc__ = getattr(fn, "__doc__", None)
        declare = dramatiq.actor(
            actor_name=actor_name,
            queue_name=queue_name,
            broker=broker,
            max_retries=0,
            **actor_options,
        )
        actor: dramatiq.Actor[..., None] = declare(execute)
        return actor

    return register
