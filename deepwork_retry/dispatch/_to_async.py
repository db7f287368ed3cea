"""The async port over a blocking dispatcher."""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

from deepwork_retry._core.model import DispatchEntry
from deepwork_retry.ports import Dispatcher

D = TypeVar("D", bound=Dispatcher)


class AsyncFromSyncDispatcher(Generic[D]):
    """An :class:`~deepwork_retry.AsyncDispatcher` that runs a blocking one in a worker thread.

    Queue clients block on the network; running each dispatch in
    :func:`asyncio.to_thread` keeps the event loop free meanwhile.
    """

    def __init__(self, dispatcher: D) -> None:
        self.dispatcher = dispatcher

    async def dispatch(self, entry: DispatchEntry) -> None:
        await asyncio.to_thread(self.dispatcher.dispatch, entry)
