"""What the distributed tests and their worker processes share.

Worker processes are configured by environment variables, set by the tests:

- ``DEEPWORK_TEST_BROKER``: the broker URL;
- ``DEEPWORK_TEST_QUEUE``: the queue name (unique per test, so tests and
  leftovers of other runs never meet on a shared broker);
- ``DEEPWORK_TEST_STORAGE``: JSON ``{"kind": "postgres", "dsn": ..., "schema": ...}``
  or ``{"kind": "sqlite", "path": ...}``;
- ``DEEPWORK_TEST_LEASE``: the policy's lease in seconds;
- ``DEEPWORK_TEST_RUNS``: a file where the host's code appends one line per run.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from deepwork_retry import ExecutorService, NoBackoff, RetryPolicy, Task
from deepwork_retry.ports import AsyncDispatcher, Dispatcher, Storage

TASK_NAME = "deepwork_test.execute"
HEARTBEAT = 0.3


def open_storage(spec: dict[str, Any]) -> Storage:
    if spec["kind"] == "postgres":
        from deepwork_retry.storage.postgres import PostgresStorage

        storage: Storage = PostgresStorage(spec["dsn"], schema=spec["schema"])
        return storage
    from deepwork_retry.storage.sqlite import SQLiteStorage

    return SQLiteStorage(spec["path"])


def storage_from_env() -> Storage:
    return open_storage(json.loads(os.environ["DEEPWORK_TEST_STORAGE"]))


def policy(lease: float | None = None) -> RetryPolicy:
    if lease is None:
        lease = float(os.environ.get("DEEPWORK_TEST_LEASE", "3"))
    return RetryPolicy(backoff=NoBackoff(), lease=lease)


def executor_from_env(dispatcher: Dispatcher) -> ExecutorService:
    return ExecutorService(storage_from_env(), dispatcher, policy=policy())


def host_work(task: Task, token: int) -> None:
    """The host's code: record the run, then sleep or fail as the task's metadata says.

    ``metadata["fail_until"]``: attempts up to this number raise.
    ``metadata["sleep_on"]``: attempts that sleep ``metadata["sleep"]`` seconds first.
    """
    line = f"{task.project_id} {task.id} {token} {os.getpid()}\n"
    # One short O_APPEND write per run: lines from several processes never interleave.
    fd = os.open(os.environ["DEEPWORK_TEST_RUNS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    meta = task.metadata
    if token in meta.get("sleep_on", ()):
        time.sleep(float(meta.get("sleep", 0)))
    if token <= int(meta.get("fail_until", 0)):
        raise RuntimeError(f"planned failure of attempt {token}")


# -- test side -------------------------------------------------------------------


def runs(path: Path) -> Counter[tuple[str, int]]:
    """How many times the host's code ran for each ``(task_id, attempt)``."""
    if not path.exists():
        return Counter()
    counts: Counter[tuple[str, int]] = Counter()
    for line in path.read_text().splitlines():
        _, task_id, attempt, _ = line.split()
        counts[(task_id, int(attempt))] += 1
    return counts


def wait_for(
    what: str, check: Callable[[], bool], *, timeout: float = 60.0, every: float = 0.1
) -> None:
    """Poll ``check`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def status_of(storage: Storage, project_id: str, task_id: str) -> str:
    _, task = storage.load(project_id, task_id)
    return task.status.value


def history(storage: Storage, project_id: str, task_id: str) -> list[tuple[int, str, str | None]]:
    """``(number, trigger, outcome)`` of each attempt, oldest first."""
    return [
        (a.number, a.trigger.value, a.outcome.value if a.outcome else None)
        for a in storage.attempts(project_id, task_id)
    ]


ManualRetry = Callable[[str, str], dict[str, Any]]
"""Retries a blocked task and returns the response body (the contract's JSON)."""


def check_retry_flow(
    storage: Storage, dispatcher: Dispatcher, runs_path: Path, retry: ManualRetry
) -> None:
    """A task that fails twice: automatic retry, block, manual retry, completion.

    Also sends one attempt's message twice and checks the host's code ran once.
    Worker processes must be consuming what ``dispatcher`` sends.
    """
    svc = ExecutorService(storage, dispatcher, policy=policy())
    svc.create_project("p")
    svc.add_task("p", "flaky", max_retries=1, metadata={"fail_until": 2})
    svc.add_task("p", "steady", max_retries=1)
    svc.add_task("p", "twice", max_retries=1)
    for task_id in ("flaky", "steady"):
        assert "dispatched" == svc.assign("p", task_id).dispatches[0].status

    wait_for("flaky to be blocked", lambda: status_of(storage, "p", "flaky") == "blocked")
    wait_for("steady to be done", lambda: status_of(storage, "p", "steady") == "done")
    expected = [(1, "initial", "failed"), (2, "auto_retry", "failed")]
    assert expected == history(storage, "p", "flaky")

    body = retry("p", "flaky")
    task = body["task"]
    assert (200, True, "assigned", 2, 1, None, "dispatched") == (
        body.get("http_status", 200), body["success"], task["status"], task["retry_count"],
        task["max_retries"], task["error_message"], body["dispatch"]["status"],
    )  # fmt: skip
    wait_for("flaky to be done", lambda: status_of(storage, "p", "flaky") == "done")
    assert (3, "manual_retry", "succeeded") == history(storage, "p", "flaky")[-1]

    # The same (task, attempt) message sent twice: the second delivery runs nothing.
    svc.assign("p", "twice")
    entry = storage.dispatches("p", "twice")[-1]
    dispatcher.dispatch(entry)
    wait_for("twice to be done", lambda: status_of(storage, "p", "twice") == "done")
    # One more task behind the duplicate on the same queue and single-slot worker:
    # once it is done, the duplicate has been consumed.
    svc.add_task("p", "marker")
    svc.assign("p", "marker")
    wait_for("marker to be done", lambda: status_of(storage, "p", "marker") == "done")

    assert 100 == storage.progress("p").percent
    expected_runs = {("flaky", 1): 1, ("flaky", 2): 1, ("flaky", 3): 1, ("steady", 1): 1,
                     ("twice", 1): 1, ("marker", 1): 1}  # fmt: skip
    assert expected_runs == dict(runs(runs_path))


TOKEN = "distributed-test-token"


@contextlib.contextmanager
def serve_api(storage: Storage, dispatcher: AsyncDispatcher) -> Iterator[ManualRetry]:
    """The Starlette API over ``storage`` in a uvicorn thread; yields an HTTP manual retry."""
    import httpx
    import uvicorn

    from deepwork_retry import AsyncRetryService
    from deepwork_retry.auth import StaticTokens
    from deepwork_retry.storage._to_async import AsyncFromSync
    from deepwork_retry.web.starlette import create_app

    service = AsyncRetryService(AsyncFromSync(storage, offload=True), dispatcher)
    app = create_app(service, StaticTokens({TOKEN: "alice"}))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for("the API server to start", lambda: server.started, timeout=30)
        base = f"http://127.0.0.1:{port}/api/deep-work"
        with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as client:

            def retry(
                project_id: str, task_id: str, headers: dict[str, str] | None = None
            ) -> dict[str, Any]:
                response = client.post(
                    f"{base}/projects/{project_id}/tasks/{task_id}/retry", headers=headers
                )
                body: dict[str, Any] = response.json()
                body["http_status"] = response.status_code
                body["http_retry_after"] = response.headers.get("retry-after")
                return body

            yield retry
    finally:
        server.should_exit = True
        thread.join(timeout=30)
