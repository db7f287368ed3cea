"""Dispatch by calling a function in the caller's thread (or task).

The call is the delivery: when the function returns, the entry counts as
delivered; when it raises, the outbox keeps the entry pending and the relay
tries again later.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from deepwork_retry._core.model import DispatchEntry

__all__ = ["AsyncInlineDispatcher", "InlineDispatcher"]


class InlineDispatcher:
    """A :class:`~deepwork_retry.ports.Dispatcher` that calls ``fn(entry)``."""

    def __init__(self, fn: Callable[[DispatchEntry], object]) -> None:
        self.fn = fn

    def dispatch(self, entry: DispatchEntry) -> None:
        self.fn(entry)


class AsyncInlineDispatcher:
    """A :class:`~deepwork_retry.ports.AsyncDispatcher` that awaits ``fn(entry)``."""

    def __init__(self, fn: Callable[[DispatchEntry], Awaitable[object]]) -> None:
        self.fn = fn

    async def dispatch(self, entry: DispatchEntry) -> None:
        await self.fn(entry)
