"""Field-by-field comparison for the kit's checks: a failure names the field and both values.

``==`` on the library's values leaves out what their equality ignores (a
task's ``metadata``) and, when it fails outside pytest's assertion rewriting,
says nothing about where two values differ. :func:`check_same` compares every
field of attrs classes, sequences and mappings, and raises an
``AssertionError`` that names the first differing field and both values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["check_same", "difference"]


def _label(item: Any, index: int) -> str:
    for name in ("key", "id"):
        value = getattr(item, name, None)
        if value is not None and not callable(value):
            return f"[{index} {value!r}]"
    return f"[{index}]"


def difference(expected: Any, actual: Any, path: str = "") -> str | None:
    """Where ``actual`` first differs from ``expected``, as ``path: expected X, got Y``."""
    where = path or "value"
    if attrs.has(type(expected)) or attrs.has(type(actual)):
        if type(expected) is not type(actual):
            return f"{where}: expected {expected!r}, got {actual!r}"
        for field in attrs.fields(type(expected)):
            found = difference(
                getattr(expected, field.name), getattr(actual, field.name), f"{path}.{field.name}"
            )
            if found is not None:
                return found
        return None
    if isinstance(expected, Mapping) and isinstance(actual, Mapping):
        if set(expected) != set(actual):
            keys = sorted(map(repr, expected)), sorted(map(repr, actual))
            return f"{where} keys: expected {keys[0]}, got {keys[1]}"
        for key in expected:
            found = difference(expected[key], actual[key], f"{path}[{key!r}]")
            if found is not None:
                return found
        return None
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        if len(expected) != len(actual):
            return (
                f"{where}: expected {len(expected)} items {list(expected)!r}, "
                f"got {len(actual)} {list(actual)!r}"
            )
        for index, (one, other) in enumerate(zip(expected, actual, strict=True)):
            found = difference(one, other, f"{path}{_label(one, index)}")
            if found is not None:
                return found
        return None
    if expected != actual or (expected is None) is not (actual is None):
        return f"{where}: expected {expected!r}, got {actual!r}"
    return None


def check_same(expected: Any, actual: Any, what: str) -> None:
    """Raise ``AssertionError`` naming the first field where ``actual`` and ``expected`` differ."""
    found = difference(expected, actual)
    if found is not None:
        raise AssertionError(f"{what}: {found}")
