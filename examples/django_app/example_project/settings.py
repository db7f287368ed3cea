"""Settings of the example project: only what the retry API needs."""

from __future__ import annotations

import os
import secrets

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or secrets.token_urlsafe(32)
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "example_project.urls"
WSGI_APPLICATION = "example_project.wsgi.application"
INSTALLED_APPS = ["deepwork_retry.web.django"]
MIDDLEWARE = [
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
DATABASES: dict[str, object] = {}
USE_TZ = True

DEEPWORK_RETRY = {
    "API": "example_project.retry.api",  # a RetryAPI, or a callable returning one
    "PREFIX": "/api/deep-work",
}
