"""Idempotency keys whose request died after the retry committed, and racing refusals."""

from __future__ import annotations

import json
from pathlib import Path

from deepwork_retry import ExecutorService, RetryService
from deepwork_retry._core.model import IdempotencyRecord
from deepwork_retry.auth import StaticTokens
from deepwork_retry.ports import Storage
from deepwork_retry.storage.memory import MemoryStorage
from deepwork_retry.storage.sqlite import SQLiteStorage
from deepwork_retry.testing import FakeClock, RecordingDispatcher
from deepwork_retry.web import ApiRequest, RetryAPI
from deepwork_retry.web._http import scoped_key

TOKEN = "s3cret-token"


def _world() -> tuple[RetryAPI, MemoryStorage, FakeClock, RecordingDispatcher]:
    storage = MemoryStorage()
    clock = FakeClock()
    dispatcher = RecordingDispatcher()
    executor = ExecutorService(storage, clock=clock)
    executor.create_project("p")
    executor.add_task("p", "t", max_retries=0)
    executor.assign("p", "t")
    executor.start("p", "t", 1)
    executor.fail("p", "t", 1, RuntimeError("boom"))
    tokens = StaticTokens()
    tokens.add(TOKEN, "alice")
    api = RetryAPI(RetryService(storage, dispatcher, clock=clock), tokens, abandoned_after=60.0)
    return api, storage, clock, dispatcher


def _retry(api: RetryAPI, key: str) -> tuple[int, dict[str, object]]:
    response = api.handle(
        ApiRequest(
            method="POST",
            path="/projects/p/tasks/t/retry",
            headers={"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": key},
        )
    )
    return response.status, json.loads(response.body)


def test_reservation_of_a_dead_request_is_answered_from_stored_state() -> None:
    """A key reserved by a retry whose response was never saved gets a 200, once abandoned."""
    api, storage, clock, dispatcher = _world()
    # The request that reserved the key committed its retry, then died before answering.
    RetryService(storage, dispatcher, clock=clock).retry(
        "p", "t", actor="alice", idempotency_key=scoped_key("alice", "k-1")
    )
    assert 409 == _retry(api, "k-1")[0]  # still possibly in flight
    clock.advance(61)
    status, body = _retry(api, "k-1")
    task = body["task"]
    assert isinstance(task, dict)
    assert (200, "assigned", 1, "dispatched") == (
        status, task["status"], task["retry_count"], body["dispatch"]["status"]  # type: ignore[index]
    )  # fmt: skip
    assert (status, body) == _retry(api, "k-1")
    assert 1 == len(dispatcher.delivered)


def test_refusal_recorded_late_never_displaces_the_reserving_retry() -> None:
    """A 4xx saved for a key another request reserved keeps the reservation's answer."""
    _, storage, clock, _ = _world()
    key = scoped_key("alice", "k-2")
    result = RetryService(storage, clock=clock).retry("p", "t", idempotency_key=key)
    assert result.idempotency is not None
    clock.advance(0.5)
    late_refusal = IdempotencyRecord(
        key=key, project_id="p", task_id="t", created_at=clock.now(), status_code=400, body="{}"
    )
    assert result.idempotency == storage.save_idempotency(late_refusal)
    done = storage.save_idempotency(
        IdempotencyRecord(
            key=key,
            project_id="p",
            task_id="t",
            created_at=result.idempotency.created_at,
            status_code=200,
            body='{"success": true}',
        )
    )
    assert (200, '{"success": true}') == (done.status_code, done.body)


def _replayed_twice(storage: Storage) -> tuple[int, int, bool, str | None, int | None]:
    executor = ExecutorService(storage)
    executor.create_project("p")
    executor.add_task("p", "t", max_retries=0)
    executor.assign("p", "t")
    executor.start("p", "t", 1)
    executor.fail("p", "t", 1, RuntimeError("boom"))
    tokens = StaticTokens()
    tokens.add(TOKEN, "alice")
    api = RetryAPI(RetryService(storage), tokens)
    request = ApiRequest(
        method="POST",
        path="/projects/p/tasks/t/retry",
        headers={"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": "k"},
    )
    first, second = api.handle(request), api.handle(request)
    record = storage.get_idempotency(scoped_key("alice", "k"))
    return (
        first.status,
        second.status,
        first.body == second.body,
        dict(second.headers).get("Idempotent-Replayed"),
        None if record is None else record.status_code,
    )


def test_one_step_sqlite_retry_completes_its_idempotency_key(tmp_path: Path) -> None:
    """On SQLite's one-step retry path the reserved key is completed and then replayed."""
    storage = SQLiteStorage(tmp_path / "idem.db")
    try:
        assert (200, 200, True, "true", 200) == _replayed_twice(storage)
    finally:
        storage.close()


def test_one_step_postgres_retry_completes_its_idempotency_key(postgres_dsn: str) -> None:
    """On PostgreSQL's one-statement retry the reserved key is completed and then replayed."""
    from pg_support import schema_dropped_after

    from deepwork_retry.storage.postgres import PostgresStorage

    with schema_dropped_after(postgres_dsn, "idem") as schema:
        storage = PostgresStorage(postgres_dsn, schema=schema)
        try:
            assert (200, 200, True, "true", 200) == _replayed_twice(storage)
        finally:
            storage.close()
