"""The shipped conformance suite and state machine, run on DjangoStorage over
Django's SQLite and PostgreSQL backends (each test starts from empty tables)."""

from __future__ import annotations

import functools
from typing import Any

import pytest
from django.db import transaction
from django_support import empty
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from deepwork_retry.exceptions import DeepworkError
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


class InHostBlocks:
    """A DjangoStorage whose every call is made inside a host's own ``atomic`` block,
    which commits even when the call was refused: the storage's own block is then a
    savepoint, and a refusal must leave nothing behind in a transaction that commits."""

    def __init__(self, inner: DjangoStorage) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)
        if name in ("after_commit", "close") or not callable(method):
            return method

        @functools.wraps(method)
        def in_block(*args: Any, **kwargs: Any) -> Any:
            refused: DeepworkError | None = None
            with transaction.atomic(using=self.inner.using):
                try:
                    result = method(*args, **kwargs)
                except DeepworkError as exc:
                    refused = exc
            if refused is not None:
                raise refused
            return result

        return in_block


class TestDjangoStorageInHostBlocks(StorageContract):
    """The sync contract with every call a savepoint of a host's block that commits."""

    @pytest.fixture
    def storage(self, alias: str) -> Storage:
        joined: Storage = InHostBlocks(DjangoStorage(using=alias))  # type: ignore[assignment]
        return joined


def test_storage_machine_in_host_blocks(alias: str) -> None:
    """The services over DjangoStorage agree with the reference model when every call is
    a savepoint of a host's block."""

    def make() -> Storage:
        empty(alias)
        joined: Storage = InHostBlocks(DjangoStorage(using=alias))  # type: ignore[assignment]
        return joined

    run_state_machine_as_test(storage_machine(make), settings=MACHINE_SETTINGS)
