"""MkDocs hooks for the documentation site (``mkdocs.yml``: ``hooks``).

- Pages that live outside ``docs/`` join the site as they are: the README as
  the home page, the changelog, the benchmarks' README, and a page showing the
  runnable examples.
- Links keep working on the site as they do in the repository: a relative link
  is resolved against the file it is written in, and one that reaches a file
  published under another name (``docs/install.md`` from the README, the
  ``examples/`` folder, a folder's ``index.md``) is rewritten to that page.
  Links that reach nothing are left for the strict build to report.
- A Mermaid state diagram is drawn as inline SVG at build time
  (``scripts/state_diagram.py``), so the site needs no script from elsewhere.
"""

from __future__ import annotations

import posixpath
import re
import sys
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from state_diagram import render_mermaid_blocks  # noqa: E402 - after sys.path

# Repository file -> the page that publishes it (besides docs/*, published as is).
OUTSIDE = {
    "README.md": "index.md",
    "CHANGELOG.md": "changelog.md",
    "benchmarks/README.md": "benchmarks.md",
}
EXAMPLES_PAGE = "examples.md"
PUBLISHED = {**OUTSIDE, "examples": EXAMPLES_PAGE}  # every link target that is not docs/*
LINK = re.compile(r"(?<!!)\]\((?P<target>[^)\s]+)\)")


def on_files(files: Files, config: Any) -> Files:
    for source, uri in OUTSIDE.items():
        files.append(File.generated(config, uri, abs_src_path=str(ROOT / source)))
    files.append(File.generated(config, EXAMPLES_PAGE, content=_examples_page()))
    return files


def on_page_markdown(markdown: str, page: Page, config: Any, files: Files) -> str:
    origin = _origin(page.file.src_uri)
    markdown = LINK.sub(lambda m: _relink(m, origin, page.file.src_uri, files), markdown)
    return render_mermaid_blocks(markdown)


def _origin(src_uri: str) -> str:
    """Where the page's source lives in the repository."""
    for source, uri in OUTSIDE.items():
        if uri == src_uri:
            return source
    if src_uri == EXAMPLES_PAGE:
        return "examples/README.md"
    return f"docs/{src_uri}"


def _relink(match: re.Match[str], origin: str, src_uri: str, files: Files) -> str:
    """The link as the site needs it: to the page that publishes what it reaches."""
    target = match["target"]
    if "://" in target or target.startswith(("#", "mailto:", "/")):
        return match.group(0)
    path, hash_, anchor = target.partition("#")
    repo_path = posixpath.normpath(posixpath.join(posixpath.dirname(origin), path))
    uri: str | None = PUBLISHED.get(repo_path)
    if uri is None and repo_path.startswith("docs/"):
        inside = repo_path.removeprefix("docs/")
        if path.endswith("/") or files.get_file_from_path(inside) is None:
            index = posixpath.join(inside, "index.md")
            if files.get_file_from_path(index) is not None:
                uri = index
        elif origin != f"docs/{src_uri}":
            uri = inside
    if uri is None:
        return match.group(0)
    relative = posixpath.relpath(uri, posixpath.dirname(src_uri) or ".")
    return f"]({relative}{hash_}{anchor})"


def _examples_page() -> str:
    """The single-file examples, each file's code under its name."""
    lines = [
        "# Examples",
        "",
        "Runnable applications, one per framework, in the repository's `examples/`",
        "folder (the Django project and the distributed setup are folders of",
        "their own there). Each serves the retry API over in-memory storage with",
        "one blocked task and prints a ready-to-paste `curl`.",
        "",
    ]
    for path in sorted((ROOT / "examples").glob("*_app.py")):
        lines += [
            f"## `examples/{path.name}`",
            "",
            "```python",
            path.read_text().rstrip(),
            "```",
            "",
        ]
    return "\n".join(lines)
