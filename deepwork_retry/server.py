"""The demo API server behind ``deepwork-retry serve``.

Starlette on uvicorn, SQLite storage in a local file, the in-process demo
executor, and an outbox relay running beside the API. It prints a token and a
ready-to-paste ``curl`` for a blocked task of a freshly created demo project.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import socket
import sys
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import Any

from deepwork_retry._async.services import AsyncOutboxRelay, AsyncRetryService
from deepwork_retry._sync.services import ExecutorService
from deepwork_retry.auth import Principal, StaticTokens
from deepwork_retry.demo import (
    DEMO_POLICY,
    AsyncDemoDispatcher,
    DemoDispatcher,
    create_demo_project,
    create_nightly_project,
)
from deepwork_retry.exceptions import DeepworkError, missing_extra
from deepwork_retry.storage.sqlite import AsyncSQLiteStorage, SQLiteStorage
from deepwork_retry.web._async_api import AsyncRetryAPI
from deepwork_retry.web._http import DEFAULT_PREFIX, JSON, MAX_HEADER_BYTES, json_bytes
from deepwork_retry.web.openapi import openapi_document

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from deepwork_retry.web.starlette import dashboard_routes, routes
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise missing_extra("server", __name__, exc) from exc


def _tokens(token: str | None) -> tuple[StaticTokens, str]:
    """The accepted tokens: ``$DEEPWORK_TOKENS`` if set, plus one demo token."""
    env = os.environ.get("DEEPWORK_TOKENS")
    tokens = StaticTokens.from_env() if env else StaticTokens()
    token = token or os.environ.get("DEEPWORK_TOKEN") or secrets.token_urlsafe(24)
    tokens.add(token, Principal(id="demo-user"))
    return tokens, token


OPENAPI_PATH = "/openapi.json"
"""Where the demo server serves the API's OpenAPI document (outside the API's prefix)."""

DASHBOARD_PATH = "/deep-work"
"""Where the demo server serves the operator dashboard (sign in with the same token)."""

METRICS_PATH = "/metrics"
"""Where the demo server serves its metrics to Prometheus, with ``metrics=True``."""


def build_app(
    db: str,
    tokens: StaticTokens,
    *,
    pause: float = 1.0,
    metrics: bool = False,
    dashboard_secret: str | None = None,
) -> Starlette:
    """The demo application over the SQLite file ``db``.

    The operator dashboard is at :data:`DASHBOARD_PATH`, its sessions signed with
    ``dashboard_secret`` (else ``$DEEPWORK_DASHBOARD_SECRET``, else a random one:
    sessions then end when the server stops).

    Its API is ``app.state.retry_api``: a server stopping calls its
    ``close_streams()`` first, so that open event streams do not hold it up.
    With ``metrics``, telemetry is turned on (:mod:`deepwork_retry.telemetry`,
    the extra ``otel-prometheus``) and ``GET /metrics`` serves its metrics to a
    Prometheus scrape.
    """
    extra: list[Route] = []
    if metrics:
        from prometheus_client import CollectorRegistry

        from deepwork_retry import telemetry

        registry = CollectorRegistry()
        telemetry.instrument(meter_provider=telemetry.prometheus_meter_provider(registry))
        scrape = telemetry.prometheus_app(registry, asgi=True)
        extra.append(Route(METRICS_PATH, scrape, methods=["GET"], name="metrics"))
    demo: DemoDispatcher

    def executor_factory() -> ExecutorService:
        # Each executor thread keeps its own storage handle on the same file.
        return ExecutorService(SQLiteStorage(db), demo, policy=DEMO_POLICY)

    demo = DemoDispatcher(executor_factory, pause=pause)
    storage = AsyncSQLiteStorage(db)
    dispatcher = AsyncDemoDispatcher(demo)
    service = AsyncRetryService(storage, dispatcher, policy=DEMO_POLICY)
    relay = AsyncOutboxRelay(storage, dispatcher, poll_interval=0.5)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        await storage.open()
        stop = asyncio.Event()
        relay_task = asyncio.create_task(relay.run(stop))
        try:
            yield
        finally:
            stop.set()
            # A second Ctrl-C makes uvicorn cancel every task, the relay's too:
            # shut down quietly either way.
            with contextlib.suppress(asyncio.CancelledError):
                await relay_task
            # Waiting for the executor's threads blocks: not on the event loop.
            await asyncio.to_thread(demo.shutdown)
            await storage.close()

    document = json_bytes(openapi_document(DEFAULT_PREFIX))

    async def openapi(request: Request) -> Response:
        return Response(document, media_type=JSON)

    # The API's OpenAPI document beside (not under) its prefix: the same one the
    # FastAPI adapter serves, built without FastAPI.
    docs = Route(OPENAPI_PATH, openapi, methods=["GET"], name="openapi")
    api = AsyncRetryAPI(service, tokens)
    secret = (
        dashboard_secret or os.environ.get("DEEPWORK_DASHBOARD_SECRET") or secrets.token_urlsafe(32)
    )
    pages = dashboard_routes(api, secret=secret, prefix=DASHBOARD_PATH)
    app = Starlette(routes=[docs, *extra, *routes(api), *pages], lifespan=lifespan)
    app.state.retry_api = api
    return app


def banner(
    *,
    host: str,
    port: int,
    project_id: str | None,
    token: str,
    nightly_id: str | None = None,
) -> str:
    shown = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::1") else host
    shown = f"[{shown}]" if ":" in shown else shown
    base = f"http://{shown}:{port}{DEFAULT_PREFIX}"
    lines = [
        "",
        f"deepwork_retry demo API on http://{host}:{port}{DEFAULT_PREFIX}",
        f"Dashboard: http://{shown}:{port}{DASHBOARD_PATH}/  (log in with the TOKEN below)",
        f"TOKEN={token}",
    ]
    if project_id is not None:
        lines += [
            f"PROJECT_ID={project_id}",
            "TASK_ID=task-3",
            "",
            "Blocked tasks: task-3 (automatic retry exhausted), task-7 (non-retryable error).",
            *(
                [
                    f"A second project, {nightly_id}, has tasks blocked by a timeout,",
                    "a lost executor and a non-retryable error with its traceback.",
                ]
                if nightly_id
                else []
            ),
            "Retry one in the dashboard (after logging in):",
            f"http://{shown}:{port}{DASHBOARD_PATH}/task?project_id={project_id}&task_id=task-3",
            "",
            "or with curl:",
            "",
            f"curl -X POST {base}/projects/{project_id}/tasks/task-3/retry \\",
            f'  -H "Authorization: Bearer {token}"',
            "",
            "See it run:",
            f'curl {base}/projects/{project_id}/progress -H "Authorization: Bearer {token}"',
            "",
            "Watch it live (Server-Sent Events):",
            f'curl -N {base}/projects/{project_id}/events -H "Authorization: Bearer {token}"',
        ]
    lines += ["", "Press Ctrl-C to stop.", ""]
    return "\n".join(lines)


class CannotListen(DeepworkError, OSError):
    """The server cannot listen on the address it was given (in use, not ours...)."""


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port``, or :class:`CannotListen` saying why not.

    Bound before anything else happens, and handed to uvicorn as it is: a
    second server on a taken port stops here, before it seeds a project or
    prints a token that the server already on the port would refuse.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # Made for TCP by number too: asyncio turns Nagle's algorithm off only on the
    # connections of such a socket, and a response sent in two writes (head, body)
    # would otherwise wait for the client's delayed ACK, ~40 ms per request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        if os.name != "nt":  # on Windows this would let two servers share the port
            # Restarting at once after a stop must not wait out TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        hint = (
            " (is another server running there? stop it, or choose another --port)"
            if exc.errno == errno.EADDRINUSE
            else ""
        )
        raise CannotListen(f"cannot listen on {host}:{port}: {reason}{hint}") from exc
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server on a socket bound beforehand, announcing itself as usual.

    On Ctrl-C (or SIGTERM) it ends the API's event streams first: uvicorn waits
    for every open response before it stops, and a stream never ends by itself.
    """

    def __init__(self, config: uvicorn.Config, *, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.on_exit()
        super().handle_exit(sig, frame)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and sockets:
            host, port = sockets[0].getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            logging.getLogger("uvicorn.error").info(
                "Uvicorn running on http://%s:%d (Press CTRL+C to quit)", shown, port
            )


def serve(
    *, host: str, port: int, db: str, token: str | None, demo: bool, metrics: bool = False
) -> int:
    """Run the demo server until interrupted.

    Raises :class:`CannotListen`, having seeded and printed nothing, when the
    address cannot be listened on.
    """
    sock = listen(host, port)
    try:
        return _serve_on(sock, host=host, db=db, token=token, demo=demo, metrics=metrics)
    finally:
        sock.close()


def _serve_on(
    sock: socket.socket,
    *,
    host: str,
    db: str,
    token: str | None,
    demo: bool,
    metrics: bool = False,
) -> int:
    port: int = sock.getsockname()[1]
    directory = os.path.dirname(db)
    if directory:
        os.makedirs(directory, exist_ok=True)
    tokens, token = _tokens(token)
    project_id = nightly_id = None
    if demo:
        suffix = secrets.token_hex(3)
        project_id, nightly_id = "proj-" + suffix, "nightly-" + suffix
        setup = SQLiteStorage(db)
        try:
            create_demo_project(setup, project_id)
            create_nightly_project(setup, nightly_id)
        finally:
            setup.close()
    app = build_app(db, tokens, metrics=metrics)
    print(
        banner(host=host, port=port, project_id=project_id, token=token, nightly_id=nightly_id),
        flush=True,
    )
    # A header up to MAX_HEADER_BYTES (an oversized token) reaches the API and gets
    # its JSON 401, rather than h11's plain-text 400 at 16 KiB.
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )
    server = _Server(config, on_exit=app.state.retry_api.close_streams)
    # uvicorn raises the Ctrl-C it handled again once shut down; stopping is the normal end.
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
    return 0 if server.started else 1  # not started: the application's start-up failed


if __name__ == "__main__":  # pragma: no cover
    sys.exit(serve(host="127.0.0.1", port=8000, db="deepwork-demo/demo.db", token=None, demo=True))
