"""What one SQL dialect spells its own way, as data and small hooks.

The engine (:mod:`.engine`) runs every storage operation with statements
rendered once per dialect (:mod:`.statements`). A statement is written in one
parameter style, SQLite's (``?`` in order, or ``?N`` numbered, a number used
as often as needed); :meth:`Dialect.sql` turns it into the driver's style and
:meth:`Dialect.bind` orders the parameters to match. Everything else a dialect
may change is a class attribute or a method of :class:`Dialect`:

- ``paramstyle``: ``"qmark"`` (sqlite3) or ``"format"`` (``%s``: the MySQL
  drivers). With ``"format"``, every ``%`` of the text is doubled and an
  executor passes each statement's parameters through :meth:`Dialect.bind`.
- ``lock``: appended to a read made inside a write that later writes what it
  read (``" FOR UPDATE"``; empty where the write transaction holds the whole
  database, as SQLite's ``BEGIN IMMEDIATE`` does).
- ``returning``: whether ``UPDATE … RETURNING`` exists (else an ``UPDATE``
  and a ``SELECT``).
- ``sequential_set``: whether ``UPDATE … SET a = …, b = a`` reads the new ``a``
  (MySQL); the rendered updates are then ordered to read old values only.
- ``conditional_upsert``: whether :meth:`upsert` with ``only_if`` can tell by
  its row count that it wrote nothing (else a locked read and a plain upsert).
- :meth:`identifier`, :meth:`upsert`, :meth:`insert_ignore`, :meth:`limited`,
  ``from_nothing``:
  the statements' shapes that differ.
- ``row_values``: whether a page after a pair of ids is the row comparison
  ``(project_id, id) > (?, ?)``, which the dialect's planner turns into one
  index range (SQLite), rather than ``project_id > ? OR (project_id = ? AND
  id > ?)`` (MySQL, whose range optimiser reads the ``OR`` as two ranges);
  ``blocked_index``: the hint that makes the blocked tasks' page read the
  index of blocked tasks (``INDEXED BY`` on SQLite, whose planner otherwise
  prefers the primary key once the projects are listed);
- :meth:`exact`: a text column compared character for character;
- ``surrogates``: whether text holding lone surrogates is stored (SQLite keeps
  it as a BLOB of its surrogate-pass encoding; MySQL refuses it).
- ``errors`` (driver error code -> :class:`Kind`) and :meth:`error_code`: the
  error classification behind :func:`translate`, the one place a driver error
  becomes a library error.

A new dialect subclasses :class:`Dialect`, sets what differs, and, for a
statement whose shape differs beyond these hooks, a subclass of
:class:`~deepwork_retry.storage._sql.statements.Statements` as
``statements_class`` that overrides that one statement. Values are stored
with the shared encodings of :mod:`.codec` (integer microseconds, JSON text).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

from deepwork_retry.exceptions import (
    AlreadyExists,
    InvalidInput,
    StorageCorrupt,
    StorageError,
    StorageReadOnly,
    StorageUnavailable,
)


class Kind(enum.Enum):
    """What a driver error means, whichever driver raised it."""

    BUSY = "busy"
    """Another writer holds a lock (lock wait timed out, deadlock): nothing changed."""
    DEADLOCK = "deadlock"
    """The database aborted the transaction to resolve a conflict (a deadlock, a
    serialization failure): a write decided again on fresh reads succeeds."""
    CONFLICT = "conflict"
    """A unique key (or another constraint) refused a row."""
    READ_ONLY = "read-only"
    CORRUPT = "corrupt"
    """The file or database is damaged, or not ours."""
    SCHEMA = "schema"
    """A table or column the statements need is missing."""
    CANNOT_OPEN = "cannot-open"
    INVALID = "invalid"
    """The database cannot hold a value (out of range, malformed, a constraint)."""
    TIMEOUT = "timeout"
    """A statement was cancelled for taking too long."""
    UNAVAILABLE = "unavailable"
    """The database cannot be reached, or failed (I/O, disk full, connection lost)."""


_TOKEN = re.compile(r"'(?:[^']|'')*'|\?(\d*)|%")
"""A quoted literal (kept whole), a parameter (``?`` or ``?N``), or a ``%``."""


class Dialect:
    """A SQL dialect's differences from the statements as :mod:`.statements` writes them.

    The defaults are SQLite's (``ON CONFLICT``, ``RETURNING``, ``INSERT OR
    IGNORE``, no row locks); see the module's documentation for what a new
    dialect sets.
    """

    name: ClassVar[str] = "sqlite"
    """The folder of its migrations (``storage/sql/<name>/``)."""
    title: ClassVar[str] = "SQLite"
    """How messages name the database."""
    paramstyle: ClassVar[Literal["qmark", "format"]] = "qmark"
    lock: ClassVar[str] = ""
    returning: ClassVar[bool] = True
    conditional_upsert: ClassVar[bool] = True
    sequential_set: ClassVar[bool] = False
    """Whether an ``UPDATE``'s ``SET`` assigns left to right, later expressions seeing
    the new values (MySQL): the one-step retry orders its assignments to read old ones."""
    from_nothing: ClassVar[str] = ""
    """Appended to a ``SELECT`` of values with a ``WHERE`` but no table (``" FROM DUAL"``)."""
    row_values: ClassVar[bool] = True
    """Whether a page after a pair of ids compares them as one row value (see above)."""
    blocked_index: ClassVar[str] = " INDEXED BY tasks_blocked"
    """Appended to ``tasks`` in the blocked tasks' page: the index it must read."""
    surrogates: ClassVar[bool] = True
    """Whether text holding lone surrogates is stored (and so may be compared with)."""
    errors: ClassVar[Mapping[int | str, Kind]] = {}
    """Driver error code (see :meth:`error_code`: a number, or an SQLSTATE) -> what it
    means."""
    statements_class: ClassVar[type[Any] | None] = None
    """A :class:`~deepwork_retry.storage._sql.statements.Statements` subclass, or
    ``None`` for the shared one."""

    def __init__(self) -> None:
        self._orders: dict[str, tuple[int, ...]] = {}

    # -- parameters ----------------------------------------------------------------
    def sql(self, text: str) -> str:
        """``text`` (SQLite's parameter style) in the driver's style."""
        if self.paramstyle == "qmark":
            return text
        order: list[int] = []
        plain = 0

        def swap(match: re.Match[str]) -> str:
            nonlocal plain
            token = match.group()
            if token == "%":
                return "%%"
            if token.startswith("'"):
                return token.replace("%", "%%")
            if match.group(1):
                order.append(int(match.group(1)) - 1)
            else:
                order.append(plain)
                plain += 1
            return "%s"

        out = _TOKEN.sub(swap, text)
        if order != list(range(len(order))):
            self._orders[out] = tuple(order)
        return out

    def bind(self, sql: str, params: Sequence[Any]) -> Sequence[Any]:
        """``params`` (by number) in the order ``sql`` (from :meth:`sql`) takes them."""
        order = self._orders.get(sql)
        return params if order is None else tuple(params[i] for i in order)

    # -- shapes ----------------------------------------------------------------------
    def identifier(self, name: str) -> str:
        """A column name as the statements write it (MySQL quotes its keyword ``key``)."""
        return name

    def upsert(
        self,
        table: str,
        columns: Sequence[str],
        key: str,
        values: Sequence[str] | None = None,
        only_if: str | None = None,
    ) -> str:
        """Insert a row, or replace the one with the same ``key`` (every other column);
        with ``only_if``, replace it only where that condition holds of the stored row.

        ``values`` are the inserted expressions (a ``?`` each by default). With
        ``only_if``, the row count tells whether anything was written
        (:attr:`conditional_upsert`).
        """
        values = values or ["?"] * len(columns)
        sets = ", ".join(f"{c} = excluded.{c}" for c in columns if c != key)
        where = f" WHERE {only_if}" if only_if else ""
        return (
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(values)}) "
            f"ON CONFLICT ({key}) DO UPDATE SET {sets}{where}"
        )

    def exact(self, column: str) -> str:
        """``column`` of free text as an operand of ``=`` that tells every character,
        trailing spaces included (MySQL's ``utf8mb4_bin`` pads: ``'a' = 'a '``)."""
        return column

    def insert_ignore(self, table: str, columns: Sequence[str]) -> str:
        """Insert a row unless one with the same key exists."""
        marks = ", ".join("?" for _ in columns)
        return f"INSERT OR IGNORE INTO {table} ({', '.join(columns)}) VALUES ({marks})"

    def limited(self, select: str) -> str:
        """A ``SELECT … LIMIT`` as the operand of ``IN`` in a ``DELETE`` of the same table
        (MySQL takes neither: wrap it in a derived table)."""
        return select

    # -- errors --------------------------------------------------------------------------
    def original(self, exc: BaseException) -> BaseException:
        """The driver's own exception (a wrapper's ``orig``, as SQLAlchemy's)."""
        orig = getattr(exc, "orig", None)
        return orig if isinstance(orig, BaseException) else exc

    def error_code(self, exc: BaseException) -> int | str | None:
        """The driver's error code of ``exc`` (already :meth:`original`), if it has one."""
        args = getattr(exc, "args", ())
        return args[0] if args and isinstance(args[0], int) else None

    def classify(self, exc: BaseException) -> Kind | None:
        """What ``exc`` means, from :attr:`errors`; ``None`` when the table does not say."""
        code = self.error_code(self.original(exc))
        return None if code is None else self.errors.get(code)


def translate(
    dialect: Dialect,
    exc: BaseException,
    *,
    where: str,
    waited: float | None = None,
    conflict: Callable[[], Exception] | None = None,
) -> Exception:
    """The library error for a driver error, the same for every dialect.

    ``where`` names the database in the message (a path, a host); ``waited``
    is how long a busy write waited for its lock, when known. ``conflict``
    builds the error for a transaction the database aborted to resolve a
    deadlock (:attr:`Kind.DEADLOCK`): in ``apply``, whose caller decides again
    on :class:`~deepwork_retry.exceptions.VersionConflict`, a conflict;
    elsewhere ``StorageUnavailable``.
    """
    title = dialect.title
    if isinstance(exc, OverflowError):
        return InvalidInput(f"a number is out of {title}'s 64-bit range")
    if isinstance(exc, UnicodeEncodeError):
        return InvalidInput(f"text {title} cannot store (lone surrogates)")
    said = dialect.original(exc)
    kind = dialect.classify(exc)
    if kind is Kind.BUSY:
        how = "" if waited is None else f" (waited {waited:g}s)"
        return StorageUnavailable(
            f"{title} database {where} is locked by another writer{how}: {said}"
        )
    if kind is Kind.DEADLOCK:
        if conflict is not None:
            return conflict()
        return StorageUnavailable(
            f"{title} database {where} aborted the transaction to resolve a conflict; "
            f"try again: {said}"
        )
    if kind is Kind.CONFLICT:
        return AlreadyExists(f"A row with this key exists already in {title} database {where}")
    if kind is Kind.CORRUPT:
        return StorageCorrupt(
            f"{title} database {where} is damaged or not a deepwork_retry database: {said}"
        )
    if kind is Kind.READ_ONLY:
        return StorageReadOnly(
            f"{title} database {where} is read-only; nothing was changed: {said}"
        )
    if kind is Kind.CANNOT_OPEN:
        return StorageUnavailable(f"Cannot open {title} database {where}: {said}")
    if kind is Kind.UNAVAILABLE:
        return StorageUnavailable(f"{title} database {where} failed: {said}")
    if kind is Kind.INVALID:
        return InvalidInput(f"{title} cannot store this value: {said}")
    if kind is Kind.TIMEOUT:
        return StorageUnavailable(f"{title} database {where} did not answer in time")
    if kind is Kind.SCHEMA:
        return StorageCorrupt(f"{title} database {where} does not have the expected schema: {said}")
    return StorageError(f"{title} database {where} failed: {said}")
