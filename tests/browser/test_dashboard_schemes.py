"""Each adapter tells the dashboard the request's scheme from its framework.

The session cookie is ``Secure`` exactly when the request came over HTTPS as the
framework sees it: a real TLS server on each adapter sets it. A plain HTTP request
claiming ``X-Forwarded-Proto: https`` sets it only where the server was configured
to trust that header from this client: uvicorn does by default for 127.0.0.1
(``forwarded_allow_ips``), werkzeug and aiohttp do not unless told (ProxyFix, a
middleware), and the adapters never read the header themselves.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from browser_harness import DASH, BrowserWorld, start_browser_server
from web_harness import ADAPTERS, ALICE, TLS

pytestmark = pytest.mark.slow


class _Csrf(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.value = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "input" and found.get("name") == "csrf":
            self.value = found.get("value") or ""


def login_cookie_flags(http: httpx.Client, **headers: str) -> set[str]:
    """Log in over ``http``; the session cookie's attribute names, lower-cased."""
    http.cookies.clear()
    form = http.get(DASH + "/login", headers=headers)
    assert form.status_code == 200
    parser = _Csrf()
    parser.feed(form.text)
    # The login form's cookie sent back by hand: a client's jar sends no Secure cookie
    # over plain HTTP, and a trusted forwarded header makes this one Secure.
    nonce = form.headers["set-cookie"].split(";")[0]
    answer = http.post(
        DASH + "/login",
        data={"token": ALICE, "csrf": parser.value},
        headers={**headers, "Cookie": nonce},
    )
    assert answer.status_code == 303, answer.text
    session = [
        c for c in answer.headers.get_list("set-cookie") if c.startswith("deepwork_session=")
    ]
    assert len(session) == 1
    return {part.split("=")[0].strip().lower() for part in session[0].split(";")[1:]}


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLS:
    """A self-signed certificate for 127.0.0.1 (made with the openssl command)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    where = Path(tmp_path_factory.mktemp("tls"))
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


@pytest.fixture(scope="module", params=ADAPTERS)
def tls_server(request: pytest.FixtureRequest, world: BrowserWorld, tls: TLS) -> Iterator[str]:
    url, stop = start_browser_server(request.param, world, tls=tls)
    try:
        yield url
    finally:
        stop()


def test_over_https_the_cookie_is_secure(tls_server: str, tls: TLS) -> None:
    assert tls_server.startswith("https://")
    trust = ssl.create_default_context(cafile=tls[0])
    with httpx.Client(base_url=tls_server, verify=trust, timeout=10) as http:
        assert "secure" in login_cookie_flags(http)


UVICORN = {"starlette", "fastapi"}
"""The adapters the harness serves with uvicorn, which trusts a proxy on 127.0.0.1."""


def test_a_forwarded_proto_header_counts_only_where_the_server_trusts_it(
    server: str, adapter: str
) -> None:
    assert server.startswith("http://")
    with httpx.Client(base_url=server, timeout=10) as http:
        assert "secure" not in login_cookie_flags(http)
        flags = login_cookie_flags(http, **{"X-Forwarded-Proto": "https"})
    assert ("secure" in flags) == (adapter in UVICORN)
    assert {"httponly", "samesite", "path", "max-age"} <= flags
