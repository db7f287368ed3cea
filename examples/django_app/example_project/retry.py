"""The retry API that ``settings.DEEPWORK_RETRY["API"]`` names, built at startup.

Tasks live in the project's own database (``DjangoStorage``, after
``python manage.py migrate``), with one blocked demo task. Tokens come from
DEEPWORK_TOKENS ("token=principal;..."); without it a random token is made and
printed.
"""

from __future__ import annotations

import os
import secrets

from django.db import connections

from deepwork_retry import ExecutorService, RetryService
from deepwork_retry.auth import StaticTokens
from deepwork_retry.exceptions import ProjectNotFound
from deepwork_retry.web import RetryAPI
from deepwork_retry.web.django.storage import DjangoStorage


class PrintDispatcher:
    """Stands in for your executor: prints each attempt handed to it."""

    def dispatch(self, entry: object) -> None:
        print("dispatched", entry, flush=True)


def blocked_demo(storage: DjangoStorage) -> None:
    """Project ``demo`` with a blocked task, made once (when the tables exist: run
    ``python manage.py migrate`` first)."""
    if "deepwork_retry_project" not in connections[storage.using].introspection.table_names():
        print("run: python manage.py migrate", flush=True)
        return
    try:
        storage.get_project("demo")
        return
    except ProjectNotFound:
        pass
    executor = ExecutorService(storage)
    executor.create_project("demo")
    executor.add_task("demo", "task-3", title="Implement user authentication", max_retries=0)
    executor.assign("demo", "task-3")
    executor.start("demo", "task-3", 1)
    executor.fail("demo", "task-3", 1, RuntimeError("upstream API timed out"))


def build_api() -> RetryAPI:
    storage = DjangoStorage(using="default")
    blocked_demo(storage)
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
    return RetryAPI(RetryService(storage, PrintDispatcher()), table)


api = build_api()
