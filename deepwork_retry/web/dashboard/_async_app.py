"""The operator dashboard over the web API, with no framework: request data in, HTML out.

This file is the hand-written source; ``deepwork_retry/web/dashboard/_sync_app.py`` is
generated from it by ``scripts/unasync.py``. It renders; the API it is given
decides: its service reads, its authenticator signs operators in, its
authorizer scopes every project, its idempotent retry path retries and its
event streams feed the live updates. An adapter serves it as it serves the API
(``handle``, ``body_timeout``, ``close_streams``).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from typing import Any

from deepwork_retry._core.model import Progress, Project
from deepwork_retry._core.states import TaskStatus
from deepwork_retry.auth import MAX_TOKEN_LENGTH, Principal
from deepwork_retry.exceptions import NotFound, ProjectNotFound
from deepwork_retry.web._async_api import AsyncRetryAPI
from deepwork_retry.web._http import (
    ApiRequest,
    ApiResponse,
    MethodNotAllowed,
    RouteNotFound,
    error_response,
    normalise_prefix,
)
from deepwork_retry.web.dashboard._common import (
    LOGIN_COOKIE,
    LOGIN_MAX_AGE,
    SESSION_COOKIE,
    CsrfRefused,
    Form,
    NoSession,
    PageNotFound,
    Session,
    Signer,
    cookie_header,
    cookies,
    environment,
    html_response,
    is_htmx,
    load_static,
    parse_form,
    redirect,
    same_origin,
)

log = logging.getLogger("deepwork_retry.web.dashboard")

_ROUTES: Mapping[str, frozenset[str]] = {
    "/login": frozenset({"GET", "POST"}),
    "/logout": frozenset({"POST"}),
    "/": frozenset({"GET"}),
    "/blocked": frozenset({"GET"}),
    "/project": frozenset({"GET"}),
    "/task": frozenset({"GET"}),
    "/retry": frozenset({"POST"}),
    "/bulk/preview": frozenset({"POST"}),
    "/bulk/apply": frozenset({"POST"}),
    "/events": frozenset({"GET"}),
}
"""Every page below the prefix and the methods it takes (HEAD goes with GET)."""

FLASHES: Mapping[str, str] = {
    "retried": "Retried: a new attempt was dispatched.",
    "replayed": "This retry was already submitted; nothing was done twice.",
    "task_not_blocked": "Not retried: the task is not blocked.",
    "project_not_runnable": "Not retried: the project does not accept retries now.",
    "task_busy": "Not retried: the task is busy; try again shortly.",
    "storage_unavailable": "Not retried: the storage is unavailable; try again shortly.",
    "idempotency_in_progress": "This retry is still being processed; reload in a moment.",
    "retry_committed": "Retried, but its result could not be shown; the page shows the task now.",
}
"""The flash messages a retry can end with, by code (a redirect carries only the code)."""


def _flash_code(response: ApiResponse) -> str:
    if response.status == 200:
        replayed = any(name.lower() == "idempotent-replayed" for name, _ in response.headers)
        return "replayed" if replayed else "retried"
    try:
        code = str(response.json()["code"])
    except (ValueError, KeyError, TypeError):
        code = "unknown"
    return code if code in FLASHES else "refused"


def _detail(response: ApiResponse) -> str:
    try:
        return str(response.json()["detail"])
    except (ValueError, KeyError, TypeError):
        return "Refused"


def _statuses(progress: Progress) -> list[tuple[str, int]]:
    return [(status.value, progress.count(status)) for status in TaskStatus]


class AsyncDashboard:
    """The dashboard's pages for ``api``, below ``prefix``.

    ``secret`` signs the session cookies and CSRF tokens: at least 32 bytes of
    key material, the same in every process serving the dashboard. ``secure``:
    ``None`` marks the cookie ``Secure`` when the request came over HTTPS.
    """

    def __init__(
        self,
        api: AsyncRetryAPI,
        *,
        secret: str | bytes,
        prefix: str = "/deep-work",
        session_max_age: float = 8 * 3600,
        secure: bool | None = None,
    ) -> None:
        if not session_max_age > 0:
            raise ValueError("session_max_age must be a positive number of seconds")
        self.api = api
        self.signer = Signer(secret)
        self.prefix = normalise_prefix(prefix)
        self.cookie_path = self.prefix or "/"
        self.session_max_age = session_max_age
        self.secure = secure
        self.env = environment(self.prefix)
        self.static = load_static()

    @property
    def body_timeout(self) -> float:
        return self.api.body_timeout

    def close_streams(self) -> None:
        """End the open live-update streams (the API's): for a server shutting down."""
        self.api.close_streams()

    # -- dispatch -----------------------------------------------------------------------
    async def handle(self, request: ApiRequest) -> ApiResponse:
        """The response to ``request`` (its path below the prefix); never raises."""
        try:
            return await self._answer(request)
        except Exception as exc:  # noqa: BLE001 - every error becomes a page
            return self._error(request, exc)

    async def _answer(self, request: ApiRequest) -> ApiResponse:
        path = request.path or "/"
        if path.startswith("/static/"):
            if request.method not in ("GET", "HEAD"):
                raise MethodNotAllowed(["GET", "HEAD"])
            found = self.static.get(path)
            if found is None:
                raise PageNotFound
            return found
        methods = _ROUTES.get(path)
        if methods is None:
            raise PageNotFound
        method = "GET" if request.method == "HEAD" else request.method
        if method not in methods:
            raise MethodNotAllowed(methods | ({"HEAD"} if "GET" in methods else set()))
        if path == "/login":
            return await (self._login_form(request) if method == "GET" else self._login(request))
        if method == "POST" and not same_origin(request):
            raise CsrfRefused
        session = self._session(request)
        if path == "/logout":
            return self._logout(request, session)
        if session is None:
            raise NoSession
        principal = session.principal
        if method == "POST":
            form = parse_form(request.body)
            if not self.signer.csrf_ok(session.nonce, form.get("csrf")):
                raise CsrfRefused
            if path == "/retry":
                return await self._retry(request, session, form)
            if path == "/bulk/preview":
                return await self._bulk_preview(request, session, form)
            return await self._bulk_apply(request, session, form)
        if path == "/events":
            return await self._events(request, principal)
        if path == "/task":
            return await self._task_page(request, session)
        if path == "/project":
            return await self._project_page(request, session)
        if path == "/blocked":
            return await self._blocked_page(request, session)
        return await self._projects_page(request, session)

    def _session(self, request: ApiRequest) -> Session | None:
        return self.signer.session(cookies(request.headers).get(SESSION_COOKIE))

    def _secure(self, request: ApiRequest) -> bool:
        return self.secure if self.secure is not None else request.scheme == "https"

    def _render(self, name: str, **context: Any) -> str:
        return self.env.get_template(name).render(**context)

    def _page(
        self,
        request: ApiRequest,
        session: Session,
        name: str,
        *,
        status: int = 200,
        **context: Any,
    ) -> ApiResponse:
        body = self._render(
            name,
            csrf=self.signer.csrf(session.nonce),
            principal=session.principal,
            **context,
        )
        return html_response(status, body)

    def _error(self, request: ApiRequest, exc: Exception) -> ApiResponse:
        wants_html = not (is_htmx(request) or request.path == "/events")
        if isinstance(exc, NoSession):
            if wants_html and request.method in ("GET", "HEAD"):
                return redirect(self.prefix + "/login")
            return self._error_page(401, "Sign in required", str(exc), full=wants_html)
        if isinstance(exc, CsrfRefused):
            return self._error_page(403, "Forbidden", str(exc), full=wants_html)
        if isinstance(exc, (PageNotFound, RouteNotFound)):
            return self._error_page(404, "Not found", "There is no such page.", full=wants_html)
        api = error_response(exc)
        detail = _detail(api)
        extra = [(k, v) for k, v in api.headers if k.lower() in ("allow", "retry-after")]
        title = {404: "Not found", 405: "Method not allowed", 422: "Invalid request"}.get(
            api.status, "Error" if api.status < 500 else "Service unavailable"
        )
        return self._error_page(api.status, title, detail, extra, full=wants_html)

    def _error_page(
        self,
        status: int,
        title: str,
        detail: str,
        headers: list[tuple[str, str]] | None = None,
        *,
        full: bool = True,
    ) -> ApiResponse:
        try:
            body = self._render("error.html", title=title, detail=detail, full=full)
        except Exception:
            log.exception("the dashboard's error page failed to render")
            body = "Error"
        return html_response(status, body, headers or ())

    # -- login and logout ------------------------------------------------------------
    def _login_nonce(self, request: ApiRequest) -> tuple[str, list[tuple[str, str]]]:
        nonce = cookies(request.headers).get(LOGIN_COOKIE, "")
        if 16 <= len(nonce) <= 64 and all(c.isalnum() or c in "-_" for c in nonce):
            return nonce, []
        nonce = secrets.token_urlsafe(18)
        header = cookie_header(
            LOGIN_COOKIE,
            nonce,
            path=self.cookie_path,
            max_age=LOGIN_MAX_AGE,
            secure=self._secure(request),
        )
        return nonce, [header]

    async def _login_form(
        self, request: ApiRequest, *, status: int = 200, error: str | None = None
    ) -> ApiResponse:
        nonce, headers = self._login_nonce(request)
        body = self._render("login.html", csrf=self.signer.csrf("login:" + nonce), error=error)
        return html_response(status, body, headers)

    async def _login(self, request: ApiRequest) -> ApiResponse:
        if not same_origin(request):
            raise CsrfRefused
        form = parse_form(request.body)
        nonce = cookies(request.headers).get(LOGIN_COOKIE)
        if nonce is None or not self.signer.csrf_ok("login:" + nonce, form.get("csrf")):
            raise CsrfRefused
        token = (form.get("token") or "").strip()
        principal: Principal | None = None
        if token and len(token) <= MAX_TOKEN_LENGTH:
            principal = self.api.authenticator.authenticate(token)
        if principal is None:
            return await self._login_form(request, status=401, error="That token was not accepted.")
        secure = self._secure(request)
        cookie = self.signer.session_cookie(principal, self.session_max_age)
        return redirect(
            self.prefix + "/",
            [
                cookie_header(
                    SESSION_COOKIE,
                    cookie,
                    path=self.cookie_path,
                    max_age=int(self.session_max_age),
                    secure=secure,
                ),
                cookie_header(LOGIN_COOKIE, "", path=self.cookie_path, max_age=0, secure=secure),
            ],
        )

    def _logout(self, request: ApiRequest, session: Session | None) -> ApiResponse:
        if session is not None:
            form = parse_form(request.body)
            if not self.signer.csrf_ok(session.nonce, form.get("csrf")):
                raise CsrfRefused
        clear = cookie_header(
            SESSION_COOKIE, "", path=self.cookie_path, max_age=0, secure=self._secure(request)
        )
        return redirect(self.prefix + "/login", [clear])

    # -- scope ----------------------------------------------------------------------------
    def _may(self, principal: Principal, project_id: str) -> bool:
        return bool(self.api.authorizer(principal, project_id))

    def _check_project(self, principal: Principal, project_id: str) -> None:
        if not self._may(principal, project_id):
            raise ProjectNotFound(project_id[:255])

    async def _summaries(self, principal: Principal) -> list[tuple[Project, Progress]]:
        service = self.api.service
        lister = getattr(service, "projects", None)
        found: list[tuple[Project, Progress]] = []
        if lister is not None:
            after: str | None = None
            while True:
                page, after = await lister(scope=principal.projects, after=after, limit=100)
                found += [(s.project, s.progress) for s in page]
                if after is None or len(found) >= 1000:
                    break
        elif principal.projects is not None:
            for project_id in sorted(principal.projects):
                try:
                    project = await service.get_project(project_id)
                    progress = await service.progress(project_id)
                except NotFound:
                    continue
                found.append((project, progress))
        return [(p, g) for p, g in found if self._may(principal, p.id)]

    # -- pages ------------------------------------------------------------------------------
    async def _projects_page(self, request: ApiRequest, session: Session) -> ApiResponse:
        summaries = await self._summaries(session.principal)
        rows = [
            {"project": project, "progress": progress, "statuses": _statuses(progress)}
            for project, progress in summaries
        ]
        if is_htmx(request):
            return html_response(200, self._render("_projects_table.html", rows=rows))
        return self._page(request, session, "projects.html", rows=rows)

    async def _project_page(self, request: ApiRequest, session: Session) -> ApiResponse:
        raise PageNotFound

    async def _blocked_page(self, request: ApiRequest, session: Session) -> ApiResponse:
        raise PageNotFound

    async def _task_page(self, request: ApiRequest, session: Session) -> ApiResponse:
        raise PageNotFound

    async def _retry(self, request: ApiRequest, session: Session, form: Form) -> ApiResponse:
        raise PageNotFound

    async def _bulk_preview(self, request: ApiRequest, session: Session, form: Form) -> ApiResponse:
        raise PageNotFound

    async def _bulk_apply(self, request: ApiRequest, session: Session, form: Form) -> ApiResponse:
        raise PageNotFound

    async def _events(self, request: ApiRequest, principal: Principal) -> ApiResponse:
        raise PageNotFound


__all__ = ["AsyncDashboard"]
