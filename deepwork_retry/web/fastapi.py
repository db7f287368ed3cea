"""The retry API as a FastAPI ``APIRouter``, over the async services.

    from deepwork_retry.web.fastapi import mount

    mount(app, service, StaticTokens.from_env())

(or ``app.include_router(routes(service, tokens))``, or ``create_app(service, tokens)``).
The operator dashboard (the extra ``dashboard``) beside it, over the same API:
``mount_dashboard(app, api, secret=...)`` (or ``dashboard_routes(...)``, a router).

Each route's entry in ``/openapi.json`` is the one of
:mod:`deepwork_retry.web.openapi` (the demo server serves the same document);
the pydantic models below are derived from the same description of each body,
for applications that type their clients with them. The behaviour is the
shared one of :class:`~deepwork_retry.web.AsyncRetryAPI`, so FastAPI's
own validation never answers in its place.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from deepwork_retry._async.services import AsyncRetryService
from deepwork_retry._core import wire
from deepwork_retry.auth import Authenticator, Authorizer, may_retry
from deepwork_retry.exceptions import missing_extra
from deepwork_retry.web._api import async_api, renamed
from deepwork_retry.web._async_api import AsyncRetryAPI
from deepwork_retry.web._http import DEFAULT_PREFIX, ROUTES, normalise_prefix
from deepwork_retry.web.openapi import (
    BEARER_DESCRIPTION,
    BULK_OPTIONS,
    ERROR,
    RETRY_OPTIONS,
    SECURITY_SCHEME,
    TAG,
    operation,
    operation_id,
    summary,
)

try:
    from fastapi import APIRouter, FastAPI, Request, Response, Security
    from fastapi.security import HTTPBearer
    from pydantic import BaseModel, ConfigDict, Field, create_model

    from deepwork_retry.web._asgi import (
        ApiEndpoint,
        StreamResponseAdapter,
        catch_all_path,
        handle,
    )
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise missing_extra("fastapi", __name__, exc) from exc

# -- the documented shapes, derived from the one description of each body ----------------


def _python_type(field: wire.Field) -> Any:
    kind = field.kind
    found: Any
    if isinstance(kind, wire.Body):
        found = model(kind)
    elif isinstance(kind, wire.Choice):
        found = Literal.__getitem__(kind.values)
    else:
        found = _SCALARS[kind]
    if field.many:
        found = list[found]
    if field.nullable or not field.required:
        found = found | None
    return found


_SCALARS: dict[str, Any] = {
    wire.STRING: str,
    wire.INTEGER: int,
    wire.BOOLEAN: bool,
    wire.DATE_TIME: datetime,
    wire.OBJECT: dict[str, Any],
}

_MODELS: dict[wire.Body, type[BaseModel]] = {}


def model(body: wire.Body) -> type[BaseModel]:
    """The pydantic model of ``body`` (made once): its fields and no others."""
    found = _MODELS.get(body)
    if found is None:
        fields: dict[str, Any] = {}
        for field in body.fields:
            default = None if field.default is wire.ABSENT else field.default
            fields[field.name] = (
                _python_type(field),
                Field(
                    default=... if field.required else default,
                    description=field.description,
                    ge=field.minimum,
                    le=field.maximum,
                    max_length=field.max_length,
                ),
            )
        found = create_model(
            body.name, __config__=ConfigDict(extra="forbid"), __doc__=body.description, **fields
        )
        _MODELS[body] = found
    return found


Error = model(ERROR)
TaskModel = model(wire.TASK)
ProgressModel = model(wire.PROGRESS)
DispatchModel = model(wire.DISPATCH)
RetryResponse = model(wire.RETRY)
CanRetry = model(wire.CAN_RETRY)
TaskResponse = model(wire.TASK_VIEW)
AttemptModel = model(wire.ATTEMPT)
AttemptsResponse = model(wire.ATTEMPTS)
ProjectModel = model(wire.PROJECT)
ProgressResponse = model(wire.PROJECT_PROGRESS)
TasksPage = model(wire.TASKS_PAGE)
BulkItemModel = model(wire.BULK_ITEM)
BulkResponse = model(wire.BULK)
ProjectSummaryModel = model(wire.PROJECT_SUMMARY)
ProjectsPage = model(wire.PROJECTS_PAGE)
BlockedPage = model(wire.BLOCKED_PAGE)
RetryOptions = model(RETRY_OPTIONS)
BulkOptions = model(BULK_OPTIONS)


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
    bearer = HTTPBearer(
        auto_error=False, scheme_name=SECURITY_SCHEME, description=BEARER_DESCRIPTION
    )
    found = APIRouter(
        prefix=normalise_prefix(prefix),
        tags=list(tags or [TAG]),
        dependencies=[Security(bearer)],
    )

    def endpoint(template: str) -> Any:
        async def endpoint(request: Request) -> Response:
            return await handle(api, request, template.format(**request.path_params))

        return endpoint

    for method, template, name in ROUTES:
        # The stream's 200 is text/event-stream: FastAPI documents the response class's type.
        streams: dict[str, Any] = (
            {"response_class": StreamResponseAdapter, "status_code": 200}
            if name == "events"
            else {}
        )
        found.add_api_route(
            template,
            endpoint(template),
            methods=[method],
            name=operation_id(name),
            operation_id=operation_id(name),
            summary=summary(name),
            openapi_extra=operation(name),
            **streams,
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


def dashboard_routes(
    service: AsyncRetryService | AsyncRetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    secret: str | bytes,
    prefix: str = "/deep-work",
    **options: Any,
) -> APIRouter:
    """An ``APIRouter`` serving the operator dashboard under ``prefix`` (the extra
    ``dashboard``); include it in your app. Not in the OpenAPI document.

    ``service`` is a service (then ``authenticator`` is required) or the
    :class:`AsyncRetryAPI` the JSON API already serves, so that both share its
    stream slots; ``options`` go to
    :class:`~deepwork_retry.web.dashboard.AsyncDashboard` (``session_max_age``,
    ``secure``).
    """
    from deepwork_retry.web.dashboard import AsyncDashboard

    api = async_api(service, authenticator, authorizer, adapter=__name__)
    dashboard = AsyncDashboard(api, secret=secret, prefix=prefix, **options)
    found = APIRouter()
    # One plain route taking every path and method below the prefix: the
    # dashboard answers all of them itself (its own 404 and 405 pages).
    found.add_route(
        catch_all_path(normalise_prefix(prefix)),
        ApiEndpoint(dashboard),  # type: ignore[arg-type]  # Route takes an ASGI app too; the hint omits it
        include_in_schema=False,
        name="deepwork_dashboard",
    )
    return found


def mount_dashboard(
    app: FastAPI | APIRouter,
    service: AsyncRetryService | AsyncRetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    secret: str | bytes,
    prefix: str = "/deep-work",
    **options: Any,
) -> None:
    """Serve the dashboard under ``prefix`` in ``app`` (see :func:`dashboard_routes`)."""
    app.include_router(
        dashboard_routes(
            service,
            authenticator,
            authorizer,
            secret=secret,
            prefix=prefix,
            **options,
        )
    )


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
    "AttemptModel",
    "AttemptsResponse",
    "BlockedPage",
    "BulkItemModel",
    "BulkOptions",
    "BulkResponse",
    "CanRetry",
    "DispatchModel",
    "Error",
    "ProgressModel",
    "ProgressResponse",
    "ProjectModel",
    "ProjectSummaryModel",
    "ProjectsPage",
    "RetryOptions",
    "RetryResponse",
    "TaskModel",
    "TaskResponse",
    "TasksPage",
    "create_app",
    "dashboard_routes",
    "model",
    "mount",
    "mount_dashboard",
    "router",
    "routes",
]
