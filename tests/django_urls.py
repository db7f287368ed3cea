"""The URLs of the test process's Django site: the admin and the retry API."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("deepwork_retry.web.django.urls")),
]
