"""The demo API server behind ``deepwork-retry serve``.

Starlette on uvicorn, SQLite storage in a local file, the in-process demo
executor, and an outbox relay running beside the API. It prints a token and a
ready-to-paste ``curl`` for a blocked task of a freshly created demo project.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
from collections.abc import AsyncIterator
from typing import Any

from deepwork_retry._async.services import AsyncOutboxRelay, AsyncRetryService
from deepwork_retry._sync.services import ExecutorService
from deepwork_retry.auth import Principal, StaticTokens
from deepwork_retry.demo import (
    DEMO_POLICY,
    AsyncDemoDispatcher,
    DemoDispatcher,
    create_demo_project,
)
from deepwork_retry.exceptions import missing_extra
from deepwork_retry.storage.sqlite import AsyncSQLiteStorage, SQLiteStorage
from deepwork_retry.web._http import DEFAULT_PREFIX

try:
    import uvicorn
    from starlette.applications import Starlette

    from deepwork_retry.web.starlette import routes
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise missing_extra("server", __name__, exc) from exc


def _tokens(token: str | None) -> tuple[StaticTokens, str]:
    """The accepted tokens: ``$DEEPWORK_TOKENS`` if set, plus one demo token."""
    env = os.environ.get("DEEPWORK_TOKENS")
    tokens = StaticTokens.from_env() if env else StaticTokens()
    token = token or os.environ.get("DEEPWORK_TOKEN") or secrets.token_urlsafe(24)
    tokens.add(token, Principal(id="demo-user"))
    return tokens, token


def build_app(db: str, tokens: StaticTokens, *, pause: float = 1.0) -> Starlette:
    """The demo application over the SQLite file ``db``."""
    demo: DemoDispatcher

    def executor_factory() -> ExecutorService:
        # Each executor thread keeps its own storage handle on the same file.
        return ExecutorService(SQLiteStorage(db), demo, policy=DEMO_POLICY)

    demo = DemoDispatcher(executor_factory, pause=pause)
    storage = AsyncSQLiteStorage(db)
    dispatcher = AsyncDemoDispatcher(demo)
    service = AsyncRetryService(storage, dispatcher, policy=DEMO_POLICY)
    relay = AsyncOutboxRelay(storage, dispatcher, poll_interval=0.5)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        stop = asyncio.Event()
        relay_task = asyncio.create_task(relay.run(stop))
        try:
            yield
        finally:
            stop.set()
            # A second Ctrl-C makes uvicorn cancel every task, the relay's too:
            # shut down quietly either way.
            with contextlib.suppress(asyncio.CancelledError):
                await relay_task
            # Waiting for the executor's threads blocks: not on the event loop.
            await asyncio.to_thread(demo.shutdown)
            await storage.close()

    return Starlette(routes=routes(service, tokens), lifespan=lifespan)


def banner(*, host: str, port: int, project_id: str | None, token: str) -> str:
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::1") else host
    base = f"http://{shown}:{port}{DEFAULT_PREFIX}"
    lines = [
        "",
        f"deepwork_retry demo API on http://{host}:{port}{DEFAULT_PREFIX}",
        f"TOKEN={token}",
    ]
    if project_id is not None:
        lines += [
            f"PROJECT_ID={project_id}",
            "TASK_ID=task-3",
            "",
            "Blocked tasks: task-3 (automatic retry exhausted), task-7 (non-retryable error).",
            "Retry one:",
            "",
            f"curl -X POST {base}/projects/{project_id}/tasks/task-3/retry \\",
            f'  -H "Authorization: Bearer {token}"',
            "",
            "See it run:",
            f'curl {base}/projects/{project_id}/progress -H "Authorization: Bearer {token}"',
        ]
    lines += ["", "Press Ctrl-C to stop.", ""]
    return "\n".join(lines)


def serve(*, host: str, port: int, db: str, token: str | None, demo: bool) -> int:
    """Run the demo server until interrupted."""
    directory = os.path.dirname(db)
    if directory:
        os.makedirs(directory, exist_ok=True)
    tokens, token = _tokens(token)
    project_id = None
    if demo:
        project_id = "proj-" + secrets.token_hex(3)
        setup = SQLiteStorage(db)
        try:
            create_demo_project(setup, project_id)
        finally:
            setup.close()
    app = build_app(db, tokens)
    print(banner(host=host, port=port, project_id=project_id, token=token), flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(serve(host="127.0.0.1", port=8000, db="deepwork-demo/demo.db", token=None, demo=True))
