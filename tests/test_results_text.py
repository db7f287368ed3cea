"""The retry answer written directly as JSON text equals the JSON of its dict form."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from deepwork_retry._core.model import Progress, Task
from deepwork_retry._core.results import DispatchOutcome, RetryResult, retry_json, retry_text
from deepwork_retry._core.states import BlockedReason, TaskStatus

texts = st.text(max_size=30)
counts = st.integers(min_value=0, max_value=10**12)
zones = st.sampled_from([timezone.utc, timezone(timedelta(hours=5, minutes=30)), None])
stamps = st.builds(
    lambda moment, zone: moment.replace(tzinfo=zone),
    st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2200, 1, 1)),
    zones,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)

tasks = st.builds(
    Task,
    id=texts,
    project_id=texts,
    title=texts,
    status=st.sampled_from(TaskStatus),
    retry_count=counts,
    max_retries=counts,
    retries_left=counts,
    error_message=st.none() | texts,
    error_type=st.none() | texts,
    blocked_reason=st.none() | st.sampled_from(BlockedReason),
    blocked_by=st.lists(texts, max_size=3),
    attempt=counts,
    lease_expires_at=st.none() | stamps,
    created_at=stamps,
    updated_at=stamps,
    started_at=st.none() | stamps,
    completed_at=st.none() | stamps,
    metadata=st.dictionaries(texts, json_values, max_size=3),
)
progresses = st.builds(
    Progress,
    project_id=texts,
    total=counts,
    inbox=counts,
    assigned=counts,
    in_progress=counts,
    review=counts,
    done=counts,
    blocked=counts,
    skipped=counts,
)
outcomes = st.builds(
    DispatchOutcome,
    status=st.sampled_from(["dispatched", "pending", "deferred"]),
    task_id=texts,
    attempt=counts,
    error=st.none() | texts,
)
results = st.builds(RetryResult, task=tasks, progress=progresses, dispatch=outcomes)


@settings(max_examples=300, deadline=None)
@given(results)
def test_retry_text_is_the_json_of_retry_json(result: RetryResult) -> None:
    """``retry_text`` is character for character the compact, non-ASCII-escaped JSON dump."""
    expected = json.dumps(retry_json(result), ensure_ascii=False, separators=(",", ":"))
    assert expected == retry_text(result)
