"""The form every id and page limit must have, wherever it comes in.

Services check ids before they reach a storage, the web API before it stores
an idempotency record, and every storage adapter on its own inputs: all of
them call these rules, so all reject the same things with the same words.
"""

from __future__ import annotations

from deepwork_retry.exceptions import InvalidInput

MAX_ID_LENGTH = 255
"""The longest project or task id, in characters (what every storage can index)."""

MAX_LIMIT = 1000
"""The largest page a listing returns."""


def check_id(kind: str, value: object) -> str:
    """``value`` when it is a usable ``kind`` id, else :class:`InvalidInput` saying why."""
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{kind} id must be a non-empty string")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidInput(f"{kind} id is longer than {MAX_ID_LENGTH} characters")
    if "\x00" in value:
        raise InvalidInput(f"{kind} id must not contain NUL characters")
    return value


def check_limit(limit: int) -> None:
    """Refuse a page ``limit`` outside 1 to :data:`MAX_LIMIT`."""
    if not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be an integer from 1 to {MAX_LIMIT}")


__all__ = ["MAX_ID_LENGTH", "MAX_LIMIT", "check_id", "check_limit"]
