"""The event relay: delivers the durable lifecycle events to the registered listeners.

This file is the hand-written source; ``deepwork_retry/_sync/event_relay.py`` is
generated from it by ``scripts/unasync.py``.

A pass claims pending events (:meth:`~deepwork_retry.ports.EventLog.claim_events`),
calls every listener that hears each one, and settles them in groups (one write
per group, at most ``settle_within`` seconds of deliveries each): the events
are delivered, and each listener that raised keeps a failed delivery
(:class:`~deepwork_retry._core.events.EventRetry`, ``tries`` 1) due after a
backoff. Then it claims failed deliveries that are due and calls their one
listener again: delivered, due again after a longer backoff, or parked once
the listener's ``max_tries`` is reached. A listener that raises never stops
another listener, another event, or any request: all of this runs after the
commit, in the relay.

Delivery is at least once: a relay that dies before it settles a group
leaves its claim to lapse, and the group's events are delivered again. A consumer
deduplicates on :attr:`~deepwork_retry._core.events.Event.id`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from datetime import datetime, timedelta

from deepwork_retry._async._compat import ASYNCHRONOUS, Event, wait_or_stop
from deepwork_retry._async._listeners import call_listener, check_listeners
from deepwork_retry._core import events as ev
from deepwork_retry._core.policy import ExponentialBackoff, RandomSource
from deepwork_retry._hooks import Hooks, Listener
from deepwork_retry._log import emit
from deepwork_retry._wiring import check_kind
from deepwork_retry.exceptions import ConfigurationError, InvalidInput, StorageError
from deepwork_retry.ports import AsyncEventLog, Clock, SystemClock

log = logging.getLogger("deepwork_retry")

LISTENER_BACKOFF = ExponentialBackoff(wait_initial=2.0, wait_max=3600.0, wait_jitter=1.0)
"""Backoff between tries of a listener that raised: 2 s, 4 s, 8 s … at most an hour,
plus up to a second of jitter."""

MAX_TRIES = 10
"""Tries of one event by one listener before the delivery is parked."""

SETTLE_WITHIN = 0.1
"""Seconds of deliveries recorded in one write (a tenth of ``claim_timeout`` when that is
less): a relay that is killed delivers again at most these."""

MAX_ERROR = 1000
"""Characters of a listener's error kept with its failed delivery."""


def error_text(exc: BaseException) -> str:
    """``"Type: message"``, cut to :data:`MAX_ERROR` characters."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_ERROR else text[: MAX_ERROR - 1] + "…"


class AsyncEventRelay:
    """Delivers the lifecycle events of an :class:`~deepwork_retry.ports.AsyncEventLog`
    storage to the listeners of ``hooks``.

    Every relay of a deployment must register the same listeners: an event is
    delivered once for all of them, by whichever relay claims it. Several
    relays may run at once; claims keep them from delivering one event (or
    one failed delivery) twice at the same time.
    """

    def __init__(
        self,
        storage: AsyncEventLog,
        hooks: Hooks,
        *,
        clock: Clock | None = None,
        rng: RandomSource | None = None,
        batch: int = 100,
        claim_timeout: float = 30.0,
        poll_interval: float = 1.0,
        max_tries: int = MAX_TRIES,
        backoff: ExponentialBackoff = LISTENER_BACKOFF,
        settle_within: float | None = None,
    ) -> None:
        owner = type(self).__name__
        if not callable(getattr(storage, "claim_events", None)):
            raise ConfigurationError(
                f"{owner} needs a storage that keeps lifecycle events; "
                f"{type(storage).__name__} does not keep them (it is not an AsyncEventLog)"
            )
        check_kind(owner, "storage", storage, "claim_events", asynchronous=ASYNCHRONOUS)
        check_listeners(owner, hooks)
        if not 1 <= batch <= 1000:
            raise InvalidInput("batch must be from 1 to 1000")
        if max_tries < 1:
            raise InvalidInput("max_tries must be at least 1")
        if not claim_timeout > 0 or not poll_interval > 0:
            raise InvalidInput("claim_timeout and poll_interval must be positive")
        if settle_within is None:
            settle_within = min(SETTLE_WITHIN, claim_timeout / 10)
        if not (math.isfinite(settle_within) and 0 <= settle_within < claim_timeout):
            raise InvalidInput("settle_within must be from 0 to less than claim_timeout seconds")
        self.storage = storage
        self.hooks = hooks
        self.clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self.batch = batch
        self.claim_timeout = claim_timeout
        self.poll_interval = poll_interval
        self.max_tries = max_tries
        self.backoff = backoff
        self.settle_within = settle_within

    def _limit(self, listener: Listener) -> int:
        return listener.max_tries if listener.max_tries is not None else self.max_tries

    def _due(self, tries: int) -> datetime:
        """When the next try is due after ``tries`` failed ones."""
        return self.clock.now() + timedelta(seconds=self.backoff.delay(tries, self.rng))

    async def _call(self, listener: Listener, event: ev.Event) -> str | None:
        """Call ``listener``; the error text when it raised, else ``None``."""
        try:
            await call_listener(listener, event)
        except Exception as exc:  # noqa: BLE001 - a listener's failure is kept and retried
            error = error_text(exc)
            emit(
                log, logging.WARNING, "deepwork.listener_failed",
                "listener %s failed on event %s (%s): %s",
                listener.name, event.id, event.type.value, error,
                project_id=event.project_id, task_id=event.task_id, attempt=event.attempt,
            )  # fmt: skip
            return error
        return None

    async def deliver_events(self) -> int:
        """Claim one batch of pending events, call their listeners and record them
        delivered in groups; returns how many events were claimed.

        A group is recorded (one write) once its first delivery is
        ``settle_within`` seconds old, by the wall clock or by the relay's
        clock, and at the end of the batch, so a relay that dies delivers again
        at most the events of one group. Events not begun before the claim runs
        out are left to it (so a slow listener never has two relays deliver one
        event at the same time): another relay, or this one on its next pass,
        takes them.
        """
        now = self.clock.now()
        until = now + timedelta(seconds=self.claim_timeout)
        claimed = await self.storage.claim_events(now=now, limit=self.batch, claimed_until=until)
        done: list[ev.Event] = []
        failures: list[ev.EventRetry] = []
        began, began_at = 0.0, now
        within = timedelta(seconds=self.settle_within)
        try:
            for event in claimed:
                if self.clock.now() >= until:
                    break
                if not done:
                    began, began_at = time.monotonic(), self.clock.now()
                failures.extend(await self._listen(event))
                done.append(event)
                if (
                    time.monotonic() - began >= self.settle_within
                    or self.clock.now() - began_at >= within
                ):
                    await self._settle(done, failures)
                    done, failures = [], []
        finally:
            if done:  # also when a listener's BaseException ends the pass
                await self._settle(done, failures)
        return len(claimed)

    async def _listen(self, event: ev.Event) -> list[ev.EventRetry]:
        """Call ``event``'s listeners; the failed deliveries to keep."""
        failures: list[ev.EventRetry] = []
        for listener in self.hooks.matching(event):
            error = await self._call(listener, event)
            if error is None:
                continue
            failures.append(
                ev.EventRetry(
                    event=event,
                    subscriber=listener.name,
                    tries=1,
                    retry_at=self._due(1),
                    last_error=error,
                    parked=self._limit(listener) <= 1,
                )
            )
        return failures

    async def _settle(self, claimed: Sequence[ev.Event], failures: list[ev.EventRetry]) -> None:
        try:
            await self.storage.settle_events(claimed, now=self.clock.now(), failures=failures)
        except StorageError:
            # The claim lapses and the batch is delivered again: at least once.
            emit(
                log, logging.WARNING, "deepwork.events_unsettled",
                "could not record the delivery of %d event(s); they will be delivered again",
                len(claimed), exc_info=True,
            )  # fmt: skip

    async def retry_failed(self) -> int:
        """Claim failed deliveries that are due and try each again; returns how many
        were claimed.

        One whose listener this relay does not have is left for its claim to
        lapse (another relay, or this one once the listener is back, takes it).
        """
        now = self.clock.now()
        retries = await self.storage.claim_event_retries(
            now=now, limit=self.batch, claimed_until=now + timedelta(seconds=self.claim_timeout)
        )
        until = now + timedelta(seconds=self.claim_timeout)
        for retry in retries:
            if self.clock.now() >= until:
                break  # the rest's claims lapse: taken again, never twice at once
            listener = self.hooks.get(retry.subscriber)
            if listener is None:
                log.warning(
                    "event relay: no listener named %r here; failed delivery of %s left",
                    retry.subscriber, retry.event.id,
                )  # fmt: skip
                continue
            error = await self._call(listener, retry.event)
            tries = retry.tries + 1
            retry_at = None
            if error is not None and tries < self._limit(listener):
                retry_at = self._due(tries)
            elif error is not None:
                emit(
                    log, logging.ERROR, "deepwork.listener_parked",
                    "listener %s failed %d times on event %s; parked (replay it by hand)",
                    listener.name, tries, retry.event.id,
                    project_id=retry.event.project_id, task_id=retry.event.task_id,
                    attempt=retry.event.attempt,
                )  # fmt: skip
            try:
                await self.storage.settle_event_retry(
                    retry, now=self.clock.now(), error=error, retry_at=retry_at
                )
            except StorageError:
                emit(
                    log, logging.WARNING, "deepwork.events_unsettled",
                    "could not record the retried delivery of %s to %s",
                    retry.event.id, listener.name, exc_info=True,
                )  # fmt: skip
        return len(retries)

    async def run_once(self) -> int:
        """One pass: a batch of new events, then a batch of due retries; how many were claimed."""
        return await self.deliver_events() + await self.retry_failed()

    async def run(self, stop: Event) -> None:
        """Deliver until ``stop`` is set, polling every ``poll_interval`` when idle."""
        while not stop.is_set():
            try:
                busy = await self.run_once() > 0
            except StorageError:
                log.warning("event relay: storage unavailable", exc_info=True)
                busy = False
            if not busy and await wait_or_stop(stop, self.poll_interval):
                return
