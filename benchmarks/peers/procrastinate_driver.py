"""Drives procrastinate's manual retry; runs in the peer's own virtualenv.

    python procrastinate_driver.py CONNINFO

Reads one command per line on stdin and answers one JSON line on stdout:

- ``setup N``: apply procrastinate's schema to the (empty) database, defer N
  jobs and fail each of them (fetched and finished as ``failed`` through
  procrastinate's own procedures, as a worker would); answers ``{"ok": N}``.
- ``run K``: retry the next K failed jobs with ``JobManager.retry_job_by_id``,
  timing each call; answers ``{"us": [...]}``.
- ``quit``.

This file imports procrastinate only; the benchmark talks to it through pipes.
"""

from __future__ import annotations

import datetime
import json
import sys
import time

import procrastinate


def main() -> int:
    conninfo = sys.argv[1]
    app = procrastinate.App(
        connector=procrastinate.SyncPsycopgConnector(conninfo=conninfo, min_size=1, max_size=2)
    )

    @app.task(name="bench_job", queue="bench")
    def bench_job() -> None:  # never run: jobs are failed directly
        return None

    failed: list[int] = []
    with app.open():
        for line in sys.stdin:
            cmd, _, arg = line.strip().partition(" ")
            if cmd == "setup":
                n = int(arg)
                app.schema_manager.apply_schema()
                with app.connector.pool.connection() as conn:  # type: ignore[attr-defined]
                    for _ in range(n):
                        bench_job.defer()
                    for _ in range(n):
                        row = conn.execute(
                            "SELECT id FROM procrastinate_fetch_job_v2(ARRAY['bench'], NULL)"
                        ).fetchone()
                        if row is None or row[0] is None:
                            break
                        conn.execute(
                            "SELECT procrastinate_finish_job_v1(%s, 'failed', false)", (row[0],)
                        )
                        failed.append(row[0])
                    conn.commit()
                print(json.dumps({"ok": len(failed)}), flush=True)
            elif cmd == "run":
                k = int(arg)
                batch, failed = failed[:k], failed[k:]
                samples = []
                manager = app.job_manager
                for job_id in batch:
                    t0 = time.perf_counter_ns()
                    manager.retry_job_by_id(
                        job_id, retry_at=datetime.datetime.now(datetime.timezone.utc)
                    )
                    samples.append((time.perf_counter_ns() - t0) / 1000)
                print(json.dumps({"us": samples}), flush=True)
            elif cmd == "quit":
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
