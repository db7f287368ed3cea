"""Retention on real SQLite files and real PostgreSQL: keys expire, prunes keep tables bounded.

The storage-level rules are held by the shipped conformance suite
(``deepwork_retry.testing.contract``); here are the API's answers, the
migrations of existing rows, the indexes each batch reads, the relay and
reaper options, and prunes racing real retries in real threads.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pg_support import finished_tasks, schema_dropped_after
from psycopg import sql

from deepwork_retry import (
    ExecutorService,
    Pruner,
    Retention,
    RetryService,
    TaskError,
    TaskStatus,
)
from deepwork_retry._core.model import IdempotencyRecord
from deepwork_retry._core.policy import NoBackoff, RetryPolicy
from deepwork_retry.auth import StaticTokens
from deepwork_retry.dispatch.reaper import run_reaper
from deepwork_retry.dispatch.relay import run_relay
from deepwork_retry.ports import Storage
from deepwork_retry.storage import _postgres_sql as q
from deepwork_retry.storage.postgres import PostgresStorage
from deepwork_retry.storage.sqlite import SQLiteStorage, migrations
from deepwork_retry.testing import FakeClock, RecordingDispatcher
from deepwork_retry.web import ApiRequest, RetryAPI
from deepwork_retry.web._http import scoped_key

TOKEN = "s3cret-token"
DAY = 86400.0
FATAL = TaskError(type="Fatal", message="boom", retryable=False)


def _blocked(executor: ExecutorService, project: str, task: str) -> None:
    executor.add_task(project, task, max_retries=0)
    executor.assign(project, task)
    executor.start(project, task, 1)
    executor.fail(project, task, 1, FATAL)


def _api(storage: Storage, clock: FakeClock, **service: Any) -> RetryAPI:
    tokens = StaticTokens()
    tokens.add(TOKEN, "alice")
    return RetryAPI(RetryService(storage, RecordingDispatcher(), clock=clock, **service), tokens)


def _post(api: RetryAPI, task: str, key: str) -> tuple[int, dict[str, Any], bool]:
    response = api.handle(
        ApiRequest(
            method="POST",
            path=f"/projects/p/tasks/{task}/retry",
            headers={"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": key},
        )
    )
    replayed = ("Idempotent-Replayed", "true") in response.headers
    return response.status, json.loads(response.body), replayed


def _rows(path: Path, table: str) -> int:
    conn = sqlite3.connect(path)
    try:
        count: int = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        return count
    finally:
        conn.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "retention.db"


# -- expiry through the API ------------------------------------------------------------------


def test_an_expired_key_is_not_replayed_but_retries_afresh(db: Path) -> None:
    """Within 24 hours a key replays its first answer; after, the same key is a new request."""
    clock = FakeClock()
    storage = SQLiteStorage(db)
    executor = ExecutorService(storage, clock=clock)
    executor.create_project("p")
    executor.add_task("p", "t", max_retries=0)
    api = _api(storage, clock)
    assert (400, False) == _post(api, "t", "k")[::2]  # 't' is in the inbox
    executor.assign("p", "t")
    executor.start("p", "t", 1)
    executor.fail("p", "t", 1, FATAL)
    clock.advance(DAY - 1)
    assert (400, True) == _post(api, "t", "k")[::2]
    clock.advance(1)
    status, body, replayed = _post(api, "t", "k")
    assert (200, "assigned", False) == (status, body["task"]["status"], replayed)
    assert (200, True) == _post(api, "t", "k")[::2]
    storage.close()


def test_the_service_retention_sets_how_long_keys_live(db: Path) -> None:
    """RetryService(retention=...) gives keys its own life, on the 4xx answers too."""
    clock = FakeClock()
    storage = SQLiteStorage(db)
    ExecutorService(storage, clock=clock).create_project("p")
    api = _api(storage, clock, retention=Retention(idempotency=timedelta(minutes=10)))
    assert (404, False) == _post(api, "missing", "k")[::2]
    record = storage.get_idempotency(scoped_key("alice", "k"))
    assert record is not None
    assert clock.now() + timedelta(minutes=10) == record.expires_at
    clock.advance(599)
    assert (404, True) == _post(api, "missing", "k")[::2]
    clock.advance(1)
    assert (404, False) == _post(api, "missing", "k")[::2]
    storage.close()


def test_new_keys_on_404s_no_longer_grow_the_table_forever(db: Path) -> None:
    """Every 404 with a new key writes a row; a day later a prune has removed them all."""
    clock = FakeClock()
    storage = SQLiteStorage(db)
    ExecutorService(storage, clock=clock).create_project("p")
    api = _api(storage, clock)
    for n in range(300):
        assert 404 == _post(api, "missing", f"key-{n}")[0]
    assert 300 == _rows(db, "idempotency")
    clock.advance(DAY)
    pruned = Pruner(storage, clock=clock, batch=128).prune()
    assert (300, 3, True) == (pruned.idempotency, pruned.batches, pruned.complete)
    assert 0 == _rows(db, "idempotency")
    storage.close()


def test_an_abandoned_reservation_recovers_after_its_delivered_entry_was_pruned(db: Path) -> None:
    """A prune removes only delivered entries, so a recovered answer without one says
    ``dispatched``, not ``pending``."""
    clock = FakeClock()
    storage = SQLiteStorage(db)
    executor = ExecutorService(storage, clock=clock)
    executor.create_project("p")
    _blocked(executor, "p", "t")
    api = _api(storage, clock)
    # The request that reserved the key committed its retry, then died before answering.
    RetryService(storage, RecordingDispatcher(), clock=clock).retry(
        "p", "t", actor="alice", idempotency_key=scoped_key("alice", "k")
    )
    executor.start("p", "t", 2)
    clock.advance(61)
    Pruner(storage, Retention(delivered_outbox=timedelta(0)), clock=clock).prune()
    assert [1] == [e.attempt for e in storage.dispatches("p", "t")]  # 1: never delivered
    status, body, _ = _post(api, "t", "k")
    assert (200, "dispatched") == (status, body["dispatch"]["status"])
    storage.close()


# -- migrations ------------------------------------------------------------------------------


def test_sqlite_migration_gives_existing_keys_the_default_life(db: Path) -> None:
    """A file written before migration 0003 keeps its keys, each for 24 hours from creation."""
    created = datetime(2024, 5, 1, 8, 30, tzinfo=timezone.utc)
    conn = sqlite3.connect(db)
    for number, _name, text in migrations():
        if number < 3:
            conn.executescript(text)
    micros = (created - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)
    conn.execute(
        "INSERT INTO idempotency VALUES ('k', 'p', 't', ?, 200, '{}')",
        (micros,),
    )
    conn.execute("PRAGMA user_version = 2")
    conn.execute("PRAGMA application_id = 1685549684")
    conn.commit()
    conn.close()
    storage = SQLiteStorage(db)
    record = storage.get_idempotency("k")
    assert record is not None
    assert created + timedelta(hours=24) == record.expires_at
    assert record == storage.get_idempotency("k", now=created + timedelta(hours=23))
    assert storage.get_idempotency("k", now=created + timedelta(hours=24)) is None
    storage.close()


@pytest.mark.postgres
def test_postgres_migration_gives_existing_keys_the_default_life(postgres_dsn: str) -> None:
    """A schema written before migration 0004 keeps its keys, each for 24 hours from creation."""
    created = datetime(2024, 5, 1, 8, 30, tzinfo=timezone.utc)
    with schema_dropped_after(postgres_dsn) as schema:
        queries = q.Queries(schema)
        with psycopg.connect(postgres_dsn, autocommit=True) as conn, conn.transaction():
            conn.execute(queries.bootstrap)
            for migration in q.migrations():
                if migration.number < 4:
                    conn.execute(queries.search_path)
                    conn.execute(migration.text.encode())
                    conn.execute(queries.record_migration, (migration.number, migration.name))
            conn.execute(
                sql.SQL(
                    "INSERT INTO {}.idempotency VALUES ('k', 'p', 't', %s, 200, '{{}}')"
                ).format(sql.Identifier(schema)),
                (created,),
            )
        storage = PostgresStorage(postgres_dsn, schema=schema, max_size=2)
        try:
            record = storage.get_idempotency("k")
            assert record is not None
            assert created + timedelta(hours=24) == record.expires_at
        finally:
            storage.close()


# -- each batch reads an index ----------------------------------------------------------------


def test_sqlite_prune_batches_read_their_retention_indexes(db: Path) -> None:
    """No prune statement scans a table: each is a range read of its table's index."""
    from deepwork_retry.storage.sqlite import _prune_statements

    SQLiteStorage(db).close()
    conn = sqlite3.connect(db)
    try:
        rule = Retention(attempts=timedelta(days=1)).rule(datetime.now(timezone.utc))
        used = []
        for statement, params in _prune_statements(rule):
            assert params is not None
            plan = conn.execute(f"EXPLAIN QUERY PLAN {statement}", params).fetchall()
            details = [row[-1] for row in plan]
            assert not [d for d in details if d.startswith("SCAN")], details
            used.append(" ".join(details))
        assert "idempotency_by_expiry" in used[0]
        assert "outbox_delivered" in used[1]
        assert "attempts_by_dispatch" in used[2]
    finally:
        conn.close()


def test_postgres_attempt_prune_reads_attempts_not_every_finished_task(
    postgres_dsn: str,
) -> None:
    """A batch of attempt records reads the attempts older than the cut-off, asking each
    one's task; it does not read every finished task, which are never deleted and so
    outnumber the history left to prune (the long-run benchmark slowed as they grew)."""
    clock = FakeClock(datetime(2026, 1, 1, tzinfo=timezone.utc))
    finished = 5000
    with schema_dropped_after(postgres_dsn) as schema:
        storage = PostgresStorage(postgres_dsn, schema=schema, max_size=2)
        try:
            finished_tasks(ExecutorService(storage, clock=clock), "p", "old-0", "old-1", "seed")
        finally:
            storage.close()
        ident = sql.Identifier(schema)
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            columns = [
                row[0]
                for row in conn.execute(
                    "SELECT column_name FROM information_schema.columns"
                    " WHERE table_schema = %s AND table_name = 'tasks' ORDER BY ordinal_position",
                    (schema,),
                )
            ]
            copied = [sql.SQL("'many-' || g") if c == "id" else sql.Identifier(c) for c in columns]
            # many finished tasks whose history is already gone, as after earlier prunes
            conn.execute(
                sql.SQL(
                    "INSERT INTO {}.tasks ({}) SELECT {} FROM {}.tasks, generate_series(1, %s) g"
                    " WHERE id = 'seed'"
                ).format(ident, sql.SQL(", ").join(map(sql.Identifier, columns)),
                         sql.SQL(", ").join(copied), ident),
                (finished,),
            )  # fmt: skip
            rule = Retention(attempts=timedelta(days=1)).rule(clock.now() + timedelta(days=2))
            query, params = q.Queries(schema).prune(rule)[2]
            with conn.transaction(force_rollback=True):
                deleted = conn.execute(query, params).rowcount
                read = conn.execute(
                    "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)"
                    " FROM pg_stat_xact_user_tables WHERE schemaname = %s AND relname = 'tasks'",
                    (schema,),
                ).fetchone()
        assert deleted == 3  # the three tasks' attempts: those the rule removes
        assert read is not None
        assert read[0] <= 50, f"the batch read {read[0]} task rows"


# -- the relay and the reaper prune when asked ---------------------------------------------------


def _expired_keys(storage: Storage, count: int) -> None:
    old = datetime.now(timezone.utc) - timedelta(days=2)
    for n in range(count):
        storage.save_idempotency(
            IdempotencyRecord(key=f"old-{n}", project_id="p", task_id="t", created_at=old)
        )


def _until(check: Callable[[], bool], seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


@pytest.mark.parametrize("runner", ["relay", "reaper"])
def test_relay_and_reaper_prune_every(db: Path, runner: str) -> None:
    """run_relay / run_reaper with prune_every remove expired rows while they run."""
    storage = SQLiteStorage(db)
    ExecutorService(storage).create_project("p")
    _expired_keys(storage, 1200)  # three batches of 500
    stop = threading.Event()
    if runner == "relay":
        target: Callable[[], int] = lambda: run_relay(  # noqa: E731 - one call, two shapes
            storage, RecordingDispatcher(), poll_interval=0.05, stop=stop, prune_every=3600
        )
    else:
        target = lambda: run_reaper(  # noqa: E731
            storage, interval=0.05, stop=stop, prune_every=3600
        )
    thread = threading.Thread(target=target)
    thread.start()
    try:
        assert _until(lambda: 0 == _rows(db, "idempotency"))
        # Not due again for an hour: new expired rows stay until then.
        _expired_keys(storage, 3)
        time.sleep(0.5)
        assert 3 == _rows(db, "idempotency")
    finally:
        stop.set()
        thread.join(timeout=20)
    assert not thread.is_alive()
    storage.close()


def test_prune_every_must_be_positive(db: Path) -> None:
    """A zero or negative period is refused with a clear error before anything runs."""
    storage = SQLiteStorage(db)
    with pytest.raises(ValueError, match="prune_every must be a positive number of seconds"):
        run_relay(storage, RecordingDispatcher(), once=True, prune_every=0)
    storage.close()


def test_retention_refuses_bad_periods() -> None:
    """Retention names the field and the rule a bad value breaks."""
    with pytest.raises(ValueError, match=r"Retention.idempotency must be positive"):
        Retention(idempotency=timedelta(0))
    with pytest.raises(ValueError, match=r"Retention.delivered_outbox must be at least zero"):
        Retention(delivered_outbox=timedelta(seconds=-1))
    with pytest.raises(ValueError, match=r"Retention.attempts must be a timedelta or None"):
        Retention(attempts=7)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"a prune batch must be an int from 1 to 100000"):
        Retention().rule(datetime.now(timezone.utc), batch=0)


# -- prunes racing retries in real threads ------------------------------------------------------

STRICT = Retention(
    idempotency=timedelta(milliseconds=1), delivered_outbox=timedelta(0), attempts=timedelta(0)
)
"""Remove everything the rule allows as soon as it allows it."""


def _race(storage: Storage, *, workers: int = 4, rounds: int = 24) -> None:
    """Workers retry, run and fail or finish their tasks while a pruner prunes non-stop.

    Every retry must succeed and nothing a live task needs may go: each task
    that is not finished keeps its whole history, counted by its attempt
    number, and every 200 leaves exactly one attempt record for its retry.
    """
    policy = RetryPolicy(backoff=NoBackoff(), lease=60.0)
    executor = ExecutorService(storage, RecordingDispatcher(), policy=policy)
    executor.create_project("p")
    for w in range(workers):
        for n in range(rounds):
            _blocked(executor, "p", f"w{w}-t{n}")
    errors: list[BaseException] = []
    done = threading.Event()
    retried: dict[str, int] = {}

    def work(w: int) -> None:
        service = RetryService(storage, RecordingDispatcher(), policy=policy, retention=STRICT)
        try:
            for n in range(rounds):
                tid = f"w{w}-t{n}"
                for attempt in (2, 3):
                    service.retry("p", tid, idempotency_key=f"{tid}-{attempt}")
                    executor.start("p", tid, attempt)
                    if attempt == 3 and n % 2 == 0:
                        executor.succeed("p", tid, attempt)
                    else:
                        executor.fail("p", tid, attempt, FATAL)
                retried[tid] = 2
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    pruned = []

    def prune() -> None:
        pruner = Pruner(storage, STRICT, batch=3)
        try:
            while not done.is_set():
                pruned.append(pruner.prune(max_batches=5))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    pruning = threading.Thread(target=prune)
    pruning.start()
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    elapsed = time.monotonic() - started
    done.set()
    pruning.join(timeout=60)
    assert [] == errors
    assert not any(t.is_alive() for t in [*threads, pruning])
    assert elapsed < 90, f"retries took {elapsed:.0f}s next to the prune"
    assert sum(p.total for p in pruned) > 0  # it pruned while the retries ran
    # A moment later, so that the last keys (1 ms of life) have expired too.
    later = FakeClock(datetime.now(timezone.utc) + timedelta(seconds=1))
    Pruner(storage, STRICT, clock=later).prune()
    for w in range(workers):
        for n in range(rounds):
            tid = f"w{w}-t{n}"
            task = storage.load("p", tid)[1]
            attempts = storage.attempts("p", tid)
            assert (3, 2) == (task.attempt, task.retry_count), tid
            if task.status is TaskStatus.DONE:
                assert [] == attempts, tid  # finished: its history may go, and went
            else:
                assert TaskStatus.BLOCKED == task.status
                assert [1, 2, 3] == [a.number for a in attempts], tid
                assert [] == storage.dispatches("p", tid)  # all delivered, and pruned
    assert 0 == storage.progress("p").in_progress
    assert {"done": workers * rounds // 2, "blocked": workers * rounds // 2} == {
        s: storage.progress("p").count(TaskStatus(s)) for s in ("done", "blocked")
    }


def test_sqlite_prune_racing_retries_loses_and_blocks_nothing(db: Path) -> None:
    """On one SQLite file, retries in four threads all succeed next to a non-stop prune."""
    storage = SQLiteStorage(db, synchronous="NORMAL")
    try:
        _race(storage)
    finally:
        storage.close()
    assert 0 == _rows(db, "idempotency")


@pytest.fixture
def pg_storage(postgres_dsn: str) -> Iterator[PostgresStorage]:
    with schema_dropped_after(postgres_dsn) as schema:
        storage = PostgresStorage(postgres_dsn, schema=schema, max_size=8)
        try:
            yield storage
        finally:
            storage.close()


@pytest.mark.postgres
def test_postgres_prune_racing_retries_loses_and_blocks_nothing(
    pg_storage: PostgresStorage,
) -> None:
    """On PostgreSQL, retries in four threads all succeed next to a non-stop prune."""
    _race(pg_storage)
    later = FakeClock(datetime.now(timezone.utc) + timedelta(seconds=1))
    assert 0 == Pruner(pg_storage, STRICT, clock=later).prune().total


# -- the command line ---------------------------------------------------------------------------


def test_cli_prune_removes_what_the_rule_allows(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`deepwork-retry prune` removes expired keys and old deliveries; attempts only if asked."""
    from deepwork_retry.cli import main

    long_ago = FakeClock(datetime.now(timezone.utc) - timedelta(days=30))
    storage = SQLiteStorage(db)
    executor = ExecutorService(storage, RecordingDispatcher(), clock=long_ago)
    executor.create_project("p")
    executor.add_task("p", "t")
    executor.assign("p", "t")
    executor.start("p", "t", 1)
    executor.succeed("p", "t", 1)
    _expired_keys(storage, 3)
    storage.close()
    assert 0 == main(["prune", "--db", str(db)])
    assert (
        "pruned 3 expired idempotency record(s), 1 delivered outbox entry(ies), "
        "0 attempt record(s) in 1 batch(es)\n"
    ) == capsys.readouterr().out
    assert 1 == _rows(db, "attempts")
    assert 0 == main(["prune", "--db", str(db), "--attempts-days", "7", "--batch", "10"])
    assert "0 delivered outbox entry(ies), 1 attempt record(s)" in capsys.readouterr().out
    assert 0 == _rows(db, "attempts")


# -- the one-step retry takes an expired key itself ------------------------------------------------


def _one_step_takes_an_expired_key(storage: SQLiteStorage | PostgresStorage) -> None:
    clock = FakeClock()
    executor = ExecutorService(storage, clock=clock)
    executor.create_project("p")
    _blocked(executor, "p", "t")
    old = IdempotencyRecord(
        key="k", project_id="p", task_id="other", created_at=clock.now(), status_code=404, body="{}"
    )
    storage.save_idempotency(old)
    assert storage.retry_blocked("p", "t", now=clock.now(), idempotency_key="k") is None
    clock.advance(DAY)
    expires = clock.now() + timedelta(hours=1)
    applied = storage.retry_blocked(
        "p", "t", now=clock.now(), idempotency_key="k", idempotency_expires_at=expires
    )
    assert applied is not None
    assert TaskStatus.ASSIGNED == applied.task.status
    reserved = IdempotencyRecord(
        key="k", project_id="p", task_id="t", created_at=clock.now(), expires_at=expires
    )
    assert reserved == storage.get_idempotency("k", now=clock.now())


def test_sqlite_one_step_retry_takes_an_expired_key(db: Path) -> None:
    """SQLite's one-statement retry reserves a key whose record expired, with its new life."""
    storage = SQLiteStorage(db)
    try:
        _one_step_takes_an_expired_key(storage)
    finally:
        storage.close()


@pytest.mark.postgres
def test_postgres_one_step_retry_takes_an_expired_key(pg_storage: PostgresStorage) -> None:
    """PostgreSQL's one-statement retry reserves a key whose record expired, with its new life."""
    _one_step_takes_an_expired_key(pg_storage)


def test_async_relay_prunes_every(db: Path) -> None:
    """AsyncOutboxRelay(prune_every=...) prunes on its event loop while it runs."""
    import asyncio

    from deepwork_retry import AsyncOutboxRelay
    from deepwork_retry.storage.sqlite import AsyncSQLiteStorage
    from deepwork_retry.testing import AsyncRecordingDispatcher

    sync = SQLiteStorage(db)
    ExecutorService(sync).create_project("p")
    _expired_keys(sync, 700)
    sync.close()

    async def main() -> None:
        storage = AsyncSQLiteStorage(db)
        stop = asyncio.Event()
        relay = AsyncOutboxRelay(
            storage, AsyncRecordingDispatcher(), poll_interval=0.05, prune_every=3600
        )
        running = asyncio.ensure_future(relay.run(stop))
        for _ in range(400):
            if 0 == _rows(db, "idempotency"):
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(running, 20)
        await storage.close()

    asyncio.run(main())
    assert 0 == _rows(db, "idempotency")


def test_pruner_refuses_a_batch_limit_below_one(db: Path) -> None:
    """max_batches must allow at least one batch."""
    storage = SQLiteStorage(db)
    with pytest.raises(ValueError, match="max_batches must be at least 1"):
        Pruner(storage).prune(max_batches=0)
    storage.close()
