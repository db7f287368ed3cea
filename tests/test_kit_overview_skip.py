"""The kit's overview scenarios skip, saying why, on a storage without the reads across
projects, and run on one with them."""

from __future__ import annotations

import asyncio

import pytest

from deepwork_retry.storage._to_async import AsyncFromSync, AsyncFromSyncEvents
from deepwork_retry.storage.memory import MemoryStorage
from deepwork_retry.testing.contract import SCENARIOS, AsyncStorageContract, Harness


class _NoOverview(AsyncFromSyncEvents[MemoryStorage]):
    """The async port over the in-memory storage without its reads across projects."""


OVERVIEW_SCENARIOS = [
    name
    for name in SCENARIOS
    if name.startswith(("projects_are_listed", "blocked_tasks_", "overview_"))
]


def test_the_overview_scenarios_are_the_ones_named_for_it() -> None:
    assert len(OVERVIEW_SCENARIOS) >= 6, OVERVIEW_SCENARIOS


@pytest.mark.parametrize("name", OVERVIEW_SCENARIOS)
def test_an_overview_scenario_skips_a_storage_without_the_reads(name: str) -> None:
    async def main() -> None:
        await SCENARIOS[name](Harness(_NoOverview(MemoryStorage(), offload=False)))

    with pytest.raises(
        pytest.skip.Exception,
        match=r"_NoOverview over MemoryStorage has no reads across projects "
        r".*missing: list_projects, blocked_tasks",
    ):
        asyncio.run(main())


@pytest.mark.parametrize("name", OVERVIEW_SCENARIOS)
def test_an_overview_scenario_runs_on_a_storage_with_them(name: str) -> None:
    async def main() -> None:
        await SCENARIOS[name](Harness(AsyncFromSync(MemoryStorage(), offload=False)))

    asyncio.run(main())


def test_the_overview_property_skips_a_storage_without_the_reads() -> None:
    async def factory() -> _NoOverview:
        return _NoOverview(MemoryStorage(), offload=False)

    with pytest.raises(pytest.skip.Exception, match=r"missing: list_projects, blocked_tasks"):
        AsyncStorageContract().test_overview_pages_match_a_model(factory)
