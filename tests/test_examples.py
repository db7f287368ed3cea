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


ADMIN_PASSWORD = "example-admin-password"


@pytest.fixture(params=["starlette_app", "fastapi_app", "flask_app", "aiohttp_app", "django_app"])
def example(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The base URL of one example, started as a process on a free loopback port."""
    yield from _started(request.param, tmp_path)


@pytest.fixture
def django_example(tmp_path: Path) -> Iterator[str]:
    """The Django example, migrated, with a superuser ``admin``, started."""
    yield from _started("django_app", tmp_path)


def _started(name: str, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    argv, cwd = command(name, port)
    env = {**os.environ, "PORT": str(port), "DEEPWORK_TOKENS": f"{TOKEN}=tester"}
    if name == "django_app":
        # The project's own database (DjangoStorage and the admin's tables), migrated.
        env["EXAMPLE_DATABASE"] = str(tmp_path / "example.sqlite3")
        env["DJANGO_SUPERUSER_PASSWORD"] = ADMIN_PASSWORD
        for step in (
            ["migrate", "--noinput"],
            ["createsuperuser", "--noinput", "--username", "admin", "--email", "a@example.com"],
        ):
            subprocess.run(
                [sys.executable, "manage.py", *step], cwd=cwd, env=env, check=True,
                capture_output=True, timeout=120,
            )  # fmt: skip
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


def test_django_example_keeps_tasks_in_its_database_and_shows_them_in_the_admin(
    django_example: str,
) -> None:
    """The Django example's tasks live in its own database (``DjangoStorage``): a retry
    through the API is seen in the admin, by a superuser signed in through its form."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert 200 == httpx.post(django_example + RETRY, headers=headers).status_code
    with httpx.Client(base_url=django_example) as browser:
        login = browser.get("/admin/login/")
        assert 200 == login.status_code
        signed_in = browser.post(
            "/admin/login/?next=/admin/",
            data={
                "username": "admin",
                "password": ADMIN_PASSWORD,
                "csrfmiddlewaretoken": browser.cookies["csrftoken"],
                "next": "/admin/",
            },
            headers={"Referer": django_example + "/admin/login/"},
        )
        assert 302 == signed_in.status_code, signed_in.text
        tasks = browser.get("/admin/deepwork_retry/task/")
        assert 200 == tasks.status_code
        assert "task-3" in tasks.text
        assert "assigned" in tasks.text  # the API's retry, committed in the same database
        attempts = browser.get("/admin/deepwork_retry/attempt/")
        assert 200 == attempts.status_code
        assert "tester" in attempts.text  # the retry's actor: the API token's principal
