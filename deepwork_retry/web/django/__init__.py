"""The retry API as an installable Django app, over the sync services.

Settings::

    INSTALLED_APPS = [..., "deepwork_retry.web.django"]
    DEEPWORK_RETRY = {
        "API": "myproject.retry.api",   # a RetryAPI, or a callable returning one
        "PREFIX": "/api/deep-work",     # the default
    }

URLs::

    urlpatterns = [path("", include("deepwork_retry.web.django.urls")), ...]

Or, instead of the ``API`` setting and the include, in your ``urls.py``::

    from deepwork_retry.web.django import mount

    urlpatterns = [...]
    mount(urlpatterns, service, StaticTokens.from_env())

As in every adapter, :func:`mount` adds the API to what you have and
:func:`routes` builds the framework's own object (here, the URL patterns);
:func:`mount_dashboard` and :func:`dashboard_routes` do the same for the
operator dashboard (the extra ``dashboard``)::

    mount_dashboard(urlpatterns, api, secret=settings.DEEPWORK_DASHBOARD_SECRET)
"""

from __future__ import annotations

import re
import threading
from typing import Any

from deepwork_retry._sync.services import RetryService
from deepwork_retry.auth import Authenticator, Authorizer, may_retry
from deepwork_retry.exceptions import missing_extra
from deepwork_retry.web._api import AsyncRetryAPI, sync_api, warn_renamed
from deepwork_retry.web._http import DEFAULT_PREFIX, normalise_prefix
from deepwork_retry.web._sync_api import RetryAPI

try:
    import django  # noqa: F401 - fail here, with the extra's name, when Django is missing
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured
    from django.utils.module_loading import import_string
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise missing_extra("django", __name__, exc) from exc

SETTING = "DEEPWORK_RETRY"

_lock = threading.Lock()
_configured: RetryAPI | None = None


def mount(
    urlpatterns: list[Any],
    service: RetryService | RetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    prefix: str | None = None,
) -> None:
    """Serve ``service`` under ``prefix`` (default: the ``PREFIX`` setting), adding
    its URL pattern to ``urlpatterns``.

    The service replaces whatever was served before, in this process; the
    ``API`` setting is then not read.
    """
    _serve(service, authenticator, authorizer)
    urlpatterns.extend(routes(prefix))


def routes(prefix: str | None = None) -> list[Any]:
    """The API's URL pattern under ``prefix`` (default: the ``PREFIX`` setting)."""
    from django.urls import re_path

    from deepwork_retry.web.django.views import api_view

    return [re_path(_pattern(_prefix() if prefix is None else prefix), api_view, name="api")]


def _pattern(prefix: str) -> str:
    """The URL pattern of ``prefix`` and everything under it (``rest``: the path below).

    The prefix itself matches too, so that Django's APPEND_SLASH never redirects
    it; the rest is any characters, newlines included (ids may contain them).
    """
    escaped = re.escape(normalise_prefix(prefix).lstrip("/"))
    return rf"^{escaped}(?:/(?P<rest>[\s\S]*))?\Z" if escaped else r"^(?P<rest>[\s\S]*)\Z"


def dashboard_routes(
    service: RetryService | RetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    secret: str | bytes,
    prefix: str = "/deep-work",
    **options: Any,
) -> list[Any]:
    """The dashboard's URL pattern under ``prefix``, serving ``service`` (or its API).

    ``secret`` signs its sessions and CSRF tokens (see
    :class:`~deepwork_retry.web.dashboard.Dashboard`, which takes ``options``).
    Its view is exempt from Django's CSRF middleware: the dashboard checks its own
    token on every form.
    """
    from django.urls import re_path

    from deepwork_retry.web.dashboard import Dashboard
    from deepwork_retry.web.django.views import dashboard_view

    api = sync_api(service, authenticator, authorizer, adapter=__name__)
    dashboard = Dashboard(api, secret=secret, prefix=prefix, **options)
    return [re_path(_pattern(prefix), dashboard_view(dashboard), name="dashboard")]


def mount_dashboard(
    urlpatterns: list[Any],
    service: RetryService | RetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
    *,
    secret: str | bytes,
    prefix: str = "/deep-work",
    **options: Any,
) -> None:
    """Serve the operator dashboard under ``prefix``, adding its URL pattern to ``urlpatterns``.

    Give it the API you :func:`mount` (or the same service) so that both share
    their event streams' bounds::

        api = RetryAPI(service, tokens)
        mount(urlpatterns, api)
        mount_dashboard(urlpatterns, api, secret=settings.DEEPWORK_DASHBOARD_SECRET)
    """
    urlpatterns.extend(
        dashboard_routes(
            service,
            authenticator,
            authorizer,
            secret=secret,
            prefix=prefix,
            **options,
        )
    )


def configure(
    service: RetryService | RetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
) -> RetryAPI:
    """Deprecated: serve ``service`` with :func:`mount` (or the ``API`` setting)."""
    warn_renamed("configure", "mount", __name__)
    return _serve(service, authenticator, authorizer)


def _serve(
    service: RetryService | RetryAPI,
    authenticator: Authenticator | None,
    authorizer: Authorizer,
) -> RetryAPI:
    """Serve ``service`` (this replaces whatever was served before)."""
    global _configured
    api = sync_api(service, authenticator, authorizer, adapter=__name__)
    with _lock:
        _configured = api
    return api


def _options() -> dict[str, Any]:
    options = getattr(settings, SETTING, None) or {}
    if not isinstance(options, dict):
        raise ImproperlyConfigured(f"settings.{SETTING} must be a dict")
    return options


def prefix() -> str:
    """The URL prefix from ``settings.DEEPWORK_RETRY["PREFIX"]``."""
    return normalise_prefix(_prefix())


def _prefix() -> str:
    return str(_options().get("PREFIX", DEFAULT_PREFIX))


def get_api() -> RetryAPI:
    """The API served: from :func:`mount`, else from the ``API`` setting."""
    global _configured
    with _lock:
        if _configured is not None:
            return _configured
        target = _options().get("API")
        if target is None:
            raise ImproperlyConfigured(
                f"set settings.{SETTING}['API'] or call deepwork_retry.web.django.mount()"
            )
        found = import_string(target) if isinstance(target, str) else target
        if not isinstance(found, (RetryAPI, AsyncRetryAPI)) and callable(found):
            found = found()
        if isinstance(found, AsyncRetryAPI):
            sync_api(found, adapter=__name__)  # refuses it, naming what to use
        if not isinstance(found, RetryAPI):
            raise ImproperlyConfigured(
                f"settings.{SETTING}['API'] must name a RetryAPI or a callable returning one"
            )
        _configured = found
        return found


__all__ = [
    "SETTING",
    "configure",
    "dashboard_routes",
    "get_api",
    "mount",
    "mount_dashboard",
    "prefix",
    "routes",
]
