"""Fixtures of the browser tests: headless Chromium, and each adapter's real server.

One Chromium for the whole session (its start is the slow part), driven through
Debian's chromedriver; cookies are cleared between tests. Every test leaves a
screenshot in the artifacts directory (``DEEPWORK_ARTIFACTS``, default
``.artifacts/browser/``), one more when it fails, and fails when the browser's
console reports an error it did not expect or any Content-Security-Policy
violation.

``DEEPWORK_DOCS_SCREENSHOTS=docs/img/dashboard`` also writes the named
screenshots of the Starlette run there: the documentation's current set.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "web"))

from browser_harness import BrowserWorld, start_browser_server
from browser_page import ARTIFACTS, Page, full_page_png, slug
from web_harness import ADAPTERS

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW = (1280, 900)
REQUIRE_SERVICES = os.environ.get("DEEPWORK_REQUIRE_SERVICES") == "1"


def require_browser() -> None:
    """Skip (or fail, when services are required) without Chromium and its driver."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if not missing:
        return
    message = (
        f"{' and '.join(missing)} missing: install Debian's browser with "
        "`sudo apt-get install chromium chromium-driver` (./dev test does it as root)"
    )
    if REQUIRE_SERVICES:
        pytest.fail(f"{message}, and DEEPWORK_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(message)


def _chrome(profile: Path, *, javascript: bool = True) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(argument)
    # The console's messages, for the checks at each test's end.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if not javascript:
        options.add_experimental_option(
            "prefs", {"profile.managed_default_content_settings.javascript": 2}
        )
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    return driver


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """One headless Chromium for the session, with a fresh profile."""
    require_browser()
    profile = Path(tempfile.mkdtemp(prefix="dw-chromium-"))
    driver = _chrome(profile)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="session")
def nojs_browser() -> Iterator[Any]:
    """A second Chromium whose profile has JavaScript turned off (started only if asked for)."""
    require_browser()
    profile = Path(tempfile.mkdtemp(prefix="dw-chromium-nojs-"))
    driver = _chrome(profile, javascript=False)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="session")
def world() -> BrowserWorld:
    return BrowserWorld()


@pytest.fixture(scope="session", params=ADAPTERS)
def server(request: pytest.FixtureRequest, world: BrowserWorld) -> Iterator[str]:
    """The base URL of one adapter's server, serving the API and the dashboard."""
    url, stop = start_browser_server(request.param, world)
    try:
        yield url
    finally:
        stop()


@pytest.fixture
def adapter(request: pytest.FixtureRequest, server: str) -> str:
    return str(request.node.callspec.params["server"])


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, "report_" + report.when, report)
    return report


def _clear(driver: Any) -> None:
    # Every origin's cookies (the five servers share the host 127.0.0.1), not only
    # the current page's as delete_all_cookies does.
    driver.execute_cdp_cmd("Network.clearBrowserCookies", {})
    driver.get("about:blank")


def _page(request: pytest.FixtureRequest, driver: Any, server: str, adapter: str) -> Iterator[Page]:
    _clear(driver)
    page = Page(driver, server, adapter, slug(request.node.name))
    yield page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    item = request.node
    failed = any(
        getattr(getattr(item, "report_" + when, None), "failed", False)
        for when in ("setup", "call")
    )
    try:
        png = full_page_png(driver)
        (ARTIFACTS / f"{page.name}.png").write_bytes(png)
        if failed:
            (ARTIFACTS / f"{page.name}-FAILED.png").write_bytes(png)
            (ARTIFACTS / f"{page.name}-FAILED.html").write_text(
                driver.page_source, encoding="utf-8"
            )
    except Exception as exc:  # noqa: BLE001 - a screenshot must not hide the result
        print(f"no screenshot of {page.name}: {exc!r}", file=sys.stderr)
    problems = page.console.problems()
    _clear(driver)
    if problems and not failed:
        pytest.fail("the browser's console reported:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def page(request: pytest.FixtureRequest, browser: Any, server: str, adapter: str) -> Iterator[Page]:
    """The session's browser, cookies cleared, on ``server`` (each adapter in turn)."""
    yield from _page(request, browser, server, adapter)


@pytest.fixture
def nojs_page(
    request: pytest.FixtureRequest, nojs_browser: Any, server: str, adapter: str
) -> Iterator[Page]:
    """The JavaScript-off browser, on ``server``."""
    yield from _page(request, nojs_browser, server, adapter)
