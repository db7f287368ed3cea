"""Web adapters are leaf modules: imported on demand, and clear when their extra is missing."""

from __future__ import annotations

import subprocess
import sys

import pytest

FRAMEWORKS = ["starlette", "fastapi", "flask", "django", "aiohttp", "werkzeug", "pydantic"]


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_core_and_web_api_import_no_framework() -> None:
    """``deepwork_retry``, its auth ports and the framework-free web API import no framework."""
    code = (
        "import sys, deepwork_retry, deepwork_retry.auth, deepwork_retry.web\n"
        f"print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))"
    )
    done = run(code)
    assert (0, "[]") == (done.returncode, done.stdout.strip()), done.stderr


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        ("starlette", "starlette", "starlette"),
        ("fastapi", "fastapi", "fastapi"),
        ("flask", "flask", "flask"),
        ("django", "django", "django"),
        ("aiohttp", "aiohttp", "aiohttp"),
    ],
)
def test_missing_framework_names_the_extra(module: str, blocked: str, extra: str) -> None:
    """Importing an adapter without its framework raises ImportError naming the extra."""
    code = (
        f"import sys; sys.modules[{blocked!r}] = None\n"
        "try:\n"
        f"    import deepwork_retry.web.{module}\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = run(code)
    assert f"pip install 'deepwork-retry[{extra}]'" in done.stdout, done.stdout + done.stderr
