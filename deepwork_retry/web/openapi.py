"""The API's OpenAPI document, built from the one description of its bodies.

No framework is needed: the demo server serves :func:`openapi_document` as it
is, and the FastAPI adapter hands each route's :func:`operation` to FastAPI,
so that both documents say the same (the test suite holds them equal). The
response bodies are described in :mod:`deepwork_retry._core.wire`; the request
and error bodies, which the HTTP layer owns, here, in the same terms.
"""

from __future__ import annotations

from typing import Any

import attrs

from deepwork_retry import __version__
from deepwork_retry._core import wire
from deepwork_retry._core.events import EventType
from deepwork_retry._core.inputs import MAX_ERROR_TYPE_LENGTH, MAX_LIMIT
from deepwork_retry._core.states import RetryBudget
from deepwork_retry._core.wire import (
    BOOLEAN,
    DATE_TIME,
    INTEGER,
    OBJECT,
    STRING,
    Body,
    Choice,
    Field,
    choice,
)
from deepwork_retry.web._http import (
    DEFAULT_PAGE,
    DEFAULT_PREFIX,
    ERROR_CODES,
    JSON,
    MAX_IDEMPOTENCY_KEY_LENGTH,
    MAX_REASON_LENGTH,
    ROUTES,
    normalise_prefix,
)

OPERATION_PREFIX = "deepwork_retry_"
"""Every operation id starts with it, so that none collides inside a host's document."""

TAG = "deep work retries"
SECURITY_SCHEME = "HTTPBearer"
BEARER_DESCRIPTION = "A token known to the authenticator"

# -- the request and error bodies ------------------------------------------------------

_BUDGET = Field(
    name="budget",
    kind=choice(RetryBudget),
    nullable=True,
    required=False,
    default=RetryBudget.ONE_MORE.value,
    description="What the retry does to the automatic budget",
)
_REASON = Field(
    name="reason",
    kind=STRING,
    nullable=True,
    required=False,
    max_length=MAX_REASON_LENGTH,
    description="Recorded with the attempt",
)

RETRY_OPTIONS = Body(
    name="RetryOptions",
    description="The retry endpoint's optional body.",
    fields=(_BUDGET, _REASON),
)

BULK_OPTIONS = Body(
    name="BulkOptions",
    description="The bulk retry's optional body.",
    fields=(
        Field(
            name="dry_run",
            kind=BOOLEAN,
            nullable=True,
            required=False,
            default=False,
            description="Only check what would be retried; change nothing",
        ),
        _BUDGET,
        _REASON,
        Field(
            name="after",
            kind=STRING,
            nullable=True,
            required=False,
            description="Go on after this task id (the previous page's next_after)",
        ),
        Field(
            name="limit",
            kind=INTEGER,
            nullable=True,
            required=False,
            default=100,
            minimum=1,
            maximum=MAX_LIMIT,
        ),
    ),
)

REQUESTS = (RETRY_OPTIONS, BULK_OPTIONS)

# -- the event stream's frames ------------------------------------------------------------

EVENT = Body(
    name="Event",
    description="A lifecycle event: the `data` of a stream frame whose `event` is its type.",
    fields=(
        Field(name="id", kind=STRING, description="`project_id:seq`: deduplicate on it"),
        Field(name="type", kind=choice(EventType), description="What happened"),
        Field(name="project_id", kind=STRING),
        Field(name="seq", kind=INTEGER, minimum=1, description="The frame's `id`: 1, 2, 3..."),
        Field(name="task_id", kind=STRING, nullable=True),
        Field(name="attempt", kind=INTEGER, nullable=True),
        Field(name="at", kind=DATE_TIME),
        Field(name="data", kind=OBJECT, description="What the type carries"),
    ),
)

STREAM_PROGRESS = Body(
    name="StreamProgress",
    description="The `data` of a `progress` frame (no `id`): the counters after a batch.",
    fields=(
        Field(name="project_id", kind=STRING),
        Field(name="progress", kind=wire.PROGRESS),
    ),
)

EVENT_STREAM = "text/event-stream"

STREAM_DESCRIPTION = (
    "Server-Sent Events, until the client disconnects: a `retry:` hint, then one frame "
    "per event (`id: <seq>`, `event: <type>`, `data: <Event JSON>`), a `progress` frame "
    "after each batch, and `: keepalive` comments while quiet. Resume with "
    "`Last-Event-ID` (or `?after=`): only events after it are sent."
)


def error_body(*statuses: int) -> Body:
    """The error body, its ``code`` one of those answered with ``statuses`` (all if none)."""
    codes = tuple(
        code
        for code, answered in ERROR_CODES.items()
        if not statuses or answered.intersection(statuses)
    )
    return Body(
        name="Error",
        fields=(
            Field(name="detail", kind=STRING, description="What went wrong, for people"),
            Field(
                name="code",
                kind=Choice(codes),
                description="What went wrong, for programs: stable across releases",
            ),
        ),
    )


ERROR = error_body()

# -- operations ----------------------------------------------------------------------------

_STATUS_TEXT = {
    202: "The retry was committed, but its result could not be shown; read the task",
    400: "The task is not blocked",
    401: "Missing or invalid bearer token",
    404: "Project or task not found (or not visible to this token)",
    409: "The project cannot take work, or an earlier request with this key is running",
    413: "Request body too large",
    422: "Invalid body, query or Idempotency-Key, or a key reused for another task",
    429: "Too many event streams open for this token; retry after the Retry-After delay",
    501: "The storage keeps no events to stream",
    503: "Storage unavailable; retry after the Retry-After delay",
}

_SECONDS = {"type": "string", "pattern": "^[0-9]+$"}

_HEADERS: dict[int, dict[str, dict[str, Any]]] = {
    401: {
        "WWW-Authenticate": {
            "description": 'The Bearer challenge (`Bearer error="invalid_token"` for a bad token)',
            "required": True,
            "schema": {"type": "string"},
        }
    },
    409: {
        "Retry-After": {
            "description": "Seconds to wait, when a request with this key is still running",
            "required": False,
            "schema": _SECONDS,
        }
    },
    429: {
        "Retry-After": {
            "description": "Seconds to wait before opening another stream",
            "required": True,
            "schema": _SECONDS,
        }
    },
    503: {
        "Retry-After": {
            "description": "Seconds to wait before trying again",
            "required": True,
            "schema": _SECONDS,
        }
    },
}

_REPLAYED = {
    "Idempotent-Replayed": {
        "description": "The first response for this Idempotency-Key, answered again",
        "required": False,
        "schema": {"type": "string", "enum": ["true"]},
    }
}


@attrs.frozen(kw_only=True)
class _Doc:
    summary: str
    answer: Body | None
    """The 200's JSON body; ``None`` for the event stream."""
    statuses: tuple[int, ...]
    parameters: tuple[dict[str, Any], ...]
    body: Body | None = None
    replays: bool = False
    """Answers an Idempotency-Key, so that any answer may be a replay."""
    texts: tuple[tuple[int, str], ...] = ()
    """What a status means for this route, where it differs from the usual text."""


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Repeat a request with the same key to get its first response again",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY_LENGTH},
}

_LAST_EVENT_ID = {
    "name": "Last-Event-ID",
    "in": "header",
    "required": False,
    "description": "The `id` of the last event received: the stream resumes after it",
    "schema": {"type": "string", "pattern": "^[0-9]+$"},
}

_LIMIT = _query(
    "limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_PAGE}
)
_NO_OVERVIEW = ((501, "The storage offers no listing across projects"),)

_TASK = (_path("project_id"), _path("task_id"))
_PROJECT = (_path("project_id"),)

_DOCS: dict[str, _Doc] = {
    "retry": _Doc(
        summary="Retry a blocked task",
        answer=wire.RETRY,
        statuses=(202, 400, 401, 404, 409, 413, 422, 503),
        parameters=(*_TASK, _IDEMPOTENCY_KEY),
        body=RETRY_OPTIONS,
        replays=True,
    ),
    "task": _Doc(
        summary="A task, and whether it can be retried now",
        answer=wire.TASK_VIEW,
        statuses=(401, 404, 503),
        parameters=_TASK,
    ),
    "attempts": _Doc(
        summary="A task's attempt history, oldest first",
        answer=wire.ATTEMPTS,
        statuses=(401, 404, 503),
        parameters=_TASK,
    ),
    "progress": _Doc(
        summary="A project's progress",
        answer=wire.PROJECT_PROGRESS,
        statuses=(401, 404, 503),
        parameters=_PROJECT,
    ),
    "tasks": _Doc(
        summary="A project's blocked tasks, one page at a time",
        answer=wire.TASKS_PAGE,
        statuses=(401, 404, 422, 503),
        parameters=(
            *_PROJECT,
            _query("status", {"type": "string", "enum": ["blocked"], "default": "blocked"}),
            _query("after", {"type": "string"}),
            _query(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_PAGE},
            ),
        ),
    ),
    "retry_blocked": _Doc(
        summary="Retry (or with dry_run, check) a page of a project's blocked tasks",
        answer=wire.BULK,
        statuses=(401, 404, 413, 422, 503),
        parameters=_PROJECT,
        body=BULK_OPTIONS,
    ),
    "events": _Doc(
        summary="A project's lifecycle events and progress, live (Server-Sent Events)",
        answer=None,
        statuses=(400, 401, 404, 422, 429, 501, 503),
        parameters=(
            *_PROJECT,
            _query("after", {"type": "integer", "minimum": 0, "default": 0}),
            _LAST_EVENT_ID,
        ),
        texts=((400, "Last-Event-ID (or after) is not an event number"),),
    ),
    "projects": _Doc(
        summary="The projects this token may see, with their progress, one page at a time",
        answer=wire.PROJECTS_PAGE,
        statuses=(401, 422, 501, 503),
        parameters=(
            {
                **_query("after", {"type": "string"}),
                "description": "The previous page's next_after: the page starts after this id",
            },
            _LIMIT,
        ),
        texts=_NO_OVERVIEW,
    ),
    "blocked": _Doc(
        summary="Blocked tasks across the projects this token may see, one page at a time",
        answer=wire.BLOCKED_PAGE,
        statuses=(401, 422, 501, 503),
        parameters=(
            {
                **_query("project_id", {"type": "string"}),
                "description": "Only this project's tasks (one this token may not see: none)",
            },
            {
                **_query("error_type", {"type": "string", "maxLength": MAX_ERROR_TYPE_LENGTH}),
                "description": "Only the tasks whose error_type is exactly this",
            },
            {
                **_query("after", {"type": "string"}),
                "description": "The previous page's next_after (an opaque cursor)",
            },
            _LIMIT,
        ),
        texts=_NO_OVERVIEW,
    ),
}


def _content(body: Body) -> dict[str, Any]:
    return {JSON: {"schema": wire.json_schema(body)}}


def _stream_content() -> dict[str, Any]:
    return {
        EVENT_STREAM: {
            "schema": {"type": "string", "description": STREAM_DESCRIPTION},
            "x-deepwork-frames": {
                "event": wire.json_schema(EVENT),
                "progress": wire.json_schema(STREAM_PROGRESS),
            },
        }
    }


def _response(status: int, doc: _Doc) -> dict[str, Any]:
    found: dict[str, Any] = {"description": dict(doc.texts).get(status, _STATUS_TEXT[status])}
    headers = {**_HEADERS.get(status, {}), **(_REPLAYED if doc.replays else {})}
    if headers:
        found["headers"] = headers
    found["content"] = _content(error_body(status))
    return found


def operation_id(route: str) -> str:
    """The operation id of a route of :data:`~deepwork_retry.web._http.ROUTES`."""
    return OPERATION_PREFIX + route


def operation(route: str) -> dict[str, Any]:
    """What the document says of ``route`` beyond its summary, id, tags and security:
    parameters, request body and every response, with their headers and bodies."""
    doc = _DOCS[route]
    ok: dict[str, Any] = {"description": "Successful Response"}
    if doc.replays:
        ok["headers"] = dict(_REPLAYED)
    ok["content"] = _stream_content() if doc.answer is None else _content(doc.answer)
    found: dict[str, Any] = {"parameters": [dict(p) for p in doc.parameters]}
    if doc.body is not None:
        found["requestBody"] = {"required": False, "content": _content(doc.body)}
    found["responses"] = {"200": ok, **{str(s): _response(s, doc) for s in doc.statuses}}
    return found


def summary(route: str) -> str:
    return _DOCS[route].summary


def openapi_document(
    prefix: str = DEFAULT_PREFIX, *, title: str = "deepwork_retry", version: str = __version__
) -> dict[str, Any]:
    """The whole OpenAPI 3.1 document of the API mounted under ``prefix``."""
    paths: dict[str, dict[str, Any]] = {}
    root = normalise_prefix(prefix)
    for method, template, route in ROUTES:
        paths.setdefault(root + template, {})[method.lower()] = {
            "tags": [TAG],
            "summary": summary(route),
            "operationId": operation_id(route),
            **operation(route),
            "security": [{SECURITY_SCHEME: []}],
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "securitySchemes": {
                SECURITY_SCHEME: {
                    "type": "http",
                    "description": BEARER_DESCRIPTION,
                    "scheme": "bearer",
                }
            }
        },
    }


__all__ = [
    "BULK_OPTIONS",
    "ERROR",
    "EVENT",
    "OPERATION_PREFIX",
    "REQUESTS",
    "RETRY_OPTIONS",
    "STREAM_PROGRESS",
    "error_body",
    "openapi_document",
    "operation",
    "operation_id",
]
