"""The README's first command, then a person in a browser: the issue's "done when".

``deepwork-retry serve`` runs as its own process (as ``./dev serve`` runs it); a
person opens the dashboard address it prints, signs in with the token it
prints, finds the blocked task and its error, retries it and sees it run, all
within a minute of the server starting.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_page import Page
from selenium.webdriver.common.by import By
from test_dashboard_browser import (
    assert_not_reloaded,
    css,
    css_all,
    mark_page,
    status_is,
    text_of,
    wait,
    wait_live,
)
from test_demo_e2e import Demo, _free_port, _start

pytestmark = pytest.mark.slow

ONE_MINUTE = 60.0
"""The issue's bound from the server's start to a retry seen running (generous here)."""


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[Demo, float]]:
    started = time.monotonic()
    server = _start(tmp_path / "demo.db", _free_port())
    try:
        yield server, started
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=20)


@pytest.fixture
def person(browser: Any, demo: tuple[Demo, float]) -> Iterator[Page]:
    browser.execute_cdp_cmd("Network.clearBrowserCookies", {})
    server, _ = demo
    page = Page(browser, f"http://localhost:{server.port}", "demo", "demo-first-minute")
    yield page
    problems = page.console.problems()
    browser.execute_cdp_cmd("Network.clearBrowserCookies", {})
    browser.get("about:blank")
    assert not problems, problems


def test_a_person_retries_the_blocked_demo_task_within_a_minute(
    person: Page, demo: tuple[Demo, float]
) -> None:
    server, started = demo
    assert server.dashboard.startswith(f"http://localhost:{server.port}/")
    driver = person.driver

    # The printed address; the sign-in form takes the printed token.
    driver.get(server.dashboard)
    wait(person, lambda d: d.find_elements(By.CSS_SELECTOR, "input#token"), "no sign-in form")
    css(person, "input#token").send_keys(server.token)
    css(person, "button#login-button").click()
    wait(person, lambda d: d.find_elements(By.CSS_SELECTOR, "table#projects"), "not signed in")
    assert css_all(person, f'tr[data-project-id="{server.project_id}"]')
    assert server.token not in driver.page_source

    # Blocked tasks, from the navigation: the demo's task and its error.
    driver.find_element(By.LINK_TEXT, "Blocked tasks").click()
    row = f'tr[data-project-id="{server.project_id}"][data-task-id="{server.task_id}"]'
    wait(person, lambda d: d.find_elements(By.CSS_SELECTOR, row), "the blocked task is not listed")
    found = css(person, row)
    assert found.find_element(By.CSS_SELECTOR, "td.error-type").text.strip() == "RuntimeError"
    assert "502 Bad Gateway" in found.find_element(By.CSS_SELECTOR, "td.error-message").text
    # The second demo project blocks tasks in the other ways, listed beside it.
    kinds = {e.text.strip() for e in css_all(person, "table#blocked td.error-type")}
    assert {"PermissionError", "TimeoutError", "LeaseExpired", "SchemaError"} <= kinds

    # The task: its error, then the retry, followed live to the end of its run.
    found.find_element(By.CSS_SELECTOR, 'a[href*="/task?"]').click()
    wait(person, lambda d: d.find_elements(By.CSS_SELECTOR, "#task-status"), "no task page")
    wait_live(person)
    assert "502 Bad Gateway" in text_of(person, "#task-error")
    marker = mark_page(person)
    css(person, "button#retry-button").click()
    wait(person, status_is(person, "assigned", "in progress", "done"), "the retry did not show")
    wait(person, status_is(person, "done"), "the demo executor's run did not show")
    assert_not_reloaded(person, marker)
    elapsed = time.monotonic() - started
    print(f"from the server's start to the retry seen done: {elapsed:.1f} s")
    assert elapsed < ONE_MINUTE
    person.shot("demo-task-retried")


def test_a_restart_that_ends_the_session_sends_an_open_page_to_sign_in(
    person: Page, demo: tuple[Demo, float], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's secret is random per start: after a restart the open page's stream is
    refused (401), which an EventSource takes as final. The page must not go on looking
    live: it says so in words, finds the session gone and goes to the sign-in page."""
    monkeypatch.delenv("DEEPWORK_DASHBOARD_SECRET", raising=False)
    server, _ = demo
    driver = person.driver
    driver.get(server.dashboard)
    css(person, "input#token").send_keys(server.token)
    css(person, "button#login-button").click()
    wait(person, lambda d: d.find_elements(By.CSS_SELECTOR, "table#projects"), "not signed in")
    driver.get(
        f"http://localhost:{server.port}/deep-work/task?project_id={server.project_id}"
        f"&task_id={server.task_id}"
    )
    wait_live(person)
    assert "live updates on" in text_of(person, "#live-note").lower()

    # While the server is down, a refresh already scheduled finds nobody there.
    person.console.allow(r"Failed to load resource: net::ERR_CONNECTION_REFUSED")
    person.console.allow(r"htmx:(sendError|afterRequest)")
    person.console.allow(r"/events\?project_id=.* - Failed to load resource")
    person.console.allow(r"/task\?project_id=.* - Failed to load resource: .* 401")
    person.console.allow(r"Response Status Error Code 401 from /deep-work/task\?")
    server.proc.terminate()
    server.proc.wait(timeout=20)
    wait(
        person,
        lambda d: (
            d.find_element(By.TAG_NAME, "body").get_attribute("data-live-state") != "connected"
        ),
        "the page did not notice the stream dropped",
    )
    restarted = _start(tmp_path / "demo.db", server.port)
    try:
        wait(
            person,
            lambda d: "/deep-work/login" in d.current_url,
            "the page stayed put with its session gone",
        )
        assert "task_id" in driver.current_url  # back to the task after signing in
    finally:
        restarted.proc.terminate()
        restarted.proc.wait(timeout=20)
