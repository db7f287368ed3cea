"""Test doubles a host application can use around the real services.

They are adapters in their own right (a settable clock, dispatchers that
remember what they were handed), not stand-ins for library internals.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

from deepwork_retry._core.model import DispatchEntry
from deepwork_retry.exceptions import DispatchError

DEFAULT_START = datetime(2024, 1, 1, 12, 0, 0, 250_000, tzinfo=timezone.utc)
"""Where a :class:`FakeClock` starts unless told otherwise (with microseconds on purpose)."""


class FakeClock:
    """A :class:`~deepwork_retry.ports.Clock` that moves only when told to."""

    def __init__(self, start: datetime = DEFAULT_START) -> None:
        if start.tzinfo is None:
            raise ValueError("FakeClock needs a timezone-aware start time")
        self._now = start.astimezone(timezone.utc)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> datetime:
        """Move forward by ``seconds`` (never backward) and return the new time."""
        if not seconds >= 0:
            raise ValueError(f"a clock only moves forward, got {seconds!r} seconds")
        with self._lock:
            self._now += timedelta(seconds=seconds)
            return self._now

    def set(self, when: datetime) -> None:
        """Jump to ``when``, which must not be earlier than now."""
        with self._lock:
            if when < self._now:
                raise ValueError("a clock only moves forward")
            self._now = when.astimezone(timezone.utc)


class RecordingDispatcher:
    """A :class:`~deepwork_retry.ports.Dispatcher` that keeps every entry it accepts.

    Set :attr:`failing` to make it refuse deliveries (raising
    :class:`~deepwork_retry.exceptions.DispatchError`), as a broker that is
    down would; refused entries are kept in :attr:`refused`.
    """

    def __init__(self, *, failing: bool = False) -> None:
        self.failing = failing
        self.delivered: list[DispatchEntry] = []
        self.refused: list[DispatchEntry] = []
        self._lock = threading.Lock()

    def dispatch(self, entry: DispatchEntry) -> None:
        with self._lock:
            if self.failing:
                self.refused.append(entry)
                raise DispatchError(f"dispatcher refused {entry.task_id} attempt {entry.attempt}")
            self.delivered.append(entry)

    @property
    def keys(self) -> list[tuple[str, str, int]]:
        """The ``(project, task, attempt)`` keys delivered, in delivery order."""
        with self._lock:
            return [entry.key for entry in self.delivered]


class AsyncRecordingDispatcher:
    """The :class:`~deepwork_retry.ports.AsyncDispatcher` twin of :class:`RecordingDispatcher`."""

    def __init__(self, *, failing: bool = False) -> None:
        self._inner = RecordingDispatcher(failing=failing)

    @property
    def failing(self) -> bool:
        return self._inner.failing

    @failing.setter
    def failing(self, value: bool) -> None:
        self._inner.failing = value

    @property
    def delivered(self) -> list[DispatchEntry]:
        return self._inner.delivered

    @property
    def refused(self) -> list[DispatchEntry]:
        return self._inner.refused

    @property
    def keys(self) -> list[tuple[str, str, int]]:
        return self._inner.keys

    async def dispatch(self, entry: DispatchEntry) -> None:
        self._inner.dispatch(entry)
