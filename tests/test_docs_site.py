"""The documentation site builds with every warning an error, and has its pages.

The build is the one `./dev docs` runs (mkdocs.yml, `--strict`): a broken link
or anchor between pages, or a docstring naming an object that is not
documented, fails it. Without the `docs` dependency group the test skips,
unless DEEPWORK_REQUIRE_SERVICES=1 (CI), where that is a failure; on Python
3.10, where the group installs nothing (its tools need 3.11+), it skips.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REQUIRE_SERVICES = os.environ.get("DEEPWORK_REQUIRE_SERVICES") == "1"


def require_docs_tools() -> None:
    """Skip (or, with DEEPWORK_REQUIRE_SERVICES=1, fail) without the `docs` group."""
    if sys.version_info < (3, 11):
        pytest.skip(
            "the documentation tools need Python 3.11+ (on 3.10 the `docs` group installs"
            " nothing; CI builds the site with ./dev docs on the newest Python)"
        )
    missing = [
        name
        for name in ("mkdocs", "material", "mkdocstrings_handlers.python", "griffe")
        if importlib.util.find_spec(name.split(".")[0]) is None
        or importlib.util.find_spec(name) is None
    ]
    if missing:
        message = (
            f"the documentation tools are not installed ({', '.join(missing)}):"
            " pip install --group docs"
        )
        if REQUIRE_SERVICES:
            pytest.fail(f"{message}, and DEEPWORK_REQUIRE_SERVICES=1", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_docs_tools()
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert 0 == done.returncode, f"mkdocs build --strict failed:\n{done.stderr}"
    return out


def page(site: Path, path: str) -> str:
    return (site / path / "index.html").read_text()


def test_the_readme_is_the_home_page_and_its_links_reach_the_pages(site: Path) -> None:
    """The README's links to docs/*.md point at the pages, not at the repository's files."""
    home = (site / "index.html").read_text()
    assert "Retrying a blocked task from Python" in home
    assert 'href="install/"' in home
    assert 'href="examples/"' in home
    assert "docs/install.md" not in home


def test_the_state_diagram_is_drawn_without_a_script(site: Path) -> None:
    """The generated state machine page shows its diagram as SVG, every state and edge in it."""
    html = page(site, "state-machine")
    start = html.index('<figure class="state-diagram">')
    svg = html[start : html.index("</svg>", start)]
    for state in ("inbox", "assigned", "in_progress", "review", "blocked", "done", "skipped"):
        assert f">{state}<" in svg
    block = (ROOT / "docs" / "state-machine.md").read_text().split("```mermaid\n")[1]
    edges = re.findall(r"^    (\w+) --> (\w+): (.+)$", block.split("```")[0], re.M)
    assert 15 <= len(edges)
    for source, target, events in edges:
        assert f"{source} to {target} on {events}" in svg
    assert "language-mermaid" not in html


def test_a_page_per_storage_and_per_framework(site: Path) -> None:
    """Each storage and each web framework has its own page."""
    for storage in ("memory", "sqlite", "postgres", "sqlalchemy", "django"):
        assert (site / "storage" / storage / "index.html").is_file()
    for framework in ("starlette", "fastapi", "flask", "django", "aiohttp"):
        assert (site / "web" / framework / "index.html").is_file()


def test_the_api_reference_is_read_from_the_docstrings(site: Path) -> None:
    """The reference documents the public objects, and docstring references become links."""
    ports = page(site, "reference/ports")
    assert 'id="deepwork_retry.ports.Storage"' in ports
    assert 'id="deepwork_retry.ports.Storage.apply"' in ports
    assert ":class:" not in ports
    top = page(site, "reference/deepwork_retry")
    assert 'id="deepwork_retry.RetryService"' in top
    assert 'href="../exceptions/#deepwork_retry.exceptions.StorageUnavailable"' in top
    for path in ("exceptions", "auth", "storage-sqlite", "dispatch", "web", "testing"):
        assert 'class="doc doc-heading"' in page(site, f"reference/{path}")


def test_the_site_loads_nothing_from_another_host(site: Path) -> None:
    """No script, stylesheet or font comes from elsewhere: the site works offline."""
    outside = re.compile(r'<(?:script|link|img)\b[^>]*\b(?:src|href)="(?:https?:)?//', re.I)
    for html in site.rglob("*.html"):
        text = html.read_text()
        found = outside.search(text)
        assert found is None, f"{html.relative_to(site)}: {found and found.group(0)}"


def test_a_docstring_role_becomes_a_checked_link(tmp_path: Path) -> None:
    """Sphinx roles in docstrings become autorefs links; a name found nowhere, one that fails."""
    require_docs_tools()
    import griffe

    package = tmp_path / "deepwork_retry"
    package.mkdir()
    (package / "__init__.py").write_text(
        '"""See :class:`Thing`, :meth:`Thing.go`, :class:`~deepwork_retry.Thing`,\n'
        ":class:`datetime.datetime`, :func:`_helper` and :class:`Missing`.\n\n"
        'Example::\n\n    Thing().go()\n"""\n\n'
        "class Thing:\n    def go(self) -> None: ...\n\n\n"
        "def _helper() -> None: ...\n"
    )
    extensions = griffe.load_extensions(str(ROOT / "scripts" / "docs_roles.py"))
    module = griffe.load(package, extensions=extensions, allow_inspection=False)
    docstring = module.docstring.value
    assert "[`Thing`][deepwork_retry.Thing]" in docstring
    assert "[`Thing.go`][deepwork_retry.Thing.go]" in docstring
    assert docstring.count("[deepwork_retry.Thing]") == 2  # the ~ form shows the last name only
    assert "`datetime.datetime`" in docstring  # another project's: plain code
    assert '<autoref optional identifier="deepwork_retry._helper">' in docstring
    assert "Example:\n\n    Thing().go()" in docstring
    assert "[`Missing`][not-found:Missing]" in docstring
