"""One deployment's components, each started by its own command.

    celery -A app worker -c 4          a worker: runs attempts (any number of machines)
    python app.py web                  the retry API (any number of machines)
    python app.py relay                an outbox relay (one or more)
    python app.py reaper               a reaper (one or more)
    python app.py seed                 create a demo project and dispatch its tasks

Every component reads the same environment:

    DEEPWORK_DSN      PostgreSQL connection string (the shared state); when unset,
                      DEEPWORK_DB names a SQLite file instead (one machine only)
    DEEPWORK_SCHEMA   PostgreSQL schema (default: deepwork)
    DEEPWORK_BROKER   Celery broker URL (default: redis://127.0.0.1:6379/0)
    DEEPWORK_QUEUE    queue name (default: deepwork)
    DEEPWORK_TOKENS   bearer tokens of the API, "TOKEN=PRINCIPAL;..." (web only)
    DEEPWORK_LEASE    seconds an attempt lives without a heartbeat (default: 30)
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import time
from collections.abc import AsyncIterator

from celery import Celery

from deepwork_retry import ExecutorService, ExponentialBackoff, RetryPolicy, Task
from deepwork_retry.dispatch.celery import CeleryDispatcher, deepwork_task
from deepwork_retry.dispatch.reaper import run_reaper
from deepwork_retry.dispatch.relay import run_relay
from deepwork_retry.ports import AsyncStorage, Storage

BROKER = os.environ.get("DEEPWORK_BROKER", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("DEEPWORK_QUEUE", "deepwork")
TASK_NAME = "example.run_attempt"

# Workers, relays and reapers must agree on the policy: the reaper decides the
# retry of a lost attempt, the worker that of a failed one.
POLICY = RetryPolicy(
    backoff=ExponentialBackoff(wait_initial=1.0, wait_max=30.0, wait_jitter=1.0),
    lease=float(os.environ.get("DEEPWORK_LEASE", "30")),
)

app = Celery("example", broker=BROKER)
app.conf.update(
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=1,  # with late acks: take one message at a time
    task_ignore_result=True,
)


def open_storage() -> Storage:
    dsn = os.environ.get("DEEPWORK_DSN")
    if dsn:
        from deepwork_retry.storage.postgres import PostgresStorage

        return PostgresStorage(dsn, schema=os.environ.get("DEEPWORK_SCHEMA", "deepwork"))
    from deepwork_retry.storage.sqlite import SQLiteStorage

    return SQLiteStorage(os.environ.get("DEEPWORK_DB", "deepwork-example.db"))


def open_async_storage() -> AsyncStorage:
    dsn = os.environ.get("DEEPWORK_DSN")
    if dsn:
        from deepwork_retry.storage.postgres import AsyncPostgresStorage

        return AsyncPostgresStorage(dsn, schema=os.environ.get("DEEPWORK_SCHEMA", "deepwork"))
    from deepwork_retry.storage.sqlite import AsyncSQLiteStorage

    return AsyncSQLiteStorage(os.environ.get("DEEPWORK_DB", "deepwork-example.db"))


def dispatcher() -> CeleryDispatcher:
    return CeleryDispatcher(app, task_name=TASK_NAME, queue=QUEUE)


def executor() -> ExecutorService:
    """What each worker process reports through (built once per process)."""
    return ExecutorService(open_storage(), dispatcher(), policy=POLICY)


@deepwork_task(app, executor, name=TASK_NAME)
def run_attempt(task: Task, token: int) -> None:
    """The host's work: here, a coin toss that fails about one attempt in three."""
    logging.getLogger("example").info("running %s attempt %d", task.id, token)
    time.sleep(random.uniform(0.5, 2.0))
    if random.random() < 1 / 3:
        raise ConnectionError(f"the model endpoint hung up during attempt {token}")


# -- the other components -------------------------------------------------------------


def web() -> None:
    import uvicorn

    from deepwork_retry import AsyncRetryService
    from deepwork_retry.auth import StaticTokens
    from deepwork_retry.dispatch.celery import AsyncCeleryDispatcher
    from deepwork_retry.web.starlette import create_app

    storage = open_async_storage()

    @contextlib.asynccontextmanager
    async def lifespan(_: object) -> AsyncIterator[None]:
        # A PostgreSQL pool belongs to the event loop that opens it: open it here.
        open_pool = getattr(storage, "open", None)
        if open_pool is not None:
            await open_pool()
        yield
        await storage.close()

    service = AsyncRetryService(storage, AsyncCeleryDispatcher(dispatcher()))
    api = create_app(service, StaticTokens.from_env(), lifespan=lifespan)
    port = int(os.environ.get("PORT", "8000"))
    uvicorn.run(api, host=os.environ.get("HOST", "127.0.0.1"), port=port)


def seed() -> None:
    service = ExecutorService(open_storage(), dispatcher(), policy=POLICY)
    service.create_project("demo", name="Distributed demo")
    for number in range(1, 9):
        service.add_task("demo", f"task-{number}", title=f"Step {number}", max_retries=1)
        service.assign("demo", f"task-{number}")
    print("created project 'demo' with 8 tasks; blocked ones can be retried over HTTP")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    command = argv[1] if len(argv) > 1 else ""
    if command == "web":
        web()
    elif command == "relay":
        run_relay(open_storage(), dispatcher(), poll_interval=1.0)
    elif command == "reaper":
        # The reaper also prunes what the retention rule allows (docs/deployment.md).
        prune_every = float(os.environ.get("DEEPWORK_PRUNE_EVERY", "3600"))
        run_reaper(
            open_storage(),
            interval=5.0,
            policy=POLICY,
            dispatcher=dispatcher(),
            prune_every=prune_every,
        )
    elif command == "seed":
        seed()
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
