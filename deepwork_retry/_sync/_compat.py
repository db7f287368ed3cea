"""The sync counterparts of ``deepwork_retry._async._compat`` (hand-written)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

ASYNCHRONOUS = False
"""Whether the services built on this module await their storage and dispatcher."""

Event = threading.Event

log = logging.getLogger("deepwork_retry")

Lock = threading.Lock
"""Held across the statements of one storage call on a shared connection."""


def wait_or_stop(stop: Event, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds; True when ``stop`` was set."""
    return stop.wait(timeout)


def start_soon(call: Callable[[], None]) -> None:
    """Run ``call()`` now (the async twin schedules it on the running loop); a failure
    is logged."""
    try:
        call()
    except Exception:  # as in the async twin, whose caller cannot see it either
        log.error("a callback started after a commit failed", exc_info=True)


def let_scheduled_run() -> None:
    """Nothing to do: without a loop, nothing waits for a turn (the async twin yields)."""


def sleep(seconds: float) -> None:
    """Wait ``seconds``, blocking the thread."""
    time.sleep(seconds)


def close_iterator(iterator: Iterator[Any]) -> None:
    """Close a generator that may be suspended mid-way (runs its ``finally``); one
    running in another thread just now is left to end by itself."""
    close = getattr(iterator, "close", None)
    if close is not None:
        # "generator already executing", in another thread: it ends by itself
        with contextlib.suppress(ValueError):
            close()
