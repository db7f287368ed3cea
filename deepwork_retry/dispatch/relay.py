"""The outbox relay loop, ready for a command line or a supervisor.

The relay delivers what a request could not: entries whose first dispatch
failed (broker down), entries left behind by a crash between commit and
dispatch, and automatic retries whose backoff has passed. Several relays may
run at once; storage claims keep them from sending one entry twice at the
same time, and executors discard a repeated delivery by its attempt number.
"""

from __future__ import annotations

import threading

from deepwork_retry._core.retention import Retention
from deepwork_retry._sync.services import OutboxRelay
from deepwork_retry.ports import Clock, Dispatcher, Storage

__all__ = ["run_relay"]


def run_relay(
    storage: Storage,
    dispatcher: Dispatcher,
    *,
    poll_interval: float = 1.0,
    once: bool = False,
    batch: int = 100,
    claim_timeout: float = 30.0,
    clock: Clock | None = None,
    stop: threading.Event | None = None,
    prune_every: float | None = None,
    retention: Retention | None = None,
) -> int:
    """Deliver due outbox entries until ``stop`` is set, polling every ``poll_interval``.

    With ``once``, deliver one batch and return how many entries were
    delivered; otherwise return 0 when stopped. With ``prune_every``
    (seconds), the relay also prunes what ``retention`` (by default
    :class:`~deepwork_retry.Retention`'s defaults) allows, at start and then
    every ``prune_every`` seconds, a few small batches between its deliveries.
    """
    if poll_interval <= 0:
        raise ValueError("poll_interval must be positive")
    relay = OutboxRelay(
        storage,
        dispatcher,
        clock=clock,
        batch=batch,
        claim_timeout=claim_timeout,
        poll_interval=poll_interval,
        prune_every=prune_every,
        retention=retention,
    )
    if once:
        return relay.run_once()
    relay.run(stop if stop is not None else threading.Event())
    return 0
