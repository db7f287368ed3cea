"""The demo projects behind ``deepwork-retry serve``, and their in-process executor.

The first project mirrors the seed's example: eight tasks, four done, one
running, two blocked (one after exhausting its automatic retry, one on a
non-retryable error) and one waiting for both. Retrying ``task-3`` returns
``retry_count: 2, max_retries: 1`` and progress ``8 / 4 / 1 / 50``.

The second (:func:`create_nightly_project`) gives the dashboard a task blocked
in each other way: its automatic retries exhausted on a timeout, its executor
lost (the attempt's lease expired), and a non-retryable error whose message is
a traceback; one more task waits for the last.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import attrs

from deepwork_retry._core.model import DispatchEntry
from deepwork_retry._core.policy import NoBackoff, RetryPolicy, TaskError
from deepwork_retry._log import emit
from deepwork_retry._sync.services import ExecutorService
from deepwork_retry.exceptions import DeepworkError
from deepwork_retry.ports import Storage

log = logging.getLogger("deepwork_retry.demo")

DEMO_POLICY = RetryPolicy(
    backoff=NoBackoff(), lease=3600.0, non_retryable=["PermissionError", "SchemaError"]
)


@attrs.frozen(kw_only=True)
class DemoTask:
    id: str
    title: str
    max_retries: int = 1
    blocked_by: tuple[str, ...] = ()
    failures: int = 0
    """The first ``failures`` attempts fail."""
    error: str = "RuntimeError"
    message: str = ""
    """The failing attempts' error message (else one for ``error``)."""
    runs_forever: bool = False
    lost: int = 0
    """The first ``lost`` attempts start and are never heard of again (a lost executor)."""


DEMO_TASKS = (
    DemoTask(id="task-1", title="Design the database schema"),
    DemoTask(id="task-2", title="Set up the CI pipeline"),
    DemoTask(id="task-3", title="Implement user authentication", failures=2),
    DemoTask(id="task-4", title="Write the API reference"),
    DemoTask(id="task-5", title="Add rate limiting"),
    DemoTask(id="task-6", title="Integrate the payment provider", runs_forever=True),
    DemoTask(
        id="task-7",
        title="Migrate legacy customer data",
        max_retries=2,
        failures=1,
        error="PermissionError",
    ),
    DemoTask(id="task-8", title="Run the launch checklist", blocked_by=("task-3", "task-7")),
)

NIGHTLY_TRACEBACK = """Traceback (most recent call last):
  File "pipeline/report.py", line 88, in render
    rows = schema.validate(batch)
  File "pipeline/schema.py", line 41, in validate
    raise SchemaError(f"column {name!r} is missing")
SchemaError: column 'region' is missing"""

NIGHTLY_TASKS = (
    DemoTask(id="extract-orders", title="Extract yesterday's orders"),
    DemoTask(
        id="transform-orders",
        title="Transform orders into the warehouse model",
        max_retries=2,
        failures=3,
        error="TimeoutError",
        message="the warehouse query ran longer than 30 s",
    ),
    DemoTask(id="load-warehouse", title="Load the warehouse", max_retries=0, lost=1),
    DemoTask(
        id="send-report",
        title="Send the nightly report",
        failures=1,
        error="SchemaError",
        message=NIGHTLY_TRACEBACK,
    ),
    DemoTask(
        id="publish-dashboard", title="Publish the sales dashboard", blocked_by=("send-report",)
    ),
)

_BY_ID = {t.id: t for t in (*DEMO_TASKS, *NIGHTLY_TASKS)}


def run_attempt(executor: ExecutorService, entry: DispatchEntry, *, pause: float = 0.0) -> None:
    """Execute one delivered attempt of a demo task, reporting through ``executor``."""
    spec = _BY_ID.get(entry.task_id)
    if spec is None:
        return
    try:
        executor.start(entry.project_id, entry.task_id, entry.attempt)
    except DeepworkError:
        return  # a stale or duplicate delivery: this attempt is not ours to run
    if spec.runs_forever or entry.attempt <= spec.lost:
        return  # stays in progress until its lease runs out
    if pause:
        time.sleep(pause)
    if entry.attempt <= spec.failures:
        messages = {
            "RuntimeError": "OAuth provider returned 502 Bad Gateway",
            "PermissionError": "read access to the legacy database was revoked",
        }
        message = spec.message or messages.get(spec.error, "failed")
        error = TaskError(type=spec.error, message=message)
        executor.fail(entry.project_id, entry.task_id, entry.attempt, error)
    else:
        executor.succeed(entry.project_id, entry.task_id, entry.attempt)


class DemoDispatcher:
    """Runs demo attempts on a small thread pool (an in-process executor)."""

    def __init__(self, executor_factory: Callable[[], ExecutorService], *, pause: float) -> None:
        self._local = threading.local()
        self._factory = executor_factory
        self._pause = pause
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="demo-executor")

    def _executor(self) -> ExecutorService:
        executor: ExecutorService | None = getattr(self._local, "executor", None)
        if executor is None:
            executor = self._factory()
            self._local.executor = executor
        return executor

    def _run(self, entry: DispatchEntry) -> None:
        try:
            run_attempt(self._executor(), entry, pause=self._pause)
        except Exception:  # noqa: BLE001 - logged with its traceback
            emit(
                log, logging.ERROR, "deepwork.dispatched_work_raised",
                "demo attempt %s failed unexpectedly", entry.key, about=entry, exc_info=True,
            )  # fmt: skip

    def dispatch(self, entry: DispatchEntry) -> None:
        self._pool.submit(self._run, entry)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class AsyncDemoDispatcher:
    """The async port over :class:`DemoDispatcher` (submitting to a pool never blocks)."""

    def __init__(self, demo: DemoDispatcher) -> None:
        self.demo = demo

    async def dispatch(self, entry: DispatchEntry) -> None:
        self.demo.dispatch(entry)


class _Inline:
    def __init__(self, executor: ExecutorService) -> None:
        self.executor = executor
        self.queue: list[DispatchEntry] = []

    def dispatch(self, entry: DispatchEntry) -> None:
        self.queue.append(entry)


def create_demo_project(storage: Storage, project_id: str) -> None:
    """Create the demo project and run its tasks until the picture above is reached."""
    _create(storage, project_id, "Deep Work demo", DEMO_TASKS, DEMO_POLICY)


def create_nightly_project(storage: Storage, project_id: str) -> None:
    """Create the second demo project, with a task blocked in each other way.

    Its set-up runs with no lease, so that the lost attempt's lease has
    expired when the executor is found lost; later attempts (a retry from
    the dashboard) get the demo's usual hour.
    """
    _create(
        storage,
        project_id,
        "Nightly data pipeline",
        NIGHTLY_TASKS,
        attrs.evolve(DEMO_POLICY, lease=0.0),
    )
    executor = ExecutorService(storage, policy=DEMO_POLICY)
    for spec in NIGHTLY_TASKS:
        if spec.lost:
            executor.lose(project_id, spec.id)


def _create(
    storage: Storage,
    project_id: str,
    name: str,
    specs: tuple[DemoTask, ...],
    policy: RetryPolicy,
) -> None:
    inline = _Inline(ExecutorService(storage))
    executor = ExecutorService(storage, inline, policy=policy)
    inline.executor = executor
    executor.create_project(project_id, name=name)
    for spec in specs:
        executor.add_task(
            project_id,
            spec.id,
            title=spec.title,
            max_retries=spec.max_retries,
            blocked_by=spec.blocked_by,
        )
    for spec in specs:
        executor.assign(project_id, spec.id)
    while inline.queue:
        run_attempt(executor, inline.queue.pop(0))
