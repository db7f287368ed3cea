"""The shipped conformance suite and state machine, run on DjangoStorage over
Django's SQLite and PostgreSQL backends (each test starts from empty tables)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.db import transaction
from django_support import empty
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from deepwork_retry.exceptions import DeepworkError
from deepwork_retry.ports import EventLog, Storage
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
    savepoint, and a refusal must leave nothing behind in a transaction that commits.

    The port's methods are defined on the class (below), not found through
    ``__getattr__``: a runtime protocol check looks them up statically on 3.12+."""

    def __init__(self, inner: DjangoStorage) -> None:
        self.inner = inner

    def after_commit(self, callback: Callable[[], None]) -> None:
        self.inner.after_commit(callback)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _in_block(name: str) -> Callable[..., Any]:
    def call(self: InHostBlocks, *args: Any, **kwargs: Any) -> Any:
        method = getattr(self.inner, name)
        refused: DeepworkError | None = None
        with transaction.atomic(using=self.inner.using):
            try:
                result = method(*args, **kwargs)
            except DeepworkError as exc:
                refused = exc
        if refused is not None:
            raise refused
        return result

    call.__name__ = call.__qualname__ = name
    return call


for _port in (Storage, EventLog):
    for _name, _member in vars(_port).items():
        if callable(_member) and not _name.startswith("_") and _name != "close":
            setattr(InHostBlocks, _name, _in_block(_name))


def test_in_host_blocks_is_an_event_log(storage: DjangoStorage) -> None:
    """The wrapper keeps the event log, so the kit's event scenarios run on it too."""
    assert isinstance(InHostBlocks(storage), EventLog)


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
