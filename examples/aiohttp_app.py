"""The retry endpoint in an aiohttp application.

    pip install 'deepwork-retry[aiohttp]'
    python examples/aiohttp_app.py          # then paste the printed curl

Tokens come from DEEPWORK_TOKENS ("token=principal;..."); without it a random
token is made and printed. Storage is in memory, with one blocked task.
"""

from __future__ import annotations

import os
import secrets

from aiohttp import web

from deepwork_retry import AsyncRetryService, ExecutorService
from deepwork_retry.auth import StaticTokens
from deepwork_retry.storage.memory import AsyncMemoryStorage, MemoryStorage
from deepwork_retry.web.aiohttp import add_routes


class PrintDispatcher:
    """Stands in for your executor: prints each attempt handed to it."""

    async def dispatch(self, entry: object) -> None:
        print("dispatched", entry)


def blocked_demo() -> MemoryStorage:
    storage = MemoryStorage()
    executor = ExecutorService(storage)
    executor.create_project("demo")
    executor.add_task("demo", "task-3", title="Implement user authentication", max_retries=0)
    executor.assign("demo", "task-3")
    executor.start("demo", "task-3", 1)
    executor.fail("demo", "task-3", 1, RuntimeError("upstream API timed out"))
    return storage


def tokens() -> tuple[StaticTokens, str | None]:
    if os.environ.get("DEEPWORK_TOKENS"):
        return StaticTokens.from_env(), None
    token = secrets.token_urlsafe(24)
    return StaticTokens({token: "example-user"}), token


table, TOKEN = tokens()
service = AsyncRetryService(AsyncMemoryStorage(blocked_demo()), PrintDispatcher())

app = web.Application()
add_routes(app, service, table)

if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8000"))
    print(
        f"curl -X POST http://127.0.0.1:{port}/api/deep-work/projects/demo/tasks/task-3/retry "
        f'-H "Authorization: Bearer {TOKEN or "<your token>"}"',
        flush=True,
    )
    web.run_app(app, host="127.0.0.1", port=port)
