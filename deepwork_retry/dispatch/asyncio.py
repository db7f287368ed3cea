"""Dispatch as asyncio tasks: each entry runs ``await fn(entry)`` in its own task.

Delivery means the task was scheduled on the running loop. The dispatcher
keeps a reference to every task until it finishes (the loop holds only weak
ones), and :meth:`AsyncioDispatcher.aclose` waits for them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import deepwork_retry._trace as _trace
from deepwork_retry._core.model import DispatchEntry
from deepwork_retry._log import emit
from deepwork_retry.exceptions import DispatchError

__all__ = ["AsyncioDispatcher"]

log = logging.getLogger("deepwork_retry.dispatch")


class AsyncioDispatcher:
    """A :class:`~deepwork_retry.ports.AsyncDispatcher` that schedules one task per entry.

    ``on_error`` sees every exception ``fn`` raises; by default they are logged.
    """

    def __init__(
        self,
        fn: Callable[[DispatchEntry], Awaitable[object]],
        *,
        on_error: Callable[[DispatchEntry, BaseException], None] | None = None,
    ) -> None:
        self.fn = fn
        self.on_error = on_error
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def running(self) -> int:
        """How many dispatched tasks have not finished yet."""
        return sum(1 for task in self._tasks if not task.done())

    async def dispatch(self, entry: DispatchEntry) -> None:
        if self._closed:
            raise DispatchError("asyncio dispatcher is closed")
        task = asyncio.get_running_loop().create_task(
            self._run(entry), name=f"deepwork-dispatch-{entry.task_id}-{entry.attempt}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, entry: DispatchEntry) -> None:
        telemetry = _trace.current
        if telemetry is None:
            await self._call(entry)
            return
        with telemetry.running(entry):  # a child of the entry's trace
            await self._call(entry)

    async def _call(self, entry: DispatchEntry) -> None:
        try:
            await self.fn(entry)
        except Exception as exc:  # noqa: BLE001 - logged; reported here: the task must not die unobserved
            if self.on_error is not None:
                self.on_error(entry, exc)
            else:
                emit(
                    log, logging.ERROR, "deepwork.dispatched_work_raised",
                    "dispatched work for %s raised", entry.key, about=entry, exc_info=exc,
                )  # fmt: skip

    async def aclose(self) -> None:
        """Refuse new work and wait for every dispatched task to finish."""
        self._closed = True
        # Wait on the unfinished ones only: a finished task stays in the set until its
        # done callback runs, and gathering finished tasks need not yield to the loop
        # (Python 3.12+), so waiting for the set to empty could spin for ever.
        while unfinished := [task for task in self._tasks if not task.done()]:
            await asyncio.gather(*unfinished, return_exceptions=True)
