"""The retry API as a FastAPI ``APIRouter``, over the async services.

    from deepwork_retry.web.fastapi import mount

    mount(app, service, StaticTokens.from_env())

(or ``app.include_router(routes(service, tokens))``, or ``create_app(service, tokens)``).

The response models below document the API in ``/openapi.json``; the
behaviour is the shared one of :class:`~deepwork_retry.web.AsyncRetryAPI`,
so FastAPI's own validation never answers in its place.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from deepwork_retry._async.services import AsyncRetryService
from deepwork_retry._core.inputs import MAX_LIMIT
from deepwork_retry.auth import Authenticator, Authorizer, may_retry
from deepwork_retry.exceptions import missing_extra
from deepwork_retry.web._api import async_api, renamed
from deepwork_retry.web._async_api import AsyncRetryAPI
from deepwork_retry.web._http import (
    DEFAULT_PREFIX,
    MAX_IDEMPOTENCY_KEY_LENGTH,
    MAX_REASON_LENGTH,
    ROUTES,
    normalise_prefix,
)

try:
    from fastapi import APIRouter, FastAPI, Request, Response, Security
    from fastapi.security import HTTPBearer
    from pydantic import BaseModel, Field

    from deepwork_retry.web._asgi import ApiEndpoint, catch_all_path, handle
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise missing_extra("fastapi", __name__, exc) from exc

# -- the documented shapes ----------------------------------------------------------


class Error(BaseModel):
    detail: str


class TaskModel(BaseModel):
    id: str
    project_id: str
    title: str
    status: Literal["inbox", "assigned", "in_progress", "review", "done", "blocked", "skipped"]
    retry_count: int
    max_retries: int
    retries_left: int
    error_message: str | None
    error_type: str | None
    blocked_reason: str | None
    blocked_by: list[str]
    attempt: int
    created_at: datetime | None
    updated_at: datetime | None
    started_at: datetime | None
    completed_at: datetime | None
    lease_expires_at: datetime | None
    metadata: dict[str, Any]


class ProgressModel(BaseModel):
    total: int
    completed: int
    in_progress: int
    percent: int = Field(ge=0, le=100)
    inbox: int
    assigned: int
    review: int
    blocked: int
    skipped: int
    done: int


class DispatchModel(BaseModel):
    status: Literal["dispatched", "pending", "deferred"]
    task_id: str
    attempt: int
    error: str | None


class RetryResponse(BaseModel):
    success: bool
    task: TaskModel
    progress: ProgressModel
    dispatch: DispatchModel


class CanRetry(BaseModel):
    allowed: bool
    code: str | None
    reason: str | None


class TaskResponse(BaseModel):
    task: TaskModel
    can_retry: CanRetry


class AttemptModel(BaseModel):
    number: int
    trigger: str
    actor: str | None
    reason: str | None
    budget: str | None
    dispatched_at: datetime | None
    available_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    outcome: str | None
    error_type: str | None
    error_message: str | None


class AttemptsResponse(BaseModel):
    task_id: str
    attempts: list[AttemptModel]


class ProjectModel(BaseModel):
    id: str
    status: str
    name: str


class ProgressResponse(BaseModel):
    project: ProjectModel
    progress: ProgressModel


class TasksPage(BaseModel):
    tasks: list[TaskModel]
    next_after: str | None


class BulkItemModel(BaseModel):
    task_id: str
    retried: bool | None = None
    would_retry: bool | None = None
    detail: str | None
    dispatch: Literal["dispatched", "pending", "deferred"] | None
    attempted: bool


class BulkResponse(BaseModel):
    dry_run: bool
    items: list[BulkItemModel]
    retried: int = Field(description="Tasks retried by this request (0 in a dry run)")
    would_retry: int | None = Field(
        default=None, description="In a dry run only: tasks that would be retried"
    )
    next_after: str | None
    stopped: Literal["storage_unavailable", "out_of_time", "interrupted"] | None


class RetryOptions(BaseModel):
    """The retry endpoint's optional body."""

    budget: Literal["one_more", "full"] | None = Field(
        default=None, description="What the retry does to the automatic budget (default one_more)"
    )
    reason: str | None = Field(default=None, max_length=MAX_REASON_LENGTH)


class BulkOptions(BaseModel):
    """The bulk retry's optional body."""

    dry_run: bool | None = False
    budget: Literal["one_more", "full"] | None = None
    reason: str | None = Field(default=None, max_length=MAX_REASON_LENGTH)
    after: str | None = None
    limit: int | None = Field(default=100, ge=1, le=MAX_LIMIT)


# -- the OpenAPI description of each route ------------------------------------------------


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    texts = {
        202: "The retry was committed, but its result could not be shown; read the task",
        400: "The task is not blocked",
        401: "Missing or invalid bearer token",
        404: "Project or task not found (or not visible to this token)",
        409: "The project cannot take work, or an earlier request with this key is running",
        413: "Request body too large",
        422: "Invalid body, query or Idempotency-Key, or a key reused for another task",
        503: "Storage unavailable; retry after the Retry-After delay",
    }
    return {s: {"model": Error, "description": texts[s]} for s in statuses}


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "required": False,
        "content": {"application/json": {"schema": model.model_json_schema()}},
    }


_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Repeat a request with the same key to get its first response again",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY_LENGTH},
}

_TASK = [_path("project_id"), _path("task_id")]
_PROJECT = [_path("project_id")]

_DOCS: dict[str, dict[str, Any]] = {
    "retry": {
        "summary": "Retry a blocked task",
        "response_model": RetryResponse,
        "responses": _errors(202, 400, 401, 404, 409, 413, 422, 503),
        "openapi_extra": {
            "parameters": [*_TASK, _IDEMPOTENCY_KEY],
            "requestBody": _body(RetryOptions),
        },
    },
    "task": {
        "summary": "A task, and whether it can be retried now",
        "response_model": TaskResponse,
        "responses": _errors(401, 404, 503),
        "openapi_extra": {"parameters": _TASK},
    },
    "attempts": {
        "summary": "A task's attempt history, oldest first",
        "response_model": AttemptsResponse,
        "responses": _errors(401, 404, 503),
        "openapi_extra": {"parameters": _TASK},
    },
    "progress": {
        "summary": "A project's progress",
        "response_model": ProgressResponse,
        "responses": _errors(401, 404, 503),
        "openapi_extra": {"parameters": _PROJECT},
    },
    "tasks": {
        "summary": "A project's blocked tasks, one page at a time",
        "response_model": TasksPage,
        "responses": _errors(401, 404, 422, 503),
        "openapi_extra": {
            "parameters": [
                *_PROJECT,
                _query("status", {"type": "string", "enum": ["blocked"]}),
                _query("after", {"type": "string"}),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}),
            ]
        },
    },
    "retry_blocked": {
        "summary": "Retry (or with dry_run, check) a page of a project's blocked tasks",
        "response_model": BulkResponse,
        "responses": _errors(401, 404, 413, 422, 503),
        "openapi_extra": {"parameters": _PROJECT, "requestBody": _body(BulkOptions)},
    },
}


def routes(
    service: AsyncRetryService | AsyncRetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    prefix: str = DEFAULT_PREFIX,
    tags: list[str] | None = None,
) -> APIRouter:
    """An ``APIRouter`` serving the API under ``prefix``; include it in your app."""
    api = async_api(service, authenticator, authorizer, adapter=__name__)
    # Documents the Bearer scheme; it never refuses a request itself (the API does).
    bearer = HTTPBearer(auto_error=False, description="A token known to the authenticator")
    found = APIRouter(
        prefix=normalise_prefix(prefix),
        tags=list(tags or ["deep work retries"]),
        dependencies=[Security(bearer)],
    )

    def endpoint(template: str) -> Any:
        async def endpoint(request: Request) -> Response:
            return await handle(api, request, template.format(**request.path_params))

        return endpoint

    for method, template, name in ROUTES:
        found.add_api_route(
            template,
            endpoint(template),
            methods=[method],
            name=f"deepwork_retry_{name}",
            operation_id=name,
            **_DOCS[name],
        )

    # Anything else under the prefix (the prefix itself, empty ids, every other
    # method) gets the API's own answer: a plain route, which takes every method,
    # where an API route would list some and leave the rest to FastAPI's 405.
    found.add_route(
        catch_all_path(normalise_prefix(prefix)),
        ApiEndpoint(api),  # type: ignore[arg-type]  # Route takes an ASGI app too; the hint omits it
        include_in_schema=False,
    )
    return found


def mount(
    app: FastAPI | APIRouter,
    service: AsyncRetryService | AsyncRetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    prefix: str = DEFAULT_PREFIX,
    tags: list[str] | None = None,
) -> None:
    """Serve the API under ``prefix`` in ``app`` (a FastAPI application or router)."""
    app.include_router(routes(service, authenticator, authorizer, prefix=prefix, tags=tags))


def create_app(
    service: AsyncRetryService | AsyncRetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    prefix: str = DEFAULT_PREFIX,
    **fastapi: Any,
) -> FastAPI:
    """A FastAPI application serving only the API (extra keywords go to ``FastAPI``)."""
    fastapi.setdefault("title", "deepwork_retry")
    app = FastAPI(**fastapi)
    mount(app, service, authenticator, authorizer, prefix=prefix)
    return app


router = renamed(routes, "router", __name__)


__all__ = [
    "AttemptsResponse",
    "BulkResponse",
    "Error",
    "ProgressResponse",
    "RetryOptions",
    "RetryResponse",
    "TaskResponse",
    "TasksPage",
    "create_app",
    "mount",
    "router",
    "routes",
]
