"""Every module of the package imports on its own, as the first import of a fresh interpreter."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import deepwork_retry

SKIPPED = {
    "deepwork_retry.__main__": "runs the command line when imported",
    "deepwork_retry.web.django.urls": "Django reads its settings at import, as for any URLconf",
}


def modules() -> list[str]:
    found = ["deepwork_retry"]
    found += [m.name for m in pkgutil.walk_packages(deepwork_retry.__path__, "deepwork_retry.")]
    return sorted(m for m in found if m not in SKIPPED)


def import_first(module: str) -> str:
    """The last line of the error importing ``module`` first, or ``""`` when it imports."""
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120
    )
    if done.returncode == 0:
        return ""
    lines = done.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {done.returncode}"


def test_modules_are_found() -> None:
    """The walk sees the API modules whose import order once mattered."""
    found = set(modules())
    expected = {"deepwork_retry._async.api", "deepwork_retry._sync.api", "deepwork_retry.web._http"}
    assert expected == expected & found


def test_every_module_imports_first() -> None:
    """Importing any module before anything else of the package succeeds (no import cycles)."""
    names = modules()
    with ThreadPoolExecutor(max_workers=4) as pool:
        errors = dict(zip(names, pool.map(import_first, names), strict=True))
    assert {} == {name: error for name, error in errors.items() if error}
