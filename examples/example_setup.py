"""What the framework examples share: a blocked task, a token table, a stand-in executor.

Each example imports this module from its own folder (``python examples/X.py``
puts ``examples/`` on the import path).
"""

from __future__ import annotations

import os
import secrets

from deepwork_retry import ExecutorService
from deepwork_retry.auth import StaticTokens
from deepwork_retry.storage.memory import MemoryStorage


class PrintDispatcher:
    """Stands in for your executor: prints each attempt handed to it."""

    def dispatch(self, entry: object) -> None:
        print("dispatched", entry)


class AsyncPrintDispatcher:
    """The same, for the async services."""

    async def dispatch(self, entry: object) -> None:
        print("dispatched", entry)


def blocked_demo() -> MemoryStorage:
    """In-memory storage holding project ``demo`` with ``task-3`` blocked."""
    storage = MemoryStorage()
    executor = ExecutorService(storage)
    executor.create_project("demo")
    executor.add_task("demo", "task-3", title="Implement user authentication", max_retries=0)
    executor.assign("demo", "task-3")
    executor.start("demo", "task-3", 1)
    executor.fail("demo", "task-3", 1, RuntimeError("upstream API timed out"))
    return storage


def tokens() -> tuple[StaticTokens, str | None]:
    """``$DEEPWORK_TOKENS`` if set, else one random token (returned so it can be printed)."""
    if os.environ.get("DEEPWORK_TOKENS"):
        return StaticTokens.from_env(), None
    token = secrets.token_urlsafe(24)
    return StaticTokens({token: "example-user"}), token


def port() -> int:
    return int(os.environ.get("PORT", "8000"))


def print_curl(token: str | None) -> None:
    print(
        f"curl -X POST http://127.0.0.1:{port()}/api/deep-work/projects/demo/tasks/task-3/retry "
        f'-H "Authorization: Bearer {token or "<your token>"}"',
        flush=True,
    )
