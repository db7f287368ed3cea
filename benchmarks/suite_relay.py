"""Outbox relay throughput, one and several relays, and a 100,000-entry backlog drain."""

from __future__ import annotations

from pathlib import Path

from _harness import Row, unavailable


def run(quick: bool, scratch: Path, logs: Path) -> list[Row]:
    """The group's rows (sizes smaller with ``quick``)."""
    return [unavailable("relay", "relay", "not built yet")]
