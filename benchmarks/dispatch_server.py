"""The processes of the ``dispatch`` group: ``python dispatch_server.py ROLE STORE FIFO [ARGS]``.

ROLE is one of

- ``web SIDE PORT TOKEN``: a uvicorn server (one worker, Starlette, access log
  off) answering ``POST /api/deep-work/projects/p/tasks/ID/retry``. SIDE:

  - ``lib-threads``: the Starlette adapter over ``AsyncRetryService`` with a
    :class:`~deepwork_retry.dispatch.threads.ThreadPoolDispatcher` (behind a
    one-line async port: ``dispatch`` submits to the pool);
  - ``lib-asyncio``: the same with an
    :class:`~deepwork_retry.dispatch.asyncio.AsyncioDispatcher`;
  - ``lib-none``: the same with no dispatcher: the retry leaves its outbox
    entry unclaimed for a relay;
  - ``floor-threads``: a bare Starlette route: Bearer check, one durable
    one-row ``UPDATE``, then ``ThreadPoolExecutor.submit(callable)``;
  - ``floor-asyncio``: the same, then ``loop.create_task(coroutine)``;
  - ``floor-none``: the same ``UPDATE`` marking the row pending (and, on
    PostgreSQL, ``pg_notify`` in the same statement), handing nothing over.

- ``relay SIDE POLL``: a relay process. ``lib``: ``AsyncOutboxRelay`` with an
  ``AsyncioDispatcher`` (woken by ``wait_for_work`` on PostgreSQL, polling
  every POLL seconds on SQLite). ``floor``: psycopg ``LISTEN`` + a
  ``FOR UPDATE SKIP LOCKED`` claim of one row (PostgreSQL), or a bare poll
  loop claiming one row every POLL seconds (SQLite); the floor's executor is
  a plain call right after the claim (its ``dispatch`` mark is the claim's end).

STORE is ``sqlite:PATH`` or ``pg:SCHEMA``. Every process writes its marks to
the named pipe FIFO, one line each (``KIND TASK MONOTONIC``, atomic below
PIPE_BUF): ``enter`` when the request reaches the storage call, ``commit``
once the retry's transaction has committed, ``dispatch`` when the work is
handed to the dispatcher / pool / loop, ``start`` as the first statement of
the executor's callable. ``time.monotonic()`` is one clock for every process
of the machine.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import os
import signal
import sqlite3
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RETRY_PATH = "/api/deep-work/projects/{project_id}/tasks/{task_id}/retry"
CHANNEL = "bench_dispatch_floor"
DSN = os.environ.get("DEEPWORK_BENCH_DSN", "postgresql://postgres@127.0.0.1:5432/test")
BODY = (
    b'{"task":{"id":"t0000000","project_id":"p","status":"assigned","retry_count":2},'
    b'"dispatch":{"status":"dispatched","attempt":3}}'
)

_fd = -1


def mark(kind: str, task: str) -> None:
    """One line to the pipe: ``kind task monotonic``."""
    os.write(_fd, f"{kind} {task} {time.monotonic():.9f}\n".encode())


def sqlite_floor_conn(path: str) -> sqlite3.Connection:
    """A connection with the library's SQLite settings: WAL, ``synchronous=FULL``."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    return conn


# -- web side --------------------------------------------------------------------------------
def library_app(side: str, store: str, token: str) -> tuple[Any, Any]:
    """The Starlette adapter; returns ``(app, storage)`` (the storage to open, if it must be)."""
    from deepwork_retry._async.services import AsyncRetryService
    from deepwork_retry.auth import Principal, StaticTokens
    from deepwork_retry.web.starlette import create_app

    kind, _, where = store.partition(":")
    if kind == "sqlite":
        from deepwork_retry.storage.sqlite import AsyncSQLiteStorage as Base

        base_args: tuple[Any, ...] = (where,)
        base_kwargs: dict[str, Any] = {}
    else:
        from deepwork_retry.storage.postgres import AsyncPostgresStorage as Base

        base_args = (DSN,)
        base_kwargs = {"schema": where, "migrate": False, "max_size": 4}

    class Marked(Base):  # type: ignore[misc, valid-type]
        """The storage, marking the moment its one-step retry returned (committed)."""

        async def retry_blocked(self, project_id: str, task_id: str, **kwargs: Any) -> Any:
            mark("enter", task_id)
            applied = await super().retry_blocked(project_id, task_id, **kwargs)
            mark("commit", task_id)
            return applied

    storage = Marked(*base_args, **base_kwargs)
    dispatcher: Any = None
    if side == "lib-threads":
        from deepwork_retry.dispatch.threads import ThreadPoolDispatcher

        def started(entry: Any) -> None:
            mark("start", entry.task_id)

        pool = ThreadPoolDispatcher(started, max_workers=4)

        class Port:
            """The async port: submitting to the pool does not block."""

            async def dispatch(self, entry: Any) -> None:
                mark("dispatch", entry.task_id)
                pool.dispatch(entry)

        dispatcher = Port()
    elif side == "lib-asyncio":
        from deepwork_retry.dispatch.asyncio import AsyncioDispatcher

        async def started_async(entry: Any) -> None:
            mark("start", entry.task_id)

        class MarkedAsyncio(AsyncioDispatcher):
            async def dispatch(self, entry: Any) -> None:
                mark("dispatch", entry.task_id)
                await super().dispatch(entry)

        dispatcher = MarkedAsyncio(started_async)
    tokens = StaticTokens()
    tokens.add(token, Principal(id="bench"))
    return create_app(AsyncRetryService(storage, dispatcher), tokens), storage


def floor_app(side: str, store: str, token: str) -> tuple[Any, Any]:
    """The bare endpoint: Bearer check, one durable one-row UPDATE, hand-over."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    expected = f"Bearer {token}".encode()
    kind, _, where = store.partition(":")
    pool = ThreadPoolExecutor(max_workers=4)

    def started(task: str) -> None:
        mark("start", task)

    async def started_async(task: str) -> None:
        mark("start", task)

    tasks: set[asyncio.Task[None]] = set()

    def hand_over(task: str) -> None:
        mark("dispatch", task)
        if side == "floor-threads":
            pool.submit(started, task)
        elif side == "floor-asyncio":
            t = asyncio.get_running_loop().create_task(started_async(task))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

    state = "pending" if side == "floor-none" else "ready"
    opened: Any = None
    if kind == "sqlite":
        conn = sqlite_floor_conn(where)
        writer = ThreadPoolExecutor(max_workers=1)  # sqlite3 blocks: one writer thread
        sql = f"UPDATE jobs SET state = '{state}', n = n + 1, seq = ? WHERE id = ?"

        def write(task: str) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(sql, (time.monotonic_ns(), task))
            conn.execute("COMMIT")

        async def commit(task: str) -> None:
            await asyncio.get_running_loop().run_in_executor(writer, write, task)

    else:
        import psycopg

        holder: dict[str, Any] = {}
        s = f'"{where}"'
        notify = f", pg_notify('{CHANNEL}', '') IS NULL" if side == "floor-none" else ""
        pg_sql = (
            f"UPDATE {s}.jobs SET state = '{state}', n = n + 1, seq = nextval('{s}.seq')"
            f" WHERE id = %s RETURNING id{notify}"
        )

        class Opener:
            async def open(self) -> None:
                holder["conn"] = await psycopg.AsyncConnection.connect(DSN, autocommit=True)

        opened = Opener()

        async def commit(task: str) -> None:
            await holder["conn"].execute(pg_sql, (task,), prepare=True)

    async def retry(request: Request) -> Response:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return Response(b'{"detail":"Not authenticated"}', 401, media_type="application/json")
        task = request.path_params["task_id"]
        mark("enter", task)
        await commit(task)
        mark("commit", task)
        hand_over(task)
        return Response(BODY, media_type="application/json")

    return Starlette(routes=[Route(RETRY_PATH, retry, methods=["POST"])]), opened


async def web(side: str, store: str, port: int, token: str) -> None:
    import uvicorn

    if side.startswith("lib"):
        app, storage = library_app(side, store, token)
    else:
        app, storage = floor_app(side, store, token)
    if storage is not None and hasattr(storage, "open"):
        await storage.open()
    gc.collect()
    gc.freeze()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_keep_alive=600,  # the client's connection idles while the other side runs
    )
    await uvicorn.Server(config).serve()


# -- relay side ------------------------------------------------------------------------------
async def relay_lib(store: str, poll: float) -> None:
    from deepwork_retry._async.services import AsyncOutboxRelay
    from deepwork_retry.dispatch.asyncio import AsyncioDispatcher

    kind, _, where = store.partition(":")
    storage: Any
    if kind == "sqlite":
        from deepwork_retry.storage.sqlite import AsyncSQLiteStorage

        storage = AsyncSQLiteStorage(where)
    else:
        from deepwork_retry.storage.postgres import AsyncPostgresStorage

        storage = AsyncPostgresStorage(DSN, schema=where, migrate=False, max_size=2)
        await storage.open()
        await storage.wait_for_work(0)  # LISTEN before the first request

    async def started(entry: Any) -> None:
        mark("start", entry.task_id)

    class MarkedAsyncio(AsyncioDispatcher):
        async def dispatch(self, entry: Any) -> None:
            mark("dispatch", entry.task_id)
            await super().dispatch(entry)

    relay = AsyncOutboxRelay(storage, MarkedAsyncio(started), poll_interval=poll)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    gc.collect()
    gc.freeze()
    mark("ready", "relay-lib")
    await relay.run(stop)


def relay_floor(store: str, poll: float) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    kind, _, where = store.partition(":")
    if kind == "sqlite":
        conn = sqlite_floor_conn(where)
        claim = (
            "UPDATE jobs SET state = 'claimed' WHERE id = (SELECT id FROM jobs"
            " WHERE state = 'pending' ORDER BY seq LIMIT 1) RETURNING id"
        )
        mark("ready", "relay-floor")
        while not stop.is_set():
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(claim).fetchone()
            conn.execute("COMMIT")
            if row is None:
                stop.wait(poll)
                continue
            mark("dispatch", row[0])
            mark("start", row[0])
        return
    import psycopg

    s = f'"{where}"'
    pg_claim = (
        f"UPDATE {s}.jobs SET state = 'claimed' WHERE id = (SELECT id FROM {s}.jobs"
        " WHERE state = 'pending' ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id"
    )
    listener = psycopg.connect(DSN, autocommit=True)
    worker = psycopg.connect(DSN, autocommit=True)
    listener.execute(f"LISTEN {CHANNEL}")
    mark("ready", "relay-floor")
    while not stop.is_set():
        for _ in listener.notifies(timeout=poll, stop_after=1):
            pass
        while True:  # claim until nothing is left (one wake-up may cover several rows)
            row = worker.execute(pg_claim, prepare=True).fetchone()
            if row is None:
                break
            mark("dispatch", row[0])
            mark("start", row[0])


def main() -> int:
    global _fd
    role, side, store, fifo = sys.argv[1:5]
    _fd = os.open(fifo, os.O_WRONLY)
    if role == "web":
        port, token = int(sys.argv[5]), sys.argv[6]
        asyncio.run(web(side, store, port, token))
    elif side == "lib":
        asyncio.run(relay_lib(store, float(sys.argv[5])))
    else:
        relay_floor(store, float(sys.argv[5]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
