"""DjangoStorage's configuration checks and driver-error translation, and its migrations
held equal to its models."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.test import override_settings

from deepwork_retry._core.model import Project
from deepwork_retry.exceptions import (
    ConfigurationError,
    InvalidInput,
    ProjectNotFound,
    StorageCorrupt,
    StorageUnavailable,
)
from deepwork_retry.web.django.storage import DjangoStorage


def test_the_migrations_match_the_models() -> None:
    """makemigrations finds nothing to add: the committed migrations are the models."""
    call_command("makemigrations", "deepwork_retry", check=True, dry_run=True, verbosity=0)


def test_an_unknown_alias_is_refused() -> None:
    """A storage on an alias the settings do not name is refused at once, naming the alias."""
    with pytest.raises(ConfigurationError, match="'nope'"):
        DjangoStorage(using="nope")


def test_naive_timestamps_are_refused_without_use_tz() -> None:
    """Without USE_TZ the storage refuses to start: it stores timezone-aware timestamps."""
    with override_settings(USE_TZ=False), pytest.raises(ConfigurationError, match="USE_TZ"):
        DjangoStorage()


def test_an_unreachable_server_is_storage_unavailable() -> None:
    """A server that does not answer raises StorageUnavailable, the driver's error kept."""
    storage = DjangoStorage(using="unreachable")
    with pytest.raises(StorageUnavailable) as caught:
        storage.get_project("p")
    assert caught.value.__cause__ is not None


def test_a_database_without_the_tables_is_storage_corrupt() -> None:
    """A database never migrated raises StorageCorrupt naming the command to run."""
    storage = DjangoStorage(using="unmigrated")
    with pytest.raises(StorageCorrupt, match="migrate"):
        storage.get_project("p")


def test_a_naive_timestamp_is_invalid_input(storage: DjangoStorage) -> None:
    """A naive timestamp is refused before anything is written."""
    from datetime import datetime

    with pytest.raises(InvalidInput, match="timezone-aware"):
        storage.create_project(Project(id="p", created_at=datetime(2026, 1, 1)))
    with pytest.raises(ProjectNotFound):
        storage.get_project("p")
