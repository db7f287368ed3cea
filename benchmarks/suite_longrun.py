"""Resident memory and collector pauses over 1,000,000 retries with pruning."""

from __future__ import annotations

from pathlib import Path

from _harness import Row, unavailable


def run(quick: bool, scratch: Path, logs: Path) -> list[Row]:
    """The group's rows (sizes smaller with ``quick``)."""
    return [unavailable("longrun", "longrun", "not built yet")]
