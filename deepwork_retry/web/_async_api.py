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
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Protocol, TypeVar

import attrs

import deepwork_retry._trace as _trace
from deepwork_retry._async._compat import ASYNCHRONOUS, close_iterator, sleep
from deepwork_retry._async.services import AsyncRetryService
from deepwork_retry._core.events import Event
from deepwork_retry._core.inputs import blocked_cursor
from deepwork_retry._core.machine import can_retry
from deepwork_retry._core.model import IdempotencyRecord, ProjectSummary, Task
from deepwork_retry._core.results import (
    DispatchOutcome,
    DispatchStatus,
    RetryResult,
    attempt_json,
    blocked_page_json,
    bulk_json,
    check_json,
    project_progress_json,
    projects_page_json,
    retry_text,
    task_json,
    tasks_page_json,
)
from deepwork_retry._core.states import DispatchState, RetryBudget, Trigger
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
    EventsNotKept,
    IdempotencyInProgress,
    RetryCommitted,
    bearer_token,
    blocked_options,
    bulk_options,
    check_path,
    check_reason,
    error_response,
    idempotency_key,
    match,
    page_options,
    projects_options,
    respond,
    retry_options,
    route_template,
    scoped_key,
    storable_ids,
)
from deepwork_retry.web._sse import (
    DEFAULT_STREAMS,
    KEEPALIVE,
    STREAM_HEADERS,
    StreamOptions,
    StreamSlots,
    event_frame,
    progress_frame,
    resume_after,
    retry_frame,
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


OVERVIEW_ROUNDS = 4
"""Storage reads one page of a listing across projects may take to fill itself when the
API's authorizer hides rows the storage returned (each read is one page of ``limit``)."""

_Row = TypeVar("_Row")
_Key = TypeVar("_Key")


class _ReadPage(Protocol[_Row, _Key]):
    """One page of a service's listing after a cursor, and the cursor of the next."""

    async def __call__(self, after: _Key | None, /) -> tuple[list[_Row], _Key | None]: ...


async def _visible_page(
    read: _ReadPage[_Row, _Key],
    after: _Key | None,
    limit: int,
    visible: Callable[[_Row], bool],
    key: Callable[[_Row], _Key],
) -> tuple[list[_Row], _Key | None]:
    """A page of at most ``limit`` rows that ``visible`` keeps, read with ``read(after)``
    (a service page and its next cursor), and the cursor to go on from.

    At most :data:`OVERVIEW_ROUNDS` reads: a page may hold fewer rows than
    ``limit`` (even none) and still have a cursor; the list ends where the
    cursor is ``None``. Rows are never skipped: the cursor is the key of the
    last row kept, or, on a page that kept none, of the last row read. A page
    that kept rows never ends on a hidden one: its cursor would carry that
    row's key (a project the caller may not see) to the caller.
    """
    rows: list[_Row] = []
    cursor = after
    for _ in range(OVERVIEW_ROUNDS):
        batch, more = await read(cursor)
        for index, row in enumerate(batch):
            if not visible(row):
                continue
            rows.append(row)
            if len(rows) == limit:
                last = index == len(batch) - 1
                return rows, (more if last else key(row))
        if more is None:
            return rows, None
        cursor = more
    return rows, (key(rows[-1]) if rows else cursor)


_Events = list[Event]
_ReadEvents = Callable[..., Awaitable[_Events]]
"""The storage's ``events(project_id, *, after, limit)`` (its event log's read)."""


class AsyncEventStream:
    """One open stream of a project's events: iterate it for its bytes; :meth:`close` ends it.

    :meth:`AsyncRetryAPI.handle` makes it for the events route, holding one of
    the principal's stream slots, and hands it out as the response's
    ``stream``. The adapter writes each chunk as it comes and closes the
    stream when it ends or the client went away; closing frees the slot, once
    however often it is called, and a stream that ends by itself (its
    lifetime, the server closing its streams, its project gone) frees it too.

    ``disconnected``, when the adapter sets it, is asked before every wait
    whether the client is gone, so that the stream ends without waiting for
    a write to fail.
    """

    def __init__(
        self,
        api: AsyncRetryAPI,
        project_id: str,
        *,
        after: int,
        first: _Events,
        read: _ReadEvents,
        release: Callable[[], None],
        lifetime: float | None = None,
    ) -> None:
        self.api = api
        self.project_id = project_id
        self.last = after
        """The number of the last event written (where a reconnect resumes)."""
        self.closed = False
        self.disconnected: Callable[[], bool] | None = None
        self._first = first
        self._read_events = read
        self._release = release
        self._started = time.monotonic()
        limits = [t for t in (api.streams.max_lifetime, lifetime) if t is not None]
        self._lifetime = min(limits) if limits else None
        """Seconds after which the stream ends by itself (``None``: never)."""
        self._frames = self._run()

    def __aiter__(self) -> AsyncEventStream:
        return self

    async def __anext__(self) -> bytes:
        if self.closed:
            raise StopAsyncIteration
        return await self._frames.__anext__()

    async def close(self) -> None:
        """End the stream and free its slot (harmless when already closed)."""
        self.closed = True
        self._release()
        await close_iterator(self._frames)

    def _ending(self) -> bool:
        return (
            self.closed
            or self.api.streams_closing
            or (self.disconnected is not None and self.disconnected())
            or (self._lifetime is not None and time.monotonic() - self._started >= self._lifetime)
        )

    async def _run(self) -> AsyncIterator[bytes]:
        options = self.api.streams
        try:
            yield retry_frame(options)
            events: _Events | None = self._first
            if not events:
                # Nothing new to send: the counters still come at once, so that a
                # client resuming after its last event knows where the project stands.
                progress = await self._progress()
                if progress:
                    yield progress
            beat = time.monotonic()
            while events is not None:
                if events:
                    for event in events:
                        yield event_frame(event)
                    self.last = events[-1].seq
                    progress = await self._progress()
                    if progress:
                        yield progress
                    beat = time.monotonic()
                    if len(events) >= options.batch and not self._ending():
                        events = await self._read()  # more are waiting: no pause
                        continue
                elif time.monotonic() - beat >= options.heartbeat:
                    yield KEEPALIVE
                    beat = time.monotonic()
                if self._ending():
                    return
                wait = min(options.poll_interval, beat + options.heartbeat - time.monotonic())
                if wait > 0:
                    await sleep(wait)
                if self._ending():
                    return
                events = await self._read()
        finally:
            self.closed = True
            self._release()

    async def _read(self) -> _Events | None:
        """The events after the last one written; ``None`` when the project is gone.

        A storage that fails meanwhile is logged and read again at the next
        poll: the stream stays open (a browser would not reconnect after a 503).
        """
        try:
            return await self._read_events(
                self.project_id, after=self.last, limit=self.api.streams.batch
            )
        except ProjectNotFound:
            return None
        except Exception:
            log.warning(
                "event stream of project %r: reading its events failed; trying again",
                self.project_id,
                exc_info=True,
            )
            return []

    async def _progress(self) -> bytes:
        try:
            progress = await self.api.service.progress(self.project_id)
        except Exception:
            log.warning(
                "event stream of project %r: reading its progress failed",
                self.project_id,
                exc_info=True,
            )
            return b""
        return progress_frame(self.project_id, progress)


class AsyncRetryAPI:
    """Every route of the API: authenticate, authorise, call the service, render.

    ``authorizer`` decides whether a principal may act in a project; a
    refusal is reported as ``404 Project not found`` so that it does not
    reveal which projects exist.

    ``body_timeout`` is how many seconds a request's body may take to arrive,
    for the adapters that read it themselves (Starlette, FastAPI, aiohttp): a
    body that stops arriving is answered 408 and its connection closed. Under
    WSGI the server owns the socket and its timeout (see docs/web/routes.md).

    ``streams`` (:class:`~deepwork_retry.web.StreamOptions`) says how the
    project event streams are served: poll and heartbeat intervals, how many
    one principal may have open (``max_streams``), their lifetime.
    :meth:`close_streams` ends them all, for a server shutting down.
    """

    def __init__(
        self,
        service: AsyncRetryService,
        authenticator: Authenticator,
        authorizer: Authorizer = may_retry,
        *,
        abandoned_after: float = 60.0,
        body_timeout: float = BODY_TIMEOUT,
        streams: StreamOptions = DEFAULT_STREAMS,
    ) -> None:
        check_kind(type(self).__name__, "service", service, "retry", asynchronous=ASYNCHRONOUS)
        if not body_timeout > 0:
            raise ValueError("body_timeout must be a positive number of seconds")
        self.service = service
        self.authenticator = authenticator
        self.authorizer = authorizer
        self.abandoned_after = abandoned_after
        self.body_timeout = body_timeout
        self.streams = streams
        self.stream_slots = StreamSlots(streams.max_streams)
        self.streams_closing = False

    def close_streams(self) -> None:
        """End every open event stream at its next poll, and any opened later at once
        (for a server shutting down: its open streams would otherwise hold it up)."""
        self.streams_closing = True

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
            if route == "projects":
                return await self._projects(principal, request)
            if route == "blocked":
                return await self._blocked(principal, request)
            project_id = params["project_id"]
            if not self.authorizer(principal, project_id):
                raise ProjectNotFound(project_id[:255])
            if route == "retry":
                return await self._retry(principal, project_id, params["task_id"], request)
            if route == "retry_blocked":
                return await self._retry_blocked(principal, project_id, request)
            if route == "events":
                return await self._events(principal, project_id, request)
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
        return await self.retry_for(
            principal,
            project_id,
            task_id,
            budget=options.budget,
            reason=options.reason,
            key=key,
        )

    async def retry_for(
        self,
        principal: Principal,
        project_id: str,
        task_id: str,
        *,
        budget: RetryBudget = RetryBudget.ONE_MORE,
        reason: str | None = None,
        key: str | None = None,
    ) -> ApiResponse:
        """The retry route's answer for a caller already authenticated as ``principal``.

        What ``POST .../retry`` does once it has read its request (the operator
        dashboard calls it with a session's principal and a form's options):
        the authorizer decides (a refusal is ``404 Project not found``), and
        ``key`` (a client's Idempotency-Key, checked as the header is; ``None``:
        none) makes a repeat replay the first answer instead of retrying again.
        Never raises: an error is its response from the error table.
        """
        try:
            if not self.authorizer(principal, project_id):
                raise ProjectNotFound(project_id[:255])
            if key is not None:
                key = idempotency_key({"idempotency-key": key})
            reason = check_reason(reason)
            return await self._retry_as(principal, project_id, task_id, budget, reason, key)
        except Exception as exc:  # noqa: BLE001 - every error becomes a JSON response
            return error_response(exc)

    async def _retry_as(
        self,
        principal: Principal,
        project_id: str,
        task_id: str,
        budget: RetryBudget,
        reason: str | None,
        key: str | None,
    ) -> ApiResponse:
        if key is None:
            result = await self.service.retry(
                project_id,
                task_id,
                actor=principal.id,
                reason=reason,
                budget=budget,
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
                reason=reason,
                budget=budget,
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

    # -- the event stream -----------------------------------------------------------------
    async def events_for(
        self,
        principal: Principal,
        project_id: str,
        request: ApiRequest,
        *,
        lifetime: float | None = None,
    ) -> ApiResponse:
        """The events route's answer for a caller already authenticated as ``principal``.

        The same stream, bound and slots as ``GET .../events`` (the operator
        dashboard's live updates open theirs here with a session's principal):
        the authorizer decides (a refusal is ``404 Project not found``), then
        ``request``'s ``Last-Event-ID`` or ``?after=`` says where to resume.
        ``lifetime``: seconds after which this stream ends by itself, sooner
        than ``StreamOptions.max_lifetime`` (what is left of a session, say:
        the client then reconnects, and is asked to sign in again).
        Never raises: an error is its response from the error table.
        """
        try:
            if not self.authorizer(principal, project_id):
                raise ProjectNotFound(project_id[:255])
            return await self._events(principal, project_id, request, lifetime)
        except Exception as exc:  # noqa: BLE001 - every error becomes a JSON response
            return error_response(exc)

    async def _events(
        self,
        principal: Principal,
        project_id: str,
        request: ApiRequest,
        lifetime: float | None = None,
    ) -> ApiResponse:
        after = resume_after(request.headers, request.query)
        read: _ReadEvents | None = getattr(self.service.storage, "events", None)
        if read is None:
            raise EventsNotKept
        release = self.stream_slots.take(principal.id)
        try:
            # Read before answering: an unknown project or a storage that is down
            # is still a 404 or a 503, not a stream that ends at once.
            first = await read(project_id, after=after, limit=self.streams.batch)
        except BaseException:
            release()
            raise
        if request.method == "HEAD":
            release()
            return ApiResponse(status=200, body=b"", headers=STREAM_HEADERS)
        stream = AsyncEventStream(
            self,
            project_id,
            after=after,
            first=first,
            read=read,
            release=release,
            lifetime=lifetime,
        )
        return ApiResponse(status=200, body=b"", headers=STREAM_HEADERS, stream=stream)

    # -- reads across projects --------------------------------------------------------------
    async def _projects(self, principal: Principal, request: ApiRequest) -> ApiResponse:
        """A page of the projects the principal may see: the storage is given its
        projects, and each row is also put to the authorizer (the host's own rule)."""
        page = projects_options(request.query)

        async def read(after: str | None) -> tuple[list[ProjectSummary], str | None]:
            return await self.service.projects(
                scope=principal.projects, after=after, limit=page.limit
            )

        summaries, next_after = await _visible_page(
            read,
            page.after,
            page.limit,
            lambda s: self.authorizer(principal, s.project.id),
            lambda s: s.project.id,
        )
        return respond(200, projects_page_json(summaries, next_after))

    async def _blocked(self, principal: Principal, request: ApiRequest) -> ApiResponse:
        """A page of the blocked tasks the principal may see, across its projects (or
        in the one ``project_id`` names: one it may not see gives an empty page)."""
        options = blocked_options(request.query)
        if options.project_id is not None and not self.authorizer(principal, options.project_id):
            return respond(200, blocked_page_json([], None))

        async def read(after: tuple[str, str] | None) -> tuple[list[Task], tuple[str, str] | None]:
            return await self.service.blocked_across(
                scope=principal.projects,
                project_id=options.project_id,
                error_type=options.error_type,
                after=after,
                limit=options.limit,
            )

        tasks, next_after = await _visible_page(
            read,
            options.after,
            options.limit,
            lambda t: self.authorizer(principal, t.project_id),
            lambda t: (t.project_id, t.id),
        )
        cursor = None if next_after is None else blocked_cursor(*next_after)
        return respond(200, blocked_page_json(tasks, cursor))

    # -- reads --------------------------------------------------------------------------
    async def _read(
        self, route: str, project_id: str, task_id: str | None, request: ApiRequest
    ) -> ApiResponse:
        if route == "progress":
            project = await self.service.get_project(project_id)
            progress = await self.service.progress(project_id)
            return respond(200, project_progress_json(project, progress))
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


__all__ = ["AsyncEventStream", "AsyncRetryAPI"]
