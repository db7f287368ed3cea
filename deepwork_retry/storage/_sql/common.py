"""What every SQL storage shares: the columns, the rendering of a move's effects into
SQL, decoders that read rows by column name, paging bounds and the migration files.

A dialect (``storage/sqlite.py``, ``storage/_postgres_sql.py``) supplies only what
truly differs: how it spells a parameter, ``now`` or a column read before the
move (:class:`Spelling`), how it converts a stored value back (a codec, see
:func:`compile_decoder`), which characters it cannot store (:func:`after_bound`)
and where its migrations live (:func:`migrations`).
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from typing import Any, NamedTuple

import attrs

from deepwork_retry._core.effects import Arg, ByBudget, Const, Expr, Field, Move, Now, Plus
from deepwork_retry._core.model import Attempt, DispatchEntry, IdempotencyRecord, Project, Task
from deepwork_retry._core.states import TaskStatus

# -- columns -----------------------------------------------------------------------


def names(cls: type) -> tuple[str, ...]:
    """The fields of the attrs class ``cls``, in order: the columns of its table."""
    return tuple(f.name for f in attrs.fields(cls))


TASK_FIELDS = names(Task)
PROJECT_FIELDS = names(Project)
ATTEMPT_FIELDS = names(Attempt)
ENTRY_FIELDS = names(DispatchEntry)
IDEM_FIELDS = names(IdempotencyRecord)
STATUSES = tuple(status.value for status in TaskStatus)
"""The progress counters of the statuses, in the order of :class:`TaskStatus`."""

# The tables' columns, in the order the storages select them (a row's ids first).
TASK_COLUMNS = ("project_id", "id", *(f for f in TASK_FIELDS if f not in ("project_id", "id")))
PROJECT_COLUMNS = PROJECT_FIELDS
ATTEMPT_COLUMNS = (
    "project_id", "task_id", "number",
    *(f for f in ATTEMPT_FIELDS if f not in ("project_id", "task_id", "number")),
)  # fmt: skip
ENTRY_COLUMNS = ENTRY_FIELDS
IDEM_COLUMNS = IDEM_FIELDS
EVENT_COLUMNS = ("project_id", "seq", "type", "task_id", "attempt", "at", "data")
"""An event's stored fields (:class:`~deepwork_retry._core.events.Event`), in order."""
EVENT_RETRY_COLUMNS = (
    "project_id", "seq", "subscriber", "tries", "retry_at", "last_error", "parked",
    "claimed_until",
)  # fmt: skip
"""A failed delivery's columns (:class:`~deepwork_retry._core.events.EventRetry`)."""


def cols(columns: Iterable[str], prefix: str = "") -> str:
    """``a, b, c`` (each with ``prefix``) for a select or insert list."""
    return ", ".join(f"{prefix}{column}" for column in columns)


def at(columns: Sequence[str], offset: int = 0) -> dict[str, int]:
    """Each column's index in a row whose columns start at ``offset``: decoding by name."""
    return {column: offset + i for i, column in enumerate(columns)}


# -- a move's effects, rendered into SQL ----------------------------------------------


def literal(value: object) -> str:
    """A constant effect as an SQL literal."""
    if value is None:
        return "NULL"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        raise TypeError("no boolean columns")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    raise TypeError(f"no SQL literal for {value!r}")


@attrs.frozen(kw_only=True)
class Spelling:
    """How one statement of a dialect writes the parts of an effect."""

    column: Callable[[str], str]
    """A task column as it was before the move (``retry_count``, ``t.retry_count``)."""
    now: str
    """The move's ``now``."""
    full: str
    """A condition: the call's budget is ``full``."""
    args: Mapping[str, str] = attrs.field(factory=dict)
    """The call's arguments (``actor``, ``reason``, ``budget``)."""
    types: Mapping[str, str] = attrs.field(factory=dict)
    """Column -> SQL type, for dialects that type a constant by its column (a ``NULL``
    in both branches of a ``CASE`` has no type of its own on PostgreSQL)."""


def render(expr: Expr, spelling: Spelling, column: str | None = None) -> str:
    """One effect's new value (for ``column``) as an SQL expression."""
    if isinstance(expr, Const):
        sql_type = spelling.types.get(column) if column else None
        return literal(expr.value) if sql_type is None else f"{literal(expr.value)}::{sql_type}"
    if isinstance(expr, Now):
        return spelling.now
    if isinstance(expr, Field):
        return spelling.column(expr.name)
    if isinstance(expr, Plus):
        return f"{spelling.column(expr.name)} + {int(expr.delta)}"
    if isinstance(expr, Arg):
        return spelling.args[expr.name]
    assert isinstance(expr, ByBudget)
    full, one_more = render(expr.full, spelling, column), render(expr.one_more, spelling, column)
    return f"CASE WHEN {spelling.full} THEN {full} ELSE {one_more} END"


def set_clause(move: Move, spelling: Spelling) -> str:
    """``UPDATE … SET`` for the task's effects of ``move``."""
    return ", ".join(f"{name} = {render(expr, spelling, name)}" for name, expr in move.task)


def record_values(move: Move, spelling: Spelling, fields: Sequence[str]) -> list[str]:
    """The new attempt record's ``fields`` as SQL expressions (``NULL`` for those the move
    does not set)."""
    given = dict(move.attempt)
    return [render(given[name], spelling, name) if name in given else "NULL" for name in fields]


def read_back(move: Move) -> tuple[str, ...]:
    """The task fields a one-step statement reads back after ``move``: all but the ids
    and those whose new value is known beforehand (a constant, ``now``)."""
    known = move.known()
    return tuple(f for f in TASK_FIELDS if f not in known and f not in ("project_id", "id"))


def known_values(move: Move, now: str) -> tuple[dict[str, str], dict[str, object]]:
    """The fields ``move`` sets to values known beforehand, as Python expressions for
    :func:`compile_decoder` (``now`` spelt as given), and the constants they name."""
    given: dict[str, str] = {}
    consts: dict[str, object] = {}
    for name, expr in move.known().items():
        if isinstance(expr, Now):
            given[name] = now
        else:
            const = f"_known_{name}"
            consts[const] = expr.value
            given[name] = const
    return given, consts


# -- decoding rows by name --------------------------------------------------------------


def compile_decoder(
    cls: type,
    *,
    read: Mapping[str, int],
    codec: Mapping[str, str],
    helpers: Mapping[str, object],
    given: Mapping[str, str] | None = None,
    signature: str = "row",
    offset: str | None = None,
) -> Callable[..., Any]:
    """A function building ``cls`` from a row, generated once from the column names.

    Each field is either read from ``row[read[field]]``, converted by
    ``codec[field]`` (a Python expression with ``{}`` for the stored value,
    using ``helpers``; the identity when absent), or ``given[field]`` (a
    Python expression over the names of ``signature``); with ``offset`` (a name
    in ``signature``) the indexes count from its value. The value is built
    without ``__init__``, each slot set once, already converted: what
    ``__init__`` does for these classes, which have no validators and no
    ``__attrs_post_init__`` (checked here), at a fraction of its cost.
    """
    given = given or {}
    fields = attrs.fields(cls)
    assert all(f.validator is None for f in fields)
    assert not hasattr(cls, "__attrs_post_init__")
    missing = [f.name for f in fields if (f.name in read) == (f.name in given)]
    assert not missing, (cls, missing)
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": cls, **helpers}
    lines = [f"def decode({signature}):", "    new = _new(_cls)"]
    for field in fields:
        name = field.name
        namespace[f"_set_{name}"] = getattr(cls, name).__set__  # the slot itself
        index = f"{offset} + {read[name]}" if offset and name in read else read.get(name)
        value = codec.get(name, "{}").format(f"row[{index}]") if name in read else given[name]
        lines.append(f"    _set_{name}(new, {value})")
    lines.append("    return new")
    exec("\n".join(lines), namespace)  # code generated from the column names
    decode: Callable[..., Any] = namespace["decode"]
    decode.__doc__ = f"A {cls.__name__} from a row (generated by compile_decoder)."
    return decode


# -- paging ------------------------------------------------------------------------------


def after_bound(after: str, unstorable: re.Pattern[str]) -> tuple[str, str]:
    """``(operator, value)`` selecting stored ids ``> after`` when ``after`` holds a
    character the dialect cannot store (``unstorable``: NUL, lone surrogates).

    No stored id holds one, so the first such character decides: ids greater
    than the prefix before a NUL, or at least the prefix followed by U+E000
    (the first character above the surrogates), code point order as in Python.
    """
    match = unstorable.search(after)
    if match is None:
        return ">", after
    prefix = after[: match.start()]
    if match.group() == "\x00":
        return ">", prefix
    return ">=", prefix + "\ue000"


def encodes(value: str) -> bool:
    """Whether ``value`` encodes as UTF-8 (holds no lone surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def listed(
    projects: Iterable[str],
    after: str | None,
    *,
    inclusive: bool,
    storable: Callable[[str], bool] = encodes,
) -> list[str]:
    """The ids of ``projects`` a storage may hold (``storable``), after ``after`` (or
    from it, when ``inclusive``), in the order of the stored ids (code point order,
    as Python orders str)."""
    ids = {p for p in projects if storable(p)}
    if after is not None:
        ids = {p for p in ids if p > after or (inclusive and p == after)}
    return sorted(ids)


def chunks(ids: list[str], size: int = 500) -> list[list[str]]:
    """``ids`` in consecutive runs of at most ``size`` (each an ``IN`` list short enough
    for every dialect), so that pages read run after run stay in order."""
    return [ids[start : start + size] for start in range(0, len(ids), size)]


# -- migrations ------------------------------------------------------------------------

_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class Migration(NamedTuple):
    number: int
    file: str
    """``NNNN_name.sql``."""
    text: str

    @property
    def name(self) -> str:
        """The file's name without its number and ``.sql``."""
        return self.file[5:-4]


def sql_folder(dialect: str) -> Any:
    """The package's folder of ``dialect``'s SQL files (``sql/<dialect>/``)."""
    return resources.files("deepwork_retry.storage").joinpath("sql").joinpath(dialect)


@functools.cache
def migrations(dialect: str) -> tuple[Migration, ...]:
    """The numbered migrations shipped for ``dialect``, in order (read once)."""
    found = []
    for item in sql_folder(dialect).iterdir():
        match = _MIGRATION_FILE.match(item.name)
        if match:
            found.append(Migration(int(match[1]), item.name, item.read_text(encoding="utf-8")))
    return tuple(sorted(found))


def pending(shipped: Sequence[Migration], applied: Iterable[int]) -> list[Migration]:
    """The migrations of ``shipped`` not yet ``applied`` (by number), in order."""
    done = set(applied)
    return [m for m in shipped if m.number not in done]
