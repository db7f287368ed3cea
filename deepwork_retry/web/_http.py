"""The HTTP side of the API with no framework: requests and responses as plain data.

Every web adapter turns its framework's request into an :class:`ApiRequest`,
hands it to :class:`~deepwork_retry.web.RetryAPI` (or the async twin) and
writes the :class:`ApiResponse` back. Routing, header and body parsing, and the
one table from errors to statuses live here, so the adapters cannot drift.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote_to_bytes, urlsplit

import attrs

from deepwork_retry._core.inputs import (
    MAX_LIMIT,
    check_error_type,
    check_id,
    parse_blocked_cursor,
)
from deepwork_retry._core.results import COMPACT
from deepwork_retry._core.states import RetryBudget
from deepwork_retry.auth import MAX_TOKEN_LENGTH
from deepwork_retry.exceptions import (
    STORAGE_DETAIL,
    DeepworkError,
    IdempotencyKeyReused,
    InvalidInput,
    InvalidToken,
    InvalidTransition,
    NotAuthenticated,
    NotFound,
    OverviewNotKept,
    ProjectNotFound,
    ProjectNotRunnable,
    StorageError,
    StorageUnavailable,
    TaskNotBlocked,
    TaskNotFound,
    VersionConflict,
)

log = logging.getLogger("deepwork_retry.web")

DEFAULT_PREFIX = "/api/deep-work"
MAX_BODY_BYTES = 64 * 1024
BODY_TIMEOUT = 10.0
"""Seconds a request's whole body may take to arrive, where the adapter reads it itself."""
MAX_HEADER_BYTES = 128 * 1024
"""The header size the servers this package configures accept (the demo's uvicorn,
aiohttp's ``create_app``), so that an oversized token still reaches the API and is
answered in JSON instead of by the server."""
MAX_REASON_LENGTH = 2000
MAX_IDEMPOTENCY_KEY_LENGTH = 255
DEFAULT_PAGE = 50
ANY_PATH = "deepwork_any"
"""The name an adapter registers its path converter under: one that matches any
path, newlines included (ids may hold them)."""
JSON = "application/json"


def normalise_prefix(prefix: str) -> str:
    """``"api/x/"`` -> ``"/api/x"``; ``""`` and ``"/"`` mount at the root."""
    prefix = "/" + prefix.strip("/")
    return "" if prefix == "/" else prefix


# -- plain requests and responses ---------------------------------------------------


def _headers(pairs: Iterable[tuple[str, str]] | Mapping[str, str]) -> dict[str, str]:
    """Names lower-cased, the first of repeated headers kept, except ``cookie``: HTTP/2
    may split it into several fields (RFC 9113 8.2.3), joined here with ``"; "``."""
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    found: dict[str, str] = {}
    for name, value in items:
        name = name.lower()
        if name not in found:
            found[name] = value
        elif name == "cookie":
            found[name] += "; " + value
    return found


def parse_query(raw: str | bytes) -> list[tuple[str, str]]:
    """The parameters of a raw (still percent-encoded) query string, blank values kept.

    Every adapter passes its request's raw query string here, so that all decode
    it alike: ``+`` is a space, and a percent-escape that is not UTF-8 is kept as
    a lone surrogate (``surrogateescape``), which :func:`page_options` refuses.
    """
    if isinstance(raw, bytes):
        raw = raw.decode("latin-1")
    return parse_qsl(raw, keep_blank_values=True, encoding="utf-8", errors="surrogateescape")


def path_bytes(raw: str | bytes) -> bytes:
    """The bytes a raw (percent-encoded) request path or target names; any query is dropped."""
    if isinstance(raw, bytes):
        raw = raw.decode("latin-1")
    raw = raw.partition("?")[0]
    if not raw.startswith("/") and "://" in raw:  # absolute-form target
        raw = urlsplit(raw).path
    return unquote_to_bytes(raw)


def wsgi_path_bytes(environ: Mapping[str, Any]) -> bytes | None:
    """The path bytes of a WSGI request, as the client sent them, when they can be known.

    The raw request target (``RAW_URI``, ``REQUEST_URI``: gunicorn, werkzeug,
    uWSGI) first, since some servers decode ``PATH_INFO`` with replacement
    characters; else ``SCRIPT_NAME + PATH_INFO``, which PEP 3333 carries as
    bytes in latin-1.
    """
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if isinstance(raw, str) and raw:
        return path_bytes(raw)
    path = str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", ""))
    try:
        return path.encode("latin-1")
    except UnicodeEncodeError:  # a server that passed text: nothing left to check
        return None


def check_path(raw: bytes | None) -> None:
    """Refuse a path whose bytes are not UTF-8, whatever the framework made of them.

    Frameworks differ here (a replacement character, the escape kept as
    ``%FF``...), so the decision is this one, for every adapter.
    """
    if raw is None:
        return
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequestBody("Request path is not valid UTF-8") from None


def is_text(value: str) -> bool:
    """Whether ``value`` is text that UTF-8 can carry (no lone surrogate from a bad escape)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Query(dict[str, str]):
    """The query parameters, the first of each name; ``repeated`` names those given
    more than once (a route that must not guess which one was meant refuses them)."""

    repeated: frozenset[str] = frozenset()


def _query(pairs: Iterable[tuple[str, str]] | Mapping[str, str]) -> Query:
    if isinstance(pairs, Query):
        return pairs
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    found = Query()
    repeated: set[str] = set()
    for name, value in items:
        if name not in found:
            found[name] = value
        else:
            repeated.add(name)
    found.repeated = frozenset(repeated)
    return found


def _upper(method: str) -> str:
    return method.upper()


@attrs.frozen(kw_only=True)
class ApiRequest:
    """One HTTP request below the API's prefix.

    ``path`` is the decoded path relative to the prefix (``/projects/p/...``);
    header names are matched case-insensitively and the first of repeated
    headers or query parameters wins (repeated ``cookie`` headers are joined).
    ``raw_path``, when the adapter knows it, is the whole request path as the
    bytes the client sent (percent-decoded):
    the API refuses one that is not UTF-8 (:func:`check_path`). ``scheme`` is
    ``"https"`` when the adapter's framework says the request came over HTTPS
    (never taken from ``X-Forwarded-Proto`` unless the host configured its
    framework to trust it).
    """

    method: str = attrs.field(converter=_upper)
    path: str
    headers: Mapping[str, str] = attrs.field(factory=dict, converter=_headers)
    query: Mapping[str, str] = attrs.field(factory=dict, converter=_query)
    body: bytes = b""
    raw_path: bytes | None = None
    scheme: str = "http"


@attrs.frozen(kw_only=True)
class ApiResponse:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    """Every one to send as it is, repeated ones included (the dashboard's sign-in sets
    two cookies); a response without ``Content-Type`` is JSON."""
    close: bool = False
    """Close the connection after this response (its request's body was not read
    to the end); each adapter does it in its server's way."""
    stream: Any = None
    """An open event stream (``AsyncEventStream`` from the async API, ``EventStream``
    from the sync one) whose chunks are the body, in place of ``body``: the adapter
    writes ``headers`` as they are (they carry the content type), then each chunk
    as it comes, and closes the stream when it ends or the client goes away."""

    def json(self) -> Any:
        return json.loads(self.body)


def content_type(result: ApiResponse) -> str:
    """The response's own ``Content-Type`` (an event stream's, say), else JSON: every
    adapter writes this one content type, never the JSON default beside another."""
    for name, value in result.headers:
        if name.lower() == "content-type":
            return value
    return JSON


def other_headers(result: ApiResponse) -> list[tuple[str, str]]:
    """The response's headers but its ``Content-Type`` (see :func:`content_type`)."""
    return [(name, value) for name, value in result.headers if name.lower() != "content-type"]


def json_bytes(payload: Any) -> bytes:
    """Compact UTF-8 JSON, with one encoder for every response (``json.dumps`` would build
    one per call); the API's payloads are trees of fresh dicts and lists, never cyclic."""
    return COMPACT.encode(payload).encode("utf-8")


def respond(
    status: int, payload: Any, headers: Iterable[tuple[str, str]] = (), *, close: bool = False
) -> ApiResponse:
    return ApiResponse(status=status, body=json_bytes(payload), headers=tuple(headers), close=close)


# -- routes ---------------------------------------------------------------------------

ROUTES: tuple[tuple[str, str, str], ...] = (
    ("POST", "/projects/{project_id}/tasks/{task_id}/retry", "retry"),
    ("GET", "/projects/{project_id}/tasks/{task_id}", "task"),
    ("GET", "/projects/{project_id}/tasks/{task_id}/attempts", "attempts"),
    ("GET", "/projects/{project_id}/progress", "progress"),
    ("GET", "/projects/{project_id}/tasks", "tasks"),
    ("POST", "/projects/{project_id}/retry-blocked", "retry_blocked"),
    ("GET", "/projects/{project_id}/events", "events"),
    ("GET", "/projects", "projects"),
    ("GET", "/blocked", "blocked"),
)
"""``(method, path template, route name)`` for every operation, below the prefix."""


class RouteNotFound(DeepworkError, LookupError):
    def __init__(self) -> None:
        super().__init__("Not Found")


class MethodNotAllowed(DeepworkError):
    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = tuple(sorted(set(allowed)))
        super().__init__("Method Not Allowed")


class BadRequestBody(InvalidInput):
    """The request's body, query or headers do not have the documented form (422)."""


class BodyTooLarge(DeepworkError):
    def __init__(self) -> None:
        super().__init__(f"Request body is larger than {MAX_BODY_BYTES} bytes")


class LengthRequired(DeepworkError):
    """A chunked body the server hands over unread (it does not de-chunk): refuse it
    rather than act on an empty body (411)."""

    def __init__(self) -> None:
        super().__init__(
            "This server cannot read a chunked request body; send it with Content-Length"
        )


class BodyTimeout(DeepworkError):
    """The request's body stopped arriving (408, and the connection is closed)."""

    closes_connection = True

    def __init__(self) -> None:
        super().__init__("Request body did not arrive in time")


class BodyIncomplete(DeepworkError):
    """The body ended before its declared length: the client went away (400, closed)."""

    closes_connection = True

    def __init__(self) -> None:
        super().__init__("Request body ended before its declared length")


class BadLastEventId(DeepworkError):
    """``Last-Event-ID`` (or ``?after=``) is not an event number (400)."""

    def __init__(self) -> None:
        super().__init__("Last-Event-ID (or after) must be an event number: an integer >= 0")


class TooManyStreams(DeepworkError):
    """The principal already has as many event streams open as it may (429)."""

    def __init__(self, limit: int, retry_after: int = 5) -> None:
        self.retry_after = retry_after
        super().__init__(f"Too many event streams open for this token (at most {limit})")


class EventsNotKept(DeepworkError):
    """The storage keeps no lifecycle events, so there is nothing to stream (501)."""

    def __init__(self) -> None:
        super().__init__("This server's storage keeps no events to stream")


class IdempotencyInProgress(DeepworkError):
    """A request with this Idempotency-Key has not finished yet (409, try again)."""

    def __init__(self) -> None:
        super().__init__(
            "A request with this Idempotency-Key is still being processed; try again shortly"
        )


class RetryCommitted(DeepworkError):
    """A retry was committed but its answer could not be built (202, never 503 or 500)."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(COMMITTED)


def _shape(template: str) -> tuple[int, tuple[tuple[int, str], ...], tuple[tuple[int, str], ...]]:
    """``(segments, (index, literal)..., (index, parameter)...)`` of a path template."""
    parts = template.strip("/").split("/")
    literals = tuple((i, p) for i, p in enumerate(parts) if not p.startswith("{"))
    params = tuple((i, p[1:-1]) for i, p in enumerate(parts) if p.startswith("{"))
    return len(parts), literals, params


_Compiled = tuple[str, tuple[tuple[int, str], ...], tuple[tuple[int, str], ...], str]


def _compile() -> dict[int, tuple[_Compiled, ...]]:
    by_length: dict[int, list[_Compiled]] = {}
    for method, template, name in ROUTES:
        length, literals, params = _shape(template)
        by_length.setdefault(length, []).append((method, literals, params, name))
    return {length: tuple(found) for length, found in by_length.items()}


_BY_LENGTH = _compile()
"""The routes by their number of path segments, in :data:`ROUTES` order."""


def match(method: str, path: str) -> tuple[str, dict[str, str]]:
    """The route name and path parameters for ``method path``.

    Raises :class:`RouteNotFound` or :class:`MethodNotAllowed`. A parameter
    matches any one segment, including an empty one.
    """
    parts = path[1:].split("/") if path.startswith("/") else path.split("/")
    if method == "HEAD":
        method = "GET"
    allowed: list[str] = []
    for route_method, literals, params, name in _BY_LENGTH.get(len(parts), ()):
        for index, literal in literals:
            if parts[index] != literal:
                break
        else:
            if route_method == method:
                return name, {param: parts[index] for index, param in params}
            allowed.append(route_method)
    if allowed:
        raise MethodNotAllowed(allowed)
    raise RouteNotFound


_TEMPLATES = {name: template for _, template, name in ROUTES}


def route_template(request: ApiRequest) -> str | None:
    """The template of the route ``request`` matches (below the prefix), or ``None``."""
    try:
        name, _ = match(request.method, request.path)
    except (RouteNotFound, MethodNotAllowed):
        return None
    return _TEMPLATES[name]


# -- authentication header ------------------------------------------------------------


def bearer_token(headers: Mapping[str, str]) -> str:
    """The token of ``Authorization: Bearer <token>``.

    Raises :class:`NotAuthenticated` when the header is missing or not of that
    form, and :class:`InvalidToken` for a token too long to be one of ours.
    """
    value = headers.get("authorization")
    if value is None:
        raise NotAuthenticated
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise NotAuthenticated
    if len(token) > MAX_TOKEN_LENGTH:
        raise InvalidToken
    return token


# -- bodies and parameters --------------------------------------------------------------


def _json_object(body: bytes, fields: Iterable[str]) -> dict[str, Any]:
    """The request's JSON object; an empty body (or ``null``) is an empty object."""
    if len(body) > MAX_BODY_BYTES:
        raise BodyTooLarge
    if not body.strip():
        return {}
    try:
        data = json.loads(body.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError included: JSON is UTF-8
        raise BadRequestBody("Request body is not valid JSON") from None
    except RecursionError:  # valid JSON nested too deeply to be our object
        raise BadRequestBody("Request body must be a JSON object") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BadRequestBody("Request body must be a JSON object")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise BadRequestBody(f"Unknown field in request body: {unknown[0]!r}"[:300])
    return data


def _budget(data: Mapping[str, Any]) -> RetryBudget:
    value = data.get("budget")
    if value is None:
        return RetryBudget.ONE_MORE
    if isinstance(value, str) and value in {b.value for b in RetryBudget}:
        return RetryBudget(value)
    raise BadRequestBody("budget must be 'one_more' or 'full'")


def _reason(data: Mapping[str, Any]) -> str | None:
    value = data.get("reason")
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_REASON_LENGTH:
        raise BadRequestBody(f"reason must be a string of at most {MAX_REASON_LENGTH} characters")
    if "\x00" in value:
        raise BadRequestBody("reason must not contain NUL characters")
    if not is_text(value):  # a JSON escape of half a surrogate pair: no text at all
        raise BadRequestBody("reason must be valid Unicode text")
    return value


def check_reason(value: str | None) -> str | None:
    """``value`` when it is a usable retry reason (as the retry body's ``reason``)."""
    return _reason({"reason": value})


def _limit(value: object, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, str):
        try:
            value = int(value) if value.strip().isdigit() and len(value) < 8 else -1
        except ValueError:
            value = -1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT:
        raise BadRequestBody(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return value


def _after(value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not is_text(value):
        raise BadRequestBody("after must be a task id")
    try:
        check_id("task", value)
    except InvalidInput:
        raise BadRequestBody("after must be a task id") from None
    return value


@attrs.frozen(kw_only=True)
class RetryOptions:
    budget: RetryBudget = RetryBudget.ONE_MORE
    reason: str | None = None


_DEFAULT_RETRY = RetryOptions()


def retry_options(body: bytes) -> RetryOptions:
    if not body:
        return _DEFAULT_RETRY
    data = _json_object(body, ("budget", "reason"))
    return RetryOptions(budget=_budget(data), reason=_reason(data))


@attrs.frozen(kw_only=True)
class BulkOptions:
    dry_run: bool = False
    budget: RetryBudget = RetryBudget.ONE_MORE
    reason: str | None = None
    after: str | None = None
    limit: int = 100


def bulk_options(body: bytes) -> BulkOptions:
    data = _json_object(body, ("dry_run", "budget", "reason", "after", "limit"))
    dry_run = data.get("dry_run", False)
    if dry_run is None:
        dry_run = False
    if not isinstance(dry_run, bool):
        raise BadRequestBody("dry_run must be true or false")
    return BulkOptions(
        dry_run=dry_run,
        budget=_budget(data),
        reason=_reason(data),
        after=_after(data.get("after")),
        limit=_limit(data.get("limit"), 100),
    )


@attrs.frozen(kw_only=True)
class PageOptions:
    after: str | None = None
    limit: int = DEFAULT_PAGE


def page_options(query: Mapping[str, str]) -> PageOptions:
    if not all(is_text(name) and is_text(value) for name, value in query.items()):
        raise BadRequestBody("Query string is not valid UTF-8")
    unknown = sorted(set(query) - {"status", "after", "limit"})
    if unknown:
        raise BadRequestBody(f"Unknown query parameter: {unknown[0]!r}"[:300])
    status = query.get("status", "blocked")
    if status != "blocked":
        raise BadRequestBody("status must be 'blocked' (the only listing offered)")
    return PageOptions(after=_after(query.get("after")), limit=_limit(query.get("limit"), 50))


def _only(query: Mapping[str, str], names: frozenset[str]) -> None:
    """Refuse a query that is not text, names a parameter outside ``names`` or repeats one."""
    if not all(is_text(name) and is_text(value) for name, value in query.items()):
        raise BadRequestBody("Query string is not valid UTF-8")
    unknown = sorted(set(query) - names)
    if unknown:
        raise BadRequestBody(f"Unknown query parameter: {unknown[0]!r}"[:300])
    repeated = sorted(getattr(query, "repeated", ()))
    if repeated:
        raise BadRequestBody(f"Query parameter given more than once: {repeated[0]!r}"[:300])


def _optional_id(query: Mapping[str, str], name: str, what: str) -> str | None:
    """The id ``name`` of the query; absent or empty: ``None``."""
    value = query.get(name)
    if value is None or value == "":
        return None
    try:
        return check_id(what, value)
    except InvalidInput:
        raise BadRequestBody(f"{name} must be a {what} id") from None


_PROJECTS_QUERY = frozenset({"after", "limit"})
_BLOCKED_QUERY = frozenset({"project_id", "error_type", "after", "limit"})


def projects_options(query: Mapping[str, str]) -> PageOptions:
    """The project list's query: ``after`` (a project id) and ``limit``."""
    _only(query, _PROJECTS_QUERY)
    after = _optional_id(query, "after", "project")
    return PageOptions(after=after, limit=_limit(query.get("limit"), DEFAULT_PAGE))


@attrs.frozen(kw_only=True)
class BlockedOptions:
    project_id: str | None = None
    error_type: str | None = None
    after: tuple[str, str] | None = None
    limit: int = DEFAULT_PAGE


def blocked_options(query: Mapping[str, str]) -> BlockedOptions:
    """The blocked list's query: ``project_id``, ``error_type``, ``after`` (the text of a
    cursor, as the previous page's ``next_after`` gave it) and ``limit``; an empty value
    is an absent one."""
    _only(query, _BLOCKED_QUERY)
    after_text = query.get("after") or None
    return BlockedOptions(
        project_id=_optional_id(query, "project_id", "project"),
        error_type=check_error_type(query.get("error_type") or None),
        after=None if after_text is None else parse_blocked_cursor(after_text),
        limit=_limit(query.get("limit"), DEFAULT_PAGE),
    )


def idempotency_key(headers: Mapping[str, str]) -> str | None:
    """The ``Idempotency-Key`` header, checked: 1 to 255 visible ASCII characters."""
    value = headers.get("idempotency-key")
    if value is None:
        return None
    value = value.strip()
    if not 0 < len(value) <= MAX_IDEMPOTENCY_KEY_LENGTH or not all(
        "!" <= ch <= "~" for ch in value
    ):
        raise BadRequestBody(
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} visible ASCII characters"
        )
    return value


def scoped_key(principal_id: str, key: str) -> str:
    """The stored form of a client's key: one namespace per principal, fixed length."""
    raw = f"{principal_id}\x00{key}".encode("utf-8", "surrogatepass")
    return "idem:" + hashlib.sha256(raw).hexdigest()


def storable_ids(project_id: str, task_id: str) -> bool:
    """Whether an idempotency record may name these ids (every storage accepts them)."""
    try:
        check_id("project", project_id)
        check_id("task", task_id)
        project_id.encode("utf-8")
        task_id.encode("utf-8")
    except (InvalidInput, UnicodeEncodeError):
        return False
    return True


# -- the one error table ------------------------------------------------------------------

STORAGE_DOWN = STORAGE_DETAIL
UNEXPECTED = "The service could not handle this request; try again later"
COMMITTED = (
    "The retry was committed, but its result could not be shown; read the task for its state"
)


def _no_headers(exc: BaseException) -> tuple[tuple[str, str], ...]:
    return ()


def _bearer(exc: BaseException) -> tuple[tuple[str, str], ...]:
    return (("WWW-Authenticate", "Bearer"),)


def _invalid_token(exc: BaseException) -> tuple[tuple[str, str], ...]:
    return (("WWW-Authenticate", 'Bearer error="invalid_token"'),)


def _retry_after(exc: BaseException) -> tuple[tuple[str, str], ...]:
    seconds = getattr(exc, "retry_after", 1)
    if not isinstance(seconds, int) or seconds < 0:
        seconds = 1
    return (("Retry-After", str(seconds)),)


def _allow(exc: BaseException) -> tuple[tuple[str, str], ...]:
    allowed = getattr(exc, "allowed", ())
    return (("Allow", ", ".join(allowed)),)


def _own_detail(exc: BaseException) -> str:
    return exc.detail if isinstance(exc, DeepworkError) else str(exc)


def _fixed(text: str) -> Any:
    return lambda exc: text


class NotConfigured(DeepworkError):
    """The host's settings name no usable API (503; the log says what is wrong)."""

    retry_after = 60

    def __init__(self) -> None:
        super().__init__("The retry API is not configured")


ERRORS: Mapping[type[BaseException], tuple[int, str, Any, Any]] = {
    # class: (status, code, detail(exc), headers(exc)); the most specific class wins.
    # ``code`` is the body's machine-readable ``code``, stable across releases.
    RetryCommitted: (202, "retry_committed", _own_detail, _no_headers),
    InvalidToken: (401, "invalid_token", _own_detail, _invalid_token),
    NotAuthenticated: (401, "not_authenticated", _own_detail, _bearer),
    RouteNotFound: (404, "route_not_found", _own_detail, _no_headers),
    ProjectNotFound: (404, "project_not_found", _own_detail, _no_headers),
    TaskNotFound: (404, "task_not_found", _own_detail, _no_headers),
    NotFound: (404, "not_found", _own_detail, _no_headers),
    MethodNotAllowed: (405, "method_not_allowed", _own_detail, _allow),
    TaskNotBlocked: (400, "task_not_blocked", _own_detail, _no_headers),
    ProjectNotRunnable: (409, "project_not_runnable", _own_detail, _no_headers),
    InvalidTransition: (409, "invalid_transition", _own_detail, _no_headers),
    IdempotencyInProgress: (409, "idempotency_in_progress", _own_detail, _retry_after),
    BadLastEventId: (400, "invalid_last_event_id", _own_detail, _no_headers),
    TooManyStreams: (429, "too_many_streams", _own_detail, _retry_after),
    EventsNotKept: (501, "events_not_kept", _own_detail, _no_headers),
    OverviewNotKept: (501, "overview_not_kept", _own_detail, _no_headers),
    BodyTooLarge: (413, "body_too_large", _own_detail, _no_headers),
    LengthRequired: (411, "length_required", _own_detail, _no_headers),
    BodyTimeout: (408, "request_timeout", _own_detail, _no_headers),
    BodyIncomplete: (400, "body_incomplete", _own_detail, _no_headers),
    IdempotencyKeyReused: (422, "idempotency_key_reused", _own_detail, _no_headers),
    InvalidInput: (422, "invalid_input", _own_detail, _no_headers),
    VersionConflict: (
        503,
        "task_busy",
        _fixed("The task is busy; try again shortly"),
        _retry_after,
    ),
    StorageUnavailable: (503, "storage_unavailable", _fixed(STORAGE_DOWN), _retry_after),
    StorageError: (503, "storage_unavailable", _fixed(STORAGE_DOWN), _retry_after),
    NotConfigured: (503, "not_configured", _own_detail, _retry_after),
    DeepworkError: (400, "bad_request", _own_detail, _no_headers),
}
"""Every error the API reports, by class: the one place statuses and codes are chosen."""

UNEXPECTED_CODE = "unexpected_error"
"""The ``code`` of the 503 for an error outside :data:`ERRORS` (logged, never shown)."""


def _codes() -> dict[str, frozenset[int]]:
    found: dict[str, set[int]] = {UNEXPECTED_CODE: {503}}
    for status, code, _, _ in ERRORS.values():
        found.setdefault(code, set()).add(status)
    return {code: frozenset(found[code]) for code in sorted(found)}


ERROR_CODES: Mapping[str, frozenset[int]] = _codes()
"""Every error ``code`` the API answers with, and the statuses it comes with."""


def error_body(code: str, detail: str) -> dict[str, str]:
    """An error's JSON body: ``detail`` for people, ``code`` for programs."""
    return {"detail": detail, "code": code}


def error_response(exc: BaseException) -> ApiResponse:
    """The response for ``exc``; anything not in :data:`ERRORS` is logged and answered 503."""
    for cls in type(exc).__mro__:
        row = ERRORS.get(cls)
        if row is not None:
            status, code, detail, headers = row
            if isinstance(exc, StorageError):
                # The client is told only STORAGE_DOWN; what failed is kept in the log.
                if isinstance(exc, StorageUnavailable):
                    log.warning("storage unavailable, answered %d: %s", status, exc)
                else:
                    log.error("storage failed, answered %d", status, exc_info=exc)
            close = bool(getattr(exc, "closes_connection", False))
            body = error_body(code, detail(exc))
            return respond(status, body, headers(exc), close=close)
    log.error("unexpected error in the web API", exc_info=exc)
    return respond(503, error_body(UNEXPECTED_CODE, UNEXPECTED), (("Retry-After", "1"),))


__all__ = [
    "DEFAULT_PREFIX",
    "ERRORS",
    "ERROR_CODES",
    "ROUTES",
    "route_template",
    "ApiRequest",
    "ApiResponse",
    "Query",
    "BadLastEventId",
    "BadRequestBody",
    "BodyIncomplete",
    "BodyTimeout",
    "EventsNotKept",
    "IdempotencyInProgress",
    "LengthRequired",
    "NotConfigured",
    "RetryCommitted",
    "TooManyStreams",
    "error_response",
    "match",
    "check_path",
    "normalise_prefix",
    "content_type",
    "other_headers",
    "parse_query",
    "path_bytes",
    "wsgi_path_bytes",
]
