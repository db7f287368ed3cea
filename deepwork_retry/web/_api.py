"""The framework-free web API, as every adapter under ``deepwork_retry.web`` takes it.

:class:`RetryAPI` (sync services, for WSGI frameworks) and
:class:`AsyncRetryAPI` (async services, for ASGI and aiohttp) take an
:class:`~deepwork_retry.web._http.ApiRequest` and return an
:class:`~deepwork_retry.web._http.ApiResponse`; routing, auth, parsing and the
error table are shared by both. :func:`async_api` and :func:`sync_api` turn what
a host hands an adapter (a service or an API) into the API it serves.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from deepwork_retry._wiring import check_kind
from deepwork_retry.auth import Authenticator, Authorizer, may_retry
from deepwork_retry.web._async_api import AsyncRetryAPI
from deepwork_retry.web._sync_api import RetryAPI

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


P = ParamSpec("P")
R = TypeVar("R")


def renamed(new: Callable[P, R], old: str, module: str) -> Callable[P, R]:
    """``new`` under the name it had before the adapters shared one vocabulary
    (``mount``, ``routes``, ``create_app``): it still works, for one release,
    and warns with a :class:`DeprecationWarning` naming what to call instead."""

    @functools.wraps(new)
    def alias(*args: P.args, **kwargs: P.kwargs) -> R:
        warn_renamed(old, new.__name__, module)
        return new(*args, **kwargs)

    alias.__name__ = alias.__qualname__ = old
    return alias


def warn_renamed(old: str, new: str, module: str) -> None:
    warnings.warn(
        f"{module}.{old}() is deprecated and will be removed in the next release; "
        f"use {module}.{new}()",
        DeprecationWarning,
        stacklevel=3,
    )


__all__ = [
    "ASYNC_ADAPTERS",
    "SYNC_ADAPTERS",
    "AsyncRetryAPI",
    "RetryAPI",
    "async_api",
    "renamed",
    "sync_api",
    "warn_renamed",
]
