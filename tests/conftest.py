"""Shared fixtures: real services, found or skipped (or failed, in CI)."""

from __future__ import annotations

import os
import socket

import pytest

REQUIRE_SERVICES = os.environ.get("DEEPWORK_REQUIRE_SERVICES") == "1"

POSTGRES_DSN = os.environ.get("DEEPWORK_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("DEEPWORK_REDIS_URL", "redis://127.0.0.1:6379/0")
MYSQL_URL = os.environ.get("DEEPWORK_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
RABBITMQ_URL = os.environ.get("DEEPWORK_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True


def require_service(name: str, host: str, port: int) -> None:
    """Skip the calling test when ``name`` is down, or fail when services are required."""
    if _reachable(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} and DEEPWORK_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(f"{message} (start it, or set DEEPWORK_REQUIRE_SERVICES=1 to make this a failure)")


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    return POSTGRES_DSN


@pytest.fixture(scope="session")
def mysql_url() -> str:
    """The MySQL/MariaDB server's URL (SQLAlchemy form, PyMySQL driver)."""
    require_service("MariaDB", "127.0.0.1", 3306)
    return MYSQL_URL


@pytest.fixture(scope="session")
def redis_url() -> str:
    require_service("Redis", "127.0.0.1", 6379)
    return REDIS_URL


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    return RABBITMQ_URL
