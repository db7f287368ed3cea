"""URLs of the retry API: ``path("", include("deepwork_retry.web.django.urls"))``.

The prefix comes from ``settings.DEEPWORK_RETRY["PREFIX"]`` (default
``/api/deep-work``).
"""

from __future__ import annotations

import re

from django.urls import re_path

from deepwork_retry.web.django import prefix
from deepwork_retry.web.django.views import api_view

app_name = "deepwork_retry"

_prefix = re.escape(prefix().lstrip("/"))

urlpatterns = [
    # Everything under the prefix, the prefix itself included (so that Django's
    # APPEND_SLASH never redirects it to the API's own 404): ``rest`` is the path
    # below the prefix. [\s\S] rather than ".": ids may contain newlines.
    re_path(
        rf"^{_prefix}(?:/(?P<rest>[\s\S]*))?\Z" if _prefix else r"^(?P<rest>[\s\S]*)\Z",
        api_view,
        name="api",
    ),
]
