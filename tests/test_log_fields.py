"""Log records about a task carry its ids as record attributes, through real logging.

Each main path that logs about a task (a failed dispatch, failed delivery
bookkeeping, a relay's delivery, a lost lease, a failure after a commit, an
attempt whose code raised, a prune) is run on the real services with the
memory storage, with faults injected by subclassing it; ``caplog`` captures
the records the ``logging`` module really made.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from deepwork_retry import (
    AsyncExecutorService,
    AsyncOutboxRelay,
    AsyncRetryService,
    ExecutorService,
    NoBackoff,
    OutboxRelay,
    Pruner,
    Retention,
    RetryPolicy,
    RetryService,
    TaskError,
)
from deepwork_retry._core.model import DispatchEntry, IdempotencyRecord
from deepwork_retry._log import EVENTS, FIELDS, Ids, emit, fields
from deepwork_retry.auth import StaticTokens
from deepwork_retry.dispatch._worker import run_attempt
from deepwork_retry.dispatch.threads import ThreadPoolDispatcher
from deepwork_retry.exceptions import StorageUnavailable
from deepwork_retry.storage.memory import AsyncMemoryStorage, MemoryStorage
from deepwork_retry.testing import AsyncRecordingDispatcher, FakeClock, RecordingDispatcher
from deepwork_retry.web import ApiRequest, RetryAPI

ROOT = Path(__file__).resolve().parent.parent
POLICY = RetryPolicy(backoff=NoBackoff(), lease=30.0)


class FaultyStorage(MemoryStorage):
    """The memory storage, with the outbox bookkeeping failing on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.broken: set[str] = set()

    def mark_delivered(self, entries: Sequence[DispatchEntry], *, now: datetime) -> None:
        if "mark_delivered" in self.broken:
            raise StorageUnavailable("outbox unreachable")
        super().mark_delivered(entries, now=now)

    def mark_failed(self, entry: DispatchEntry, *, error: str, retry_at: datetime) -> None:
        if "mark_failed" in self.broken:
            raise StorageUnavailable("outbox unreachable")
        super().mark_failed(entry, error=error, retry_at=retry_at)

    def save_idempotency(self, record: IdempotencyRecord) -> IdempotencyRecord:
        if "save_idempotency" in self.broken and record.status_code is not None:
            raise StorageUnavailable("keys unreachable")
        return super().save_idempotency(record)


class StoppingClock(FakeClock):
    """A clock that fails once :attr:`broken` is set, as a failing dependency would."""

    broken = False

    def now(self) -> datetime:
        if self.broken:
            raise RuntimeError("clock unavailable")
        return super().now()


class World:
    def __init__(self) -> None:
        self.storage = FaultyStorage()
        self.clock = StoppingClock()
        self.dispatcher = RecordingDispatcher()
        self.executor = ExecutorService(
            self.storage, self.dispatcher, clock=self.clock, policy=POLICY
        )
        self.retries = RetryService(self.storage, self.dispatcher, clock=self.clock, policy=POLICY)
        self.relay = OutboxRelay(self.storage, self.dispatcher, clock=self.clock)
        self.executor.create_project("proj")

    def block(self, task_id: str) -> None:
        self.executor.add_task("proj", task_id, max_retries=0)
        self.executor.assign("proj", task_id)
        self.executor.start("proj", task_id, 1)
        self.executor.fail("proj", task_id, 1, TaskError(type="E", message="boom"))


def _about(records: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in records.records if getattr(r, "deepwork_event", None) == event]


def _ids(record: logging.LogRecord) -> tuple[Any, Any, Any]:
    return (
        getattr(record, "project_id", None),
        getattr(record, "task_id", None),
        getattr(record, "attempt", None),
    )


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="deepwork_retry")
    return caplog


def test_a_failed_dispatch_is_logged_with_the_entrys_ids(
    records: pytest.LogCaptureFixture,
) -> None:
    """A dispatcher that refuses a retry's delivery: the warning names project, task, attempt."""
    w = World()
    w.block("t1")
    w.dispatcher.failing = True
    assert "pending" == w.retries.retry("proj", "t1").dispatch.status
    [record] = _about(records, "deepwork.dispatch_failed")
    assert ("proj", "t1", 2) == _ids(record)
    assert logging.WARNING == record.levelno
    assert "dispatch of ('proj', 't1', 2) failed, it stays pending" in record.getMessage()
    assert record.funcName == "_hand_over"  # where it was logged, not the helper


def test_failed_bookkeeping_of_a_failed_dispatch_is_logged_with_the_ids(
    records: pytest.LogCaptureFixture,
) -> None:
    """The failed delivery cannot be recorded either: that warning carries the ids too."""
    w = World()
    w.block("t1")
    w.dispatcher.failing = True
    w.storage.broken.add("mark_failed")
    w.retries.retry("proj", "t1")
    [record] = _about(records, "deepwork.dispatch_failure_unrecorded")
    assert ("proj", "t1", 2) == _ids(record)
    assert record.exc_info is not None


def test_failed_delivery_bookkeeping_logs_one_record_per_entry(
    records: pytest.LogCaptureFixture,
) -> None:
    """The relay delivers three entries and cannot record it: one warning for each, each with
    its own ids, the traceback once."""
    w = World()
    for task in ("a", "b", "c"):
        w.block(task)
    w.dispatcher.failing = True
    for task in ("a", "b", "c"):
        w.retries.retry("proj", task)
    w.dispatcher.failing = False
    w.storage.broken.add("mark_delivered")
    records.clear()
    w.clock.advance(120)
    assert 3 == w.relay.run_once()
    found = _about(records, "deepwork.delivery_unrecorded")
    assert [("proj", t, 2) for t in "abc"] == sorted(_ids(r) for r in found)
    assert [True, False, False] == [bool(r.exc_info) for r in found]


def test_a_relay_delivery_is_logged_at_debug_with_the_ids(
    records: pytest.LogCaptureFixture,
) -> None:
    """What the relay delivers is logged at DEBUG with each entry's ids."""
    w = World()
    w.block("t1")
    w.dispatcher.failing = True
    w.retries.retry("proj", "t1")
    w.dispatcher.failing = False
    records.clear()
    w.clock.advance(120)
    assert 1 == w.relay.run_once()
    [record] = _about(records, "deepwork.delivered")
    assert (logging.DEBUG, ("proj", "t1", 2)) == (record.levelno, _ids(record))


def test_the_reaper_logs_a_lost_attempt_with_its_ids(records: pytest.LogCaptureFixture) -> None:
    """An attempt whose lease expired is failed as lost; the warning names the lost attempt."""
    w = World()
    w.executor.add_task("proj", "t1", max_retries=2)
    w.executor.assign("proj", "t1")
    w.executor.start("proj", "t1", 1)
    w.clock.advance(POLICY.lease + 1)
    assert 1 == len(w.executor.reap())
    [record] = _about(records, "deepwork.attempt_lost")
    assert (logging.WARNING, ("proj", "t1", 1)) == (record.levelno, _ids(record))
    assert "attempt proj/t1 #1 lost" in record.getMessage()


def test_a_failure_after_the_commit_is_logged_with_the_entrys_ids(
    records: pytest.LogCaptureFixture,
) -> None:
    """Delivery breaks down after the retry committed: the error names the entry, and the
    retry still answers, its entry left to the relay."""
    w = World()
    w.block("t1")
    w.dispatcher.failing = True

    def refuse(entry: DispatchEntry) -> None:
        w.clock.broken = True  # what the failure path needs next fails too
        raise RuntimeError("broker down")

    w.dispatcher.dispatch = refuse  # type: ignore[method-assign]
    result = w.retries.retry("proj", "t1")
    w.clock.broken = False
    assert "pending" == result.dispatch.status
    [record] = _about(records, "deepwork.post_commit_failed")
    assert (logging.ERROR, ("proj", "t1", 2)) == (record.levelno, _ids(record))


def test_an_attempt_whose_code_raises_is_logged_with_its_ids(
    records: pytest.LogCaptureFixture,
) -> None:
    """The worker runs an attempt whose code raises: the record names the attempt."""
    w = World()
    w.executor.add_task("proj", "t1", max_retries=1)
    w.executor.assign("proj", "t1")

    def work(task: object, attempt: int) -> None:
        raise ValueError("bad input")

    run_attempt(w.executor, work, "proj", "t1", 1)
    [record] = _about(records, "deepwork.attempt_failed")
    assert ("proj", "t1", 1) == _ids(record)
    assert record.name == "deepwork_retry.worker"


def test_a_malformed_delivery_keeps_only_well_typed_ids(
    records: pytest.LogCaptureFixture,
) -> None:
    """A message with a wrong attempt type: project and task are fields, the attempt is not."""
    w = World()
    run_attempt(w.executor, lambda task, attempt: None, "proj", "t1", "1")
    [record] = _about(records, "deepwork.attempt_malformed")
    assert ("proj", "t1", None) == _ids(record)


def test_work_that_raises_in_a_thread_pool_is_logged_with_its_ids(
    records: pytest.LogCaptureFixture,
) -> None:
    """The thread pool dispatcher reports work that raised, with the entry's ids."""
    entry = DispatchEntry(
        project_id="proj", task_id="t9", attempt=3, state="pending",
        available_at=FakeClock().now(), created_at=FakeClock().now(),
    )  # fmt: skip

    def work(entry: DispatchEntry) -> None:
        raise RuntimeError("work failed")

    with ThreadPoolDispatcher(work, max_workers=1) as pool:
        pool.dispatch(entry)
    [record] = _about(records, "deepwork.dispatched_work_raised")
    assert ("proj", "t9", 3) == _ids(record)


def test_a_prune_is_logged_with_its_event_and_no_task(records: pytest.LogCaptureFixture) -> None:
    """A prune is about no task: its record has the event name and none of the ids."""
    w = World()
    w.block("t1")
    w.retries.retry("proj", "t1")
    pruner = Pruner(w.storage, Retention(delivered_outbox=timedelta(0)), clock=w.clock, every=60)
    w.clock.advance(1)
    pruner.when_due()
    [record] = _about(records, "deepwork.pruned")
    assert (logging.INFO, (None, None, None)) == (record.levelno, _ids(record))


def test_no_field_is_built_for_a_disabled_level(caplog: pytest.LogCaptureFixture) -> None:
    """Below the logger's level, :func:`emit` reads nothing of what the record is about."""

    class Untouchable:
        @property
        def project_id(self) -> str:
            raise AssertionError("fields built for a disabled level")

        task_id = project_id
        attempt = project_id  # type: ignore[assignment]

    log = logging.getLogger("deepwork_retry.test_disabled")
    caplog.set_level(logging.INFO, logger=log.name)
    emit(log, logging.DEBUG, "deepwork.delivered", "delivered %s", 1, about=Untouchable())
    assert [] == [r for r in caplog.records if r.name == log.name]
    with pytest.raises(AssertionError, match="disabled level"):
        emit(log, logging.INFO, "deepwork.delivered", "delivered %s", 1, about=Untouchable())


def test_a_successful_retry_builds_no_fields_when_debug_is_off(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hot path (a retry delivered at once) makes no record and builds no mapping."""
    built: list[str] = []

    def counting(event: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        built.append(event)
        return fields(event, *args, **kwargs)

    monkeypatch.setattr("deepwork_retry._log.fields", counting)
    caplog.set_level(logging.INFO, logger="deepwork_retry")
    w = World()
    w.block("t1")
    assert "dispatched" == w.retries.retry("proj", "t1").dispatch.status
    assert ([], []) == (built, [r for r in caplog.records if r.name.startswith("deepwork")])


def test_the_field_names_are_free_on_a_log_record() -> None:
    """No field shadows a LogRecord attribute, and logging accepts them all as ``extra``."""
    taken = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
    assert set() == taken & set(FIELDS)
    every = fields("deepwork.delivered", Ids("p", "t", 1))
    assert set(FIELDS) == set(every)
    record = logging.getLogger("x").makeRecord(
        "x", logging.INFO, "f", 1, "m", (), None, extra=every
    )
    assert ("p", "t", 1, "deepwork.delivered") == tuple(getattr(record, n) for n in FIELDS)


def test_every_event_used_is_listed_and_documented() -> None:
    """The events named in the package are exactly :data:`EVENTS`, each in docs/logging.md."""
    used: set[str] = set()
    for path in (ROOT / "deepwork_retry").rglob("*.py"):
        # telemetry.py names span attributes and metrics (deepwork.task_id …), not events.
        if path.name not in ("_log.py", "telemetry.py"):
            used |= set(re.findall(r'"(deepwork\.[a-z_]+)"', path.read_text(encoding="utf-8")))
    assert EVENTS == used
    page = (ROOT / "docs" / "logging.md").read_text(encoding="utf-8")
    assert set() == {event for event in EVENTS if f"`{event}`" not in page}


def test_the_pages_formatters_show_the_fields(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/logging.md's format string and JSON formatter, run as written, show a failed
    dispatch's fields, and the format string copes with a record that has none."""
    page = (ROOT / "docs" / "logging.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    assert 2 == len(blocks)
    log = logging.getLogger("deepwork_retry")
    before = list(log.handlers)
    try:
        for block in blocks:
            exec(compile(block, "docs/logging.md", "exec"), {})  # the page's own code
        w = World()
        w.block("t7")
        w.dispatcher.failing = True
        w.retries.retry("proj", "t7")
        emit(log, logging.WARNING, "deepwork.pruned", "no task here")
    finally:
        for handler in set(log.handlers) - set(before):
            log.removeHandler(handler)
    lines = capsys.readouterr().err.splitlines()
    assert any("[proj/t7 #2] dispatch of ('proj', 't7', 2) failed" in line for line in lines)
    assert any("[-/- #-] no task here" in line for line in lines)
    parsed = [json.loads(line) for line in lines if line.startswith("{")]
    [failed] = [p for p in parsed if p.get("deepwork_event") == "deepwork.dispatch_failed"]
    assert ("proj", "t7", 2) == (failed["project_id"], failed["task_id"], failed["attempt"])


def test_the_async_services_log_the_same_fields(records: pytest.LogCaptureFixture) -> None:
    """The async twins (the source the sync services are generated from) log a failed
    dispatch, a relay's delivery and a lost attempt with the same fields."""
    sync = FaultyStorage()
    storage = AsyncMemoryStorage(sync)
    clock = FakeClock()
    dispatcher = AsyncRecordingDispatcher()
    executor = AsyncExecutorService(storage, dispatcher, clock=clock, policy=POLICY)
    retries = AsyncRetryService(storage, dispatcher, clock=clock, policy=POLICY)
    relay = AsyncOutboxRelay(storage, dispatcher, clock=clock)

    async def main() -> None:
        await executor.create_project("proj")
        await executor.add_task("proj", "t1", max_retries=0)
        await executor.assign("proj", "t1")
        await executor.start("proj", "t1", 1)
        await executor.fail("proj", "t1", 1, TaskError(type="E", message="boom"))
        dispatcher.failing = True
        await retries.retry("proj", "t1")
        dispatcher.failing = False
        clock.advance(120)
        assert 1 == await relay.run_once()
        await executor.start("proj", "t1", 2)
        clock.advance(POLICY.lease + 1)
        assert 1 == len(await executor.reap())

    asyncio.run(main())
    found = {
        event: [_ids(r) for r in _about(records, event)]
        for event in ("deepwork.dispatch_failed", "deepwork.delivered", "deepwork.attempt_lost")
    }
    assert {
        "deepwork.dispatch_failed": [("proj", "t1", 2)],
        "deepwork.delivered": [("proj", "t1", 1), ("proj", "t1", 2)],
        "deepwork.attempt_lost": [("proj", "t1", 2)],
    } == found


def test_the_web_api_logs_an_unrecorded_response_with_the_tasks_ids(
    records: pytest.LogCaptureFixture,
) -> None:
    """A retry whose response cannot be saved under its Idempotency-Key: the warning names
    the project and the task, and the retry is answered."""
    w = World()
    w.block("t1")
    w.storage.broken.add("save_idempotency")
    tokens = StaticTokens()
    tokens.add("s3cret-token", "alice")
    api = RetryAPI(w.retries, tokens)
    response = api.handle(
        ApiRequest(
            method="POST",
            path="/projects/proj/tasks/t1/retry",
            headers={"Authorization": "Bearer s3cret-token", "Idempotency-Key": "k1"},
        )
    )
    assert 200 == response.status
    [record] = _about(records, "deepwork.response_unrecorded")
    assert ("proj", "t1", None) == _ids(record)
    assert record.name == "deepwork_retry.web"
