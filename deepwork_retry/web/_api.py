"""The framework-free web API: what every adapter under ``deepwork_retry.web`` wraps.

:class:`RetryAPI` (sync services, for WSGI frameworks) and
:class:`AsyncRetryAPI` (async services, for ASGI and aiohttp) take an
:class:`ApiRequest` and return an :class:`ApiResponse`; routing, auth,
parsing and the error table are shared by both.
"""

from __future__ import annotations

from typing import Any

from deepwork_retry._async.api import AsyncRetryAPI
from deepwork_retry._sync.api import RetryAPI
from deepwork_retry._wiring import check_kind
from deepwork_retry.auth import Authenticator, Authorizer, may_retry
from deepwork_retry.web._http import (
    DEFAULT_PREFIX,
    ERRORS,
    JSON,
    ROUTES,
    ApiRequest,
    ApiResponse,
    error_response,
    match,
    normalise_prefix,
)

ASYNC_ADAPTERS = "deepwork_retry.web.starlette, .fastapi or .aiohttp"
SYNC_ADAPTERS = "deepwork_retry.web.flask or .django"


def _check(service: object, adapter: str, *, asynchronous: bool) -> None:
    """Refuse a service or API of the other kind, naming the adapters that take it."""
    api = isinstance(service, (RetryAPI, AsyncRetryAPI))
    check_kind(
        adapter,
        "API" if api else "service",
        service,
        "handle" if api else "retry",
        asynchronous=asynchronous,
        otherwise=f"mount it with {SYNC_ADAPTERS if asynchronous else ASYNC_ADAPTERS}",
    )


def _mount(
    service: Any,
    authenticator: Authenticator | None,
    authorizer: Authorizer,
    *,
    adapter: str,
    asynchronous: bool,
) -> Any:
    _check(service, adapter, asynchronous=asynchronous)
    if isinstance(service, (RetryAPI, AsyncRetryAPI)):
        return service
    if authenticator is None:
        raise TypeError("an authenticator is required: the API has no unauthenticated mode")
    return (AsyncRetryAPI if asynchronous else RetryAPI)(service, authenticator, authorizer)


def async_api(
    service: object,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    adapter: str,
) -> AsyncRetryAPI:
    """The :class:`AsyncRetryAPI` an ASGI or aiohttp ``adapter`` serves for ``service``.

    ``service`` is an :class:`~deepwork_retry.AsyncRetryService` (then
    ``authenticator`` is required) or an :class:`AsyncRetryAPI`; anything
    sync is refused here, when the application is put together, with a
    :class:`~deepwork_retry.exceptions.ConfigurationError` naming what to use.
    """
    api: AsyncRetryAPI = _mount(
        service, authenticator, authorizer, adapter=adapter, asynchronous=True
    )
    return api


def sync_api(
    service: object,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    adapter: str,
) -> RetryAPI:
    """The :class:`RetryAPI` a WSGI ``adapter`` serves for ``service`` (see :func:`async_api`)."""
    api: RetryAPI = _mount(service, authenticator, authorizer, adapter=adapter, asynchronous=False)
    return api


__all__ = [
    "ASYNC_ADAPTERS",
    "SYNC_ADAPTERS",
    "DEFAULT_PREFIX",
    "ERRORS",
    "JSON",
    "ROUTES",
    "ApiRequest",
    "ApiResponse",
    "AsyncRetryAPI",
    "RetryAPI",
    "async_api",
    "error_response",
    "match",
    "normalise_prefix",
    "sync_api",
]
