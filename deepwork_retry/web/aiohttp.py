"""The retry API for aiohttp, over the async services.

from deepwork_retry.web.aiohttp import mount

mount(app, service, StaticTokens.from_env())

(or ``app.add_routes(routes(service, tokens))``, or ``create_app(service, tokens)``).

The operator dashboard (the extra ``dashboard``) beside it, over the same API:
``mount_dashboard(app, api, secret=...)`` (or ``dashboard_routes(...)``, route definitions).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from deepwork_retry._async.services import AsyncRetryService
from deepwork_retry.auth import Authenticator, Authorizer, may_retry
from deepwork_retry.exceptions import missing_extra
from deepwork_retry.web._api import async_api, renamed
from deepwork_retry.web._async_api import AsyncRetryAPI
from deepwork_retry.web._bodies import read_capped_stream
from deepwork_retry.web._http import (
    DEFAULT_PREFIX,
    MAX_HEADER_BYTES,
    ApiRequest,
    ApiResponse,
    BodyIncomplete,
    BodyTimeout,
    content_type,
    error_response,
    normalise_prefix,
    other_headers,
    parse_query,
    path_bytes,
)

try:
    from aiohttp import web
    from aiohttp.web_protocol import RequestPayloadError
    from multidict import CIMultiDict
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise missing_extra("aiohttp", __name__, exc) from exc

HANDLER_ARGS = {"max_line_size": MAX_HEADER_BYTES, "max_field_size": MAX_HEADER_BYTES}
"""What :func:`create_app` gives aiohttp's request parser: header lines up to
:data:`~deepwork_retry.web._http.MAX_HEADER_BYTES`, so an oversized token reaches
the API (a JSON 401) rather than aiohttp's own text 400, which quotes the header."""


async def _body(request: web.Request, timeout: float) -> bytes:
    """The body, up to the API's cap; :class:`BodyTimeout` past ``timeout`` seconds and
    :class:`BodyIncomplete` when the client goes away or the framing is broken."""
    try:
        return await asyncio.wait_for(read_capped_stream(request.content.iter_any()), timeout)
    except asyncio.TimeoutError:
        raise BodyTimeout from None
    except (ConnectionError, RequestPayloadError):
        raise BodyIncomplete from None


async def _stream(request: web.Request, result: ApiResponse) -> web.StreamResponse:
    """Write ``result``'s event stream chunk by chunk; closed however this ends."""
    stream = result.stream

    def disconnected() -> bool:
        transport = request.transport
        return transport is None or transport.is_closing()

    stream.disconnected = disconnected  # ends it at its next poll, not its next write
    response = web.StreamResponse(status=result.status, headers=CIMultiDict(result.headers))
    try:
        await response.prepare(request)
        async for chunk in stream:
            await response.write(chunk)
        await response.write_eof()
    except ConnectionError:  # the client went away: how streams end
        pass
    finally:
        await stream.close()
    return response


async def _respond(request: web.Request, result: ApiResponse) -> web.StreamResponse:
    if result.stream is not None:
        return await _stream(request, result)
    headers = CIMultiDict(other_headers(result))  # repeated ones (Set-Cookie) all kept
    headers["Content-Type"] = content_type(result)  # its own (HEAD of a stream, a page), else JSON
    response = web.Response(body=result.body, status=result.status, headers=headers)
    if result.close:
        # The rest of the body is not wanted: answer, then close at once rather
        # than let aiohttp linger reading it. A client that is gone gets nothing,
        # quietly (aiohttp logs such a write as a disconnection, not an error).
        response.force_close()
        with contextlib.suppress(ConnectionError):
            await response.prepare(request)
            await response.write_eof()
        request.protocol.force_close()
    return response


def _handler(
    handle: Callable[[ApiRequest], Awaitable[ApiResponse]], body_timeout: float
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The handler answering every request with ``handle`` (the API's or the dashboard's)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            body = await _body(request, body_timeout)
        except (BodyTimeout, BodyIncomplete) as exc:
            return await _respond(request, error_response(exc))
        result = await handle(
            ApiRequest(
                method=request.method,
                path="/" + request.match_info.get("rest", ""),
                headers=request.headers.items(),
                query=parse_query(request.rel_url.raw_query_string),
                body=body,
                raw_path=path_bytes(request.rel_url.raw_path),
                # The transport's (https under TLS); a host behind a proxy sets it with
                # request.clone(scheme=...) in a middleware it trusts.
                scheme=request.scheme,
            )
        )
        return await _respond(request, result)

    return handler


def _catch_all(
    prefix: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> list[web.RouteDef]:
    """``prefix`` itself and everything below it, every method ("*"), to ``handler``."""
    # [\s\S] rather than ".": ids may contain newlines.
    base = normalise_prefix(prefix)
    found = [web.route("*", base + r"/{rest:[\s\S]*}", handler)]
    if base:
        found.append(web.route("*", base, handler))
    return found


def routes(
    service: AsyncRetryService | AsyncRetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    prefix: str = DEFAULT_PREFIX,
) -> list[web.RouteDef]:
    """The API's route definitions under ``prefix`` (for ``app.add_routes``)."""
    api = async_api(service, authenticator, authorizer, adapter=__name__)
    # The API answers every path and method under its prefix itself.
    return _catch_all(prefix, _handler(api.handle, api.body_timeout))


def mount(
    app: web.Application,
    service: AsyncRetryService | AsyncRetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    prefix: str = DEFAULT_PREFIX,
) -> None:
    """Serve the API under ``prefix`` in ``app``; its event streams end when ``app`` shuts down."""
    api = async_api(service, authenticator, authorizer, adapter=__name__)

    async def close_streams(_: web.Application) -> None:
        api.close_streams()

    app.on_shutdown.append(close_streams)
    app.add_routes(routes(api, prefix=prefix))


def dashboard_routes(
    service: AsyncRetryService | AsyncRetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    secret: str | bytes,
    prefix: str = "/deep-work",
    **options: Any,
) -> list[web.RouteDef]:
    """The operator dashboard's route definitions under ``prefix`` (the extra ``dashboard``).

    ``service`` is a service (then ``authenticator`` is required) or the
    :class:`AsyncRetryAPI` the JSON API already serves, so that both share its
    stream slots; ``options`` go to
    :class:`~deepwork_retry.web.dashboard.AsyncDashboard` (``session_max_age``,
    ``secure``). Prefer :func:`mount_dashboard`, which also ends the
    dashboard's live streams when the application shuts down.
    """
    dashboard = _dashboard(
        service, authenticator, authorizer, secret=secret, prefix=prefix, **options
    )
    return _catch_all(prefix, _dashboard_handler(dashboard))


def mount_dashboard(
    app: web.Application,
    service: AsyncRetryService | AsyncRetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    secret: str | bytes,
    prefix: str = "/deep-work",
    **options: Any,
) -> None:
    """Serve the dashboard under ``prefix`` in ``app`` (see :func:`dashboard_routes`);
    its live streams end when ``app`` shuts down."""
    dashboard = _dashboard(
        service, authenticator, authorizer, secret=secret, prefix=prefix, **options
    )

    async def close_streams(_: web.Application) -> None:
        dashboard.close_streams()

    app.on_shutdown.append(close_streams)
    app.add_routes(_catch_all(prefix, _dashboard_handler(dashboard)))


def _dashboard(
    service: AsyncRetryService | AsyncRetryAPI,
    authenticator: Authenticator | None,
    authorizer: Authorizer,
    **options: Any,
) -> Any:
    from deepwork_retry.web.dashboard import AsyncDashboard

    api = async_api(service, authenticator, authorizer, adapter=__name__)
    return AsyncDashboard(api, **options)


def _dashboard_handler(dashboard: Any) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    return _handler(dashboard.handle, dashboard.body_timeout)


def create_app(
    service: AsyncRetryService | AsyncRetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    prefix: str = DEFAULT_PREFIX,
    **application: Any,
) -> web.Application:
    """An application serving only the API (extra keywords go to ``web.Application``).

    Its ``handler_args`` default to :data:`HANDLER_ARGS` (larger header limits).
    """
    application.setdefault("handler_args", HANDLER_ARGS)
    app = web.Application(**application)
    mount(app, service, authenticator, authorizer, prefix=prefix)
    return app


add_routes = renamed(mount, "add_routes", __name__)


__all__ = ["add_routes", "create_app", "dashboard_routes", "mount", "mount_dashboard", "routes"]
