"""Telemetry in the distributed tests' worker processes: spans to a JSON-lines file.

A worker started with ``DEEPWORK_TEST_SPANS`` set turns telemetry on
(:func:`deepwork_retry.telemetry.instrument`) with an SDK tracer provider
whose exporter appends one JSON line per finished span to that file, so that
the test process can check the worker's spans against its own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from deepwork_retry import telemetry


def span_record(span: ReadableSpan) -> dict[str, Any]:
    ctx = span.get_span_context()
    assert ctx is not None
    return {
        "name": span.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": None if span.parent is None else f"{span.parent.span_id:016x}",
        "kind": span.kind.name,
        "attributes": dict(span.attributes or {}),
        "pid": os.getpid(),
    }


class JsonLinesExporter(SpanExporter):
    """Appends each finished span to ``path`` as one JSON line (one write per span)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            for span in spans:
                os.write(fd, (json.dumps(span_record(span)) + "\n").encode())
        finally:
            os.close(fd)
        return SpanExportResult.SUCCESS


def instrument_from_env() -> None:
    path = os.environ.get("DEEPWORK_TEST_SPANS")
    if not path:
        return
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(path)))
    telemetry.instrument(tracer_provider=provider)


def read_spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
