"""What every benchmark shares: timing, statistics, alternation and result rows.

A benchmark compares the library with a reference (a floor written directly
against the driver, or a peer) in the same run: the two are measured in
alternating rounds (A B A B ...), so both see the same machine conditions,
and the result is a :class:`Row` holding both figures, their ratio and the
target the ratio is held to. Nothing here asserts: a missed target is a row
whose ``met`` is ``False``.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

Unit = str  # "us" (lower is better) or "req/s", "ops/s" (higher is better)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


@dataclass
class Figure:
    """One side of a comparison: per-operation samples (µs) or per-round rates."""

    label: str
    unit: Unit
    samples: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return median(self.samples)

    @property
    def p99(self) -> float:
        return percentile(self.samples, 99)

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "unit": self.unit,
            "n": len(self.samples),
            "median": self.median,
            "p99": self.p99,
            "mean": statistics.fmean(self.samples) if self.samples else math.nan,
            **self.extra,
        }


@dataclass
class Row:
    """One line of the table: the library against its floor or peer."""

    group: str
    name: str
    library: Figure | None
    reference: Figure | None
    target: str = ""
    # How the ratio is read: library/reference must be <= bound ("max") or >= bound ("min").
    bound: float | None = None
    sense: str = "max"
    note: str = ""
    unavailable: str | None = None
    ratio_override: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.ratio_override is not None:
            return self.ratio_override
        if self.library is None or self.reference is None:
            return None
        ref = self.reference.median
        if not ref or math.isnan(ref):
            return None
        return self.library.median / ref

    @property
    def met(self) -> bool | None:
        ratio = self.ratio
        if self.bound is None or ratio is None or math.isnan(ratio):
            return None
        return ratio <= self.bound if self.sense == "max" else ratio >= self.bound

    def as_json(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "name": self.name,
            "library": None if self.library is None else self.library.summary(),
            "reference": None if self.reference is None else self.reference.summary(),
            "ratio": self.ratio,
            "target": self.target,
            "met": self.met,
            "note": self.note,
            "unavailable": self.unavailable,
            "library_samples": None if self.library is None else self.library.samples,
            "reference_samples": None if self.reference is None else self.reference.samples,
            "raw": {
                "library": None if self.library is None else asdict(self.library)["extra"],
                "reference": None if self.reference is None else asdict(self.reference)["extra"],
            },
        }


def unavailable(group: str, name: str, reason: str, target: str = "") -> Row:
    return Row(group, name, None, None, target=target, unavailable=reason)


def timed_us(op: Callable[[], object], batch: int = 1) -> float:
    """Microseconds per call of ``op``, timed over ``batch`` calls."""
    t0 = time.perf_counter_ns()
    for _ in range(batch):
        op()
    return (time.perf_counter_ns() - t0) / 1000 / batch


def alternate(
    sides: Sequence[tuple[Figure, Callable[[int], Iterable[float]]]],
    rounds: int,
) -> None:
    """Run ``rounds`` rounds; in each, every side in turn adds its samples.

    A side is ``(figure, run)``: ``run(round_index)`` yields the samples of
    one round. The order of the sides flips every round (A B, B A, ...) so
    neither always runs first after a pause.
    """
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for figure, run in order:
            figure.samples.extend(run(r))


def fmt_value(value: float | None, unit: Unit) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "us":
        return f"{value:,.1f} µs" if value < 1000 else f"{value / 1000:,.2f} ms"
    return f"{value:,.0f} {unit}"


Op = Callable[[str, str], object]


def per_op(op: Op, items: Sequence[tuple[str, str]]) -> list[float]:
    """Microseconds of each ``op(project_id, task_id)`` over ``items``."""
    samples = []
    clock = time.perf_counter_ns
    for pid, tid in items:
        t0 = clock()
        op(pid, tid)
        samples.append((clock() - t0) / 1000)
    return samples


def per_op_rounds(
    op: Op, slices: Sequence[Sequence[tuple[str, str]]]
) -> Callable[[int], list[float]]:
    """A side for :func:`alternate`: round ``r`` times ``op`` on ``slices[r]``."""
    return lambda r: per_op(op, slices[r])


def threaded_rate(work: Sequence[Sequence[tuple[str, str]]], ops: Sequence[Op]) -> float:
    """Operations per second, one thread per list of ``work``, thread ``i`` calling ``ops[i]``."""
    start = threading.Barrier(len(work) + 1)
    errors: list[BaseException] = []

    def run(items: Sequence[tuple[str, str]], op: Op) -> None:
        start.wait()
        try:
            for pid, tid in items:
                op(pid, tid)
        except BaseException as exc:  # noqa: BLE001 - reported after the run
            errors.append(exc)

    pool = [threading.Thread(target=run, args=(w, op)) for w, op in zip(work, ops, strict=True)]
    for t in pool:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return sum(len(w) for w in work) / elapsed


def rate_rounds(
    work: Sequence[Sequence[Sequence[tuple[str, str]]]], ops: Sequence[Op]
) -> Callable[[int], list[float]]:
    """A side for :func:`alternate`: round ``r`` measures ``work[r]`` on threads."""
    return lambda r: [threaded_rate(work[r], ops)]
