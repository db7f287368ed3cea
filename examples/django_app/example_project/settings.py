"""Settings of the example project: the retry API, its tasks kept in the project's own
database by ``DjangoStorage``, and the Django admin over them."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or secrets.token_urlsafe(32)
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "example_project.urls"
WSGI_APPLICATION = "example_project.wsgi.application"
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "deepwork_retry.web.django",  # the retry API, the storage's models and their admin
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("EXAMPLE_DATABASE") or BASE_DIR / "example.sqlite3",
        # Your own read-then-write transactions wait for SQLite's write lock
        # rather than fail with "database is locked" (Django 5.1+).
        "OPTIONS": {"transaction_mode": "IMMEDIATE"},
    }
}
USE_TZ = True  # required by DjangoStorage: it keeps timezone-aware timestamps
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

DEEPWORK_RETRY = {
    "API": "example_project.retry.api",  # a RetryAPI, or a callable returning one
    "PREFIX": "/api/deep-work",
    "DATABASE": "default",  # the alias the admin's DjangoStorage uses
}
