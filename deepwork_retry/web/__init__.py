"""Web adapters: the retry API mounted in Starlette, FastAPI, Flask, Django or aiohttp.

Each framework has its own module (``deepwork_retry.web.starlette``,
``.fastapi``, ``.flask``, ``.django``, ``.aiohttp``), imported only when asked
for; this package itself imports no framework. What it exports is the
framework-free API those modules wrap, for hosts that build their own adapter.

The exports are loaded on first use, so that the API's own modules
(``deepwork_retry._async.api``, which imports ``deepwork_retry.web._http``)
can be imported first without a circular import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deepwork_retry.web._api import (
        DEFAULT_PREFIX,
        ROUTES,
        ApiRequest,
        ApiResponse,
        AsyncRetryAPI,
        RetryAPI,
    )

__all__ = ["DEFAULT_PREFIX", "ROUTES", "ApiRequest", "ApiResponse", "AsyncRetryAPI", "RetryAPI"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        value = getattr(importlib.import_module("deepwork_retry.web._api"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
