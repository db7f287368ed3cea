"""The pure core decisions driven by Hypothesis against a model, with no storage at all."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from deepwork_retry import (
    DispatchState,
    Progress,
    Project,
    RetryBudget,
    RetryPolicy,
    Task,
    TaskError,
    TaskEvent,
    TaskStatus,
)
from deepwork_retry._core import decide
from deepwork_retry._core.model import Attempt, DispatchEntry
from deepwork_retry._core.plans import Plan
from deepwork_retry._core.states import TERMINAL
from deepwork_retry.exceptions import InvalidTransition, StaleAttempt
from deepwork_retry.testing import strategies

OPEN = frozenset({TaskStatus.ASSIGNED, TaskStatus.IN_PROGRESS, TaskStatus.REVIEW})
START = datetime(2024, 1, 1, tzinfo=timezone.utc)


class CoreMachine(RuleBasedStateMachine):
    """Applies each plan to plain dictionaries, checking what the plan claims as it goes."""

    def __init__(self) -> None:
        super().__init__()
        self.now = START
        self.project = Project(id="p")
        self.tasks: dict[str, Task] = {}
        self.history: dict[str, list[Attempt]] = {}
        self.outbox: dict[tuple[str, int], DispatchEntry] = {}
        self.progress = Progress(project_id="p")
        self.prev: dict[str, Task] = {}
        self.policy = RetryPolicy()
        self.rng = random.Random(0)

    @initialize(
        policy=strategies.retry_policies(),
        seed=st.integers(0, 2**32),
        budgets=st.lists(st.integers(0, 3), min_size=1, max_size=6),
        data=st.data(),
    )
    def setup(
        self, policy: RetryPolicy, seed: int, budgets: list[int], data: st.DataObject
    ) -> None:
        self.policy = policy
        self.rng = random.Random(seed)
        for i, max_retries in enumerate(budgets):
            earlier = [f"t{j}" for j in range(i)]
            deps = (
                data.draw(st.lists(st.sampled_from(earlier), unique=True, max_size=2))
                if earlier
                else []
            )
            task = Task(id=f"t{i}", project_id="p", max_retries=max_retries, blocked_by=deps)
            self.tasks[task.id] = task
            self.history[task.id] = []
            self.progress = self.progress.shifted(None, task.status)

    # -- applying a plan, the way storage would ----------------------------------------------
    def apply(self, plan: Plan) -> None:
        before, after = plan.before, plan.after
        assert self.tasks[before.id] == before, "plan built on a stale read"
        assert before.status not in TERMINAL, "a terminal task moved"
        assert after.status in decide.machine.TRANSITIONS[(before.status, plan.event)]
        if before.status is TaskStatus.BLOCKED and after.status is TaskStatus.ASSIGNED:
            assert TaskEvent.MANUAL_RETRY == plan.event
        for guard in plan.guards:
            assert guard.version == self.tasks[guard.task_id].version
        self.tasks[after.id] = after
        self.progress = self.progress.shifted(before.status, after.status)
        history = self.history[after.id]
        update = plan.attempt_update
        if update is not None:
            old = history[update.number - 1]
            assert old.outcome is None or update.outcome is None, "an attempt closed twice"
            history[update.number - 1] = attrs.evolve(
                old,
                started_at=update.started_at or old.started_at,
                outcome=update.outcome or old.outcome,
            )
        if plan.new_attempt is not None:
            assert len(history) + 1 == plan.new_attempt.number
            history.append(plan.new_attempt)
        if plan.dispatch is not None:
            assert plan.dispatch.key[1:] not in self.outbox, "a second dispatch for one attempt"
            self.outbox[(after.id, plan.dispatch.attempt)] = plan.dispatch
        for release in plan.releases:
            entry = self.outbox[(release.task_id, release.attempt)]
            assert DispatchState.DEFERRED == entry.state
            self.outbox[(release.task_id, release.attempt)] = attrs.evolve(
                entry, state=DispatchState.PENDING
            )

    # -- helpers -------------------------------------------------------------------------------
    def ids(self, *statuses: TaskStatus) -> list[str]:
        return sorted(t.id for t in self.tasks.values() if t.status in statuses)

    def pick(self, data: st.DataObject, ids: list[str]) -> Task:
        return self.tasks[data.draw(st.sampled_from(ids), label="task")]

    def blockers(self, task: Task) -> dict[str, Task]:
        return {dep: self.tasks[dep] for dep in task.blocked_by}

    def dependants(self, task: Task) -> tuple[list[Task], dict[str, Task]]:
        deps = [t for t in self.tasks.values() if task.id in t.blocked_by]
        others = {b: self.tasks[b] for d in deps for b in d.blocked_by if b != task.id}
        return deps, others

    # -- rules -----------------------------------------------------------------------------------
    @precondition(lambda self: self.ids(TaskStatus.INBOX))
    @rule(data=st.data())
    def assign(self, data: st.DataObject) -> None:
        task = self.pick(data, self.ids(TaskStatus.INBOX))
        self.apply(decide.assign(task, self.project, now=self.now, blockers=self.blockers(task)))

    @precondition(lambda self: self.ids(TaskStatus.ASSIGNED))
    @rule(data=st.data())
    def start(self, data: st.DataObject) -> None:
        task = self.pick(data, self.ids(TaskStatus.ASSIGNED))
        self.apply(decide.start(task, task.attempt, now=self.now, policy=self.policy))

    @precondition(lambda self: self.ids(TaskStatus.IN_PROGRESS))
    @rule(data=st.data())
    def heartbeat(self, data: st.DataObject) -> None:
        task = self.pick(data, self.ids(TaskStatus.IN_PROGRESS))
        self.apply(decide.heartbeat(task, task.attempt, now=self.now, policy=self.policy))

    @precondition(lambda self: self.ids(TaskStatus.IN_PROGRESS))
    @rule(data=st.data(), review=st.booleans())
    def succeed(self, data: st.DataObject, review: bool) -> None:
        task = self.pick(data, self.ids(TaskStatus.IN_PROGRESS))
        deps, others = self.dependants(task)
        plan = decide.succeed(
            task, task.attempt, self.project, now=self.now, dependants=deps, blockers=others,
            review=review,
        )  # fmt: skip
        self.apply(plan)

    @precondition(lambda self: self.ids(TaskStatus.REVIEW))
    @rule(data=st.data())
    def approve(self, data: st.DataObject) -> None:
        task = self.pick(data, self.ids(TaskStatus.REVIEW))
        deps, others = self.dependants(task)
        self.apply(
            decide.approve(task, self.project, now=self.now, dependants=deps, blockers=others)
        )

    @precondition(lambda self: self.ids(TaskStatus.IN_PROGRESS, TaskStatus.REVIEW))
    @rule(data=st.data(), error=strategies.task_errors())
    def fail(self, data: st.DataObject, error: TaskError) -> None:
        task = self.pick(data, self.ids(TaskStatus.IN_PROGRESS, TaskStatus.REVIEW))
        plan = decide.fail(
            task, task.attempt, error, self.project, now=self.now, rng=self.rng,
            policy=self.policy, blockers=self.blockers(task),
        )  # fmt: skip
        self.apply(plan)

    @precondition(lambda self: self.ids(TaskStatus.IN_PROGRESS))
    @rule(data=st.data())
    def lose(self, data: st.DataObject) -> None:
        task = self.pick(data, self.ids(TaskStatus.IN_PROGRESS))
        assert task.lease_expires_at is not None
        self.now = max(self.now, task.lease_expires_at)
        plan = decide.lose(
            task, self.project, now=self.now, rng=self.rng, policy=self.policy,
            blockers=self.blockers(task),
        )  # fmt: skip
        self.apply(plan)

    @precondition(lambda self: self.ids(TaskStatus.BLOCKED))
    @rule(data=st.data(), budget=st.sampled_from(RetryBudget))
    def manual_retry(self, data: st.DataObject, budget: RetryBudget) -> None:
        task = self.pick(data, self.ids(TaskStatus.BLOCKED))
        plan = decide.manual_retry(
            task, self.project, now=self.now, blockers=self.blockers(task), budget=budget
        )
        self.apply(plan)
        assert (task.retry_count + 1, None) == (plan.after.retry_count, plan.after.error_message)

    @precondition(lambda self: self.ids(TaskStatus.INBOX, TaskStatus.ASSIGNED, TaskStatus.BLOCKED))
    @rule(data=st.data())
    def skip(self, data: st.DataObject) -> None:
        task = self.pick(data, self.ids(TaskStatus.INBOX, TaskStatus.ASSIGNED, TaskStatus.BLOCKED))
        deps, others = self.dependants(task)
        self.apply(decide.skip(task, self.project, now=self.now, dependants=deps, blockers=others))

    @precondition(
        lambda self: self.ids(TaskStatus.INBOX, TaskStatus.ASSIGNED, TaskStatus.IN_PROGRESS)
    )
    @rule(data=st.data())
    def block(self, data: st.DataObject) -> None:
        ids = self.ids(TaskStatus.INBOX, TaskStatus.ASSIGNED, TaskStatus.IN_PROGRESS)
        self.apply(decide.block(self.pick(data, ids), now=self.now, message="held"))

    @rule(data=st.data(), offset=st.sampled_from([-1, 1, 3]), event=st.sampled_from(range(4)))
    def stale_report(self, data: st.DataObject, offset: int, event: int) -> None:
        task = self.pick(data, sorted(self.tasks))
        token = task.attempt + offset
        calls = [
            lambda: decide.start(task, token, now=self.now, policy=self.policy),
            lambda: decide.heartbeat(task, token, now=self.now, policy=self.policy),
            lambda: decide.succeed(task, token, self.project, now=self.now),
            lambda: decide.fail(
                task, token, TaskError(type="E"), self.project, now=self.now, rng=self.rng,
                policy=self.policy,
            ),
        ]  # fmt: skip
        with pytest.raises(StaleAttempt) as caught:
            calls[event]()
        found = (caught.value.task_id, caught.value.token, caught.value.current)
        assert (task.id, token, task.attempt) == found

    @precondition(lambda self: self.ids(*TERMINAL))
    @rule(data=st.data(), event=st.sampled_from(range(5)))
    def terminal_refuses(self, data: st.DataObject, event: int) -> None:
        task = self.pick(data, self.ids(*TERMINAL))
        calls = [
            lambda: decide.skip(task, self.project, now=self.now),
            lambda: decide.block(task, now=self.now, message="x"),
            lambda: decide.manual_retry(task, self.project, now=self.now, blockers={}),
            lambda: decide.assign(task, self.project, now=self.now, blockers={}),
            lambda: decide.start(task, task.attempt, now=self.now, policy=self.policy),
        ]
        # A terminal task that never ran has no current attempt: its report is stale first.
        with pytest.raises((InvalidTransition, StaleAttempt)):
            calls[event]()

    @rule(seconds=st.sampled_from([1.0, 30.0, 600.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    # -- invariants --------------------------------------------------------------------------------
    @invariant()
    def progress_equals_recount(self) -> None:
        assert Progress.recount("p", [t.status for t in self.tasks.values()]) == self.progress

    @invariant()
    def one_current_attempt(self) -> None:
        for task in self.tasks.values():
            history = self.history[task.id]
            assert list(range(1, task.attempt + 1)) == [a.number for a in history]
            open_numbers = [a.number for a in history if a.outcome is None]
            assert ([task.attempt] if task.status in OPEN else []) == open_numbers

    @invariant()
    def one_dispatch_per_attempt(self) -> None:
        for task in self.tasks.values():
            numbers = sorted(n for tid, n in self.outbox if tid == task.id)
            assert list(range(1, task.attempt + 1)) == numbers

    @invariant()
    def history_monotonic(self) -> None:
        for task in self.tasks.values():
            prev = self.prev.get(task.id)
            if prev is not None:
                assert prev.retry_count <= task.retry_count
                assert prev.version <= task.version
                if prev.status in TERMINAL:
                    assert prev == task
        self.prev = dict(self.tasks)


CoreMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestCoreMachine = CoreMachine.TestCase
