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
from deepwork_retry._hooks import Hooks
from deepwork_retry._sync.event_relay import EventRelay
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
    hooks: Hooks | None = None,
) -> int:
    """Deliver due outbox entries until ``stop`` is set, polling every ``poll_interval``.

    With ``once``, deliver one batch and return how many entries were
    delivered; otherwise return 0 when stopped. With ``prune_every``
    (seconds), the relay also prunes what ``retention`` (by default
    :class:`~deepwork_retry.Retention`'s defaults) allows, at start and then
    every ``prune_every`` seconds, a few small batches between its deliveries.

    With ``hooks`` (a :class:`~deepwork_retry.events.Hooks`), the same process
    also runs the event relay (:func:`~deepwork_retry.events.run_events`) for
    them, in a thread of its own, until ``stop``; with ``once``, one pass of
    each (the count returned is the outbox's).
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
    events = None
    if hooks is not None:
        events = EventRelay(
            storage,  # type: ignore[arg-type]  # EventRelay checks that it keeps events
            hooks,
            clock=clock,
            batch=batch,
            claim_timeout=claim_timeout,
            poll_interval=poll_interval,
        )
    if once:
        delivered = relay.run_once()
        if events is not None:
            events.run_once()
        return delivered
    stop = stop if stop is not None else threading.Event()
    if events is None:
        relay.run(stop)
        return 0
    thread = threading.Thread(target=events.run, args=(stop,), name="deepwork-events", daemon=True)
    thread.start()
    try:
        relay.run(stop)
    finally:
        stop.set()
        thread.join()
    return 0
