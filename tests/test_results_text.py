"""The retry answer written directly as JSON text equals the JSON of its dict form."""

from __future__ import annotations

import json

from hypothesis import given, settings

from deepwork_retry._core.results import RetryResult, retry_json, retry_text
from deepwork_retry.testing.strategies import retry_results


@settings(max_examples=300, deadline=None)
@given(retry_results(naive=True))
def test_retry_text_is_the_json_of_retry_json(result: RetryResult) -> None:
    """``retry_text`` is character for character the compact, non-ASCII-escaped JSON dump."""
    expected = json.dumps(retry_json(result), ensure_ascii=False, separators=(",", ":"))
    assert expected == retry_text(result)
