"""The API's wire format, described once: every response body, field by field.

Each :class:`Body` lists its fields (name, type, nullable, required,
description). The OpenAPI document (:mod:`deepwork_retry.web.openapi`) and the
FastAPI adapter's pydantic models are derived from these descriptions (the
request and error bodies, which the HTTP layer owns, are described there in
the same terms); the
JSON builders of :mod:`deepwork_retry._core.results`, written out by hand for
speed, are held equal to them by the test suite. Value sets come from the
vocabularies themselves (:class:`~deepwork_retry._core.states.TaskStatus`,
:data:`~deepwork_retry._core.results.DispatchStatus`...), so a new value
reaches the document and the models without an edit here.
"""

from __future__ import annotations

import enum
from typing import Any, Union, get_args

import attrs

from deepwork_retry._core.results import BulkStop, DispatchStatus
from deepwork_retry._core.states import (
    BlockedReason,
    Outcome,
    ProjectStatus,
    RetryBudget,
    TaskStatus,
    Trigger,
)

STRING = "string"
INTEGER = "integer"
BOOLEAN = "boolean"
DATE_TIME = "date-time"
"""An ISO 8601 timestamp, as text."""
OBJECT = "object"
"""A JSON object of any content (a task's ``metadata``)."""


@attrs.frozen
class Choice:
    """A string from a fixed set of values."""

    values: tuple[str, ...]


def choice(values: type[enum.Enum] | Any) -> Choice:
    """The values of an enum whose values are strings, or of a ``Literal`` of strings."""
    if isinstance(values, type) and issubclass(values, enum.Enum):
        return Choice(tuple(str(member.value) for member in values))
    return Choice(tuple(str(value) for value in get_args(values)))


class _Absent(enum.Enum):
    ABSENT = "absent"


ABSENT = _Absent.ABSENT
"""The :attr:`Field.default` of a field with none to document."""

Kind = Union[str, Choice, "Body"]
"""A scalar kind (:data:`STRING`, :data:`INTEGER`...), a :class:`Choice` or a nested body."""


@attrs.frozen(kw_only=True)
class Field:
    name: str
    kind: Kind
    many: bool = False
    """A JSON array of ``kind``."""
    nullable: bool = False
    required: bool = True
    """Present in every body (a response) or needed (a request); else optional."""
    description: str | None = None
    default: Any = ABSENT
    """The value an absent request field takes, for the documentation."""
    minimum: int | None = None
    maximum: int | None = None
    max_length: int | None = None


@attrs.frozen(kw_only=True)
class Body:
    """A JSON object of the API, request or response; no field beyond its own."""

    name: str
    fields: tuple[Field, ...]
    description: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields if f.required)


def _fields(*fields: Field) -> tuple[Field, ...]:
    return fields


def _nullable(name: str, kind: Kind, description: str | None = None) -> Field:
    return Field(name=name, kind=kind, nullable=True, description=description)


def _count(name: str, description: str | None = None) -> Field:
    return Field(name=name, kind=INTEGER, minimum=0, description=description)


# -- responses -----------------------------------------------------------------------

TASK = Body(
    name="Task",
    description="A task as stored.",
    fields=_fields(
        Field(name="id", kind=STRING),
        Field(name="project_id", kind=STRING),
        Field(name="title", kind=STRING),
        Field(name="status", kind=choice(TaskStatus)),
        _count("retry_count", "Automatic retries so far"),
        _count("max_retries", "The automatic retry budget"),
        _count("retries_left", "Automatic retries still allowed"),
        _nullable("error_message", STRING, "The last failure's message"),
        _nullable("error_type", STRING, "The last failure's type"),
        _nullable("blocked_reason", choice(BlockedReason), "Why the task is blocked"),
        Field(
            name="blocked_by",
            kind=STRING,
            many=True,
            description="Ids of unfinished tasks it waits for",
        ),
        _count("attempt", "The current attempt's number"),
        _nullable("created_at", DATE_TIME),
        _nullable("updated_at", DATE_TIME),
        _nullable("started_at", DATE_TIME),
        _nullable("completed_at", DATE_TIME),
        _nullable("lease_expires_at", DATE_TIME),
        Field(name="metadata", kind=OBJECT),
    ),
)

PROGRESS = Body(
    name="Progress",
    description="A project's tasks counted by state.",
    fields=_fields(
        _count("total"),
        _count("completed", "Tasks done"),
        _count("in_progress"),
        Field(name="percent", kind=INTEGER, minimum=0, maximum=100),
        _count("inbox"),
        _count("assigned"),
        _count("review"),
        _count("blocked"),
        _count("skipped"),
        _count("done"),
    ),
)

DISPATCH = Body(
    name="Dispatch",
    description="What happened to the dispatch of the retried attempt.",
    fields=_fields(
        Field(name="status", kind=choice(DispatchStatus)),
        Field(name="task_id", kind=STRING),
        Field(name="attempt", kind=INTEGER, minimum=0),
        _nullable("error", STRING, "Set when the dispatcher failed; the outbox delivers it"),
    ),
)

RETRY = Body(
    name="RetryResponse",
    description="A committed manual retry.",
    fields=_fields(
        Field(name="success", kind=BOOLEAN),
        Field(name="task", kind=TASK),
        Field(name="progress", kind=PROGRESS),
        Field(name="dispatch", kind=DISPATCH),
    ),
)

CAN_RETRY = Body(
    name="CanRetry",
    description="Whether a manual retry would be accepted now, and if not why.",
    fields=_fields(
        Field(name="allowed", kind=BOOLEAN),
        _nullable("code", Choice(("not_blocked", "project_not_runnable"))),
        _nullable("reason", STRING),
    ),
)

TASK_VIEW = Body(
    name="TaskResponse",
    fields=_fields(Field(name="task", kind=TASK), Field(name="can_retry", kind=CAN_RETRY)),
)

ATTEMPT = Body(
    name="Attempt",
    description="One attempt of a task.",
    fields=_fields(
        Field(name="number", kind=INTEGER, minimum=0),
        Field(name="trigger", kind=choice(Trigger)),
        _nullable("actor", STRING, "Who asked for a manual retry"),
        _nullable("reason", STRING, "Why, as the manual retry said"),
        _nullable("budget", choice(RetryBudget), "A manual retry's budget"),
        _nullable("dispatched_at", DATE_TIME),
        _nullable("available_at", DATE_TIME),
        _nullable("started_at", DATE_TIME),
        _nullable("finished_at", DATE_TIME),
        _nullable("outcome", choice(Outcome)),
        _nullable("error_type", STRING),
        _nullable("error_message", STRING),
    ),
)

ATTEMPTS = Body(
    name="AttemptsResponse",
    fields=_fields(
        Field(name="task_id", kind=STRING),
        Field(name="attempts", kind=ATTEMPT, many=True, description="Oldest first"),
    ),
)

PROJECT = Body(
    name="Project",
    fields=_fields(
        Field(name="id", kind=STRING),
        Field(name="status", kind=choice(ProjectStatus)),
        Field(name="name", kind=STRING),
    ),
)

PROJECT_PROGRESS = Body(
    name="ProgressResponse",
    fields=_fields(Field(name="project", kind=PROJECT), Field(name="progress", kind=PROGRESS)),
)

TASKS_PAGE = Body(
    name="TasksPage",
    fields=_fields(
        Field(name="tasks", kind=TASK, many=True),
        _nullable("next_after", STRING, "Pass as `after` for the next page; null on the last"),
    ),
)

PROJECT_SUMMARY = Body(
    name="ProjectSummary",
    description="A project with its progress.",
    fields=_fields(Field(name="project", kind=PROJECT), Field(name="progress", kind=PROGRESS)),
)

PROJECTS_PAGE = Body(
    name="ProjectsPage",
    fields=_fields(
        Field(name="projects", kind=PROJECT_SUMMARY, many=True, description="Ordered by id"),
        _nullable("next_after", STRING, "Pass as `after` for the next page; null on the last"),
    ),
)

BLOCKED_PAGE = Body(
    name="BlockedPage",
    fields=_fields(
        Field(
            name="tasks",
            kind=TASK,
            many=True,
            description="Ordered by project id, then task id",
        ),
        _nullable(
            "next_after",
            STRING,
            "An opaque cursor: pass as `after` for the next page; null on the last",
        ),
    ),
)

BULK_ITEM = Body(
    name="BulkItem",
    fields=_fields(
        Field(name="task_id", kind=STRING),
        Field(name="retried", kind=BOOLEAN, required=False, description="Not in a dry run"),
        Field(name="would_retry", kind=BOOLEAN, required=False, description="In a dry run only"),
        _nullable("detail", STRING, "Why not, when not"),
        _nullable("dispatch", choice(DispatchStatus)),
        Field(
            name="attempted",
            kind=BOOLEAN,
            description="False for a task the request stopped before",
        ),
    ),
)

BULK = Body(
    name="BulkResponse",
    fields=_fields(
        Field(name="dry_run", kind=BOOLEAN),
        Field(name="items", kind=BULK_ITEM, many=True),
        _count("retried", "Tasks retried by this request (0 in a dry run)"),
        Field(
            name="would_retry",
            kind=INTEGER,
            minimum=0,
            required=False,
            description="In a dry run only: tasks that would be retried",
        ),
        _nullable("next_after", STRING, "Pass as `after` for the next page; null on the last"),
        _nullable("stopped", choice(BulkStop), "Why the request stopped before its page's end"),
    ),
)

RESPONSES: tuple[Body, ...] = (
    *(TASK, PROGRESS, DISPATCH, RETRY, CAN_RETRY, TASK_VIEW, ATTEMPT, ATTEMPTS),
    *(PROJECT, PROJECT_PROGRESS, TASKS_PAGE, BULK_ITEM, BULK),
    *(PROJECT_SUMMARY, PROJECTS_PAGE, BLOCKED_PAGE),
)
"""Every response body (the error body is the HTTP layer's)."""


# -- JSON Schema -------------------------------------------------------------------------


def _kind_schema(kind: Kind) -> dict[str, Any]:
    if isinstance(kind, Body):
        return json_schema(kind)
    if isinstance(kind, Choice):
        return {"type": "string", "enum": list(kind.values)}
    if kind == DATE_TIME:
        return {"type": "string", "format": "date-time"}
    if kind == OBJECT:
        return {"type": "object"}
    return {"type": kind}


def field_schema(field: Field) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12, as OpenAPI 3.1 uses) of one field's value."""
    found = _kind_schema(field.kind)
    if field.minimum is not None:
        found["minimum"] = field.minimum
    if field.maximum is not None:
        found["maximum"] = field.maximum
    if field.max_length is not None:
        found["maxLength"] = field.max_length
    if field.many:
        found = {"type": "array", "items": found}
    if field.nullable:
        found = {"anyOf": [found, {"type": "null"}]}
    if field.description is not None:
        found["description"] = field.description
    if field.default is not ABSENT:
        found["default"] = field.default
    return found


def json_schema(body: Body) -> dict[str, Any]:
    """The JSON Schema of ``body``: its fields, which are required, and no others."""
    found: dict[str, Any] = {
        "title": body.name,
        "type": "object",
        "properties": {f.name: field_schema(f) for f in body.fields},
        "required": list(body.required),
        "additionalProperties": False,
    }
    if body.description is not None:
        found["description"] = body.description
    return found


__all__ = [
    "ABSENT",
    "ATTEMPT",
    "ATTEMPTS",
    "BULK",
    "BULK_ITEM",
    "CAN_RETRY",
    "DISPATCH",
    "PROGRESS",
    "PROJECT",
    "PROJECT_PROGRESS",
    "RESPONSES",
    "RETRY",
    "TASK",
    "TASKS_PAGE",
    "TASK_VIEW",
    "Body",
    "Choice",
    "Field",
    "choice",
    "field_schema",
    "json_schema",
]
