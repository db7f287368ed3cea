"""10,000 attempts failing at once, re-dispatched with backoff."""

from __future__ import annotations

from pathlib import Path

from _harness import Row, unavailable


def run(quick: bool, scratch: Path, logs: Path) -> list[Row]:
    """The group's rows (sizes smaller with ``quick``)."""
    return [unavailable("storm", "storm", "not built yet")]
