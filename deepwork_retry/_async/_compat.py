"""The few places where async and sync code differ by more than ``await``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

ASYNCHRONOUS = True
"""Whether the services built on this module await their storage and dispatcher."""

Event = asyncio.Event

log = logging.getLogger("deepwork_retry")

Lock = asyncio.Lock
"""Held across the awaits of one storage call on a shared connection."""

_STARTED: set[asyncio.Task[None]] = set()
"""Tasks of :func:`start_soon` still running (the loop keeps only weak references)."""


async def wait_or_stop(stop: Event, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds; True when ``stop`` was set."""
    try:
        await asyncio.wait_for(stop.wait(), timeout)
    except asyncio.TimeoutError:
        return False
    return True


def start_soon(call: Callable[[], Awaitable[None]]) -> None:
    """Run ``call()`` on the running loop without waiting for it; a failure is logged."""

    async def run() -> None:
        try:
            await call()
        except Exception:  # nobody awaits it: the log is where a failure can go
            log.error("a callback started after a commit failed", exc_info=True)

    task = asyncio.get_running_loop().create_task(run())
    _STARTED.add(task)
    task.add_done_callback(_STARTED.discard)


async def let_scheduled_run() -> None:
    """Yield to the loop once: tasks scheduled meanwhile take their first step."""
    await asyncio.sleep(0)


async def sleep(seconds: float) -> None:
    """Wait ``seconds`` (the sync twin blocks the thread)."""
    await asyncio.sleep(seconds)


async def close_iterator(iterator: AsyncIterator[Any]) -> None:
    """Close a generator that may be suspended mid-way (runs its ``finally``)."""
    close = getattr(iterator, "aclose", None)
    if close is not None:
        # "already running": in the task that is ending it: it ends by itself
        with contextlib.suppress(RuntimeError):
            await close()
