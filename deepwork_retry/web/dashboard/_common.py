"""What the dashboard's async source and its sync twin share: sessions, CSRF,
headers, form parsing and rendering. Nothing here does I/O.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import attrs

from deepwork_retry._core.model import Progress
from deepwork_retry._core.states import TaskStatus
from deepwork_retry.auth import Principal
from deepwork_retry.exceptions import DeepworkError, missing_extra
from deepwork_retry.web._http import (
    MAX_BODY_BYTES,
    ApiRequest,
    ApiResponse,
    BadRequestBody,
    BodyTooLarge,
    is_text,
    normalise_prefix,
)

try:
    import jinja2
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise missing_extra("dashboard", "deepwork_retry.web.dashboard", exc) from exc

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

SESSION_COOKIE = "deepwork_session"
LOGIN_COOKIE = "deepwork_login"
LOGIN_MAX_AGE = 600
"""Seconds the pre-login nonce (the login form's CSRF) lasts."""
MIN_SECRET_BYTES = 32
MAX_COOKIE = 3800
"""The longest session cookie made: browsers keep cookies of up to 4096 bytes."""
HTML = "text/html; charset=utf-8"
MAX_BULK = 100
"""At most this many tasks in one bulk dry run or apply (the filter's first page)."""
PAGE = 50
"""Rows of a page of blocked tasks."""
MAX_PROJECTS = 1000
"""At most this many projects on the projects page and in the filter's list."""
PROJECT_READS = 10
"""At most this many reads of the storage's projects for one page (of
``MAX_PROJECTS // PROJECT_READS`` each), however many the authorizer hides: a page's
cost stays bounded with many projects (give such principals ``Principal.projects``)."""

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Security-Policy", CSP),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    ("X-Frame-Options", "DENY"),
)
"""On every response of the dashboard. ``same-origin``, not ``no-referrer``: under
``no-referrer`` a browser sends ``Origin: null`` with the pages' own form POSTs (the
Fetch standard's rule), which :func:`same_origin` refuses; ``same-origin`` still sends
no referrer to any other site, and a cross-site POST still carries ``Origin: null``."""
PAGE_HEADERS = (*SECURITY_HEADERS, ("Cache-Control", "no-store"))

STATIC_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
STATIC_FILES = ("htmx.min.js", "dashboard.js", "dashboard.css")


class ShortSecret(DeepworkError, ValueError):
    def __init__(self) -> None:
        super().__init__(
            f"the dashboard's secret must hold at least {MIN_SECRET_BYTES} bytes of key "
            "material (e.g. secrets.token_urlsafe(32))"
        )


class CsrfRefused(DeepworkError):
    """A POST without the right CSRF token, or from another site (403)."""

    def __init__(self) -> None:
        super().__init__("This form has expired or did not come from this site; reload the page")


class NoSession(DeepworkError):
    """No valid session (303 to the login page, or 401 for htmx and streams)."""

    def __init__(self) -> None:
        super().__init__("Please sign in")


class PageNotFound(DeepworkError):
    def __init__(self, what: str = "Page not found") -> None:
        super().__init__(what)


class Answered(DeepworkError):
    """The API answered with an error: the dashboard shows it as a page."""

    def __init__(self, answer: ApiResponse) -> None:
        self.answer = answer
        super().__init__(answer_detail(answer))


FLASHES: Mapping[str, str] = {
    "retried": "Retried: a new attempt was dispatched.",
    "replayed": "This retry was already submitted: nothing was done twice.",
    "task_not_blocked": "Not retried: the task is not blocked.",
    "project_not_runnable": "Not retried: the project does not accept retries now.",
    "task_busy": "Not retried: the task is busy; try again shortly.",
    "storage_unavailable": "Not retried: the storage is unavailable; try again shortly.",
    "idempotency_in_progress": "This retry is still being processed; reload in a moment.",
    "retry_committed": "Retried, but its result could not be shown; the page shows the task now.",
    "refused": "Not retried.",
}
"""What a retry's flash says, by the API's answer code (a redirect carries only the code)."""


def flash_code(answer: ApiResponse) -> str:
    """The :data:`FLASHES` code of the retry route's ``answer``."""
    if answer.status == 200:
        replayed = any(name.lower() == "idempotent-replayed" for name, _ in answer.headers)
        return "replayed" if replayed else "retried"
    try:
        code = str(answer.json()["code"])
    except (ValueError, KeyError, TypeError):
        code = "refused"
    return code if code in FLASHES else "refused"


def answer_detail(answer: ApiResponse) -> str:
    """The ``detail`` of the API's error answer (the error table's words)."""
    try:
        return str(answer.json()["detail"])
    except (ValueError, KeyError, TypeError):
        return "Refused"


def answer_error(answer: ApiResponse) -> Answered:
    return Answered(answer)


def statuses(progress: Progress) -> list[tuple[str, int]]:
    """``(status, count)`` for every task status, in the lifecycle's order."""
    return [(status.value, progress.count(status)) for status in TaskStatus]


def fresh_key() -> str:
    """A form's idempotency key: a new one each time the form is rendered."""
    return secrets.token_urlsafe(24)


def bulk_item(project_id: str, task_id: str) -> str:
    """One task of a bulk apply form, as a field value (any ids, newlines included)."""
    return json.dumps([project_id, task_id], ensure_ascii=True)


FORM_RESERVE = 24 * 1024
"""Bytes of a bulk apply form kept for its other fields: the CSRF token, the key, the
budget and a reason of up to 2000 characters, whatever they are once percent-encoded."""


def items_that_fit(items: list[tuple[str, str]]) -> int:
    """How many of ``items``, from the first, one bulk apply form can carry: a form
    longer than the API's body limit is refused (see :func:`parse_form`), and ids
    that must be percent-encoded (up to nine bytes a character) make long items."""
    room = MAX_BODY_BYTES - FORM_RESERVE
    for count, (project_id, task_id) in enumerate(items):
        room -= len(urlencode([("item", bulk_item(project_id, task_id))])) + 1
        if room < 0:
            return count
    return len(items)


def parse_items(values: list[str]) -> list[tuple[str, str]]:
    """The tasks of a bulk apply form (at most :data:`MAX_BULK`, without repeats)."""
    if len(values) > MAX_BULK:
        raise BadRequestBody(f"At most {MAX_BULK} tasks at once")
    found: dict[tuple[str, str], None] = {}
    for value in values:
        try:
            item = json.loads(value)
        except ValueError:
            raise BadRequestBody("A task of the form is malformed") from None
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not all(isinstance(part, str) and part for part in item)
        ):
            raise BadRequestBody("A task of the form is malformed")
        found[(item[0], item[1])] = None
    return list(found)


def query_values(
    request: ApiRequest, *, required: tuple[str, ...] = (), optional: tuple[str, ...] = ()
) -> dict[str, str]:
    """The page's query parameters: the ones it takes, each once, the required ones given."""
    query = request.query
    repeated = sorted(getattr(query, "repeated", ()))
    if repeated:
        raise BadRequestBody(f"Query parameter given more than once: {repeated[0]!r}"[:300])
    unknown = sorted(set(query) - set(required) - set(optional))
    if unknown:
        raise BadRequestBody(f"Unknown query parameter: {unknown[0]!r}"[:300])
    values = dict(query)
    for name, value in values.items():
        if not is_text(value):
            raise BadRequestBody(f"{name} is not valid UTF-8")
    for name in required:
        if not values.get(name):
            raise BadRequestBody(f"{name} is required")
    return values


def query_string(**params: str) -> str:
    return urlencode(params, quote_via=quote)


RETURN_PAGES = frozenset({"/", "/blocked", "/project", "/task"})
"""The pages a sign-in may lead back to (``next``): pages only, never an action."""


def safe_return(value: str | None) -> str | None:
    """``value`` when it names one of :data:`RETURN_PAGES` below the prefix (with a
    percent-encoded query), else ``None``: what the sign-in form sends back is the
    client's text, and it is only ever appended to the prefix, so no other site
    can be named."""
    if not value or len(value) > 4000:
        return None
    if not all("!" <= ch <= "~" for ch in value) or "\\" in value:
        return None  # visible ASCII only: it becomes a Location header as it is
    path, _, _query = value.partition("?")
    return value if path in RETURN_PAGES else None


def return_path(request: ApiRequest) -> str | None:
    """The page ``request`` asked for, as a sign-in's ``next`` (see :func:`safe_return`)."""
    try:
        query = urlencode(list(request.query.items()), quote_via=quote)
    except UnicodeEncodeError:  # a query that is not UTF-8: the page refuses it anyway
        return None
    if request.path == "/" and not query:
        return None  # where a sign-in leads anyway
    return safe_return(request.path + ("?" + query if query else ""))


def form_page(request: ApiRequest) -> str | None:
    """The page whose form sent ``request`` (a POST), as a sign-in's ``next``: the task
    of a retry, the blocked tasks (with the filter) of a bulk retry, else ``None``."""
    try:
        form = parse_form(request.body)
        if request.path == "/retry":
            project_id, task_id = form.get("project_id"), form.get("task_id")
            if not project_id or not task_id:
                return None
            return safe_return("/task?" + query_string(project_id=project_id, task_id=task_id))
        if request.path in ("/bulk/preview", "/bulk/apply"):
            filters = {k: v for k in ("project_id", "error_type") if (v := form.get(k))}
            return safe_return("/blocked" + ("?" + query_string(**filters) if filters else ""))
    except (DeepworkError, UnicodeEncodeError):  # a form it refuses: no page to lead back to
        pass
    return None


def secret_bytes(secret: str | bytes) -> bytes:
    raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if len(raw) < MIN_SECRET_BYTES:
        raise ShortSecret
    return raw


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@attrs.frozen(kw_only=True)
class Session:
    """A signed-in operator: who, in which projects, until when."""

    principal_id: str
    projects: frozenset[str] | None
    issued: int
    expires: int
    nonce: str

    @property
    def principal(self) -> Principal:
        return Principal(id=self.principal_id, projects=self.projects)


class Signer:
    """Signs and checks sessions and CSRF tokens with keys derived from one secret."""

    def __init__(self, secret: str | bytes) -> None:
        raw = secret_bytes(secret)
        self._session_key = hmac.new(raw, b"deepwork-dashboard-session", hashlib.sha256).digest()
        self._csrf_key = hmac.new(raw, b"deepwork-dashboard-csrf", hashlib.sha256).digest()

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._session_key, payload, hashlib.sha256).digest()

    def session_cookie(self, principal: Principal, max_age: float, now: float | None = None) -> str:
        issued = int(time.time() if now is None else now)
        payload = {
            "p": principal.id,
            "s": None if principal.projects is None else sorted(principal.projects),
            "i": issued,
            "e": issued + int(max_age),
            "n": secrets.token_urlsafe(18),
        }
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=True).encode("ascii")
        return _b64(body) + "." + _b64(self._mac(body))

    def session(
        self, cookie: str | None, now: float | None = None, *, max_age: float | None = None
    ) -> Session | None:
        """The session ``cookie`` holds, or ``None`` when it is missing, altered or expired.

        ``max_age``: the longest a session may last now. A cookie carries the expiry
        it was given when signed, so a server whose ``session_max_age`` was since
        shortened ends the sessions older than that too (the session's ``expires``
        is the earlier of the two).
        """
        if not cookie or cookie.count(".") != 1 or len(cookie) > 16384:
            return None
        body_text, mac_text = cookie.split(".")
        try:
            body = _unb64(body_text)
            mac = _unb64(mac_text)
        except (ValueError, TypeError):
            return None
        if not hmac.compare_digest(mac, self._mac(body)):
            return None
        try:
            data = json.loads(body)
            session = Session(
                principal_id=str(data["p"]),
                projects=None if data["s"] is None else frozenset(str(p) for p in data["s"]),
                issued=int(data["i"]),
                expires=int(data["e"]),
                nonce=str(data["n"]),
            )
        except (ValueError, KeyError, TypeError):
            return None
        if max_age is not None and session.issued + int(max_age) < session.expires:
            session = attrs.evolve(session, expires=session.issued + int(max_age))
        if (time.time() if now is None else now) >= session.expires:
            return None
        return session

    def csrf(self, nonce: str) -> str:
        return hmac.new(self._csrf_key, b"csrf" + nonce.encode("utf-8"), hashlib.sha256).hexdigest()

    def csrf_ok(self, nonce: str | None, given: str | None) -> bool:
        if not nonce or not given:
            return False
        return hmac.compare_digest(self.csrf(nonce).encode(), given.encode("utf-8", "replace"))

    def derived_key(self, form_key: str, project_id: str, task_id: str) -> str:
        """The idempotency key of one task of a bulk apply: the same form, the same key."""
        raw = json.dumps([form_key, project_id, task_id], ensure_ascii=True).encode("ascii")
        return "bulk-" + hmac.new(self._csrf_key, raw, hashlib.sha256).hexdigest()[:48]


# -- requests -------------------------------------------------------------------------------


def cookies(headers: Mapping[str, str]) -> dict[str, str]:
    """The request's cookies (the first of each name)."""
    found: dict[str, str] = {}
    for part in headers.get("cookie", "").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name and name not in found:
            found[name] = value.strip().strip('"')
    return found


class Form:
    """A URL-encoded form body: the first value of each field, and all of repeated ones."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self.pairs = list(pairs)

    def get(self, name: str) -> str | None:
        for key, value in self.pairs:
            if key == name:
                return value
        return None

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.pairs if key == name]

    def required(self, name: str) -> str:
        value = self.get(name)
        if not value:
            raise BadRequestBody(f"{name} is required")
        return value


def parse_form(body: bytes) -> Form:
    """The form ``body`` holds. One longer than the API's body limit is refused whole
    (413): every adapter reads a body only up to one byte past that limit, so what
    it hands over is then the start of the form, not the form."""
    if len(body) > MAX_BODY_BYTES:
        raise BodyTooLarge
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequestBody("Form body is not URL-encoded") from None
    try:
        pairs = parse_qsl(text, keep_blank_values=True, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise BadRequestBody("Form body is not valid UTF-8") from None
    return Form(pairs)


def is_htmx(request: ApiRequest) -> bool:
    return request.headers.get("hx-request", "").lower() == "true"


def same_origin(request: ApiRequest) -> bool:
    """False when the request says it came from another site.

    ``Sec-Fetch-Site``, when the browser sends it, must be ``same-origin`` (or
    ``none``: typed by the user). ``Origin``, when present, must name this
    host and port, with ``https`` when the request came over HTTPS (a request
    that reached the server as plain HTTP may have come through a proxy that
    ended TLS, so either scheme is taken then); ``Origin: null`` is refused.
    The CSRF token is checked in every case.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None and site.strip().lower() not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host")
    if not host:
        return False
    scheme, sep, netloc = origin.strip().lower().partition("://")
    if not sep or netloc != host.strip().lower():
        return False
    if request.scheme == "https":
        return scheme == "https"
    return scheme in ("http", "https")


# -- responses ------------------------------------------------------------------------------


def cookie_header(
    name: str, value: str, *, path: str, max_age: int, secure: bool
) -> tuple[str, str]:
    parts = [f"{name}={value}", f"Path={path}", f"Max-Age={max_age}", "HttpOnly", "SameSite=Strict"]
    if secure:
        parts.append("Secure")
    return ("Set-Cookie", "; ".join(parts))


def html_response(status: int, body: str, headers: Iterable[tuple[str, str]] = ()) -> ApiResponse:
    return ApiResponse(
        status=status,
        body=body.encode("utf-8"),
        headers=(("Content-Type", HTML), *PAGE_HEADERS, *headers),
    )


def redirect(location: str, headers: Iterable[tuple[str, str]] = ()) -> ApiResponse:
    return ApiResponse(
        status=303,
        body=b"",
        headers=(("Content-Type", HTML), ("Location", location), *PAGE_HEADERS, *headers),
    )


ERROR_TITLES: Mapping[int, str] = {
    401: "Sign in required",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request too large",
    422: "Invalid request",
    501: "Not available here",
    503: "Service unavailable",
}


def not_modified(request: ApiRequest, found: ApiResponse) -> ApiResponse:
    """``found`` (a static file), or a 304 when the client already holds it."""
    etag = next((v for k, v in found.headers if k == "ETag"), None)
    given = request.headers.get("if-none-match")
    if etag is None or given is None:
        return found
    if etag not in [tag.strip() for tag in given.split(",")] and given.strip() != "*":
        return found
    return ApiResponse(
        status=304, body=b"", headers=tuple((k, v) for k, v in found.headers if k != "Content-Type")
    )


def load_static() -> dict[str, ApiResponse]:
    found: dict[str, ApiResponse] = {}
    for name in STATIC_FILES:
        data = (STATIC / name).read_bytes()
        found["/static/" + name] = ApiResponse(
            status=200,
            body=data,
            headers=(
                ("Content-Type", STATIC_TYPES[Path(name).suffix]),
                *SECURITY_HEADERS,
                ("Cache-Control", "public, max-age=3600"),
                ("ETag", '"' + hashlib.sha256(data).hexdigest()[:32] + '"'),
            ),
        )
    return found


# -- rendering --------------------------------------------------------------------------------


def environment(prefix: str) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    base = normalise_prefix(prefix)

    def url(path: str, **params: Any) -> str:
        query = {k: v for k, v in params.items() if v is not None and v != ""}
        text = base + path
        if query:
            text += "?" + urlencode(query, quote_via=quote)
        return text

    env.globals["url"] = url
    env.globals["P"] = base
    env.filters["error_parts"] = error_parts
    return env


def error_parts(message: str | None) -> tuple[str, str | None]:
    """An error message's text, and the traceback it holds when it holds one."""
    if not message:
        return "", None
    at = message.find("Traceback (most recent call last)")
    if at < 0:
        return message, None
    return message[:at].rstrip(), message[at:]


def budget_value(value: str | None) -> str:
    if value in (None, "", "one_more"):
        return "one_more"
    if value == "full":
        return "full"
    raise BadRequestBody("budget must be 'one_more' or 'full'")


__all__ = [
    "CSP",
    "LOGIN_COOKIE",
    "SESSION_COOKIE",
    "CsrfRefused",
    "Form",
    "NoSession",
    "PageNotFound",
    "Session",
    "Signer",
    "ShortSecret",
]
