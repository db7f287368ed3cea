"""RQ and Huey/Dramatiq manual requeue against the library."""

from __future__ import annotations

from pathlib import Path

from _harness import Row, unavailable


def run(quick: bool, scratch: Path, logs: Path) -> list[Row]:
    """The group's rows (sizes smaller with ``quick``)."""
    return [unavailable("queue-peers", "queue-peers", "not built yet")]
