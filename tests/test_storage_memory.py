"""The in-memory storage against the shipped conformance suite and state machine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from deepwork_retry import AsyncStorage
from deepwork_retry.storage.memory import AsyncMemoryStorage, MemoryStorage
from deepwork_retry.testing import (
    AsyncStorageContract,
    StorageContract,
    async_storage_machine,
    storage_machine,
)


@pytest.fixture
def storage() -> Iterator[MemoryStorage]:
    store = MemoryStorage()
    yield store
    store.close()


@pytest.fixture
def async_storage_factory() -> object:
    async def make() -> AsyncStorage:
        return AsyncMemoryStorage()

    return make


class TestMemoryStorage(StorageContract):
    pass


class TestAsyncMemoryStorage(AsyncStorageContract):
    pass


TestMemoryMachine = storage_machine(MemoryStorage).TestCase


async def _make_async() -> AsyncStorage:
    return AsyncMemoryStorage()


TestAsyncMemoryMachine = async_storage_machine(_make_async).TestCase
