"""Structured fields on the log records the library emits about a task.

Every record about a task, an attempt or an outbox entry carries, as record
attributes (``extra=``), the ids it is about, so that a host's formatter or
log pipeline can filter and group by them without parsing the message:

- ``project_id``, ``task_id``: strings, when the record is about a task;
- ``attempt``: the attempt number (the fencing token), when known;
- ``deepwork_event``: a short machine name of what happened, such as
  ``deepwork.dispatch_failed`` (listed in :data:`EVENTS`);
- ``trace_id``, ``span_id``: the current OpenTelemetry span's ids (32 and 16
  hex digits), only with telemetry on (:mod:`deepwork_retry.telemetry`) and
  inside a span (:data:`TRACE_FIELDS`).

A field that is not known is absent from the record, never ``None``: a format
string naming it needs a default (see docs/logging.md). The message text
stays as readable as without the fields.

:func:`emit` is the one way the library writes such a record: it builds the
``extra`` mapping only once the logger is known to be enabled for the level,
so a disabled level costs one ``isEnabledFor`` check and nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final, NamedTuple, Protocol

import deepwork_retry._trace as _trace

__all__ = ["EVENTS", "FIELDS", "TRACE_FIELDS", "Ids", "emit", "fields"]

FIELDS: Final = ("project_id", "task_id", "attempt", "deepwork_event")
"""The attribute names the library sets on its records; none is a LogRecord attribute."""

TRACE_FIELDS: Final = ("trace_id", "span_id")
"""The attribute names telemetry adds to those records, inside a span."""

EVENTS: Final = frozenset(
    {
        "deepwork.attempt_failed",
        "deepwork.attempt_lost",
        "deepwork.attempt_malformed",
        "deepwork.attempt_skipped",
        "deepwork.attempt_stale",
        "deepwork.attempt_start_unavailable",
        "deepwork.attempt_unreported",
        "deepwork.bulk_retry_stopped",
        "deepwork.delivered",
        "deepwork.delivery_outcome",
        "deepwork.delivery_unrecorded",
        "deepwork.dispatch_failed",
        "deepwork.dispatch_failure_unrecorded",
        "deepwork.dispatched_work_raised",
        "deepwork.events_unsettled",
        "deepwork.heartbeat_failed",
        "deepwork.lease_no_longer_expired",
        "deepwork.listener_failed",
        "deepwork.listener_parked",
        "deepwork.post_commit_failed",
        "deepwork.pruned",
        "deepwork.redelivered",
        "deepwork.response_unrecorded",
        "deepwork.retry_answer_unrendered",
    }
)
"""Every ``deepwork_event`` name the library uses."""


class _About(Protocol):
    """What a record can be about: an outbox entry (or anything with its three ids)."""

    @property
    def project_id(self) -> str: ...
    @property
    def task_id(self) -> str: ...
    @property
    def attempt(self) -> int: ...


class Ids(NamedTuple):
    """The ids of one attempt, for a caller that has no entry or task at hand."""

    project_id: str
    task_id: str
    attempt: int


def fields(
    event: str,
    about: _About | None = None,
    *,
    project_id: str | None = None,
    task_id: str | None = None,
    attempt: int | None = None,
) -> dict[str, Any]:
    """The ``extra`` mapping of a record: ``event`` and the ids it is about.

    ``about`` (a :class:`~deepwork_retry._core.model.DispatchEntry`, or
    anything with ``project_id``, ``task_id`` and ``attempt``) gives all
    three ids; the keyword arguments give them one by one. Ids left ``None``
    are left out of the mapping.
    """
    if about is not None:
        project_id, task_id, attempt = about.project_id, about.task_id, about.attempt
    extra: dict[str, Any] = {"deepwork_event": event}
    if project_id is not None:
        extra["project_id"] = project_id
    if task_id is not None:
        extra["task_id"] = task_id
    if attempt is not None:
        extra["attempt"] = attempt
    telemetry = _trace.current
    if telemetry is not None:
        telemetry.log_ids(extra)
    return extra


def emit(
    logger: logging.Logger,
    level: int,
    event: str,
    msg: str,
    *args: object,
    about: _About | None = None,
    project_id: str | None = None,
    task_id: str | None = None,
    attempt: int | None = None,
    exc_info: Any = None,
) -> None:
    """Log ``msg % args`` at ``level`` with the :func:`fields` of ``event`` and the ids.

    Nothing is built when ``logger`` is disabled for ``level``. The record
    names the caller of :func:`emit` as where it was logged.
    """
    if not logger.isEnabledFor(level):
        return
    extra: Mapping[str, Any] = fields(
        event, about, project_id=project_id, task_id=task_id, attempt=attempt
    )
    logger.log(level, msg, *args, exc_info=exc_info, extra=extra, stacklevel=2)
