"""Docstring cross-references for the documentation site (a Griffe extension).

The docstrings name other objects the way Sphinx does (``:class:`Storage```,
``:meth:`~deepwork_retry.ports.Storage.apply```); mkdocstrings renders Markdown.
This extension rewrites each such reference, once the package is loaded, into
a cross-reference that mkdocs-autorefs resolves to the object's heading.
mkdocs-autorefs checks only what a page shows, so the checks below apply to
the docstrings the reference renders, wherever they are written:

- a public object is a required link: if the reference does not document it,
  ``mkdocs build --strict`` fails;
- an internal object (a name with a leading underscore on its path, such as
  the core's functions) is linked where the reference shows it under a public
  name, and is plain code otherwise;
- a name found nowhere becomes a link to ``not-found:NAME``, which never
  resolves: the strict build fails, naming it and the docstring;
- a name outside the package (the standard library, drivers, frameworks) is
  plain code: the site fetches no other project's inventory.

A name is looked up as Sphinx would: a full dotted path, else from the
docstring's own object outwards (its members, inherited ones too, its class,
its module and what the module imports).

The reST literal-block marker (a paragraph ending in ``::`` before an indented
block) becomes a plain colon, since Markdown shows the indented block as code.
"""

from __future__ import annotations

import builtins
import importlib.util
import re
import sys
from typing import Any

import griffe

PACKAGE = "deepwork_retry"
UNKNOWN = "not-found:"  # prefix of the identifier a name found nowhere links to

ROLE = re.compile(
    r":(?:py:)?(?P<role>class|meth|func|mod|attr|data|exc|obj|const):"
    r"`(?P<body>[^`]+)`"
)
LITERAL_MARK = re.compile(r"(?<=\S)::(?=\n\n[ \t])")
EXPLICIT = re.compile(r"^(?P<text>.*?)\s*<(?P<target>[^>]+)>$", re.DOTALL)


class Roles(griffe.Extension):
    """Rewrites Sphinx roles in every docstring of the package into autorefs links."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.path != PACKAGE:
            return
        for obj in _walk(pkg):
            if obj.docstring is not None:
                text = LITERAL_MARK.sub(":", obj.docstring.value)
                obj.docstring.value = ROLE.sub(lambda m, o=obj: _link(o, m), text)


def _walk(obj: griffe.Object) -> list[griffe.Object]:
    found = [obj]
    for member in obj.members.values():
        if not member.is_alias:
            assert isinstance(member, griffe.Object)
            found.extend(_walk(member))
    return found


def _link(obj: griffe.Object, match: re.Match[str]) -> str:
    body = match["body"].strip()
    explicit = EXPLICIT.match(body)
    if explicit:
        text, target = explicit["text"], explicit["target"]
    else:
        target = body
        text = body.lstrip("~.")
        if body.startswith("~"):
            text = text.rsplit(".", 1)[-1]
    target = target.lstrip("~.")
    path = _resolve(obj, target)
    if path is None:
        return f"`{text}`"
    if path == "":
        # A name found nowhere: a reference that can never resolve, so the
        # build fails wherever this docstring is shown (and only there).
        return f"[`{text}`][{UNKNOWN}{target}]"
    if any(part.startswith("_") for part in path.split(".")):
        # A private object (the core's functions, a storage's helpers) is linked
        # where the reference shows it (under a public name) and plain text
        # elsewhere; it exists, so the name in the docstring is not a typo.
        return f'<autoref optional identifier="{path}"><code>{text}</code></autoref>'
    return f"[`{text}`][{path}]"


def _resolve(obj: griffe.Object, target: str) -> str | None:
    """The target's full path; None for a name outside the package; "" when not found."""
    head, _, rest = target.partition(".")
    if head == PACKAGE:
        return _existing(obj, target)
    scope: griffe.Object | None = obj
    while scope is not None:
        if scope.is_class and head in scope.all_members and head not in scope.members:
            # Inherited: documented on this class too (``inherited_members``).
            return f"{scope.path}.{head}" if not rest else _existing(obj, f"{scope.path}.{target}")
        try:
            full = scope.resolve(head)
        except griffe.NameResolutionError:
            scope = scope.parent
            continue
        if not full.startswith(PACKAGE + ".") and full != PACKAGE:
            return None
        found = _existing(obj, f"{full}.{rest}" if rest else full)
        if not found and _is_external(head):
            return None  # a module of that name, shadowed here by a member
        return found
    if _is_external(head):
        return None
    return ""


def _is_external(name: str) -> bool:
    """A builtin, or a module importable from outside the package."""
    if hasattr(builtins, name) or name in sys.stdlib_module_names:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _existing(obj: griffe.Object, path: str) -> str:
    """The canonical path of the object at ``path``, or "" when there is none."""
    try:
        found = obj.modules_collection.get_member(path)
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return ""
    if found is None:
        return ""
    if found.is_alias:
        try:
            return str(found.final_target.path)
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return ""
    return str(found.path)
