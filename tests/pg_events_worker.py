"""One OS process of the multi-process events test (run by test_events_postgres.py).

    python pg_events_worker.py DSN SCHEMA PREFIX TASKS ROUNDS

Opens the storage, prints ``ready``, waits for ``go`` on stdin, then for ROUNDS
rounds blocks and retries each of its TASKS tasks (``PREFIX0``, ``PREFIX1`` ...
of project ``p``, assigned beforehand) and prints how many moves it made.
"""

from __future__ import annotations

import json
import sys

from deepwork_retry import ExecutorService, RetryService
from deepwork_retry.storage.postgres import PostgresStorage


def main(dsn: str, schema: str, prefix: str, tasks: int, rounds: int) -> int:
    storage = PostgresStorage(dsn, schema=schema, migrate=False, max_size=2)
    try:
        executor, retries = ExecutorService(storage), RetryService(storage)
        print("ready", flush=True)
        sys.stdin.readline()
        moves = 0
        for _ in range(rounds):
            for n in range(tasks):
                executor.block("p", f"{prefix}{n}", message="stop")
                retries.retry("p", f"{prefix}{n}", actor=prefix)
                moves += 2
        return moves
    finally:
        storage.close()


if __name__ == "__main__":
    dsn, schema, prefix, tasks, rounds = sys.argv[1:6]
    print(json.dumps({"moves": main(dsn, schema, prefix, int(tasks), int(rounds))}), flush=True)
