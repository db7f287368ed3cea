"""End to end, POST /retry to the executor's start.

In-process thread and asyncio dispatchers; relay-only on PostgreSQL
(LISTEN/NOTIFY) and SQLite (polling).
"""

from __future__ import annotations

from pathlib import Path

from _harness import Row, unavailable


def run(quick: bool, scratch: Path, logs: Path) -> list[Row]:
    """The group's rows (sizes smaller with ``quick``)."""
    return [unavailable("dispatch", "dispatch", "not built yet")]
