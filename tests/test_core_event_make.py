"""The core's own event constructor builds what ``Event(...)`` builds."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from deepwork_retry._core import events, states
from deepwork_retry._core.events import Event, EventType

STAMP = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)

json_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.text(max_size=5), st.sampled_from(["x", "y"])
)


@given(
    project_id=st.text(min_size=1, max_size=4),
    kind=st.sampled_from(EventType),
    task_id=st.one_of(st.none(), st.text(min_size=1, max_size=4)),
    attempt=st.one_of(st.none(), st.integers(1, 9)),
    data=st.dictionaries(st.text(max_size=4), json_values, max_size=4),
)
def test_make_equals_the_class(
    project_id: str,
    kind: EventType,
    task_id: str | None,
    attempt: int | None,
    data: dict[str, Any],
) -> None:
    made = events._make(project_id, kind, task_id, attempt, STAMP, dict(data))
    built = Event(
        project_id=project_id, type=kind, task_id=task_id, attempt=attempt, at=STAMP, data=data
    )
    assert made == built
    assert made.seq == 0
    assert made.to_json() == built.to_json()
    assert made.dumps() == built.dumps()
    assert events.evolve_event(made, seq=3) == events.evolve_event(built, seq=3)


def test_enum_text_is_the_value() -> None:
    for enum in (
        states.TaskStatus,
        states.BlockedReason,
        states.RetryBudget,
        states.Trigger,
        states.DispatchState,
        states.Outcome,
        EventType,
    ):
        for member in enum:
            assert str(member) == member.value
            assert events._enum(member) == member.value
    assert events._enum(None) is None
    assert events._enum("one_more") == "one_more"
