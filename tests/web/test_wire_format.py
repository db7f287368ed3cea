"""The wire format has one definition, and everything that speaks it agrees with it.

The bodies are described once (``_core.wire`` for responses, ``web.openapi``
for requests and errors). The OpenAPI document and the FastAPI models are
derived from that; the JSON builders, written out by hand for speed, and the
answers the API really gives are checked against it here.
"""

from __future__ import annotations

import asyncio
import enum
import json
import typing
from typing import Any

import httpx
import jsonschema_rs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from web_harness import ALICE, PREFIX, World, authorize

from deepwork_retry._core import wire
from deepwork_retry._core.inputs import blocked_cursor
from deepwork_retry._core.model import Attempt, ProjectSummary, Task
from deepwork_retry._core.results import (
    BulkItem,
    BulkResult,
    BulkStop,
    DispatchStatus,
    RetryResult,
    attempt_json,
    blocked_page_json,
    bulk_json,
    dispatch_json,
    progress_json,
    projects_page_json,
    retry_json,
    retry_text,
    task_json,
    tasks_page_json,
)
from deepwork_retry._core.states import (
    BlockedReason,
    Outcome,
    ProjectStatus,
    RetryBudget,
    TaskStatus,
    Trigger,
)
from deepwork_retry.auth import StaticTokens
from deepwork_retry.exceptions import (
    IdempotencyKeyReused,
    InvalidInput,
    InvalidToken,
    NotAuthenticated,
    ProjectNotFound,
    ProjectNotRunnable,
    StorageUnavailable,
    TaskNotBlocked,
    TaskNotFound,
    VersionConflict,
)
from deepwork_retry.testing.strategies import (
    any_attempts,
    any_tasks,
    progresses,
    projects,
    retry_results,
)
from deepwork_retry.web import RetryAPI
from deepwork_retry.web._http import (
    ERROR_CODES,
    ERRORS,
    ROUTES,
    ApiRequest,
    BadRequestBody,
    BodyIncomplete,
    BodyTimeout,
    BodyTooLarge,
    IdempotencyInProgress,
    LengthRequired,
    MethodNotAllowed,
    NotConfigured,
    RetryCommitted,
    RouteNotFound,
    bulk_options,
    error_response,
    retry_options,
)
from deepwork_retry.web.fastapi import create_app, model
from deepwork_retry.web.openapi import (
    BULK_OPTIONS,
    OPERATION_PREFIX,
    REQUESTS,
    RETRY_OPTIONS,
    error_body,
    openapi_document,
)

# -- generated values -----------------------------------------------------------------------

texts = st.text(max_size=20)
bulk_items = st.builds(
    BulkItem,
    task_id=texts,
    retried=st.booleans(),
    detail=st.none() | texts,
    dispatch=st.none() | st.sampled_from(typing.get_args(DispatchStatus)),
    attempted=st.booleans(),
)
bulks = st.builds(
    BulkResult,
    dry_run=st.booleans(),
    items=st.lists(bulk_items, max_size=4).map(tuple),
    next_after=st.none() | texts,
    stopped=st.none() | st.sampled_from(typing.get_args(BulkStop)),
)


def conforms(body: wire.Body, value: Any) -> None:
    """``value`` (JSON data) is a ``body``: valid by its schema and by its pydantic model,
    with no key beyond the body's fields and every required one."""
    errors = [
        e.message for e in jsonschema_rs.validator_for(wire.json_schema(body)).iter_errors(value)
    ]
    assert [] == errors, (body.name, value)
    model(body).model_validate(value)
    assert set(body.required) <= set(value) <= set(body.names), (body.name, sorted(value))


# -- the JSON builders against the definition -------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(retry_results())
def test_the_retry_answer_is_the_defined_body(result: RetryResult) -> None:
    """The retry's answer, as JSON text (what the API sends) and as dicts, is a RetryResponse
    whose task, progress and dispatch have exactly the defined fields."""
    sent = json.loads(retry_text(result))
    assert retry_json(result) == sent
    conforms(wire.RETRY, sent)
    for body, value in (
        (wire.TASK, task_json(result.task)),
        (wire.PROGRESS, progress_json(result.progress)),
        (wire.DISPATCH, dispatch_json(result.dispatch)),
    ):
        assert list(body.names) == list(value)  # every field, in the defined order


@settings(max_examples=100, deadline=None)
@given(st.lists(any_tasks(), max_size=3), st.none() | texts)
def test_a_tasks_page_is_the_defined_body(page: list[Task], next_after: str | None) -> None:
    conforms(wire.TASKS_PAGE, tasks_page_json(page, next_after))


summaries = st.builds(ProjectSummary, project=projects(), progress=progresses())


@settings(max_examples=100, deadline=None)
@given(st.lists(summaries, max_size=3), st.none() | texts)
def test_a_projects_page_is_the_defined_body(
    page: list[ProjectSummary], next_after: str | None
) -> None:
    found = projects_page_json(page, next_after)
    conforms(wire.PROJECTS_PAGE, found)
    for summary, item in zip(page, found["projects"], strict=True):
        conforms(wire.PROJECT_SUMMARY, item)
        assert progress_json(summary.progress) == item["progress"]


@settings(max_examples=100, deadline=None)
@given(st.lists(any_tasks(), max_size=3), st.none() | st.tuples(texts, texts))
def test_a_blocked_page_is_the_defined_body(page: list[Task], last: tuple[str, str] | None) -> None:
    cursor = None if last is None else blocked_cursor(*last)
    conforms(wire.BLOCKED_PAGE, blocked_page_json(page, cursor))


@settings(max_examples=100, deadline=None)
@given(any_attempts())
def test_an_attempt_is_the_defined_body(attempt: Attempt) -> None:
    found = attempt_json(attempt)
    assert list(wire.ATTEMPT.names) == list(found)
    conforms(wire.ATTEMPTS, {"task_id": attempt.task_id, "attempts": [found]})


@settings(max_examples=100, deadline=None)
@given(bulks)
def test_a_bulk_answer_is_the_defined_body(result: BulkResult) -> None:
    """A bulk answer conforms; a dry run says would_retry where a real run says retried."""
    found = bulk_json(result)
    conforms(wire.BULK, found)
    counted = "would_retry" if result.dry_run else "retried"
    other = "retried" if result.dry_run else "would_retry"
    for item in found["items"]:
        conforms(wire.BULK_ITEM, item)
        assert (True, False) == (counted in item, other in item)


# -- value sets come from the vocabularies ----------------------------------------------------

CHOICES: list[tuple[wire.Body, str, Any]] = [
    (wire.TASK, "status", TaskStatus),
    (wire.TASK, "blocked_reason", BlockedReason),
    (wire.DISPATCH, "status", DispatchStatus),
    (wire.ATTEMPT, "trigger", Trigger),
    (wire.ATTEMPT, "budget", RetryBudget),
    (wire.ATTEMPT, "outcome", Outcome),
    (wire.PROJECT, "status", ProjectStatus),
    (wire.BULK_ITEM, "dispatch", DispatchStatus),
    (wire.BULK, "stopped", BulkStop),
    (RETRY_OPTIONS, "budget", RetryBudget),
    (BULK_OPTIONS, "budget", RetryBudget),
]


def _values(vocabulary: Any) -> list[str]:
    if isinstance(vocabulary, type) and issubclass(vocabulary, enum.Enum):
        return [member.value for member in vocabulary]
    return list(typing.get_args(vocabulary))


def _literal(annotation: Any) -> list[str]:
    """The values of ``Literal[...]`` inside ``annotation`` (``X | None`` included)."""
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return [v for arg in typing.get_args(annotation) for v in _literal(arg)]


@pytest.mark.parametrize(("body", "name", "vocabulary"), CHOICES)
def test_every_value_set_is_its_vocabulary(body: wire.Body, name: str, vocabulary: Any) -> None:
    """A value added to TaskStatus (or any vocabulary on the wire) reaches the document's enum
    and the pydantic model's Literal with no other edit: both are read from it."""
    field = next(f for f in body.fields if f.name == name)
    schema = wire.field_schema(field)
    enum_values = (schema["anyOf"][0] if "anyOf" in schema else schema)["enum"]
    annotation = model(body).model_fields[name].annotation
    assert (_values(vocabulary), _values(vocabulary)) == (enum_values, _literal(annotation))


def test_the_models_have_the_fields_of_the_definition() -> None:
    """Each pydantic model is its body: the same fields, refusing any other."""
    for body in (*wire.RESPONSES, *REQUESTS, error_body()):
        found = model(body)
        assert (body.name, list(body.names)) == (found.__name__, list(found.model_fields))
        assert "forbid" == found.model_config.get("extra")


# -- request bodies: what is documented is what the API accepts --------------------------------

_VALID = {"budget": "full", "reason": "why", "dry_run": True, "after": "t1", "limit": 5}


@pytest.mark.parametrize(
    ("body", "parse"), [(RETRY_OPTIONS, retry_options), (BULK_OPTIONS, bulk_options)]
)
def test_request_bodies_take_exactly_their_documented_fields(body: wire.Body, parse: Any) -> None:
    """Every documented field is accepted (alone, and null), and any other is refused."""
    for name in body.names:
        parse(json.dumps({name: _VALID[name]}).encode())
        parse(json.dumps({name: None}).encode())
    parse(json.dumps({name: _VALID[name] for name in body.names}).encode())
    for name in {*_VALID, "extra"} - set(body.names):
        with pytest.raises(BadRequestBody, match="Unknown field"):
            parse(json.dumps({name: _VALID.get(name, 1)}).encode())
    assert False is wire.json_schema(body)["additionalProperties"]


# -- error bodies ------------------------------------------------------------------------------

ONE_OF_EACH: list[BaseException] = [
    RetryCommitted("t1"),
    InvalidToken(),
    NotAuthenticated(),
    RouteNotFound(),
    ProjectNotFound("p"),
    TaskNotFound("p", "t"),
    MethodNotAllowed(["GET"]),
    TaskNotBlocked("t", "done"),
    ProjectNotRunnable("p", "paused"),
    IdempotencyInProgress(),
    BodyTooLarge(),
    LengthRequired(),
    BodyTimeout(),
    BodyIncomplete(),
    IdempotencyKeyReused("k"),
    InvalidInput("bad"),
    BadRequestBody("bad body"),
    VersionConflict("t", 1, 2),
    StorageUnavailable("down at /var/db", retry_after=3),
    NotConfigured(),
    RuntimeError("something unforeseen"),
]


@pytest.mark.parametrize("exc", ONE_OF_EACH, ids=lambda e: type(e).__name__)
def test_every_error_answer_is_the_error_body_of_its_status(exc: BaseException) -> None:
    """Each error is ``{"detail", "code"}``, its code one the document lists for its status."""
    response = error_response(exc)
    body = response.json()
    conforms(error_body(response.status), body)
    assert list(body) == ["detail", "code"]
    assert response.status in ERROR_CODES[body["code"]]


def test_every_row_of_the_error_table_has_a_code_of_its_own_kind() -> None:
    """Codes are snake_case words, and each code comes with one status only."""
    for status, code, _, _ in ERRORS.values():
        assert code.replace("_", "").isalpha(), code
        assert code == code.lower(), code
        assert {status} == ERROR_CODES[code], code


def get_json(app: Any, path: str) -> Any:
    """``GET path`` from the ASGI ``app`` (its lifespan not run): a 200 JSON answer."""

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path)

    response = asyncio.run(get())
    assert (200, "application/json") == (response.status_code, response.headers["content-type"])
    return response.json()


# -- the OpenAPI document --------------------------------------------------------------------


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
    ]


def test_the_document_has_every_route_and_namespaced_operation_ids() -> None:
    document = openapi_document()
    found = {
        (method.upper(), path, op["operationId"]) for path, method, op in _operations(document)
    }
    assert {(m, PREFIX + t, OPERATION_PREFIX + n) for m, t, n in ROUTES} == found


def test_the_document_names_every_response_header() -> None:
    """401 names WWW-Authenticate, 409 and 503 Retry-After, and every answer of the retry
    Idempotent-Replayed (any answer to a repeated key may be the first one, replayed)."""
    for path, _, operation in _operations(openapi_document()):
        responses = operation["responses"]
        for status, header, required in (
            ("401", "WWW-Authenticate", True),
            ("409", "Retry-After", False),
            ("503", "Retry-After", True),
        ):
            if status in responses:
                assert required is responses[status]["headers"][header]["required"], (path, status)
        replays = any(p["name"] == "Idempotency-Key" for p in operation["parameters"])
        assert replays == (operation["operationId"] == OPERATION_PREFIX + "retry")
        for status, response in responses.items():
            headers = response.get("headers", {})
            assert replays == ("Idempotent-Replayed" in headers), (path, status)


def test_the_document_closes_every_body() -> None:
    """Request and response bodies allow no property beyond their own, at every depth."""
    closed = 0

    def walk(schema: Any) -> None:
        nonlocal closed
        if isinstance(schema, dict):
            if schema.get("type") == "object" and "properties" in schema:
                assert False is schema["additionalProperties"], schema.get("title")
                closed += 1
            for value in schema.values():
                walk(value)
        elif isinstance(schema, list):
            for value in schema:
                walk(value)

    for _, _, operation in _operations(openapi_document()):
        if "requestBody" in operation:
            schema = operation["requestBody"]["content"]["application/json"]["schema"]
            assert False is schema["additionalProperties"]
        walk(operation)
    assert closed > 20


@pytest.mark.parametrize("prefix", ["/api/deep-work", "/", "/x/y/"])
def test_fastapi_documents_exactly_the_shared_document(prefix: str) -> None:
    """FastAPI's /openapi.json says of every route what the framework-free document says."""
    world = World()
    app = create_app(world.async_service(), world.tokens, prefix=prefix)
    served = get_json(app, "/openapi.json")
    ours = openapi_document(prefix)
    assert (ours["paths"], ours["components"]) == (served["paths"], served["components"])


def test_two_routers_in_one_host_keep_distinct_operation_ids() -> None:
    """The ids are namespaced: a host's own ``retry`` operation does not collide with ours."""
    from fastapi import FastAPI

    world = World()
    app = FastAPI()

    @app.post("/retry", operation_id="retry")
    def host_retry() -> dict[str, str]:  # pragma: no cover - only documented
        return {}

    from deepwork_retry.web.fastapi import routes

    app.include_router(routes(world.async_service(), world.tokens))
    ids = [op["operationId"] for _, _, op in _operations(app.openapi())]
    assert len(ids) == len(set(ids)) == len(ROUTES) + 1


# -- what the API really answers, against the document ------------------------------------------


def _schema(document: dict[str, Any], path: str, method: str, status: int) -> Any:
    operation = document["paths"][path][method]
    return operation["responses"][str(status)]["content"]["application/json"]["schema"]


def test_every_route_answers_in_its_documented_shape() -> None:
    """Real answers of every route (successes and refusals), validated against the document."""
    world = World()
    api = RetryAPI(world.sync_service(), world.tokens, authorize)
    document = openapi_document("/")
    pid = world.project()
    world.blocked(pid, "t1")
    world.blocked(pid, "t2")
    world.done(pid, "t3")

    def call(
        method: str,
        template: str,
        path: str,
        body: bytes = b"",
        query: dict[str, str] | None = None,
        key: str | None = None,
    ) -> None:
        headers = {"authorization": f"Bearer {ALICE}"}
        if key is not None:
            headers["idempotency-key"] = key
        response = api.handle(
            ApiRequest(
                method=method,
                path=path,
                headers=headers,
                query=query or {},
                body=body,
            )
        )
        schema = _schema(document, template, method.lower(), response.status)
        errors = [
            e.message for e in jsonschema_rs.validator_for(schema).iter_errors(response.json())
        ]
        assert [] == errors, (path, response.status, response.json())

    task = "/projects/{project_id}/tasks/{task_id}"
    call("GET", task, f"/projects/{pid}/tasks/t1")
    call("GET", task, f"/projects/{pid}/tasks/t3")
    call("GET", task, f"/projects/{pid}/tasks/nope")
    call("POST", task + "/retry", f"/projects/{pid}/tasks/t1/retry", b'{"reason":"r"}')
    call("POST", task + "/retry", f"/projects/{pid}/tasks/t3/retry")
    call("POST", task + "/retry", f"/projects/{pid}/tasks/t2/retry", key="k")
    call("POST", task + "/retry", f"/projects/{pid}/tasks/t2/retry", key="k")
    call("POST", task + "/retry", f"/projects/{pid}/tasks/t1/retry", b'{"x":1}')
    call("GET", task + "/attempts", f"/projects/{pid}/tasks/t1/attempts")
    call("GET", "/projects/{project_id}/progress", f"/projects/{pid}/progress")
    call("GET", "/projects/{project_id}/tasks", f"/projects/{pid}/tasks")
    call("GET", "/projects/{project_id}/tasks", f"/projects/{pid}/tasks", query={"limit": "0"})
    bulk = "/projects/{project_id}/retry-blocked"
    call("POST", bulk, f"/projects/{pid}/retry-blocked", b'{"dry_run":true}')
    call("POST", bulk, f"/projects/{pid}/retry-blocked")
    call("POST", bulk, "/projects/nope/retry-blocked")
    call("GET", "/projects", "/projects", query={"limit": "1"})
    call("GET", "/projects", "/projects", query={"after": pid})
    call("GET", "/projects", "/projects", query={"limit": "0"})
    call("GET", "/blocked", "/blocked", query={"limit": "1"})
    call("GET", "/blocked", "/blocked", query={"project_id": pid, "error_type": "RuntimeError"})
    call("GET", "/blocked", "/blocked", query={"after": "not a cursor"})


# -- the demo server serves the same document --------------------------------------------------


def test_the_demo_server_serves_the_document(tmp_path: Any) -> None:
    """``GET /openapi.json`` on the demo server, beside the API's prefix, is the shared document."""
    from deepwork_retry.server import OPENAPI_PATH, build_app

    app = build_app(str(tmp_path / "demo.db"), StaticTokens())
    assert openapi_document() == get_json(app, OPENAPI_PATH)


# -- an answer built outside the API: Django without a configured API -------------------------


def test_django_without_a_configured_api_answers_the_error_body(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Settings naming no API: a JSON 503 with its code and Retry-After, never a 500 page."""
    from web_harness import configure_django

    configure_django()
    from django.test import RequestFactory

    import deepwork_retry.web.django as django_app
    from deepwork_retry.web.django.views import api_view

    monkeypatch.setattr(django_app, "_configured", None)
    with caplog.at_level("ERROR", logger="deepwork_retry.web"):
        response = api_view(
            RequestFactory().get(PREFIX + "/projects/p/progress"), "projects/p/progress"
        )
    body = json.loads(response.content)
    assert (503, "60") == (response.status_code, response["Retry-After"])
    assert {"detail": "The retry API is not configured", "code": "not_configured"} == body
    conforms(error_body(503), body)
    assert "not configured" in caplog.text
