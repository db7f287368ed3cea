"""URLs of the retry API: ``path("", include("deepwork_retry.web.django.urls"))``.

The prefix comes from ``settings.DEEPWORK_RETRY["PREFIX"]`` (default
``/api/deep-work``).
"""

from __future__ import annotations

from deepwork_retry.web.django import routes

app_name = "deepwork_retry"

urlpatterns = routes()
