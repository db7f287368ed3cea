"""The kit's event scenarios skip, saying why, on a storage that keeps no events."""

from __future__ import annotations

import asyncio

import pytest

from deepwork_retry.storage._to_async import AsyncFromSync
from deepwork_retry.storage.memory import MemoryStorage
from deepwork_retry.testing.contract import SCENARIOS, Harness


class _NoEvents(AsyncFromSync[MemoryStorage]):
    """The async port over the in-memory storage without its event log."""


EVENT_SCENARIOS = [
    name for name in SCENARIOS if "event" in name or name in ("racing_claims_never_share_an_event",)
]


def test_the_event_scenarios_are_the_ones_named_for_events() -> None:
    assert len(EVENT_SCENARIOS) >= 8, EVENT_SCENARIOS


@pytest.mark.parametrize("name", EVENT_SCENARIOS)
def test_an_event_scenario_skips_a_storage_without_the_event_log(name: str) -> None:
    async def main() -> None:
        await SCENARIOS[name](Harness(_NoEvents(MemoryStorage(), offload=False)))

    with pytest.raises(pytest.skip.Exception, match=r"keeps no lifecycle events .*missing: events"):
        asyncio.run(main())


@pytest.mark.parametrize("name", EVENT_SCENARIOS)
def test_an_event_scenario_runs_on_a_storage_with_it(name: str) -> None:
    async def main() -> None:
        await SCENARIOS[name](Harness(AsyncFromSync(MemoryStorage(), offload=False)))

    asyncio.run(main())
