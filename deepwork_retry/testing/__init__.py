"""The conformance kit for storage adapters, and test doubles for host applications.

Needs the ``testing`` extra (``pip install 'deepwork-retry[testing]'``): it
imports pytest and Hypothesis. ``import deepwork_retry`` never imports this
package.

- :class:`StorageContract` / :class:`AsyncStorageContract`: pytest test classes
  to subclass with a ``storage`` / ``async_storage_factory`` fixture.
- :func:`storage_machine` / :func:`async_storage_machine`: Hypothesis state
  machines that drive the services over a storage and check it against a
  reference model.
- :mod:`deepwork_retry.testing.strategies`: Hypothesis strategies for ids,
  projects, tasks, errors, retry policies and event sequences.
- :class:`FakeClock`, :class:`RecordingDispatcher`,
  :class:`AsyncRecordingDispatcher`: a settable clock and dispatchers that
  remember what they were handed.

See ``docs/testing.md``.
"""

from __future__ import annotations

from deepwork_retry.exceptions import missing_extra

try:
    import hypothesis  # noqa: F401 - fail here, with the extra's name, when it is missing
    import pytest
except ImportError as exc:
    raise missing_extra("testing", __name__, exc) from exc

# Under pytest, the kit's own asserts show both values when they fail: its
# modules are rewritten like test modules (they are imported just below, after
# this registration). Outside pytest this does nothing.
pytest.register_assert_rewrite(
    "deepwork_retry.testing.contract",
    "deepwork_retry.testing.machine",
    "deepwork_retry.testing.strategies",
    "deepwork_retry.testing._compare",
)

from deepwork_retry.testing import strategies  # noqa: E402
from deepwork_retry.testing.contract import AsyncStorageContract, StorageContract  # noqa: E402
from deepwork_retry.testing.doubles import AsyncRecordingDispatcher, FakeClock, RecordingDispatcher  # noqa: E402
from deepwork_retry.testing.machine import async_storage_machine, storage_machine  # noqa: E402

__all__ = [
    "AsyncRecordingDispatcher",
    "AsyncStorageContract",
    "FakeClock",
    "RecordingDispatcher",
    "StorageContract",
    "async_storage_machine",
    "storage_machine",
    "strategies",
]
