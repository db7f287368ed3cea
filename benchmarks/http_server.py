"""One HTTP server under test, on uvicorn: ``python http_server.py KIND PORT TASKS TOKEN [DB]``.

KIND is one of:

- ``starlette-bare``: a Starlette route that checks the Bearer header and returns
  a fixed JSON body of about 300 bytes (the HTTP floor for the Starlette adapter);
- ``starlette-lib``: the Starlette adapter over the in-memory storage;
- ``fastapi-bare``: a FastAPI route with an ``HTTPBearer`` dependency returning a
  dict of about 300 bytes (the floor for the FastAPI adapter);
- ``fastapi-lib``: the FastAPI adapter over the in-memory storage;
- ``demo-sqlite``: the Starlette adapter over SQLite (``synchronous=FULL``, the
  default) at ``DB``, the demo server's stack, access log on as the demo has it.

The library servers hold project ``p`` with TASKS blocked tasks ``t0000000`` ..;
the path is the same for every kind: ``/api/deep-work/projects/p/tasks/ID/retry``.
The server prints ``ready`` on stdout once the tasks are in place.
"""

from __future__ import annotations

import gc
import hmac
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvicorn
from _fixtures import add_blocked

PREFIX = "/api/deep-work"
RETRY_PATH = PREFIX + "/projects/{project_id}/tasks/{task_id}/retry"
FIXED: dict[str, Any] = {
    "task": {
        "id": "t0000000",
        "project_id": "p",
        "status": "assigned",
        "retry_count": 2,
        "max_retries": 2,
        "error_message": None,
        "updated_at": "2026-01-01T00:00:00+00:00",
    },
    "progress": {"total": 100, "done": 40, "blocked": 3, "in_progress": 7, "percent": 40.0},
    "dispatch": {"status": "dispatched", "attempt": 3},
}


def starlette_bare(token: str) -> Any:
    import json

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    body = json.dumps(FIXED, separators=(",", ":")).encode()
    expected = f"Bearer {token}".encode()
    unauthorised = b'{"detail":"Not authenticated"}'

    async def retry(request: Request) -> Response:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return Response(unauthorised, 401, media_type="application/json")
        return Response(body, media_type="application/json")

    return Starlette(routes=[Route(RETRY_PATH, retry, methods=["POST"])])


def fastapi_bare(token: str) -> Any:
    from fastapi import Depends, FastAPI, HTTPException
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

    app = FastAPI()
    bearer = Depends(HTTPBearer())

    def principal(credentials: HTTPAuthorizationCredentials = bearer) -> str:
        if not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(status_code=401, detail="Invalid token")
        return "bench"

    authenticated = Depends(principal)

    @app.post(RETRY_PATH)
    async def retry(project_id: str, task_id: str, who: str = authenticated) -> Any:
        return FIXED

    return app


def library(kind: str, tasks: int, token: str, db: str | None) -> Any:
    from deepwork_retry._async.services import AsyncRetryService
    from deepwork_retry.auth import Principal, StaticTokens

    tokens = StaticTokens()
    tokens.add(token, Principal(id="bench"))
    if kind == "demo-sqlite":
        from deepwork_retry.storage.sqlite import AsyncSQLiteStorage, SQLiteStorage

        assert db is not None
        setup = SQLiteStorage(db)
        add_blocked(setup, "p", tasks)
        setup.close()
        service = AsyncRetryService(AsyncSQLiteStorage(db))
    else:
        from deepwork_retry.storage.memory import AsyncMemoryStorage, MemoryStorage

        sync = MemoryStorage()
        add_blocked(sync, "p", tasks)
        service = AsyncRetryService(AsyncMemoryStorage(sync))
    if kind == "fastapi-lib":
        from deepwork_retry.web.fastapi import create_app as fastapi_app

        return fastapi_app(service, tokens)
    from deepwork_retry.web.starlette import create_app

    return create_app(service, tokens)


def main() -> int:
    kind, port, tasks, token = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    db = sys.argv[5] if len(sys.argv) > 5 else None
    if kind == "starlette-bare":
        app = starlette_bare(token)
    elif kind == "fastapi-bare":
        app = fastapi_bare(token)
    else:
        app = library(kind, tasks, token, db)
    # What the server holds once set up (the prepared tasks, the imported
    # modules) stays out of the collector's passes, as in a server that calls
    # gc.freeze() after start-up; the same call on every side.
    gc.collect()
    gc.freeze()
    print("ready", flush=True)
    demo = kind == "demo-sqlite"
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="info" if demo else "warning",
        access_log=demo,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
