"""SQLAlchemy storage (extra ``sqlalchemy``): the library's tables in the host's own
database, through the host's SQLAlchemy engine, connection or session.

- :class:`SQLAlchemyStorage` / :class:`AsyncSQLAlchemyStorage`: given an
  ``Engine`` (``AsyncEngine``), each call runs in a transaction of its own;
  given a ``Connection`` or ``Session`` (``AsyncConnection``,
  ``AsyncSession``), the storage is a :class:`JoinedSQLAlchemyStorage`
  (:class:`AsyncJoinedSQLAlchemyStorage`) whose calls join the host's open
  transaction, so a retry commits or rolls back with the host's own writes.
- :func:`migrate`: apply the schema's pending migrations (over an engine, or in
  the transaction of a connection, such as an Alembic revision's); :data:`TABLES`:
  the storage's tables, for a host's Alembic autogenerate to leave alone.

Databases: SQLite (``sqlite://``, ``sqlite+aiosqlite://``), MySQL and MariaDB
(``mysql+pymysql://``, ``mysql+aiomysql://``, …) and PostgreSQL
(``postgresql+psycopg://`` only). The database driver is the application's
choice; the async API needs ``sqlalchemy[asyncio]`` (greenlet).
"""

from __future__ import annotations

from deepwork_retry.exceptions import missing_extra

try:
    import sqlalchemy  # noqa: F401 - imported to name the extra when it is missing
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise missing_extra("sqlalchemy", __name__, exc) from exc

from sqlalchemy.engine import Connection, Engine

from deepwork_retry.storage._async_sqlalchemy import (
    FAILURES,
    AsyncJoinedSQLAlchemyStorage,
    AsyncSQLAlchemyStorage,
)
from deepwork_retry.storage._sqlalchemy_sql import TABLES, bound_to, migrate_schema
from deepwork_retry.storage._sync_sqlalchemy import JoinedSQLAlchemyStorage, SQLAlchemyStorage

__all__ = [
    "TABLES",
    "AsyncJoinedSQLAlchemyStorage",
    "AsyncSQLAlchemyStorage",
    "JoinedSQLAlchemyStorage",
    "SQLAlchemyStorage",
    "migrate",
]


def migrate(bind: Engine | Connection, *, schema: str | None = None) -> list[int]:
    """Apply the pending migrations of the storage's schema; the numbers applied.

    On an ``Engine``, on a connection of its own, committed (safe to run from
    several processes at once). On a ``Connection`` (an Alembic revision's
    ``op.get_bind()``), in the transaction open there, which its owner
    commits; MySQL commits DDL by itself all the same. ``schema``: the PostgreSQL
    schema (``deepwork`` by default).
    """
    engine = bind if isinstance(bind, Engine) else bind.engine
    storage = SQLAlchemyStorage(engine, migrate=False, schema=schema)
    bound = bound_to(engine, schema)
    try:
        if isinstance(bind, Connection):
            return migrate_schema(bind, bound, own=False)
        with engine.connect() as conn:
            return migrate_schema(conn, bound)
    except FAILURES as exc:
        raise storage._translated(exc) from exc
