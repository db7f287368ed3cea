"""The HTTP side of the ``queues`` group: ``python _queues_server.py PORT TOKEN``.

One uvicorn process serves two routes (the queue comes from the environment
read by ``_queues_app.py``):

- ``POST /api/deep-work/projects/p/tasks/ID/retry``: the Starlette adapter over
  ``AsyncSQLiteStorage`` (``synchronous=FULL``, the default) on the shared file
  (or ``AsyncPostgresStorage`` on the shared schema),
  its dispatcher the library's ``AsyncCeleryDispatcher`` or
  ``AsyncDramatiqDispatcher``;
- ``POST /floor/projects/p/tasks/ID/retry``: a bare Starlette endpoint that
  checks the Bearer header, commits one one-row ``UPDATE`` on the same SQLite
  file (``synchronous=FULL``, WAL) or PostgreSQL schema, publishes the floor task with the queue's
  own client (``app.send_task`` / ``broker.enqueue``) and returns a fixed body;
- ``POST /floor2/projects/p/tasks/ID/retry``: the same, publishing the task whose
  body also commits one one-row ``UPDATE`` (the floor with the worker's commit).

Both note when the publish starts and ends (``time.monotonic()``);
``GET /bench/times`` returns those notes after the timed requests.
The server prints ``ready`` once set up.
"""

from __future__ import annotations

import contextlib
import gc
import hmac
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _queues_app as q
import uvicorn
from http_server import FIXED, PREFIX
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from deepwork_retry._async.services import AsyncRetryService
from deepwork_retry._core.model import DispatchEntry
from deepwork_retry.auth import Principal, StaticTokens
from deepwork_retry.storage.sqlite import AsyncSQLiteStorage
from deepwork_retry.web.starlette import routes

NOTES: dict[str, dict[str, float]] = {}


def note(ident: str, **times: float) -> None:
    NOTES.setdefault(ident, {}).update(times)


def library_dispatcher() -> Any:
    """The library's async dispatcher for the queue, with the publish timed."""
    if q.KIND.startswith("celery"):
        from deepwork_retry.dispatch.celery import AsyncCeleryDispatcher, CeleryDispatcher

        sync_base: Any = CeleryDispatcher
        async_base: Any = AsyncCeleryDispatcher
        sync_args: tuple[Any, ...] = (q.app,)
        sync_kwargs: dict[str, Any] = {"task_name": q.LIB_TASK, "queue": q.QUEUE}
    else:
        from deepwork_retry.dispatch.dramatiq import AsyncDramatiqDispatcher, DramatiqDispatcher

        sync_base = DramatiqDispatcher
        async_base = AsyncDramatiqDispatcher
        sync_args = (q.broker,)
        sync_kwargs = {"actor_name": q.LIB_TASK, "queue_name": q.QUEUE}

    class TimedSync(sync_base):  # type: ignore[misc, valid-type]
        def dispatch(self, entry: DispatchEntry) -> None:
            t_pub0 = time.monotonic()
            super().dispatch(entry)
            note(entry.task_id, t_pub0=t_pub0, t_pub1=time.monotonic())

    class TimedAsync(async_base):  # type: ignore[misc, valid-type]
        async def dispatch(self, entry: DispatchEntry) -> None:
            note(entry.task_id, t_hand=time.monotonic())
            await super().dispatch(entry)

    return TimedAsync(TimedSync(*sync_args, **sync_kwargs))


def library_storage() -> tuple[Any, Any]:
    """The library's async storage, its delivery mark timed, and the lifespan that opens it."""
    if q.STORE == "postgres":
        from deepwork_retry.storage.postgres import AsyncPostgresStorage

        pg = AsyncPostgresStorage(q.DSN, schema=q.SCHEMA, max_size=4, migrate=False)
        mark_async = pg.mark_delivered

        async def timed_mark_async(entries: Any, *, now: Any) -> None:
            t_mark0 = time.monotonic()
            await mark_async(entries, now=now)
            t_mark1 = time.monotonic()
            for entry in entries:
                note(entry.task_id, t_mark0=t_mark0, t_mark1=t_mark1)

        pg.mark_delivered = timed_mark_async  # type: ignore[method-assign]

        @contextlib.asynccontextmanager
        async def lifespan(_: object) -> AsyncIterator[None]:
            # The pool belongs to the event loop that opens it.
            await pg.open()
            yield
            await pg.close()

        return pg, lifespan

    storage = AsyncSQLiteStorage(q.DB)
    sync = storage.sync
    mark = sync.mark_delivered
    if os.environ.get("BENCH_QUEUES_MARK") == "durable":
        # For comparison only: the delivery mark committed with a wait for the
        # disk, as the library did before it stopped waiting for it.
        from deepwork_retry.storage import sqlite as lib_sqlite

        def mark(entries: Any, *, now: Any) -> None:
            with sync._tx(write=True) as c:
                lib_sqlite._ENGINE.mark_delivered(c, entries, now=now)

    def timed_mark(entries: Any, *, now: Any) -> None:
        # After the publish: the delivery mark's commit, which on SQLite takes
        # the one write lock the worker's start commit needs too.
        t_mark0 = time.monotonic()
        mark(entries, now=now)
        t_mark1 = time.monotonic()
        for entry in entries:
            note(entry.task_id, t_mark0=t_mark0, t_mark1=t_mark1)

    sync.mark_delivered = timed_mark  # type: ignore[method-assign]
    return storage, None


def floor_publish() -> Any:
    """The queue's own bare publish of the floor task."""
    if q.KIND.startswith("celery"):
        app = q.app

        def publish(task: str, ident: str) -> None:
            app.send_task(task, args=[ident], queue=q.QUEUE, ignore_result=True)

        return publish
    import dramatiq

    broker = q.broker

    def enqueue(task: str, ident: str) -> None:
        broker.enqueue(
            dramatiq.Message(
                queue_name=q.QUEUE, actor_name=task, args=(ident,), kwargs={}, options={}
            )
        )

    return enqueue


def build(token: str) -> Starlette:
    tokens = StaticTokens()
    tokens.add(token, Principal(id="bench"))
    storage, lifespan = library_storage()
    service = AsyncRetryService(storage, library_dispatcher())
    commit = q.floor_commit()
    publish = floor_publish()
    body = json.dumps(FIXED, separators=(",", ":")).encode()
    expected = f"Bearer {token}".encode()

    async def floor(request: Request) -> Response:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return Response(b'{"detail":"Not authenticated"}', 401, media_type="application/json")
        ident = request.path_params["task_id"]
        task = q.FLOOR2_TASK if request.path_params["floor"] == "floor2" else q.FLOOR_TASK
        t_c0 = time.monotonic()
        commit(ident)
        t_c1 = t_pub0 = time.monotonic()
        publish(task, ident)
        note(ident, t_c0=t_c0, t_c1=t_c1, t_pub0=t_pub0, t_pub1=time.monotonic())
        return Response(body, media_type="application/json")

    async def times(request: Request) -> Response:
        return JSONResponse(NOTES)

    return Starlette(
        routes=[
            Route("/{floor}/projects/{project_id}/tasks/{task_id}/retry", floor, methods=["POST"]),
            Route("/bench/times", times, methods=["GET"]),
            *routes(service, tokens, prefix=PREFIX),
        ],
        lifespan=lifespan,
    )


def main() -> int:
    port, token = int(sys.argv[1]), sys.argv[2]
    app = build(token)
    gc.collect()
    gc.freeze()
    print("ready", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
