"""The sync counterparts of ``deepwork_retry._async._compat`` (hand-written)."""

from __future__ import annotations

import threading

ASYNCHRONOUS = False
"""Whether the services built on this module await their storage and dispatcher."""

Event = threading.Event


def wait_or_stop(stop: Event, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds; True when ``stop`` was set."""
    return stop.wait(timeout)
