"""The few places where async and sync code differ by more than ``await``."""

from __future__ import annotations

import asyncio

ASYNCHRONOUS = True
"""Whether the services built on this module await their storage and dispatcher."""

Event = asyncio.Event


async def wait_or_stop(stop: Event, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds; True when ``stop`` was set."""
    try:
        await asyncio.wait_for(stop.wait(), timeout)
    except asyncio.TimeoutError:
        return False
    return True
