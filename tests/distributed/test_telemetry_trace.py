"""One trace from the HTTP retry to the worker's attempt, on Celery and on Dramatiq.

The test process runs the web API (Starlette on uvicorn, a real HTTP server)
with telemetry on and the SDK's in-memory exporter; real worker processes run
with telemetry on and write their spans to a JSON-lines file
(:mod:`otel_support`). A client span sends the retry with its
``traceparent``; the worker's attempt must be in the same trace, its parent
the delivery made by the retry, whose parent is the retry, whose parent is
the server span, whose parent is the client's span.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Workers, pika_url
from dist_support import TASK_NAME, policy, serve_api, status_of, wait_for

from deepwork_retry import ExecutorService

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import propagate
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from otel_support import read_spans, span_record

from deepwork_retry import telemetry

pytestmark = pytest.mark.slow

ROUTE = "POST /projects/{project_id}/tasks/{task_id}/retry"


@pytest.fixture
def storage_spec(tmp_path: Path) -> dict[str, Any]:
    """File SQLite, which every process opens (it keeps the outbox entry's trace)."""
    pytest.importorskip("deepwork_retry.storage.sqlite")
    return {"kind": "sqlite", "path": str(tmp_path / "shared.db")}


@pytest.fixture
def exporter() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    found = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(found))
    telemetry.instrument(tracer_provider=provider)
    try:
        yield provider, found
    finally:
        telemetry.uninstrument()


def check_one_trace(
    storage: Any,
    dispatcher: Any,
    async_dispatcher: Any,
    spans_path: Path,
    otel: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = otel
    svc = ExecutorService(storage, dispatcher, policy=policy())
    svc.create_project("p")
    svc.add_task("p", "t", max_retries=0, metadata={"fail_until": 1})
    assert "dispatched" == svc.assign("p", "t").dispatches[0].status
    wait_for("t to be blocked", lambda: status_of(storage, "p", "t") == "blocked")
    exporter.clear()

    with serve_api(storage, async_dispatcher) as http_retry:
        tracer = provider.get_tracer("test client")
        with tracer.start_as_current_span("client retry") as client:
            headers: dict[str, str] = {}
            propagate.inject(headers)
            body = http_retry("p", "t", headers=headers)
        assert (200, "dispatched") == (body["http_status"], body["dispatch"]["status"])
        wait_for("t to be done", lambda: status_of(storage, "p", "t") == "done")

    def worker_attempt() -> dict[str, Any] | None:
        found = [
            s for s in read_spans(spans_path)
            if s["name"] == "deepwork attempt" and s["attributes"].get("deepwork.attempt") == 2
        ]  # fmt: skip
        return found[0] if found else None

    wait_for("the worker to export attempt 2's span", lambda: worker_attempt() is not None)
    attempt = worker_attempt()
    assert attempt is not None
    here = {s["name"]: s for s in map(span_record, exporter.get_finished_spans())}
    client_ctx = client.get_span_context()
    trace_id = f"{client_ctx.trace_id:032x}"
    server, retry, dispatch = here[ROUTE], here["deepwork manual_retry"], here["deepwork dispatch"]
    # One trace, parent by parent: client -> server -> retry -> dispatch -> worker's attempt.
    assert [trace_id] * 4 == [s["trace_id"] for s in (server, retry, dispatch, attempt)]
    assert f"{client_ctx.span_id:016x}" == server["parent_id"]
    assert server["span_id"] == retry["parent_id"]
    assert retry["span_id"] == dispatch["parent_id"]
    assert dispatch["span_id"] == attempt["parent_id"]
    assert ("CONSUMER", "succeeded") == (attempt["kind"], attempt["attributes"]["deepwork.outcome"])
    # The worker's own moves are children of its attempt, in the same trace.
    inside = {
        s["name"] for s in read_spans(spans_path) if s["parent_id"] == attempt["span_id"]
    }  # fmt: skip
    assert {"deepwork start", "deepwork succeed"} <= inside
    assert os.getpid() != attempt["pid"]  # exported by the worker process


def test_one_trace_on_celery(
    redis_url: str,
    queue_name: str,
    storage: Any,
    workers: Workers,
    tmp_path: Path,
    queue_cleanup: list[tuple[str, list[str]]],
    exporter: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    pytest.importorskip("celery")
    from test_celery import celery_app

    from deepwork_retry.dispatch.celery import AsyncCeleryDispatcher, CeleryDispatcher

    queue_cleanup.append((redis_url, [queue_name]))
    spans = tmp_path / "worker-spans.jsonl"
    workers.extra_env["DEEPWORK_TEST_SPANS"] = str(spans)
    workers.celery(redis_url, queue_name)
    dispatcher = CeleryDispatcher(celery_app(redis_url, queue_name), task_name=TASK_NAME)
    check_one_trace(storage, dispatcher, AsyncCeleryDispatcher(dispatcher), spans, exporter)


def test_one_trace_on_dramatiq(
    rabbitmq_url: str,
    queue_name: str,
    storage: Any,
    workers: Workers,
    tmp_path: Path,
    queue_cleanup: list[tuple[str, list[str]]],
    exporter: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    pytest.importorskip("dramatiq")
    from test_dramatiq import dispatcher_for, queues

    from deepwork_retry.dispatch.dramatiq import AsyncDramatiqDispatcher

    url = pika_url(rabbitmq_url)
    queue_cleanup.append((url, queues(url, queue_name)))
    spans = tmp_path / "worker-spans.jsonl"
    workers.extra_env["DEEPWORK_TEST_SPANS"] = str(spans)
    workers.dramatiq(url, queue_name)
    broker, dispatcher = dispatcher_for(url, queue_name)
    try:
        check_one_trace(storage, dispatcher, AsyncDramatiqDispatcher(dispatcher), spans, exporter)
    finally:
        broker.close()
