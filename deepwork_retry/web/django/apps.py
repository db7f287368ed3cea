"""The Django app configuration of the retry API."""

from __future__ import annotations

from django.apps import AppConfig


class DeepworkRetryConfig(AppConfig):  # type: ignore[misc]  # Django ships no type hints
    name = "deepwork_retry.web.django"
    label = "deepwork_retry"
    verbose_name = "Deep work task retries"
