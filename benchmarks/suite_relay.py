"""Outbox relay throughput, one and several relays, and a 100,000-entry backlog drain.

One PostgreSQL schema (the library's, made by its migrations) holds a backlog
of pending outbox entries, bulk-inserted with one ``INSERT … SELECT``. Each
round drains it to the end, then the backlog is made again (``TRUNCATE`` and
the same ``INSERT``), so both sides drain the same table and the same rows.

- library: ``OutboxRelay(PostgresStorage).run_once()`` in a loop until a
  claim comes back empty, in 1, 2 or 4 processes;
- floor: psycopg directly, one transaction per batch: ``SELECT … ORDER BY
  pending_seq LIMIT batch FOR UPDATE SKIP LOCKED``, the publish, one
  ``UPDATE`` marking the batch delivered, ``COMMIT``; same processes.

Both publish the same way, one Redis ``LPUSH`` per entry on one connection per
process (Redis db 11, a list of this run's own). After each drain the list is
read back and every entry's messages counted: duplicates and misses go into
the row's figures (measured, not asserted). Process start-up is not timed:
every relay connects first, then all are told to go at once; a drain lasts
from that moment to the end of the last relay.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from _harness import Figure, Row, alternate, unavailable
from suite_pg import dsn
from suite_pg import reachable as pg_reachable

HERE = Path(__file__).resolve().parent
SCHEMA = "bench_relay_outbox"
PID = "relay"
REDIS_DB = 11
BATCH = 100
GROUP = "relay"


def reachable() -> str | None:
    """``None`` when PostgreSQL and Redis answer, else why not."""
    reason = pg_reachable()
    if reason:
        return reason
    try:
        import redis

        redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB, socket_timeout=3).ping()
    except Exception as exc:  # noqa: BLE001
        return f"Redis at 127.0.0.1:6379 unreachable: {type(exc).__name__}"
    return None


def drop_schema() -> None:
    import psycopg

    with psycopg.connect(dsn(), autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE')


def make_schema(size: int) -> None:
    """The library's schema with ``size`` assigned tasks (:func:`refill` makes the entries)."""
    import psycopg
    from _fixtures import NOW

    from deepwork_retry import Project
    from deepwork_retry.storage.postgres import PostgresStorage

    drop_schema()
    storage = PostgresStorage(dsn(), schema=SCHEMA, max_size=1)
    storage.create_project(Project(id=PID, created_at=NOW, updated_at=NOW))
    storage.close()
    s = f'"{SCHEMA}"'
    with psycopg.connect(dsn(), autocommit=False) as conn:
        conn.execute(
            f"INSERT INTO {s}.tasks (project_id, id, title, status, retry_count, max_retries,"
            " retries_left, blocked_by, attempt, created_at, updated_at, version, metadata)"
            " SELECT %s, 't' || lpad(x::text, 7, '0'), '', 'assigned', 0, 3, 3, '{}', 1,"
            " '2026-01-01Z', '2026-01-01Z', 1, '{}'::jsonb FROM generate_series(0, %s - 1) AS x",
            (PID, size),
        )
        conn.execute(
            f"UPDATE {s}.progress SET total = total + %s, assigned = assigned + %s"
            " WHERE project_id = %s AND stripe = 0",
            (size, size, PID),
        )
        conn.commit()


def refill(conn: Any, count: int) -> float:
    """Make ``count`` entries pending again (the first ``count`` tasks); seconds it took."""
    s = f'"{SCHEMA}"'
    t0 = time.perf_counter()
    conn.execute(f"TRUNCATE {s}.outbox")
    conn.execute(
        f"INSERT INTO {s}.outbox (project_id, task_id, attempt, state, available_at,"
        " created_at, tries, seq, pending_seq)"
        f" SELECT project_id, id, attempt, 'pending', now() - interval '1 minute', now(), 0,"
        f" nextval('{s}.outbox_order'), currval('{s}.outbox_order')"
        f" FROM (SELECT project_id, id, attempt FROM {s}.tasks ORDER BY id LIMIT %s) AS t",
        (count,),
    )
    conn.execute(f"VACUUM ANALYZE {s}.outbox")
    return time.perf_counter() - t0


def server_settings() -> dict[str, str]:
    import psycopg

    names = ("synchronous_commit", "fsync", "wal_sync_method", "max_connections")
    with psycopg.connect(dsn(), autocommit=True) as conn:
        return {n: str(conn.execute(f"SHOW {n}").fetchone()[0]) for n in names}  # type: ignore[index]


def delivered_rows(conn: Any) -> int:
    row = conn.execute(
        f"SELECT count(*) FROM \"{SCHEMA}\".outbox WHERE state = 'delivered'"
    ).fetchone()
    return int(row[0]) if row else 0


class Pool:
    """Relay processes of one side, started once, told to drain on demand."""

    def __init__(self, side: str, size: int, key: str, logs: Path) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE)])
        self.key = key
        self.logs = [open(logs / f"relay_{side}_{i}.log", "w") for i in range(size)]  # noqa: SIM115
        argv = [sys.executable, str(HERE / "_relay_worker.py"), side, SCHEMA]
        argv += [str(BATCH), str(REDIS_DB), key, dsn()]
        pipe = subprocess.PIPE
        self.procs = [
            subprocess.Popen(argv, stdin=pipe, stdout=pipe, stderr=log, text=True, env=env)
            for log in self.logs
        ]
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"relay worker did not start (see {logs})")

    def drain(self, relays: int) -> tuple[float, list[dict[str, Any]]]:
        """All of the first ``relays`` processes drain at once; seconds and their reports."""
        used = self.procs[:relays]
        go = time.time()
        for proc in used:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        reports = []
        for proc in used:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("relay worker died during a drain")
            reports.append(json.loads(line))
        return max(r["end"] for r in reports) - go, reports

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(Exception):
                assert proc.stdin is not None
                proc.stdin.write("quit\n")
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self.logs:
            log.close()


def published(client: Any, key: str, expected: int) -> dict[str, int]:
    """Messages in the list ``key`` counted per entry, then the list deleted."""
    counts = Counter(m.decode() for m in client.lrange(key, 0, -1))
    client.delete(key)
    expected_ids = {f"{PID}|t{x:07d}|1" for x in range(expected)}
    return {
        "messages": sum(counts.values()),
        "duplicates": sum(c - 1 for c in counts.values() if c > 1),
        "misses": len(expected_ids - counts.keys()),
        "strays": len(counts.keys() - expected_ids),
    }


def side(
    admin: Any, figure: Figure, pool: Pool, relays: int, backlog: int, client: Any, time_us: bool
) -> Any:
    """A side for :func:`alternate`: one drain per round; its rate (entries/s) as the
    sample, or with ``time_us`` its time (µs) and the rate in ``extra``."""

    def run(_r: int) -> list[float]:
        refill_s = refill(admin, backlog)
        seconds, reports = pool.drain(relays)
        check = published(client, pool.key, backlog)
        check["rows_delivered"] = delivered_rows(admin)
        figure.extra.setdefault("drain_s", []).append(seconds)
        figure.extra.setdefault("refill_s", []).append(refill_s)
        figure.extra.setdefault("per_relay", []).append(
            [{"delivered": r["delivered"], "claims": r["claims"],
              "busy_s": r["end"] - r["start"]} for r in reports]
        )  # fmt: skip
        figure.extra.setdefault("checks", []).append(check)
        if time_us:
            figure.extra.setdefault("rate_entries_s", []).append(backlog / seconds)
            return [seconds * 1e6]
        return [backlog / seconds]

    return run


def once_note(lib: Figure, floor: Figure) -> str:
    """Duplicates and misses over every drain of both sides, in words."""
    parts = []
    for fig, name in ((lib, "library"), (floor, "floor")):
        checks = fig.extra.get("checks", [])
        dups = sum(c["duplicates"] for c in checks)
        miss = sum(c["misses"] for c in checks)
        parts.append(f"{name}: {dups} duplicates, {miss} misses over {len(checks)} drains")
        fig.extra["duplicates_total"] = dups
        fig.extra["misses_total"] = miss
    return "exactly-once check, " + "; ".join(parts)


def run(quick: bool, scratch: Path, logs: Path) -> list[Row]:
    """The group's rows (sizes smaller with ``quick``)."""
    target = "≥ 0.8x floor rate"
    reason = reachable()
    if reason:
        return [unavailable(GROUP, "relay throughput, PostgreSQL", reason, target)]
    import redis

    backlog, rounds, big = (5_000, 2, 25_000) if quick else (15_000, 3, 100_000)
    relay_counts = (1, 2, 4)
    key = f"bench_relay:{os.getpid()}"
    client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    client.delete(key + ":lib", key + ":floor")
    rows: list[Row] = []
    pools: list[Pool] = []
    import psycopg

    # One connection for the set-up and the checks: the server's connections are shared.
    admin = psycopg.connect(dsn(), autocommit=True)
    try:
        t0 = time.perf_counter()
        make_schema(big)
        setup_s = time.perf_counter() - t0
        server = server_settings()
        lib_pool = Pool("lib", max(relay_counts), key + ":lib", logs)
        pools.append(lib_pool)
        floor_pool = Pool("floor", max(relay_counts), key + ":floor", logs)
        pools.append(floor_pool)
        for relays in relay_counts:
            lib = Figure(f"OutboxRelay(PostgresStorage) x{relays}", "entries/s")
            floor = Figure(f"bare SKIP LOCKED claim x{relays}", "entries/s")
            for fig in (lib, floor):
                fig.extra.update(relays=relays, backlog=backlog, batch=BATCH, setup_s=setup_s)
                fig.extra.update(server)
            # Commits per batch: the library's claim (a lease) and its delivered mark;
            # the floor's one transaction holding the row locks over the publish.
            lib.extra["commits_per_batch"], floor.extra["commits_per_batch"] = 2, 1
            alternate(
                [
                    (lib, side(admin, lib, lib_pool, relays, backlog, client, False)),
                    (floor, side(admin, floor, floor_pool, relays, backlog, client, False)),
                ],
                rounds,
            )
            rows.append(
                Row(GROUP, f"relay throughput, PostgreSQL, {relays} relay(s)", lib, floor,
                    target=target, bound=0.8, sense="min", note=once_note(lib, floor))
            )  # fmt: skip
        for relays in (1, max(relay_counts)):
            lib = Figure(f"OutboxRelay drain x{relays}", "us")
            floor = Figure(f"bare SKIP LOCKED drain x{relays}", "us")
            for fig in (lib, floor):
                fig.extra.update(relays=relays, backlog=big, batch=BATCH)
            alternate(
                [
                    (lib, side(admin, lib, lib_pool, relays, big, client, True)),
                    (floor, side(admin, floor, floor_pool, relays, big, client, True)),
                ],
                1,
            )
            rows.append(
                Row(GROUP, f"drain {big:,} pending, PostgreSQL, {relays} relay(s)", lib, floor,
                    target="report (drain time)", note=once_note(lib, floor))
            )  # fmt: skip
    finally:
        for pool in pools:
            pool.close()
        admin.close()
        with contextlib.suppress(Exception):
            client.delete(key + ":lib", key + ":floor")
            client.close()
        with contextlib.suppress(Exception):
            drop_schema()
    return rows
