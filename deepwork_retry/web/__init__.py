"""Web adapters: the retry API mounted in Starlette, FastAPI, Flask, Django or aiohttp.

Each framework has its own module (``deepwork_retry.web.starlette``,
``.fastapi``, ``.flask``, ``.django``, ``.aiohttp``), imported only when asked
for; this package itself imports no framework. What it exports is the
framework-free API those modules wrap, for hosts that build their own adapter.

Inside, each floor imports only the floors below it: the HTTP protocol
(``_http``: requests, responses, routes, the error table, option parsers), then
the Server-Sent Events frames and bounds (``_sse``), then the API over the
services (``_async_api`` and its generated twin ``_sync_api``, gathered with the
check that adapters share in ``_api``), then the framework adapters.
"""

from __future__ import annotations

from deepwork_retry.web._api import AsyncRetryAPI, RetryAPI
from deepwork_retry.web._async_api import AsyncEventStream
from deepwork_retry.web._http import DEFAULT_PREFIX, ROUTES, ApiRequest, ApiResponse
from deepwork_retry.web._sse import StreamOptions
from deepwork_retry.web._sync_api import EventStream

__all__ = [
    "DEFAULT_PREFIX",
    "ROUTES",
    "ApiRequest",
    "ApiResponse",
    "AsyncEventStream",
    "AsyncRetryAPI",
    "EventStream",
    "RetryAPI",
    "StreamOptions",
]
