"""The web tests' harness: a real HTTP server on 127.0.0.1 per web adapter, one shared world.

Every adapter is served once per session on an ephemeral loopback port:
Starlette and FastAPI by uvicorn, Flask and Django by werkzeug's threaded WSGI
server (which, like gunicorn, de-chunks request bodies and says so with
``wsgi.input_terminated``; Django's own development server cannot read a
chunked body at all), aiohttp by its own runner. All five serve the same
storage, dispatcher and token table, so a test creates its own project (with a
fresh id) and then talks to whichever adapter it is parametrised with.

Each server is configured as docs/web/routes.md tells a host to: the async
adapters get a short ``body_timeout``, the WSGI servers a socket timeout, and
uvicorn the header limit the demo server uses.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import uuid
from collections.abc import Callable
from typing import Any, Literal

from deepwork_retry import (
    AsyncRetryService,
    ExecutorService,
    NoBackoff,
    RetryPolicy,
    RetryService,
)
from deepwork_retry.auth import Principal, StaticTokens
from deepwork_retry.exceptions import StorageUnavailable
from deepwork_retry.storage._to_async import AsyncFromSync
from deepwork_retry.storage.memory import MemoryStorage
from deepwork_retry.web import AsyncRetryAPI, RetryAPI, StreamOptions
from deepwork_retry.web._http import MAX_HEADER_BYTES

ADAPTERS = ["starlette", "fastapi", "flask", "django", "aiohttp"]
PREFIX = "/api/deep-work"

ALICE = "alice-token-0123456789"
"""May act in every project."""
BOB = "bob-token-0123456789"
"""May act only in projects whose id starts with ``bob-`` (see :func:`authorize`)."""
CAROL = "carol-token-0123456789"
"""May act in every project; only the event stream tests use it (their bound per principal)."""

STREAMS = StreamOptions(poll_interval=0.05, heartbeat=0.5)
"""The test servers' event streams: quick polls and heartbeats (a WSGI server learns
that a client went away at its next write), the default bound of 4 per principal."""

BODY_TIMEOUT = 2.0
"""Seconds a body may take to arrive: the async APIs' ``body_timeout`` and the WSGI
servers' socket timeout (kept short so the slow-body tests finish quickly)."""


def authorize(principal: Principal, project_id: str) -> bool:
    return principal.id in ("alice", "carol") or project_id.startswith("bob-")


FAULT = "SQLite database '/srv/deepwork/private.db' is locked by another writer: SELECT 1"
"""What :class:`FaultyStorage` raises: internal text that must never reach a response."""


class FaultyStorage:
    """A storage adapter that reports itself unreachable while ``down`` is set,
    whose methods named in ``broken`` fail with an unexpected error, and which
    refuses every ``apply`` once ``applies_left`` (when set) has run out."""

    def __init__(self, inner: MemoryStorage) -> None:
        self.inner = inner
        self.down = False
        self.broken: set[str] = set()
        self.applies_left: int | None = None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise StorageUnavailable(FAULT, retry_after=7)
            if name in self.broken:
                raise RuntimeError(f"injected failure of {name}")
            if name == "apply" and self.applies_left is not None:
                if self.applies_left <= 0:
                    raise StorageUnavailable(FAULT, retry_after=7)
                self.applies_left -= 1
            return attr(*args, **kwargs)

        return call


class Recorder:
    """A dispatcher that records what it was handed, failing for chosen tasks."""

    def __init__(self) -> None:
        self.keys: list[tuple[str, str, int]] = []
        self.failing: set[str] = set()
        self._lock = threading.Lock()

    def dispatch(self, entry: Any) -> None:
        if entry.task_id in self.failing:
            raise ConnectionError("executor unreachable")
        with self._lock:
            self.keys.append((entry.project_id, entry.task_id, entry.attempt))

    def count(self, project_id: str) -> int:
        with self._lock:
            return sum(1 for key in self.keys if key[0] == project_id)


class AsyncRecorder:
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    async def dispatch(self, entry: Any) -> None:
        self.recorder.dispatch(entry)


class World:
    """The state all five servers share, and helpers to arrange it."""

    def __init__(self) -> None:
        self.memory = MemoryStorage()
        self.storage = FaultyStorage(self.memory)
        self.async_storage = AsyncFromSync(self.storage, offload=False)  # type: ignore[type-var]
        self.recorder = Recorder()
        self.tokens = StaticTokens(
            {ALICE: Principal(id="alice"), BOB: Principal(id="bob"), CAROL: Principal(id="carol")}
        )
        self.executor = ExecutorService(self.memory, policy=RetryPolicy(backoff=NoBackoff()))
        self.apis: dict[str, AsyncRetryAPI | RetryAPI] = {}
        """The API each adapter's server serves, by adapter name."""

    def sync_service(self) -> RetryService:
        return RetryService(self.storage, self.recorder)  # type: ignore[arg-type]

    def async_service(self) -> AsyncRetryService:
        return AsyncRetryService(self.async_storage, AsyncRecorder(self.recorder))

    def async_api(self) -> AsyncRetryAPI:
        return AsyncRetryAPI(
            self.async_service(),
            self.tokens,
            authorize,
            body_timeout=BODY_TIMEOUT,
            streams=STREAMS,
        )

    def sync_api(self) -> RetryAPI:
        return RetryAPI(self.sync_service(), self.tokens, authorize, streams=STREAMS)

    # -- arranging -------------------------------------------------------------------
    def project(self, status: str = "executing", *, prefix: str = "p-") -> str:
        project_id = prefix + uuid.uuid4().hex[:12]
        self.executor.create_project(project_id, status=status)
        return project_id

    def blocked(self, project_id: str, task_id: str = "t1", *, title: str = "") -> str:
        """A task that failed twice with ``max_retries=1`` (so ``retry_count`` is 1)."""
        ex = self.executor
        ex.add_task(project_id, task_id, title=title or f"Task {task_id}", max_retries=1)
        ex.assign(project_id, task_id)
        ex.start(project_id, task_id, 1)
        ex.fail(project_id, task_id, 1, RuntimeError("first failure"))
        ex.start(project_id, task_id, 2)
        ex.fail(project_id, task_id, 2, RuntimeError("second failure"))
        return task_id

    def done(self, project_id: str, task_id: str) -> str:
        self.executor.add_task(project_id, task_id)
        self.executor.assign(project_id, task_id)
        self.executor.start(project_id, task_id, 1)
        self.executor.succeed(project_id, task_id, 1)
        return task_id

    def snapshot(self, project_id: str) -> Any:
        """Everything stored about the project, for "nothing changed" checks."""
        m = self.memory
        tasks = m.list_tasks(project_id, limit=1000)
        return (
            m.get_project(project_id),
            tasks,
            m.progress(project_id),
            {t.id: (m.attempts(project_id, t.id), m.dispatches(project_id, t.id)) for t in tasks},
            self.recorder.count(project_id),
        )


# -- the servers -----------------------------------------------------------------------


def _no_delay(sock: socket.socket) -> None:
    # Accepted connections inherit this: responses written in two parts (head, then
    # body) are not held back by Nagle's algorithm waiting for a delayed ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    _no_delay(sock)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


TLS = tuple[str, str]
"""A certificate file and its key file, for a server that speaks HTTPS."""


def serve_asgi(
    app: Any, *, lifespan: Literal["auto", "on", "off"] = "off", tls: TLS | None = None
) -> tuple[str, Callable[[], None]]:
    """Run ``app`` under uvicorn in a thread; returns its URL and a stop function."""
    import uvicorn

    sock = _socket()
    config = uvicorn.Config(
        app,
        log_level="error",
        lifespan=lifespan,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        ssl_certfile=tls[0] if tls else None,
        ssl_keyfile=tls[1] if tls else None,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        thread.join(0.01)
    assert server.started, "uvicorn did not start"

    def stop() -> None:
        server.should_exit = True
        thread.join(10)
        sock.close()

    return f"{_scheme(tls)}://127.0.0.1:{sock.getsockname()[1]}", stop


def _scheme(tls: TLS | None) -> str:
    return "https" if tls else "http"


def serve_wsgi_werkzeug(app: Any, *, tls: TLS | None = None) -> tuple[str, Callable[[], None]]:
    from werkzeug.serving import WSGIRequestHandler, make_server

    class TimedHandler(WSGIRequestHandler):
        # The server owns the socket under WSGI: its timeout bounds a body that
        # stops arriving (socketserver applies it to each accepted connection).
        timeout = BODY_TIMEOUT

        def log_error(self, format: str, *args: Any) -> None:
            # An idle keep-alive connection closed by the timeout is routine.
            if not format.startswith("Request timed out"):
                super().log_error(format, *args)

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = make_server(
        "127.0.0.1", 0, app, threaded=True, request_handler=TimedHandler, ssl_context=tls
    )
    _no_delay(server.socket)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(10)

    return f"{_scheme(tls)}://127.0.0.1:{server.socket.getsockname()[1]}", stop


def configure_django() -> None:
    """Django for this process: one configuration shared with the Django ORM tests."""
    from django_support import configure

    configure()


def serve_django(*, tls: TLS | None = None) -> tuple[str, Callable[[], None]]:
    from django.core.handlers.wsgi import WSGIHandler

    return serve_wsgi_werkzeug(WSGIHandler(), tls=tls)


def serve_aiohttp(app: Any, *, tls: TLS | None = None) -> tuple[str, Callable[[], None]]:
    import ssl

    from aiohttp import web

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    sock = _socket()

    async def start() -> web.AppRunner:
        # The access log on, so tests can check what it records (at INFO).
        runner = web.AppRunner(app, access_log=logging.getLogger("aiohttp.access"))
        await runner.setup()
        context = None
        if tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*tls)
        await web.SockSite(runner, sock, ssl_context=context).start()
        return runner

    runner = asyncio.run_coroutine_threadsafe(start(), loop).result(10)

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        sock.close()

    return f"{_scheme(tls)}://127.0.0.1:{sock.getsockname()[1]}", stop


def start_server(adapter: str, world: World) -> tuple[str, Callable[[], None]]:
    """Serve ``world`` with ``adapter`` on a loopback port (its API in ``world.apis``).

    Stopping it first ends its open event streams, as a host's shutdown does
    (uvicorn would otherwise wait for them).
    """
    url, stop = _start_server(adapter, world)
    api = world.apis[adapter]

    def stop_all() -> None:
        api.close_streams()
        stop()

    return url, stop_all


def django_api(world: World) -> RetryAPI:
    """A fresh API over ``world``, now the one Django serves in this process (for
    every server that runs Django: it serves one API, and other tests may have
    mounted theirs since); a server stopped before closed its own API's streams."""
    configure_django()
    from deepwork_retry.web.django import mount as mount_django

    api = world.apis["django"] = world.sync_api()
    # The URLs come from ROOT_URLCONF (the app's urls module): the patterns
    # mount would add are not needed, only the API it serves.
    mount_django([], api)
    return api


def _start_server(adapter: str, world: World) -> tuple[str, Callable[[], None]]:
    if adapter == "starlette":
        from deepwork_retry.web.starlette import create_app

        app = create_app(api := world.async_api())
        world.apis[adapter] = api
        return serve_asgi(app)
    if adapter == "fastapi":
        from deepwork_retry.web.fastapi import create_app as create_fastapi

        app = create_fastapi(api := world.async_api())
        world.apis[adapter] = api
        return serve_asgi(app)
    if adapter == "flask":
        from flask import Flask

        from deepwork_retry.web.flask import mount as mount_flask

        flask_app = Flask("deepwork_retry_tests")
        mount_flask(flask_app, sync := world.sync_api())
        world.apis[adapter] = sync
        return serve_wsgi_werkzeug(flask_app)
    if adapter == "django":
        django_api(world)
        return serve_django()
    if adapter == "aiohttp":
        from deepwork_retry.web.aiohttp import create_app as create_aiohttp

        aiohttp_app = create_aiohttp(api := world.async_api())
        world.apis[adapter] = api
        return serve_aiohttp(aiohttp_app)
    raise AssertionError(adapter)


def seg(value: str) -> str:
    """One path segment, every byte percent-encoded (so dots and slashes stay data)."""
    return "".join(f"%{b:02X}" for b in value.encode("utf-8", "surrogatepass"))


def url(*parts: str) -> str:
    """``/api/deep-work/projects/<p>/tasks/<t>/retry`` style paths; ids are encoded."""
    return PREFIX + "/" + "/".join(parts)


def task_url(project_id: str, task_id: str, suffix: str = "") -> str:
    return url("projects", seg(project_id), "tasks", seg(task_id)) + suffix


def auth(token: str = ALICE) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
