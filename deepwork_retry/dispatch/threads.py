"""Dispatch onto a thread pool: each entry runs ``fn(entry)`` in a worker thread.

Delivery means the pool accepted the work; what ``fn`` does afterwards is the
executor's business (it reports back through the executor service with the
attempt's fencing token). A pool that is shut down refuses new work, and the
outbox keeps those entries pending.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from types import TracebackType

import deepwork_retry._trace as _trace
from deepwork_retry._core.model import DispatchEntry
from deepwork_retry._log import emit
from deepwork_retry.exceptions import DispatchError

__all__ = ["ThreadPoolDispatcher"]

log = logging.getLogger("deepwork_retry.dispatch")


class ThreadPoolDispatcher:
    """A :class:`~deepwork_retry.ports.Dispatcher` over a :mod:`concurrent.futures` pool.

    Pass ``executor`` to share a pool the host owns (then :meth:`shutdown`
    leaves it running), or ``max_workers`` to let the dispatcher own one.
    ``on_error`` sees every exception ``fn`` raises in a worker; by default
    they are logged.
    """

    def __init__(
        self,
        fn: Callable[[DispatchEntry], object],
        *,
        max_workers: int | None = None,
        executor: Executor | None = None,
        on_error: Callable[[DispatchEntry, BaseException], None] | None = None,
    ) -> None:
        if executor is not None and max_workers is not None:
            raise ValueError("pass either executor or max_workers, not both")
        self.fn = fn
        self.on_error = on_error
        self._owned = executor is None
        self._executor: Executor = executor or ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="deepwork-dispatch"
        )
        self._lock = threading.Lock()
        self._closed = False

    def dispatch(self, entry: DispatchEntry) -> None:
        with self._lock:
            if self._closed:
                raise DispatchError("thread pool dispatcher is shut down")
            telemetry = _trace.current
            try:
                if telemetry is None:
                    future = self._executor.submit(self.fn, entry)
                else:  # fn runs in the attempt's span, a child of the entry's trace
                    future = self._executor.submit(telemetry.run, self.fn, entry)
            except RuntimeError as exc:  # the pool was shut down behind our back
                raise DispatchError(f"thread pool refused work: {exc}") from exc
        future.add_done_callback(lambda done: self._report(entry, done))

    def _report(self, entry: DispatchEntry, future: Future[object]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            return
        if self.on_error is not None:
            self.on_error(entry, exc)
        else:
            emit(
                log, logging.ERROR, "deepwork.dispatched_work_raised",
                "dispatched work for %s raised", entry.key, about=entry, exc_info=exc,
            )  # fmt: skip

    def shutdown(self, *, wait: bool = True) -> None:
        """Refuse new work; with ``wait``, return when accepted work has finished."""
        with self._lock:
            self._closed = True
        if self._owned:
            self._executor.shutdown(wait=wait)

    def __enter__(self) -> ThreadPoolDispatcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()
