"""The operator dashboard: sessions, CSRF, headers, scope, escaping, retries, bulk.

Most tests talk to the framework-free :class:`Dashboard` through ``handle()``
(a tiny cookie-keeping client below); a few go through a real uvicorn server
serving the Starlette adapter's ``mount_dashboard``. The browser tests live
elsewhere.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from web_harness import ALICE, World, serve_asgi

from deepwork_retry.auth import Principal
from deepwork_retry.web import ApiRequest, ApiResponse
from deepwork_retry.web.dashboard import CSP, AsyncDashboard, Dashboard, ShortSecret
from deepwork_retry.web.dashboard._common import Signer

SECRET = "s" * 40
P = "/deep-work"
DAVE = "dave-token-0123456789"
"""Limited to the projects listed in its principal (``dave-*``)."""


# -- a client over handle() ---------------------------------------------------------------


class Client:
    """Keeps cookies like a browser would (per name, Max-Age=0 removes) and speaks
    to ``handle()`` with paths below the dashboard's prefix."""

    def __init__(self, dashboard: Dashboard, *, scheme: str = "http") -> None:
        self.dashboard = dashboard
        self.cookies: dict[str, str] = {}
        self.scheme = scheme
        self.responses: list[ApiResponse] = []

    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
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
                query=list((query or {}).items()),
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


@pytest.fixture
def dashboard(world: World) -> Dashboard:
    return Dashboard(world.sync_api(), secret=SECRET, prefix=P)


@pytest.fixture
def client(dashboard: Dashboard) -> Client:
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
    for path in ("/", "/blocked", "/project", "/task"):
        response = client.get(path)
        assert response.status == 303
        assert header(response, "location") == P + "/login"
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


def test_the_cookie_is_secure_over_https(dashboard: Dashboard, world: World) -> None:
    client = Client(dashboard, scheme="https")
    response = client.login(ALICE)
    assert all("; Secure" in c for c in set_cookies(response))
    forced = Client(Dashboard(world.sync_api(), secret=SECRET, prefix=P, secure=True))
    assert all("; Secure" in c for c in set_cookies(forced.login(ALICE)))


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
    for origin in ("http://evil.test", "null", "https://dash.test"):
        response = alice.post("/logout", {"csrf": csrf}, headers={"origin": origin})
        assert response.status == 403, origin
    assert alice.get("/").status == 200
    same = alice.post("/logout", {"csrf": csrf}, headers={"origin": "http://dash.test"})
    assert same.status == 303


# -- headers -----------------------------------------------------------------------------------


def test_security_headers_on_every_response(alice: Client) -> None:
    alice.get("/")
    alice.get("/nope")
    alice.get("/static/htmx.min.js")
    alice.get("/static/dashboard.css")
    alice.get("/static/nope.js")
    alice.request("DELETE", "/")
    alice.post("/retry", {})
    Client(alice.dashboard).get("/")
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


def test_the_token_never_appears(world: World, dashboard: Dashboard) -> None:
    client = Client(dashboard)
    client.login(ALICE)
    client.get("/")
    client.get("/blocked")
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
    api = world.async_api()
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
