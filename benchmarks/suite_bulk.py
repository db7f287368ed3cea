"""Bulk retry of 100,000 blocked tasks against a set-based UPDATE."""

from __future__ import annotations

from pathlib import Path

from _harness import Row, unavailable


def run(quick: bool, scratch: Path, logs: Path) -> list[Row]:
    """The group's rows (sizes smaller with ``quick``)."""
    return [unavailable("bulk", "bulk", "not built yet")]
