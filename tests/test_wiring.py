"""Parts put together: sync and async parts are checked where they meet, and nothing
that fails after a commit is reported as if nothing had happened."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deepwork_retry import (
    AsyncExecutorService,
    AsyncOutboxRelay,
    AsyncReaper,
    AsyncRetryService,
    DispatchEntry,
    ExecutorService,
    NoBackoff,
    OutboxRelay,
    Reaper,
    RetryPolicy,
    RetryService,
    TaskError,
    TaskStatus,
)
from deepwork_retry._sync import services as sync_services
from deepwork_retry._wiring import is_async_callable
from deepwork_retry.auth import Principal, StaticTokens
from deepwork_retry.dispatch.inline import AsyncInlineDispatcher, InlineDispatcher
from deepwork_retry.dispatch.reaper import run_reaper
from deepwork_retry.dispatch.relay import run_relay
from deepwork_retry.exceptions import (
    ConfigurationError,
    ProjectNotFound,
    StorageNotOpen,
    StorageUnavailable,
)
from deepwork_retry.storage._to_async import AsyncFromSync
from deepwork_retry.storage.memory import AsyncMemoryStorage, MemoryStorage
from deepwork_retry.storage.sqlite import AsyncSQLiteStorage, SQLiteStorage
from deepwork_retry.testing import AsyncRecordingDispatcher, FakeClock, RecordingDispatcher
from deepwork_retry.web import ApiRequest, AsyncRetryAPI, RetryAPI

TOKENS = StaticTokens({"tok-0123456789abcdef": Principal(id="alice")})


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "wiring.db"


def blocked(storage: SQLiteStorage | MemoryStorage, clock: FakeClock | None = None) -> None:
    """Project ``p`` with task ``t`` blocked after one failed attempt."""
    ex = ExecutorService(storage, clock=clock, policy=RetryPolicy(backoff=NoBackoff()))
    ex.create_project("p")
    ex.add_task("p", "t", max_retries=0)
    ex.assign("p", "t")
    ex.start("p", "t", 1)
    ex.fail("p", "t", 1, TaskError(type="E", message="boom"))


# -- the kind of each part is checked when the parts are put together ---------------------


def test_readme_mix_is_refused_before_anything_is_committed(db: Path) -> None:
    """A sync SQLiteStorage in an AsyncRetryService is refused when built, naming the class
    to use, so no request can commit a retry and then answer "try again"."""
    storage = SQLiteStorage(db)
    blocked(storage)
    with pytest.raises(ConfigurationError) as caught:
        AsyncRetryService(storage)  # type: ignore[arg-type]
    assert (
        "AsyncRetryService needs an async storage; got SQLiteStorage — "
        "use AsyncSQLiteStorage, or RetryService"
    ) == str(caught.value)
    assert isinstance(caught.value, TypeError)
    assert TaskStatus.BLOCKED == storage.load("p", "t")[1].status


def _memory() -> MemoryStorage:
    return MemoryStorage()


def _async_memory() -> AsyncMemoryStorage:
    return AsyncMemoryStorage(MemoryStorage())


MISMATCHES: list[tuple[str, Callable[[], object], str]] = [
    (
        "async storage in RetryService",
        lambda: RetryService(_async_memory()),  # type: ignore[arg-type]
        "RetryService needs a sync storage; got AsyncMemoryStorage — "
        "use MemoryStorage, or AsyncRetryService",
    ),
    (
        "sync storage in AsyncExecutorService",
        lambda: AsyncExecutorService(_memory()),  # type: ignore[arg-type]
        "AsyncExecutorService needs an async storage; got MemoryStorage — "
        "use AsyncMemoryStorage, or ExecutorService",
    ),
    (
        "async storage in ExecutorService",
        lambda: ExecutorService(_async_memory()),  # type: ignore[arg-type]
        "ExecutorService needs a sync storage; got AsyncMemoryStorage — "
        "use MemoryStorage, or AsyncExecutorService",
    ),
    (
        "sync dispatcher in AsyncRetryService",
        lambda: AsyncRetryService(_async_memory(), RecordingDispatcher()),  # type: ignore[arg-type]
        "AsyncRetryService needs an async dispatcher; got RecordingDispatcher — "
        "use AsyncRecordingDispatcher, or RetryService",
    ),
    (
        "async dispatcher in RetryService",
        lambda: RetryService(_memory(), AsyncInlineDispatcher(_noop)),  # type: ignore[arg-type]
        "RetryService needs a sync dispatcher; got AsyncInlineDispatcher — "
        "use InlineDispatcher, or AsyncRetryService",
    ),
    (
        "sync storage in AsyncOutboxRelay",
        lambda: AsyncOutboxRelay(_memory(), AsyncRecordingDispatcher()),  # type: ignore[arg-type]
        "AsyncOutboxRelay needs an async storage; got MemoryStorage — "
        "use AsyncMemoryStorage, or OutboxRelay",
    ),
    (
        "async dispatcher in OutboxRelay",
        lambda: OutboxRelay(_memory(), AsyncRecordingDispatcher()),  # type: ignore[arg-type]
        "OutboxRelay needs a sync dispatcher; got AsyncRecordingDispatcher — "
        "use RecordingDispatcher, or AsyncOutboxRelay",
    ),
    (
        "sync service in AsyncReaper",
        lambda: AsyncReaper(ExecutorService(_memory())),  # type: ignore[arg-type]
        "AsyncReaper needs an async service; got ExecutorService — "
        "use AsyncExecutorService, or Reaper",
    ),
    (
        "async service in Reaper",
        lambda: Reaper(AsyncExecutorService(_async_memory())),  # type: ignore[arg-type]
        "Reaper needs a sync service; got AsyncExecutorService — "
        "use ExecutorService, or AsyncReaper",
    ),
    (
        "sync service in AsyncRetryAPI",
        lambda: AsyncRetryAPI(RetryService(_memory()), TOKENS),  # type: ignore[arg-type]
        "AsyncRetryAPI needs an async service; got RetryService — "
        "use AsyncRetryService, or RetryAPI",
    ),
    (
        "async service in RetryAPI",
        lambda: RetryAPI(AsyncRetryService(_async_memory()), TOKENS),  # type: ignore[arg-type]
        "RetryAPI needs a sync service; got AsyncRetryService — use RetryService, or AsyncRetryAPI",
    ),
    (
        "async storage in run_relay",
        lambda: run_relay(_async_memory(), RecordingDispatcher(), once=True),  # type: ignore[arg-type]
        "OutboxRelay needs a sync storage; got AsyncMemoryStorage — "
        "use MemoryStorage, or AsyncOutboxRelay",
    ),
    (
        "async storage in run_reaper",
        lambda: run_reaper(_async_memory(), once=True),  # type: ignore[arg-type]
        "ExecutorService needs a sync storage; got AsyncMemoryStorage — "
        "use MemoryStorage, or AsyncExecutorService",
    ),
    (
        "a storage whose one-step retry is sync, in AsyncRetryService",
        lambda: AsyncRetryService(_HalfAsync(MemoryStorage(), offload=False)),
        "AsyncRetryService needs an async storage; got _HalfAsync — "
        "use an async storage (every method a coroutine), or RetryService",
    ),
    (
        "not a storage at all",
        lambda: RetryService(object()),  # type: ignore[arg-type]
        "RetryService needs a sync storage; got object, which has no apply()",
    ),
]


async def _noop(entry: DispatchEntry) -> None:
    return None


class _HalfAsync(AsyncFromSync[MemoryStorage]):
    """An async storage whose optional one-step retry was left sync by mistake."""

    def retry_blocked(self, project_id: str, task_id: str, **options: Any) -> None:
        return None


@pytest.mark.parametrize(
    ("build", "message"), [m[1:] for m in MISMATCHES], ids=[m[0] for m in MISMATCHES]
)
def test_a_part_of_the_other_kind_is_refused_where_it_is_put_together(
    build: Callable[[], object], message: str
) -> None:
    """Services, relays, reapers and APIs raise a ConfigurationError (a TypeError) naming
    the class to use, when they are built rather than on first use."""
    with pytest.raises(ConfigurationError) as caught:
        build()
    assert message == str(caught.value)
    assert isinstance(caught.value, TypeError)


def test_the_shipped_parts_and_wrappers_are_accepted(db: Path) -> None:
    """Every shipped storage, wrapper and test double fits the services of its kind."""
    sync_storages: list[Any] = [MemoryStorage(), SQLiteStorage(db)]
    async_storages: list[Any] = [
        AsyncMemoryStorage(MemoryStorage()),
        AsyncSQLiteStorage(db),
        AsyncFromSync(MemoryStorage(), offload=False),
        AsyncFromSync(SQLiteStorage(db), offload=True),
    ]
    for storage in sync_storages:
        for dispatcher in (None, RecordingDispatcher(), InlineDispatcher(print)):
            RetryService(storage, dispatcher)
            OutboxRelay(storage, dispatcher or RecordingDispatcher())
            Reaper(ExecutorService(storage, dispatcher))
            RetryAPI(RetryService(storage, dispatcher), TOKENS)
    for storage in async_storages:
        for adispatcher in (None, AsyncRecordingDispatcher(), AsyncInlineDispatcher(_noop)):
            AsyncRetryService(storage, adispatcher)
            AsyncOutboxRelay(storage, adispatcher or AsyncRecordingDispatcher())
            AsyncReaper(AsyncExecutorService(storage, adispatcher))
            AsyncRetryAPI(AsyncRetryService(storage, adispatcher), TOKENS)


# -- how the kind of a callable is told -------------------------------------------------------


def _sync(x: int) -> int:
    return x


async def _async(x: int) -> int:
    return x


def _decorated(fn: Callable[[int], Any]) -> Callable[[int], Any]:
    @functools.wraps(fn)
    def wrapper(x: int) -> Any:
        return fn(x)

    return wrapper


class _Callable:
    """A transparent wrapper object (it says what it wraps, as ``functools.wraps`` does)."""

    def __init__(self, fn: Callable[[int], Any]) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, x: int) -> Any:
        return self.fn(x)


class _AsyncCallable:
    def __init__(self, fn: Callable[[int], Any]) -> None:
        self.fn = fn

    async def __call__(self, x: int) -> Any:
        return await self.fn(x) if is_async_callable(self.fn) else self.fn(x)


class _Owner:
    def plain(self, x: int) -> int:
        return x

    async def coroutine(self, x: int) -> int:
        return x


WRAPPERS: list[Callable[[Callable[[int], Any]], Callable[[int], Any]]] = [
    lambda fn: functools.partial(fn),
    _decorated,
    _Callable,
]


@given(
    base=st.sampled_from([_sync, _async, _Owner().plain, _Owner().coroutine]),
    wraps=st.lists(st.sampled_from(WRAPPERS), max_size=3),
    outer_async=st.booleans(),
)
def test_a_callable_is_async_exactly_when_calling_it_returns_a_coroutine(
    base: Callable[[int], Any],
    wraps: list[Callable[[Callable[[int], Any]], Callable[[int], Any]]],
    outer_async: bool,
) -> None:
    """The kind read without calling agrees with what a call returns, through partials,
    ``functools.wraps`` decorators, bound methods and callable objects."""
    fn = base
    for wrap in wraps:
        fn = wrap(fn)
    if outer_async:
        fn = _AsyncCallable(fn)
    returned = fn(1)
    is_coroutine = asyncio.iscoroutine(returned)
    if is_coroutine:
        assert isinstance(returned, Awaitable)
        returned.close()  # type: ignore[attr-defined]
    assert is_coroutine == is_async_callable(fn)


# -- after a commit, nothing may look as if nothing happened -----------------------------------


class _FailsAfterCommit(SQLiteStorage):
    """A real SQLite storage whose named bookkeeping steps after a commit fail unexpectedly."""

    broken: frozenset[str] = frozenset()

    def mark_delivered(self, entries: Any, *, now: Any) -> None:
        if "mark_delivered" in self.broken:
            raise RuntimeError("injected: recording the delivery failed")
        super().mark_delivered(entries, now=now)

    def mark_failed(self, entry: Any, *, error: str, retry_at: Any) -> None:
        if "mark_failed" in self.broken:
            raise RuntimeError("injected: recording the failed delivery failed")
        super().mark_failed(entry, error=error, retry_at=retry_at)


def _broken_world(
    db: Path, *steps: str
) -> tuple[_FailsAfterCommit, FakeClock, RecordingDispatcher]:
    storage = _FailsAfterCommit(db)
    clock = FakeClock()
    blocked(storage, clock)
    storage.broken = frozenset(steps)
    return storage, clock, RecordingDispatcher()


def test_recording_the_delivery_fails_after_the_commit_the_retry_still_succeeds(
    db: Path,
) -> None:
    """The dispatcher took the attempt but recording it failed: the retry reports it
    dispatched, and once the claim lapses a relay delivers it again (at least once)."""
    storage, clock, dispatcher = _broken_world(db, "mark_delivered")
    result = RetryService(storage, dispatcher, clock=clock).retry("p", "t")
    assert ("assigned", "dispatched") == (result.task.status.value, result.dispatch.status)
    assert [("p", "t", 2)] == dispatcher.keys
    storage.broken = frozenset()
    clock.advance(31)
    OutboxRelay(storage, dispatcher, clock=clock).run_once()
    assert 2 == dispatcher.keys.count(("p", "t", 2))


def test_recording_a_failed_delivery_fails_after_the_commit_the_retry_is_pending(
    db: Path,
) -> None:
    """The dispatcher refused and recording that failed too: the retry answers `pending`,
    and a relay delivers it once the claim lapses."""
    storage, clock, dispatcher = _broken_world(db, "mark_failed")
    dispatcher.failing = True
    result = RetryService(storage, dispatcher, clock=clock).retry("p", "t")
    assert ("assigned", "pending") == (result.task.status.value, result.dispatch.status)
    storage.broken = frozenset()
    dispatcher.failing = False
    clock.advance(31)
    OutboxRelay(storage, dispatcher, clock=clock).run_once()
    assert 1 == dispatcher.keys.count(("p", "t", 2))


def test_an_async_retry_whose_delivery_bookkeeping_fails_still_succeeds(db: Path) -> None:
    """The same holds for the async service over the same storage."""
    storage, clock, _ = _broken_world(db, "mark_delivered")
    service = AsyncRetryService(
        AsyncFromSync(storage, offload=True), AsyncRecordingDispatcher(), clock=clock
    )
    result = asyncio.run(service.retry("p", "t"))
    assert ("assigned", "dispatched") == (result.task.status.value, result.dispatch.status)


def test_the_api_answers_200_when_a_step_after_the_commit_fails(db: Path) -> None:
    """Over HTTP's framework-free API the committed retry is a 200, never a 503."""
    storage, clock, dispatcher = _broken_world(db, "mark_delivered")
    api = RetryAPI(RetryService(storage, dispatcher, clock=clock), TOKENS)
    response = api.handle(
        ApiRequest(
            method="POST",
            path="/projects/p/tasks/t/retry",
            headers={"Authorization": "Bearer tok-0123456789abcdef"},
        )
    )
    assert (200, "dispatched") == (response.status, response.json()["dispatch"]["status"])


# -- a storage that was never opened ------------------------------------------------------------


@pytest.mark.postgres
def test_an_unopened_async_postgres_storage_names_its_missing_open_step(
    postgres_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Used before `await storage.open()`, every call raises StorageNotOpen naming the step
    (logged once, at ERROR, on "deepwork_retry"); once opened it works; once closed it says
    closed."""
    from pg_support import schema_dropped_after

    from deepwork_retry.storage.postgres import AsyncPostgresStorage

    async def main(schema: str) -> None:
        storage = AsyncPostgresStorage(postgres_dsn, schema=schema)
        service = AsyncRetryService(storage)
        for call in (service.get_project("p"), service.retry("p", "t"), service.progress("p")):
            with pytest.raises(StorageNotOpen) as caught:
                await call
            assert (
                "AsyncPostgresStorage was not opened: call `await storage.open()` (in your "
                "application's startup or lifespan) before serving requests"
            ) == str(caught.value)
        await storage.open()
        with pytest.raises(ProjectNotFound):
            await service.get_project("p")
        await storage.close()
        with pytest.raises(StorageUnavailable) as closed:
            await service.get_project("p")
        assert "AsyncPostgresStorage is closed" == str(closed.value)

    with (
        schema_dropped_after(postgres_dsn) as schema,
        caplog.at_level(logging.ERROR, logger="deepwork_retry"),
    ):
        asyncio.run(main(schema))
    told = [r for r in caplog.records if r.name == "deepwork_retry" and r.levelno >= logging.ERROR]
    assert 1 == len(told)
    assert "await storage.open()" in told[0].getMessage()


def test_every_async_storage_opens_and_closes_alike(db: Path) -> None:
    """The async SQLite and memory storages take the same open/close (or `async with`)
    steps as AsyncPostgresStorage, so one lifespan fits them all."""

    async def main() -> None:
        storage = AsyncSQLiteStorage(db)
        await storage.open()
        await storage.create_project(_project("a"))
        await storage.close()
        async with AsyncSQLiteStorage(db) as again, AsyncMemoryStorage(MemoryStorage()) as mem:
            assert "a" == (await again.get_project("a")).id
            await mem.create_project(_project("b"))

    asyncio.run(main())


def _project(project_id: str) -> Any:
    from datetime import datetime, timezone

    from deepwork_retry import Project

    now = datetime(2025, 1, 1, tzinfo=timezone.utc)
    return Project(id=project_id, created_at=now, updated_at=now)


class _FailsOnTask(SQLiteStorage):
    """A real SQLite storage whose retry of one named task fails unexpectedly, before
    anything of that retry (or of the batch it is in) is written."""

    failing_task = ""

    def retry_blocked(self, project_id: str, task_id: str, **options: Any) -> Any:
        if task_id == self.failing_task:
            raise RuntimeError("injected: the retry failed before its commit")
        return super().retry_blocked(project_id, task_id, **options)

    def retry_blocked_many(self, project_id: str, task_ids: Any, **options: Any) -> Any:
        if self.failing_task in task_ids:
            raise RuntimeError("injected: the batch failed before its commit")
        return super().retry_blocked_many(project_id, task_ids, **options)


def test_a_bulk_retry_stopped_after_some_commits_reports_them_and_where_to_go_on(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected failure at the second task of a bulk retry ends the page there: the
    first, committed, is reported retried (an API 200, not a 503), and next_after lets the
    caller go on from the task that failed. (Batches of one task, so that the first
    commits before the second fails.)"""
    monkeypatch.setattr(sync_services, "BULK_BATCH", 1)
    storage = _FailsOnTask(db)
    ex = ExecutorService(storage, policy=RetryPolicy(backoff=NoBackoff()))
    ex.create_project("p")
    for task_id in ("a", "b", "c"):
        ex.add_task("p", task_id, max_retries=0)
        ex.assign("p", task_id)
        ex.start("p", task_id, 1)
        ex.fail("p", task_id, 1, TaskError(type="E", message="boom"))
    storage.failing_task = "b"
    api = RetryAPI(RetryService(storage), TOKENS)
    response = api.handle(
        ApiRequest(
            method="POST",
            path="/projects/p/retry-blocked",
            headers={"Authorization": "Bearer tok-0123456789abcdef"},
        )
    )
    body = response.json()
    assert (200, 1, "a") == (response.status, body["retried"], body["next_after"])
    assert "interrupted" == body["stopped"]
    assert [("a", True, True), ("b", False, False), ("c", False, False)] == [
        (i["task_id"], i["retried"], i["attempted"]) for i in body["items"]
    ]
    storage.failing_task = ""
    rest = RetryService(storage).bulk_retry("p", after="a")
    assert [("b", True), ("c", True)] == [(i.task_id, i.retried) for i in rest.items]


@pytest.mark.postgres
def test_a_storage_over_a_host_pool_never_opened_names_the_pools_open_step(
    postgres_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Over a pool the host was to open and did not, calls raise StorageNotOpen naming
    `await pool.open()`, logged once; once the host opens the pool the storage works."""
    from pg_support import schema_dropped_after
    from psycopg_pool import AsyncConnectionPool

    from deepwork_retry.storage.postgres import AsyncPostgresStorage, migrate

    async def main(schema: str) -> None:
        pool: Any = AsyncConnectionPool(postgres_dsn, open=False, kwargs={"autocommit": True})
        service = AsyncRetryService(AsyncPostgresStorage.from_pool(pool, schema=schema))
        for _ in range(2):
            with pytest.raises(StorageNotOpen) as caught:
                await service.get_project("p")
            assert (
                "AsyncPostgresStorage's pool was not opened: call `await pool.open()` (in your "
                "application's startup or lifespan) before serving requests"
            ) == str(caught.value)
        await pool.open()
        try:
            with pytest.raises(ProjectNotFound):
                await service.get_project("p")
        finally:
            await pool.close()

    with (
        schema_dropped_after(postgres_dsn) as schema,
        caplog.at_level(logging.ERROR, logger="deepwork_retry"),
    ):
        migrate(postgres_dsn, schema=schema)
        asyncio.run(main(schema))
    told = [r for r in caplog.records if r.name == "deepwork_retry" and r.levelno >= logging.ERROR]
    assert ["await pool.open()" in r.getMessage() for r in told] == [True]


# -- the rule as a property: whatever fails after a commit, the call succeeds ---------------------

FAULTS = st.sampled_from(
    [None, StorageUnavailable("down"), RuntimeError("bug"), KeyError("bug"), ValueError("bug")]
)


class _Unreliable(MemoryStorage):
    """Memory storage whose delivery bookkeeping raises the exceptions it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.faults: dict[str, BaseException | None] = {}

    def mark_delivered(self, entries: Any, *, now: Any) -> None:
        fault = self.faults.get("mark_delivered")
        if fault is not None:
            raise fault
        super().mark_delivered(entries, now=now)

    def mark_failed(self, entry: Any, *, error: str, retry_at: Any) -> None:
        fault = self.faults.get("mark_failed")
        if fault is not None:
            raise fault
        super().mark_failed(entry, error=error, retry_at=retry_at)


class _FaultyDispatcher(RecordingDispatcher):
    def __init__(self) -> None:
        super().__init__()
        self.fault: BaseException | None = None

    def dispatch(self, entry: DispatchEntry) -> None:
        if self.fault is not None:
            raise self.fault
        super().dispatch(entry)


@given(
    operation=st.sampled_from(["retry", "assign", "succeed", "resume"]),
    dispatch_fault=FAULTS,
    failed_fault=FAULTS,
    delivered_fault=FAULTS,
)
def test_whatever_fails_after_a_commit_the_call_succeeds_and_the_relay_delivers(
    operation: str,
    dispatch_fault: BaseException | None,
    failed_fault: BaseException | None,
    delivered_fault: BaseException | None,
) -> None:
    """A change is committed: whichever of the dispatcher and the delivery bookkeeping then
    fails, with whatever error, the call returns its result, and a relay run after the
    claims lapse delivers the new attempt."""
    storage, clock, dispatcher = _Unreliable(), FakeClock(), _FaultyDispatcher()
    policy = RetryPolicy(backoff=NoBackoff())
    ex = ExecutorService(storage, dispatcher, clock=clock, policy=policy)
    ex.create_project("p")
    ex.add_task("p", "a", max_retries=0)
    ex.add_task("p", "b", blocked_by=["a"])
    ex.assign("p", "a")
    ex.assign("p", "b")
    ex.start("p", "a", 1)
    if operation == "retry":
        ex.fail("p", "a", 1, TaskError(type="E", message="boom"))
    if operation == "resume":
        ex.set_project_status("p", "paused")
    expected = {
        "retry": ("p", "a", 2),
        "assign": ("p", "c", 1),
        "succeed": ("p", "b", 1),
        "resume": ("p", "b", 1),
    }[operation]
    if operation == "assign":
        ex.add_task("p", "c")
    if operation == "resume":
        ex.succeed("p", "a", 1)  # b is released while the project is paused: deferred
    storage.faults = {"mark_failed": failed_fault, "mark_delivered": delivered_fault}
    dispatcher.fault = dispatch_fault
    if operation == "retry":
        result: Any = RetryService(storage, dispatcher, clock=clock, policy=policy).retry("p", "a")
        assert TaskStatus.ASSIGNED == result.task.status
    elif operation == "assign":
        ex.assign("p", "c")
    elif operation == "succeed":
        ex.succeed("p", "a", 1)
    else:
        ex.set_project_status("p", "executing")
    storage.faults = {}
    dispatcher.fault = None
    clock.advance(3600)
    OutboxRelay(storage, dispatcher, clock=clock).run_once()
    assert expected in dispatcher.keys
