"""The dashboard in a real browser (headless Chromium), on every adapter that mounts it.

Each test runs against each adapter's server (see conftest.py): an operator logs in
with a token, finds a blocked task and its error, retries it and watches its status
change with no reload, runs a bulk dry run and then the bulk retry; forms without
their CSRF token are refused; a principal limited to one project sees nothing of
another; the session cookie carries its flags; the retry works from the keyboard
alone, and with JavaScript turned off.
"""

from __future__ import annotations

import itertools
import re
import uuid
from html.parser import HTMLParser
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest
from browser_harness import DANA, DANA_PROJECT, DASH, BrowserWorld
from browser_page import Page
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait
from web_harness import ALICE

from deepwork_retry import TaskError

pytestmark = pytest.mark.slow

WAIT = 20.0
"""Seconds a page may take to show what a test waits for (a generous bound, not a timing)."""

SESSION = "deepwork_session"


# -- helpers --------------------------------------------------------------------------------


def wait(page: Page, condition: Any, message: str = "") -> Any:
    # A live region may be swapped between finding an element and reading it.
    return WebDriverWait(
        page.driver,
        WAIT,
        poll_frequency=0.05,
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
    ).until(condition, message)


def css(page: Page, selector: str) -> WebElement:
    return page.driver.find_element(By.CSS_SELECTOR, selector)


def css_all(page: Page, selector: str) -> list[WebElement]:
    return list(page.driver.find_elements(By.CSS_SELECTOR, selector))


def text_of(page: Page, selector: str) -> str:
    """The element's text, read again when a live update replaced it meanwhile."""
    for _ in range(100):
        try:
            return str(css(page, selector).text)
        except StaleElementReferenceException:
            continue
    raise AssertionError(f"{selector} never held still long enough to be read")


def go(page: Page, path: str, **query: str) -> None:
    page.driver.get(page.base + DASH + path + ("?" + urlencode(query) if query else ""))


def task_path(project_id: str, task_id: str) -> str:
    return "/task?" + urlencode({"project_id": project_id, "task_id": task_id})


def row(project_id: str, task_id: str | None = None) -> str:
    found = f'tr[data-project-id="{project_id}"]'
    return found + (f'[data-task-id="{task_id}"]' if task_id is not None else "")


def login(page: Page, token: str = ALICE, *, shot: bool = False) -> None:
    """Sign in through the login form, typing the token (Enter submits it)."""
    go(page, "/login")
    field = css(page, "input#token")
    assert field.get_attribute("type") == "password"
    assert field.get_attribute("name") == "token"
    assert css_all(page, 'label[for="token"]'), "the token field has no label"
    field.send_keys(token)
    if shot:
        page.shot("login")
    css(page, "button#login-button").click()
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "form#logout-form"), "not logged in")
    assert token not in page.driver.current_url
    assert token not in page.driver.page_source


def wait_live(page: Page) -> None:
    """Until the page's event stream is open (dashboard.js marks the body)."""
    wait(
        page,
        lambda d: (
            d.find_element(By.TAG_NAME, "body").get_attribute("data-live-state") == "connected"
        ),
        "the page's event stream did not connect",
    )


def mark_page(page: Page) -> str:
    """Set a marker on the window: it survives partial updates, not a reload."""
    marker = uuid.uuid4().hex
    page.driver.execute_script("window.__dwMarker = arguments[0];", marker)
    return marker


def assert_not_reloaded(page: Page, marker: str) -> None:
    assert page.driver.execute_script("return window.__dwMarker;") == marker, "the page reloaded"


def status_is(page: Page, *words: str) -> Any:
    def check(driver: Any) -> bool:
        try:
            text = driver.find_element(By.CSS_SELECTOR, "#task-status").text.lower()
        except NoSuchElementException:
            return False
        return any(re.search(rf"\b{re.escape(w)}\b", text.replace("_", " ")) for w in words)

    return check


def status_text(page: Page) -> str:
    return text_of(page, "#task-status").lower().replace("_", " ")


_KINDS = itertools.count(1)


def error_type(name: str) -> str:
    """An error type no other test uses (the filters then find only this test's tasks)."""
    return f"{name}{next(_KINDS)}"


def attempts(world: BrowserWorld, project_id: str, task_id: str) -> list[Any]:
    return list(world.memory.attempts(project_id, task_id))


def task(world: BrowserWorld, project_id: str, task_id: str) -> Any:
    return world.memory.get_tasks(project_id, [task_id])[task_id]


class _Inputs(HTMLParser):
    """The ``name -> value`` of every input in a page (for the forms' hidden fields)."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "input":
            found = dict(attrs)
            if found.get("name"):
                self.values.setdefault(str(found["name"]), found.get("value") or "")


def inputs(html: str) -> dict[str, str]:
    parser = _Inputs()
    parser.feed(html)
    return parser.values


def session_client(page: Page) -> httpx.Client:
    """An HTTP client holding the browser's cookies for the server (its session)."""
    client = httpx.Client(base_url=page.base, timeout=10, follow_redirects=False)
    for cookie in page.driver.get_cookies():
        client.cookies.set(cookie["name"], cookie["value"], path=cookie.get("path", "/"))
    return client


@pytest.fixture(scope="session")
def dana_world(world: BrowserWorld) -> BrowserWorld:
    """Dana's one project, with a blocked task (made once: every adapter serves it)."""
    if not getattr(world, "dana_ready", False):
        world.dana_ready = True  # type: ignore[attr-defined]
        world.executor.create_project(DANA_PROJECT, status="executing")
        world.failed(DANA_PROJECT, "dana-task", TaskError(type="DanaError", message="dana's own"))
    return world


@pytest.fixture(autouse=True)
def _release_held(world: BrowserWorld) -> Any:
    """Attempts a test held back are run when it ends, however it ends."""
    yield
    for project in list(world.runner.held):
        world.runner.release(project)


# -- the tests ------------------------------------------------------------------------------


def test_login_then_projects_with_progress(page: Page, world: BrowserWorld) -> None:
    project = world.project(prefix="invoices-")
    world.failed(project, "t-blocked", TaskError(type="Timeout", message="took too long"))
    world.done(project, "t-done")
    login(page, shot=True)
    assert page.driver.current_url.rstrip("/") == (page.base + DASH).rstrip("/")
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "table#projects " + row(project)))
    found = css(page, "table#projects " + row(project))
    bar = found.find_element(By.TAG_NAME, "progress")
    assert (
        bar.get_attribute("aria-label")
        or bar.get_attribute("aria-labelledby")
        or (bar.get_attribute("id") and css_all(page, f'label[for="{bar.get_attribute("id")}"]'))
    ), "the progress bar has no accessible name"
    assert "50%" in found.text  # one of two tasks done, told in text
    assert "blocked" in found.text.lower()
    assert found.find_elements(By.CSS_SELECTOR, "a[href]")
    nav = css(page, "nav")
    assert {a.text.strip() for a in nav.find_elements(By.TAG_NAME, "a")} >= {
        "Projects",
        "Blocked tasks",
    }
    assert css_all(page, "main")
    assert css_all(page, "h1")
    page.shot("projects")


def test_blocked_task_error_then_live_retry(page: Page, world: BrowserWorld) -> None:
    project = world.project(prefix="nightly-import-")
    kind = "DiskQuotaExceeded"  # the filter names the project too
    message = "disk quota exceeded on /data (need 2 GiB)"
    world.failed(project, "import-orders", TaskError(type=kind, message=message))
    world.runner.held.add(project)  # the executor runs it when the test says so
    login(page)

    # The blocked page, filtered to the project through the filter form.
    go(page, "/blocked")
    Select(css(page, "select#filter-project")).select_by_value(project)
    css(page, "input#filter-error-type").send_keys(kind)
    css(page, "button#filter-button").click()
    wait(page, lambda d: "error_type=" + kind in d.current_url, "the filter was not submitted")
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "table#blocked " + row(project)))
    found = css(page, "table#blocked " + row(project, "import-orders"))
    assert found.find_element(By.CSS_SELECTOR, "td.error-type").text.strip() == kind
    assert message in found.find_element(By.CSS_SELECTOR, "td.error-message").text
    assert len(css_all(page, "table#blocked tr[data-task-id]")) == 1  # the filter holds
    page.shot("blocked")

    # Open it: the task page, live.
    found.find_element(By.CSS_SELECTOR, 'a[href*="/task?"]').click()
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#task-status"))
    wait_live(page)
    assert "blocked" in status_text(page)
    assert kind in text_of(page, "#task-error")
    assert message in text_of(page, "#task-error")
    assert len(css_all(page, "ol#attempts > li.attempt")) == 1
    page.shot("task-before-retry")

    marker = mark_page(page)
    Select(css(page, "select#budget")).select_by_value("one_more")
    css(page, "input#reason").send_keys("quota raised")
    css(page, "button#retry-button").click()
    wait(page, status_is(page, "assigned", "in progress", "done"), "no change after the retry")
    assert "retried" in text_of(page, "#flash").lower()
    assert css(page, "#flash").get_attribute("role") == "status"

    # The executor runs the attempt: the page follows the events, with no reload.
    retried = task(world, project, "import-orders")
    assert retried.status.value == "assigned"
    world.runner.release(project)
    wait(page, status_is(page, "done"), "the status did not follow the executor")
    assert_not_reloaded(page, marker)
    wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, "ol#attempts > li.attempt")) == 2)
    page.shot("task-after-retry")

    second = attempts(world, project, "import-orders")[-1]
    assert second.actor == "alice"
    assert second.reason == "quota raised"
    assert task(world, project, "import-orders").status.value == "done"


def test_project_progress_follows_the_executor_live(page: Page, world: BrowserWorld) -> None:
    """A retry made elsewhere (another operator, the JSON API) and the executor's reports
    reach an open project page: its progress and blocked list update with no reload."""
    project = world.project(prefix="reports-")
    world.done(project, "daily-report")
    world.failed(project, "weekly-report", TaskError(type="Timeout", message="no answer"))
    login(page)
    go(page, "/project", project_id=project)
    wait_live(page)
    assert "50%" in text_of(page, "#project-progress")
    assert css_all(page, "#project-panel " + row(project, "weekly-report"))
    marker = mark_page(page)

    world.sync_service().retry(project, "weekly-report", actor="bob", reason="elsewhere")
    wait(page, lambda _: "100%" in text_of(page, "#project-progress"), "progress not updated")
    wait(page, lambda d: not d.find_elements(By.CSS_SELECTOR, "#project-panel " + row(project)))
    assert_not_reloaded(page, marker)


def test_bulk_dry_run_then_apply(page: Page, world: BrowserWorld) -> None:
    kind = error_type("UpstreamTimeout")
    project = world.project(prefix="catalog-sync-")
    closed = world.project(prefix="archive-")
    retriable = {f"bulk-{n}" for n in range(3)}
    for task_id in sorted(retriable):
        world.failed(
            project, task_id, TaskError(type=kind, message=f"{task_id}: no answer in 30 s")
        )
    other = world.failed(project, "other-kind", TaskError(type="Other", message="not this one"))
    world.failed(closed, "in-closed", TaskError(type=kind, message="in a failed project"))
    world.executor.set_project_status(closed, "failed")
    world.runner.held.update({project, closed})
    login(page)

    go(page, "/blocked", error_type=kind)
    wait(
        page, lambda d: len(d.find_elements(By.CSS_SELECTOR, "table#blocked tr[data-task-id]")) == 4
    )
    before = (world.snapshot(project), world.snapshot(closed))
    css(page, "form#bulk-form button#bulk-preview-button").click()
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "section#bulk-preview"))

    would = {e.get_attribute("data-task-id") for e in css_all(page, "li.would-retry")}
    refused = css_all(page, "section#bulk-preview li.refused")
    assert would == retriable
    assert [e.get_attribute("data-task-id") for e in refused] == ["in-closed"]
    assert "failed" in refused[0].text  # the reason: the project does not accept retries
    assert (world.snapshot(project), world.snapshot(closed)) == before, "the dry run changed data"
    page.shot("bulk-preview")

    Select(css(page, "select#bulk-budget")).select_by_value("one_more")
    css(page, "input#bulk-reason").send_keys("quota raised for all")
    css(page, "button#bulk-apply-button").click()
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "section#bulk-result"))
    retried = {
        e.get_attribute("data-task-id") for e in css_all(page, "section#bulk-result li.retried")
    }
    assert retried == retriable
    assert not css_all(page, "section#bulk-result li.refused")  # only the previewed were sent
    page.shot("bulk-result")

    # Exactly those were retried, once each, as alice.
    dispatched = {(p, t) for p, t, n in world.recorder.keys if p in (project, closed) and n > 1}
    assert dispatched == {(project, t) for t in retriable}
    for task_id in retriable:
        assert task(world, project, task_id).status.value == "assigned"
        assert attempts(world, project, task_id)[-1].actor == "alice"
    assert task(world, project, other).status.value == "blocked"
    assert task(world, closed, "in-closed").status.value == "blocked"


def test_a_form_without_its_csrf_token_is_refused(page: Page, world: BrowserWorld) -> None:
    project = world.project()
    world.failed(project, "t1", TaskError(type="Boom", message="first"))
    world.failed(project, "t2", TaskError(type="Boom", message="second"))
    world.runner.held.add(project)
    page.console.allow(r"\b403\b")
    login(page)

    # In the browser, the form submitted as a plain POST with its hidden field removed.
    go(page, task_path(project, "t1"))
    form = css(page, "form#retry-form")
    assert form.find_elements(By.CSS_SELECTOR, 'input[type="hidden"][name="csrf"]')
    page.driver.execute_script(
        "const f = arguments[0]; f.querySelector('input[name=csrf]').remove();"
        "HTMLFormElement.prototype.submit.call(f);",
        form,
    )
    wait(page, lambda d: not d.find_elements(By.CSS_SELECTOR, "form#retry-form"))
    assert "Forbidden" in page.driver.title
    assert "did not come from this site" in text_of(page, "main")
    assert task(world, project, "t1").status.value == "blocked"

    # With htmx (the button), the same refusal: the request is answered 403.
    go(page, task_path(project, "t1"))
    page.driver.execute_script(
        "document.querySelector('form#retry-form input[name=csrf]').remove();"
    )
    page.console.read()
    before = len(page.console.seen)

    def refused(_: Any) -> bool:
        page.console.read()
        return any(
            "/retry" in str(e["message"]) and "403" in str(e["message"])
            for e in page.console.seen[before:]
        )

    css(page, "button#retry-button").click()
    wait(page, refused, "the htmx POST without its token was not refused")
    assert "blocked" in status_text(page)
    assert task(world, project, "t1").status.value == "blocked"
    assert len(attempts(world, project, "t1")) == 1

    # Over plain HTTP with the browser's session: without the token, with a wrong one,
    # then (the control) with the page's own token.
    with session_client(page) as http:
        fields = inputs(http.get(DASH + task_path(project, "t2")).text)
        base = {
            "project_id": project,
            "task_id": "t2",
            "budget": "one_more",
            "reason": "csrf test",
            "key": fields.get("key", uuid.uuid4().hex),
        }
        refused = http.post(DASH + "/retry", data=base)
        assert refused.status_code == 403
        wrong = http.post(DASH + "/retry", data={**base, "csrf": "x" * 43})
        assert wrong.status_code == 403
        assert task(world, project, "t2").status.value == "blocked"
        accepted = http.post(DASH + "/retry", data={**base, "csrf": fields["csrf"]})
        assert accepted.status_code == 303, accepted.text
    assert task(world, project, "t2").status.value == "assigned"
    assert task(world, project, "t1").status.value == "blocked"


def test_a_principal_sees_only_its_projects(page: Page, dana_world: BrowserWorld) -> None:
    world = dana_world
    other = world.project()
    world.failed(other, "secret-task", TaskError(type="Hidden", message="other team's secret"))
    bobs = world.project(prefix="bob-")
    world.failed(bobs, "bobs-task", TaskError(type="Hidden", message="bob's secret"))
    page.console.allow(r"\b404\b")
    login(page, DANA)

    ids = {
        e.get_attribute("data-project-id")
        for e in css_all(page, "table#projects tr[data-project-id]")
    }
    assert ids == {DANA_PROJECT}

    go(page, "/blocked")
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "table#blocked"))
    seen = {
        e.get_attribute("data-project-id") for e in css_all(page, "table#blocked tr[data-task-id]")
    }
    assert seen == {DANA_PROJECT}
    options = {
        o.get_attribute("value")
        for o in css(page, "select#filter-project").find_elements(By.TAG_NAME, "option")
    }
    assert other not in options
    assert bobs not in options
    assert DANA_PROJECT in options

    for project, task_id, secret in (
        (other, "secret-task", "other team's secret"),
        (bobs, "bobs-task", "bob's secret"),
    ):
        go(page, "/blocked", project_id=project)
        assert not css_all(page, "table#blocked tr[data-task-id]")
        assert secret not in page.driver.page_source
        go(page, task_path(project, task_id))
        assert secret not in page.driver.page_source
        assert not css_all(page, "form#retry-form")
        assert "not found" in page.driver.page_source.lower()
        go(page, "/project", project_id=project)
        assert secret not in page.driver.page_source
        assert "not found" in page.driver.page_source.lower()

    # Its own task, for contrast: found.
    go(page, task_path(DANA_PROJECT, "dana-task"))
    assert "dana's own" in text_of(page, "#task-error")


def test_the_session_cookie_flags(page: Page, world: BrowserWorld) -> None:
    login(page)
    cookie = page.driver.get_cookie(SESSION)
    assert cookie is not None
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["path"] == DASH
    assert cookie["secure"] is False  # plain HTTP
    assert SESSION not in page.driver.execute_script("return document.cookie;")

    # The raw Set-Cookie of a login over HTTP.
    with httpx.Client(base_url=page.base, timeout=10, follow_redirects=False) as http:
        form = http.get(DASH + "/login")
        assert form.status_code == 200
        fields = inputs(form.text)
        answer = http.post(DASH + "/login", data={"token": ALICE, "csrf": fields["csrf"]})
        assert answer.status_code == 303
        assert answer.headers["location"].rstrip("/").endswith(DASH)
        cookies = answer.headers.get_list("set-cookie")
        session = [c for c in cookies if c.startswith(SESSION + "=")]
        assert len(session) == 1, cookies
        flags = {
            part.strip().split("=")[0].lower(): part.strip() for part in session[0].split(";")[1:]
        }
        assert "httponly" in flags
        assert flags["samesite"].lower() == "samesite=strict"
        assert flags["path"] == f"Path={DASH}"
        assert int(flags["max-age"].split("=")[1]) > 0
        assert "secure" not in flags
        everything = " ".join(f"{k}: {v}" for k, v in answer.headers.multi_items())
        assert ALICE not in everything
        assert ALICE not in answer.text


UNLABELLED = """
const found = [];
for (const el of document.querySelectorAll(
    "input:not([type=hidden]), select, textarea, button, progress")) {
  const labelled = (el.id && document.querySelector(`label[for="${CSS.escape(el.id)}"]`))
    || el.closest("label") || el.getAttribute("aria-label")
    || el.getAttribute("aria-labelledby")
    || (el.tagName === "BUTTON" && el.textContent.trim());
  if (!labelled) found.push(el.outerHTML.slice(0, 120));
}
return found;
"""
"""The page's controls that have no accessible name (label, aria-label(ledby), text)."""


def test_every_control_is_labelled(page: Page, world: BrowserWorld) -> None:
    project = world.project(prefix="labels-")
    world.failed(project, "t-labels", TaskError(type="Boom", message="labels"))
    go(page, "/login")
    assert page.driver.execute_script(UNLABELLED) == [], "login"
    login(page)
    for path in (
        "/",
        "/blocked?" + urlencode({"project_id": project}),
        task_path(project, "t-labels"),
    ):
        go(page, path)
        assert page.driver.execute_script(UNLABELLED) == [], path
    go(page, "/blocked", project_id=project)
    css(page, "button#bulk-preview-button").click()
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "section#bulk-preview"))
    assert page.driver.execute_script(UNLABELLED) == [], "bulk preview"


def test_logout_ends_the_session(page: Page, world: BrowserWorld) -> None:
    login(page)
    css(page, "button#logout-button").click()
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "form#login-form"), "not signed out")
    assert page.driver.get_cookie(SESSION) is None
    go(page, "/blocked")  # a page behind the session: back to the login form
    assert css_all(page, "form#login-form")
    assert page.driver.current_url.startswith(page.base + DASH + "/login")


def test_keyboard_only_retry(page: Page, world: BrowserWorld) -> None:
    project = world.project()
    world.failed(project, "t-keys", TaskError(type="Boom", message="by keyboard"))
    world.runner.held.add(project)
    keys = ActionChains(page.driver)

    def focused() -> str:
        return str(page.driver.execute_script("return document.activeElement.id || '';"))

    def tab_to(element_id: str) -> None:
        for _ in range(60):
            if focused() == element_id:
                return
            ActionChains(page.driver).send_keys(Keys.TAB).perform()
        raise AssertionError(f"#{element_id} cannot be reached with TAB (at #{focused()})")

    # Signing in: TAB to the token, type it, Enter.
    go(page, "/login")
    tab_to("token")
    ActionChains(page.driver).send_keys(ALICE, Keys.ENTER).perform()
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "form#logout-form"), "not signed in")

    go(page, task_path(project, "t-keys"))
    wait_live(page)
    tab_to("budget")
    tab_to("reason")
    keys.send_keys("keyboard only").perform()
    tab_to("retry-button")
    ActionChains(page.driver).send_keys(Keys.SPACE).perform()  # a button's other key
    wait(page, status_is(page, "assigned", "in progress", "done"), "Space did not retry")
    second = attempts(world, project, "t-keys")[-1]
    assert second.reason == "keyboard only"
    assert second.actor == "alice"


def test_a_csp_violation_is_reported(page: Page, world: BrowserWorld) -> None:
    """The console check of every test sees the pages' CSP at work: an inline script
    added to a dashboard page is refused by the browser, and reported."""
    go(page, "/login")
    page.driver.execute_script(
        "const s = document.createElement('script');"
        "s.textContent = 'window.__dwInline = 1;';"
        "document.body.appendChild(s);"
    )
    assert page.driver.execute_script("return window.__dwInline;") is None
    wait(page, lambda _: any(p.startswith("CSP violation") for p in page.console.problems()))
    page.console.seen.clear()  # provoked here: not a failure of this test


def test_retry_with_javascript_off(nojs_page: Page, world: BrowserWorld) -> None:
    page = nojs_page
    project = world.project()
    world.failed(project, "t-nojs", TaskError(type="Boom", message="no script here"))
    world.runner.held.add(project)
    login(page)
    go(page, task_path(project, "t-nojs"))
    # The page's own scripts never ran (the driver's own still can).
    assert page.driver.execute_script("return typeof window.htmx;") == "undefined"
    assert css(page, "body").get_attribute("data-live-state") != "connected"
    assert "need javascript" in text_of(page, "#live-note").lower()
    css(page, "input#reason").send_keys("without javascript")
    css(page, "button#retry-button").click()
    wait(page, lambda d: "retried" in text_of(page, "#flash").lower(), "no retry reported")
    assert page.driver.current_url.startswith(page.base + DASH + "/task?")
    assert "assigned" in status_text(page)
    second = attempts(world, project, "t-nojs")[-1]
    assert second.reason == "without javascript"


def test_every_id_reaches_its_task(page: Page, world: BrowserWorld) -> None:
    """Ids travel in query strings, encoded by the pages: any id opens its own task."""
    project = world.project()
    task_id = "a/b?c=d&e#f %2F ü"
    world.failed(project, task_id, TaskError(type="Odd", message="<script>alert(1)</script>"))
    login(page)
    go(page, "/blocked", project_id=project)
    found = css(page, "table#blocked " + f'tr[data-project-id="{project}"]')
    assert found.get_attribute("data-task-id") == task_id
    assert (
        "<script>alert(1)</script>" in found.find_element(By.CSS_SELECTOR, "td.error-message").text
    )
    found.find_element(By.CSS_SELECTOR, 'a[href*="/task?"]').click()
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#task-error"))
    assert "<script>alert(1)</script>" in text_of(page, "#task-error")
    assert quote(task_id, safe="") in page.driver.current_url or task_id in page.driver.current_url


def test_a_long_unbroken_error_or_id_stays_inside_the_page(page: Page, world: BrowserWorld) -> None:
    """An error message with no space to break at (a URL, a hash, base64) and a long id
    wrap inside the page: nobody has to scroll sideways to read the task or the list."""
    project = world.project()
    task_id = "t-" + "x" * 200
    message = "upstream said " + "A" * 3000 + "\nTraceback (most recent call last):\n  " + "B" * 800
    world.failed(project, task_id, TaskError(type="E" * 120, message=message))
    login(page)

    def fits() -> bool:
        return bool(
            page.driver.execute_script(
                "var d = document.documentElement; return d.scrollWidth <= d.clientWidth;"
            )
        )

    go(page, task_path(project, task_id))
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#task-error"))
    assert fits(), "the task page is wider than the window"
    go(page, "/blocked", project_id=project)
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "table#blocked"))
    assert fits(), "the blocked list is wider than the window"
    go(page, "/project", project_id=project)
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#project-panel"))
    assert fits(), "the project page is wider than the window"


def test_a_live_update_keeps_the_keyboard_focus(page: Page, world: BrowserWorld) -> None:
    """A keyboard user on a task link of the project's blocked list stays there when the
    list is refreshed live (another task retried elsewhere): focus is not sent back to
    the top of the page."""
    project = world.project(prefix="focus-")
    world.failed(project, "stay-here", TaskError(type="Timeout", message="no answer"))
    world.failed(project, "retried-elsewhere", TaskError(type="Timeout", message="no answer"))
    world.runner.held.add(project)
    login(page)
    go(page, "/project", project_id=project)
    wait_live(page)
    link = css(page, "#project-panel " + row(project, "stay-here") + " a")
    page.driver.execute_script("arguments[0].focus();", link)  # as Tab would
    marker = mark_page(page)

    world.sync_service().retry(project, "retried-elsewhere", actor="bob", reason="elsewhere")
    wait(
        page,
        lambda d: (
            not d.find_elements(
                By.CSS_SELECTOR, "#project-panel " + row(project, "retried-elsewhere")
            )
        ),
        "the blocked list was not updated",
    )
    assert_not_reloaded(page, marker)
    focused = page.driver.execute_script(
        "var e = document.activeElement;"
        "var r = e && e.closest('tr');"
        "return r ? r.getAttribute('data-task-id') : (e ? e.tagName : null);"
    )
    assert focused == "stay-here", f"focus moved to {focused!r}"


def test_a_retry_after_the_session_ended_says_it_was_not_done(
    page: Page, world: BrowserWorld
) -> None:
    """The session ends while the task page is open: the retry button leads to the login
    page, which says nothing was done, and signing in leads back to the task."""
    project = world.project(prefix="ended-")
    world.failed(project, "late", TaskError(type="Timeout", message="no answer"))
    world.runner.held.add(project)
    login(page)
    go(page, task_path(project, "late"))
    wait_live(page)
    page.driver.delete_cookie("deepwork_session")
    page.console.allow(r"/retry - Failed to load resource: .* 401")
    page.console.allow(r"Response Status Error Code 401 from /deep-work/retry")
    css(page, "button#retry-button").click()
    wait(page, lambda d: "/login" in d.current_url, "not sent to the login page")
    assert "nothing has changed" in text_of(page, "#flash")
    assert task(world, project, "late").status.value == "blocked"
    css(page, "input#token").send_keys(ALICE)
    css(page, "button#login-button").click()
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#task-status"), "not back on the task")
    assert "late" in page.driver.current_url
