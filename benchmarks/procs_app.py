"""The applications of the ``processes`` group, as factories for uvicorn's ``--factory``.

uvicorn with ``--workers N`` imports this module in each worker process and
calls the factory there, so every process builds its own application, its own
pool and its own event loop. The settings come from the environment:
``BENCH_PROCS_TOKEN``, ``BENCH_PROCS_DSN`` (with an ``application_name`` that
names the server, so the benchmark finds its PostgreSQL backends) and
``BENCH_PROCS_SCHEMA``.

- ``procs_app:library``: the demo server's application (``deepwork_retry.server``:
  the OpenAPI document, the Starlette adapter's routes, the dashboard's routes)
  with its storage on PostgreSQL (``AsyncPostgresStorage``, the schema migrated
  beforehand) instead of SQLite, and no in-process executor or relay: a retried
  attempt waits in the outbox for a relay running elsewhere;
- ``procs_app:bare``: the bare Starlette endpoint of ``http_server.py
  starlette-bare`` (Bearer check, fixed body of about 300 bytes);
- ``procs_app:bare_commit``: the same endpoint doing one durable commit per
  request on PostgreSQL first (one ``INSERT`` of the path's ids on an
  autocommit connection from a pool of the library's default size).
"""

from __future__ import annotations

import contextlib
import gc
import hmac
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from http_server import FIXED, RETRY_PATH, starlette_bare

POOL_SIZE = 10  # AsyncPostgresStorage's default max_size


def _settings() -> tuple[str, str, str]:
    env = os.environ
    return (
        env["BENCH_PROCS_TOKEN"],
        env.get("BENCH_PROCS_DSN", ""),
        env.get("BENCH_PROCS_SCHEMA", ""),
    )


def _frozen(app: Any) -> Any:
    # As http_server.py: what the process holds once set up stays out of the
    # collector's passes; the same call on every side.
    gc.collect()
    gc.freeze()
    return app


def library() -> Any:
    import secrets

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from deepwork_retry._async.services import AsyncRetryService
    from deepwork_retry.auth import Principal, StaticTokens
    from deepwork_retry.server import DASHBOARD_PATH, OPENAPI_PATH
    from deepwork_retry.storage.postgres import AsyncPostgresStorage
    from deepwork_retry.web._async_api import AsyncRetryAPI
    from deepwork_retry.web._http import DEFAULT_PREFIX, JSON, json_bytes
    from deepwork_retry.web.openapi import openapi_document
    from deepwork_retry.web.starlette import dashboard_routes, routes

    token, dsn, schema = _settings()
    tokens = StaticTokens()
    tokens.add(token, Principal(id="demo-user"))
    storage = AsyncPostgresStorage(dsn, schema=schema, migrate=False)
    service = AsyncRetryService(storage)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        await storage.open()
        try:
            yield
        finally:
            await storage.close()

    document = json_bytes(openapi_document(DEFAULT_PREFIX))

    async def openapi(request: Request) -> Response:
        return Response(document, media_type=JSON)

    api = AsyncRetryAPI(service, tokens)
    pages = dashboard_routes(api, secret=secrets.token_urlsafe(32), prefix=DASHBOARD_PATH)
    docs = Route(OPENAPI_PATH, openapi, methods=["GET"], name="openapi")
    app = Starlette(routes=[docs, *routes(api), *pages], lifespan=lifespan)
    app.state.retry_api = api
    return _frozen(app)


def bare() -> Any:
    token, _, _ = _settings()
    return _frozen(starlette_bare(token))


def bare_commit() -> Any:
    from psycopg_pool import AsyncConnectionPool
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    token, dsn, schema = _settings()
    body = json.dumps(FIXED, separators=(",", ":")).encode()
    expected = f"Bearer {token}".encode()
    unauthorised = b'{"detail":"Not authenticated"}'
    insert = f'INSERT INTO "{schema}".floor_commits (project_id, task_id) VALUES (%s, %s)'
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        dsn, min_size=1, max_size=POOL_SIZE, open=False, kwargs={"autocommit": True}
    )

    async def retry(request: Request) -> Response:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return Response(unauthorised, 401, media_type="application/json")
        params = request.path_params
        conn = await pool.getconn()
        try:
            await conn.execute(insert, (params["project_id"], params["task_id"]))
        finally:
            await pool.putconn(conn)
        return Response(body, media_type="application/json")

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        await pool.open()
        try:
            yield
        finally:
            await pool.close()

    return _frozen(
        Starlette(routes=[Route(RETRY_PATH, retry, methods=["POST"])], lifespan=lifespan)
    )
