"""Authentication and authorisation: the ports, the static token table, and the HTTP answers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest
from web_harness import ALICE, BOB, World, auth, task_url

from deepwork_retry import RetryService
from deepwork_retry.auth import (
    MAX_TOKEN_LENGTH,
    Authenticator,
    CallableAuthenticator,
    Principal,
    StaticTokens,
    may_retry,
)
from deepwork_retry.exceptions import InvalidInput
from deepwork_retry.storage.memory import MemoryStorage
from deepwork_retry.web import ApiRequest, RetryAPI

# -- over HTTP, every adapter --------------------------------------------------------------

CASES = [
    # (headers, status, detail, WWW-Authenticate)
    ({}, 401, "Not authenticated", "Bearer"),
    ({"Authorization": f"Basic {ALICE}"}, 401, "Not authenticated", "Bearer"),
    ({"Authorization": "Bearer"}, 401, "Not authenticated", "Bearer"),
    ({"Authorization": "Bearer wrong-token"}, 401, "Invalid token", 'Bearer error="invalid_token"'),
    (
        {"Authorization": "Bearer " + "x" * (MAX_TOKEN_LENGTH + 1)},
        401,
        "Invalid token",
        'Bearer error="invalid_token"',
    ),
    (
        {"Authorization": f"Bearer {ALICE}x"},
        401,
        "Invalid token",
        'Bearer error="invalid_token"',
    ),
    ({"Authorization": f"Bearer {BOB}"}, 404, "Project not found", None),
]
CODES = {
    "Not authenticated": "not_authenticated",
    "Invalid token": "invalid_token",
    "Project not found": "project_not_found",
}


@pytest.mark.parametrize(
    ("headers", "status", "detail", "challenge"),
    CASES,
    ids=["missing", "wrong-scheme", "empty", "wrong", "too-long", "prefix-match", "other-project"],
)
def test_refused_requests_get_the_contract_answer_and_change_nothing(
    http: httpx.Client,
    world: World,
    headers: dict[str, str],
    status: int,
    detail: str,
    challenge: str | None,
) -> None:
    """Each way of failing authentication or authorisation gets its contract status and body."""
    pid = world.project()
    tid = world.blocked(pid)
    before = world.snapshot(pid)
    response = http.post(task_url(pid, tid, "/retry"), headers=headers)
    assert (status, {"detail": detail, "code": CODES[detail]}) == (
        response.status_code,
        response.json(),
    )
    assert challenge == response.headers.get("www-authenticate")
    assert before == world.snapshot(pid)


def test_scheme_name_is_case_insensitive(http: httpx.Client, world: World) -> None:
    """``bearer`` and ``BEARER`` are the Bearer scheme (RFC 7235 scheme names ignore case)."""
    pid = world.project()
    tid = world.blocked(pid)
    response = http.post(task_url(pid, tid, "/retry"), headers={"Authorization": f"bearer {ALICE}"})
    assert 200 == response.status_code


def test_principal_limited_to_some_projects_may_act_there(http: httpx.Client, world: World) -> None:
    """A principal allowed in a project retries there, and is recorded as the actor."""
    pid = world.project(prefix="bob-")
    tid = world.blocked(pid)
    response = http.post(task_url(pid, tid, "/retry"), headers=auth(BOB))
    assert (200, "bob") == (response.status_code, world.memory.attempts(pid, tid)[-1].actor)


def test_huge_token_is_refused_without_a_500(http: httpx.Client, world: World) -> None:
    """A 1 MB token is refused (by the server's header limit or with 401); nothing changes."""
    pid = world.project()
    tid = world.blocked(pid)
    before = world.snapshot(pid)
    try:
        response = http.post(
            task_url(pid, tid, "/retry"), headers={"Authorization": "Bearer " + "x" * 1_000_000}
        )
    except httpx.TransportError:
        pass  # the server dropped the connection: also a refusal
    else:
        assert 400 <= response.status_code < 500, response.status_code
    assert before == world.snapshot(pid)


# -- the sans-IO API ----------------------------------------------------------------------


def blocked_api(authenticator: Authenticator) -> tuple[RetryAPI, MemoryStorage]:
    from deepwork_retry import ExecutorService

    storage = MemoryStorage()
    ex = ExecutorService(storage)
    ex.create_project("p")
    ex.add_task("p", "t", max_retries=0)
    ex.assign("p", "t")
    ex.start("p", "t", 1)
    ex.fail("p", "t", 1, RuntimeError("boom"))
    return RetryAPI(RetryService(storage), authenticator), storage


def test_megabyte_token_is_invalid_token_in_the_api() -> None:
    """A 1 MB token reaching the API is refused as an invalid token, unhashed."""
    seen: list[str] = []
    api, storage = blocked_api(CallableAuthenticator(lambda t: seen.append(t) or None))
    response = api.handle(
        ApiRequest(
            method="POST",
            path="/projects/p/tasks/t/retry",
            headers={"Authorization": "Bearer " + "y" * 1_000_000},
        )
    )
    assert (401, {"detail": "Invalid token", "code": "invalid_token"}, []) == (
        response.status,
        response.json(),
        seen,
    )
    assert "blocked" == storage.load("p", "t")[1].status


def test_authenticator_errors_are_503_not_access() -> None:
    """An authenticator that raises never grants access: the API answers 503."""

    def broken(token: str) -> Principal | None:
        raise RuntimeError("identity provider down")

    api, storage = blocked_api(CallableAuthenticator(broken))
    response = api.handle(
        ApiRequest(method="POST", path="/projects/p/tasks/t/retry", headers=auth())
    )
    assert 503 == response.status
    assert "blocked" == storage.load("p", "t")[1].status


def test_callable_authenticator_accepts_principals_and_ids() -> None:
    """The callable adapter takes a Principal, a principal id or None from the host's check."""
    table = {"a": Principal(id="ann", projects={"p"}), "b": "ben"}
    authenticator = CallableAuthenticator(table.get)
    assert Principal(id="ann", projects=frozenset({"p"})) == authenticator.authenticate("a")
    assert Principal(id="ben") == authenticator.authenticate("b")
    assert None is authenticator.authenticate("c")


def test_callable_authenticator_rejects_other_results() -> None:
    """A host check returning something else is a programming error, not access."""
    for result in (1, ""):
        authenticator = CallableAuthenticator(lambda t, r=result: r)  # type: ignore[misc]
        with pytest.raises(TypeError):
            authenticator.authenticate("x")


def test_may_retry_follows_the_principals_projects() -> None:
    """The default authorizer allows every project for ``projects=None``, else only those listed."""
    assert may_retry(Principal(id="a"), "anything")
    assert may_retry(Principal(id="a", projects={"p"}), "p")
    assert not may_retry(Principal(id="a", projects={"p"}), "q")
    assert not may_retry(Principal(id="a", projects=()), "p")


# -- StaticTokens ---------------------------------------------------------------------------


def test_static_tokens_keep_only_digests() -> None:
    """The table stores SHA-256 digests; the token text is nowhere in it or its repr."""
    tokens = StaticTokens({"s3cret-token": Principal(id="alice")})
    assert "s3cret-token" not in repr(tokens)
    assert "s3cret-token" not in repr(vars(tokens))
    digest = hashlib.sha256(b"s3cret-token").digest()
    assert [digest] == [d for d, _ in tokens._table]


def test_static_tokens_authenticate() -> None:
    """Known tokens give their principal; unknown, empty, prefixes and long ones give None."""
    tokens = StaticTokens()
    tokens.add("tok-a", "alice")
    tokens.add("tok-b", Principal(id="bob", projects={"p1"}))
    assert Principal(id="alice") == tokens.authenticate("tok-a")
    assert Principal(id="bob", projects=frozenset({"p1"})) == tokens.authenticate("tok-b")
    for wrong in ("", "tok", "tok-a ", "tok-c", "x" * (MAX_TOKEN_LENGTH + 1)):
        assert None is tokens.authenticate(wrong)


@pytest.mark.parametrize("token", ["", "has space", "tab\there", "semi;colon", "x" * 5000, "\x00"])
def test_static_tokens_refuse_malformed_tokens(token: str) -> None:
    """Tokens must be non-empty, printable, without whitespace or ';', at most 4096 characters."""
    with pytest.raises(InvalidInput):
        StaticTokens().add(token, "someone")


def test_static_tokens_refuse_duplicates() -> None:
    """One token cannot name two principals."""
    tokens = StaticTokens({"tok": Principal(id="a")})
    with pytest.raises(InvalidInput, match="twice"):
        tokens.add("tok", "b")


def test_from_env_parses_the_documented_format(monkeypatch: pytest.MonkeyPatch) -> None:
    """``TOKEN=PRINCIPAL[:P1,P2]`` items separated by ``;``; tokens may contain ``=``."""
    monkeypatch.setenv("DEEPWORK_TOKENS", " abc==alice ; xyz=bob:proj-1, proj-2;;k=v=carol:p3 ")
    tokens = StaticTokens.from_env()
    assert Principal(id="alice") == tokens.authenticate("abc=")
    assert Principal(id="bob", projects=frozenset({"proj-1", "proj-2"})) == tokens.authenticate(
        "xyz"
    )
    assert Principal(id="carol", projects=frozenset({"p3"})) == tokens.authenticate("k=v")
    assert 3 == len(tokens)


def test_from_file_reads_one_entry_per_line(tmp_path: Path) -> None:
    """A token file has one entry per line; blank lines and ``#`` comments are skipped."""
    path = tmp_path / "tokens"
    path.write_text("# operators\nops-token=ops\n\n  ci-token=ci:build  \n", encoding="utf-8")
    tokens = StaticTokens.from_file(path)
    assert Principal(id="ops") == tokens.authenticate("ops-token")
    assert Principal(id="ci", projects=frozenset({"build"})) == tokens.authenticate("ci-token")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "lists no tokens"),
        ("no-equals-sign", "item 1: expected TOKEN=PRINCIPAL"),
        ("=alice", "item 1: expected TOKEN=PRINCIPAL"),
        ("tok=", "item 1: the principal is empty"),
        ("ok=a;tok=:p1", "item 2: the principal is empty"),
        ("tok=a:", "item 1: the project list has an empty entry"),
        ("tok=a:p1,,p2", "item 1: the project list has an empty entry"),
        ("tok=a;tok=b", "item 2: the same token is listed twice"),
        ("bad token=a", "item 1: a token must not contain whitespace"),
    ],
)
def test_from_env_refuses_bad_formats_without_echoing_tokens(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    """A malformed variable raises InvalidInput naming the item, never the token."""
    monkeypatch.setenv("DEEPWORK_TOKENS", value)
    with pytest.raises(InvalidInput, match=message) as caught:
        StaticTokens.from_env()
    assert "tok=" not in str(caught.value)


def test_from_env_requires_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing variable is an error, never an open door."""
    monkeypatch.delenv("DEEPWORK_TOKENS", raising=False)
    with pytest.raises(InvalidInput, match="DEEPWORK_TOKENS is not set"):
        StaticTokens.from_env()


def test_from_file_refuses_a_file_without_tokens(tmp_path: Path) -> None:
    """A token file with only comments is refused."""
    path = tmp_path / "tokens"
    path.write_text("# nothing yet\n", encoding="utf-8")
    with pytest.raises(InvalidInput, match="lists no tokens"):
        StaticTokens.from_file(path)
