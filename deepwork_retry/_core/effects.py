"""What a move changes, written once as data.

A :class:`Move` states a move's effects as values: each task field it sets
and the expression of the new value, and the attempt record it opens (the
progress counters follow the status: one task leaves its source state and
enters the target). Nothing here runs SQL or touches storage; the
description is *rendered*:

- into Python by :attr:`Move.change_task` and :attr:`Move.open_attempt`,
  which :func:`~deepwork_retry._core.decide.manual_retry` uses (the
  in-memory apply);
- into each SQL dialect by :mod:`deepwork_retry.storage._sql`, which builds
  the one-step statements of the SQLite and PostgreSQL storages from the
  same :data:`MANUAL_RETRY`, and the decoders that read their rows back.

So a rule changed here reaches every storage without an edit to theirs.

The expressions are few on purpose, enough for the moves that storages do in
one step: a constant (:class:`Const`), the move's ``now`` (:class:`Now`), a
field's value before the move (:class:`Field`), a field plus a constant
(:class:`Plus`), an argument of the call (:class:`Arg`) and a choice by the
retry budget (:class:`ByBudget`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, Union

import attrs

from deepwork_retry._core import machine
from deepwork_retry._core.model import Attempt, Task, evolve_task
from deepwork_retry._core.states import RetryBudget, TaskEvent, TaskStatus, Trigger


@attrs.frozen
class Const:
    """A value known beforehand: ``None``, an ``int``, a ``str`` or an enum member."""

    value: object

    def __attrs_post_init__(self) -> None:
        if not (
            self.value is None
            or isinstance(self.value, (enum.Enum, str))
            or (isinstance(self.value, int) and not isinstance(self.value, bool))
        ):
            raise TypeError(f"a constant effect must be None, an int or a str: {self.value!r}")


@attrs.frozen
class Now:
    """The move's ``now``."""


@attrs.frozen
class Field:
    """The value the field ``name`` had before the move."""

    name: str


@attrs.frozen
class Plus:
    """The field ``name`` before the move, plus ``delta``."""

    name: str
    delta: int


@attrs.frozen
class Arg:
    """An argument of the call (``actor``, ``reason``, ``budget``)."""

    name: str


@attrs.frozen
class ByBudget:
    """``full`` when the retry budget is :attr:`RetryBudget.FULL`, else ``one_more``."""

    full: Expr
    one_more: Expr


Expr = Union[Const, Now, Field, Plus, Arg, ByBudget]  # noqa: UP007 - a runtime alias on 3.10

ARGS = ("actor", "reason", "budget")
"""The arguments a move's expressions may name."""

_TASK_FIELDS = tuple(f.name for f in attrs.fields(Task))
_ATTEMPT_FIELDS = tuple(f.name for f in attrs.fields(Attempt))
_IDS = ("project_id", "id")
_ATTEMPT_IDS = ("project_id", "task_id", "number")


def _walk(expr: Expr) -> Iterator[Expr]:
    yield expr
    if isinstance(expr, ByBudget):
        yield from _walk(expr.full)
        yield from _walk(expr.one_more)


@attrs.frozen(kw_only=True)
class Move:
    """The effects of one move, as data (see the module's docstring).

    ``task``: each field the move sets and its new value; a field not named
    keeps its value. ``attempt``: the fields of the attempt record the move
    opens (numbered by the task's new ``attempt``; the ids are the task's).
    """

    event: TaskEvent
    task: tuple[tuple[str, Expr], ...]
    attempt: tuple[tuple[str, Expr], ...] = ()
    change_task: Callable[[Task, datetime, RetryBudget], Task] = attrs.field(
        init=False, eq=False, repr=False
    )
    """``change_task(task, now, budget)``: ``task`` after the move, the in-memory
    rendering of :attr:`task` (generated code, as fast as written by hand)."""
    open_attempt: Callable[[Task, datetime, str | None, str | None, RetryBudget], Attempt] = (
        attrs.field(init=False, eq=False, repr=False)
    )
    """``open_attempt(after, now, actor, reason, budget)``: the attempt record the move
    opens for ``after`` (the task after the move), the rendering of :attr:`attempt`."""

    def __attrs_post_init__(self) -> None:
        for names, known, ids in (
            (self.task, _TASK_FIELDS, _IDS),
            (self.attempt, _ATTEMPT_FIELDS, _ATTEMPT_IDS),
        ):
            set_names = [name for name, _ in names]
            if len(set(set_names)) != len(set_names):
                raise ValueError(f"a field is set twice: {set_names}")
            for name, expr in names:
                if name not in known or name in ids:
                    raise ValueError(f"not a field a move can set: {name!r}")
                for part in _walk(expr):
                    if isinstance(part, (Field, Plus)) and (
                        part.name not in _TASK_FIELDS or ids is _ATTEMPT_IDS
                    ):
                        raise ValueError(f"not a task field the move can read: {part.name!r}")
                    if isinstance(part, Arg) and part.name not in ARGS:
                        raise ValueError(f"not an argument of the call: {part.name!r}")
        status = self.sets("status")
        if not isinstance(status, Const) or not isinstance(status.value, TaskStatus):
            raise ValueError("a move sets the status to a constant TaskStatus")
        if not machine.sources(self.event, status.value):
            raise ValueError(f"no edge {self.event.value} -> {status.value.value}")
        object.__setattr__(self, "change_task", _compile_task_change(self))
        object.__setattr__(self, "open_attempt", _compile_open_attempt(self))

    def sets(self, name: str) -> Expr | None:
        """The new value of the task field ``name``, or ``None`` when the move keeps it."""
        for field_name, expr in self.task:
            if field_name == name:
                return expr
        return None

    @property
    def target(self) -> TaskStatus:
        """The status the move reaches."""
        status = self.sets("status")
        assert isinstance(status, Const)
        assert isinstance(status.value, TaskStatus)
        return status.value

    @property
    def sources(self) -> tuple[TaskStatus, ...]:
        """The statuses the move may leave (the transition table's, by value)."""
        return machine.sources(self.event, self.target)

    def known(self) -> dict[str, Const | Now]:
        """The task fields whose new value is known before the move (a constant, ``now``)."""
        return {name: e for name, e in self.task if isinstance(e, (Const, Now))}

    def increments(self) -> dict[str, int]:
        """The task fields the move increments, and by how much."""
        return {name: e.delta for name, e in self.task if isinstance(e, Plus) and e.name == name}


def python(expr: Expr, consts: dict[str, object]) -> str:
    """``expr`` as a Python expression over ``task``, ``now``, ``full`` and the arguments.

    Constants are bound as names added to ``consts``.
    """
    if isinstance(expr, Const):
        name = f"_c{len(consts)}"
        consts[name] = expr.value
        return name
    if isinstance(expr, Now):
        return "now"
    if isinstance(expr, Field):
        return f"task.{expr.name}"
    if isinstance(expr, Plus):
        return f"(task.{expr.name} + {int(expr.delta)})"
    if isinstance(expr, Arg):
        return expr.name
    return f"({python(expr.full, consts)} if full else {python(expr.one_more, consts)})"


def _compile(signature: str, body: list[str], consts: dict[str, object]) -> Callable[..., Any]:
    namespace: dict[str, Any] = {"_evolve": evolve_task, "_FULL": RetryBudget.FULL, **consts}
    lines = [f"def rendered({signature}):", *(f"    {line}" for line in body)]
    exec("\n".join(lines), namespace)  # code generated from the description
    function: Callable[..., Any] = namespace["rendered"]
    return function


def _compile_task_change(move: Move) -> Callable[..., Task]:
    consts: dict[str, object] = {}
    changes = ", ".join(f"{name}={python(expr, consts)}" for name, expr in move.task)
    body = ["full = budget is _FULL", f"return _evolve(task, {changes})"]
    return _compile("task, now, budget", body, consts)


def _compile_open_attempt(move: Move) -> Callable[..., Attempt]:
    consts: dict[str, object] = {"_Attempt": Attempt}
    values = "".join(f", {name}={python(expr, consts)}" for name, expr in move.attempt)
    body = [
        "full = budget is _FULL",
        "return _Attempt(task_id=after.id, project_id=after.project_id, "
        f"number=after.attempt{values})",
    ]
    return _compile("after, now, actor, reason, budget", body, consts)


MANUAL_RETRY = Move(
    event=TaskEvent.MANUAL_RETRY,
    task=(
        ("status", Const(TaskStatus.ASSIGNED)),
        ("retry_count", Plus("retry_count", 1)),
        ("retries_left", ByBudget(full=Field("max_retries"), one_more=Const(0))),
        ("error_message", Const(None)),
        ("error_type", Const(None)),
        ("blocked_reason", Const(None)),
        ("attempt", Plus("attempt", 1)),
        ("lease_expires_at", Const(None)),
        ("started_at", ByBudget(full=Const(None), one_more=Field("started_at"))),
        ("updated_at", Now()),
        ("version", Plus("version", 1)),
    ),
    attempt=(
        ("trigger", Const(Trigger.MANUAL_RETRY)),
        ("dispatched_at", Now()),
        ("available_at", Now()),
        ("actor", Arg("actor")),
        ("reason", Arg("reason")),
        ("budget", Arg("budget")),
    ),
)
"""``blocked -> assigned`` by a person: one more retry (or the full budget again),
the error cleared, a new attempt that a person triggered.

Its outbox entry is due at the attempt's ``available_at`` and is pending when
the project dispatches and every blocker is finished, else deferred
(:func:`~deepwork_retry._core.decide._new_attempt`)."""

__all__ = [
    "ARGS",
    "MANUAL_RETRY",
    "Arg",
    "ByBudget",
    "Const",
    "Expr",
    "Field",
    "Move",
    "Now",
    "Plus",
]
