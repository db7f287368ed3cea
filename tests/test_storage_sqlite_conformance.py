"""The shipped storage conformance suite and state machines, run on SQLite files.

Every contract test and every state-machine example gets a new file of its own.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from deepwork_retry.ports import AsyncStorage, Storage
from deepwork_retry.storage.sqlite import AsyncSQLiteStorage, SQLiteStorage
from deepwork_retry.testing import (
    AsyncStorageContract,
    StorageContract,
    async_storage_machine,
    storage_machine,
)


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[SQLiteStorage]:
    store = SQLiteStorage(tmp_path / "contract.db", synchronous="NORMAL")
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def async_storage_factory(tmp_path: Path) -> Callable[[], Awaitable[AsyncStorage]]:
    async def make() -> AsyncStorage:
        return AsyncSQLiteStorage(tmp_path / "contract.db", synchronous="NORMAL")

    return make


class TestSQLiteStorage(StorageContract):
    pass


class TestAsyncSQLiteStorage(AsyncStorageContract):
    pass


def _fresh_file() -> SQLiteStorage:
    return SQLiteStorage(
        Path(tempfile.mkdtemp(prefix="dw-machine-")) / "m.db", synchronous="NORMAL"
    )


def _remove_file(storage: Storage) -> None:
    assert isinstance(storage, SQLiteStorage)
    shutil.rmtree(storage.path.parent, ignore_errors=True)


TestSQLiteMachine = storage_machine(_fresh_file, _remove_file).TestCase


async def _fresh_async_file() -> AsyncStorage:
    return AsyncSQLiteStorage(
        Path(tempfile.mkdtemp(prefix="dw-machine-")) / "m.db", synchronous="NORMAL"
    )


async def _remove_async_file(storage: AsyncStorage) -> None:
    assert isinstance(storage, AsyncSQLiteStorage)
    _remove_file(storage.sync)


TestAsyncSQLiteMachine = async_storage_machine(_fresh_async_file, _remove_async_file).TestCase
# The async port is a thin thread-offloading wrapper over the adapter the sync
# machine already drives at full length; fewer examples keep the suite quick.
TestAsyncSQLiteMachine.settings = settings(TestAsyncSQLiteMachine.settings, max_examples=25)
