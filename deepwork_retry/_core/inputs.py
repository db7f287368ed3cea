"""The form every id and page limit must have, wherever it comes in.

Services check ids before they reach a storage, the web API before it stores
an idempotency record, and every storage adapter on its own inputs: all of
them call these rules, so all reject the same things with the same words.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable

from deepwork_retry.exceptions import InvalidInput

MAX_ID_LENGTH = 255
"""The longest project or task id, in characters (what every storage can index)."""

MAX_LIMIT = 1000
"""The largest page a listing returns."""

MAX_ERROR_TYPE_LENGTH = 255
"""The longest ``error_type`` a listing may be filtered on, in characters."""

MAX_CURSOR_LENGTH = 8192
"""The longest text form of a blocked-list cursor accepted (two ids of 255
characters, each character at most 12 bytes of JSON escapes, in base64: 8170)."""


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


def check_after_id(kind: str, value: object) -> str | None:
    """A page's ``after`` (an id, or ``None`` for the first page), checked as an id."""
    if value is None:
        return None
    return check_id(kind, value)


def check_blocked_after(value: object) -> tuple[str, str] | None:
    """The cursor of the blocked list: ``None`` or ``(project_id, task_id)``, both ids."""
    if value is None:
        return None
    if not isinstance(value, tuple) or len(value) != 2:
        raise InvalidInput("after must be a (project id, task id) pair")
    return check_id("project", value[0]), check_id("task", value[1])


def check_projects(value: Iterable[str] | None) -> frozenset[str] | None:
    """A restriction to some projects: ``None`` (every project) or a set of ids."""
    if value is None:
        return None
    if isinstance(value, str):
        raise InvalidInput("projects must be a set of project ids, not one string")
    return frozenset(check_id("project", pid) for pid in value)


def check_error_type(value: object) -> str | None:
    """An ``error_type`` filter: ``None``, or a non-empty string of sane length without NUL."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidInput("error_type must be a non-empty string")
    if len(value) > MAX_ERROR_TYPE_LENGTH:
        raise InvalidInput(f"error_type is longer than {MAX_ERROR_TYPE_LENGTH} characters")
    if "\x00" in value:
        raise InvalidInput("error_type must not contain NUL characters")
    return value


def check_projects_page(
    projects: Iterable[str] | None, after: object, limit: int
) -> tuple[frozenset[str] | None, str | None]:
    """The arguments of ``list_projects``, checked: ``(projects, after)``; every
    storage calls it first, so that all refuse the same inputs alike."""
    check_limit(limit)
    return check_projects(projects), check_after_id("project", after)


def check_blocked_page(
    projects: Iterable[str] | None, error_type: object, after: object, limit: int
) -> tuple[frozenset[str] | None, str | None, tuple[str, str] | None]:
    """The arguments of ``blocked_tasks``, checked: ``(projects, error_type, after)``."""
    check_limit(limit)
    return check_projects(projects), check_error_type(error_type), check_blocked_after(after)


# -- the text form of the blocked list's cursor -------------------------------------------


def blocked_cursor(project_id: str, task_id: str) -> str:
    """The text form of the cursor ``(project_id, task_id)``: base64url of the JSON array
    ``[project_id, task_id]``, without padding (safe in a query string, any ids)."""
    raw = json.dumps([project_id, task_id], ensure_ascii=True, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode("ascii")).decode("ascii").rstrip("=")


_BAD_CURSOR = "after must be a cursor from a previous page's next_after"


def parse_blocked_cursor(text: str) -> tuple[str, str]:
    """The cursor ``(project_id, task_id)`` that :func:`blocked_cursor` wrote as ``text``;
    anything else raises :class:`InvalidInput`."""
    if not isinstance(text, str) or not text or len(text) > MAX_CURSOR_LENGTH:
        raise InvalidInput(_BAD_CURSOR)
    if not text.isascii() or "=" in text or len(text) % 4 == 1:
        raise InvalidInput(_BAD_CURSOR)
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
        value = json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError, RecursionError):
        raise InvalidInput(_BAD_CURSOR) from None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(part, str) for part in value)
    ):
        raise InvalidInput(_BAD_CURSOR)
    try:
        pid, tid = check_id("project", value[0]), check_id("task", value[1])
        pid.encode("utf-8")
        tid.encode("utf-8")
    except (InvalidInput, UnicodeEncodeError):
        raise InvalidInput(_BAD_CURSOR) from None
    if blocked_cursor(pid, tid) != text:  # one text per cursor
        raise InvalidInput(_BAD_CURSOR)
    return pid, tid


__all__ = [
    "MAX_CURSOR_LENGTH",
    "MAX_ERROR_TYPE_LENGTH",
    "MAX_ID_LENGTH",
    "MAX_LIMIT",
    "blocked_cursor",
    "check_after_id",
    "check_blocked_after",
    "check_blocked_page",
    "check_error_type",
    "check_id",
    "check_limit",
    "check_projects",
    "check_projects_page",
    "parse_blocked_cursor",
]
