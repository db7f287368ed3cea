"""Fixtures of the Django ORM storage tests: one Django configuration, two databases.

The ``default`` alias is an SQLite file, the ``pg`` alias a PostgreSQL database
created for this process (see ``tests/django_support.py``); both are migrated
with this app's own migrations. Each test starts from empty tables.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from django_support import PG_ALIAS, PG_DATABASE, configure, empty
from psycopg import sql

configure()

from django.core.management import call_command  # noqa: E402 - after configure()
from django.db import connections  # noqa: E402

from deepwork_retry.web.django.storage import DjangoStorage  # noqa: E402

ALIASES = ["default", PG_ALIAS]
_migrated: set[str] = set()


@pytest.fixture(autouse=True)
def _sync_calls_inside_event_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    """The conformance kit drives a sync storage inline from an event loop (its
    scenarios are written once, against the async port); Django refuses ORM calls
    made on a thread running a loop unless told that this is deliberate."""
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


def _migrate(alias: str) -> None:
    if alias not in _migrated:
        call_command("migrate", database=alias, verbosity=0, interactive=False)
        _migrated.add(alias)


@pytest.fixture(scope="session")
def django_pg(postgres_dsn: str) -> Iterator[str]:
    """The ``pg`` alias, its database created and migrated (dropped at the end)."""
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(PG_DATABASE)))
    try:
        _migrate(PG_ALIAS)
        yield PG_ALIAS
    finally:
        connections[PG_ALIAS].close()
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(PG_DATABASE)
                )
            )


@pytest.fixture(params=ALIASES)
def alias(request: pytest.FixtureRequest) -> str:
    """A migrated database alias with empty tables: SQLite, then PostgreSQL."""
    name: str = request.param
    if name == PG_ALIAS:
        request.getfixturevalue("django_pg")
    else:
        _migrate(name)
    empty(name)
    return name


@pytest.fixture
def storage(alias: str) -> DjangoStorage:
    return DjangoStorage(using=alias)
