"""Web adapters: the retry API mounted in Starlette, FastAPI, Flask, Django or aiohttp.

Each framework has its own module (``deepwork_retry.web.starlette``,
``.fastapi``, ``.flask``, ``.django``, ``.aiohttp``), imported only when asked
for; this package itself imports no framework. What it exports is the
framework-free API those modules wrap, for hosts that build their own adapter.
"""

from __future__ import annotations

from deepwork_retry.web._api import (
    DEFAULT_PREFIX,
    ROUTES,
    ApiRequest,
    ApiResponse,
    AsyncRetryAPI,
    RetryAPI,
)

__all__ = ["DEFAULT_PREFIX", "ROUTES", "ApiRequest", "ApiResponse", "AsyncRetryAPI", "RetryAPI"]
