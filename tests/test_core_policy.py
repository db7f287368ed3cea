"""Retry rules: backoff shapes, Retry-After, non-retryable errors, timeouts, manual budgets."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepwork_retry import (
    Block,
    BlockedReason,
    ExponentialBackoff,
    FixedBackoff,
    NoBackoff,
    Project,
    RetryAt,
    RetryBudget,
    RetryPolicy,
    RetryService,
    Task,
    TaskError,
    TaskStatus,
)
from deepwork_retry._core import decide
from deepwork_retry._core.policy import MAX_DELAY
from deepwork_retry.exceptions import InvalidInput
from deepwork_retry.storage.memory import MemoryStorage
from deepwork_retry.testing import strategies

NOW = datetime(2024, 5, 1, 9, 30, tzinfo=timezone.utc)
PROJECT = Project(id="p")


class FixedRandom:
    """A random source that always returns ``value``."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


ZERO = FixedRandom(0.0)
HALF = FixedRandom(0.5)


def _task(**fields: object) -> Task:
    return Task(id="t", project_id="p", **fields)  # type: ignore[arg-type]


def _running(**fields: object) -> Task:
    return _task(status=TaskStatus.IN_PROGRESS, attempt=1, **fields)


# -- backoff ------------------------------------------------------------------------


def test_exponential_doubles_without_jitter() -> None:
    """Exponential backoff waits wait_initial * base ** (n - 1) when the jitter draw is 0."""
    backoff = ExponentialBackoff(wait_initial=1.5, wait_exp_base=2, wait_max=1000, wait_jitter=3)
    assert [1.5, 3.0, 6.0, 12.0] == [backoff.delay(n, ZERO) for n in range(1, 5)]


def test_exponential_adds_scaled_jitter() -> None:
    """The jitter adds rng.random() * wait_jitter seconds."""
    backoff = ExponentialBackoff(wait_initial=1, wait_exp_base=2, wait_max=1000, wait_jitter=4)
    assert [3.0, 4.0, 6.0] == [backoff.delay(n, HALF) for n in range(1, 4)]


def test_exponential_capped() -> None:
    """No exponential delay exceeds wait_max, even for huge retry numbers."""
    backoff = ExponentialBackoff(wait_initial=1, wait_exp_base=10, wait_max=30, wait_jitter=5)
    assert [1.0, 10.0, 30.0, 30.0] == [backoff.delay(n, ZERO) for n in (1, 2, 3, 10_000)]
    assert 30.0 == backoff.delay(10**6, FixedRandom(0.99))


@settings(max_examples=200, deadline=None)
@given(
    backoff=strategies.backoffs(), n=st.integers(1, 10**6), draw=st.floats(0, 1, exclude_max=True)
)
def test_backoff_delay_bounded(backoff: object, n: int, draw: float) -> None:
    """Every backoff gives a finite delay between 0 and its cap."""
    delay = backoff.delay(n, FixedRandom(draw))  # type: ignore[attr-defined]
    cap = getattr(backoff, "wait_max", getattr(backoff, "wait", 0.0))
    assert math.isfinite(delay)
    assert 0 <= delay <= max(cap, 0.0)


def test_fixed_and_none() -> None:
    """Fixed backoff always waits the same; none never waits."""
    assert [7.0, 7.0] == [FixedBackoff(wait=7).delay(n, HALF) for n in (1, 9)]
    assert [0.0, 0.0] == [NoBackoff().delay(n, HALF) for n in (1, 9)]


@pytest.mark.parametrize(
    "make",
    [
        lambda: ExponentialBackoff(wait_initial=-1),
        lambda: ExponentialBackoff(wait_max=float("nan")),
        lambda: ExponentialBackoff(wait_jitter=-0.1),
        lambda: FixedBackoff(wait=-5),
        lambda: RetryPolicy(lease=-1),
        lambda: RetryPolicy(timeout=-1),
        lambda: TaskError(type="E", retry_after=-1),
        lambda: TaskError(type="E", retry_after=MAX_DELAY + 1),
    ],
)
def test_bad_numbers_rejected(make: object) -> None:
    """Negative, NaN or out-of-range durations raise InvalidInput."""
    with pytest.raises(InvalidInput):
        make()  # type: ignore[operator]


# -- the decision --------------------------------------------------------------------


def test_retry_at_backoff() -> None:
    """With budget left, the decision is RetryAt now + backoff(retry_count + 1)."""
    policy = RetryPolicy(backoff=ExponentialBackoff(wait_initial=2, wait_jitter=0))
    decision = policy.decide(_running(retry_count=2), TaskError(type="E"), now=NOW, rng=ZERO)
    assert RetryAt(at=NOW + timedelta(seconds=8), delay=8.0) == decision


def test_retry_after_wins_when_longer() -> None:
    """An error's retry_after is waited when longer than the backoff, and ignored when asked."""
    policy = RetryPolicy(backoff=FixedBackoff(wait=5))
    slow = TaskError(type="RateLimited", retry_after=90)
    fast = TaskError(type="RateLimited", retry_after=1)
    assert 90.0 == policy.decide(_running(), slow, now=NOW, rng=ZERO).delay  # type: ignore[union-attr]
    assert 5.0 == policy.decide(_running(), fast, now=NOW, rng=ZERO).delay  # type: ignore[union-attr]
    deaf = attrs.evolve(policy, respect_retry_after=False)
    assert 5.0 == deaf.decide(_running(), slow, now=NOW, rng=ZERO).delay  # type: ignore[union-attr]


def test_non_retryable_blocks() -> None:
    """A listed error type, or an error marked not retryable, blocks at once despite budget."""
    policy = RetryPolicy(non_retryable=["PermissionError"])
    expected = Block(reason=BlockedReason.NON_RETRYABLE)
    assert expected == policy.decide(
        _running(), TaskError(type="PermissionError"), now=NOW, rng=ZERO
    )
    marked = TaskError(type="Other", retryable=False)
    assert expected == policy.decide(_running(), marked, now=NOW, rng=ZERO)
    forced = TaskError(type="PermissionError", retryable=True)
    assert isinstance(policy.decide(_running(), forced, now=NOW, rng=ZERO), RetryAt)


def test_classifier_decides_after_lists() -> None:
    """The classifier decides errors that neither retryable nor non_retryable settle."""
    policy = RetryPolicy(classifier=lambda e: "transient" in e.message)
    assert policy.is_retryable(TaskError(type="E", message="transient glitch")) is True
    assert policy.is_retryable(TaskError(type="E", message="bad input")) is False
    assert policy.is_retryable(TaskError(type="E", message="bad input", retryable=True)) is True


def test_budget_exhausted_blocks() -> None:
    """With no automatic retries left the decision is Block(budget_exhausted)."""
    decision = RetryPolicy().decide(
        _running(retries_left=0), TaskError(type="E"), now=NOW, rng=ZERO
    )
    assert Block(reason=BlockedReason.BUDGET_EXHAUSTED) == decision


def test_timeout_blocks() -> None:
    """A retry that would start past the timeout since the first dispatch blocks with timeout."""
    policy = RetryPolicy(backoff=FixedBackoff(wait=10), timeout=60)
    first = NOW - timedelta(seconds=45)
    assert isinstance(
        policy.decide(
            _running(), TaskError(type="E"), now=NOW, rng=ZERO, first_dispatched_at=first
        ),
        RetryAt,
    )
    late = NOW - timedelta(seconds=51)
    decision = policy.decide(
        _running(), TaskError(type="E"), now=NOW, rng=ZERO, first_dispatched_at=late
    )
    assert Block(reason=BlockedReason.TIMEOUT) == decision


def test_delay_capped_at_max() -> None:
    """No decision waits longer than MAX_DELAY."""
    policy = RetryPolicy(backoff=FixedBackoff(wait=MAX_DELAY * 2))
    decision = policy.decide(_running(), TaskError(type="E"), now=NOW, rng=ZERO)
    assert MAX_DELAY == decision.delay  # type: ignore[union-attr]


def test_fail_records_decision_on_task() -> None:
    """decide.fail retries (retry_count + 1, one retry fewer) or blocks with the reason."""
    policy = RetryPolicy(backoff=NoBackoff())
    task = _running(max_retries=1, retries_left=1)
    retried = decide.fail(
        task, 1, TaskError(type="E", message="x"), PROJECT, now=NOW, rng=ZERO, policy=policy
    )
    assert (TaskStatus.ASSIGNED, 1, 0, 2, "x") == (
        retried.after.status,
        retried.after.retry_count,
        retried.after.retries_left,
        retried.after.attempt,
        retried.after.error_message,
    )
    running = attrs.evolve(retried.after, status=TaskStatus.IN_PROGRESS)
    blocked = decide.fail(
        running, 2, TaskError(type="E", message="y"), PROJECT, now=NOW, rng=ZERO, policy=policy
    )
    assert (TaskStatus.BLOCKED, BlockedReason.BUDGET_EXHAUSTED, 1, "y") == (
        blocked.after.status,
        blocked.after.blocked_reason,
        blocked.after.retry_count,
        blocked.after.error_message,
    )


# -- manual retry budgets ----------------------------------------------------------------


def _blocked() -> Task:
    return _task(
        status=TaskStatus.BLOCKED,
        attempt=2,
        retry_count=1,
        max_retries=1,
        retries_left=0,
        error_message="boom",
        blocked_reason=BlockedReason.BUDGET_EXHAUSTED,
    )


@pytest.mark.parametrize(
    ("budget", "retries_left", "after_failure"),
    [(RetryBudget.ONE_MORE, 0, TaskStatus.BLOCKED), (RetryBudget.FULL, 1, TaskStatus.ASSIGNED)],
)
def test_manual_budget(budget: RetryBudget, retries_left: int, after_failure: TaskStatus) -> None:
    """one_more gives exactly one execution; full restores max_retries automatic retries."""
    plan = decide.manual_retry(_blocked(), PROJECT, now=NOW, blockers={}, budget=budget)
    after = plan.after
    assert (TaskStatus.ASSIGNED, 2, 1, retries_left, None) == (
        after.status,
        after.retry_count,
        after.max_retries,
        after.retries_left,
        after.error_message,
    )
    assert plan.new_attempt is not None
    assert budget == plan.new_attempt.budget
    running = attrs.evolve(after, status=TaskStatus.IN_PROGRESS)
    failed = decide.fail(
        running, 3, TaskError(type="E"), PROJECT, now=NOW, rng=ZERO, policy=RetryPolicy()
    )
    assert after_failure == failed.after.status


def test_bad_budget_rejected() -> None:
    """An unknown budget name raises InvalidInput naming the choices, and changes nothing."""
    storage = MemoryStorage()
    service = RetryService(storage)
    with pytest.raises(InvalidInput, match="one_more"):
        service.retry("p", "t", budget="half")
