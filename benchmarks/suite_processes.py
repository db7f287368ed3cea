"""The demo's stack on PostgreSQL with 1 and 2 server processes."""

from __future__ import annotations

from pathlib import Path

from _harness import Row, unavailable


def run(quick: bool, scratch: Path, logs: Path) -> list[Row]:
    """The group's rows (sizes smaller with ``quick``)."""
    return [unavailable("processes", "processes", "not built yet")]
