"""Every example under ``examples/`` runs as its own process and answers one retry request."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TOKEN = "example-test-token"
RETRY = "/api/deep-work/projects/demo/tasks/task-3/retry"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def command(name: str, port: int) -> tuple[list[str], Path]:
    if name == "django_app":
        manage = ["manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"]
        return [sys.executable, *manage], EXAMPLES / "django_app"
    return [sys.executable, str(EXAMPLES / f"{name}.py")], ROOT


@pytest.fixture(params=["starlette_app", "fastapi_app", "flask_app", "aiohttp_app", "django_app"])
def example(request: pytest.FixtureRequest) -> Iterator[str]:
    """The base URL of one example, started as a process on a free loopback port."""
    port = free_port()
    argv, cwd = command(request.param, port)
    env = {**os.environ, "PORT": str(port), "DEEPWORK_TOKENS": f"{TOKEN}=tester"}
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                httpx.get(base + "/api/deep-work/projects/demo/progress", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


def test_example_retries_the_blocked_task(example: str) -> None:
    """The example's blocked demo task is retried by one authenticated POST."""
    response = httpx.post(example + RETRY, headers={"Authorization": f"Bearer {TOKEN}"})
    assert 200 == response.status_code, response.text
    body = response.json()
    assert ("assigned", 1, None, "dispatched") == (
        body["task"]["status"],
        body["task"]["retry_count"],
        body["task"]["error_message"],
        body["dispatch"]["status"],
    )
