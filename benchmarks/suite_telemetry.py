"""What telemetry costs a manual retry: off (the default), on with the API alone, on with the SDK.

Without ``instrument()`` the hook points of a retry read one module attribute
each (``deepwork_retry._trace.current``: three reads for a retry delivered at
once) and take their usual path; OpenTelemetry is not even imported. The
first row times exactly those reads against the retry itself. The other two
show what turning it on costs: with OpenTelemetry's API alone (no SDK: its
no-op tracer and meter) and with the SDK recording every span (a batch
processor with an exporter that drops them) and every metric.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from _fixtures import add_blocked
from _harness import Figure, Row, alternate, unavailable
from suite_local import MEMORY_BATCH, _batched

from deepwork_retry import RetryService, _trace
from deepwork_retry.storage.memory import MemoryStorage
from deepwork_retry.testing import RecordingDispatcher

HOOK_READS = 3
"""``_trace.current`` reads on a retry delivered at once: commit, dispatch, delivered."""


def _retrier(total: int) -> tuple[Callable[[str], object], list[str]]:
    storage = MemoryStorage()
    ids = add_blocked(storage, "p", total)
    service = RetryService(storage, RecordingDispatcher())
    return (lambda tid: service.retry("p", tid)), ids


def _reads(ids: Sequence[str]) -> list[float]:
    """The hook reads of one retry, per retry, batched as the retries are."""
    samples = []
    clock = time.perf_counter_ns
    module = _trace
    for _batch in range(len(ids) // MEMORY_BATCH):
        t0 = clock()
        for _ in range(MEMORY_BATCH):
            for _ in range(HOOK_READS):
                if module.current is not None:
                    raise AssertionError("telemetry is on")
        samples.append((clock() - t0) / 1000 / MEMORY_BATCH)
    return samples


def telemetry(rounds: int, per_round: int) -> list[Row]:
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )

        from deepwork_retry import telemetry as otel
    except ImportError as exc:
        return [unavailable("telemetry", "telemetry", f"needs the otel extra and the SDK: {exc}")]

    class Drop(SpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    total = rounds * per_round
    off_retry, off_ids = _retrier(total)
    api_retry, api_ids = _retrier(total)
    sdk_retry, sdk_ids = _retrier(total)
    tracer_provider = TracerProvider()
    processor = BatchSpanProcessor(Drop())
    tracer_provider.add_span_processor(processor)
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    from opentelemetry.metrics import NoOpMeterProvider
    from opentelemetry.trace import NoOpTracerProvider

    noop_tracer, noop_meter = NoOpTracerProvider(), NoOpMeterProvider()

    def sliced(ids: list[str], r: int) -> list[str]:
        return ids[r * per_round : (r + 1) * per_round]

    def off(r: int) -> list[float]:
        otel.uninstrument()
        return _batched(off_retry, sliced(off_ids, r))

    def api(r: int) -> list[float]:
        otel.instrument(noop_tracer, noop_meter)
        try:
            return _batched(api_retry, sliced(api_ids, r))
        finally:
            otel.uninstrument()

    def sdk(r: int) -> list[float]:
        otel.instrument(tracer_provider, meter_provider)
        try:
            return _batched(sdk_retry, sliced(sdk_ids, r))
        finally:
            otel.uninstrument()

    lib_off = Figure("RetryService(MemoryStorage).retry, telemetry off", "us")
    reads = Figure(f"{HOOK_READS} reads of _trace.current", "us")
    on_api = Figure("the same retry, instrument() with the API's no-op providers", "us")
    on_sdk = Figure("the same retry, instrument() with the SDK (spans and metrics)", "us")
    alternate(
        [
            (lib_off, off),
            (reads, lambda r: _reads(sliced(off_ids, r))),
            (on_api, api),
            (on_sdk, sdk),
        ],
        rounds,
    )
    processor.shutdown()
    note = f"{total} retries each side, delivered at once, timed in batches of {MEMORY_BATCH}"
    return [
        Row(
            "telemetry",
            "the hook reads of a retry, telemetry off, vs the retry",
            reads,
            lib_off,
            target="≤ 0.01x",
            bound=0.01,
            note="what the hooks add without instrument(); OpenTelemetry is not imported",
        ),
        Row(
            "telemetry",
            "retry, on with the API's no-op providers vs off",
            on_api,
            lib_off,
            target="report",
            note=note,
        ),
        Row(
            "telemetry",
            "retry, on with the SDK (batch span processor, metrics) vs off",
            on_sdk,
            lib_off,
            target="report",
            note=note,
        ),
    ]
