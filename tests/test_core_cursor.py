"""The text form of the blocked list's cursor: any pair of ids goes there and back, one text
per cursor, and any other text is refused with InvalidInput (never another error)."""

from __future__ import annotations

import base64
import json
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deepwork_retry._core.inputs import (
    MAX_CURSOR_LENGTH,
    blocked_cursor,
    parse_blocked_cursor,
)
from deepwork_retry.exceptions import InvalidInput
from deepwork_retry.testing.strategies import ids

URL_SAFE = set(string.ascii_letters + string.digits + "-_")


@given(ids(max_size=255), ids(max_size=255))
def test_any_pair_of_ids_goes_there_and_back(project_id: str, task_id: str) -> None:
    text = blocked_cursor(project_id, task_id)
    assert set(text) <= URL_SAFE  # nothing to escape in a query string, no padding
    assert len(text) <= MAX_CURSOR_LENGTH
    assert (project_id, task_id) == parse_blocked_cursor(text)


def test_the_longest_ids_fit() -> None:
    astral = "\U0001f600" * 255
    assert (astral, astral) == parse_blocked_cursor(blocked_cursor(astral, astral))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "=",
        "a",
        "abc!",
        "é",
        blocked_cursor("p", "t") + "=",  # padded: not the one text of that cursor
        _b64(b"[1,2]"),
        _b64(b'["p"]'),
        _b64(b'["p","t","u"]'),
        _b64(b'{"p":"t"}'),
        _b64(b'["","t"]'),
        _b64(b'["p","a\\u0000"]'),
        _b64(b'["p","\\ud800"]'),  # a lone surrogate: no id a storage holds
        _b64(json.dumps(["x" * 256, "t"]).encode()),
        _b64(b'["p", "t"]'),  # valid JSON, but not the text blocked_cursor writes
        _b64(b"\xff\xfe"),
        _b64(b"[" * 100_000),
        "A" * (MAX_CURSOR_LENGTH + 4),
    ],
)
def test_other_texts_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput, match="after must be a cursor"):
        parse_blocked_cursor(text)


@given(st.text(max_size=200))
def test_any_text_is_a_cursor_or_refused(text: str) -> None:
    try:
        pid, tid = parse_blocked_cursor(text)
    except InvalidInput:
        return
    assert blocked_cursor(pid, tid) == text
