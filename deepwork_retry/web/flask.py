"""The retry API as a Flask blueprint, over the sync services.

from deepwork_retry.web.flask import mount

mount(app, service, StaticTokens.from_env())

(or ``app.register_blueprint(routes(service, tokens))``, or ``create_app(service, tokens)``).

The operator dashboard (the extra ``dashboard``) beside it, over the same API:
``mount_dashboard(app, api, secret=...)`` (or ``dashboard_routes(...)``, a blueprint).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deepwork_retry._sync.services import RetryService
from deepwork_retry.auth import Authenticator, Authorizer, may_retry
from deepwork_retry.exceptions import DeepworkError, missing_extra
from deepwork_retry.web._api import renamed, sync_api
from deepwork_retry.web._bodies import read_wsgi_body
from deepwork_retry.web._http import (
    ANY_PATH,
    DEFAULT_PREFIX,
    ApiRequest,
    ApiResponse,
    content_type,
    error_response,
    normalise_prefix,
    other_headers,
    parse_query,
    wsgi_path_bytes,
)
from deepwork_retry.web._sse import wsgi_disconnected
from deepwork_retry.web._sync_api import RetryAPI

try:
    from flask import Blueprint, Flask, Response, request
    from flask.sansio.blueprints import BlueprintSetupState
    from werkzeug.routing import BaseConverter, Rule
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise missing_extra("flask", __name__, exc) from exc


class AnyPathConverter(BaseConverter):
    """Like werkzeug's ``path`` converter, but newlines (allowed in ids) match too."""

    regex = r"[\s\S]*"
    part_isolating = False


def _view(handle: Callable[[ApiRequest], ApiResponse]) -> Callable[..., Response]:
    """The Flask view answering every request with ``handle`` (the API's or the dashboard's)."""

    def view(rest: str = "") -> Response:
        try:
            body = read_wsgi_body(request.environ)
        except DeepworkError as exc:  # the body's framing: answered in JSON
            result = error_response(exc)
        else:
            result = handle(
                ApiRequest(
                    method=request.method,
                    path="/" + rest,
                    headers=request.headers.items(),
                    query=parse_query(request.query_string),
                    body=body,
                    raw_path=wsgi_path_bytes(request.environ),
                    scheme=request.scheme,  # wsgi.url_scheme (a ProxyFix the host set up sets it)
                )
            )
        if result.stream is not None:
            # The server writes each chunk as the stream yields it, and calls the
            # stream's close() when it ends or the client is gone.
            result.stream.disconnected = wsgi_disconnected(request.environ)
            return Response(result.stream, status=result.status, headers=result.headers)
        return Response(
            result.body,
            status=result.status,
            headers=other_headers(result),  # a list: repeated headers (Set-Cookie) all kept
            content_type=content_type(result),  # its own (HEAD of a stream, a page), else JSON
        )

    return view


def _catch_all(bp: Blueprint, view: Callable[..., Response], endpoint_name: str) -> None:
    """Route the blueprint's prefix and every path and method below it to ``view``."""

    def register(state: BlueprintSetupState) -> None:
        # Rules built here rather than with add_url_rule, which always lists methods
        # (and adds OPTIONS): methods=None lets every method through to the view.
        app = state.app
        app.url_map.converters.setdefault(ANY_PATH, AnyPathConverter)
        endpoint = f"{state.name_prefix}.{state.name}.{endpoint_name}".lstrip(".")
        base = (state.url_prefix or "").rstrip("/")
        paths = [base + "/<" + ANY_PATH + ":rest>"] + ([base] if base else [])
        for path in paths:
            # merge_slashes=False: an empty id ("tasks//retry") reaches the API as sent.
            app.url_map.add(
                Rule(
                    path,
                    endpoint=endpoint,
                    methods=None,
                    merge_slashes=False,
                    strict_slashes=False,
                    subdomain=state.subdomain,
                )
            )
        app.view_functions[endpoint] = view

    bp.record(register)


def routes(
    service: RetryService | RetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    prefix: str = DEFAULT_PREFIX,
    name: str = "deepwork_retry",
) -> Blueprint:
    """A blueprint serving the API under ``prefix``; register it on your app.

    Its rules take the prefix and every path and method below it, so the API
    answers all of them itself (JSON 404 and 405; Flask's automatic ``OPTIONS``
    and HTML error pages never apply).
    """
    api = sync_api(service, authenticator, authorizer, adapter=__name__)
    bp = Blueprint(name, __name__, url_prefix=normalise_prefix(prefix) or None)
    _catch_all(bp, _view(api.handle), "api")
    return bp


def mount(
    app: Flask | Blueprint,
    service: RetryService | RetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    prefix: str = DEFAULT_PREFIX,
    name: str = "deepwork_retry",
) -> None:
    """Serve the API under ``prefix`` in ``app`` (a Flask application or blueprint)."""
    app.register_blueprint(routes(service, authenticator, authorizer, prefix=prefix, name=name))


def dashboard_routes(
    service: RetryService | RetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    secret: str | bytes,
    prefix: str = "/deep-work",
    name: str = "deepwork_dashboard",
    **options: Any,
) -> Blueprint:
    """A blueprint serving the operator dashboard under ``prefix`` (the extra ``dashboard``).

    ``service`` is a service (then ``authenticator`` is required) or the
    :class:`RetryAPI` the JSON API already serves, so that both share its stream
    slots; ``options`` go to :class:`~deepwork_retry.web.dashboard.Dashboard`
    (``session_max_age``, ``secure``). The dashboard checks its own
    CSRF token on every form; the cookie is ``Secure`` when ``request.scheme`` is
    https (behind a proxy: werkzeug's ``ProxyFix``, if you trust the proxy).
    """
    from deepwork_retry.web.dashboard import Dashboard

    api = sync_api(service, authenticator, authorizer, adapter=__name__)
    dashboard = Dashboard(api, secret=secret, prefix=prefix, **options)
    bp = Blueprint(name, __name__, url_prefix=normalise_prefix(prefix) or None)
    _catch_all(bp, _view(dashboard.handle), "dashboard")
    return bp


def mount_dashboard(
    app: Flask | Blueprint,
    service: RetryService | RetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    secret: str | bytes,
    prefix: str = "/deep-work",
    name: str = "deepwork_dashboard",
    **options: Any,
) -> None:
    """Serve the dashboard under ``prefix`` in ``app`` (see :func:`dashboard_routes`)."""
    app.register_blueprint(
        dashboard_routes(
            service,
            authenticator,
            authorizer,
            secret=secret,
            prefix=prefix,
            name=name,
            **options,
        )
    )


def create_app(
    service: RetryService | RetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    prefix: str = DEFAULT_PREFIX,
    **flask: Any,
) -> Flask:
    """A Flask application serving only the API (extra keywords go to ``Flask``)."""
    app = Flask(__name__, **flask)
    mount(app, service, authenticator, authorizer, prefix=prefix)
    return app


blueprint = renamed(routes, "blueprint", __name__)

__all__ = ["blueprint", "create_app", "dashboard_routes", "mount", "mount_dashboard", "routes"]
