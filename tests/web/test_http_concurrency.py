"""Concurrent retries over real HTTP: uvicorn serving the Starlette adapter on 127.0.0.1.

Many clients race to retry the same blocked task; exactly one wins and its
dispatch is handed over exactly once. Runs over the in-memory storage and over
SQLite (whose calls run in worker threads, so the requests truly overlap).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from web_harness import ALICE, AsyncRecorder, Recorder, auth, serve_asgi, task_url

from deepwork_retry import AsyncRetryService, ExecutorService, NoBackoff, RetryPolicy
from deepwork_retry.auth import Principal, StaticTokens
from deepwork_retry.storage.memory import AsyncMemoryStorage, MemoryStorage
from deepwork_retry.storage.sqlite import AsyncSQLiteStorage, SQLiteStorage
from deepwork_retry.web.starlette import create_app

pytestmark = pytest.mark.slow

CONNECTIONS = 50
"""At most this many requests in flight at once."""


class Setup:
    def __init__(self, executor: ExecutorService, recorder: Recorder, url: str) -> None:
        self.executor = executor
        self.recorder = recorder
        self.url = url

    def blocked(self, project_id: str, task_id: str) -> None:
        ex = self.executor
        ex.add_task(project_id, task_id, max_retries=0)
        ex.assign(project_id, task_id)
        ex.start(project_id, task_id, 1)
        ex.fail(project_id, task_id, 1, RuntimeError("boom"))


@pytest.fixture(params=["memory", "sqlite"])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Setup]:
    sync: Any
    storage: Any
    if request.param == "memory":
        sync = MemoryStorage()
        storage = AsyncMemoryStorage(sync)
    else:
        path = tmp_path / "retry.db"
        sync = SQLiteStorage(path, synchronous="NORMAL")
        storage = AsyncSQLiteStorage(path, synchronous="NORMAL", timeout=30)
    recorder = Recorder()
    service = AsyncRetryService(storage, AsyncRecorder(recorder))
    tokens = StaticTokens({ALICE: Principal(id="alice")})
    url, stop = serve_asgi(create_app(service, tokens))
    try:
        yield Setup(ExecutorService(sync, policy=RetryPolicy(backoff=NoBackoff())), recorder, url)
    finally:
        stop()
        sync.close()


def post_all(base_url: str, paths: list[str]) -> list[httpx.Response]:
    """POST every path, ``CONNECTIONS`` at a time, from as many client threads."""
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
    with (
        httpx.Client(base_url=base_url, limits=limits, timeout=60) as client,
        ThreadPoolExecutor(CONNECTIONS) as pool,
    ):
        return list(pool.map(lambda path: client.post(path, headers=auth()), paths))


def test_200_concurrent_retries_of_one_task(setup: Setup) -> None:
    """200 concurrent retries of one blocked task: one 200, 199 400s, one dispatch."""
    setup.executor.create_project("p")
    setup.blocked("p", "t")
    responses = post_all(setup.url, [task_url("p", "t", "/retry")] * 200)
    assert {200: 1, 400: 199} == dict(Counter(r.status_code for r in responses))
    refusals = {r.json()["detail"] for r in responses if r.status_code == 400}
    assert {"Can only retry tasks with status 'blocked', got 'assigned'"} == refusals
    assert [("p", "t", 2)] == setup.recorder.keys
    task = setup.executor.storage.load("p", "t")[1]
    assert ("assigned", 1) == (task.status, task.retry_count)


def test_100_tasks_with_5_concurrent_retries_each(setup: Setup) -> None:
    """100 blocked tasks x 5 concurrent retries: 100 successes and 100 dispatches."""
    setup.executor.create_project("p")
    ids = [f"t{n:03d}" for n in range(100)]
    for tid in ids:
        setup.blocked("p", tid)
    paths = [task_url("p", tid, "/retry") for tid in ids for _ in range(5)]
    responses = post_all(setup.url, paths)
    assert {200: 100, 400: 400} == dict(Counter(r.status_code for r in responses))
    winners = sorted(r.json()["task"]["id"] for r in responses if r.status_code == 200)
    assert ids == winners
    assert sorted(("p", tid, 2) for tid in ids) == sorted(setup.recorder.keys)
    progress = setup.executor.storage.progress("p")
    assert (100, 100, 0) == (progress.total, progress.assigned, progress.blocked)
