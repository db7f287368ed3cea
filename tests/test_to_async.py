"""The async port over a sync storage keeps the storage's optional one-step retry.

:class:`~deepwork_retry.storage._to_async.AsyncFromSync` offers
``retry_blocked`` exactly when the storage it wraps has it
(:class:`~deepwork_retry.ports.RetryInOneStep`), so the runtime check the
services and the conformance kit make tells the truth either way: a
one-step storage keeps its one round trip behind the port, and a storage
without it is never taken for one.
"""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from deepwork_retry import AsyncRetryService
from deepwork_retry._core.model import Project, Task
from deepwork_retry._core.plans import Applied
from deepwork_retry._core.states import ProjectStatus, TaskStatus
from deepwork_retry.ports import AsyncRetryInOneStep, RetryInOneStep
from deepwork_retry.storage._to_async import AsyncFromSync
from deepwork_retry.storage.memory import MemoryStorage
from deepwork_retry.storage.sqlite import SQLiteStorage

T0 = datetime(2025, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
NOW = T0 + timedelta(minutes=5)


class FixedClock:
    def now(self) -> datetime:
        return NOW


class CountingSQLite(SQLiteStorage):
    """A SQLite storage that notes the thread of every one-step retry it runs."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, synchronous="NORMAL")
        self.one_step_threads: list[str] = []

    def retry_blocked(self, project_id: str, task_id: str, **options: Any) -> Applied | None:
        self.one_step_threads.append(threading.current_thread().name)
        return super().retry_blocked(project_id, task_id, **options)


def blocked_task(storage: SQLiteStorage | MemoryStorage, pid: str) -> None:
    storage.create_project(
        Project(id=pid, status=ProjectStatus.EXECUTING, created_at=T0, updated_at=T0)
    )
    storage.add_tasks(
        [
            Task(
                id="t",
                project_id=pid,
                status=TaskStatus.BLOCKED,
                max_retries=2,
                retries_left=0,
                error_message="failed",
                created_at=T0,
                updated_at=T0,
            )
        ]
    )


@pytest.mark.parametrize("offload", [False, True], ids=["inline", "offloaded"])
def test_the_port_over_a_one_step_storage_retries_in_one_step(
    tmp_path: Path, offload: bool
) -> None:
    """Wrapped, a storage with ``retry_blocked`` still has it (an offloaded one runs it
    on a writer thread), and the async service's retry goes through it."""
    sync = CountingSQLite(tmp_path / "one.db")
    port = AsyncFromSync(sync, offload=offload)
    assert isinstance(sync, RetryInOneStep)
    assert isinstance(port, AsyncRetryInOneStep)

    async def scenario() -> tuple[Applied | None, Any, str | None]:
        try:
            blocked_task(sync, "direct")
            applied = await port.retry_blocked("direct", "t", now=NOW, actor="zoë")
            blocked_task(sync, "service")
            answer = await AsyncRetryService(port, clock=FixedClock()).retry(
                "service", "t", actor="zoë"
            )
            return applied, answer, sync.attempts("direct", "t")[-1].actor
        finally:
            await port.close()

    applied, answer, actor = asyncio.run(scenario())
    assert applied is not None
    assert (TaskStatus.ASSIGNED, 1) == (applied.task.status, applied.task.attempt)
    assert "zoë" == actor
    assert TaskStatus.ASSIGNED == answer.task.status
    assert 2 == len(sync.one_step_threads)
    on_writers = [name.startswith("deepwork-storage-write") for name in sync.one_step_threads]
    assert [offload, offload] == on_writers


@pytest.mark.parametrize("offload", [False, True], ids=["inline", "offloaded"])
def test_the_port_over_a_plain_storage_does_not_claim_the_capability(offload: bool) -> None:
    """Wrapped, a storage without ``retry_blocked`` has none, so the service takes the
    load, decide and apply path rather than calling a method that is not there."""
    sync = MemoryStorage()
    port = AsyncFromSync(sync, offload=offload)
    assert not isinstance(sync, RetryInOneStep)
    assert not isinstance(port, AsyncRetryInOneStep)
    assert not hasattr(port, "retry_blocked")

    async def scenario() -> Any:
        try:
            blocked_task(sync, "p")
            return await AsyncRetryService(port, clock=FixedClock()).retry("p", "t")
        finally:
            await port.close()

    assert TaskStatus.ASSIGNED == asyncio.run(scenario()).task.status


class _Forwarding:
    """A proxy forwarding every attribute to the storage it wraps (``__getattr__``)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_a_forwarding_proxy_keeps_the_event_log_on_every_python(tmp_path: Path) -> None:
    """The port over a ``__getattr__`` proxy has the capabilities of what it forwards to,
    also where ``isinstance`` on a protocol no longer sees such methods (3.12+)."""
    from deepwork_retry.ports import AsyncEventLog, AsyncRetryInOneStep
    from deepwork_retry.storage.memory import MemoryStorage
    from deepwork_retry.storage.sqlite import SQLiteStorage

    over_memory = AsyncFromSync(_Forwarding(MemoryStorage()), offload=False)
    assert isinstance(over_memory, AsyncEventLog)
    assert not isinstance(over_memory, AsyncRetryInOneStep)
    sqlite = SQLiteStorage(str(tmp_path / "proxy.db"))
    try:
        over_sqlite = AsyncFromSync(_Forwarding(sqlite), offload=False)
        assert isinstance(over_sqlite, AsyncEventLog)
        assert isinstance(over_sqlite, AsyncRetryInOneStep)
    finally:
        sqlite.close()


class _Hiding(_Forwarding):
    """A forwarding proxy that hides some of the wrapped storage's methods."""

    def __init__(self, inner: object, hidden: frozenset[str]) -> None:
        super().__init__(inner)
        self.hidden = hidden

    def __getattr__(self, name: str) -> object:
        if name in self.hidden:
            raise AttributeError(name)
        return getattr(self.inner, name)


_CAPABILITIES = {
    "one_step": ("retry_blocked",),
    "events": ("events", "claim_events", "settle_events", "claim_event_retries",
               "settle_event_retry", "parked_events", "replay_parked"),
    "overview": ("list_projects", "blocked_tasks"),
}  # fmt: skip


@pytest.mark.parametrize("one_step", [False, True])
@pytest.mark.parametrize("events", [False, True])
@pytest.mark.parametrize("overview", [False, True])
def test_the_port_has_exactly_the_capabilities_of_what_it_wraps(
    tmp_path: Path, one_step: bool, events: bool, overview: bool
) -> None:
    """Every combination of the optional capabilities, each found by ``getattr`` (so through
    a ``__getattr__`` proxy too, on every Python), is kept, and none is added."""
    from deepwork_retry.ports import AsyncEventLog, AsyncProjectOverview

    wanted = {"one_step": one_step, "events": events, "overview": overview}
    hidden = frozenset(
        name for capability, names in _CAPABILITIES.items() if not wanted[capability]
        for name in names
    )  # fmt: skip
    sqlite = SQLiteStorage(str(tmp_path / "caps.db"))
    sqlite.list_projects = MemoryStorage().list_projects  # type: ignore[attr-defined]
    sqlite.blocked_tasks = MemoryStorage().blocked_tasks  # type: ignore[attr-defined]
    try:
        port = AsyncFromSync(_Hiding(sqlite, hidden), offload=False)
        assert one_step == isinstance(port, AsyncRetryInOneStep)
        assert events == isinstance(port, AsyncEventLog)
        assert overview == isinstance(port, AsyncProjectOverview)
        for capability, names in _CAPABILITIES.items():
            for name in names:
                assert wanted[capability] == hasattr(port, name), name
    finally:
        sqlite.close()


class _OverviewThreads(MemoryStorage):
    """The in-memory storage noting the thread each read across projects runs on."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def list_projects(self, **kwargs: Any) -> Any:
        self.threads.append(threading.current_thread().name)
        return super().list_projects(**kwargs)

    def blocked_tasks(self, **kwargs: Any) -> Any:
        self.threads.append(threading.current_thread().name)
        return super().blocked_tasks(**kwargs)


@pytest.mark.parametrize("offload", [False, True], ids=["inline", "offloaded"])
def test_the_port_forwards_the_reads_across_projects(offload: bool) -> None:
    """Both reads reach the wrapped storage with every argument and return what it returns,
    offloaded on the reader threads (never queued behind writes)."""
    from deepwork_retry.ports import AsyncProjectOverview

    sync = _OverviewThreads()
    for pid in ("b", "a", "c"):
        blocked_task(sync, pid)
    port = AsyncFromSync(sync, offload=offload)
    assert isinstance(port, AsyncProjectOverview)
    only = frozenset({"a", "c", "x"})

    async def scenario() -> tuple[Any, Any, Any]:
        try:
            projects = await port.list_projects(projects=only, after="a", limit=5)
            tasks = await port.blocked_tasks(projects=only, after=("a", "t"), limit=5)
            typed = await port.blocked_tasks(error_type="Fatal", limit=1)
            return projects, tasks, typed
        finally:
            await port.close()

    projects, tasks, typed = asyncio.run(scenario())
    assert projects == sync.list_projects(projects=only, after="a", limit=5)
    assert ["c"] == [s.project.id for s in projects]
    assert [("c", "t")] == [(t.project_id, t.id) for t in tasks]
    assert tasks == sync.blocked_tasks(projects=only, after=("a", "t"))
    assert [] == typed  # the tasks have no error_type: the filter was passed on
    assert 3 == len(sync.blocked_tasks(limit=1000))
    readers = [name.startswith("deepwork-storage-read") for name in sync.threads[:2]]
    assert [offload, offload] == readers


def test_the_service_over_a_storage_without_the_reads_says_so() -> None:
    """A storage without the reads across projects: the port has none, and the service
    raises OverviewNotKept (the web's 501) rather than AttributeError."""
    from deepwork_retry.exceptions import OverviewNotKept

    port = AsyncFromSync(
        _Hiding(MemoryStorage(), frozenset(_CAPABILITIES["overview"])), offload=False
    )
    service = AsyncRetryService(port, clock=FixedClock())

    async def scenario() -> None:
        with pytest.raises(OverviewNotKept):
            await service.projects()
        with pytest.raises(OverviewNotKept):
            await service.blocked_across(project_id="p")

    asyncio.run(scenario())
