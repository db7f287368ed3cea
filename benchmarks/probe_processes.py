"""What the library's PostgreSQL retries wait for under HTTP load (not part of ``run.py``).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/probe_processes.py [ROUNDS] [SECONDS]

One library server of the ``processes`` group (one process), loaded by
``wrk -t1 -c16`` in four variants: the tasks of one project; spread over 16
projects; one paused project (the retry then defers the attempt and sends no
``NOTIFY``); 16 paused projects. While each round runs, the wait events of the
server's active PostgreSQL backends are sampled from ``pg_stat_activity``
every 10 ms. Prints the rate, the latency and the most sampled waits per round.
"""

from __future__ import annotations

import collections
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
import suite_pg
import suite_processes as sp
from _fixtures import add_blocked
from _harness import Figure

PROJECTS = 16
PER_PROJECT = 1000
NAME = "probe"


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
    wrk = sp.ensure_wrk()
    if wrk is None or suite_pg.reachable() is not None:
        print("needs wrk and PostgreSQL", file=sys.stderr)
        return 1
    scratch = Path(tempfile.mkdtemp(prefix="deepwork-probe-"))
    storage = sp.prepare_schema()
    variants = {
        "one project": ["one"],
        "16 projects": [f"q{k:02d}" for k in range(PROJECTS)],
        "one paused project (no NOTIFY)": ["paused"],
        "16 paused projects": [f"z{k:02d}" for k in range(PROJECTS)],
    }
    try:
        for projects in variants.values():
            size = PER_PROJECT * PROJECTS // len(projects)
            for pid in projects:
                add_blocked(storage, pid, size)
    finally:
        storage.close()
    with psycopg.connect(suite_pg.dsn(), autocommit=True) as conn:
        conn.execute(
            f"UPDATE \"{sp.SCHEMA}\".projects SET status = 'paused' "
            "WHERE id = 'paused' OR id LIKE 'z%'"
        )
    files = {}
    for name, projects in variants.items():
        size = PER_PROJECT * PROJECTS // len(projects)
        lines = [f"{projects[i % len(projects)]}/tasks/t{i // len(projects):07d}" for i in range(
            size * len(projects)
        )]  # fmt: skip
        files[name] = scratch / f"{len(files)}.txt"
        files[name].write_text("\n".join(lines) + "\n")
    server = sp.uvicorn_server("library", 1, "workers", NAME, scratch, sp.server_env(NAME))
    monitor = psycopg.connect(suite_pg.dsn(), autocommit=True)
    try:
        sides = {
            name: sp.Side(
                Figure(name, "req/s"),
                server,
                sp.Meter(monitor, server, sp.app_name(NAME)),
                PER_PROJECT * PROJECTS // 2,
                template="/api/deep-work/projects/%s/retry",
                token=sp.TOKEN,
                ids_file=path,
            )
            for name, path in files.items()
        }
        sides["one project"].load(wrk, 1.0)  # warm-up
        for _ in range(rounds):
            for name, side in sides.items():
                waits: collections.Counter[str] = collections.Counter()
                done = threading.Event()

                def sample(
                    waits: collections.Counter[str] = waits, done: threading.Event = done
                ) -> None:
                    with psycopg.connect(suite_pg.dsn(), autocommit=True) as conn:
                        while not done.is_set():
                            for (wait,) in conn.execute(
                                "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') "
                                "FROM pg_stat_activity "
                                "WHERE application_name = %s AND state = 'active'",
                                (sp.app_name(NAME),),
                            ):
                                waits[wait] += 1
                            time.sleep(0.01)

                sampler = threading.Thread(target=sample)
                sampler.start()
                result = side.load(wrk, seconds)
                done.set()
                sampler.join()
                cpu = result["cpu"]
                n = max(result["requests"], 1)
                print(
                    f"{name:32s} {result['rps']:7.0f} req/s  p50 {result['p50_us'] / 1000:6.1f} ms"
                    f"  p99 {result['p99_us'] / 1000:6.1f} ms  non-2xx {result['non2xx']}"
                    f"  server {cpu['server_cpu_s'] / n * 1e6:5.0f} µs/req"
                    f"  backends {cpu['pg_backends_cpu_s'] / n * 1e6:5.0f} µs/req"
                    f"  machine {cpu['machine_busy_cpu_s'] / cpu['wall_s']:.2f} cores"
                )
                print("    waits:", ", ".join(f"{w} {c}" for w, c in waits.most_common(5)))
    finally:
        server.stop()
        monitor.close()
        suite_pg.drop_schema(sp.SCHEMA)
    return 0


if __name__ == "__main__":
    sys.exit(main())
