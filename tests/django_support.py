"""The one Django configuration of the test process, and its databases.

Django reads its settings once per process, so every test that needs Django
(the web adapters' and the Django ORM storage's) configures it here: the
``default`` alias is an SQLite file, the ``pg`` alias a PostgreSQL database
of its own (created, migrated and dropped by the ``django_pg`` fixture of
``tests/django_orm``), the admin and the retry API mounted side by side.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid

PREFIX = "/api/deep-work"
PG_ALIAS = "pg"
PG_DATABASE = f"test_django_{uuid.uuid4().hex[:12]}"
"""The PostgreSQL database of this process (the ``pg`` alias)."""

_directory: str | None = None


def configure() -> None:
    """Configure Django for this process (once) and set up its app registry."""
    import django
    from django.conf import settings

    global _directory
    if settings.configured:
        return
    _directory = tempfile.mkdtemp(prefix="dw-django-")
    atexit.register(shutil.rmtree, _directory, True)
    settings.configure(
        DEBUG=False,
        SECRET_KEY="tests-only-not-a-secret",
        ALLOWED_HOSTS=["127.0.0.1", "localhost", "testserver"],
        ROOT_URLCONF="django_urls",
        INSTALLED_APPS=[
            "django.contrib.admin",
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django.contrib.sessions",
            "django.contrib.messages",
            "deepwork_retry.web.django",
        ],
        MIDDLEWARE=[
            "django.middleware.common.CommonMiddleware",
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.middleware.csrf.CsrfViewMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
            "django.contrib.messages.middleware.MessageMiddleware",
        ],
        TEMPLATES=[
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
        ],
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": os.path.join(_directory, "default.db"),
                # Writers take the lock when they begin, so concurrent
                # read-then-write transactions wait instead of failing.
                "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 30},
            },
            # Error paths: a database never migrated, and a server that is not there.
            "unmigrated": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": os.path.join(_directory, "unmigrated.db"),
            },
            "unreachable": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": "nowhere",
                "HOST": "127.0.0.1",
                "PORT": "9",
                "OPTIONS": {"connect_timeout": 2},
            },
            PG_ALIAS: {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": PG_DATABASE,
                "HOST": "127.0.0.1",
                "PORT": "5432",
                "USER": os.environ.get("DEEPWORK_POSTGRES_USER", "postgres"),
            },
        },
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        USE_TZ=True,
        DEEPWORK_RETRY={"PREFIX": PREFIX},
    )
    django.setup()


def empty(alias: str) -> None:
    """Remove every row of the storage's tables on ``alias`` (after :func:`configure`)."""
    from deepwork_retry.web.django import models

    for model in (
        models.EventRetry,
        models.Event,
        models.Attempt,
        models.OutboxEntry,
        models.TaskDependency,
        models.IdempotencyRecord,
        models.Task,
        models.Project,
    ):
        model.objects.using(alias).all().delete()
