"""The retry API for aiohttp, over the async services.

from deepwork_retry.web.aiohttp import add_routes

add_routes(app, service, StaticTokens.from_env())
"""

from __future__ import annotations

from typing import Any

from deepwork_retry._async.api import AsyncRetryAPI
from deepwork_retry._async.services import AsyncRetryService
from deepwork_retry.auth import Authenticator, Authorizer, may_retry
from deepwork_retry.exceptions import missing_extra
from deepwork_retry.web._api import async_api
from deepwork_retry.web._bodies import CAP
from deepwork_retry.web._http import DEFAULT_PREFIX, JSON, ApiRequest, normalise_prefix

try:
    from aiohttp import web
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise missing_extra("aiohttp", __name__, exc) from exc


async def _body(request: web.Request) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < CAP:
        chunk = await request.content.read(CAP - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def routes(
    service: AsyncRetryService | AsyncRetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    prefix: str = DEFAULT_PREFIX,
) -> list[web.RouteDef]:
    """The API's route definitions under ``prefix`` (for ``app.add_routes``)."""
    api = async_api(service, authenticator, authorizer, adapter=__name__)

    async def handler(request: web.Request) -> web.Response:
        result = await api.handle(
            ApiRequest(
                method=request.method,
                path="/" + request.match_info["rest"],
                headers=request.headers.items(),
                query=request.query.items(),
                body=await _body(request),
            )
        )
        return web.Response(
            body=result.body,
            status=result.status,
            headers=dict(result.headers),
            content_type=JSON,
        )

    # [\s\S] rather than ".": ids may contain newlines.
    return [web.route("*", normalise_prefix(prefix) + r"/{rest:[\s\S]*}", handler)]


def add_routes(
    app: web.Application,
    service: AsyncRetryService | AsyncRetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    prefix: str = DEFAULT_PREFIX,
) -> None:
    """Add the API's routes to ``app``."""
    app.add_routes(routes(service, authenticator, authorizer, prefix=prefix))


def create_app(
    service: AsyncRetryService | AsyncRetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    prefix: str = DEFAULT_PREFIX,
    **application: Any,
) -> web.Application:
    """An application serving only the API (extra keywords go to ``web.Application``)."""
    app = web.Application(**application)
    add_routes(app, service, authenticator, authorizer, prefix=prefix)
    return app


__all__ = ["add_routes", "create_app", "routes"]
