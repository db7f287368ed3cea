"""How the async event relay calls a listener (the sync twin is hand-written too)."""

from __future__ import annotations

import asyncio
import inspect

from deepwork_retry._core.events import Event
from deepwork_retry._hooks import Hooks, Listener


def check_listeners(owner: str, hooks: Hooks) -> None:
    """Every listener runs on the async relay: coroutines awaited, the rest in a thread."""


async def call_listener(listener: Listener, event: Event) -> None:
    """Call ``listener`` with ``event``: awaited if async, else in a worker thread
    (so that a blocking listener, such as a webhook's POST, never stalls the loop)."""
    if listener.is_async:
        result = listener.fn(event)
        if inspect.isawaitable(result):
            await result
        return
    await asyncio.to_thread(listener.fn, event)
