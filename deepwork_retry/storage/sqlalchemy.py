"""SQLAlchemy storage (extra ``sqlalchemy``): the library's tables in the host's own
database, through the host's SQLAlchemy engine, connection or session.

- :class:`SQLAlchemyStorage` / :class:`AsyncSQLAlchemyStorage`: given an
  ``Engine`` (``AsyncEngine``), each call runs in a transaction of its own;
  given a ``Connection`` or ``Session`` (``AsyncConnection``,
  ``AsyncSession``), the storage is a :class:`JoinedSQLAlchemyStorage`
  (:class:`AsyncJoinedSQLAlchemyStorage`) whose calls join the host's open
  transaction, so a retry commits or rolls back with the host's own writes.
- :func:`migrate`: apply the schema's pending migrations over an engine.

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

from sqlalchemy.engine import Engine

from deepwork_retry.storage._async_sqlalchemy import (
    FAILURES,
    AsyncJoinedSQLAlchemyStorage,
    AsyncSQLAlchemyStorage,
)
from deepwork_retry.storage._sqlalchemy_sql import bound_to, migrate_schema
from deepwork_retry.storage._sync_sqlalchemy import JoinedSQLAlchemyStorage, SQLAlchemyStorage

__all__ = [
    "AsyncJoinedSQLAlchemyStorage",
    "AsyncSQLAlchemyStorage",
    "JoinedSQLAlchemyStorage",
    "SQLAlchemyStorage",
    "migrate",
]


def migrate(engine: Engine) -> list[int]:
    """Apply the pending migrations of the storage's schema on ``engine``'s database
    (safe to run from several processes at once); the numbers applied."""
    storage = SQLAlchemyStorage(engine, migrate=False)
    bound = bound_to(engine)
    bound.schema_ok = False
    try:
        with engine.connect() as conn:
            return migrate_schema(conn, bound)
    except FAILURES as exc:
        raise storage._translated(exc) from exc
