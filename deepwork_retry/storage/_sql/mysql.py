"""The MySQL/MariaDB dialect of the SQL engine: what MySQL spells its own way.

Used by the SQLAlchemy storage (``mysql+pymysql://``, ``mysql+aiomysql://``,
``mariadb+…``). The tables (``sql/mysql/``) store what the SQLite storage
stores, in the same encodings (BIGINT microseconds, JSON text), with ids in
the binary collation ``utf8mb4_bin`` so they compare by code point as
everywhere else. Differences from the shared statements:

- ``%s`` parameters (the MySQL drivers' ``format`` style);
- ``key`` is a reserved word: the idempotency table's column is quoted;
- ``INSERT … ON DUPLICATE KEY UPDATE`` and ``INSERT IGNORE``;
- no ``RETURNING``; reads that a write then changes take ``FOR UPDATE``;
- a subquery may not read the table its statement inserts into or deletes
  from: it reads a derived table (materialised first) instead;
- a page after a pair of ids is spelt with ``OR`` (two index ranges), not as
  a row comparison; text with lone surrogates is not stored, so never matches;
  free text is compared as bytes where it must equal exactly (``utf8mb4_bin``
  ignores trailing spaces);
- error codes: deadlocks and lock waits are busy, a duplicate key a conflict,
  a lost or refused connection unavailable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

from deepwork_retry.storage._sql.dialect import Dialect, Kind
from deepwork_retry.storage._sql.statements import Statements

__all__ = ["MySQLDialect"]

_NEXT = re.compile(r"\(SELECT pending_seq FROM outbox (.*?) LIMIT 1\)")
"""The last pending position, read inside an ``INSERT INTO outbox``."""


class _MySQLStatements(Statements):
    """The shared statements, but for the ``INSERT INTO outbox`` that reads ``outbox``."""

    def __init__(self, dialect: Dialect) -> None:
        super().__init__(dialect)
        # MySQL refuses a subquery on the table being inserted into (error 1093)
        # unless it reads a derived table, which is materialised first.
        self.insert_pending = _NEXT.sub(
            r"(SELECT pending_seq FROM (SELECT pending_seq FROM outbox \1 LIMIT 1) AS last)",
            self.insert_pending,
        )


class MySQLDialect(Dialect):
    """MySQL 8 and MariaDB 10.6 or later, InnoDB (see the module's documentation)."""

    name: ClassVar[str] = "mysql"
    title: ClassVar[str] = "MySQL"
    paramstyle: ClassVar[Literal["qmark", "format"]] = "format"
    lock: ClassVar[str] = " FOR UPDATE"
    returning: ClassVar[bool] = False
    conditional_upsert: ClassVar[bool] = False
    sequential_set: ClassVar[bool] = True
    from_nothing: ClassVar[str] = " FROM DUAL"
    row_values: ClassVar[bool] = False
    blocked_index: ClassVar[str] = ""  # tasks_assigned leads with the status: it serves
    surrogates: ClassVar[bool] = False
    errors: ClassVar[Mapping[int | str, Kind]] = {
        1205: Kind.BUSY,  # ER_LOCK_WAIT_TIMEOUT
        1213: Kind.DEADLOCK,  # ER_LOCK_DEADLOCK: the caller may decide again
        1366: Kind.INVALID,  # ER_TRUNCATED_WRONG_VALUE_FOR_FIELD (text outside utf8mb4)
        1406: Kind.INVALID,  # ER_DATA_TOO_LONG
        1264: Kind.INVALID,  # ER_WARN_DATA_OUT_OF_RANGE
        1062: Kind.CONFLICT,  # ER_DUP_ENTRY
        1586: Kind.CONFLICT,  # ER_DUP_ENTRY_WITH_KEY_NAME
        1146: Kind.SCHEMA,  # ER_NO_SUCH_TABLE
        1054: Kind.SCHEMA,  # ER_BAD_FIELD_ERROR
        1792: Kind.READ_ONLY,  # ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION
        1290: Kind.READ_ONLY,  # ER_OPTION_PREVENTS_STATEMENT (--read-only)
        1040: Kind.UNAVAILABLE,  # ER_CON_COUNT_ERROR
        1045: Kind.CANNOT_OPEN,  # ER_ACCESS_DENIED_ERROR
        1049: Kind.CANNOT_OPEN,  # ER_BAD_DB_ERROR
        2002: Kind.UNAVAILABLE,  # CR_CONNECTION_ERROR
        2003: Kind.UNAVAILABLE,  # CR_CONN_HOST_ERROR
        2006: Kind.UNAVAILABLE,  # CR_SERVER_GONE_ERROR
        2013: Kind.UNAVAILABLE,  # CR_SERVER_LOST
        2055: Kind.UNAVAILABLE,  # CR_SERVER_LOST_EXTENDED
        1927: Kind.UNAVAILABLE,  # ER_CONNECTION_KILLED (MariaDB)
        3024: Kind.TIMEOUT,  # ER_QUERY_TIMEOUT (max_execution_time)
        1969: Kind.TIMEOUT,  # ER_STATEMENT_TIMEOUT (MariaDB max_statement_time)
    }
    statements_class: ClassVar[type[Any] | None] = _MySQLStatements

    def identifier(self, name: str) -> str:
        return "`key`" if name == "key" else name

    def upsert(
        self,
        table: str,
        columns: Sequence[str],
        key: str,
        values: Sequence[str] | None = None,
        only_if: str | None = None,
    ) -> str:
        values = values or ["?"] * len(columns)
        # Assignments run in order and see the columns assigned before them: a
        # condition may read only the last column (its row count cannot tell
        # whether it wrote, so the engine reads the row locked first instead).
        sets = ", ".join(
            f"{c} = IF({only_if}, VALUES({c}), {c})" if only_if else f"{c} = VALUES({c})"
            for c in columns
            if c != key
        )
        return (
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(values)}) "
            f"ON DUPLICATE KEY UPDATE {sets}"
        )

    def exact(self, column: str) -> str:
        return f"CAST({column} AS BINARY)"  # bytes: no padding

    def insert_ignore(self, table: str, columns: Sequence[str]) -> str:
        marks = ", ".join("?" for _ in columns)
        return f"INSERT IGNORE INTO {table} ({', '.join(columns)}) VALUES ({marks})"

    def limited(self, select: str) -> str:
        columns = select.split(" FROM ", 1)[0].removeprefix("SELECT ")
        names = ", ".join(f"x.{c.split('.')[-1].strip()}" for c in columns.split(","))
        return f"SELECT {names} FROM ({select}) AS x"
