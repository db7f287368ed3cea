from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from example_project import retry  # noqa: F401 - builds the API (and prints a curl) at startup

urlpatterns = [
    path("admin/", admin.site.urls),  # projects, tasks, attempts; retry and dry-run actions
    path("", include("deepwork_retry.web.django.urls")),
]
