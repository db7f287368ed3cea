"""Helpers for the MySQL/MariaDB tests: a fresh database per test, dropped afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pymysql
from sqlalchemy.engine import URL, make_url


def new_database_name(prefix: str = "sqla") -> str:
    """A database name no other test uses."""
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


def _server(url: str | URL) -> pymysql.Connection:  # type: ignore[type-arg]
    parsed = make_url(url)
    return pymysql.connect(
        host=parsed.host or "127.0.0.1",
        port=parsed.port or 3306,
        user=parsed.username or "root",
        password=parsed.password or "",
        autocommit=True,
    )


def create_database(url: str | URL, name: str) -> URL:
    """Create the database ``name`` on ``url``'s server; its URL (same driver)."""
    with _server(url) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    return make_url(url).set(database=name)


def drop_database(url: str | URL, name: str) -> None:
    with _server(url) as conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")


@contextmanager
def database_dropped_after(url: str | URL, prefix: str = "sqla") -> Iterator[URL]:
    """A new, empty database; dropped on exit."""
    name = new_database_name(prefix)
    created = create_database(url, name)
    try:
        yield created
    finally:
        drop_database(url, name)
