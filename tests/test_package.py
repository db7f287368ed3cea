"""Packaging promises: a light import, typed, generated files current."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

HEAVY = [
    "starlette",
    "fastapi",
    "flask",
    "django",
    "aiohttp",
    "uvicorn",
    "psycopg",
    "psycopg_pool",
    "celery",
    "kombu",
    "dramatiq",
    "redis",
    "pika",
    "hypothesis",
    "pytest",
    "httpx",
    "pydantic",
]


def test_import_pulls_in_no_framework_driver_or_queue_client() -> None:
    """`import deepwork_retry` in a fresh interpreter loads none of the optional packages."""
    code = (
        "import json, sys; import deepwork_retry; "
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert [] == json.loads(out.stdout)


def test_package_is_marked_typed() -> None:
    """The package ships a py.typed marker so type checkers use its annotations."""
    assert (ROOT / "deepwork_retry" / "py.typed").exists()


@pytest.mark.parametrize("script", ["unasync.py", "gen_docs.py"])
def test_generated_files_are_current(script: str) -> None:
    """The sync twins and the state-machine page match their sources."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert (0, "") == (done.returncode, done.stderr)


def test_public_names_resolve() -> None:
    """Every name in `deepwork_retry.__all__` is importable."""
    import deepwork_retry

    missing = [name for name in deepwork_retry.__all__ if not hasattr(deepwork_retry, name)]
    assert [] == missing
