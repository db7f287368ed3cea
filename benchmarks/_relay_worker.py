"""One relay process of the relay benchmark, library or floor, driven over stdin/stdout.

    python _relay_worker.py lib|floor SCHEMA BATCH REDIS_DB REDIS_KEY

It connects, prints ``ready``, then for every ``go`` line on stdin drains
the outbox (until a claim comes back empty) and prints one JSON line: how
many entries it delivered, the claims it made, and its start and end on the
wall clock (``time.time()``, comparable across processes). ``quit`` ends it.

Both sides publish the same way: one Redis ``LPUSH`` of
``project|task|attempt`` per entry, on one connection.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

DSN = "postgresql://postgres@127.0.0.1:5432/test"


class RedisDispatcher:
    """The library's side of the publish: one LPUSH per entry."""

    def __init__(self, client: Any, key: str) -> None:
        self.client = client
        self.key = key

    def dispatch(self, entry: Any) -> None:
        self.client.lpush(self.key, f"{entry.project_id}|{entry.task_id}|{entry.attempt}")


def library(schema: str, batch: int, client: Any, key: str, dsn: str) -> Any:
    from deepwork_retry import OutboxRelay
    from deepwork_retry.storage.postgres import PostgresStorage

    storage = PostgresStorage(dsn, schema=schema, min_size=1, max_size=1)
    relay = OutboxRelay(storage, RedisDispatcher(client, key), batch=batch)

    def drain() -> tuple[int, int]:
        delivered = claims = 0
        while True:
            n = relay.run_once()
            claims += 1
            if n == 0:
                return delivered, claims
            delivered += n

    return drain


def floor(schema: str, batch: int, client: Any, key: str, dsn: str) -> Any:
    import psycopg

    conn = psycopg.connect(dsn, autocommit=False)
    s = f'"{schema}"'
    claim = (
        f"SELECT project_id, task_id, attempt FROM {s}.outbox"
        " WHERE state = 'pending' AND available_at <= now()"
        " AND (claimed_until IS NULL OR claimed_until <= now())"
        " ORDER BY pending_seq LIMIT %s FOR UPDATE SKIP LOCKED"
    ).encode()
    mark = (
        f"UPDATE {s}.outbox AS o SET state = 'delivered', delivered_at = now(),"
        " tries = o.tries + 1, pending_seq = NULL"
        " FROM unnest(%s::text[], %s::text[], %s::bigint[]) AS k(project_id, task_id, attempt)"
        " WHERE o.project_id = k.project_id AND o.task_id = k.task_id AND o.attempt = k.attempt"
    ).encode()
    lpush = client.lpush

    def drain() -> tuple[int, int]:
        delivered = claims = 0
        while True:
            with conn.transaction():
                rows = conn.execute(claim, (batch,)).fetchall()
                claims += 1
                if not rows:
                    return delivered, claims
                for pid, tid, n in rows:
                    lpush(key, f"{pid}|{tid}|{n}")
                pids, tids, ns = (list(c) for c in zip(*rows, strict=True))
                conn.execute(mark, (pids, tids, ns))
            delivered += len(rows)

    return drain


def main() -> None:
    import redis

    side, schema, batch, db, key = sys.argv[1:6]
    dsn = sys.argv[6] if len(sys.argv) > 6 else DSN
    client = redis.Redis(host="127.0.0.1", port=6379, db=int(db))
    client.ping()
    drain = (library if side == "lib" else floor)(schema, int(batch), client, key, dsn)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        start = time.time()
        delivered, claims = drain()
        end = time.time()
        print(json.dumps({"delivered": delivered, "claims": claims, "start": start, "end": end}))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
