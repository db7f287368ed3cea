"""Telemetry with the OpenTelemetry SDK: spans, trace context through the outbox, metrics.

The SDK's in-memory span exporter and metric reader record what the library
emits; the storages, dispatchers and services are the real ones.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from deepwork_retry import (
    AsyncRetryService,
    DispatchEntry,
    ExecutorService,
    NoBackoff,
    OutboxRelay,
    RetryPolicy,
    RetryService,
    TaskError,
    TaskStatus,
)
from deepwork_retry.auth import StaticTokens
from deepwork_retry.dispatch._worker import DeliveryOutcome, run_attempt
from deepwork_retry.dispatch.asyncio import AsyncioDispatcher
from deepwork_retry.dispatch.threads import ThreadPoolDispatcher
from deepwork_retry.storage.memory import AsyncMemoryStorage, MemoryStorage
from deepwork_retry.testing import FakeClock, RecordingDispatcher
from deepwork_retry.web._async_api import AsyncRetryAPI
from deepwork_retry.web._http import ApiRequest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from deepwork_retry import telemetry

POLICY = RetryPolicy(backoff=NoBackoff())
TOKEN = "telemetry-token"


class Otel:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        found = list(self.exporter.get_finished_spans())
        return [s for s in found if name is None or s.name == name]

    def one(self, name: str) -> ReadableSpan:
        found = self.spans(name)
        assert 1 == len(found), [s.name for s in self.spans()]
        return found[0]

    def points(self, metric: str) -> dict[tuple[tuple[str, Any], ...], Any]:
        """``attributes -> data point`` of ``metric`` (sorted attribute items as the key)."""
        data = self.reader.get_metrics_data()
        found: dict[tuple[tuple[str, Any], ...], Any] = {}
        if data is None:
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for m in scope.metrics:
                    if m.name == metric:
                        for point in m.data.data_points:
                            found[tuple(sorted(point.attributes.items()))] = point
        return found

    def counts(self, metric: str) -> dict[tuple[tuple[str, Any], ...], int]:
        return {k: p.value for k, p in self.points(metric).items()}


@pytest.fixture
def otel() -> Iterator[Otel]:
    sdk = Otel()
    telemetry.instrument(sdk.tracer_provider, sdk.meter_provider)
    try:
        yield sdk
    finally:
        telemetry.uninstrument()


def parent_of(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def traceparent(span: ReadableSpan) -> str:
    ctx = span.get_span_context()
    assert ctx is not None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


def blocked_world(
    dispatcher: Any = None, *, clock: FakeClock | None = None
) -> tuple[MemoryStorage, ExecutorService, RetryService, FakeClock]:
    clock = clock or FakeClock()
    storage = MemoryStorage()
    executor = ExecutorService(storage, RecordingDispatcher(), policy=POLICY, clock=clock)
    executor.create_project("p")
    executor.add_task("p", "t", max_retries=0)
    executor.assign("p", "t")
    executor.start("p", "t", 1)
    executor.fail("p", "t", 1, TaskError(type="Boom", message="failed"))
    retries = RetryService(storage, dispatcher, policy=POLICY, clock=clock)
    return storage, executor, retries, clock


# -- spans ---------------------------------------------------------------------------


def test_a_retry_is_a_span_with_storage_children_and_the_entry_carries_its_trace(
    otel: Otel,
) -> None:
    """The retry's span names the move and the ids; the dispatch continues it and hands the
    dispatcher its own context; the stored entry keeps the retry's context."""
    dispatcher = RecordingDispatcher()
    storage, _, retries, _ = blocked_world(dispatcher)
    otel.exporter.clear()
    result = retries.retry("p", "t", actor="alice")
    assert "dispatched" == result.dispatch.status

    retry = otel.one("deepwork manual_retry")
    attrs = dict(retry.attributes or {})
    assert {
        "deepwork.project_id": "p",
        "deepwork.task_id": "t",
        "deepwork.attempt": 2,
        "deepwork.event": "manual_retry",
        "deepwork.trigger": "manual_retry",
    } == attrs
    ctx = retry.get_span_context()
    assert ctx is not None
    storage_calls = {s.name for s in otel.spans() if parent_of(s) == ctx.span_id}
    assert {"deepwork.storage load", "deepwork.storage apply"} <= storage_calls

    dispatch = otel.one("deepwork dispatch")
    assert ctx.span_id == parent_of(dispatch)
    assert ctx.trace_id == dispatch.context.trace_id
    assert "request" == (dispatch.attributes or {})["deepwork.delivery.source"]
    # The dispatcher got the delivery's context; the outbox keeps the retry's.
    assert [traceparent(dispatch)] == [e.trace for e in dispatcher.delivered]
    assert traceparent(retry) == storage.dispatches("p", "t")[-1].trace


def test_executor_moves_are_spans_named_after_the_move(otel: Otel) -> None:
    """assign, start, fail: one span each, with the attempt number."""
    blocked_world()
    names = [s.name for s in otel.spans() if s.name.startswith("deepwork ")]
    assert ["deepwork assign", "deepwork start", "deepwork fail"] == [
        n for n in names if n != "deepwork dispatch"
    ]
    assert {1} == {(s.attributes or {})["deepwork.attempt"] for s in otel.spans("deepwork fail")}


def test_a_refused_retry_is_an_error_span(otel: Otel) -> None:
    """A retry the rules refuse ends its span with the error recorded."""
    _, _, retries, _ = blocked_world()
    retries.retry("p", "t")
    otel.exporter.clear()
    with pytest.raises(Exception, match="blocked"):
        retries.retry("p", "t")
    span = otel.one("deepwork commit")
    assert trace.StatusCode.ERROR == span.status.status_code
    assert ["exception"] == [e.name for e in span.events]


def test_the_relay_continues_the_trace_the_entry_was_made_in(otel: Otel) -> None:
    """A retry without a dispatcher leaves the entry to the relay, whose delivery is a child
    of the retry's span, though it runs later and elsewhere."""
    storage, _, retries, clock = blocked_world(None)
    otel.exporter.clear()
    retries.retry("p", "t")
    retry = otel.one("deepwork manual_retry")
    assert [] == otel.spans("deepwork dispatch")
    dispatcher = RecordingDispatcher()
    assert 1 == OutboxRelay(storage, dispatcher, clock=clock).run_once()
    dispatch = otel.one("deepwork dispatch")
    assert retry.get_span_context().span_id == parent_of(dispatch)  # type: ignore[union-attr]
    assert "relay" == (dispatch.attributes or {})["deepwork.delivery.source"]
    assert 1 == len(otel.spans("deepwork.storage claim_due"))
    assert [traceparent(dispatch)] == [e.trace for e in dispatcher.delivered]


def test_a_worker_attempt_is_a_child_of_the_trace_it_was_dispatched_in(otel: Otel) -> None:
    """run_attempt with the message's trace: the attempt's span and the executor's moves in it."""
    dispatcher = RecordingDispatcher()
    storage = MemoryStorage()
    executor = ExecutorService(storage, dispatcher, policy=POLICY)
    executor.create_project("p")
    executor.add_task("p", "t")
    executor.assign("p", "t")
    sent = dispatcher.delivered[-1]
    assert sent.trace is not None
    outcome = run_attempt(executor, lambda task, token: None, "p", "t", 1, trace=sent.trace)
    assert DeliveryOutcome.SUCCEEDED is outcome
    attempt = otel.one("deepwork attempt")
    dispatch = otel.one("deepwork dispatch")
    assert dispatch.get_span_context().span_id == parent_of(attempt)  # type: ignore[union-attr]
    assert trace.SpanKind.CONSUMER is attempt.kind
    assert ("p", "t", 1, "succeeded") == tuple(
        (attempt.attributes or {})[k]
        for k in ("deepwork.project_id", "deepwork.task_id", "deepwork.attempt", "deepwork.outcome")
    )
    inside = {s.name for s in otel.spans() if parent_of(s) == attempt.context.span_id}
    assert {"deepwork start", "deepwork succeed"} == inside


def test_a_malformed_trace_starts_a_new_trace(otel: Otel) -> None:
    storage = MemoryStorage()
    executor = ExecutorService(storage, None, policy=POLICY)
    executor.create_project("p")
    executor.add_task("p", "t")
    executor.assign("p", "t")
    run_attempt(executor, lambda task, token: None, "p", "t", 1, trace="00-garbage;x=y")
    assert otel.one("deepwork attempt").parent is None


def test_a_thread_pool_runs_the_work_in_the_attempts_span(otel: Otel) -> None:
    """The pool's function runs inside a span that continues the delivery's trace."""
    seen: list[int] = []
    done = threading.Event()

    def work(entry: DispatchEntry) -> None:
        seen.append(trace.get_current_span().get_span_context().trace_id)
        done.set()

    with ThreadPoolDispatcher(work, max_workers=1) as pool:
        retries = blocked_world(pool)[2]
        otel.exporter.clear()
        retries.retry("p", "t")
        assert done.wait(10)
    retry = otel.one("deepwork manual_retry")
    assert [retry.context.trace_id] == seen
    attempt = otel.one("deepwork attempt")
    assert otel.one("deepwork dispatch").context.span_id == parent_of(attempt)


def test_an_asyncio_task_runs_in_the_attempts_span(otel: Otel) -> None:
    seen: list[int] = []

    async def work(entry: DispatchEntry) -> None:
        seen.append(trace.get_current_span().get_span_context().trace_id)

    async def main() -> None:
        storage = AsyncMemoryStorage(MemoryStorage())
        dispatcher = AsyncioDispatcher(work)
        from deepwork_retry import AsyncExecutorService

        executor = AsyncExecutorService(storage, dispatcher, policy=POLICY)
        await executor.create_project("p")
        await executor.add_task("p", "t")
        await executor.assign("p", "t")
        await dispatcher.aclose()

    asyncio.run(main())
    assign = otel.one("deepwork assign")
    assert [assign.context.trace_id] == seen
    assert otel.one("deepwork dispatch").context.span_id == parent_of(otel.one("deepwork attempt"))


def test_the_web_api_continues_the_callers_trace(otel: Otel) -> None:
    """A request with a ``traceparent`` header: the server span is its child, the retry the
    server span's."""
    storage, *_ = blocked_world()
    service = AsyncRetryService(AsyncMemoryStorage(storage), None, policy=POLICY)
    api = AsyncRetryAPI(service, StaticTokens({TOKEN: "alice"}))
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    request = ApiRequest(
        method="POST",
        path="/projects/p/tasks/t/retry",
        headers={"Authorization": f"Bearer {TOKEN}", "traceparent": caller},
    )
    response = asyncio.run(api.handle(request))
    assert 200 == response.status
    server = otel.one("POST /projects/{project_id}/tasks/{task_id}/retry")
    assert trace.SpanKind.SERVER is server.kind
    assert (0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331) == (
        server.context.trace_id,
        parent_of(server),
    )
    assert 200 == (server.attributes or {})["http.response.status_code"]
    assert server.context.span_id == parent_of(otel.one("deepwork manual_retry"))


def test_log_records_carry_the_span_ids(otel: Otel, caplog: pytest.LogCaptureFixture) -> None:
    """Inside a span a library record has ``trace_id`` and ``span_id``."""
    caplog.set_level(logging.DEBUG, logger="deepwork_retry")
    tracer = otel.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("outer") as outer:
        storage = MemoryStorage()
        failing = RecordingDispatcher(failing=True)
        executor = ExecutorService(storage, failing, policy=POLICY)
        executor.create_project("p")
        executor.add_task("p", "t")
        executor.assign("p", "t")
    failed = [r for r in caplog.records if r.deepwork_event == "deepwork.dispatch_failed"]
    assert 1 == len(failed)
    assert f"{outer.get_span_context().trace_id:032x}" == failed[0].trace_id
    assert 16 == len(failed[0].span_id)


def test_without_instrument_nothing_is_traced_and_no_trace_is_stored() -> None:
    """Off (the default): no span, the outbox entry has no trace, the records no span ids."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.instrument(provider)
    telemetry.uninstrument()
    assert not telemetry.instrumented()
    storage = blocked_world(RecordingDispatcher())[0]
    assert [] == list(exporter.get_finished_spans())
    assert [None] == [e.trace for e in storage.dispatches("p", "t")]


def test_instrument_is_idempotent(otel: Otel) -> None:
    from deepwork_retry import _trace

    first = _trace.current
    telemetry.instrument(otel.tracer_provider, otel.meter_provider)
    assert first is _trace.current
    blocked_world()
    assert 1 == len(otel.spans("deepwork assign"))


def test_opentelemetry_is_not_imported_without_instrument() -> None:
    """A process that retries, delivers and serves without instrument() never imports it."""
    code = """
import asyncio, sys
from deepwork_retry import ExecutorService, RetryService, RetryPolicy, NoBackoff, TaskError
from deepwork_retry.storage.memory import MemoryStorage
from deepwork_retry.testing import RecordingDispatcher
from deepwork_retry.dispatch.threads import ThreadPoolDispatcher
from deepwork_retry.web.starlette import create_app
s = MemoryStorage(); p = RetryPolicy(backoff=NoBackoff())
e = ExecutorService(s, RecordingDispatcher(), policy=p)
e.create_project("p"); e.add_task("p", "t", max_retries=0); e.assign("p", "t")
e.start("p", "t", 1); e.fail("p", "t", 1, TaskError(type="X", message="m"))
RetryService(s, RecordingDispatcher(), policy=p).retry("p", "t")
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert [] == json.loads(done.stdout.strip().replace("'", '"'))


# -- metrics -------------------------------------------------------------------------


def test_metrics_of_failures_a_block_and_a_manual_retry(otel: Otel) -> None:
    """Automatic retries, the block (budget exhausted), the manual retry, deliveries and
    their lag."""
    clock = FakeClock()
    storage = MemoryStorage()
    dispatcher = RecordingDispatcher()
    executor = ExecutorService(storage, dispatcher, policy=POLICY, clock=clock)
    executor.create_project("p")
    executor.add_task("p", "t", max_retries=1)
    executor.assign("p", "t")
    for attempt in (1, 2):
        executor.start("p", "t", attempt)
        executor.fail("p", "t", attempt, TaskError(type="Boom", message="no"))
    RetryService(storage, dispatcher, policy=POLICY, clock=clock).retry("p", "t")

    assert {
        (("deepwork.trigger", "auto_retry"),): 1,
        (("deepwork.trigger", "manual_retry"),): 1,
    } == otel.counts("deepwork.retries")
    assert {(("deepwork.reason", "budget_exhausted"),): 1} == otel.counts("deepwork.tasks.blocked")
    # assign, the automatic retry, the manual retry: three deliveries at once, no lag.
    assert {(("deepwork.delivery.source", "request"),): 3} == otel.counts(
        "deepwork.outbox.deliveries"
    )
    lag = otel.points("deepwork.outbox.lag")[(("deepwork.delivery.source", "request"),)]
    assert (3, 0.0) == (lag.count, lag.sum)


def test_attempt_duration_by_outcome(otel: Otel) -> None:
    """Each attempt a worker runs is measured, by its outcome; a run takes at least as long
    as the host's code sleeps."""
    storage = MemoryStorage()
    executor = ExecutorService(storage, None, policy=POLICY)
    executor.create_project("p")
    executor.add_task("p", "t", max_retries=1)
    executor.assign("p", "t")

    def host(task: Any, token: int) -> None:
        time.sleep(0.2)
        if token == 1:
            raise RuntimeError("first attempt fails")

    assert DeliveryOutcome.FAILED is run_attempt(executor, host, "p", "t", 1)
    assert DeliveryOutcome.SUCCEEDED is run_attempt(executor, host, "p", "t", 2)
    assert DeliveryOutcome.SKIPPED is run_attempt(executor, host, "p", "t", 2)
    points = otel.points("deepwork.attempt.duration")
    assert {"failed": 1, "succeeded": 1, "skipped": 1} == {
        dict(k)["deepwork.outcome"]: p.count for k, p in points.items()
    }
    for outcome in ("failed", "succeeded"):
        assert points[(("deepwork.outcome", outcome),)].sum >= 0.2


def test_outbox_lag_and_failures_through_the_relay(otel: Otel) -> None:
    """A refused delivery counts as a failure; the relay's later delivery records its lag."""
    clock = FakeClock()
    storage = MemoryStorage()
    refusing = RecordingDispatcher(failing=True)
    executor = ExecutorService(storage, refusing, policy=POLICY, clock=clock)
    executor.create_project("p")
    executor.add_task("p", "t")
    assert "pending" == executor.assign("p", "t").dispatches[0].status
    assert {(("deepwork.delivery.source", "request"),): 1} == otel.counts(
        "deepwork.outbox.delivery_failures"
    )
    clock.advance(120)
    assert 1 == OutboxRelay(storage, RecordingDispatcher(), clock=clock).run_once()
    lag = otel.points("deepwork.outbox.lag")[(("deepwork.delivery.source", "relay"),)]
    assert lag.count == 1
    assert 60 < lag.sum <= 120  # from the retry_at of the backoff to the relay's delivery


def test_prometheus_app_serves_the_metrics() -> None:
    """The OTel Prometheus reader and the scrape app over one registry, through WSGI."""
    pytest.importorskip("opentelemetry.exporter.prometheus")
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    provider = telemetry.prometheus_meter_provider(registry)
    telemetry.instrument(meter_provider=provider)
    try:
        blocked_world(RecordingDispatcher())[2].retry("p", "t")
    finally:
        telemetry.uninstrument()
    app = telemetry.prometheus_app(registry)
    status: list[str] = []
    body = b"".join(
        app(
            {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": ""},
            lambda s, h: status.append(s),
        )
    ).decode()
    assert status[0].startswith("200")
    assert 'deepwork_retries_total{deepwork_trigger="manual_retry"' in body
    assert 'deepwork_tasks_blocked_total{deepwork_reason="budget_exhausted"' in body
    assert "deepwork_outbox_deliveries_total" in body


def test_the_demo_server_serves_metrics(tmp_path: Any) -> None:
    """``serve --metrics`` on uvicorn: after a retry over HTTP, GET /metrics shows it."""
    pytest.importorskip("opentelemetry.exporter.prometheus")
    uvicorn = pytest.importorskip("uvicorn")
    import httpx

    from deepwork_retry.demo import create_demo_project
    from deepwork_retry.server import build_app
    from deepwork_retry.storage.sqlite import SQLiteStorage

    db = str(tmp_path / "demo.db")
    setup = SQLiteStorage(db)
    try:
        create_demo_project(setup, "demo")
        blocked = setup.list_tasks("demo", status=TaskStatus.BLOCKED, limit=1)[0].id
    finally:
        setup.close()
    app = build_app(db, StaticTokens({TOKEN: "alice"}), pause=0.01, metrics=True)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(300):  # a bound on the start-up, not a timing
            if server.started:
                break
            time.sleep(0.1)
        assert server.started
        port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            auth = {"Authorization": f"Bearer {TOKEN}"}
            path = f"/api/deep-work/projects/demo/tasks/{blocked}/retry"
            assert 200 == client.post(path, headers=auth).status_code
            scrape = client.get("/metrics")
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        telemetry.uninstrument()
    assert 200 == scrape.status_code
    assert scrape.headers["content-type"].startswith("text/plain")
    assert 'deepwork_retries_total{deepwork_trigger="manual_retry"' in scrape.text


def test_without_the_extra_the_import_names_it() -> None:
    """``deepwork_retry.telemetry`` without OpenTelemetry: an ImportError naming ``otel``;
    the rest of the library works as before."""
    code = """
import sys
sys.modules["opentelemetry"] = None
from deepwork_retry import ExecutorService
from deepwork_retry.storage.memory import MemoryStorage
e = ExecutorService(MemoryStorage()); e.create_project("p"); e.add_task("p", "t")
print(e.assign("p", "t").task.status.value)
try:
    import deepwork_retry.telemetry
except ImportError as exc:
    print(exc)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert [
        "assigned",
        "deepwork_retry.telemetry needs the optional dependency 'opentelemetry'; "
        "install it with: pip install 'deepwork-retry[otel]'",
    ] == done.stdout.strip().splitlines()
