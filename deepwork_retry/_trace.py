"""The switch telemetry hangs on, read on the hot path; it imports nothing.

:data:`current` is ``None`` until :func:`deepwork_retry.telemetry.instrument`
sets it (and again after ``uninstrument``). Every hook point in the library
reads it once and takes its usual path when it is ``None``: without the
``otel`` extra, or with it installed but not turned on, telemetry costs one
module attribute read per service call and OpenTelemetry is never imported.

The protocols say what the hook points call; the one implementation is in
:mod:`deepwork_retry.telemetry`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from deepwork_retry._core.model import DispatchEntry
    from deepwork_retry._core.plans import Applied, Plan

__all__ = ["AttemptSpan", "CommitSpan", "Hooks", "ServerSpan", "current"]


class CommitSpan(Protocol):
    """The span of one service call that commits a move."""

    def stamped(self, plan: Plan) -> Plan:
        """``plan`` whose outbox entry carries this span's trace context."""

    def trace(self) -> str | None:
        """This span's context as ``traceparent[;tracestate]``."""

    def committed(self, plan: Plan | None, applied: Applied) -> None:
        """The move committed: name the span after it, set its attributes, count it."""


class AttemptSpan(Protocol):
    def outcome(self, outcome: str) -> None: ...


class ServerSpan(Protocol):
    def status(self, status: int) -> None: ...


class Hooks(Protocol):
    def commit(self, project_id: str, task_id: str) -> AbstractContextManager[CommitSpan]:
        """The span of a service call (load, decide, apply), current inside."""

    def storage(self, method: str) -> AbstractContextManager[object]:
        """The span of one storage method call."""

    def dispatch(self, entry: DispatchEntry, source: str) -> AbstractContextManager[DispatchEntry]:
        """The span of handing ``entry`` to a dispatcher, a child of the entry's
        trace; yields the entry to hand over, carrying this span's context."""

    def delivered(self, entries: list[DispatchEntry], source: str, now: datetime) -> None:
        """Count deliveries and record each entry's outbox lag."""

    def dispatch_failed(self, entry: DispatchEntry, source: str) -> None: ...

    def attempt(
        self, project_id: str, task_id: str, attempt: int, trace: str | None
    ) -> AbstractContextManager[AttemptSpan]:
        """The span of a worker's attempt, a child of the trace it was dispatched in."""

    def run(self, fn: Callable[[DispatchEntry], object], entry: DispatchEntry) -> object:
        """``fn(entry)`` inside the span of an in-process attempt (thread pools)."""

    def running(self, entry: DispatchEntry) -> AbstractContextManager[AttemptSpan]:
        """The span of an in-process attempt (asyncio tasks)."""

    def server(
        self, method: str, route: str | None, headers: Mapping[str, str]
    ) -> AbstractContextManager[ServerSpan]:
        """The span of one HTTP request, continuing the caller's ``traceparent``."""

    def log_ids(self, extra: dict[str, Any]) -> None:
        """Add ``trace_id`` and ``span_id`` of the current span to a log record's fields."""


current: Hooks | None = None
"""The telemetry in use, or ``None`` (off)."""
