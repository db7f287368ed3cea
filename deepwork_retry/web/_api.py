"""The framework-free web API: what every adapter under ``deepwork_retry.web`` wraps.

:class:`RetryAPI` (sync services, for WSGI frameworks) and
:class:`AsyncRetryAPI` (async services, for ASGI and aiohttp) take an
:class:`ApiRequest` and return an :class:`ApiResponse`; routing, auth,
parsing and the error table are shared by both.
"""

from __future__ import annotations

from deepwork_retry._async.api import AsyncRetryAPI
from deepwork_retry._sync.api import RetryAPI
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

__all__ = [
    "DEFAULT_PREFIX",
    "ERRORS",
    "JSON",
    "ROUTES",
    "ApiRequest",
    "ApiResponse",
    "AsyncRetryAPI",
    "RetryAPI",
    "error_response",
    "match",
    "normalise_prefix",
]
