"""The web API over a retry service, with no framework: request data in, response data out.

This file is the hand-written source; ``deepwork_retry/web/_sync_api.py`` is
generated from it by ``scripts/unasync.py``. It stands above the HTTP protocol
(:mod:`deepwork_retry.web._http`: requests, responses, routes, the error table)
and below the framework adapters of ``deepwork_retry/web/``, which only
translate their framework's request and response to and from
:class:`~deepwork_retry.web._http.ApiRequest` and
:class:`~deepwork_retry.web._http.ApiResponse`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import attrs

import deepwork_retry._trace as _trace
from deepwork_retry._async._compat import ASYNCHRONOUS
from deepwork_retry._async.services import AsyncRetryService
from deepwork_retry._core.machine import can_retry
from deepwork_retry._core.model import IdempotencyRecord
from deepwork_retry._core.results import (
    DispatchOutcome,
    DispatchStatus,
    RetryResult,
    attempt_json,
    bulk_json,
    check_json,
    progress_json,
    retry_text,
    task_json,
    tasks_page_json,
)
from deepwork_retry._core.states import DispatchState, Trigger
from deepwork_retry._log import emit
from deepwork_retry._wiring import check_kind
from deepwork_retry.auth import Authenticator, Authorizer, Principal, may_retry
from deepwork_retry.exceptions import (
    IdempotencyConflict,
    IdempotencyKeyReused,
    InvalidToken,
    NotFound,
    ProjectNotFound,
    ProjectNotRunnable,
    TaskNotBlocked,
)
from deepwork_retry.web._http import (
    BODY_TIMEOUT,
    ApiRequest,
    ApiResponse,
    IdempotencyInProgress,
    RetryCommitted,
    bearer_token,
    bulk_options,
    check_path,
    error_response,
    idempotency_key,
    match,
    page_options,
    respond,
    retry_options,
    route_template,
    scoped_key,
    storable_ids,
)

log = logging.getLogger("deepwork_retry.web")

_REPLAYABLE = (NotFound, TaskNotBlocked, ProjectNotRunnable)
"""Refusals that depend on stored state, so a repeat with the same key replays them."""

_RECOVERED_STATUS: dict[DispatchState | None, DispatchStatus] = {
    DispatchState.DELIVERED: "dispatched",
    DispatchState.DEFERRED: "deferred",
    # No entry: a prune removed it, and a prune removes only delivered entries.
    None: "dispatched",
}
"""What a recovered answer reports for the outbox entry's state (else ``pending``)."""


def _replay(record: IdempotencyRecord) -> ApiResponse:
    if record.status_code is None or record.body is None:
        raise IdempotencyInProgress
    return ApiResponse(
        status=record.status_code,
        body=record.body.encode("utf-8"),
        headers=(("Idempotent-Replayed", "true"),),
    )


def _retried(result: RetryResult) -> ApiResponse:
    """The answer to a committed retry: 200 with the JSON of ``retry_json`` (written
    without its dicts), or, should that fail, the 202 that says the retry was
    committed; never an error that would tell the client nothing happened."""
    try:
        return ApiResponse(status=200, body=retry_text(result).encode("utf-8"))
    except Exception:  # noqa: BLE001 - logged; the retry is committed whatever fails here
        emit(
            log, logging.ERROR, "deepwork.retry_answer_unrendered",
            "the answer to a committed retry could not be rendered",
            project_id=result.task.project_id, task_id=result.task.id,
            attempt=result.task.attempt, exc_info=True,
        )  # fmt: skip
        return error_response(RetryCommitted(result.task.id))


class AsyncRetryAPI:
    """Every route of the API: authenticate, authorise, call the service, render.

    ``authorizer`` decides whether a principal may act in a project; a
    refusal is reported as ``404 Project not found`` so that it does not
    reveal which projects exist.

    ``body_timeout`` is how many seconds a request's body may take to arrive,
    for the adapters that read it themselves (Starlette, FastAPI, aiohttp): a
    body that stops arriving is answered 408 and its connection closed. Under
    WSGI the server owns the socket and its timeout (see docs/web/routes.md).
    """

    def __init__(
        self,
        service: AsyncRetryService,
        authenticator: Authenticator,
        authorizer: Authorizer = may_retry,
        *,
        abandoned_after: float = 60.0,
        body_timeout: float = BODY_TIMEOUT,
    ) -> None:
        check_kind(type(self).__name__, "service", service, "retry", asynchronous=ASYNCHRONOUS)
        if not body_timeout > 0:
            raise ValueError("body_timeout must be a positive number of seconds")
        self.service = service
        self.authenticator = authenticator
        self.authorizer = authorizer
        self.abandoned_after = abandoned_after
        self.body_timeout = body_timeout

    async def handle(self, request: ApiRequest) -> ApiResponse:
        """The response to ``request``; never raises, never answers 500.

        With telemetry on, in a server span that continues the request's
        ``traceparent`` (see :mod:`deepwork_retry.telemetry`).
        """
        telemetry = _trace.current
        if telemetry is None:
            return await self._answer(request)
        with telemetry.server(request.method, route_template(request), request.headers) as span:
            response = await self._answer(request)
            span.status(response.status)
        return response

    async def _answer(self, request: ApiRequest) -> ApiResponse:
        try:
            check_path(request.raw_path)
            route, params = match(request.method, request.path)
            principal = self._principal(request.headers)
            project_id = params["project_id"]
            if not self.authorizer(principal, project_id):
                raise ProjectNotFound(project_id[:255])
            if route == "retry":
                return await self._retry(principal, project_id, params["task_id"], request)
            if route == "retry_blocked":
                return await self._retry_blocked(principal, project_id, request)
            return await self._read(route, project_id, params.get("task_id"), request)
        except Exception as exc:  # noqa: BLE001 - every error becomes a JSON response
            return error_response(exc)

    def _principal(self, headers: Mapping[str, str]) -> Principal:
        principal = self.authenticator.authenticate(bearer_token(headers))
        if principal is None:
            raise InvalidToken
        return principal

    # -- the retry endpoint ---------------------------------------------------------
    async def _retry(
        self, principal: Principal, project_id: str, task_id: str, request: ApiRequest
    ) -> ApiResponse:
        key = idempotency_key(request.headers)
        options = retry_options(request.body)
        if key is None:
            result = await self.service.retry(
                project_id,
                task_id,
                actor=principal.id,
                reason=options.reason,
                budget=options.budget,
            )
            return _retried(result)
        stored_key = scoped_key(principal.id, key)
        found = await self.service.storage.get_idempotency(stored_key, now=self.service.clock.now())
        if found is not None:
            return await self._replay_for(found, project_id, task_id)
        try:
            result = await self.service.retry(
                project_id,
                task_id,
                actor=principal.id,
                reason=options.reason,
                budget=options.budget,
                idempotency_key=stored_key,
            )
        except IdempotencyConflict as exc:
            return await self._replay_for(exc.record, project_id, task_id)
        except _REPLAYABLE as exc:
            # Someone may have reserved the key meanwhile: their answer wins.
            now = self.service.clock.now()
            found = await self.service.storage.get_idempotency(stored_key, now=now)
            if found is not None:
                return await self._replay_for(found, project_id, task_id)
            if not storable_ids(project_id, task_id):
                return error_response(exc)
            fresh = IdempotencyRecord(
                key=stored_key,
                project_id=project_id,
                task_id=task_id,
                created_at=now,
                expires_at=self.service.retention.expires_at(now),
            )
            return await self._record(fresh, error_response(exc))
        if result.idempotency is None:  # a service that kept no record: nothing to complete
            return _retried(result)
        return await self._record(result.idempotency, _retried(result))

    async def _replay_for(
        self, record: IdempotencyRecord, project_id: str, task_id: str
    ) -> ApiResponse:
        """The first response for this key, or 422 when the key was for another task.

        The contract's earlier checks (404, 400, 409) still come first for the
        task named now, so a reused key never hides them.
        """
        if (record.project_id, record.task_id) == (project_id, task_id):
            if record.status_code is None and self._abandoned(record):
                return await self._recover(record)
            return _replay(record)
        project = await self.service.get_project(project_id)
        task = await self.service.get_task(project_id, task_id)
        check = can_retry(task, project)
        if check.code == "not_blocked":
            raise TaskNotBlocked(task.id, task.status.value)
        if check.code == "project_not_runnable":
            raise ProjectNotRunnable(project.id, project.status.value)
        raise IdempotencyKeyReused(record.key)

    def _abandoned(self, record: IdempotencyRecord) -> bool:
        """A reservation older than any request can take: its request died after committing."""
        age = (self.service.clock.now() - record.created_at).total_seconds()
        return age > self.abandoned_after

    async def _recover(self, reserved: IdempotencyRecord) -> ApiResponse:
        """Answer for a retry whose request died after the commit, from the stored state.

        The retry is committed (the reservation commits with it), so the answer
        is a 200 showing the task, the progress and the dispatch of the attempt
        that retry created, as they stand now; it is recorded, so later repeats
        replay this same answer.
        """
        project_id, task_id = reserved.project_id, reserved.task_id
        task = await self.service.get_task(project_id, task_id)
        progress = await self.service.progress(project_id)
        attempts = await self.service.attempts(project_id, task_id)
        number = next(
            (
                a.number
                for a in reversed(attempts)
                if a.trigger is Trigger.MANUAL_RETRY and a.dispatched_at == reserved.created_at
            ),
            task.attempt,
        )
        entries = await self.service.storage.dispatches(project_id, task_id)
        state = next((e.state for e in entries if e.attempt == number), None)
        status: DispatchStatus = _RECOVERED_STATUS.get(state, "pending")
        outcome = DispatchOutcome(status=status, task_id=task_id, attempt=number)
        result = RetryResult(task=task, progress=progress, dispatch=outcome)
        return await self._record(reserved, _retried(result))

    async def _record(self, base: IdempotencyRecord, response: ApiResponse) -> ApiResponse:
        """Complete ``base`` with ``response`` so that repeats with its key replay it."""
        record = attrs.evolve(base, status_code=response.status, body=response.body.decode("utf-8"))
        try:
            saved = await self.service.storage.save_idempotency(record)
        except Exception:  # noqa: BLE001 - logged; a failure here must not hide the answer
            # The retry itself may be committed; the key stays reserved, and a
            # repeat is told to try again (or, once the reservation is old, is
            # answered from the stored state) rather than retrying a second time.
            emit(
                log, logging.WARNING, "deepwork.response_unrecorded",
                "could not record the response for an idempotency key",
                project_id=base.project_id, task_id=base.task_id, exc_info=True,
            )  # fmt: skip
            return response
        if (saved.status_code, saved.body) != (record.status_code, record.body):
            return _replay(saved)
        return response

    # -- bulk retry -------------------------------------------------------------------
    async def _retry_blocked(
        self, principal: Principal, project_id: str, request: ApiRequest
    ) -> ApiResponse:
        options = bulk_options(request.body)
        result = await self.service.bulk_retry(
            project_id,
            dry_run=options.dry_run,
            actor=principal.id,
            reason=options.reason,
            budget=options.budget,
            after=options.after,
            limit=options.limit,
        )
        return respond(200, bulk_json(result))

    # -- reads --------------------------------------------------------------------------
    async def _read(
        self, route: str, project_id: str, task_id: str | None, request: ApiRequest
    ) -> ApiResponse:
        if route == "progress":
            project = await self.service.get_project(project_id)
            progress = await self.service.progress(project_id)
            return respond(
                200,
                {
                    "project": {
                        "id": project.id,
                        "status": project.status.value,
                        "name": project.name,
                    },
                    "progress": progress_json(progress),
                },
            )
        if route == "tasks":
            page = page_options(request.query)
            tasks, next_after = await self.service.blocked(
                project_id, after=page.after, limit=page.limit
            )
            return respond(200, tasks_page_json(tasks, next_after))
        assert task_id is not None
        if route == "attempts":
            attempts = await self.service.attempts(project_id, task_id)
            return respond(
                200, {"task_id": task_id, "attempts": [attempt_json(a) for a in attempts]}
            )
        project = await self.service.get_project(project_id)
        task = await self.service.get_task(project_id, task_id)
        return respond(
            200, {"task": task_json(task), "can_retry": check_json(can_retry(task, project))}
        )


__all__ = ["AsyncRetryAPI"]
