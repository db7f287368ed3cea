"""Generated requests: no input makes any adapter answer 500, and no refusal changes state.

Schemathesis drives the FastAPI adapter from its own ``/openapi.json``;
Hypothesis sends generated path ids, headers and bodies to all five adapters.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from web_harness import ALICE, PREFIX, World, auth, seg, task_url, url

from deepwork_retry.web._http import ERROR_CODES
from deepwork_retry.web.fastapi import create_app

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- schemathesis against the FastAPI adapter's OpenAPI document ------------------------------


# The schema is loaded when the module is imported, so its app serves a world of its own.
# It runs in process through the ASGI interface; the Hypothesis tests below use real servers.
SCHEMA_WORLD = World()
APP = create_app(SCHEMA_WORLD.async_service(), SCHEMA_WORLD.tokens)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_openapi_operations_conform_and_never_fail(case: Any) -> None:
    """Every documented operation answers generated requests as documented, never with 5xx."""
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {ALICE}"}
    case.call_and_validate(
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_headers_conformance,
            response_schema_conformance,
        ],
    )


def test_openapi_documents_statuses_and_bearer() -> None:
    """The OpenAPI document lists the retry's statuses and the Bearer security scheme."""
    document = APP.openapi()
    operation = document["paths"][PREFIX + "/projects/{project_id}/tasks/{task_id}/retry"]["post"]
    assert {"200", "400", "401", "404", "409", "422", "503"} <= set(operation["responses"])
    assert [{"HTTPBearer": []}] == operation["security"]
    assert {"type": "http", "scheme": "bearer"} == {
        k: v
        for k, v in document["components"]["securitySchemes"]["HTTPBearer"].items()
        if k in ("type", "scheme")
    }


# -- Hypothesis against every adapter ---------------------------------------------------------

ids = st.text(max_size=300)
header_values = (
    st.text(
        alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
        max_size=80,
    )
    .map(str.strip)
    .map(lambda s: s.encode("latin-1"))
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=10,
)
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {},
        optional={
            "budget": st.sampled_from(["one_more", "full", "", "FULL", None]) | json_values,
            "reason": st.text(max_size=50) | json_values,
            "dry_run": st.booleans() | json_values,
            "limit": st.integers(-5, 2000) | json_values,
            "after": st.text(max_size=20) | json_values,
        },
    ).map(lambda v: json.dumps(v).encode()),
)


def assert_no_server_error(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text)
    assert "application/json" == response.headers["content-type"]
    if response.status_code >= 400:
        body = response.json()
        assert (["detail", "code"], str) == (list(body), type(body["detail"]))
        assert response.status_code in ERROR_CODES[body["code"]], body


@FUZZ
@given(project_id=ids, task_id=ids, method=st.sampled_from(["POST", "GET"]))
def test_generated_path_ids(
    http: httpx.Client, world: World, project_id: str, task_id: str, method: str
) -> None:
    """Any unicode ids, of any length, in the task routes: a JSON 4xx, never 500."""
    pid = world.project()
    world.blocked(pid)
    assume(task_id != "t1")
    before = world.snapshot(pid)
    for path in (task_url(project_id, task_id, "/retry"), task_url(pid, task_id, "/retry")):
        response = http.request(method, path, headers=auth())
        assert_no_server_error(response)
        assert 400 <= response.status_code < 500
    assert before == world.snapshot(pid)


@FUZZ
@given(
    authorization=header_values,
    key=st.none() | header_values,
    content_type=st.none() | header_values,
    body=bodies,
)
def test_generated_headers(
    http: httpx.Client,
    world: World,
    authorization: bytes,
    key: bytes | None,
    content_type: bytes | None,
    body: bytes,
) -> None:
    """Arbitrary Authorization, Idempotency-Key and Content-Type headers never cause a 500."""
    pid = world.project()
    tid = world.blocked(pid)
    before = world.snapshot(pid)
    headers = [(b"Authorization", authorization)]
    if key is not None:
        headers.append((b"Idempotency-Key", key))
    if content_type is not None:
        headers.append((b"Content-Type", content_type))
    response = http.post(task_url(pid, tid, "/retry"), headers=headers, content=body)
    assert_no_server_error(response)
    assert 401 == response.status_code
    assert before == world.snapshot(pid)


@FUZZ
@given(
    key=st.none()
    | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40),
    body=bodies,
)
def test_generated_bodies(http: httpx.Client, world: World, key: str | None, body: bytes) -> None:
    """Generated retry and bulk bodies: 200 or a JSON 4xx; a 4xx changes nothing."""
    pid = world.project()
    tid = world.blocked(pid)
    headers = {**auth(), "Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = f"{pid}-{key}"
    for path in (task_url(pid, tid, "/retry"), url("projects", seg(pid), "retry-blocked")):
        before = world.snapshot(pid)
        response = http.post(path, headers=headers, content=body)
        assert_no_server_error(response)
        if response.status_code >= 400:
            assert before == world.snapshot(pid)
