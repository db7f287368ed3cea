from __future__ import annotations

from django.urls import include, path

from example_project import retry  # noqa: F401 - builds the API (and prints a curl) at startup

urlpatterns = [path("", include("deepwork_retry.web.django.urls"))]
