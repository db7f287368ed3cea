"""End to end: the demo server as a real process, driven by the seed's own snippets."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Demo:
    def __init__(self, proc: subprocess.Popen[str], port: int, values: dict[str, str]) -> None:
        self.proc = proc
        self.port = port
        self.token = values["TOKEN"]
        self.project_id = values["PROJECT_ID"]
        self.task_id = values["TASK_ID"]
        self.dashboard = values.get("Dashboard", "")
        self.base = f"http://localhost:{port}/api/deep-work"


def _start(db: Path, port: int) -> Demo:
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepwork_retry", "serve", "--port", str(port), "--db", str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    values: dict[str, str] = {}
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        for key in ("TOKEN", "PROJECT_ID", "TASK_ID"):
            if line.startswith(key + "="):
                values[key] = line.strip().split("=", 1)[1]
        if line.startswith("Dashboard: "):
            values["Dashboard"] = line.split()[1]
        if "Uvicorn running on" in line:
            return Demo(proc, port, values)
    proc.kill()
    raise AssertionError(f"demo server did not start; saw {values}")


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    server = _start(tmp_path / "demo.db", _free_port())
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGINT)
            try:
                server.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()


def _curl_retry(demo: Demo) -> tuple[int, dict[str, object]]:
    """The seed's first snippet, verbatim but for the placeholders (plus -w for the status)."""
    url = f"http://localhost:{demo.port}/api/deep-work/projects/{demo.project_id}/tasks/{demo.task_id}/retry"
    out = subprocess.run(
        ["curl", "-s", "-w", "\n%{http_code}", "-X", "POST", url,
         "-H", f"Authorization: Bearer {demo.token}"],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    body, status = out.stdout.rsplit("\n", 1)
    return int(status), json.loads(body)


def test_seed_curl_retries_the_blocked_demo_task(demo: Demo) -> None:
    """The seed's curl against the demo server returns the seed's example response."""
    status, data = _curl_retry(demo)
    assert 200 == status
    assert True is data["success"]
    task = data["task"]
    assert isinstance(task, dict)
    assert ("task-3", "Implement user authentication", "assigned", 2, 1, None) == (
        task["id"], task["title"], task["status"], task["retry_count"], task["max_retries"],
        task["error_message"],
    )  # fmt: skip
    progress = data["progress"]
    assert isinstance(progress, dict)
    assert (8, 4, 1, 50) == (
        progress["total"], progress["completed"], progress["in_progress"], progress["percent"]
    )  # fmt: skip
    dispatch = data["dispatch"]
    assert isinstance(dispatch, dict)
    assert "dispatched" == dispatch["status"]


def test_second_curl_gets_the_contract_400(demo: Demo) -> None:
    """Retrying the same task again is refused with the status it now has."""
    assert 200 == _curl_retry(demo)[0]
    status, data = _curl_retry(demo)
    assert (400, "task_not_blocked") == (status, data["code"])
    assert data["detail"] in (
        "Can only retry tasks with status 'blocked', got 'assigned'",
        "Can only retry tasks with status 'blocked', got 'in_progress'",
        "Can only retry tasks with status 'blocked', got 'done'",
    )


def test_seed_httpx_snippet_and_the_executor_finishes_the_task(demo: Demo) -> None:
    """The seed's httpx snippet works, and the in-process executor then completes the task."""
    res = httpx.post(
        f"http://localhost:{demo.port}/api/deep-work/projects/{demo.project_id}/tasks/{demo.task_id}/retry",
        headers={"Authorization": f"Bearer {demo.token}"},
    )
    data = res.json()
    assert (200, "assigned") == (res.status_code, data["task"]["status"])
    headers = {"Authorization": f"Bearer {demo.token}"}
    deadline = time.monotonic() + 30
    status = None
    while time.monotonic() < deadline:
        got = httpx.get(f"{demo.base}/projects/{demo.project_id}/tasks/task-3", headers=headers)
        status = got.json()["task"]["status"]
        if status == "done":
            break
        time.sleep(0.2)
    assert "done" == status


def test_seed_second_snippet_with_json_content_type_and_no_body(demo: Demo) -> None:
    """The seed's `requests` snippet (Content-Type: application/json, no body) is accepted."""
    import requests

    response = requests.post(
        f"http://localhost:{demo.port}/api/deep-work/projects/{demo.project_id}/tasks/{demo.task_id}/retry",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {demo.token}"},
        timeout=30,
    )
    assert (200, 2) == (response.status_code, response.json()["task"]["retry_count"])


def test_wrong_token_is_refused(demo: Demo) -> None:
    """A token the server did not print gets the contract's 401."""
    res = httpx.post(
        f"{demo.base}/projects/{demo.project_id}/tasks/task-3/retry",
        headers={"Authorization": "Bearer not-the-token"},
    )
    assert (401, {"detail": "Invalid token", "code": "invalid_token"}) == (
        res.status_code,
        res.json(),
    )


def test_ctrl_c_stops_the_server_cleanly(demo: Demo) -> None:
    """SIGINT (Ctrl-C) shuts the server down with exit status 0."""
    demo.proc.send_signal(signal.SIGINT)
    assert 0 == demo.proc.wait(timeout=20)


SEED_FETCH = """
const res = await fetch(
'http://localhost:8000/api/deep-work/projects/PROJECT_ID/tasks/TASK_ID/retry',
{
method: 'POST',
headers: { 'Authorization': 'Bearer YOUR_TOKEN' },
}
);
const data = await res.json();
console.log(JSON.stringify({ status: res.status, data }));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_seed_fetch_snippet_with_node(demo: Demo, tmp_path: Path) -> None:
    """The seed's JavaScript `fetch` snippet, run by Node.js, retries the blocked task."""
    script = (
        SEED_FETCH.replace("localhost:8000", f"localhost:{demo.port}")
        .replace("PROJECT_ID", demo.project_id)
        .replace("TASK_ID", demo.task_id)
        .replace("YOUR_TOKEN", demo.token)
    )
    path = tmp_path / "retry.mjs"
    path.write_text(script)
    out = subprocess.run(
        ["node", str(path)], capture_output=True, text=True, check=True, timeout=60
    )
    result = json.loads(out.stdout)
    assert (200, True, "assigned") == (
        result["status"], result["data"]["success"], result["data"]["task"]["status"]
    )  # fmt: skip


def test_demo_answers_the_edges_in_json(demo: Demo) -> None:
    """The demo answers in JSON at the edges: no redirect built from Host, 405, long tokens."""
    auth = {"Authorization": f"Bearer {demo.token}"}
    with httpx.Client(timeout=10) as client:
        bare = client.get(demo.base, headers={**auth, "Host": "evil.example"})
        options = client.options(
            f"{demo.base}/projects/{demo.project_id}/tasks/{demo.task_id}/retry", headers=auth
        )
        token = "T0k" * 34_000
        long_token = client.get(
            f"{demo.base}/projects/{demo.project_id}/progress",
            headers={"Authorization": f"Bearer {token}"},
        )
    assert (404, {"detail": "Not Found", "code": "route_not_found"}, None) == (
        bare.status_code,
        bare.json(),
        bare.headers.get("location"),
    )
    assert (405, {"detail": "Method Not Allowed", "code": "method_not_allowed"}, "POST") == (
        options.status_code,
        options.json(),
        options.headers["allow"],
    )
    assert (401, {"detail": "Invalid token", "code": "invalid_token"}) == (
        long_token.status_code,
        long_token.json(),
    )
