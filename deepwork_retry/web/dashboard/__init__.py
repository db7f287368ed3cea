"""The operator dashboard: server-rendered pages over the web API (Jinja2 and htmx).

:class:`AsyncDashboard` (over an :class:`~deepwork_retry.web.AsyncRetryAPI`,
for Starlette, FastAPI and aiohttp) and :class:`Dashboard` (over a
:class:`~deepwork_retry.web.RetryAPI`, for Flask and Django) take an
:class:`~deepwork_retry.web.ApiRequest` below their prefix and return an
:class:`~deepwork_retry.web.ApiResponse`, as the API does; each adapter's
``mount_dashboard`` serves one. Needs the ``dashboard`` extra (Jinja2).
"""

from __future__ import annotations

from deepwork_retry.web.dashboard._async_app import AsyncDashboard
from deepwork_retry.web.dashboard._common import CSP, SESSION_COOKIE, ShortSecret
from deepwork_retry.web.dashboard._sync_app import Dashboard

DEFAULT_DASHBOARD_PREFIX = "/deep-work"

__all__ = [
    "CSP",
    "DEFAULT_DASHBOARD_PREFIX",
    "SESSION_COOKIE",
    "AsyncDashboard",
    "Dashboard",
    "ShortSecret",
]
