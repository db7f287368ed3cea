"""The browser tests' harness: each adapter serving the API and the dashboard over one world.

The servers are those of tests/web/web_harness.py (uvicorn, werkzeug's threaded
WSGI server, aiohttp's runner) on loopback ports; each serves the JSON API under
``/api/deep-work`` and the dashboard under ``/deep-work``, over the same storage.

The world's dispatcher is a small executor: every attempt it is handed is started
and then succeeds (or fails, for tasks named in ``failing``) in a worker thread, as a
real executor reports back, so the dashboard's live regions have changes to follow.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from web_harness import (
    ALICE,
    BOB,
    BODY_TIMEOUT,
    CAROL,
    STREAMS,
    TLS,
    Recorder,
    World,
    authorize,
    configure_django,
    serve_aiohttp,
    serve_asgi,
    serve_django,
    serve_wsgi_werkzeug,
)

from deepwork_retry import TaskError
from deepwork_retry.auth import Principal, StaticTokens
from deepwork_retry.exceptions import DeepworkError
from deepwork_retry.web import AsyncRetryAPI, RetryAPI

DASH = "/deep-work"
"""The dashboard's prefix on every test server."""

SECRET = "browser-tests-only-dashboard-secret-0123456789abcdef"
"""The dashboard's signing key on every test server (at least 32 bytes)."""

DANA = "dana-token-0123456789"
"""May act only in :data:`DANA_PROJECT`: its principal's own project list, which the
servers' authorizer (:func:`authorize_listed`) honours."""

DANA_PROJECT = "bob-dana-only"
"""Dana's one project (``bob-`` so that the world's authorizer allows it too)."""


def authorize_listed(principal: Principal, project_id: str) -> bool:
    """The web tests' rule, and a principal's own project list when it has one."""
    return authorize(principal, project_id) and principal.may_act_in(project_id)


class Runner(Recorder):
    """A dispatcher that records each attempt and runs it: start, then succeed or fail.

    The attempts run one by one in a worker thread, after the dispatch that handed
    them over has returned (a real executor reports back over its own connection).
    """

    def __init__(self) -> None:
        super().__init__()
        self.executor: Any = None
        self.failing_runs: set[str] = set()
        """Task ids whose attempts fail when they run (they are blocked again)."""
        self.held: set[str] = set()
        """Project ids whose attempts are recorded but not run."""
        self.errors: list[BaseException] = []
        self._held: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[str, str, int]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    def dispatch(self, entry: Any) -> None:
        super().dispatch(entry)
        key = (entry.project_id, entry.task_id, entry.attempt)
        with self._lock:
            if entry.project_id in self.held:
                self._held.append(key)
                return
        self._queue.put(key)

    def release(self, project_id: str) -> None:
        """Run the project's held attempts, and its next ones as they come."""
        with self._lock:
            self.held.discard(project_id)
            mine = [key for key in self._held if key[0] == project_id]
            self._held = [key for key in self._held if key[0] != project_id]
        for key in mine:
            self._queue.put(key)

    def _work(self) -> None:
        while True:
            project_id, task_id, attempt = self._queue.get()
            try:
                self.executor.start(project_id, task_id, attempt)
                if task_id in self.failing_runs:
                    self.executor.fail(
                        project_id, task_id, attempt, ValueError("the rerun failed again")
                    )
                else:
                    self.executor.succeed(project_id, task_id, attempt)
            except DeepworkError as exc:  # a stale attempt (retried again meanwhile)
                self.errors.append(exc)


class BrowserWorld(World):
    """The web tests' world, with an executor behind its dispatcher and one more principal."""

    def __init__(self) -> None:
        super().__init__()
        runner = Runner()
        runner.executor = self.executor
        self.recorder = runner
        self.runner = runner
        self.tokens = StaticTokens(
            {
                ALICE: Principal(id="alice"),
                BOB: Principal(id="bob"),
                CAROL: Principal(id="carol"),
                DANA: Principal(id="dana", projects=frozenset({DANA_PROJECT})),
            }
        )

    def async_api(self) -> AsyncRetryAPI:
        return AsyncRetryAPI(
            self.async_service(),
            self.tokens,
            authorize_listed,
            body_timeout=BODY_TIMEOUT,
            streams=STREAMS,
        )

    def sync_api(self) -> RetryAPI:
        return RetryAPI(self.sync_service(), self.tokens, authorize_listed, streams=STREAMS)

    def failed(
        self,
        project_id: str,
        task_id: str,
        error: TaskError | BaseException,
        *,
        title: str = "",
        max_retries: int = 0,
    ) -> str:
        """A task blocked by ``error`` on its first attempt (no retries left)."""
        ex = self.executor
        ex.add_task(project_id, task_id, title=title or task_id, max_retries=max_retries)
        ex.assign(project_id, task_id)
        ex.start(project_id, task_id, 1)
        ex.fail(project_id, task_id, 1, error)
        return task_id


def start_browser_server(
    adapter: str, world: BrowserWorld, *, tls: TLS | None = None
) -> tuple[str, Callable[[], None]]:
    """Serve the API and the dashboard over ``world`` with ``adapter`` (over HTTPS with
    ``tls``); its URL and a stop function."""
    url, stop = _start(adapter, world, tls)
    api = world.apis[adapter]

    def stop_all() -> None:
        api.close_streams()
        stop()

    return url, stop_all


def _start(adapter: str, world: BrowserWorld, tls: TLS | None) -> tuple[str, Callable[[], None]]:
    if adapter in ("starlette", "fastapi"):
        module: Any
        if adapter == "starlette":
            from deepwork_retry.web import starlette as module
        else:
            from deepwork_retry.web import fastapi as module
        api = world.apis[adapter] = world.async_api()
        app = module.create_app(api)
        module.mount_dashboard(app, api, secret=SECRET, prefix=DASH)
        return serve_asgi(app, tls=tls)
    if adapter == "flask":
        from flask import Flask

        from deepwork_retry.web.flask import mount, mount_dashboard

        flask_app = Flask("deepwork_retry_browser_tests")
        sync = world.apis[adapter] = world.sync_api()
        mount(flask_app, sync)
        mount_dashboard(flask_app, sync, secret=SECRET, prefix=DASH)
        return serve_wsgi_werkzeug(flask_app, tls=tls)
    if adapter == "django":
        configure_django()
        import django_urls

        from deepwork_retry.web.django import mount_dashboard

        # Only the dashboard, bound to its own API: the JSON API's pattern serves the
        # one API of the process (the web tests' server, which may run meanwhile).
        sync = world.apis[adapter] = world.sync_api()
        patterns: list[Any] = []
        mount_dashboard(patterns, sync, secret=SECRET, prefix=DASH)
        _add_patterns(django_urls.urlpatterns, patterns)
        return serve_django(tls=tls)
    if adapter == "aiohttp":
        from deepwork_retry.web.aiohttp import create_app, mount_dashboard

        api = world.apis[adapter] = world.async_api()
        aiohttp_app = create_app(api)
        mount_dashboard(aiohttp_app, api, secret=SECRET, prefix=DASH)
        return serve_aiohttp(aiohttp_app, tls=tls)
    raise AssertionError(adapter)


def _add_patterns(urlpatterns: list[Any], patterns: list[Any]) -> None:
    """Put the dashboard's patterns first in the test site's URLs (in place of any an
    earlier server of this process added), and make Django's resolver read them again."""
    from django.urls import clear_url_caches

    urlpatterns[:] = [p for p in urlpatterns if getattr(p, "name", None) != "dashboard"]
    urlpatterns[:0] = patterns
    clear_url_caches()
