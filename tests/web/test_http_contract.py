"""The HTTP contract (CONTRACT.md sections 1 and 4), run against every web adapter.

The same requests and the same assertions go to Starlette, FastAPI, Flask,
Django and aiohttp, each served by a real server on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from web_harness import ALICE, BOB, BODY_TIMEOUT, PREFIX, World, auth, seg, task_url, url

from deepwork_retry.web._http import ERROR_CODES

JSON = "application/json"


def assert_error(
    response: httpx.Response,
    status: int,
    code: str,
    detail: str,
    headers: dict[str, str] | None = None,
) -> None:
    """An error answer: its status, and a body of exactly ``detail`` and ``code``."""
    assert (status, {"detail": detail, "code": code}) == (response.status_code, response.json())
    assert status in ERROR_CODES[code], (code, status)
    assert JSON == response.headers["content-type"]
    for name, value in (headers or {}).items():
        assert value == response.headers.get(name)


def retry(http: httpx.Client, project_id: str, task_id: str, **kwargs: Any) -> httpx.Response:
    kwargs.setdefault("headers", auth())
    return http.post(task_url(project_id, task_id, "/retry"), **kwargs)


# -- CONTRACT §1, row by row ------------------------------------------------------------


def test_missing_authorization_header_is_401_not_authenticated(
    http: httpx.Client, world: World
) -> None:
    """No Authorization header: 401, WWW-Authenticate: Bearer, nothing changes."""
    pid = world.project()
    tid = world.blocked(pid)
    before = world.snapshot(pid)
    response = retry(http, pid, tid, headers={})
    assert_error(
        response, 401, "not_authenticated", "Not authenticated", {"www-authenticate": "Bearer"}
    )
    assert before == world.snapshot(pid)


@pytest.mark.parametrize(
    "header", ["Basic YWxpY2U6cHc=", "Bearer", "Bearer" + ALICE, ALICE, "Token x"]
)
def test_authorization_not_bearer_token_is_401_not_authenticated(
    http: httpx.Client, world: World, header: str
) -> None:
    """An Authorization header that is not ``Bearer <token>`` is 401 Not authenticated."""
    pid = world.project()
    tid = world.blocked(pid)
    before = world.snapshot(pid)
    response = retry(http, pid, tid, headers={"Authorization": header})
    assert_error(
        response, 401, "not_authenticated", "Not authenticated", {"www-authenticate": "Bearer"}
    )
    assert before == world.snapshot(pid)


def test_unknown_token_is_401_invalid_token(http: httpx.Client, world: World) -> None:
    """A token the authenticator does not know: 401 with error="invalid_token"."""
    pid = world.project()
    tid = world.blocked(pid)
    before = world.snapshot(pid)
    response = retry(http, pid, tid, headers=auth("not-a-known-token"))
    assert_error(
        response,
        401,
        "invalid_token",
        "Invalid token",
        {"www-authenticate": 'Bearer error="invalid_token"'},
    )
    assert before == world.snapshot(pid)


def test_principal_without_access_gets_404_project_not_found(
    http: httpx.Client, world: World
) -> None:
    """A valid token for a principal that may not act in the project sees 404, not 403."""
    pid = world.project()
    tid = world.blocked(pid)
    before = world.snapshot(pid)
    assert_error(
        retry(http, pid, tid, headers=auth(BOB)), 404, "project_not_found", "Project not found"
    )
    assert before == world.snapshot(pid)


def test_unknown_project_is_404(http: httpx.Client, world: World) -> None:
    """A project that does not exist: 404 Project not found."""
    assert_error(
        retry(http, "no-such-project", "t1"), 404, "project_not_found", "Project not found"
    )


def test_unknown_task_is_404(http: httpx.Client, world: World) -> None:
    """A task that does not exist in the project: 404 Task not found."""
    pid = world.project()
    world.blocked(pid)
    before = world.snapshot(pid)
    assert_error(retry(http, pid, "no-such-task"), 404, "task_not_found", "Task not found")
    assert before == world.snapshot(pid)


def test_task_of_another_project_is_404(http: httpx.Client, world: World) -> None:
    """A task id that exists only in another project is "Task not found" here."""
    pid, other = world.project(), world.project()
    tid = world.blocked(other, "elsewhere")
    world.blocked(pid)
    before = world.snapshot(pid), world.snapshot(other)
    assert_error(retry(http, pid, tid), 404, "task_not_found", "Task not found")
    assert before == (world.snapshot(pid), world.snapshot(other))


@pytest.mark.parametrize("status", ["done", "inbox", "assigned"])
def test_task_not_blocked_is_400_naming_its_status(
    http: httpx.Client, world: World, status: str
) -> None:
    """Retrying a task that is not blocked is 400 with the status found."""
    pid = world.project()
    if status == "done":
        world.done(pid, "t1")
    else:
        world.executor.add_task(pid, "t1")
        if status == "assigned":
            world.executor.assign(pid, "t1")
    before = world.snapshot(pid)
    assert_error(
        retry(http, pid, "t1"),
        400,
        "task_not_blocked",
        f"Can only retry tasks with status 'blocked', got '{status}'",
    )
    assert before == world.snapshot(pid)


@pytest.mark.parametrize("status", ["cancelled", "completed", "failed", "draft"])
def test_project_that_cannot_take_work_is_409(
    http: httpx.Client, world: World, status: str
) -> None:
    """A blocked task in a project that takes no work is 409 naming the project status."""
    pid = world.project()
    tid = world.blocked(pid)
    world.executor.set_project_status(pid, status)
    before = world.snapshot(pid)
    assert_error(
        retry(http, pid, tid),
        409,
        "project_not_runnable",
        f"Cannot retry tasks in a '{status}' project",
    )
    assert before == world.snapshot(pid)


def test_not_blocked_is_reported_before_project_status(http: httpx.Client, world: World) -> None:
    """The 400 check runs before the 409 check, as the contract orders them."""
    pid = world.project()
    world.done(pid, "t1")
    world.executor.set_project_status(pid, "cancelled")
    assert_error(
        retry(http, pid, "t1"),
        400,
        "task_not_blocked",
        "Can only retry tasks with status 'blocked', got 'done'",
    )


def test_storage_unavailable_is_503_with_retry_after(http: httpx.Client, world: World) -> None:
    """Storage down: 503 with Retry-After and a plain detail, and nothing changes."""
    pid = world.project()
    tid = world.blocked(pid)
    before = world.snapshot(pid)
    world.storage.down = True
    try:
        response = retry(http, pid, tid)
    finally:
        world.storage.down = False
    assert_error(
        response,
        503,
        "storage_unavailable",
        "Storage is unavailable; try again later",
        {"retry-after": "7"},
    )
    assert before == world.snapshot(pid)


def test_storage_unavailable_on_reads_is_503(http: httpx.Client, world: World) -> None:
    """Read endpoints report an unreachable storage the same way."""
    pid = world.project()
    world.storage.down = True
    try:
        response = http.get(url("projects", seg(pid), "progress"), headers=auth())
    finally:
        world.storage.down = False
    assert_error(
        response,
        503,
        "storage_unavailable",
        "Storage is unavailable; try again later",
        {"retry-after": "7"},
    )


# -- success ----------------------------------------------------------------------------


def seed_project(world: World) -> tuple[str, str]:
    """The seed's example: 8 tasks, 4 done, 1 in progress, task-3 blocked."""
    pid = world.project()
    ex = world.executor
    for n in (1, 2, 4, 5):
        world.done(pid, f"task-{n}")
    tid = world.blocked(pid, "task-3", title="Implement user authentication")
    ex.add_task(pid, "task-6")
    ex.assign(pid, "task-6")
    ex.start(pid, "task-6", 1)
    ex.add_task(pid, "task-7")
    ex.add_task(pid, "task-8")
    return pid, tid


def test_retry_succeeds_with_the_seed_response(http: httpx.Client, world: World) -> None:
    """200: task assigned, retry_count + 1, error cleared, max_retries kept, progress after."""
    pid, tid = seed_project(world)
    response = retry(http, pid, tid, headers={**auth(), "Content-Type": JSON})
    assert 200 == response.status_code
    assert JSON == response.headers["content-type"]
    body = response.json()
    assert True is body["success"]
    task = body["task"]
    expected_task = {
        "id": "task-3",
        "project_id": pid,
        "title": "Implement user authentication",
        "status": "assigned",
        "retry_count": 2,
        "max_retries": 1,
        "error_message": None,
    }
    assert expected_task == {k: task[k] for k in expected_task}
    stored = world.memory.load(pid, tid)[1]
    assert stored.updated_at.isoformat() == task["updated_at"]
    expected_progress = {"total": 8, "completed": 4, "in_progress": 1, "percent": 50}
    assert expected_progress == {k: body["progress"][k] for k in expected_progress}
    assert {"status": "dispatched", "task_id": tid, "attempt": 3, "error": None} == body["dispatch"]
    assert 1 == world.recorder.count(pid)


def test_retry_keeps_the_cleared_error_in_the_attempt_history(
    http: httpx.Client, world: World
) -> None:
    """The error the retry cleared stays in the attempts endpoint's history."""
    pid = world.project()
    tid = world.blocked(pid)
    assert 200 == retry(http, pid, tid).status_code
    attempts = http.get(task_url(pid, tid, "/attempts"), headers=auth()).json()["attempts"]
    assert [1, 2, 3] == [a["number"] for a in attempts]
    assert "second failure" == attempts[1]["error_message"]
    assert ("manual_retry", "alice") == (attempts[2]["trigger"], attempts[2]["actor"])


def test_dispatch_pending_when_the_dispatcher_fails(http: httpx.Client, world: World) -> None:
    """A dispatcher failure still commits the retry: 200 with dispatch status pending."""
    pid = world.project()
    tid = world.blocked(pid)
    world.recorder.failing.add(tid)
    response = retry(http, pid, tid)
    assert 200 == response.status_code
    dispatch = response.json()["dispatch"]
    assert "pending" == dispatch["status"]
    assert "The dispatcher failed; the outbox relay will deliver it" == dispatch["error"]
    assert "assigned" == world.memory.load(pid, tid)[1].status


def test_dispatch_deferred_in_a_paused_project(http: httpx.Client, world: World) -> None:
    """A paused project accepts the retry and defers its dispatch."""
    pid = world.project()
    tid = world.blocked(pid)
    world.executor.set_project_status(pid, "paused")
    response = retry(http, pid, tid)
    assert (200, "deferred") == (response.status_code, response.json()["dispatch"]["status"])
    assert 0 == world.recorder.count(pid)


def test_second_retry_is_400_with_the_status_found(http: httpx.Client, world: World) -> None:
    """After one retry the task is assigned, so a second is 400 and changes nothing."""
    pid = world.project()
    tid = world.blocked(pid)
    assert 200 == retry(http, pid, tid).status_code
    before = world.snapshot(pid)
    assert_error(
        retry(http, pid, tid),
        400,
        "task_not_blocked",
        "Can only retry tasks with status 'blocked', got 'assigned'",
    )
    assert before == world.snapshot(pid)


# -- §4: the optional body ----------------------------------------------------------------


@pytest.mark.parametrize(("budget", "retries_left"), [("one_more", 0), ("full", 1)])
def test_budget_is_applied_and_recorded(
    http: httpx.Client, world: World, budget: str, retries_left: int
) -> None:
    """The body's budget sets the automatic budget and is recorded on the attempt."""
    pid = world.project()
    tid = world.blocked(pid)
    response = retry(http, pid, tid, json={"budget": budget, "reason": "fixed the API key"})
    assert 200 == response.status_code
    assert retries_left == response.json()["task"]["retries_left"]
    attempt = world.memory.attempts(pid, tid)[-1]
    assert (budget, "fixed the API key", "alice") == (
        attempt.budget,
        attempt.reason,
        attempt.actor,
    )


def test_no_body_means_one_more(http: httpx.Client, world: World) -> None:
    """Without a body the retry gives exactly one more execution (budget one_more)."""
    pid = world.project()
    tid = world.blocked(pid)
    assert 200 == retry(http, pid, tid).status_code
    attempt = world.memory.attempts(pid, tid)[-1]
    assert ("one_more", None) == (attempt.budget, attempt.reason)


@pytest.mark.parametrize("body", [b"null", b"{}", b"  ", b'{"budget": null, "reason": null}'])
def test_empty_bodies_are_accepted(http: httpx.Client, world: World, body: bytes) -> None:
    """Empty, whitespace, ``null`` and all-null bodies mean "no options"."""
    pid = world.project()
    tid = world.blocked(pid)
    headers = {**auth(), "Content-Type": JSON}
    assert 200 == retry(http, pid, tid, content=body, headers=headers).status_code


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"{not json", "Request body is not valid JSON"),
        (b"{bad", "Request body is not valid JSON"),
        (b'{"budget": "full",}', "Request body is not valid JSON"),
        (b"[1, 2]", "Request body must be a JSON object"),
        (b"\xff\xfe", "Request body is not valid JSON"),
        (b'"one_more"', "Request body must be a JSON object"),
        (b'{"budget": "twice"}', "budget must be 'one_more' or 'full'"),
        (b'{"budget": 1}', "budget must be 'one_more' or 'full'"),
        (b'{"reason": 42}', "reason must be a string of at most 2000 characters"),
        (
            b'{"reason": "' + b"x" * 2001 + b'"}',
            "reason must be a string of at most 2000 characters",
        ),
        (b'{"budgett": "full"}', "Unknown field in request body: 'budgett'"),
        (b'{"reason": "half a pair \\ud800"}', "reason must be valid Unicode text"),
        (b"[" * 50000 + b"]" * 50000, "Request body is larger than 65536 bytes"),
        (b"[" * 30000 + b"]" * 30000, "Request body must be a JSON object"),
    ],
)
def test_bad_bodies_are_422_and_change_nothing(
    http: httpx.Client, world: World, body: bytes, detail: str
) -> None:
    """A body that is not the documented JSON object is refused with a clear detail."""
    pid = world.project()
    tid = world.blocked(pid)
    before = world.snapshot(pid)
    response = retry(http, pid, tid, content=body, headers={**auth(), "Content-Type": JSON})
    status, code = (413, "body_too_large") if "larger" in detail else (422, "invalid_input")
    assert_error(response, status, code, detail)
    assert before == world.snapshot(pid)


# -- §4: Idempotency-Key --------------------------------------------------------------------


def test_idempotency_key_replays_the_first_response(http: httpx.Client, world: World) -> None:
    """A repeat with the same key gets the first status and body, without a second retry."""
    pid = world.project()
    tid = world.blocked(pid)
    headers = {**auth(), "Idempotency-Key": f"retry-once-{pid}"}
    first = retry(http, pid, tid, headers=headers)
    after_first = world.snapshot(pid)
    second = retry(http, pid, tid, headers=headers)
    assert (200, first.content) == (second.status_code, second.content)
    assert "true" == second.headers.get("idempotent-replayed")
    assert after_first == world.snapshot(pid)
    assert 1 == world.recorder.count(pid)


def test_idempotency_key_replays_a_refusal(http: httpx.Client, world: World) -> None:
    """A 400 answered under a key is replayed even after the task became retryable."""
    pid = world.project()
    world.executor.add_task(pid, "t1", max_retries=0)
    headers = {**auth(), "Idempotency-Key": f"k-400-{pid}"}
    first = retry(http, pid, "t1", headers=headers)
    assert 400 == first.status_code
    world.executor.assign(pid, "t1")
    world.executor.start(pid, "t1", 1)
    world.executor.fail(pid, "t1", 1, RuntimeError("now blocked"))
    before = world.snapshot(pid)
    second = retry(http, pid, "t1", headers=headers)
    assert (400, first.content) == (second.status_code, second.content)
    assert before == world.snapshot(pid)


def test_idempotency_key_reused_for_another_task_is_422(http: httpx.Client, world: World) -> None:
    """The same key sent for a different task is refused and that task is not retried."""
    pid = world.project()
    t1, t2 = world.blocked(pid, "t1"), world.blocked(pid, "t2")
    headers = {**auth(), "Idempotency-Key": f"shared-{pid}"}
    assert 200 == retry(http, pid, t1, headers=headers).status_code
    before = world.snapshot(pid)
    assert_error(
        retry(http, pid, t2, headers=headers),
        422,
        "idempotency_key_reused",
        "Idempotency-Key was already used for a different request; "
        "send a new key for a new request",
    )
    assert before == world.snapshot(pid)


def test_idempotency_key_reuse_keeps_the_earlier_checks_first(
    http: httpx.Client, world: World
) -> None:
    """A reused key for a missing task is still 404, as the contract orders the checks."""
    pid = world.project()
    tid = world.blocked(pid)
    headers = {**auth(), "Idempotency-Key": f"order-{pid}"}
    assert 200 == retry(http, pid, tid, headers=headers).status_code
    assert_error(
        retry(http, pid, "missing", headers=headers), 404, "task_not_found", "Task not found"
    )


def test_idempotency_keys_are_scoped_per_principal(http: httpx.Client, world: World) -> None:
    """Two principals using the same key do not see each other's responses."""
    pid = world.project(prefix="bob-")
    t1, t2 = world.blocked(pid, "t1"), world.blocked(pid, "t2")
    key = {"Idempotency-Key": f"same-{pid}"}
    assert 200 == retry(http, pid, t1, headers={**auth(ALICE), **key}).status_code
    response = retry(http, pid, t2, headers={**auth(BOB), **key})
    assert (200, "bob") == (response.status_code, world.memory.attempts(pid, t2)[-1].actor)


@pytest.mark.parametrize("key", ["", "a b", "k" * 256, "caf\u00e9"])
def test_malformed_idempotency_key_is_422(http: httpx.Client, world: World, key: str) -> None:
    """An Idempotency-Key that is empty, too long or not visible ASCII is refused."""
    pid = world.project()
    tid = world.blocked(pid)
    before = world.snapshot(pid)
    headers = [(b"Authorization", f"Bearer {ALICE}".encode()), (b"Idempotency-Key", key.encode())]
    assert_error(
        retry(http, pid, tid, headers=headers),
        422,
        "invalid_input",
        "Idempotency-Key must be 1 to 255 visible ASCII characters",
    )
    assert before == world.snapshot(pid)


# -- §4: read endpoints ------------------------------------------------------------------------


def test_task_endpoint_explains_whether_it_can_be_retried(http: httpx.Client, world: World) -> None:
    """GET task: the stored task and the can_retry answer a UI needs for its button."""
    pid = world.project()
    tid = world.blocked(pid)
    world.done(pid, "t2")
    blocked = http.get(task_url(pid, tid), headers=auth())
    assert 200 == blocked.status_code
    assert ("blocked", "second failure") == (
        blocked.json()["task"]["status"],
        blocked.json()["task"]["error_message"],
    )
    assert {"allowed": True, "code": None, "reason": None} == blocked.json()["can_retry"]
    done = http.get(task_url(pid, "t2"), headers=auth()).json()["can_retry"]
    expected = {
        "allowed": False,
        "code": "not_blocked",
        "reason": "Can only retry tasks with status 'blocked', got 'done'",
    }
    assert expected == done


def test_progress_endpoint(http: httpx.Client, world: World) -> None:
    """GET progress: the project's counters and percent."""
    pid, _ = seed_project(world)
    body = http.get(url("projects", seg(pid), "progress"), headers=auth()).json()
    assert {"id": pid, "status": "executing", "name": ""} == body["project"]
    expected = {"total": 8, "completed": 4, "in_progress": 1, "percent": 50, "blocked": 1}
    assert expected == {k: body["progress"][k] for k in expected}


def test_blocked_tasks_are_paged(http: httpx.Client, world: World) -> None:
    """GET tasks?status=blocked pages through the blocked tasks in id order."""
    pid = world.project()
    for tid in ("a", "b", "c"):
        world.blocked(pid, tid)
    world.done(pid, "d")
    path = url("projects", seg(pid), "tasks")
    first = http.get(path, params={"status": "blocked", "limit": "2"}, headers=auth()).json()
    assert (["a", "b"], "b") == ([t["id"] for t in first["tasks"]], first["next_after"])
    rest = http.get(path, params={"limit": "2", "after": "b"}, headers=auth()).json()
    assert (["c"], None) == ([t["id"] for t in rest["tasks"]], rest["next_after"])


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({"status": "done"}, "status must be 'blocked' (the only listing offered)"),
        ({"limit": "0"}, "limit must be an integer from 1 to 1000"),
        ({"limit": "1001"}, "limit must be an integer from 1 to 1000"),
        ({"limit": "ten"}, "limit must be an integer from 1 to 1000"),
        ({"after": "x" * 300}, "after must be a task id"),
        ({"colour": "blue"}, "Unknown query parameter: 'colour'"),
    ],
)
def test_bad_listing_parameters_are_422(
    http: httpx.Client, world: World, params: dict[str, str], detail: str
) -> None:
    """Listing parameters outside their documented form are refused with 422."""
    pid = world.project()
    response = http.get(url("projects", seg(pid), "tasks"), params=params, headers=auth())
    assert_error(response, 422, "invalid_input", detail)


@pytest.mark.parametrize("suffix", ["", "/attempts"])
def test_reads_need_authentication_and_access(
    http: httpx.Client, world: World, suffix: str
) -> None:
    """Read endpoints refuse missing tokens (401) and hide other projects (404)."""
    pid = world.project()
    tid = world.blocked(pid)
    path = task_url(pid, tid, suffix)
    assert_error(
        http.get(path),
        401,
        "not_authenticated",
        "Not authenticated",
        {"www-authenticate": "Bearer"},
    )
    assert_error(http.get(path, headers=auth(BOB)), 404, "project_not_found", "Project not found")
    assert_error(
        http.get(task_url(pid, "nope", suffix), headers=auth()),
        404,
        "task_not_found",
        "Task not found",
    )
    progress = url("projects", seg(pid), "progress")
    assert_error(
        http.get(progress, headers=auth(BOB)), 404, "project_not_found", "Project not found"
    )


# -- §4: bulk retry ---------------------------------------------------------------------------


def test_bulk_dry_run_reports_per_task_and_changes_nothing(
    http: httpx.Client, world: World
) -> None:
    """A dry run says for each blocked task whether it would be retried, and retries none."""
    pid = world.project()
    for tid in ("a", "b"):
        world.blocked(pid, tid)
    world.executor.set_project_status(pid, "cancelled")
    before = world.snapshot(pid)
    response = http.post(
        url("projects", seg(pid), "retry-blocked"), json={"dry_run": True}, headers=auth()
    )
    assert 200 == response.status_code
    body = response.json()
    detail = "Cannot retry tasks in a 'cancelled' project"
    assert (True, 0, 0, None) == (
        body["dry_run"],
        body["retried"],
        body["would_retry"],
        body["next_after"],
    )
    assert [("a", False, detail), ("b", False, detail)] == [
        (i["task_id"], i["would_retry"], i["detail"]) for i in body["items"]
    ]
    assert before == world.snapshot(pid)


def test_bulk_retry_retries_every_blocked_task(http: httpx.Client, world: World) -> None:
    """The bulk retry retries each blocked task once, recording budget, reason and actor."""
    pid = world.project()
    for tid in ("a", "b", "c"):
        world.blocked(pid, tid)
    world.done(pid, "d")
    dry = http.post(
        url("projects", seg(pid), "retry-blocked"), json={"dry_run": True}, headers=auth()
    ).json()
    assert [True, True, True] == [i["would_retry"] for i in dry["items"]]
    assert (0, 3) == (dry["retried"], dry["would_retry"])
    assert 0 == world.recorder.count(pid)
    response = http.post(
        url("projects", seg(pid), "retry-blocked"),
        json={"budget": "full", "reason": "upstream fixed", "limit": 2},
        headers=auth(),
    )
    body = response.json()
    assert (200, 2, "b") == (response.status_code, body["retried"], body["next_after"])
    assert "would_retry" not in body
    assert [("a", True, "dispatched"), ("b", True, "dispatched")] == [
        (i["task_id"], i["retried"], i["dispatch"]) for i in body["items"]
    ]
    attempt = world.memory.attempts(pid, "a")[-1]
    assert ("full", "upstream fixed", "alice") == (attempt.budget, attempt.reason, attempt.actor)
    rest = http.post(url("projects", seg(pid), "retry-blocked"), headers=auth()).json()
    assert (["c"], None) == ([i["task_id"] for i in rest["items"]], rest["next_after"])
    assert 3 == world.recorder.count(pid)


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"dry_run": "yes"}, "dry_run must be true or false"),
        ({"limit": 0}, "limit must be an integer from 1 to 1000"),
        ({"limit": True}, "limit must be an integer from 1 to 1000"),
        ({"after": 5}, "after must be a task id"),
        ({"budget": "all"}, "budget must be 'one_more' or 'full'"),
        ({"after": "\ud800"}, "after must be a task id"),
        ({"reason": "\udc80"}, "reason must be valid Unicode text"),
    ],
)
def test_bad_bulk_bodies_are_422(
    http: httpx.Client, world: World, body: dict[str, Any], detail: str
) -> None:
    """A bulk body outside its documented form is refused and retries nothing."""
    pid = world.project()
    world.blocked(pid)
    before = world.snapshot(pid)
    response = http.post(
        url("projects", seg(pid), "retry-blocked"),
        content=json.dumps(body).encode("ascii"),  # ASCII escapes carry lone surrogates
        headers={**auth(), "Content-Type": JSON},
    )
    assert_error(response, 422, "invalid_input", detail)
    assert before == world.snapshot(pid)


# -- routing and odd ids ------------------------------------------------------------------------


def test_unknown_route_under_the_prefix_is_json_404(http: httpx.Client) -> None:
    """Paths under the prefix that name no operation get a JSON 404."""
    for path in ("/projects/p", "/project", "/blocked/p"):
        assert_error(http.get(PREFIX + path, headers=auth()), 404, "route_not_found", "Not Found")


def test_wrong_method_is_405_with_allow(http: httpx.Client, world: World) -> None:
    """A GET on the retry endpoint is 405 and names the allowed method."""
    pid = world.project()
    response = http.get(task_url(pid, "t1", "/retry"), headers=auth())
    assert_error(response, 405, "method_not_allowed", "Method Not Allowed", {"allow": "POST"})


@pytest.mark.parametrize(
    "task_id",
    ["", "a/b", "line\nbreak", "..", ".", "\u00e9\u4e2d\U0001f600", "x" * 300, "%", "?#&", " "],
)
def test_odd_task_ids_are_json_404(http: httpx.Client, world: World, task_id: str) -> None:
    """Ids of any alphabet and length are looked up (or refused) without a 500."""
    pid = world.project()
    world.blocked(pid)
    before = world.snapshot(pid)
    response = retry(http, pid, task_id)
    assert response.status_code == 404, response.text
    assert JSON == response.headers["content-type"]
    assert response.json() in (
        {"detail": "Task not found", "code": "task_not_found"},
        {"detail": "Not Found", "code": "route_not_found"},
    )
    assert before == world.snapshot(pid)


def test_odd_ids_are_found_when_they_exist(http: httpx.Client, world: World) -> None:
    """A task whose id has spaces, unicode and punctuation is reachable and retried."""
    pid = world.project()
    tid = world.blocked(pid, "t 1 \u00e9\u4e2d?#&.%")
    response = retry(http, pid, tid)
    assert (200, tid) == (response.status_code, response.json()["task"]["id"])


def test_error_bodies_are_exactly_a_detail_and_a_code(http: httpx.Client, world: World) -> None:
    """Every error body is a JSON object of two strings: ``detail`` and a known ``code``."""
    pid = world.project()
    for response in (
        retry(http, pid, "t", headers={}),
        retry(http, pid, "t", headers=auth("nope")),
        retry(http, pid, "t"),
        retry(http, pid, "t", content=b"{"),
    ):
        body = json.loads(response.content)
        assert (["detail", "code"], str) == (list(body), type(body["detail"]))
        assert response.status_code in ERROR_CODES[body["code"]], body


# -- chunked request bodies -------------------------------------------------------------------


def chunked(body: bytes, size: int = 7) -> Iterator[bytes]:
    """``body`` in small pieces: httpx sends an iterator with Transfer-Encoding: chunked."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_chunked_body_is_read_and_checked(http: httpx.Client, world: World) -> None:
    """A chunked body with a wrong type is refused like the same body with a length."""
    pid = world.project()
    tid = world.blocked(pid)
    before = world.snapshot(pid)
    response = retry(http, pid, tid, content=chunked(b'{"budget":5}'))
    assert_error(response, 422, "invalid_input", "budget must be 'one_more' or 'full'")
    assert before == world.snapshot(pid)


def test_chunked_body_options_are_applied(http: httpx.Client, world: World) -> None:
    """A valid chunked body's budget and reason are applied and recorded."""
    pid = world.project()
    tid = world.blocked(pid)
    body = b'{"budget":"full","reason":"sent in chunks"}'
    response = retry(http, pid, tid, content=chunked(body))
    assert (200, 1) == (response.status_code, response.json()["task"]["retries_left"])
    attempt = world.memory.attempts(pid, tid)[-1]
    assert ("full", "sent in chunks") == (attempt.budget, attempt.reason)


def test_chunked_body_over_the_limit_is_413(http: httpx.Client, world: World) -> None:
    """A 1 MB chunked body is refused with 413 (read no further than the limit)."""
    pid = world.project()
    tid = world.blocked(pid)
    before = world.snapshot(pid)
    body = b'{"reason": "' + b"x" * (1024 * 1024) + b'"}'
    response = retry(http, pid, tid, content=chunked(body, 64 * 1024))
    assert_error(response, 413, "body_too_large", "Request body is larger than 65536 bytes")
    assert before == world.snapshot(pid)


# -- CONTRACT §5: edges, every adapter alike -----------------------------------------------------

RETRY_LACKS = ["OPTIONS", "TRACE", "GET", "HEAD", "PUT", "PATCH", "DELETE", "BREW"]


@pytest.mark.parametrize("method", RETRY_LACKS)
def test_a_method_the_retry_route_lacks_is_json_405_allowing_only_post(
    http: httpx.Client, world: World, adapter: str, method: str
) -> None:
    """Any other method on /retry, OPTIONS and unknown ones included, is the API's JSON 405."""
    pid = world.project()
    tid = world.blocked(pid)
    before = world.snapshot(pid)
    response = http.request(method, task_url(pid, tid, "/retry"), headers=auth())
    if adapter == "aiohttp" and method == "BREW":
        # aiohttp's parser refuses a method it does not know before any application
        # sees the request (docs/web/aiohttp.md); it quotes the request line only.
        assert 400 == response.status_code
        assert ALICE not in response.text
    elif method == "HEAD":
        assert (405, "POST", b"") == (
            response.status_code,
            response.headers["allow"],
            response.content,
        )
    else:
        assert_error(response, 405, "method_not_allowed", "Method Not Allowed", {"allow": "POST"})
    assert before == world.snapshot(pid)


@pytest.mark.parametrize("method", ["OPTIONS", "TRACE", "POST", "DELETE"])
def test_a_method_a_read_route_lacks_is_json_405_allowing_only_get(
    http: httpx.Client, world: World, method: str
) -> None:
    """A read route answers other methods with 405 naming GET alone."""
    pid = world.project()
    response = http.request(method, url("projects", seg(pid), "progress"), headers=auth())
    assert_error(response, 405, "method_not_allowed", "Method Not Allowed", {"allow": "GET"})


@pytest.mark.parametrize(
    "path",
    [
        PREFIX,
        PREFIX + "/",
        PREFIX + "/projects/",
        PREFIX + "/blocked/",
        PREFIX + "//projects",
        PREFIX + "/projects/p/progress/",
        PREFIX + "//projects/p/progress",
        PREFIX + "/projects/p/tasks/t/retry/",
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST", "OPTIONS"])
def test_paths_that_are_no_route_are_json_404_never_a_redirect(
    http: httpx.Client, path: str, method: str
) -> None:
    """The prefix itself and paths with a missing or extra slash are 404, with no Location."""
    response = http.request(method, path, headers=auth())
    assert_error(response, 404, "route_not_found", "Not Found")
    assert "location" not in response.headers


@pytest.mark.parametrize(
    "query", ["after=%ED%A0%80", "after=%FF", "limit=%C0%B1", "%ED%A0%80=1", "after=a%80b"]
)
def test_undecodable_query_is_422_on_every_adapter(
    http: httpx.Client, world: World, query: str
) -> None:
    """A query whose percent-escapes are not UTF-8 is refused alike, not read as another value."""
    pid = world.project()
    world.blocked(pid)
    response = http.get(url("projects", seg(pid), "tasks") + "?" + query, headers=auth())
    assert_error(response, 422, "invalid_input", "Query string is not valid UTF-8")


@pytest.mark.parametrize(
    ("method", "suffix"),
    [("POST", "/tasks/%ED%A0%80/retry"), ("GET", "/tasks/a%FFb"), ("GET", "/progress%C0")],
)
def test_undecodable_path_is_422_on_every_adapter(
    http: httpx.Client, world: World, method: str, suffix: str
) -> None:
    """A path whose percent-escapes are not UTF-8 is refused alike, whatever each framework
    would make of it (a replacement character, or the escape kept as it was)."""
    pid = world.project()
    world.blocked(pid)
    before = world.snapshot(pid)
    response = http.request(method, url("projects", seg(pid)) + suffix, headers=auth())
    assert_error(response, 422, "invalid_input", "Request path is not valid UTF-8")
    assert before == world.snapshot(pid)


def test_encoded_query_values_are_decoded_alike(http: httpx.Client, world: World) -> None:
    """Percent-escaped UTF-8 and ``+`` in a query decode the same on every adapter."""
    pid = world.project()
    for tid in ("a b", "\u00e9t\u00e9", "\u00fc"):
        world.blocked(pid, tid)
    path = url("projects", seg(pid), "tasks")
    first = http.get(path + "?after=a+b&limit=1", headers=auth()).json()
    second = http.get(path + "?after=%C3%A9t%C3%A9", headers=auth()).json()
    assert (["\u00e9t\u00e9"], ["\u00fc"]) == (
        [t["id"] for t in first["tasks"]],
        [t["id"] for t in second["tasks"]],
    )


def _address(server: str) -> tuple[str, int]:
    parts = urlsplit(server)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


def _raw(server: str, request: bytes) -> tuple[bytes, float]:
    """Send ``request`` on a new connection and read until the server closes it.

    Returns what was read and how long the server took to close (at most 60 s).
    """
    started = time.monotonic()
    with socket.create_connection(_address(server), timeout=60) as sock:
        sock.sendall(request)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received, time.monotonic() - started


def test_a_body_that_stops_arriving_closes_the_connection(
    server: str, world: World, adapter: str
) -> None:
    """A body that declares 100 bytes and sends 2 is cut off after the body timeout."""
    pid = world.project()
    tid = world.blocked(pid)
    before = world.snapshot(pid)
    head = (
        f"POST {task_url(pid, tid, '/retry')} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {ALICE}\r\nContent-Type: application/json\r\n"
        "Content-Length: 100\r\n\r\n{}"
    )
    received, took = _raw(server, head.encode())
    # Closed soon after the timeout, not held for as long as the client likes.
    assert took < BODY_TIMEOUT + 10, took
    if received:
        status_line, _, rest = received.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 408"), received[:200]
        assert rest.endswith(
            b'{"detail":"Request body did not arrive in time","code":"request_timeout"}'
        ), rest
    assert before == world.snapshot(pid)


def test_a_client_that_disconnects_mid_body_is_answered_nothing_and_logged_quietly(
    server: str, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that goes away mid-body changes nothing, and no error or 500 is logged."""
    caplog.set_level(logging.INFO)
    pid = world.project()
    tid = world.blocked(pid)
    before = world.snapshot(pid)
    head = (
        f"POST {task_url(pid, tid, '/retry')} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {ALICE}\r\nContent-Length: 100\r\n\r\n{{}}"
    )
    with socket.create_connection(_address(server), timeout=10) as sock:
        sock.sendall(head.encode())
        time.sleep(0.2)  # the server is now waiting for the rest of the body
    # A later request on a new connection, then a moment for the server to finish.
    with httpx.Client(base_url=server, timeout=10) as client:
        assert 200 == client.get(url("projects", seg(pid), "progress"), headers=auth()).status_code
    time.sleep(0.5)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [] == [r.getMessage() for r in errors]
    assert [] == [r.getMessage() for r in caplog.records if '" 500 ' in r.getMessage()]
    assert before == world.snapshot(pid)


WSGI_HEADER_LIMIT = {"flask", "django"}
"""Adapters whose test server (werkzeug's, like Python's http.server) refuses a header
line over 64 KiB itself, before the application (431)."""


def test_an_oversized_token_is_refused_without_echoing_it(
    http: httpx.Client, world: World, adapter: str
) -> None:
    """A 100 KB token is a JSON 401 where the request reaches the API, and never echoed."""
    pid = world.project()
    token = "T0k" * 34_000
    response = http.get(
        url("projects", seg(pid), "progress"), headers={"Authorization": f"Bearer {token}"}
    )
    assert token[:40] not in response.text
    if adapter in WSGI_HEADER_LIMIT:
        assert 431 == response.status_code
    else:
        assert_error(
            response,
            401,
            "invalid_token",
            "Invalid token",
            {"www-authenticate": 'Bearer error="invalid_token"'},
        )
