"""The demo server (``./dev serve``) serves the event stream, and its Ctrl-C ends the streams."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import uvicorn
from web_harness import serve_asgi

from deepwork_retry import ExecutorService
from deepwork_retry.auth import Principal, StaticTokens
from deepwork_retry.ports import AsyncEventLog
from deepwork_retry.server import _Server, build_app
from deepwork_retry.storage.sqlite import AsyncSQLiteStorage, SQLiteStorage

TOKEN = "demo-token-0123456789"


def test_demo_server_serves_the_event_stream(tmp_path: Path) -> None:
    db = str(tmp_path / "demo.db")
    setup = SQLiteStorage(db)
    try:
        ExecutorService(setup).create_project("proj-sse")
    finally:
        setup.close()
    app = build_app(db, StaticTokens({TOKEN: Principal(id="demo-user")}), pause=0.0)
    base, stop = serve_asgi(app, lifespan="on")
    keeps_events = isinstance(AsyncSQLiteStorage(db), AsyncEventLog)
    try:
        with httpx.Client(base_url=base, timeout=15) as http:
            path = "/api/deep-work/projects/proj-sse/events"
            with http.stream("GET", path, headers={"Authorization": f"Bearer {TOKEN}"}) as answer:
                if keeps_events:
                    assert answer.status_code == 200
                    assert next(answer.iter_lines()) == "retry: 2000"
                else:  # until the SQLite storage keeps events
                    answer.read()
                    assert answer.status_code == 501
                    assert answer.json()["code"] == "events_not_kept"
            unauthenticated = http.get(path)
            assert unauthenticated.status_code == 401
            document = http.get("/openapi.json").json()
            assert "get" in document["paths"][path.replace("proj-sse", "{project_id}")]
    finally:
        app.state.retry_api.close_streams()
        stop()


def test_demo_server_ends_streams_on_ctrl_c(tmp_path: Path) -> None:
    app = build_app(str(tmp_path / "demo.db"), StaticTokens())
    closed: list[bool] = []
    server = _Server(uvicorn.Config(app), on_exit=lambda: closed.append(True))
    server.handle_exit(signal.SIGINT, None)
    assert closed == [True]
    assert server.should_exit
    # What the demo passes: the API's own close_streams.
    api = app.state.retry_api
    api.close_streams()
    assert api.streams_closing
