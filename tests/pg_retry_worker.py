"""One OS process of the multi-process retry test (run by test_postgres_concurrency.py).

    python pg_retry_worker.py DSN SCHEMA OFFSET COUNT TASKS

Opens the storage, prints ``ready``, waits for ``go`` on stdin, then fires
COUNT concurrent manual retries over TASKS tasks (starting at OFFSET) and
prints a JSON summary. Its dispatcher records each delivery in the table
``deliveries`` of the schema, so the test can count them.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from psycopg import sql

from deepwork_retry import AsyncRetryService, TaskNotBlocked
from deepwork_retry._core.model import DispatchEntry
from deepwork_retry.storage.postgres import AsyncPostgresStorage


class TableDispatcher:
    """Delivers an entry by inserting it into ``deliveries`` (what a queue would receive)."""

    def __init__(self, storage: AsyncPostgresStorage) -> None:
        self.storage = storage
        self.query = sql.SQL(
            "INSERT INTO {} (project_id, task_id, attempt, worker) VALUES (%s, %s, %s, %s)"
        ).format(sql.Identifier(storage.schema, "deliveries"))

    async def dispatch(self, entry: DispatchEntry) -> None:
        async with self.storage.pool.connection() as conn:
            await conn.execute(self.query, (*entry.key, os.getpid()))


async def main(dsn: str, schema: str, offset: int, count: int, tasks: int) -> dict[str, Any]:
    async with AsyncPostgresStorage(dsn, schema=schema, migrate=False, max_size=5) as storage:
        service = AsyncRetryService(storage, TableDispatcher(storage))
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        ids = [f"t{(offset + n) % tasks:02d}" for n in range(count)]
        results = await asyncio.gather(
            *(service.retry("p", tid, actor=f"worker-{offset}") for tid in ids),
            return_exceptions=True,
        )
    summary: dict[str, Any] = {"succeeded": [], "not_blocked": 0, "errors": []}
    for tid, result in zip(ids, results, strict=True):
        if isinstance(result, TaskNotBlocked):
            summary["not_blocked"] += 1
        elif isinstance(result, BaseException):
            summary["errors"].append(repr(result))
        else:
            summary["succeeded"].append([tid, result.dispatch.status])
    return summary


if __name__ == "__main__":
    dsn, schema, offset, count, tasks = sys.argv[1:6]
    print(json.dumps(asyncio.run(main(dsn, schema, int(offset), int(count), int(tasks)))))
