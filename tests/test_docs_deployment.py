"""docs/deployment.md is enough to build the deployment: its code runs and its signatures are
the real ones."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")


def test_the_pages_modules_import_and_build_every_piece(tmp_path: Path) -> None:
    """The page's shared module and web module, saved as myapp/deepwork.py and myapp/web.py,
    import and build the Celery task, the dispatchers, the service and the app (no server is
    contacted to build them)."""
    pytest.importorskip("celery")
    pytest.importorskip("psycopg")
    pytest.importorskip("starlette")
    blocks = re.findall(r"```python\n(.*?)```", PAGE, re.S)
    shared = next(b for b in blocks if b.startswith("# myapp/deepwork.py"))
    web = next(b for b in blocks if b.startswith("# web:"))
    package = tmp_path / "myapp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "deepwork.py").write_text(shared)
    (package / "web.py").write_text(web)
    check = (
        "import myapp.deepwork as d, myapp.web as w\n"
        "from deepwork_retry.dispatch.celery import CeleryDispatcher\n"
        "assert d.TASK_NAME in d.app.tasks\n"
        "assert isinstance(d.dispatcher(), CeleryDispatcher)\n"
        "assert w.app.router is not None and w.service is not None\n"
        "print('ok')\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
        "DEEPWORK_DSN": "postgresql://nobody@127.0.0.1:1/none",
        "DEEPWORK_BROKER": "redis://127.0.0.1:1/0",
        "DEEPWORK_TOKENS": "token=alice",
    }
    out = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=120
    )
    assert ("ok\n", 0) == (out.stdout, out.returncode), out.stderr


def _documented(name: str) -> list[str]:
    """The parameter names the page gives for ``name(...)`` in its list of signatures."""
    match = re.search(rf"`{name}\((.*?)\)`", PAGE, re.S)
    assert match is not None, f"{name} has no signature on the page"
    params = []
    for part in " ".join(match.group(1).split()).split(","):
        part = part.strip().split("=")[0].lstrip("*")
        if part and part != "...":
            params.append(part)
    return params


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("deepwork_retry.dispatch.celery", "CeleryDispatcher"),
        ("deepwork_retry.dispatch.celery", "deepwork_task"),
        ("deepwork_retry.dispatch.dramatiq", "DramatiqDispatcher"),
        ("deepwork_retry.dispatch.dramatiq", "deepwork_actor"),
        ("deepwork_retry.dispatch.relay", "run_relay"),
        ("deepwork_retry.dispatch.reaper", "run_reaper"),
    ],
)
def test_documented_signatures_are_the_real_ones(module: str, name: str) -> None:
    """Every parameter the page names exists, in that order, with the default it states."""
    pytest.importorskip(module)
    real = inspect.signature(getattr(__import__(module, fromlist=[name]), name))
    documented = _documented(name)
    names = [p for p in real.parameters if p not in ("clock",)]
    assert [p for p in names if p in documented] == documented
    match = re.search(rf"`{name}\((.*?)\)`", PAGE, re.S)
    assert match is not None
    for part in " ".join(match.group(1).split()).split(","):
        key, _, default = part.strip().partition("=")
        if default and default != "...":
            assert default == repr(real.parameters[key.strip()].default).replace("'", '"'), key
