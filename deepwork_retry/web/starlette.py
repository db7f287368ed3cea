"""The retry API for Starlette (ASGI), over the async services.

from deepwork_retry.web.starlette import create_app, mount, routes

app = create_app(service, StaticTokens.from_env())      # a whole app,
mount(app, service, tokens)                             # added to yours, or
app = Starlette(routes=[*routes(service, tokens), ...])  # listed in yours

Every adapter has the same three entry points: ``mount(app, ...)``,
``routes(...)`` (the framework's own object) and ``create_app(...)``, and two
for the operator dashboard (the extra ``dashboard``)::

    mount_dashboard(app, service, tokens, secret=os.environ["DEEPWORK_DASHBOARD_SECRET"])
"""

from __future__ import annotations

from typing import Any

from deepwork_retry._async.services import AsyncRetryService
from deepwork_retry.auth import Authenticator, Authorizer, may_retry
from deepwork_retry.exceptions import missing_extra
from deepwork_retry.web._api import async_api
from deepwork_retry.web._async_api import AsyncRetryAPI
from deepwork_retry.web._http import DEFAULT_PREFIX, normalise_prefix

try:
    from starlette.applications import Starlette
    from starlette.routing import BaseRoute, Route, Router

    from deepwork_retry.web._asgi import ApiEndpoint, catch_all_path
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise missing_extra("starlette", __name__, exc) from exc


def routes(
    service: AsyncRetryService | AsyncRetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    prefix: str = DEFAULT_PREFIX,
) -> list[BaseRoute]:
    """The API's routes under ``prefix``, to list in your own application.

    One route takes the prefix and every path and method below it, so the API
    answers all of them itself (JSON 404 and 405, never a redirect).
    """
    endpoint = ApiEndpoint(_api(service, authenticator, authorizer))
    # An ASGI application as the endpoint: it reads the scope and writes the two
    # response messages itself, with no Request or Response objects in between.
    # methods=None: every method reaches the API, OPTIONS and unknown ones too.
    return [
        Route(
            catch_all_path(normalise_prefix(prefix)),
            endpoint,
            methods=None,
            name="endpoint",  # the name it has always had
        )
    ]


def mount(
    app: Starlette | Router,
    service: AsyncRetryService | AsyncRetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    prefix: str = DEFAULT_PREFIX,
) -> None:
    """Serve the API under ``prefix`` in ``app`` (a Starlette application or router)."""
    app.routes.extend(routes(service, authenticator, authorizer, prefix=prefix))


def create_app(
    service: AsyncRetryService | AsyncRetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    prefix: str = DEFAULT_PREFIX,
    **starlette: Any,
) -> Starlette:
    """A Starlette application serving only the API (extra keywords go to ``Starlette``)."""
    return Starlette(routes=routes(service, authenticator, authorizer, prefix=prefix), **starlette)


def dashboard_routes(
    service: AsyncRetryService | AsyncRetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    secret: str | bytes,
    prefix: str = "/deep-work",
    **options: Any,
) -> list[BaseRoute]:
    """The dashboard's routes under ``prefix`` (one route taking every path below it).

    ``service`` is a service (then ``authenticator`` is required) or the
    :class:`AsyncRetryAPI` the JSON API already serves, so that both share its
    stream slots; ``options`` go to
    :class:`~deepwork_retry.web.dashboard.AsyncDashboard` (``session_max_age``,
    ``secure``).
    """
    from deepwork_retry.web.dashboard import AsyncDashboard

    api = _api(service, authenticator, authorizer)
    dashboard = AsyncDashboard(api, secret=secret, prefix=prefix, **options)
    return [
        Route(
            catch_all_path(normalise_prefix(prefix)),
            ApiEndpoint(dashboard),
            methods=None,
            name="deepwork_dashboard",
        )
    ]


def mount_dashboard(
    app: Starlette | Router,
    service: AsyncRetryService | AsyncRetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    secret: str | bytes,
    prefix: str = "/deep-work",
    **options: Any,
) -> None:
    """Serve the dashboard under ``prefix`` in ``app`` (see :func:`dashboard_routes`)."""
    app.routes.extend(
        dashboard_routes(
            service,
            authenticator,
            authorizer,
            secret=secret,
            prefix=prefix,
            **options,
        )
    )


def _api(
    service: AsyncRetryService | AsyncRetryAPI,
    authenticator: Authenticator | None,
    authorizer: Authorizer,
) -> AsyncRetryAPI:
    return async_api(service, authenticator, authorizer, adapter=__name__)


__all__ = ["create_app", "dashboard_routes", "mount", "mount_dashboard", "routes"]
