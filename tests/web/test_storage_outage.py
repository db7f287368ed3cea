"""An unavailable storage, over real HTTP: fast 503s, no stalls, nothing internal in a body.

The bulk rows run against every adapter over the shared world (whose storage
can be made to refuse writes); the rest hold a real SQLite file's write lock
from a second process while a real server answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlite_lock import write_lock_held
from web_harness import (
    ALICE,
    FAULT,
    AsyncRecorder,
    Recorder,
    World,
    auth,
    seg,
    serve_asgi,
    serve_wsgi_werkzeug,
    task_url,
    url,
)

from deepwork_retry import AsyncRetryService, ExecutorService, NoBackoff, RetryPolicy, RetryService
from deepwork_retry.auth import Principal, StaticTokens
from deepwork_retry.demo import create_demo_project
from deepwork_retry.storage.sqlite import AsyncSQLiteStorage, SQLiteStorage

JSON = "application/json"
STORAGE_DETAIL = "Storage is unavailable; try again later"
NOT_ATTEMPTED = "Not attempted: storage is unavailable; try again later"


def bulk(http: httpx.Client, project_id: str, **body: Any) -> httpx.Response:
    return http.post(url("projects", seg(project_id), "retry-blocked"), json=body, headers=auth())


def assert_storage_503(response: httpx.Response, retry_after: str | None = None) -> None:
    assert (503, {"detail": STORAGE_DETAIL, "code": "storage_unavailable"}) == (
        response.status_code,
        response.json(),
    )
    assert JSON == response.headers["content-type"]
    assert response.headers.get("retry-after", "").isdigit()
    if retry_after is not None:
        assert retry_after == response.headers["retry-after"]


# -- bulk retry, every adapter --------------------------------------------------------------


def test_bulk_retry_refused_by_the_storage_is_one_503(http: httpx.Client, world: World) -> None:
    """Writes refused on the first task: the whole bulk request is 503 with Retry-After, no
    per-task answers, nothing internal in the body, and nothing changed."""
    pid = world.project()
    for tid in ("t1", "t2", "t3"):
        world.blocked(pid, tid)
    before = world.snapshot(pid)
    world.storage.applies_left = 0
    response = bulk(http, pid)
    assert_storage_503(response, retry_after="7")
    assert "private.db" not in response.text
    assert before == world.snapshot(pid)


def test_bulk_retry_stopped_by_the_storage_reports_what_it_did(
    http: httpx.Client, world: World
) -> None:
    """The storage fails after two retries: those stay retried, the rest are listed as not
    attempted and unchanged, and sending the request on from next_after finishes the page."""
    pid = world.project()
    ids = ["t1", "t2", "t3", "t4"]
    for tid in ids:
        world.blocked(pid, tid)
    world.storage.applies_left = 2
    response = bulk(http, pid)
    assert 200 == response.status_code, response.text
    body = response.json()
    assert FAULT not in response.text
    assert [
        ("t1", True, True, None),
        ("t2", True, True, None),
        ("t3", False, False, NOT_ATTEMPTED),
        ("t4", False, False, NOT_ATTEMPTED),
    ] == [(i["task_id"], i["retried"], i["attempted"], i["detail"]) for i in body["items"]]
    assert (2, "storage_unavailable", "t2") == (
        body["retried"],
        body["stopped"],
        body["next_after"],
    )
    statuses = {t.id: t.status.value for t in world.memory.list_tasks(pid, limit=10)}
    assert {"t1": "assigned", "t2": "assigned", "t3": "blocked", "t4": "blocked"} == statuses

    world.storage.applies_left = None
    rest = bulk(http, pid, after=body["next_after"]).json()
    assert [("t3", True), ("t4", True)] == [(i["task_id"], i["retried"]) for i in rest["items"]]
    assert (None, None) == (rest["stopped"], rest["next_after"])


def test_bulk_retry_that_finishes_says_it_did_not_stop(http: httpx.Client, world: World) -> None:
    """A bulk request that handled its whole page says so: stopped null, every item attempted."""
    pid = world.project()
    world.blocked(pid, "t1")
    body = bulk(http, pid).json()
    assert (None, [True]) == (body["stopped"], [i["attempted"] for i in body["items"]])


def test_storage_failure_text_goes_to_the_log_not_the_body(
    http: httpx.Client, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """The storage's own message (a path, SQL) is logged; the client gets the fixed detail."""
    pid = world.project()
    tid = world.blocked(pid)
    world.storage.down = True
    with caplog.at_level(logging.WARNING, logger="deepwork_retry.web"):
        response = http.post(task_url(pid, tid, "/retry"), headers=auth())
    assert_storage_503(response, retry_after="7")
    assert "private.db" not in response.text
    assert any(FAULT in record.getMessage() for record in caplog.records)


# -- a real SQLite file locked by another process ---------------------------------------------


def blocked_tasks(db: Path, project_id: str, count: int) -> list[str]:
    store = SQLiteStorage(db, synchronous="NORMAL")
    try:
        ex = ExecutorService(store, policy=RetryPolicy(backoff=NoBackoff()))
        ex.create_project(project_id)
        ids = [f"t{n}" for n in range(count)]
        for tid in ids:
            ex.add_task(project_id, tid, max_retries=0)
            ex.assign(project_id, tid)
            ex.start(project_id, tid, 1)
            ex.fail(project_id, tid, 1, RuntimeError("boom"))
        return ids
    finally:
        store.close()


LOCK_WAIT = 1.5
"""The storages' busy timeout in these tests, in seconds."""


@pytest.fixture(params=["starlette", "flask"])
def sqlite_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An async (Starlette) or sync (Flask) server over one SQLite file."""
    db = tmp_path / "retry.db"
    SQLiteStorage(db).close()
    tokens = StaticTokens({ALICE: Principal(id="alice")})
    closers: list[Callable[[], None]] = []
    if request.param == "starlette":
        from deepwork_retry.web.starlette import create_app

        storage = AsyncSQLiteStorage(db, timeout=LOCK_WAIT)
        service = AsyncRetryService(storage, AsyncRecorder(Recorder()))
        served, stop = serve_asgi(create_app(service, tokens))
        closers.append(storage.sync.close)
    else:
        from flask import Flask

        from deepwork_retry.web.flask import mount

        sync = SQLiteStorage(db, timeout=LOCK_WAIT)
        app = Flask("deepwork_retry_outage")
        mount(app, RetryService(sync, Recorder()), tokens)
        served, stop = serve_wsgi_werkzeug(app)
        closers.append(sync.close)
    try:
        yield served, db
    finally:
        stop()
        for close in closers:
            close()


def test_bulk_retry_under_a_held_lock_is_one_fast_503(sqlite_server: tuple[str, Path]) -> None:
    """Six blocked tasks, the write lock held by another process: one 503 within about one
    lock wait (not one per task), with Retry-After and no path; reads still answer."""
    served, db = sqlite_server
    ids = blocked_tasks(db, "p", 6)
    with write_lock_held(db), httpx.Client(base_url=served, timeout=60) as http:
        started = time.monotonic()
        response = bulk(http, "p")
        elapsed = time.monotonic() - started
        assert_storage_503(response)
        assert str(db.parent) not in response.text
        assert elapsed < LOCK_WAIT + 2.0, f"took {elapsed:.1f} s"
        single = http.post(task_url("p", "t0", "/retry"), headers=auth())
        assert_storage_503(single)
        assert str(db.parent) not in single.text
        page = http.get(url("projects", "p", "tasks"), headers=auth())
        assert (200, ids) == (page.status_code, [t["id"] for t in page.json()["tasks"]])
    after = httpx.post(served + url("projects", "p", "retry-blocked"), headers=auth(), timeout=60)
    assert (200, 6, None) == (after.status_code, after.json()["retried"], after.json()["stopped"])


# -- the demo server after a 503 ------------------------------------------------------------------


def test_demo_server_answers_at_once_after_a_locked_503(tmp_path: Path) -> None:
    """After a retry answered 503 because another process holds the write lock, the demo
    server (its relay polling the locked file meanwhile) answers other requests at once."""
    from deepwork_retry.server import build_app

    db = tmp_path / "demo.db"
    setup = SQLiteStorage(db)
    try:
        create_demo_project(setup, "demo")
    finally:
        setup.close()
    tokens = StaticTokens({ALICE: Principal(id="alice")})
    served, stop = serve_asgi(build_app(str(db), tokens), lifespan="on")
    try:
        with write_lock_held(db), httpx.Client(base_url=served, timeout=60) as http:
            response = http.post(task_url("demo", "task-3", "/retry"), headers=auth())
            assert_storage_503(response)
            assert str(db) not in response.text
            for _ in range(4):
                for path, headers, status in (
                    (url("no", "such", "route"), auth(), 404),
                    (task_url("demo", "task-3"), {}, 401),
                ):
                    started = time.monotonic()
                    answer = http.get(path, headers=headers)
                    elapsed = time.monotonic() - started
                    assert status == answer.status_code
                    assert elapsed < 1.0, f"{path} took {elapsed:.1f} s"
                time.sleep(0.2)
    finally:
        stop()


@pytest.mark.postgres
def test_bulk_retry_under_a_postgres_table_lock_is_one_fast_503(postgres_dsn: str) -> None:
    """PostgreSQL with the tasks table locked against writes by another connection: the
    bulk retry is one 503 after one statement timeout, with no DSN or schema in the body."""
    import psycopg
    from flask import Flask
    from pg_support import schema_dropped_after
    from psycopg import sql

    from deepwork_retry.storage.postgres import PostgresStorage
    from deepwork_retry.web.flask import mount

    with schema_dropped_after(postgres_dsn, "outage") as schema:
        storage = PostgresStorage(postgres_dsn, schema=schema, statement_timeout_ms=1000)
        try:
            ex = ExecutorService(storage, policy=RetryPolicy(backoff=NoBackoff()))
            ex.create_project("p")
            for n in range(6):
                ex.add_task("p", f"t{n}", max_retries=0)
                ex.assign("p", f"t{n}")
                ex.start("p", f"t{n}", 1)
                ex.fail("p", f"t{n}", 1, RuntimeError("boom"))
            app = Flask("deepwork_retry_pg_outage")
            tokens = StaticTokens({ALICE: Principal(id="alice")})
            mount(app, RetryService(storage, Recorder()), tokens)
            served, stop = serve_wsgi_werkzeug(app)
            try:
                with (
                    psycopg.connect(postgres_dsn) as holder,
                    httpx.Client(base_url=served, timeout=60) as http,
                ):
                    holder.execute(
                        sql.SQL("LOCK TABLE {}.tasks IN EXCLUSIVE MODE").format(
                            sql.Identifier(schema)
                        )
                    )
                    started = time.monotonic()
                    response = bulk(http, "p")
                    elapsed = time.monotonic() - started
                    holder.rollback()
                assert_storage_503(response)
                assert schema not in response.text
                assert "postgres" not in response.text.lower()
                assert elapsed < 4.0, f"took {elapsed:.1f} s"
                assert {"blocked"} == {t.status.value for t in storage.list_tasks("p")}
            finally:
                stop()
        finally:
            storage.close()


def test_demo_server_reads_answer_while_retries_wait_for_the_lock(tmp_path: Path) -> None:
    """With the write lock held by another process and 30 retries waiting for it, the demo
    server's read routes still answer at once; each retry then answers 503 within about
    one lock wait."""
    from concurrent.futures import ThreadPoolExecutor

    from deepwork_retry.server import build_app

    db = tmp_path / "demo.db"
    setup = SQLiteStorage(db)
    try:
        create_demo_project(setup, "demo")
    finally:
        setup.close()
    tokens = StaticTokens({ALICE: Principal(id="alice")})
    served, stop = serve_asgi(build_app(str(db), tokens), lifespan="on")
    limits = httpx.Limits(max_connections=40, max_keepalive_connections=40)
    try:
        with (
            write_lock_held(db),
            httpx.Client(base_url=served, timeout=60, limits=limits) as http,
            ThreadPoolExecutor(30) as pool,
        ):

            def timed_retry(_: int) -> tuple[float, int]:
                started = time.monotonic()
                status = http.post(task_url("demo", "task-3", "/retry"), headers=auth())
                return time.monotonic() - started, status.status_code

            retries = pool.map(timed_retry, range(30))
            time.sleep(0.5)
            for path in (
                url("projects", "demo", "progress"),
                task_url("demo", "task-3"),
                task_url("demo", "task-3", "/attempts"),
                url("projects", "demo", "tasks"),
            ):
                started = time.monotonic()
                answer = http.get(path, headers=auth())
                elapsed = time.monotonic() - started
                assert 200 == answer.status_code, answer.text
                assert elapsed < 1.0, f"{path} took {elapsed:.1f} s"
            outcomes = list(retries)
        assert {503} == {status for _, status in outcomes}
        slowest = max(elapsed for elapsed, _ in outcomes)
        assert slowest < 5.0 + 2.0, f"a retry took {slowest:.1f} s"
    finally:
        stop()
