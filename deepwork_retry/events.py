"""Lifecycle events, hooks and the event relay (the public module).

Every storage writes a durable :class:`Event` for each move a host cares
about, in the move's own transaction (see :mod:`deepwork_retry._core.events`
and ``docs/events.md``). Register listeners on a :class:`Hooks` and run an
:class:`EventRelay` (or :class:`AsyncEventRelay`, or :func:`run_events`):
it calls them after the commit, at least once per event, in order per task,
retries a listener that raised with backoff, and parks a delivery after the
listener's limit. A consumer deduplicates on :attr:`Event.id`.

::

    from deepwork_retry.events import EventType, Hooks, run_events

    hooks = Hooks()

    @hooks.on_retries_exhausted
    def page(event):
        print("blocked for good:", event.project_id, event.task_id, event.data["error_message"])

    run_events(storage, hooks)  # until interrupted
"""

from __future__ import annotations

import threading

from deepwork_retry._async.event_relay import AsyncEventRelay
from deepwork_retry._core.events import RETRIES_EXHAUSTED, Event, EventRetry, EventType
from deepwork_retry._core.policy import ExponentialBackoff
from deepwork_retry._hooks import Hooks, Listener, retries_exhausted, subscriber_name
from deepwork_retry._sync.event_relay import LISTENER_BACKOFF, MAX_TRIES, EventRelay
from deepwork_retry.ports import Clock, EventLog

__all__ = [
    "LISTENER_BACKOFF",
    "MAX_TRIES",
    "RETRIES_EXHAUSTED",
    "AsyncEventRelay",
    "Event",
    "EventRelay",
    "EventRetry",
    "EventType",
    "Hooks",
    "Listener",
    "retries_exhausted",
    "run_events",
    "subscriber_name",
]


def run_events(
    storage: EventLog,
    hooks: Hooks,
    *,
    poll_interval: float = 1.0,
    once: bool = False,
    batch: int = 100,
    claim_timeout: float = 30.0,
    max_tries: int = MAX_TRIES,
    backoff: ExponentialBackoff = LISTENER_BACKOFF,
    clock: Clock | None = None,
    stop: threading.Event | None = None,
    settle_within: float | None = None,
) -> int:
    """Deliver events to ``hooks`` until ``stop`` is set, polling every ``poll_interval``.

    With ``once``, run one pass (a batch of new events, then a batch of due
    retries) and return how many were claimed; otherwise return 0 when stopped.
    """
    relay = EventRelay(
        storage,
        hooks,
        clock=clock,
        batch=batch,
        claim_timeout=claim_timeout,
        poll_interval=poll_interval,
        max_tries=max_tries,
        backoff=backoff,
        settle_within=settle_within,
    )
    if once:
        return relay.run_once()
    relay.run(stop if stop is not None else threading.Event())
    return 0
