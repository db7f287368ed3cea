"""Automatic retry rules: budget, backoff, non-retryable errors, timeouts.

Pure functions of their arguments: the random source is passed in, so the
same inputs always give the same decision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Protocol

import attrs

from deepwork_retry._core.model import Task
from deepwork_retry._core.states import BlockedReason
from deepwork_retry.exceptions import InvalidInput

MAX_DELAY = 366 * 24 * 3600.0
"""No backoff waits longer than a year, whatever the inputs."""


def _str_set(value: Iterable[str]) -> frozenset[str]:
    # A named converter: mypy cannot infer the item type through ``frozenset`` itself.
    return frozenset(value)


class RandomSource(Protocol):
    """What the core needs of :class:`random.Random`."""

    def random(self) -> float: ...


def _non_negative(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value >= 0:  # also rejects NaN
        raise InvalidInput(f"{attribute.name} must be a number >= 0, got {value!r}")


@attrs.frozen(kw_only=True)
class TaskError:
    """A failure reported by an executor."""

    type: str
    """The error's class name (``TimeoutError``) or any stable code."""
    message: str = ""
    retryable: bool | None = None
    """Overrides the policy's classification when not ``None``."""
    retry_after: float | None = attrs.field(default=None)
    """Seconds the failing service asked to wait (for example ``Retry-After``)."""

    @retry_after.validator
    def _check_retry_after(self, _: attrs.Attribute[float | None], value: float | None) -> None:
        if value is not None and not 0 <= value <= MAX_DELAY:
            raise InvalidInput(f"retry_after must be between 0 and {MAX_DELAY:.0f} seconds")

    @classmethod
    def from_exception(cls, exc: BaseException, *, retry_after: float | None = None) -> TaskError:
        return cls(type=type(exc).__name__, message=str(exc), retry_after=retry_after)


@attrs.frozen(kw_only=True)
class ExponentialBackoff:
    """``wait_initial * wait_exp_base ** (n - 1)`` plus up to ``wait_jitter``; at most ``wait_max``.

    ``n`` is the number of the retry (1 for the first).
    """

    wait_initial: float = attrs.field(default=1.0, validator=_non_negative)
    wait_max: float = attrs.field(default=300.0, validator=_non_negative)
    wait_jitter: float = attrs.field(default=1.0, validator=_non_negative)
    wait_exp_base: float = attrs.field(default=2.0, validator=_non_negative)

    def delay(self, retry_number: int, rng: RandomSource) -> float:
        try:
            # In floats: integer settings would otherwise build huge exact integers.
            base = float(self.wait_initial) * float(self.wait_exp_base) ** max(retry_number - 1, 0)
        except OverflowError:
            base = self.wait_max
        return min(self.wait_max, base + rng.random() * self.wait_jitter)


@attrs.frozen(kw_only=True)
class FixedBackoff:
    """The same wait before every retry."""

    wait: float = attrs.field(default=1.0, validator=_non_negative)

    def delay(self, retry_number: int, rng: RandomSource) -> float:
        return self.wait


@attrs.frozen(kw_only=True)
class NoBackoff:
    """Retry at once."""

    def delay(self, retry_number: int, rng: RandomSource) -> float:
        return 0.0


Backoff = ExponentialBackoff | FixedBackoff | NoBackoff


@attrs.frozen(kw_only=True)
class RetryAt:
    """Decision: retry, not before ``at`` (``delay`` seconds from now)."""

    at: datetime
    delay: float


@attrs.frozen(kw_only=True)
class Block:
    """Decision: no automatic retry; block the task for this reason."""

    reason: BlockedReason


RetryDecision = RetryAt | Block


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """How a task's failures are retried automatically.

    The budget itself is the task's ``max_retries``; the policy says how long
    to wait, which errors are worth retrying and how long an attempt's lease is.
    """

    backoff: Backoff = attrs.field(factory=ExponentialBackoff)
    non_retryable: frozenset[str] = attrs.field(default=frozenset(), converter=_str_set)
    """Error types that block at once."""
    classifier: Callable[[TaskError], bool] | None = None
    """Custom ``error -> retryable``; runs after ``error.retryable`` and ``non_retryable``."""
    respect_retry_after: bool = True
    """Wait at least the error's ``retry_after`` when it carries one."""
    timeout: float | None = attrs.field(default=None)
    """Seconds after the first attempt's dispatch past which no automatic retry starts."""
    lease: float = attrs.field(default=300.0, validator=_non_negative)
    """Seconds an attempt stays alive without a heartbeat before it is lost."""
    start_timeout: float | None = attrs.field(default=600.0)
    """Seconds a delivered attempt may wait to be started before its dispatch is
    handed out again (the message may have been lost on its way); ``None`` never
    hands it out again."""

    @timeout.validator
    def _check_timeout(self, attribute: attrs.Attribute[float | None], value: float | None) -> None:
        if value is not None:
            _non_negative(self, attribute, value)  # type: ignore[arg-type]

    @start_timeout.validator
    def _check_start_timeout(
        self, attribute: attrs.Attribute[float | None], value: float | None
    ) -> None:
        if value is not None:
            _non_negative(self, attribute, value)  # type: ignore[arg-type]

    def is_retryable(self, error: TaskError) -> bool:
        if error.retryable is not None:
            return error.retryable
        if error.type in self.non_retryable:
            return False
        if self.classifier is not None:
            return self.classifier(error)
        return True

    def decide(
        self,
        task: Task,
        error: TaskError,
        *,
        now: datetime,
        rng: RandomSource,
        first_dispatched_at: datetime | None = None,
    ) -> RetryDecision:
        """Retry (and when) or block (and why) after ``task``'s attempt failed."""
        if not self.is_retryable(error):
            return Block(reason=BlockedReason.NON_RETRYABLE)
        if task.retries_left <= 0:
            return Block(reason=BlockedReason.BUDGET_EXHAUSTED)
        delay = self.backoff.delay(task.retry_count + 1, rng)
        if self.respect_retry_after and error.retry_after is not None and error.retry_after > delay:
            delay = float(error.retry_after)
        delay = min(delay, MAX_DELAY)
        at = now + timedelta(seconds=delay)
        if (
            self.timeout is not None
            and first_dispatched_at is not None
            and (at - first_dispatched_at).total_seconds() > self.timeout
        ):
            return Block(reason=BlockedReason.TIMEOUT)
        return RetryAt(at=at, delay=delay)
