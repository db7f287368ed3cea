"""PostgreSQL storage (extra ``postgres``: psycopg 3 and its pool, on the system's libpq;
``postgres-binary``: the same with psycopg's bundled libpq).

- :class:`PostgresStorage` / :class:`AsyncPostgresStorage`: the storages.
  The sync one opens its pool when constructed; the async one opens inside
  the event loop that uses it (``await storage.open()`` or ``async with``).
  ``from_pool(pool)`` uses a pool the host owns.
- :class:`JoinedPostgresStorage` / :class:`AsyncJoinedPostgresStorage`: made by
  ``PostgresStorage.joining(conn)`` / ``AsyncPostgresStorage.joining(conn)``,
  on the host's own connection, inside the host's transaction.
- :func:`migrate` / :func:`amigrate`: apply the schema's pending migrations
  (``deepwork_retry/storage/sql/postgres/*.sql``); safe to run from several
  processes at once.
- :func:`check_migrated` / :func:`acheck_migrated`: check that the schema
  exists and is migrated, creating nothing (``StorageMissing`` otherwise).

From a shell::

    python -m deepwork_retry.storage.postgres migrate --dsn postgresql://... --schema deepwork
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from deepwork_retry.exceptions import missing_extra

try:
    import psycopg  # noqa: F401 - imported to name the extra when it is missing
    import psycopg_pool  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    if exc.name is None:
        # psycopg is installed but found no libpq: the `postgres` extra uses the
        # system's, `postgres-binary` brings psycopg's own build of it.
        raise missing_extra(
            "postgres-binary",
            __name__,
            exc,
            needs="libpq, which psycopg could not load (install the system's libpq, or psycopg's "
            "bundled one)",
        ) from exc
    raise missing_extra("postgres", __name__, exc) from exc

from deepwork_retry.exceptions import DeepworkError
from deepwork_retry.storage._async_postgres import AsyncJoinedPostgresStorage, AsyncPostgresStorage
from deepwork_retry.storage._async_postgres import check_migrated as acheck_migrated
from deepwork_retry.storage._async_postgres import migrate as amigrate
from deepwork_retry.storage._postgres_sql import DEFAULT_SCHEMA, channel
from deepwork_retry.storage._sync_postgres import (
    JoinedPostgresStorage,
    PostgresStorage,
    check_migrated,
    migrate,
)

__all__ = [
    "DEFAULT_SCHEMA",
    "AsyncJoinedPostgresStorage",
    "AsyncPostgresStorage",
    "JoinedPostgresStorage",
    "PostgresStorage",
    "acheck_migrated",
    "amigrate",
    "channel",
    "check_migrated",
    "main",
    "migrate",
]


def main(argv: Sequence[str] | None = None) -> int:
    """``migrate --dsn DSN [--schema NAME]``: apply pending migrations, print their numbers."""
    parser = argparse.ArgumentParser(prog="python -m deepwork_retry.storage.postgres")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("migrate", help="apply pending migrations")
    run.add_argument("--dsn", required=True, help="libpq connection string or URL")
    run.add_argument(
        "--schema",
        default=os.environ.get("DEEPWORK_SCHEMA") or DEFAULT_SCHEMA,
        help=f"schema to migrate (default: $DEEPWORK_SCHEMA, else {DEFAULT_SCHEMA})",
    )
    args = parser.parse_args(argv)
    try:
        applied = migrate(args.dsn, schema=args.schema)
    except DeepworkError as exc:
        print(f"migrate: {exc}", file=sys.stderr)
        return 1
    print("applied:", ", ".join(f"{n:04d}" for n in applied) if applied else "nothing pending")
    return 0


if __name__ == "__main__":
    sys.exit(main())
