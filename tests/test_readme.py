"""The README's Python example runs and prints what its comments say, and its mounting
snippets serve a retry."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_readme_example_prints_what_it_claims(tmp_path: Path) -> None:
    """Each `# ...` line after a print in the README example is that print's output."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S)
    assert block is not None
    code = block.group(1)
    expected = [
        line[2:].split("   ")[0].strip() for line in code.splitlines() if line.startswith("# ")
    ]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert expected == [line.strip() for line in out.stdout.splitlines()]


def _snippet_after(readme: str, heading: str) -> str:
    """The first Python block after ``heading`` in the README."""
    found = re.search(r"```python\n(.*?)```", readme[readme.index(heading) :], re.S)
    assert found is not None
    return found.group(1)


def _blocked_task(db: Path) -> None:
    from deepwork_retry import ExecutorService, TaskError
    from deepwork_retry.storage.sqlite import SQLiteStorage

    with SQLiteStorage(db) as storage:
        ex = ExecutorService(storage)
        ex.create_project("p")
        ex.add_task("p", "t", max_retries=0)
        ex.assign("p", "t")
        ex.start("p", "t", 1)
        ex.fail("p", "t", 1, TaskError(type="E", message="boom"))


TOKEN = "readme-token-0123456789"
RETRY = "/api/deep-work/projects/p/tasks/t/retry"


def test_readme_fastapi_snippet_opens_its_async_storage_and_serves_a_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's FastAPI snippet, given only a dispatcher, names an async storage and
    opens it in its lifespan: a retry through it answers 200."""
    import httpx

    from deepwork_retry.testing import AsyncRecordingDispatcher

    code = _snippet_after((ROOT / "README.md").read_text(), "FastAPI (`pip install")
    assert "AsyncSQLiteStorage" in code
    assert "await storage.open()" in code
    _blocked_task(tmp_path / "deepwork.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DEEPWORK_TOKENS", f"{TOKEN}=alice")
    dispatcher = AsyncRecordingDispatcher()
    namespace: dict[str, Any] = {"dispatcher": dispatcher, "__name__": "readme_fastapi"}
    exec(code, namespace)
    app = namespace["app"]

    async def serve() -> httpx.Response:
        # What the server runs around the requests: the app's lifespan.
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test"
            ) as client,
        ):
            return await client.post(RETRY, headers={"Authorization": f"Bearer {TOKEN}"})

    response = asyncio.run(serve())
    assert (200, "dispatched") == (response.status_code, response.json()["dispatch"]["status"])
    assert [("p", "t", 2)] == dispatcher.keys


def test_readme_flask_snippet_serves_a_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's Flask snippet, given only a dispatcher, builds its sync storage and
    serves a retry."""
    from deepwork_retry.testing import RecordingDispatcher

    code = _snippet_after((ROOT / "README.md").read_text(), "Flask (`pip install")
    _blocked_task(tmp_path / "deepwork.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DEEPWORK_TOKENS", f"{TOKEN}=alice")
    dispatcher = RecordingDispatcher()
    namespace: dict[str, Any] = {"dispatcher": dispatcher, "__name__": "readme_flask"}
    exec(code, namespace)
    response = (
        namespace["app"].test_client().post(RETRY, headers={"Authorization": f"Bearer {TOKEN}"})
    )
    namespace["storage"].close()
    assert (200, "dispatched") == (response.status_code, response.get_json()["dispatch"]["status"])
