"""The async port over a sync storage, for adapters whose driver is sync."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Generic, TypeVar

from typing_extensions import ParamSpec, Self

from deepwork_retry._core.model import (
    Attempt,
    DispatchEntry,
    IdempotencyRecord,
    Progress,
    Project,
    Task,
)
from deepwork_retry._core.plans import Applied, Plan, ProjectPlan
from deepwork_retry._core.retention import Pruned, PruneRule
from deepwork_retry._core.states import TaskStatus
from deepwork_retry.ports import Storage

S = TypeVar("S", bound=Storage)
P = ParamSpec("P")
R = TypeVar("R")


class AsyncFromSync(Generic[S]):
    """Every method of the wrapped ``sync`` storage as a coroutine.

    With ``offload`` each call runs in a worker thread (``asyncio.to_thread``)
    so a blocking driver never stalls the event loop; without it, calls run
    inline, for storages that never block.
    """

    def __init__(self, sync: S, *, offload: bool) -> None:
        self.sync = sync
        self._offload = offload

    async def _call(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        if self._offload:
            return await asyncio.to_thread(functools.partial(fn, *args, **kwargs))
        return fn(*args, **kwargs)

    async def create_project(self, project: Project) -> None:
        await self._call(self.sync.create_project, project)

    async def add_tasks(self, tasks: Sequence[Task]) -> None:
        await self._call(self.sync.add_tasks, tasks)

    async def get_project(self, project_id: str) -> Project:
        return await self._call(self.sync.get_project, project_id)

    async def load(self, project_id: str, task_id: str) -> tuple[Project, Task]:
        return await self._call(self.sync.load, project_id, task_id)

    async def get_tasks(self, project_id: str, task_ids: Sequence[str]) -> dict[str, Task]:
        return await self._call(self.sync.get_tasks, project_id, task_ids)

    async def dependants(self, project_id: str, task_id: str) -> list[Task]:
        return await self._call(self.sync.dependants, project_id, task_id)

    async def list_tasks(
        self,
        project_id: str,
        *,
        status: TaskStatus | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[Task]:
        return await self._call(
            self.sync.list_tasks, project_id, status=status, after=after, limit=limit
        )

    async def progress(self, project_id: str) -> Progress:
        return await self._call(self.sync.progress, project_id)

    async def attempts(self, project_id: str, task_id: str) -> list[Attempt]:
        return await self._call(self.sync.attempts, project_id, task_id)

    async def dispatches(self, project_id: str, task_id: str) -> list[DispatchEntry]:
        return await self._call(self.sync.dispatches, project_id, task_id)

    async def deferred(self, project_id: str) -> list[DispatchEntry]:
        return await self._call(self.sync.deferred, project_id)

    async def apply(self, plan: Plan) -> Applied:
        return await self._call(self.sync.apply, plan)

    async def apply_project(self, plan: ProjectPlan) -> tuple[Project, list[DispatchEntry]]:
        return await self._call(self.sync.apply_project, plan)

    async def claim_due(
        self, *, now: datetime, limit: int, claimed_until: datetime
    ) -> list[DispatchEntry]:
        return await self._call(
            self.sync.claim_due, now=now, limit=limit, claimed_until=claimed_until
        )

    async def mark_delivered(self, entries: Sequence[DispatchEntry], *, now: datetime) -> None:
        await self._call(self.sync.mark_delivered, entries, now=now)

    async def mark_failed(self, entry: DispatchEntry, *, error: str, retry_at: datetime) -> None:
        await self._call(self.sync.mark_failed, entry, error=error, retry_at=retry_at)

    async def redeliver_stale(
        self, *, now: datetime, delivered_before: datetime, limit: int
    ) -> list[DispatchEntry]:
        return await self._call(
            self.sync.redeliver_stale, now=now, delivered_before=delivered_before, limit=limit
        )

    async def expired_leases(self, *, now: datetime, limit: int) -> list[Task]:
        return await self._call(self.sync.expired_leases, now=now, limit=limit)

    async def get_idempotency(
        self, key: str, *, now: datetime | None = None
    ) -> IdempotencyRecord | None:
        return await self._call(self.sync.get_idempotency, key, now=now)

    async def save_idempotency(self, record: IdempotencyRecord) -> IdempotencyRecord:
        return await self._call(self.sync.save_idempotency, record)

    async def prune(self, rule: PruneRule) -> Pruned:
        return await self._call(self.sync.prune, rule)

    async def close(self) -> None:
        await self._call(self.sync.close)

    # The lifecycle every async storage shares, so that an application opens
    # and closes any of them alike (in its lifespan, or with ``async with``).
    async def open(self) -> None:
        """Nothing to do: the wrapped storage opened when it was constructed."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
