"""The shipped conformance suite and state machine, run on DjangoStorage over
Django's SQLite and PostgreSQL backends (each test starts from empty tables)."""

from __future__ import annotations

import pytest
from conftest import empty
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from deepwork_retry.ports import Storage
from deepwork_retry.testing import StorageContract, storage_machine
from deepwork_retry.web.django.storage import DjangoStorage

MACHINE_SETTINGS = settings(
    max_examples=15,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class TestDjangoStorageContract(StorageContract):
    """The sync contract, once per database alias."""


def test_storage_machine(alias: str) -> None:
    """The sync services over DjangoStorage agree with the reference model in every example."""

    def make() -> Storage:
        empty(alias)
        return DjangoStorage(using=alias)

    run_state_machine_as_test(storage_machine(make), settings=MACHINE_SETTINGS)


def test_an_unknown_alias_is_refused() -> None:
    """A storage on an alias the settings do not name is refused at once, naming the alias."""
    from deepwork_retry.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match="'nope'"):
        DjangoStorage(using="nope")
