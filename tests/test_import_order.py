"""Every module of the package imports on its own, as the first import of a fresh
interpreter, and none imports from a layer above its own."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import deepwork_retry

SKIPPED = {
    "deepwork_retry.__main__": "runs the command line when imported",
    "deepwork_retry.web.django.urls": "Django reads its settings at import, as for any URLconf",
    "deepwork_retry.web.django.models": "Django models need configured settings and apps",
    "deepwork_retry.web.django.admin": "Django admin modules need configured settings and apps",
    "deepwork_retry.web.django.storage": "it uses the app's models (configured settings)",
    "deepwork_retry.web.django.migrations": "Django loads its migrations itself",
}


def modules() -> list[str]:
    found = ["deepwork_retry"]
    found += [m.name for m in pkgutil.walk_packages(deepwork_retry.__path__, "deepwork_retry.")]
    return sorted(
        m for m in found if m not in SKIPPED and not m.startswith(tuple(f"{s}." for s in SKIPPED))
    )


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
    expected = {
        "deepwork_retry.web._async_api",
        "deepwork_retry.web._sync_api",
        "deepwork_retry.web._http",
    }
    assert expected == expected & found


def test_every_module_imports_first() -> None:
    """Importing any module before anything else of the package succeeds (no import cycles)."""
    names = modules()
    with ThreadPoolExecutor(max_workers=4) as pool:
        errors = dict(zip(names, pool.map(import_first, names), strict=True))
    assert {} == {name: error for name, error in errors.items() if error}


# -- no import runs back up a layer ------------------------------------------------------

PACKAGE = Path(deepwork_retry.__file__).resolve().parent

LAYERS: list[tuple[str, ...]] = [
    # errors: imported by everything, importing nothing at run time
    ("deepwork_retry.exceptions",),
    # the pure core: states, the transition table, rules, plans
    ("deepwork_retry._core",),
    # what the services need from the outside world, as protocols and small helpers
    (
        "deepwork_retry.ports",
        "deepwork_retry.auth",
        "deepwork_retry._wiring",
        "deepwork_retry._log",
        "deepwork_retry._hooks",
        "deepwork_retry._trace",
        "deepwork_retry._async._compat",
        "deepwork_retry._sync._compat",
    ),
    # the storages
    ("deepwork_retry.storage",),
    # the services (the hand-written async ones and their generated twins), and the
    # package's face that exports them
    ("deepwork_retry._async", "deepwork_retry._sync", "deepwork_retry"),
    # the HTTP protocol: requests, responses, routes, the error table, option parsers,
    # and the Server-Sent Events frames and bounds
    ("deepwork_retry.web._http", "deepwork_retry.web._sse"),
    # the framework-free API over the services
    ("deepwork_retry.web._async_api", "deepwork_retry.web._sync_api", "deepwork_retry.web._api"),
    # the operator dashboard: pages over the API, no framework
    ("deepwork_retry.web.dashboard",),
    # what hosts plug in: web adapters, dispatchers and their workers, the kit, the programs
    (
        "deepwork_retry.web",
        "deepwork_retry.dispatch",
        "deepwork_retry.testing",
        "deepwork_retry.events",
        "deepwork_retry.webhooks",
        "deepwork_retry.demo",
        "deepwork_retry.server",
        "deepwork_retry.cli",
        "deepwork_retry.__main__",
        "deepwork_retry.telemetry",
    ),
]
"""The package's layers, lowest first: a module imports only from its own layer or below."""


def _holds(entry: str, module: str) -> bool:
    # The package's own name stands for its face alone, not for every module in it.
    return module == entry or (entry != "deepwork_retry" and module.startswith(entry + "."))


def layer_of(module: str) -> int | None:
    """The layer of the longest entry that is ``module`` or a package holding it."""
    best: tuple[int, int] | None = None
    for number, entries in enumerate(LAYERS):
        for entry in entries:
            if _holds(entry, module) and (best is None or len(entry) > best[0]):
                best = (len(entry), number)
    return None if best is None else best[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
    )


def imports_run(path: Path) -> list[str]:
    """The package's modules that ``path`` imports when it runs (``if TYPE_CHECKING:`` aside)."""
    found: list[str] = []
    pending: list[ast.AST] = [ast.parse(path.read_text(), str(path))]
    while pending:
        node = pending.pop()
        if _type_checking_only(node):
            assert isinstance(node, ast.If)
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        pending.extend(ast.iter_child_nodes(node))
    return [m for m in found if m == "deepwork_retry" or m.startswith("deepwork_retry.")]


def package_sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    """A new module is placed in a layer before it lands, so the check below covers it."""
    assert [] == [module_name(p) for p in package_sources() if layer_of(module_name(p)) is None]


def test_no_import_runs_up_a_layer() -> None:
    """Every import a module runs names a module of its own layer or of one below it."""
    upward = []
    for path in package_sources():
        here = module_name(path)
        level = layer_of(here)
        for target in imports_run(path):
            there = layer_of(target)
            if level is not None and there is not None and there > level:
                upward.append(f"{here} (layer {level}) imports {target} (layer {there})")
    assert [] == upward


def test_the_layer_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The check is not blind: the storage importing the services is reported."""
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from deepwork_retry._async.services import AsyncRetryService\n"
        "if TYPE_CHECKING:\n"
        "    from deepwork_retry.cli import main\n"
    )
    found = [(t, layer_of(t)) for t in imports_run(source)]
    expected = [("deepwork_retry._async.services", 4)]
    assert (expected, 3) == (found, layer_of("deepwork_retry.storage.sqlite"))
