"""The fault soak's deployment: one module every process of it imports.

    python soak_app.py web PORT      the retry API (Starlette on uvicorn, PostgreSQL)
    python soak_app.py relay         an outbox relay
    python soak_app.py reaper        a reaper
    celery -A soak_celery worker     a Celery worker (Redis)
    dramatiq soak_dramatiq           a Dramatiq worker (RabbitMQ)

Projects named ``celery-*`` run on Celery, the others on Dramatiq: the web
processes, the relay and the reaper send each attempt to its project's queue.
Every process reads its settings from the environment:

- ``SOAK_DSN``, ``SOAK_SCHEMA``: the PostgreSQL database and schema;
- ``SOAK_REDIS``, ``SOAK_RABBITMQ``: the Celery and Dramatiq brokers;
- ``SOAK_QUEUE``: the queue name on both;
- ``SOAK_RUNS``: the file where the host's function appends one line per run;
- ``SOAK_LEASE``, ``SOAK_START_TIMEOUT``: the retry policy's lease and start timeout;
- ``SOAK_TOKEN``: the API's bearer token;
- ``SOAK_KEY_LIFE``: seconds an idempotency key lives (short, so the soak's
  prune has expired keys to remove while it runs).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import TYPE_CHECKING

from deepwork_retry import ExecutorService, ExponentialBackoff, Retention, RetryPolicy, Task
from deepwork_retry.ports import Dispatcher
from deepwork_retry.storage.postgres import PostgresStorage

if TYPE_CHECKING:
    from celery import Celery
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    from deepwork_retry import DispatchEntry

TASK_NAME = "deepwork_soak.execute"
HEARTBEAT = 0.5
DSN = os.environ.get("SOAK_DSN", "")
SCHEMA = os.environ.get("SOAK_SCHEMA", "soak")
QUEUE = os.environ.get("SOAK_QUEUE", "deepwork_soak")

POLICY = RetryPolicy(
    # Small delays, so automatic retries go through the outbox relay as in production.
    backoff=ExponentialBackoff(wait_initial=0.2, wait_max=1.0, wait_jitter=0.3),
    lease=float(os.environ.get("SOAK_LEASE", "6")),
    start_timeout=float(os.environ.get("SOAK_START_TIMEOUT", "12")),
)

RETENTION = Retention(idempotency=timedelta(seconds=float(os.environ.get("SOAK_KEY_LIFE", "60"))))
"""Keys outlive a client's resend after a fault (seconds) and expire while the soak runs."""


def open_storage() -> PostgresStorage:
    # migrate=False: the soak migrates once; a process (re)started while the
    # database restarts must not wait for it in the constructor.
    return PostgresStorage(DSN, schema=SCHEMA, migrate=False, timeout=3)


def on_celery(project_id: str) -> bool:
    return project_id.startswith("celery")


# -- the host's function ------------------------------------------------------------


def _draw(*parts: object) -> int:
    """A number in [0, 100) fixed by ``parts``: the same attempt always draws the same."""
    digest = hashlib.sha256(" ".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100


def host_work(task: Task, token: int) -> None:
    """Record the run, work a little, and fail ``metadata["fail_percent"]`` % of attempts."""
    line = f"{task.project_id} {task.id} {token} {os.getpid()}\n"
    # One short O_APPEND write per run: lines from several processes never interleave.
    fd = os.open(os.environ["SOAK_RUNS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    time.sleep(0.05 + _draw(task.project_id, task.id, token, "sleep") / 200)
    if _draw(task.project_id, task.id, token, "fail") < int(task.metadata.get("fail_percent", 0)):
        raise ConnectionError(f"planned failure of attempt {token}")


# -- dispatchers ------------------------------------------------------------------------


def celery_client() -> Celery:
    from celery import Celery

    app = Celery("deepwork_soak_client", broker=os.environ["SOAK_REDIS"])
    app.conf.update(task_default_queue=QUEUE, broker_connection_retry_on_startup=True)
    return app


def rabbitmq_broker() -> RabbitmqBroker:
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    return RabbitmqBroker(url=os.environ["SOAK_RABBITMQ"], confirm_delivery=True)


class RoutingDispatcher:
    """Sends a project's attempts to its queue: Celery on Redis, or Dramatiq on RabbitMQ."""

    def __init__(self) -> None:
        from deepwork_retry.dispatch.celery import CeleryDispatcher
        from deepwork_retry.dispatch.dramatiq import DramatiqDispatcher

        self.celery = CeleryDispatcher(celery_client(), task_name=TASK_NAME, queue=QUEUE)
        self.dramatiq = DramatiqDispatcher(
            rabbitmq_broker(), actor_name=TASK_NAME, queue_name=QUEUE
        )

    def dispatch(self, entry: DispatchEntry) -> None:
        if on_celery(entry.project_id):
            self.celery.dispatch(entry)
            return
        self.dramatiq.dispatch(entry)


def executor(dispatcher: Dispatcher) -> ExecutorService:
    return ExecutorService(open_storage(), dispatcher, policy=POLICY)


# -- the long-running processes -----------------------------------------------------------


def web(port: int) -> None:
    import uvicorn

    from deepwork_retry import AsyncRetryService
    from deepwork_retry.auth import StaticTokens
    from deepwork_retry.dispatch._to_async import AsyncFromSyncDispatcher
    from deepwork_retry.storage.postgres import AsyncPostgresStorage
    from deepwork_retry.web.starlette import create_app

    storage = AsyncPostgresStorage(DSN, schema=SCHEMA, migrate=False, timeout=3)

    @contextlib.asynccontextmanager
    async def lifespan(_: object) -> AsyncIterator[None]:
        await storage.open()
        yield
        await storage.close()

    service = AsyncRetryService(
        storage, AsyncFromSyncDispatcher(RoutingDispatcher()), policy=POLICY, retention=RETENTION
    )
    tokens = StaticTokens({os.environ["SOAK_TOKEN"]: "soak-client"})
    api = create_app(service, tokens, lifespan=lifespan)
    uvicorn.run(api, host="127.0.0.1", port=port, log_level="warning")


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"
    )
    command = argv[1] if len(argv) > 1 else ""
    if command == "web":
        web(int(argv[2]))
    elif command == "relay":
        from deepwork_retry.dispatch.relay import run_relay

        print("relay ready", flush=True)
        run_relay(open_storage(), RoutingDispatcher(), poll_interval=0.5)
    elif command == "reaper":
        from deepwork_retry.dispatch.reaper import run_reaper

        print("reaper ready", flush=True)
        run_reaper(open_storage(), interval=1.0, policy=POLICY, dispatcher=RoutingDispatcher())
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
