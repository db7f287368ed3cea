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
import time
from collections.abc import Mapping
from typing import Any

import attrs

from deepwork_retry._core.inputs import blocked_cursor, parse_blocked_cursor
from deepwork_retry._core.machine import RetryCheck, can_retry
from deepwork_retry._core.model import Project, ProjectSummary, Task
from deepwork_retry._core.states import RetryBudget
from deepwork_retry.auth import MAX_TOKEN_LENGTH, Principal
from deepwork_retry.exceptions import ProjectNotFound
from deepwork_retry.web._async_api import AsyncRetryAPI
from deepwork_retry.web._async_api import _visible_page as visible_page
from deepwork_retry.web._http import (
    ApiRequest,
    ApiResponse,
    BadRequestBody,
    MethodNotAllowed,
    RouteNotFound,
    check_reason,
    error_response,
    normalise_prefix,
)
from deepwork_retry.web.dashboard._common import (
    ERROR_TITLES,
    FLASHES,
    LOGIN_COOKIE,
    LOGIN_MAX_AGE,
    MAX_BULK,
    MAX_COOKIE,
    MAX_PROJECTS,
    PAGE,
    PROJECT_READS,
    SECURITY_HEADERS,
    SESSION_COOKIE,
    Answered,
    CsrfRefused,
    Form,
    NoSession,
    PageNotFound,
    Session,
    Signer,
    answer_detail,
    answer_error,
    budget_value,
    bulk_item,
    cookie_header,
    cookies,
    environment,
    flash_code,
    form_page,
    fresh_key,
    html_response,
    is_htmx,
    items_that_fit,
    load_static,
    not_modified,
    parse_form,
    parse_items,
    query_string,
    query_values,
    redirect,
    return_path,
    safe_return,
    same_origin,
    statuses,
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
            return not_modified(request, found)
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
            return await self._events(request, session)
        if path == "/task":
            return await self._task_page(request, session)
        if path == "/project":
            return await self._project_page(request, session)
        if path == "/blocked":
            return await self._blocked_page(request, session)
        return await self._projects_page(request, session)

    def _session(self, request: ApiRequest) -> Session | None:
        cookie = cookies(request.headers).get(SESSION_COOKIE)
        return self.signer.session(cookie, max_age=self.session_max_age)

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
            if request.method not in ("GET", "HEAD"):
                # A form sent after the session ended (it expired, or the server
                # restarted with another secret): the login page says nothing was
                # done, and leads back to the form's page. htmx follows HX-Redirect
                # whatever the status.
                back = form_page(request)
                params = {"ended": "1"} if back is None else {"next": back, "ended": "1"}
                login = self.prefix + "/login?" + query_string(**params)
                if wants_html:
                    return redirect(login)
                return self._error_page(
                    401, "Sign in required", str(exc), [("HX-Redirect", login)], full=False
                )
            if wants_html:
                back = return_path(request)
                query = "" if back is None else "?" + query_string(next=back)
                return redirect(self.prefix + "/login" + query)
            return self._error_page(401, "Sign in required", str(exc), full=wants_html)
        if isinstance(exc, CsrfRefused):
            return self._error_page(403, "Forbidden", str(exc), full=wants_html)
        if isinstance(exc, (PageNotFound, RouteNotFound)):
            return self._error_page(404, "Not found", "There is no such page.", full=wants_html)
        api = exc.answer if isinstance(exc, Answered) else error_response(exc)
        detail = answer_detail(api)
        extra = [(k, v) for k, v in api.headers if k.lower() in ("allow", "retry-after")]
        title = ERROR_TITLES.get(api.status, "Error" if api.status < 500 else "Unavailable")
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
        back = request.query.get("next") if request.method != "POST" else None
        if request.method == "POST":
            back = parse_form(request.body).get("next")
        ended = request.method != "POST" and request.query.get("ended") == "1"
        body = self._render(
            "login.html",
            csrf=self.signer.csrf("login:" + nonce),
            error=error,
            ended=ended,
            next=safe_return(back),
        )
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
        if len(cookie) > MAX_COOKIE:
            return await self._login_form(
                request,
                status=422,
                error="This token's principal lists too many projects to keep in a session.",
            )
        return redirect(
            self.prefix + (safe_return(form.get("next")) or "/"),
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

    async def _summaries(self, principal: Principal) -> tuple[list[ProjectSummary], bool]:
        """The projects ``principal`` may see (at most :data:`MAX_PROJECTS`), each with
        its progress: the storage is given its scope, then the authorizer decides.

        At most :data:`PROJECT_READS` pages of the storage are read, however few of
        their rows the authorizer keeps; the flag says whether the list is whole.
        """
        found: list[ProjectSummary] = []
        after: str | None = None
        for _ in range(PROJECT_READS):
            page, after = await self.api.service.projects(
                scope=principal.projects, after=after, limit=MAX_PROJECTS // PROJECT_READS
            )
            found += [s for s in page if self._may(principal, s.project.id)]
            if after is None or len(found) >= MAX_PROJECTS:
                break
        return found[:MAX_PROJECTS], after is None and len(found) <= MAX_PROJECTS

    async def _blocked_tasks(
        self,
        principal: Principal,
        *,
        project_id: str | None,
        error_type: str | None,
        after: tuple[str, str] | None = None,
        limit: int,
    ) -> tuple[list[Task], tuple[str, str] | None]:
        """A page of the blocked tasks ``principal`` may see, as the API's ``GET /blocked``
        reads it: a project the authorizer refuses gives an empty page, and the
        cursor never names a task it hid. A full page has a next cursor even when
        it is the last, so the page looks once past it: no "Next page" leads to an
        empty list."""
        if project_id is not None and not self._may(principal, project_id):
            return [], None

        async def read(
            at: tuple[str, str] | None, count: int = limit
        ) -> tuple[list[Task], tuple[str, str] | None]:
            return await self.api.service.blocked_across(
                scope=principal.projects,
                project_id=project_id,
                error_type=error_type,
                after=at,
                limit=count,
            )

        tasks, next_after = await visible_page(
            read,
            after,
            limit,
            lambda t: self._may(principal, t.project_id),
            lambda t: (t.project_id, t.id),
        )
        if next_after is not None:
            more, _ = await read(next_after, 1)
            next_after = next_after if more else None
        return tasks, next_after

    # -- pages ------------------------------------------------------------------------------
    async def _projects_page(self, request: ApiRequest, session: Session) -> ApiResponse:
        query_values(request)
        summaries, whole = await self._summaries(session.principal)
        rows = [
            {"project": s.project, "progress": s.progress, "statuses": statuses(s.progress)}
            for s in summaries
        ]
        if is_htmx(request):
            return html_response(200, self._render("_projects_table.html", rows=rows, whole=whole))
        return self._page(request, session, "projects.html", rows=rows, whole=whole)

    async def _project_page(self, request: ApiRequest, session: Session) -> ApiResponse:
        values = query_values(request, required=("project_id",))
        project_id = values["project_id"]
        principal = session.principal
        self._check_project(principal, project_id)
        service = self.api.service
        project = await service.get_project(project_id)
        progress = await service.progress(project_id)
        blocked, next_after = await service.blocked(project_id, limit=PAGE)
        if next_after is not None:
            # A full page has a next cursor even when it is the last: look once.
            more, _ = await service.blocked(project_id, after=next_after, limit=1)
            next_after = next_after if more else None
        context: dict[str, Any] = {
            "project": project,
            "progress": progress,
            "statuses": statuses(progress),
            "blocked": blocked,
            "more": next_after is not None,
        }
        if is_htmx(request):
            return html_response(200, self._render("_project_panel.html", **context))
        return self._page(request, session, "project.html", **context)

    async def _blocked_page(self, request: ApiRequest, session: Session) -> ApiResponse:
        values = query_values(request, optional=("project_id", "error_type", "after"))
        principal = session.principal
        project_id = values.get("project_id") or None
        error_type = values.get("error_type") or None
        after_text = values.get("after") or None
        after = None if after_text is None else parse_blocked_cursor(after_text)
        tasks, next_after = await self._blocked_tasks(
            principal, project_id=project_id, error_type=error_type, after=after, limit=PAGE
        )
        projects = [s.project for s in (await self._summaries(principal))[0]]
        return self._page(
            request,
            session,
            "blocked.html",
            tasks=tasks,
            projects=projects,
            project_id=project_id or "",
            error_type=error_type or "",
            next_after=None if next_after is None else blocked_cursor(*next_after),
        )

    async def _task_context(
        self, principal: Principal, project_id: str, task_id: str
    ) -> dict[str, Any]:
        self._check_project(principal, project_id)
        service = self.api.service
        project = await service.get_project(project_id)
        task = await service.get_task(project_id, task_id)
        attempts = await service.attempts(project_id, task_id)
        return {
            "project": project,
            "task": task,
            "attempts": list(reversed(attempts)),
            "check": can_retry(task, project),
        }

    async def _task_page(self, request: ApiRequest, session: Session) -> ApiResponse:
        values = query_values(
            request, required=("project_id", "task_id"), optional=("flash", "part")
        )
        part = values.get("part") or "panel"
        if part not in ("panel", "attempts"):
            raise BadRequestBody("part must be 'panel' or 'attempts'")
        context = await self._task_context(
            session.principal, values["project_id"], values["task_id"]
        )
        if is_htmx(request):
            name = "_task_attempts.html" if part == "attempts" else "_task_panel.html"
            return html_response(200, self._render(name, **context))
        flash = values.get("flash")
        return self._page(
            request,
            session,
            "task.html",
            flash=FLASHES.get(flash or "", "Not retried." if flash else ""),
            retry_key=fresh_key(),
            **context,
        )

    # -- retry ---------------------------------------------------------------------------------
    async def _retry(self, request: ApiRequest, session: Session, form: Form) -> ApiResponse:
        project_id = form.required("project_id")
        task_id = form.required("task_id")
        budget = RetryBudget(budget_value(form.get("budget")))
        reason = form.get("reason") or None
        key = form.get("key") or None
        principal = session.principal
        answer = await self.api.retry_for(
            principal, project_id, task_id, budget=budget, reason=reason, key=key
        )
        if answer.status in (404, 422):
            return self._error(request, answer_error(answer))
        code = flash_code(answer)
        if not is_htmx(request):
            location = (
                self.prefix
                + "/task?"
                + query_string(project_id=project_id, task_id=task_id, flash=code)
            )
            return redirect(location)
        context = await self._task_context(principal, project_id, task_id)
        body = self._render(
            "_retry_answer.html",
            flash=FLASHES.get(code, "Not retried."),
            retry_key=fresh_key(),
            **context,
        )
        return html_response(200, body)

    # -- bulk retry ------------------------------------------------------------------------------
    async def _bulk_preview(self, request: ApiRequest, session: Session, form: Form) -> ApiResponse:
        principal = session.principal
        project_id = form.get("project_id") or None
        error_type = form.get("error_type") or None
        tasks, _ = await self._blocked_tasks(
            principal, project_id=project_id, error_type=error_type, limit=MAX_BULK
        )
        projects: dict[str, Project] = {}
        verdicts: list[tuple[Task, RetryCheck]] = []
        for task in tasks:
            project = projects.get(task.project_id)
            if project is None:
                project = projects[task.project_id] = await self.api.service.get_project(
                    task.project_id
                )
            verdicts.append((task, can_retry(task, project)))
        allowed = [(task, check) for task, check in verdicts if check.allowed]
        fit = items_that_fit([(task.project_id, task.id) for task, _ in allowed])
        context: dict[str, Any] = {
            "verdicts": verdicts,
            "offered": allowed[:fit],
            "project_id": project_id or "",
            "error_type": error_type or "",
            "bulk_key": fresh_key(),
            "item": bulk_item,
        }
        if is_htmx(request):
            csrf = self.signer.csrf(session.nonce)
            return html_response(200, self._render("_bulk_preview.html", csrf=csrf, **context))
        return self._page(request, session, "bulk_preview.html", **context)

    async def _bulk_apply(self, request: ApiRequest, session: Session, form: Form) -> ApiResponse:
        principal = session.principal
        key = form.required("key")
        budget = RetryBudget(budget_value(form.get("budget")))
        reason = check_reason(form.get("reason") or None)
        items = parse_items(form.all("item"))
        outcomes: list[tuple[str, str, bool, str]] = []
        for project_id, task_id in items:
            answer = await self.api.retry_for(
                principal,
                project_id,
                task_id,
                budget=budget,
                reason=reason,
                key=self.signer.derived_key(key, project_id, task_id),
            )
            code = flash_code(answer)
            if answer.status == 200:
                note = "retried" if code == "retried" else "already retried by this form"
                outcomes.append((project_id, task_id, True, note))
            else:
                outcomes.append((project_id, task_id, False, answer_detail(answer)))
        context: dict[str, Any] = {"outcomes": outcomes}
        if is_htmx(request):
            return html_response(200, self._render("_bulk_result.html", **context))
        return self._page(request, session, "bulk_result.html", **context)

    # -- live updates ------------------------------------------------------------------------------
    async def _events(self, request: ApiRequest, session: Session) -> ApiResponse:
        """The API's event stream of the project, for the session's principal, ending
        when the session does (a stream is authenticated only when it opens)."""
        values = query_values(request, required=("project_id",), optional=("after",))
        project_id = values["project_id"]
        below = attrs.evolve(
            request,
            query=[(k, v) for k, v in values.items() if k != "project_id"],
        )
        answer = await self.api.events_for(
            session.principal,
            project_id,
            below,
            lifetime=max(session.expires - time.time(), 0.001),
        )
        if answer.status >= 400:
            return self._error(request, answer_error(answer))
        return attrs.evolve(answer, headers=(*answer.headers, *SECURITY_HEADERS))


__all__ = ["AsyncDashboard"]
