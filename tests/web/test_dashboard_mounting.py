"""Every adapter mounts the dashboard the same way: ``mount_dashboard`` and
``dashboard_routes`` (the framework's own object), from a service and an
authenticator or from the API it already serves.

The pages themselves are tested through real servers in tests/browser/; here,
each adapter's entry points in process: the login page answers in HTML with the
dashboard's headers, an unknown path below the prefix is the dashboard's own 404
page, the JSON API beside it is untouched, and what a mount refuses it refuses
when the application is put together.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import Any

import httpx
import pytest
from web_harness import ALICE, PREFIX, configure_django

from deepwork_retry import AsyncRetryService, RetryService
from deepwork_retry.auth import StaticTokens
from deepwork_retry.exceptions import ConfigurationError
from deepwork_retry.storage.memory import AsyncMemoryStorage, MemoryStorage
from deepwork_retry.web import AsyncRetryAPI, RetryAPI
from deepwork_retry.web.dashboard import CSP, ShortSecret

ADAPTERS = ["starlette", "fastapi", "flask", "django", "aiohttp"]
ASYNC = {"starlette", "fastapi", "aiohttp"}
SECRET = "mounting-tests-dashboard-secret-0123456789"
TOKENS = StaticTokens({ALICE: "alice"})
DASH = "/ops/dash"
"""A prefix other than the default, so that the mounts are seen to use it."""

Answer = tuple[int, dict[str, str], str]


def service(adapter: str) -> Any:
    if adapter in ASYNC:
        return AsyncRetryService(AsyncMemoryStorage(MemoryStorage()))
    return RetryService(MemoryStorage())


def api(adapter: str) -> Any:
    if adapter in ASYNC:
        return AsyncRetryAPI(service(adapter), TOKENS)
    return RetryAPI(service(adapter), TOKENS)


def _asgi(app: Any, paths: list[str]) -> list[Answer]:
    async def ask() -> list[Answer]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            found = []
            for path in paths:
                r = await client.get(path)
                found.append((r.status_code, dict(r.headers), r.text))
            return found

    return asyncio.run(ask())


def _flask(app: Any, paths: list[str]) -> list[Answer]:
    client = app.test_client()
    found = []
    for path in paths:
        r = client.get(path)
        found.append((r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.text))
    return found


def _aiohttp(app: Any, paths: list[str]) -> list[Answer]:
    from aiohttp.test_utils import TestClient, TestServer

    async def ask() -> list[Answer]:
        async with TestClient(TestServer(app)) as client:
            found = []
            for path in paths:
                r = await client.get(path, allow_redirects=False)
                headers = {k.lower(): v for k, v in r.headers.items()}
                found.append((r.status, headers, await r.text()))
            return found

    return asyncio.run(ask())


def _django(patterns: list[Any], paths: list[str]) -> list[Answer]:
    from django.test import RequestFactory
    from django.urls import Resolver404

    found = []
    for path in paths:
        for pattern in patterns:
            try:
                match = pattern.resolve(path.lstrip("/"))
            except Resolver404:
                continue
            if match is not None:
                break
        else:
            found.append((404, {}, "no pattern"))
            continue
        r = match.func(RequestFactory().get(path), **match.kwargs)
        headers = {k.lower(): v for k, v in r.items()}
        if r.cookies:  # what the WSGI handler writes as Set-Cookie headers
            headers["set-cookie"] = ", ".join(c.OutputString() for c in r.cookies.values())
        found.append((r.status_code, headers, r.content.decode()))
    return found


def serve(adapter: str, served: Any, paths: list[str], *, routes: bool) -> list[Answer]:
    """Mount the dashboard (``routes``: through ``dashboard_routes``) and the API over
    ``served`` in ``adapter``'s own application; the answers to GET ``paths``."""
    module = importlib.import_module(f"deepwork_retry.web.{adapter}")
    extra = {} if isinstance(served, (RetryAPI, AsyncRetryAPI)) else {"authenticator": TOKENS}
    options = {"secret": SECRET, "prefix": DASH, **extra}
    if adapter == "django":
        configure_django()
        patterns: list[Any] = []
        if routes:
            patterns.extend(module.dashboard_routes(served, **options))
        else:
            module.mount_dashboard(patterns, served, **options)
        return _django(patterns, paths)
    if adapter in ("starlette", "fastapi"):
        if adapter == "starlette":
            from starlette.applications import Starlette

            app: Any = Starlette()
        else:
            from fastapi import FastAPI

            app = FastAPI()
        module.mount(app, served, extra.get("authenticator"))
        if routes:
            found = module.dashboard_routes(served, **options)
            if adapter == "starlette":
                app.routes.extend(found)
            else:
                app.include_router(found)
        else:
            module.mount_dashboard(app, served, **options)
        return _asgi(app, paths)
    if adapter == "flask":
        from flask import Flask

        app = Flask("dashboard_mounting")
        module.mount(app, served, extra.get("authenticator"))
        if routes:
            app.register_blueprint(module.dashboard_routes(served, **options))
        else:
            module.mount_dashboard(app, served, **options)
        return _flask(app, paths)
    from aiohttp import web

    app = web.Application()
    module.mount(app, served, extra.get("authenticator"))
    if routes:
        app.add_routes(module.dashboard_routes(served, **options))
    else:
        module.mount_dashboard(app, served, **options)
    return _aiohttp(app, paths)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_every_adapter_has_the_dashboard_entry_points(adapter: str) -> None:
    module = importlib.import_module(f"deepwork_retry.web.{adapter}")
    assert {"mount_dashboard", "dashboard_routes"} <= set(module.__all__)


@pytest.mark.parametrize("routes", [False, True], ids=["mount_dashboard", "dashboard_routes"])
@pytest.mark.parametrize("from_api", [True, False], ids=["api", "service"])
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_the_dashboard_is_served_beside_the_api(adapter: str, from_api: bool, routes: bool) -> None:
    served = api(adapter) if from_api else service(adapter)
    paths = [DASH + "/login", DASH + "/no/such/page", DASH + "/", DASH + "/static/dashboard.css"]
    if adapter != "django":  # Django's API pattern is the site's, not mounted here
        paths.append(PREFIX + "/projects/nowhere/progress")
    answers = serve(adapter, served, paths, routes=routes)
    login, unknown, home, css = answers[:4]

    assert login[0] == 200
    assert login[1]["content-type"].startswith("text/html")
    assert login[1]["content-security-policy"] == CSP
    assert 'id="login-form"' in login[2]
    assert "deepwork_login=" in login[1].get("set-cookie", "")
    assert f"Path={DASH}" in login[1]["set-cookie"]

    assert unknown[0] == 404
    assert unknown[1]["content-type"].startswith("text/html")

    assert home[0] == 303  # no session: to the login page
    assert home[1]["location"].endswith(DASH + "/login")

    assert css[0] == 200
    assert css[1]["content-type"].startswith("text/css")

    if adapter != "django":
        api_answer = answers[4]
        assert api_answer[0] == 401  # the API's own answer: a Bearer token is missing
        assert api_answer[1]["content-type"].startswith("application/json")


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_short_secret_is_refused_when_mounting(adapter: str) -> None:
    module = importlib.import_module(f"deepwork_retry.web.{adapter}")
    if adapter == "django":
        configure_django()
    with pytest.raises(ShortSecret):
        module.dashboard_routes(api(adapter), secret="too short")


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_service_of_the_other_kind_is_refused_when_mounting(adapter: str) -> None:
    module = importlib.import_module(f"deepwork_retry.web.{adapter}")
    if adapter == "django":
        configure_django()
    other = "flask" if adapter in ASYNC else "starlette"
    with pytest.raises(ConfigurationError):
        module.dashboard_routes(api(other), secret=SECRET)
