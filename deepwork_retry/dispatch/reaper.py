"""The reaper loop, ready for a command line or a supervisor.

An executor that dies mid-attempt stops heartbeating; once the attempt's lease
has expired the reaper fails it as lost, and the retry policy then treats it
like any failure (retry after the backoff, or block). Several reapers may run
at once: the compare-and-set in storage lets exactly one of them fail a given
attempt.

Each pass also hands out again the dispatches that were delivered but never
started within ``RetryPolicy.start_timeout`` (a message lost by the queue, or
a worker that died before starting it); they become pending and an outbox
relay delivers them, where the fencing token keeps a late original from
running the attempt twice.

Give the reaper the same :class:`~deepwork_retry.RetryPolicy` as the workers,
and a dispatcher to send the retries of lost attempts at once (without one, an
outbox relay delivers them).
"""

from __future__ import annotations

import threading

from deepwork_retry._core.policy import RetryPolicy
from deepwork_retry._core.retention import Retention
from deepwork_retry._sync.services import ExecutorService, Reaper
from deepwork_retry.ports import Clock, Dispatcher, Storage

__all__ = ["run_reaper"]


def run_reaper(
    storage: Storage,
    *,
    interval: float = 5.0,
    once: bool = False,
    policy: RetryPolicy | None = None,
    dispatcher: Dispatcher | None = None,
    clock: Clock | None = None,
    stop: threading.Event | None = None,
    prune_every: float | None = None,
    retention: Retention | None = None,
) -> int:
    """Reap expired leases every ``interval`` seconds until ``stop`` is set.

    With ``once``, reap one batch and return how many attempts were failed as
    lost; otherwise return 0 when stopped. Storage outages are logged and the
    loop carries on. With ``prune_every`` (seconds), the reaper also prunes
    what ``retention`` (by default :class:`~deepwork_retry.Retention`'s
    defaults) allows, at start and then every ``prune_every`` seconds, a few
    small batches after each pass.
    """
    if interval <= 0:
        raise ValueError("interval must be positive")
    service = ExecutorService(storage, dispatcher, policy=policy, clock=clock)
    reaper = Reaper(service, interval=interval, prune_every=prune_every, retention=retention)
    if once:
        return reaper.run_once()
    reaper.run(stop if stop is not None else threading.Event())
    return 0
