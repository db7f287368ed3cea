"""Every benchmark in one command: the library against its floors and its peers.

    python benchmarks/run.py [--quick] [--only NAME[,NAME...]] [--json out.json]

Prints one table (library figure, floor or peer figure, ratio, target, met?)
and writes the raw figures as JSON (default ``benchmarks/results/latest.json``).
Each comparison runs both sides in the same run, in alternating rounds, and
reports medians and p99 over the repeated runs. Nothing here asserts: a
missed target is a row marked ``no``, a comparison that cannot run here is a
row marked ``unavailable: <reason>``.

NAMES: memory, sqlite, sqlite-scale, postgres, postgres-scale, concurrency,
http, pocketpaw, procrastinate, django, sqlalchemy, telemetry, dispatch, queues,
relay, bulk, storm, longrun, processes, queue-peers.

PostgreSQL: ``$DEEPWORK_BENCH_DSN`` (default
``postgresql://postgres@127.0.0.1:5432/test``); the benchmarks create and drop
schemas named ``bench_*`` and the databases ``bench_procrastinate`` and
``bench_django_*``. The peers
are installed into ``benchmarks/.peers/`` on first use and ``wrk`` with
apt-get when it is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import _peers  # noqa: E402
import suite_bulk  # noqa: E402
import suite_dispatch  # noqa: E402
import suite_django  # noqa: E402
import suite_http  # noqa: E402
import suite_local  # noqa: E402
import suite_longrun  # noqa: E402
import suite_pg  # noqa: E402
import suite_processes  # noqa: E402
import suite_queue_peers  # noqa: E402
import suite_queues  # noqa: E402
import suite_relay  # noqa: E402
import suite_sqlalchemy  # noqa: E402
import suite_storm  # noqa: E402
import suite_telemetry  # noqa: E402
from _harness import Row, fmt_value, unavailable  # noqa: E402

NAMES = (
    "memory",
    "sqlite",
    "sqlite-scale",
    "postgres",
    "postgres-scale",
    "concurrency",
    "http",
    "pocketpaw",
    "procrastinate",
    "django",
    "sqlalchemy",
    "telemetry",
    "dispatch",
    "queues",
    "relay",
    "bulk",
    "storm",
    "longrun",
    "processes",
    "queue-peers",
)


class Plan:
    """How much of everything to run: ``--quick`` for a smoke test, else the full run."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        if quick:
            self.memory = (6, 2000)
            self.sqlite = (6, 300)
            self.scale = (4, 100, [10, 1_000, 100_000])
            self.postgres = (6, 150)
            self.clients = [1, 4, 16]
            self.concurrency = (2, 40)
            self.http = (4, 2.0, 16)
            self.pocketpaw = (4, 2.0, 16, 300)
            self.procrastinate = (6, 100)
            self.django = (6, 100)
            self.sqlalchemy = (6, 100)
            self.telemetry = (6, 2000)
        else:
            self.memory = (20, 5000)
            self.sqlite = (20, 500)
            self.scale = (10, 200, [10, 1_000, 100_000, 1_000_000])
            self.postgres = (20, 300)
            self.clients = [1, 2, 4, 8, 16]
            self.concurrency = (4, 150)
            self.http = (10, 4.0, 16)
            self.pocketpaw = (6, 4.0, 16, 500)
            self.procrastinate = (20, 200)
            self.django = (20, 200)
            self.sqlalchemy = (16, 250)
            self.telemetry = (20, 5000)


def build_steps(plan: Plan, scratch: Path, logs: Path) -> list[tuple[str, Callable[[], list[Row]]]]:
    p = plan
    return [
        ("memory", lambda: suite_local.memory(*p.memory)),
        ("sqlite", lambda: suite_local.sqlite(*p.sqlite, scratch)),
        ("sqlite-scale", lambda: suite_local.sqlite_scale(*p.scale, scratch)),
        ("postgres", lambda: suite_pg.postgres(*p.postgres)),
        ("postgres-scale", lambda: suite_pg.scale(*p.scale)),
        (
            "concurrency",
            lambda: [
                *suite_local.memory_concurrency(*p.concurrency, p.clients),
                *suite_local.sqlite_concurrency(*p.concurrency, p.clients, scratch),
                *suite_pg.concurrency(*p.concurrency, p.clients),
            ],
        ),
        ("http", lambda: suite_http.adapters(*p.http, logs)),
        (
            "pocketpaw",
            lambda: suite_http.pocketpaw(*p.pocketpaw, _peers.ensure("pocketpaw"), logs, scratch),
        ),
        (
            "procrastinate",
            lambda: suite_pg.procrastinate(*p.procrastinate, _peers.ensure("procrastinate"), logs),
        ),
        ("django", lambda: suite_django.django_orm(*p.django, scratch)),
        ("sqlalchemy", lambda: suite_sqlalchemy.sqlalchemy(*p.sqlalchemy, scratch)),
        ("telemetry", lambda: suite_telemetry.telemetry(*p.telemetry)),
        ("dispatch", lambda: suite_dispatch.run(p.quick, scratch, logs)),
        ("queues", lambda: suite_queues.run(p.quick, scratch, logs)),
        ("relay", lambda: suite_relay.run(p.quick, scratch, logs)),
        ("bulk", lambda: suite_bulk.run(p.quick, scratch, logs)),
        ("storm", lambda: suite_storm.run(p.quick, scratch, logs)),
        ("longrun", lambda: suite_longrun.run(p.quick, scratch, logs)),
        ("processes", lambda: suite_processes.run(p.quick, scratch, logs)),
        ("queue-peers", lambda: suite_queue_peers.run(p.quick, scratch, logs)),
    ]


def cell(row: Row, which: str) -> str:
    fig = row.library if which == "library" else row.reference
    if fig is None:
        return "-"
    text = fmt_value(fig.median, fig.unit)
    if fig.unit == "us":
        text += f" (p99 {fmt_value(fig.p99, fig.unit)})"
    elif "p99_us_median" in fig.extra:
        text += f" (p99 {fig.extra['p99_us_median'] / 1000:,.1f} ms)"
    return text


def table(rows: list[Row]) -> str:
    head = ["group", "benchmark", "library", "floor / peer", "ratio", "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if row.unavailable:
            cells = [
                row.group,
                row.name,
                "-",
                "-",
                "-",
                row.target,
                f"unavailable: {row.unavailable}",
            ]
        else:
            ratio = row.ratio
            met = row.met
            cells = [
                row.group,
                row.name,
                cell(row, "library"),
                cell(row, "reference"),
                "-" if ratio is None else f"{ratio:.2f}x",
                row.target,
                "-" if met is None else ("yes" if met else "no"),
            ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of about two minutes")
    parser.add_argument("--only", default="", help="comma-separated names: " + ", ".join(NAMES))
    parser.add_argument("--json", default=str(HERE / "results" / "latest.json"))
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv  # recorded with the results
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    unknown = only - set(NAMES)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    plan = Plan(args.quick)
    rows: list[Row] = []
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deepwork-bench-") as tmp:
        scratch = Path(tmp)
        logs = HERE / "results" / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for name, step in build_steps(plan, scratch, logs):
            if only and name not in only:
                continue
            print(
                f"[{time.perf_counter() - started:6.0f}s] {name} ...", file=sys.stderr, flush=True
            )
            t0 = time.perf_counter()
            try:
                rows.extend(step())
            except Exception as exc:  # noqa: BLE001 - one failing benchmark never ends the run
                traceback.print_exc()
                rows.append(unavailable(name, name, f"{type(exc).__name__}: {exc}"[:160]))
            timings[name] = time.perf_counter() - t0
    print(table(rows))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": " ".join(["python benchmarks/run.py", *given]),
                "machine": machine(),
                "seconds": timings,
                "rows": [row.as_json() for row in rows],
            },
            indent=1,
            default=str,
        )
    )
    print(f"\nraw figures: {out}  ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
