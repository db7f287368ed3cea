"""Every web adapter refuses a service of the other kind when mounted, answers a
committed retry as committed whatever fails after the commit, and tells an unopened
storage from an outage."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import httpx
import pytest
from web_harness import (
    ADAPTERS,
    World,
    auth,
    serve_aiohttp,
    serve_asgi,
    task_url,
)

from deepwork_retry import AsyncRetryService, RetryService, TaskStatus
from deepwork_retry.exceptions import ConfigurationError
from deepwork_retry.storage.memory import AsyncMemoryStorage, MemoryStorage
from deepwork_retry.web import AsyncRetryAPI, RetryAPI
from deepwork_retry.web._http import COMMITTED, STORAGE_DOWN

ASYNC_ADAPTERS = ["starlette", "fastapi", "aiohttp"]
SYNC_ONES = "deepwork_retry.web.flask or .django"
ASYNC_ONES = "deepwork_retry.web.starlette, .fastapi or .aiohttp"


def bare_app(adapter: str) -> Any:
    """An empty application (for Django, an empty list of URL patterns) of ``adapter``."""
    if adapter == "starlette":
        from starlette.applications import Starlette

        return Starlette()
    if adapter == "fastapi":
        from fastapi import FastAPI

        return FastAPI()
    if adapter == "aiohttp":
        from aiohttp import web

        return web.Application()
    if adapter == "flask":
        from flask import Flask

        return Flask("wiring")
    return []


def mount(adapter: str, service: object, tokens: Any) -> object:
    """Mount ``service`` with ``adapter``'s ``mount`` on an empty app (nothing is served)."""
    app = bare_app(adapter)
    importlib.import_module(f"deepwork_retry.web.{adapter}").mount(app, service, tokens)
    return app


def _wrong_kinds(adapter: str, world: World) -> list[tuple[object, str]]:
    """A service and an API of the kind ``adapter`` does not serve, with the refusal."""
    if adapter in ASYNC_ADAPTERS:
        name = f"deepwork_retry.web.{adapter}"
        service = RetryService(MemoryStorage())
        return [
            (
                service,
                f"{name} needs an async service; got RetryService — use AsyncRetryService, "
                f"or mount it with {SYNC_ONES}",
            ),
            (
                RetryAPI(service, world.tokens),
                f"{name} needs an async API; got RetryAPI — use AsyncRetryAPI, "
                f"or mount it with {SYNC_ONES}",
            ),
        ]
    name = "deepwork_retry.web.django" if adapter == "django" else "deepwork_retry.web.flask"
    aservice = AsyncRetryService(AsyncMemoryStorage(MemoryStorage()))
    return [
        (
            aservice,
            f"{name} needs a sync service; got AsyncRetryService — use RetryService, "
            f"or mount it with {ASYNC_ONES}",
        ),
        (
            AsyncRetryAPI(aservice, world.tokens),
            f"{name} needs a sync API; got AsyncRetryAPI — use RetryAPI, "
            f"or mount it with {ASYNC_ONES}",
        ),
    ]


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_each_adapter_refuses_a_service_of_the_other_kind_when_mounted(
    adapter: str, world: World
) -> None:
    """Mounting a sync service (or API) on an async adapter, or the reverse, raises a
    ConfigurationError naming what to use, before any request is served."""
    for service, message in _wrong_kinds(adapter, world):
        with pytest.raises(ConfigurationError) as caught:
            mount(adapter, service, world.tokens)
        assert message == str(caught.value)


# -- after the commit ------------------------------------------------------------------------


def test_a_failure_recording_the_delivery_still_answers_200(
    http: httpx.Client, world: World
) -> None:
    """The attempt was handed over but recording that failed: 200 `dispatched`, not 503."""
    pid = world.project()
    tid = world.blocked(pid)
    world.storage.broken.add("mark_delivered")
    response = http.post(task_url(pid, tid, "/retry"), headers=auth())
    assert (200, "dispatched") == (response.status_code, response.json()["dispatch"]["status"])
    assert TaskStatus.ASSIGNED == world.memory.load(pid, tid)[1].status


def test_a_failure_recording_the_idempotent_answer_still_answers_200(
    http: httpx.Client, world: World
) -> None:
    """The retry committed but its answer could not be stored under the key: 200, not 503."""
    pid = world.project()
    tid = world.blocked(pid)
    world.storage.broken.add("save_idempotency")
    headers = {**auth(), "Idempotency-Key": "k-" + pid}
    response = http.post(task_url(pid, tid, "/retry"), headers=headers)
    assert (200, "assigned") == (response.status_code, response.json()["task"]["status"])


def test_a_committed_retry_whose_answer_cannot_be_rendered_is_202_not_503(
    http: httpx.Client, world: World
) -> None:
    """A task whose metadata is not JSON can be retried, but not shown: the answer says
    the retry was committed (202), never "try again" (503) nor 500."""
    pid = world.project()
    world.executor.add_task(
        pid, "t1", max_retries=0, metadata={"when": datetime(2025, 1, 1, tzinfo=timezone.utc)}
    )
    world.executor.assign(pid, "t1")
    world.executor.start(pid, "t1", 1)
    world.executor.fail(pid, "t1", 1, RuntimeError("boom"))
    response = http.post(task_url(pid, "t1", "/retry"), headers=auth())
    assert (202, {"detail": COMMITTED, "code": "retry_committed"}) == (
        response.status_code,
        response.json(),
    )
    assert TaskStatus.ASSIGNED == world.memory.load(pid, "t1")[1].status


# -- a storage that was never opened ------------------------------------------------------------


def _serve(
    adapter: str, service: AsyncRetryService, world: World
) -> tuple[str, Callable[[], None]]:
    if adapter == "aiohttp":
        from deepwork_retry.web.aiohttp import create_app as aiohttp_app

        return serve_aiohttp(aiohttp_app(service, world.tokens))
    if adapter == "fastapi":
        from deepwork_retry.web.fastapi import create_app as fastapi_app

        return serve_asgi(fastapi_app(service, world.tokens))
    from deepwork_retry.web.starlette import create_app as starlette_app

    return serve_asgi(starlette_app(service, world.tokens))


@pytest.fixture
def unopened(postgres_dsn: str) -> Iterator[Any]:
    from pg_support import schema_dropped_after

    from deepwork_retry.storage.postgres import AsyncPostgresStorage

    with schema_dropped_after(postgres_dsn) as schema:
        yield AsyncPostgresStorage(postgres_dsn, schema=schema)


@pytest.mark.postgres
@pytest.mark.parametrize("adapter", ASYNC_ADAPTERS)
def test_a_storage_never_opened_is_logged_as_such_once_and_answers_503(
    adapter: str, world: World, unopened: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An AsyncPostgresStorage served without `await storage.open()`: each request is a 503
    with no internals, and the log says, once, which step is missing."""
    url, stop = _serve(adapter, AsyncRetryService(unopened), world)
    try:
        with caplog.at_level(logging.ERROR, logger="deepwork_retry"), httpx.Client() as http:
            answers = [
                http.post(url + task_url("p", "t", "/retry"), headers=auth()) for _ in range(2)
            ]
    finally:
        stop()
    for response in answers:
        assert (503, {"detail": STORAGE_DOWN, "code": "storage_unavailable"}) == (
            response.status_code,
            response.json(),
        )
    told = [r for r in caplog.records if r.name == "deepwork_retry" and r.levelno == logging.ERROR]
    assert [
        "AsyncPostgresStorage was not opened: call `await storage.open()` (in your "
        "application's startup or lifespan) before serving requests"
    ] == [r.getMessage() for r in told]
