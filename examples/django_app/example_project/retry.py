"""The retry API that ``settings.DEEPWORK_RETRY["API"]`` names, built at startup.

Tokens come from DEEPWORK_TOKENS ("token=principal;..."); without it a random
token is made and printed. Storage is in memory, with one blocked task.
"""

from __future__ import annotations

import os
import secrets

from deepwork_retry import ExecutorService, RetryService
from deepwork_retry.auth import StaticTokens
from deepwork_retry.storage.memory import MemoryStorage
from deepwork_retry.web import RetryAPI


class PrintDispatcher:
    """Stands in for your executor: prints each attempt handed to it."""

    def dispatch(self, entry: object) -> None:
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


def build_api() -> RetryAPI:
    if os.environ.get("DEEPWORK_TOKENS"):
        table = StaticTokens.from_env()
    else:
        token = secrets.token_urlsafe(24)
        table = StaticTokens({token: "example-user"})
        port = os.environ.get("PORT", "8000")
        print(
            f"curl -X POST http://127.0.0.1:{port}/api/deep-work/projects/demo/tasks/task-3/retry "
            f'-H "Authorization: Bearer {token}"',
            flush=True,
        )
    return RetryAPI(RetryService(blocked_demo(), PrintDispatcher()), table)


api = build_api()
