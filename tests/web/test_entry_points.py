"""Every adapter offers the same entry points, and the names they replace still work, warning."""

from __future__ import annotations

import asyncio
import importlib
import warnings
from typing import Any

import httpx
import pytest
from web_harness import ALICE, PREFIX, configure_django

from deepwork_retry import AsyncRetryService, RetryService
from deepwork_retry.auth import StaticTokens
from deepwork_retry.storage.memory import AsyncMemoryStorage, MemoryStorage
from deepwork_retry.web import RetryAPI

ADAPTERS = ["starlette", "fastapi", "flask", "django", "aiohttp"]
MISSING = f"{PREFIX}/projects/nowhere/progress"
"""A read of a project that does not exist: the API's own JSON 404 when it is served."""
ANSWER = (404, {"detail": "Project not found", "code": "project_not_found"})
TOKENS = StaticTokens({ALICE: "alice"})
HEADERS = {"Authorization": f"Bearer {ALICE}"}


def sync_service() -> RetryService:
    return RetryService(MemoryStorage())


def async_service() -> AsyncRetryService:
    return AsyncRetryService(AsyncMemoryStorage(MemoryStorage()))


def asgi_answer(app: Any) -> tuple[int, Any]:
    async def ask() -> tuple[int, Any]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get(MISSING, headers=HEADERS)
        return response.status_code, response.json()

    return asyncio.run(ask())


def wsgi_answer(app: Any) -> tuple[int, Any]:
    response = app.test_client().get(MISSING, headers=HEADERS)
    return response.status_code, response.get_json()


def aiohttp_answer(app: Any) -> tuple[int, Any]:
    from aiohttp.test_utils import TestClient, TestServer

    async def ask() -> tuple[int, Any]:
        async with TestClient(TestServer(app)) as client:
            response = await client.get(MISSING, headers=HEADERS)
            return response.status, await response.json()

    return asyncio.run(ask())


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_every_adapter_has_mount_and_routes(adapter: str) -> None:
    """``mount`` and ``routes`` mean the same in every adapter; all but Django (which has
    no application object) also build a whole application with ``create_app``."""
    module = importlib.import_module(f"deepwork_retry.web.{adapter}")
    names = {"mount", "routes", "create_app"} & set(module.__all__)
    expected = {"mount", "routes"} | (set() if adapter == "django" else {"create_app"})
    assert expected == names


def test_starlette_mount_serves_the_api_in_an_existing_app() -> None:
    """Starlette: ``mount(app, service, tokens)`` adds the API to the host's app."""
    from starlette.applications import Starlette

    from deepwork_retry.web.starlette import mount

    app = Starlette()
    mount(app, async_service(), TOKENS)
    assert asgi_answer(app) == ANSWER


def test_fastapi_mount_serves_the_api_in_an_existing_app() -> None:
    """FastAPI: ``mount(app, service, tokens)`` includes the API's router."""
    from fastapi import FastAPI

    from deepwork_retry.web.fastapi import mount

    app = FastAPI()
    mount(app, async_service(), TOKENS)
    assert asgi_answer(app) == ANSWER


def test_flask_mount_and_create_app_serve_the_api() -> None:
    """Flask: ``mount`` registers the blueprint; ``create_app`` builds an app serving it."""
    from flask import Flask

    from deepwork_retry.web.flask import create_app, mount

    app = Flask("host")
    mount(app, sync_service(), TOKENS)
    assert (ANSWER, ANSWER) == (
        wsgi_answer(app),
        wsgi_answer(create_app(sync_service(), TOKENS)),
    )


def test_aiohttp_mount_serves_the_api_in_an_existing_app() -> None:
    """aiohttp: ``mount(app, service, tokens)`` adds the API's routes."""
    from aiohttp import web

    from deepwork_retry.web.aiohttp import mount

    app = web.Application()
    mount(app, async_service(), TOKENS)
    assert aiohttp_answer(app) == ANSWER


def test_django_mount_serves_the_service_and_adds_its_pattern() -> None:
    """Django: ``mount(urlpatterns, service, tokens)`` serves the service and appends the
    API's URL pattern, which takes the prefix and everything below it."""
    configure_django()
    from deepwork_retry.web.django import get_api, mount

    urlpatterns: list[Any] = []
    service = sync_service()
    mount(urlpatterns, service, TOKENS, prefix="/retries")
    match = urlpatterns[0].resolve("retries/projects/p/progress")
    assert (1, service, {"rest": "projects/p/progress"}) == (
        len(urlpatterns),
        get_api().service,
        match.kwargs,
    )


def test_old_names_warn_and_still_work() -> None:
    """``blueprint``, ``router``, ``add_routes`` and ``configure`` still serve the API for
    one release, each with a DeprecationWarning naming what replaces it."""
    from aiohttp import web
    from fastapi import FastAPI
    from flask import Flask

    from deepwork_retry.web import aiohttp, django, fastapi, flask

    configure_django()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flask_app = Flask("old")
        flask_app.register_blueprint(flask.blueprint(sync_service(), TOKENS))
        fastapi_app = FastAPI()
        fastapi_app.include_router(fastapi.router(async_service(), TOKENS))
        aiohttp_app = web.Application()
        aiohttp.add_routes(aiohttp_app, async_service(), TOKENS)
        api = django.configure(sync_service(), TOKENS)
    messages = [str(w.message) for w in caught if w.category is DeprecationWarning]
    expected = [
        f"deepwork_retry.web.{module}.{old}() is deprecated and will be removed in the next "
        f"release; use deepwork_retry.web.{module}.{new}()"
        for module, old, new in [
            ("flask", "blueprint", "routes"),
            ("fastapi", "router", "routes"),
            ("aiohttp", "add_routes", "mount"),
            ("django", "configure", "mount"),
        ]
    ]
    answers = [wsgi_answer(flask_app), asgi_answer(fastapi_app), aiohttp_answer(aiohttp_app)]
    assert (expected, [ANSWER] * 3, True, __file__) == (
        messages,
        answers,
        isinstance(api, RetryAPI) and django.get_api() is api,
        caught[0].filename,
    )
