"""OpenTelemetry traces and metrics for the services, the outbox, the workers and the web API.

Install with ``pip install 'deepwork-retry[otel]'`` (the OpenTelemetry API)
and turn it on once per process with :func:`instrument`; the application
chooses the SDK, its exporters and their configuration. Until then (and
after :func:`uninstrument`) the library never imports OpenTelemetry, and each
hook point costs one attribute read (see docs/telemetry.md and
docs/performance.md).

What is traced:

- a span per service call that commits a move (``deepwork manual_retry``,
  ``deepwork fail``, ``deepwork start`` …) with a child span per storage call
  in it (``deepwork.storage load``, ``deepwork.storage apply``);
- a span per outbox delivery (``deepwork dispatch``, kind producer), a child
  of the trace the entry was made in, whether a request or a relay delivers it;
- the worker's attempt (``deepwork attempt``, kind consumer) in Celery and
  Dramatiq workers, thread pools and asyncio tasks, a child of the delivery;
- a server span per request to the web API, continuing the caller's
  ``traceparent`` header.

The trace context travels in the outbox entry
(:attr:`~deepwork_retry._core.model.DispatchEntry.trace`) and in the queue's
message, so one trace spans the HTTP retry, the delivery and the attempt.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

import attrs

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    from deepwork_retry.exceptions import missing_extra

    raise missing_extra("otel", __name__, exc) from exc

import deepwork_retry._trace as _trace
from deepwork_retry import __version__ as _version
from deepwork_retry._core.events import EventType, events_of
from deepwork_retry._core.model import DispatchEntry
from deepwork_retry._core.plans import Applied, Plan
from deepwork_retry._core.states import Trigger

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
    from prometheus_client.registry import CollectorRegistry

__all__ = [
    "ATTRIBUTES",
    "METRICS",
    "instrument",
    "instrumented",
    "prometheus_app",
    "prometheus_meter_provider",
    "uninstrument",
]

SCOPE = "deepwork_retry"
"""The instrumentation scope of the tracer and the meter."""

ATTRIBUTES = (
    "deepwork.project_id",
    "deepwork.task_id",
    "deepwork.attempt",
    "deepwork.event",
    "deepwork.trigger",
    "deepwork.outcome",
    "deepwork.delivery.source",
)
"""The span attributes the library sets (each when it applies)."""

METRICS = (
    "deepwork.retries",
    "deepwork.tasks.blocked",
    "deepwork.attempt.duration",
    "deepwork.outbox.lag",
    "deepwork.outbox.deliveries",
    "deepwork.outbox.delivery_failures",
)
"""The instruments the library records (see docs/telemetry.md)."""

_PROPAGATOR = TraceContextTextMapPropagator()


def _carrier(value: str | None) -> dict[str, str]:
    """``traceparent[;tracestate]`` as the W3C headers (a ``traceparent`` has no ``;``)."""
    if not value:
        return {}
    parent, _, state = value.partition(";")
    carrier = {"traceparent": parent.strip()}
    if state:
        carrier["tracestate"] = state.strip()
    return carrier


def _context_of(value: str | None) -> otel_context.Context | None:
    """The context of a stored trace, or ``None`` when there is none (or it is malformed)."""
    if not value:
        return None
    found = _PROPAGATOR.extract(_carrier(value))
    if not trace.get_current_span(found).get_span_context().is_valid:
        return None
    return found


def _trace_text() -> str | None:
    """The current span's context as ``traceparent[;tracestate]``."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    parent = carrier.get("traceparent")
    if parent is None:
        return None
    state = carrier.get("tracestate")
    return f"{parent};{state}" if state else parent


def _ids(span: trace.Span, project_id: str, task_id: str, attempt: int | None = None) -> None:
    span.set_attribute("deepwork.project_id", project_id)
    span.set_attribute("deepwork.task_id", task_id)
    if attempt is not None:
        span.set_attribute("deepwork.attempt", attempt)


class _Commit:
    def __init__(self, telemetry: _Telemetry, span: trace.Span) -> None:
        self._telemetry = telemetry
        self._span = span

    def stamped(self, plan: Plan) -> Plan:
        entry = plan.dispatch
        if entry is None:
            return plan
        text = self.trace()
        if text is None or entry.trace == text:
            return plan
        return attrs.evolve(plan, dispatch=attrs.evolve(entry, trace=text))

    def trace(self) -> str | None:
        return _trace_text()

    def committed(self, plan: Plan | None, applied: Applied) -> None:
        span, telemetry = self._span, self._telemetry
        event = "manual_retry" if plan is None else plan.event.value
        span.update_name(f"deepwork {event}")
        span.set_attribute("deepwork.event", event)
        span.set_attribute("deepwork.attempt", applied.task.attempt)
        if plan is None:  # a retry decided by the storage in one statement
            telemetry.retries.add(1, {"deepwork.trigger": Trigger.MANUAL_RETRY.value})
            span.set_attribute("deepwork.trigger", Trigger.MANUAL_RETRY.value)
            return
        for found in events_of(plan):
            if found.type is EventType.TASK_RETRIED:
                trigger = str(found.data.get("trigger"))
                telemetry.retries.add(1, {"deepwork.trigger": trigger})
                span.set_attribute("deepwork.trigger", trigger)
            elif found.type is EventType.TASK_BLOCKED:
                reason = str(found.data.get("reason"))
                telemetry.blocked.add(1, {"deepwork.reason": reason})


class _Attempt:
    def __init__(self, span: trace.Span) -> None:
        self._span = span
        self.labels: dict[str, str] = {}

    def outcome(self, outcome: str) -> None:
        self._span.set_attribute("deepwork.outcome", outcome)
        self.labels["deepwork.outcome"] = outcome


class _Server:
    def __init__(self, span: trace.Span) -> None:
        self._span = span

    def status(self, status: int) -> None:
        self._span.set_attribute("http.response.status_code", status)
        if status >= 500:
            self._span.set_status(Status(StatusCode.ERROR))


class _Telemetry:
    """The hooks (:class:`deepwork_retry._trace.Hooks`) over a tracer and a meter."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None,
        meter_provider: metrics.MeterProvider | None,
    ) -> None:
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.tracer = trace.get_tracer(SCOPE, _version, tracer_provider=tracer_provider)
        meter = metrics.get_meter(SCOPE, _version, meter_provider=meter_provider)
        self.retries = meter.create_counter(
            "deepwork.retries", unit="{retry}", description="Attempts made by a retry, by trigger"
        )
        self.blocked = meter.create_counter(
            "deepwork.tasks.blocked", unit="{task}", description="Tasks newly blocked, by reason"
        )
        self.duration = meter.create_histogram(
            "deepwork.attempt.duration", unit="s", description="How long a worker ran an attempt"
        )
        self.lag = meter.create_histogram(
            "deepwork.outbox.lag",
            unit="s",
            description="From an outbox entry's available_at to its delivery",
        )
        self.deliveries = meter.create_counter(
            "deepwork.outbox.deliveries", unit="{entry}", description="Outbox entries delivered"
        )
        self.failures = meter.create_counter(
            "deepwork.outbox.delivery_failures",
            unit="{entry}",
            description="Outbox deliveries the dispatcher refused",
        )

    @contextmanager
    def commit(self, project_id: str, task_id: str) -> Iterator[_Commit]:
        with self.tracer.start_as_current_span("deepwork commit") as span:
            _ids(span, project_id, task_id)
            yield _Commit(self, span)

    @contextmanager
    def storage(self, method: str) -> Iterator[object]:
        with self.tracer.start_as_current_span(
            f"deepwork.storage {method}", kind=SpanKind.CLIENT
        ) as span:
            yield span

    @contextmanager
    def dispatch(self, entry: DispatchEntry, source: str) -> Iterator[DispatchEntry]:
        parent = _context_of(entry.trace)
        with self.tracer.start_as_current_span(
            "deepwork dispatch", context=parent, kind=SpanKind.PRODUCER
        ) as span:
            _ids(span, entry.project_id, entry.task_id, entry.attempt)
            span.set_attribute("deepwork.delivery.source", source)
            yield attrs.evolve(entry, trace=_trace_text())

    def delivered(self, entries: list[DispatchEntry], source: str, now: datetime) -> None:
        labels = {"deepwork.delivery.source": source}
        self.deliveries.add(len(entries), labels)
        for entry in entries:
            self.lag.record(max((now - entry.available_at).total_seconds(), 0.0), labels)

    def dispatch_failed(self, entry: DispatchEntry, source: str) -> None:
        self.failures.add(1, {"deepwork.delivery.source": source})

    @contextmanager
    def attempt(
        self, project_id: str, task_id: str, attempt: int, trace_text: str | None
    ) -> Iterator[_Attempt]:
        with self.tracer.start_as_current_span(
            "deepwork attempt", context=_context_of(trace_text), kind=SpanKind.CONSUMER
        ) as span:
            _ids(span, project_id, task_id, attempt)
            handle = _Attempt(span)
            began = time.monotonic()
            try:
                yield handle
            finally:
                self.duration.record(time.monotonic() - began, handle.labels)

    def run(self, fn: Callable[[DispatchEntry], object], entry: DispatchEntry) -> object:
        with self.running(entry):
            return fn(entry)

    def running(self, entry: DispatchEntry) -> Any:
        return self.attempt(entry.project_id, entry.task_id, entry.attempt, entry.trace)

    @contextmanager
    def server(
        self, method: str, route: str | None, headers: Mapping[str, str]
    ) -> Iterator[_Server]:
        # Under a host's own HTTP instrumentation this is its child; otherwise
        # it continues the caller's trace from the request's headers.
        parent = None
        if not trace.get_current_span().get_span_context().is_valid:
            parent = _PROPAGATOR.extract({k.lower(): v for k, v in headers.items()})
        name = method if route is None else f"{method} {route}"
        with self.tracer.start_as_current_span(name, context=parent, kind=SpanKind.SERVER) as span:
            span.set_attribute("http.request.method", method)
            if route is not None:
                span.set_attribute("http.route", route)
            yield _Server(span)

    def log_ids(self, extra: dict[str, Any]) -> None:
        found = trace.get_current_span().get_span_context()
        if found.is_valid:
            extra["trace_id"] = trace.format_trace_id(found.trace_id)
            extra["span_id"] = trace.format_span_id(found.span_id)


def instrument(
    tracer_provider: trace.TracerProvider | None = None,
    meter_provider: metrics.MeterProvider | None = None,
) -> None:
    """Turn telemetry on for this process; by default through the global providers.

    Calling it again with the same providers changes nothing; with other
    providers it switches to them. Worker processes call it too (for
    example in the module that declares the Celery app or the Dramatiq
    broker) so that their attempts continue the trace that dispatched them.
    """
    found = _trace.current
    if (
        isinstance(found, _Telemetry)
        and found.tracer_provider is tracer_provider
        and found.meter_provider is meter_provider
    ):
        return
    _trace.current = _Telemetry(tracer_provider, meter_provider)


def uninstrument() -> None:
    """Turn telemetry off: the hook points go back to their usual path."""
    _trace.current = None


def instrumented() -> bool:
    """Whether :func:`instrument` is in effect."""
    return _trace.current is not None


def prometheus_meter_provider(registry: CollectorRegistry | None = None) -> SdkMeterProvider:
    """An SDK meter provider whose metrics a Prometheus scrape reads.

    Pass it to :func:`instrument`; serve :func:`prometheus_app` with the
    same ``registry`` (by default prometheus-client's global one). Needs
    ``opentelemetry-sdk``, ``opentelemetry-exporter-prometheus`` and
    ``prometheus-client`` (the extra ``otel-prometheus``).
    """
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider

    if registry is None:
        reader = PrometheusMetricReader()
    else:
        reader = PrometheusMetricReader(registry=registry)
    return MeterProvider(metric_readers=[reader])


def prometheus_app(registry: CollectorRegistry | None = None, *, asgi: bool = False) -> Any:
    """The Prometheus scrape endpoint: a WSGI app, or with ``asgi`` an ASGI app.

    Mount it at ``/metrics``; it serves ``registry`` (by default
    prometheus-client's global one, which :func:`prometheus_meter_provider`
    fills by default).
    """
    import prometheus_client

    chosen = prometheus_client.REGISTRY if registry is None else registry
    if asgi:
        return _AsgiApp(prometheus_client.make_asgi_app(registry=chosen))
    return prometheus_client.make_wsgi_app(registry=chosen)


class _AsgiApp:
    """An ASGI app as an object, not a function: a Starlette ``Route`` then serves it
    as is, at its exact path (a function would be taken for a request handler)."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self._app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self._app(scope, receive, send)
