"""Fixtures of the web tests: one real server per adapter, sharing one world."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from web_harness import ADAPTERS, World, start_server


@pytest.fixture(scope="session")
def world() -> World:
    return World()


@pytest.fixture(scope="session", params=ADAPTERS)
def server(request: pytest.FixtureRequest, world: World) -> Iterator[str]:
    """The base URL of one adapter's server (each adapter in turn)."""
    url, stop = start_server(request.param, world)
    try:
        yield url
    finally:
        stop()


@pytest.fixture
def adapter(request: pytest.FixtureRequest, server: str) -> str:
    """The name of the adapter ``server`` runs (for rows its server decides itself)."""
    return str(request.node.callspec.params["server"])


@pytest.fixture
def http(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=10) as client:
        yield client


@pytest.fixture(autouse=True)
def _storage_up(world: World) -> Iterator[None]:
    yield
    world.storage.down = False
    world.storage.broken.clear()
    world.storage.applies_left = None
    world.recorder.failing.clear()
