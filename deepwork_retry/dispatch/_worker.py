"""What every queue's worker does with one delivery, whatever the queue.

A delivery carries ``(project_id, task_id, attempt)``. The worker starts that
attempt through the executor service, runs the host's code with a heartbeat
thread extending the lease, and reports success or failure. The attempt number
is the fencing token: a second delivery of the same attempt finds the task
already started (or finished, or moved on) and runs nothing, so the queue's
at-least-once delivery becomes at-most-once execution per attempt.

The queue adapters (``dispatch/celery.py``, ``dispatch/dramatiq.py``) wrap
:func:`run_attempt`; this module imports no queue client.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections.abc import Callable

import deepwork_retry._trace as _trace
from deepwork_retry._core.model import Task
from deepwork_retry._core.policy import TaskError
from deepwork_retry._log import Ids, emit
from deepwork_retry._sync.services import ExecutorService
from deepwork_retry.exceptions import (
    InvalidTransition,
    NotFound,
    StaleAttempt,
    StorageError,
)

log = logging.getLogger("deepwork_retry.worker")

HostFunction = Callable[[Task, int], object]
"""The host's code for one attempt: ``fn(task, token)``; raising fails the attempt."""

ExecutorFactory = Callable[[], ExecutorService]
"""Builds the executor service a worker process reports through."""

DEFAULT_TASK_NAME = "deepwork_retry.execute"
"""The queue-side name of the task (Celery) or actor (Dramatiq) by default."""

REPORT_DEADLINE = 30.0
"""Seconds a worker keeps trying to report an outcome while storage is unavailable."""


class DeliveryOutcome(str, enum.Enum):
    """What a worker did with one delivery."""

    SUCCEEDED = "succeeded"
    """The host's code returned and success was recorded."""
    FAILED = "failed"
    """The host's code raised and the failure was recorded (the policy retried or blocked)."""
    SKIPPED = "skipped"
    """The attempt is not startable (duplicate or stale delivery); nothing ran."""
    STALE = "stale"
    """The host's code ran but the attempt stopped being current meanwhile (lost, reaped)."""
    UNREPORTED = "unreported"
    """The host's code ran but storage stayed unavailable; the lease will expire."""
    RETRY_LATER = "retry_later"
    """Storage was unavailable before the start: deliver the message again later."""
    MALFORMED = "malformed"
    """The message did not carry ``(project_id, task_id, attempt)``; dropped."""


class ExecutorSource:
    """Builds the executor service lazily, once per process.

    Queue workers fork; connection pools must not cross a fork, so the
    factory runs in the process that executes tasks, on its first delivery.
    """

    def __init__(self, factory: ExecutorFactory) -> None:
        self._factory = factory
        self._service: ExecutorService | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def get(self) -> ExecutorService:
        with self._lock:
            if self._service is None or self._pid != os.getpid():
                self._service = self._factory()
                self._pid = os.getpid()
            return self._service


def valid_message(project_id: object, task_id: object, attempt: object) -> bool:
    return (
        isinstance(project_id, str)
        and isinstance(task_id, str)
        and isinstance(attempt, int)
        and not isinstance(attempt, bool)
        and attempt > 0
    )


def heartbeat_every(service: ExecutorService, interval: float | None) -> float:
    """The heartbeat interval: as given, else a third of the policy's lease."""
    if interval is not None:
        if interval <= 0:
            raise ValueError("heartbeat_interval must be positive")
        return interval
    return max(service.policy.lease / 3, 0.05)


class _Heartbeat(threading.Thread):
    """Extends the attempt's lease every ``interval`` seconds until stopped."""

    def __init__(
        self, service: ExecutorService, project_id: str, task_id: str, token: int, interval: float
    ) -> None:
        super().__init__(name=f"deepwork-heartbeat-{task_id}", daemon=True)
        self.service = service
        self.ids = Ids(project_id, task_id, token)
        self.interval = interval
        self.stop = threading.Event()
        self.lost = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.service.heartbeat(*self.ids)
            except (StaleAttempt, InvalidTransition, NotFound):
                # The attempt was reaped or finished elsewhere: nothing to extend.
                self.lost.set()
                return
            except StorageError:
                emit(
                    log, logging.WARNING, "deepwork.heartbeat_failed",
                    "heartbeat of %s/%s attempt %d failed", *self.ids,
                    about=self.ids, exc_info=True,
                )  # fmt: skip


def _report(report: Callable[[], object], ids: Ids, deadline: float) -> DeliveryOutcome:
    """Record the outcome, retrying while storage is unavailable (until ``deadline``)."""
    delay = 0.2
    while True:
        try:
            report()
        except (StaleAttempt, InvalidTransition, NotFound):
            emit(
                log, logging.WARNING, "deepwork.attempt_stale",
                "attempt %s/%s #%d is no longer current; outcome dropped", *ids, about=ids,
            )  # fmt: skip
            return DeliveryOutcome.STALE
        except StorageError:
            if time.monotonic() + delay > deadline:
                emit(
                    log, logging.ERROR, "deepwork.attempt_unreported",
                    "could not report attempt %s/%s #%d; its lease will lapse", *ids,
                    about=ids,
                )  # fmt: skip
                return DeliveryOutcome.UNREPORTED
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        else:
            return DeliveryOutcome.SUCCEEDED


def run_attempt(
    service: ExecutorService,
    fn: HostFunction,
    project_id: object,
    task_id: object,
    attempt: object,
    *,
    heartbeat_interval: float | None = None,
    trace: object = None,
) -> DeliveryOutcome:
    """Start attempt ``attempt``, run ``fn(task, attempt)`` while heartbeating, report.

    Never raises for a delivery problem; the returned :class:`DeliveryOutcome` says what
    happened. Only ``BaseException`` from the host's code (a worker shutting
    down) escapes, leaving the attempt to the reaper.

    ``trace`` is the trace context the message carried (the outbox entry's
    :attr:`~deepwork_retry._core.model.DispatchEntry.trace`): with telemetry
    on, the attempt's span continues it.
    """
    telemetry = _trace.current
    if telemetry is not None and valid_message(project_id, task_id, attempt):
        assert isinstance(project_id, str)
        assert isinstance(task_id, str)
        assert isinstance(attempt, int)
        carried = trace if isinstance(trace, str) else None
        with telemetry.attempt(project_id, task_id, attempt, carried) as span:
            outcome = _run_attempt(service, fn, project_id, task_id, attempt, heartbeat_interval)
            span.outcome(outcome.value)
        return outcome
    return _run_attempt(service, fn, project_id, task_id, attempt, heartbeat_interval)


def _run_attempt(
    service: ExecutorService,
    fn: HostFunction,
    project_id: object,
    task_id: object,
    attempt: object,
    heartbeat_interval: float | None,
) -> DeliveryOutcome:
    if not valid_message(project_id, task_id, attempt):
        # Only what has the right type is a field: a malformed id stays in the text.
        emit(
            log, logging.ERROR, "deepwork.attempt_malformed",
            "dropping malformed delivery %r", (project_id, task_id, attempt),
            project_id=project_id if isinstance(project_id, str) else None,
            task_id=task_id if isinstance(task_id, str) else None,
            attempt=attempt if type(attempt) is int else None,
        )  # fmt: skip
        return DeliveryOutcome.MALFORMED
    assert isinstance(project_id, str)
    assert isinstance(task_id, str)
    assert isinstance(attempt, int)
    ids = Ids(project_id, task_id, attempt)
    try:
        started = service.start(project_id, task_id, attempt)
    except (StaleAttempt, InvalidTransition, NotFound) as exc:
        emit(
            log, logging.INFO, "deepwork.attempt_skipped",
            "skipping delivery of %s/%s #%d: %s", *ids, exc, about=ids,
        )  # fmt: skip
        return DeliveryOutcome.SKIPPED
    except StorageError:
        emit(
            log, logging.WARNING, "deepwork.attempt_start_unavailable",
            "storage unavailable at start of %s/%s #%d", *ids, about=ids, exc_info=True,
        )  # fmt: skip
        return DeliveryOutcome.RETRY_LATER

    beat = _Heartbeat(service, *ids, heartbeat_every(service, heartbeat_interval))
    beat.start()
    error: TaskError | None = None
    try:
        fn(started.task, attempt)
    except Exception as exc:  # noqa: BLE001 - any error of the host's code fails the attempt
        emit(
            log, logging.INFO, "deepwork.attempt_failed",
            "attempt %s/%s #%d failed: %r", *ids, exc, about=ids,
        )  # fmt: skip
        error = TaskError.from_exception(exc)
    finally:
        beat.stop.set()
        beat.join()

    deadline = time.monotonic() + REPORT_DEADLINE
    if error is None:
        return _report(lambda: service.succeed(*ids), ids, deadline)
    failed = error
    outcome = _report(lambda: service.fail(*ids, failed), ids, deadline)
    return DeliveryOutcome.FAILED if outcome is DeliveryOutcome.SUCCEEDED else outcome
