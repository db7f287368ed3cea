"""The operator dashboard: sessions, CSRF, headers, scope, escaping, retries, bulk.

Most tests talk to the framework-free :class:`Dashboard` through ``handle()``
(a tiny cookie-keeping client below); a few go through a real uvicorn server
serving the Starlette adapter's ``mount_dashboard``. The browser tests live
elsewhere.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from web_harness import ALICE, BOB, FAULT, STREAMS, World, authorize, serve_asgi

from deepwork_retry._core.inputs import parse_blocked_cursor
from deepwork_retry.auth import Principal, StaticTokens
from deepwork_retry.web import ApiRequest, ApiResponse, AsyncRetryAPI, RetryAPI
from deepwork_retry.web._http import MAX_BODY_BYTES
from deepwork_retry.web.dashboard import CSP, AsyncDashboard, Dashboard, ShortSecret
from deepwork_retry.web.dashboard._common import MAX_PROJECTS, Signer
from deepwork_retry.web.dashboard._common import PAGE as PAGE_ROWS

SECRET = "s" * 40
P = "/deep-work"
DAVE = "dave-token-0123456789"
"""Limited to the projects listed in its principal (``dave-*``)."""


# -- a client over handle() ---------------------------------------------------------------


class Client:
    """Keeps cookies like a browser would (per name, Max-Age=0 removes) and speaks
    to ``handle()`` with paths below the dashboard's prefix."""

    def __init__(self, dashboard: Any, *, scheme: str = "http") -> None:
        self.dashboard = dashboard
        self.cookies: dict[str, str] = {}
        self.scheme = scheme
        self.responses: list[ApiResponse] = []

    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | list[tuple[str, str]] | None = None,
        form: dict[str, Any] | list[tuple[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> ApiResponse:
        sent = {"host": "dash.test"}
        if self.cookies:
            sent["cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        sent.update(headers or {})
        body = b""
        if form is not None:
            body = urlencode(form, doseq=True).encode("ascii")
            sent["content-type"] = "application/x-www-form-urlencoded"
        response = self.dashboard.handle(
            ApiRequest(
                method=method,
                path=path,
                headers=sent,
                query=list(query.items()) if isinstance(query, dict) else list(query or []),
                body=body,
                scheme=self.scheme,
            )
        )
        self.responses.append(response)
        for value in set_cookies(response):
            name, _, rest = value.partition("=")
            cookie_value = rest.split(";")[0]
            if "Max-Age=0" in value:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = cookie_value
        return response

    def get(self, path: str, **query: str) -> ApiResponse:
        return self.request("GET", path, query=query)

    def post(self, path: str, form: Any, **kwargs: Any) -> ApiResponse:
        return self.request("POST", path, form=form, **kwargs)

    def csrf(self, path: str = "/", **query: str) -> str:
        page = self.get(path, **query)
        assert page.status == 200, page.body
        return csrf_of(page)

    def login(self, token: str) -> ApiResponse:
        csrf = self.csrf("/login")
        response = self.post("/login", {"token": token, "csrf": csrf})
        assert response.status == 303, response.body
        return response


def set_cookies(response: ApiResponse) -> list[str]:
    return [v for k, v in response.headers if k.lower() == "set-cookie"]


def header(response: ApiResponse, name: str) -> str | None:
    for k, v in response.headers:
        if k.lower() == name.lower():
            return v
    return None


def text(response: ApiResponse) -> str:
    return response.body.decode("utf-8")


def csrf_of(response: ApiResponse) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', text(response))
    assert found, text(response)
    return found[1]


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def world() -> World:
    w = World()
    w.tokens.add(DAVE, Principal(id="dave", projects=["dave-1", "dave-2"]))
    return w


def authorized(principal: Principal, project_id: str) -> bool:
    """The harness's rule (alice everywhere, bob in ``bob-*``), and dave's own list."""
    if principal.id == "dave":
        return principal.may_act_in(project_id)
    return authorize(principal, project_id)


def sync_api(world: World) -> RetryAPI:
    return RetryAPI(world.sync_service(), world.tokens, authorized, streams=STREAMS)


def async_api(world: World) -> AsyncRetryAPI:
    return AsyncRetryAPI(world.async_service(), world.tokens, authorized, streams=STREAMS)


class AsyncDriven:
    """An :class:`AsyncDashboard` driven through a sync ``handle`` (one loop per request)."""

    def __init__(self, dashboard: AsyncDashboard) -> None:
        self.inner = dashboard
        self.api = dashboard.api

    def handle(self, request: ApiRequest) -> ApiResponse:
        return asyncio.run(self.inner.handle(request))


@pytest.fixture(params=["sync", "async"])
def dashboard(request: pytest.FixtureRequest, world: World) -> Any:
    """The sync :class:`Dashboard`, then the :class:`AsyncDashboard` (the same source)."""
    if request.param == "sync":
        return Dashboard(sync_api(world), secret=SECRET, prefix=P)
    return AsyncDriven(AsyncDashboard(async_api(world), secret=SECRET, prefix=P))


@pytest.fixture
def client(dashboard: Any) -> Client:
    return Client(dashboard)


@pytest.fixture
def alice(client: Client) -> Client:
    client.login(ALICE)
    return client


def project(world: World, project_id: str) -> str:
    world.executor.create_project(project_id, status="executing")
    return project_id


# -- construction -------------------------------------------------------------------------


def test_a_short_secret_is_refused(world: World) -> None:
    with pytest.raises(ShortSecret, match="32 bytes"):
        Dashboard(world.sync_api(), secret="too short")
    with pytest.raises(ShortSecret):
        AsyncDashboard(world.async_api(), secret=b"x" * 31)


def test_it_serves_like_the_api(world: World) -> None:
    api = world.sync_api()
    dashboard = Dashboard(api, secret=SECRET)
    assert dashboard.body_timeout == api.body_timeout
    dashboard.close_streams()
    assert api.streams_closing


# -- login and sessions --------------------------------------------------------------------


def test_pages_need_a_session(client: Client) -> None:
    for path, back in (
        ("/", ""),
        ("/blocked", "?next=%2Fblocked"),
        ("/project", "?next=%2Fproject"),
    ):
        response = client.get(path)
        assert response.status == 303
        assert header(response, "location") == P + "/login" + back
    assert client.get("/", **{}).status == 303
    htmx = client.request("GET", "/", headers={"hx-request": "true"})
    assert htmx.status == 401
    assert client.get("/events", project_id="x").status == 401


def test_login_with_a_good_token_sets_a_strict_cookie(client: Client) -> None:
    response = client.login(ALICE)
    assert header(response, "location") == P + "/"
    (session,) = [c for c in set_cookies(response) if c.startswith("deepwork_session=")]
    attributes = {part.strip().split("=")[0] for part in session.split(";")[1:]}
    assert {"HttpOnly", "SameSite", "Path", "Max-Age"} <= attributes
    assert "SameSite=Strict" in session
    assert f"Path={P};" in session
    assert "Max-Age=28800" in session
    assert "Secure" not in attributes
    page = client.get("/")
    assert page.status == 200
    assert "alice" in text(page)


def test_the_cookie_is_secure_over_https(dashboard: Any, world: World) -> None:
    client = Client(dashboard, scheme="https")
    response = client.login(ALICE)
    assert all("; Secure" in c for c in set_cookies(response))
    forced = Client(Dashboard(world.sync_api(), secret=SECRET, prefix=P, secure=True))
    assert all("; Secure" in c for c in set_cookies(forced.login(ALICE)))


def test_signing_in_leads_back_to_the_page_asked_for(client: Client) -> None:
    asked = client.get("/task", project_id="p 1/é", task_id="t&x=1")
    location = header(asked, "location")
    assert location is not None
    assert location.startswith(P + "/login?next=")
    form = client.get(location[len(P) :].split("?")[0], **dict(parse_qsl(location.split("?")[1])))
    back = re.search(r'name="next" value="([^"]+)"', text(form))
    assert back is not None
    csrf = csrf_of(form)
    signed_in = client.post(
        "/login", {"token": ALICE, "csrf": csrf, "next": html.unescape(back[1])}
    )
    assert signed_in.status == 303
    target = header(signed_in, "location")
    assert target is not None
    path, _, query = target.partition("?")
    assert path == P + "/task"
    assert dict(parse_qsl(query)) == {"project_id": "p 1/é", "task_id": "t&x=1"}


@pytest.mark.parametrize(
    "next_",
    [
        "//evil.example/",
        "/\\evil.example",
        "https://evil.example/",
        "/login",
        "/retry",
        "/events?project_id=p",
        "/static/dashboard.js",
        "/task?x=\u00e9",
        "/task\r\nSet-Cookie: x=1",
        "",
    ],
)
def test_signing_in_never_leads_elsewhere(client: Client, next_: str) -> None:
    csrf = client.csrf("/login")
    response = client.post("/login", {"token": ALICE, "csrf": csrf, "next": next_})
    assert response.status == 303
    assert header(response, "location") == P + "/"


def test_a_login_page_drops_a_next_it_would_not_follow(client: Client) -> None:
    page = client.get("/login", next="//evil.example/")
    assert page.status == 200
    assert 'name="next"' not in text(page)


def test_login_with_a_bad_token_is_401(client: Client) -> None:
    csrf = client.csrf("/login")
    response = client.post("/login", {"token": "not-a-token-at-all", "csrf": csrf})
    assert response.status == 401
    assert "not accepted" in text(response)
    assert "deepwork_session" not in client.cookies
    assert "not-a-token-at-all" not in text(response)


def test_login_needs_its_csrf(client: Client) -> None:
    client.get("/login")
    assert client.post("/login", {"token": ALICE}).status == 403
    assert client.post("/login", {"token": ALICE, "csrf": "0" * 64}).status == 403
    assert "deepwork_session" not in client.cookies
    other = Client(client.dashboard)  # no login cookie at all
    assert (
        other.post("/login", {"token": ALICE, "csrf": csrf_of(client.get("/login"))}).status == 403
    )


def test_a_tampered_or_expired_cookie_is_refused(alice: Client) -> None:
    good = alice.cookies["deepwork_session"]
    body, mac = good.split(".")
    for bad in (
        body + "." + mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB"),
        body[:-2] + "xx." + mac,
        body,
        "",
        "." + mac,
    ):
        alice.cookies["deepwork_session"] = bad
        assert alice.get("/").status == 303, bad
    signer = Signer(SECRET)
    principal = Principal(id="alice")
    alice.cookies["deepwork_session"] = signer.session_cookie(principal, 10, now=time.time() - 60)
    assert alice.get("/").status == 303
    other = Signer("o" * 40).session_cookie(principal, 3600)
    alice.cookies["deepwork_session"] = other
    assert alice.get("/").status == 303
    alice.cookies["deepwork_session"] = signer.session_cookie(principal, 3600)
    assert alice.get("/").status == 200


def test_a_cookie_header_split_in_crumbs_keeps_the_session(alice: Client) -> None:
    """HTTP/2 lets a client send its cookies as several ``cookie`` header fields (RFC 9113
    8.2.3), which an ASGI server may pass on as they are: they are one list of cookies."""
    crumbs = [("cookie", f"{name}={value}") for name, value in alice.cookies.items()]
    crumbs.insert(0, ("cookie", "other=1"))
    page = alice.dashboard.handle(
        ApiRequest(method="GET", path="/", headers=[("host", "dash.test"), *crumbs])
    )
    assert page.status == 200, page.headers


def test_logout_clears_the_cookie(alice: Client) -> None:
    csrf = alice.csrf()
    response = alice.post("/logout", {"csrf": csrf})
    assert response.status == 303
    assert header(response, "location") == P + "/login"
    assert any(
        c.startswith("deepwork_session=;") and "Max-Age=0" in c for c in set_cookies(response)
    )
    assert alice.get("/").status == 303


def test_every_post_needs_the_csrf_token(alice: Client) -> None:
    for path in ("/logout", "/retry", "/bulk/preview", "/bulk/apply"):
        assert alice.post(path, {}).status == 403, path
        assert alice.post(path, {"csrf": "f" * 64}).status == 403, path
    assert alice.get("/").status == 200  # still signed in


def test_a_post_from_another_origin_is_refused(alice: Client) -> None:
    csrf = alice.csrf()
    for origin in ("http://evil.test", "null", "http://dash.test.evil", "http://dash.test:81", ""):
        response = alice.post("/logout", {"csrf": csrf}, headers={"origin": origin})
        assert response.status == 403, origin
    for site in ("cross-site", "same-site"):
        response = alice.post("/logout", {"csrf": csrf}, headers={"sec-fetch-site": site})
        assert response.status == 403, site
    login = {"csrf": csrf, "token": ALICE}
    assert alice.post("/login", login, headers={"sec-fetch-site": "cross-site"}).status == 403
    assert alice.get("/").status == 200
    own = {"origin": "http://dash.test", "sec-fetch-site": "same-origin"}
    assert alice.post("/retry", {"csrf": "0" * 64}, headers=own).status == 403
    same = alice.post("/logout", {"csrf": csrf}, headers={"origin": "http://dash.test"})
    assert same.status == 303


def test_over_https_the_origin_must_be_https(dashboard: Any) -> None:
    client = Client(dashboard, scheme="https")
    client.login(ALICE)
    csrf = client.csrf()
    downgraded = client.post("/logout", {"csrf": csrf}, headers={"origin": "http://dash.test"})
    assert downgraded.status == 403
    same = client.post("/logout", {"csrf": csrf}, headers={"origin": "https://dash.test"})
    assert same.status == 303


def test_a_post_without_a_session_goes_to_the_login_page(client: Client) -> None:
    for path in ("/retry", "/bulk/preview", "/bulk/apply"):
        response = client.post(path, {"csrf": "x"})
        assert response.status == 303
        expected = {
            "/retry": "",
            "/bulk/preview": "next=%2Fblocked&",
            "/bulk/apply": "next=%2Fblocked&",
        }
        assert header(response, "location") == P + "/login?" + expected[path] + "ended=1"
        htmx = client.post(path, {"csrf": "x"}, headers={"hx-request": "true"})
        assert htmx.status == 401


def test_a_form_sent_after_the_session_ended_says_so_and_leads_back(
    world: World, alice: Client
) -> None:
    """The session ended while the task page was open (it expired, or the server
    restarted with another secret): the retry is not done, and the login page says so
    instead of looking like a first visit, then leads back to the task."""
    pid = project(world, fresh())
    failing(world, pid, "t/1 x", ValueError("v"))
    fields = retry_form(alice.get("/task", project_id=pid, task_id="t/1 x"))
    alice.cookies.pop("deepwork_session")
    response = alice.post("/retry", fields)
    assert response.status == 303
    location = header(response, "location") or ""
    assert location.startswith(P + "/login?")
    query = dict(parse_qsl(location.split("?", 1)[1]))
    assert query["next"] == "/task?" + urlencode(
        {"project_id": pid, "task_id": "t/1 x"}, quote_via=quote
    )
    page = alice.request("GET", "/login", query=list(query.items()))
    assert "Your session has ended, so that was not done" in text(page)
    assert task_of(world, pid, "t/1 x").status.value == "blocked"
    csrf = csrf_of(page)
    signed_in = alice.post("/login", {"token": ALICE, "csrf": csrf, "next": query["next"]})
    assert header(signed_in, "location") == P + query["next"]
    assert "Your session has ended" not in text(alice.get("/login"))
    # The same form through htmx: a 401 that htmx follows to the same login page.
    alice.cookies.pop("deepwork_session")
    htmx = alice.post("/retry", fields, headers={"hx-request": "true"})
    assert htmx.status == 401
    assert header(htmx, "hx-redirect") == location
    assert task_of(world, pid, "t/1 x").status.value == "blocked"


def test_a_storage_outage_is_a_503_page_that_hides_the_fault(world: World, alice: Client) -> None:
    pid = project(world, fresh())
    world.blocked(pid, "t1")
    world.storage.down = True
    try:
        for response in (alice.get("/"), alice.get("/task", project_id=pid, task_id="t1")):
            assert response.status == 503
            assert header(response, "retry-after")
            assert FAULT not in text(response)
            assert "<h1>" in text(response)
    finally:
        world.storage.down = False


# -- headers -----------------------------------------------------------------------------------


def test_security_headers_on_every_response(alice: Client) -> None:
    alice.get("/")
    alice.get("/nope")
    alice.get("/static/htmx.min.js")
    alice.get("/static/dashboard.css")
    alice.get("/static/nope.js")
    alice.request("DELETE", "/")
    alice.post("/retry", {})
    alice.get("/task", project_id="nope", task_id="nope")
    alice.get("/events", project_id="nope")
    alice.request("GET", "/", headers={"hx-request": "true"})
    alice.post("/logout", {"csrf": alice.csrf()})
    alice.get("/")
    alice.post("/login", {"token": "wrong-token-0123", "csrf": alice.csrf("/login")})
    for response in alice.responses:
        assert header(response, "content-security-policy") == CSP
        assert header(response, "x-content-type-options") == "nosniff"
        assert header(response, "referrer-policy") == "same-origin"
        assert header(response, "x-frame-options") == "DENY"


def test_pages_are_not_stored_static_files_are_cached(alice: Client) -> None:
    assert header(alice.get("/"), "cache-control") == "no-store"
    js = alice.get("/static/dashboard.js")
    assert js.status == 200
    assert header(js, "content-type") == "text/javascript; charset=utf-8"
    assert "max-age" in (header(js, "cache-control") or "")
    assert Client(alice.dashboard).get("/static/htmx.min.js").status == 200  # no session needed


def test_unknown_path_is_404_wrong_method_405(alice: Client) -> None:
    assert alice.get("/nope").status == 404
    assert "text/html" in (header(alice.get("/nope"), "content-type") or "")
    response = alice.request("DELETE", "/")
    assert response.status == 405
    assert header(response, "allow") == "GET, HEAD"
    response = alice.request("GET", "/retry")
    assert response.status == 405
    assert header(response, "allow") == "POST"


def test_pages_carry_no_inline_script_or_style(alice: Client) -> None:
    page = text(alice.get("/"))
    assert "<style" not in page
    assert " style=" not in page
    assert re.search(r"<script(?![^>]*\bsrc=)", page) is None
    assert 'id="logout-form"' in page
    assert "<main" in page


def test_the_token_never_appears(world: World, dashboard: Any) -> None:
    pid = project(world, fresh())
    world.blocked(pid, "t1")
    client = Client(dashboard)
    client.post("/login", {"token": ALICE, "csrf": client.csrf("/login")[:-1] + "x"})
    client.login(ALICE)
    client.get("/")
    client.get("/blocked")
    client.get("/project", project_id=pid)
    page = client.get("/task", project_id=pid, task_id="t1")
    client.post("/retry", retry_form(page))
    client.post("/bulk/preview", {"csrf": client.csrf()})
    client.post("/logout", {"csrf": client.csrf()})
    client.login(ALICE)
    for response in client.responses:
        assert ALICE not in response.body.decode("utf-8", "replace")
        for name, value in response.headers:
            assert ALICE not in value, name


# -- through a real server ----------------------------------------------------------------


@pytest.fixture
def served(world: World) -> Iterator[str]:
    from starlette.applications import Starlette

    from deepwork_retry.web.starlette import mount, mount_dashboard

    app = Starlette()
    api = async_api(world)
    mount(app, api)
    mount_dashboard(app, api, secret=SECRET, prefix=P)
    url, stop = serve_asgi(app)
    try:
        yield url
    finally:
        api.close_streams()
        stop()


def server_login(http: httpx.Client, token: str) -> httpx.Response:
    page = http.get(P + "/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf
    return http.post(P + "/login", data={"token": token, "csrf": csrf[1]})


def test_starlette_serves_the_dashboard(served: str) -> None:
    with httpx.Client(base_url=served, timeout=10) as http:
        first = http.get(P + "/")
        assert first.status_code == 303
        assert first.headers["location"] == P + "/login"
        response = server_login(http, ALICE)
        assert response.status_code == 303
        assert "HttpOnly" in response.headers["set-cookie"]
        page = http.get(P + "/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["content-security-policy"] == CSP
        assert int(page.headers["content-length"]) == len(page.content)
        assert 'id="logout-form"' in page.text
        js = http.get(P + "/static/htmx.min.js")
        assert js.status_code == 200
        assert js.headers["content-type"].startswith("text/javascript")
        # The JSON API beside it still answers in JSON.
        api = http.get("/api/deep-work/projects/x/progress")
        assert api.status_code == 401
        assert api.headers["content-type"] == "application/json"


# -- pages, scope and retries --------------------------------------------------------------


def failing(world: World, project_id: str, task_id: str, error: BaseException) -> str:
    """A task blocked after one failed attempt with ``error`` (no retries left)."""
    ex = world.executor
    ex.add_task(project_id, task_id, title=f"Task {task_id}", max_retries=0)
    ex.assign(project_id, task_id)
    ex.start(project_id, task_id, 1)
    ex.fail(project_id, task_id, 1, error)
    assert task_of(world, project_id, task_id).status.value == "blocked"
    return task_id


def task_of(world: World, project_id: str, task_id: str) -> Any:
    return world.memory.load(project_id, task_id)[1]


def fresh(prefix: str = "p-") -> str:
    return prefix + uuid.uuid4().hex[:10]


def retry_form(page: ApiResponse) -> dict[str, str]:
    """The hidden fields of the page's retry form (csrf, ids, key)."""
    form = re.search(r'<form id="retry-form".*?</form>', text(page), re.S)
    assert form, text(page)
    fields = dict(
        (html.unescape(n), html.unescape(v))
        for n, v in re.findall(r'<input type="hidden"[^>]*?name="([^"]+)" value="([^"]*)"', form[0])
    )
    assert {"csrf", "project_id", "task_id", "key"} <= set(fields), fields
    return fields


def test_projects_page_lists_the_principals_projects(world: World, client: Client) -> None:
    mine = project(world, "dave-1")
    world.blocked(mine, "t1")
    other = project(world, fresh())
    client.login(DAVE)
    page = text(client.get("/"))
    assert 'data-project-id="dave-1"' in page
    assert f'data-project-id="{other}"' not in page
    assert "<progress" in page
    assert 'aria-label="Progress of project dave-1"' in page
    assert "% complete" in page


def test_task_page_shows_the_task(world: World, alice: Client) -> None:
    pid = project(world, fresh())
    world.blocked(pid, "t1")
    page = alice.get("/task", project_id=pid, task_id="t1")
    assert page.status == 200
    body = text(page)
    assert re.search(r'id="task-status">.*blocked', body)
    assert re.search(r'id="retry-count">1 of 1<', body)
    assert "second failure" in body
    assert body.count('class="attempt"') == 2
    assert '<time datetime="' in body
    assert "This task can be retried" in body
    assert f'data-events="{P}/events?project_id={pid}"' in body
    for control in (
        'id="budget"',
        'id="reason"',
        'id="retry-button"',
        'for="budget"',
        'for="reason"',
    ):
        assert control in body


def test_a_traceback_is_shown_apart(world: World, alice: Client) -> None:
    pid = project(world, fresh())
    message = 'boom\nTraceback (most recent call last):\n  File "x.py", line 1\nValueError: boom'
    failing(world, pid, "t1", ValueError(message))
    body = text(alice.get("/task", project_id=pid, task_id="t1"))
    assert '<pre class="traceback">Traceback (most recent call last):' in body


def test_retry_through_the_form_changes_the_task_and_records_the_actor(
    world: World, alice: Client
) -> None:
    pid = project(world, fresh())
    world.blocked(pid, "t1")
    fields = retry_form(alice.get("/task", project_id=pid, task_id="t1"))
    response = alice.post("/retry", {**fields, "budget": "one_more", "reason": "fixed the DNS"})
    assert response.status == 303
    location = header(response, "location") or ""
    assert location.startswith(P + "/task?")
    assert "flash=retried" in location
    task = task_of(world, pid, "t1")
    assert task.status.value != "blocked"
    last = world.memory.attempts(pid, "t1")[-1]
    assert last.actor == "alice"
    assert last.reason == "fixed the DNS"
    assert last.trigger.value == "manual_retry"
    shown = alice.get("/task", project_id=pid, task_id="t1", flash="retried")
    assert "Retried" in text(shown)


def test_a_double_submit_retries_once(world: World, alice: Client) -> None:
    pid = project(world, fresh())
    world.blocked(pid, "t1")
    fields = retry_form(alice.get("/task", project_id=pid, task_id="t1"))
    first = alice.post("/retry", fields)
    second = alice.post("/retry", fields)
    assert "flash=retried" in (header(first, "location") or "")
    assert "flash=replayed" in (header(second, "location") or "")
    manual = [a for a in world.memory.attempts(pid, "t1") if a.trigger.value == "manual_retry"]
    assert len(manual) == 1
    assert world.recorder.count(pid) == 1


def test_each_render_gives_a_fresh_key(world: World, alice: Client) -> None:
    pid = project(world, fresh())
    world.blocked(pid, "t1")
    keys = {retry_form(alice.get("/task", project_id=pid, task_id="t1"))["key"] for _ in range(3)}
    assert len(keys) == 3


def test_htmx_retry_answers_the_panel(world: World, alice: Client) -> None:
    pid = project(world, fresh())
    world.blocked(pid, "t1")
    fields = retry_form(alice.get("/task", project_id=pid, task_id="t1"))
    response = alice.post("/retry", fields, headers={"hx-request": "true"})
    assert response.status == 200
    body = text(response)
    assert body.lstrip().startswith('<div id="task-panel"')
    assert "<html" not in body
    assert 'id="flash" hx-swap-oob="innerHTML"' in body
    assert "Retried" in body
    assert re.search(
        r'<input type="hidden" id="retry-key" name="key" value="[^"]+" hx-swap-oob="true">', body
    )
    assert fields["key"] not in body
    assert '<div id="task-attempts" data-live' in body
    assert body.count('class="attempt"') == 3
    attempts = alice.request(
        "GET",
        "/task",
        query={"project_id": pid, "task_id": "t1", "part": "attempts"},
        headers={"hx-request": "true"},
    )
    assert text(attempts).lstrip().startswith('<div id="task-attempts"')
    assert 'id="task-status"' not in text(attempts)
    assert alice.get("/task", project_id=pid, task_id="t1", part="nope").status == 422
    # Not blocked any more: a second (new) retry is refused with the reason.
    again = alice.post("/retry", {**fields, "key": "other-key"}, headers={"hx-request": "true"})
    assert "Not retried: the task is not blocked." in text(again)


def test_a_retry_of_a_task_that_is_not_blocked_is_refused(world: World, alice: Client) -> None:
    pid = project(world, fresh())
    world.done(pid, "t1")
    page = alice.get("/task", project_id=pid, task_id="t1")
    assert "Cannot be retried: " in text(page)
    response = alice.post("/retry", retry_form(page))
    assert "flash=task_not_blocked" in (header(response, "location") or "")
    assert task_of(world, pid, "t1").status.value == "done"


def test_pages_check_their_query(world: World, alice: Client) -> None:
    pid = project(world, fresh())
    assert alice.get("/task", project_id=pid).status == 422
    assert alice.get("/task", project_id=pid, task_id="t1", extra="1").status == 422
    assert alice.get("/task", project_id=pid, task_id="nope").status == 404
    assert alice.get("/project", project_id=fresh()).status == 404
    assert alice.get("/blocked", after="garbage!").status == 422
    twice = [("project_id", pid), ("project_id", "other")]
    repeated = alice.request("GET", "/project", query=twice)
    assert repeated.status == 422
    assert "more than once" in text(repeated)


def test_project_page(world: World, alice: Client) -> None:
    pid = project(world, fresh())
    world.blocked(pid, "t1")
    world.done(pid, "t2")
    page = alice.get("/project", project_id=pid)
    body = text(page)
    assert page.status == 200
    assert 'id="project-panel" data-live' in body
    assert 'data-task-id="t1"' in body
    assert 'data-task-id="t2"' not in body
    assert "50% complete" in body
    partial = alice.request(
        "GET", "/project", query={"project_id": pid}, headers={"hx-request": "true"}
    )
    assert text(partial).lstrip().startswith('<div id="project-panel"')


def test_blocked_page_filters(world: World, alice: Client) -> None:
    pid = project(world, fresh())
    failing(world, pid, "a", ValueError("bad value"))
    failing(world, pid, "b", KeyError("missing"))
    body = text(alice.get("/blocked", project_id=pid))
    assert 'data-task-id="a"' in body
    assert 'data-task-id="b"' in body
    assert '<td class="error-type">ValueError</td>' in body
    only = text(alice.get("/blocked", project_id=pid, error_type="KeyError"))
    assert 'data-task-id="b"' in only
    assert 'data-task-id="a"' not in only
    for control in ('id="filter-project"', 'id="filter-error-type"', 'id="filter-button"'):
        assert control in body
    assert 'id="bulk-form"' in body
    assert 'id="bulk-preview-button"' in body


def test_scope_a_principal_never_sees_another_project(world: World, client: Client) -> None:
    mine = project(world, "dave-2")
    world.blocked(mine, "t1")
    theirs = project(world, fresh())
    world.blocked(theirs, "t1")
    client.login(DAVE)
    assert client.get("/project", project_id=theirs).status == 404
    assert client.get("/task", project_id=theirs, task_id="t1").status == 404
    assert client.get("/events", project_id=theirs).status == 404
    for page in (client.get("/blocked"), client.get("/")):
        assert theirs not in text(page)
    filtered = text(client.get("/blocked", project_id=theirs))
    assert f'data-project-id="{theirs}"' not in filtered
    assert f'<option value="{theirs}"' not in filtered
    assert mine in text(client.get("/blocked"))
    csrf = client.csrf()
    stolen = {"csrf": csrf, "project_id": theirs, "task_id": "t1", "key": "k1"}
    assert client.post("/retry", stolen).status == 404
    preview = client.post("/bulk/preview", {"csrf": csrf, "project_id": theirs})
    assert 'data-task-id="t1"' not in text(preview)
    applied = client.post(
        "/bulk/apply", {"csrf": csrf, "key": "k2", "item": json.dumps([theirs, "t1"])}
    )
    assert 'class="refused"' in text(applied)
    assert task_of(world, theirs, "t1").status.value == "blocked"
    assert world.recorder.count(theirs) == 0


def test_the_authorizer_scopes_as_in_the_api(world: World, client: Client) -> None:
    bob_project = project(world, fresh("bob-"))
    world.blocked(bob_project, "t1")
    other = project(world, fresh())
    world.blocked(other, "t1")
    client.login(BOB)
    assert other not in text(client.get("/"))
    assert bob_project in text(client.get("/"))
    assert client.get("/task", project_id=other, task_id="t1").status == 404
    assert other not in text(client.get("/blocked"))


# -- bulk ---------------------------------------------------------------------------------


def apply_form(page: ApiResponse) -> list[tuple[str, str]]:
    form = re.search(r'<form id="bulk-apply".*?</form>', text(page), re.S)
    assert form, text(page)
    return [
        (html.unescape(n), html.unescape(v))
        for n, v in re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', form[0])
    ]


def test_bulk_dry_run_changes_nothing_and_apply_retries_the_previewed(
    world: World, alice: Client
) -> None:
    pid = project(world, fresh())
    for tid in ("a", "b", "c"):
        failing(world, pid, tid, ValueError("v"))
    failing(world, pid, "k", KeyError("k"))
    paused = project(world, fresh())
    failing(world, paused, "p", ValueError("v"))
    world.executor.set_project_status(paused, "cancelled")
    before = {p: world.snapshot(p) for p in (pid, paused)}
    csrf = alice.csrf("/blocked")
    preview = alice.post("/bulk/preview", {"csrf": csrf, "error_type": "ValueError"})
    assert preview.status == 200
    body = text(preview)
    would = set(
        re.findall(r'<li class="would-retry" data-project-id="[^"]*" data-task-id="([^"]+)"', body)
    )
    refused = set(
        re.findall(r'<li class="refused" data-project-id="[^"]*" data-task-id="([^"]+)"', body)
    )
    assert {"a", "b", "c"} <= would
    assert "k" not in would | refused
    assert "p" in refused
    assert "Cannot retry tasks in a &#39;cancelled&#39; project" in body
    assert {p: world.snapshot(p) for p in (pid, paused)} == before
    # A task becomes unblocked between preview and apply: apply reports it refused.
    fields = retry_form(alice.get("/task", project_id=pid, task_id="c"))
    alice.post("/retry", fields)
    form = apply_form(preview)
    result = alice.post("/bulk/apply", [*form, ("budget", "one_more"), ("reason", "bulk fix")])
    assert result.status == 200
    out = text(result)
    retried = set(
        re.findall(r'<li class="retried" data-project-id="[^"]*" data-task-id="([^"]+)"', out)
    )
    not_retried = set(
        re.findall(r'<li class="refused" data-project-id="[^"]*" data-task-id="([^"]+)"', out)
    )
    assert retried == would - {"c"}
    assert not_retried == {"c"}
    for tid in retried:
        last = world.memory.attempts(pid, tid)[-1]
        assert (last.actor, last.reason) == ("alice", "bulk fix")
    assert task_of(world, pid, "k").status.value == "blocked"
    assert task_of(world, paused, "p").status.value == "blocked"
    dispatched = world.recorder.count(pid)
    # The same form again: it replays, nothing is retried twice.
    again = alice.post("/bulk/apply", [*form, ("budget", "one_more"), ("reason", "bulk fix")])
    again_retried = set(re.findall(r'<li class="retried" [^>]*data-task-id="([^"]+)"', text(again)))
    assert again_retried == retried
    assert "already retried by this form" in text(again)
    assert world.recorder.count(pid) == dispatched


def test_bulk_apply_takes_at_most_100(world: World, alice: Client) -> None:
    csrf = alice.csrf()
    items = [("item", json.dumps(["p", f"t{i}"])) for i in range(101)]
    response = alice.post("/bulk/apply", [("csrf", csrf), ("key", "k"), *items])
    assert response.status == 422


# -- escaping -------------------------------------------------------------------------------


class Markup(HTMLParser):
    """The start tags and attribute names of a page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attributes: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attributes |= {name for name, _ in attrs}


def markup(page: str) -> Markup:
    parser = Markup()
    parser.feed(page)
    parser.close()
    return parser


def hostile_pages(world: World, client: Client, pid: str, tid: str, payload: str) -> list[str]:
    """Every page showing a task whose ids, title, error type and message carry ``payload``."""
    if not any(s.project.id == pid for s in world.memory.list_projects(limit=1000)):
        world.executor.create_project(pid, status="executing", name=payload)
    error = type(payload, (Exception,), {})(
        payload + "\nTraceback (most recent call last):\n" + payload
    )
    ex = world.executor
    ex.add_task(pid, tid, title=payload, max_retries=0)
    ex.assign(pid, tid)
    ex.start(pid, tid, 1)
    ex.fail(pid, tid, 1, error)
    csrf = client.csrf()
    pages = [
        client.get("/"),
        client.get("/project", project_id=pid),
        client.get("/blocked"),
        client.get("/blocked", project_id=pid, error_type=payload),
        client.get("/task", project_id=pid, task_id=tid),
        client.post("/bulk/preview", {"csrf": csrf, "project_id": pid}),
    ]
    fields = retry_form(pages[4])
    pages.append(client.post("/retry", fields, headers={"hx-request": "true"}))
    pages.append(
        client.post("/bulk/apply", {"csrf": csrf, "key": "k", "item": json.dumps([pid, tid])})
    )
    for page in pages:
        assert page.status == 200, text(page)
    return [text(page) for page in pages]


def test_an_error_message_with_a_script_renders_as_text(world: World, alice: Client) -> None:
    pid = project(world, fresh())
    failing(world, pid, "t1", RuntimeError("<script>alert(1)</script>"))
    page = text(alice.get("/task", project_id=pid, task_id="t1"))
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    blocked = text(alice.get("/blocked", project_id=pid))
    assert "<script>alert(1)" not in blocked


SAFE_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=0,
    max_size=12,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(a=SAFE_TEXT, b=SAFE_TEXT)
def test_hostile_strings_never_become_markup(world: World, dashboard: Any, a: str, b: str) -> None:
    payload = f'<b data-evil="{a}">\'&amp;{b}</b><script>x()</script>{a}"\''
    pid = "p<i data-evil=1>" + uuid.uuid4().hex[:6] + a
    tid = "t\"'<u data-evil>" + b + "\n/../?&x=1"
    client = Client(dashboard)
    client.login(ALICE)
    pages = hostile_pages(world, client, pid, tid, payload)
    for page in pages:
        found = markup(page)
        assert not {"b", "i", "u"} & set(found.tags)
        assert found.tags.count("script") <= 2
        assert "data-evil" not in found.attributes
        assert payload not in page
    # Links carry the ids URL-encoded: following one finds the task.
    links = re.findall(r'href="' + P + r'/task\?([^"]*)"', pages[3])
    assert links
    query = parse_qsl(html.unescape(links[0]), keep_blank_values=True)
    assert dict(query) == {"project_id": pid, "task_id": tid}
    task = text(client.request("GET", "/task", query=query))
    assert 'id="task-status"' in task


# -- live updates, through a real server ---------------------------------------------------------


def test_events_stream_for_the_session(world: World, served: str) -> None:
    pid = project(world, fresh())
    world.blocked(pid, "t1")
    other = project(world, fresh())
    with httpx.Client(base_url=served, timeout=10) as anonymous:
        assert anonymous.get(P + "/events", params={"project_id": pid}).status_code == 401
    with httpx.Client(base_url=served, timeout=10) as http:
        server_login(http, DAVE)
        refused = http.get(P + "/events", params={"project_id": other})
        assert refused.status_code == 404
        assert refused.headers["content-security-policy"] == CSP
    with httpx.Client(base_url=served, timeout=10) as http:
        server_login(http, ALICE)
        params = {"project_id": pid}
        with http.stream("GET", P + "/events", params=params) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            assert stream.headers["content-security-policy"] == CSP
            assert stream.headers["x-content-type-options"] == "nosniff"
            chunks = stream.iter_bytes()
            seen = b""
            while b"event: task.blocked" not in seen:
                seen += next(chunks)
            # A retry through the dashboard shows on the stream.
            page = http.get(P + "/task", params={"project_id": pid, "task_id": "t1"})
            fields = re.findall(
                r'<input type="hidden"[^>]*?name="([^"]+)" value="([^"]*)"', page.text
            )
            retried = http.post(P + "/retry", data=dict(fields), headers={"origin": served})
            assert retried.status_code == 303
            while b"event: task.retried" not in seen:
                seen += next(chunks)
        bad = http.get(P + "/events", params={"project_id": pid, "after": "x"})
        assert bad.status_code == 400
        assert http.get(P + "/events", params={"project_id": pid, "nope": "1"}).status_code == 422


def test_a_scope_too_large_for_a_cookie_is_refused_at_login(world: World, client: Client) -> None:
    many = "many-token-0123456789"
    world.tokens.add(many, Principal(id="many", projects=[f"project-{i:04d}" for i in range(400)]))
    csrf = client.csrf("/login")
    response = client.post("/login", {"token": many, "csrf": csrf})
    assert response.status == 422
    assert "too many projects" in text(response)
    assert "deepwork_session" not in client.cookies


def test_blocked_tasks_come_in_pages(world: World, alice: Client) -> None:
    pid = project(world, fresh())
    for i in range(52):
        failing(world, pid, f"t{i:02d}", ValueError("v"))
    first = text(alice.get("/blocked", project_id=pid))
    assert first.count("<tr data-project-id=") == 50
    found = re.search(r'<a rel="next" href="([^"]+)"', first)
    assert found
    link = html.unescape(found[1])
    assert link.startswith(P + "/blocked?")
    query = parse_qsl(link.split("?", 1)[1], keep_blank_values=True)
    second = text(alice.request("GET", "/blocked", query=query))
    assert re.findall(r'<tr data-project-id="[^"]*" data-task-id="([^"]+)"', second) == [
        "t50",
        "t51",
    ]
    assert 'rel="next"' not in second


def test_a_full_last_page_offers_no_next_one(world: World, alice: Client) -> None:
    """Exactly a page of blocked tasks: no "Next page" leading to an empty list that says
    nothing matches, and the project page does not call them "the first" 50."""
    pid = project(world, fresh())
    for i in range(50):
        failing(world, pid, f"t{i:02d}", ValueError("v"))
    listed = text(alice.get("/blocked", project_id=pid))
    assert listed.count("<tr data-project-id=") == 50
    assert 'rel="next"' not in listed
    assert "(the first" not in text(alice.get("/project", project_id=pid))
    failing(world, pid, "t50", ValueError("v"))
    assert 'rel="next"' in text(alice.get("/blocked", project_id=pid))
    assert "(the first 50)" in text(alice.get("/project", project_id=pid))


def test_asgi_requests_carry_their_scheme() -> None:
    from deepwork_retry.web._asgi import scope_request

    def scope(scheme: str) -> dict[str, Any]:
        return {"method": "GET", "headers": [], "query_string": b"", "scheme": scheme}

    assert scope_request(scope("https"), "/", b"").scheme == "https"
    assert scope_request(scope("http"), "/", b"").scheme == "http"
    assert scope_request({"method": "GET", "headers": []}, "/", b"").scheme == "http"


def test_the_demo_server_serves_the_dashboard(tmp_path: Any) -> None:
    from deepwork_retry.demo import create_demo_project
    from deepwork_retry.server import DASHBOARD_PATH, build_app
    from deepwork_retry.storage.sqlite import SQLiteStorage

    db = str(tmp_path / "demo.db")
    setup = SQLiteStorage(db)
    try:
        create_demo_project(setup, "proj-demo")
    finally:
        setup.close()
    token = "demo-token-0123456789"
    app = build_app(db, StaticTokens({token: Principal(id="demo-user")}), pause=0.0)
    base, stop = serve_asgi(app, lifespan="on")
    try:
        with httpx.Client(base_url=base, timeout=15) as http:
            assert DASHBOARD_PATH == P
            assert server_login(http, token).status_code == 303
            task = http.get(P + "/task", params={"project_id": "proj-demo", "task_id": "task-3"})
            assert task.status_code == 200
            assert re.search(r'id="task-status">.*blocked', task.text)
            page = http.get(P + "/")
            assert page.status_code == 200
            assert 'data-project-id="proj-demo"' in page.text
            blocked = http.get(P + "/blocked")
            assert blocked.status_code == 200
            assert 'data-task-id="task-3"' in blocked.text
            assert 'data-task-id="task-7"' in blocked.text
    finally:
        app.state.retry_api.close_streams()
        stop()


# -- the API's methods the dashboard calls --------------------------------------------------


def test_retry_for_decides_as_the_retry_route(world: World) -> None:
    api = sync_api(world)
    pid = project(world, fresh())
    world.blocked(pid, "t1")
    bob = Principal(id="bob")
    assert api.retry_for(bob, pid, "t1").json()["code"] == "project_not_found"
    alice = Principal(id="alice")
    assert api.retry_for(alice, pid, "t1", key="has space").status == 422
    assert api.retry_for(alice, pid, "t1", reason="x\x00y").status == 422
    assert api.retry_for(alice, pid, "t1", reason="r" * 2001).status == 422
    assert task_of(world, pid, "t1").status.value == "blocked"
    first = api.retry_for(alice, pid, "t1", reason="ok", key="key-1")
    assert first.status == 200
    again = api.retry_for(alice, pid, "t1", reason="ok", key="key-1")
    assert (again.status, again.body) == (first.status, first.body)
    assert ("Idempotent-Replayed", "true") in again.headers
    assert world.recorder.count(pid) == 1


def test_events_for_decides_as_the_events_route(world: World) -> None:
    api = sync_api(world)
    pid = project(world, fresh())
    head = ApiRequest(method="HEAD", path="/")
    assert api.events_for(Principal(id="bob"), pid, head).status == 404
    assert api.events_for(Principal(id="alice"), fresh(), head).status == 404
    opened = api.events_for(Principal(id="alice"), pid, head)
    assert opened.status == 200
    assert opened.stream is None
    bad = ApiRequest(method="HEAD", path="/", query={"after": "x"})
    assert api.events_for(Principal(id="alice"), pid, bad).status == 400


def test_static_files_answer_304_to_a_matching_etag(client: Client) -> None:
    first = client.get("/static/dashboard.css")
    etag = header(first, "etag")
    assert etag
    again = client.request("GET", "/static/dashboard.css", headers={"if-none-match": etag})
    assert again.status == 304
    assert again.body == b""
    assert header(again, "content-security-policy") == CSP
    other = client.request("GET", "/static/dashboard.css", headers={"if-none-match": '"x"'})
    assert other.status == 200


def test_bulk_apply_refuses_a_bad_reason_before_retrying(world: World, alice: Client) -> None:
    pid = project(world, fresh())
    failing(world, pid, "a", ValueError("v"))
    form = {"csrf": alice.csrf(), "key": "k", "item": json.dumps([pid, "a"]), "reason": "r" * 2001}
    assert alice.post("/bulk/apply", form).status == 422
    assert task_of(world, pid, "a").status.value == "blocked"


def test_live_streams_count_against_the_principals_bound(world: World) -> None:
    api = sync_api(world)
    client = Client(Dashboard(api, secret=SECRET, prefix=P))
    client.login(ALICE)
    pid = project(world, fresh())
    opened = [client.get("/events", project_id=pid) for _ in range(STREAMS.max_streams)]
    try:
        assert all(r.status == 200 and r.stream is not None for r in opened)
        refused = client.get("/events", project_id=pid)
        assert refused.status == 429
        assert header(refused, "retry-after")
        assert header(refused, "content-security-policy") == CSP
        # The JSON API's own streams share the bound: the same principal is refused there too.
        over_api = api.handle(
            ApiRequest(
                method="GET",
                path=f"/projects/{pid}/events",
                headers={"authorization": f"Bearer {ALICE}"},
            )
        )
        assert over_api.status == 429
    finally:
        for response in opened:
            response.stream.close()
    again = client.get("/events", project_id=pid)
    assert again.status == 200
    again.stream.close()


def test_a_form_larger_than_a_body_may_be_is_refused_whole(world: World, served: str) -> None:
    """A server reads a body only up to the API's limit: a larger form must be refused
    (413), never acted on as the part of it that was read."""
    pid = project(world, fresh())
    for tid in ("a", "b"):
        failing(world, pid, tid, ValueError("v"))
    with httpx.Client(base_url=served, timeout=10) as http:
        assert server_login(http, ALICE).status_code == 303
        page = http.get(P + "/")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert csrf
        form = [
            ("csrf", csrf[1]),
            ("key", "k"),
            ("item", json.dumps([pid, "a"])),
            ("note", "x" * (MAX_BODY_BYTES + 1024)),
            ("item", json.dumps([pid, "b"])),
        ]
        answer = http.post(
            P + "/bulk/apply",
            content=urlencode(form).encode("ascii"),
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert answer.status_code == 413
        assert answer.headers["content-security-policy"] == CSP
    for tid in ("a", "b"):
        assert task_of(world, pid, tid).status.value == "blocked"
    assert world.recorder.count(pid) == 0


def test_a_form_over_the_body_limit_is_413(world: World, alice: Client) -> None:
    pid = project(world, fresh())
    failing(world, pid, "a", ValueError("v"))
    fields = retry_form(alice.get("/task", project_id=pid, task_id="a"))
    answer = alice.post("/retry", {**fields, "reason": "r" * (MAX_BODY_BYTES + 1)})
    assert answer.status == 413
    assert task_of(world, pid, "a").status.value == "blocked"


def cursors_of(page: str) -> list[tuple[str, str]]:
    """The blocked-task cursors the page's links carry, decoded."""
    found = []
    for href in re.findall(r'href="([^"]+)"', page):
        for name, value in parse_qsl(html.unescape(href).partition("?")[2]):
            if name == "after":
                found.append(parse_blocked_cursor(value))
    return found


def test_the_blocked_page_never_names_a_hidden_projects_tasks(world: World, client: Client) -> None:
    """Bob's principal lists no projects (any), the authorizer keeps him to ``bob-*``:
    the blocked page shows his tasks past a run of hidden ones, and its cursor never
    carries a task it hid, filtered or not."""
    before = project(world, fresh("a-"))
    for i in range(PAGE_ROWS + 2):
        failing(world, before, f"t{i:02d}", ValueError("v"))
    mine = project(world, fresh("bob-"))
    failing(world, mine, "mine", ValueError("v"))
    after = project(world, fresh("c-"))
    for i in range(5 * PAGE_ROWS):
        failing(world, after, f"t{i:03d}", ValueError("v"))
    client.login(BOB)
    for hidden in (before, after):
        named = text(client.get("/blocked", project_id=hidden))
        assert 'data-task-id="' not in named
        assert 'rel="next"' not in named
    every = text(client.get("/blocked"))
    assert f'data-project-id="{mine}" data-task-id="mine"' in every
    assert {p for p, _ in cursors_of(every)} <= {mine}
    preview = text(client.post("/bulk/preview", {"csrf": csrf_of(client.get("/blocked"))}))
    assert f'data-project-id="{mine}" data-task-id="mine"' in preview
    assert before not in preview
    assert after not in preview


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_live_stream_ends_when_its_session_does(world: World, kind: str) -> None:
    """A stream is authenticated once, when it opens: it must not outlive the session
    (the only way a session ends), or an expired, stolen or withdrawn session would
    keep reading the project's events."""
    api: Any = sync_api(world) if kind == "sync" else async_api(world)
    inner = Dashboard(api, secret=SECRET, prefix=P) if kind == "sync" else None
    dashboard = inner or AsyncDriven(AsyncDashboard(api, secret=SECRET, prefix=P))
    client = Client(dashboard)
    pid = project(world, fresh())
    signer = Signer(SECRET)
    client.cookies["deepwork_session"] = signer.session_cookie(Principal(id="alice"), 1.5)
    opened = client.get("/events", project_id=pid)
    assert opened.status == 200
    stream = opened.stream
    assert stream is not None
    done = threading.Event()

    def drain() -> None:
        if kind == "sync":
            for _ in stream:
                pass
        else:

            async def run() -> None:
                async for _ in stream:
                    pass

            asyncio.run(run())
        done.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert done.wait(30), "the stream went on after its session ended"
    finally:
        api.close_streams()
        reader.join(10)


def test_a_bulk_apply_form_always_fits_in_one_request(world: World, alice: Client) -> None:
    """Ids that must be percent-encoded make long items: the dry run's form carries as
    many as one request may hold (a longer one is refused whole), and says so."""
    pid = project(world, "é" * 200 + fresh())
    for i in range(100):
        failing(world, pid, f"{i:03d}" + "ü" * 200, ValueError("v"))
    preview = alice.post("/bulk/preview", {"csrf": alice.csrf("/blocked"), "project_id": pid})
    assert preview.status == 200
    form = apply_form(preview)
    offered = [json.loads(v) for n, v in form if n == "item"]
    assert 0 < len(offered) < 100
    assert 'id="bulk-more"' in text(preview)
    assert f"Retry these {len(offered)} tasks" in text(preview)
    fields = [*form, ("budget", "one_more"), ("reason", "ř" * 2000)]
    assert len(urlencode(fields).encode("ascii")) <= MAX_BODY_BYTES
    result = alice.post("/bulk/apply", fields)
    assert result.status == 200
    assert text(result).count('<li class="retried"') == len(offered)


def test_a_shortened_session_max_age_ends_the_older_sessions(world: World) -> None:
    """A cookie carries the expiry it was signed with: a server restarted with a shorter
    ``session_max_age`` must still end the sessions older than that."""
    old = Signer(SECRET).session_cookie(Principal(id="alice"), 8 * 3600, now=time.time() - 7200)
    for dashboard in (
        Dashboard(sync_api(world), secret=SECRET, prefix=P, session_max_age=3600),
        AsyncDriven(
            AsyncDashboard(async_api(world), secret=SECRET, prefix=P, session_max_age=3600)
        ),
    ):
        client = Client(dashboard)
        client.cookies["deepwork_session"] = old
        page = client.get("/")
        assert page.status == 303
        assert header(page, "location") == P + "/login"
    longer = Client(Dashboard(sync_api(world), secret=SECRET, prefix=P))
    longer.cookies["deepwork_session"] = old
    assert longer.get("/").status == 200


def test_a_page_of_projects_reads_the_storage_a_bounded_number_of_times(
    world: World,
) -> None:
    """Bob's principal lists no projects (any) and the authorizer hides all but his: the
    projects page and the blocked page read a bounded part of the storage, however many
    projects it holds, and the projects page says its list is not whole."""
    for i in range(MAX_PROJECTS + 50):
        world.executor.create_project(f"a-{i:05d}")
    mine = project(world, fresh("bob-"))
    api = sync_api(world)
    reads: list[int] = []
    real = api.service.projects

    def counted(**kwargs: Any) -> Any:
        reads.append(kwargs["limit"])
        return real(**kwargs)

    api.service.projects = counted  # type: ignore[method-assign]
    client = Client(Dashboard(api, secret=SECRET, prefix=P))
    client.login(BOB)
    page = text(client.get("/"))
    assert sum(reads) <= MAX_PROJECTS
    assert 'id="projects-more"' in page
    assert mine not in page
    reads.clear()
    assert client.get("/blocked").status == 200
    assert sum(reads) <= MAX_PROJECTS
    # Alice sees every project: the first MAX_PROJECTS, and that the list goes on.
    alice = Client(Dashboard(api, secret=SECRET, prefix=P))
    alice.login(ALICE)
    listed = text(alice.get("/"))
    assert listed.count("<tr data-project-id=") == MAX_PROJECTS
    assert 'id="projects-more"' in listed


def test_a_whole_list_of_projects_says_nothing_more(world: World, alice: Client) -> None:
    project(world, fresh())
    assert 'id="projects-more"' not in text(alice.get("/"))


def test_an_oversized_form_without_a_session_is_still_answered(client: Client) -> None:
    """The sign-in page's way back is read from the form; a form too large to read
    is answered (the sign-in page, with no way back), never raised out of handle()."""
    for path in ("/retry", "/bulk/apply"):
        response = client.post(path, {"project_id": "p", "task_id": "t", "pad": "x" * 70_000})
        assert response.status in (303, 413), response.status
        location = header(response, "location") or ""
        assert "next=" not in location
