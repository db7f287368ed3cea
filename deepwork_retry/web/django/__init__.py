"""The retry API as an installable Django app, over the sync services.

Settings::

    INSTALLED_APPS = [..., "deepwork_retry.web.django"]
    DEEPWORK_RETRY = {
        "API": "myproject.retry.api",   # a RetryAPI, or a callable returning one
        "PREFIX": "/api/deep-work",     # the default
    }

URLs::

    urlpatterns = [path("", include("deepwork_retry.web.django.urls")), ...]

Instead of the ``API`` setting, code may call :func:`configure` (for example
in an ``AppConfig.ready``) with a service and an authenticator.
"""

from __future__ import annotations

import threading
from typing import Any

from deepwork_retry._sync.services import RetryService
from deepwork_retry.auth import Authenticator, Authorizer, may_retry
from deepwork_retry.exceptions import missing_extra
from deepwork_retry.web._api import AsyncRetryAPI, sync_api
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


def configure(
    service: RetryService | RetryAPI,
    authenticator: Authenticator | None = None,
    authorizer: Authorizer = may_retry,
) -> RetryAPI:
    """Serve ``service`` (this replaces whatever was configured before)."""
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
    return normalise_prefix(str(_options().get("PREFIX", DEFAULT_PREFIX)))


def get_api() -> RetryAPI:
    """The configured API: from :func:`configure`, else from the ``API`` setting."""
    global _configured
    with _lock:
        if _configured is not None:
            return _configured
        target = _options().get("API")
        if target is None:
            raise ImproperlyConfigured(
                f"set settings.{SETTING}['API'] or call deepwork_retry.web.django.configure()"
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


__all__ = ["SETTING", "configure", "get_api", "prefix"]
