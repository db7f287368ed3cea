"""The reads across projects over HTTP (GET /projects, GET /blocked), on every adapter.

The servers share one world with every other web test, so each test makes its
projects under an id prefix of its own and reads the part of the lists after it.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from web_harness import ALICE, BOB, PREFIX, World, auth, seg, url

from deepwork_retry import AsyncRetryService, RetryService, TaskError
from deepwork_retry._core.inputs import blocked_cursor, parse_blocked_cursor
from deepwork_retry._core.results import progress_json
from deepwork_retry.auth import Principal, StaticTokens
from deepwork_retry.storage._to_async import AsyncFromSyncEvents
from deepwork_retry.storage.memory import MemoryStorage
from deepwork_retry.web import AsyncRetryAPI, RetryAPI
from deepwork_retry.web._http import ERROR_CODES, ApiRequest

JSON = "application/json"


def assert_error(response: httpx.Response, status: int, code: str, detail: str) -> None:
    assert (status, {"detail": detail, "code": code}) == (response.status_code, response.json())
    assert status in ERROR_CODES[code]
    assert JSON == response.headers["content-type"]


def fresh(prefix: str = "") -> str:
    """An id prefix no other test uses (the servers' world is shared)."""
    return f"{prefix}ov{uuid.uuid4().hex[:10]}-"


def make(world: World, base: str, name: str) -> str:
    """A project whose id starts with ``base + name``."""
    return world.project(prefix=base + name)


def block(world: World, pid: str, tid: str, error_type: str = "Fatal") -> None:
    ex = world.executor
    ex.add_task(pid, tid, max_retries=0)
    token = ex.assign(pid, tid).task.attempt
    ex.start(pid, tid, token)
    ex.fail(pid, tid, token, TaskError(type=error_type, message="boom", retryable=False))


def project_ids(
    http: httpx.Client, base: str, *, token: str = ALICE, limit: int = 2
) -> tuple[list[str], list[dict[str, Any]]]:
    """Every project id starting with ``base``, read page by page (and each page's body)."""
    found: list[str] = []
    pages: list[dict[str, Any]] = []
    after = base
    for _ in range(1000):
        response = http.get(
            url("projects"), params={"after": after, "limit": str(limit)}, headers=auth(token)
        )
        assert (200, JSON) == (response.status_code, response.headers["content-type"])
        body = response.json()
        pages.append(body)
        ids = [item["project"]["id"] for item in body["projects"]]
        found += [pid for pid in ids if pid.startswith(base)]
        if body["next_after"] is None or (ids and not ids[-1].startswith(base)):
            break
        after = body["next_after"]
    return found, pages


def blocked_keys(
    http: httpx.Client,
    base: str,
    *,
    token: str = ALICE,
    limit: int = 2,
    **params: str,
) -> list[tuple[str, str]]:
    """Every blocked task of the projects starting with ``base``, read page by page from
    the first cursor after ``base`` (each next page from the previous ``next_after``)."""
    found: list[tuple[str, str]] = []
    after = blocked_cursor(base, "\x01")  # before every task of a project under ``base``
    for _ in range(1000):
        query = {**params, "after": after, "limit": str(limit)}
        response = http.get(url("blocked"), params=query, headers=auth(token))
        assert (200, JSON) == (response.status_code, response.headers["content-type"])
        body = response.json()
        keys = [(t["project_id"], t["id"]) for t in body["tasks"]]
        found += [key for key in keys if key[0].startswith(base)]
        if body["next_after"] is None or (keys and not keys[-1][0].startswith(base)):
            break
        after = body["next_after"]
    return found


def test_projects_are_listed_by_id_with_their_progress(http: httpx.Client, world: World) -> None:
    """GET /projects pages through the projects in id order, each with the progress its
    progress route shows; next_after goes on from the last."""
    base = fresh()
    made = [make(world, base, name) for name in ("c", "a", "b/x", "b\ny")]
    for n, pid in enumerate(made):
        for k in range(n):
            block(world, pid, f"t{k}")
    found, pages = project_ids(http, base, limit=2)
    assert sorted(made) == found
    assert all(len(page["projects"]) <= 2 for page in pages)
    assert pages[0]["next_after"] == pages[0]["projects"][-1]["project"]["id"]
    for page in pages:
        for item in page["projects"]:
            pid = item["project"]["id"]
            if not pid.startswith(base):
                continue
            assert progress_json(world.memory.progress(pid)) == item["progress"]
            if "/" not in pid:  # a path route cannot name an id holding "/" on every adapter
                progress = http.get(url("projects", seg(pid), "progress"), headers=auth())
                assert progress.json() == item


def test_blocked_tasks_are_paged_across_projects(http: httpx.Client, world: World) -> None:
    """GET /blocked pages through blocked tasks by (project, task) id; the same task id in
    two projects is two rows; tasks not blocked are left out."""
    base = fresh()
    first, second = make(world, base, "a"), make(world, base, "b")
    for pid in (second, first):
        for tid in ("t/2", "t1", "T", "t\n3"):
            block(world, pid, tid)
        world.done(pid, "done")
    expected = sorted((pid, tid) for pid in (first, second) for tid in ("t/2", "t1", "T", "t\n3"))
    for limit in (1, 3, 8, 50):
        assert expected == blocked_keys(http, base, limit=limit), limit
    one = http.get(url("blocked"), params={"project_id": second}, headers=auth()).json()
    assert ([k for k in expected if k[0] == second], None) == (
        [(t["project_id"], t["id"]) for t in one["tasks"]],
        one["next_after"],
    )
    page = http.get(url("blocked"), params={"project_id": first, "limit": "2"}, headers=auth())
    cursor = page.json()["next_after"]
    assert expected[1] == parse_blocked_cursor(cursor)  # an opaque text: the last row's key


def test_blocked_tasks_are_kept_by_error_type(http: httpx.Client, world: World) -> None:
    base = fresh()
    pid = make(world, base, "p")
    block(world, pid, "a", "Timeout")
    block(world, pid, "b", "timeout")
    block(world, pid, "c", "Timeout")
    assert [(pid, "a"), (pid, "c")] == blocked_keys(http, base, error_type="Timeout", limit=1)
    assert [(pid, "b")] == blocked_keys(http, base, error_type="timeout")
    assert [] == blocked_keys(http, base, error_type="Time")


def test_a_principal_sees_only_its_projects(http: httpx.Client, world: World) -> None:
    """BOB (the authorizer: bob- projects only) never sees another's project or task, in
    either list, nor through project_id; a principal with a project set sees only those."""
    base, bob_base = fresh(), fresh("bob-")
    alice_pid = make(world, base, "a")
    bob_pids = [make(world, bob_base, name) for name in ("a", "b", "c")]
    for pid in (alice_pid, *bob_pids):
        block(world, pid, "t")
    found, pages = project_ids(http, bob_base, token=BOB, limit=2)
    assert sorted(bob_pids) == found
    seen = [item["project"]["id"] for page in pages for item in page["projects"]]
    assert all(pid.startswith("bob-") for pid in seen), seen
    assert [] == project_ids(http, base, token=BOB)[0]
    assert [(pid, "t") for pid in sorted(bob_pids)] == blocked_keys(http, bob_base, token=BOB)
    assert [] == blocked_keys(http, base, token=BOB)
    hidden = http.get(url("blocked"), params={"project_id": alice_pid}, headers=auth(BOB))
    assert (200, {"tasks": [], "next_after": None}) == (hidden.status_code, hidden.json())
    bad = {"project_id": alice_pid, "error_type": "E" * 256}  # refused alike, seen or not
    for token in (ALICE, BOB):
        response = http.get(url("blocked"), params=bad, headers=auth(token))
        assert_error(response, 422, "invalid_input", "error_type is longer than 255 characters")
    # A principal limited to one project: the storage is asked for that one only.
    token = f"dave-{uuid.uuid4().hex}"
    world.tokens.add(token, Principal(id="dave", projects=[bob_pids[1], alice_pid]))
    body = http.get(url("projects"), params={"limit": "1000"}, headers=auth(token)).json()
    assert ([bob_pids[1]], None) == (
        [item["project"]["id"] for item in body["projects"]],
        body["next_after"],
    )  # alice's project is in the set, and still refused by the authorizer
    body = http.get(url("blocked"), headers=auth(token)).json()
    assert [(bob_pids[1], "t")] == [(t["project_id"], t["id"]) for t in body["tasks"]]


@pytest.mark.parametrize("path", ["projects", "blocked"])
def test_the_lists_need_a_token(http: httpx.Client, path: str) -> None:
    response = http.get(url(path))
    assert_error(response, 401, "not_authenticated", "Not authenticated")
    assert "Bearer" == response.headers["www-authenticate"]
    response = http.get(url(path), headers=auth("not-a-known-token"))
    assert_error(response, 401, "invalid_token", "Invalid token")


LIMIT = "limit must be an integer from 1 to 1000"
CURSOR = "after must be a cursor from a previous page's next_after"


@pytest.mark.parametrize(
    ("path", "query", "detail"),
    [
        ("projects", "limit=0", LIMIT),
        ("projects", "limit=1001", LIMIT),
        ("projects", "limit=ten", LIMIT),
        ("projects", "after=" + "x" * 300, "after must be a project id"),
        ("projects", "colour=blue", "Unknown query parameter: 'colour'"),
        ("projects", "project_id=a", "Unknown query parameter: 'project_id'"),
        ("projects", "limit=1&limit=2", "Query parameter given more than once: 'limit'"),
        ("blocked", "limit=0", LIMIT),
        ("blocked", "limit=-1", LIMIT),
        ("blocked", "after=a", CURSOR),
        ("blocked", "after=" + blocked_cursor("p", "t") + "A", CURSOR),
        ("blocked", "after=WyJwIl0", CURSOR),  # ["p"]
        ("blocked", "after=eyJwIjoidCJ9", CURSOR),  # {"p":"t"}
        ("blocked", "after=WyJwIiwiIl0", CURSOR),  # ["p",""]
        ("blocked", "project_id=" + "x" * 256, "project_id must be a project id"),
        ("blocked", "error_type=" + "E" * 256, "error_type is longer than 255 characters"),
        ("blocked", "error_type=a%00b", "error_type must not contain NUL characters"),
        ("blocked", "status=blocked", "Unknown query parameter: 'status'"),
        ("blocked", "error_type=a&error_type=b", "Query parameter given more than once: "
                                                   "'error_type'"),
        ("blocked", "after=%FF", "Query string is not valid UTF-8"),
    ],
)  # fmt: skip
def test_bad_list_parameters_are_422(
    http: httpx.Client, path: str, query: str, detail: str
) -> None:
    response = http.get(f"{PREFIX}/{path}?{query}", headers=auth())
    assert_error(response, 422, "invalid_input", detail)


@pytest.mark.parametrize("path", ["projects", "blocked"])
def test_storage_unavailable_is_503(http: httpx.Client, world: World, path: str) -> None:
    world.storage.down = True
    try:
        response = http.get(url(path), headers=auth())
    finally:
        world.storage.down = False
    assert_error(response, 503, "storage_unavailable", "Storage is unavailable; try again later")
    assert "7" == response.headers["retry-after"]


@pytest.mark.parametrize("path", ["projects", "blocked"])
def test_a_method_other_than_get_is_405(http: httpx.Client, path: str) -> None:
    response = http.post(url(path), headers=auth())
    assert_error(response, 405, "method_not_allowed", "Method Not Allowed")
    assert "GET" == response.headers["allow"]


# -- below HTTP: what the API does with the storage and the authorizer --------------------------


class _NoOverview(AsyncFromSyncEvents[MemoryStorage]):
    """An async storage without the reads across projects."""


class _SyncNoOverview:
    """A sync storage without the reads across projects (every other method forwarded)."""

    def __init__(self) -> None:
        self.inner = MemoryStorage()

    def __getattr__(self, name: str) -> Any:
        if name in ("list_projects", "blocked_tasks"):
            raise AttributeError(name)
        return getattr(self.inner, name)


TOKENS = StaticTokens({ALICE: Principal(id="alice"), BOB: Principal(id="bob")})


def _get(path: str, **query: str) -> ApiRequest:
    return ApiRequest(method="GET", path=path, headers={"authorization": f"Bearer {ALICE}"},
                      query=query)  # fmt: skip


@pytest.mark.parametrize("path", ["/projects", "/blocked"])
def test_a_storage_without_the_reads_is_501(path: str) -> None:
    detail = "This server's storage offers no listing across projects"
    expected = (501, {"code": "overview_not_kept", "detail": detail})
    api = AsyncRetryAPI(AsyncRetryService(_NoOverview(MemoryStorage(), offload=False)), TOKENS)
    response = asyncio.run(api.handle(_get(path)))
    assert expected == (response.status, response.json())
    sync = RetryAPI(RetryService(_SyncNoOverview()), TOKENS)  # type: ignore[arg-type]
    response = sync.handle(_get(path))
    assert expected == (response.status, response.json())


def _read_all(api: RetryAPI, path: str, limit: int) -> tuple[list[str], int]:
    """The project ids of every row BOB is shown, page by page, and how many pages."""
    seen: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        query = {"limit": str(limit)} | ({} if after is None else {"after": after})
        request = ApiRequest(method="GET", path=path, headers=auth(BOB), query=query)
        body = api.handle(request).json()
        rows = body["projects"] if path == "/projects" else body["tasks"]
        assert len(rows) <= limit
        seen += [row["project"]["id"] if path == "/projects" else row["project_id"] for row in rows]
        pages += 1
        after = body["next_after"]
        if after is None:
            return seen, pages
        assert pages < 1000


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("path", ["/projects", "/blocked"])
def test_a_page_the_authorizer_thins_still_goes_on_to_the_end(path: str, interleaved: bool) -> None:
    """Rows the authorizer refuses are left out; a page fills itself from a few more reads,
    and its cursor never skips a row it did not show, even after a long run of hidden rows
    (then pages may come short, or empty, with a cursor to go on)."""
    from deepwork_retry import ExecutorService

    storage = MemoryStorage()
    ex = ExecutorService(storage)
    if interleaved:
        names = [f"p{n:02}-{kind}" for n in range(12) for kind in ("alice", "bob")]
    else:
        names = [f"{kind}-p{n:02}" for n in range(12) for kind in ("alice", "bob")]
    for pid in names:
        ex.create_project(pid)
        ex.add_task(pid, "t", max_retries=0)
        token = ex.assign(pid, "t").task.attempt
        ex.start(pid, "t", token)
        ex.fail(pid, "t", token, TaskError(type="E", retryable=False))

    def bob_sees(principal: Principal, project_id: str) -> bool:
        return principal.id == "alice" or "bob" in project_id

    api = RetryAPI(RetryService(storage), TOKENS, bob_sees)
    bobs = sorted(pid for pid in names if "bob" in pid)
    for limit in (1, 2, 3, 5, 12, 13):
        seen, pages = _read_all(api, path, limit)
        assert bobs == seen, limit
        if interleaved:  # each page full but the last
            assert pages == len(bobs) // limit + 1, (limit, pages)


def test_a_page_that_kept_rows_never_ends_on_a_hidden_one() -> None:
    """A page that ran out of reads after keeping some rows goes on from the last row it
    kept: its cursor never carries the key of a row the authorizer hid."""
    from deepwork_retry import ExecutorService

    storage = MemoryStorage()
    ex = ExecutorService(storage)
    tasks = {"bob-1": ["t"], "c-hidden": [f"t{i:02}" for i in range(30)]}
    for pid, tids in tasks.items():
        ex.create_project(pid)
        for tid in tids:
            ex.add_task(pid, tid, max_retries=0)
            token = ex.assign(pid, tid).task.attempt
            ex.start(pid, tid, token)
            ex.fail(pid, tid, token, TaskError(type="E", retryable=False))

    def bob_sees(principal: Principal, project_id: str) -> bool:
        return "bob" in project_id

    api = RetryAPI(RetryService(storage), TOKENS, bob_sees)
    for path in ("/blocked", "/projects"):
        query = {"limit": "2"}
        body = api.handle(ApiRequest(method="GET", path=path, headers=auth(BOB), query=query))
        rows = body.json()["tasks" if path == "/blocked" else "projects"]
        assert len(rows) == 1
        after = body.json()["next_after"]
        if after is not None:
            named = parse_blocked_cursor(after)[0] if path == "/blocked" else after
            assert named == "bob-1", (path, after)
